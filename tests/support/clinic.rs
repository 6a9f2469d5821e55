//! An EHR client of the real server (log in, register, record observations with or without
//! If-Match) and a history checker that compares what the server acknowledged with what the
//! database and the read models hold afterwards. Shared by the crash and concurrency tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use chartlog_domain::{PatientCommand, synthetic};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::{Server, TestDir, https_client};

/// The projections the server runs; every one must reach the end of the log.
pub const PROJECTIONS: [&str; 4] = ["chart", "history", "audit_trail", "deidentified"];
/// The stored type of the event a record-observation command appends.
pub const OBSERVATION_RECORDED: &str = "observation_recorded";
/// How long the read models may take to reach a position before the checker gives up. Not a
/// speed target: long enough for a debug build on a loaded two-core machine.
pub const CONVERGENCE_WAIT: Duration = Duration::from_secs(180);

/// One command the server answered with a 2xx: where it says the command's last event landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub patient: Uuid,
    pub stream_version: u64,
    pub position: u64,
    pub record_id: Uuid,
    /// The event type stored at `position`, when the command appends one known event.
    pub event_type: Option<&'static str>,
    /// Who was told they won, for messages.
    pub writer: String,
}

/// What became of one record-observation request.
#[derive(Debug)]
pub enum Outcome {
    Acknowledged(Ack),
    /// 412: the record is at `current`, not the If-Match version.
    Stale {
        current: u64,
    },
    /// Anything else: the server is down or failing; the command may or may not have landed.
    Failed(String),
}

pub use crate::support::passphrase;
use crate::support::totp;

/// A client of one server; `base_url` changes when the server restarts on a new port.
#[derive(Clone)]
pub struct Clinic {
    client: Client,
    base_url: String,
}

impl Clinic {
    pub fn new(dir: &TestDir, server: &Server) -> Clinic {
        let certificate = std::fs::read(dir.certificate_path()).expect("certificate");
        Clinic {
            client: https_client(&certificate),
            base_url: server.base_url().to_owned(),
        }
    }

    /// Points the client at a restarted server (same data dir, same certificate).
    pub fn follow(&mut self, server: &Server) {
        server.base_url().clone_into(&mut self.base_url);
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
        headers: &[(&str, String)],
    ) -> Result<(StatusCode, String), reqwest::Error> {
        let mut request = self
            .client
            .request(method, format!("{}{path}", self.base_url));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await?;
        let status = response.status();
        Ok((status, response.text().await?))
    }

