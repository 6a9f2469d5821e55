//! Stream ids: `patient-<uuid>` for a patient's record, other prefixes for streams that hold no PHI.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::PatientId;

/// The id of one append-only stream. Never PHI: built from random ids and fixed prefixes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StreamId(String);

impl StreamId {
    pub const LENGTH_MAX: usize = 128;
    const PATIENT_PREFIX: &'static str = "patient-";

    pub fn patient(patient: PatientId) -> Self {
        Self(format!("{}{}", Self::PATIENT_PREFIX, patient))
    }

    /// Lower-case ASCII letters, digits, `-`, `_` and `.`, starting with a letter, at most
    /// [`StreamId::LENGTH_MAX`] bytes.
    pub fn parse(raw: &str) -> Result<Self, StreamIdError> {
        let starts_with_letter = raw.bytes().next().is_some_and(|b| b.is_ascii_lowercase());
        let allowed = raw.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
        if raw.is_empty() || raw.len() > Self::LENGTH_MAX || !starts_with_letter || !allowed {
            return Err(StreamIdError);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The patient whose record this stream is, if it is a patient stream.
    pub fn patient_id(&self) -> Option<PatientId> {
        let raw = self.0.strip_prefix(Self::PATIENT_PREFIX)?;
        Uuid::parse_str(raw).ok().map(PatientId::from_uuid)
    }
}

impl TryFrom<String> for StreamId {
    type Error = StreamIdError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl From<StreamId> for String {
    fn from(stream: StreamId) -> String {
        stream.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StreamId({})", self.0)
    }
}

/// A stream id that breaks the naming rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a valid stream id: lower-case letters, digits, '-', '_' or '.', starting with a letter, at most 128 bytes"
)]
pub struct StreamIdError;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_streams_carry_their_patient() {
        let patient = PatientId::from_uuid(Uuid::from_u128(7));
        let stream = StreamId::patient(patient);
        assert_eq!(stream.patient_id(), Some(patient));
        assert_eq!(StreamId::parse(stream.as_str()), Ok(stream));
        assert_eq!(
            StreamId::parse("security-logins").unwrap().patient_id(),
            None
        );
    }

    #[test]
    fn rejects_malformed_ids() {
        for raw in ["", "Patient-1", "1abc", "a b", "a/b", &"a".repeat(129)] {
            assert!(StreamId::parse(raw).is_err(), "{raw:?}");
        }
    }
}
