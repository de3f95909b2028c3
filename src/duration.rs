//! Durations read from text (the config, the admin API, the state), written as humantime
//! writes them ("30m", "1h 30m", "250ms"), refusing what no clock holds.
//!
//! humantime 2.x panics on a string whose total reaches `u64::MAX` seconds with a carry of
//! nanoseconds ("18446744073709551615s 1000ms": `Duration::new` overflows). Such a string
//! can come from anyone who can reach `GET /drain/wait`, so every duration Switchyard reads
//! goes through `parse`, which refuses absurd totals before humantime sees them.

use std::time::Duration;

/// The seconds in humantime's largest unit, the year (365.25 days).
const YEAR_SECS: u128 = 31_557_600;

/// Totals from this many seconds up (about 146 billion years) are refused unread.
const REFUSED_FROM_SECS: u128 = 1 << 62;

/// Parses a humantime duration; an absurdly long one is an error, never a panic.
pub fn parse(text: &str) -> Result<Duration, String> {
    if upper_bound_secs(text) >= REFUSED_FROM_SECS {
        return Err("too long: must be at most 10 years".into());
    }
    humantime::parse_duration(text).map_err(|e| e.to_string())
}

/// At least the seconds `text` could add up to, for any text humantime reads: each number
/// in its unit, where a unit other than nano-, micro- and milliseconds is taken as the
/// largest, a year; a fraction as one more whole unit. humantime reads digits across
/// whitespace as one number ("1 0s" is ten seconds), so this does too.
fn upper_bound_secs(text: &str) -> u128 {
    fn bound(number: u128, unit: &str) -> u128 {
        if unit.starts_with('n') {
            number / 1_000_000_000 + 1
        } else if unit.starts_with('u') || unit.starts_with('µ') {
            number / 1_000_000 + 1
        } else if matches!(unit, "ms" | "msec" | "millis") {
            number / 1_000 + 1
        } else {
            number.saturating_mul(YEAR_SECS)
        }
    }
    let mut total: u128 = 0;
    let mut number: u128 = 0;
    let mut fraction = false;
    let mut unit = String::new();
    for c in text.chars() {
        let digit = c.to_digit(10);
        // A unit ends at the next number, or at whitespace (as humantime's does).
        if (digit.is_some() || c.is_whitespace()) && !unit.is_empty() {
            total = total.saturating_add(bound(number, &unit));
            (number, fraction) = (0, false);
            unit.clear();
        }
        if let Some(digit) = digit {
            if !fraction {
                number = number.saturating_mul(10).saturating_add(u128::from(digit));
            }
        } else if c == '.' && unit.is_empty() {
            if !fraction {
                number = number.saturating_add(1);
            }
            fraction = true;
        } else if !c.is_whitespace() && unit.len() < 16 {
            unit.push(c);
        }
    }
    total.saturating_add(bound(number, &unit))
}

/// Parses a duration read back from Switchyard's own state (the state file, etcd): one an
/// older version stored past what `parse` takes is the longest drain, not a reason to
/// refuse the whole state.
pub fn parse_stored(text: &str) -> Result<Duration, String> {
    if upper_bound_secs(text) >= REFUSED_FROM_SECS {
        return Ok(crate::config::MAX_TIMEOUT);
    }
    parse(text)
}

/// `#[serde(with = "crate::duration::serde")]` for a `Duration` field.
pub mod serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `#[serde(default, with = "crate::duration::option")]` for an `Option<Duration>` field;
/// written back as humantime writes it.
pub mod option {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::parse(&text).map_err(serde::de::Error::custom))
            .transpose()
    }

    pub fn serialize<S: Serializer>(value: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }
}

/// `crate::duration::option` for Switchyard's own state: read with `parse_stored`.
pub mod stored {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub use super::option::serialize;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::parse_stored(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_humantime_reads() {
        assert_eq!(parse("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse("1h 30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("0s"), Ok(Duration::ZERO));
        assert_eq!(parse("10y"), Ok(Duration::from_secs(10 * 31_557_600)));
        assert!(parse("").is_err());
        assert!(parse("5").is_err());
        assert!(parse("-1s").is_err());
        assert!(parse("abc").is_err());
    }

    #[test]
    fn refuses_totals_that_would_panic_humantime() {
        // Each of these made humantime's `Duration::new` overflow.
        for text in [
            "18446744073709551615s 1000ms",
            "18446744073709551615s 1000000000ns",
            "18446744073709551614s 2000ms",
        ] {
            assert!(parse(text).is_err(), "{text}");
        }
        assert!(parse("99999999999999999999999999999999999999999999y").is_err());
        // Far past anything a config takes, but not refused here: the fields bound it.
        assert!(parse("1000000y").is_ok());
    }

    #[test]
    fn small_units_and_fractions_are_not_taken_for_years() {
        for (text, secs) in [
            ("200000000000ns", 200.0),
            ("150000000000us", 150_000.0),
            ("5000000000000ms", 5_000_000_000.0),
            ("1.1000000000000h", 3960.0),
            ("1.5s", 1.5),
            ("2 min", 120.0),
        ] {
            assert_eq!(parse(text).map(|d| d.as_secs_f64()), Ok(secs), "{text}");
        }
    }

    #[test]
    fn a_stored_duration_past_the_bound_is_the_longest() {
        // What an older version stored for a flip's drain_timeout of u64::MAX seconds.
        let old = "584542046090years 7months 15days 17h 5m 3s";
        assert!(parse(old).is_err());
        assert_eq!(parse_stored(old), Ok(crate::config::MAX_TIMEOUT));
        assert_eq!(parse_stored("30m"), Ok(Duration::from_secs(1800)));
    }
}
