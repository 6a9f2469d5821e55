//! Hash chains and signatures across a stream: deletions, insertions, reorderings, gaps,
//! signer rotation.

use chartlog_crypto::{
    DataKey, DataKeyId, EventHash, IntegrityError, SealedEvent, SignatureVerifier, SignerKeyId,
    SigningKeys, seal_event, verify_chain,
};

use crate::support::{header, patient_stream, signer, stream_events};

fn verifier_for(signers: &[&chartlog_crypto::EventSigner]) -> SignatureVerifier {
    let mut verifier = SignatureVerifier::new();
    for signer in signers {
        verifier
            .trust(signer.key_id().clone(), signer.verifying_key_bytes())
            .unwrap();
    }
    verifier
}

#[test]
fn an_intact_stream_verifies_in_one_call_or_in_pages() {
    let signer = signer("signer-a");
    let events = stream_events(
        &signer,
        &DataKey::generate(),
        DataKeyId::generate(),
        &patient_stream(1),
        10,
    );
    let verifier = verifier_for(&[&signer]);
    let head = verify_chain(EventHash::GENESIS, 1, &events).unwrap();
    assert_eq!(head, events[9].hash);
    verifier.verify_batch(&events).unwrap();
    for event in &events {
        verifier.verify(event).unwrap();
    }
    let middle = verify_chain(EventHash::GENESIS, 1, &events[..4]).unwrap();
    assert_eq!(verify_chain(middle, 5, &events[4..]).unwrap(), head);
    assert_eq!(verify_chain(head, 11, &[]).unwrap(), head);
}

#[test]
fn deleted_inserted_reordered_and_gapped_events_are_detected() {
    let signer = signer("signer-a");
    let key = DataKey::generate();
    let key_id = DataKeyId::generate();
    let stream = patient_stream(1);
    let events = stream_events(&signer, &key, key_id, &stream, 6);

    let mut deleted = events.clone();
    deleted.remove(2);
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 1, &deleted),
        Err(IntegrityError::VersionGap {
            expected_version: 3,
            found_version: 4,
            ..
        })
    ));

    let mut reordered = events.clone();
    reordered.swap(2, 3);
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 1, &reordered),
        Err(IntegrityError::VersionGap {
            expected_version: 3,
            found_version: 4,
            ..
        })
    ));

    // A forged event that renumbers the tail and re-signs it still breaks the chain.
    let mut inserted = events[..3].to_vec();
    let forged = header(&signer, &stream, 4, key_id, EventHash::from_bytes([4; 32]));
    inserted.push(seal_event(&signer, &key, forged, b"forged"));
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 1, &inserted),
        Err(IntegrityError::ChainBroken {
            stream_version: 4,
            ..
        })
    ));

    // An inserted copy of an earlier event.
    let mut duplicated = events.clone();
    duplicated.insert(3, events[1].clone());
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 1, &duplicated),
        Err(IntegrityError::VersionGap {
            expected_version: 4,
            found_version: 2,
            ..
        })
    ));

    // A truncated head: the first page must continue from the expected version.
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 1, &events[1..]),
        Err(IntegrityError::VersionGap {
            expected_version: 1,
            found_version: 2,
            ..
        })
    ));
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 2, &events[1..]),
        Err(IntegrityError::ChainBroken {
            stream_version: 2,
            ..
        })
    ));

    // A stored hash rewritten to match a tampered successor link.
    let mut rehashed = events.clone();
    rehashed[2].hash = EventHash::from_bytes([7; 32]);
    rehashed[3].header.prev_hash = rehashed[2].hash;
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 1, &rehashed),
        Err(IntegrityError::HashMismatch {
            stream_version: 3,
            ..
        })
    ));

    // Another stream's event in the middle.
    let other = stream_events(&signer, &key, key_id, &patient_stream(2), 6);
    let mut mixed = events.clone();
    mixed[4] = other[4].clone();
    assert!(matches!(
        verify_chain(EventHash::GENESIS, 1, &mixed),
        Err(IntegrityError::StreamMismatch {
            found_version: 5,
            ..
        })
    ));
}

#[test]
fn batch_verification_names_the_culprit() {
    let signer = signer("signer-a");
    let mut events = stream_events(
        &signer,
        &DataKey::generate(),
        DataKeyId::generate(),
        &patient_stream(1),
        20,
    );
    let verifier = verifier_for(&[&signer]);
    let mut signature = *events[13].signature.as_bytes();
    signature[40] ^= 1;
    events[13].signature = chartlog_crypto::EventSignature::from_bytes(signature);
    assert!(matches!(
        verifier.verify_batch(&events),
        Err(IntegrityError::BadSignature {
            stream_version: 14,
            ..
        })
    ));
    // Signatures are not covered by the chain: verify_chain alone passes, by design.
    verify_chain(EventHash::GENESIS, 1, &events).unwrap();
}

fn with_bad_signature(events: &[SealedEvent], version: u64) -> Vec<SealedEvent> {
    let mut events = events.to_vec();
    let event = &mut events[usize::try_from(version - 1).unwrap()];
    assert_eq!(event.header.stream_version, version);
    let mut signature = *event.signature.as_bytes();
    signature[40] ^= 1;
    event.signature = chartlog_crypto::EventSignature::from_bytes(signature);
    events
}

