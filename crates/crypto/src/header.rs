//! The clear event header and its canonical encoding, and the sealed event as stored.

use chartlog_domain::{Actor, EventId, StreamId, Timestamp};

use crate::ids::{DataKeyId, EventHash, EventSignature, SignerKeyId};

/// Domain-separation tag opening [`EventHeader::canonical_bytes`].
const HEADER_TAG: &[u8] = b"chartlog/event-header/v1";

/// The clear part of a stored event: what routing, ordering, audit and verification need.
/// Never PHI. Every field is covered by the AES-SIV associated data, the hash and the signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHeader {
    /// The stream the event belongs to.
    pub stream_id: StreamId,
    /// 1-based, gapless within the stream.
    pub stream_version: u64,
    /// The event's identity and idempotency key (UUID v7).
    pub event_id: EventId,
    /// The event's type name, for upcasting and routing.
    pub event_type: String,
    /// The payload's schema version.
    pub schema_version: u32,
    /// When chartlog recorded the event.
    pub recorded_at: Timestamp,
    /// Who caused the event, in which role and why.
    pub actor: Actor,
    /// The data key the payload is sealed under.
    pub key_id: DataKeyId,
    /// The hash of the previous event of the stream, [`EventHash::GENESIS`] for version 1.
    pub prev_hash: EventHash,
    /// The key that signed the event.
    pub signer_key_id: SignerKeyId,
}

impl EventHeader {
    /// The injective binary encoding of every field, opened by a domain-separation tag.
    /// Fixed-size fields are written as-is (integers big-endian), variable-size fields with a
    /// u64 big-endian length prefix; the actor is written as its four parts.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.canonical_len());
        self.encode(&mut |part| bytes.extend_from_slice(part));
        debug_assert_eq!(bytes.len(), self.canonical_len());
        bytes
    }

    /// Feeds the canonical encoding to `sink`, part by part (so hashing needs no allocation).
    pub(crate) fn encode(&self, sink: &mut impl FnMut(&[u8])) {
        fn variable(sink: &mut impl FnMut(&[u8]), part: &[u8]) {
            sink(&(part.len() as u64).to_be_bytes());
            sink(part);
        }
        sink(HEADER_TAG);
        variable(sink, self.stream_id.as_str().as_bytes());
        sink(&self.stream_version.to_be_bytes());
        sink(self.event_id.as_uuid().as_bytes());
        variable(sink, self.event_type.as_bytes());
        sink(&self.schema_version.to_be_bytes());
        sink(&self.recorded_at.unix_micros().to_be_bytes());
        sink(self.actor.user_id.as_uuid().as_bytes());
        variable(sink, self.actor.role.as_str().as_bytes());
        variable(sink, self.actor.purpose_of_use.as_str().as_bytes());
        sink(&[u8::from(self.actor.break_glass)]);
        sink(self.key_id.as_uuid().as_bytes());
        sink(self.prev_hash.as_bytes());
        variable(sink, self.signer_key_id.as_str().as_bytes());
    }

    fn canonical_len(&self) -> usize {
        const FIXED: usize = 8 + 16 + 4 + 8 + 16 + 1 + 16 + 32;
        const PREFIXES: usize = 5 * 8;
        HEADER_TAG.len()
            + FIXED
            + PREFIXES
            + self.stream_id.as_str().len()
            + self.event_type.len()
            + self.actor.role.as_str().len()
            + self.actor.purpose_of_use.as_str().len()
            + self.signer_key_id.as_str().len()
    }
}

/// An event as stored: the clear header, the sealed payload, the chained hash over both, and
/// the signature over the hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedEvent {
    /// The clear header.
    pub header: EventHeader,
    /// Nonce, SIV tag and encrypted payload (see [`crate::seal`]).
    pub ciphertext: Vec<u8>,
    /// [`crate::event_hash`] of header and ciphertext.
    pub hash: EventHash,
    /// Ed25519 signature of `hash` by `header.signer_key_id`.
    pub signature: EventSignature,
}

#[cfg(test)]
pub(crate) mod tests {
    use chartlog_domain::{PurposeOfUse, Role, UserId};
    use uuid::Uuid;

    use super::*;

    pub(crate) fn header() -> EventHeader {
        EventHeader {
            stream_id: StreamId::patient(chartlog_domain::PatientId::from_uuid(Uuid::from_u128(1))),
            stream_version: 3,
            event_id: EventId::from_uuid(Uuid::from_u128(2)),
            event_type: "allergy_recorded".to_owned(),
            schema_version: 1,
            recorded_at: Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap(),
            actor: Actor {
                user_id: UserId::from_uuid(Uuid::from_u128(3)),
                role: Role::Nurse,
                purpose_of_use: PurposeOfUse::Treatment,
                break_glass: false,
            },
            key_id: DataKeyId::from_uuid(Uuid::from_u128(4)),
            prev_hash: EventHash::from_bytes([5; 32]),
            signer_key_id: SignerKeyId::parse("signer-1").unwrap(),
        }
    }

    #[test]
    fn encoding_opens_with_the_tag_and_has_the_computed_length() {
        let bytes = header().canonical_bytes();
        assert!(bytes.starts_with(HEADER_TAG));
        assert_eq!(bytes.len(), header().canonical_len());
    }

    #[test]
    fn moving_bytes_between_variable_fields_changes_the_encoding() {
        // "ab" + "c" and "a" + "bc" must not collide.
        let mut one = header();
        one.event_type = "ab".to_owned();
        one.signer_key_id = SignerKeyId::parse("c").unwrap();
        let mut two = header();
        two.event_type = "a".to_owned();
        two.signer_key_id = SignerKeyId::parse("bc").unwrap();
        assert_ne!(one.canonical_bytes(), two.canonical_bytes());
    }
}
