//! Signed backup manifests and the content digest.

use chartlog_crypto::{
    ContentDigest, DataKey, DataKeyId, EventHash, ManifestSignatureError, SignatureVerifier,
    seal_event,
};

use crate::support::{header, patient_stream, signer};

#[test]
fn a_manifest_signature_verifies_only_for_its_bytes_and_its_signer() {
    let signer_a = signer("signer-a");
    let signer_b = signer("signer-b");
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer_a.key_id().clone(), signer_a.verifying_key_bytes())
        .unwrap();
    let manifest = br#"{"events":3,"root_hash":"00"}"#;
    let signature = signer_a.sign_manifest(manifest);
    verifier
        .verify_manifest(signer_a.key_id(), manifest, &signature)
        .unwrap();

    let changed = br#"{"events":4,"root_hash":"00"}"#;
    assert_eq!(
        verifier.verify_manifest(signer_a.key_id(), changed, &signature),
        Err(ManifestSignatureError::BadSignature {
            signer_key_id: signer_a.key_id().clone()
        })
    );
    assert_eq!(
        verifier.verify_manifest(
            signer_b.key_id(),
            manifest,
            &signer_b.sign_manifest(manifest)
        ),
        Err(ManifestSignatureError::UnknownSigner {
            signer_key_id: signer_b.key_id().clone()
        })
    );
}

#[test]
fn an_event_signature_is_never_a_manifest_signature() {
    let signer = signer("signer-a");
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .unwrap();
    let header = header(
        &signer,
        &patient_stream(1),
        1,
        DataKeyId::generate(),
        EventHash::GENESIS,
    );
    let event = seal_event(&signer, &DataKey::generate(), header, b"payload");
    // The event's signature is over its tagged hash; as a manifest it must not verify.
    assert!(
        verifier
            .verify_manifest(signer.key_id(), event.hash.as_bytes(), &event.signature)
            .is_err()
    );
}

#[test]
fn the_content_digest_is_sha256_of_the_concatenation() {
    let mut parts = ContentDigest::new();
    parts.update(b"ab");
    parts.update(b"c");
    let mut whole = ContentDigest::new();
    whole.update(b"abc");
    let digest = parts.finish();
    assert_eq!(digest, whole.finish());
    // The FIPS 180-2 test vector for "abc".
    assert_eq!(
        digest[..4],
        [0xba, 0x78, 0x16, 0xbf],
        "SHA-256(\"abc\") starts ba7816bf"
    );
}
