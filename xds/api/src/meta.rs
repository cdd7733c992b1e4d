//! What every document carries (its metadata) and how a refused field is named: shared by the documents and the
//! policies, which import nothing of each other's parsing.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// When the object was first stored (RFC 3339, UTC), set by the store as the API server sets it; the older of
    /// two HTTPRoutes wins a precedence tie.
    #[serde(default, rename = "creationTimestamp", skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

impl Metadata {
    /// `creationTimestamp` in seconds since the epoch (0 when unset).
    pub fn created(&self) -> i64 {
        self.creation_timestamp.as_deref().and_then(unix_seconds).unwrap_or(0)
    }
}

fn default_namespace() -> String {
    "default".to_string()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468
}

/// Pure: seconds since the epoch of a Kubernetes timestamp, RFC 3339 in UTC (`2026-12-03T16:10:25Z`, a fraction of
/// a second allowed and dropped); `None` for anything else.
pub fn unix_seconds(text: &str) -> Option<i64> {
    if !text.is_ascii() {
        return None;
    }
    let b = text.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = text.get(r)?;
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let tail = &text[19..];
    let fraction_ok =
        |f: &str| f.is_empty() || (f.len() > 1 && f.starts_with('.') && f[1..].bytes().all(|c| c.is_ascii_digit()));
    if !tail.ends_with('Z') || !fraction_ok(&tail[..tail.len() - 1]) {
        return None;
    }
    let (y, mo, d, h, mi, s) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&mo) || d < 1 || d > month_days[(mo - 1) as usize] || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3_600 + mi * 60 + s)
}

/// Pure: the Kubernetes timestamp of `unix` seconds since the epoch (RFC 3339, UTC, whole seconds).
pub fn rfc3339(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Howard Hinnant's `civil_from_days`.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", secs / 3_600, secs % 3_600 / 60, secs % 60)
}

/// A DNS-1123 label: what Kubernetes accepts as a namespace, Service or service-account name.
pub fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// One refused field: `spec.ports[0].port: must be 1-65535`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_timestamps_round_trip_and_bad_ones_are_refused() {
        for (text, unix) in [
            ("1970-01-01T00:00:00Z", 0),
            ("2000-02-29T12:00:00Z", 951_825_600),
            ("2026-12-03T16:10:25Z", 1_796_314_225),
            ("2038-01-19T03:14:08Z", 2_147_483_648),
        ] {
            assert_eq!(unix_seconds(text), Some(unix), "{text}");
            assert_eq!(rfc3339(unix), text);
        }
        assert_eq!(unix_seconds("2026-12-03T16:10:25.123456Z"), Some(1_796_314_225));
        for bad in [
            "2026-12-03 16:10:25Z",
            "2026-12-03T16:10:25",
            "2026-12-03T16:10:25+01:00",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-12-03T24:00:00Z",
            "2026-12-03T16:10:25.Z",
            "+026-12-03T16:10:25Z",
            "2026-12-03T16:10:0\u{e9}5Z",
            "",
        ] {
            assert_eq!(unix_seconds(bad), None, "{bad}");
        }
    }
}
