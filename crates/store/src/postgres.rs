//! The production backend: PostgreSQL.
//!
//! An append is one call of the `chartlog_append` SQL function (one round trip, then the
//! commit), so concurrent writers to different streams commit in parallel.
//!
//! An event's position is derived from its transaction's id (`xid8 * 1024 + its place in
//! the transaction`), so positions sort in the order transactions took their ids. The global
//! log is read only below the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot()) * 1024`), which returns a prefix of the log: an
//! event that commits after a higher-numbered one is held back until it is visible, never
//! skipped. No lock or sequence is shared between appends. See
//! `migrations/postgres/0001_event_log.sql` for the argument.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chartlog_crypto::SealedEvent;
use chartlog_domain::StreamId;
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Row};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::row::{
    EVENT_COLUMNS, EventRow, conflict_error, head_from_row, idempotent_outcome, to_i64, to_u64,
};
use crate::{AppendOutcome, EventStore, RecordedEvent, StoreError, StreamHead, check_append_batch};

/// The PostgreSQL schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// The channel `chartlog_append` notifies on commit.
pub const APPEND_CHANNEL: &str = "chartlog_events";
/// The shortest time between two announcements of this process's appends: bounds the
/// notifications to a few hundred a second however fast appends come, at the price of that
/// much delivery latency to other processes (this process's subscribers wake at once).
const ANNOUNCE_INTERVAL_MIN: Duration = Duration::from_millis(2);
/// Pause before re-listening after the notification connection drops.
const LISTEN_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Connections per API node by default.
pub const CONNECTIONS_MAX: u32 = 32;
/// How long a caller waits for a connection (a new one, or a free one from the pool) before
/// the request fails: long enough to ride out a busy moment, short enough to fail clearly.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

crate::keys::key_store_backend!(
    PostgresKeyStore,
    PgPool,
    "[`chartlog_crypto::KeyStore`] over the PostgreSQL data-key table."
);

crate::snapshots::snapshot_store_backend!(
    PostgresSnapshotStore,
    PgPool,
    "[`crate::SnapshotStore`] over the PostgreSQL snapshot table."
);

/// Connects and migrates.
pub async fn open_pool(url: &str) -> Result<PgPool, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(CONNECTIONS_MAX)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(url)
        .await?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// [`EventStore`] over PostgreSQL.
#[derive(Clone)]
pub struct PostgresEventStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    /// Ticks on any append this process hears of (its own, or another's via LISTEN).
    appended: watch::Sender<u64>,
    /// Ticks on this process's own appends, for the announcer.
    appended_here: watch::Sender<u64>,
    /// The listener and the announcer.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn take_tasks(&self) -> Vec<JoinHandle<()>> {
        self.tasks
            .lock()
            .map(|mut tasks| std::mem::take(&mut *tasks))
            .unwrap_or_default()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for task in self.take_tasks() {
            task.abort();
        }
    }
}

impl PostgresEventStore {
    /// Wraps a migrated pool and starts listening for appends from every process.
    pub async fn from_pool(pool: PgPool) -> Result<Self, StoreError> {
        let (appended, _) = watch::channel(0);
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(APPEND_CHANNEL).await?;
        let ticks = appended.clone();
        let listener = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(_) => ticks.send_modify(|tick| *tick += 1),
                    Err(error) => {
                        tracing::warn!(%error, "append notifications interrupted; subscribers poll until they resume");
                        // Wake subscribers: notifications may have been lost while down.
                        ticks.send_modify(|tick| *tick += 1);
                        tokio::time::sleep(LISTEN_RETRY_DELAY).await;
                    }
                }
            }
        });
        // Announce this process's appends to the others outside the append transactions
        // (see the migration: NOTIFY inside them would serialize their commits). Ticks that
        // arrive while a NOTIFY is in flight coalesce into the next one.
        let (appended_here, mut heard_here) = watch::channel(0);
        let announcer_pool = pool.clone();
        let announcer = tokio::spawn(async move {
            while heard_here.changed().await.is_ok() {
                heard_here.borrow_and_update();
                // A notification needs no durability: committing it asynchronously keeps the
                // announcer from adding an fsync to every append.
                let announced = sqlx::query(
                    "SELECT set_config('synchronous_commit', 'off', true), pg_notify($1, '')",
                )
                .bind(APPEND_CHANNEL)
                .execute(&announcer_pool)
                .await;
                if let Err(error) = announced {
                    tracing::warn!(%error, "cannot announce appends; other processes poll until it works");
                    tokio::time::sleep(LISTEN_RETRY_DELAY).await;
                }
                // Coalesce: appends landing meanwhile share the next notification.
                tokio::time::sleep(ANNOUNCE_INTERVAL_MIN).await;
            }
        });
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                appended,
                appended_here,
                tasks: std::sync::Mutex::new(vec![listener, announcer]),
            }),
        })
    }

    /// Connects to `url`, migrates, and starts listening.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::from_pool(open_pool(url).await?).await
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Stops listening and announcing, and closes the pool. The listener holds one of the
    /// pool's connections, so closing the pool alone would wait for it forever.
    pub async fn close(&self) {
        for task in self.inner.take_tasks() {
            task.abort();
            // Wait until the task is gone and its connection returned to the pool.
            let _ = task.await;
        }
        self.inner.pool.close().await;
    }

    async fn events_by_id(&self, events: &[SealedEvent]) -> Result<Vec<RecordedEvent>, StoreError> {
        let ids: Vec<Uuid> = events.iter().map(|e| e.header.event_id.as_uuid()).collect();
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM chartlog_events WHERE event_id = ANY($1) ORDER BY position"
        )))
        .bind(&ids)
        .fetch_all(&self.inner.pool)
        .await?;
        rows.into_iter().map(EventRow::into_recorded).collect()
    }
}

