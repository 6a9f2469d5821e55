//! [`chartlog_crypto::KeyStore`] over the `chartlog_data_keys` table, for both dialects.
//!
//! The table sits beside the events, never inside them: destroying a row's wrapped key is
//! the whole of crypto-erasure, and the log is untouched. The SQL is written once, with
//! `$n` placeholders in first-use order (SQLite numbers them by appearance), and
//! instantiated per backend by [`key_store_backend`].

use chartlog_crypto::KeyStoreError;

pub(crate) fn backend_error(error: sqlx::Error) -> KeyStoreError {
    KeyStoreError::new(format!("data-key table: {error}"))
}

macro_rules! key_store_backend {
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

            fn record_from_row(
                row: &<<$pool as $crate::keys::PoolDatabase>::Db as sqlx::Database>::Row,
            ) -> Result<chartlog_crypto::DataKeyRecord, chartlog_crypto::KeyStoreError> {
                use sqlx::Row as _;
                let corrupt = |what: &str| {
                    chartlog_crypto::KeyStoreError::new(format!("data-key table: malformed {what}"))
                };
                let key_id: uuid::Uuid = row.try_get("key_id").map_err($crate::keys::backend_error)?;
                let key_id = chartlog_crypto::DataKeyId::from_uuid(key_id);
                let wrapped: Option<Vec<u8>> =
                    row.try_get("wrapped_key").map_err($crate::keys::backend_error)?;
                let kek_id: Option<String> = row.try_get("kek_id").map_err($crate::keys::backend_error)?;
                let destroyed_at: Option<i64> =
                    row.try_get("destroyed_at_us").map_err($crate::keys::backend_error)?;
                match (wrapped, kek_id, destroyed_at) {
                    (Some(wrapped), Some(kek_id), None) => Ok(chartlog_crypto::DataKeyRecord::Active(
                        chartlog_crypto::WrappedDataKey {
                            key_id,
                            kek_id: chartlog_crypto::KekId::parse(&kek_id)
                                .map_err(|_| corrupt("KEK id"))?,
                            wrapped,
                        },
                    )),
                    (None, None, Some(at)) => Ok(chartlog_crypto::DataKeyRecord::Destroyed {
                        key_id,
                        destroyed_at: chartlog_domain::Timestamp::from_unix_micros(at)
                            .map_err(|_| corrupt("destruction time"))?,
                    }),
                    _ => Err(corrupt("row state")),
                }
            }
        }

        #[async_trait::async_trait]
        impl chartlog_crypto::KeyStore for $name {
            async fn insert(
                &self,
                owner: &chartlog_domain::StreamId,
                key: &chartlog_crypto::WrappedDataKey,
            ) -> Result<chartlog_crypto::KeyInsert, chartlog_crypto::KeyStoreError> {
                let inserted = sqlx::query(
                    "INSERT INTO chartlog_data_keys \
                     (owner_stream_id, key_id, kek_id, wrapped_key, created_at_us) \
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (owner_stream_id) DO NOTHING",
                )
                .bind(owner.as_str())
                .bind(key.key_id.as_uuid())
                .bind(key.kek_id.as_str())
                .bind(key.wrapped.as_slice())
                .bind($crate::keys::now_unix_micros())
                .execute(&self.pool)
                .await
                .map_err($crate::keys::backend_error)?
                .rows_affected();
                if inserted == 1 {
                    return Ok(chartlog_crypto::KeyInsert::Inserted);
                }
                match self.fetch(owner).await? {
                    Some(existing) => Ok(chartlog_crypto::KeyInsert::Existing(existing)),
                    None => Err(chartlog_crypto::KeyStoreError::new(
                        "data-key table: insert neither stored nor found a key".to_owned(),
                    )),
                }
            }

            async fn fetch(
                &self,
                owner: &chartlog_domain::StreamId,
            ) -> Result<Option<chartlog_crypto::DataKeyRecord>, chartlog_crypto::KeyStoreError> {
                let row = sqlx::query(
                    "SELECT key_id, kek_id, wrapped_key, destroyed_at_us \
                     FROM chartlog_data_keys WHERE owner_stream_id = $1",
                )
                .bind(owner.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err($crate::keys::backend_error)?;
                row.as_ref().map(Self::record_from_row).transpose()
            }

            async fn destroy(
                &self,
                owner: &chartlog_domain::StreamId,
                at: chartlog_domain::Timestamp,
            ) -> Result<Option<chartlog_crypto::DataKeyId>, chartlog_crypto::KeyStoreError> {
                sqlx::query(
                    "UPDATE chartlog_data_keys \
                     SET wrapped_key = NULL, kek_id = NULL, destroyed_at_us = $1 \
                     WHERE owner_stream_id = $2 AND wrapped_key IS NOT NULL",
                )
                .bind(at.unix_micros())
                .bind(owner.as_str())
                .execute(&self.pool)
                .await
                .map_err($crate::keys::backend_error)?;
                Ok(match self.fetch(owner).await? {
                    Some(chartlog_crypto::DataKeyRecord::Destroyed { key_id, .. }) => Some(key_id),
                    Some(chartlog_crypto::DataKeyRecord::Active(_)) => {
                        return Err(chartlog_crypto::KeyStoreError::new(
                            "data-key table: key still active after destroy".to_owned(),
                        ));
                    }
                    None => None,
                })
            }

            async fn list_for_rewrap(
                &self,
                active: &chartlog_crypto::KekId,
                limit: u32,
            ) -> Result<
                Vec<(chartlog_domain::StreamId, chartlog_crypto::WrappedDataKey)>,
                chartlog_crypto::KeyStoreError,
            > {
                use sqlx::Row as _;
                let rows = sqlx::query(
                    "SELECT owner_stream_id, key_id, kek_id, wrapped_key, destroyed_at_us \
                     FROM chartlog_data_keys WHERE wrapped_key IS NOT NULL AND kek_id <> $1 \
                     ORDER BY owner_stream_id LIMIT $2",
                )
                .bind(active.as_str())
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await
                .map_err($crate::keys::backend_error)?;
                let mut keys = Vec::with_capacity(rows.len());
                for row in &rows {
                    let owner: String =
                        row.try_get("owner_stream_id").map_err($crate::keys::backend_error)?;
                    let owner = chartlog_domain::StreamId::parse(&owner).map_err(|_| {
                        chartlog_crypto::KeyStoreError::new(
                            "data-key table: malformed owner".to_owned(),
                        )
                    })?;
                    if let chartlog_crypto::DataKeyRecord::Active(wrapped) =
                        Self::record_from_row(row)?
                    {
                        keys.push((owner, wrapped));
                    }
                }
                Ok(keys)
            }

            async fn replace_wrapping(
                &self,
                owner: &chartlog_domain::StreamId,
                expected: &chartlog_crypto::WrappedDataKey,
                replacement: &chartlog_crypto::WrappedDataKey,
            ) -> Result<bool, chartlog_crypto::KeyStoreError> {
                assert_eq!(expected.key_id, replacement.key_id, "re-wrapping keeps the key id");
                let replaced = sqlx::query(
                    "UPDATE chartlog_data_keys SET kek_id = $1, wrapped_key = $2 \
                     WHERE owner_stream_id = $3 AND key_id = $4 AND kek_id = $5 AND wrapped_key = $6",
                )
                .bind(replacement.kek_id.as_str())
                .bind(replacement.wrapped.as_slice())
                .bind(owner.as_str())
                .bind(expected.key_id.as_uuid())
                .bind(expected.kek_id.as_str())
                .bind(expected.wrapped.as_slice())
                .execute(&self.pool)
                .await
                .map_err($crate::keys::backend_error)?
                .rows_affected();
                Ok(replaced == 1)
            }
        }
    };
}

pub(crate) use key_store_backend;

/// When a key row is created: bookkeeping only, never part of any signature.
pub(crate) fn now_unix_micros() -> i64 {
    let micros = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000;
    i64::try_from(micros).unwrap_or(i64::MAX)
}

/// Names a pool's database type inside [`key_store_backend`].
pub(crate) trait PoolDatabase {
    type Db: sqlx::Database;
}

impl<DB: sqlx::Database> PoolDatabase for sqlx::Pool<DB> {
    type Db = DB;
}
