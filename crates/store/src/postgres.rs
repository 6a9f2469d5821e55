//! The production backend: PostgreSQL.
//!
//! An append is one call of the `chartlog_append` SQL function (one round trip, then the
//! commit), so concurrent writers to different streams commit in parallel.
//!
//! Group commit: a single-event append costs mostly its transaction (the commit's WAL flush,
//! the round trip, the statement's start), so under concurrent writers [`EventStore::append`]
//! shares transactions. An append that finds no other append of this store under way runs its
//! `chartlog_append` call at once from the caller's task, as it would without groups. Otherwise
//! it is queued for the committer tasks ([`COMMITTERS`]): a committer that is free takes the
//! first append waiting and every other one already queued, or arriving while it yields to the
//! scheduler once more (no timer), up to [`GROUP_APPENDS_MAX`] appends, [`GROUP_EVENTS_MAX`]
//! events and [`GROUP_BYTES_MAX`] bytes, and commits them as one statement,
//! `chartlog_append_group` (migration 0008), in autocommit, so one transaction. A lone group
//! member goes as a plain `chartlog_append` call; an append too large to share a group goes
//! from the caller's task. Each append in a group is still checked on its own (a conflict is
//! that append's answer, not the group's error); if the group's statement fails as a whole,
//! each member is appended again alone, by its caller, exactly as without groups, which also
//! settles a group whose connection was lost mid-commit (what was stored is found by event id
//! and answered as an idempotent retry; event ids are unique, so nothing is stored twice).
//! Appends inside a caller's transaction ([`append_in_transaction`]) never join a group.
//!
//! An event's position is derived from its transaction's id (`xid8 * 1024 + its place in
//! the transaction`), so positions sort in the order transactions took their ids. The global
//! log is read only below the oldest transaction still running
//! (`pg_snapshot_xmin(pg_current_snapshot()) * 1024`), which returns a prefix of the log: an
//! event that commits after a higher-numbered one is held back until it is visible, never
//! skipped. No lock or sequence is shared between appends. See
//! `migrations/postgres/0001_event_log.sql` for the argument.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use chartlog_crypto::SealedEvent;
use chartlog_domain::StreamId;
use sqlx::postgres::{PgArguments, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Postgres, Row};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::group_commit::{GroupLimits, GroupQueue, Groupable};
use crate::row::{
    EVENT_COLUMNS, EventRow, conflict_error, head_from_row, idempotent_outcome, to_i64, to_u64,
};
use crate::{
    AppendOutcome, EVENTS_PER_APPEND_MAX, EventStore, RecordedEvent, StoreError, StreamHead,
    check_append_batch,
};

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
/// Connections per process by default (`chartlog serve --database-connections`). Fewer than
/// the HTTP load benchmark's 32 concurrent clients on purpose: on 2 cores shared with the
/// server, 32 backends contend for the CPU with each other and with the server, while 16 let
/// requests queue briefly for a connection instead, and the tail came in. Alternated scale-4
/// runs of benches/http_load.rs (six at 32 and at 16, three at 8): command p99 22.5-28.6 ms at
/// 32 connections, 19.8-24.0 at 16, 23.0-24.7 at 8; chart read p99 21.5-31.5, 17.8-22.4,
/// 17.6-19.3. A database on its own host, or further away (connections then wait on the
/// network, not the CPU), may want more.
pub const CONNECTIONS_DEFAULT: u32 = 16;
/// The fewest connections a process may be given: the notification listener keeps one, the
/// committers and the projection runner take one each while they work, and requests need
/// some left.
pub const CONNECTIONS_MIN: u32 = 6;
/// How long a caller waits for a connection (a new one, or a free one from the pool) before
/// the request fails: long enough to ride out a busy moment, short enough to fail clearly.
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// Committer tasks, each committing one group at a time. Two, so that groups pipeline: while
/// one group's statement runs and its commit waits for the WAL flush, the appends arriving
/// meanwhile form the next group, which the other committer sends without waiting. Not more,
/// because every free committer takes the appends waiting at that moment, so more committers
/// split them into smaller groups, and a group's cost is mostly per group: with 16 writers of
/// one-event appends on a busy 2-core machine (benches/store_append.rs), 2 committers reached
/// 0.72-0.85x of raw INSERT throughput, 4 reached 0.67-0.78x, 8 0.62-0.64x. A database further
/// away (longer round trips, so committers wait on the network rather than the CPU) may want
/// more.
pub const COMMITTERS: usize = 2;
/// The most appends one group carries: enough that 16 or 64 concurrent writers share a few
/// commits, small enough that one group's statement stays short. (With the default
/// [`GROUP_BYTES_MAX`] the byte limit binds first: even the smallest append takes ~300 bytes.)
pub const GROUP_APPENDS_MAX: usize = 64;
/// The most events one group carries: one transaction's places in the global log (positions
/// are the transaction id times 1024 plus a place from 1 to 1023; see `chartlog_append`).
pub const GROUP_EVENTS_MAX: usize = 1023;
/// The most bytes one group's statement carries (as [`statement_bytes`] estimates them): one
/// TLS record (16 KiB of plaintext), less a margin for the statement's fixed part. sqlx 0.9.0
/// leaves Nagle's algorithm on (it no longer sets TCP_NODELAY: launchbadge/sqlx#4335), and
/// over TLS a statement larger than one record is written as two or more records; the last,
/// small one then waits for the server to acknowledge the first, which the server delays by
/// up to 40 ms. Measured on loopback with 1 KiB events: groups of 12 to 15 one-event appends
/// (17-21 KB) took about 50 ms each; groups within this limit (up to 10 such appends) about
/// 2 ms. An append larger than this on its own goes alone, from its caller's task (as it did
/// before groups, paying that delay). Raise it once the driver sets TCP_NODELAY again.
pub const GROUP_BYTES_MAX: usize = 15 * 1024;
const _: () = assert!(EVENTS_PER_APPEND_MAX <= GROUP_EVENTS_MAX);

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
///
/// No ping before each acquire (sqlx's default): it is a round trip to a backend for every
/// statement run on the pool, on top of the statement's own and the ping sqlx sends when the
/// connection comes back. Without it the HTTP load benchmark's commands went from about 1,550
/// to 1,680 per second and chart reads from about 1,230 to 1,510 (docs/PERFORMANCE.md, "HTTP
/// load"). A connection the server dropped fails its next statement instead, that one request or
/// append gets the error (no append is acknowledged that did not commit), and the ping on
/// release closes the connection so the next acquire gets a fresh one.
///
/// The pool holds at most `connections`, raised to [`CONNECTIONS_MIN`] if lower.
pub async fn open_pool(url: &str, connections: u32) -> Result<PgPool, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(connections.max(CONNECTIONS_MIN))
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .test_before_acquire(false)
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
    ticks: Ticks,
    /// The committers' queue. Only the committers hold its receiving end, so once they are
    /// gone (the store was closed) queued requests are dropped and their callers get an error.
    requests: mpsc::UnboundedSender<AppendRequest>,
    /// How appends are grouped.
    group_commit: GroupCommit,
    /// Appends of this store under way (queued, in a group, or running alone).
    appends_under_way: AtomicUsize,
    /// The listener, the announcer and the committers.
    tasks: std::sync::Mutex<Vec<JoinHandle<()>>>,
}

