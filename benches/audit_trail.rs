//! Reading a large audit trail the way an auditor does, on both backends: the first page of
//! the whole trail, of a user's rows, of a patient's accounting of disclosures, of a recent
//! time range and of a closed range in the middle, and the last page of that closed range.
//!
//! cargo bench --bench audit_trail          (DATABASE_URL names the PostgreSQL server; a
//!                                           scratch database is created and dropped)
//! CHARTLOG_BENCH_AUDIT_ROWS=2000000 CHARTLOG_BENCH_SAMPLES=50 cargo bench --bench audit_trail
//!
//! The trail is written through `append_audit_rows`, as the API's rows reach it, in appends of
//! 5,000: one row every 10 ms of simulated time, 1 in 100 of them stamped 10 s before it is
//! recorded (rows that reach the trail late), 200 users, 20,000 patients. Pages hold 100 rows;
//! each figure is the median of its samples, every sample a fresh query.

#[path = "support/scratch_postgres.rs"]
mod scratch_postgres;

use std::time::{Duration, Instant};

use anyhow::Context;
use chartlog_domain::{Actor, PatientId, PurposeOfUse, Role, Timestamp, UserId};
use chartlog_projections::audit::append_audit_rows;
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome, AuditRow};
use chartlog_projections::audit_queries::{
    AuditCursor, AuditFilter, accounting_of_disclosures, read_audit_trail,
};
use chartlog_projections::db::ProjectionDb;
use chartlog_store::postgres::PostgresEventStore;
use chartlog_store::sqlite::SqliteEventStore;
use uuid::Uuid;

const PAGE_ROWS: u32 = 100;
const ROWS_PER_APPEND: usize = 5_000;
const USERS: u64 = 200;
const PATIENTS: u64 = 20_000;
/// Simulated time between rows.
const ROW_SPACING_US: i64 = 10_000;
/// How long before it is recorded a late row was stamped.
const LATENESS_US: i64 = 10_000_000;
const START_US: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(run())
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|raw| raw.parse().ok())
        .unwrap_or(default)
}

async fn run() -> anyhow::Result<()> {
    let rows = env_number("CHARTLOG_BENCH_AUDIT_ROWS", 1_000_000);
    let samples = env_number("CHARTLOG_BENCH_SAMPLES", 20) as usize;
    println!("audit_trail: {rows} rows, pages of {PAGE_ROWS}, median of {samples} samples");

    let dir = tempfile::tempdir().context("temp dir")?;
    let store = SqliteEventStore::open(&dir.path().join("bench.db"))
        .await
        .context("open SQLite")?;
    run_backend(
        "sqlite",
        &ProjectionDb::Sqlite(store.pool().clone()),
        rows,
        samples,
    )
    .await?;

    let Ok(url) = std::env::var("DATABASE_URL") else {
        println!("DATABASE_URL is not set: PostgreSQL skipped");
        return Ok(());
    };
    let scratch = scratch_postgres::ScratchDatabase::create(&url).await?;
    let store = PostgresEventStore::connect(&scratch.url)
        .await
        .context("open PostgreSQL")?;
    let pool = store.pool().clone();
    let measured = run_backend(
        "postgres",
        &ProjectionDb::Postgres(pool.clone()),
        rows,
        samples,
    )
    .await;
    // The store's own tasks hold connections of the pool until it is dropped.
    drop(store);
    pool.close().await;
    scratch.drop().await?;
    measured
}

fn at(micros: i64) -> anyhow::Result<Timestamp> {
    Timestamp::from_unix_micros(micros).map_err(|_| anyhow::anyhow!("time out of range"))
}

fn user(n: u64) -> UserId {
    UserId::from_uuid(Uuid::from_u128(0xb000_0000 + u128::from(n % USERS)))
}

fn patient(n: u64) -> PatientId {
    PatientId::from_uuid(Uuid::from_u128(0xa000_0000 + u128::from(n % PATIENTS)))
}

