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
    Demographics, DemographicsCorrection, ErasureReason, ObservationValue,
};
use chartlog_domain::phi::{
    AddressLine, BirthDate, City, ContactPoint, EmailAddress, FamilyName, FreeText, GivenName,
    IdentifierSystem, IdentifierValue, Mrn, NoteText, PatientIdentifier, PersonName, PhoneNumber,
    PostalAddress, PostalCode, Sex, Ssn, UsState,
};
use chartlog_domain::{
    Actor, ConditionId, NoteId, ObservationId, PatientCommand, PatientId, PurposeOfUse, Role,
    StreamId, Timestamp, UserId, synthetic,
};
use chartlog_projections::chart::{ChartAnswer, ChartProjection, find_by_mrn, read_chart};
use chartlog_projections::db::ProjectionDb;
use chartlog_projections::history::{HistoryAnswer, HistoryProjection, read_history};
use chartlog_projections::{Projection, ProjectionRunner, wait_for_position};
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::verify::verify_log;
use chartlog_store::{EventStore, LedgerError, PatientLedger};
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
    assert_eq!(chart.observations.len(), 18 - 2 + 1);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_chart_and_history_follow_the_record() {
    let (fixture, _dir) = sqlite().await;
    chart_and_history_follow_the_record(fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_chart_and_history_follow_the_record(pool: PgPool) {
    chart_and_history_follow_the_record(postgres(pool).await).await;
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
