//! Errors of the crypto layer. Messages name ids, streams and versions, never key bytes or PHI.

use std::path::PathBuf;

use chartlog_domain::StreamId;

use crate::ids::{DataKeyId, KekId, SignerKeyId};

/// A value that is not a valid id, hash or signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind}: {reason}")]
pub struct IdError {
    kind: &'static str,
    reason: &'static str,
}

impl IdError {
    pub(crate) const fn new(kind: &'static str, reason: &'static str) -> Self {
        Self { kind, reason }
    }
}

/// A sealing, wrapping or key-management operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// The ciphertext does not open under this key and header: wrong key, tampered bytes, or
    /// a ciphertext moved to another stream, version or header.
    #[error(
        "event {stream_id} version {stream_version} does not open under its data key and header"
    )]
    Unopenable {
        /// The stream named by the header the ciphertext was opened under.
        stream_id: StreamId,
        /// The version named by that header.
        stream_version: u64,
    },
    /// A sealed read-model record does not open under this key and associated data: wrong
    /// key, tampered bytes, or a record moved to another row.
    #[error("a read-model record does not open under its data key and associated data")]
    RecordUnopenable,
    /// No key-encryption key of this id is in the key ring.
    #[error("unknown key-encryption key {kek_id}")]
    UnknownKek {
        /// The id asked for.
        kek_id: KekId,
    },
    /// A wrapped data key does not unwrap: tampered, or wrapped for another owner or key id.
    #[error("data key {key_id} does not unwrap under key-encryption key {kek_id} for {owner}")]
    UnwrapFailed {
        /// The owner the key was unwrapped for.
        owner: StreamId,
        /// The data key's id.
        key_id: DataKeyId,
        /// The key-encryption key used.
        kek_id: KekId,
    },
    /// A key ring already holds a different key under this id.
    #[error("key-encryption key {kek_id} is already in the key ring with other key bytes")]
    DuplicateKek {
        /// The id added twice.
        kek_id: KekId,
    },
    /// The active key-encryption key cannot be removed from its ring.
    #[error("key-encryption key {kek_id} is active and cannot be removed")]
    ActiveKekRemoval {
        /// The active id.
        kek_id: KekId,
    },
    /// A verifier already trusts another public key under this signer id.
    #[error("signer {signer_key_id} is already trusted with another public key")]
    ConflictingSigner {
        /// The id trusted twice.
        signer_key_id: SignerKeyId,
    },
    /// The bytes are not a usable Ed25519 public key (not a curve point, or of small order).
    #[error("signer {signer_key_id} has an invalid or weak Ed25519 public key")]
    InvalidPublicKey {
        /// The signer whose key was refused.
        signer_key_id: SignerKeyId,
    },
}

/// Evidence that stored events were changed, deleted, inserted, reordered or forged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IntegrityError {
    /// The stored hash is not the hash of the stored header and ciphertext.
    #[error(
        "event {stream_id} version {stream_version}: stored hash does not match header and ciphertext"
    )]
    HashMismatch {
        /// The event's stream.
        stream_id: StreamId,
        /// The event's version.
        stream_version: u64,
    },
    /// The signature does not verify under the signer's public key.
    #[error(
        "event {stream_id} version {stream_version}: signature does not verify under signer {signer_key_id}"
    )]
    BadSignature {
        /// The event's stream.
        stream_id: StreamId,
        /// The event's version.
        stream_version: u64,
        /// The signer named by the header.
        signer_key_id: SignerKeyId,
    },
    /// The header names a signer the verifier does not trust.
    #[error("event {stream_id} version {stream_version}: unknown signer {signer_key_id}")]
    UnknownSigner {
        /// The event's stream.
        stream_id: StreamId,
        /// The event's version.
        stream_version: u64,
        /// The signer named by the header.
        signer_key_id: SignerKeyId,
    },
    /// The event's `prev_hash` is not the hash of the event before it.
    #[error(
        "event {stream_id} version {stream_version}: previous hash does not match the event before it"
    )]
    ChainBroken {
        /// The event's stream.
        stream_id: StreamId,
        /// The event's version.
        stream_version: u64,
    },
    /// Versions are not consecutive: an event was deleted, inserted or reordered.
    #[error("stream {stream_id}: expected version {expected_version}, found {found_version}")]
    VersionGap {
        /// The stream.
        stream_id: StreamId,
        /// The version that should come next.
        expected_version: u64,
        /// The version found instead.
        found_version: u64,
    },
    /// An event of another stream sits among the events of one stream.
    #[error(
        "stream {expected_stream_id}: found an event of stream {found_stream_id} at version {found_version}"
    )]
    StreamMismatch {
        /// The stream being checked.
        expected_stream_id: StreamId,
        /// The stream of the stray event.
        found_stream_id: StreamId,
        /// The stray event's version.
        found_version: u64,
    },
    /// Batch verification refused a batch in which each signature verifies alone (a crafted,
    /// non-canonical signature).
    #[error(
        "a batch of {events} events beginning at {stream_id} version {stream_version} fails batch signature verification"
    )]
    BatchRejected {
        /// The first event's stream.
        stream_id: StreamId,
        /// The first event's version.
        stream_version: u64,
        /// How many events the batch held.
        events: usize,
    },
}

/// A signed manifest (of a backup) does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestSignatureError {
    /// The manifest names a signer the verifier does not trust.
    #[error("the manifest is signed by signer {signer_key_id}, which is not trusted here")]
    UnknownSigner {
        /// The signer named by the manifest.
        signer_key_id: SignerKeyId,
    },
    /// The signature does not verify under the signer's public key.
    #[error("the manifest's signature does not verify under signer {signer_key_id}")]
    BadSignature {
        /// The signer named by the manifest.
        signer_key_id: SignerKeyId,
    },
}

/// A key file or key environment value could not be read, parsed or written.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// Reading or writing the file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file or value is not in the expected format (the reason never quotes key bytes).
    #[error("key file {origin}: {reason}")]
    Malformed {
        /// The file path, or the name of the source for an environment value.
        origin: String,
        /// What is wrong.
        reason: String,
    },
    /// A key file is readable or writable by users other than its owner.
    #[error(
        "key file {path} has mode {mode:o}; it must be accessible by its owner only (chmod 600)"
    )]
    InsecurePermissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The keys parsed but are inconsistent (duplicate or unknown ids).
    #[error("key file {origin}: {source}")]
    Crypto {
        /// The file path, or the name of the source for an environment value.
        origin: String,
        /// The inconsistency.
        #[source]
        source: CryptoError,
    },
}