/// Row `n` of the trail, in the order it is recorded.
fn row(n: u64) -> anyhow::Result<AuditRow> {
    let recorded_at = START_US + i64::try_from(n)? * ROW_SPACING_US;
    let late = n % 100 == 99;
    let about = patient(n.wrapping_mul(7919));
    Ok(AuditRow {
        audit_id: Uuid::now_v7(),
        occurred_at: at(recorded_at - if late { LATENESS_US } else { 0 })?,
        actor: Some(Actor {
            user_id: user(n),
            role: [Role::Physician, Role::Nurse, Role::LabTechnician][(n % 3) as usize],
            purpose_of_use: PurposeOfUse::Treatment,
            break_glass: false,
        }),
        patient_id: Some(about),
        entity: Some(AuditEntity::Observation),
        record_id: Some(about.as_uuid()),
        action: [AuditAction::Read, AuditAction::Create, AuditAction::Search][(n % 3) as usize],
        outcome: AuditOutcome::Success,
        client_address: Some(std::net::IpAddr::from([10, 0, (n % 250) as u8, 7])),
        event_type: None,
    })
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

async fn run_backend(
    name: &str,
    db: &ProjectionDb,
    rows: u64,
    samples: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut batch = Vec::with_capacity(ROWS_PER_APPEND);
    for n in 0..rows {
        batch.push(row(n)?);
        if batch.len() == ROWS_PER_APPEND || n + 1 == rows {
            append_audit_rows(db, &batch).await.context("append")?;
            batch.clear();
        }
    }
    if let ProjectionDb::Postgres(pool) = db {
        sqlx::query("ANALYZE chartlog_audit_trail")
            .execute(pool)
            .await
            .context("analyze")?;
    }
    println!(
        "{name}: {rows} rows written in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let span = i64::try_from(rows)? * ROW_SPACING_US;
    let recent = AuditFilter {
        from: Some(at(START_US + span / 10 * 9)?),
        ..AuditFilter::default()
    };
    let middle = AuditFilter {
        from: Some(at(START_US + span / 10 * 5)?),
        to: Some(at(START_US + span / 10 * 6)?),
        ..AuditFilter::default()
    };
    let one_user = AuditFilter {
        user_id: Some(user(17)),
        ..AuditFilter::default()
    };
    // The cursor before the middle range's last page, found once by paging through it.
    let mut before_last: Option<AuditCursor> = None;
    let mut after: Option<AuditCursor> = None;
    loop {
        let page = read_audit_trail(db, &middle, after.as_ref(), PAGE_ROWS).await?;
        match page.next {
            Some(next) => {
                before_last = Some(next);
                after = Some(next);
            }
            None => break,
        }
    }
    let before_last = before_last.context("the middle range spans several pages")?;

    println!("| backend | page | p50 ms |");
    println!("|---|---|---:|");
    let cases: [(&str, &AuditFilter, Option<&AuditCursor>); 5] = [
        ("whole trail, first", &AuditFilter::default(), None),
        ("one user's rows, first", &one_user, None),
        ("last tenth of the time (`from`), first", &recent, None),
        ("a tenth in the middle (`from`, `to`), first", &middle, None),
        ("a tenth in the middle, last", &middle, Some(&before_last)),
    ];
    for (label, filter, after) in cases {
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            let started = Instant::now();
            let page = read_audit_trail(db, filter, after, PAGE_ROWS).await?;
            times.push(started.elapsed());
            anyhow::ensure!(!page.rows.is_empty(), "{label}: an empty page");
        }
        println!(
            "| {name} | {label} | {:.2} |",
            median(times).as_secs_f64() * 1e3
        );
    }
    let mut times = Vec::with_capacity(samples);
    for _ in 0..samples {
        let started = Instant::now();
        let page = accounting_of_disclosures(db, patient(4242), None, PAGE_ROWS).await?;
        times.push(started.elapsed());
        anyhow::ensure!(!page.rows.is_empty(), "disclosures: an empty page");
    }
    println!(
        "| {name} | a patient's accounting of disclosures, first | {:.2} |",
        median(times).as_secs_f64() * 1e3
    );
    Ok(())
}
