//! Decision-state snapshots against real databases: a load from a snapshot plus the events
//! after it gives exactly what folding the whole stream gives, and a snapshot that cannot be
//! trusted (another state schema, tampered, another patient's, erased) is never folded onto.

use std::sync::Arc;

use chartlog_crypto::{
    DataKeys, EventSigner, KekId, KeyRing, KeyStore, SignatureVerifier, SignerKeyId,
};
use chartlog_domain::patient::{DECISION_STATE_SCHEMA_VERSION, ErasureReason};
use chartlog_domain::{
    Actor, PatientCommand, PatientId, PurposeOfUse, Role, StreamId, Timestamp, UserId, synthetic,
};
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore, PostgresSnapshotStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore, SqliteSnapshotStore};
use chartlog_store::{EventStore, LedgerError, PatientLedger, SnapshotStore};
use proptest::prelude::*;
use sqlx::PgPool;
use uuid::Uuid;

fn now() -> Timestamp {
    Timestamp::from_unix_micros(1_763_000_000_000_000).expect("in range")
}

fn physician() -> Actor {
    Actor {
        user_id: UserId::from_uuid(Uuid::now_v7()),
        role: Role::Physician,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    }
}

/// Two ledgers over one store and one set of keys: one folds whole streams, the other uses
/// snapshots. Whatever one writes, the other must load identically.
struct Ledgers<S: EventStore, K: KeyStore> {
    folding: PatientLedger<S, K>,
    snapshotting: PatientLedger<S, K>,
    snapshots: Arc<dyn SnapshotStore>,
}

fn ledgers<S: EventStore, K: KeyStore>(
    store: S,
    keys: K,
    snapshots: Arc<dyn SnapshotStore>,
    every_events: u64,
) -> Ledgers<S, K> {
    let signer = Arc::new(EventSigner::generate(SignerKeyId::generate()));
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust");
    let verifier = Arc::new(verifier);
    let keys = Arc::new(DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        keys,
    ));
    let store = Arc::new(store);
    let folding = PatientLedger::new(store, keys, signer, verifier);
    let snapshotting = folding
        .clone()
        .with_snapshots(snapshots.clone(), every_events);
    Ledgers {
        folding,
        snapshotting,
        snapshots,
    }
}

/// Registers a patient and records `commands` synthetic clinical commands through the
/// snapshotting ledger, checking against a whole-stream fold every `check_every` commands.
async fn record_history<S: EventStore, K: KeyStore>(
    ledgers: &Ledgers<S, K>,
    seed: u64,
    commands: u64,
    check_every: u64,
) -> PatientId {
    let patient = synthetic::patient_id(seed);
    let actor = physician();
    ledgers
        .snapshotting
        .execute(patient, synthetic::registration(seed), actor, now())
        .await
        .expect("register");
    for n in 0..commands {
        ledgers
            .snapshotting
            .execute(
                patient,
                synthetic::clinical_command(seed, n, now()),
                actor,
                now(),
            )
            .await
            .expect("clinical command");
        if n % check_every == 0 {
            assert_loads_agree(ledgers, patient).await;
        }
    }
    assert_loads_agree(ledgers, patient).await;
    patient
}

async fn assert_loads_agree<S: EventStore, K: KeyStore>(
    ledgers: &Ledgers<S, K>,
    patient: PatientId,
) {
    let folded = ledgers.folding.load(patient).await.expect("full fold");
    let from_snapshot = ledgers
        .snapshotting
        .load(patient)
        .await
        .expect("snapshot load");
    assert_eq!(from_snapshot.head, folded.head, "same head");
    assert_eq!(from_snapshot.patient, folded.patient, "same decision state");
}

async fn snapshot_plus_tail_equals_the_full_fold<S: EventStore, K: KeyStore>(
    ledgers: Ledgers<S, K>,
    seed: u64,
    commands: u64,
    every_events: u64,
) {
    let patient = record_history(&ledgers, seed, commands, 4).await;
    let stream = StreamId::patient(patient);
    let stored = ledgers.snapshots.latest(&stream).await.expect("latest");
    let version = commands + 1;
    match stored {
        Some(stored) => {
            assert_eq!(
                stored.stream_version,
                version - version % every_events,
                "the snapshot is taken at the last multiple of {every_events}"
            );
            assert_eq!(stored.schema_version, DECISION_STATE_SCHEMA_VERSION);
        }
        None => assert!(version < every_events, "no snapshot of {version} events"),
    }
}

