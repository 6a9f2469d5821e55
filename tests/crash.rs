//! Crash safety of the whole binary: many clients record observations over HTTPS while the
//! server is killed with SIGKILL at random moments (and, on PostgreSQL, the database is stopped
//! with an immediate shutdown); after every restart nothing acknowledged is lost or doubled,
//! no stream has a gap, `chartlog verify` passes and the read models converge on the log.
//!
//! `CHARTLOG_CRASH_CYCLES` sets the number of kill cycles per backend (default 20; the full
//! mode is 200). `CHARTLOG_CRASH_SEED` replays a failing run: every random choice (kill delay,
//! kill order) comes from that seed, which each test prints.

#[allow(dead_code)]
#[path = "support/clinic.rs"]
mod clinic;
#[path = "support/cluster.rs"]
mod cluster;
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clinic::{Ack, Clinic, Database, Outcome, check_log, check_read_models};
use cluster::PrivatePostgres;
use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use support::{Server, TestDir};
use uuid::Uuid;

/// Clients each recording for a patient of their own, without a precondition.
const OWN_PATIENT_WRITERS: usize = 8;
/// Clients racing on one shared patient with If-Match.
const SHARED_PATIENT_WRITERS: usize = 3;
/// The kill comes this long after the clients start, drawn uniformly.
const KILL_DELAY_MS: std::ops::RangeInclusive<u64> = 30..=1_500;

fn cycles() -> usize {
    std::env::var("CHARTLOG_CRASH_CYCLES")
        .ok()
        .map(|raw| raw.parse().expect("CHARTLOG_CRASH_CYCLES is a number"))
        .unwrap_or(20)
}

