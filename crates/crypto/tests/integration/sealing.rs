//! Sealing binds the payload to every header field; hashing and signing detect any change.

use chartlog_crypto::{
    CryptoError, DataKey, DataKeyId, EventHash, EventHeader, IntegrityError, SEAL_OVERHEAD_BYTES,
    SignatureVerifier, SignerKeyId, event_hash, open, seal, seal_event,
};
use chartlog_domain::{EventId, PurposeOfUse, Role, Timestamp, UserId};
use proptest::prelude::*;
use uuid::Uuid;

use crate::support::{header, patient_stream, signer};

/// The header with each field (each part of the actor separately) changed, named.
fn changed_headers(original: &EventHeader) -> Vec<(&'static str, EventHeader)> {
    let change = |f: fn(&mut EventHeader)| {
        let mut changed = original.clone();
        f(&mut changed);
        assert_ne!(changed, *original);
        changed
    };
    vec![
        ("stream_id", change(|h| h.stream_id = patient_stream(999))),
        ("stream_version", change(|h| h.stream_version += 1)),
        (
            "event_id",
            change(|h| h.event_id = EventId::from_uuid(Uuid::now_v7())),
        ),
        ("event_type", change(|h| h.event_type.push('x'))),
        ("schema_version", change(|h| h.schema_version += 1)),
        (
            "recorded_at",
            change(|h| {
                h.recorded_at =
                    Timestamp::from_unix_micros(h.recorded_at.unix_micros() + 1).unwrap()
            }),
        ),
        (
            "actor.user_id",
            change(|h| h.actor.user_id = UserId::from_uuid(Uuid::from_u128(78))),
        ),
        ("actor.role", change(|h| h.actor.role = Role::Nurse)),
        (
            "actor.purpose_of_use",
            change(|h| h.actor.purpose_of_use = PurposeOfUse::EmergencyTreatment),
        ),
        (
            "actor.break_glass",
            change(|h| h.actor.break_glass = !h.actor.break_glass),
        ),
        ("key_id", change(|h| h.key_id = DataKeyId::generate())),
        (
            "prev_hash",
            change(|h| h.prev_hash = EventHash::from_bytes([1; 32])),
        ),
        (
            "signer_key_id",
            change(|h| h.signer_key_id = SignerKeyId::parse("other-signer").unwrap()),
        ),
    ]
}

#[test]
fn seal_open_round_trip_with_fresh_nonces() {
    let signer = signer("signer-a");
    let key = DataKey::generate();
    let header = header(
        &signer,
        &patient_stream(1),
        1,
        DataKeyId::generate(),
        EventHash::GENESIS,
    );
    let one = seal(&key, &header, b"blood pressure 120/80");
    let two = seal(&key, &header, b"blood pressure 120/80");
    assert_ne!(one, two);
    assert_eq!(open(&key, &header, &one).unwrap(), b"blood pressure 120/80");
    assert_eq!(open(&key, &header, &two).unwrap(), b"blood pressure 120/80");
    assert!(
        !one.windows(5).any(|w| w == b"blood"),
        "the payload is not in the clear"
    );
}

#[test]
fn changing_any_header_field_fails_open_and_verify() {
    let signer = signer("signer-a");
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .unwrap();
    let other = self::signer("other-signer");
    verifier
        .trust(other.key_id().clone(), other.verifying_key_bytes())
        .unwrap();
    let key = DataKey::generate();
    let original = header(
        &signer,
        &patient_stream(1),
        4,
        DataKeyId::generate(),
        EventHash::from_bytes([9; 32]),
    );
    let event = seal_event(&signer, &key, original.clone(), b"allergy: penicillin");
    verifier.verify(&event).unwrap();
    assert_eq!(
        open(&key, &event.header, &event.ciphertext).unwrap(),
        b"allergy: penicillin"
    );

    let changes = changed_headers(&original);
    assert_eq!(changes.len(), 13, "every field, the actor as four parts");
    for (field, changed) in changes {
        assert!(
            matches!(
                open(&key, &changed, &event.ciphertext),
                Err(CryptoError::Unopenable { .. })
            ),
            "{field}: opens under a changed header"
        );
        let mut tampered = event.clone();
        tampered.header = changed;
        assert!(
            matches!(
                verify_error(&verifier, &tampered),
                IntegrityError::HashMismatch { .. }
            ),
            "{field}: verifies with a changed header"
        );
    }
}

