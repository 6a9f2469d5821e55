//! Group commit on PostgreSQL: concurrent appends share transactions (one statement of
//! `chartlog_append_group`), and every caller still gets exactly the answer it would get alone.
//! Each test gets a fresh database from `#[sqlx::test]` (DATABASE_URL names the server).
//!
//! Appends that share a group share a transaction id, which is an event's position divided by
//! 1024, so the tests see the groups in the positions. To form groups on purpose, a test holds
//! a lock on `chartlog_events` that every append's INSERT waits for ([`Hold`]): the first
//! append (which finds no other under way, so runs alone from its own task) and the
//! committers' first groups block, while the other appends queue up behind them; when the lock
//! is released the queue leaves in groups as large as the limits allow.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chartlog_crypto::{DataKey, SealedEvent, seal_event};
use chartlog_domain::StreamId;
use chartlog_store::conformance::{EventFactory, PROMPT_WAIT};
use chartlog_store::postgres::{
    COMMITTERS, GROUP_APPENDS_MAX, GROUP_EVENTS_MAX, GroupCommit, PostgresEventStore,
};
use chartlog_store::{AppendOutcome, EventStore, RecordedEvent, StoreError, StreamHead};
use sqlx::{Connection, PgConnection, PgPool};
use tokio::task::JoinHandle;
use uuid::Uuid;

async fn store(pool: PgPool) -> PostgresEventStore {
    PostgresEventStore::from_pool(pool).await.expect("store")
}

/// A store whose groups are limited by appends and events only, not bytes.
async fn store_without_byte_limit(pool: PgPool) -> PostgresEventStore {
    let group_commit = GroupCommit {
        bytes_max: usize::MAX,
        ..GroupCommit::default()
    };
    PostgresEventStore::from_pool_with(pool, group_commit)
        .await
        .expect("store")
}

fn new_stream(name: &str) -> StreamId {
    StreamId::parse(&format!("patient-{name}-{}", Uuid::new_v4())).expect("stream id")
}

/// The transaction an append committed in: its positions are the transaction id times 1024
/// plus a place.
fn transaction(outcome: &AppendOutcome) -> u64 {
    assert_eq!(
        outcome.first_position >> 10,
        outcome.last_position >> 10,
        "one append lies within one transaction"
    );
    outcome.first_position >> 10
}

/// How many appends, and how many events, each transaction holds.
fn per_transaction(outcomes: &[AppendOutcome]) -> BTreeMap<u64, (usize, u64)> {
    let mut transactions = BTreeMap::new();
    for outcome in outcomes {
        let entry = transactions.entry(transaction(outcome)).or_insert((0, 0));
        entry.0 += 1;
        entry.1 += outcome.last_position - outcome.first_position + 1;
    }
    transactions
}

/// A lock on `chartlog_events` that keeps every append's INSERT waiting, taken on connections
/// of its own (the store's pool is left to the store).
struct Hold {
    locker: PgConnection,
    watcher: PgConnection,
}

impl Hold {
    async fn take(pool: &PgPool) -> Self {
        let options = (*pool.connect_options()).clone();
        let mut locker = PgConnection::connect_with(&options)
            .await
            .expect("locker connection");
        let watcher = PgConnection::connect_with(&options)
            .await
            .expect("watcher connection");
        sqlx::query("BEGIN")
            .execute(&mut locker)
            .await
            .expect("begin");
        sqlx::query("LOCK TABLE chartlog_events IN SHARE MODE")
            .execute(&mut locker)
            .await
            .expect("lock the event table");
        Self { locker, watcher }
    }

