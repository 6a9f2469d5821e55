//! The conformance suite and the data-key table against PostgreSQL: each test gets a fresh
//! database from `#[sqlx::test]` (DATABASE_URL names the server).

use std::sync::Arc;
use std::time::Duration;

use chartlog_domain::StreamId;
use chartlog_store::conformance::{self, EventFactory};
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore, append_in_transaction};
use chartlog_store::{EventStore, Subscription};
use sqlx::PgPool;

async fn store(pool: PgPool) -> PostgresEventStore {
    PostgresEventStore::from_pool(pool).await.expect("store")
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn appends_and_reads_in_version_order(pool: PgPool) {
    conformance::appends_and_reads_in_version_order(&store(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn refuses_malformed_batches(pool: PgPool) {
    conformance::refuses_malformed_batches(&store(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn racing_writers_have_one_winner(pool: PgPool) {
    conformance::racing_writers_have_one_winner(&store(pool).await, 16).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn retried_append_returns_the_original_outcome(pool: PgPool) {
    conformance::retried_append_returns_the_original_outcome(&store(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn reused_event_id_with_another_body_is_refused(pool: PgPool) {
    conformance::reused_event_id_with_another_body_is_refused(&store(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn batch_chained_to_another_head_is_refused(pool: PgPool) {
    conformance::batch_chained_to_another_head_is_refused(&store(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn global_log_yields_every_event_once_in_order(pool: PgPool) {
    conformance::global_log_yields_every_event_once_in_order(&store(pool).await, 16, 20).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn subscription_resumes_from_its_checkpoint(pool: PgPool) {
    conformance::subscription_resumes_from_its_checkpoint(Arc::new(store(pool).await)).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn data_keys_are_kept_destroyed_and_rewrapped(pool: PgPool) {
    conformance::key_store_lifecycle(&PostgresKeyStore::new(pool)).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn stored_events_cannot_be_rewritten(pool: PgPool) {
    let store = store(pool.clone()).await;
    conformance::appends_and_reads_in_version_order(&store).await;
    for statement in [
        "UPDATE chartlog_events SET ciphertext = '\\x00'",
        "DELETE FROM chartlog_events",
        "TRUNCATE chartlog_events",
    ] {
        let refused = sqlx::query(statement).execute(&pool).await;
        assert!(refused.is_err(), "{statement} must be refused");
    }
}

/// The sequence-gap problem: transaction A takes position p and stays open; transaction B
/// takes p+1 and commits. A reader must not return p+1 before A finishes, or a checkpoint at
/// p+1 would skip p forever.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn late_commit_below_a_read_position_is_not_skipped(pool: PgPool) {
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let slow = StreamId::parse("patient-slow").expect("stream id");
    let fast = StreamId::parse("patient-fast").expect("stream id");

    let mut subscription = Subscription::new(Arc::new(store.clone()), 0, 100);

    let mut open = pool.begin().await.expect("begin");
    let slow_batch = factory.batch(&slow, None, 2);
    let slow_outcome = append_in_transaction(&mut open, &slow, 0, &slow_batch)
        .await
        .expect("append inside the open transaction");

    let fast_batch = factory.batch(&fast, None, 1);
    let fast_outcome = store
        .append(&fast, 0, &fast_batch)
        .await
        .expect("append and commit");
    assert!(
        fast_outcome.first_position > slow_outcome.last_position,
        "the committed event sits above the open transaction's positions"
    );

    assert!(
        store.read_all(0, 100).await.expect("read_all").is_empty(),
        "nothing above an open transaction's positions is readable"
    );
    let held_back =
        tokio::time::timeout(Duration::from_millis(600), subscription.next_batch()).await;
    assert!(
        held_back.is_err(),
        "the subscriber waits instead of skipping ahead"
    );

    open.commit().await.expect("commit the slow transaction");

    let mut delivered = Vec::new();
    while delivered.len() < 3 {
        let batch = tokio::time::timeout(conformance::PROMPT_WAIT, subscription.next_batch())
            .await
            .expect("delivered once the slow transaction commits")
            .expect("next_batch");
        delivered.extend(batch.into_iter().map(|r| r.position));
    }
    assert_eq!(
        delivered,
        [
            slow_outcome.first_position,
            slow_outcome.last_position,
            fast_outcome.first_position
        ],
        "every event, in position order, none skipped"
    );
}

/// A rolled-back append leaves a hole in the positions, not a stuck reader.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn rolled_back_append_leaves_a_gap_readers_pass(pool: PgPool) {
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let aborted = StreamId::parse("patient-aborted").expect("stream id");
    let kept = StreamId::parse("patient-kept").expect("stream id");

    let mut open = pool.begin().await.expect("begin");
    let rolled_back =
        append_in_transaction(&mut open, &aborted, 0, &factory.batch(&aborted, None, 1))
            .await
            .expect("append inside the transaction");
    open.rollback().await.expect("rollback");

    let outcome = store
        .append(&kept, 0, &factory.batch(&kept, None, 1))
        .await
        .expect("append");
    // Readable once every older transaction in the cluster has finished.
    let mut all = Vec::new();
    for _ in 0..1_000 {
        all = store.read_all(0, 100).await.expect("read_all");
        if !all.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].position, outcome.first_position);
    assert!(
        outcome.first_position > rolled_back.last_position,
        "the aborted append's positions stay unused, below the next append's"
    );
    assert_eq!(store.stream_head(&aborted).await.expect("head"), None);
}

/// The notification listener holds a pooled connection; closing must not wait on it forever.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn close_finishes_while_listening(pool: PgPool) {
    let store = store(pool).await;
    tokio::time::timeout(Duration::from_secs(5), store.close())
        .await
        .expect("close returns promptly");
    assert!(store.pool().is_closed());
}

/// Another process's appends reach this process's subscribers through LISTEN/NOTIFY.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn appends_are_announced_to_other_processes(pool: PgPool) {
    let options = pool.connect_options();
    let other_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with((*options).clone())
        .await
        .expect("second pool");
    let writer = PostgresEventStore::from_pool(other_pool)
        .await
        .expect("writer");
    let reader = store(pool).await;
    let mut heard = reader.append_notifications();
    heard.borrow_and_update();

    let factory = EventFactory::new();
    let stream = StreamId::parse("patient-announced").expect("stream id");
    writer
        .append(&stream, 0, &factory.batch(&stream, None, 1))
        .await
        .expect("append in the other process");
    tokio::time::timeout(conformance::PROMPT_WAIT, heard.changed())
        .await
        .expect("the reader hears of the other process's append")
        .expect("notifications open");
    writer.close().await;
    reader.close().await;
}

/// One transaction may append to several streams; its events take consecutive positions.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn one_transaction_appends_to_several_streams(pool: PgPool) {
    let store = store(pool.clone()).await;
    let factory = EventFactory::new();
    let first = StreamId::parse("patient-first").expect("stream id");
    let second = StreamId::parse("patient-second").expect("stream id");
    let mut tx = pool.begin().await.expect("begin");
    let a = append_in_transaction(&mut tx, &first, 0, &factory.batch(&first, None, 3))
        .await
        .expect("first append");
    let b = append_in_transaction(&mut tx, &second, 0, &factory.batch(&second, None, 2))
        .await
        .expect("second append");
    tx.commit().await.expect("commit");
    assert_eq!(b.first_position, a.last_position + 1);
    let mut all = Vec::new();
    for _ in 0..1_000 {
        all = store.read_all(0, 100).await.expect("read_all");
        if all.len() == 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let positions: Vec<u64> = all.iter().map(|r| r.position).collect();
    assert_eq!(
        positions,
        (a.first_position..=b.last_position).collect::<Vec<_>>()
    );
}
