//! Data keys and payload sealing: AES-256-SIV with a random nonce and the header as
//! associated data.

use std::fmt;

use aes_siv::aead::{AeadInOut, KeyInit};
use aes_siv::{Aes256SivAead, Key, Nonce, Tag};
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};

use crate::error::CryptoError;
use crate::header::EventHeader;

/// Bytes of a data key: AES-256-SIV takes two 256-bit keys (S2V/CMAC and CTR).
pub const DATA_KEY_BYTES: usize = 64;
const NONCE_BYTES: usize = 16;
const TAG_BYTES: usize = 16;
/// Bytes [`seal`] adds to a payload: the random nonce and the SIV tag.
pub const SEAL_OVERHEAD_BYTES: usize = NONCE_BYTES + TAG_BYTES;

/// One owner's (patient's) AES-256-SIV key. Zeroized on drop; never cloned, serialized or
/// printed. Share it as `Arc<DataKey>`.
pub struct DataKey(SecretBox<[u8; DATA_KEY_BYTES]>);

impl DataKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        let mut secret = SecretBox::new(Box::new([0; DATA_KEY_BYTES]));
        crate::rng::fill(secret.expose_secret_mut());
        Self(secret)
    }

    /// Copies `bytes` into a new key (the caller zeroizes its copy).
    pub(crate) fn from_bytes(bytes: &[u8; DATA_KEY_BYTES]) -> Self {
        let mut secret = SecretBox::new(Box::new([0; DATA_KEY_BYTES]));
        secret.expose_secret_mut().copy_from_slice(bytes);
        Self(secret)
    }

    pub(crate) fn expose_secret(&self) -> &[u8; DATA_KEY_BYTES] {
        self.0.expose_secret()
    }

    fn cipher(&self) -> Aes256SivAead {
        // aes-siv 0.8 copies the key into the cipher value and does not zeroize that copy;
        // it lives only for one call.
        Aes256SivAead::new(&Key::<Aes256SivAead>::from(*self.expose_secret()))
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<secret>)")
    }
}

/// Seals `plaintext` for the event described by `header`: AES-256-SIV under `key`, with
/// `header.canonical_bytes()` as associated data and a fresh random 16-byte nonce, so equal
/// payloads give different ciphertexts. Layout: nonce (16) || SIV tag (16) || encrypted payload.
pub fn seal(key: &DataKey, header: &EventHeader, plaintext: &[u8]) -> Vec<u8> {
    seal_with(key, &header.canonical_bytes(), plaintext)
}

/// Opens what [`seal`] produced under the same key and an identical header. Fails on a wrong
/// key, any changed byte, or a header that differs in any field.
pub fn open(key: &DataKey, header: &EventHeader, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
    open_with(key, &header.canonical_bytes(), sealed).ok_or_else(|| CryptoError::Unopenable {
        stream_id: header.stream_id.clone(),
        stream_version: header.stream_version,
    })
}

/// The one AES-SIV sealing both events and read-model records use: a fresh nonce, then the
/// tag, then the encrypted bytes.
fn seal_with(key: &DataKey, associated_data: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce = Nonce::from(crate::rng::array::<NONCE_BYTES>());
    let mut sealed = Vec::with_capacity(SEAL_OVERHEAD_BYTES + plaintext.len());
    sealed.extend_from_slice(&nonce);
    sealed.extend_from_slice(&[0; TAG_BYTES]);
    sealed.extend_from_slice(plaintext);
    let tag = key
        .cipher()
        .encrypt_inout_detached(
            &nonce,
            associated_data,
            (&mut sealed[SEAL_OVERHEAD_BYTES..]).into(),
        )
        .expect("AES-SIV encryption fails only with more than 126 associated data items");
    sealed[NONCE_BYTES..SEAL_OVERHEAD_BYTES].copy_from_slice(&tag);
    sealed
}

/// Opens what [`seal_with`] produced; `None` for a wrong key, associated data or any changed
/// byte (the callers name what failed to open).
fn open_with(key: &DataKey, associated_data: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < SEAL_OVERHEAD_BYTES {
        return None;
    }
    let (nonce, rest) = sealed.split_at(NONCE_BYTES);
    let (tag, encrypted) = rest.split_at(TAG_BYTES);
    let nonce = Nonce::try_from(nonce).expect("split at the nonce length");
    let tag = Tag::try_from(tag).expect("split at the tag length");
    let mut plaintext = encrypted.to_vec();
    key.cipher()
        .decrypt_inout_detached(
            &nonce,
            associated_data,
            plaintext.as_mut_slice().into(),
            &tag,
        )
        .ok()?;
    Some(plaintext)
}

