//! The data-key service the store uses: find or create an owner's key, cache it briefly,
//! destroy it, and re-wrap every key when the KEK rotates.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use chartlog_domain::{StreamId, Timestamp};

use crate::error::CryptoError;
use crate::ids::{DataKeyId, KekId};
use crate::key_ring::{KeyRing, WrappedDataKey};
use crate::key_store::{DataKeyRecord, KeyInsert, KeyStore, KeyStoreError};
use crate::seal::DataKey;

/// How long an unwrapped data key stays cached. This bounds how long another process that
/// shares the key table can still open an owner's events after this process (or another)
/// destroyed the key; the destroying process forgets it at once.
pub const DATA_KEY_CACHE_TTL: Duration = Duration::from_secs(30);
/// Most unwrapped data keys cached at once.
pub const DATA_KEY_CACHE_ENTRIES_MAX: usize = 10_000;
/// Keys re-wrapped per listing during a KEK rotation.
pub const KEK_ROTATION_BATCH_KEYS: u32 = 256;
const _: () = assert!(DATA_KEY_CACHE_TTL.as_secs() <= 300);
const _: () = assert!(KEK_ROTATION_BATCH_KEYS >= 1);

/// Why no usable data key was returned.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The owner's key was destroyed (crypto-erasure): its events can never be opened again.
    #[error("the data key {key_id} of {owner} was destroyed at {destroyed_at}")]
    Erased {
        /// The owner.
        owner: StreamId,
        /// The destroyed key.
        key_id: DataKeyId,
        /// When it was destroyed.
        destroyed_at: Timestamp,
    },
    /// The owner has no data key (nothing was ever sealed for it).
    #[error("{owner} has no data key")]
    NoKey {
        /// The owner.
        owner: StreamId,
    },
    /// Unwrapping failed (unknown KEK, or a tampered or misplaced wrapped key).
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The key table failed.
    #[error(transparent)]
    Store(#[from] KeyStoreError),
    /// A KEK rotation was given a ring without a KEK of the current ring, which would leave
    /// keys wrapped under it unreadable.
    #[error("the new key ring lacks key-encryption key {kek_id} of the current ring")]
    RotationDropsKek {
        /// The missing KEK.
        kek_id: KekId,
    },
    /// A KEK rotation made no progress: the key table keeps listing keys it refuses to swap.
    #[error("KEK rotation stalled with {remaining} keys the key table lists but does not re-wrap")]
    RotationStalled {
        /// Keys in the stuck batch.
        remaining: usize,
    },
    /// A KEK rotation re-wrapped every key it could, but these did not unwrap under the ring:
    /// they are left as they were, and running the rotation again changes nothing for them.
    #[error(
        "{} data keys do not unwrap under the key ring and were left as they were \
         ({rewrapped} others re-wrapped)",
        unreadable.len()
    )]
    RotationLeftUnreadable {
        /// Keys this run re-wrapped.
        rewrapped: u64,
        /// The keys left, in the key table's order.
        unreadable: Vec<UnreadableKey>,
    },
}

/// A data key a KEK rotation could not unwrap, and left as it was. Ids only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableKey {
    /// Whose key it is.
    pub owner: StreamId,
    /// The data key's id.
    pub key_id: DataKeyId,
    /// The KEK its row names.
    pub kek_id: KekId,
    /// True when that KEK is not in the ring; false when it is and the wrapped bytes do not
    /// unwrap under it (tampered, or moved from another owner).
    pub kek_missing: bool,
}

struct CachedKey {
    key_id: DataKeyId,
    key: Arc<DataKey>,
    cached_at: Instant,
}

#[derive(Default)]
struct Cache {
    entries: HashMap<StreamId, CachedKey>,
    /// Bumped by every destruction; a read that started before a bump does not cache what it
    /// fetched, so a key destroyed meanwhile is never cached again.
    destructions: u64,
}

/// Owners' data keys, over a [`KeyStore`] and a [`KeyRing`], with a short-lived bounded cache.
pub struct DataKeys<S: KeyStore> {
    ring: RwLock<Arc<KeyRing>>,
    store: S,
    cache: Mutex<Cache>,
}

impl<S: KeyStore> DataKeys<S> {
    /// The service over `store`, wrapping new keys under `ring`'s active KEK.
    pub fn new(ring: Arc<KeyRing>, store: S) -> Self {
        Self {
            ring: RwLock::new(ring),
            store,
            cache: Mutex::new(Cache::default()),
        }
    }

