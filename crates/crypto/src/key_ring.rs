//! Key-encryption keys (KEKs) and the wrapping of data keys under them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use aes_siv::Key;
use aes_siv::aead::KeyInit;
use aes_siv::siv::Aes256Siv;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chartlog_domain::StreamId;
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{CryptoError, KeyFileError};
use crate::ids::{DataKeyId, KekId};
use crate::key_files;
use crate::seal::{DATA_KEY_BYTES, DataKey};

/// Bytes of a KEK: an AES-256-SIV key.
pub const KEK_BYTES: usize = 64;
/// Domain-separation tag of the associated data of a key wrap.
const WRAP_TAG: &[u8] = b"chartlog/data-key-wrap/v1";
/// SIV tag followed by the encrypted data key.
const WRAPPED_BYTES: usize = 16 + DATA_KEY_BYTES;
/// Most KEKs one ring holds (a few during a rotation); [`KeyRing::add`] asserts there is room.
pub const KEKS_MAX: usize = 64;
// A rotation holds the old KEK and the new one.
const _: () = assert!(KEKS_MAX >= 2);
const KEK_FILE_FORMAT: &str = "chartlog-kek/v1";

/// A data key wrapped (encrypted) under a KEK, as kept in the key table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrappedDataKey {
    /// The data key's id, as in the headers of the events it seals.
    pub key_id: DataKeyId,
    /// The KEK it is wrapped under.
    pub kek_id: KekId,
    /// SIV tag and encrypted key (80 bytes).
    pub wrapped: Vec<u8>,
}

struct Kek(SecretBox<[u8; KEK_BYTES]>);

impl Kek {
    fn new(bytes: &[u8; KEK_BYTES]) -> Self {
        let mut secret = SecretBox::new(Box::new([0; KEK_BYTES]));
        secret.expose_secret_mut().copy_from_slice(bytes);
        Self(secret)
    }

    fn generate() -> Self {
        let mut secret = SecretBox::new(Box::new([0; KEK_BYTES]));
        crate::rng::fill(secret.expose_secret_mut());
        Self(secret)
    }

    fn cipher(&self) -> Aes256Siv {
        // `Siv` zeroizes what it can on drop; the `Key` copy is dropped at once.
        Aes256Siv::new(&Key::<Aes256Siv>::from(*self.0.expose_secret()))
    }
}

/// The key-encryption keys by id, one of them active for wrapping. Several are present during
/// a rotation: data keys wrapped by the old ones still unwrap. Secrets are zeroized on drop,
/// never cloned, serialized except by [`KeyRing::save`], or printed.
pub struct KeyRing {
    keks: BTreeMap<KekId, Kek>,
    active: KekId,
}

impl KeyRing {
    /// A ring with one fresh random KEK, active.
    pub fn generate(kek_id: KekId) -> Self {
        let mut keks = BTreeMap::new();
        keks.insert(kek_id.clone(), Kek::generate());
        Self {
            keks,
            active: kek_id,
        }
    }

    /// A ring with one given KEK, active.
    pub fn with_key(kek_id: KekId, key: [u8; KEK_BYTES]) -> Self {
        let key = Zeroizing::new(key);
        let mut keks = BTreeMap::new();
        keks.insert(kek_id.clone(), Kek::new(&key));
        Self {
            keks,
            active: kek_id,
        }
    }

    /// Adds a KEK (not active). Adding the same id with the same bytes again is a no-op.
    pub fn add(&mut self, kek_id: KekId, key: [u8; KEK_BYTES]) -> Result<(), CryptoError> {
        let key = Zeroizing::new(key);
        if let Some(existing) = self.keks.get(&kek_id) {
            // Not secret-dependent timing worth protecting: the caller holds both keys.
            return if existing.0.expose_secret() == &*key {
                Ok(())
            } else {
                Err(CryptoError::DuplicateKek { kek_id })
            };
        }
        assert!(
            self.keks.len() < KEKS_MAX,
            "a key ring holds at most {KEKS_MAX} KEKs"
        );
        self.keks.insert(kek_id, Kek::new(&key));
        Ok(())
    }

