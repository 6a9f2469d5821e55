//! The command path end to end against real databases: commands become sealed, signed,
//! chained events; rejected commands store nothing; erasure leaves a verifiable log nobody
//! can read; tampering is found.

use std::sync::Arc;

use chartlog_crypto::{
    DataKeys, EventSigner, KekId, KeyRing, KeyStore, SignatureVerifier, SignerKeyId,
};
use chartlog_domain::patient::{ErasureReason, RetentionBasis, RetentionPolicy};
use chartlog_domain::phi::BirthDate;
use chartlog_domain::{
    Actor, PatientCommand, PatientId, PurposeOfUse, Rejection, Role, StreamId, Timestamp, UserId,
    synthetic,
};
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::verify::{BreakKind, verify_log, verify_stream};
use chartlog_store::{EventStore, ExecuteOptions, LedgerError, PatientLedger};
use sqlx::PgPool;
use time::macros::datetime;
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

struct Fixture<S: EventStore, K: KeyStore> {
    ledger: PatientLedger<S, K>,
    verifier: SignatureVerifier,
}

fn fixture<S: EventStore, K: KeyStore>(store: S, keys: K) -> Fixture<S, K> {
    let signer = EventSigner::generate(SignerKeyId::generate());
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust");
    let keys = DataKeys::new(Arc::new(KeyRing::generate(KekId::generate())), keys);
    Fixture {
        ledger: PatientLedger::new(
            Arc::new(store),
            Arc::new(keys),
            Arc::new(signer),
            Arc::new(verifier.clone()),
        ),
        verifier,
    }
}

async fn register_with_history<S: EventStore, K: KeyStore>(
    fixture: &Fixture<S, K>,
    seed: u64,
    commands: u64,
) -> PatientId {
    let patient = synthetic::patient_id(seed);
    let actor = physician();
    fixture
        .ledger
        .execute(patient, synthetic::registration(seed), actor, now())
        .await
        .expect("register");
    for n in 0..commands {
        fixture
            .ledger
            .execute(
                patient,
                synthetic::clinical_command(seed, n, now()),
                actor,
                now(),
            )
            .await
            .expect("clinical command");
    }
    patient
}

async fn commands_become_verified_events<S: EventStore, K: KeyStore>(fixture: Fixture<S, K>) {
    let patient = register_with_history(&fixture, 1, 30).await;
    let loaded = fixture.ledger.load(patient).await.expect("load");
    assert_eq!(
        loaded.patient.version(),
        31,
        "one event per accepted command"
    );
    assert_eq!(loaded.head.map(|h| h.version), Some(31));
    assert!(loaded.patient.is_registered());

    let stream = StreamId::patient(patient);
    let report = verify_stream(fixture.ledger.store().as_ref(), &fixture.verifier, &stream)
        .await
        .expect("verify");
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.events, 31);

    let stored = fixture
        .ledger
        .store()
        .read_stream(&stream, 1, 100)
        .await
        .expect("read");
    for event in &stored {
        let ciphertext = String::from_utf8_lossy(&event.event.ciphertext);
        assert!(
            !ciphertext.contains("SYNTHETIC"),
            "the MRN is sealed, not stored in the clear"
        );
    }
}

/// The version of the patient's stream head, `None` for a stream never written.
async fn head_version<S: EventStore, K: KeyStore>(
    ledger: &PatientLedger<S, K>,
    patient: PatientId,
) -> Option<u64> {
    ledger
        .store()
        .stream_head(&StreamId::patient(patient))
        .await
        .expect("head")
        .map(|head| head.version)
}

async fn rejected_commands_store_nothing<S: EventStore, K: KeyStore>(fixture: Fixture<S, K>) {
    let patient = synthetic::patient_id(2);
    let command = synthetic::clinical_command(2, 0, now());
    match fixture
        .ledger
        .execute(patient, command, physician(), now())
        .await
    {
        Err(LedgerError::Rejected(Rejection::NotRegistered { .. })) => {}
        other => panic!("expected NotRegistered, got {other:?}"),
    }
    assert_eq!(head_version(&fixture.ledger, patient).await, None);

    register_with_history(&fixture, 2, 0).await;
    match fixture
        .ledger
        .execute(patient, synthetic::registration(2), physician(), now())
        .await
    {
        Err(LedgerError::Rejected(Rejection::AlreadyRegistered { .. })) => {}
        other => panic!("expected AlreadyRegistered, got {other:?}"),
    }
    assert_eq!(
        head_version(&fixture.ledger, patient).await,
        Some(1),
        "the rejected command left no event"
    );
}

