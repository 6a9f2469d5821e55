//! Projection rebuild throughput, next to open+verify alone, in the same run, on SQLite.
//!
//! cargo bench --bench projection_rebuild
//! CHARTLOG_BENCH_EVENTS=400000 CHARTLOG_BENCH_ROUNDS=5 cargo bench --bench projection_rebuild
//!
//! Loads real patient streams (synthetic commands decided, encoded, sealed under each
//! patient's data key and signed, 200 events per patient) straight into the store, then runs
//! on a 2-worker runtime:
//! - open+verify alone: the log in memory, hash+signature batch checks, AES-SIV open and
//!   decode, on 2 threads (what a rebuild cannot be faster than);
//! - the runner with a projection that writes nothing (reading the log + the pipeline);
//! - the rebuild of the chart and the record history (the real thing).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use chartlog_crypto::{
    DataKey, DataKeyId, DataKeys, EventHash, EventHeader, EventSigner, KekId, KeyRing, SealedEvent,
    SignatureVerifier, SignerKeyId, VERIFY_BATCH_EVENTS_MAX, open, seal_event,
};
use chartlog_domain::{
    Actor, EventId, Patient, PurposeOfUse, Role, StreamId, Timestamp, UserId, codec, decide,
    evolve, synthetic,
};
use chartlog_projections::chart::ChartProjection;
use chartlog_projections::db::{ProjectionDb, ProjectionTx};
use chartlog_projections::history::HistoryProjection;
use chartlog_projections::{
    ProjectedEvent, Projection, ProjectionError, ProjectionRunner, async_trait,
};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::{EventStore, RecordedEvent};
use uuid::Uuid;

const EVENTS_PER_PATIENT: usize = 200;
const WORKERS: usize = 2;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .enable_all()
        .build()
        .context("runtime")?;
    runtime.block_on(run())
}

/// Writes nothing: measures reading, verifying, opening and the runner's transactions.
struct Discard;

#[async_trait]
impl Projection for Discard {
    fn name(&self) -> &'static str {
        "discard"
    }
    fn version(&self) -> u32 {
        1
    }
    async fn apply(
        &self,
        _: &mut ProjectionTx,
        _: &[ProjectedEvent],
    ) -> Result<(), ProjectionError> {
        Ok(())
    }
    async fn reset(&self, _: &mut ProjectionTx) -> Result<(), ProjectionError> {
        Ok(())
    }
}

fn seal_patient(
    seed: u64,
    key_id: DataKeyId,
    key: &DataKey,
    signer: &EventSigner,
) -> (StreamId, Vec<SealedEvent>) {
    let at = Timestamp::from_unix_micros(1_763_000_000_000_000).expect("in range");
    let actor = Actor {
        user_id: UserId::from_uuid(Uuid::from_u128(7)),
        role: Role::Physician,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    };
    let stream = StreamId::patient(synthetic::patient_id(seed));
    let commands = std::iter::once(synthetic::registration(seed))
        .chain((0..).map(|n| synthetic::clinical_command(seed, n, at)));
    let mut state = Patient::default();
    let mut prev_hash = EventHash::GENESIS;
    let mut sealed = Vec::with_capacity(EVENTS_PER_PATIENT);
    for command in commands {
        if sealed.len() >= EVENTS_PER_PATIENT {
            break;
        }
        for event in decide(&state, command, at).expect("synthetic commands are accepted") {
            state = evolve(state, &event);
            let encoded = codec::encode(&event);
            let header = EventHeader {
                stream_id: stream.clone(),
                stream_version: sealed.len() as u64 + 1,
                event_id: EventId::from_uuid(Uuid::now_v7()),
                event_type: encoded.event_type.to_owned(),
                schema_version: encoded.schema_version,
                recorded_at: at,
                actor,
                key_id,
                prev_hash,
                signer_key_id: signer.key_id().clone(),
            };
            let event = seal_event(signer, key, header, &encoded.payload);
            prev_hash = event.hash;
            sealed.push(event);
        }
    }
    (stream, sealed)
}

