//! `metav1.Duration` values (`10s`, `1m30s`, `100ms`) as Go's `time.ParseDuration` accepts them.

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GoDurationError {
    #[error("empty duration")]
    Empty,
    #[error(
        "invalid duration {0:?}: expected a sequence of number+unit such as 10s, 1m30s or 100ms"
    )]
    Invalid(String),
    #[error("negative duration {0:?} is not allowed")]
    Negative(String),
}

/// Parses a Go duration string. Negative durations are rejected: no Switchyard
/// field has a meaning for them.
pub fn parse_go_duration(text: &str) -> Result<Duration, GoDurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(GoDurationError::Empty);
    }
    if trimmed.starts_with('-') {
        return Err(GoDurationError::Negative(text.to_owned()));
    }
    let rest = trimmed.strip_prefix('+').unwrap_or(trimmed);
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || GoDurationError::Invalid(text.to_owned());
    let mut total_nanos: f64 = 0.0;
    let mut remaining = rest;
    while !remaining.is_empty() {
        let number_len = remaining
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if number_len == 0 {
            return Err(invalid());
        }
        let number: f64 = remaining[..number_len].parse().map_err(|_| invalid())?;
        remaining = &remaining[number_len..];
        let unit_len = remaining
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(remaining.len());
        let nanos_per_unit = match &remaining[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(invalid()),
        };
        remaining = &remaining[unit_len..];
        total_nanos += number * nanos_per_unit;
    }
    if !total_nanos.is_finite() || total_nanos > u64::MAX as f64 {
        return Err(invalid());
    }
    Ok(Duration::from_nanos(total_nanos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_durations() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("100ms", Duration::from_millis(100)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("1.5s", Duration::from_millis(1500)),
            ("250us", Duration::from_micros(250)),
            ("0", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_go_duration(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn rejects_bad_durations() {
        for text in ["", "10", "s", "10x", "-1s", "1.2.3s", "ten seconds"] {
            assert!(
                parse_go_duration(text).is_err(),
                "{text} should be rejected"
            );
        }
    }
}