/// Domain-separation tag opening the associated data of [`seal_record`], so a read-model
/// record can never be passed off as an event payload or the other way round.
const RECORD_TAG: &[u8] = b"chartlog/read-model-record/v1";

/// The associated data of a read-model record: the tag, then each part length-prefixed
/// (u64 big-endian), so distinct part lists never encode alike.
fn record_associated_data(parts: &[&[u8]]) -> Vec<u8> {
    let length = RECORD_TAG.len() + parts.iter().map(|part| 8 + part.len()).sum::<usize>();
    let mut bytes = Vec::with_capacity(length);
    bytes.extend_from_slice(RECORD_TAG);
    for part in parts {
        bytes.extend_from_slice(&(part.len() as u64).to_be_bytes());
        bytes.extend_from_slice(part);
    }
    debug_assert_eq!(bytes.len(), length);
    bytes
}

/// Seals a read-model record (a projection's row holding PHI) under the owner's data key, with
/// `associated_data` naming the row (for example owner id, row kind and entry id), so a sealed
/// value copied into another row fails to open. Same layout and nonce rule as [`seal`]; when
/// the data key is destroyed, the record is as unreadable as the owner's events.
pub fn seal_record(key: &DataKey, associated_data: &[&[u8]], plaintext: &[u8]) -> Vec<u8> {
    seal_with(key, &record_associated_data(associated_data), plaintext)
}

/// Opens what [`seal_record`] produced under the same key and identical associated data.
pub fn open_record(
    key: &DataKey,
    associated_data: &[&[u8]],
    sealed: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    open_with(key, &record_associated_data(associated_data), sealed)
        .ok_or(CryptoError::RecordUnopenable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::tests::header;

    #[test]
    fn round_trips_and_randomizes() {
        let key = DataKey::generate();
        let header = header();
        for plaintext in [&b""[..], b"x", &[7; 1000]] {
            let one = seal(&key, &header, plaintext);
            let two = seal(&key, &header, plaintext);
            assert_eq!(one.len(), plaintext.len() + SEAL_OVERHEAD_BYTES);
            assert_ne!(one, two, "equal payloads give different ciphertexts");
            assert_eq!(open(&key, &header, &one).unwrap(), plaintext);
            assert_eq!(open(&key, &header, &two).unwrap(), plaintext);
        }
    }

    #[test]
    fn refuses_wrong_key_and_short_input() {
        let header = header();
        let sealed = seal(&DataKey::generate(), &header, b"payload");
        let other = DataKey::generate();
        assert!(matches!(
            open(&other, &header, &sealed),
            Err(CryptoError::Unopenable { .. })
        ));
        let key = DataKey::generate();
        for length in 0..SEAL_OVERHEAD_BYTES {
            assert!(open(&key, &header, &vec![0; length]).is_err());
        }
    }

    #[test]
    fn records_open_only_under_their_associated_data() {
        let key = DataKey::generate();
        let sealed = seal_record(&key, &[b"patient-1", b"condition"], b"payload");
        assert_ne!(
            sealed,
            seal_record(&key, &[b"patient-1", b"condition"], b"payload")
        );
        assert_eq!(
            open_record(&key, &[b"patient-1", b"condition"], &sealed).unwrap(),
            b"payload"
        );
        for moved in [
            &[&b"patient-2"[..], b"condition"][..],
            &[b"patient-1", b"allergy"],
            &[b"patient-1condition"],
            &[b"patient-", b"1condition"],
        ] {
            assert_eq!(
                open_record(&key, moved, &sealed),
                Err(CryptoError::RecordUnopenable)
            );
        }
        let other = DataKey::generate();
        assert!(open_record(&other, &[b"patient-1", b"condition"], &sealed).is_err());
        assert!(open_record(&key, &[], &[0; SEAL_OVERHEAD_BYTES - 1]).is_err());
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let key = DataKey::generate();
        let printed = format!("{key:?} {key:#?}");
        assert_eq!(format!("{key:?}"), "DataKey(<secret>)");
        let hex = hex::encode(key.expose_secret());
        assert!(!printed.contains(&hex));
        assert!(!printed.contains(&hex[..16]));
    }
}
