//! The embedded backend: one SQLite file in WAL mode with `synchronous=FULL`, so an event is
//! on disk before its append returns and survives power loss.
//!
//! SQLite has one writer at a time. Appends take an in-process lock and `BEGIN IMMEDIATE`, so
//! they never fail on a read-to-write upgrade, and positions commit in order: the global log
//! cannot have a late commit below a position already read. The lock is the database's
//! ([`write_lock`]), shared with the projections' write transactions in this process, so
//! writers queue in order here instead of in SQLite's busy handler.
//!
//! Appends that queue behind the lock share a transaction (group commit): the one that gets
//! the lock commits every append queued by then, up to [`GROUP_APPENDS_MAX`] appends and
//! [`GROUP_EVENTS_MAX`] events, with one `BEGIN IMMEDIATE` and one fsync, and answers each as
//! it would have been answered alone. Each append used to be a transaction and an fsync of its
//! own, and under HTTP load that kept the lock busy while a core stood idle
//! (docs/PERFORMANCE.md, "HTTP load").

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use chartlog_crypto::SealedEvent;
use chartlog_domain::StreamId;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::{Mutex, OwnedMutexGuard, oneshot, watch};
use uuid::Uuid;

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
/// The most appends one group commits.
pub const GROUP_APPENDS_MAX: usize = 64;
/// The most events one group commits, summed over its appends (an append carrying more still
/// goes, alone): a group holds the write lock for as long as its statements take.
pub const GROUP_EVENTS_MAX: usize = 1_024;

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
    open_migrated(connect_options(path)).await
}

// No ping before each acquire: an embedded connection cannot be dropped by a server, and the
// ping is a round trip to the connection's worker thread for every statement run on the pool.
async fn open_migrated(options: SqliteConnectOptions) -> Result<SqlitePool, StoreError> {
    let pool = SqlitePoolOptions::new()
        .max_connections(CONNECTIONS_MAX)
        .test_before_acquire(false)
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// The file the SQLite read models live in, next to the log at `log`: `chartlog.db` keeps its
/// read models in `chartlog.read-models.db`.
///
/// Why a file of their own: SQLite has one writer per file, and the projection runner's
/// transactions held the log's write lock about two thirds of the time under HTTP load, so
/// appends waited for projections (docs/PERFORMANCE.md, "HTTP load"). In a file of their own
/// they have a write lock of their own, and their commits need no fsync
/// (`synchronous=NORMAL`): they are derived, so a crash that loses the last of them loses
/// nothing the runner does not fold again from the checkpoint committed with them.
pub fn read_models_path(log: &Path) -> PathBuf {
    log.with_extension("read-models.db")
}

/// Opens the log at `path` and its read models ([`read_models_path`]), creating and migrating
/// both as needed. The read-model file carries the same schema as the log (one migrator serves
/// both); only its read-model tables are written, as only the log file's other tables are.
///
/// Read models found next to a log that did not exist yet were folded from another log (one
/// deleted, or one a restore is about to replace): they are removed, so the runner folds this
/// log from its start rather than trusting checkpoints from elsewhere.
pub async fn open_log_and_read_models(
    path: &Path,
) -> Result<(SqliteEventStore, SqlitePool), StoreError> {
    let read_models = read_models_path(path);
    if !path.exists() {
        for suffix in ["", "-wal", "-shm"] {
            let mut file = read_models.clone().into_os_string();
            file.push(suffix);
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(sqlx::Error::Io(error).into()),
            }
        }
    }
    let store = SqliteEventStore::open(path).await?;
    let pool =
        open_migrated(connect_options(&read_models).synchronous(SqliteSynchronous::Normal)).await?;
    Ok((store, pool))
}

/// The in-process write lock of the SQLite database behind `pool`: one per database file in
/// this process, taken by appends and by the projections' and access control's writes
/// (`chartlog_projections::ProjectionDb::begin` before `BEGIN IMMEDIATE`, and
/// `ProjectionDb::execute`).
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
    /// Appends waiting for the next group, in arrival order.
    queued: Arc<std::sync::Mutex<VecDeque<QueuedAppend>>>,
}

/// An append waiting to be committed with the next group.
struct QueuedAppend {
    stream: StreamId,
    expected_version: u64,
    events: Vec<SealedEvent>,
    reply: oneshot::Sender<GroupAnswer>,
}

/// A stored event's place, or the stream's version when the append was refused.
type Attempt = Result<AppendOutcome, Option<u64>>;

enum GroupAnswer {
    /// What the append got, committed in its group or alone (a group of one).
    Attempted(Result<Attempt, StoreError>),
    /// Its group failed as a whole: the caller appends alone, as if no group had formed.
    AppendAlone,
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
            queued: Arc::default(),
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

