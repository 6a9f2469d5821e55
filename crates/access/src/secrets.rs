//! The access data key: what seals TOTP secrets, break-glass reasons and idempotent response
//! bodies at rest, and keys the fingerprints of idempotent requests. It lives in its own key
//! file (`access-key.json`) in the key directory, never in the database, so a copy of the
//! database alone opens none of them and tests no guess against a fingerprint.
//!
//! `chartlog_crypto` builds a [`DataKey`] from bytes only by unwrapping it under a KEK (by
//! design: no caller holds a bare data key's bytes). So the file holds a file-local KEK and
//! the data key wrapped under it, and loading is [`KeyRing::unwrap`].

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chartlog_crypto::{
    DataKey, DataKeyId, KEK_BYTES, KekId, KeyFileError, KeyRing, MacKey, WrappedDataKey,
    derive_mac_key, hmac_sha256, load_or_create_key_file, open_record, read_key_file, seal_record,
};
use chartlog_domain::StreamId;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::{Zeroize, Zeroizing};

use crate::error::AccessError;

/// The access key's file in the key directory.
pub const ACCESS_KEY_FILE_NAME: &str = "access-key.json";
const ACCESS_KEY_FILE_FORMAT: &str = "chartlog-access-key/v1";
/// The owner the data key is wrapped for: binds the wrap to this use.
const ACCESS_KEY_OWNER: &str = "access-secrets";
/// Domain-separation tag opening the associated data of every record sealed here.
const SEAL_TAG: &[u8] = b"chartlog-access/v1";
/// What the fingerprint key is derived for, from the data key.
const FINGERPRINT_KEY_PURPOSE: &[u8] = b"chartlog-access/idempotency-fingerprint-key/v1";

/// The key that seals access secrets at rest. Cheap to clone (shared); prints no key.
#[derive(Clone)]
pub struct AccessSecrets {
    key: Arc<DataKey>,
    /// Keys the fingerprints of idempotent requests. Derived from the data key rather than
    /// kept in a file of its own: every server that opens this key file (as each server on
    /// one database must, to open the TOTP secrets) computes the same fingerprint, so a retry
    /// sent to another server still matches.
    fingerprint_key: Arc<MacKey>,
}

impl std::fmt::Debug for AccessSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessSecrets(<secret>)")
    }
}

impl AccessSecrets {
    /// A fresh key held only in memory: what is sealed under it is lost with the process.
    /// For tests and throwaway instances.
    pub fn ephemeral() -> Self {
        Self::from_key(DataKey::generate())
    }

    fn from_key(key: DataKey) -> Self {
        Self {
            fingerprint_key: Arc::new(derive_mac_key(&key, FINGERPRINT_KEY_PURPOSE)),
            key: Arc::new(key),
        }
    }

    /// Loads `dir/access-key.json`, creating the directory (0700) and the file (0600, a random
    /// key) on first use. Refuses a file other users can access or a directory they can
    /// write. Safe against a concurrent first start: the file is created only if absent, and
    /// the loser of the race loads the winner's key.
    pub fn load_or_create(dir: &Path) -> Result<Self, KeyFileError> {
        load_or_create_key_file(dir, ACCESS_KEY_FILE_NAME, Self::load, || {
            let kek_id = KekId::generate();
            let mut kek = Zeroizing::new([0u8; KEK_BYTES]);
            crate::random::fill(kek.as_mut());
            let ring = KeyRing::with_key(kek_id.clone(), *kek);
            let key = DataKey::generate();
            let wrapped = ring.wrap(&owner(), DataKeyId::generate(), &key);
            let file = AccessKeyFile {
                format: ACCESS_KEY_FILE_FORMAT.to_owned(),
                kek_id: kek_id.as_str().to_owned(),
                kek: BASE64.encode(kek.as_ref()),
                data_key_id: wrapped.key_id.as_uuid().to_string(),
                wrapped_data_key: BASE64.encode(&wrapped.wrapped),
            };
            // Sized up front so the buffer holding the secret never reallocates.
            let mut json = Zeroizing::new(Vec::with_capacity(1024));
            serde_json::to_writer_pretty(&mut *json, &file)
                .expect("serializing strings cannot fail");
            json.push(b'\n');
            (Self::from_key(key), json)
        })
    }

