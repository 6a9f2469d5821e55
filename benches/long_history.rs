//! The everyday operations on a patient with 10 events and on one with 100,000, in the same run,
//! on both backends: the target is each long-history figure within 2x of the short one.
//!
//! cargo bench --bench long_history          (DATABASE_URL names the PostgreSQL server; a
//!                                            scratch database is created and dropped)
//! CHARTLOG_BENCH_LONG_EVENTS=20000 CHARTLOG_BENCH_SAMPLES=50 cargo bench --bench long_history
//!
//! Measured through the library, as the server runs it (a ledger with snapshots, the chart and
//! history projections), with no cache in front: every command loads the patient.
//! - record-observation: load (snapshot + tail, or the whole short stream), decide, seal, sign,
//!   append. The long patient is the same patient throughout, so its tail after the snapshot
//!   goes through every length; each short sample is another patient with 10 events.
//! - chart read, and the first page of history (10 entries: the whole of the short history,
//!   so both pages hold the same amount), from the read models.
//! - erasure: the command (tombstone appended, data key destroyed: from here nothing of the
//!   patient opens), and, reported beside it, the time the projections take to drop the
//!   patient's rows through their primary keys, which grows with the rows there are to drop.
//!
//! The long history is written straight into the store (observations sealed under the
//! patient's key, signed and chained, in appends of 1,000), then projected and loaded once,
//! which takes the first snapshot; those set-up times are printed too. Two more long patients
//! are written the same way, for the erasure figure.

#[path = "support/scratch_postgres.rs"]
mod scratch_postgres;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chartlog_crypto::{
    DataKeys, EventHeader, EventSigner, KekId, KeyRing, KeyStore, MacKey, SealedEvent,
    SignatureVerifier, SignerKeyId, seal_event,
};
use chartlog_domain::codes::{Code, CodeSystem};
use chartlog_domain::patient::{ErasureReason, ObservationValue};
use chartlog_domain::{
    Actor, Decimal, EventId, ObservationId, PatientCommand, PatientEvent, PatientId, PurposeOfUse,
    Quantity, Role, StreamId, Timestamp, Unit, UserId, codec, synthetic,
};
use chartlog_projections::chart::{ChartAnswer, ChartProjection, read_chart};
use chartlog_projections::db::ProjectionDb;
use chartlog_projections::history::{HistoryAnswer, HistoryProjection, read_history};
use chartlog_projections::{Projection, ProjectionRunner};
use chartlog_store::ledger::SNAPSHOT_EVERY_EVENTS;
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore, PostgresSnapshotStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore, SqliteSnapshotStore};
use chartlog_store::{EVENTS_PER_APPEND_MAX, EventStore, PatientLedger, SnapshotStore};
use uuid::Uuid;

/// Events in the short history: registration and nine observations.
const SHORT_EVENTS: u64 = 10;
/// Entries on the first page of history: as many as the short patient has, so both pages hold
/// the same entries and the comparison is of history length alone.
const HISTORY_PAGE_ENTRIES: u32 = SHORT_EVENTS as u32;
/// Patients erased per history length, for the erasure figures.
const SHORT_ERASURES: usize = 5;
const LONG_ERASURES: usize = 3;
/// A pause before the erasures, so they do not share the cores with the tail of the
/// projection work that came before.
const SETTLE: Duration = Duration::from_secs(1);
const LOINC_CODES: [&str; 3] = ["8867-4", "59408-5", "8310-5"];

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
    let long_events = env_number("CHARTLOG_BENCH_LONG_EVENTS", 100_000);
    let samples = env_number("CHARTLOG_BENCH_SAMPLES", SNAPSHOT_EVERY_EVENTS) as usize;
    println!(
        "long_history: {SHORT_EVENTS} vs {long_events} events, {samples} samples per figure, \
         snapshot every {SNAPSHOT_EVERY_EVENTS} events"
    );

    let dir = tempfile::tempdir().context("temp dir")?;
    let store = SqliteEventStore::open(&dir.path().join("bench.db"))
        .await
        .context("open SQLite")?;
    let pool = store.pool().clone();
    run_backend(
        "sqlite",
        store,
        SqliteKeyStore::new(pool.clone()),
        Arc::new(SqliteSnapshotStore::new(pool.clone())),
        ProjectionDb::Sqlite(pool),
        long_events,
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
        store,
        PostgresKeyStore::new(pool.clone()),
        Arc::new(PostgresSnapshotStore::new(pool.clone())),
        ProjectionDb::Postgres(pool.clone()),
        long_events,
        samples,
    )
    .await;
    pool.close().await;
    scratch.drop().await?;
    measured
}