#[async_trait]
impl EventStore for PostgresEventStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> Result<AppendOutcome, StoreError> {
        check_append_batch(stream, expected_version, events)?;
        let result = call_append(&self.inner.pool, stream, expected_version, events).await;
        let actual = match result {
            Ok(row) => match appended(&row, expected_version, events.len())? {
                Ok(outcome) => {
                    self.inner.appended.send_modify(|tick| *tick += 1);
                    self.inner.appended_here.send_modify(|tick| *tick += 1);
                    return Ok(outcome);
                }
                Err(actual) => actual,
            },
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                self.stream_head(stream).await?.map(|h| h.version)
            }
            Err(other) => return Err(other.into()),
        };
        if let Some(original) = idempotent_outcome(events, &self.events_by_id(events).await?)? {
            return Ok(original);
        }
        Err(conflict_error(stream, expected_version, actual))
    }

    async fn stream_head(&self, stream: &StreamId) -> Result<Option<StreamHead>, StoreError> {
        let row =
            sqlx::query("SELECT version, head_hash FROM chartlog_streams WHERE stream_id = $1")
                .bind(stream.as_str())
                .fetch_optional(&self.inner.pool)
                .await?;
        row.map(|row| head_from_row(stream, &row)).transpose()
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM chartlog_events \
             WHERE stream_id = $1 AND stream_version >= $2 ORDER BY stream_version LIMIT $3"
        )))
        .bind(stream.as_str())
        .bind(to_i64(from_version))
        .bind(i64::from(limit.min(crate::READ_BATCH_MAX)))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.into_iter().map(EventRow::into_recorded).collect()
    }

    async fn read_all(
        &self,
        after_position: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows: Vec<EventRow> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT {EVENT_COLUMNS} FROM chartlog_events \
             WHERE position > $1 \
               AND position < pg_snapshot_xmin(pg_current_snapshot())::text::bigint * 1024 \
             ORDER BY position LIMIT $2"
        )))
        .bind(to_i64(after_position))
        .bind(i64::from(limit.min(crate::READ_BATCH_MAX)))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.into_iter().map(EventRow::into_recorded).collect()
    }

    fn append_notifications(&self) -> watch::Receiver<u64> {
        self.inner.appended.subscribe()
    }
}

/// Appends inside a transaction the caller controls, for callers that must commit the events
/// together with other writes. The events become readable in the global log when the
/// transaction commits (and every older one has finished). A refused append is reported as a
/// conflict; idempotent retries are recognised only by [`EventStore::append`].
pub async fn append_in_transaction(
    conn: &mut sqlx::PgConnection,
    stream: &StreamId,
    expected_version: u64,
    events: &[SealedEvent],
) -> Result<AppendOutcome, StoreError> {
    check_append_batch(stream, expected_version, events)?;
    let row = call_append(&mut *conn, stream, expected_version, events).await?;
    appended(&row, expected_version, events.len())?
        .map_err(|actual| conflict_error(stream, expected_version, actual))
}

async fn call_append<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    stream: &StreamId,
    expected_version: u64,
    events: &[SealedEvent],
) -> Result<PgRow, sqlx::Error> {
    let headers = || events.iter().map(|e| &e.header);
    sqlx::query(
        "SELECT outcome, first_position, actual_version FROM chartlog_append(\
             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(stream.as_str())
    .bind(to_i64(expected_version))
    .bind(headers().map(|h| h.event_id.as_uuid()).collect::<Vec<_>>())
    .bind(headers().map(|h| h.event_type.as_str()).collect::<Vec<_>>())
    .bind(
        headers()
            .map(|h| i32::try_from(h.schema_version).unwrap_or(i32::MAX))
            .collect::<Vec<_>>(),
    )
    .bind(
        headers()
            .map(|h| h.recorded_at.unix_micros())
            .collect::<Vec<_>>(),
    )
    .bind(
        headers()
            .map(|h| h.actor.user_id.as_uuid())
            .collect::<Vec<_>>(),
    )
    .bind(headers().map(|h| h.actor.role.as_str()).collect::<Vec<_>>())
    .bind(
        headers()
            .map(|h| h.actor.purpose_of_use.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(headers().map(|h| h.actor.break_glass).collect::<Vec<_>>())
    .bind(headers().map(|h| h.key_id.as_uuid()).collect::<Vec<_>>())
    .bind(
        headers()
            .map(|h| h.signer_key_id.as_str())
            .collect::<Vec<_>>(),
    )
    .bind(
        headers()
            .map(|h| h.prev_hash.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    )
    .bind(
        events
            .iter()
            .map(|e| e.hash.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    )
    .bind(
        events
            .iter()
            .map(|e| e.signature.as_bytes().to_vec())
            .collect::<Vec<_>>(),
    )
    .bind(
        events
            .iter()
            .map(|e| e.ciphertext.as_slice())
            .collect::<Vec<_>>(),
    )
    .fetch_one(executor)
    .await
}

/// Reads `chartlog_append`'s answer: the outcome, or the stream's actual version on conflict.
fn appended(
    row: &PgRow,
    expected_version: u64,
    count: usize,
) -> Result<Result<AppendOutcome, Option<u64>>, StoreError> {
    let outcome: String = row.try_get("outcome")?;
    if outcome != "appended" {
        let actual: Option<i64> = row.try_get("actual_version")?;
        return Ok(Err(actual
            .map(|v| to_u64(v, "stream version", 0))
            .transpose()?));
    }
    let first: i64 = row.try_get("first_position")?;
    let first_position = to_u64(first, "position", 0)?;
    Ok(Ok(AppendOutcome {
        stream_version: expected_version + count as u64,
        first_position,
        last_position: first_position + count as u64 - 1,
    }))
}
