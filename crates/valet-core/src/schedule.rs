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
        check_fields(text).map_err(|reason| ScheduleError {
            text: text.into(),
            reason,
        })?;
        let cron = croner::parser::CronParser::new()
            .parse(text)
            .map_err(|e| ScheduleError {
                text: text.into(),
                reason: e.to_string(),
            })?;
        if !fires_at_all(&cron) {
            return Err(ScheduleError {
                text: text.into(),
                reason: "it never fires (no such date or time)".into(),
            });
        }
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

/// Whether the schedule matches any second at all. croner's own search for
/// a schedule that never fires (`0 0 30 2 *`) walks years of days, a
/// quarter of a second or more on every scheduler tick; this asks its
/// pattern directly, day by day over 28 years (the Gregorian calendar's
/// weekday-and-leap-year cycle within 1901-2099), in about ten thousand
/// cheap checks.
fn fires_at_all(cron: &croner::Cron) -> bool {
    let p = &cron.pattern;
    let some = |range: std::ops::Range<u32>, hit: &dyn Fn(u32) -> bool| range.into_iter().any(hit);
    let time = some(0..24, &|h| p.hour_match(h).unwrap_or(false))
        && some(0..60, &|m| p.minute_match(m).unwrap_or(false))
        && some(0..60, &|s| p.second_match(s).unwrap_or(false));
    time && (2001..2029).any(|year| {
        some(1..13, &|month| {
            p.month_match(month).unwrap_or(false)
                && some(1..32, &|day| p.day_match(year, month, day).unwrap_or(false))
        })
    })
}

/// The shorthands croner knows.
const NICKNAMES: &[&str] = &[
    "@yearly",
    "@annually",
    "@monthly",
    "@weekly",
    "@daily",
    "@midnight",
    "@hourly",
];

/// Refuses, before croner sees them, the forms that parse but may never
/// fire, where croner's search for the next time runs for many seconds
/// (found by the `cron` fuzz target): empty list elements (`*/5 , * * *`),
/// the `+` day-of-week modifier, empty or zero steps, and anything outside
/// cron's characters.
fn check_fields(text: &str) -> Result<(), String> {
    let trimmed = text.trim();
    if trimmed.starts_with('@') {
        return if NICKNAMES.contains(&trimmed.to_ascii_lowercase().as_str()) {
            Ok(())
        } else {
            Err(format!("unknown shorthand '{trimmed}'"))
        };
    }
    let fields: Vec<&str> = trimmed.split_whitespace().collect();
    let day_of_week = fields.len().checked_sub(1);
    for (index, field) in fields.iter().enumerate() {
        for part in field.split(',') {
            if part.is_empty() {
                return Err(format!("empty list element in '{field}'"));
            }
            if let Some(c) = part
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || "*?#-/".contains(*c)))
            {
                return Err(format!("unexpected '{c}' in '{field}'"));
            }
            let mut pieces = part.split('/');
            let base = pieces.next().unwrap_or_default();
            if base.is_empty() || base.starts_with('-') || base.ends_with('-') {
                return Err(format!("incomplete range in '{field}'"));
            }
            match (pieces.next(), pieces.next()) {
                (None, _) => {}
                (Some(step), None)
                    if !step.is_empty()
                        && step.len() <= 3
                        && step.bytes().all(|b| b.is_ascii_digit())
                        && step.bytes().any(|b| b != b'0') => {}
                _ => return Err(format!("invalid step in '{field}'")),
            }
            if Some(index) == day_of_week {
                check_day_of_week(part).map_err(|e| format!("{e} in '{field}'"))?;
            }
        }
    }
    Ok(())
}

/// `L` (last) and `#` (nth) in the day-of-week field need a weekday before
/// them and `#` a week from 1 to 5: otherwise the schedule never fires and
/// the search for it runs for years of days.
fn check_day_of_week(part: &str) -> Result<(), String> {
    let weekday = |d: &str| {
        (d.len() == 1 && d.bytes().all(|b| (b'0'..=b'7').contains(&b)))
            || (d.len() == 3 && d.bytes().all(|b| b.is_ascii_alphabetic()))
    };
    if let Some(day) = part.strip_suffix(['L', 'l']) {
        return if weekday(day) {
            Ok(())
        } else {
            Err(format!("'L' needs a weekday before it ('{part}')"))
        };
    }
    if let Some((day, nth)) = part.split_once('#') {
        return if weekday(day) && matches!(nth, "1" | "2" | "3" | "4" | "5") {
            Ok(())
        } else {
            Err(format!(
                "'#' needs a weekday and a week from 1 to 5 ('{part}')"
            ))
        };
    }
    Ok(())
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
        for good in [
            "*/5 * * * *",
            "0 12 * * MON-FRI",
            "0 0 L * *",
            "0 0 * * 5#3",
            "1,2,3 * * * *",
            "@daily",
        ] {
            assert!(Schedule::parse(good).is_ok(), "{good:?}");
        }
    }

    /// Found by the `cron` fuzz target (issue #17): schedules croner
    /// accepts but searches for seconds on end (5 to 22 s each), which
    /// would stall the scheduler on every tick.
    #[test]
    fn schedules_that_make_the_search_run_away_are_refused() {
        for bad in [
            "0 0 1 1 +",
            "59/5 ,, * * 12 *",
            "*/5 , * * 6 *",
            "000000/090 0 1 1 +",
            "000000/1 0 1 1 +",
            "*/0 * * * *",
            "*/ * * * *",
            "1- * * * *",
            "@sometimes",
            "*/5 5 * * * L",
            "0 0 * * 7#9L",
            "0 0 * * 7#9",
            "1 04 * * MON L",
            "*/5 * * * * l",
            "0 0 30 2 *",
            "59 2 31 11 *",
            "0 0 * * 7L",
        ] {
            assert!(Schedule::parse(bad).is_err(), "{bad:?}");
        }
    }
}
