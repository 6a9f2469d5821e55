//! Instants. The domain never reads the clock: callers pass `now` in.

use std::fmt;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// An instant in UTC, at microsecond precision so it round-trips through every backend and
/// through the signed event header without loss.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct Timestamp(i64);

/// Microseconds since 1970-01-01T00:00:00Z outside the range chartlog accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("timestamp {micros} is outside the years 1800 to 9999")]
pub struct TimestampError {
    micros: i64,
}

impl Timestamp {
    /// 1800-01-01T00:00:00Z: older than any living patient's birth.
    pub const MIN_UNIX_MICROS: i64 = -5_364_662_400_000_000;
    /// 9999-12-31T23:59:59.999999Z.
    pub const MAX_UNIX_MICROS: i64 = 253_402_300_799_999_999;

    pub fn from_unix_micros(micros: i64) -> Result<Self, TimestampError> {
        if (Self::MIN_UNIX_MICROS..=Self::MAX_UNIX_MICROS).contains(&micros) {
            Ok(Self(micros))
        } else {
            Err(TimestampError { micros })
        }
    }

    /// Truncates to microseconds.
    pub fn from_datetime(at: OffsetDateTime) -> Result<Self, TimestampError> {
        let micros = at.unix_timestamp_nanos() / 1_000;
        let micros = i64::try_from(micros).map_err(|_| TimestampError { micros: i64::MAX })?;
        Self::from_unix_micros(micros)
    }

    pub const fn unix_micros(self) -> i64 {
        self.0
    }

    pub fn to_datetime(self) -> OffsetDateTime {
        // In range by construction: MIN/MAX are within what `time` represents.
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000)
            .expect("Timestamp invariant: within 1800..=9999")
    }

    pub fn date(self) -> time::Date {
        self.to_datetime().date()
    }
}

impl TryFrom<i64> for Timestamp {
    type Error = TimestampError;
    fn try_from(micros: i64) -> Result<Self, Self::Error> {
        Self::from_unix_micros(micros)
    }
}

impl From<Timestamp> for i64 {
    fn from(at: Timestamp) -> i64 {
        at.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rfc3339 = self
            .to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|_| fmt::Error)?;
        f.write_str(&rfc3339)
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Timestamp({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_representable() {
        assert_eq!(
            Timestamp::from_unix_micros(Timestamp::MIN_UNIX_MICROS)
                .unwrap()
                .date()
                .year(),
            1800
        );
        assert_eq!(
            Timestamp::from_unix_micros(Timestamp::MAX_UNIX_MICROS)
                .unwrap()
                .date()
                .year(),
            9999
        );
        assert!(Timestamp::from_unix_micros(Timestamp::MAX_UNIX_MICROS + 1).is_err());
        assert!(Timestamp::from_unix_micros(Timestamp::MIN_UNIX_MICROS - 1).is_err());
    }

    #[test]
    fn displays_rfc3339() {
        let at = Timestamp::from_unix_micros(1_700_000_000_123_456).unwrap();
        assert_eq!(at.to_string(), "2023-11-14T22:13:20.123456Z");
    }
}
