//! Key files in a data directory: the KEK ring (`kek.json`) and the event-signing keys
//! (`signing.json`), private to their owner (files 0600, directory 0700), written atomically.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{CryptoError, KeyFileError};
use crate::ids::{KekId, SignerKeyId};
use crate::key_ring::KeyRing;
use crate::sign::{EventSigner, SignatureVerifier};

/// The KEK ring's file in the key directory.
pub const KEK_FILE_NAME: &str = "kek.json";
/// The signing keys' file in the key directory.
pub const SIGNING_FILE_NAME: &str = "signing.json";
/// Largest key file read (a ring of 64 KEKs is about 10 KiB).
const KEY_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// Most retired signing keys kept; [`SigningKeys::rotate`] asserts there is room for one more.
pub const RETIRED_SIGNERS_MAX: usize = 1024;
// A rotation retires one signer.
const _: () = assert!(RETIRED_SIGNERS_MAX >= 1);
const SIGNING_FILE_FORMAT: &str = "chartlog-signing/v1";

/// Loads the KEK ring and signing keys from `dir`, creating the directory (mode 0700) and
/// either file (mode 0600, random ids and keys) on first use. Refuses key files other users can
/// access and a directory other users can write. Safe against a concurrent first start: a file
/// is created only if absent, and the loser of a race loads the winner's.
pub fn load_or_create_key_files(dir: &Path) -> Result<(KeyRing, SigningKeys), KeyFileError> {
    Ok((
        load_or_create_kek_ring(dir)?,
        load_or_create_signing_keys(dir)?,
    ))
}

/// The KEK ring of [`load_or_create_key_files`] alone.
pub fn load_or_create_kek_ring(dir: &Path) -> Result<KeyRing, KeyFileError> {
    load_or_create(dir, KEK_FILE_NAME, KeyRing::load, || {
        let ring = KeyRing::generate(KekId::generate());
        let json = ring.to_json();
        (ring, json)
    })
}

/// The signing keys of [`load_or_create_key_files`] alone: for a KEK ring supplied from
/// elsewhere, the signing keys still live in `dir`.
pub fn load_or_create_signing_keys(dir: &Path) -> Result<SigningKeys, KeyFileError> {
    load_or_create(dir, SIGNING_FILE_NAME, SigningKeys::load, || {
        let signing = SigningKeys::generate(SignerKeyId::generate());
        let json = signing.to_json();
        (signing, json)
    })
}

/// Loads `dir/file_name` with `load`; when there is no such file, creates the directory
/// (0700) and the file (0600) from `generate` (the keys and their file's bytes). Safe against
/// a concurrent first start: the file is created only if absent, and the loser of a race
/// loads the winner's. Every key file of chartlog's, in this crate and outside it (the access
/// crate's), is created through here.
pub fn load_or_create<T>(
    dir: &Path,
    file_name: &str,
    load: impl Fn(&Path) -> Result<T, KeyFileError>,
    generate: impl FnOnce() -> (T, Zeroizing<Vec<u8>>),
) -> Result<T, KeyFileError> {
    create_private_dir(dir)?;
    let path = dir.join(file_name);
    match load(&path) {
        Err(KeyFileError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            let (keys, json) = generate();
            if write_private(&path, &json, Replace::No)? {
                Ok(keys)
            } else {
                load(&path)
            }
        }
        other => other,
    }
}

/// The active event signer and the public keys of retired ones, which stay trusted so events
/// signed before a rotation still verify.
pub struct SigningKeys {
    active: Arc<EventSigner>,
    retired: BTreeMap<SignerKeyId, [u8; 32]>,
}

impl SigningKeys {
    /// Keys with a fresh active signer and nothing retired.
    pub fn generate(active_id: SignerKeyId) -> Self {
        Self {
            active: Arc::new(EventSigner::generate(active_id)),
            retired: BTreeMap::new(),
        }
    }

    /// The signer new events are signed with.
    pub fn active(&self) -> &Arc<EventSigner> {
        &self.active
    }

    /// The retired signers' public keys by id.
    pub fn retired(&self) -> impl Iterator<Item = (&SignerKeyId, &[u8; 32])> {
        self.retired.iter()
    }

    /// A verifier trusting the active and every retired signer.
    pub fn verifier(&self) -> SignatureVerifier {
        let mut verifier = SignatureVerifier::new();
        verifier
            .trust(
                self.active.key_id().clone(),
                self.active.verifying_key_bytes(),
            )
            .expect("an Ed25519 key generated or loaded here is valid");
        for (id, public_key) in &self.retired {
            verifier
                .trust(id.clone(), *public_key)
                .expect("retired public keys are checked when loaded");
        }
        verifier
    }

