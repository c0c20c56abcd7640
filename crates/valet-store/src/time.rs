//! Time as the store keeps it: unix milliseconds, shown as ISO-8601.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `2026-11-29T05:46:58.123Z`.
pub fn iso(ms: i64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => {
            let format = time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            );
            t.format(&format).unwrap_or_default()
        }
        Err(_) => String::new(),
    }
}

/// Parses RFC 3339 (`2026-12-01T00:00:00Z`) or a plain date (`2026-12-01`).
pub fn parse(text: &str) -> Option<i64> {
    if let Ok(t) = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
    {
        return Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let date = time::Date::parse(text, &format).ok()?;
    Some(date.midnight().assume_utc().unix_timestamp() * 1000)
}

#[cfg(test)]
mod tests {
    #[test]
    fn iso_round_trip() {
        assert_eq!(super::iso(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::parse("1970-01-02"), Some(86_400_000));
        assert_eq!(
            super::parse(&super::iso(1_700_000_000_123)),
            Some(1_700_000_000_123)
        );
    }
}
