//! HTTP load: the record-observation command and the chart read over HTTPS against the real
//! release binary, 32 concurrent clients, on SQLite and PostgreSQL, next to store-level
//! throughput measured in the same run.
//!
//! cargo bench --bench http_load
//! CHARTLOG_BENCH_SCALE=4 cargo bench --bench http_load      (4x the requests per client)
//! CHARTLOG_BENCH_PG_URL=postgres://user@host:5432/postgres  (server for the scratch databases;
//!                                                            default postgres://postgres@127.0.0.1:5432/postgres)
//!
//! Per backend:
//! - store baselines, in-process, 32 concurrent writers, each on its own patient stream:
//!   `EventStore::append` of one pre-sealed event (the bare append), and
//!   `PatientLedger::execute_with` of one RecordObservation on the record its last command left
//!   (decide + seal + sign + append at the expected version: what one HTTP record-observation
//!   does below the HTTP layer, where the server keeps each record between commands). The
//!   throughput target is read against the bare append, the store's own append; the ratio to
//!   the ledger is printed beside it, to show what the layers above the store cost.
//! - HTTP: `chartlog serve` over HTTPS (dev certificate, verification on, keep-alive, one
//!   reqwest client shared by 32 tokio tasks, the per-client rate limit raised out of the
//!   way since they share one session); a physician (password + TOTP) registers 32
//!   patients, then each task records observations on its own patient (no If-Match), then each
//!   task reads its patient's chart. Two floors follow, to read those figures by: `/healthz`
//!   (TLS, HTTP and the client alone) and `/auth/session` (that plus the session lookup every
//!   guarded request makes).
//!
//! Each phase also reports CPU time per request, read from /proc: the server's (in total and
//! by thread name), this process's, PostgreSQL's processes' and the whole machine's, with the
//! share of the cores left idle. Where the cores are all busy, a phase's rate is its CPU cost,
//! and the throughput target becomes a budget of microseconds per command.
//!
//! Nothing is asserted: targets are printed as met or missed.

#[allow(dead_code)]
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fs;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chartlog_crypto::{
    DataKeys, EventHash, EventSigner, KekId, KeyRing, KeyStore, SignatureVerifier, SignerKeyId,
};
use chartlog_domain::{
    Actor, PatientCommand, PurposeOfUse, Role, StreamId, Timestamp, UserId, synthetic,
};
use chartlog_store::conformance::EventFactory;
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::{EventStore, ExecuteOptions, PatientLedger, StreamHead};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use support::{Server, TestDir, https_client, passphrase, totp};
use uuid::Uuid;

const CLIENTS: usize = 32;
/// Roughly an encoded observation's size.
const PAYLOAD_BYTES: usize = 256;
const TARGET_RATIO: f64 = 0.5;
const TARGET_P99_MS: f64 = 25.0;

// ---------------------------------------------------------------- figures

struct Figures {
    requests: usize,
    errors: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
    cpu: CpuUse,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1].as_secs_f64() * 1e3
    }
    /// CPU time per request, in microseconds.
    fn cpu_micros(&self, spent: Duration) -> f64 {
        spent.as_secs_f64() * 1e6 / self.requests.max(1) as f64
    }
    fn row(&self, backend: &str, what: &str) {
        let server = match self.cpu.server {
            Some(server) => format!("{:.0}", self.cpu_micros(server)),
            None => "-".to_owned(),
        };
        println!(
            "| {backend:<8} | {what:<34} | {:>6} | {:>4} | {:>9.0} | {:>7.2} | {:>7.2} | {server:>6} | {:>6.0} | {:>6.0} | {:>6.0} | {:>4.0} |",
            self.requests,
            self.errors,
            self.rate(),
            self.percentile_ms(50.0),
            self.percentile_ms(99.0),
            self.cpu_micros(self.cpu.bench),
            self.cpu_micros(self.cpu.postgres),
            self.cpu_micros(self.cpu.machine),
            self.cpu.idle_share * 100.0,
        );
    }
}

// ---------------------------------------------------------------- CPU accounting

