//! Fixtures: headers, an in-memory [`KeyStore`] (tests only: the real ones live in the store
//! crate), and temporary directories.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chartlog_crypto::{
    DataKey, DataKeyId, DataKeyRecord, EventHash, EventHeader, EventSigner, KekId, KeyInsert,
    KeyStore, KeyStoreError, SealedEvent, SignerKeyId, WrappedDataKey, seal_event,
};
use chartlog_domain::{Actor, EventId, PatientId, PurposeOfUse, Role, StreamId, Timestamp, UserId};
use uuid::Uuid;

pub fn patient_stream(n: u128) -> StreamId {
    StreamId::patient(PatientId::from_uuid(Uuid::from_u128(n)))
}

pub fn signer(id: &str) -> EventSigner {
    EventSigner::generate(SignerKeyId::parse(id).unwrap())
}

pub fn header(
    signer: &EventSigner,
    stream_id: &StreamId,
    stream_version: u64,
    key_id: DataKeyId,
    prev_hash: EventHash,
) -> EventHeader {
    EventHeader {
        stream_id: stream_id.clone(),
        stream_version,
        event_id: EventId::from_uuid(Uuid::now_v7()),
        event_type: "observation_recorded".to_owned(),
        schema_version: 1,
        recorded_at: Timestamp::from_unix_micros(1_800_000_000_000_000 + stream_version as i64)
            .unwrap(),
        actor: Actor {
            user_id: UserId::from_uuid(Uuid::from_u128(77)),
            role: Role::Physician,
            purpose_of_use: PurposeOfUse::Treatment,
            break_glass: false,
        },
        key_id,
        prev_hash,
        signer_key_id: signer.key_id().clone(),
    }
}

/// `count` chained events of one stream from version 1, payload `event-<version>`.
pub fn stream_events(
    signer: &EventSigner,
    key: &DataKey,
    key_id: DataKeyId,
    stream_id: &StreamId,
    count: u64,
) -> Vec<SealedEvent> {
    let mut prev = EventHash::GENESIS;
    (1..=count)
        .map(|version| {
            let header = header(signer, stream_id, version, key_id, prev);
            let event = seal_event(signer, key, header, format!("event-{version}").as_bytes());
            prev = event.hash;
            event
        })
        .collect()
}

#[derive(Default)]
struct Rows {
    by_owner: BTreeMap<StreamId, DataKeyRecord>,
}

/// A [`KeyStore`] in memory, with the promises of the trait, and an optional budget of
/// successful re-wrappings after which `replace_wrapping` fails (to interrupt a rotation).
#[derive(Clone, Default)]
pub struct MemoryKeyStore {
    rows: Arc<Mutex<Rows>>,
    replace_budget: Arc<Mutex<Option<usize>>>,
    replacements: Arc<AtomicUsize>,
}

impl MemoryKeyStore {
    pub fn fail_replacements_after(&self, budget: Option<usize>) {
        *self.replace_budget.lock().unwrap() = budget;
    }

    pub fn wrapped_under(&self, kek_id: &KekId) -> usize {
        self.rows
            .lock()
            .unwrap()
            .by_owner
            .values()
            .filter(|record| matches!(record, DataKeyRecord::Active(w) if w.kek_id == *kek_id))
            .count()
    }
}

#[async_trait]
impl KeyStore for MemoryKeyStore {
    async fn insert(
        &self,
        owner: &StreamId,
        key: &WrappedDataKey,
    ) -> Result<KeyInsert, KeyStoreError> {
        tokio::task::yield_now().await;
        let mut rows = self.rows.lock().unwrap();
        if let Some(existing) = rows.by_owner.get(owner) {
            return Ok(KeyInsert::Existing(existing.clone()));
        }
        rows.by_owner
            .insert(owner.clone(), DataKeyRecord::Active(key.clone()));
        Ok(KeyInsert::Inserted)
    }

    async fn fetch(&self, owner: &StreamId) -> Result<Option<DataKeyRecord>, KeyStoreError> {
        tokio::task::yield_now().await;
        Ok(self.rows.lock().unwrap().by_owner.get(owner).cloned())
    }

    async fn destroy(
        &self,
        owner: &StreamId,
        at: Timestamp,
    ) -> Result<Option<DataKeyId>, KeyStoreError> {
        let mut rows = self.rows.lock().unwrap();
        let Some(record) = rows.by_owner.get_mut(owner) else {
            return Ok(None);
        };
        let key_id = match record {
            DataKeyRecord::Active(wrapped) => wrapped.key_id,
            DataKeyRecord::Destroyed { key_id, .. } => return Ok(Some(*key_id)),
        };
        *record = DataKeyRecord::Destroyed {
            key_id,
            destroyed_at: at,
        };
        Ok(Some(key_id))
    }

    async fn list_for_rewrap(
        &self,
        active: &KekId,
        limit: u32,
    ) -> Result<Vec<(StreamId, WrappedDataKey)>, KeyStoreError> {
        let rows = self.rows.lock().unwrap();
        Ok(rows
            .by_owner
            .iter()
            .filter_map(|(owner, record)| match record {
                DataKeyRecord::Active(wrapped) if wrapped.kek_id != *active => {
                    Some((owner.clone(), wrapped.clone()))
                }
                _ => None,
            })
            .take(limit as usize)
            .collect())
    }

    async fn replace_wrapping(
        &self,
        owner: &StreamId,
        expected: &WrappedDataKey,
        replacement: &WrappedDataKey,
    ) -> Result<bool, KeyStoreError> {
        let budget = *self.replace_budget.lock().unwrap();
        if budget.is_some_and(|budget| self.replacements.load(Ordering::SeqCst) >= budget) {
            return Err(KeyStoreError::new("injected failure".to_owned()));
        }
        let mut rows = self.rows.lock().unwrap();
        match rows.by_owner.get_mut(owner) {
            Some(record @ DataKeyRecord::Active(_))
                if *record == DataKeyRecord::Active(expected.clone()) =>
            {
                *record = DataKeyRecord::Active(replacement.clone());
                self.replacements.fetch_add(1, Ordering::SeqCst);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
}

/// A fresh directory under the system temporary directory, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let path = std::env::temp_dir().join(format!("chartlog-crypto-test-{}", Uuid::new_v4()));
        std::fs::create_dir(&path).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
