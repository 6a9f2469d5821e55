//! Where wrapped data keys live: a table apart from the events, behind [`KeyStore`].

use async_trait::async_trait;
use chartlog_domain::{StreamId, Timestamp};

use crate::ids::{DataKeyId, KekId};
use crate::key_ring::WrappedDataKey;

/// One owner's row of the key table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataKeyRecord {
    /// The key exists, wrapped under a KEK.
    Active(WrappedDataKey),
    /// The key was destroyed (crypto-erasure); only this tombstone remains, for good.
    Destroyed {
        /// The destroyed key's id.
        key_id: DataKeyId,
        /// When it was destroyed.
        destroyed_at: Timestamp,
    },
}

/// The outcome of [`KeyStore::insert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyInsert {
    /// The key is now the owner's key.
    Inserted,
    /// The owner already had a key (or a tombstone): this one was not stored.
    Existing(DataKeyRecord),
}

/// A key table backend failed. Implementers stringify their backend's error; the message must
/// name no key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key store: {message}")]
pub struct KeyStoreError {
    message: String,
}

impl KeyStoreError {
    /// An error with this message.
    pub fn new(message: String) -> Self {
        Self { message }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// The key table: at most one data key per owner for its whole life, stored only wrapped.
///
/// Promises every implementation keeps (the store crate's conformance suite checks them):
/// - an owner never has two keys: of racing inserts one wins, the others get `Existing` with
///   the winner's record;
/// - destruction removes the wrapped bytes for good, keeps a tombstone, is idempotent, and an
///   owner with a tombstone never gets a key again (`insert` returns `Existing(Destroyed)`);
/// - re-wrapping is a compare-and-swap, so it never resurrects a destroyed key nor overwrites a
///   concurrent change.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Stores `key` as the owner's key unless the owner has a key or a tombstone already.
    async fn insert(
        &self,
        owner: &StreamId,
        key: &WrappedDataKey,
    ) -> Result<KeyInsert, KeyStoreError>;

    /// The owner's key or tombstone, if any.
    async fn fetch(&self, owner: &StreamId) -> Result<Option<DataKeyRecord>, KeyStoreError>;

    /// Checks, before an erasure of `owner` is recorded anywhere, that [`KeyStore::destroy`]
    /// will not be refused for a reason this store can see now (a ledger it must write first
    /// that cannot be written). An erasure stores its tombstone event first and destroys the
    /// key after it; a destruction refused then leaves the tombstone with a live key, so the
    /// erasure is refused here instead, before anything is stored. Changes nothing. Default:
    /// nothing to check.
    async fn prepare_destroy(&self, _owner: &StreamId) -> Result<(), KeyStoreError> {
        Ok(())
    }

    /// Destroys the owner's key at `at`, keeping a tombstone. Returns the destroyed key's id
    /// (also when it was destroyed before), `None` if the owner never had a key.
    async fn destroy(
        &self,
        owner: &StreamId,
        at: Timestamp,
    ) -> Result<Option<DataKeyId>, KeyStoreError>;

    /// Up to `limit` active keys not wrapped under `active`, in a stable order.
    async fn list_for_rewrap(
        &self,
        active: &KekId,
        limit: u32,
    ) -> Result<Vec<(StreamId, WrappedDataKey)>, KeyStoreError>;

    /// Replaces the owner's wrapping if it still equals `expected` (KEK id and bytes). Returns
    /// false if it changed or was destroyed meanwhile.
    async fn replace_wrapping(
        &self,
        owner: &StreamId,
        expected: &WrappedDataKey,
        replacement: &WrappedDataKey,
    ) -> Result<bool, KeyStoreError>;
}