/// Where the cores went during one phase, read from /proc: what each request costs in CPU,
/// which is what the throughput target is made of on a machine whose cores are all busy.
/// Zeros where /proc cannot be read.
#[derive(Clone, Default)]
struct CpuUse {
    /// This process: the in-process store in the store phases, the HTTP client in the others.
    bench: Duration,
    /// The `chartlog serve` process, in the HTTP phases.
    server: Option<Duration>,
    /// Every process named `postgres` (its backends and background workers).
    postgres: Duration,
    /// All of the machine's cores, whoever used them.
    machine: Duration,
    /// The share of the machine's core time left idle or waiting on I/O while requests were
    /// being answered.
    idle_share: f64,
    /// The server's CPU time by thread name (as the kernel truncates it): the HTTP workers,
    /// the runtime that runs the projection runner and the committers, the database's threads.
    server_threads: BTreeMap<String, Duration>,
}

#[derive(Clone, Default)]
struct CpuClocks {
    bench: Duration,
    server: Option<Duration>,
    server_threads: BTreeMap<String, Duration>,
    postgres: Duration,
    machine_busy: Duration,
    machine_idle: Duration,
}

/// Linux reports process CPU time in clock ticks of 1/100 s (USER_HZ, fixed for user space
/// on every architecture this runs on), and /proc/stat in the same unit.
fn ticks(count: u64) -> Duration {
    Duration::from_millis(10 * count)
}

impl CpuClocks {
    fn read(server: Option<u32>) -> CpuClocks {
        let (machine_busy, machine_idle) = machine_ticks().unwrap_or((0, 0));
        CpuClocks {
            bench: ticks(process_ticks(std::process::id()).unwrap_or(0)),
            server: server.map(|pid| ticks(process_ticks(pid).unwrap_or(0))),
            server_threads: server.map(thread_ticks).unwrap_or_default(),
            postgres: ticks(postgres_ticks()),
            machine_busy: ticks(machine_busy),
            machine_idle: ticks(machine_idle),
        }
    }

    fn since(&self, before: &CpuClocks) -> CpuUse {
        let busy = self.machine_busy.saturating_sub(before.machine_busy);
        let idle = self.machine_idle.saturating_sub(before.machine_idle);
        let total = (busy + idle).as_secs_f64();
        CpuUse {
            bench: self.bench.saturating_sub(before.bench),
            server: self
                .server
                .zip(before.server)
                .map(|(after, before)| after.saturating_sub(before)),
            postgres: self.postgres.saturating_sub(before.postgres),
            machine: busy,
            // A thread that ended during the phase takes its time with it; the server's
            // threads are long-lived pools, so little is lost.
            server_threads: self
                .server_threads
                .iter()
                .map(|(name, after)| {
                    let before = before.server_threads.get(name).copied().unwrap_or_default();
                    (name.clone(), after.saturating_sub(before))
                })
                .collect(),
            idle_share: if total > 0.0 {
                idle.as_secs_f64() / total
            } else {
                0.0
            },
        }
    }
}

/// User plus system ticks of one process, all its threads, from `/proc/<pid>/stat`; with the
/// process's name, which may hold spaces and parentheses, so fields are counted after the last
/// `)`.
fn process_stat(pid: u32) -> Option<(String, u64)> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_stat(stat: &str) -> Option<(String, u64)> {
    let name_start = stat.find('(')?;
    let name_end = stat.rfind(')')?;
    let name = stat.get(name_start + 1..name_end)?.to_owned();
    let fields: Vec<&str> = stat.get(name_end + 1..)?.split_whitespace().collect();
    // Fields 14 and 15 of proc(5), utime and stime; the first field after the name is field 3.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn process_ticks(pid: u32) -> Option<u64> {
    process_stat(pid).map(|(_, ticks)| ticks)
}

/// A process's CPU time summed by thread name, from `/proc/<pid>/task/*/stat`.
fn thread_ticks(pid: u32) -> BTreeMap<String, Duration> {
    let mut by_name = BTreeMap::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return by_name;
    };
    for task in tasks.filter_map(Result::ok) {
        let stat = task.path().join("stat");
        let Some((name, spent)) = fs::read_to_string(stat).ok().and_then(|s| parse_stat(&s)) else {
            continue;
        };
        *by_name.entry(name).or_default() += ticks(spent);
    }
    by_name
}

