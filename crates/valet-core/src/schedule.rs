//! Cron schedules of cron vals: five fields (minute precision) or six
//! (with seconds), parsed once and checked when a val is saved.

use std::fmt;

use chrono::{TimeZone, Utc};

#[derive(Clone)]
pub struct Schedule {
    text: String,
    cron: croner::Cron,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid schedule '{text}': {reason} (use cron syntax, e.g. '*/5 * * * *')")]
pub struct ScheduleError {
    text: String,
    reason: String,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let fields = text.split_whitespace().count();
        if !(fields == 5 || fields == 6 || text.trim_start().starts_with('@')) {
            return Err(ScheduleError {
                text: text.into(),
                reason: format!("{fields} fields, expected 5 or 6"),
            });
        }
        let cron = croner::parser::CronParser::new()
            .parse(text)
            .map_err(|e| ScheduleError {
                text: text.into(),
                reason: e.to_string(),
            })?;
        Ok(Schedule {
            text: text.to_owned(),
            cron,
        })
    }

    /// The first time strictly after `after_ms` (unix milliseconds).
    pub fn next_after(&self, after_ms: i64) -> Option<i64> {
        // Whole seconds: cron times fall on second boundaries.
        let start = Utc
            .timestamp_millis_opt(after_ms - after_ms.rem_euclid(1000))
            .single()?;
        self.cron
            .find_next_occurrence(&start, false)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds_the_next_time() {
        let every_minute = Schedule::parse("* * * * *").expect("valid");
        assert_eq!(every_minute.next_after(0), Some(60_000));
        let every_second = Schedule::parse("* * * * * *").expect("valid");
        assert_eq!(every_second.next_after(1_500), Some(2_000));
        for bad in ["", "* * *", "61 * * * *", "not a schedule at all"] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?}");
        }
    }
}