/// How [`PostgresEventStore::append`] groups concurrent appends into shared transactions. The
/// default is the constants above; tests and tuning may set others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommit {
    /// Committer tasks ([`COMMITTERS`]); at least 1.
    pub committers: usize,
    /// The most appends in one group ([`GROUP_APPENDS_MAX`]); at least 1.
    pub appends_max: usize,
    /// The most events in one group; at most [`GROUP_EVENTS_MAX`], which is also the default.
    pub events_max: usize,
    /// The most statement bytes in one group ([`GROUP_BYTES_MAX`]); an append over it goes
    /// alone, from its caller's task.
    pub bytes_max: usize,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            committers: COMMITTERS,
            appends_max: GROUP_APPENDS_MAX,
            events_max: GROUP_EVENTS_MAX,
            bytes_max: GROUP_BYTES_MAX,
        }
    }
}

impl GroupCommit {
    /// Within what positions and the queue allow.
    fn bounded(self) -> Self {
        Self {
            committers: self.committers.max(1),
            appends_max: self.appends_max.max(1),
            events_max: self.events_max.clamp(1, GROUP_EVENTS_MAX),
            bytes_max: self.bytes_max.max(1),
        }
    }
}

/// Counts an append as under way until it is dropped (answered or abandoned).
struct UnderWay<'a>(&'a AtomicUsize);