async fn run() -> anyhow::Result<()> {
    let events_wanted: usize = std::env::var("CHARTLOG_BENCH_EVENTS")
        .ok()
        .and_then(|raw| raw.parse().ok())
        .unwrap_or(200_000);
    let patients = events_wanted.div_ceil(EVENTS_PER_PATIENT) as u64;
    let dir = tempfile::tempdir().context("temp dir")?;
    let store = Arc::new(
        SqliteEventStore::open(&dir.path().join("bench.db"))
            .await
            .context("open store")?,
    );
    let keys = Arc::new(DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        SqliteKeyStore::new(store.pool().clone()),
    ));
    let signer = Arc::new(EventSigner::generate(SignerKeyId::generate()));
    let mut verifier = SignatureVerifier::new();
    verifier.trust(signer.key_id().clone(), signer.verifying_key_bytes())?;
    let verifier = Arc::new(verifier);

    // Load.
    let loading = Instant::now();
    let mut patient_keys = Vec::new();
    for seed in 0..patients {
        let stream = StreamId::patient(synthetic::patient_id(seed));
        let (key_id, key) = keys.key_for_append(&stream).await?;
        patient_keys.push((seed, key_id, key));
    }
    let patient_keys = Arc::new(patient_keys);
    let mut sealers = Vec::new();
    for worker in 0..WORKERS {
        let patient_keys = patient_keys.clone();
        let signer = signer.clone();
        sealers.push(tokio::task::spawn_blocking(move || {
            patient_keys
                .iter()
                .skip(worker)
                .step_by(WORKERS)
                .map(|(seed, key_id, key)| seal_patient(*seed, *key_id, key, &signer))
                .collect::<Vec<_>>()
        }));
    }
    let mut streams = Vec::new();
    for sealer in sealers {
        streams.extend(sealer.await?);
    }
    for (stream, events) in &streams {
        store.append(stream, 0, events).await?;
    }
    drop(streams);
    let mut log: Vec<RecordedEvent> = Vec::new();
    loop {
        let page = store
            .read_all(log.last().map_or(0, |r| r.position), 10_000)
            .await?;
        if page.is_empty() {
            break;
        }
        log.extend(page);
    }
    let events = log.len();
    eprintln!(
        "loaded {events} events of {patients} patients in {:.1} s",
        loading.elapsed().as_secs_f64()
    );

    let key_of: Arc<HashMap<StreamId, Arc<DataKey>>> = Arc::new(
        patient_keys
            .iter()
            .map(|(seed, _, key)| (StreamId::patient(synthetic::patient_id(*seed)), key.clone()))
            .collect(),
    );
    let log = Arc::new(log);
    let db = ProjectionDb::Sqlite(store.pool().clone());
    let runner = |projections: Vec<Arc<dyn Projection>>| {
        ProjectionRunner::new(
            store.clone(),
            keys.clone(),
            verifier.clone(),
            db.clone(),
            projections,
        )
    };
    let index_key = Arc::new(chartlog_crypto::MacKey::generate());

    // Rounds of the three measurements, one after the other, so that whatever else the
    // machine is doing weighs on all three alike; each round gives its own ratios.
    let rounds: usize = std::env::var("CHARTLOG_BENCH_ROUNDS")
        .ok()
        .and_then(|raw| raw.parse().ok())
        .unwrap_or(3)
        .max(1);
    // Per measurement, each round's wall-clock seconds and the process's CPU seconds: CPU over
    // wall is how many of the cores a phase kept busy.
    let mut seconds: [Vec<f64>; 4] = Default::default();
    let mut cpu: [Vec<f64>; 4] = Default::default();
    let measure = |index: usize| {
        let started = (Instant::now(), process_cpu_seconds());
        move |seconds: &mut [Vec<f64>; 4], cpu: &mut [Vec<f64>; 4]| {
            seconds[index].push(started.0.elapsed().as_secs_f64());
            if let (Some(before), Some(after)) = (started.1, process_cpu_seconds()) {
                cpu[index].push(after - before);
            }
        }
    };
    for round in 1..=rounds {
        let done = measure(0);
        assert_eq!(open_verify_alone(&log, &key_of, &verifier).await?, events);
        done(&mut seconds, &mut cpu);

        let done = measure(3);
        assert_eq!(read_log(store.as_ref()).await?, events);
        done(&mut seconds, &mut cpu);

        let done = measure(1);
        runner(vec![Arc::new(Discard)]).rebuild().await?;
        done(&mut seconds, &mut cpu);

        let done = measure(2);
        runner(vec![
            Arc::new(ChartProjection::new(index_key.clone())),
            Arc::new(HistoryProjection),
        ])
        .rebuild()
        .await?;
        done(&mut seconds, &mut cpu);
        eprintln!(
            "round {round}: open+verify {:.2} s, read {:.2} s, runner {:.2} s, rebuild {:.2} s",
            seconds[0][round - 1],
            seconds[3][round - 1],
            seconds[1][round - 1],
            seconds[2][round - 1]
        );
    }

    let rate = |seconds: f64| events as f64 / seconds;
    println!(
        "Projection rebuild, SQLite, {events} events, {patients} patients, {WORKERS} worker \
         threads, median of {rounds} rounds\n"
    );
    println!(
        "| measurement | seconds | events/s | vs open+verify (median of per-round ratios) | \
         CPU seconds | cores busy |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (index, name) in [
        (0, "open+verify alone (in memory)"),
        (3, "reading the log alone (SQLite pages, rows decoded)"),
        (1, "runner, projection writing nothing"),
        (2, "rebuild: chart + record history"),
    ] {
        let ratios: Vec<f64> = (0..rounds)
            .map(|round| seconds[0][round] / seconds[index][round])
            .collect();
        let median_seconds = median(seconds[index].clone());
        let (cpu_seconds, cores_busy) = if cpu[index].len() == rounds {
            let busy: Vec<f64> = (0..rounds)
                .map(|round| cpu[index][round] / seconds[index][round])
                .collect();
            (
                format!("{:.2}", median(cpu[index].clone())),
                format!("{:.2}", median(busy)),
            )
        } else {
            ("n/a".to_owned(), "n/a".to_owned())
        };
        println!(
            "| {name} | {median_seconds:.2} | {:.0} | {:.2}x | {cpu_seconds} | {cores_busy} |",
            rate(median_seconds),
            median(ratios)
        );
    }
    store.pool().close().await;
    Ok(())
}

