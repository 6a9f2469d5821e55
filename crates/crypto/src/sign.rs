//! Event hashes, Ed25519 signatures over them, and hash-chain checks.

use std::collections::HashMap;
use std::fmt;

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use crate::error::{CryptoError, IntegrityError, ManifestSignatureError};
use crate::header::{EventHeader, SealedEvent};
use crate::ids::{EventHash, EventSignature, SignerKeyId};
use crate::seal::{DataKey, seal};

/// Domain-separation tag of [`event_hash`].
const HASH_TAG: &[u8] = b"chartlog/event-hash/v1";
/// Domain-separation tag prefixed to the hash before signing.
const SIGNATURE_TAG: &[u8] = b"chartlog/event-signature/v1";
const SIGNED_MESSAGE_BYTES: usize = SIGNATURE_TAG.len() + 32;

/// Domain-separation tag prefixed to a backup manifest before signing. Neither this tag nor
/// [`SIGNATURE_TAG`] is a prefix of the other, so no manifest signature is an event signature.
const MANIFEST_SIGNATURE_TAG: &[u8] = b"chartlog/backup-manifest-signature/v1";

/// Most events checked by one Ed25519 batch verification; longer slices are checked in chunks,
/// which bounds the scratch memory of one call.
pub const VERIFY_BATCH_EVENTS_MAX: usize = 256;
const _: () = assert!(VERIFY_BATCH_EVENTS_MAX >= 2);

/// SHA-256 over a domain tag, the header's canonical bytes and the length-prefixed ciphertext.
/// The header holds `prev_hash`, so hashes chain through a stream.
pub fn event_hash(header: &EventHeader, ciphertext: &[u8]) -> EventHash {
    let mut hasher = Sha256::new();
    hasher.update(HASH_TAG);
    header.encode(&mut |part| hasher.update(part));
    hasher.update((ciphertext.len() as u64).to_be_bytes());
    hasher.update(ciphertext);
    EventHash::from_bytes(hasher.finalize().into())
}

fn signed_message(hash: &EventHash) -> [u8; SIGNED_MESSAGE_BYTES] {
    let mut message = [0; SIGNED_MESSAGE_BYTES];
    message[..SIGNATURE_TAG.len()].copy_from_slice(SIGNATURE_TAG);
    message[SIGNATURE_TAG.len()..].copy_from_slice(hash.as_bytes());
    message
}

/// An Ed25519 event-signing key with its id. The secret is zeroized on drop and never
/// printed; share the signer as `Arc<EventSigner>`.
pub struct EventSigner {
    key_id: SignerKeyId,
    key: SigningKey,
}

impl EventSigner {
    /// A fresh random signing key.
    pub fn generate(key_id: SignerKeyId) -> Self {
        let mut secret = zeroize::Zeroizing::new([0; 32]);
        crate::rng::fill(secret.as_mut());
        Self::from_secret_bytes(key_id, *secret)
    }

    /// The signer with this 32-byte Ed25519 secret key (the caller zeroizes its copy).
    pub fn from_secret_bytes(key_id: SignerKeyId, secret: [u8; 32]) -> Self {
        let secret = zeroize::Zeroizing::new(secret);
        Self {
            key_id,
            key: SigningKey::from_bytes(&secret),
        }
    }

    /// The id stored in the headers this signer signs.
    pub fn key_id(&self) -> &SignerKeyId {
        &self.key_id
    }

    /// The public key, for [`SignatureVerifier::trust`].
    pub fn verifying_key_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    pub(crate) fn secret_bytes(&self) -> zeroize::Zeroizing<[u8; 32]> {
        zeroize::Zeroizing::new(self.key.to_bytes())
    }

    /// Hashes header and ciphertext and signs the hash.
    ///
    /// # Panics
    /// If `header.signer_key_id` is not this signer's id (a bug of the caller).
    pub fn sign_event(&self, header: EventHeader, ciphertext: Vec<u8>) -> SealedEvent {
        assert_eq!(
            header.signer_key_id, self.key_id,
            "an event must name the signer that signs it"
        );
        let hash = event_hash(&header, &ciphertext);
        let signature = self.key.sign(&signed_message(&hash));
        SealedEvent {
            header,
            ciphertext,
            hash,
            signature: EventSignature::from_bytes(signature.to_bytes()),
        }
    }
}

