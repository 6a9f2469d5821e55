//! The runner and the chart and record-history read models against real databases: SQLite
//! files in a temp dir, and PostgreSQL databases created per test by `#[sqlx::test]`.

use std::sync::Arc;
use std::time::Duration;

use chartlog_crypto::{
    DataKeys, EventSigner, KekId, KeyError, KeyRing, KeyStore, MacKey, SignatureVerifier,
    SignerKeyId,
};
use chartlog_domain::codes::{Code, CodeSystem};
use chartlog_domain::patient::{
    ConsentRestrictionKind, Demographics, DemographicsCorrection, DiscontinuationReason,
    ErasureReason, ObservationValue,
};
use chartlog_domain::phi::{
    AddressLine, BirthDate, City, ContactPoint, EmailAddress, FamilyName, FreeText, GivenName,
    IdentifierSystem, IdentifierValue, Mrn, NoteText, PatientIdentifier, PersonName, PhoneNumber,
    PostalAddress, PostalCode, Sex, Ssn, UsState,
};
use chartlog_domain::{
    Actor, AllergyId, ConditionId, ConsentRestrictionId, MedicationOrderId, NoteId, ObservationId,
    PatientCommand, PatientId, PurposeOfUse, Role, StreamId, Timestamp, UserId, synthetic,
};
use chartlog_domain::{Decimal, Quantity, Unit};
use chartlog_projections::audit::{AuditTrailProjection, entity_and_action};
use chartlog_projections::chart::{
    CHART_TAIL_FOLD_EVENTS_MAX, Chart, ChartAnswer, ChartProjection, ChartReader, find_by_mrn,
    read_chart,
};
use chartlog_projections::db::{Backend, ProjectionDb, SqlArg};
use chartlog_projections::deid::{DeidentifiedProjection, Pseudonymizer};
use chartlog_projections::history::{HistoryAnswer, HistoryProjection, read_history};
use chartlog_projections::runner::STANDBY_RETRY_INTERVAL;
use chartlog_projections::{Projection, ProjectionError, ProjectionRunner, wait_for_position};
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::verify::verify_log;
use chartlog_store::{EventStore, LedgerError, PatientLedger, StreamHead};
use sqlx::{PgPool, Row as _};
use uuid::Uuid;

fn now() -> Timestamp {
    Timestamp::from_unix_micros(1_763_000_000_000_000).expect("in range")
}

fn physician() -> Actor {
    Actor {
        user_id: UserId::from_uuid(Uuid::from_u128(0xd0c)),
        role: Role::Physician,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    }
}

struct Fixture<S: EventStore, K: KeyStore + 'static> {
    ledger: PatientLedger<S, K>,
    verifier: Arc<SignatureVerifier>,
    db: ProjectionDb,
    index_key: Arc<MacKey>,
}

impl<S: EventStore, K: KeyStore + 'static> Fixture<S, K> {
    fn new(store: S, keys: K, db: ProjectionDb) -> Self {
        let signer = EventSigner::generate(SignerKeyId::generate());
        let mut verifier = SignatureVerifier::new();
        verifier
            .trust(signer.key_id().clone(), signer.verifying_key_bytes())
            .expect("trust");
        let verifier = Arc::new(verifier);
        let keys = DataKeys::new(Arc::new(KeyRing::generate(KekId::generate())), keys);
        Self {
            ledger: PatientLedger::new(
                Arc::new(store),
                Arc::new(keys),
                Arc::new(signer),
                verifier.clone(),
            ),
            verifier,
            db,
            index_key: Arc::new(MacKey::generate()),
        }
    }

    fn projections(&self) -> Vec<Arc<dyn Projection>> {
        vec![
            Arc::new(ChartProjection::new(self.index_key.clone())),
            Arc::new(HistoryProjection),
        ]
    }

    fn runner(&self) -> ProjectionRunner<S, K> {
        ProjectionRunner::new(
            self.ledger.store().clone(),
            self.ledger.keys().clone(),
            self.verifier.clone(),
            self.db.clone(),
            self.projections(),
        )
    }

    async fn execute(&self, patient: PatientId, command: PatientCommand) -> u64 {
        self.ledger
            .execute(patient, command, physician(), now())
            .await
            .expect("command accepted")
            .position
    }
}

async fn sqlite() -> (Fixture<SqliteEventStore, SqliteKeyStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open SQLite store");
    let keys = SqliteKeyStore::new(store.pool().clone());
    let db = ProjectionDb::Sqlite(store.pool().clone());
    (Fixture::new(store, keys, db), dir)
}