struct Bench<S: EventStore, K: KeyStore + 'static> {
    ledger: PatientLedger<S, K>,
    runner: ProjectionRunner<S, K>,
    signer: Arc<EventSigner>,
    db: ProjectionDb,
    actor: Actor,
}

async fn run_backend<S: EventStore, K: KeyStore + 'static>(
    backend: &str,
    store: S,
    keys: K,
    snapshots: Arc<dyn SnapshotStore>,
    db: ProjectionDb,
    long_events: u64,
    samples: usize,
) -> anyhow::Result<()> {
    let signer = Arc::new(EventSigner::generate(SignerKeyId::generate()));
    let mut verifier = SignatureVerifier::new();
    verifier.trust(signer.key_id().clone(), signer.verifying_key_bytes())?;
    let verifier = Arc::new(verifier);
    let keys = Arc::new(DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        keys,
    ));
    let store = Arc::new(store);
    let ledger = PatientLedger::new(
        store.clone(),
        keys.clone(),
        signer.clone(),
        verifier.clone(),
    )
    .with_snapshots(snapshots, SNAPSHOT_EVERY_EVENTS);
    let projections: Vec<Arc<dyn Projection>> = vec![
        Arc::new(ChartProjection::new(Arc::new(MacKey::generate()))),
        Arc::new(HistoryProjection),
    ];
    let runner = ProjectionRunner::new(store, keys, verifier, db.clone(), projections);
    let bench = Bench {
        ledger,
        runner,
        signer,
        db,
        actor: Actor {
            user_id: UserId::from_uuid(Uuid::now_v7()),
            role: Role::Physician,
            purpose_of_use: PurposeOfUse::Treatment,
            break_glass: false,
        },
    };

    // Set-up: short patients, the long one written straight into the store, projected, and
    // loaded once (the fold of the whole stream that takes the first snapshot).
    let short_patients = (0..samples + SHORT_ERASURES)
        .map(|_| PatientId::from_uuid(Uuid::now_v7()))
        .collect::<Vec<_>>();
    for patient in &short_patients {
        bench.register(*patient).await?;
        for _ in 1..SHORT_EVENTS {
            bench.record_observation(*patient).await?;
        }
    }
    let long = PatientId::from_uuid(Uuid::now_v7());
    let writing = Instant::now();
    bench.register(long).await?;
    bench.append_observations(long, long_events - 1).await?;
    let written = writing.elapsed();
    // More long patients, for erasure only (an erasure happens once per patient).
    let mut long_erased = Vec::with_capacity(LONG_ERASURES);
    for _ in 1..LONG_ERASURES {
        let patient = PatientId::from_uuid(Uuid::now_v7());
        bench.register(patient).await?;
        bench.append_observations(patient, long_events - 1).await?;
        long_erased.push(patient);
    }
    long_erased.push(long);
    let projecting = Instant::now();
    bench.runner.catch_up().await?;
    let projected = projecting.elapsed();
    let folding = Instant::now();
    bench.ledger.load(long).await?;
    let folded = folding.elapsed();
    for patient in &long_erased {
        bench.ledger.load(*patient).await?;
    }
    println!(
        "\n{backend}: set-up: {long_events} events written in {:.1} s, projected in {:.1} s; \
         first load (whole stream, takes the snapshot) {:.0} ms",
        written.as_secs_f64(),
        projected.as_secs_f64(),
        folded.as_secs_f64() * 1e3
    );

    let mut table = Vec::new();
    let mut short = Vec::with_capacity(samples);
    let mut long_times = Vec::with_capacity(samples);
    for patient in short_patients.iter().take(samples) {
        short.push(timed(bench.record_observation(*patient)).await?);
        long_times.push(timed(bench.record_observation(long)).await?);
    }
    table.push(("record-observation", short, long_times));
    bench.runner.catch_up().await?;

    let mut short = Vec::with_capacity(samples);
    let mut long_times = Vec::with_capacity(samples);
    for patient in short_patients.iter().take(samples) {
        short.push(timed(bench.read_chart(*patient)).await?);
        long_times.push(timed(bench.read_chart(long)).await?);
    }
    table.push(("chart read", short, long_times));

    let mut short = Vec::with_capacity(samples);
    let mut long_times = Vec::with_capacity(samples);
    for patient in short_patients.iter().take(samples) {
        short.push(timed(bench.read_history_page(*patient)).await?);
        long_times.push(timed(bench.read_history_page(long)).await?);
    }
    table.push(("history, first page", short, long_times));

    // Erasures of short and long patients interleaved, with nothing in between: the
    // projections' clean-up of one erasure (deleting 100,000 history rows, and the vacuum it
    // sets off) would otherwise load the machine under the next erasure command. The clean-up
    // is measured afterwards, for all of them at once.
    bench.runner.catch_up().await?;
    tokio::time::sleep(SETTLE).await;
    let mut short = Vec::with_capacity(SHORT_ERASURES);
    let mut long_times = Vec::with_capacity(LONG_ERASURES);
    let mut short_erased = short_patients[samples..].iter();
    for patient in &long_erased {
        if let Some(short_patient) = short_erased.next() {
            short.push(timed(bench.erase(*short_patient)).await?);
        }
        long_times.push(timed(bench.erase(*patient)).await?);
    }
    for short_patient in short_erased {
        short.push(timed(bench.erase(*short_patient)).await?);
    }
    let cleaning = Instant::now();
    bench.runner.catch_up().await?;
    let cleaned = cleaning.elapsed() / LONG_ERASURES as u32;
    table.push(("erasure (command)", short, long_times));

    println!(
        "{:<22} {:>12} {:>12} {:>12} {:>12} {:>7}",
        "operation", "10 p50 ms", "10 p95 ms", "long p50 ms", "long p95 ms", "ratio"
    );
    for (operation, mut short, mut long_times) in table {
        let (short_p50, short_p95) = percentiles(&mut short);
        let (long_p50, long_p95) = percentiles(&mut long_times);
        println!(
            "{operation:<22} {:>12.2} {:>12.2} {:>12.2} {:>12.2} {:>6.2}x",
            ms(short_p50),
            ms(short_p95),
            ms(long_p50),
            ms(long_p95),
            long_p50.as_secs_f64() / short_p50.as_secs_f64()
        );
    }
    println!(
        "erasure, projections dropping the rows afterwards: {:.0} ms per long patient",
        ms(cleaned)
    );
    Ok(())
}