    /// A request the test needs to succeed: panics on a transport error or another status.
    pub async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        status: StatusCode,
    ) -> Value {
        let (got, text) = self
            .send(method, path, token, body.as_ref(), &[])
            .await
            .unwrap_or_else(|error| panic!("{path}: {error}"));
        assert_eq!(got, status, "{path}: {text}");
        if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON: {text}"))
        }
    }

    /// The administrator changes the one-time password, creates `dr.crash` (physician), who
    /// changes theirs and enrolls TOTP. Returns the physician's full session token. Sessions
    /// are stored in the database, so the token outlives a server restart.
    pub async fn physician_session(&self, dir: &TestDir, server: &Server) -> String {
        server.wait_for_stderr("first-administrator-password");
        let admin_password =
            std::fs::read_to_string(dir.data_dir().join("first-administrator-password"))
                .expect("first administrator password file");
        let admin = self.first_login("admin", admin_password.trim()).await;
        let created = self
            .expect(
                reqwest::Method::POST,
                "/users",
                Some(&admin),
                Some(json!({ "username": "dr.crash", "role": "physician" })),
                StatusCode::CREATED,
            )
            .await;
        let one_time = created["one_time_password"]
            .as_str()
            .expect("one-time password");
        self.first_login("dr.crash", one_time).await
    }

    async fn login(&self, username: &str, password: &str, code: Option<String>) -> Value {
        let mut body = json!({ "username": username, "password": password });
        if let Some(code) = code {
            body["second_factor"] = json!(code);
        }
        self.expect(
            reqwest::Method::POST,
            "/auth/login",
            None,
            Some(body),
            StatusCode::OK,
        )
        .await
    }

    async fn first_login(&self, username: &str, one_time_password: &str) -> String {
        let answer = self.login(username, one_time_password, None).await;
        let token = answer["token"].as_str().expect("token").to_owned();
        self.expect(
            reqwest::Method::POST,
            "/auth/password",
            Some(&token),
            Some(json!({
                "current_password": one_time_password,
                "new_password": passphrase(username),
            })),
            StatusCode::NO_CONTENT,
        )
        .await;
        let answer = self.login(username, &passphrase(username), None).await;
        let token = answer["token"].as_str().expect("token").to_owned();
        if answer["session"]["stage"] == "full" {
            return token;
        }
        let enrollment = self
            .expect(
                reqwest::Method::POST,
                "/auth/second-factor/enrollment",
                Some(&token),
                Some(json!({})),
                StatusCode::OK,
            )
            .await;
        let secret = enrollment["secret_base32"].as_str().expect("secret");
        self.expect(
            reqwest::Method::POST,
            "/auth/second-factor/confirmation",
            Some(&token),
            Some(json!({ "code": totp(secret, 0) })),
            StatusCode::OK,
        )
        .await;
        // The confirmation spent this step's code; the next step's is still accepted.
        let answer = self
            .login(username, &passphrase(username), Some(totp(secret, 30)))
            .await;
        assert_eq!(answer["session"]["stage"], "full", "{answer}");
        answer["token"].as_str().expect("token").to_owned()
    }

    /// Registers a synthetic patient; the answer is at version 2 (registration, then the
    /// registering physician's care relationship).
    pub async fn register_patient(&self, token: &str, seed: u64) -> Ack {
        let PatientCommand::RegisterPatient { demographics, .. } = synthetic::registration(seed)
        else {
            unreachable!("registration registers")
        };
        let body = serde_json::to_value(&demographics).expect("demographics serialize");
        let answer = self
            .expect(
                reqwest::Method::POST,
                "/patients",
                Some(token),
                Some(body),
                StatusCode::CREATED,
            )
            .await;
        let ack = parse_ack(&answer, None, "registration");
        assert_eq!(ack.stream_version, 2, "{answer}");
        ack
    }

    /// Records a heart rate of `value` for `patient`, with `If-Match` when `if_match` is given.
    pub async fn record_observation(
        &self,
        token: &str,
        patient: Uuid,
        if_match: Option<u64>,
        value: u64,
        writer: &str,
    ) -> Outcome {
        let body = json!({
            "code": { "system": "http://loinc.org", "code": "8867-4" },
            "value": { "quantity": { "value": (40 + value % 140).to_string(), "unit": "/min" } },
            "effective_at": "2026-11-27T08:30:00Z",
        });
        let headers: Vec<(&str, String)> = if_match
            .map(|version| vec![("if-match", format!("\"{version}\""))])
            .unwrap_or_default();
        let sent = self
            .send(
                reqwest::Method::POST,
                &format!("/patients/{patient}/record-observation"),
                Some(token),
                Some(&body),
                &headers,
            )
            .await;
        match sent {
            Err(error) => Outcome::Failed(format!("transport: {error}")),
            Ok((status, text)) if status.is_success() => {
                let answer: Value = serde_json::from_str(&text)
                    .unwrap_or_else(|_| panic!("a 2xx answer that is not JSON: {text}"));
                let ack = parse_ack(&answer, Some(OBSERVATION_RECORDED), writer);
                assert_eq!(ack.patient, patient, "{answer}");
                Outcome::Acknowledged(ack)
            }
            Ok((StatusCode::PRECONDITION_FAILED, text)) => Outcome::Stale {
                current: current_version_in(&text),
            },
            Ok((status, text)) => Outcome::Failed(format!("{status}: {text}")),
        }
    }

    /// Records a fixed observation with `Idempotency-Key: key`; returns the answer's body (or
    /// the failure), to compare across attempts.
    pub async fn record_observation_idempotently(
        &self,
        token: &str,
        patient: Uuid,
        key: &str,
    ) -> String {
        let body = json!({
            "code": { "system": "http://loinc.org", "code": "8867-4" },
            "value": { "quantity": { "value": "72", "unit": "/min" } },
            "effective_at": "2026-11-27T08:30:00Z",
        });
        match self
            .send(
                reqwest::Method::POST,
                &format!("/patients/{patient}/record-observation"),
                Some(token),
                Some(&body),
                &[("idempotency-key", key.to_owned())],
            )
            .await
        {
            Ok((status, text)) => format!("{status}: {text}"),
            Err(error) => format!("transport: {error}"),
        }
    }

    /// Every record-history entry, newest first, once the history projection has applied the
    /// log up to `min_position`, page by page.
    pub async fn history(&self, token: &str, patient: Uuid, min_position: u64) -> Vec<Value> {
        let mut entries = Vec::new();
        let mut before = String::new();
        loop {
            let page = self
                .expect(
                    reqwest::Method::GET,
                    &format!(
                        "/patients/{patient}/history?limit=200&min_position={min_position}{before}"
                    ),
                    Some(token),
                    None,
                    StatusCode::OK,
                )
                .await;
            entries.extend(page["entries"].as_array().cloned().unwrap_or_default());
            match page["next_before_version"].as_u64() {
                Some(next) => before = format!("&before_version={next}"),
                None => return entries,
            }
        }
    }

    /// The chart once the chart projection has applied the log up to `min_position`.
    pub async fn chart(&self, token: &str, patient: Uuid, min_position: u64) -> Value {
        self.expect(
            reqwest::Method::GET,
            &format!("/patients/{patient}/chart?min_position={min_position}"),
            Some(token),
            None,
            StatusCode::OK,
        )
        .await
    }
}