/// Reads the whole global log in the runner's page size, as the runner does; returns the number
/// of events read.
async fn read_log(store: &SqliteEventStore) -> anyhow::Result<usize> {
    let page_events = chartlog_projections::RunnerOptions::default().read_page_events;
    let (mut after, mut read) = (0, 0);
    loop {
        let page = store.read_all(after, page_events).await?;
        let Some(last) = page.last() else {
            return Ok(read);
        };
        after = last.position;
        read += page.len();
    }
}

/// User plus system CPU time of this process so far, from /proc (Linux); `None` elsewhere.
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces:
    // utime and stime are the 14th and 15th fields of the line, in clock ticks.
    let after_name = stat.get(stat.rfind(')')? + 2..)?;
    let mut fields = after_name.split(' ').skip(11);
    let user: f64 = fields.next()?.parse().ok()?;
    let system: f64 = fields.next()?.parse().ok()?;
    // Linux reports in USER_HZ, 100 on every architecture chartlog runs on.
    Some((user + system) / 100.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Verifies, opens and decodes the whole log in memory on WORKERS threads: what a rebuild
/// cannot be faster than. Returns the number of events opened.
async fn open_verify_alone(
    log: &Arc<Vec<RecordedEvent>>,
    key_of: &Arc<HashMap<StreamId, Arc<DataKey>>>,
    verifier: &Arc<SignatureVerifier>,
) -> anyhow::Result<usize> {
    let mut workers = Vec::new();
    for worker in 0..WORKERS {
        let (log, key_of, verifier) = (log.clone(), key_of.clone(), verifier.clone());
        workers.push(tokio::task::spawn_blocking(move || {
            let mut opened = 0usize;
            for chunk in log
                .chunks(VERIFY_BATCH_EVENTS_MAX)
                .skip(worker)
                .step_by(WORKERS)
            {
                let sealed: Vec<SealedEvent> = chunk.iter().map(|r| r.event.clone()).collect();
                verifier.verify_batch(&sealed).expect("verifies");
                for event in &sealed {
                    let key = &key_of[&event.header.stream_id];
                    let plaintext = open(key, &event.header, &event.ciphertext).expect("opens");
                    codec::decode(
                        &event.header.event_type,
                        event.header.schema_version,
                        &plaintext,
                    )
                    .expect("decodes");
                    opened += 1;
                }
            }
            opened
        }));
    }
    let mut opened = 0;
    for worker in workers {
        opened += worker.await?;
    }
    Ok(opened)
}