/// On SQLite, appends and the projections' write transactions of one process queue on one
/// in-process lock per database file, so a writer starts the moment the previous one commits
/// instead of sleeping in SQLite's busy handler.
#[tokio::test]
async fn sqlite_appends_and_projection_transactions_share_one_write_lock() {
    let (fixture, dir) = sqlite().await;
    let store = fixture.ledger.store().clone();
    let lock = chartlog_store::sqlite::write_lock(store.pool());
    let other_pool = chartlog_store::sqlite::open_pool(&dir.path().join("chartlog.db"))
        .await
        .expect("a second pool on the same file");
    assert!(
        Arc::ptr_eq(&lock, &chartlog_store::sqlite::write_lock(&other_pool)),
        "one lock per database file, whichever pool asks"
    );

    let tx = fixture.db.begin().await.expect("begin");
    assert!(
        lock.try_lock().is_err(),
        "a projection transaction holds it"
    );
    tx.commit().await.expect("commit");
    assert!(lock.try_lock().is_ok(), "and releases it on commit");
    let tx = fixture.db.begin().await.expect("begin");
    drop(tx);
    assert!(lock.try_lock().is_ok(), "or when dropped");

    // So does a statement outside a transaction (a session's activity, a login failure).
    let held = lock.clone().lock_owned().await;
    let statement = {
        let db = fixture.db.clone();
        tokio::spawn(async move {
            db.execute(
                "INSERT INTO chartlog_projection_checkpoints (name, version, position, \
                 updated_at_us) VALUES ('lock-test', 1, 0, 0)",
                vec![],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!statement.is_finished(), "the statement waits for the lock");
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), statement)
        .await
        .expect("the statement goes once the lock is free")
        .expect("statement task")
        .expect("statement");

    // An append waits for the lock while someone else holds it, and goes once it is free.
    let held = lock.clone().lock_owned().await;
    let factory = chartlog_store::conformance::EventFactory::new();
    let stream = StreamId::parse(&format!("patient-{}", Uuid::new_v4())).expect("stream id");
    let batch = factory.batch(&stream, None, 1);
    let append = {
        let (store, stream) = (store.clone(), stream.clone());
        tokio::spawn(async move { store.append(&stream, 0, &batch).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!append.is_finished(), "the append waits for the lock");
    drop(held);
    tokio::time::timeout(Duration::from_secs(10), append)
        .await
        .expect("the append goes once the lock is free")
        .expect("append task")
        .expect("append");
    assert_eq!(
        store
            .stream_head(&stream)
            .await
            .expect("head")
            .map(|h| h.version),
        Some(1)
    );
    other_pool.close().await;
}

/// The history's reset frees its pages without zeroing them, and hands its connection back
/// zeroing again: everything else on that connection (an erasure, a destroyed key) relies on
/// it.
#[tokio::test]
async fn sqlite_history_reset_leaves_secure_delete_on() {
    let (fixture, _dir) = sqlite().await;
    let patient = PatientId::from_uuid(Uuid::from_u128(0x5ec));
    register_marker_patient(&fixture, patient).await;
    fixture.runner().catch_up().await.expect("catch up");
    let mut tx = fixture.db.begin().await.expect("begin");
    assert_eq!(
        first_number(&mut tx, "PRAGMA secure_delete").await,
        1,
        "the store's connections zero what they delete"
    );
    HistoryProjection.reset(&mut tx).await.expect("reset");
    assert_eq!(
        first_number(&mut tx, "PRAGMA secure_delete").await,
        1,
        "restored after the reset"
    );
    assert_eq!(
        first_number(&mut tx, "SELECT COUNT(*) FROM chartlog_history").await,
        0,
        "and the reset did empty the history"
    );
    tx.commit().await.expect("commit");
}

/// The first column of the first row `sql` returns, as a number.
async fn first_number(tx: &mut chartlog_projections::db::ProjectionTx, sql: &'static str) -> i64 {
    tx.fetch_optional(sql, vec![])
        .await
        .expect("query")
        .expect("a row")
        .i64(0)
        .expect("a number")
}

async fn postgres(pool: PgPool) -> Fixture<PostgresEventStore, PostgresKeyStore> {
    let store = PostgresEventStore::from_pool(pool.clone())
        .await
        .expect("store");
    Fixture::new(
        store,
        PostgresKeyStore::new(pool.clone()),
        ProjectionDb::Postgres(pool),
    )
}

// ---- Markers -----------------------------------------------------------------------------

/// Strings that appear in the patient's PHI and nowhere else: after erasure, no table may
/// hold any of them, in the clear or hex-encoded.
const MARKERS: [&str; 12] = [
    "Zqxmarkgiven",
    "Zqxmarkfamily",
    "Zqxmarkstreet",
    "Zqxmarkcity",
    "zqxmark@example.org",
    "ZQXMARK-77",
    "ZQXMARK-ID",
    "Zqxmark note",
    "Zqxmark observation",
    "867-5309",
    "078-05-1120",
    "1901-02-03",
];

fn marker_demographics() -> Demographics {
    Demographics {
        name: PersonName::new(
            vec![GivenName::parse("Zqxmarkgiven").unwrap()],
            FamilyName::parse("Zqxmarkfamily").unwrap(),
        )
        .unwrap(),
        birth_date: BirthDate::parse("1901-02-03").unwrap(),
        sex: Sex::Female,
        address: Some(
            PostalAddress::new(
                vec![AddressLine::parse("1 Zqxmarkstreet").unwrap()],
                City::parse("Zqxmarkcity").unwrap(),
                UsState::parse("IL").unwrap(),
                PostalCode::parse("62704").unwrap(),
            )
            .unwrap(),
        ),
        contacts: vec![
            ContactPoint::Phone(PhoneNumber::parse("+1-217-867-5309").unwrap()),
            ContactPoint::Email(EmailAddress::parse("zqxmark@example.org").unwrap()),
        ],
        mrn: Mrn::parse("ZQXMARK-77").unwrap(),
        ssn: Some(Ssn::parse("078-05-1120").unwrap()),
        identifiers: vec![PatientIdentifier {
            system: IdentifierSystem::Passport,
            value: IdentifierValue::parse("ZQXMARK-ID").unwrap(),
        }],
    }
}

/// Registers the marker patient and records data in every kind of chart entry.
async fn register_marker_patient<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
    patient: PatientId,
) -> u64 {
    fixture
        .execute(
            patient,
            PatientCommand::RegisterPatient {
                patient_id: patient,
                demographics: marker_demographics(),
            },
        )
        .await;
    for n in 0..20 {
        fixture
            .execute(patient, synthetic::clinical_command(99, n, now()))
            .await;
    }
    let note_id = NoteId::from_uuid(Uuid::from_u128(0x7e57));
    fixture
        .execute(
            patient,
            PatientCommand::WriteNote {
                note_id,
                text: NoteText::parse("Zqxmark note: first draft").unwrap(),
            },
        )
        .await;
    fixture
        .execute(
            patient,
            PatientCommand::SignNote {
                note_id,
                signer: physician().user_id,
            },
        )
        .await;
    fixture
        .execute(
            patient,
            PatientCommand::RecordObservation {
                observation_id: ObservationId::from_uuid(Uuid::from_u128(0x0b5)),
                code: Code::parse(CodeSystem::Loinc, "8867-4", None).unwrap(),
                value: ObservationValue::Text(FreeText::parse("Zqxmark observation").unwrap()),
                effective_at: now(),
            },
        )
        .await;
    let condition_id = ConditionId::from_uuid(Uuid::from_u128(0xc0d));
    fixture
        .execute(
            patient,
            PatientCommand::RecordCondition {
                condition_id,
                code: Code::parse(CodeSystem::Icd10Cm, "I10", None).unwrap(),
                onset_at: None,
            },
        )
        .await;
    fixture
        .execute(
            patient,
            PatientCommand::ResolveCondition {
                condition_id,
                resolved_at: now(),
            },
        )
        .await;
    fixture
        .execute(
            patient,
            PatientCommand::CorrectDemographics {
                correction: DemographicsCorrection {
                    name: Some(
                        PersonName::new(
                            vec![GivenName::parse("Zqxmarkgiven").unwrap()],
                            FamilyName::parse("Zqxmarkfamily Second").unwrap(),
                        )
                        .unwrap(),
                    ),
                    ..DemographicsCorrection::default()
                },
            },
        )
        .await
}

// ---- Chart and history follow commands ---------------------------------------------------

async fn chart_and_history_follow_the_record<S: EventStore, K: KeyStore + 'static>(
    fixture: Fixture<S, K>,
) {
    let patient = PatientId::from_uuid(Uuid::from_u128(0xa11ce));
    let last = register_marker_patient(&fixture, patient).await;
    let reached = fixture.runner().catch_up().await.expect("catch up");
    assert_eq!(reached, last);
    for name in ["chart", "history"] {
        wait_for_position(&fixture.db, name, last, Duration::from_secs(1))
            .await
            .expect("caught up");
        // A position the runner has not applied: the wait gives up, and says how far it got.
        match wait_for_position(&fixture.db, name, last + 1, Duration::from_millis(50)).await {
            Err(ProjectionError::WaitTimedOut {
                wanted, reached, ..
            }) => assert_eq!((wanted, reached), (last + 1, last)),
            other => panic!("{name} waited for a position it never reached: {other:?}"),
        }
    }

    let ChartAnswer::Found(chart) = read_chart(&fixture.db, fixture.ledger.keys(), patient)
        .await
        .expect("read chart")
    else {
        panic!("the chart is there");
    };
    let demographics = chart.demographics.as_ref().expect("demographics");
    assert_eq!(
        demographics.name.family().expose_phi(),
        "Zqxmarkfamily Second",
        "the correction is applied"
    );
    assert_eq!(chart.stream_version, 27);
    assert_eq!(chart.conditions.len(), 2);
    assert_eq!(chart.conditions.iter().filter(|c| c.is_active()).count(), 1);
    assert_eq!(chart.notes.len(), 2, "the synthetic note and ours");
    assert_eq!(chart.notes.iter().filter(|n| n.is_signed()).count(), 1);
    assert_eq!(chart.allergies.len(), 1);
    assert_eq!(chart.medication_orders.len(), 1);
    // The latest of each code: the synthetic ones' codes and the marker observation's.
    let mut codes: Vec<String> = (0..20)
        .filter_map(|n| match synthetic::clinical_command(99, n, now()) {
            PatientCommand::RecordObservation { code, .. } => Some(code.expose_phi().to_owned()),
            _ => None,
        })
        .chain(["8867-4".to_owned()])
        .collect();
    codes.sort();
    codes.dedup();
    assert_eq!(chart.observations.len(), codes.len());

    let found = find_by_mrn(
        &fixture.db,
        &fixture.index_key,
        &Mrn::parse("zqxmark-77").unwrap(),
    )
    .await
    .expect("look-up");
    assert_eq!(found, vec![patient], "the MRN look-up normalises case");
    let by_name = chartlog_projections::chart::find_by_family_name_and_birth_date(
        &fixture.db,
        &fixture.index_key,
        &FamilyName::parse("ZQXMARKFAMILY  second").unwrap(),
        &BirthDate::parse("1901-02-03").unwrap(),
    )
    .await
    .expect("look-up");
    assert_eq!(by_name, vec![patient]);

    // History, newest first, in pages of 10 with a cursor.
    let mut versions = Vec::new();
    let mut before = None;
    loop {
        let HistoryAnswer::Found(page) =
            read_history(&fixture.db, fixture.ledger.keys(), patient, before, 10)
                .await
                .expect("history")
        else {
            panic!("the history is there");
        };
        assert!(page.entries.len() <= 10);
        versions.extend(page.entries.iter().map(|e| e.stream_version));
        if versions.len() == 1 {
            let correction = &page.entries[0];
            assert_eq!(correction.event_type, "demographics_corrected");
            assert_eq!(correction.actor, physician());
            let name = correction
                .changes
                .iter()
                .find(|c| c.field == "name")
                .expect("the name changed");
            assert_eq!(
                name.before.as_ref().unwrap().expose_phi()["family"],
                "Zqxmarkfamily"
            );
            assert_eq!(
                name.after.as_ref().unwrap().expose_phi()["family"],
                "Zqxmarkfamily Second"
            );
            assert_eq!(correction.changes.len(), 1, "only the name changed");
            assert!(
                !format!("{correction:?}").contains("Zqxmark"),
                "Debug redacts"
            );
        }
        match page.next_before_version {
            Some(next) => before = Some(next),
            None => break,
        }
    }
    assert_eq!(versions, (1..=27).rev().collect::<Vec<u64>>());
}

/// A device-fed chart: the chart holds the latest observation of each code, by effective
/// time (a late upload of old readings does not hide the current one), and the other sections
/// whole; the record history holds every observation.
async fn the_chart_lists_the_latest_observation_per_code<S: EventStore, K: KeyStore + 'static>(
    fixture: Fixture<S, K>,
) {
    let patient = PatientId::from_uuid(Uuid::now_v7());
    fixture.execute(patient, synthetic::registration(5)).await;
    fixture
        .execute(
            patient,
            PatientCommand::RecordCondition {
                condition_id: ConditionId::from_uuid(Uuid::now_v7()),
                code: Code::parse(CodeSystem::Icd10Cm, "E11.9", None).unwrap(),
                onset_at: None,
            },
        )
        .await;
    let codes = ["8867-4", "59408-5", "8310-5"];
    // (code, minutes before now): out of order, with a tie, and a late upload of old readings.
    let readings: [(usize, i64); 9] = [
        (0, 30),
        (1, 10),
        (0, 5),
        (2, 60),
        (0, 90),
        (1, 10),
        (2, 1),
        (0, 240),
        (2, 120),
    ];
    let mut recorded = Vec::new();
    let mut last = 0;
    for (code, minutes_ago) in readings {
        let observation_id = ObservationId::from_uuid(Uuid::now_v7());
        let effective_at =
            Timestamp::from_unix_micros(now().unix_micros() - minutes_ago * 60_000_000).unwrap();
        recorded.push((code, effective_at, observation_id));
        if recorded.len() == 5 {
            // The latest reading per code is decided across catch-ups as within one batch.
            fixture.runner().catch_up().await.expect("catch up");
        }
        last = fixture
            .execute(
                patient,
                PatientCommand::RecordObservation {
                    observation_id,
                    code: Code::parse(CodeSystem::Loinc, codes[code], None).unwrap(),
                    value: ObservationValue::Quantity(Quantity {
                        value: Decimal::parse(&format!("{}", 60 + minutes_ago)).unwrap(),
                        unit: Unit::parse("/min").unwrap(),
                    }),
                    effective_at,
                },
            )
            .await;
    }
    fixture.runner().catch_up().await.expect("catch up");
    wait_for_position(&fixture.db, "chart", last, Duration::from_secs(1))
        .await
        .expect("caught up");
    let ChartAnswer::Found(chart) = read_chart(&fixture.db, fixture.ledger.keys(), patient)
        .await
        .expect("read chart")
    else {
        panic!("the chart is there");
    };
    // Latest effective time per code; on a tie, the later recorded.
    let mut expected: Vec<ObservationId> = (0..codes.len())
        .map(|code| {
            recorded
                .iter()
                .filter(|(c, _, _)| *c == code)
                .fold(
                    None,
                    |latest: Option<&(usize, Timestamp, ObservationId)>, reading| match latest {
                        Some(kept) if kept.1 > reading.1 => Some(kept),
                        _ => Some(reading),
                    },
                )
                .expect("a reading of each code")
                .2
        })
        .collect();
    expected.sort();
    let mut listed: Vec<ObservationId> = chart
        .observations
        .iter()
        .map(|o| o.observation_id)
        .collect();
    listed.sort();
    assert_eq!(listed, expected, "the latest observation of each code");
    assert!(
        chart
            .observations
            .windows(2)
            .all(|pair| pair[0].effective_at <= pair[1].effective_at),
        "listed in order of effective time"
    );
    assert_eq!(chart.conditions.len(), 1);
    assert!(chart.demographics.is_some());

    let HistoryAnswer::Found(history) =
        read_history(&fixture.db, fixture.ledger.keys(), patient, None, 100)
            .await
            .expect("read history")
    else {
        panic!("the history is there");
    };
    assert_eq!(
        history
            .entries
            .iter()
            .filter(|entry| entry.event_type == "observation_recorded")
            .count(),
        readings.len(),
        "the history holds every observation"
    );
}

