//! The conformance suite and the data-key table against SQLite files on disk.

use std::sync::Arc;

use chartlog_store::sqlite::{self, SqliteEventStore, SqliteKeyStore};
use chartlog_store::{EventStore, conformance};

struct Database {
    store: SqliteEventStore,
    _dir: tempfile::TempDir,
}

async fn database() -> Database {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open SQLite store");
    Database { store, _dir: dir }
}

#[tokio::test]
async fn appends_and_reads_in_version_order() {
    conformance::appends_and_reads_in_version_order(&database().await.store).await;
}

#[tokio::test]
async fn refuses_malformed_batches() {
    conformance::refuses_malformed_batches(&database().await.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_have_one_winner() {
    conformance::racing_writers_have_one_winner(&database().await.store, 16).await;
}

#[tokio::test]
async fn retried_append_returns_the_original_outcome() {
    conformance::retried_append_returns_the_original_outcome(&database().await.store).await;
}

#[tokio::test]
async fn reused_event_id_with_another_body_is_refused() {
    conformance::reused_event_id_with_another_body_is_refused(&database().await.store).await;
}

#[tokio::test]
async fn batch_chained_to_another_head_is_refused() {
    conformance::batch_chained_to_another_head_is_refused(&database().await.store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn global_log_yields_every_event_once_in_order() {
    conformance::global_log_yields_every_event_once_in_order(&database().await.store, 8, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_resumes_from_its_checkpoint() {
    let database = database().await;
    conformance::subscription_resumes_from_its_checkpoint(Arc::new(database.store.clone())).await;
}

#[tokio::test]
async fn data_keys_are_kept_destroyed_and_rewrapped() {
    let database = database().await;
    let keys = SqliteKeyStore::new(database.store.pool().clone());
    conformance::key_store_lifecycle(&keys).await;
}

#[tokio::test]
async fn stored_events_cannot_be_rewritten() {
    let database = database().await;
    conformance::appends_and_reads_in_version_order(&database.store).await;
    for statement in [
        "UPDATE chartlog_events SET ciphertext = x'00'",
        "DELETE FROM chartlog_events",
    ] {
        let refused = sqlx::query(statement).execute(database.store.pool()).await;
        assert!(refused.is_err(), "{statement} must be refused");
    }
}

#[tokio::test]
async fn database_runs_in_wal_mode_with_full_sync() {
    let database = database().await;
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(database.store.pool())
        .await
        .expect("journal_mode");
    assert_eq!(mode, "wal");
    // 2 = FULL: a commit is fsynced before the append returns.
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(database.store.pool())
        .await
        .expect("synchronous");
    assert_eq!(synchronous, 2);
}

/// Appends queued behind the write lock are committed together (group commit), and each gets
/// the answer it would have got alone, in the order they queued: new streams are created, an
/// append continuing another member of the same group follows it, a racer at a version the
/// group has already moved past is refused, and every stored event is where its answer says.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_queued_behind_the_lock_are_answered_as_if_alone() {
    use chartlog_domain::StreamId;
    use chartlog_store::conformance::EventFactory;
    use chartlog_store::{EventStore, StoreError, StreamHead};

    let database = database().await;
    let store = database.store.clone();
    let factory = Arc::new(EventFactory::new());
    let stream = |n: usize| StreamId::parse(&format!("group-{n}")).expect("a valid stream id");

    // The first batch of stream 0, and a second one chained to it, both queued in one group.
    let opening = factory.batch(&stream(0), None, 2);
    let continuation = factory.batch(
        &stream(0),
        Some(StreamHead {
            version: 2,
            hash: opening[1].hash,
        }),
        3,
    );
    // A rival to the opening batch, queued after it: the group has moved the stream on.
    let rival = factory.batch(&stream(0), None, 1);

    let writer = chartlog_store::sqlite::write_lock(store.pool());
    let held = writer.lock().await;
    let mut queued = Vec::new();
    let spawn_append = |stream: StreamId, expected: u64, events: Vec<_>| {
        let store = store.clone();
        tokio::spawn(async move { store.append(&stream, expected, &events).await })
    };
    // One at a time, so that they queue in this order.
    let settle = || tokio::time::sleep(std::time::Duration::from_millis(20));
    queued.push(spawn_append(stream(0), 0, opening.clone()));
    settle().await;
    queued.push(spawn_append(stream(0), 2, continuation.clone()));
    settle().await;
    queued.push(spawn_append(stream(0), 0, rival));
    settle().await;
    let mut others = Vec::new();
    for n in 1..=20 {
        let events = factory.batch(&stream(n), None, 1 + n % 3);
        others.push(events.clone());
        queued.push(spawn_append(stream(n), 0, events));
    }
    settle().await;
    drop(held);

    let mut answers = Vec::new();
    for task in queued {
        answers.push(task.await.expect("append task"));
    }
    let opened = answers[0].as_ref().expect("the opening batch is stored");
    assert_eq!(opened.stream_version, 2);
    let continued = answers[1].as_ref().expect("the continuation is stored");
    assert_eq!(continued.stream_version, 5);
    assert_eq!(continued.first_position, opened.last_position + 1);
    match &answers[2] {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => assert_eq!((*expected, *actual), (0, 5)),
        other => panic!("the rival must meet a conflict, got {other:?}"),
    }

    // Every answer names the positions its events hold in the global log.
    let log = store.read_all(0, 1_000).await.expect("read the log");
    let stored_at = |position: u64| {
        log.iter()
            .find(|recorded| recorded.position == position)
            .map(|recorded| recorded.event.header.event_id)
    };
    let mut expected_batches = vec![opening, continuation];
    expected_batches.extend(others);
    let stored_answers = answers
        .iter()
        .enumerate()
        .filter(|(index, _)| *index != 2)
        .map(|(_, answer)| answer.as_ref().expect("stored"));
    let mut events_stored = 0;
    for (batch, answer) in expected_batches.iter().zip(stored_answers) {
        assert_eq!(
            answer.last_position - answer.first_position + 1,
            batch.len() as u64,
            "an append's events sit together in the log"
        );
        for (offset, event) in batch.iter().enumerate() {
            assert_eq!(
                stored_at(answer.first_position + offset as u64),
                Some(event.header.event_id),
                "each event is where its answer says"
            );
        }
        events_stored += batch.len();
    }
    assert_eq!(log.len(), events_stored, "the rival stored nothing");
    for n in 1..=20 {
        let head = store
            .stream_head(&stream(n))
            .await
            .expect("read a head")
            .expect("the stream exists");
        assert_eq!(head.version, (1 + n % 3) as u64);
    }
}

/// An event id reused on another stream fails its group's insert as a whole (a unique
/// violation): every member then goes again alone, so the reuse is refused as it would be alone
/// and the others are stored, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_group_falls_back_to_appending_each_member_alone() {
    use chartlog_crypto::{DataKey, seal_event};
    use chartlog_domain::StreamId;
    use chartlog_store::conformance::EventFactory;
    use chartlog_store::{EventStore, StoreError};

    let database = database().await;
    let store = database.store.clone();
    let factory = EventFactory::new();
    let stream = |n: usize| StreamId::parse(&format!("fallback-{n}")).expect("a valid stream id");
    let stored = factory.batch(&stream(0), None, 1);
    store
        .append(&stream(0), 0, &stored)
        .await
        .expect("the first event is stored");
    // The stored event's id, in a valid first event of another stream.
    let mut reused = factory.batch(&stream(1), None, 1);
    let mut header = reused[0].header.clone();
    header.event_id = stored[0].header.event_id;
    reused[0] = seal_event(factory.signer(), &DataKey::generate(), header, b"reused id");

    let writer = chartlog_store::sqlite::write_lock(store.pool());
    let held = writer.lock().await;
    let mut queued = Vec::new();
    for n in 1..=8 {
        let events = if n == 1 {
            reused.clone()
        } else {
            factory.batch(&stream(n), None, 1)
        };
        let store = store.clone();
        queued.push(tokio::spawn(async move {
            store.append(&stream(n), 0, &events).await
        }));
    }
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(held);

    let mut answers = Vec::new();
    for task in queued {
        answers.push(task.await.expect("append task"));
    }
    match &answers[0] {
        Err(StoreError::IdempotencyConflict { event_id }) => {
            assert_eq!(*event_id, stored[0].header.event_id);
        }
        other => panic!("the reused id must be refused, got {other:?}"),
    }
    for answer in &answers[1..] {
        assert_eq!(answer.as_ref().expect("stored alone").stream_version, 1);
    }
    assert_eq!(store.stream_head(&stream(1)).await.expect("head"), None);
    let log = store.read_all(0, 100).await.expect("read the log");
    assert_eq!(log.len(), 1 + 7, "nothing stored twice, nothing lost");
}

#[tokio::test]
async fn the_log_head_is_the_last_position_appended() {
    let database = database().await;
    let store = &database.store;
    assert_eq!(store.log_head_position().await.expect("head"), 0, "empty");
    let factory = conformance::EventFactory::new();
    let mut last = 0;
    for name in ["first", "second"] {
        let stream = chartlog_domain::StreamId::parse(&format!("patient-{}", uuid::Uuid::new_v4()))
            .unwrap_or_else(|_| panic!("{name} stream id"));
        let outcome = store
            .append(&stream, 0, &factory.batch(&stream, None, 3))
            .await
            .expect("append");
        assert!(outcome.last_position > last);
        last = outcome.last_position;
        assert_eq!(store.log_head_position().await.expect("head"), last);
    }
}

/// The read models have a file of their own next to the log, with a write lock of their own:
/// a write to them goes while the log's lock is held, as the runner's do while appends commit.
/// Derived, that file commits without an fsync; the log's keeps its full one.
#[tokio::test]
async fn the_read_models_have_a_file_and_a_write_lock_of_their_own() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("chartlog.db");
    let (store, read_models) = sqlite::open_log_and_read_models(&log).await.expect("open");
    assert_eq!(
        sqlite::read_models_path(&log),
        dir.path().join("chartlog.read-models.db")
    );
    assert!(sqlite::read_models_path(&log).is_file());

    let log_lock = sqlite::write_lock(store.pool());
    let read_model_lock = sqlite::write_lock(&read_models);
    assert!(!Arc::ptr_eq(&log_lock, &read_model_lock), "two locks");
    let _appends_wait = log_lock.lock().await;
    let _writer = read_model_lock.lock().await;
    let mut tx = read_models
        .begin_with("BEGIN IMMEDIATE")
        .await
        .expect("a write transaction on the read models while the log's lock is held");
    sqlx::query(
        "INSERT INTO chartlog_projection_checkpoints (name, version, position, updated_at_us) \
         VALUES ('chart', 1, 7, 0)",
    )
    .execute(&mut *tx)
    .await
    .expect("write a checkpoint");
    tx.commit().await.expect("commit");

    let synchronous = |pool: sqlx::SqlitePool| async move {
        sqlx::query_scalar::<_, i64>("PRAGMA synchronous")
            .fetch_one(&pool)
            .await
            .expect("synchronous")
    };
    assert_eq!(
        synchronous(store.pool().clone()).await,
        2,
        "FULL on the log"
    );
    assert_eq!(
        synchronous(read_models.clone()).await,
        1,
        "NORMAL on the read models"
    );
    store.pool().close().await;
    read_models.close().await;
}

/// Read models next to a log that is not there were folded from another log: opening a new
/// log removes them, while reopening the same log keeps them.
#[tokio::test]
async fn read_models_go_with_their_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("chartlog.db");
    let checkpoints = |pool: sqlx::SqlitePool| async move {
        let count =
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM chartlog_projection_checkpoints")
                .fetch_one(&pool)
                .await
                .expect("count");
        pool.close().await;
        count
    };

    let (store, read_models) = sqlite::open_log_and_read_models(&log).await.expect("open");
    sqlx::query(
        "INSERT INTO chartlog_projection_checkpoints (name, version, position, updated_at_us) \
         VALUES ('chart', 1, 7, 0)",
    )
    .execute(&read_models)
    .await
    .expect("write a checkpoint");
    store.pool().close().await;
    assert_eq!(checkpoints(read_models).await, 1);

    let (store, read_models) = sqlite::open_log_and_read_models(&log)
        .await
        .expect("reopen");
    store.pool().close().await;
    assert_eq!(checkpoints(read_models).await, 1, "kept with their log");

    for suffix in ["", "-wal", "-shm"] {
        let mut file = log.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    let (store, read_models) = sqlite::open_log_and_read_models(&log)
        .await
        .expect("new log");
    store.pool().close().await;
    assert_eq!(checkpoints(read_models).await, 0, "removed with a new log");
}
