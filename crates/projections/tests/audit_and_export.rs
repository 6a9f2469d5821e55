//! The audit trail's HTTP-side appends and queries, and the paged de-identified export,
//! against real databases: SQLite files in a temp dir, and PostgreSQL databases created per
//! test by `#[sqlx::test]`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use chartlog_crypto::{
    DataKeys, EventSigner, KekId, KeyRing, KeyStore, MacKey, SignatureVerifier, SignerKeyId,
};
use chartlog_domain::codes::{Code, CodeSystem};
use chartlog_domain::patient::{Demographics, ObservationValue};
use chartlog_domain::phi::{
    AddressLine, City, ContactPoint, EmailAddress, FamilyName, FreeText, GivenName,
    IdentifierSystem, IdentifierValue, Mrn, PatientIdentifier, PersonName, PhoneNumber,
    PostalAddress, PostalCode, Ssn, UsState,
};
use chartlog_domain::{
    Actor, ConditionId, ObservationId, Patient, PatientCommand, PatientEvent, PatientId,
    PurposeOfUse, Role, Timestamp, UserId, decide, evolve, synthetic,
};
use chartlog_projections::audit::{
    AuditAction, AuditEntity, AuditOutcome, AuditRow, AuditTrailProjection, append_audit_rows,
};
use chartlog_projections::audit_queries::{
    AUDIT_PAGE_ROWS_MAX, AuditCursor, AuditFilter, AuditPage, accounting_of_disclosures,
    read_audit_trail,
};
use chartlog_projections::db::ProjectionDb;
use chartlog_projections::deid::export::{DeidExportWriter, DeidRecord, DeidTable, ExportFormat};
use chartlog_projections::deid::{
    DeidTables, DeidentifiedProjection, EXPORT_PAGE_ROWS, EventContext, ExportReadError,
    Pseudonymizer, export_page,
};
use chartlog_projections::{Projection, ProjectionRunner};
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::{EventStore, PatientLedger};
use sqlx::PgPool;
use uuid::Uuid;

const BASE_MICROS: i64 = 1_763_000_000_000_000;

fn now() -> Timestamp {
    Timestamp::from_unix_micros(BASE_MICROS).expect("in range")
}

fn at(micros_after_base: i64) -> Timestamp {
    Timestamp::from_unix_micros(BASE_MICROS + micros_after_base).expect("in range")
}

fn actor(user: u128, role: Role) -> Actor {
    Actor {
        user_id: UserId::from_uuid(Uuid::from_u128(user)),
        role,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    }
}

fn physician() -> Actor {
    actor(0xd0c, Role::Physician)
}

// ---- Fixtures ----------------------------------------------------------------------------

