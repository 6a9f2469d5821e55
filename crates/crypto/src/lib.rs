//! chartlog-crypto: the key hierarchy, event sealing, signing and hash chains of chartlog.
//!
//! Every event is sealed with AES-256-SIV under its owner's [`DataKey`], with the clear
//! [`EventHeader`] as associated data; hashed with SHA-256 over header and ciphertext, chained
//! through `prev_hash`; and the hash is signed with Ed25519 ([`EventSigner`]). Data keys are
//! stored only wrapped by a key-encryption key of a [`KeyRing`], in a [`KeyStore`] kept apart
//! from the events; destroying the wrapped key is crypto-erasure.
//!
//! **Invariants:**
//! - No cipher, hash or signature scheme of our own: AES-SIV (RFC 5297), SHA-256 and Ed25519
//!   come from the RustCrypto and dalek crates; this crate only composes them, with a distinct
//!   domain-separation tag for each use.
//! - Verification needs no data key: [`SignatureVerifier::verify`] and [`verify_chain`] work on
//!   the clear header and the ciphertext, so an erased patient's stream still verifies.
//! - Secret bytes ([`DataKey`], KEKs, signing keys) live in zeroize-on-drop boxes, are never
//!   `Clone`, `Serialize` or printed by `Debug`, and never appear in an error message.
//! - Header encoding ([`EventHeader::canonical_bytes`]) is injective: fixed-size fields are
//!   written as-is, variable-size fields are length-prefixed, and every field is covered.
//! - Read-model records ([`seal_record`]) are sealed under the owner's data key with a tag of
//!   their own in the associated data, so erasure reaches them as it reaches events, and no
//!   record opens as an event payload or in another row.
//! - No I/O except the key files ([`load_or_create_key_files`], [`load_or_create_mac_key`]);
//!   storage of wrapped data keys is behind the [`KeyStore`] trait, implemented by `chartlog-store`.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod data_keys;
mod digest;
mod error;
mod header;
mod hmac_key;
mod ids;
mod key_files;
mod key_ring;
mod key_store;
mod mac;
mod rng;
mod seal;
mod sign;

pub use data_keys::{
    DATA_KEY_CACHE_ENTRIES_MAX, DATA_KEY_CACHE_TTL, DataKeys, KEK_ROTATION_BATCH_KEYS, KeyError,
    UnreadableKey,
};
pub use digest::ContentDigest;
pub use error::{CryptoError, IdError, IntegrityError, KeyFileError, ManifestSignatureError};
pub use header::{EventHeader, SealedEvent};
pub use hmac_key::{INDEX_KEY_FILE_NAME, load_mac_key, load_or_create_mac_key};
pub use ids::{DataKeyId, EventHash, EventSignature, KekId, SignerKeyId};
pub use key_files::{
    KEK_FILE_NAME, RETIRED_SIGNERS_MAX, SIGNING_FILE_NAME, SigningKeys, load_or_create_kek_ring,
    load_or_create_key_files, load_or_create_signing_keys,
};
/// Key-file I/O for key files defined outside this crate: private modes, atomic creation.
pub use key_files::{load_or_create as load_or_create_key_file, read_private as read_key_file};
pub use key_ring::{KEK_BYTES, KEKS_MAX, KeyRing, WrappedDataKey};
pub use key_store::{DataKeyRecord, KeyInsert, KeyStore, KeyStoreError};
pub use mac::{MAC_BYTES, MAC_KEY_BYTES, MacKey, derive_mac_key, hmac_sha256};
pub use seal::{
    DATA_KEY_BYTES, DataKey, SEAL_OVERHEAD_BYTES, open, open_record, seal, seal_record,
};
pub use sign::{
    EventSigner, SignatureVerifier, VERIFY_BATCH_EVENTS_MAX, event_hash, seal_event, verify_chain,
};