    /// Waits until `statements` statements of this database wait for a lock.
    async fn wait_for_blocked(&mut self, statements: i64) {
        let deadline = tokio::time::Instant::now() + PROMPT_WAIT;
        loop {
            let blocked: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&mut self.watcher)
            .await
            .expect("count blocked statements");
            if blocked >= statements {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{statements} statements should be waiting for the lock, {blocked} are"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn release(mut self) {
        sqlx::query("COMMIT")
            .execute(&mut self.locker)
            .await
            .expect("release the lock");
    }
}

/// Starts one append per batch, each in a task of its own, in order, and returns once every
/// one of them has been handed to the store. (The first, finding no other under way, runs
/// alone from its task; the others wait for a committer.)
async fn start_appends(
    store: &PostgresEventStore,
    batches: Vec<(u64, Vec<SealedEvent>)>,
) -> Vec<JoinHandle<Result<AppendOutcome, StoreError>>> {
    let started = Arc::new(AtomicUsize::new(0));
    let count = batches.len();
    let tasks = batches
        .into_iter()
        .map(|(expected_version, batch)| {
            let (store, started) = (store.clone(), started.clone());
            tokio::spawn(async move {
                let stream = batch[0].header.stream_id.clone();
                started.fetch_add(1, Ordering::SeqCst);
                // Queued before this task first yields.
                store.append(&stream, expected_version, &batch).await
            })
        })
        .collect();
    while started.load(Ordering::SeqCst) < count {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    tasks
}

/// One append of `events` new events to each of `count` new streams named after `name`.
fn appends_to_new_streams(
    factory: &EventFactory,
    name: &str,
    count: usize,
    events: usize,
) -> Vec<(u64, Vec<SealedEvent>)> {
    (0..count)
        .map(|i| {
            let stream = new_stream(&format!("{name}{i}"));
            (0, factory.batch(&stream, None, events))
        })
        .collect()
}

/// Starts the appends while a [`Hold`] keeps them waiting, lets them go once `blocked`
/// statements wait for the lock (so the committers hold groups of their own), and returns
/// their answers in order.
async fn appended_after_hold(
    store: &PostgresEventStore,
    pool: &PgPool,
    batches: Vec<(u64, Vec<SealedEvent>)>,
    blocked: i64,
) -> Vec<Result<AppendOutcome, StoreError>> {
    let mut hold = Hold::take(pool).await;
    let tasks = start_appends(store, batches).await;
    hold.wait_for_blocked(blocked).await;
    hold.release().await;
    finish(tasks).await
}

/// The outcomes of appends that must all succeed.
fn all_appended(results: Vec<Result<AppendOutcome, StoreError>>) -> Vec<AppendOutcome> {
    results.into_iter().map(|r| r.expect("append")).collect()
}

async fn finish<T>(tasks: Vec<JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(
            tokio::time::timeout(PROMPT_WAIT, task)
                .await
                .expect("the append is answered")
                .expect("append task"),
        );
    }
    results
}

/// Reads the global log from the start until it holds `expected` events.
async fn read_log(store: &PostgresEventStore, expected: usize) -> Vec<RecordedEvent> {
    let deadline = tokio::time::Instant::now() + PROMPT_WAIT;
    let mut all: Vec<RecordedEvent> = Vec::new();
    loop {
        let after = all.last().map_or(0, |r| r.position);
        let page = store.read_all(after, 1_000).await.expect("read_all");
        if page.is_empty() {
            if all.len() >= expected || tokio::time::Instant::now() > deadline {
                return all;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        all.extend(page);
    }
}

/// Many writers, each on its own stream: every append succeeds, at positions no other event
/// has, many of them sharing commits, and the global log yields every event once, in position
/// order, where its append said it would be.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn concurrent_appends_to_distinct_streams_share_commits_and_all_read_back(pool: PgPool) {
    const WRITERS: usize = 64;
    const APPENDS: usize = 10;
    let store = store(pool).await;
    let factory = Arc::new(EventFactory::new());
    let start = Arc::new(tokio::sync::Barrier::new(WRITERS));
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let (store, factory, start) = (store.clone(), factory.clone(), start.clone());
            tokio::spawn(async move {
                let stream = new_stream(&format!("writer{writer}"));
                let mut head = None;
                let mut appended = Vec::new();
                start.wait().await;
                for _ in 0..APPENDS {
                    let mut batch = factory.batch(&stream, head, 1);
                    let expected = head.map_or(0, |h: StreamHead| h.version);
                    let outcome = store
                        .append(&stream, expected, &batch)
                        .await
                        .expect("every append to its own stream succeeds");
                    assert_eq!(outcome.stream_version, expected + 1);
                    head = Some(StreamHead {
                        version: outcome.stream_version,
                        hash: batch[0].hash,
                    });
                    appended.push((outcome, batch.remove(0)));
                }
                appended
            })
        })
        .collect();
    let appended: Vec<(AppendOutcome, SealedEvent)> =
        finish(writers).await.into_iter().flatten().collect();
    assert_eq!(appended.len(), WRITERS * APPENDS);

    let positions: HashSet<u64> = appended.iter().map(|(o, _)| o.first_position).collect();
    assert_eq!(
        positions.len(),
        appended.len(),
        "no two events share a position"
    );
    let outcomes: Vec<AppendOutcome> = appended.iter().map(|(o, _)| *o).collect();
    let transactions = per_transaction(&outcomes);
    assert!(
        transactions.len() < appended.len(),
        "with {WRITERS} writers some appends share a commit ({} commits for {} appends)",
        transactions.len(),
        appended.len()
    );