fn postgres_ticks() -> u64 {
    let Ok(entries) = fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(process_stat)
        .filter(|(name, _)| name == "postgres")
        .map(|(_, ticks)| ticks)
        .sum()
}

/// The machine's busy and idle (idle + iowait) ticks over all cores, from `/proc/stat`.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = cpu
        .split_whitespace()
        .map(|field| field.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is already in user.
    let idle = ticks.get(3)? + ticks.get(4)?;
    let busy: u64 = ticks.iter().take(8).sum::<u64>() - idle;
    Some((busy, idle))
}

/// Runs one phase and notes what it cost each party in CPU. The server's projection runner
/// may still be folding the phase's events when the last answer arrives, so its clock is read
/// once it has settled (under a tenth of a core for 200 ms, or after 10 s): the time the phase
/// took does not include that wait, its CPU does.
async fn measured(
    server: Option<u32>,
    phase: impl std::future::Future<Output = Figures>,
) -> Figures {
    let before = CpuClocks::read(server);
    let mut figures = phase.await;
    let at_end = CpuClocks::read(server);
    if let Some(pid) = server {
        let settle_by = Instant::now() + Duration::from_secs(10);
        let mut last = process_ticks(pid).unwrap_or(0);
        while Instant::now() < settle_by {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = process_ticks(pid).unwrap_or(0);
            if now.saturating_sub(last) <= 2 {
                break;
            }
            last = now;
        }
    }
    figures.cpu = CpuClocks::read(server).since(&before);
    figures.cpu.idle_share = at_end.since(&before).idle_share;
    figures
}

/// Runs `per_client` operations on each of `CLIENTS` tasks, timing each.
async fn load<F, Fut>(per_client: usize, op: F) -> Figures
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send + 'static,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_client);
                let mut errors = 0;
                for n in 0..per_client {
                    let at = Instant::now();
                    if !op(client, n).await {
                        errors += 1;
                    }
                    latencies.push(at.elapsed());
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut figures = Figures {
        requests: 0,
        errors: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        cpu: CpuUse::default(),
    };
    for task in tasks {
        let (latencies, errors) = task.await.expect("client task");
        figures.requests += latencies.len();
        figures.errors += errors;
        figures.latencies.extend(latencies);
    }
    figures.elapsed = started.elapsed();
    figures
}

fn now() -> Timestamp {
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_micros();
    Timestamp::from_unix_micros(micros as i64).expect("in range")
}

// ---------------------------------------------------------------- store baselines

/// One pre-sealed event per append, 32 writers on their own streams.
async fn bare_append<S: EventStore + Clone + 'static>(store: &S, per_client: usize) -> Figures {
    let factory = EventFactory::new();
    let payload = vec![0x5a_u8; PAYLOAD_BYTES];
    let work: Vec<Vec<_>> = (0..CLIENTS)
        .map(|_| {
            let stream = StreamId::patient(chartlog_domain::PatientId::from_uuid(Uuid::new_v4()));
            let mut head = StreamHead {
                version: 0,
                hash: EventHash::GENESIS,
            };
            (0..per_client)
                .map(|_| {
                    let event = factory.event(&stream, head.version + 1, head.hash, &payload);
                    head = StreamHead {
                        version: head.version + 1,
                        hash: event.hash,
                    };
                    event
                })
                .collect()
        })
        .collect();
    let work = Arc::new(work);
    let store = store.clone();
    let appends = load(per_client, move |client, n| {
        let store = store.clone();
        let work = work.clone();
        async move {
            let event = &work[client][n];
            store
                .append(
                    &event.header.stream_id,
                    event.header.stream_version - 1,
                    std::slice::from_ref(event),
                )
                .await
                .is_ok()
        }
    });
    measured(None, appends).await
}

/// The `n`th observation command for synthetic patient `seed`.
fn observation(seed: u64, n: usize) -> PatientCommand {
    let at = now();
    (n as u64 * 20..)
        .map(|k| synthetic::clinical_command(seed, k, at))
        .find(|c| matches!(c, PatientCommand::RecordObservation { .. }))
        .expect("observations are the common case")
}