impl EventSigner {
    /// Signs the exact bytes of a backup manifest, under a domain tag of its own.
    pub fn sign_manifest(&self, manifest: &[u8]) -> EventSignature {
        let signature = self.key.sign(&manifest_message(manifest));
        EventSignature::from_bytes(signature.to_bytes())
    }
}

fn manifest_message(manifest: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(MANIFEST_SIGNATURE_TAG.len() + manifest.len());
    message.extend_from_slice(MANIFEST_SIGNATURE_TAG);
    message.extend_from_slice(manifest);
    message
}

impl fmt::Debug for EventSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSigner")
            .field("key_id", &self.key_id)
            .field("verifying_key", &hex::encode(self.verifying_key_bytes()))
            .finish_non_exhaustive()
    }
}

/// Seals `plaintext` under `key` for `header`, then hashes and signs: the whole write path of
/// one event.
pub fn seal_event(
    signer: &EventSigner,
    key: &DataKey,
    header: EventHeader,
    plaintext: &[u8],
) -> SealedEvent {
    let ciphertext = seal(key, &header, plaintext);
    signer.sign_event(header, ciphertext)
}

/// The public keys trusted to have signed events, by signer id. Keeps retired keys, so events
/// signed before a rotation still verify. Needs no data key.
#[derive(Clone, Default)]
pub struct SignatureVerifier {
    trusted: HashMap<SignerKeyId, VerifyingKey>,
}

impl SignatureVerifier {
    /// A verifier that trusts nobody yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts `public_key` for events naming `key_id`. Idempotent for the same key; refuses a
    /// second, different key under one id, and invalid or small-order (weak) keys.
    pub fn trust(&mut self, key_id: SignerKeyId, public_key: [u8; 32]) -> Result<(), CryptoError> {
        let key = VerifyingKey::from_bytes(&public_key)
            .ok()
            .filter(|key| !key.is_weak())
            .ok_or_else(|| CryptoError::InvalidPublicKey {
                signer_key_id: key_id.clone(),
            })?;
        match self.trusted.get(&key_id) {
            Some(existing) if *existing == key => Ok(()),
            Some(_) => Err(CryptoError::ConflictingSigner {
                signer_key_id: key_id,
            }),
            None => {
                self.trusted.insert(key_id, key);
                Ok(())
            }
        }
    }

    /// Whether `key_id` is trusted.
    pub fn trusts(&self, key_id: &SignerKeyId) -> bool {
        self.trusted.contains_key(key_id)
    }

    /// The trusted signer ids, sorted.
    pub fn signer_key_ids(&self) -> Vec<SignerKeyId> {
        let mut ids: Vec<_> = self.trusted.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Recomputes the event's hash, compares it with the stored one, and checks the signature
    /// (strict Ed25519: no small-order or non-canonical components).
    pub fn verify(&self, event: &SealedEvent) -> Result<(), IntegrityError> {
        let key = self.checked_key(event)?;
        let signature = Signature::from_bytes(event.signature.as_bytes());
        key.verify_strict(&signed_message(&event.hash), &signature)
            .map_err(|_| IntegrityError::BadSignature {
                stream_id: event.header.stream_id.clone(),
                stream_version: event.header.stream_version,
                signer_key_id: event.header.signer_key_id.clone(),
            })
    }

    /// [`SignatureVerifier::verify`] for many events, with Ed25519 batch verification (about
    /// twice as fast per event). On a failure, checks each event alone to name the culprit.
    pub fn verify_batch(&self, events: &[SealedEvent]) -> Result<(), IntegrityError> {
        for chunk in events.chunks(VERIFY_BATCH_EVENTS_MAX) {
            self.verify_chunk(chunk)?;
        }
        Ok(())
    }

    fn verify_chunk(&self, events: &[SealedEvent]) -> Result<(), IntegrityError> {
        assert!(events.len() <= VERIFY_BATCH_EVENTS_MAX);
        match events {
            [] => return Ok(()),
            [event] => return self.verify(event),
            _ => {}
        }
        let mut keys = Vec::with_capacity(events.len());
        let mut messages = Vec::with_capacity(events.len());
        let mut signatures = Vec::with_capacity(events.len());
        for event in events {
            keys.push(*self.checked_key(event)?);
            messages.push(signed_message(&event.hash));
            signatures.push(Signature::from_bytes(event.signature.as_bytes()));
        }
        let messages: Vec<&[u8]> = messages.iter().map(|m| m.as_slice()).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
            return Ok(());
        }
        for event in events {
            self.verify(event)?;
        }
        let first = &events[0].header;
        Err(IntegrityError::BatchRejected {
            stream_id: first.stream_id.clone(),
            stream_version: first.stream_version,
            events: events.len(),
        })
    }