    let log = read_log(&store, appended.len()).await;
    assert_eq!(log.len(), appended.len(), "the log holds every event once");
    assert!(
        log.windows(2).all(|w| w[0].position < w[1].position),
        "the log reads in increasing position order"
    );
    let by_position: BTreeMap<u64, &SealedEvent> =
        log.iter().map(|r| (r.position, &r.event)).collect();
    for (outcome, event) in &appended {
        assert_eq!(
            by_position.get(&outcome.first_position),
            Some(&event),
            "each event is stored where its append said"
        );
    }
}

/// Racers on the same streams at the same expected version, committed in one group: of each
/// stream's racers exactly one wins, its events are the ones stored at the positions it was
/// told, and every other racer gets the conflict naming the version it found.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn racers_on_one_stream_inside_a_group_have_one_winner(pool: PgPool) {
    const STREAMS: usize = 4;
    const RACERS: usize = 8;
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let mut heads = Vec::new();
    for s in 0..STREAMS {
        let stream = new_stream(&format!("race{s}"));
        let first = factory.batch(&stream, None, 1);
        store.append(&stream, 0, &first).await.expect("seed");
        heads.push((
            stream,
            StreamHead {
                version: 1,
                hash: first[0].hash,
            },
        ));
    }
    // Interleaved, so that sorting a group by stream has something to do.
    let mut batches = Vec::new();
    for _ in 0..RACERS {
        for (stream, head) in &heads {
            batches.push((1, factory.batch(stream, Some(*head), 2)));
        }
    }

    let results = appended_after_hold(&store, &pool, batches.clone(), 1).await;

    let mut winners: BTreeMap<StreamId, usize> = BTreeMap::new();
    let mut outcomes = Vec::new();
    for ((_, batch), result) in batches.iter().zip(results) {
        let stream = &batch[0].header.stream_id;
        match result {
            Ok(outcome) => {
                *winners.entry(stream.clone()).or_default() += 1;
                assert_eq!(outcome.stream_version, 3);
                let stored = store.read_stream(stream, 2, 10).await.expect("read");
                let stored: Vec<(u64, &SealedEvent)> =
                    stored.iter().map(|r| (r.position, &r.event)).collect();
                assert_eq!(
                    stored,
                    [
                        (outcome.first_position, &batch[0]),
                        (outcome.last_position, &batch[1])
                    ],
                    "the winner's events are stored, at the positions it was told"
                );
                outcomes.push(outcome);
            }
            Err(StoreError::Conflict {
                stream: named,
                expected,
                actual,
            }) => {
                assert_eq!(&named, stream);
                assert_eq!((expected, actual), (1, 3), "the loser learns the version");
            }
            Err(other) => panic!("a losing racer must get Conflict, got {other:?}"),
        }
    }
    assert_eq!(winners.len(), STREAMS, "every stream has a winner");
    assert!(
        winners.values().all(|&w| w == 1),
        "exactly one winner per stream: {winners:?}"
    );
    assert!(
        per_transaction(&outcomes)
            .values()
            .any(|&(appends, _)| appends > 1),
        "the winners committed together: {:?}",
        per_transaction(&outcomes)
    );
}

/// A retry of an append already stored (same event ids), committed in a group with new
/// appends: the retry gets the original outcome and stores nothing, the others are appended.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn retried_append_inside_a_group_gets_the_original_outcome(pool: PgPool) {
    const OTHERS: usize = 20;
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let retried = new_stream("retried");
    let original_batch = factory.batch(&retried, None, 3);
    let original = store
        .append(&retried, 0, &original_batch)
        .await
        .expect("the original append");
    // The stream moves on, so the retry is refused at the stream row, as retries are.
    let later = factory.batch(
        &retried,
        Some(StreamHead {
            version: 3,
            hash: original_batch[2].hash,
        }),
        1,
    );
    store
        .append(&retried, 3, &later)
        .await
        .expect("a later append");

    let mut batches = vec![(0, original_batch.clone())];
    batches.extend(appends_to_new_streams(&factory, "other", OTHERS, 1));
    let mut results = appended_after_hold(&store, &pool, batches, 1)
        .await
        .into_iter();

    assert_eq!(
        results
            .next()
            .expect("the retry's answer")
            .expect("the retry"),
        original,
        "the retry gets the original outcome"
    );
    let others: Vec<AppendOutcome> = results
        .map(|r| r.expect("the rest of the group is appended"))
        .collect();
    assert!(
        per_transaction(&others)
            .values()
            .any(|&(appends, _)| appends > 1),
        "the new appends were committed in groups"
    );
    assert_eq!(
        store
            .read_stream(&retried, 1, 100)
            .await
            .expect("read")
            .len(),
        4,
        "the retry stored nothing"
    );
    assert_eq!(read_log(&store, 4 + OTHERS).await.len(), 4 + OTHERS);
}