fn seed() -> u64 {
    std::env::var("CHARTLOG_CRASH_SEED")
        .ok()
        .map(|raw| raw.parse().expect("CHARTLOG_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock")
                .as_nanos() as u64
        })
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_loses_nothing_acknowledged_across_sigkills() {
    crash_cycles(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_loses_nothing_acknowledged_across_sigkills_and_immediate_shutdowns() {
    crash_cycles(Backend::Postgres).await;
}

/// What the clients learnt during one cycle.
#[derive(Default)]
struct CycleReport {
    acks: Vec<Ack>,
    stale: usize,
    failed: usize,
    /// A few distinct failure reasons, for the cycle's log line.
    reasons: Vec<String>,
    /// Answers no crash explains (a 4xx other than 412): each is a bug.
    unexpected: Vec<String>,
}

async fn crash_cycles(backend: Backend) {
    let seed = seed();
    let cycles = cycles();
    eprintln!(
        "crash test ({backend:?}): {cycles} cycles, seed {seed} \
         (CHARTLOG_CRASH_SEED={seed} reproduces the kill schedule)"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    let dir = TestDir::new();
    let cluster = (backend == Backend::Postgres).then(PrivatePostgres::start);
    let database_url = cluster.as_ref().map(PrivatePostgres::url);
    let mut args: Vec<String> = vec!["--idle-timeout-minutes".into(), "120".into()];
    if let Some(url) = &database_url {
        args.extend(["--database-url".into(), url.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();

    let mut server = Server::start(dir.data_dir(), &args);
    let mut clinic = Clinic::new(&dir, &server);
    let token = clinic.physician_session(&dir, &server).await;

    let mut acks = Vec::new();
    let mut own_patients = Vec::new();
    for seed in 0..OWN_PATIENT_WRITERS as u64 {
        let ack = clinic.register_patient(&token, seed).await;
        own_patients.push(ack.patient);
        acks.push(ack);
    }
    let shared = clinic.register_patient(&token, 99).await;
    let shared_patient = shared.patient;
    let shared_version = Arc::new(AtomicU64::new(shared.stream_version));
    acks.push(shared);
    let mut patients = own_patients.clone();
    patients.push(shared_patient);
    let values = Arc::new(AtomicU64::new(0));

    for cycle in 0..cycles {
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for (index, patient) in own_patients.iter().copied().enumerate() {
            let (clinic, token, stop, values) =
                (clinic.clone(), token.clone(), stop.clone(), values.clone());
            writers.push(tokio::spawn(async move {
                write_until_stopped(&clinic, &token, patient, None, &stop, &values, index).await
            }));
        }
        for index in 0..SHARED_PATIENT_WRITERS {
            let (clinic, token, stop, values, version) = (
                clinic.clone(),
                token.clone(),
                stop.clone(),
                values.clone(),
                shared_version.clone(),
            );
            writers.push(tokio::spawn(async move {
                write_until_stopped(
                    &clinic,
                    &token,
                    shared_patient,
                    Some(version),
                    &stop,
                    &values,
                    OWN_PATIENT_WRITERS + index,
                )
                .await
            }));
        }

        let delay = Duration::from_millis(rng.random_range(KILL_DELAY_MS));
        // On PostgreSQL the database goes down first in half of the cycles: the server then
        // meets a vanished database mid-request before it is killed itself.
        let database_first = cluster.is_some() && rng.random_bool(0.5);
        tokio::time::sleep(delay).await;
        // pg_ctl and the kill block; the writers must keep running on the other worker
        // meanwhile, to meet the vanished database or server mid-request.
        if database_first && let Some(cluster) = &cluster {
            tokio::task::block_in_place(|| cluster.stop_immediately());
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..=200))).await;
        }
        let status = tokio::task::block_in_place(|| server.signal_and_wait("KILL"));
        assert!(!status.success(), "SIGKILL ends the server abruptly");
        stop.store(true, Ordering::Release);
        if !database_first && let Some(cluster) = &cluster {
            tokio::task::block_in_place(|| cluster.stop_immediately());
        }

        let mut report = CycleReport::default();
        for writer in writers {
            let part = writer.await.expect("writer task");
            report.acks.extend(part.acks);
            report.stale += part.stale;
            report.failed += part.failed;
            for reason in part.reasons {
                if report.reasons.len() < 4 && !report.reasons.contains(&reason) {
                    report.reasons.push(reason);
                }
            }
            report.unexpected.extend(part.unexpected);
        }
        assert!(
            report.unexpected.is_empty(),
            "cycle {cycle} (seed {seed}): answers no crash explains: {:?}",
            report.unexpected
        );
        eprintln!(
            "cycle {cycle}: killed after {delay:?}{}, {} acknowledged, {} stale If-Match, \
             {} failed {:?}",
            if database_first {
                " (database first)"
            } else {
                ""
            },
            report.acks.len(),
            report.stale,
            report.failed,
            report.reasons
        );
        acks.extend(report.acks);

        // The store as the crash left it, before anything runs on it again.
        let phase = Instant::now();
        if let Some(cluster) = &cluster {
            cluster.start_server();
        }
        let database = Database::open(dir.data_dir(), database_url.as_deref()).await;
        let recovered = phase.elapsed();
        check_log(&database, &acks).await;
        let logged = phase.elapsed();
        verify(&dir, database_url.as_deref(), cycle, seed);
        let verified = phase.elapsed();

        server = Server::start(dir.data_dir(), &args);
        clinic.follow(&server);
        let restarted = phase.elapsed();
        check_read_models(&database, &clinic, &token, &acks, &patients).await;
        database.close().await;
        eprintln!(
            "cycle {cycle} timings: recovered {recovered:?}, log {logged:?}, verify {verified:?}, \
             restart {restarted:?}, read models {:?}",
            phase.elapsed()
        );
    }

    let observations = acks.iter().filter(|ack| ack.event_type.is_some()).count();
    assert!(
        observations > 0,
        "no observation was ever acknowledged: the harness tested nothing"
    );
    eprintln!(
        "crash test ({backend:?}): {cycles} cycles, {observations} acknowledged observations, \
         all present once; {:?}",
        started.elapsed()
    );
}

/// Records observations for `patient` until `stop`, with If-Match when `shared_version` is
/// given (the version this writer believes current, shared by the writers of that patient so
/// a restart does not start them from scratch).
async fn write_until_stopped(
    clinic: &Clinic,
    token: &str,
    patient: Uuid,
    shared_version: Option<Arc<AtomicU64>>,
    stop: &AtomicBool,
    values: &AtomicU64,
    index: usize,
) -> CycleReport {
    let writer = format!("writer-{index}");
    let mut report = CycleReport::default();
    while !stop.load(Ordering::Acquire) {
        let if_match = shared_version
            .as_ref()
            .map(|version| version.load(Ordering::Acquire));
        let value = values.fetch_add(1, Ordering::Relaxed);
        match clinic
            .record_observation(token, patient, if_match, value, &writer)
            .await
        {
            Outcome::Acknowledged(ack) => {
                if let (Some(version), Some(expected)) = (&shared_version, if_match) {
                    assert_eq!(
                        ack.stream_version,
                        expected + 1,
                        "a write with If-Match \"{expected}\" landed elsewhere: {ack:?}"
                    );
                    version.fetch_max(ack.stream_version, Ordering::AcqRel);
                }
                report.acks.push(ack);
            }
            Outcome::Stale { current } => {
                report.stale += 1;
                if let Some(version) = &shared_version {
                    version.fetch_max(current, Ordering::AcqRel);
                }
            }
            Outcome::Failed(reason) => {
                report.failed += 1;
                let short: String = reason.chars().take(160).collect();
                if report.reasons.len() < 4 && !report.reasons.contains(&short) {
                    report.reasons.push(short);
                }
                // A dying server may answer 5xx or drop the connection; a 4xx other than
                // 412 is not something a crash explains (a lost session would be 401).
                if reason.starts_with('4') {
                    report.unexpected.push(reason);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    report
}

/// `chartlog verify` on the store as the crash left it: every chain and signature holds.
fn verify(dir: &TestDir, database_url: Option<&str>, cycle: usize, seed: u64) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"));
    command
        .args(["verify", "--json", "--data-dir"])
        .arg(dir.data_dir())
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR");
    if let Some(url) = database_url {
        command.args(["--database-url", url]);
    }
    let output = command.output().expect("run chartlog verify");
    assert!(
        output.status.success(),
        "cycle {cycle} (seed {seed}): verify failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("verify prints one JSON report");
    assert_eq!(report["intact"], true, "cycle {cycle}: {report}");
}