fn parse_ack(answer: &Value, event_type: Option<&'static str>, writer: &str) -> Ack {
    let uuid = |field: &str| {
        answer[field]
            .as_str()
            .and_then(|raw| Uuid::parse_str(raw).ok())
            .unwrap_or_else(|| panic!("answer without a {field}: {answer}"))
    };
    let number = |field: &str| {
        answer[field]
            .as_u64()
            .unwrap_or_else(|| panic!("answer without a {field}: {answer}"))
    };
    Ack {
        patient: uuid("patient_id"),
        stream_version: number("stream_version"),
        position: number("position"),
        record_id: uuid("record_id"),
        event_type,
        writer: writer.to_owned(),
    }
}

/// The version a 412 names: "the record is at version N, not the version M named by If-Match".
fn current_version_in(text: &str) -> u64 {
    let body: Value = serde_json::from_str(text).unwrap_or_else(|_| panic!("412 body: {text}"));
    let message = body["message"].as_str().unwrap_or_default();
    message
        .strip_prefix("the record is at version ")
        .and_then(|rest| rest.split(',').next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("a 412 that does not name the current version: {text}"))
}

/// Direct, read-only access to the server's database, for the checker. On SQLite, the log's
/// file and the read models' file next to it.
pub enum Database {
    Sqlite(sqlx::SqlitePool, sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Which SQLite file a query reads; on PostgreSQL both are the one database.
#[derive(Clone, Copy)]
enum File {
    Log,
    ReadModels,
}

/// One row of the global log, in the clear (no PHI: ids, versions, types).
#[derive(Debug, Clone)]
pub struct LogRow {
    pub position: u64,
    pub stream_id: String,
    pub stream_version: u64,
    pub event_type: String,
}

macro_rules! fetch {
    ($db:expr, $file:expr, $sql:expr, |$row:ident| $map:expr) => {
        match $db {
            Database::Sqlite(log, read_models) => {
                use sqlx::Row as _;
                let pool = match $file {
                    File::Log => log,
                    File::ReadModels => read_models,
                };
                sqlx::query($sql)
                    .fetch_all(pool)
                    .await
                    .unwrap_or_else(|error| panic!("{}: {error}", $sql))
                    .iter()
                    .map(|$row| $map)
                    .collect::<Vec<_>>()
            }
            Database::Postgres(pool) => {
                use sqlx::Row as _;
                sqlx::query($sql)
                    .fetch_all(pool)
                    .await
                    .unwrap_or_else(|error| panic!("{}: {error}", $sql))
                    .iter()
                    .map(|$row| $map)
                    .collect::<Vec<_>>()
            }
        }
    };
}

async fn sqlite_pool(file: &Path) -> sqlx::SqlitePool {
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new()
                .filename(file)
                .busy_timeout(Duration::from_secs(30)),
        )
        .await
        .unwrap_or_else(|error| panic!("open the server's SQLite file {}: {error}", file.display()))
}

fn u64_of(value: i64) -> u64 {
    u64::try_from(value).expect("non-negative")
}

impl Database {
    /// The database a server runs on: `database_url`, or the SQLite file in `data_dir`.
    pub async fn open(data_dir: &Path, database_url: Option<&str>) -> Database {
        match database_url {
            Some(url) => Database::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(url)
                    .await
                    .expect("connect to the server's PostgreSQL database"),
            ),
            None => {
                let log = data_dir.join("chartlog.db");
                let read_models = chartlog_store::sqlite::read_models_path(&log);
                Database::Sqlite(sqlite_pool(&log).await, sqlite_pool(&read_models).await)
            }
        }
    }