struct Fixture<S: EventStore, K: KeyStore + 'static> {
    ledger: PatientLedger<S, K>,
    verifier: Arc<SignatureVerifier>,
    db: ProjectionDb,
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
        }
    }

    fn runner_with(&self, projections: Vec<Arc<dyn Projection>>) -> ProjectionRunner<S, K> {
        ProjectionRunner::new(
            self.ledger.store().clone(),
            self.ledger.keys().clone(),
            self.verifier.clone(),
            self.db.clone(),
            projections,
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

// ---- Audit rows as the HTTP layer writes them --------------------------------------------

const PATIENTS: [u128; 4] = [0xa001, 0xa002, 0xa003, 0xa004];
const USERS: [(u128, Role); 4] = [
    (0xb001, Role::Physician),
    (0xb002, Role::Nurse),
    (0xb003, Role::Patient),
    (0xb004, Role::Auditor),
];
const GENERATED_ROWS: u64 = 620;

/// A varied row: ties of three rows per microsecond with ids out of insertion order, every
/// entity, action and outcome, with and without actor, patient, record and address.
fn generated_row(i: u64) -> AuditRow {
    let (user, role) = USERS[(i % 4) as usize];
    let mut actor = actor(user, role);
    actor.break_glass = i.is_multiple_of(13);
    actor.purpose_of_use = PurposeOfUse::ALL[(i % 8) as usize];
    let client_address: Option<IpAddr> = match i % 3 {
        0 => Some("192.0.2.17".parse().unwrap()),
        1 => Some("2001:db8::1:17".parse().unwrap()),
        _ => None,
    };
    AuditRow {
        // The high bits scramble the id order against the insertion order.
        audit_id: Uuid::from_u128(
            (u128::from(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)) << 64) | u128::from(i),
        ),
        occurred_at: at(i64::try_from(i / 3).unwrap() * 1_000_000),
        actor: (!i.is_multiple_of(17)).then_some(actor),
        patient_id: (i % 5 != 4).then(|| {
            PatientId::from_uuid(Uuid::from_u128(PATIENTS[((i / 5 + i / 23) % 4) as usize]))
        }),
        entity: AuditEntity::ALL
            .get((i % (AuditEntity::ALL.len() as u64 + 1)) as usize)
            .copied(),
        record_id: i
            .is_multiple_of(2)
            .then(|| Uuid::from_u128(0xc000 + u128::from(i))),
        action: AuditAction::ALL[(i / 2 % 10) as usize],
        outcome: AuditOutcome::ALL[(i / 7 % 3) as usize],
        client_address,
        event_type: i.is_multiple_of(11).then_some("note_written"),
    }
}

/// Every page of a query, each cursor taken through its URL text; checks the page sizes.
async fn all_pages<F, Fut>(limit: u32, mut read: F) -> (Vec<AuditRow>, usize)
where
    F: FnMut(Option<AuditCursor>) -> Fut,
    Fut: std::future::Future<Output = AuditPage>,
{
    let mut rows = Vec::new();
    let mut pages = 0;
    let mut after = None;
    loop {
        let page = read(after).await;
        pages += 1;
        assert!(
            page.rows.len() <= limit as usize,
            "a page holds at most the limit"
        );
        rows.extend(page.rows.iter().cloned());
        match page.next {
            Some(next) => {
                assert_eq!(
                    page.rows.len(),
                    limit as usize,
                    "only the last page is short"
                );
                let text = next.encode();
                after = Some(AuditCursor::decode(&text).expect("the cursor reads back"));
            }
            None => break,
        }
        assert!(pages < 10_000, "paging ends");
    }
    (rows, pages)
}

async fn read_filtered(
    db: &ProjectionDb,
    filter: &AuditFilter,
    limit: u32,
) -> (Vec<AuditRow>, usize) {
    all_pages(limit, |after| async move {
        read_audit_trail(db, filter, after.as_ref(), limit)
            .await
            .expect("read the trail")
    })
    .await
}

fn matches(filter: &AuditFilter, row: &AuditRow) -> bool {
    filter
        .user_id
        .is_none_or(|user| row.actor.map(|a| a.user_id) == Some(user))
        && filter.patient_id.is_none_or(|p| row.patient_id == Some(p))
        && filter.action.is_none_or(|action| row.action == action)
        && filter.from.is_none_or(|from| row.occurred_at >= from)
        && filter.to.is_none_or(|to| row.occurred_at < to)
}

async fn appended_rows_read_back_filtered_and_paged(db: &ProjectionDb) {
    let rows: Vec<AuditRow> = (0..GENERATED_ROWS).map(generated_row).collect();
    // Several appends, as several requests would make; a retried append adds nothing.
    for chunk in rows.chunks(97) {
        append_audit_rows(db, chunk).await.expect("append");
    }
    append_audit_rows(db, &rows[..10]).await.expect("a retry");
    append_audit_rows(db, &[]).await.expect("nothing to append");
    let expected = rows.clone();

    // Read back equal, in the order appended; the limit is clamped to 1..=500.
    let everything = AuditFilter::default();
    let first = read_audit_trail(db, &everything, None, u32::MAX)
        .await
        .expect("read");
    assert_eq!(
        first.rows.len(),
        AUDIT_PAGE_ROWS_MAX as usize,
        "clamped to the maximum"
    );
    assert_eq!(first.rows[..], expected[..first.rows.len()]);
    let next = first.next.expect("more rows");
    let rest = read_audit_trail(db, &everything, Some(&next), u32::MAX)
        .await
        .expect("read");
    assert_eq!(rest.next, None, "the end");
    assert_eq!(rest.rows[..], expected[first.rows.len()..]);
    let one = read_audit_trail(db, &everything, None, 0)
        .await
        .expect("read");
    assert_eq!(one.rows, expected[..1], "a limit of 0 reads one row");

    // Pagination visits every row exactly once, in order, across pages of 7.
    let (paged, pages) = read_filtered(db, &everything, 7).await;
    assert_eq!(pages, (GENERATED_ROWS as usize).div_ceil(7));
    let ids: HashSet<Uuid> = paged.iter().map(|row| row.audit_id).collect();
    assert_eq!(ids.len(), paged.len(), "no row twice");
    assert_eq!(paged, expected, "every row, in the order appended");

    // Filters, alone and together; each keeps some rows and drops others.
    let user = UserId::from_uuid(Uuid::from_u128(USERS[1].0));
    let patient = PatientId::from_uuid(Uuid::from_u128(PATIENTS[2]));
    let filters = [
        AuditFilter {
            user_id: Some(user),
            ..AuditFilter::default()
        },
        AuditFilter {
            patient_id: Some(patient),
            ..AuditFilter::default()
        },
        AuditFilter {
            action: Some(AuditAction::Read),
            ..AuditFilter::default()
        },
        AuditFilter {
            action: Some(AuditAction::Search),
            ..AuditFilter::default()
        },
        // Half-open: `to` falls on a microsecond three rows share; none of them is in.
        AuditFilter {
            from: Some(at(20_000_000)),
            to: Some(at(90_000_000)),
            ..AuditFilter::default()
        },
        AuditFilter {
            from: Some(at(150_000_000)),
            ..AuditFilter::default()
        },
        AuditFilter {
            to: Some(at(10_000_000)),
            ..AuditFilter::default()
        },
        AuditFilter {
            user_id: Some(user),
            patient_id: Some(patient),
            from: Some(at(30_000_000)),
            to: Some(at(180_000_000)),
            ..AuditFilter::default()
        },
        AuditFilter {
            patient_id: Some(patient),
            action: Some(AuditAction::Export),
            ..AuditFilter::default()
        },
    ];
    for filter in &filters {
        let wanted: Vec<AuditRow> = expected
            .iter()
            .filter(|row| matches(filter, row))
            .cloned()
            .collect();
        assert!(
            !wanted.is_empty() && wanted.len() < expected.len(),
            "{filter:?} discriminates"
        );
        let (found, _) = read_filtered(db, filter, 5).await;
        assert_eq!(found, wanted, "{filter:?}");
    }
    assert_eq!(
        read_filtered(db, &filters[4], 500).await.0.len(),
        (90 - 20) * 3,
        "[from, to) in whole seconds of three rows"
    );
    let nobody = AuditFilter {
        user_id: Some(UserId::from_uuid(Uuid::from_u128(0xdead))),
        ..AuditFilter::default()
    };
    let page = read_audit_trail(db, &nobody, None, 10).await.expect("read");
    assert_eq!(
        page,
        AuditPage {
            rows: vec![],
            next: None
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_appended_audit_rows_read_back_filtered_and_paged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("chartlog.db");
    let store = SqliteEventStore::open(&path).await.expect("open");
    let db = ProjectionDb::Sqlite(store.pool().clone());
    appended_rows_read_back_filtered_and_paged(&db).await;
    // Committed on return: another connection to the file sees every row.
    let other = SqliteEventStore::open(&path).await.expect("open again");
    let (seen, _) = read_filtered(
        &ProjectionDb::Sqlite(other.pool().clone()),
        &AuditFilter::default(),
        500,
    )
    .await;
    assert_eq!(seen.len(), GENERATED_ROWS as usize);
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_appended_audit_rows_read_back_filtered_and_paged(pool: PgPool) {
    appended_rows_read_back_filtered_and_paged(&ProjectionDb::Postgres(pool)).await;
}

// ---- Accounting of disclosures -----------------------------------------------------------

async fn disclosures_list_others_accesses_only(db: &ProjectionDb) {
    let patient = PatientId::from_uuid(Uuid::from_u128(0xe001));
    let other_patient = PatientId::from_uuid(Uuid::from_u128(0xe002));
    let own_user = actor(0xe0e1, Role::Patient);
    let doctor = actor(0xf001, Role::Physician);
    let nurse = actor(0xf002, Role::Nurse);
    let auditor = actor(0xf003, Role::Auditor);
    let row = |n: u128, who: Option<Actor>, about: Option<PatientId>, action, outcome| AuditRow {
        audit_id: Uuid::from_u128(0x1000 + n),
        // Two rows per second, appended in time order.
        occurred_at: at(i64::try_from(n / 2).unwrap() * 1_000_000),
        actor: who,
        patient_id: about,
        entity: Some(AuditEntity::Patient),
        record_id: about.map(|p| p.as_uuid()),
        action,
        outcome,
        client_address: Some("198.51.100.7".parse().unwrap()),
        event_type: None,
    };
    use AuditAction::*;
    use AuditOutcome::*;
    let rows = vec![
        row(1, Some(doctor), Some(patient), Read, Success),
        row(0, Some(own_user), Some(patient), Read, Success), // the patient's own read
        row(2, Some(nurse), Some(patient), Update, Success),
        row(3, Some(doctor), Some(other_patient), Read, Success), // another patient
        row(4, Some(doctor), None, Login, Success),               // about no patient
        row(5, Some(doctor), Some(patient), Delete, Success),     // not an access
        row(6, Some(auditor), Some(patient), Search, Denied),
        row(7, Some(doctor), Some(patient), Export, Success),
        row(8, Some(own_user), Some(patient), Export, Success), // the patient's own export
        row(9, Some(doctor), Some(patient), BreakGlass, Success),
        row(10, Some(nurse), Some(patient), Create, Failure),
        row(11, Some(doctor), Some(patient), Logout, Success), // not an access
        row(12, None, None, Login, Failure),
        row(13, Some(nurse), Some(other_patient), Export, Success), // another patient
    ];
    append_audit_rows(db, &rows).await.expect("append");
    // Noise from the generated rows: other patients, and users acting on those.
    let noise: Vec<AuditRow> = (0..100).map(generated_row).collect();
    append_audit_rows(db, &noise).await.expect("append");

    let (found, pages) = all_pages(2, |after| async move {
        accounting_of_disclosures(db, patient, after.as_ref(), 2)
            .await
            .expect("disclosures")
    })
    .await;
    let ids: Vec<u128> = found
        .iter()
        .map(|row| row.audit_id.as_u128() - 0x1000)
        .collect();
    assert_eq!(
        ids,
        [1, 2, 6, 7, 9, 10],
        "others' accesses, in the order recorded"
    );
    assert_eq!(pages, 3);
    assert_eq!(found[0], rows[0], "read back whole");
    assert_eq!(
        found[2].outcome, Denied,
        "a refused attempt is listed as such"
    );

    // A generated patient: every access but the patient-role users', and nothing else.
    let generated = PatientId::from_uuid(Uuid::from_u128(PATIENTS[0]));
    let disclosure_actions = [Read, Export, BreakGlass, Search, Create, Update];
    let wanted: Vec<AuditRow> = noise
        .iter()
        .filter(|row| {
            row.patient_id == Some(generated)
                && disclosure_actions.contains(&row.action)
                && row.actor.is_none_or(|a| a.role != Role::Patient)
        })
        .cloned()
        .collect();
    assert!(!wanted.is_empty());
    assert!(
        noise.iter().any(|row| row.patient_id == Some(generated)
            && disclosure_actions.contains(&row.action)
            && row.actor.is_some_and(|a| a.role == Role::Patient)),
        "the noise holds own accesses to leave out"
    );
    let (found, _) = all_pages(3, |after| async move {
        accounting_of_disclosures(db, generated, after.as_ref(), 3)
            .await
            .expect("disclosures")
    })
    .await;
    assert_eq!(found, wanted);
}

/// A row stamped before the last row of a page already read, but recorded after it (it waited
/// for its process's audit writer and the projection runner), is on the next page of the
/// trail and of the patient's accounting of disclosures: paging by time passed over it.
async fn a_row_recorded_late_is_on_the_next_page(db: &ProjectionDb) {
    let patient = PatientId::from_uuid(Uuid::from_u128(0xe101));
    let doctor = actor(0xf101, Role::Physician);
    let read = |n: u128, seconds: i64| AuditRow {
        audit_id: Uuid::from_u128(0x2000 + n),
        occurred_at: at(seconds * 1_000_000),
        actor: Some(doctor),
        patient_id: Some(patient),
        entity: Some(AuditEntity::Patient),
        record_id: Some(patient.as_uuid()),
        action: AuditAction::Read,
        outcome: AuditOutcome::Success,
        client_address: None,
        event_type: None,
    };
    let on_time: Vec<AuditRow> = (1..=5).map(|n| read(n, 10 + n as i64)).collect();
    append_audit_rows(db, &on_time).await.expect("append");
    let everything = AuditFilter::default();
    let first = read_audit_trail(db, &everything, None, 3)
        .await
        .expect("read");
    assert_eq!(first.rows, on_time[..3]);
    let first_disclosures = accounting_of_disclosures(db, patient, None, 3)
        .await
        .expect("disclosures");
    assert_eq!(first_disclosures.rows, on_time[..3]);

    // Stamped before every row above, and before the page boundary; recorded now.
    let late = read(6, 5);
    let after_it = read(7, 16);
    append_audit_rows(db, &[late.clone(), after_it.clone()])
        .await
        .expect("append");
    let wanted = vec![on_time[3].clone(), on_time[4].clone(), late, after_it];
    let (rest, _) = all_pages(3, |after| {
        let after = after.or(first.next);
        async move {
            read_audit_trail(db, &everything, after.as_ref(), 3)
                .await
                .expect("read")
        }
    })
    .await;
    assert_eq!(rest, wanted, "the trail's next pages");
    let (rest, _) = all_pages(3, |after| {
        let after = after.or(first_disclosures.next);
        async move {
            accounting_of_disclosures(db, patient, after.as_ref(), 3)
                .await
                .expect("disclosures")
        }
    })
    .await;
    assert_eq!(rest, wanted, "the disclosures' next pages");

    // A time range finds late rows too, wherever they were recorded: this one is the earliest
    // row at or after 15.2 s, recorded after one at 16 s.
    let late_in_range = AuditRow {
        occurred_at: at(15_500_000),
        ..read(8, 0)
    };
    append_audit_rows(db, std::slice::from_ref(&late_in_range))
        .await
        .expect("append");
    let since = |tenths: i64| AuditFilter {
        from: Some(at(tenths * 100_000)),
        ..AuditFilter::default()
    };
    let ids = |rows: Vec<AuditRow>| -> Vec<u128> {
        rows.iter()
            .map(|row| row.audit_id.as_u128() - 0x2000)
            .collect()
    };
    for (tenths, wanted) in [
        (50, &[1, 2, 3, 4, 5, 6, 7, 8][..]),
        (130, &[3, 4, 5, 7, 8]),
        (152, &[7, 8]),
        (160, &[7]),
        (161, &[]),
    ] {
        let (found, _) = read_filtered(db, &since(tenths), 2).await;
        assert_eq!(ids(found), wanted, "from {tenths} tenths of a second");
    }
}

/// Writers to the trail at the same time all succeed, one after another: each takes the next
/// positions, and no two rows share one.
async fn simultaneous_writers_each_get_their_own_positions(db: &ProjectionDb) {
    let writers: Vec<_> = (0..8u64)
        .map(|writer| {
            let db = db.clone();
            tokio::spawn(async move {
                for batch in 0..5u64 {
                    let rows: Vec<AuditRow> = (0..3u64)
                        .map(|n| generated_row(10_000 + writer * 100 + batch * 10 + n))
                        .collect();
                    append_audit_rows(&db, &rows).await.expect("append");
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.expect("writer");
    }
    let (rows, _) = read_filtered(db, &AuditFilter::default(), 500).await;
    assert_eq!(rows.len(), 8 * 5 * 3);
    let ids: HashSet<Uuid> = rows.iter().map(|row| row.audit_id).collect();
    assert_eq!(ids.len(), rows.len(), "no row twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_simultaneous_writers_each_get_their_own_positions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    simultaneous_writers_each_get_their_own_positions(&ProjectionDb::Sqlite(store.pool().clone()))
        .await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_simultaneous_writers_each_get_their_own_positions(pool: PgPool) {
    simultaneous_writers_each_get_their_own_positions(&ProjectionDb::Postgres(pool)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_a_row_recorded_late_is_on_the_next_page() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    a_row_recorded_late_is_on_the_next_page(&ProjectionDb::Sqlite(store.pool().clone())).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_a_row_recorded_late_is_on_the_next_page(pool: PgPool) {
    a_row_recorded_late_is_on_the_next_page(&ProjectionDb::Postgres(pool)).await;
}

/// A trail written before `trail_position` existed: the migration numbers its rows in the
/// order they were read in then (time, then id), whatever order they were inserted in, and
/// rows appended afterwards follow them.
async fn the_migration_numbers_an_old_trail_in_its_old_order(db: &ProjectionDb) {
    // Inserted newest first, and two in one microsecond with the higher id first.
    for (id, second) in [(4u128, 30i64), (3, 20), (2, 10), (1, 10)] {
        let sql = "INSERT INTO chartlog_audit_trail (audit_id, occurred_at_us, break_glass, \
                   action, outcome) VALUES ($1, $2, false, 'login', 'failure')";
        let mut tx = db.begin().await.expect("begin");
        tx.execute(
            sql,
            vec![
                chartlog_projections::db::SqlArg::Uuid(Uuid::from_u128(0x3000 + id)),
                chartlog_projections::db::SqlArg::I64(at(second * 1_000_000).unix_micros()),
            ],
        )
        .await
        .expect("an old row");
        tx.commit().await.expect("commit");
    }
    match db {
        ProjectionDb::Sqlite(pool) => chartlog_store::sqlite::MIGRATOR.run(pool).await,
        ProjectionDb::Postgres(pool) => chartlog_store::postgres::MIGRATOR.run(pool).await,
    }
    .expect("the remaining migrations");
    let later = AuditRow {
        audit_id: Uuid::from_u128(0x3000),
        occurred_at: at(0),
        actor: None,
        patient_id: None,
        entity: Some(AuditEntity::Session),
        record_id: None,
        action: AuditAction::Login,
        outcome: AuditOutcome::Failure,
        client_address: None,
        event_type: None,
    };
    append_audit_rows(db, std::slice::from_ref(&later))
        .await
        .expect("append");
    let (rows, _) = read_filtered(db, &AuditFilter::default(), 2).await;
    let ids: Vec<u128> = rows.iter().map(|row| row.audit_id.as_u128()).collect();
    assert_eq!(ids, [0x3001, 0x3002, 0x3003, 0x3004, 0x3000]);
    // The old rows' latest times are their own, so a time range finds them.
    let since_20 = AuditFilter {
        from: Some(at(20_000_000)),
        ..AuditFilter::default()
    };
    let (rows, _) = read_filtered(db, &since_20, 2).await;
    let ids: Vec<u128> = rows.iter().map(|row| row.audit_id.as_u128()).collect();
    assert_eq!(ids, [0x3003, 0x3004]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_the_migration_numbers_an_old_trail_in_its_old_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(dir.path().join("chartlog.db"))
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.expect("open");
    chartlog_store::sqlite::MIGRATOR
        .run_to(12, &pool)
        .await
        .expect("the migrations before the trail position");
    the_migration_numbers_an_old_trail_in_its_old_order(&ProjectionDb::Sqlite(pool)).await;
}

#[sqlx::test(migrations = false)]
async fn postgres_the_migration_numbers_an_old_trail_in_its_old_order(pool: PgPool) {
    chartlog_store::postgres::MIGRATOR
        .run_to(13, &pool)
        .await
        .expect("the migrations before the trail position");
    the_migration_numbers_an_old_trail_in_its_old_order(&ProjectionDb::Postgres(pool)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_accounting_of_disclosures_lists_others_accesses_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    disclosures_list_others_accesses_only(&ProjectionDb::Sqlite(store.pool().clone())).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_accounting_of_disclosures_lists_others_accesses_only(pool: PgPool) {
    disclosures_list_others_accesses_only(&ProjectionDb::Postgres(pool)).await;
}

// ---- Appended rows and a projection rebuild ----------------------------------------------

async fn count(db: &ProjectionDb, sql: &'static str) -> i64 {
    db.fetch_optional(sql, vec![])
        .await
        .expect("count")
        .expect("a row")
        .i64(0)
        .expect("count")
}

async fn appended_rows_survive_a_rebuild<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
) {
    let patients = [synthetic::patient_id(7), synthetic::patient_id(8)];
    for (seed, patient) in [7, 8].into_iter().zip(patients) {
        fixture
            .execute(patient, synthetic::registration(seed))
            .await;
        for n in 0..6 {
            fixture
                .execute(patient, synthetic::clinical_command(seed, n, now()))
                .await;
        }
    }
    let runner = fixture.runner_with(vec![Arc::new(AuditTrailProjection)]);
    let head = runner.catch_up().await.expect("catch up");

    // The HTTP layer's reads of those charts, with no log position.
    let reads: Vec<AuditRow> = (0..5u64)
        .map(|i| AuditRow {
            audit_id: Uuid::from_u128(0x5eed_0000 + u128::from(i)),
            occurred_at: at(i64::try_from(i).unwrap() * 7),
            actor: Some(actor(0xb001, Role::Physician)),
            patient_id: Some(patients[(i % 2) as usize]),
            entity: Some(AuditEntity::Patient),
            record_id: Some(patients[(i % 2) as usize].as_uuid()),
            action: AuditAction::Read,
            outcome: AuditOutcome::Success,
            client_address: Some("203.0.113.9".parse().unwrap()),
            event_type: None,
        })
        .collect();
    append_audit_rows(&fixture.db, &reads)
        .await
        .expect("append");
    assert_eq!(
        count(
            &fixture.db,
            "SELECT COUNT(*) FROM chartlog_audit_trail WHERE source_position IS NULL"
        )
        .await,
        5
    );

    let everything = AuditFilter::default();
    let (before, _) = read_filtered(&fixture.db, &everything, 500).await;
    assert_eq!(before.len(), 14 + 5, "one row per event, and the reads");
    for read in &reads {
        assert!(before.contains(read), "the appended row reads back");
    }
    // Rows derived from events read back with their event type.
    let from_events: Vec<&AuditRow> = before
        .iter()
        .filter(|row| row.event_type.is_some())
        .collect();
    assert_eq!(from_events.len(), 14);
    assert!(
        from_events
            .iter()
            .any(|row| row.event_type == Some("patient_registered"))
    );

    // A rebuild resets the audit projection and replays the log: it deletes nothing, so the
    // rows with no log position stay, and the replay adds no duplicate.
    assert_eq!(runner.rebuild().await.expect("rebuild"), head);
    let (after, _) = read_filtered(&fixture.db, &everything, 500).await;
    assert_eq!(after, before, "the rebuild keeps every row as it was");
    assert_eq!(
        count(
            &fixture.db,
            "SELECT COUNT(*) FROM chartlog_audit_trail WHERE source_position IS NULL"
        )
        .await,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_appended_audit_rows_survive_a_rebuild() {
    let (fixture, _dir) = sqlite().await;
    appended_rows_survive_a_rebuild(&fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_appended_audit_rows_survive_a_rebuild(pool: PgPool) {
    appended_rows_survive_a_rebuild(&postgres(pool).await).await;
}

// ---- The paged de-identified export ------------------------------------------------------

/// The de-identification secret of these tests: fixed, so the reference tables can be
/// computed here.
const DEID_SECRET: [u8; 32] = [0x5a; 32];
/// Seed 1 is born 1936: 89 by the events' year (2025), 90 in the release year.
const RELEASE_YEAR: i32 = 2026;
const SEEDS: [u64; 7] = [0, 1, 2, 3, 4, 5, 6];

fn pseudonymizer() -> Pseudonymizer {
    Pseudonymizer::new(MacKey::from_bytes(&DEID_SECRET))
}

/// Synthetic patient `seed` with every identifier replaced by a marker value.
fn registration_with_markers(seed: u64) -> PatientCommand {
    let PatientCommand::RegisterPatient {
        patient_id,
        demographics: synthetic,
    } = synthetic::registration(seed)
    else {
        unreachable!("registration registers")
    };
    PatientCommand::RegisterPatient {
        patient_id,
        demographics: Demographics {
            name: PersonName::new(
                vec![GivenName::parse("Zqxmarkgiven").unwrap()],
                FamilyName::parse("Zqxmarkfamily").unwrap(),
            )
            .unwrap(),
            birth_date: synthetic.birth_date,
            sex: synthetic.sex,
            address: Some(
                PostalAddress::new(
                    vec![AddressLine::parse("1 Zqxmarkstreet").unwrap()],
                    City::parse("Zqxmarkcity").unwrap(),
                    UsState::parse(if seed == 3 { "VT" } else { "IL" }).unwrap(),
                    PostalCode::parse(if seed == 3 { "05901" } else { "62704" }).unwrap(),
                )
                .unwrap(),
            ),
            contacts: vec![
                ContactPoint::Phone(PhoneNumber::parse("+1-217-867-5309").unwrap()),
                ContactPoint::Email(EmailAddress::parse("zqxmark@example.org").unwrap()),
            ],
            mrn: Mrn::parse(&format!("ZQXMARK-{seed}")).unwrap(),
            ssn: Some(Ssn::parse("078-05-1120").unwrap()),
            identifiers: vec![PatientIdentifier {
                system: IdentifierSystem::Passport,
                value: IdentifierValue::parse("ZQXMARK-ID").unwrap(),
            }],
        },
    }
}

/// Each seed's commands: its registration and a varying number of clinical commands; seed 2
/// also has a narrative observation, seed 3 a resolved condition.
fn commands(seed: u64) -> Vec<PatientCommand> {
    let mut commands = vec![registration_with_markers(seed)];
    commands.extend((0..6 + 4 * seed).map(|n| synthetic::clinical_command(seed, n, now())));
    if seed == 2 {
        commands.push(PatientCommand::RecordObservation {
            observation_id: ObservationId::from_uuid(Uuid::from_u128(0x0b5)),
            code: Code::parse(CodeSystem::Loinc, "8867-4", None).unwrap(),
            value: ObservationValue::Text(FreeText::parse("Zqxmark observation").unwrap()),
            effective_at: now(),
        });
    }
    if seed == 3 {
        commands.push(PatientCommand::ResolveCondition {
            condition_id: ConditionId::from_uuid(synthetic::synthetic_uuid(3, 3, 5)),
            resolved_at: now(),
        });
    }
    commands
}

fn single_shot<'a, R: DeidRecord + 'a>(
    format: ExportFormat,
    rows: impl IntoIterator<Item = &'a R>,
) -> Vec<u8> {
    let mut writer =
        DeidExportWriter::new(Vec::new(), format, R::TABLE, RELEASE_YEAR).expect("writer");
    for row in rows {
        writer.write(row).expect("write");
    }
    writer.finish().expect("finish")
}

/// One export of each table, from the tables folded in memory by the pure transformation.
fn reference_export(tables: &DeidTables, table: DeidTable, format: ExportFormat) -> Vec<u8> {
    match table {
        DeidTable::Patients => single_shot(format, tables.patients.values()),
        DeidTable::Observations => single_shot(format, tables.observations.values()),
        DeidTable::Conditions => single_shot(format, tables.conditions.values()),
        DeidTable::MedicationOrders => single_shot(format, tables.medication_orders.values()),
        DeidTable::Allergies => single_shot(format, tables.allergies.values()),
    }
}

fn reference_rows(tables: &DeidTables, table: DeidTable) -> usize {
    match table {
        DeidTable::Patients => tables.patients.len(),
        DeidTable::Observations => tables.observations.len(),
        DeidTable::Conditions => tables.conditions.len(),
        DeidTable::MedicationOrders => tables.medication_orders.len(),
        DeidTable::Allergies => tables.allergies.len(),
    }
}

/// Chunk after chunk, as an HTTP handler streams them.
async fn paged_export(
    db: &ProjectionDb,
    table: DeidTable,
    format: ExportFormat,
    limit: u32,
) -> (Vec<u8>, u64, usize) {
    let mut bytes = Vec::new();
    let mut rows = 0;
    let mut chunks = 0;
    let mut after: Option<String> = None;
    loop {
        let chunk = export_page(db, table, format, RELEASE_YEAR, after.as_deref(), limit)
            .await
            .expect("export chunk");
        chunks += 1;
        assert!(chunk.rows <= u64::from(limit));
        bytes.extend_from_slice(&chunk.bytes);
        rows += chunk.rows;
        match chunk.next_key {
            Some(key) => {
                assert_eq!(chunk.rows, u64::from(limit), "only the last chunk is short");
                after = Some(key);
            }
            None => break,
        }
    }
    (bytes, rows, chunks)
}

/// No marker of an identifier, no raw patient id, no full date, no full ZIP code.
fn assert_no_direct_identifier(place: &str, text: &str) {
    assert!(
        !text.to_lowercase().contains("zqxmark"),
        "a marker in {place}"
    );
    for marker in ["867-5309", "078-05-1120", "62704", "05901"] {
        assert!(!text.contains(marker), "{marker} in {place}");
    }
    for seed in SEEDS {
        let id = synthetic::patient_id(seed).as_uuid();
        for form in [id.hyphenated().to_string(), id.simple().to_string()] {
            assert!(!text.contains(&form), "a raw patient id in {place}");
        }
    }
    let bytes = text.as_bytes();
    for window in bytes.windows(10) {
        let date = window.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        });
        assert!(!date, "a full date in {place}");
    }
}

async fn export_pages_concatenate_to_one_export<S: EventStore, K: KeyStore + 'static>(
    fixture: &Fixture<S, K>,
) {
    // The log, and the same commands decided in memory for the reference tables.
    let mut events: Vec<(EventContext, PatientEvent)> = Vec::new();
    for seed in SEEDS {
        let patient = synthetic::patient_id(seed);
        let mut state = Patient::default();
        for command in commands(seed) {
            for event in decide(&state, command.clone(), now()).expect("accepted") {
                state = evolve(state, &event);
                let context = EventContext {
                    patient_id: patient,
                    recorded_at: now(),
                };
                events.push((context, event));
            }
            fixture.execute(patient, command).await;
        }
    }
    let tables = DeidTables::from_events(events.iter().map(|(c, e)| (*c, e)), &pseudonymizer());
    fixture
        .runner_with(vec![Arc::new(DeidentifiedProjection::new(pseudonymizer()))])
        .catch_up()
        .await
        .expect("catch up");

    for table in DeidTable::ALL {
        let rows = reference_rows(&tables, table);
        assert!(rows >= 3, "{table:?} has rows to page through");
        for format in [ExportFormat::Ndjson, ExportFormat::Csv] {
            let expected = reference_export(&tables, table, format);
            let (paged, paged_rows, chunks) = paged_export(&fixture.db, table, format, 2).await;
            assert_eq!(
                paged_rows, rows as u64,
                "{table:?} {format:?}: every row once"
            );
            assert_eq!(
                chunks,
                rows.div_ceil(2),
                "{table:?} {format:?}: chunks of 2"
            );
            assert_eq!(
                String::from_utf8(paged.clone()).unwrap(),
                String::from_utf8(expected.clone()).unwrap(),
                "{table:?} {format:?}: the chunks concatenate to one export"
            );
            let (whole, _, one) = paged_export(&fixture.db, table, format, EXPORT_PAGE_ROWS).await;
            assert_eq!(one, 1);
            assert_eq!(whole, expected, "{table:?} {format:?}: in one chunk");
            assert_no_direct_identifier(
                &format!("{table:?} {format:?}"),
                &String::from_utf8(paged).unwrap(),
            );
        }
    }

    // The release year's 90+ rule: seed 1 turns 90 in it; seed 0 already had.
    let patients = export_page(
        &fixture.db,
        DeidTable::Patients,
        ExportFormat::Ndjson,
        RELEASE_YEAR,
        None,
        100,
    )
    .await
    .expect("patients");
    let lines: Vec<serde_json::Value> = std::str::from_utf8(&patients.bytes)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), SEEDS.len());
    let pseudonyms = pseudonymizer();
    let line_of = |seed: u64| {
        let pseudonym = pseudonyms.patient(synthetic::patient_id(seed));
        lines
            .iter()
            .find(|line| line["pseudonym"] == pseudonym.as_str())
            .expect("the patient's line")
            .clone()
    };
    for seed in [0, 1] {
        assert_eq!(line_of(seed)["birth_year"], serde_json::Value::Null);
        assert_eq!(line_of(seed)["aged_90_or_over"], true);
    }
    assert_eq!(line_of(2)["birth_year"], 1937);
    assert_eq!(line_of(3)["zip3"], "000", "a restricted ZIP3");
    assert_eq!(line_of(4)["zip3"], "627");

    // An empty CSV export is its header line; a key past the end gives an empty last chunk.
    let past_end = "f".repeat(64);
    let chunk = export_page(
        &fixture.db,
        DeidTable::Allergies,
        ExportFormat::Csv,
        RELEASE_YEAR,
        Some(&past_end),
        10,
    )
    .await
    .expect("past the end");
    assert_eq!(
        (chunk.bytes.len(), chunk.rows, chunk.next_key),
        (0, 0, None)
    );
    for bad in ["", "not-a-key", &"F".repeat(64), &"0".repeat(63)] {
        assert!(
            matches!(
                export_page(
                    &fixture.db,
                    DeidTable::Conditions,
                    ExportFormat::Csv,
                    RELEASE_YEAR,
                    Some(bad),
                    10
                )
                .await,
                Err(ExportReadError::InvalidKey)
            ),
            "{bad:?} is refused"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_export_pages_concatenate_to_one_export() {
    let (fixture, _dir) = sqlite().await;
    export_pages_concatenate_to_one_export(&fixture).await;
}

#[sqlx::test(migrations = "../../migrations/postgres")]
async fn postgres_export_pages_concatenate_to_one_export(pool: PgPool) {
    export_pages_concatenate_to_one_export(&postgres(pool).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_table_exports_its_csv_header_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open");
    let db = ProjectionDb::Sqlite(store.pool().clone());
    let chunk = export_page(
        &db,
        DeidTable::Patients,
        ExportFormat::Csv,
        RELEASE_YEAR,
        None,
        10,
    )
    .await
    .expect("export");
    assert_eq!(
        chunk.bytes,
        b"pseudonym,birth_year,aged_90_or_over,sex,state,zip3\r\n".to_vec()
    );
    assert_eq!((chunk.rows, chunk.next_key), (0, None));
    let chunk = export_page(
        &db,
        DeidTable::Patients,
        ExportFormat::Ndjson,
        RELEASE_YEAR,
        None,
        10,
    )
    .await
    .expect("export");
    assert!(chunk.bytes.is_empty());
}