    /// Queues the append and waits until a group has answered it, committing the group itself
    /// if it gets the write lock first.
    async fn append_in_group(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> GroupAnswer {
        let (reply, mut answer) = oneshot::channel();
        self.lock_queue().push_back(QueuedAppend {
            stream: stream.clone(),
            expected_version,
            events: events.to_vec(),
            reply,
        });
        let answer = tokio::select! {
            // An answer that is ready wins over a lock that came free at the same moment.
            biased;
            answer = &mut answer => answer,
            writer = Arc::clone(&self.write_lock).lock_owned() => {
                // The group answers other callers too, so it runs as a task of its own that
                // finishes even if this caller goes away (an HTTP client hanging up).
                let store = self.clone();
                let _ = tokio::spawn(async move { store.commit_queued(writer).await }).await;
                answer.await
            }
        };
        // No answer means the committing task died (a panic, or the runtime shutting down)
        // before it answered: whether the group committed is unknown, and appending alone
        // finds out (a stored batch is recognised by its event ids).
        answer.unwrap_or(GroupAnswer::AppendAlone)
    }

    fn lock_queue(&self) -> std::sync::MutexGuard<'_, VecDeque<QueuedAppend>> {
        // A poisoned queue only means a thread panicked while pushing or draining; the
        // deque itself is whole.
        self.queued
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the queued appends, up to the group limits, and commits them, with the write
    /// lock held.
    async fn commit_queued(&self, _writer: OwnedMutexGuard<()>) {
        let group = {
            let mut queued = self.lock_queue();
            let mut group: Vec<QueuedAppend> = Vec::new();
            let mut events = 0;
            while let Some(next) = queued.front() {
                if next.reply.is_closed() {
                    // Its caller gave up before it was committed: as a cancelled append
                    // that never reached the database.
                    queued.pop_front();
                    continue;
                }
                if !group.is_empty()
                    && (group.len() == GROUP_APPENDS_MAX
                        || events + next.events.len() > GROUP_EVENTS_MAX)
                {
                    break;
                }
                events += next.events.len();
                group.extend(queued.pop_front());
            }
            group
        };
        match group.len() {
            0 => {}
            1 => {
                let Some(only) = group.into_iter().next() else {
                    return;
                };
                let attempt = self
                    .append_alone_and_announce(&only.stream, only.expected_version, &only.events)
                    .await;
                let _ = only.reply.send(GroupAnswer::Attempted(attempt));
            }
            _ => match self.commit_group(&group).await {
                Ok(attempts) => {
                    if attempts.iter().any(Result::is_ok) {
                        self.appended.send_modify(|tick| *tick += 1);
                    }
                    for (member, attempt) in group.into_iter().zip(attempts) {
                        let _ = member.reply.send(GroupAnswer::Attempted(Ok(attempt)));
                    }
                }
                Err(error) => {
                    // A reused event id (a unique violation) or a database fault fails the
                    // whole statement: each member goes again alone, where a retry of a
                    // stored batch is recognised and a fault is reported to its own caller.
                    tracing::debug!(%error, members = group.len(), "group failed; appending alone");
                    for member in group {
                        let _ = member.reply.send(GroupAnswer::AppendAlone);
                    }
                }
            },
        }
    }

    /// Commits a group in one transaction: each member is checked against its stream's head
    /// as the members before it in the group left it, exactly as if it had come alone in that
    /// order; the heads move in one statement and the events go in a few.
    async fn commit_group(&self, group: &[QueuedAppend]) -> Result<Vec<Attempt>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;

        let mut select = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
            "SELECT stream_id, version, head_hash FROM chartlog_streams WHERE stream_id IN (",
        );
        let mut streams = select.separated(", ");
        for member in group {
            streams.push_bind(member.stream.as_str());
        }
        select.push(")");
        let mut heads: HashMap<&str, StreamHead> = HashMap::new();
        for row in select.build().fetch_all(&mut *tx).await? {
            let stream_id: String = row.try_get("stream_id")?;
            if let Some(member) = group.iter().find(|m| m.stream.as_str() == stream_id) {
                heads.insert(member.stream.as_str(), head_from_row(&member.stream, &row)?);
            }
        }

        // Decided in arrival order; `moved` keeps each stream's final head, once.
        let mut attempts: Vec<Option<Attempt>> = Vec::with_capacity(group.len());
        let mut moved: Vec<(&StreamId, StreamHead)> = Vec::new();
        for member in group {
            let head = heads.get(member.stream.as_str()).copied();
            let matches = match head {
                None => member.expected_version == 0,
                Some(head) => {
                    head.version == member.expected_version
                        && head.hash == member.events[0].header.prev_hash
                }
            };
            if !matches {
                attempts.push(Some(Err(head.map(|h| h.version))));
                continue;
            }
            let new_head = StreamHead {
                version: member.expected_version + member.events.len() as u64,
                hash: member.events[member.events.len() - 1].hash,
            };
            heads.insert(member.stream.as_str(), new_head);
            match moved
                .iter_mut()
                .find(|(stream, _)| *stream == &member.stream)
            {
                Some((_, head)) => *head = new_head,
                None => moved.push((&member.stream, new_head)),
            }
            attempts.push(None);
        }