    pub async fn close(self) {
        match self {
            Database::Sqlite(log, read_models) => {
                log.close().await;
                read_models.close().await;
            }
            Database::Postgres(pool) => pool.close().await,
        }
    }

    /// Runs one statement that damages a read model, for tests of the checker itself.
    pub async fn corrupt(&self, sql: &'static str) {
        match self {
            Database::Sqlite(_, read_models) => {
                sqlx::query(sql).execute(read_models).await.map(|_| ())
            }
            Database::Postgres(pool) => sqlx::query(sql).execute(pool).await.map(|_| ()),
        }
        .unwrap_or_else(|error| panic!("{sql}: {error}"));
    }

    /// The whole global log in position order.
    pub async fn log(&self) -> Vec<LogRow> {
        fetch!(
            self,
            File::Log,
            "SELECT position, stream_id, stream_version, event_type FROM chartlog_events \
             ORDER BY position",
            |row| LogRow {
                position: u64_of(row.get::<i64, _>(0)),
                stream_id: row.get(1),
                stream_version: u64_of(row.get::<i64, _>(2)),
                event_type: row.get(3),
            }
        )
    }

    pub async fn checkpoints(&self) -> BTreeMap<String, u64> {
        fetch!(
            self,
            File::ReadModels,
            "SELECT name, position FROM chartlog_projection_checkpoints",
            |row| (row.get::<String, _>(0), u64_of(row.get::<i64, _>(1)))
        )
        .into_iter()
        .collect()
    }

    /// (patient, stream version, event type) of every change in the record history, from the
    /// clear headers of its segments (`chartlog_projections::history`).
    async fn history_rows(&self) -> Vec<(Uuid, u64, String)> {
        let segments = fetch!(
            self,
            File::ReadModels,
            "SELECT patient_id, headers FROM chartlog_history",
            |row| (row.get::<Uuid, _>(0), row.get::<String, _>(1))
        );
        let mut changes = Vec::new();
        for (patient, headers) in segments {
            let headers: Vec<Value> =
                serde_json::from_str(&headers).expect("a segment's headers are a JSON array");
            for header in headers {
                changes.push((
                    patient,
                    header["stream_version"].as_u64().expect("a version"),
                    header["event_type"]
                        .as_str()
                        .expect("an event type")
                        .to_owned(),
                ));
            }
        }
        changes
    }

    async fn chart_patients(&self) -> BTreeMap<Uuid, u64> {
        fetch!(
            self,
            File::ReadModels,
            "SELECT patient_id, stream_version FROM chartlog_chart_patients",
            |row| (row.get::<Uuid, _>(0), u64_of(row.get::<i64, _>(1)))
        )
        .into_iter()
        .collect()
    }

    async fn chart_observations(&self) -> Vec<(Uuid, Uuid)> {
        fetch!(
            self,
            File::ReadModels,
            "SELECT patient_id, entry_id FROM chartlog_chart_entries WHERE kind = 'observation'",
            |row| (row.get::<Uuid, _>(0), row.get::<Uuid, _>(1))
        )
    }

    async fn deidentified_observations(&self) -> u64 {
        let sql = match self {
            Database::Sqlite(..) => "SELECT COUNT(*) FROM deid_observations",
            Database::Postgres(_) => "SELECT COUNT(*) FROM deidentified.observations",
        };
        fetch!(self, File::ReadModels, sql, |row| u64_of(
            row.get::<i64, _>(0)
        ))[0]
    }

    async fn audit_source_positions(&self) -> Vec<u64> {
        fetch!(
            self,
            File::ReadModels,
            "SELECT source_position FROM chartlog_audit_trail WHERE source_position IS NOT NULL",
            |row| u64_of(row.get::<i64, _>(0))
        )
    }
}

fn patient_of(stream_id: &str) -> Option<Uuid> {
    stream_id
        .strip_prefix("patient-")
        .and_then(|raw| Uuid::parse_str(raw).ok())
}

/// What the log held when checked, for the read-model comparison.
pub struct LogSummary {
    pub patient_events: usize,
}

