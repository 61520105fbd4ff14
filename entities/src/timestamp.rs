//! Lenient decoding of timestamps in row images: RFC 3339 (what the server and the column
//! defaults write), and the `YYYY-MM-DD HH:MM:SS[.fff]` text (taken as UTC) that SQLite's own
//! `datetime('now')` gives a SQL writer, so one such row cannot stall a channel's feed.

use chrono::{DateTime, NaiveDateTime, Utc};
use serde::{Deserialize, Deserializer};

/// Deserializes a UTC timestamp from RFC 3339 or SQLite's `YYYY-MM-DD HH:MM:SS[.fff]`.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).ok_or_else(|| serde::de::Error::custom(format!("not a timestamp: {text:?}")))
}

/// Parses RFC 3339, or a zone-less date and time taken as UTC.
pub fn parse(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Some(time.with_timezone(&Utc));
    }
    ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|naive| naive.and_utc())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn accepts_the_formats_writers_produce() {
        for text in [
            "2026-11-27T15:38:41.874Z",
            "2026-11-27T15:38:41.886880178+00:00",
            "2026-11-27 15:38:41",
            "2026-11-27 15:38:41.5",
            "2026-11-27T15:38:41",
        ] {
            assert!(parse(text).is_some(), "{text}");
        }
        assert!(parse("yesterday").is_none());
    }
}