    /// Retires the active signer (keeping its public key) and makes a fresh one under `new_id`
    /// active. Refuses an id that was ever used. Save the keys afterwards.
    pub fn rotate(&mut self, new_id: SignerKeyId) -> Result<(), CryptoError> {
        if new_id == *self.active.key_id() || self.retired.contains_key(&new_id) {
            return Err(CryptoError::ConflictingSigner {
                signer_key_id: new_id,
            });
        }
        assert!(
            self.retired.len() < RETIRED_SIGNERS_MAX,
            "at most {RETIRED_SIGNERS_MAX} retired signers"
        );
        let new = Arc::new(EventSigner::generate(new_id));
        let old = std::mem::replace(&mut self.active, new);
        self.retired
            .insert(old.key_id().clone(), old.verifying_key_bytes());
        Ok(())
    }

    /// Reads a JSON key file written by [`SigningKeys::save`]. Refuses a file other users can
    /// access.
    pub fn load(path: &Path) -> Result<Self, KeyFileError> {
        let bytes = read_private(path)?;
        Self::from_json(&bytes, &path.display().to_string())
    }

    /// Writes the keys as a JSON key file, mode 0600, atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), KeyFileError> {
        write_private(path, &self.to_json(), Replace::Yes).map(drop)
    }

    fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let file = SigningFile {
            format: SIGNING_FILE_FORMAT.to_owned(),
            active: ActiveSignerEntry {
                id: self.active.key_id().as_str().to_owned(),
                secret_key: BASE64.encode(*self.active.secret_bytes()),
            },
            retired: self
                .retired
                .iter()
                .map(|(id, public_key)| RetiredSignerEntry {
                    id: id.as_str().to_owned(),
                    public_key: BASE64.encode(public_key),
                })
                .collect(),
        };
        // Sized up front so the buffer holding the secret never reallocates (and leaves copies).
        let mut json = Zeroizing::new(Vec::with_capacity(512 + 128 * self.retired.len()));
        serde_json::to_writer_pretty(&mut *json, &file).expect("serializing strings cannot fail");
        json.push(b'\n');
        json
    }

    fn from_json(bytes: &[u8], origin: &str) -> Result<Self, KeyFileError> {
        let malformed = |reason: String| KeyFileError::Malformed {
            origin: origin.to_owned(),
            reason,
        };
        let file: SigningFile = serde_json::from_slice(bytes).map_err(|error| {
            malformed(format!(
                "not a signing key file: {}",
                describe_json_error(&error)
            ))
        })?;
        if file.format != SIGNING_FILE_FORMAT {
            return Err(malformed(format!("format must be {SIGNING_FILE_FORMAT:?}")));
        }
        if file.retired.len() > RETIRED_SIGNERS_MAX {
            return Err(malformed(format!(
                "more than {RETIRED_SIGNERS_MAX} retired signers"
            )));
        }
        let active_id =
            SignerKeyId::parse(&file.active.id).map_err(|error| malformed(error.to_string()))?;
        let secret = decode_32(&file.active.secret_key)
            .map_err(|reason| malformed(format!("signer {active_id}: {reason}")))?;
        let active = EventSigner::from_secret_bytes(active_id, *secret);
        let mut keys = Self {
            active: Arc::new(active),
            retired: BTreeMap::new(),
        };
        let mut verifier = keys.verifier();
        for entry in &file.retired {
            let id = SignerKeyId::parse(&entry.id).map_err(|error| malformed(error.to_string()))?;
            let public_key = decode_32(&entry.public_key)
                .map_err(|reason| malformed(format!("signer {id}: {reason}")))?;
            let conflict = |source| KeyFileError::Crypto {
                origin: origin.to_owned(),
                source,
            };
            if verifier.trusts(&id) {
                return Err(conflict(CryptoError::ConflictingSigner {
                    signer_key_id: id,
                }));
            }
            verifier.trust(id.clone(), *public_key).map_err(conflict)?;
            keys.retired.insert(id, *public_key);
        }
        Ok(keys)
    }
}