    /// The signer's key, after checking that the signer is trusted and the stored hash is the
    /// hash of header and ciphertext.
    fn checked_key(&self, event: &SealedEvent) -> Result<&VerifyingKey, IntegrityError> {
        let header = &event.header;
        let key = self.trusted.get(&header.signer_key_id).ok_or_else(|| {
            IntegrityError::UnknownSigner {
                stream_id: header.stream_id.clone(),
                stream_version: header.stream_version,
                signer_key_id: header.signer_key_id.clone(),
            }
        })?;
        if event_hash(header, &event.ciphertext) != event.hash {
            return Err(IntegrityError::HashMismatch {
                stream_id: header.stream_id.clone(),
                stream_version: header.stream_version,
            });
        }
        Ok(key)
    }
}

impl SignatureVerifier {
    /// Checks a signature made by [`EventSigner::sign_manifest`] over `manifest` by the trusted
    /// signer `signer_key_id` (strict Ed25519).
    pub fn verify_manifest(
        &self,
        signer_key_id: &SignerKeyId,
        manifest: &[u8],
        signature: &EventSignature,
    ) -> Result<(), ManifestSignatureError> {
        let key = self.trusted.get(signer_key_id).ok_or_else(|| {
            ManifestSignatureError::UnknownSigner {
                signer_key_id: signer_key_id.clone(),
            }
        })?;
        key.verify_strict(
            &manifest_message(manifest),
            &Signature::from_bytes(signature.as_bytes()),
        )
        .map_err(|_| ManifestSignatureError::BadSignature {
            signer_key_id: signer_key_id.clone(),
        })
    }
}

impl fmt::Debug for SignatureVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignatureVerifier")
            .field("signer_key_ids", &self.signer_key_ids())
            .finish()
    }
}

/// Checks that `events` continue one stream from a head: consecutive versions starting at
/// `expected_first_version`, each `prev_hash` equal to the hash before it (`prev` for the
/// first), each stored hash equal to the recomputed one. Returns the hash of the last event
/// (`prev` if `events` is empty). Checks no signature: pair it with
/// [`SignatureVerifier::verify_batch`]. Needs no data key.
///
/// # Panics
/// If `expected_first_version` is 0 (versions are 1-based).
pub fn verify_chain(
    prev: EventHash,
    expected_first_version: u64,
    events: &[SealedEvent],
) -> Result<EventHash, IntegrityError> {
    assert!(expected_first_version >= 1, "stream versions are 1-based");
    let Some(first) = events.first() else {
        return Ok(prev);
    };
    let stream_id = &first.header.stream_id;
    let mut prev = prev;
    let mut expected_version = Some(expected_first_version);
    for event in events {
        let header = &event.header;
        if header.stream_id != *stream_id {
            return Err(IntegrityError::StreamMismatch {
                expected_stream_id: stream_id.clone(),
                found_stream_id: header.stream_id.clone(),
                found_version: header.stream_version,
            });
        }
        if expected_version != Some(header.stream_version) {
            return Err(IntegrityError::VersionGap {
                stream_id: stream_id.clone(),
                expected_version: expected_version.unwrap_or(u64::MAX),
                found_version: header.stream_version,
            });
        }
        if header.prev_hash != prev {
            return Err(IntegrityError::ChainBroken {
                stream_id: stream_id.clone(),
                stream_version: header.stream_version,
            });
        }
        if event_hash(header, &event.ciphertext) != event.hash {
            return Err(IntegrityError::HashMismatch {
                stream_id: stream_id.clone(),
                stream_version: header.stream_version,
            });
        }
        prev = event.hash;
        expected_version = header.stream_version.checked_add(1);
    }
    Ok(prev)
}