fn verify_error(
    verifier: &SignatureVerifier,
    event: &chartlog_crypto::SealedEvent,
) -> IntegrityError {
    let single = verifier
        .verify(event)
        .expect_err("a tampered event must not verify");
    let batch = verifier
        .verify_batch(&[event.clone(), event.clone()])
        .expect_err("a tampered event must not batch-verify");
    assert_eq!(single, batch, "batch verification names the same fault");
    single
}

#[test]
fn a_ciphertext_moved_to_another_stream_or_version_does_not_open() {
    let signer = signer("signer-a");
    let key = DataKey::generate();
    let key_id = DataKeyId::generate();
    let event = seal_event(
        &signer,
        &key,
        header(&signer, &patient_stream(1), 1, key_id, EventHash::GENESIS),
        b"diagnosis",
    );
    let other_stream = header(&signer, &patient_stream(2), 1, key_id, EventHash::GENESIS);
    let mut other_version = event.header.clone();
    other_version.stream_version = 2;
    other_version.prev_hash = event.hash;
    for moved in [other_stream, other_version] {
        assert!(open(&key, &moved, &event.ciphertext).is_err());
    }
}

#[test]
fn hash_covers_the_ciphertext_length() {
    let signer = signer("signer-a");
    let header = header(
        &signer,
        &patient_stream(1),
        1,
        DataKeyId::generate(),
        EventHash::GENESIS,
    );
    assert_ne!(event_hash(&header, b""), event_hash(&header, b"\0"));
    assert_eq!(event_hash(&header, b"abc"), event_hash(&header, b"abc"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_payload_round_trips(plaintext in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let signer = signer("signer-a");
        let key = DataKey::generate();
        let header = header(&signer, &patient_stream(1), 1, DataKeyId::generate(), EventHash::GENESIS);
        let sealed = seal(&key, &header, &plaintext);
        prop_assert_eq!(sealed.len(), plaintext.len() + SEAL_OVERHEAD_BYTES);
        prop_assert_eq!(open(&key, &header, &sealed).unwrap(), plaintext);
    }

    #[test]
    fn flipping_any_stored_bit_fails_open_and_verify(
        payload in proptest::collection::vec(any::<u8>(), 0..256),
        index in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let signer = signer("signer-a");
        let mut verifier = SignatureVerifier::new();
        verifier.trust(signer.key_id().clone(), signer.verifying_key_bytes()).unwrap();
        let key = DataKey::generate();
        let header = header(&signer, &patient_stream(1), 1, DataKeyId::generate(), EventHash::GENESIS);
        let event = seal_event(&signer, &key, header, &payload);

        // A byte of the ciphertext.
        let mut tampered = event.clone();
        let at = index.index(tampered.ciphertext.len());
        tampered.ciphertext[at] ^= flip;
        prop_assert!(open(&key, &tampered.header, &tampered.ciphertext).is_err());
        let is_hash_mismatch = matches!(
            verify_error(&verifier, &tampered),
            IntegrityError::HashMismatch { .. }
        );
        prop_assert!(is_hash_mismatch);

        // A byte of the stored hash.
        let mut tampered = event.clone();
        let mut hash = *tampered.hash.as_bytes();
        hash[index.index(32)] ^= flip;
        tampered.hash = EventHash::from_bytes(hash);
        let is_hash_mismatch = matches!(
            verify_error(&verifier, &tampered),
            IntegrityError::HashMismatch { .. }
        );
        prop_assert!(is_hash_mismatch);

        // A byte of the signature.
        let mut tampered = event.clone();
        let mut signature = *tampered.signature.as_bytes();
        signature[index.index(64)] ^= flip;
        tampered.signature = chartlog_crypto::EventSignature::from_bytes(signature);
        let is_bad_signature = matches!(
            verify_error(&verifier, &tampered),
            IntegrityError::BadSignature { .. }
        );
        prop_assert!(is_bad_signature);
    }
}