        if !moved.is_empty() {
            let mut upsert = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO chartlog_streams (stream_id, version, head_hash) ",
            );
            upsert.push_values(&moved, |mut row, (stream, head)| {
                row.push_bind(stream.as_str())
                    .push_bind(to_i64(head.version))
                    .push_bind(head.hash.as_bytes().as_slice());
            });
            upsert.push(
                " ON CONFLICT (stream_id) DO UPDATE \
                 SET version = excluded.version, head_hash = excluded.head_hash",
            );
            upsert.build().execute(&mut *tx).await?;
        }

        let accepted: Vec<(&StreamId, &SealedEvent)> = group
            .iter()
            .zip(&attempts)
            .filter(|(_, attempt)| attempt.is_none())
            .flat_map(|(member, _)| member.events.iter().map(move |e| (&member.stream, e)))
            .collect();
        let mut positions: HashMap<Uuid, u64> = HashMap::with_capacity(accepted.len());
        for chunk in accepted.chunks(INSERT_ROWS_PER_STATEMENT) {
            let mut insert = insert_events_statement();
            insert.push_values(chunk, |mut row, (stream, event)| {
                bind_event(&mut row, stream, event);
            });
            insert.push(" RETURNING position, event_id");
            let inserted: Vec<(i64, Uuid)> = insert.build_query_as().fetch_all(&mut *tx).await?;
            for (position, event_id) in inserted {
                positions.insert(event_id, to_u64(position, "position", 0)?);
            }
        }
        tx.commit().await?;

        group
            .iter()
            .zip(attempts)
            .map(|(member, attempt)| match attempt {
                Some(refused) => Ok(refused),
                None => {
                    let position_of = |event: &SealedEvent| {
                        positions
                            .get(&event.header.event_id.as_uuid())
                            .copied()
                            .ok_or_else(|| StoreError::Corrupt {
                                position: 0,
                                reason: "an appended event got no position".to_owned(),
                            })
                    };
                    let first = position_of(&member.events[0])?;
                    let last = position_of(&member.events[member.events.len() - 1])?;
                    // One writer, rows inserted in order: a member's events sit together.
                    debug_assert_eq!(last + 1 - first, member.events.len() as u64);
                    Ok(Ok(AppendOutcome {
                        stream_version: member.expected_version + member.events.len() as u64,
                        first_position: first,
                        last_position: last,
                    }))
                }
            })
            .collect()
    }

    /// [`Self::append_locked`], then wakes the subscribers if the events were stored.
    async fn append_alone_and_announce(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> Result<Attempt, StoreError> {
        let attempt = self.append_locked(stream, expected_version, events).await;
        if matches!(attempt, Ok(Ok(_))) {
            self.appended.send_modify(|tick| *tick += 1);
        }
        attempt
    }

    async fn append_locked(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> Result<Attempt, StoreError> {
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
            let mut insert = insert_events_statement();
            insert.push_values(chunk, |mut row, event| bind_event(&mut row, stream, event));
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

/// `INSERT INTO chartlog_events (...) `, for `push_values` with [`bind_event`].
fn insert_events_statement() -> sqlx::QueryBuilder<sqlx::Sqlite> {
    sqlx::QueryBuilder::new(
        "INSERT INTO chartlog_events (stream_id, stream_version, event_id, event_type, \
         schema_version, recorded_at_us, actor_user_id, actor_role, purpose_of_use, \
         break_glass, data_key_id, signer_key_id, prev_hash, hash, signature, ciphertext) ",
    )
}

/// One row of [`insert_events_statement`].
fn bind_event(
    row: &mut sqlx::query_builder::Separated<'_, sqlx::Sqlite, &'static str>,
    stream: &StreamId,
    event: &SealedEvent,
) {
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
        let attempt = match self.append_in_group(stream, expected_version, events).await {
            GroupAnswer::Attempted(attempt) => attempt,
            GroupAnswer::AppendAlone => {
                let _writer = self.write_lock.lock().await;
                self.append_alone_and_announce(stream, expected_version, events)
                    .await
            }
        };
        let actual = match attempt {
            Ok(Ok(outcome)) => return Ok(outcome),
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

    async fn log_head_position(&self) -> Result<u64, StoreError> {
        let head: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM chartlog_events")
                .fetch_one(&self.pool)
                .await?;
        to_u64(head, "log position", 0)
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