    /// The key table.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// The key ring in use.
    pub fn ring(&self) -> Arc<KeyRing> {
        self.ring
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The owner's key, created (generated, wrapped, inserted) if it has none. Of racing
    /// creators, all get the key that won the insert.
    pub async fn key_for_append(
        &self,
        owner: &StreamId,
    ) -> Result<(DataKeyId, Arc<DataKey>), KeyError> {
        if let Some(hit) = self.cached(owner) {
            return Ok(hit);
        }
        let destructions = self.destructions();
        let record = match self.store.fetch(owner).await? {
            Some(record) => record,
            None => {
                let (key_id, key, wrapped) = self.new_key(owner);
                match self.store.insert(owner, &wrapped).await? {
                    KeyInsert::Inserted => {
                        return Ok(self.remember(owner, destructions, key_id, key));
                    }
                    KeyInsert::Existing(record) => record,
                }
            }
        };
        self.unwrap_record(owner, destructions, record)
    }

    /// The owner's key; never creates one.
    pub async fn key_for_read(
        &self,
        owner: &StreamId,
    ) -> Result<(DataKeyId, Arc<DataKey>), KeyError> {
        if let Some(hit) = self.cached(owner) {
            return Ok(hit);
        }
        let destructions = self.destructions();
        match self.store.fetch(owner).await? {
            Some(record) => self.unwrap_record(owner, destructions, record),
            None => Err(KeyError::NoKey {
                owner: owner.clone(),
            }),
        }
    }

    /// Checks that the key table would let the owner's key be destroyed
    /// ([`KeyStore::prepare_destroy`]); call it before recording an erasure. Changes nothing.
    pub async fn prepare_destroy(&self, owner: &StreamId) -> Result<(), KeyError> {
        Ok(self.store.prepare_destroy(owner).await?)
    }

    /// Destroys the owner's key for good (crypto-erasure) and forgets any cached copy at once.
    /// Idempotent. Returns the destroyed key's id, `None` if the owner never had a key.
    pub async fn destroy(
        &self,
        owner: &StreamId,
        at: Timestamp,
    ) -> Result<Option<DataKeyId>, KeyError> {
        self.forget(owner);
        let destroyed = self.store.destroy(owner, at).await?;
        // Again: a read that raced the destruction may have cached the key in between.
        self.forget(owner);
        Ok(destroyed)
    }

    /// Forgets the cached key of `owner` (for example when another process reports an erasure).
    pub fn invalidate(&self, owner: &StreamId) {
        self.forget(owner);
    }

    /// Forgets every cached key.
    pub fn invalidate_all(&self) {
        let mut cache = self.lock_cache();
        cache.destructions += 1;
        cache.entries.clear();
    }

    /// Makes `ring` the key ring, then re-wraps every data key not yet under its active KEK,
    /// in batches, by compare-and-swap. Events are never touched. Resumable: if interrupted,
    /// run it again. Returns how many keys this run re-wrapped.
    ///
    /// A key that does not unwrap under `ring` (its KEK is missing, or its wrapped bytes were
    /// altered) is left as it is and the rotation goes on with the others: stopping at it
    /// would leave every key listed after it under the old KEK, run after run. Such keys are
    /// returned in [`KeyError::RotationLeftUnreadable`], once every other key is re-wrapped.
    ///
    /// `ring` must hold every KEK of the current ring (retire old KEKs only after a completed
    /// rotation). A key created under the old KEK by an append racing the ring swap may stay
    /// under it: a second run (which should return 0) confirms completion.
    pub async fn rotate_kek(&self, ring: Arc<KeyRing>) -> Result<u64, KeyError> {
        let current = self.ring();
        if let Some(kek_id) = current.kek_ids().into_iter().find(|id| !ring.contains(id)) {
            return Err(KeyError::RotationDropsKek { kek_id });
        }
        *self.ring.write().unwrap_or_else(PoisonError::into_inner) = ring.clone();
        let active = ring.active_kek_id().clone();
        let mut rewrapped: u64 = 0;
        let mut unreadable: Vec<UnreadableKey> = Vec::new();
        let mut skipped: HashSet<StreamId> = HashSet::new();
        let mut idle_batch: Option<Vec<(StreamId, WrappedDataKey)>> = None;
        loop {
            // The keys skipped stay in the listing (they are still under an older KEK), so
            // each listing asks for that many more: a batch never shrinks to nothing but
            // skipped keys while others wait behind them. The cost, a re-read of the skipped
            // keys per batch, is paid only by a table with keys this ring cannot open.
            let limit = u32::try_from(skipped.len())
                .unwrap_or(u32::MAX)
                .saturating_add(KEK_ROTATION_BATCH_KEYS);
            let batch: Vec<(StreamId, WrappedDataKey)> = self
                .store
                .list_for_rewrap(&active, limit)
                .await?
                .into_iter()
                .filter(|(owner, _)| !skipped.contains(owner))
                .collect();
            if batch.is_empty() {
                if unreadable.is_empty() {
                    return Ok(rewrapped);
                }
                return Err(KeyError::RotationLeftUnreadable {
                    rewrapped,
                    unreadable,
                });
            }
            if idle_batch.as_ref() == Some(&batch) {
                return Err(KeyError::RotationStalled {
                    remaining: batch.len(),
                });
            }
            let mut replaced: u64 = 0;
            let mut newly_skipped = false;
            for (owner, wrapped) in &batch {
                let key = match ring.unwrap(owner, wrapped) {
                    Ok(key) => key,
                    Err(_) => {
                        skipped.insert(owner.clone());
                        unreadable.push(UnreadableKey {
                            owner: owner.clone(),
                            key_id: wrapped.key_id,
                            kek_id: wrapped.kek_id.clone(),
                            kek_missing: !ring.contains(&wrapped.kek_id),
                        });
                        newly_skipped = true;
                        continue;
                    }
                };
                let replacement = ring.wrap(owner, wrapped.key_id, &key);
                if self
                    .store
                    .replace_wrapping(owner, wrapped, &replacement)
                    .await?
                {
                    replaced += 1;
                }
            }
            rewrapped += replaced;
            idle_batch = (replaced == 0 && !newly_skipped).then_some(batch);
        }
    }

    fn new_key(&self, owner: &StreamId) -> (DataKeyId, Arc<DataKey>, WrappedDataKey) {
        let key = DataKey::generate();
        let key_id = DataKeyId::generate();
        let wrapped = self.ring().wrap(owner, key_id, &key);
        (key_id, Arc::new(key), wrapped)
    }

    fn unwrap_record(
        &self,
        owner: &StreamId,
        destructions: u64,
        record: DataKeyRecord,
    ) -> Result<(DataKeyId, Arc<DataKey>), KeyError> {
        match record {
            DataKeyRecord::Active(wrapped) => {
                let key = self.ring().unwrap(owner, &wrapped)?;
                Ok(self.remember(owner, destructions, wrapped.key_id, Arc::new(key)))
            }
            DataKeyRecord::Destroyed {
                key_id,
                destroyed_at,
            } => Err(KeyError::Erased {
                owner: owner.clone(),
                key_id,
                destroyed_at,
            }),
        }
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        // The cache holds no invariant a panic could break halfway.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn destructions(&self) -> u64 {
        self.lock_cache().destructions
    }

    fn cached(&self, owner: &StreamId) -> Option<(DataKeyId, Arc<DataKey>)> {
        let mut cache = self.lock_cache();
        let entry = cache.entries.get(owner)?;
        if entry.cached_at.elapsed() < DATA_KEY_CACHE_TTL {
            return Some((entry.key_id, entry.key.clone()));
        }
        cache.entries.remove(owner);
        None
    }

    /// Caches the key unless a destruction happened since the read began; returns it either way.
    fn remember(
        &self,
        owner: &StreamId,
        destructions: u64,
        key_id: DataKeyId,
        key: Arc<DataKey>,
    ) -> (DataKeyId, Arc<DataKey>) {
        let mut cache = self.lock_cache();
        if cache.destructions == destructions {
            if cache.entries.len() >= DATA_KEY_CACHE_ENTRIES_MAX {
                cache
                    .entries
                    .retain(|_, entry| entry.cached_at.elapsed() < DATA_KEY_CACHE_TTL);
            }
            if cache.entries.len() >= DATA_KEY_CACHE_ENTRIES_MAX {
                let oldest = cache
                    .entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.cached_at)
                    .map(|(owner, _)| owner.clone());
                if let Some(oldest) = oldest {
                    cache.entries.remove(&oldest);
                }
            }
            cache.entries.insert(
                owner.clone(),
                CachedKey {
                    key_id,
                    key: key.clone(),
                    cached_at: Instant::now(),
                },
            );
            assert!(cache.entries.len() <= DATA_KEY_CACHE_ENTRIES_MAX);
        }
        (key_id, key)
    }

    fn forget(&self, owner: &StreamId) {
        let mut cache = self.lock_cache();
        cache.destructions += 1;
        cache.entries.remove(owner);
    }
}

impl<S: KeyStore> std::fmt::Debug for DataKeys<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataKeys")
            .field("ring", &self.ring())
            .field("cached_keys", &self.lock_cache().entries.len())
            .finish_non_exhaustive()
    }
}