    /// Reads an access key file written by [`AccessSecrets::load_or_create`].
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_key_file(path)?;
        let malformed = |reason: String| KeyFileError::Malformed {
            origin: path.display().to_string(),
            reason,
        };
        // serde_json's messages can quote the offending value: report the position only.
        let file: AccessKeyFile = serde_json::from_slice(&bytes).map_err(|error| {
            malformed(format!(
                "not an access key file (line {}, column {})",
                error.line(),
                error.column()
            ))
        })?;
        if file.format != ACCESS_KEY_FILE_FORMAT {
            return Err(malformed(format!(
                "format must be {ACCESS_KEY_FILE_FORMAT:?}"
            )));
        }
        let kek_id = KekId::parse(&file.kek_id).map_err(|error| malformed(error.to_string()))?;
        let kek = Zeroizing::new(
            BASE64
                .decode(&file.kek)
                .map_err(|_| malformed("the KEK is not valid base64".to_owned()))?,
        );
        let kek: [u8; KEK_BYTES] = kek.as_slice().try_into().map_err(|_| {
            malformed(format!(
                "the KEK must be {KEK_BYTES} bytes, found {}",
                kek.len()
            ))
        })?;
        let ring = KeyRing::with_key(kek_id.clone(), kek);
        let data_key_id = Uuid::parse_str(&file.data_key_id)
            .map_err(|_| malformed("the data key id is not a UUID".to_owned()))?;
        let wrapped = BASE64
            .decode(&file.wrapped_data_key)
            .map_err(|_| malformed("the wrapped data key is not valid base64".to_owned()))?;
        let key = ring
            .unwrap(
                &owner(),
                &WrappedDataKey {
                    key_id: DataKeyId::from_uuid(data_key_id),
                    kek_id,
                    wrapped,
                },
            )
            .map_err(|source| KeyFileError::Crypto {
                origin: path.display().to_string(),
                source,
            })?;
        Ok(Self::from_key(key))
    }

    /// Seals `plaintext` for the row named by `parts` (after the crate's own tag).
    pub(crate) fn seal(&self, parts: &[&[u8]], plaintext: &[u8]) -> Vec<u8> {
        seal_record(&self.key, &associated_data(parts), plaintext)
    }

    /// Opens what [`AccessSecrets::seal`] sealed for the same `parts`.
    pub(crate) fn open(&self, parts: &[&[u8]], sealed: &[u8]) -> Result<Vec<u8>, AccessError> {
        Ok(open_record(&self.key, &associated_data(parts), sealed)?)
    }

    /// The fingerprint stored for a request whose digest is `request_digest`: an HMAC under
    /// the fingerprint key. A request's digest is a plain hash of what it held (for signing a
    /// note, the signer's password), which anyone with a copy of the row could test guesses
    /// against; the HMAC cannot be tested without the key file.
    pub(crate) fn request_fingerprint(&self, request_digest: &[u8; 32]) -> [u8; 32] {
        hmac_sha256(
            &self.fingerprint_key,
            &[
                b"chartlog-access/idempotency-fingerprint/v1",
                request_digest,
            ],
        )
    }
}

fn associated_data<'a>(parts: &[&'a [u8]]) -> Vec<&'a [u8]> {
    let mut all = Vec::with_capacity(parts.len() + 1);
    all.push(SEAL_TAG);
    all.extend_from_slice(parts);
    all
}

fn owner() -> StreamId {
    StreamId::parse(ACCESS_KEY_OWNER).expect("a valid stream id")
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccessKeyFile {
    format: String,
    kek_id: String,
    /// Base64 of the file-local KEK (64 bytes).
    kek: String,
    data_key_id: String,
    /// Base64 of the data key wrapped under the KEK (AES-SIV key wrap, 80 bytes).
    wrapped_data_key: String,
}

impl Drop for AccessKeyFile {
    fn drop(&mut self) {
        self.kek.zeroize();
        self.wrapped_data_key.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn the_key_file_is_created_once_private_and_reloads() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let first = AccessSecrets::load_or_create(&keys).unwrap();
        let sealed = first.seal(&[b"row"], b"secret");
        let second = AccessSecrets::load_or_create(&keys).unwrap();
        assert_eq!(second.open(&[b"row"], &sealed).unwrap(), b"secret");
        assert!(second.open(&[b"other row"], &sealed).is_err());
        assert!(AccessSecrets::ephemeral().open(&[b"row"], &sealed).is_err());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let path = keys.join(ACCESS_KEY_FILE_NAME);
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                AccessSecrets::load(&path),
                Err(KeyFileError::InsecurePermissions { .. })
            ));
        }
    }
}