    /// Adds a fresh random KEK (not active); refuses an id already present.
    pub fn add_generated(&mut self, kek_id: KekId) -> Result<(), CryptoError> {
        if self.keks.contains_key(&kek_id) {
            return Err(CryptoError::DuplicateKek { kek_id });
        }
        assert!(
            self.keks.len() < KEKS_MAX,
            "a key ring holds at most {KEKS_MAX} KEKs"
        );
        self.keks.insert(kek_id, Kek::generate());
        Ok(())
    }

    /// Makes a KEK of the ring the one new wrappings use.
    pub fn set_active(&mut self, kek_id: &KekId) -> Result<(), CryptoError> {
        if !self.keks.contains_key(kek_id) {
            return Err(CryptoError::UnknownKek {
                kek_id: kek_id.clone(),
            });
        }
        self.active = kek_id.clone();
        Ok(())
    }

    /// Drops a retired KEK (after a completed rotation). The active one cannot be removed.
    pub fn remove(&mut self, kek_id: &KekId) -> Result<(), CryptoError> {
        if *kek_id == self.active {
            return Err(CryptoError::ActiveKekRemoval {
                kek_id: kek_id.clone(),
            });
        }
        self.keks
            .remove(kek_id)
            .map(drop)
            .ok_or_else(|| CryptoError::UnknownKek {
                kek_id: kek_id.clone(),
            })
    }

    /// The KEK new wrappings use.
    pub fn active_kek_id(&self) -> &KekId {
        &self.active
    }

    /// Every KEK id of the ring, sorted.
    pub fn kek_ids(&self) -> Vec<KekId> {
        self.keks.keys().cloned().collect()
    }

    /// Whether the ring holds this KEK.
    pub fn contains(&self, kek_id: &KekId) -> bool {
        self.keks.contains_key(kek_id)
    }

    /// Wraps `key` under the active KEK with deterministic AES-SIV (RFC 5297 key wrap). The
    /// associated data binds owner, key id and KEK id, so the result unwraps for no other owner.
    pub fn wrap(&self, owner: &StreamId, key_id: DataKeyId, key: &DataKey) -> WrappedDataKey {
        let kek = self
            .keks
            .get(&self.active)
            .expect("the active KEK is in the ring");
        let wrapped = kek
            .cipher()
            .encrypt(
                [wrap_associated_data(owner, key_id, &self.active)],
                key.expose_secret(),
            )
            .expect("AES-SIV encryption fails only with more than 126 associated data items");
        assert_eq!(wrapped.len(), WRAPPED_BYTES);
        WrappedDataKey {
            key_id,
            kek_id: self.active.clone(),
            wrapped,
        }
    }

    /// Unwraps a data key wrapped for `owner` under any KEK of the ring.
    pub fn unwrap(
        &self,
        owner: &StreamId,
        wrapped: &WrappedDataKey,
    ) -> Result<DataKey, CryptoError> {
        let kek = self
            .keks
            .get(&wrapped.kek_id)
            .ok_or_else(|| CryptoError::UnknownKek {
                kek_id: wrapped.kek_id.clone(),
            })?;
        let failed = || CryptoError::UnwrapFailed {
            owner: owner.clone(),
            key_id: wrapped.key_id,
            kek_id: wrapped.kek_id.clone(),
        };
        if wrapped.wrapped.len() != WRAPPED_BYTES {
            return Err(failed());
        }
        let mut buffer = Zeroizing::new(wrapped.wrapped.clone());
        kek.cipher()
            .decrypt_in_place(
                [wrap_associated_data(owner, wrapped.key_id, &wrapped.kek_id)],
                &mut *buffer,
            )
            .map_err(|_| failed())?;
        let bytes: &[u8; DATA_KEY_BYTES] = buffer
            .as_slice()
            .try_into()
            .expect("an unwrapped data key is 64 bytes");
        Ok(DataKey::from_bytes(bytes))
    }