async fn untrusted_snapshots_are_ignored_and_replaced<S: EventStore, K: KeyStore>(
    ledgers: Ledgers<S, K>,
) {
    let first = record_history(&ledgers, 31, 24, 50).await;
    let second = record_history(&ledgers, 32, 24, 50).await;
    let first_stream = StreamId::patient(first);
    let second_stream = StreamId::patient(second);
    let good = ledgers
        .snapshots
        .latest(&first_stream)
        .await
        .expect("latest")
        .expect("a snapshot of 25 events taken every 10");
    assert_eq!(good.stream_version, 20);

    // Another state schema, older or newer: ignored, and replaced by the current one.
    for schema_version in [
        DECISION_STATE_SCHEMA_VERSION - 1,
        DECISION_STATE_SCHEMA_VERSION + 1,
    ] {
        let mut other_schema = good.clone();
        other_schema.schema_version = schema_version;
        ledgers
            .snapshots
            .save(&first_stream, &other_schema)
            .await
            .expect("save");
        assert_eq!(
            ledgers
                .snapshots
                .latest(&first_stream)
                .await
                .expect("latest"),
            Some(other_schema)
        );
        assert_loads_agree(&ledgers, first).await;
        let rebuilt = ledgers
            .snapshots
            .latest(&first_stream)
            .await
            .expect("latest")
            .expect("rebuilt");
        assert_eq!(rebuilt.schema_version, DECISION_STATE_SCHEMA_VERSION);
        assert_eq!(
            rebuilt.stream_version, 25,
            "rebuilt at the head it folded to"
        );
    }

    // Tampered ciphertext, a version it was not taken at, a head hash it was not taken at,
    // and the other patient's snapshot under this patient's stream: none opens.
    let current = ledgers
        .snapshots
        .latest(&first_stream)
        .await
        .expect("latest")
        .expect("snapshot");
    let mut tampered = current.clone();
    let last = tampered.sealed.len() - 1;
    tampered.sealed[last] ^= 1;
    let mut wrong_version = current.clone();
    wrong_version.stream_version = 10;
    let mut wrong_head = current.clone();
    wrong_head.head_hash = good.head_hash;
    let foreign = ledgers
        .snapshots
        .latest(&second_stream)
        .await
        .expect("latest")
        .expect("snapshot");
    for (what, bad) in [
        ("tampered", tampered),
        ("wrong version", wrong_version),
        ("wrong head", wrong_head),
        ("another patient's", foreign),
    ] {
        ledgers
            .snapshots
            .discard(&first_stream)
            .await
            .expect("discard");
        ledgers
            .snapshots
            .save(&first_stream, &bad)
            .await
            .expect("save");
        assert_loads_agree(&ledgers, first).await;
        let replaced = ledgers
            .snapshots
            .latest(&first_stream)
            .await
            .expect("latest")
            .expect("a good snapshot in its place");
        assert_ne!(replaced, bad, "{what} snapshot still stored");
        assert_eq!(replaced.stream_version, 25, "{what}");
    }
}

async fn erasure_drops_the_snapshot<S: EventStore, K: KeyStore>(ledgers: Ledgers<S, K>) {
    let patient = record_history(&ledgers, 41, 12, 50).await;
    let stream = StreamId::patient(patient);
    assert!(
        ledgers
            .snapshots
            .latest(&stream)
            .await
            .expect("latest")
            .is_some()
    );
    ledgers
        .snapshotting
        .execute(
            patient,
            PatientCommand::ErasePatient {
                reason: ErasureReason::PatientRequest,
            },
            physician(),
            now(),
        )
        .await
        .expect("erase");
    assert_eq!(
        ledgers.snapshots.latest(&stream).await.expect("latest"),
        None
    );
    assert!(matches!(
        ledgers.snapshotting.load(patient).await,
        Err(LedgerError::Erased { .. })
    ));
}

// ---- SQLite ----

async fn sqlite(
    every_events: u64,
) -> (Ledgers<SqliteEventStore, SqliteKeyStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    let keys = SqliteKeyStore::new(store.pool().clone());
    let snapshots = Arc::new(SqliteSnapshotStore::new(store.pool().clone()));
    (ledgers(store, keys, snapshots, every_events), dir)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]

    /// Random histories (synthetic clinical commands of every kind, seeded) and random
    /// snapshot intervals, checked every fourth command.
    #[test]
    fn sqlite_snapshot_plus_tail_equals_the_full_fold(
        seed in 0u64..1_000_000_000,
        commands in 0u64..60,
        every_events in 1u64..25,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let (ledgers, _dir) = sqlite(every_events).await;
            snapshot_plus_tail_equals_the_full_fold(ledgers, seed, commands, every_events).await;
        });
    }
}

#[tokio::test]
async fn sqlite_untrusted_snapshots_are_ignored_and_replaced() {
    let (ledgers, _dir) = sqlite(10).await;
    untrusted_snapshots_are_ignored_and_replaced(ledgers).await;
}

#[tokio::test]
async fn sqlite_erasure_drops_the_snapshot() {
    let (ledgers, _dir) = sqlite(5).await;
    erasure_drops_the_snapshot(ledgers).await;
}

// ---- PostgreSQL ----

async fn postgres(
    pool: PgPool,
    every_events: u64,
) -> Ledgers<PostgresEventStore, PostgresKeyStore> {
    let store = PostgresEventStore::from_pool(pool.clone())
        .await
        .expect("store");
    let snapshots = Arc::new(PostgresSnapshotStore::new(pool.clone()));
    ledgers(store, PostgresKeyStore::new(pool), snapshots, every_events)
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_snapshot_plus_tail_equals_the_full_fold(pool: PgPool) {
    for (seed, commands, every_events) in [(7, 40, 6), (8, 33, 11), (9, 5, 1)] {
        let ledgers = postgres(pool.clone(), every_events).await;
        snapshot_plus_tail_equals_the_full_fold(ledgers, seed, commands, every_events).await;
    }
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_untrusted_snapshots_are_ignored_and_replaced(pool: PgPool) {
    untrusted_snapshots_are_ignored_and_replaced(postgres(pool, 10).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_erasure_drops_the_snapshot(pool: PgPool) {
    erasure_drops_the_snapshot(postgres(pool, 5).await).await;
}
