//! The embedded backend: one SQLite file in WAL mode with `synchronous=FULL`, so an event is
//! on disk before its append returns and survives power loss.
//!
//! SQLite has one writer at a time. Appends take an in-process lock and `BEGIN IMMEDIATE`, so
//! they never fail on a read-to-write upgrade, and positions commit in order: the global log
//! cannot have a late commit below a position already read. The lock is the database's
//! ([`write_lock`]), shared with the projections' write transactions in this process, so
//! writers queue in order here instead of in SQLite's busy handler.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chartlog_crypto::SealedEvent;
use chartlog_domain::StreamId;
use sqlx::AssertSqlSafe;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use tokio::sync::{Mutex, watch};

crate::keys::key_store_backend!(
    SqliteKeyStore,
    SqlitePool,
    "[`chartlog_crypto::KeyStore`] over the SQLite data-key table."
);

crate::snapshots::snapshot_store_backend!(
    SqliteSnapshotStore,
    SqlitePool,
    "[`crate::SnapshotStore`] over the SQLite snapshot table."
);

mod log_reader;

use log_reader::{LogRead, LogReader};

use crate::row::{
    EVENT_COLUMNS, EventRow, conflict_error, head_from_row, idempotent_outcome, to_i64, to_u64,
};
use crate::{AppendOutcome, EventStore, RecordedEvent, StoreError, StreamHead, check_append_batch};

/// The SQLite schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// How long a connection waits for another process's write lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// Events per INSERT statement: 16 columns each, so 256 parameters, below the point where
/// the driver's per-statement binding cost starts to dominate.
const INSERT_ROWS_PER_STATEMENT: usize = 16;
/// Connections in the pool: readers run in parallel under WAL; writers queue on one lock.
pub const CONNECTIONS_MAX: u32 = 8;

/// Connection settings chartlog relies on: WAL, full fsync on commit, foreign keys, and
/// `secure_delete` so a destroyed data key's bytes are overwritten in the file, not just
/// unlinked from the b-tree.
pub fn connect_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(BUSY_TIMEOUT)
        .pragma("secure_delete", "ON")
}

/// Opens (creating if needed) and migrates a chartlog SQLite database.
pub async fn open_pool(path: &Path) -> Result<SqlitePool, StoreError> {
    let pool = SqlitePoolOptions::new()
        .max_connections(CONNECTIONS_MAX)
        .connect_with(connect_options(path))
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// The in-process write lock of the SQLite database behind `pool`: one per database file in
/// this process, taken by appends and by the projections' write transactions
/// (`chartlog_projections::ProjectionDb::begin`) before `BEGIN IMMEDIATE`.
///
/// Why not leave the queueing to SQLite: a connection that finds the write lock taken waits in
/// SQLite's busy handler, which sleeps with growing back-off (1, 2, 5, 10, ... up to 100 ms a
/// try) and does not wake when the lock comes free. An append that arrived while a projection
/// batch was being written could sleep tens of milliseconds past its commit, and every append
/// queued behind it on this lock with it: the tail of the HTTP command latency on SQLite.
/// Behind one lock a writer starts the moment the previous one commits. Another process
/// writing the same file still meets the busy handler, as before.
///
/// A database that is not a file (in memory) gets a lock of its own on each call.
pub fn write_lock(pool: &SqlitePool) -> Arc<Mutex<()>> {
    static LOCKS: std::sync::Mutex<Vec<(PathBuf, Weak<Mutex<()>>)>> =
        std::sync::Mutex::new(Vec::new());
    let options = pool.connect_options();
    let file = options.get_filename();
    let Ok(file) = file.canonicalize() else {
        return Arc::new(Mutex::new(()));
    };
    // A poisoned registry only means another thread panicked while holding it; the list
    // itself is always whole.
    let mut locks = LOCKS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    locks.retain(|(_, lock)| lock.strong_count() > 0);
    if let Some(lock) = locks
        .iter()
        .find(|(path, _)| *path == file)
        .and_then(|(_, lock)| lock.upgrade())
    {
        return lock;
    }
    let lock = Arc::new(Mutex::new(()));
    locks.push((file, Arc::downgrade(&lock)));
    lock
}

/// [`EventStore`] over SQLite.
#[derive(Clone)]
pub struct SqliteEventStore {
    pool: SqlitePool,
    write_lock: Arc<Mutex<()>>,
    appended: Arc<watch::Sender<u64>>,
    /// Reads of the log, off sqlx (see [`log_reader`]); `None` for a database that is not a
    /// file another connection can open, which sqlx reads instead.
    log_reader: Option<Arc<LogReader>>,
}

impl SqliteEventStore {
    /// Opens the database file at `path`, creating and migrating it as needed.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Ok(Self::from_pool(open_pool(path).await?))
    }

    /// Wraps a pool opened with [`connect_options`] and migrated with [`MIGRATOR`].
    pub fn from_pool(pool: SqlitePool) -> Self {
        let (appended, _) = watch::channel(0);
        let options = pool.connect_options();
        let file = options.get_filename();
        let log_reader = (file.is_file()).then(|| Arc::new(LogReader::new(file)));
        let write_lock = write_lock(&pool);
        Self {
            pool,
            write_lock,
            appended: Arc::new(appended),
            log_reader,
        }
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    async fn events_by_id(&self, events: &[SealedEvent]) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut stored = Vec::new();
        for event in events {
            let row: Option<EventRow> = sqlx::query_as(AssertSqlSafe(format!(
                "SELECT {EVENT_COLUMNS} FROM chartlog_events WHERE event_id = ?1"
            )))
            .bind(event.header.event_id.as_uuid())
            .fetch_optional(&self.pool)
            .await?;
            if let Some(row) = row {
                stored.push(row.into_recorded()?);
            }
        }
        Ok(stored)
    }

    async fn append_locked(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> Result<Result<AppendOutcome, Option<u64>>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let head =
            sqlx::query("SELECT version, head_hash FROM chartlog_streams WHERE stream_id = ?1")
                .bind(stream.as_str())
                .fetch_optional(&mut *tx)
                .await?;
        let head = head.map(|row| head_from_row(stream, &row)).transpose()?;
        let first_prev = events[0].header.prev_hash;
        let matches = match head {
            None => expected_version == 0,
            Some(head) => head.version == expected_version && head.hash == first_prev,
        };
        if !matches {
            return Ok(Err(head.map(|h| h.version)));
        }

        let new_version = expected_version + events.len() as u64;
        let new_head = events[events.len() - 1].hash;
        sqlx::query(
            "INSERT INTO chartlog_streams (stream_id, version, head_hash) VALUES (?1, ?2, ?3) \
             ON CONFLICT (stream_id) DO UPDATE SET version = excluded.version, head_hash = excluded.head_hash",
        )
        .bind(stream.as_str())
        .bind(to_i64(new_version))
        .bind(new_head.as_bytes().as_slice())
        .execute(&mut *tx)
        .await?;

        // Multi-row INSERTs, a few rows each: fewer statements than one per event, and few
        // enough parameters per statement that binding stays cheap.
        let mut positions = Vec::with_capacity(events.len());
        for chunk in events.chunks(INSERT_ROWS_PER_STATEMENT) {
            let mut insert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO chartlog_events (stream_id, stream_version, event_id, event_type, \
                 schema_version, recorded_at_us, actor_user_id, actor_role, purpose_of_use, \
                 break_glass, data_key_id, signer_key_id, prev_hash, hash, signature, ciphertext) ",
            );
            insert.push_values(chunk, |mut row, event| {
                let h = &event.header;
                row.push_bind(stream.as_str())
                    .push_bind(to_i64(h.stream_version))
                    .push_bind(h.event_id.as_uuid())
                    .push_bind(h.event_type.as_str())
                    .push_bind(i64::from(h.schema_version))
                    .push_bind(h.recorded_at.unix_micros())
                    .push_bind(h.actor.user_id.as_uuid())
                    .push_bind(h.actor.role.as_str())
                    .push_bind(h.actor.purpose_of_use.as_str())
                    .push_bind(h.actor.break_glass)
                    .push_bind(h.key_id.as_uuid())
                    .push_bind(h.signer_key_id.as_str())
                    .push_bind(h.prev_hash.as_bytes().as_slice())
                    .push_bind(event.hash.as_bytes().as_slice())
                    .push_bind(event.signature.as_bytes().as_slice())
                    .push_bind(event.ciphertext.as_slice());
            });
            insert.push(" RETURNING position");
            let inserted: Vec<i64> = insert.build_query_scalar().fetch_all(&mut *tx).await?;
            assert_eq!(
                inserted.len(),
                chunk.len(),
                "one position per inserted event"
            );
            for position in inserted {
                positions.push(to_u64(position, "position", 0)?);
            }
        }
        let first_position = positions.iter().copied().min().unwrap_or(0);
        let last_position = positions.iter().copied().max().unwrap_or(0);
        assert_eq!(
            last_position - first_position + 1,
            events.len() as u64,
            "the single writer takes consecutive positions"
        );
        tx.commit().await?;
        Ok(Ok(AppendOutcome {
            stream_version: new_version,
            first_position,
            last_position,
        }))
    }
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}