fn with_bad_hash(events: &[SealedEvent], version: u64) -> Vec<SealedEvent> {
    let mut events = events.to_vec();
    let event = &mut events[usize::try_from(version - 1).unwrap()];
    assert_eq!(event.header.stream_version, version);
    let mut hash = *event.hash.as_bytes();
    hash[7] ^= 1;
    event.hash = EventHash::from_bytes(hash);
    events
}

/// A tampered event past the first chunk is found and named: every chunk is checked, not
/// only the first, and a one-event tail is checked like any other.
fn assert_tampering_found(verifier: &SignatureVerifier, events: &[SealedEvent], version: u64) {
    let stream = events[0].header.stream_id.clone();
    let result = verifier.verify_batch(&with_bad_signature(events, version));
    assert!(
        matches!(
            &result,
            Err(IntegrityError::BadSignature { stream_id, stream_version, .. })
                if *stream_id == stream && *stream_version == version
        ),
        "bad signature at version {version} of {}: {result:?}",
        events.len()
    );
    let result = verifier.verify_batch(&with_bad_hash(events, version));
    assert!(
        matches!(
            &result,
            Err(IntegrityError::HashMismatch { stream_id, stream_version })
                if *stream_id == stream && *stream_version == version
        ),
        "bad hash at version {version} of {}: {result:?}",
        events.len()
    );
}

#[test]
fn large_batches_verify_in_chunks() {
    let signer = signer("signer-a");
    let verifier = verifier_for(&[&signer]);
    let chunk = chartlog_crypto::VERIFY_BATCH_EVENTS_MAX as u64;
    let events = stream_events(
        &signer,
        &DataKey::generate(),
        DataKeyId::generate(),
        &patient_stream(1),
        chunk + 3,
    );
    verifier.verify_batch(&events).unwrap();
    // Versions 257..=259 form the second chunk, of three events.
    assert_tampering_found(&verifier, &events, chunk + 2);
    assert_tampering_found(&verifier, &events, chunk + 3);

    // A tail of one event (version 257) is verified alone, and still verified.
    let events = &events[..usize::try_from(chunk + 1).unwrap()];
    verifier.verify_batch(events).unwrap();
    assert_tampering_found(&verifier, events, chunk + 1);
}

#[test]
fn retired_signers_still_verify_and_unknown_signers_fail() {
    let mut keys = SigningKeys::generate(SignerKeyId::parse("signer-2024").unwrap());
    let key = DataKey::generate();
    let key_id = DataKeyId::generate();
    let stream = patient_stream(1);
    let before = stream_events(keys.active(), &key, key_id, &stream, 3);

    keys.rotate(SignerKeyId::parse("signer-2025").unwrap())
        .unwrap();
    assert!(
        keys.rotate(SignerKeyId::parse("signer-2024").unwrap())
            .is_err(),
        "ids are never reused"
    );
    let next = header(keys.active(), &stream, 4, key_id, before[2].hash);
    let after = seal_event(keys.active(), &key, next, b"after rotation");
    let mut all = before.clone();
    all.push(after);

    let verifier = keys.verifier();
    verify_chain(EventHash::GENESIS, 1, &all).unwrap();
    verifier.verify_batch(&all).unwrap();
    for event in &all {
        verifier.verify(event).unwrap();
    }

    let stranger = signer("stranger");
    let foreign = stream_events(&stranger, &key, key_id, &stream, 2);
    for result in [
        verifier.verify(&foreign[0]),
        verifier.verify_batch(&foreign),
    ] {
        assert!(matches!(
            result,
            Err(IntegrityError::UnknownSigner {
                stream_version: 1,
                ..
            })
        ));
    }
    // A stranger's signature under a trusted id fails too.
    let mut impostor = header(&stranger, &stream, 1, key_id, EventHash::GENESIS);
    impostor.signer_key_id = SignerKeyId::parse("signer-2025").unwrap();
    let mut event = seal_event(
        &stranger,
        &key,
        header(&stranger, &stream, 1, key_id, EventHash::GENESIS),
        b"x",
    );
    event.header = impostor;
    event.hash = chartlog_crypto::event_hash(&event.header, &event.ciphertext);
    assert!(matches!(
        verifier.verify(&event),
        Err(IntegrityError::BadSignature { .. })
    ));
}

#[test]
fn verifiers_refuse_conflicting_and_invalid_keys() {
    let one = signer("signer-a");
    let two = signer("signer-b");
    let mut verifier = verifier_for(&[&one]);
    verifier
        .trust(one.key_id().clone(), one.verifying_key_bytes())
        .unwrap();
    assert!(
        verifier
            .trust(one.key_id().clone(), two.verifying_key_bytes())
            .is_err()
    );
    // The identity point is a small-order (weak) key.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert!(
        verifier
            .trust(SignerKeyId::parse("weak").unwrap(), identity)
            .is_err()
    );
}