async fn racing_commands_are_redecided<S: EventStore, K: KeyStore + 'static>(
    fixture: Fixture<S, K>,
) {
    let patient = register_with_history(&fixture, 3, 0).await;
    let ledger = fixture.ledger.clone();
    let tasks: Vec<_> = (0..4)
        .map(|n| {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                ledger
                    .execute(
                        patient,
                        synthetic::clinical_command(3, n, now()),
                        physician(),
                        now(),
                    )
                    .await
            })
        })
        .collect();
    let mut versions = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            Ok(outcome) => versions.push(outcome.stream_version),
            Err(LedgerError::Contended { .. }) => {}
            Err(other) => panic!("a racing command either lands or reports contention: {other:?}"),
        }
    }
    versions.sort_unstable();
    versions.dedup();
    let loaded = ledger.load(patient).await.expect("load");
    assert_eq!(
        loaded.patient.version(),
        1 + versions.len() as u64,
        "every acknowledged command is stored once, at its own version"
    );
}

async fn erasure_leaves_a_verifiable_log_nobody_can_read<S: EventStore, K: KeyStore>(
    fixture: Fixture<S, K>,
) {
    let patient = register_with_history(&fixture, 4, 10).await;
    let erase = PatientCommand::ErasePatient {
        reason: ErasureReason::PatientRequest,
    };
    let erased = fixture
        .ledger
        .execute(patient, erase, physician(), now())
        .await
        .expect("erase");
    assert!(
        erased.record.is_none(),
        "an erasure leaves no record to keep"
    );

    match fixture.ledger.load(patient).await {
        Err(LedgerError::Erased {
            patient: erased,
            erased_at,
        }) => {
            assert_eq!(erased, patient);
            assert_eq!(erased_at, now());
        }
        other => panic!("an erased patient reads as Erased, got {other:?}"),
    }
    let after = synthetic::clinical_command(4, 99, now());
    assert!(matches!(
        fixture
            .ledger
            .execute(patient, after, physician(), now())
            .await,
        Err(LedgerError::Erased { .. })
    ));
    let stream = StreamId::patient(patient);
    assert!(matches!(
        fixture.ledger.keys().key_for_read(&stream).await,
        Err(chartlog_crypto::KeyError::Erased { .. })
    ));

    let report = verify_log(fixture.ledger.store().as_ref(), &fixture.verifier)
        .await
        .expect("verify");
    assert!(
        report.is_intact(),
        "the erased stream still verifies: {report:?}"
    );
    assert_eq!(
        report.events, 12,
        "registration, 10 commands and the tombstone"
    );
}

/// Registers synthetic patient `seed` born on `birth_date`, and records one observation.
async fn register_born<S: EventStore, K: KeyStore>(
    ledger: &PatientLedger<S, K>,
    seed: u64,
    birth_date: &str,
) -> PatientId {
    let PatientCommand::RegisterPatient {
        patient_id,
        mut demographics,
    } = synthetic::registration(seed)
    else {
        panic!("a synthetic registration registers");
    };
    demographics.birth_date = BirthDate::parse(birth_date).expect("birth date");
    let actor = physician();
    let register = PatientCommand::RegisterPatient {
        patient_id,
        demographics,
    };
    ledger
        .execute(patient_id, register, actor, now())
        .await
        .expect("register");
    ledger
        .execute(
            patient_id,
            synthetic::clinical_command(seed, 0, now()),
            actor,
            now(),
        )
        .await
        .expect("clinical command");
    patient_id
}

fn at(datetime: time::OffsetDateTime) -> Timestamp {
    Timestamp::from_datetime(datetime).expect("in range")
}