impl<'a> UnderWay<'a> {
    /// Counts one more append; also returns how many others were under way.
    fn start(count: &'a AtomicUsize) -> (Self, usize) {
        let others = count.fetch_add(1, Ordering::AcqRel);
        (Self(count), others)
    }
}

impl Drop for UnderWay<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The watch channels an append ticks.
#[derive(Clone)]
struct Ticks {
    /// Ticks on any append this process hears of (its own, or another's via LISTEN).
    appended: watch::Sender<u64>,
    /// Ticks on this process's own appends, for the announcer.
    appended_here: watch::Sender<u64>,
}

impl Ticks {
    /// Wakes this process's subscribers and has the announcer tell the other processes.
    fn announce(&self) {
        self.appended.send_modify(|tick| *tick += 1);
        self.appended_here.send_modify(|tick| *tick += 1);
    }
}

/// One append waiting for a committer.
struct AppendRequest {
    stream: StreamId,
    expected_version: u64,
    events: Vec<SealedEvent>,
    /// [`statement_bytes`] of this append.
    bytes: usize,
    reply: oneshot::Sender<Committed>,
}

impl Groupable for AppendRequest {
    fn events(&self) -> usize {
        self.events.len()
    }

    fn bytes(&self) -> usize {
        self.bytes
    }

    fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }
}

/// `chartlog_append`'s answer for one append: its outcome, or a refusal with the stream's
/// actual version (`None`: no such stream).
type Answer = Result<AppendOutcome, Option<u64>>;

/// What a committer tells the caller of one append.
enum Committed {
    /// The append's own answer, or the error of its statement when it went alone.
    Answer(Result<Answer, StoreError>),
    /// Its group's statement failed as a whole, so nothing of the group was stored (or, if the
    /// connection was lost or the answer was unreadable, the outcome is unknown): append alone
    /// to learn this append's fate (a stored append is then recognised as a retry).
    RetryAlone,
}

/// About how many bytes an append adds to a group's statement (its share of the Bind
/// message): each event's fourteen columns with their 4-byte length words, and the append's
/// stream id, expected version and event count.
fn statement_bytes(stream: &StreamId, events: &[SealedEvent]) -> usize {
    const LENGTH_WORD: usize = 4;
    const PER_APPEND: usize = 3 * LENGTH_WORD + 8 + 4;
    // Three uuids, schema version, time, break-glass flag, two hashes, signature.
    const PER_EVENT: usize = 14 * LENGTH_WORD + 3 * 16 + 4 + 8 + 1 + 32 + 32 + 64;
    let variable = |e: &SealedEvent| {
        e.ciphertext.len()
            + e.header.event_type.len()
            + e.header.signer_key_id.as_str().len()
            + e.header.actor.role.as_str().len()
            + e.header.actor.purpose_of_use.as_str().len()
    };
    PER_APPEND
        + stream.as_str().len()
        + events
            .iter()
            .map(|e| PER_EVENT + variable(e))
            .sum::<usize>()
}

