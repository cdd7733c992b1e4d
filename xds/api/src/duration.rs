//! Durations written with units (`250ms`, `2s`, `1m30s`, `1h`), as every Ferry setting and policy takes them.

use std::time::Duration;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("`{0}`: expected a number followed by a unit (ms, s, m, h), e.g. 250ms, 2s, 1m30s")]
    Malformed(String),
    #[error("`{0}`: duration too large")]
    Overflow(String),
    #[error("`{0}`: longer than {MAX_DURATION_TEXT} characters")]
    TooLong(String),
}

/// The longest duration text accepted (the CRD schema's `maxLength` too).
pub const MAX_DURATION_TEXT: usize = 32;

/// Parses `250ms`, `2s`, `1m30s`, `1h`, `0s`. A bare number is refused: the unit is never guessed.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s.len() > MAX_DURATION_TEXT {
        return Err(DurationError::TooLong(s.to_string()));
    }
    let malformed = || DurationError::Malformed(s.to_string());
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(malformed());
        }
        let value: u64 = rest[..digits].parse().map_err(|_| DurationError::Overflow(s.to_string()))?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            _ => return Err(malformed()),
        };
        rest = &rest[unit_len..];
        let part = u32::try_from(value)
            .ok()
            .and_then(|v| unit.checked_mul(v))
            .ok_or_else(|| DurationError::Overflow(s.to_string()))?;
        total = total.checked_add(part).ok_or_else(|| DurationError::Overflow(s.to_string()))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            ("250ms", Duration::from_millis(250)),
            ("2s", Duration::from_secs(2)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("0s", Duration::ZERO),
            (" 10s ", Duration::from_secs(10)),
            ("1s500ms", Duration::from_millis(1500)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "10", "s", "1.5s", "10 s", "-1s", "1d", "1sx", "99999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