async fn an_erasure_for_the_retention_period_waits_it_out<S: EventStore, K: KeyStore>(
    fixture: Fixture<S, K>,
) {
    let policy = RetentionPolicy::new(10, 18);
    let ledger = fixture.ledger.clone().with_retention(policy);
    let for_retention = || PatientCommand::ErasePatient {
        reason: ErasureReason::RetentionPeriodElapsed,
    };
    assert_eq!(now(), at(datetime!(2025-11-13 02:13:20 UTC)));

    // An adult: ten years after the last entry, to the microsecond.
    let adult = register_born(&ledger, 71, "1960-02-03").await;
    let kept_until = at(datetime!(2035-11-13 02:13:20 UTC));
    let early = Timestamp::from_unix_micros(kept_until.unix_micros() - 1).expect("in range");
    match ledger
        .execute(adult, for_retention(), physician(), early)
        .await
    {
        Err(LedgerError::Rejected(
            rejection @ Rejection::RetentionPeriodNotElapsed {
                basis: RetentionBasis::LastEntry { years: 10, .. },
                ..
            },
        )) => {
            assert_eq!(
                rejection,
                Rejection::RetentionPeriodNotElapsed {
                    patient_id: adult,
                    basis: RetentionBasis::LastEntry {
                        years: 10,
                        kept_until
                    },
                }
            );
            assert_eq!(rejection.code(), "retention_period_not_elapsed");
        }
        other => panic!("an erasure inside the period is refused, got {other:?}"),
    }
    assert_eq!(
        head_version(&ledger, adult).await,
        Some(2),
        "a refused erasure stores nothing"
    );
    // Another reason is the requester's to give, whatever the record's age.
    let duplicate = PatientCommand::ErasePatient {
        reason: ErasureReason::DuplicateRegistration,
    };
    ledger
        .execute(adult, duplicate, physician(), early)
        .await
        .expect("a duplicate registration goes at once");

    // A minor: ten years after they turn eighteen, which is later than after the last entry.
    let minor = register_born(&ledger, 72, "2020-05-01").await;
    let came_of_age_plus_ten = at(datetime!(2048-05-02 00:00 UTC));
    match ledger
        .execute(minor, for_retention(), physician(), kept_until)
        .await
    {
        Err(LedgerError::Rejected(Rejection::RetentionPeriodNotElapsed {
            basis: RetentionBasis::AgeOfMajority { age: 18, years: 10 },
            ..
        })) => {}
        other => panic!("a minor's record is kept past coming of age, got {other:?}"),
    }
    ledger
        .execute(minor, for_retention(), physician(), came_of_age_plus_ten)
        .await
        .expect("the period has elapsed");

    // A ledger without a policy takes the requester's word.
    let unchecked = register_born(&fixture.ledger, 73, "1960-02-03").await;
    fixture
        .ledger
        .execute(unchecked, for_retention(), physician(), now())
        .await
        .expect("no policy, no wait");
}

async fn catching_up_equals_a_full_load<S: EventStore, K: KeyStore>(fixture: Fixture<S, K>) {
    let patient = register_with_history(&fixture, 7, 3).await;
    let earlier = fixture.ledger.load(patient).await.expect("load");
    let mut left_by_command = None;
    for n in 10..14 {
        left_by_command = fixture
            .ledger
            .execute(
                patient,
                synthetic::clinical_command(7, n, now()),
                physician(),
                now(),
            )
            .await
            .expect("clinical command")
            .record;
    }
    let caught_up = fixture
        .ledger
        .catch_up(patient, Some(earlier.clone()))
        .await
        .expect("catch up");
    let full = fixture.ledger.load(patient).await.expect("full load");
    assert_eq!(caught_up.patient, full.patient);
    assert_eq!(caught_up.head, full.head);
    assert_eq!(full.head.map(|h| h.version), Some(8));
    // What a command hands back to be kept is what reading its events back would give.
    let left_by_command = left_by_command.expect("a clinical command leaves a record");
    assert_eq!(left_by_command.patient, full.patient);
    assert_eq!(left_by_command.head, full.head);
    assert_ne!(
        earlier.patient, full.patient,
        "the earlier state was behind"
    );

    // An earlier state whose head is not on this stream's chain is refused.
    let mut forged = earlier;
    if let Some(head) = forged.head.as_mut() {
        head.hash = chartlog_crypto::EventHash::GENESIS;
    }
    assert!(
        fixture
            .ledger
            .catch_up(patient, Some(forged))
            .await
            .is_err(),
        "the next event must continue the earlier head's chain"
    );
}

async fn a_stale_expected_version_is_refused<S: EventStore, K: KeyStore>(fixture: Fixture<S, K>) {
    let patient = register_with_history(&fixture, 6, 2).await;
    let stale = ExecuteOptions {
        expected_version: Some(2),
        loaded: None,
    };
    let refused = fixture
        .ledger
        .execute_with(
            patient,
            synthetic::clinical_command(6, 10, now()),
            physician(),
            now(),
            stale,
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(LedgerError::VersionMismatch {
                expected: 2,
                current: 3,
                ..
            })
        ),
        "{refused:?}"
    );
    assert_eq!(
        fixture
            .ledger
            .load(patient)
            .await
            .expect("load")
            .patient
            .version(),
        3,
        "a refused precondition appends nothing"
    );

    let current = ExecuteOptions {
        expected_version: Some(3),
        loaded: None,
    };
    let outcome = fixture
        .ledger
        .execute_with(
            patient,
            synthetic::clinical_command(6, 11, now()),
            physician(),
            now(),
            current,
        )
        .await
        .expect("the current version is accepted");
    assert_eq!(outcome.stream_version, 4);
}