/// `PatientLedger::execute_with` of RecordObservation, 32 writers on their own registered
/// patients, each deciding on the record its previous command left (as the server does, so no
/// command reads back its stream); a warm-up of `warmup` commands each first.
async fn ledger_commands<S: EventStore + 'static, K: KeyStore + 'static>(
    store: Arc<S>,
    key_store: K,
    per_client: usize,
    warmup: usize,
) -> Figures {
    let keys = Arc::new(DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        key_store,
    ));
    let signer = Arc::new(EventSigner::generate(SignerKeyId::generate()));
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust the signer");
    let ledger = PatientLedger::new(store, keys, signer, Arc::new(verifier));
    let actor = Actor {
        user_id: UserId::from_uuid(Uuid::now_v7()),
        role: Role::Physician,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    };
    let base = rand_seed();
    let mut records = Vec::with_capacity(CLIENTS);
    for client in 0..CLIENTS {
        let seed = base + client as u64;
        let registered = ledger
            .execute(
                synthetic::patient_id(seed),
                synthetic::registration(seed),
                actor,
                now(),
            )
            .await
            .expect("register");
        records.push(tokio::sync::Mutex::new(registered.record));
    }
    // One lock per client, each taken by that client's task alone: the server's record cache
    // without its sharing.
    let records = Arc::new(records);
    let run = |count: usize, offset: usize| {
        let ledger = ledger.clone();
        let records = records.clone();
        load(count, move |client, n| {
            let ledger = ledger.clone();
            let records = records.clone();
            async move {
                let seed = base + client as u64;
                let mut kept = records[client].lock().await;
                let loaded = kept.take();
                let options = ExecuteOptions {
                    expected_version: loaded
                        .as_ref()
                        .map(|record| record.head.map_or(0, |head| head.version)),
                    loaded,
                };
                match ledger
                    .execute_with(
                        synthetic::patient_id(seed),
                        observation(seed, offset + n),
                        actor,
                        now(),
                        options,
                    )
                    .await
                {
                    Ok(outcome) => {
                        *kept = outcome.record;
                        true
                    }
                    Err(error) => {
                        report_failure("ledger command", &error.to_string());
                        false
                    }
                }
            }
        })
    };
    run(warmup, 0).await;
    measured(None, run(per_client, warmup)).await
}

fn rand_seed() -> u64 {
    // Small enough for a synthetic MRN; distinct runs get distinct patients.
    (Uuid::new_v4().as_u128() as u64) % 1_000_000_000
}

// ---------------------------------------------------------------- HTTP