/// An event id reused on another stream makes its group's statement fail (a unique violation):
/// every member is then appended alone, so the reuse gets `IdempotencyConflict` as it would
/// alone, and the others are appended.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn a_failed_group_falls_back_to_appending_each_member_alone(pool: PgPool) {
    const OTHERS: usize = 20;
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let first = new_stream("first");
    let stored = factory.batch(&first, None, 1);
    store.append(&first, 0, &stored).await.expect("append");
    // The stored event's id, in a valid first event of another stream.
    let elsewhere = new_stream("elsewhere");
    let mut reused = factory.batch(&elsewhere, None, 1);
    let mut header = reused[0].header.clone();
    header.event_id = stored[0].header.event_id;
    reused[0] = seal_event(factory.signer(), &DataKey::generate(), header, b"reused id");

    let mut batches = appends_to_new_streams(&factory, "other", OTHERS, 1);
    batches.insert(OTHERS / 2, (0, reused.clone()));
    let results = appended_after_hold(&store, &pool, batches.clone(), 1).await;

    let mut appended = 0;
    for ((_, batch), result) in batches.iter().zip(results) {
        if batch[0].header.stream_id == elsewhere {
            match result {
                Err(StoreError::IdempotencyConflict { event_id }) => {
                    assert_eq!(event_id, stored[0].header.event_id);
                }
                other => panic!("the reused id must be refused, got {other:?}"),
            }
        } else {
            result.expect("the other members are appended");
            appended += 1;
        }
    }
    assert_eq!(appended, OTHERS);
    assert_eq!(store.stream_head(&elsewhere).await.expect("head"), None);
    assert_eq!(read_log(&store, 1 + OTHERS).await.len(), 1 + OTHERS);
}

/// A group whose connection is lost mid-statement (its backend terminated) leaves its outcome
/// unknown to the committer: each member is appended again alone, and every one of them ends
/// up stored exactly once.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn a_group_whose_connection_is_lost_is_appended_again_alone(pool: PgPool) {
    const APPENDS: usize = 6;
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let batches = appends_to_new_streams(&factory, "lost", APPENDS, 1);
    let mut hold = Hold::take(&pool).await;
    let tasks = start_appends(&store, batches.clone()).await;
    // The first append, alone, and the group of the others.
    hold.wait_for_blocked(2).await;
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE '%chartlog_append_group(%' \
           AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut hold.watcher)
    .await
    .expect("terminate the group's backend");
    assert_eq!(terminated, [true], "one group was in flight");
    hold.release().await;

    for ((_, batch), result) in batches.iter().zip(finish(tasks).await) {
        let outcome = result.expect("every append is stored in the end");
        let stored = store
            .read_stream(&batch[0].header.stream_id, 1, 10)
            .await
            .expect("read");
        assert_eq!(stored.len(), 1, "stored once");
        assert_eq!(stored[0].event, batch[0]);
        assert_eq!(stored[0].position, outcome.first_position);
    }
    assert_eq!(read_log(&store, APPENDS).await.len(), APPENDS);
}

/// More appends queued than one group may carry: they leave in groups of at most
/// `GROUP_APPENDS_MAX` appends, and the largest group is exactly that large.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn a_queue_longer_than_a_group_is_split_at_the_append_limit(pool: PgPool) {
    let appends = 1 + GROUP_APPENDS_MAX * (COMMITTERS + 1);
    let store = store_without_byte_limit(pool.clone()).await;
    let factory = EventFactory::new();
    let batches = appends_to_new_streams(&factory, "split", appends, 1);
    // Every committer holds a group, so at least a full group's worth is still queued.
    let outcomes =
        all_appended(appended_after_hold(&store, &pool, batches, COMMITTERS as i64).await);
    let largest = per_transaction(&outcomes)
        .values()
        .map(|&(appends, _)| appends)
        .max();
    assert_eq!(
        largest,
        Some(GROUP_APPENDS_MAX),
        "groups fill up to the limit and no further: {:?}",
        per_transaction(&outcomes)
    );
    assert_eq!(read_log(&store, appends).await.len(), appends);
}

