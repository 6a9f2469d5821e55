//! The signed audit log against real databases: rows recorded by concurrent callers become
//! signed events on an audit stream, the audit projection folds every row exactly once, the
//! log verifies, and a tampered audit event is found.

use std::sync::Arc;

use chartlog_crypto::{
    DataKeys, EventSigner, KekId, KeyRing, KeyStore, SignatureVerifier, SignerKeyId,
};
use chartlog_domain::{Actor, PatientId, PurposeOfUse, Role, Timestamp, UserId};
use chartlog_projections::ProjectionRunner;
use chartlog_projections::audit::{
    AuditAction, AuditEntity, AuditOutcome, AuditRow, AuditTrailProjection,
};
use chartlog_projections::audit_log::{AUDIT_RECORDED_EVENT_TYPE, AuditLog, new_audit_stream};
use chartlog_projections::audit_queries::{AuditFilter, read_audit_trail};
use chartlog_projections::db::ProjectionDb;
use chartlog_store::EventStore;
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::verify::verify_log;
use sqlx::PgPool;
use uuid::Uuid;

const ROWS: usize = 120;

fn row(n: usize) -> AuditRow {
    AuditRow {
        audit_id: Uuid::now_v7(),
        occurred_at: Timestamp::from_unix_micros(1_763_000_000_000_000 + n as i64)
            .expect("in range"),
        actor: Some(Actor {
            user_id: UserId::from_uuid(Uuid::from_u128(0xd0c)),
            role: Role::Nurse,
            purpose_of_use: PurposeOfUse::EmergencyTreatment,
            break_glass: n.is_multiple_of(2),
        }),
        patient_id: Some(PatientId::from_uuid(Uuid::from_u128(7))),
        entity: Some(AuditEntity::Patient),
        record_id: None,
        action: AuditAction::Read,
        outcome: if n.is_multiple_of(3) {
            AuditOutcome::Denied
        } else {
            AuditOutcome::Success
        },
        client_address: Some("192.0.2.7".parse().expect("address")),
        event_type: None,
    }
}

async fn recorded_rows_are_signed_events_folded_once<S, K>(store: S, keys: K, db: ProjectionDb)
where
    S: EventStore,
    K: KeyStore + 'static,
{
    let signer = Arc::new(EventSigner::generate(SignerKeyId::generate()));
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust");
    let verifier = Arc::new(verifier);
    let store = Arc::new(store);
    let keys = Arc::new(DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        keys,
    ));
    let stream = new_audit_stream();
    let log = AuditLog::spawn(store.clone(), keys.clone(), signer, stream.clone());

    // Many callers at once: each returns only when its rows are durable.
    let expected: Vec<AuditRow> = (0..ROWS).map(row).collect();
    let mut callers = Vec::new();
    for pair in expected.chunks(2) {
        let log = log.clone();
        let pair = pair.to_vec();
        callers.push(tokio::spawn(async move { log.record(pair).await }));
    }
    for caller in callers {
        caller.await.expect("caller").expect("recorded");
    }

    let events = store.read_stream(&stream, 1, 10_000).await.expect("stream");
    assert!(!events.is_empty());
    assert!(
        events.len() <= ROWS / 2,
        "group commit: never more events than callers"
    );
    assert!(
        events
            .iter()
            .all(|event| event.event.header.event_type == AUDIT_RECORDED_EVENT_TYPE)
    );
    let report = verify_log(store.as_ref(), &verifier).await.expect("verify");
    assert!(report.is_intact(), "{report:?}");

    let runner = ProjectionRunner::new(
        store.clone(),
        keys.clone(),
        verifier.clone(),
        db.clone(),
        vec![Arc::new(AuditTrailProjection)],
    );
    runner.catch_up().await.expect("fold");
    // Twice: a replay must not duplicate a row.
    runner.rebuild().await.expect("rebuild");
    let page = read_audit_trail(&db, &AuditFilter::default(), None, 500)
        .await
        .expect("read");
    assert_eq!(page.rows.len(), ROWS, "every row, once");
    let mut read: Vec<AuditRow> = page.rows;
    let mut wanted = expected;
    read.sort_by_key(|row| row.audit_id);
    wanted.sort_by_key(|row| row.audit_id);
    assert_eq!(read, wanted, "rows come back as recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_recorded_rows_are_signed_events_folded_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    let keys = SqliteKeyStore::new(store.pool().clone());
    let db = ProjectionDb::Sqlite(store.pool().clone());
    recorded_rows_are_signed_events_folded_once(store, keys, db).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_recorded_rows_are_signed_events_folded_once(pool: PgPool) {
    let store = PostgresEventStore::from_pool(pool.clone())
        .await
        .expect("store");
    recorded_rows_are_signed_events_folded_once(
        store,
        PostgresKeyStore::new(pool.clone()),
        ProjectionDb::Postgres(pool),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_audit_event_is_found() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    let pool = store.pool().clone();
    let signer = Arc::new(EventSigner::generate(SignerKeyId::generate()));
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust");
    let store = Arc::new(store);
    let keys = Arc::new(DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        SqliteKeyStore::new(pool.clone()),
    ));
    let log = AuditLog::spawn(store.clone(), keys, signer, new_audit_stream());
    log.record(vec![row(1), row(2)]).await.expect("recorded");

    // An insider with file access edits the stored row, bypassing the append-only triggers.
    sqlx::query("DROP TRIGGER chartlog_events_no_update")
        .execute(&pool)
        .await
        .expect("drop trigger");
    let mut ciphertext: Vec<u8> =
        sqlx::query_scalar("SELECT ciphertext FROM chartlog_events ORDER BY position LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("ciphertext");
    ciphertext[20] ^= 0x01;
    sqlx::query("UPDATE chartlog_events SET ciphertext = ?1")
        .bind(ciphertext)
        .execute(&pool)
        .await
        .expect("tamper");
    let report = verify_log(store.as_ref(), &verifier).await.expect("verify");
    assert!(!report.is_intact(), "the edited audit event is found");
}