/// The store's half of the history check, on the log as stored (server up or not):
/// - every stream's versions are 1..=head in position order: no gap, no duplicate, and a
///   stream's events appear in the global log in version order;
/// - positions strictly increase;
/// - every acknowledged command's last event is stored exactly where the answer said (same
///   stream, same version, same type), and no two acknowledgements claim one version or one
///   position: one winner per version.
pub async fn check_log(database: &Database, acks: &[Ack]) -> LogSummary {
    let log = database.log().await;
    assert!(
        log.windows(2).all(|w| w[0].position < w[1].position),
        "global log positions strictly increase"
    );
    let mut heads: HashMap<&str, u64> = HashMap::new();
    for row in &log {
        let head = heads.entry(&row.stream_id).or_insert(0);
        assert_eq!(
            row.stream_version,
            *head + 1,
            "stream {} has version {} at position {} right after version {}: a gap, a \
             duplicate or a version out of log order",
            row.stream_id,
            row.stream_version,
            row.position,
            head
        );
        *head = row.stream_version;
    }

    let by_position: HashMap<u64, &LogRow> = log.iter().map(|row| (row.position, row)).collect();
    let mut claimed_versions: HashMap<(Uuid, u64), &Ack> = HashMap::new();
    let mut claimed_positions: HashMap<u64, &Ack> = HashMap::new();
    for ack in acks {
        let row = by_position.get(&ack.position).unwrap_or_else(|| {
            panic!(
                "acknowledged event is missing: {ack:?} (log holds {} events)",
                log.len()
            )
        });
        assert_eq!(
            (row.stream_id.as_str(), row.stream_version),
            (
                format!("patient-{}", ack.patient).as_str(),
                ack.stream_version
            ),
            "the event at an acknowledged position is not the acknowledged one: {ack:?}"
        );
        if let Some(event_type) = ack.event_type {
            assert_eq!(row.event_type, event_type, "{ack:?}");
        }
        if let Some(other) = claimed_versions.insert((ack.patient, ack.stream_version), ack) {
            panic!("two writers were told they won one version: {other:?} and {ack:?}");
        }
        if let Some(other) = claimed_positions.insert(ack.position, ack) {
            panic!("two acknowledgements name one position: {other:?} and {ack:?}");
        }
    }
    LogSummary {
        patient_events: log
            .iter()
            .filter(|row| patient_of(&row.stream_id).is_some())
            .count(),
    }
}