/// Large appends queued together: a group stops before its events would pass one
/// transaction's places (`GROUP_EVENTS_MAX`), and still carries as many appends as fit.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn a_queue_with_more_events_than_a_transaction_holds_is_split(pool: PgPool) {
    const EVENTS: usize = 300;
    let fit = GROUP_EVENTS_MAX / EVENTS;
    assert!(fit > 1, "the test needs several appends to fit in a group");
    let appends = 1 + fit * (COMMITTERS + 1);
    let store = store_without_byte_limit(pool.clone()).await;
    let factory = EventFactory::new();
    let batches = appends_to_new_streams(&factory, "large", appends, EVENTS);
    let outcomes =
        all_appended(appended_after_hold(&store, &pool, batches, COMMITTERS as i64).await);
    let transactions = per_transaction(&outcomes);
    assert!(
        transactions
            .values()
            .all(|&(_, events)| events <= GROUP_EVENTS_MAX as u64),
        "no transaction holds more events than it has places: {transactions:?}"
    );
    assert_eq!(
        transactions.values().map(|&(appends, _)| appends).max(),
        Some(fit),
        "a group carries as many large appends as fit: {transactions:?}"
    );
}

/// With the default limits a group's statement stays within one TLS record (16 KiB), so
/// appends of 1 KiB events share groups, but fewer than 16 of them; an append too large to
/// share a group still succeeds, alone.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn groups_stay_within_one_tls_record(pool: PgPool) {
    const PAYLOAD: usize = 1024;
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let payload = vec![0x5a_u8; PAYLOAD];
    let one_kib = |name: String| {
        let stream = new_stream(&name);
        let event = factory.event(&stream, 1, chartlog_crypto::EventHash::GENESIS, &payload);
        (0, vec![event])
    };
    let mut batches: Vec<_> = (0..64).map(|i| one_kib(format!("kib{i}"))).collect();
    let large = new_stream("large");
    batches.insert(32, (0, factory.batch(&large, None, 40)));
    let mut outcomes =
        all_appended(appended_after_hold(&store, &pool, batches, COMMITTERS as i64).await);
    let large_outcome = outcomes.remove(32);
    let transactions = per_transaction(&outcomes);
    let largest = transactions.values().map(|&(appends, _)| appends).max();
    assert!(
        matches!(largest, Some(2..16)),
        "1 KiB appends share groups of fewer than 16: {transactions:?}"
    );
    assert!(
        !transactions.contains_key(&transaction(&large_outcome)),
        "the large append went alone"
    );
}

/// Appends waiting on a committer when the store closes get an error at once; close itself
/// finishes once the database lets the statements in flight end.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn an_append_in_flight_when_the_store_closes_gets_an_error(pool: PgPool) {
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let mut hold = Hold::take(&pool).await;
    let batches = appends_to_new_streams(&factory, "closing", COMMITTERS + 4, 1);
    let mut tasks = start_appends(&store, batches).await;
    // The first append runs alone from its own task, which close does not stop.
    let alone = tasks.remove(0);
    hold.wait_for_blocked(2).await;

    let closing = {
        let store = store.clone();
        tokio::spawn(async move { store.close().await })
    };
    for result in finish(tasks).await {
        assert!(
            result.is_err(),
            "an append the store could not finish is an error, not an outcome"
        );
    }
    // The outcome of a group whose statement had reached the server is unknown to its callers
    // (as after any lost acknowledgement); a retry would be idempotent.
    hold.release().await;
    tokio::time::timeout(PROMPT_WAIT, closing)
        .await
        .expect("close finishes")
        .expect("close task");
    tokio::time::timeout(PROMPT_WAIT, alone)
        .await
        .expect("the lone append is answered")
        .expect("append task")
        .expect("the lone append's statement was not interrupted");
    let stream = new_stream("after-close");
    let after = tokio::time::timeout(
        PROMPT_WAIT,
        store.append(&stream, 0, &factory.batch(&stream, None, 1)),
    )
    .await
    .expect("an append after close is answered");
    assert!(after.is_err(), "an append after close fails");
}

/// Nothing waits for company: an append on an idle store is committed and answered at once,
/// alone in its transaction.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn a_lone_append_is_committed_alone(pool: PgPool) {
    let store = store(pool).await;
    let factory = EventFactory::new();
    let mut outcomes = Vec::new();
    for i in 0..3 {
        let stream = new_stream(&format!("lone{i}"));
        outcomes.push(
            tokio::time::timeout(
                PROMPT_WAIT,
                store.append(&stream, 0, &factory.batch(&stream, None, 2)),
            )
            .await
            .expect("answered")
            .expect("append"),
        );
    }
    assert!(
        per_transaction(&outcomes)
            .values()
            .all(|&(appends, _)| appends == 1),
        "sequential appends never share a transaction"
    );
}
