//! Wall-clock timestamps (RFC 3339 on the wire) and request durations
//! (`"15m"`, `"90s"` or a number of seconds on the wire).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// The longest duration any message may carry; anything longer is a typo or an attack.
pub const MAX_WIRE_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

/// A point in time, written as RFC 3339 UTC with seconds (`2026-11-25T10:00:00Z`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    /// The current time, truncated to whole milliseconds.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self::from_unix_ms(ms)
    }

    /// A timestamp from milliseconds since the Unix epoch.
    pub fn from_unix_ms(ms: u64) -> Self {
        Self(UNIX_EPOCH + Duration::from_millis(ms))
    }

    /// Milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> u64 {
        self.0
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// This timestamp plus `d`.
    pub fn after(&self, d: Duration) -> Self {
        Self(self.0 + d)
    }

    /// How long from now until this time (zero if it has passed).
    pub fn remaining(&self) -> Duration {
        self.0
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
    }

    /// How long ago this was (zero if it is in the future).
    pub fn elapsed(&self) -> Duration {
        SystemTime::now()
            .duration_since(self.0)
            .unwrap_or(Duration::ZERO)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self
            .0
            .duration_since(UNIX_EPOCH)
            .is_ok_and(|d| d.subsec_millis() != 0)
        {
            write!(f, "{}", humantime::format_rfc3339_millis(self.0))
        } else {
            write!(f, "{}", humantime::format_rfc3339_seconds(self.0))
        }
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map(Timestamp)
            .map_err(|e| de::Error::custom(format!("{s:?} is not an RFC 3339 time: {e}")))
    }
}

/// A positive duration no longer than [`MAX_WIRE_DURATION`], from `"15m"`, `"1h 30m"`,
/// `"90s"`, `"300ms"` or a whole number of seconds. Written back as humantime text.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ttl(Duration);

/// Why a duration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Zero is never a useful duration.
    #[error("duration must be longer than zero")]
    Zero,
    /// Longer than [`MAX_WIRE_DURATION`].
    #[error("duration {0} is longer than the limit of 366 days")]
    TooLong(String),
    /// Negative numbers, fractions of seconds given as numbers, and garbage.
    #[error(
        "{0:?} is not a duration; write e.g. \"15m\", \"90s\", \"1h 30m\" or a number of seconds"
    )]
    Malformed(String),
}

impl Ttl {
    /// Checks `d` and wraps it.
    pub fn new(d: Duration) -> Result<Self, DurationError> {
        if d.is_zero() {
            Err(DurationError::Zero)
        } else if d > MAX_WIRE_DURATION {
            Err(DurationError::TooLong(
                humantime::format_duration(d).to_string(),
            ))
        } else {
            Ok(Self(d))
        }
    }

    /// Parses humantime text, or digits meaning seconds.
    pub fn parse(s: &str) -> Result<Self, DurationError> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            let secs: u64 = s
                .parse()
                .map_err(|_| DurationError::TooLong(format!("{s}s")))?;
            return Self::new(Duration::from_secs(secs));
        }
        let d = humantime::parse_duration(s).map_err(|_| DurationError::Malformed(s.to_owned()))?;
        Self::new(d)
    }

    /// The duration.
    pub fn get(&self) -> Duration {
        self.0
    }
}

impl std::str::FromStr for Ttl {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, DurationError> {
        Ttl::parse(s)
    }
}

impl fmt::Display for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl fmt::Debug for Ttl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Ttl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Ttl;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"15m\" or a number of seconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ttl, E> {
                Ttl::new(Duration::from_secs(v)).map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ttl, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(DurationError::Malformed(v.to_string()))),
                }
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ttl, E> {
                Err(E::custom(DurationError::Malformed(v.to_string())))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ttl, E> {
                Ttl::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_from_text_and_seconds() {
        assert_eq!(Ttl::parse("15m").unwrap().get(), Duration::from_secs(900));
        assert_eq!(Ttl::parse("90s").unwrap().get(), Duration::from_secs(90));
        assert_eq!(
            Ttl::parse("1h 30m").unwrap().get(),
            Duration::from_secs(5400)
        );
        assert_eq!(
            Ttl::parse("300ms").unwrap().get(),
            Duration::from_millis(300)
        );
        assert_eq!(Ttl::parse("600").unwrap().get(), Duration::from_secs(600));
        let from_json: Ttl = serde_json::from_str("120").unwrap();
        assert_eq!(from_json.get(), Duration::from_secs(120));
    }

    #[test]
    fn bad_durations_are_refused_with_a_message() {
        assert_eq!(Ttl::parse("0").unwrap_err(), DurationError::Zero);
        assert_eq!(Ttl::parse("0s").unwrap_err(), DurationError::Zero);
        assert!(matches!(
            Ttl::parse("-5m"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            Ttl::parse("soon"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(Ttl::parse(""), Err(DurationError::Malformed(_))));
        assert!(matches!(Ttl::parse("500y"), Err(DurationError::TooLong(_))));
        assert!(matches!(
            Ttl::parse("99999999999999999999999"),
            Err(DurationError::TooLong(_))
        ));
        for json in ["-5", "1.5", "0", "\"forever\"", "true"] {
            let err = serde_json::from_str::<Ttl>(json).unwrap_err().to_string();
            assert!(err.contains("duration"), "{json}: {err}");
        }
    }

    #[test]
    fn timestamps_round_trip_as_rfc3339() {
        let t = Timestamp::from_unix_ms(1_764_064_800_000);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, "\"2025-11-25T10:00:00Z\"");
        assert_eq!(serde_json::from_str::<Timestamp>(&json).unwrap(), t);
        let ms = Timestamp::from_unix_ms(1_764_064_800_250);
        assert_eq!(ms.to_string(), "2025-11-25T10:00:00.250Z");
        assert_eq!(
            serde_json::from_str::<Timestamp>(&serde_json::to_string(&ms).unwrap()).unwrap(),
            ms
        );
    }
}
