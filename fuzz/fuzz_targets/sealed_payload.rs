//! Sealed bytes and signatures from storage or a backup, under the fixed test keys.
//!
//! The input is tried as: a sealed event payload of the fixed header (opens only if it is one
//! the fixed key sealed); a sealed read-model record; an event whose ciphertext it is, with a
//! hash and signature taken from its first bytes; a backup manifest signature (the first 64
//! bytes) over the rest; and an Ed25519 public key to trust. Every refusal must be an error.
#![no_main]

use chartlog_crypto::{
    EventHash, EventSignature, SEAL_OVERHEAD_BYTES, SealedEvent, SignatureVerifier, SignerKeyId,
    event_hash, open, open_record, seal, verify_chain,
};
use chartlog_fuzz::{data_key, header, signer, verifier};
use libfuzzer_sys::fuzz_target;

/// What the seeds' records are sealed for.
const RECORD_ASSOCIATED_DATA: [&[u8]; 2] = [b"fuzz-owner", b"condition"];

fuzz_target!(|data: &[u8]| {
    let key = data_key();
    let event_header = header(1, "note_written", 1, EventHash::GENESIS);

    if let Ok(plaintext) = open(key, &event_header, data) {
        assert_eq!(plaintext.len() + SEAL_OVERHEAD_BYTES, data.len());
    }
    let _ = open_record(key, &RECORD_ASSOCIATED_DATA, data);
    // Sealing is total, and what it seals opens to itself (under a fresh nonce each time).
    let sealed = seal(key, &event_header, data);
    assert_eq!(open(key, &event_header, &sealed).as_deref(), Ok(data));

    // An event carrying the input as ciphertext, with a stored hash and signature that are
    // the input's first bytes when it has enough of them.
    let hash = data
        .get(..32)
        .and_then(|bytes| EventHash::from_slice(bytes).ok())
        .unwrap_or_else(|| event_hash(&event_header, data));
    let signature = data
        .get(32..96)
        .and_then(|bytes| EventSignature::from_slice(bytes).ok())
        .unwrap_or_else(|| EventSignature::from_bytes([0; 64]));
    let event = SealedEvent {
        header: event_header,
        ciphertext: data.to_vec(),
        hash,
        signature,
    };
    let _ = verifier().verify(&event);
    let _ = verifier().verify_batch(&[event.clone(), event.clone()]);
    let _ = verify_chain(EventHash::GENESIS, 1, std::slice::from_ref(&event));
    // The correctly signed event verifies: the checks above refuse for the input's sake only.
    let signed = signer().sign_event(event.header.clone(), event.ciphertext.clone());
    assert!(verifier().verify(&signed).is_ok());

    if let Some((signature, manifest)) = data.split_first_chunk::<64>() {
        let signature = EventSignature::from_bytes(*signature);
        let _ = verifier().verify_manifest(signer().key_id(), manifest, &signature);
    }
    if let Some(public_key) = data.first_chunk::<32>() {
        let mut fresh = SignatureVerifier::new();
        if let Ok(id) = SignerKeyId::parse("fuzz-other") {
            let _ = fresh.trust(id, *public_key);
        }
    }
});
