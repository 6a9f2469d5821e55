//! The conformance suite and the data-key table against SQLite files on disk.

use std::sync::Arc;

use chartlog_store::conformance;
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};

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