async fn post(
    client: &Client,
    server: &Server,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut request = client.post(server.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn expect(answer: (StatusCode, Value), status: StatusCode, what: &str) -> Value {
    assert_eq!(answer.0, status, "{what}: {}", answer.1);
    answer.1
}

/// One-time password -> own passphrase -> (TOTP enrollment) -> a full session's token.
async fn first_login(client: &Client, server: &Server, username: &str, one_time: &str) -> String {
    let login = |password: String, code: Option<String>| {
        let mut body = json!({ "username": username, "password": password });
        if let Some(code) = code {
            body["second_factor"] = json!(code);
        }
        post(client, server, "/auth/login", None, body)
    };
    let answer = expect(
        login(one_time.to_owned(), None).await,
        StatusCode::OK,
        "first login",
    );
    let token = answer["token"].as_str().expect("token").to_owned();
    expect(
        post(
            client,
            server,
            "/auth/password",
            Some(&token),
            json!({ "current_password": one_time, "new_password": passphrase(username) }),
        )
        .await,
        StatusCode::NO_CONTENT,
        "change password",
    );
    let answer = expect(
        login(passphrase(username), None).await,
        StatusCode::OK,
        "login",
    );
    let token = answer["token"].as_str().expect("token").to_owned();
    if answer["session"]["stage"] == "full" {
        return token;
    }
    let enrollment = expect(
        post(
            client,
            server,
            "/auth/second-factor/enrollment",
            Some(&token),
            json!({}),
        )
        .await,
        StatusCode::OK,
        "enroll",
    );
    let secret = enrollment["secret_base32"]
        .as_str()
        .expect("secret")
        .to_owned();
    expect(
        post(
            client,
            server,
            "/auth/second-factor/confirmation",
            Some(&token),
            json!({ "code": totp(&secret, 0) }),
        )
        .await,
        StatusCode::OK,
        "confirm",
    );
    let answer = expect(
        login(passphrase(username), Some(totp(&secret, 30))).await,
        StatusCode::OK,
        "login with TOTP",
    );
    answer["token"].as_str().expect("token").to_owned()
}

struct HttpFigures {
    commands: Figures,
    reads: Figures,
    /// `GET /healthz`: TLS, HTTP and the client, with no database and no session.
    transport: Figures,
    /// `GET /auth/session`: the transport and the session lookup every guarded route makes.
    session: Figures,
}

async fn http_load(
    data_dir: &TestDir,
    extra_args: &[&str],
    per_client: usize,
    warmup: usize,
) -> HttpFigures {
    // The 32 tasks share one session, which the server's per-client limit (2,000 requests/s
    // by default) would hold back: this measures the server, with the limiter's check still
    // made on every request.
    let args: Vec<&str> = extra_args
        .iter()
        .copied()
        .chain([
            "--rate-limit-per-second",
            "1000000",
            "--rate-limit-burst",
            "1000000",
        ])
        .collect();
    let server = Server::start(data_dir.data_dir(), &args);
    server.wait_for_stderr("first-administrator-password");
    let client = https_client(&fs::read(data_dir.certificate_path()).expect("certificate"));
    let admin_password =
        fs::read_to_string(data_dir.data_dir().join("first-administrator-password"))
            .expect("password file");
    let admin = first_login(&client, &server, "admin", admin_password.trim()).await;
    let created = expect(
        post(
            &client,
            &server,
            "/users",
            Some(&admin),
            json!({ "username": "dr.bench", "role": "physician" }),
        )
        .await,
        StatusCode::CREATED,
        "create physician",
    );
    let one_time = created["one_time_password"]
        .as_str()
        .expect("password")
        .to_owned();
    let physician = first_login(&client, &server, "dr.bench", &one_time).await;

    let base = rand_seed();
    let mut patients = Vec::with_capacity(CLIENTS);
    for client_index in 0..CLIENTS {
        let PatientCommand::RegisterPatient { demographics, .. } =
            synthetic::registration(base + client_index as u64)
        else {
            unreachable!("registration registers")
        };
        let body = serde_json::to_value(&demographics).expect("demographics serialize");
        let answer = expect(
            post(&client, &server, "/patients", Some(&physician), body).await,
            StatusCode::CREATED,
            "register patient",
        );
        patients.push(
            answer["patient_id"]
                .as_str()
                .expect("patient id")
                .to_owned(),
        );
    }

    let urls = Arc::new(
        patients
            .iter()
            .map(|p| {
                (
                    server.url(&format!("/patients/{p}/record-observation")),
                    server.url(&format!("/patients/{p}/chart")),
                )
            })
            .collect::<Vec<_>>(),
    );
    let physician = Arc::new(physician);
    let command = |count: usize| {
        let (client, urls, token) = (client.clone(), urls.clone(), physician.clone());
        load(count, move |index, n| {
            let (client, urls, token) = (client.clone(), urls.clone(), token.clone());
            async move {
                let body = json!({
                    "code": { "system": "http://loinc.org", "code": "8867-4" },
                    "value": { "quantity": { "value": format!("{}", 60 + n % 40), "unit": "/min" } },
                    "effective_at": "2026-11-27T08:30:00Z",
                });
                let sent = client
                    .post(&urls[index].0)
                    .bearer_auth(token.as_str())
                    .json(&body)
                    .send()
                    .await;
                answered_ok(sent, "command").await
            }
        })
    };
    command(warmup).await;
    let server_pid = Some(server.pid());
    let commands = measured(server_pid, command(per_client)).await;

    let floor_client = client.clone();
    let (client, token) = (client.clone(), physician.clone());
    let reads = load(per_client, move |index, _| {
        let (client, urls, token) = (client.clone(), urls.clone(), token.clone());
        async move {
            let sent = client
                .get(&urls[index].1)
                .bearer_auth(token.as_str())
                .send()
                .await;
            answered_ok(sent, "chart read").await
        }
    });
    let reads = measured(server_pid, reads).await;

    // What every request pays before its route's own work, to read the figures above by.
    let floor = |path: &str| {
        let url = Arc::new(server.url(path));
        let (client, token) = (floor_client.clone(), physician.clone());
        load(per_client, move |_, _| {
            let (client, url, token) = (client.clone(), url.clone(), token.clone());
            async move {
                let sent = client
                    .get(url.as_str())
                    .bearer_auth(token.as_str())
                    .send()
                    .await;
                answered_ok(sent, "floor request").await
            }
        })
    };
    let transport = measured(server_pid, floor("/healthz")).await;
    let session = measured(server_pid, floor("/auth/session")).await;
    drop(server);
    HttpFigures {
        commands,
        reads,
        transport,
        session,
    }
}

/// Reads the whole answer; a lost request or anything but 200 is an error, and the first few
/// are printed (the API's errors name a code and never carry PHI).
async fn answered_ok(sent: reqwest::Result<reqwest::Response>, what: &str) -> bool {
    let response = match sent {
        Ok(response) => response,
        Err(error) => {
            report_failure(what, &error.to_string());
            return false;
        }
    };
    let status = response.status();
    match response.bytes().await {
        Ok(_) if status == StatusCode::OK => true,
        Ok(body) => {
            report_failure(
                what,
                &format!("{status} {}", String::from_utf8_lossy(&body)),
            );
            false
        }
        Err(error) => {
            report_failure(what, &format!("{status}, body lost: {error}"));
            false
        }
    }
}

fn report_failure(what: &str, failure: &str) {
    static PRINTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    if PRINTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5 {
        eprintln!("{what} failed: {failure}");
    }
}

// ---------------------------------------------------------------- report

fn report(backend: &str, bare: &Figures, ledger: &Figures, http: &HttpFigures) {
    bare.row(backend, "store: EventStore::append (1 ev)");
    ledger.row(backend, "store: ledger execute, kept record");
    http.commands.row(backend, "HTTPS POST record-observation");
    http.reads.row(backend, "HTTPS GET chart");
    http.transport
        .row(backend, "HTTPS GET /healthz (transport)");
    http.session.row(backend, "HTTPS GET /auth/session");
    let ratio = http.commands.rate() / bare.rate();
    let p99 = http.commands.percentile_ms(99.0);
    let read_p99 = http.reads.percentile_ms(99.0);
    println!(
        "{backend}: HTTP command / bare append = {ratio:.2}x (target >= {TARGET_RATIO}x: {}); \
         HTTP command / ledger execute = {:.2}x",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "MISSED"
        },
        http.commands.rate() / ledger.rate(),
    );
    println!(
        "{backend}: the machine's CPU per HTTP command {:.0} us (server {}, client {:.0}, PostgreSQL \
         {:.0}), per bare append {:.0} us; cores idle {:.0}% and {:.0}% of those phases",
        http.commands.cpu_micros(http.commands.cpu.machine),
        http.commands.cpu.server.map_or_else(
            || "-".to_owned(),
            |server| format!("{:.0}", http.commands.cpu_micros(server))
        ),
        http.commands.cpu_micros(http.commands.cpu.bench),
        http.commands.cpu_micros(http.commands.cpu.postgres),
        bare.cpu_micros(bare.cpu.machine),
        http.commands.cpu.idle_share * 100.0,
        bare.cpu.idle_share * 100.0,
    );
    for (what, figures) in [
        ("HTTP command", &http.commands),
        ("chart read", &http.reads),
    ] {
        let threads: Vec<String> = figures
            .cpu
            .server_threads
            .iter()
            .filter(|(_, spent)| !spent.is_zero())
            .map(|(name, spent)| format!("{name} {:.0}", figures.cpu_micros(*spent)))
            .collect();
        println!(
            "{backend}: the server's CPU per {what} by thread, us: {}",
            threads.join(", ")
        );
    }
    println!(
        "{backend}: command p99 {p99:.2} ms (target <= {TARGET_P99_MS} ms: {}); chart read p99 {read_p99:.2} ms ({})",
        if p99 <= TARGET_P99_MS {
            "met"
        } else {
            "MISSED"
        },
        if read_p99 <= TARGET_P99_MS {
            "met"
        } else {
            "MISSED"
        },
    );
}

fn header() {
    println!(
        "CPU columns: microseconds of one core per request, spent by the chartlog server, by this \
         process (the in-process store, or the HTTP client), by PostgreSQL, and by the whole \
         machine; idle: the share of the cores left idle during the phase"
    );
    println!(
        "| backend  | what                               |   reqs | errs |    req/s  | p50 ms  | p99 ms  | srv us | bch us |  pg us | all us | idle |"
    );
    println!(
        "|----------|------------------------------------|--------|------|-----------|---------|---------|--------|--------|--------|--------|------|"
    );
}

fn scratch_url(server_url: &str, name: &str) -> String {
    match server_url.rfind('/') {
        Some(slash) if slash > "postgres://".len() => format!("{}/{name}", &server_url[..slash]),
        _ => format!("{}/{name}", server_url.trim_end_matches('/')),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let scale: usize = std::env::var("CHARTLOG_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let per_client = 50 * scale;
    let warmup = 3;
    println!(
        "chartlog HTTP load: {CLIENTS} concurrent clients, {per_client} requests each per phase (CHARTLOG_BENCH_SCALE={scale})"
    );
    println!("reproduce: cargo bench --bench http_load");
    println!(
        "baseline for the throughput target: EventStore::append of one event, 32 in-process writers"
    );
    header();

    // SQLite.
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SqliteEventStore::open(&dir.path().join("bare.db"))
            .await
            .expect("sqlite");
        let bare = bare_append(&store, per_client).await;
        store.pool().close().await;
        let store = SqliteEventStore::open(&dir.path().join("ledger.db"))
            .await
            .expect("sqlite");
        let key_store = SqliteKeyStore::new(store.pool().clone());
        let ledger = ledger_commands(Arc::new(store.clone()), key_store, per_client, warmup).await;
        store.pool().close().await;
        let data = TestDir::new();
        let http = http_load(&data, &[], per_client, warmup).await;
        report("sqlite", &bare, &ledger, &http);
    }

    // PostgreSQL.
    let server_url = std::env::var("CHARTLOG_BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let mut admin = match tokio::time::timeout(
        Duration::from_secs(5),
        PgConnection::connect(&server_url),
    )
    .await
    {
        Ok(Ok(admin)) => admin,
        Ok(Err(error)) => {
            println!("postgres: skipped, cannot connect to {server_url}: {error}");
            return;
        }
        Err(_) => {
            println!("postgres: skipped, no answer from {server_url} within 5 s");
            return;
        }
    };
    let pid = std::process::id();
    let store_db = format!("chartlog_bench_http_{pid}_store");
    let server_db = format!("chartlog_bench_http_{pid}");
    for db in [&store_db, &server_db] {
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
            .await
            .expect("create scratch database");
    }
    {
        let store = PostgresEventStore::connect(&scratch_url(&server_url, &store_db))
            .await
            .expect("postgres");
        // A first pass pays for the fresh database (see benches/store_append.rs); measure the second.
        bare_append(&store, per_client).await;
        let bare = bare_append(&store, per_client).await;
        let key_store = PostgresKeyStore::new(store.pool().clone());
        let ledger = ledger_commands(Arc::new(store.clone()), key_store, per_client, warmup).await;
        store.close().await;
        let data = TestDir::new();
        let url = scratch_url(&server_url, &server_db);
        let http = http_load(&data, &["--database-url", &url], per_client, warmup).await;
        report("postgres", &bare, &ledger, &http);
    }
    for db in [&store_db, &server_db] {
        admin
            .execute(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
            )))
            .await
            .expect("drop scratch database");
    }
}
