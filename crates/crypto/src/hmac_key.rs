//! The key file of a [`MacKey`] in the data directory's key folder: blind indexes (lookups by
//! MRN, by family name and birth date) store only HMACs under this key, so the key must live
//! beside the other key files, never in the database.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::error::KeyFileError;
use crate::key_files::{describe_json_error, load_or_create, read_private};
use crate::mac::{MAC_KEY_BYTES, MacKey};

/// The blind-index key's file in the key directory.
pub const INDEX_KEY_FILE_NAME: &str = "index-key.json";
const MAC_KEY_FILE_FORMAT: &str = "chartlog-mac-key/v1";

/// Loads the [`MacKey`] in `dir/file_name`, creating the directory (0700) and a random key
/// file (0600) on first use. Safe against a concurrent first start: the loser of the race
/// loads the winner's key. Refuses a file other users can access.
pub fn load_or_create_mac_key(dir: &Path, file_name: &str) -> Result<MacKey, KeyFileError> {
    load_or_create(dir, file_name, load_mac_key, || {
        let mut bytes = Zeroizing::new([0; MAC_KEY_BYTES]);
        crate::rng::fill(bytes.as_mut());
        let file = MacKeyFile {
            format: MAC_KEY_FILE_FORMAT.to_owned(),
            key: BASE64.encode(*bytes),
        };
        // Sized up front so the buffer holding the secret never reallocates.
        let mut json = Zeroizing::new(Vec::with_capacity(256));
        serde_json::to_writer_pretty(&mut *json, &file).expect("serializing strings cannot fail");
        json.push(b'\n');
        (MacKey::from_bytes(&bytes), json)
    })
}

/// Reads a key file written by [`load_or_create_mac_key`].
pub fn load_mac_key(path: &Path) -> Result<MacKey, KeyFileError> {
    let bytes = read_private(path)?;
    let malformed = |reason: String| KeyFileError::Malformed {
        origin: path.display().to_string(),
        reason,
    };
    let file: MacKeyFile = serde_json::from_slice(&bytes).map_err(|error| {
        malformed(format!(
            "not a MAC key file: {}",
            describe_json_error(&error)
        ))
    })?;
    if file.format != MAC_KEY_FILE_FORMAT {
        return Err(malformed(format!("format must be {MAC_KEY_FILE_FORMAT:?}")));
    }
    let decoded = Zeroizing::new(
        BASE64
            .decode(&file.key)
            .map_err(|_| malformed("the key is not valid base64".to_owned()))?,
    );
    let key: &[u8; MAC_KEY_BYTES] = decoded.as_slice().try_into().map_err(|_| {
        malformed(format!(
            "the key must be {MAC_KEY_BYTES} bytes, found {}",
            decoded.len()
        ))
    })?;
    Ok(MacKey::from_bytes(key))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct MacKeyFile {
    format: String,
    /// Base64 of the key bytes.
    key: String,
}

impl Drop for MacKeyFile {
    fn drop(&mut self) {
        self.key.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mac::hmac_sha256;

    #[test]
    fn key_file_is_created_once_and_reloaded_privately() {
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        let first = load_or_create_mac_key(&keys, INDEX_KEY_FILE_NAME).unwrap();
        let second = load_or_create_mac_key(&keys, INDEX_KEY_FILE_NAME).unwrap();
        assert_eq!(hmac_sha256(&first, &[b"v"]), hmac_sha256(&second, &[b"v"]));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(keys.join(INDEX_KEY_FILE_NAME))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