impl fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKeys")
            .field("active", &self.active)
            .field("retired", &self.retired.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Describes a JSON parse failure by kind and position only: serde_json's messages can quote
/// the offending value, which in a key file may be a key.
pub(crate) fn describe_json_error(error: &serde_json::Error) -> String {
    let message = error.to_string();
    if message.starts_with("missing field") {
        return message;
    }
    let kind = match error.classify() {
        serde_json::error::Category::Io => "unreadable",
        serde_json::error::Category::Syntax => "invalid JSON",
        serde_json::error::Category::Data => "unexpected value",
        serde_json::error::Category::Eof => "truncated JSON",
    };
    format!("{kind} at line {}, column {}", error.line(), error.column())
}

fn decode_32(encoded: &str) -> Result<Zeroizing<[u8; 32]>, String> {
    let decoded = Zeroizing::new(
        BASE64
            .decode(encoded)
            .map_err(|_| "the key is not valid base64".to_owned())?,
    );
    if decoded.len() != 32 {
        return Err(format!("the key must be 32 bytes, found {}", decoded.len()));
    }
    let mut key = Zeroizing::new([0; 32]);
    key.copy_from_slice(&decoded);
    Ok(key)
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SigningFile {
    format: String,
    active: ActiveSignerEntry,
    retired: Vec<RetiredSignerEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActiveSignerEntry {
    id: String,
    /// Base64 of the 32-byte Ed25519 secret key.
    secret_key: String,
}

impl Drop for ActiveSignerEntry {
    fn drop(&mut self) {
        self.secret_key.zeroize();
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetiredSignerEntry {
    id: String,
    /// Base64 of the 32-byte Ed25519 public key.
    public_key: String,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Whether [`write_private`] may replace an existing file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replace {
    Yes,
    No,
}

/// Creates `dir` (and parents) with mode 0700 if absent; refuses a key directory that users
/// other than its owner can write (they could swap the key files).
pub(crate) fn create_private_dir(dir: &Path) -> Result<(), KeyFileError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(io_error(dir))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(dir)
            .map_err(io_error(dir))?
            .permissions()
            .mode()
            & 0o7777;
        if mode & 0o022 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: dir.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}

/// Reads a key file, refusing one that users other than its owner can access, or that is
/// larger than any key file.
pub fn read_private(path: &Path) -> Result<Zeroizing<Vec<u8>>, KeyFileError> {
    let file = fs::File::open(path).map_err(io_error(path))?;
    let metadata = file.metadata().map_err(io_error(path))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::InsecurePermissions {
                path: path.to_owned(),
                mode,
            });
        }
    }
    if metadata.len() > KEY_FILE_BYTES_MAX {
        return Err(KeyFileError::Malformed {
            origin: path.display().to_string(),
            reason: format!("larger than {KEY_FILE_BYTES_MAX} bytes"),
        });
    }
    // Sized up front so the buffer holding secrets never reallocates (and leaves copies).
    let capacity = usize::try_from(metadata.len()).expect("at most 1 MiB") + 1;
    let mut bytes = Zeroizing::new(Vec::with_capacity(capacity));
    file.take(KEY_FILE_BYTES_MAX)
        .read_to_end(&mut bytes)
        .map_err(io_error(path))?;
    Ok(bytes)
}

/// Writes `bytes` to `path` with mode 0600 through a temporary file in the same directory
/// (fsynced, then renamed or linked into place, then the directory fsynced), so a crash leaves
/// either the old file or the new one. With [`Replace::No`], an existing file is kept and
/// `false` returned.
pub(crate) fn write_private(
    path: &Path,
    bytes: &[u8],
    replace: Replace,
) -> Result<bool, KeyFileError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| KeyFileError::Malformed {
            origin: path.display().to_string(),
            reason: "not a file path".to_owned(),
        })?
        .to_string_lossy();
    let suffix: [u8; 8] = crate::rng::array();
    let temporary = dir.join(format!(".{name}.{}.tmp", hex::encode(suffix)));
    let written = write_new(&temporary, bytes).and_then(|()| match replace {
        Replace::Yes => fs::rename(&temporary, path).map(|()| true),
        Replace::No => {
            let linked = match fs::hard_link(&temporary, path) {
                Ok(()) => Ok(true),
                Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(error) => Err(error),
            };
            let _ = fs::remove_file(&temporary);
            linked
        }
    });
    let created = match written {
        Ok(created) => created,
        Err(error) => {
            let _ = fs::remove_file(&temporary);
            return Err(io_error(path)(error));
        }
    };
    fs::File::open(&dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io_error(&dir))?;
    Ok(created)
}

fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