/// The record history's segments (16 versions each) hold consecutive changes: replaying
/// events the history already holds is refused, within a segment and at a segment's start, and
/// the history still reads each change once; a header edited in the clear no longer opens.
async fn the_history_refuses_replays_and_forged_headers<S: EventStore, K: KeyStore + 'static>(
    fixture: Fixture<S, K>,
) {
    let patient = PatientId::from_uuid(Uuid::from_u128(0x5e9));
    let last = register_marker_patient(&fixture, patient).await;
    fixture.runner().catch_up().await.expect("catch up");
    let read_versions = || async {
        let HistoryAnswer::Found(page) =
            read_history(&fixture.db, fixture.ledger.keys(), patient, None, 100)
                .await
                .expect("history")
        else {
            panic!("the history is there");
        };
        page.entries
            .iter()
            .map(|entry| entry.stream_version)
            .collect::<Vec<_>>()
    };
    let all: Vec<u64> = (1..=27).rev().collect();
    assert_eq!(read_versions().await, all);
    let HistoryAnswer::Found(past_the_end) = read_history(
        &fixture.db,
        fixture.ledger.keys(),
        patient,
        Some(u64::MAX),
        100,
    )
    .await
    .expect("a before_version past any version reads from the newest") else {
        panic!("the history is there");
    };
    assert_eq!(past_the_end.entries.len(), 27);

    // Versions 25..=27 again (within the segment 17..=32), then 17..=27 (from its start).
    for replayed in [3, 11] {
        fixture
            .db
            .execute(
                "UPDATE chartlog_projection_checkpoints SET position = $1 WHERE name = 'history'",
                vec![SqlArg::I64(i64::try_from(last - replayed).unwrap())],
            )
            .await
            .expect("move the checkpoint back");
        assert!(
            fixture.runner().catch_up().await.is_err(),
            "replaying {replayed} events the history holds is refused"
        );
        assert_eq!(read_versions().await, all, "and changes nothing");
    }

    fixture
        .db
        .execute(
            "UPDATE chartlog_history SET headers = replace(headers, 'physician', 'nurse') \
             WHERE first_version = 1",
            vec![],
        )
        .await
        .expect("forge a header");
    let forged = read_history(&fixture.db, fixture.ledger.keys(), patient, None, 100).await;
    assert!(
        matches!(
            forged,
            Err(chartlog_projections::ProjectionError::MalformedRow { .. })
        ),
        "a forged header does not open: {forged:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_history_refuses_replays_and_forged_headers() {
    let (fixture, _dir) = sqlite().await;
    the_history_refuses_replays_and_forged_headers(fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_the_history_refuses_replays_and_forged_headers(pool: PgPool) {
    the_history_refuses_replays_and_forged_headers(postgres(pool).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_chart_lists_the_latest_observation_per_code() {
    let (fixture, _dir) = sqlite().await;
    the_chart_lists_the_latest_observation_per_code(fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_the_chart_lists_the_latest_observation_per_code(pool: PgPool) {
    the_chart_lists_the_latest_observation_per_code(postgres(pool).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_chart_and_history_follow_the_record() {
    let (fixture, _dir) = sqlite().await;
    chart_and_history_follow_the_record(fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_chart_and_history_follow_the_record(pool: PgPool) {
    chart_and_history_follow_the_record(postgres(pool).await).await;
}

// ---- A chart read folds what the read model has not applied --------------------------------

/// Every kind of chart change after registration, for synthetic patient `seed` (whose
/// clinical commands 0..20 recorded the condition, order, allergy and note changed here).
fn chart_changes(seed: u64) -> Vec<PatientCommand> {
    let note_id = NoteId::from_uuid(synthetic::synthetic_uuid(seed, 6, 19));
    let restriction_id = ConsentRestrictionId::from_uuid(Uuid::from_u128(0xc0de));
    let colleague = UserId::from_uuid(Uuid::from_u128(0xc011));
    let note = |text: &str| NoteText::parse(text).unwrap();
    vec![
        PatientCommand::ResolveCondition {
            condition_id: ConditionId::from_uuid(synthetic::synthetic_uuid(seed, 3, 5)),
            resolved_at: now(),
        },
        PatientCommand::RefuteAllergy {
            allergy_id: AllergyId::from_uuid(synthetic::synthetic_uuid(seed, 5, 15)),
        },
        PatientCommand::DiscontinueMedication {
            medication_order_id: MedicationOrderId::from_uuid(synthetic::synthetic_uuid(
                seed, 4, 10,
            )),
            reason: DiscontinuationReason::AdverseReaction,
        },
        PatientCommand::AmendNote {
            note_id,
            text: note("Amended: vitals reviewed twice."),
        },
        PatientCommand::SignNote {
            note_id,
            signer: physician().user_id,
        },
        PatientCommand::AddNoteAddendum {
            note_id,
            text: note("Addendum: follow up in two weeks."),
        },
        PatientCommand::CorrectDemographics {
            correction: DemographicsCorrection {
                name: Some(
                    PersonName::new(
                        vec![GivenName::parse("Corrected").unwrap()],
                        FamilyName::parse("Name").unwrap(),
                    )
                    .unwrap(),
                ),
                ..DemographicsCorrection::default()
            },
        },
        PatientCommand::GrantConsentRestriction {
            restriction_id,
            kind: ConsentRestrictionKind::HideNotesFromRole(Role::Nurse),
        },
        PatientCommand::AssignCareRelationship {
            clinician: colleague,
        },
        PatientCommand::EndCareRelationship {
            clinician: colleague,
        },
        PatientCommand::RevokeConsentRestriction { restriction_id },
    ]
}

async fn chart_at<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
    reader: &ChartReader,
    patient: PatientId,
    head: StreamHead,
) -> Box<Chart> {
    match reader
        .read_at(&fixture.db, &fixture.ledger, patient, head)
        .await
        .expect("read chart at head")
    {
        Some(ChartAnswer::Found(chart)) => chart,
        other => panic!("the chart at the head is there, not {other:?}"),
    }
}

/// A chart read at the head its caller loaded folds the events the read model has not applied,
/// and gives exactly the chart the projection gives once it has applied them: checked after
/// tails of 1 to 9 events, starting from no chart at all, over every kind of change, with
/// observations arriving out of order and tied. A head the log does not end at is refused; a
/// read model that trails by more than the fold allows is left to the caller.
async fn a_chart_read_folds_what_the_read_model_has_not_applied<
    S: EventStore,
    K: KeyStore + 'static,
>(
    fixture: Fixture<S, K>,
) {
    let seed = 11;
    let patient = synthetic::patient_id(seed);
    // Effective times out of order, with ties, so the latest reading per code is decided
    // across the fold and the projection alike.
    let minutes_ago = |n: u64| ((n * 37) % 11) as i64;
    let at = |n: u64| {
        Timestamp::from_unix_micros(now().unix_micros() - minutes_ago(n) * 60_000_000).unwrap()
    };
    let commands: Vec<PatientCommand> = std::iter::once(synthetic::registration(seed))
        .chain((0..20).map(|n| synthetic::clinical_command(seed, n, at(n))))
        .chain(chart_changes(seed))
        .chain((20..32).map(|n| synthetic::clinical_command(seed, n, at(n))))
        .collect();
    let catch_up_after = [3, 4, 9, 10, 14, 22, 25, 27, 31, 40, 43];
    // One reader across the run, which keeps what it folded while the read model trails, and
    // a new one for each read, which folds from the read model's copy every time.
    let kept = ChartReader::new(fixture.index_key.clone());
    let fresh = || ChartReader::new(fixture.index_key.clone());
    let mut head = None;
    for (index, command) in commands.into_iter().enumerate() {
        let kind = command.kind();
        let outcome = fixture
            .ledger
            .execute(patient, command, physician(), now())
            .await
            .unwrap_or_else(|error| panic!("{kind} accepted: {error}"));
        let now_head = outcome
            .record
            .and_then(|record| record.head)
            .expect("a head");
        head = Some(now_head);
        let folded = chart_at(&fixture, &kept, patient, now_head).await;
        assert_eq!(folded.stream_version, now_head.version, "after {kind}");
        assert_eq!(
            folded,
            chart_at(&fixture, &fresh(), patient, now_head).await,
            "a fold onto the kept chart is a fold onto the read model's copy (after {kind})"
        );
        if !catch_up_after.contains(&index) {
            continue;
        }
        let stored_version = match read_chart(&fixture.db, fixture.ledger.keys(), patient)
            .await
            .expect("read chart")
        {
            ChartAnswer::Found(chart) => chart.stream_version,
            ChartAnswer::NotFound => 0,
            ChartAnswer::Erased { .. } => panic!("not erased"),
        };
        assert!(
            stored_version < now_head.version,
            "the read model trails before catch-up, so the fold ran (after {kind})"
        );
        fixture.runner().catch_up().await.expect("catch up");
        let ChartAnswer::Found(projected) = read_chart(&fixture.db, fixture.ledger.keys(), patient)
            .await
            .expect("read chart")
        else {
            panic!("the chart is there");
        };
        assert_eq!(
            projected,
            folded,
            "the fold of versions {}..={} onto the read model is the projection's chart",
            stored_version + 1,
            now_head.version
        );
    }
    let head = head.expect("commands ran");
    let chart = chart_at(&fixture, &kept, patient, head).await;
    assert!(chart.demographics.is_some() && !chart.observations.is_empty());
    assert!(
        chart
            .conditions
            .iter()
            .any(|condition| !condition.is_active())
    );
    assert!(chart.allergies.iter().any(|allergy| allergy.refuted));
    assert!(
        chart
            .medication_orders
            .iter()
            .any(|order| !order.is_active())
    );
    assert!(
        chart
            .notes
            .iter()
            .any(|note| note.is_signed() && !note.addenda.is_empty())
    );

    // A head whose hash the log does not end at: nothing is folded.
    let forged = StreamHead {
        version: head.version + 1,
        hash: head.hash,
    };
    fixture
        .execute(patient, synthetic::clinical_command(seed, 32, now()))
        .await;
    let refused = fresh()
        .read_at(&fixture.db, &fixture.ledger, patient, forged)
        .await;
    assert!(
        matches!(refused, Err(ProjectionError::Tail { .. })),
        "a head the log does not end at is refused: {refused:?}"
    );

    // Further behind than the fold reaches: the caller waits for the read model instead.
    let mut record = fixture.ledger.load(patient).await.expect("load");
    for n in 0..CHART_TAIL_FOLD_EVENTS_MAX {
        // Each command decided on the record the last one left, not on a fold of the stream.
        let options = chartlog_store::ExecuteOptions {
            loaded: Some(record),
            ..Default::default()
        };
        let command = synthetic::clinical_command(seed, 33 + n, now());
        record = fixture
            .ledger
            .execute_with(patient, command, physician(), now(), options)
            .await
            .expect("command accepted")
            .record
            .expect("a record");
    }
    let far = record.head.expect("a head");
    let answer = fresh()
        .read_at(&fixture.db, &fixture.ledger, patient, far)
        .await
        .expect("read chart at head");
    assert!(
        answer.is_none(),
        "no fold of {} events",
        far.version - head.version
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_chart_read_folds_what_the_read_model_has_not_applied() {
    let (fixture, _dir) = sqlite().await;
    a_chart_read_folds_what_the_read_model_has_not_applied(fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_a_chart_read_folds_what_the_read_model_has_not_applied(pool: PgPool) {
    a_chart_read_folds_what_the_read_model_has_not_applied(postgres(pool).await).await;
}

/// A chart read at the head a reader last answered for answers from what it kept, with no
/// statement: whether that chart was the read model's copy or a fold past it. A read at any
/// other head goes to the read model.
async fn a_chart_read_at_the_head_last_answered_needs_no_statement<
    S: EventStore,
    K: KeyStore + 'static,
>(
    fixture: Fixture<S, K>,
) {
    let seed = 12;
    let patient = synthetic::patient_id(seed);
    let head_after = |outcome: chartlog_store::CommandOutcome| {
        outcome
            .record
            .and_then(|record| record.head)
            .expect("a head")
    };
    let mut head = None;
    for command in std::iter::once(synthetic::registration(seed))
        .chain((0..6).map(|n| synthetic::clinical_command(seed, n, now())))
    {
        let outcome = fixture
            .ledger
            .execute(patient, command, physician(), now())
            .await
            .expect("command accepted");
        head = Some(head_after(outcome));
    }
    let caught_up = head.expect("commands ran");
    fixture.runner().catch_up().await.expect("catch up");
    let outcome = fixture
        .ledger
        .execute(
            patient,
            synthetic::clinical_command(seed, 6, now()),
            physician(),
            now(),
        )
        .await
        .expect("command accepted");
    let trailed = head_after(outcome);

    // One reader keeps the read model's copy, the other a fold past it.
    let keeps_the_copy = ChartReader::new(fixture.index_key.clone());
    let keeps_a_fold = ChartReader::new(fixture.index_key.clone());
    let copy = chart_at(&fixture, &keeps_the_copy, patient, caught_up).await;
    let fold = chart_at(&fixture, &keeps_a_fold, patient, trailed).await;
    assert_eq!(
        (copy.stream_version, fold.stream_version),
        (caught_up.version, trailed.version)
    );

    match &fixture.db {
        ProjectionDb::Sqlite(pool) => pool.close().await,
        ProjectionDb::Postgres(pool) => pool.close().await,
    }
    assert_eq!(
        chart_at(&fixture, &keeps_the_copy, patient, caught_up).await,
        copy
    );
    assert_eq!(
        chart_at(&fixture, &keeps_a_fold, patient, trailed).await,
        fold
    );
    let elsewhere = keeps_the_copy
        .read_at(&fixture.db, &fixture.ledger, patient, trailed)
        .await;
    assert!(
        elsewhere.is_err(),
        "another head needs the read model, closed here: {elsewhere:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_chart_read_at_the_head_last_answered_needs_no_statement() {
    let (fixture, _dir) = sqlite().await;
    a_chart_read_at_the_head_last_answered_needs_no_statement(fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_a_chart_read_at_the_head_last_answered_needs_no_statement(pool: PgPool) {
    // The store's notification listener holds one of its pool's connections for good, so
    // closing that pool would wait forever: the read model gets a pool of its own to close.
    let read_model = sqlx::postgres::PgPoolOptions::new()
        .connect_with((*pool.connect_options()).clone())
        .await
        .expect("read model pool");
    let mut fixture = postgres(pool).await;
    fixture.db = ProjectionDb::Postgres(read_model);
    a_chart_read_at_the_head_last_answered_needs_no_statement(fixture).await;
}

// ---- Erasure end to end ------------------------------------------------------------------

fn assert_no_marker(place: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes).to_lowercase();
    for marker in MARKERS {
        assert!(
            !text.contains(&marker.to_lowercase()),
            "{place} holds a marker in the clear"
        );
        assert!(
            !text.contains(&hex_lower(marker.as_bytes())),
            "{place} holds a marker hex-encoded"
        );
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn scan_sqlite(pool: &sqlx::SqlitePool, dir: &std::path::Path) {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
    )
    .fetch_all(pool)
    .await
    .expect("tables");
    assert!(tables.iter().any(|t| t == "chartlog_chart_entries"));
    for table in &tables {
        let columns: Vec<String> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT name FROM pragma_table_info('{table}')"
        )))
        .fetch_all(pool)
        .await
        .expect("columns")
        .iter()
        .map(|row| row.get::<String, _>(0))
        .collect();
        for column in columns {
            let values: Vec<Option<Vec<u8>>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT CAST(\"{column}\" AS BLOB) FROM \"{table}\""
            )))
            .fetch_all(pool)
            .await
            .expect("values");
            for value in values.into_iter().flatten() {
                assert_no_marker(&format!("{table}.{column}"), &value);
            }
        }
    }
    // And the files themselves (database and write-ahead log), free pages included.
    for entry in std::fs::read_dir(dir).expect("dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            let bytes = std::fs::read(&path).expect("read file");
            assert_no_marker(&path.display().to_string(), &bytes);
        }
    }
}

async fn scan_postgres(pool: &PgPool) {
    let tables: Vec<(String, String)> = sqlx::query_as(
        "SELECT table_schema, table_name FROM information_schema.tables \
         WHERE table_type = 'BASE TABLE' \
         AND table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(pool)
    .await
    .expect("tables");
    assert!(tables.iter().any(|(_, t)| t == "chartlog_chart_entries"));
    for (schema, table) in &tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM \"{schema}\".\"{table}\" t"
        )))
        .fetch_all(pool)
        .await
        .expect("rows");
        for row in rows {
            assert_no_marker(&format!("{schema}.{table}"), row.as_bytes());
        }
    }
}

async fn count_rows_of(db: &ProjectionDb, patient: PatientId) -> i64 {
    let mut total = 0;
    for table in [
        "chartlog_chart_entries",
        "chartlog_chart_lookups",
        "chartlog_history",
        "chartlog_history_entries",
    ] {
        let row = db
            .fetch_optional(
                sqlx::AssertSqlSafe(format!(
                    "SELECT COUNT(*) FROM {table} WHERE patient_id = $1"
                )),
                vec![chartlog_projections::db::SqlArg::Uuid(patient.as_uuid())],
            )
            .await
            .expect("count")
            .expect("a count row");
        total += row.i64(0).expect("count");
    }
    total
}

async fn erasure_leaves_no_plaintext<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
) {
    let patient = PatientId::from_uuid(Uuid::from_u128(0xe4a5e));
    let other = synthetic::patient_id(5);
    fixture.execute(other, synthetic::registration(5)).await;
    register_marker_patient(fixture, patient).await;
    fixture.runner().catch_up().await.expect("catch up");
    assert!(count_rows_of(&fixture.db, patient).await > 0);

    let erased_at = fixture
        .execute(
            patient,
            PatientCommand::ErasePatient {
                reason: ErasureReason::PatientRequest,
            },
        )
        .await;
    fixture.runner().catch_up().await.expect("catch up");
    wait_for_position(&fixture.db, "chart", erased_at, Duration::from_secs(1))
        .await
        .expect("the tombstone is applied");

    assert_eq!(count_rows_of(&fixture.db, patient).await, 0, "rows dropped");
    assert!(count_rows_of(&fixture.db, other).await > 0, "others kept");
    assert_eq!(
        read_chart(&fixture.db, fixture.ledger.keys(), patient)
            .await
            .expect("read"),
        ChartAnswer::Erased { erased_at: now() }
    );
    assert!(matches!(
        read_history(&fixture.db, fixture.ledger.keys(), patient, None, 10)
            .await
            .expect("read"),
        HistoryAnswer::Erased { .. }
    ));
    assert!(
        find_by_mrn(
            &fixture.db,
            &fixture.index_key,
            &Mrn::parse("ZQXMARK-77").unwrap()
        )
        .await
        .expect("look-up")
        .is_empty()
    );

    // A rebuild from position 0 brings none of it back.
    let head = fixture.runner().rebuild().await.expect("rebuild");
    assert_eq!(head, erased_at);
    assert_eq!(
        count_rows_of(&fixture.db, patient).await,
        0,
        "rebuild drops"
    );
    assert!(count_rows_of(&fixture.db, other).await > 0);
    assert!(matches!(
        read_chart(&fixture.db, fixture.ledger.keys(), patient)
            .await
            .expect("read"),
        ChartAnswer::Erased { .. }
    ));

    // The log cannot be opened: the key is gone, and the answer says so.
    let stream = StreamId::patient(patient);
    assert!(matches!(
        fixture.ledger.keys().key_for_read(&stream).await,
        Err(KeyError::Erased { .. })
    ));
    assert!(matches!(
        fixture.ledger.load(patient).await,
        Err(LedgerError::Erased { .. })
    ));
    let mut after = 0;
    loop {
        let page = fixture
            .ledger
            .store()
            .read_all(after, 500)
            .await
            .expect("read");
        let Some(last) = page.last() else { break };
        after = last.position;
        for recorded in page {
            assert_no_marker("a stored event", &recorded.event.ciphertext);
        }
    }

    // And the store still verifies.
    let report = verify_log(fixture.ledger.store().as_ref(), &fixture.verifier)
        .await
        .expect("verify");
    assert!(report.is_intact(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_erasure_leaves_no_plaintext_anywhere() {
    let (fixture, dir) = sqlite().await;
    erasure_leaves_no_plaintext(&fixture).await;
    let ProjectionDb::Sqlite(pool) = &fixture.db else {
        unreachable!()
    };
    // Checkpoint the WAL into the file so both are scanned as they rest on disk.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(pool)
        .await
        .expect("checkpoint");
    scan_sqlite(pool, dir.path()).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_erasure_leaves_no_plaintext_anywhere(pool: PgPool) {
    let fixture = postgres(pool.clone()).await;
    erasure_leaves_no_plaintext(&fixture).await;
    scan_postgres(&pool).await;
}

#[test]
fn the_marker_scan_finds_markers() {
    assert!(std::panic::catch_unwind(|| assert_no_marker("x", b"..zqxmarkcity..")).is_err());
    let hex = hex_lower(b"Zqxmarkgiven");
    assert!(std::panic::catch_unwind(|| assert_no_marker("x", hex.as_bytes())).is_err());
    assert_no_marker("x", b"nothing here");
}

// ---- A rebuild and the live run give identical read models -------------------------------

/// Everything the read models hold, opened: clear tables as they are, sealed ones through the
/// query functions (sealed bytes differ by nonce, their content must not).
async fn read_models<S: EventStore, K: KeyStore + 'static>(fixture: &Fixture<S, K>) -> Vec<String> {
    let mut dump = Vec::new();
    let patients = fixture
        .db
        .fetch_all(
            "SELECT patient_id, stream_version, erased_at_us FROM chartlog_chart_patients \
             ORDER BY patient_id",
            vec![],
        )
        .await
        .expect("patients");
    for row in patients {
        let patient = PatientId::from_uuid(row.uuid(0).expect("id"));
        dump.push(format!(
            "patient {patient} v{} erased {:?}",
            row.i64(1).expect("version"),
            row.opt_i64(2).expect("erased")
        ));
        // Debug redacts PHI, so compare the values through PartialEq and record the verdict.
        let chart = read_chart(&fixture.db, fixture.ledger.keys(), patient)
            .await
            .expect("chart");
        let history = read_history(&fixture.db, fixture.ledger.keys(), patient, None, 200)
            .await
            .expect("history");
        dump.push(format!("chart {patient} {}", fingerprint(&chart)));
        dump.push(format!("history {patient} {}", fingerprint(&history)));
    }
    let lookups = fixture
        .db
        .fetch_all(
            "SELECT patient_id, kind, digest FROM chartlog_chart_lookups ORDER BY patient_id, kind",
            vec![],
        )
        .await
        .expect("lookups");
    for row in lookups {
        dump.push(format!(
            "lookup {} {} {}",
            row.uuid(0).expect("id"),
            row.text(1).expect("kind"),
            hex_lower(&row.bytes(2).expect("digest"))
        ));
    }
    dump
}

/// A label for a value's full content, PHI included, for comparison only: equal values get
/// equal labels (by `PartialEq`; `Debug` would redact the PHI), across threads and calls.
fn fingerprint<T: PartialEq + Clone + Send + 'static>(value: &T) -> String {
    static SEEN: std::sync::Mutex<Vec<Box<dyn std::any::Any + Send>>> =
        std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().expect("not poisoned");
    let index = seen
        .iter()
        .position(|other| other.downcast_ref::<T>() == Some(value))
        .unwrap_or_else(|| {
            seen.push(Box::new(value.clone()));
            seen.len() - 1
        });
    format!("#{index}")
}

async fn rebuild_matches_the_live_run<S: EventStore, K: KeyStore + 'static>(
    fixture: Fixture<S, K>,
) {
    let fixture = Arc::new(fixture);
    let runner = Arc::new(fixture.runner());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let live = tokio::spawn({
        let runner = runner.clone();
        async move {
            runner
                .run(async {
                    let _ = stopped.await;
                })
                .await
        }
    });

    // Commands land while the runner follows the log, in small batches.
    let mut last = 0;
    for seed in 0..6 {
        let patient = synthetic::patient_id(seed);
        last = fixture
            .execute(patient, synthetic::registration(seed))
            .await;
        for n in 0..25 {
            last = fixture
                .execute(patient, synthetic::clinical_command(seed, n, now()))
                .await;
        }
    }
    let marker = PatientId::from_uuid(Uuid::from_u128(0xfeed));
    register_marker_patient(&fixture, marker).await;
    last = last.max(
        fixture
            .execute(
                synthetic::patient_id(2),
                PatientCommand::ErasePatient {
                    reason: ErasureReason::RegisteredInError,
                },
            )
            .await,
    );
    for name in ["chart", "history"] {
        wait_for_position(&fixture.db, name, last, Duration::from_secs(10))
            .await
            .expect("read-your-writes");
    }
    let _ = stop.send(());
    live.await.expect("runner task").expect("runner");

    let live_models = read_models(&fixture).await;
    assert!(live_models.len() > 20);
    let rebuilt_to = fixture.runner().rebuild().await.expect("rebuild");
    assert!(rebuilt_to >= last);
    let rebuilt_models = read_models(&fixture).await;
    assert_eq!(
        live_models, rebuilt_models,
        "rebuild differs from the live run"
    );

    // A new version of the chart's fold: the runner resets that read model alone and replays
    // it from position 0; the history, at its own version, is not touched.
    let bumped = Arc::new(Bumped {
        inner: ChartProjection::new(fixture.index_key.clone()),
        applied: std::sync::Mutex::new(Vec::new()),
    });
    let history = Arc::new(Bumped {
        inner: HistoryProjection,
        applied: std::sync::Mutex::new(Vec::new()),
    });
    let runner = ProjectionRunner::new(
        fixture.ledger.store().clone(),
        fixture.ledger.keys().clone(),
        fixture.verifier.clone(),
        fixture.db.clone(),
        vec![bumped.clone(), history.clone() as Arc<dyn Projection>],
    );
    // The history wrapper reports the history's own version: it must not be reset.
    let caught_up_to = runner.catch_up().await.expect("catch up after the bump");
    assert!(caught_up_to >= last);
    let positions = bumped.applied.lock().expect("not poisoned").clone();
    let log = fixture
        .db
        .fetch_all(
            "SELECT MIN(position), COUNT(*) FROM chartlog_events",
            vec![],
        )
        .await
        .expect("log extent");
    let first = u64::try_from(log[0].i64(0).expect("first")).expect("positive");
    let count = usize::try_from(log[0].i64(1).expect("count")).expect("positive");
    assert_eq!(
        positions.first(),
        Some(&first),
        "the bumped fold starts from the log's start"
    );
    assert_eq!(positions.len(), count, "every event, once");
    assert!(
        history.applied.lock().expect("not poisoned").is_empty(),
        "a projection at its own version is not replayed"
    );
    let stored_version = fixture
        .db
        .fetch_all(
            "SELECT CAST(version AS BIGINT) FROM chartlog_projection_checkpoints WHERE name = 'chart'",
            vec![],
        )
        .await
        .expect("checkpoint");
    assert_eq!(
        stored_version[0].i64(0).expect("version"),
        i64::from(chartlog_projections::chart::CHART_PROJECTION_VERSION) + 1
    );
    assert_eq!(
        read_models(&fixture).await,
        live_models,
        "the bumped rebuild differs from the live run"
    );
}

/// A projection as it would be after a change to its fold when `P` is the chart (version one
/// higher); the history is wrapped at its own version to watch that it is left alone.
/// Records the positions it is given.
struct Bumped<P: Projection> {
    inner: P,
    applied: std::sync::Mutex<Vec<u64>>,
}

#[chartlog_projections::async_trait]
impl<P: Projection> Projection for Bumped<P> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn version(&self) -> u32 {
        if self.inner.name() == "chart" {
            self.inner.version() + 1
        } else {
            self.inner.version()
        }
    }

    async fn apply(
        &self,
        tx: &mut chartlog_projections::db::ProjectionTx,
        events: &[chartlog_projections::ProjectedEvent],
    ) -> Result<(), chartlog_projections::ProjectionError> {
        self.applied
            .lock()
            .expect("not poisoned")
            .extend(events.iter().map(|event| event.position));
        self.inner.apply(tx, events).await
    }

    async fn reset(
        &self,
        tx: &mut chartlog_projections::db::ProjectionTx,
    ) -> Result<(), chartlog_projections::ProjectionError> {
        self.inner.reset(tx).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_rebuild_matches_the_live_run() {
    let (fixture, _dir) = sqlite().await;
    rebuild_matches_the_live_run(fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_rebuild_matches_the_live_run(pool: PgPool) {
    rebuild_matches_the_live_run(postgres(pool).await).await;
}

// ---- De-identified views and the audit trail under the runner ----------------------------

/// The de-identification secret of these tests: fixed, so the expected pseudonyms can be
/// computed here.
const DEID_SECRET: [u8; 32] = [0x5a; 32];

fn pseudonymizer() -> Pseudonymizer {
    Pseudonymizer::new(MacKey::from_bytes(&DEID_SECRET))
}

fn deid_and_audit() -> Vec<Arc<dyn Projection>> {
    vec![
        Arc::new(DeidentifiedProjection::new(pseudonymizer())),
        Arc::new(AuditTrailProjection),
    ]
}

impl<S: EventStore, K: KeyStore + 'static> Fixture<S, K> {
    fn runner_with(&self, projections: Vec<Arc<dyn Projection>>) -> ProjectionRunner<S, K> {
        ProjectionRunner::new(
            self.ledger.store().clone(),
            self.ledger.keys().clone(),
            self.verifier.clone(),
            self.db.clone(),
            projections,
        )
    }
}

/// Synthetic patient `seed`'s registration (its birth date, sex and state) with every
/// identifier replaced by a marker value, living at `zip`.
fn synthetic_with_markers(seed: u64, state: &str, zip: &str) -> PatientCommand {
    let PatientCommand::RegisterPatient {
        patient_id,
        demographics: synthetic,
    } = synthetic::registration(seed)
    else {
        unreachable!("registration registers")
    };
    let markers = marker_demographics();
    PatientCommand::RegisterPatient {
        patient_id,
        demographics: Demographics {
            birth_date: synthetic.birth_date,
            sex: synthetic.sex,
            address: Some(
                PostalAddress::new(
                    vec![AddressLine::parse("1 Zqxmarkstreet").unwrap()],
                    City::parse("Zqxmarkcity").unwrap(),
                    UsState::parse(state).unwrap(),
                    PostalCode::parse(zip).unwrap(),
                )
                .unwrap(),
            ),
            ..markers
        },
    }
}

/// The de-identified tables: (SQLite name, PostgreSQL name).
const DEID_TABLES: [(&str, &str); 5] = [
    ("deid_patients", "chartlog_deid_patients"),
    ("deid_observations", "deidentified.observations"),
    ("deid_conditions", "deidentified.conditions"),
    ("deid_medication_orders", "deidentified.medication_orders"),
    ("deid_allergies", "deidentified.allergies"),
];

fn deid_table(db: &ProjectionDb, index: usize) -> &'static str {
    match db.backend() {
        Backend::Sqlite => DEID_TABLES[index].0,
        Backend::Postgres => DEID_TABLES[index].1,
    }
}

async fn deid_rows_of(db: &ProjectionDb, pseudonym: &str) -> [i64; 5] {
    let mut counts = [0; 5];
    for (index, count) in counts.iter_mut().enumerate() {
        let row = db
            .fetch_optional(
                sqlx::AssertSqlSafe(format!(
                    "SELECT COUNT(*) FROM {} WHERE pseudonym = $1",
                    deid_table(db, index)
                )),
                vec![SqlArg::Text(pseudonym.to_owned())],
            )
            .await
            .expect("count")
            .expect("a count row");
        *count = row.i64(0).expect("count");
    }
    counts
}

/// Every value of every de-identified row, as text (for the marker and identifier scan).
async fn deid_dump(db: &ProjectionDb) -> Vec<String> {
    let mut dump = Vec::new();
    for index in 0..DEID_TABLES.len() {
        let table = deid_table(db, index);
        let sql = match db.backend() {
            // SQLite has no row-to-text cast: quote() of each column, joined.
            Backend::Sqlite => {
                let columns = db
                    .fetch_all(
                        sqlx::AssertSqlSafe(format!(
                            "SELECT name FROM pragma_table_info('{table}')"
                        )),
                        vec![],
                    )
                    .await
                    .expect("columns");
                let quoted: Vec<String> = columns
                    .iter()
                    .map(|row| format!("quote(\"{}\")", row.text(0).expect("name")))
                    .collect();
                format!("SELECT {} FROM {table}", quoted.join(" || ',' || "))
            }
            Backend::Postgres => format!("SELECT t::text FROM {table} t"),
        };
        for row in db
            .fetch_all(sqlx::AssertSqlSafe(sql), vec![])
            .await
            .expect("rows")
        {
            dump.push(format!("{table} {}", row.text(0).expect("text")));
        }
    }
    dump
}

/// The audit rows, in log order: (position, user, role, patient, entity, record, action,
/// outcome, event type).
type AuditLine = (
    i64,
    Option<Uuid>,
    Option<String>,
    Option<Uuid>,
    Option<String>,
    Option<Uuid>,
    String,
    String,
    Option<String>,
);

async fn audit_lines(db: &ProjectionDb) -> Vec<AuditLine> {
    db.fetch_all(
        "SELECT source_position, user_id, role, patient_id, entity, record_id, action, outcome, \
         event_type FROM chartlog_audit_trail ORDER BY source_position",
        vec![],
    )
    .await
    .expect("audit rows")
    .into_iter()
    .map(|row| {
        (
            row.i64(0).expect("position"),
            row.opt_uuid(1).expect("user"),
            row.opt_text(2).expect("role"),
            row.opt_uuid(3).expect("patient"),
            row.opt_text(4).expect("entity"),
            row.opt_uuid(5).expect("record"),
            row.text(6).expect("action"),
            row.text(7).expect("outcome"),
            row.opt_text(8).expect("event type"),
        )
    })
    .collect()
}

/// Every event of the global log: (position, patient, event type).
async fn log_events<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
) -> Vec<(u64, Option<PatientId>, String)> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = fixture
            .ledger
            .store()
            .read_all(after, 500)
            .await
            .expect("read");
        let Some(last) = page.last() else { break };
        after = last.position;
        events.extend(page.into_iter().map(|recorded| {
            (
                recorded.position,
                recorded.event.header.stream_id.patient_id(),
                recorded.event.header.event_type,
            )
        }));
    }
    events
}

/// The audit trail holds one row per event of the log, with the header's facts.
async fn assert_one_audit_row_per_event<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
) -> Vec<AuditLine> {
    let lines = audit_lines(&fixture.db).await;
    let events = log_events(fixture).await;
    assert_eq!(lines.len(), events.len(), "one audit row per event");
    for (line, (position, patient, event_type)) in lines.iter().zip(&events) {
        let (entity, action) = entity_and_action(event_type).expect("a known event type");
        assert_eq!(line.0, i64::try_from(*position).unwrap());
        assert_eq!(line.1, Some(physician().user_id.as_uuid()), "user");
        assert_eq!(line.2.as_deref(), Some(physician().role.as_str()), "role");
        assert_eq!(line.3, patient.map(|p| p.as_uuid()), "patient");
        assert_eq!(line.4.as_deref(), Some(entity.as_str()), "entity");
        assert!(line.5.is_some(), "record id");
        assert_eq!(line.6, action.as_str(), "action");
        assert_eq!(line.7, "success");
        assert_eq!(line.8.as_deref(), Some(event_type.as_str()));
    }
    lines
}

async fn deidentified_and_audit_under_the_runner<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
) {
    // Born 1975 in Springfield, IL (ZIP3 627); born 1938 in a restricted ZIP3 area (059, VT);
    // and the 1901 marker patient (aged 90 or over).
    let young = synthetic::patient_id(40);
    let restricted = synthetic::patient_id(3);
    let old = PatientId::from_uuid(Uuid::from_u128(0x01d));
    fixture
        .execute(young, synthetic_with_markers(40, "IL", "62704"))
        .await;
    fixture
        .execute(restricted, synthetic_with_markers(3, "VT", "05901"))
        .await;
    for n in 0..20 {
        fixture
            .execute(young, synthetic::clinical_command(40, n, now()))
            .await;
    }
    let last = register_marker_patient(fixture, old).await;

    let runner = fixture.runner_with(deid_and_audit());
    assert_eq!(runner.catch_up().await.expect("catch up"), last);

    // Patients: pseudonym, birth year (or 90+), sex, state and ZIP3 only.
    let pseudonyms = pseudonymizer();
    let patients = fixture
        .db
        .fetch_all(
            sqlx::AssertSqlSafe(format!(
                "SELECT pseudonym, CAST(birth_year AS BIGINT), aged_90_or_over, sex, state, zip3 \
                 FROM {} ORDER BY pseudonym",
                deid_table(&fixture.db, 0)
            )),
            vec![],
        )
        .await
        .expect("patients");
    assert_eq!(patients.len(), 3);
    let patient_row = |patient: PatientId| {
        let pseudonym = pseudonyms.patient(patient);
        let row = patients
            .iter()
            .find(|row| row.text(0).expect("pseudonym") == pseudonym.as_str())
            .expect("the patient is there under its pseudonym");
        (
            row.opt_i64(1).expect("birth year"),
            row.bool(2).expect("90+"),
            row.text(3).expect("sex"),
            row.opt_text(4).expect("state"),
            row.opt_text(5).expect("zip3"),
        )
    };
    assert_eq!(
        patient_row(young),
        (
            Some(1975),
            false,
            "female".to_owned(),
            Some("IL".to_owned()),
            Some("627".to_owned())
        )
    );
    assert_eq!(
        patient_row(restricted),
        (
            Some(1938),
            false,
            "male".to_owned(),
            Some("VT".to_owned()),
            Some("000".to_owned())
        ),
        "a restricted ZIP3 is 000"
    );
    let (birth_year, ninety_or_over, ..) = patient_row(old);
    assert_eq!((birth_year, ninety_or_over), (None, true), "90+ is grouped");

    // Coded data and values stay.
    let young_pseudonym = pseudonyms.patient(young);
    let counts = deid_rows_of(&fixture.db, young_pseudonym.as_str()).await;
    assert_eq!(
        counts,
        [1, 16, 1, 1, 1],
        "patient, observations, condition, order, allergy"
    );
    let observations = fixture
        .db
        .fetch_all(
            sqlx::AssertSqlSafe(format!(
                "SELECT code_system, code, value_kind, CAST(year AS BIGINT) FROM {} \
                 WHERE pseudonym = $1",
                deid_table(&fixture.db, 1)
            )),
            vec![SqlArg::Text(young_pseudonym.as_str().to_owned())],
        )
        .await
        .expect("observations");
    for row in &observations {
        assert_eq!(row.text(0).expect("system"), "loinc");
        assert!(!row.text(1).expect("code").is_empty());
        assert_eq!(row.text(2).expect("kind"), "quantity");
        assert_eq!(row.i64(3).expect("year"), 2025, "the year only");
    }
    let free_text = fixture
        .db
        .fetch_all(
            sqlx::AssertSqlSafe(format!(
                "SELECT value_kind FROM {} WHERE pseudonym = $1 AND value IS NULL",
                deid_table(&fixture.db, 1)
            )),
            vec![SqlArg::Text(pseudonyms.patient(old).as_str().to_owned())],
        )
        .await
        .expect("observations");
    assert_eq!(
        free_text.len(),
        1,
        "the narrative observation, its text removed"
    );
    assert_eq!(free_text[0].text(0).expect("kind"), "text_removed");
    let conditions = fixture
        .db
        .fetch_all(
            sqlx::AssertSqlSafe(format!(
                "SELECT code_system, code FROM {} WHERE pseudonym = $1",
                deid_table(&fixture.db, 2)
            )),
            vec![SqlArg::Text(pseudonyms.patient(old).as_str().to_owned())],
        )
        .await
        .expect("conditions");
    assert!(
        conditions
            .iter()
            .any(|row| row.text(0).unwrap() == "icd10cm" && row.text(1).unwrap() == "I10")
    );

    // No marker, no raw id, no full date anywhere in the views.
    let dump = deid_dump(&fixture.db).await;
    assert!(dump.len() > 40);
    for line in &dump {
        assert_no_marker("a de-identified row", line.as_bytes());
        for patient in [young, restricted, old] {
            let id = patient.as_uuid();
            for form in [id.hyphenated().to_string(), id.simple().to_string()] {
                assert!(!line.contains(&form), "a raw patient id in {line}");
            }
        }
        assert!(!line.contains("1975-"), "a full birth date");
        assert!(!line.contains("2025-11"), "a full event date");
    }

    // The audit trail: one row per event, with user, role, patient, entity and action.
    let before_erasure = assert_one_audit_row_per_event(fixture).await;
    assert_eq!(before_erasure[0].3, Some(young.as_uuid()));
    assert_eq!(before_erasure[0].4.as_deref(), Some("patient"));
    assert_eq!(
        before_erasure[0].5,
        Some(young.as_uuid()),
        "the patient is the record"
    );
    assert_eq!(before_erasure[0].6, "create");

    // Erasure: the patient's de-identified rows go, the audit rows stay.
    let erased_at = fixture
        .execute(
            young,
            PatientCommand::ErasePatient {
                reason: ErasureReason::PatientRequest,
            },
        )
        .await;
    assert_eq!(runner.catch_up().await.expect("catch up"), erased_at);
    assert_eq!(
        deid_rows_of(&fixture.db, young_pseudonym.as_str()).await,
        [0; 5]
    );
    assert_eq!(
        deid_rows_of(&fixture.db, pseudonyms.patient(restricted).as_str()).await[0],
        1,
        "others stay"
    );
    let after_erasure = assert_one_audit_row_per_event(fixture).await;
    assert_eq!(&after_erasure[..before_erasure.len()], &before_erasure[..]);
    let tombstone = after_erasure.last().expect("the erasure's row");
    assert_eq!(
        (tombstone.3, tombstone.4.as_deref(), tombstone.6.as_str()),
        (Some(young.as_uuid()), Some("patient"), "delete")
    );

    // A rebuild brings none of the patient back and keeps every audit row as it was.
    let live_dump = deid_dump(&fixture.db).await;
    assert_eq!(
        fixture
            .runner_with(deid_and_audit())
            .rebuild()
            .await
            .expect("rebuild"),
        erased_at
    );
    assert_eq!(
        deid_rows_of(&fixture.db, young_pseudonym.as_str()).await,
        [0; 5]
    );
    let mut rebuilt_dump = deid_dump(&fixture.db).await;
    let mut live_dump = live_dump;
    live_dump.sort();
    rebuilt_dump.sort();
    assert_eq!(
        live_dump, rebuilt_dump,
        "the rebuild gives the live run's rows"
    );
    assert_eq!(audit_lines(&fixture.db).await, after_erasure);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_deidentified_views_and_audit_trail_follow_the_record() {
    let (fixture, _dir) = sqlite().await;
    deidentified_and_audit_under_the_runner(&fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_deidentified_views_and_audit_trail_follow_the_record(pool: PgPool) {
    deidentified_and_audit_under_the_runner(&postgres(pool).await).await;
}

// ---- Turning 90 between events, for many patients in one batch --------------------------

/// The 90+ rule (Safe Harbor groups ages of 90 and over) applied when a later event dates a
/// patient's data in the year they turn 90, for patients in the same batch seen in different
/// years, and for one whose later event comes in a batch of its own.
async fn ninety_plus_is_grouped_by_the_year_each_patient_is_seen_in<
    S: EventStore,
    K: KeyStore + 'static,
>(
    fixture: &Fixture<S, K>,
) {
    const YEAR_MICROS: i64 = 365 * 24 * 3_600 * 1_000_000;
    let years_after_now =
        |years: i64| Timestamp::from_unix_micros(now().unix_micros() + years * YEAR_MICROS + 1);
    let observe = |seed: u64, years: i64| async move {
        let at = years_after_now(years).expect("in range");
        let command = (0..)
            .map(|n| synthetic::clinical_command(seed, n, at))
            .find(|command| matches!(command, PatientCommand::RecordObservation { .. }))
            .expect("an observation");
        fixture
            .ledger
            .execute(synthetic::patient_id(seed), command, physician(), at)
            .await
            .expect("observation accepted")
            .position
    };
    // Synthetic seed n is born in 1935 + n; `now()` is in 2025.
    let seen_next_year_at_90 = 1; // 1936, seen in 2026
    let seen_next_year_at_89 = 2; // 1937, seen in 2026
    let seen_in_four_years_at_90 = 4; // 1939, seen in 2029
    let seen_in_a_later_batch_at_90 = 86; // 1936 (1935 + 86 % 85), seen in 2026 in a batch of its own
    for seed in [
        seen_next_year_at_90,
        seen_next_year_at_89,
        seen_in_four_years_at_90,
        seen_in_a_later_batch_at_90,
    ] {
        fixture
            .execute(synthetic::patient_id(seed), synthetic::registration(seed))
            .await;
    }
    observe(seen_next_year_at_90, 1).await;
    observe(seen_next_year_at_89, 1).await;
    let last = observe(seen_in_four_years_at_90, 4).await;
    let runner = fixture.runner_with(vec![Arc::new(DeidentifiedProjection::new(pseudonymizer()))]);
    assert_eq!(runner.catch_up().await.expect("catch up"), last);

    let birth_year = |seed: u64| async move {
        let row = fixture
            .db
            .fetch_optional(
                sqlx::AssertSqlSafe(format!(
                    "SELECT CAST(birth_year AS BIGINT), aged_90_or_over FROM {} \
                     WHERE pseudonym = $1",
                    deid_table(&fixture.db, 0)
                )),
                vec![SqlArg::Text(
                    pseudonymizer()
                        .patient(synthetic::patient_id(seed))
                        .as_str()
                        .to_owned(),
                )],
            )
            .await
            .expect("patient row")
            .expect("the patient is in the views");
        (
            row.opt_i64(0).expect("birth year"),
            row.bool(1).expect("90+"),
        )
    };
    assert_eq!(birth_year(seen_next_year_at_90).await, (None, true));
    assert_eq!(birth_year(seen_next_year_at_89).await, (Some(1937), false));
    assert_eq!(birth_year(seen_in_four_years_at_90).await, (None, true));
    assert_eq!(
        birth_year(seen_in_a_later_batch_at_90).await,
        (Some(1936), false),
        "89 when registered"
    );

    let last = observe(seen_in_a_later_batch_at_90, 1).await;
    assert_eq!(runner.catch_up().await.expect("catch up"), last);
    assert_eq!(birth_year(seen_in_a_later_batch_at_90).await, (None, true));
    assert_eq!(birth_year(seen_next_year_at_89).await, (Some(1937), false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ninety_plus_is_grouped_by_the_year_each_patient_is_seen_in() {
    let (fixture, _dir) = sqlite().await;
    ninety_plus_is_grouped_by_the_year_each_patient_is_seen_in(&fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_ninety_plus_is_grouped_by_the_year_each_patient_is_seen_in(pool: PgPool) {
    ninety_plus_is_grouped_by_the_year_each_patient_is_seen_in(&postgres(pool).await).await;
}

// ---- The analyst role reads the de-identified schema and nothing else --------------------

/// Runs `sql` as the current role; `Ok` when allowed, the SQLSTATE when refused.
async fn attempt(connection: &mut sqlx::PgConnection, sql: &str) -> Result<(), String> {
    match sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(&mut *connection)
        .await
    {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(error)) => Err(error.code().unwrap_or_default().into_owned()),
        Err(other) => panic!("{sql}: {other}"),
    }
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_analyst_role_reads_only_the_deidentified_schema(pool: PgPool) {
    let fixture = postgres(pool.clone()).await;
    let patient = synthetic::patient_id(11);
    fixture
        .execute(patient, synthetic_with_markers(11, "IL", "62711"))
        .await;
    fixture
        .runner_with(deid_and_audit())
        .catch_up()
        .await
        .expect("catch up");

    let chartlog_tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'deidentified') \
         UNION ALL \
         SELECT quote_ident(schemaname) || '.' || quote_ident(viewname) FROM pg_views \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'deidentified')",
    )
    .fetch_all(&pool)
    .await
    .expect("tables");
    for table in [
        "public.chartlog_events",
        "public.chartlog_data_keys",
        "public.chartlog_deid_patients",
        "public.chartlog_audit_trail",
        "public.chartlog_projection_checkpoints",
    ] {
        assert!(chartlog_tables.iter().any(|t| t == table), "{table} listed");
    }

    // Roles are cluster-wide and tests run in parallel: a name of this test's own, a member
    // of chartlog_analyst as a deployment's login role would be, dropped at the end.
    let analyst = format!("chartlog_test_analyst_{}", Uuid::new_v4().simple());
    let mut connection = pool.acquire().await.expect("connection").detach();
    for sql in [
        format!("CREATE ROLE {analyst} NOLOGIN"),
        format!("GRANT chartlog_analyst TO {analyst}"),
        format!("SET ROLE {analyst}"),
    ] {
        attempt(&mut connection, &sql).await.expect("set up");
    }

    // Collect every verdict before judging, so the role is dropped even when one is wrong.
    let mut verdicts = Vec::new();
    for table in [
        "deidentified.patients",
        "deidentified.observations",
        "deidentified.conditions",
        "deidentified.medication_orders",
        "deidentified.allergies",
    ] {
        let sql = format!("SELECT * FROM {table}");
        verdicts.push((sql.clone(), attempt(&mut connection, &sql).await, true));
    }
    for table in &chartlog_tables {
        let sql = format!("SELECT * FROM {table} LIMIT 1");
        verdicts.push((sql.clone(), attempt(&mut connection, &sql).await, false));
    }
    for sql in [
        "DELETE FROM deidentified.observations",
        "UPDATE deidentified.conditions SET code = 'X'",
        "INSERT INTO deidentified.allergies (row_key, pseudonym, substance_system, \
         substance_code, criticality) VALUES (repeat('a', 64), 'p', 's', 'c', 'high')",
        "CREATE TABLE deidentified.planted (x integer)",
        "CREATE TABLE public.planted (x integer)",
    ] {
        verdicts.push((sql.to_owned(), attempt(&mut connection, sql).await, false));
    }
    let patients: Result<i64, sqlx::Error> =
        sqlx::query_scalar("SELECT COUNT(*) FROM deidentified.patients")
            .fetch_one(&mut connection)
            .await;

    use sqlx::Connection as _;
    let _ = connection.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP ROLE {analyst}")))
        .execute(&pool)
        .await
        .expect("drop the test role");

    for (sql, verdict, allowed) in verdicts {
        if allowed {
            assert_eq!(verdict, Ok(()), "{sql}");
        } else {
            // 42501: insufficient_privilege.
            assert_eq!(verdict, Err("42501".to_owned()), "{sql}");
        }
    }
    assert_eq!(patients.expect("count"), 1, "the analyst sees the rows");
}

// ---- One runner per projection on PostgreSQL ---------------------------------------------

async fn advisory_locks_held(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(pool)
    .await
    .expect("pg_locks")
}

/// Two server processes run the same projections: one holds each projection's lock and
/// applies the log, the other stands by; when the holder stops, the standby takes over and
/// the read models keep up.
#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_standby_runner_takes_over_when_the_holder_stops(pool: PgPool) {
    let fixture = Arc::new(postgres(pool.clone()).await);
    let spawn_runner = |fixture: &Arc<Fixture<PostgresEventStore, PostgresKeyStore>>| {
        let runner = fixture.runner();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            runner
                .run(async {
                    let _ = stopped.await;
                })
                .await
        });
        (stop, task)
    };

    let (stop_holder, holder) = spawn_runner(&fixture);
    let patient = synthetic::patient_id(11);
    let mut last = fixture.execute(patient, synthetic::registration(11)).await;
    for name in ["chart", "history"] {
        wait_for_position(&fixture.db, name, last, Duration::from_secs(10))
            .await
            .expect("the holder applies the log");
    }
    let (stop_standby, standby) = spawn_runner(&fixture);
    tokio::time::sleep(STANDBY_RETRY_INTERVAL).await;
    assert_eq!(
        advisory_locks_held(&pool).await,
        2,
        "one lock per projection (chart, history), held by one runner only"
    );

    let _ = stop_holder.send(());
    holder.await.expect("holder task").expect("holder runner");
    for n in 0..5 {
        last = fixture
            .execute(patient, synthetic::clinical_command(11, n, now()))
            .await;
    }
    for name in ["chart", "history"] {
        wait_for_position(&fixture.db, name, last, Duration::from_secs(10))
            .await
            .expect("the standby took over and applies the log");
    }
    assert_eq!(advisory_locks_held(&pool).await, 2);
    let _ = stop_standby.send(());
    standby
        .await
        .expect("standby task")
        .expect("standby runner");
}