#[async_trait]
impl EventStore for SqliteEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> Result<AppendOutcome, StoreError> {
        check_append_batch(stream, expected_version, events)?;
        let attempt = {
            let _writer = self.write_lock.lock().await;
            self.append_locked(stream, expected_version, events).await
        };
        let actual = match attempt {
            Ok(Ok(outcome)) => {
                self.appended.send_modify(|tick| *tick += 1);
                return Ok(outcome);
            }
            Ok(Err(actual)) => actual,
            Err(StoreError::Database(error)) if is_unique_violation(&error) => {
                self.stream_head(stream).await?.map(|h| h.version)
            }
            Err(other) => return Err(other),
        };
        if let Some(original) = idempotent_outcome(events, &self.events_by_id(events).await?)? {
            return Ok(original);
        }
        Err(conflict_error(stream, expected_version, actual))
    }

    async fn stream_head(&self, stream: &StreamId) -> Result<Option<StreamHead>, StoreError> {
        let row =
            sqlx::query("SELECT version, head_hash FROM chartlog_streams WHERE stream_id = ?1")
                .bind(stream.as_str())
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| head_from_row(stream, &row)).transpose()
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = i64::from(limit.min(crate::READ_BATCH_MAX));
        if let Some(reader) = &self.log_reader {
            return reader
                .read(LogRead::Stream {
                    stream_id: stream.as_str().to_owned(),
                    from_version: to_i64(from_version),
                    limit,
                })
                .await;
        }
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM chartlog_events \
             WHERE stream_id = ?1 AND stream_version >= ?2 ORDER BY stream_version LIMIT ?3"
        )))
        .bind(stream.as_str())
        .bind(to_i64(from_version))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(EventRow::into_recorded).collect()
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = i64::from(limit.min(crate::READ_BATCH_MAX));
        if let Some(reader) = &self.log_reader {
            return reader
                .read(LogRead::All {
                    after_position: to_i64(after_position),
                    limit,
                })
                .await;
        }
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM chartlog_events \
             WHERE position > ?1 ORDER BY position LIMIT ?2"
        )))
        .bind(to_i64(after_position))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(EventRow::into_recorded).collect()
    }

    fn append_notifications(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}