fn position_of(events: Vec<chartlog_store::RecordedEvent>, version: u64) -> u64 {
    events
        .iter()
        .find(|r| r.event.header.stream_version == version)
        .map(|r| r.position)
        .expect("event at version")
}

// ---- SQLite ----

async fn sqlite() -> (Fixture<SqliteEventStore, SqliteKeyStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    let keys = SqliteKeyStore::new(store.pool().clone());
    (fixture(store, keys), dir)
}

#[tokio::test]
async fn sqlite_commands_become_verified_events() {
    let (fixture, _dir) = sqlite().await;
    commands_become_verified_events(fixture).await;
}

#[tokio::test]
async fn sqlite_rejected_commands_store_nothing() {
    let (fixture, _dir) = sqlite().await;
    rejected_commands_store_nothing(fixture).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_racing_commands_are_redecided() {
    let (fixture, _dir) = sqlite().await;
    racing_commands_are_redecided(fixture).await;
}

#[tokio::test]
async fn sqlite_erasure_leaves_a_verifiable_log_nobody_can_read() {
    let (fixture, _dir) = sqlite().await;
    erasure_leaves_a_verifiable_log_nobody_can_read(fixture).await;
}

#[tokio::test]
async fn sqlite_a_stale_expected_version_is_refused() {
    let (fixture, _dir) = sqlite().await;
    a_stale_expected_version_is_refused(fixture).await;
}

#[tokio::test]
async fn sqlite_catching_up_equals_a_full_load() {
    let (fixture, _dir) = sqlite().await;
    catching_up_equals_a_full_load(fixture).await;
}

#[tokio::test]
async fn sqlite_an_erasure_for_the_retention_period_waits_it_out() {
    let (fixture, _dir) = sqlite().await;
    an_erasure_for_the_retention_period_waits_it_out(fixture).await;
}

/// A load reads the stream a page (1,000 events) at a time and stops at the first short page:
/// a stream of exactly one full page, and one just past it, both load to their head.
#[tokio::test]
async fn sqlite_a_load_reads_past_a_full_page() {
    let (fixture, _dir) = sqlite().await;
    let patient = synthetic::patient_id(11);
    let stream = StreamId::patient(patient);
    let actor = physician();
    fixture
        .ledger
        .execute(patient, synthetic::registration(11), actor, now())
        .await
        .expect("register");
    // Each command is decided on the record caught up by one event, not folded afresh.
    let mut loaded = fixture.ledger.load(patient).await.expect("load");
    let mut n = 0;
    for page_end in [1_000, 1_001] {
        while loaded.head.map_or(0, |head| head.version) < page_end {
            fixture
                .ledger
                .execute_with(
                    patient,
                    synthetic::clinical_command(11, n, now()),
                    actor,
                    now(),
                    ExecuteOptions {
                        expected_version: None,
                        loaded: Some(loaded.clone()),
                    },
                )
                .await
                .expect("clinical command");
            n += 1;
            loaded = fixture
                .ledger
                .catch_up(patient, Some(loaded))
                .await
                .expect("catch up");
        }
        let head = fixture
            .ledger
            .store()
            .stream_head(&stream)
            .await
            .expect("head");
        let full = fixture.ledger.load(patient).await.expect("full load");
        assert_eq!(head.map(|head| head.version), Some(page_end));
        assert_eq!(full.head, head, "a load reaches the stream's head");
        assert_eq!(full.patient, loaded.patient);
    }
}

#[tokio::test]
async fn sqlite_tampering_is_found() {
    let (fixture, _dir) = sqlite().await;
    let patient = register_with_history(&fixture, 5, 5).await;
    let stream = StreamId::patient(patient);
    let pool = fixture.ledger.store().pool().clone();
    // An attacker with file access bypasses the append-only triggers.
    sqlx::query("DROP TRIGGER chartlog_events_no_update")
        .execute(&pool)
        .await
        .expect("drop trigger");
    let events = fixture
        .ledger
        .store()
        .read_stream(&stream, 1, 100)
        .await
        .expect("read");
    let position = position_of(events, 4);
    // Flip one bit of one ciphertext byte.
    let mut ciphertext: Vec<u8> =
        sqlx::query_scalar("SELECT ciphertext FROM chartlog_events WHERE position = ?1")
            .bind(position as i64)
            .fetch_one(&pool)
            .await
            .expect("ciphertext");
    ciphertext[20] ^= 0x01;
    sqlx::query("UPDATE chartlog_events SET ciphertext = ?1 WHERE position = ?2")
        .bind(ciphertext)
        .bind(position as i64)
        .execute(&pool)
        .await
        .expect("tamper");

    let report = verify_stream(fixture.ledger.store().as_ref(), &fixture.verifier, &stream)
        .await
        .expect("verify");
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    assert_eq!(
        report.breaks[0].version, 4,
        "the first broken version is named"
    );
    assert!(matches!(report.breaks[0].problem, BreakKind::Integrity(_)));
    assert!(
        !verify_log(fixture.ledger.store().as_ref(), &fixture.verifier)
            .await
            .expect("verify log")
            .is_intact()
    );
    assert!(matches!(
        fixture.ledger.load(patient).await,
        Err(LedgerError::Integrity(_))
    ));
}

#[tokio::test]
async fn sqlite_events_of_one_stream_out_of_global_order_are_found() {
    let (fixture, _dir) = sqlite().await;
    let patient = register_with_history(&fixture, 7, 4).await;
    let stream = StreamId::patient(patient);
    let store = fixture.ledger.store();
    let events = store.read_stream(&stream, 1, 100).await.expect("read");
    let (fourth, fifth) = (position_of(events.clone(), 4), position_of(events, 5));
    // Versions 4 and 5 trade global positions; each keeps its bytes, hash, signature and link,
    // so the stream read in version order chains as before.
    let pool = store.pool().clone();
    sqlx::query("DROP TRIGGER chartlog_events_no_update")
        .execute(&pool)
        .await
        .expect("drop trigger");
    let (a, b) = (fourth as i64, fifth as i64);
    for (from, to) in [(a, -1), (b, a), (-1, b)] {
        sqlx::query("UPDATE chartlog_events SET position = ?1 WHERE position = ?2")
            .bind(to)
            .bind(from)
            .execute(&pool)
            .await
            .expect("swap");
    }

    let report = verify_stream(store.as_ref(), &fixture.verifier, &stream)
        .await
        .expect("verify");
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    let found = &report.breaks[0];
    assert_eq!(found.version, 5, "{report:?}");
    assert_eq!(found.position, fourth, "{report:?}");
    assert!(
        matches!(
            found.problem,
            BreakKind::PositionOutOfOrder { previous_position } if previous_position == fifth
        ),
        "{report:?}"
    );
    assert!(
        !verify_log(store.as_ref(), &fixture.verifier)
            .await
            .expect("verify log")
            .is_intact(),
        "read in the global order, version 5 comes before 4"
    );
}

// ---- PostgreSQL ----

async fn postgres(pool: PgPool) -> Fixture<PostgresEventStore, PostgresKeyStore> {
    let store = PostgresEventStore::from_pool(pool.clone())
        .await
        .expect("store");
    fixture(store, PostgresKeyStore::new(pool))
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_commands_become_verified_events(pool: PgPool) {
    commands_become_verified_events(postgres(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_rejected_commands_store_nothing(pool: PgPool) {
    rejected_commands_store_nothing(postgres(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_racing_commands_are_redecided(pool: PgPool) {
    racing_commands_are_redecided(postgres(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_erasure_leaves_a_verifiable_log_nobody_can_read(pool: PgPool) {
    erasure_leaves_a_verifiable_log_nobody_can_read(postgres(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_a_stale_expected_version_is_refused(pool: PgPool) {
    a_stale_expected_version_is_refused(postgres(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_an_erasure_for_the_retention_period_waits_it_out(pool: PgPool) {
    an_erasure_for_the_retention_period_waits_it_out(postgres(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_catching_up_equals_a_full_load(pool: PgPool) {
    catching_up_equals_a_full_load(postgres(pool).await).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_tampering_is_found(pool: PgPool) {
    let fixture = postgres(pool.clone()).await;
    let patient = register_with_history(&fixture, 6, 5).await;
    let stream = StreamId::patient(patient);
    // An attacker with superuser access bypasses the append-only trigger.
    sqlx::query("ALTER TABLE chartlog_events DISABLE TRIGGER chartlog_events_append_only")
        .execute(&pool)
        .await
        .expect("disable trigger");
    sqlx::query(
        "UPDATE chartlog_events SET ciphertext = set_byte(ciphertext, 20, get_byte(ciphertext, 20) # 1) \
         WHERE stream_id = $1 AND stream_version = 4",
    )
    .bind(stream.as_str())
    .execute(&pool)
    .await
    .expect("tamper");

    let report = verify_stream(fixture.ledger.store().as_ref(), &fixture.verifier, &stream)
        .await
        .expect("verify");
    assert_eq!(report.breaks.len(), 1, "{report:?}");
    assert_eq!(report.breaks[0].version, 4);
    assert!(matches!(
        fixture.ledger.load(patient).await,
        Err(LedgerError::Integrity(_))
    ));
}

#[tokio::test]
async fn sqlite_checkpoints_catch_events_swapped_across_streams() {
    use chartlog_store::checkpoints::{
        LogCheckpointer, verify_checkpoints, verify_checkpoints_with,
    };

    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    let keys = SqliteKeyStore::new(store.pool().clone());
    let pool = store.pool().clone();
    let signer = Arc::new(EventSigner::generate(SignerKeyId::generate()));
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust");
    let data_keys = DataKeys::new(Arc::new(KeyRing::generate(KekId::generate())), keys);
    let store = Arc::new(store);
    let fixture = Fixture {
        ledger: PatientLedger::new(
            store.clone(),
            Arc::new(data_keys),
            signer.clone(),
            Arc::new(verifier.clone()),
        ),
        verifier: verifier.clone(),
    };
    let first = register_with_history(&fixture, 21, 3).await;
    let second = register_with_history(&fixture, 22, 3).await;

    let mut checkpointer = LogCheckpointer::resume(store.clone(), signer.clone())
        .await
        .expect("resume");
    assert!(
        checkpointer
            .checkpoint(now())
            .await
            .expect("checkpoint")
            .is_some()
    );
    assert_eq!(
        checkpointer.checkpoint(now()).await.expect("checkpoint"),
        None,
        "nothing new since the last checkpoint but the checkpoint itself"
    );
    register_with_history(&fixture, 23, 1).await;
    // A restarted writer picks up where the stored checkpoint left off.
    let mut restarted = LogCheckpointer::resume(store.clone(), signer)
        .await
        .expect("resume");
    let covered = restarted
        .checkpoint(now())
        .await
        .expect("checkpoint")
        .expect("a checkpoint over the new events");
    let report = verify_checkpoints_with(store.as_ref(), &verifier, Some(covered))
        .await
        .expect("verify");
    assert!(report.is_intact(), "{report:?}");
    assert_eq!(report.checkpoints, 2);
    // What verify prints for the operator to record: the last checkpoint's point of the log,
    // and the digest recomputed there agrees with it.
    let anchor = report.last_verified.expect("a checkpoint verified");
    assert_eq!(anchor.position, covered);
    assert_eq!(report.digest_at, Some(anchor.digest));

    // Swap the first patient's last event with the second patient's first in the global
    // order: each stream keeps its own order and chain, so only the checkpoints can see it.
    let position_of = |patient: PatientId, version: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT position FROM chartlog_events WHERE stream_id = ?1 AND stream_version = ?2",
            )
            .bind(StreamId::patient(patient).as_str())
            .bind(version)
            .fetch_one(&pool)
            .await
            .expect("position")
        }
    };
    let (a, b) = (position_of(first, 4).await, position_of(second, 1).await);
    assert_eq!(b, a + 1, "adjacent in the global log");
    sqlx::query("DROP TRIGGER chartlog_events_no_update")
        .execute(&pool)
        .await
        .expect("drop trigger");
    for (from, to) in [(a, -1), (b, a), (-1, b)] {
        sqlx::query("UPDATE chartlog_events SET position = ?1 WHERE position = ?2")
            .bind(to)
            .bind(from)
            .execute(&pool)
            .await
            .expect("swap");
    }
    let per_stream = verify_log(store.as_ref(), &verifier).await.expect("verify");
    assert!(per_stream.is_intact(), "each stream's chain is still whole");
    let report = verify_checkpoints(store.as_ref(), &verifier)
        .await
        .expect("verify");
    assert_eq!(
        report.first_mismatch.map(|found| found.problem),
        Some("checkpoint_mismatch"),
        "the swap is found"
    );
}
