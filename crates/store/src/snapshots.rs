//! Where decision-state snapshots are kept: one row per stream in `chartlog_snapshots`, beside
//! the log, for both dialects.
//!
//! The store keeps sealed bytes and the facts that bind them (stream, version, head hash,
//! schema version, data key); it never sees a key or a plaintext state. Sealing, opening and
//! the decision of whether a snapshot can be trusted belong to [`crate::PatientLedger`].

use async_trait::async_trait;
use chartlog_crypto::{DataKeyId, EventHash};
use chartlog_domain::StreamId;

use crate::StoreError;

/// A sealed decision state, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSnapshot {
    /// The version of the last event folded into the state.
    pub stream_version: u64,
    /// That event's hash: a snapshot is only used while the log still holds this event.
    pub head_hash: EventHash,
    /// [`chartlog_domain::patient::DECISION_STATE_SCHEMA_VERSION`] at the time it was taken.
    pub schema_version: u32,
    /// The data key it is sealed under.
    pub data_key_id: DataKeyId,
    pub sealed: Vec<u8>,
}

/// The latest snapshot of each stream.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// The stream's snapshot, if one was taken.
    async fn latest(&self, stream: &StreamId) -> Result<Option<StoredSnapshot>, StoreError>;

    /// Keeps `snapshot` unless the stored one is of a later version with the same schema
    /// version: racing writers leave the newest behind, and a schema change replaces it.
    async fn save(&self, stream: &StreamId, snapshot: &StoredSnapshot) -> Result<(), StoreError>;

    /// Forgets the stream's snapshot (after an erasure, or when it cannot be used).
    async fn discard(&self, stream: &StreamId) -> Result<(), StoreError>;
}

/// [`SnapshotStore`] over `chartlog_snapshots`. The SQL is written once, with `$n`
/// placeholders in first-use order, and instantiated per backend.
macro_rules! snapshot_store_backend {
    ($name:ident, $pool:ty, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone)]
        pub struct $name {
            pool: $pool,
        }

        impl $name {
            pub fn new(pool: $pool) -> Self {
                Self { pool }
            }
        }

        #[async_trait::async_trait]
        impl $crate::snapshots::SnapshotStore for $name {
            async fn latest(
                &self,
                stream: &chartlog_domain::StreamId,
            ) -> Result<Option<$crate::snapshots::StoredSnapshot>, $crate::StoreError> {
                use sqlx::Row as _;
                let row = sqlx::query(
                    "SELECT stream_version, head_hash, schema_version, data_key_id, sealed \
                     FROM chartlog_snapshots WHERE stream_id = $1",
                )
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await?;
                let Some(row) = row else { return Ok(None) };
                let corrupt = |reason: &str| $crate::StoreError::CorruptSnapshot {
                    stream: stream.clone(),
                    reason: reason.to_owned(),
                };
                let version: i64 = row.try_get("stream_version")?;
                let head_hash: Vec<u8> = row.try_get("head_hash")?;
                let schema_version: i32 = row.try_get("schema_version")?;
                let data_key_id: uuid::Uuid = row.try_get("data_key_id")?;
                Ok(Some($crate::snapshots::StoredSnapshot {
                    stream_version: u64::try_from(version)
                        .map_err(|_| corrupt("negative version"))?,
                    head_hash: chartlog_crypto::EventHash::from_slice(&head_hash)
                        .map_err(|_| corrupt("head hash is not 32 bytes"))?,
                    schema_version: u32::try_from(schema_version)
                        .map_err(|_| corrupt("negative schema version"))?,
                    data_key_id: chartlog_crypto::DataKeyId::from_uuid(data_key_id),
                    sealed: row.try_get("sealed")?,
                }))
            }

            async fn save(
                &self,
                stream: &chartlog_domain::StreamId,
                snapshot: &$crate::snapshots::StoredSnapshot,
            ) -> Result<(), $crate::StoreError> {
                let version = i64::try_from(snapshot.stream_version).map_err(|_| {
                    $crate::StoreError::CorruptSnapshot {
                        stream: stream.clone(),
                        reason: "version out of range".to_owned(),
                    }
                })?;
                let schema_version = i32::try_from(snapshot.schema_version).map_err(|_| {
                    $crate::StoreError::CorruptSnapshot {
                        stream: stream.clone(),
                        reason: "schema version out of range".to_owned(),
                    }
                })?;
                sqlx::query(
                    "INSERT INTO chartlog_snapshots (stream_id, stream_version, head_hash, \
                     schema_version, data_key_id, sealed, taken_at_us) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7) \
                     ON CONFLICT (stream_id) DO UPDATE SET \
                     stream_version = excluded.stream_version, head_hash = excluded.head_hash, \
                     schema_version = excluded.schema_version, \
                     data_key_id = excluded.data_key_id, sealed = excluded.sealed, \
                     taken_at_us = excluded.taken_at_us \
                     WHERE chartlog_snapshots.stream_version < excluded.stream_version \
                     OR chartlog_snapshots.schema_version <> excluded.schema_version",
                )
                .bind(stream.as_str())
                .bind(version)
                .bind(snapshot.head_hash.as_bytes().as_slice())
                .bind(schema_version)
                .bind(snapshot.data_key_id.as_uuid())
                .bind(snapshot.sealed.as_slice())
                .bind($crate::keys::now_unix_micros())
                .execute(&self.pool)
                .await?;
                Ok(())
            }

            async fn discard(
                &self,
                stream: &chartlog_domain::StreamId,
            ) -> Result<(), $crate::StoreError> {
                sqlx::query("DELETE FROM chartlog_snapshots WHERE stream_id = $1")
                    .bind(stream.as_str())
                    .execute(&self.pool)
                    .await?;
                Ok(())
            }
        }
    };
}

pub(crate) use snapshot_store_backend;