impl<S: EventStore, K: KeyStore + 'static> Bench<S, K> {
    async fn register(&self, patient: PatientId) -> anyhow::Result<()> {
        let seed = patient.as_uuid().as_u128() as u64 % 1_000_000;
        let PatientCommand::RegisterPatient { demographics, .. } = synthetic::registration(seed)
        else {
            anyhow::bail!("synthetic registration is a registration");
        };
        self.ledger
            .execute(
                patient,
                PatientCommand::RegisterPatient {
                    patient_id: patient,
                    demographics,
                },
                self.actor,
                now(),
            )
            .await?;
        Ok(())
    }

    async fn record_observation(&self, patient: PatientId) -> anyhow::Result<()> {
        let PatientEvent::ObservationRecorded {
            observation_id,
            code,
            value,
            effective_at,
        } = observation(patient.as_uuid().as_u128() as usize)?
        else {
            anyhow::bail!("an observation");
        };
        self.ledger
            .execute(
                patient,
                PatientCommand::RecordObservation {
                    observation_id,
                    code,
                    value,
                    effective_at,
                },
                self.actor,
                now(),
            )
            .await?;
        Ok(())
    }

    /// Appends `count` observations after the patient's registration, as the ledger would
    /// have: sealed under the patient's key, signed, chained, in appends of 1,000.
    async fn append_observations(&self, patient: PatientId, count: u64) -> anyhow::Result<()> {
        let stream = StreamId::patient(patient);
        let store = self.ledger.store();
        let (key_id, key) = self.ledger.keys().key_for_append(&stream).await?;
        let mut head = store
            .stream_head(&stream)
            .await?
            .context("the patient is registered")?;
        let mut written = 0;
        while written < count {
            let batch = (count - written).min(EVENTS_PER_APPEND_MAX as u64);
            let mut sealed: Vec<SealedEvent> = Vec::with_capacity(batch as usize);
            for n in 0..batch {
                let encoded = codec::encode(&observation((written + n) as usize)?);
                let header = EventHeader {
                    stream_id: stream.clone(),
                    stream_version: head.version + 1,
                    event_id: EventId::from_uuid(Uuid::now_v7()),
                    event_type: encoded.event_type.to_owned(),
                    schema_version: encoded.schema_version,
                    recorded_at: now(),
                    actor: self.actor,
                    key_id,
                    prev_hash: head.hash,
                    signer_key_id: self.signer.key_id().clone(),
                };
                let event = seal_event(&self.signer, &key, header, &encoded.payload);
                head.version += 1;
                head.hash = event.hash;
                sealed.push(event);
            }
            store.append(&stream, head.version - batch, &sealed).await?;
            written += batch;
        }
        Ok(())
    }

    async fn read_chart(&self, patient: PatientId) -> anyhow::Result<()> {
        match read_chart(&self.db, self.ledger.keys(), patient).await? {
            ChartAnswer::Found(chart) if !chart.observations.is_empty() => Ok(()),
            _ => anyhow::bail!("the chart of {patient} with its observations"),
        }
    }

    async fn read_history_page(&self, patient: PatientId) -> anyhow::Result<()> {
        match read_history(
            &self.db,
            self.ledger.keys(),
            patient,
            None,
            HISTORY_PAGE_ENTRIES,
        )
        .await?
        {
            HistoryAnswer::Found(page) if page.entries.len() as u64 >= SHORT_EVENTS => Ok(()),
            _ => anyhow::bail!("a page of {patient}'s history"),
        }
    }

    async fn erase(&self, patient: PatientId) -> anyhow::Result<()> {
        self.ledger
            .execute(
                patient,
                PatientCommand::ErasePatient {
                    reason: ErasureReason::PatientRequest,
                },
                self.actor,
                now(),
            )
            .await?;
        Ok(())
    }
}

/// A pulse, respiratory rate or temperature reading, a few minutes apart.
fn observation(n: usize) -> anyhow::Result<PatientEvent> {
    let code = LOINC_CODES[n % LOINC_CODES.len()];
    Ok(PatientEvent::ObservationRecorded {
        observation_id: ObservationId::from_uuid(Uuid::now_v7()),
        code: Code::parse(CodeSystem::Loinc, code, None)?,
        value: ObservationValue::Quantity(Quantity {
            value: Decimal::parse(&format!("{}", 60 + n % 40))?,
            unit: Unit::parse("/min")?,
        }),
        effective_at: Timestamp::from_unix_micros(
            now().unix_micros() - i64::try_from(n % 100_000)? * 60_000_000,
        )?,
    })
}

fn now() -> Timestamp {
    chartlog_api::now()
}

async fn timed(work: impl Future<Output = anyhow::Result<()>>) -> anyhow::Result<Duration> {
    let started = Instant::now();
    work.await?;
    Ok(started.elapsed())
}

fn percentiles(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let at = |fraction: f64| times[((times.len() - 1) as f64 * fraction).round() as usize];
    (at(0.5), at(0.95))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}