/// The error of an append whose committer is gone: the store was closed.
fn committers_gone() -> StoreError {
    StoreError::Database(sqlx::Error::PoolClosed)
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
        Self::from_pool_with(pool, GroupCommit::default()).await
    }

    /// [`Self::from_pool`], grouping appends as `group_commit` says.
    pub async fn from_pool_with(
        pool: PgPool,
        group_commit: GroupCommit,
    ) -> Result<Self, StoreError> {
        let group_commit = group_commit.bounded();
        let (appended, _) = watch::channel(0);
        let (appended_here, mut heard_here) = watch::channel(0);
        let ticks = Ticks {
            appended,
            appended_here,
        };
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(APPEND_CHANNEL).await?;
        let heard = ticks.appended.clone();
        let listener = tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(_) => heard.send_modify(|tick| *tick += 1),
                    Err(error) => {
                        tracing::warn!(%error, "append notifications interrupted; subscribers poll until they resume");
                        // Wake subscribers: notifications may have been lost while down.
                        heard.send_modify(|tick| *tick += 1);
                        tokio::time::sleep(LISTEN_RETRY_DELAY).await;
                    }
                }
            }
        });
        // Announce this process's appends to the others outside the append transactions
        // (see the migration: NOTIFY inside them would serialize their commits). Ticks that
        // arrive while a NOTIFY is in flight coalesce into the next one.
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
        let (requests, queue) = mpsc::unbounded_channel();
        let queue = Arc::new(tokio::sync::Mutex::new(GroupQueue::new(
            queue,
            GroupLimits {
                requests: group_commit.appends_max,
                events: group_commit.events_max,
                bytes: group_commit.bytes_max,
            },
        )));
        let mut tasks = vec![listener, announcer];
        for _ in 0..group_commit.committers {
            tasks.push(tokio::spawn(run_committer(
                queue.clone(),
                pool.clone(),
                ticks.clone(),
            )));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                ticks,
                requests,
                group_commit,
                appends_under_way: AtomicUsize::new(0),
                tasks: std::sync::Mutex::new(tasks),
            }),
        })
    }

    /// Connects to `url` with [`CONNECTIONS_DEFAULT`] connections at most, migrates, and
    /// starts listening.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, CONNECTIONS_DEFAULT).await
    }

    /// [`PostgresEventStore::connect`] with at most `connections` connections (see
    /// [`open_pool`]).
    pub async fn connect_with(url: &str, connections: u32) -> Result<Self, StoreError> {
        Self::from_pool(open_pool(url, connections).await?).await
    }

    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Stops listening, announcing and committing, and closes the pool. The listener holds one
    /// of the pool's connections, so closing the pool alone would wait for it forever. An
    /// append waiting for a committer, or in a group being committed, fails with
    /// `PoolClosed`; a group whose statement had reached the server may still commit, so, as
    /// after any lost acknowledgement, its outcome is unknown and a retry is idempotent.
    pub async fn close(&self) {
        for task in self.inner.take_tasks() {
            task.abort();
            // Wait until the task is gone and its connection returned to the pool.
            let _ = task.await;
        }
        self.inner.pool.close().await;
    }

    async fn append_alone(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> Result<Answer, StoreError> {
        append_announced(
            &self.inner.pool,
            &self.inner.ticks,
            stream,
            expected_version,
            events,
        )
        .await
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
        let bytes = statement_bytes(stream, events);
        let (_under_way, others) = UnderWay::start(&self.inner.appends_under_way);
        let answer = if others == 0 || bytes > self.inner.group_commit.bytes_max {
            // Alone: with no other append under way there is nobody to group with, so it goes
            // at once from this task, as it would without groups (no hand-over to a committer
            // and back). Too large to share a group: its own transaction is already a large
            // one, so it goes from this task too, concurrently with the groups.
            self.append_alone(stream, expected_version, events).await
        } else {
            let (reply, committed) = oneshot::channel();
            self.inner
                .requests
                .send(AppendRequest {
                    stream: stream.clone(),
                    expected_version,
                    events: events.to_vec(),
                    bytes,
                    reply,
                })
                .map_err(|_| committers_gone())?;
            match committed.await.map_err(|_| committers_gone())? {
                Committed::Answer(answer) => answer,
                Committed::RetryAlone => self.append_alone(stream, expected_version, events).await,
            }
        };
        let actual = match answer {
            Ok(Ok(outcome)) => return Ok(outcome),
            Ok(Err(actual)) => actual,
            // An event id is stored already (the unique index refused the insert): the
            // stored events decide below between a retry and a reused id.
            Err(StoreError::Database(sqlx::Error::Database(db))) if db.is_unique_violation() => {
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
            sqlx::query("SELECT version, head_hash FROM chartlog_streams WHERE stream_id = $1")
                .bind(stream.as_str())
                .fetch_optional(&self.inner.pool)
                .await?;
        row.map(|row| head_from_row(stream, &row)).transpose()
    }

    async fn log_head_position(&self) -> Result<u64, StoreError> {
        let head: i64 =
            sqlx::query_scalar("SELECT COALESCE(MAX(position), 0) FROM chartlog_events")
                .fetch_one(&self.inner.pool)
                .await?;
        to_u64(head, "log position", 0)
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
        self.inner.ticks.appended.subscribe()
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
    append_alone(&mut *conn, stream, expected_version, events)
        .await?
        .map_err(|actual| conflict_error(stream, expected_version, actual))
}

/// One committer: takes the next group from the shared queue and commits it, until the store
/// is closed.
async fn run_committer(
    queue: Arc<tokio::sync::Mutex<GroupQueue<AppendRequest>>>,
    pool: PgPool,
    ticks: Ticks,
) {
    loop {
        // The lock is held only while the group forms; it is free again while this group
        // commits, so another committer forms the next one meanwhile.
        let Some(group) = queue.lock().await.next_group().await else {
            return;
        };
        commit_group(&pool, &ticks, group).await;
    }
}

/// Appends with a `chartlog_append` call of its own, and announces it if it was appended.
async fn append_announced(
    pool: &PgPool,
    ticks: &Ticks,
    stream: &StreamId,
    expected_version: u64,
    events: &[SealedEvent],
) -> Result<Answer, StoreError> {
    let answer = append_alone(pool, stream, expected_version, events).await;
    if matches!(answer, Ok(Ok(_))) {
        ticks.announce();
    }
    answer
}

/// Commits a group in one statement and answers each member. A lone append goes as a plain
/// `chartlog_append` call, so a single writer runs the very statement it ran before groups.
async fn commit_group(pool: &PgPool, ticks: &Ticks, mut group: Vec<AppendRequest>) {
    if group.len() == 1 {
        let Some(request) = group.pop() else { return };
        let answer = append_announced(
            pool,
            ticks,
            &request.stream,
            request.expected_version,
            &request.events,
        )
        .await;
        // The caller may have given up meanwhile; then nobody needs the answer.
        let _ = request.reply.send(Committed::Answer(answer));
        return;
    }
    // Each append locks its stream's row until the group commits. Sorting by stream id (a
    // stable sort: one stream's appends keep their arrival order) makes every group lock
    // shared streams in the same order, so two groups in flight cannot deadlock.
    group.sort_by(|a, b| a.stream.as_str().cmp(b.stream.as_str()));
    match append_group(pool, &group).await {
        Ok(answers) => {
            if answers.iter().any(|answer| matches!(answer, Ok(Ok(_)))) {
                ticks.announce();
            }
            for (request, answer) in group.into_iter().zip(answers) {
                let _ = request.reply.send(Committed::Answer(answer));
            }
        }
        Err(error) => {
            // Expected now and then (a client reusing an event id fails its whole group);
            // every member learns its own fate alone, as it would have without groups.
            tracing::debug!(%error, appends = group.len(), "group append failed; each append retries alone");
            for request in group {
                let _ = request.reply.send(Committed::RetryAlone);
            }
        }
    }
}

/// Runs `chartlog_append_group` for the group (in autocommit: the statement is its own
/// transaction) and reads one answer per member, in the group's order.
async fn append_group(
    pool: &PgPool,
    group: &[AppendRequest],
) -> Result<Vec<Result<Answer, StoreError>>, StoreError> {
    let query = sqlx::query(
        "SELECT ordinal, outcome, first_position, actual_version FROM chartlog_append_group(\
             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
    )
    .bind(group.iter().map(|r| r.stream.as_str()).collect::<Vec<_>>())
    .bind(
        group
            .iter()
            .map(|r| to_i64(r.expected_version))
            .collect::<Vec<_>>(),
    )
    .bind(
        group
            .iter()
            .map(|r| i32::try_from(r.events.len()).unwrap_or(i32::MAX))
            .collect::<Vec<_>>(),
    );
    let rows = bind_events(query, group.iter().flat_map(|r| &r.events))
        .fetch_all(pool)
        .await?;
    if rows.len() != group.len() {
        return Err(StoreError::Corrupt {
            position: 0,
            reason: format!(
                "chartlog_append_group answered {} rows for {} appends",
                rows.len(),
                group.len()
            ),
        });
    }
    let mut answers = Vec::with_capacity(group.len());
    for ((ordinal, row), request) in (1i32..).zip(&rows).zip(group) {
        if row.try_get::<i32, _>("ordinal")? != ordinal {
            return Err(StoreError::Corrupt {
                position: 0,
                reason: "chartlog_append_group answered out of order".to_owned(),
            });
        }
        answers.push(appended(
            row,
            request.expected_version,
            request.events.len(),
        ));
    }
    Ok(answers)
}

/// Appends one batch with one `chartlog_append` call: a refusal is an answer, a failed
/// statement an error.
async fn append_alone<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    stream: &StreamId,
    expected_version: u64,
    events: &[SealedEvent],
) -> Result<Answer, StoreError> {
    let row = call_append(executor, stream, expected_version, events).await?;
    appended(&row, expected_version, events.len())
}

async fn call_append<'e, E: sqlx::PgExecutor<'e>>(
    executor: E,
    stream: &StreamId,
    expected_version: u64,
    events: &[SealedEvent],
) -> Result<PgRow, sqlx::Error> {
    let query = sqlx::query(
        "SELECT outcome, first_position, actual_version FROM chartlog_append(\
             $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
    )
    .bind(stream.as_str())
    .bind(to_i64(expected_version));
    bind_events(query, events).fetch_one(executor).await
}

/// Binds the per-event arrays `chartlog_append` and `chartlog_append_group` take, in their
/// order.
fn bind_events<'q, 'a>(
    query: sqlx::query::Query<'q, Postgres, PgArguments>,
    events: impl IntoIterator<Item = &'a SealedEvent> + Clone,
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    let headers = || events.clone().into_iter().map(|e| &e.header);
    query
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
                .map(|h| h.prev_hash.as_bytes().as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .clone()
                .into_iter()
                .map(|e| e.hash.as_bytes().as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .clone()
                .into_iter()
                .map(|e| e.signature.as_bytes().as_slice())
                .collect::<Vec<_>>(),
        )
        .bind(
            events
                .into_iter()
                .map(|e| e.ciphertext.as_slice())
                .collect::<Vec<_>>(),
        )
}

/// Reads `chartlog_append`'s answer (a row of `chartlog_append_group` has the same columns):
/// the outcome, or the stream's actual version on conflict.
fn appended(row: &PgRow, expected_version: u64, count: usize) -> Result<Answer, StoreError> {
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