/// Waits until every projection's checkpoint is at or past `position`. A runner that applied
/// an event twice fails the history's batch (a change that does not follow its segment's last
/// one, or a segment that is already there) and never gets there; one that skipped an event
/// may get there with a change missing, which [`check_read_models`] catches.
pub async fn wait_for_projections(database: &Database, position: u64) -> BTreeMap<String, u64> {
    let deadline = Instant::now() + CONVERGENCE_WAIT;
    loop {
        let checkpoints = database.checkpoints().await;
        let behind: Vec<_> = PROJECTIONS
            .iter()
            .filter(|name| checkpoints.get(**name).is_none_or(|at| *at < position))
            .collect();
        if behind.is_empty() {
            return checkpoints;
        }
        assert!(
            Instant::now() < deadline,
            "projections {behind:?} never reached position {position} within \
             {CONVERGENCE_WAIT:?}: checkpoints {checkpoints:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The read models' half, once every projection has passed the log's end (server running):
/// for every patient stream in the log,
/// - the record history holds exactly the stream's events: one change per version, 1..=head,
///   each with the stored event's type (a skipped event is a missing change, a re-applied one
///   a refused batch that stalls the checkpoint);
/// - the chart's folded version is the head (an event applied out of order leaves it behind);
/// - the chart holds the latest observation of the one code the tests record, and the
///   de-identified view one row per observation event;
/// - the audit trail has exactly one row per patient event, by source position;
/// - through HTTP, read at the last acknowledged position, the record history lists every
///   acknowledged observation exactly once at its acknowledged version, and the chart shows
///   the head version and the latest observation.
pub async fn check_read_models(
    database: &Database,
    clinic: &Clinic,
    token: &str,
    acks: &[Ack],
    patients: &[Uuid],
) {
    let log = database.log().await;
    let last = log.last().map_or(0, |row| row.position);
    wait_for_projections(database, last).await;

    let mut streams: BTreeMap<Uuid, Vec<&LogRow>> = BTreeMap::new();
    for row in &log {
        if let Some(patient) = patient_of(&row.stream_id) {
            streams.entry(patient).or_default().push(row);
        }
    }
    let mut history: BTreeMap<Uuid, Vec<(u64, String)>> = BTreeMap::new();
    for (patient, version, event_type) in database.history_rows().await {
        history
            .entry(patient)
            .or_default()
            .push((version, event_type));
    }
    let chart_patients = database.chart_patients().await;
    let mut chart_observations: BTreeMap<Uuid, usize> = BTreeMap::new();
    for (patient, _) in database.chart_observations().await {
        *chart_observations.entry(patient).or_default() += 1;
    }
    let mut observation_events = 0;
    for (patient, events) in &streams {
        let expected: Vec<(u64, String)> = events
            .iter()
            .map(|row| (row.stream_version, row.event_type.clone()))
            .collect();
        let mut got = history.remove(patient).unwrap_or_default();
        got.sort();
        assert_eq!(
            got.len(),
            expected.len(),
            "record history of {patient}: {} rows for {} events",
            got.len(),
            expected.len()
        );
        assert_eq!(
            got, expected,
            "record history of {patient} differs from its stream"
        );
        let head = events.last().map_or(0, |row| row.stream_version);
        assert_eq!(
            chart_patients.get(patient).copied(),
            Some(head),
            "chart of {patient} folded to another version than the stream's head"
        );
        let observations = events
            .iter()
            .filter(|row| row.event_type == OBSERVATION_RECORDED)
            .count();
        observation_events += observations;
        // The chart keeps the latest observation per code, and the tests record one code.
        assert_eq!(
            chart_observations.get(patient).copied().unwrap_or(0),
            observations.min(1),
            "chart observations of {patient}: one entry for the one code observed"
        );
    }
    assert!(
        history.is_empty(),
        "record history for patients with no stream: {:?}",
        history.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        database.deidentified_observations().await,
        observation_events as u64,
        "de-identified observations vs observation events in the log"
    );

    let patient_positions: BTreeSet<u64> =
        streams.values().flatten().map(|row| row.position).collect();
    let mut audited = BTreeMap::<u64, usize>::new();
    for position in database.audit_source_positions().await {
        if patient_positions.contains(&position) {
            *audited.entry(position).or_default() += 1;
        }
    }
    let missing: Vec<_> = patient_positions
        .iter()
        .filter(|position| !audited.contains_key(position))
        .take(5)
        .collect();
    assert!(
        missing.is_empty(),
        "patient events without an audit row, first positions {missing:?}"
    );
    assert!(
        audited.values().all(|count| *count == 1),
        "an event audited twice"
    );

    let last_ack = acks.iter().map(|ack| ack.position).max().unwrap_or(0);
    for patient in patients {
        let acknowledged: Vec<&Ack> = acks
            .iter()
            .filter(|ack| ack.patient == *patient && ack.event_type == Some(OBSERVATION_RECORDED))
            .collect();
        let mut listed: HashMap<Uuid, Vec<u64>> = HashMap::new();
        for entry in clinic.history(token, *patient, last_ack).await {
            if entry["event_type"] == OBSERVATION_RECORDED {
                let id = entry["entry_id"]
                    .as_str()
                    .and_then(|raw| Uuid::parse_str(raw).ok())
                    .expect("history entry id");
                let version = entry["stream_version"].as_u64().expect("entry version");
                listed.entry(id).or_default().push(version);
            }
        }
        for ack in &acknowledged {
            assert_eq!(
                listed.get(&ack.record_id).map(Vec::as_slice),
                Some([ack.stream_version].as_slice()),
                "acknowledged observation missing from the record history, or not exactly \
                 once at its version: {ack:?}"
            );
        }

        let head = streams
            .get(patient)
            .and_then(|events| events.last())
            .map_or(0, |row| row.stream_version);
        let chart = clinic.chart(token, *patient, last_ack).await;
        assert_eq!(chart["stream_version"].as_u64(), Some(head), "{patient}");
        // One code, one effective time: the chart shows the last one recorded. When that one
        // was acknowledged, its id is known.
        let last_observation = streams.get(patient).and_then(|events| {
            events
                .iter()
                .rev()
                .find(|row| row.event_type == OBSERVATION_RECORDED)
        });
        let shown: Vec<&str> = chart["observations"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|observation| observation["observation_id"].as_str())
            .collect();
        assert_eq!(
            shown.len(),
            usize::from(last_observation.is_some()),
            "chart of {patient}: observations {shown:?}"
        );
        if let Some(last) = last_observation
            && let Some(ack) = acknowledged
                .iter()
                .find(|ack| ack.position == last.position)
        {
            assert_eq!(
                shown,
                [ack.record_id.to_string().as_str()],
                "chart of {patient} does not show the latest observation"
            );
        }
    }
}