    /// Reads a JSON key file written by [`KeyRing::save`]. Refuses a file other users can access.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = key_files::read_private(path)?;
        Self::from_json(&bytes, &path.display().to_string())
    }

    /// Writes the ring as a JSON key file, mode 0600, atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        key_files::write_private(path, &self.to_json(), key_files::Replace::Yes).map(drop)
    }

    /// Parses `kek-id:base64key[,kek-id2:base64key2...]` (as from an environment variable); the
    /// first KEK is active. Whitespace around entries is ignored.
    pub fn from_env_value(value: &str) -> Result<Self, KeyFileError> {
        const ORIGIN: &str = "environment value";
        let malformed = |reason: String| KeyFileError::Malformed {
            origin: ORIGIN.to_owned(),
            reason,
        };
        let mut ring: Option<KeyRing> = None;
        for (index, entry) in value.split(',').enumerate() {
            let number = index + 1;
            if number > KEKS_MAX {
                return Err(malformed(format!("more than {KEKS_MAX} KEKs")));
            }
            let (id, key) = entry
                .trim()
                .split_once(':')
                .ok_or_else(|| malformed(format!("entry {number}: expected kek-id:base64-key")))?;
            let id = KekId::parse(id.trim())
                .map_err(|error| malformed(format!("entry {number}: {error}")))?;
            let key = decode_key(key.trim())
                .map_err(|reason| malformed(format!("entry {number} ({id}): {reason}")))?;
            match &mut ring {
                None => ring = Some(KeyRing::with_key(id, *key)),
                Some(ring) => ring.add(id, *key).map_err(|source| KeyFileError::Crypto {
                    origin: ORIGIN.to_owned(),
                    source,
                })?,
            }
        }
        ring.ok_or_else(|| malformed("no KEK".to_owned()))
    }

    pub(crate) fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let file = KekFile {
            format: KEK_FILE_FORMAT.to_owned(),
            active: self.active.as_str().to_owned(),
            keys: self
                .keks
                .iter()
                .map(|(id, kek)| KekEntry {
                    id: id.as_str().to_owned(),
                    key: BASE64.encode(kek.0.expose_secret()),
                })
                .collect(),
        };
        // Sized up front so the buffer holding secrets never reallocates (and leaves copies).
        let mut json = Zeroizing::new(Vec::with_capacity(256 + 256 * self.keks.len()));
        serde_json::to_writer_pretty(&mut *json, &file).expect("serializing strings cannot fail");
        json.push(b'\n');
        json
    }

    fn from_json(bytes: &[u8], origin: &str) -> Result<Self, KeyFileError> {
        let malformed = |reason: String| KeyFileError::Malformed {
            origin: origin.to_owned(),
            reason,
        };
        let file: KekFile = serde_json::from_slice(bytes).map_err(|error| {
            malformed(format!(
                "not a KEK file: {}",
                key_files::describe_json_error(&error)
            ))
        })?;
        if file.format != KEK_FILE_FORMAT {
            return Err(malformed(format!("format must be {KEK_FILE_FORMAT:?}")));
        }
        if file.keys.len() > KEKS_MAX {
            return Err(malformed(format!("more than {KEKS_MAX} KEKs")));
        }
        let active = KekId::parse(&file.active).map_err(|error| malformed(error.to_string()))?;
        let mut keks = BTreeMap::new();
        for entry in &file.keys {
            let id = KekId::parse(&entry.id).map_err(|error| malformed(error.to_string()))?;
            let key = decode_key(&entry.key)
                .map_err(|reason| malformed(format!("KEK {id}: {reason}")))?;
            if keks.insert(id.clone(), Kek::new(&key)).is_some() {
                return Err(KeyFileError::Crypto {
                    origin: origin.to_owned(),
                    source: CryptoError::DuplicateKek { kek_id: id },
                });
            }
        }
        if !keks.contains_key(&active) {
            return Err(KeyFileError::Crypto {
                origin: origin.to_owned(),
                source: CryptoError::UnknownKek { kek_id: active },
            });
        }
        Ok(Self { keks, active })
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("kek_ids", &self.keks.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

fn wrap_associated_data(owner: &StreamId, key_id: DataKeyId, kek_id: &KekId) -> Vec<u8> {
    let owner = owner.as_str().as_bytes();
    let kek_id = kek_id.as_str().as_bytes();
    let mut data = Vec::with_capacity(WRAP_TAG.len() + 8 + owner.len() + 16 + 8 + kek_id.len());
    data.extend_from_slice(WRAP_TAG);
    data.extend_from_slice(&(owner.len() as u64).to_be_bytes());
    data.extend_from_slice(owner);
    data.extend_from_slice(key_id.as_uuid().as_bytes());
    data.extend_from_slice(&(kek_id.len() as u64).to_be_bytes());
    data.extend_from_slice(kek_id);
    data
}

/// Decodes a base64 KEK. The error never quotes the input.
pub(crate) fn decode_key(encoded: &str) -> Result<Zeroizing<[u8; KEK_BYTES]>, String> {
    let decoded = Zeroizing::new(
        BASE64
            .decode(encoded)
            .map_err(|_| "the key is not valid base64".to_owned())?,
    );
    let mut key = Zeroizing::new([0; KEK_BYTES]);
    if decoded.len() != KEK_BYTES {
        return Err(format!(
            "the key must be {KEK_BYTES} bytes, found {}",
            decoded.len()
        ));
    }
    key.copy_from_slice(&decoded);
    Ok(key)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KekFile {
    format: String,
    active: String,
    keys: Vec<KekEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KekEntry {
    id: String,
    /// Base64 of the 64 key bytes.
    key: String,
}

impl Drop for KekEntry {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(n: u128) -> StreamId {
        StreamId::patient(chartlog_domain::PatientId::from_uuid(
            uuid::Uuid::from_u128(n),
        ))
    }

    #[test]
    fn wrapped_keys_are_bound_to_owner_key_id_and_kek() {
        let ring = KeyRing::generate(KekId::parse("kek-a").unwrap());
        let key = DataKey::generate();
        let key_id = DataKeyId::generate();
        let wrapped = ring.wrap(&owner(1), key_id, &key);
        assert_eq!(wrapped.wrapped.len(), WRAPPED_BYTES);
        assert_eq!(
            ring.unwrap(&owner(1), &wrapped).unwrap().expose_secret(),
            key.expose_secret()
        );
        assert_eq!(wrapped, ring.wrap(&owner(1), key_id, &key), "deterministic");
        assert!(matches!(
            ring.unwrap(&owner(2), &wrapped),
            Err(CryptoError::UnwrapFailed { .. })
        ));
        let other_id = WrappedDataKey {
            key_id: DataKeyId::generate(),
            ..wrapped.clone()
        };
        assert!(ring.unwrap(&owner(1), &other_id).is_err());
        let mut truncated = wrapped.clone();
        truncated.wrapped.pop();
        assert!(ring.unwrap(&owner(1), &truncated).is_err());
    }

    #[test]
    fn parse_errors_never_quote_values() {
        let secret = "c2VjcmV0LWtleS1ieXRlcy1zaG91bGQtbm90LWxlYWs=";
        for json in [
            format!(r#"{{"format":"chartlog-kek/v1","active":"kek-a","keys":"{secret}"}}"#),
            format!(
                r#"{{"format":"chartlog-kek/v1","active":"kek-a","keys":[{{"id":"kek-a","key":7}}],"x":"{secret}"}}"#
            ),
            format!(r#"{{"format":"{secret}","active":"kek-a","keys":[]}}"#),
            format!(
                r#"{{"format":"chartlog-kek/v1","active":"kek-a","keys":[{{"id":"kek-a","key":"{secret}"}}]}}"#
            ),
        ] {
            let error = KeyRing::from_json(json.as_bytes(), "test").expect_err("malformed");
            assert!(!error.to_string().contains(&secret[..12]), "{error}");
        }
    }

    #[test]
    fn json_round_trips() {
        let mut ring = KeyRing::generate(KekId::parse("kek-a").unwrap());
        ring.add_generated(KekId::parse("kek-b").unwrap()).unwrap();
        let json = ring.to_json();
        let back = KeyRing::from_json(&json, "test").unwrap();
        assert_eq!(back.active_kek_id().as_str(), "kek-a");
        assert_eq!(back.kek_ids(), ring.kek_ids());
        for id in ring.kek_ids() {
            assert_eq!(
                back.keks[&id].0.expose_secret(),
                ring.keks[&id].0.expose_secret()
            );
        }
    }
}
