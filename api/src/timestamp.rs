//! RFC 3339 timestamps as Kubernetes and the kvstore write them.
//!
//! Kubernetes' `metav1.Time` (the `exportCreationTimestamp` of a service
//! export) and the values of sync canaries and the heartbeat are RFC 3339 in
//! UTC with second precision: `2026-01-01T00:00:00Z`. [`Timestamp`] holds
//! exactly that, so formatting cannot fail and round trips are exact.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::clip;

/// A timestamp could not be parsed or represented.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimestampError {
    /// Not RFC 3339.
    #[error("{value:?} is not an RFC 3339 timestamp")]
    NotRfc3339 {
        /// The offending text (clipped).
        value: String,
    },
    /// Outside the years 0000..=9999 that RFC 3339 can express.
    #[error("{value:?} is outside the years 0000..=9999")]
    OutOfRange {
        /// The offending value.
        value: String,
    },
}

/// A UTC instant with second precision, written `YYYY-MM-DDTHH:MM:SSZ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(OffsetDateTime);

impl Timestamp {
    /// The current time, truncated to the second.
    pub fn now() -> Self {
        Self::from_datetime(OffsetDateTime::now_utc())
            .expect("the current time lies within the years 0000..=9999")
    }

    /// Converts to UTC and truncates to the second.
    ///
    /// # Errors
    ///
    /// [`TimestampError::OutOfRange`] for instants outside the years 0000..=9999.
    pub fn from_datetime(t: OffsetDateTime) -> Result<Self, TimestampError> {
        Self::from_unix(t.unix_timestamp())
    }

    /// From seconds since the Unix epoch.
    ///
    /// # Errors
    ///
    /// [`TimestampError::OutOfRange`] for instants outside the years 0000..=9999.
    pub fn from_unix(seconds: i64) -> Result<Self, TimestampError> {
        let out_of_range = || TimestampError::OutOfRange {
            value: format!("unix time {seconds}"),
        };
        let t = OffsetDateTime::from_unix_timestamp(seconds).map_err(|_| out_of_range())?;
        if !(0..=9999).contains(&t.year()) {
            return Err(out_of_range());
        }
        Ok(Self(t))
    }

    /// Seconds since the Unix epoch.
    pub fn unix(self) -> i64 {
        self.0.unix_timestamp()
    }

    /// The instant as a `time` value (UTC).
    pub fn datetime(self) -> OffsetDateTime {
        self.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = self.0;
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    }
}

impl FromStr for Timestamp {
    type Err = TimestampError;

    /// Accepts any RFC 3339 timestamp (any offset, fractional seconds), as
    /// Go's `time.Parse(time.RFC3339, ...)` does, and normalizes it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = OffsetDateTime::parse(s, &Rfc3339)
            .map_err(|_| TimestampError::NotRfc3339 { value: clip(s) })?;
        Self::from_datetime(t).map_err(|_| TimestampError::OutOfRange { value: clip(s) })
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_form_round_trips() {
        let t: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        assert_eq!(t.to_string(), "2026-01-01T00:00:00Z");
        assert_eq!(t.unix(), 1_767_225_600);
    }

    #[test]
    fn offsets_and_fractions_are_normalized() {
        let t: Timestamp = "2026-01-01T02:00:00.75+02:00".parse().unwrap();
        assert_eq!(t.to_string(), "2026-01-01T00:00:00Z");
    }

    #[test]
    fn garbage_is_refused() {
        let err = "yesterday".parse::<Timestamp>().unwrap_err();
        assert!(err.to_string().contains("\"yesterday\""), "{err}");
        assert!(Timestamp::from_unix(i64::MAX).is_err());
        assert!(Timestamp::now().unix() > 1_700_000_000);
    }
}
