//! Backup and restore end to end, against the built binary.
//!
//! Each test seeds a SQLite store with real patient streams (synthetic commands decided,
//! sealed under each patient's data key and signed with the data directory's own key files),
//! then runs `chartlog backup`, `chartlog restore` and `chartlog rebuild` as an operator would.
//!
//! The round trips use 2,000 events by default (the issue's figure is 100,000); set
//! `CHARTLOG_BACKUP_TEST_EVENTS` to run them at another size, e.g.
//! `CHARTLOG_BACKUP_TEST_EVENTS=100000 cargo test --release --test backup`.

#[allow(dead_code)]
#[path = "support/api_client.rs"]
mod api_client;
#[allow(dead_code)]
#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/fresh_postgres.rs"]
mod fresh_postgres;
#[allow(dead_code)]
mod support;

use fresh_postgres::FreshPostgresDatabase;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use chartlog_crypto::{
    DataKey, DataKeyId, DataKeys, EventHash, EventHeader, EventSigner, INDEX_KEY_FILE_NAME,
    KeyError, KeyRing, KeyStore, SIGNING_FILE_NAME, SealedEvent, SigningKeys,
    load_or_create_key_files, load_or_create_mac_key, seal_event,
};
use chartlog_domain::patient::ErasureReason;
use chartlog_domain::{
    Actor, EventId, Patient, PatientCommand, PatientId, PurposeOfUse, Role, StreamId, Timestamp,
    UserId, codec, decide, evolve, synthetic,
};
use chartlog_projections::chart::{ChartAnswer, read_chart};
use chartlog_projections::db::ProjectionDb;
use chartlog_projections::deid::DEID_KEY_FILE_NAME;
use chartlog_projections::history::{HistoryAnswer, read_history};
use chartlog_store::postgres::PostgresKeyStore;
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::{EVENTS_PER_APPEND_MAX, EventStore, PatientLedger};
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tempfile::TempDir;
use uuid::Uuid;

/// Events in the round trips unless `CHARTLOG_BACKUP_TEST_EVENTS` says otherwise.
const ROUND_TRIP_EVENTS_DEFAULT: usize = 2_000;
const EVENTS_PER_PATIENT: usize = 100;

fn round_trip_events() -> usize {
    std::env::var("CHARTLOG_BACKUP_TEST_EVENTS")
        .ok()
        .and_then(|raw| raw.parse().ok())
        .unwrap_or(ROUND_TRIP_EVENTS_DEFAULT)
}

fn at() -> Timestamp {
    Timestamp::from_unix_micros(1_763_000_000_000_000).expect("in range")
}

fn physician() -> Actor {
    Actor {
        user_id: UserId::from_uuid(Uuid::from_u128(7)),
        role: Role::Physician,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    }
}

// ---- The binary ---------------------------------------------------------------------------

fn chartlog(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .args(args)
        // The tests choose the database; never inherit the developer's.
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR")
        .env_remove("CHARTLOG_KEK")
        .env("CHARTLOG_LOG", "warn")
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .expect("run the chartlog binary")
}

/// Runs chartlog, expects success, returns stdout.
fn succeeds(args: &[&str]) -> String {
    let output = chartlog(args);
    assert!(
        output.status.success(),
        "chartlog {args:?} failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 stdout")
}

/// Runs chartlog, expects exit status 1, returns stderr.
fn fails(args: &[&str]) -> String {
    let output = chartlog(args);
    assert_eq!(
        output.status.code(),
        Some(1),
        "chartlog {args:?} should fail with status 1; stdout: {}; stderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stderr).expect("UTF-8 stderr")
}

fn json(stdout: &str) -> Value {
    serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("not JSON: {stdout}"))
}

fn path(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

// ---- Data directories ---------------------------------------------------------------------

struct Site {
    data_dir: PathBuf,
}

impl Site {
    fn new(parent: &TempDir, name: &str) -> Site {
        let data_dir = parent.path().join(name);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .expect("data dir");
        Site { data_dir }
    }

    fn arg(&self) -> &str {
        path(&self.data_dir)
    }

    fn database(&self) -> PathBuf {
        self.data_dir.join("chartlog.db")
    }

    fn key_dir(&self) -> PathBuf {
        self.data_dir.join("keys")
    }

    /// A new site holding a copy of this one's key files (what the key backup restores).
    fn with_same_keys(&self, parent: &TempDir, name: &str) -> Site {
        self.with_key_files(parent, name, true)
    }

    /// [`Site::with_same_keys`] without the key directory's erasure ledger, or whatever is
    /// in its place.
    fn with_same_keys_but_the_ledger(&self, parent: &TempDir, name: &str) -> Site {
        self.with_key_files(parent, name, false)
    }

    fn with_key_files(&self, parent: &TempDir, name: &str, ledger: bool) -> Site {
        let site = Site::new(parent, name);
        fs::DirBuilder::new()
            .mode(0o700)
            .create(site.key_dir())
            .expect("key dir");
        for entry in fs::read_dir(self.key_dir()).expect("key files") {
            let entry = entry.expect("key file");
            if !ledger && entry.file_name() == "erasure-ledger.jsonl" {
                continue;
            }
            let to = site.key_dir().join(entry.file_name());
            fs::copy(entry.path(), &to).expect("copy a key file");
            fs::set_permissions(&to, fs::Permissions::from_mode(0o600)).expect("0600");
        }
        site
    }

    /// Every key file a server and a rebuild use, made now so that copies share them.    /// Every key file a server and a rebuild use, made now so that copies share them.
    fn make_keys(&self) -> (KeyRing, SigningKeys) {
        let keys = load_or_create_key_files(&self.key_dir()).expect("key files");
        load_or_create_mac_key(&self.key_dir(), INDEX_KEY_FILE_NAME).expect("index key");
        load_or_create_mac_key(&self.key_dir(), DEID_KEY_FILE_NAME).expect("deid key");
        keys
    }

    async fn pool(&self) -> SqlitePool {
        open_sqlite(&self.database()).await
    }

    /// The file the read models live in, next to the log.
    async fn read_models(&self) -> SqlitePool {
        open_sqlite(&chartlog_store::sqlite::read_models_path(&self.database())).await
    }

    fn add_user(&self, username: &str, role: &str) {
        succeeds(&[
            "users",
            "add",
            "--data-dir",
            self.arg(),
            "--username",
            username,
            "--role",
            role,
        ]);
    }

    fn rebuild(&self, extra: &[&str]) {
        let mut args = vec!["rebuild", "--data-dir", self.arg()];
        args.extend_from_slice(extra);
        succeeds(&args);
    }
}

fn seal_patient(
    seed: u64,
    events: usize,
    key_id: DataKeyId,
    key: &DataKey,
    signer: &EventSigner,
) -> Vec<SealedEvent> {
    let stream = StreamId::patient(synthetic::patient_id(seed));
    let commands = std::iter::once(synthetic::registration(seed))
        .chain((0..).map(|n| synthetic::clinical_command(seed, n, at())));
    let mut state = Patient::default();
    let mut prev_hash = EventHash::GENESIS;
    let mut sealed = Vec::with_capacity(events);
    for command in commands {
        if sealed.len() >= events {
            break;
        }
        for event in decide(&state, command, at()).expect("synthetic commands are accepted") {
            state = evolve(state, &event);
            let encoded = codec::encode(&event);
            let header = EventHeader {
                stream_id: stream.clone(),
                stream_version: sealed.len() as u64 + 1,
                event_id: EventId::from_uuid(Uuid::now_v7()),
                event_type: encoded.event_type.to_owned(),
                schema_version: encoded.schema_version,
                recorded_at: at(),
                actor: physician(),
                key_id,
                prev_hash,
                signer_key_id: signer.key_id().clone(),
            };
            let event = seal_event(signer, key, header, &encoded.payload);
            prev_hash = event.hash;
            sealed.push(event);
        }
    }
    sealed
}

/// Fills the site's SQLite store with `events` events of real patient streams, interleaved
/// across patients in the global log; returns the patients.
async fn seed(site: &Site, events: usize) -> Vec<PatientId> {
    let (ring, signing) = site.make_keys();
    let store = SqliteEventStore::open(&site.database())
        .await
        .expect("open");
    let keys = DataKeys::new(Arc::new(ring), SqliteKeyStore::new(store.pool().clone()));
    let patients = events.div_ceil(EVENTS_PER_PATIENT) as u64;
    let mut streams = Vec::new();
    for seed in 0..patients {
        let stream = StreamId::patient(synthetic::patient_id(seed));
        let (key_id, key) = keys.key_for_append(&stream).await.expect("data key");
        let wanted = EVENTS_PER_PATIENT.min(events - streams.len() * EVENTS_PER_PATIENT);
        streams.push((
            stream,
            seal_patient(seed, wanted, key_id, &key, signing.active()),
        ));
    }
    // Round-robin batches, so streams interleave in the global log.
    let batch = 10.min(EVENTS_PER_APPEND_MAX);
    let mut offset = 0;
    loop {
        let mut appended = false;
        for (stream, sealed) in &streams {
            if offset < sealed.len() {
                let end = (offset + batch).min(sealed.len());
                store
                    .append(stream, offset as u64, &sealed[offset..end])
                    .await
                    .expect("append");
                appended = true;
            }
        }
        if !appended {
            break;
        }
        offset += batch;
    }
    store.pool().close().await;
    (0..patients).map(synthetic::patient_id).collect()
}

/// Erases a patient through the command path: the tombstone event, then the key destroyed.
async fn erase(site: &Site, patient: PatientId) {
    let (ring, signing) = load_or_create_key_files(&site.key_dir()).expect("key files");
    let store = SqliteEventStore::open(&site.database())
        .await
        .expect("open");
    let keys = DataKeys::new(Arc::new(ring), SqliteKeyStore::new(store.pool().clone()));
    let ledger = PatientLedger::new(
        Arc::new(store.clone()),
        Arc::new(keys),
        Arc::clone(signing.active()),
        Arc::new(signing.verifier()),
    );
    ledger
        .execute(
            patient,
            PatientCommand::ErasePatient {
                reason: ErasureReason::PatientRequest,
            },
            physician(),
            at(),
        )
        .await
        .expect("erase");
    store.pool().close().await;
}

// ---- Backups ------------------------------------------------------------------------------

struct BackupKey {
    identity: PathBuf,
    recipient: String,
}

fn backup_key(dir: &TempDir) -> BackupKey {
    let identity = dir.path().join("backup-identity.txt");
    let answer = json(&succeeds(&[
        "backup",
        "--generate-identity",
        path(&identity),
        "--json",
    ]));
    let mode = fs::metadata(&identity)
        .expect("identity")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the identity file is private");
    BackupKey {
        identity,
        recipient: answer["recipient"].as_str().expect("recipient").to_owned(),
    }
}

fn backup(site: &Site, key: &BackupKey, file: &Path, extra: &[&str]) -> Value {
    let mut args = vec![
        "backup",
        "--data-dir",
        site.arg(),
        "--recipient",
        &key.recipient,
        "--json",
    ];
    args.extend_from_slice(extra);
    args.push(path(file));
    json(&succeeds(&args))
}

fn restore_args<'a>(
    site: &'a Site,
    key: &'a BackupKey,
    file: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "restore",
        "--data-dir",
        site.arg(),
        "--identity",
        path(&key.identity),
        "--json",
    ];
    args.extend_from_slice(extra);
    args.push(path(file));
    args
}

fn restore(site: &Site, key: &BackupKey, file: &Path, extra: &[&str]) -> Value {
    json(&succeeds(&restore_args(site, key, file, extra)))
}

/// The backup's plaintext (JSON lines), decrypted as `age -d` would.
fn decrypt(key: &BackupKey, file: &Path) -> String {
    let identities = age::IdentityFile::from_file(path(&key.identity).to_owned())
        .expect("identity file")
        .into_identities()
        .expect("identities");
    let encrypted = fs::read(file).expect("backup");
    let decryptor = age::Decryptor::new(&encrypted[..]).expect("an age file");
    let mut reader = decryptor
        .decrypt(
            identities
                .iter()
                .map(|identity| identity.as_ref() as &dyn age::Identity),
        )
        .expect("decrypt");
    let mut plaintext = String::new();
    reader.read_to_string(&mut plaintext).expect("read");
    plaintext
}

fn encrypt(key: &BackupKey, plaintext: &str, file: &Path) {
    let recipient: age::x25519::Recipient = key.recipient.parse().expect("recipient");
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
            .expect("encryptor");
    let mut encrypted = Vec::new();
    let mut writer = encryptor.wrap_output(&mut encrypted).expect("wrap");
    writer.write_all(plaintext.as_bytes()).expect("write");
    writer.finish().expect("finish");
    fs::write(file, encrypted).expect("write the backup");
}

/// The manifest line's record and the manifest it carries.
fn manifest_of(plaintext: &str) -> (Value, Value) {
    let line = plaintext.lines().last().expect("a manifest line");
    let record = json(line);
    assert_eq!(record["record"], "manifest");
    let manifest = json(record["manifest"].as_str().expect("manifest text"));
    (record, manifest)
}

fn replace_manifest(plaintext: &str, manifest: &Value, signature: &str) -> String {
    let mut lines: Vec<String> = plaintext.lines().map(str::to_owned).collect();
    let record = serde_json::json!({
        "record": "manifest",
        "manifest": manifest.to_string(),
        "signature": signature,
    });
    *lines.last_mut().expect("lines") = record.to_string();
    lines.join("\n") + "\n"
}

fn sign_manifest(site: &Site, manifest: &Value) -> String {
    let signing = SigningKeys::load(&site.key_dir().join(SIGNING_FILE_NAME)).expect("signing keys");
    let signature = signing
        .active()
        .sign_manifest(manifest.to_string().as_bytes());
    signature
        .as_bytes()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

// ---- Comparisons --------------------------------------------------------------------------

/// Every row of a SQLite table as text (`quote()` of each column), in `order`.
async fn dump(pool: &SqlitePool, table: &str, columns: &[&str], order: &str) -> Vec<String> {
    let select: Vec<String> = columns.iter().map(|c| format!("quote({c})")).collect();
    let sql = format!(
        "SELECT {} FROM {table} WHERE {} ORDER BY {order}",
        select.join(" || '|' || "),
        not_an_operator_record(table)
    );
    sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_all(pool)
        .await
        .unwrap_or_else(|error| panic!("dump {table}: {error}"))
}

/// Each backup, restore and rebuild records itself in the store it ran against (an audit
/// stream of its own, and the row it folds into), after its work: source and copy differ by
/// exactly those records, which the comparisons leave out. The audit rows of the patients'
/// own events are compared.
fn not_an_operator_record(table: &str) -> &'static str {
    match table {
        "chartlog_events" | "chartlog_streams" => "stream_id NOT LIKE 'audit-%'",
        "chartlog_data_keys" => "owner_stream_id NOT LIKE 'audit-%'",
        "chartlog_audit_trail" => "coalesce(entity, '') NOT IN ('backup', 'read_models')",
        _ => "1 = 1",
    }
}

const EVENT_COLUMNS: &[&str] = &[
    "position",
    "stream_id",
    "stream_version",
    "event_id",
    "event_type",
    "schema_version",
    "recorded_at_us",
    "actor_user_id",
    "actor_role",
    "purpose_of_use",
    "break_glass",
    "data_key_id",
    "signer_key_id",
    "prev_hash",
    "hash",
    "signature",
    "ciphertext",
];

/// What a backup carries, table by table: equal rows mean an identical log, heads, keys,
/// ledger, accounts and audit trail.
const LOG_TABLES: &[(&str, &[&str], &str)] = &[
    ("chartlog_events", EVENT_COLUMNS, "position"),
    (
        "chartlog_streams",
        &["stream_id", "version", "head_hash"],
        "stream_id",
    ),
    (
        "chartlog_data_keys",
        &[
            "owner_stream_id",
            "key_id",
            "kek_id",
            "wrapped_key",
            "created_at_us",
            "destroyed_at_us",
        ],
        "owner_stream_id",
    ),
    (
        "chartlog_access_users",
        &[
            "user_id",
            "username",
            "role",
            "patient_id",
            "password_hash",
            "must_change_password",
            "disabled",
            "totp_sealed",
            "totp_pending_sealed",
            "totp_last_step",
            "created_at_us",
            "password_changed_at_us",
            "last_login_at_us",
            "disabled_at_us",
        ],
        "user_id",
    ),
    (
        "chartlog_access_password_history",
        &["user_id", "generation", "password_hash", "set_at_us"],
        "user_id, generation",
    ),
];

/// The read models, less the sealed columns (sealing is randomized; their contents are
/// compared opened, through `read_chart` and `read_history`).
const READ_MODEL_TABLES: &[(&str, &[&str], &str)] = &[
    (
        "chartlog_projection_checkpoints",
        // Not the position: each side's last event is its own backup, restore or rebuild
        // record.
        &["name", "version"],
        "name",
    ),
    (
        "chartlog_chart_patients",
        &["patient_id", "stream_version", "erased_at_us"],
        "patient_id",
    ),
    (
        "chartlog_chart_entries",
        &["patient_id", "kind", "entry_id", "stream_version"],
        "patient_id, kind, entry_id",
    ),
    (
        "chartlog_chart_lookups",
        &["patient_id", "kind", "digest"],
        "patient_id, kind",
    ),
    (
        "chartlog_history",
        &["patient_id", "first_version", "last_version", "headers"],
        "patient_id, first_version",
    ),
    (
        "chartlog_history_entries",
        &["patient_id", "kind", "entry_id"],
        "patient_id, kind, entry_id",
    ),
    (
        "deid_patients",
        &[
            "pseudonym",
            "birth_year",
            "aged_90_or_over",
            "sex",
            "state",
            "zip3",
        ],
        "pseudonym",
    ),
    (
        "deid_observations",
        &[
            "row_key",
            "pseudonym",
            "year",
            "code_system",
            "code",
            "value_kind",
            "value",
            "unit",
            "value_code_system",
            "value_code",
        ],
        "row_key",
    ),
    (
        "deid_conditions",
        &[
            "row_key",
            "pseudonym",
            "code_system",
            "code",
            "onset_year",
            "resolved_year",
        ],
        "row_key",
    ),
    (
        "deid_medication_orders",
        &[
            "row_key",
            "pseudonym",
            "year",
            "code_system",
            "code",
            "dose_value",
            "dose_unit",
            "route",
            "frequency",
            "discontinued_year",
        ],
        "row_key",
    ),
    (
        "deid_allergies",
        &[
            "row_key",
            "pseudonym",
            "substance_system",
            "substance_code",
            "criticality",
            "reaction",
        ],
        "row_key",
    ),
    (
        "chartlog_audit_trail",
        &[
            "audit_id",
            "source_position",
            "trail_position",
            "occurred_at_max_us",
            "occurred_at_us",
            "user_id",
            "role",
            "purpose_of_use",
            "break_glass",
            "patient_id",
            "entity",
            "record_id",
            "action",
            "outcome",
            "client_address",
            "event_type",
        ],
        "audit_id",
    ),
];

async fn assert_same_tables(
    expected: &SqlitePool,
    actual: &SqlitePool,
    tables: &[(&str, &[&str], &str)],
) {
    for (table, columns, order) in tables {
        let want = dump(expected, table, columns, order).await;
        let got = dump(actual, table, columns, order).await;
        assert_eq!(want.len(), got.len(), "{table}: row counts differ");
        assert!(want == got, "{table}: rows differ");
    }
}

/// The global log's hashes in position order, hex.
async fn sqlite_log_hashes(pool: &SqlitePool) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT position, lower(hex(hash)) FROM chartlog_events \
         WHERE stream_id NOT LIKE 'audit-%' ORDER BY position",
    )
    .fetch_all(pool)
    .await
    .expect("hashes")
}

async fn open_sqlite(file: &Path) -> SqlitePool {
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(SqliteConnectOptions::new().filename(file))
        .await
        .unwrap_or_else(|error| panic!("open {}: {error}", file.display()))
}

fn sqlite_keys(site: &Site, pool: &SqlitePool) -> DataKeys<SqliteKeyStore> {
    let (ring, _) = load_or_create_key_files(&site.key_dir()).expect("key files");
    DataKeys::new(Arc::new(ring), SqliteKeyStore::new(pool.clone()))
}

/// The charts and histories of `patients`, opened: what a clinician would read.
async fn read_models<K: KeyStore>(
    db: &ProjectionDb,
    keys: &DataKeys<K>,
    patients: &[PatientId],
) -> Vec<(ChartAnswer, HistoryAnswer)> {
    let mut answers = Vec::new();
    for patient in patients {
        let chart = read_chart(db, keys, *patient).await.expect("read chart");
        let history = read_history(db, keys, *patient, None, 1_000)
            .await
            .expect("read history");
        answers.push((chart, history));
    }
    answers
}

/// Source and restored copy hold the same log, key table, accounts, and (after a rebuild of
/// each) the same read models.
async fn assert_identical_sites(source: &Site, copy: &Site, patients: &[PatientId]) {
    let expected = source.pool().await;
    let actual = copy.pool().await;
    assert_eq!(
        sqlite_log_hashes(&expected).await,
        sqlite_log_hashes(&actual).await,
        "the global log's hashes differ"
    );
    assert_same_tables(&expected, &actual, LOG_TABLES).await;
    let expected_models = source.read_models().await;
    let actual_models = copy.read_models().await;
    assert_same_tables(&expected_models, &actual_models, READ_MODEL_TABLES).await;
    let want = read_models(
        &ProjectionDb::Sqlite(expected_models.clone()),
        &sqlite_keys(source, &expected),
        patients,
    )
    .await;
    let got = read_models(
        &ProjectionDb::Sqlite(actual_models.clone()),
        &sqlite_keys(copy, &actual),
        patients,
    )
    .await;
    assert!(
        want.iter()
            .all(|(chart, _)| matches!(chart, ChartAnswer::Found(_))),
        "every seeded patient has a chart"
    );
    assert!(want == got, "the opened charts and histories differ");
    expected.close().await;
    actual.close().await;
    expected_models.close().await;
    actual_models.close().await;
}

async fn count(pool: &SqlitePool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .expect("count")
}

// ---- Tests --------------------------------------------------------------------------------

/// What the operator's commands in [`source_site`] add to its log: the audit records of the
/// two accounts' creation and of the rebuild, each one event on an audit stream of its own,
/// with its own data key. A backup of the source holds them.
const SOURCE_OPERATOR_RECORDS: usize = 3;

/// Seeds a source with `events` events, two accounts and rebuilt read models.
async fn source_site(dir: &TempDir, events: usize) -> (Site, Vec<PatientId>) {
    let source = Site::new(dir, "source");
    let patients = seed(&source, events).await;
    source.add_user("dr.grey", "physician");
    source.add_user("audrey.auditor", "auditor");
    source.rebuild(&[]);
    (source, patients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_round_trip_keeps_the_log_hashes_and_the_read_models() {
    let events = round_trip_events();
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, patients) = source_site(&dir, events).await;
    let file = dir.path().join("source.age");

    let backed_up = backup(&source, &key, &file, &[]);
    assert_eq!(backed_up["events"], events + SOURCE_OPERATOR_RECORDS);
    assert_eq!(
        backed_up["streams"],
        patients.len() + SOURCE_OPERATOR_RECORDS
    );
    assert_eq!(backed_up["rows"]["chartlog_access_users"], 2);
    let mode = fs::metadata(&file).expect("backup").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the backup file is private");
    // Encrypted: no clear JSON, no stream id.
    let raw = fs::read(&file).expect("backup");
    assert!(raw.starts_with(b"age-encryption.org/v1"));
    assert!(!String::from_utf8_lossy(&raw).contains("patient-"));

    // Every table is in the backup or derived from what is (read models, bookkeeping).
    let plaintext = decrypt(&key, &file);
    let header = json(plaintext.lines().next().expect("a header"));
    assert_eq!(header["format"], "chartlog-backup");
    let backed_up_tables: Vec<&str> = header["tables"]
        .as_array()
        .expect("tables")
        .iter()
        .map(|table| table["name"].as_str().expect("name"))
        .collect();
    let pool = source.pool().await;
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .fetch_all(&pool)
            .await
            .expect("tables");
    pool.close().await;
    for table in &tables {
        // Snapshots are a cache of the fold: the first load after a restore takes them anew.
        // Spent identity-provider tokens matter for minutes: any restored token is too old.
        let derived = READ_MODEL_TABLES.iter().any(|(name, _, _)| name == table)
            || [
                "sqlite_sequence",
                "_sqlx_migrations",
                "chartlog_snapshots",
                "chartlog_access_sso_tokens",
            ]
            .contains(&table.as_str());
        assert!(
            derived || backed_up_tables.contains(&table.as_str()),
            "table {table} is neither backed up nor rebuilt from the log: add it to TABLES in \
             src/backup.rs, or to READ_MODEL_TABLES here if a rebuild derives it"
        );
    }
    // Every column of a table backed up is in the backup: a column added by a migration and
    // left out of TABLES would come back empty after a restore.
    let pool = source.pool().await;
    for table in header["tables"].as_array().expect("tables") {
        let name = table["name"].as_str().expect("name");
        let mut backed_up: Vec<&str> = table["columns"]
            .as_array()
            .expect("columns")
            .iter()
            .map(|column| column.as_str().expect("column"))
            .collect();
        backed_up.sort_unstable();
        let mut in_schema: Vec<String> =
            sqlx::query_scalar("SELECT name FROM pragma_table_info(?1) ORDER BY name")
                .bind(name)
                .fetch_all(&pool)
                .await
                .expect("columns");
        in_schema.sort_unstable();
        assert_eq!(backed_up, in_schema, "the columns of {name}");
    }
    pool.close().await;

    let copy = source.with_same_keys(&dir, "copy");
    let restored = restore(&copy, &key, &file, &[]);
    assert_eq!(restored["events"], events + SOURCE_OPERATOR_RECORDS);
    assert_eq!(
        restored["verified_events"],
        events + SOURCE_OPERATOR_RECORDS
    );
    assert_eq!(restored["root_hash"], backed_up["root_hash"]);
    assert_eq!(
        restored["data_keys_restored"],
        patients.len() + SOURCE_OPERATOR_RECORDS
    );
    copy.rebuild(&[]);

    assert_identical_sites(&source, &copy, &patients).await;
    eprintln!(
        "figures: {events} events, SQLite: backup {:.2} s ({} bytes), restore with verification \
         {:.2} s (debug build unless run with --release)",
        backed_up["seconds"].as_f64().unwrap_or(0.0),
        backed_up["bytes"],
        restored["seconds"].as_f64().unwrap_or(0.0),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_backup_restores_into_postgres_and_back() {
    let events = round_trip_events();
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, patients) = source_site(&dir, events).await;
    let first = dir.path().join("from-sqlite.age");
    let backed_up = backup(&source, &key, &first, &[]);

    // SQLite -> PostgreSQL.
    let database = FreshPostgresDatabase::create().await;
    let postgres = source.with_same_keys(&dir, "postgres");
    let url = ["--database-url", database.url.as_str()];
    let restored = restore(&postgres, &key, &first, &url);
    assert_eq!(
        restored["verified_events"],
        events + SOURCE_OPERATOR_RECORDS
    );
    assert_eq!(restored["root_hash"], backed_up["root_hash"]);
    postgres.rebuild(&url);

    let pool = sqlx::PgPool::connect(&database.url).await.expect("connect");
    let pg_hashes: Vec<(i64, String)> = sqlx::query_as(
        "SELECT position, encode(hash, 'hex') FROM chartlog_events \
         WHERE stream_id NOT LIKE 'audit-%' ORDER BY position",
    )
    .fetch_all(&pool)
    .await
    .expect("hashes");
    let sqlite_pool = source.pool().await;
    assert_eq!(
        pg_hashes,
        sqlite_log_hashes(&sqlite_pool).await,
        "PostgreSQL holds the same log, at the same positions"
    );
    let (ring, _) = load_or_create_key_files(&postgres.key_dir()).expect("key files");
    let pg_keys = DataKeys::new(Arc::new(ring), PostgresKeyStore::new(pool.clone()));
    let on_postgres = read_models(&ProjectionDb::Postgres(pool.clone()), &pg_keys, &patients).await;
    let on_sqlite = read_models(
        &ProjectionDb::Sqlite(source.read_models().await),
        &sqlite_keys(&source, &sqlite_pool),
        &patients,
    )
    .await;
    assert!(on_postgres == on_sqlite, "PostgreSQL's read models differ");
    pool.close().await;
    sqlite_pool.close().await;

    // PostgreSQL -> SQLite.
    let second = dir.path().join("from-postgres.age");
    let mut args = vec![
        "backup",
        "--data-dir",
        postgres.arg(),
        "--database-url",
        database.url.as_str(),
        "--recipient",
        key.recipient.as_str(),
        "--json",
    ];
    args.push(path(&second));
    let backed_up_again = json(&succeeds(&args));
    assert_eq!(backed_up_again["source_backend"], "postgres");
    // PostgreSQL's log is the source's plus its own audit records: the restore's, then the
    // rebuild's.
    assert_eq!(
        backed_up_again["events"].as_u64(),
        backed_up["events"].as_u64().map(|events| events + 2)
    );

    let back = source.with_same_keys(&dir, "back");
    let restored = restore(&back, &key, &second, &[]);
    assert_eq!(
        restored["verified_events"].as_u64(),
        Some((events + SOURCE_OPERATOR_RECORDS + 2) as u64)
    );
    back.rebuild(&[]);
    assert_identical_sites(&source, &back, &patients).await;
    database.drop().await;
}

/// The patient's key row is a tombstone, and after a rebuild their chart reads as erased
/// while another patient's reads as before.
async fn assert_erased(site: &Site, erased: PatientId, kept: PatientId) {
    let pool = site.pool().await;
    let wrapped: Option<Vec<u8>> =
        sqlx::query_scalar("SELECT wrapped_key FROM chartlog_data_keys WHERE owner_stream_id = ?1")
            .bind(StreamId::patient(erased).as_str())
            .fetch_one(&pool)
            .await
            .expect("the erased patient's key row");
    assert!(
        wrapped.is_none(),
        "the key is not restored, only its tombstone"
    );
    site.rebuild(&[]);
    let keys = sqlite_keys(site, &pool);
    let models = site.read_models().await;
    let db = ProjectionDb::Sqlite(models.clone());
    assert!(
        matches!(
            keys.key_for_read(&StreamId::patient(erased)).await,
            Err(KeyError::Erased { .. })
        ),
        "the erased patient's key is destroyed"
    );
    // Without the tombstone event (an older backup) the chart has no row for the patient;
    // with it, the chart says erased. Either way nothing of theirs can be read.
    assert!(
        matches!(
            read_chart(&db, &keys, erased).await.expect("chart"),
            ChartAnswer::Erased { .. } | ChartAnswer::NotFound
        ),
        "the erased patient's chart cannot be read"
    );
    assert!(
        matches!(
            read_history(&db, &keys, erased, None, 100)
                .await
                .expect("history"),
            HistoryAnswer::Erased { .. }
        ),
        "the erased patient's history reads as erased"
    );
    let entries: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chartlog_chart_entries WHERE patient_id = ?1")
            .bind(erased.as_uuid())
            .fetch_one(&models)
            .await
            .expect("count");
    assert_eq!(entries, 0, "no chart entry of the erased patient");
    assert!(matches!(
        read_chart(&db, &keys, kept).await.expect("chart"),
        ChartAnswer::Found(_)
    ));
    pool.close().await;
    models.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_patient_stays_erased_when_an_older_backup_is_restored() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, patients) = source_site(&dir, 200).await;
    let (erased, kept) = (patients[0], patients[1]);
    let older = dir.path().join("before-erasure.age");
    let before = backup(&source, &key, &older, &[]);
    erase(&source, erased).await;
    let newer = dir.path().join("after-erasure.age");
    let after = backup(&source, &key, &newer, &[]);
    assert_eq!(
        after["events"].as_u64(),
        before["events"].as_u64().map(|events| events + 2),
        "the newer backup holds the erasure's tombstone and the first backup's audit record"
    );

    // The older backup with the source's ledger (the live database, after the erasure).
    let target = source.with_same_keys(&dir, "with-source-ledger");
    let erasures_from = format!("sqlite:{}", path(&source.database()));
    let restored = restore(&target, &key, &older, &["--erasures-from", &erasures_from]);
    assert_eq!(restored["keys_withheld_for_erasure"], 1);
    assert_eq!(restored["erased_keys"], 1);
    assert_erased(&target, erased, kept).await;

    // The older backup into a target whose own ledger has the erasure.
    let target = source.with_same_keys(&dir, "with-target-ledger");
    {
        let (ring, _) = load_or_create_key_files(&target.key_dir()).expect("key files");
        let store = SqliteEventStore::open(&target.database())
            .await
            .expect("open");
        let keys = DataKeys::new(Arc::new(ring), SqliteKeyStore::new(store.pool().clone()));
        keys.key_for_append(&StreamId::patient(erased))
            .await
            .expect("key");
        keys.destroy(&StreamId::patient(erased), at())
            .await
            .expect("destroy");
        store.pool().close().await;
    }
    let restored = restore(&target, &key, &older, &[]);
    assert_eq!(restored["keys_withheld_for_erasure"], 1);
    assert_erased(&target, erased, kept).await;

    // The newer backup carries the erasure in its own ledger.
    let target = source.with_same_keys(&dir, "from-newer");
    let restored = restore(&target, &key, &newer, &[]);
    assert_eq!(restored["keys_withheld_for_erasure"], 0);
    assert_eq!(restored["erased_keys"], 1);
    assert_erased(&target, erased, kept).await;

    // An erasure no ledger the restore reads knows of (made here through the library, which
    // keeps no erasure ledger file, and the live database not named): the older backup
    // brings the key back, and the report shows that no ledger named it. Keeping the key
    // directory's ledger is what prevents this (the tests below).
    let target = source.with_same_keys(&dir, "no-ledger");
    let restored = restore(&target, &key, &older, &[]);
    assert_eq!(restored["erased_keys"], 0);
    assert_eq!(restored["keys_withheld_for_erasure"], 0);
    assert_eq!(
        ledger_report(&restored, "key_directory_file")["present"],
        false
    );
    assert_eq!(
        restored["data_keys_restored"],
        patients.len() + SOURCE_OPERATOR_RECORDS
    );
}

/// The report of the restore's erasure ledger of `kind` (the first one, if several).
fn ledger_report<'a>(restored: &'a Value, kind: &str) -> &'a Value {
    restored["erasure_ledgers"]
        .as_array()
        .expect("erasure_ledgers")
        .iter()
        .find(|report| report["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} ledger in {restored}"))
}

/// The key directory's erasure ledger: one line per erasure, private, naming the patient.
fn assert_ledger_names(site: &Site, erased: PatientId) {
    let ledger = site.key_dir().join("erasure-ledger.jsonl");
    let mode = fs::metadata(&ledger)
        .expect("the erasure ledger")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the erasure ledger is private");
    let text = fs::read_to_string(&ledger).expect("the erasure ledger");
    let lines: Vec<Value> = text.lines().map(json).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert_eq!(lines[0]["patient_id"], erased.to_string());
    assert_eq!(lines[0]["stream_id"], StreamId::patient(erased).as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_erased_from_the_command_line_stays_erased_when_only_an_older_backup_is_left() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, patients) = source_site(&dir, 200).await;
    let (erased, kept) = (patients[0], patients[1]);
    let older = dir.path().join("before-erasure.age");
    backup(&source, &key, &older, &[]);
    succeeds(&[
        "erase",
        "--data-dir",
        source.arg(),
        &erased.to_string(),
        "--reason",
        "patient_request",
        "--yes",
        "--json",
    ]);
    assert_ledger_names(&source, erased);

    // The live database is lost. What is left: the older backup, and the key backup taken
    // after the erasure, restored into a new data directory with a new, empty database.
    let target = source.with_same_keys(&dir, "after-the-loss");
    let restored = restore(&target, &key, &older, &[]);
    assert_eq!(restored["keys_withheld_for_erasure"], 1, "{restored}");
    let from_keys = ledger_report(&restored, "key_directory_file");
    assert_eq!(from_keys["present"], true);
    assert_eq!(from_keys["erasures"], 1);
    assert_eq!(from_keys["keys_withheld"], 1);
    assert_eq!(
        ledger_report(&restored, "target_database")["keys_withheld"],
        0
    );
    assert_eq!(
        restored["data_keys_restored"],
        patients.len() - 1 + SOURCE_OPERATOR_RECORDS
    );
    assert_erased(&target, erased, kept).await;

    // The same ledger named with --erasures-from, the target's key directory without one:
    // say, another server's key files.
    let target = source.with_same_keys(&dir, "ledger-named");
    fs::remove_file(target.key_dir().join("erasure-ledger.jsonl")).expect("remove");
    let ledger = source.key_dir().join("erasure-ledger.jsonl");
    let output = chartlog(&restore_args(
        &target,
        &key,
        &older,
        &["--erasures-from", path(&ledger)],
    ));
    assert!(output.status.success(), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no erasure ledger at"), "{stderr}");
    assert!(
        stderr.contains("1 data keys withheld because the patient is erased"),
        "{stderr}"
    );
    let restored = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(restored["keys_withheld_for_erasure"], 1, "{restored}");
    assert_eq!(
        ledger_report(&restored, "key_directory_file")["present"],
        false
    );
    assert_eq!(ledger_report(&restored, "file")["keys_withheld"], 1);
    assert_erased(&target, erased, kept).await;

    // A ledger named but missing is an error, not a ledger of nothing.
    let target = source.with_same_keys(&dir, "ledger-missing");
    let missing = dir.path().join("no-such-ledger.jsonl");
    let stderr = fails(&restore_args(
        &target,
        &key,
        &older,
        &["--erasures-from", path(&missing)],
    ));
    assert!(stderr.contains("no erasure ledger at"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_erased_over_http_stays_erased_when_only_an_older_backup_is_left() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, patients) = source_site(&dir, 200).await;
    let (erased, kept) = (patients[0], patients[1]);
    let older = dir.path().join("before-erasure.age");
    backup(&source, &key, &older, &[]);
    let added = succeeds(&[
        "users",
        "add",
        "--data-dir",
        source.arg(),
        "--username",
        "ada.admin",
        "--role",
        "administrator",
    ]);
    let one_time = added
        .lines()
        .find_map(|line| line.strip_prefix("one-time password: "))
        .expect("a one-time password")
        .to_owned();

    let mut server = support::Server::start(&source.data_dir, &[]);
    let certificate = fs::read(source.data_dir.join("tls").join("dev-cert.pem")).expect("cert");
    let api = api_client::Api::new(&server, support::https_client(&certificate));
    let admin = api.first_login("ada.admin", &one_time).await.token;
    api.post(
        &format!("/patients/{erased}/erase"),
        &admin,
        serde_json::json!({ "reason": "patient_request" }),
    )
    .await
    .expect(reqwest::StatusCode::OK);
    assert!(server.signal_and_wait("TERM").success());
    assert_ledger_names(&source, erased);

    let target = source.with_same_keys(&dir, "after-the-loss");
    let restored = restore(&target, &key, &older, &[]);
    assert_eq!(restored["keys_withheld_for_erasure"], 1, "{restored}");
    assert_eq!(
        ledger_report(&restored, "key_directory_file")["keys_withheld"],
        1
    );
    assert_erased(&target, erased, kept).await;
}

// ---- An erasure ledger that cannot be written -----------------------------------------------

/// The patient's stream version (0: no stream).
async fn stream_version(site: &Site, patient: PatientId) -> u64 {
    let store = SqliteEventStore::open(&site.database())
        .await
        .expect("open");
    let head = store
        .stream_head(&StreamId::patient(patient))
        .await
        .expect("stream head");
    store.pool().close().await;
    head.map_or(0, |head| head.version)
}

/// The patient's data key is live and their record loads through the command path, opened:
/// nothing of an erasure happened to it.
async fn assert_untouched(site: &Site, patient: PatientId, version: u64) {
    assert_eq!(
        stream_version(site, patient).await,
        version,
        "nothing was appended to the patient's stream"
    );
    let (ring, signing) = load_or_create_key_files(&site.key_dir()).expect("key files");
    let store = SqliteEventStore::open(&site.database())
        .await
        .expect("open");
    let keys = DataKeys::new(Arc::new(ring), SqliteKeyStore::new(store.pool().clone()));
    assert!(
        matches!(
            keys.store().fetch(&StreamId::patient(patient)).await,
            Ok(Some(chartlog_crypto::DataKeyRecord::Active(_)))
        ),
        "the patient's data key is live"
    );
    let ledger = PatientLedger::new(
        Arc::new(store.clone()),
        Arc::new(keys),
        Arc::clone(signing.active()),
        Arc::new(signing.verifier()),
    );
    let loaded = ledger.load(patient).await.expect("the record still loads");
    assert!(loaded.patient.erased_at().is_none(), "not erased");
    store.pool().close().await;
}

/// Runs `chartlog serve` on the site and expects it to refuse to start: exit status 1 within
/// the start-up timeout, never a listening line. Returns stderr.
fn serve_refuses(site: &Site, extra: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .args(["serve", "--data-dir", site.arg(), "--listen", "127.0.0.1:0"])
        .args(extra)
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR")
        .env_remove("CHARTLOG_KEK")
        .env_remove("CHARTLOG_ERASURE_LEDGER")
        .env("CHARTLOG_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the chartlog binary");
    let deadline = std::time::Instant::now() + support::STARTUP_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the child") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("reap the child");
            panic!(
                "serve started with an erasure ledger it cannot write; stdout: {}; stderr: {}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let output = child.wait_with_output().expect("collect the output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert_eq!(status.code(), Some(1), "stdout: {stdout}; stderr: {stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");
    stderr
}

fn erase_args<'a>(site: &'a Site, patient: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "erase",
        "--data-dir",
        site.arg(),
        patient,
        "--reason",
        "patient_request",
        "--yes",
        "--json",
    ];
    args.extend_from_slice(extra);
    args
}

/// An erasure stores the tombstone event first and destroys the key after it. An erasure
/// ledger that cannot be written must stop the erasure before the tombstone, over HTTP and
/// from the command line, and stop `serve` from starting at all; not leave a tombstone over a
/// live key that every later load trips on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erasure_ledger_that_cannot_be_written_refuses_the_erasure_before_anything_is_stored() {
    let dir = TempDir::new().expect("temp dir");
    let (source, patients) = source_site(&dir, 200).await;
    let patient = patients[0];
    let patient_arg = patient.to_string();
    let version = stream_version(&source, patient).await;
    assert!(version > 0);
    let ledger = source.key_dir().join("erasure-ledger.jsonl");
    let one_time = succeeds(&[
        "users",
        "add",
        "--data-dir",
        source.arg(),
        "--username",
        "ada.admin",
        "--role",
        "administrator",
    ])
    .lines()
    .find_map(|line| line.strip_prefix("one-time password: "))
    .expect("a one-time password")
    .to_owned();

    // Over HTTP: the file goes away while the server runs (a directory in its place stops
    // any writer, root included). The erasure fails, and leaves the record as it was.
    let mut server = support::Server::start(&source.data_dir, &[]);
    assert!(ledger.is_file(), "the starting server made its ledger");
    let certificate = fs::read(source.data_dir.join("tls").join("dev-cert.pem")).expect("cert");
    let api = api_client::Api::new(&server, support::https_client(&certificate));
    let admin = api.first_login("ada.admin", &one_time).await.token;
    fs::remove_file(&ledger).expect("remove the ledger");
    fs::create_dir(&ledger).expect("a directory in its place");
    api.post(
        &format!("/patients/{patient}/erase"),
        &admin,
        serde_json::json!({ "reason": "patient_request" }),
    )
    .await
    .expect(reqwest::StatusCode::INTERNAL_SERVER_ERROR);
    assert!(server.signal_and_wait("TERM").success());
    assert_untouched(&source, patient, version).await;

    // From the command line.
    let stderr = fails(&erase_args(&source, &patient_arg, &[]));
    assert!(stderr.contains(path(&ledger)), "{stderr}");
    assert!(stderr.contains("nothing was recorded"), "{stderr}");
    assert!(stderr.contains("--erasure-ledger"), "{stderr}");
    assert_untouched(&source, patient, version).await;

    // The server does not start: a read-only key mount is found at start-up.
    let stderr = serve_refuses(&source, &[]);
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(stderr.contains(path(&ledger)), "{stderr}");
    assert!(stderr.contains("--erasure-ledger"), "{stderr}");
    fs::remove_dir(&ledger).expect("remove the directory");

    // A key directory made read-only, the ledger not made yet: the same. Root (or a process
    // with CAP_DAC_OVERRIDE) writes through the mode bits, so that part is skipped there;
    // the directory above stands for it.
    fs::set_permissions(source.key_dir(), fs::Permissions::from_mode(0o500)).expect("chmod");
    let probe = source.key_dir().join("write-probe");
    if fs::write(&probe, b"").is_ok() {
        fs::remove_file(&probe).expect("remove the probe");
        eprintln!(
            "SKIPPED the read-only key directory part: this process writes through mode 0500 \
             (running as root?); the directory in the ledger's place covered the same path"
        );
    } else {
        let stderr = fails(&erase_args(&source, &patient_arg, &[]));
        assert!(stderr.contains(path(&ledger)), "{stderr}");
        assert_untouched(&source, patient, version).await;
        let stderr = serve_refuses(&source, &[]);
        assert!(stderr.contains(path(&ledger)), "{stderr}");
        assert!(!ledger.exists());
    }
    fs::set_permissions(source.key_dir(), fs::Permissions::from_mode(0o700)).expect("chmod");

    // Once the file can be written, the erasure goes through as if nothing had happened.
    let certificate = json(&succeeds(&erase_args(&source, &patient_arg, &[])));
    assert_eq!(certificate["tombstone"]["stream_version"], version + 1);
    assert_ledger_names(&source, patient);
}

/// A key directory on a read-only mount: `--erasure-ledger` keeps the ledger elsewhere, the
/// server starts, `erase` writes there, and `restore` honours it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erasure_ledger_keeps_the_ledger_out_of_a_read_only_key_directory() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, patients) = source_site(&dir, 200).await;
    let (erased, kept) = (patients[0], patients[1]);
    let older = dir.path().join("before-erasure.age");
    backup(&source, &key, &older, &[]);
    // The server's first start makes the key files it lacks; after it the key directory is
    // only read.
    let mut server = support::Server::start(&source.data_dir, &[]);
    assert!(server.signal_and_wait("TERM").success());
    let in_keys = source.key_dir().join("erasure-ledger.jsonl");
    fs::remove_file(&in_keys).expect("the first start's empty ledger");
    fs::create_dir(&in_keys).expect("unwritable: a directory in its place");
    let elsewhere = dir.path().join("ledger").join("erasures.jsonl");
    fs::create_dir(elsewhere.parent().expect("a parent")).expect("the ledger's directory");
    let flag = ["--erasure-ledger", path(&elsewhere)];

    let mut server = support::Server::start(&source.data_dir, &flag);
    assert!(server.signal_and_wait("TERM").success());
    assert!(elsewhere.is_file(), "the server made its ledger there");
    let erased_arg = erased.to_string();
    succeeds(&erase_args(&source, &erased_arg, &flag));
    let text = fs::read_to_string(&elsewhere).expect("the ledger");
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains(&erased_arg), "{text}");

    // The database is lost; the key backup (its key directory without a ledger) and the
    // ledger file are what is left.
    let target = source.with_same_keys_but_the_ledger(&dir, "after-the-loss");
    let restored = restore(&target, &key, &older, &flag);
    assert_eq!(restored["keys_withheld_for_erasure"], 1, "{restored}");
    assert_eq!(
        ledger_report(&restored, "erasure_ledger_file")["keys_withheld"],
        1
    );
    assert_eq!(
        ledger_report(&restored, "key_directory_file")["present"],
        false
    );
    assert_erased(&target, erased, kept).await;
}

/// A patient left half-erased by a server of before the check (the tombstone stored, the
/// ledger unwritable, the key live) is finished by the next load once the file can be written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_left_half_erased_is_finished_by_the_next_load_once_the_ledger_is_writable() {
    let dir = TempDir::new().expect("temp dir");
    let (source, patients) = source_site(&dir, 200).await;
    let patient = patients[0];
    let version = stream_version(&source, patient).await;
    half_erase(&source, patient).await;
    assert_eq!(stream_version(&source, patient).await, version + 1);
    let ledger = source.key_dir().join("erasure-ledger.jsonl");
    let patient_arg = patient.to_string();

    fs::create_dir(&ledger).expect("unwritable: a directory in its place");
    fails(&erase_args(&source, &patient_arg, &[]));
    fs::remove_dir(&ledger).expect("writable again");
    let pool = source.pool().await;
    assert!(matches!(
        sqlite_keys(&source, &pool)
            .store()
            .fetch(&StreamId::patient(patient))
            .await,
        Ok(Some(chartlog_crypto::DataKeyRecord::Active(_)))
    ));

    // `erase` loads the record, finds the tombstone, and finishes the destruction.
    let stderr = fails(&erase_args(&source, &patient_arg, &[]));
    assert!(stderr.contains("was already erased"), "{stderr}");
    assert_eq!(stream_version(&source, patient).await, version + 1);
    assert_ledger_names(&source, patient);
    assert!(matches!(
        sqlite_keys(&source, &pool)
            .key_for_read(&StreamId::patient(patient))
            .await,
        Err(KeyError::Erased { .. })
    ));
    pool.close().await;
}

/// A key table whose destruction fails, as one behind an unwritable ledger did.
struct DestructionFails(SqliteKeyStore);

#[async_trait::async_trait]
impl KeyStore for DestructionFails {
    async fn insert(
        &self,
        owner: &StreamId,
        key: &chartlog_crypto::WrappedDataKey,
    ) -> Result<chartlog_crypto::KeyInsert, chartlog_crypto::KeyStoreError> {
        self.0.insert(owner, key).await
    }

    async fn fetch(
        &self,
        owner: &StreamId,
    ) -> Result<Option<chartlog_crypto::DataKeyRecord>, chartlog_crypto::KeyStoreError> {
        self.0.fetch(owner).await
    }

    async fn destroy(
        &self,
        _owner: &StreamId,
        _at: Timestamp,
    ) -> Result<Option<DataKeyId>, chartlog_crypto::KeyStoreError> {
        Err(chartlog_crypto::KeyStoreError::new(
            "cannot write the erasure ledger".to_owned(),
        ))
    }

    async fn list_for_rewrap(
        &self,
        active: &chartlog_crypto::KekId,
        limit: u32,
    ) -> Result<Vec<(StreamId, chartlog_crypto::WrappedDataKey)>, chartlog_crypto::KeyStoreError>
    {
        self.0.list_for_rewrap(active, limit).await
    }

    async fn replace_wrapping(
        &self,
        owner: &StreamId,
        expected: &chartlog_crypto::WrappedDataKey,
        replacement: &chartlog_crypto::WrappedDataKey,
    ) -> Result<bool, chartlog_crypto::KeyStoreError> {
        self.0.replace_wrapping(owner, expected, replacement).await
    }
}

/// Stores the patient's tombstone and fails to destroy their key.
async fn half_erase(site: &Site, patient: PatientId) {
    let (ring, signing) = load_or_create_key_files(&site.key_dir()).expect("key files");
    let store = SqliteEventStore::open(&site.database())
        .await
        .expect("open");
    let keys = DataKeys::new(
        Arc::new(ring),
        DestructionFails(SqliteKeyStore::new(store.pool().clone())),
    );
    let ledger = PatientLedger::new(
        Arc::new(store.clone()),
        Arc::new(keys),
        Arc::clone(signing.active()),
        Arc::new(signing.verifier()),
    );
    let failed = ledger
        .execute(
            patient,
            PatientCommand::ErasePatient {
                reason: ErasureReason::PatientRequest,
            },
            physician(),
            at(),
        )
        .await;
    assert!(
        matches!(failed, Err(chartlog_store::LedgerError::Key(_))),
        "{failed:?}"
    );
    store.pool().close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_its_check_cannot_confirm_after_the_commit_says_it_committed_and_exits_3() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, _) = source_site(&dir, 100).await;
    let from_sqlite = dir.path().join("from-sqlite.age");
    backup(&source, &key, &from_sqlite, &[]);

    // A cluster of the test's own: the transaction below holds back every reader of the
    // global log in the cluster, which must not be the shared server's other tests.
    let cluster = cluster::PrivatePostgres::start();
    let first_url = cluster.url();
    let pool = sqlx::PgPool::connect(&first_url).await.expect("connect");
    sqlx::query("CREATE DATABASE second")
        .execute(&pool)
        .await
        .expect("create the second database");
    let second_url = first_url.replace("/chartlog", "/second");
    // Open, with a transaction id, before anything below is written: events committed after
    // it sort above it, and readers of the global log see none of them until it ends.
    let mut holder = pool.begin().await.expect("begin");
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut *holder)
        .await
        .expect("take a transaction id");

    // The first restore's own audit record lands after the holder's transaction id; the
    // restored events, from SQLite, sort below it and verify at once.
    let first = source.with_same_keys(&dir, "first");
    restore(&first, &key, &from_sqlite, &["--database-url", &first_url]);
    let from_postgres = dir.path().join("from-postgres.age");
    let backed_up = backup(
        &first,
        &key,
        &from_postgres,
        &["--database-url", &first_url],
    );

    // Restored again, that record is an event the global log holds back: the check after
    // the commit cannot see it in time.
    let second = source.with_same_keys(&dir, "second");
    let args = restore_args(
        &second,
        &key,
        &from_postgres,
        &["--database-url", &second_url, "--verify-wait-seconds", "1"],
    );
    let output = chartlog(&args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("IS restored and committed"), "{stderr}");
    assert!(stderr.contains("could not confirm"), "{stderr}");
    let summary = json(&String::from_utf8_lossy(&output.stdout));
    assert_eq!(summary["committed"], true, "{summary}");
    assert_eq!(summary["after_check"], "unconfirmed", "{summary}");
    assert_eq!(summary["audit_recorded"], true, "{summary}");
    assert_eq!(summary["events"], backed_up["events"]);

    // Committed indeed, its audit record included, and a retry is refused as it should be.
    let restored = sqlx::PgPool::connect(&second_url).await.expect("connect");
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM chartlog_events")
        .fetch_one(&restored)
        .await
        .expect("count");
    let backed_up_events = backed_up["events"].as_i64().expect("events");
    assert_eq!(
        events,
        backed_up_events + 1,
        "the backup's events and the restore's record"
    );
    restored.close().await;
    let refused = fails(&args);
    assert!(refused.contains("not empty"), "{refused}");

    // Once the transaction ends, the log verifies.
    holder.rollback().await.expect("end the transaction");
    pool.close().await;
    let verified = succeeds(&[
        "verify",
        "--data-dir",
        second.arg(),
        "--database-url",
        &second_url,
    ]);
    assert!(verified.contains("intact"), "{verified}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_backups_are_refused_and_leave_the_target_empty() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, _) = source_site(&dir, 100).await;
    let file = dir.path().join("good.age");
    backup(&source, &key, &file, &[]);
    let plaintext = decrypt(&key, &file);
    let target = source.with_same_keys(&dir, "target");

    let refused = |name: &str, bytes: Vec<u8>, expected: &str| {
        let tampered = dir.path().join(name);
        fs::write(&tampered, bytes).expect("write");
        let stderr = fails(&restore_args(&target, &key, &tampered, &[]));
        assert!(
            stderr.contains(expected),
            "{name}: expected {expected:?} in: {stderr}"
        );
    };

    // A flipped byte in the encrypted payload.
    let mut flipped = fs::read(&file).expect("backup");
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x01;
    refused("flipped.age", flipped, "does not decrypt");

    // Truncated: the age stream's last chunk is missing.
    let whole = fs::read(&file).expect("backup");
    refused(
        "truncated.age",
        whole[..whole.len() - 100].to_vec(),
        "does not decrypt",
    );

    // A manifest whose count was changed, with its old signature.
    let (record, mut manifest) = manifest_of(&plaintext);
    let events = manifest["events"].as_u64().expect("events");
    manifest["events"] = serde_json::json!(events - 1);
    let old_signature = record["signature"].as_str().expect("signature");
    let encrypted = dir.path().join("scratch.age");
    encrypt(
        &key,
        &replace_manifest(&plaintext, &manifest, old_signature),
        &encrypted,
    );
    refused(
        "recounted.age",
        fs::read(&encrypted).expect("read"),
        "signature does not verify",
    );

    // The same manifest signed again with the server's own key: the count is still wrong.
    let signature = sign_manifest(&source, &manifest);
    encrypt(
        &key,
        &replace_manifest(&plaintext, &manifest, &signature),
        &encrypted,
    );
    refused(
        "resigned.age",
        fs::read(&encrypted).expect("read"),
        &format!(
            "the manifest states {} events, the backup holds {events}",
            events - 1
        ),
    );

    // One changed byte of one event's ciphertext: the log itself does not verify.
    let mut lines: Vec<String> = plaintext.lines().map(str::to_owned).collect();
    let row = lines
        .iter()
        .position(|line| line.contains(r#""table":"chartlog_events""#))
        .expect("an event row")
        + 5;
    let mut event = json(&lines[row]);
    let ciphertext = event["values"][16].as_str().expect("ciphertext").to_owned();
    let changed = if ciphertext.ends_with('0') { '1' } else { '0' };
    event["values"][16] =
        serde_json::json!(format!("{}{changed}", &ciphertext[..ciphertext.len() - 1]));
    lines[row] = event.to_string();
    encrypt(&key, &(lines.join("\n") + "\n"), &encrypted);
    refused(
        "changed-event.age",
        fs::read(&encrypted).expect("read"),
        "stored hash does not match header and ciphertext",
    );

    // A backup encrypted to someone else.
    let stranger = TempDir::new().expect("temp dir");
    let stranger_key = backup_key(&stranger);
    let stderr = fails(&restore_args(&target, &stranger_key, &file, &[]));
    assert!(stderr.contains("cannot decrypt"), "{stderr}");

    // A restore onto key files that are not the backed-up server's.
    let other_keys = Site::new(&dir, "other-keys");
    other_keys.make_keys();
    let stderr = fails(&restore_args(&other_keys, &key, &file, &[]));
    assert!(stderr.contains("do not trust"), "{stderr}");

    let pool = target.pool().await;
    for table in [
        "chartlog_events",
        "chartlog_streams",
        "chartlog_data_keys",
        "chartlog_access_users",
    ] {
        assert_eq!(count(&pool, table).await, 0, "{table} stays empty");
    }
    pool.close().await;
    // And the untouched backup still restores there.
    restore(&target, &key, &file, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_into_a_database_that_is_not_empty_is_refused() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, _) = source_site(&dir, 50).await;
    let file = dir.path().join("backup.age");
    backup(&source, &key, &file, &[]);

    let stderr = fails(&restore_args(&source, &key, &file, &[]));
    assert!(stderr.contains("not empty"), "{stderr}");

    let target = source.with_same_keys(&dir, "target");
    restore(&target, &key, &file, &[]);
    let stderr = fails(&restore_args(&target, &key, &file, &[]));
    assert!(
        stderr.contains("not empty (chartlog_events has rows)"),
        "{stderr}"
    );

    // A backup is never written over an existing file, and a failed one leaves nothing.
    let stderr = fails(&[
        "backup",
        "--data-dir",
        source.arg(),
        "--recipient",
        &key.recipient,
        path(&file),
    ]);
    assert!(stderr.contains("never overwrites"), "{stderr}");
}

#[test]
fn the_commands_explain_themselves_and_refuse_bad_input_clearly() {
    let help = succeeds(&["backup", "--help"]);
    for needle in [
        "--recipient",
        "--recipient-file",
        "--generate-identity",
        "age-keygen",
        "--json",
        "keys",
    ] {
        assert!(
            help.contains(needle),
            "backup --help mentions {needle}: {help}"
        );
    }
    let help = succeeds(&["restore", "--help"]);
    for needle in [
        "--identity",
        "--erasures-from",
        "empty",
        "chartlog rebuild",
        "--json",
    ] {
        assert!(
            help.contains(needle),
            "restore --help mentions {needle}: {help}"
        );
    }

    let dir = TempDir::new().expect("temp dir");
    let data_dir = dir.path().join("data");
    let data_dir = path(&data_dir);
    let file = dir.path().join("backup.age");
    let file = path(&file);
    let stderr = fails(&["backup", "--data-dir", data_dir, file]);
    assert!(stderr.contains("no recipient"), "{stderr}");
    let stderr = fails(&[
        "backup",
        "--data-dir",
        data_dir,
        "--recipient",
        "age1nope",
        file,
    ]);
    assert!(stderr.contains("not an age X25519 recipient"), "{stderr}");
    // Usage errors exit with 2.
    let output = chartlog(&["restore", "--data-dir", data_dir, file]);
    assert_eq!(output.status.code(), Some(2), "restore without --identity");
    assert!(String::from_utf8_lossy(&output.stderr).contains("--identity"));
    let output = chartlog(&["backup", "--data-dir", data_dir]);
    assert_eq!(output.status.code(), Some(2), "backup without a file");
    assert!(!Path::new(file).exists());
}

/// Waits, bounded, until the server's stderr holds `needle` at least `times` times.
fn wait_for_lines(server: &support::Server, needle: &str, times: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let stderr = server.stderr();
        if stderr.matches(needle).count() >= times {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stderr never held {needle:?} {times} times:\n{stderr}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// The scheduled backups in `directory`, oldest first.
fn scheduled_backups(directory: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(directory)
        .expect("the backup directory")
        .map(|entry| entry.expect("an entry").path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("chartlog-") && name.ends_with(".backup")
        })
        .collect();
    found.sort();
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_backs_up_on_schedule_keeps_the_newest_and_audits_failures() {
    let dir = TempDir::new().expect("temp dir");
    let key = backup_key(&dir);
    let (source, _patients) = source_site(&dir, 2 * EVENTS_PER_PATIENT).await;
    let backups = dir.path().join("scheduled");
    let mut server = support::Server::start(
        &source.data_dir,
        &[
            "--backup-dir",
            path(&backups),
            "--backup-recipient",
            &key.recipient,
            "--backup-every-seconds",
            "2",
            "--backup-keep",
            "2",
        ],
    );

    // The first at once, then one every 2 s; the third deletes the first.
    wait_for_lines(&server, "old scheduled backup deleted", 1);
    let kept = scheduled_backups(&backups);
    assert_eq!(kept.len(), 2, "{kept:?}");
    let mode = fs::metadata(&kept[1]).expect("backup").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "a scheduled backup is private");

    // A directory that can no longer be written to: the attempt fails, loudly, notified and
    // audited, and the server goes on.
    fs::rename(&backups, dir.path().join("moved-away")).expect("move the backups away");
    fs::write(&backups, b"not a directory").expect("a file in the directory's place");
    wait_for_lines(&server, "scheduled backup failed", 1);
    // The notifiers hear of it (the log's here; a webhook gets the same JSON notice).
    wait_for_lines(&server, "backup failure notice", 1);
    assert!(server.signal_and_wait("TERM").success());

    // The newest restores, like any backup.
    let newest = dir
        .path()
        .join("moved-away")
        .join(kept[1].file_name().expect("a name"));
    let copy = source.with_same_keys(&dir, "copy");
    let restored = restore(&copy, &key, &newest, &[]);
    assert!(
        restored["events"].as_u64().expect("events") >= 2 * EVENTS_PER_PATIENT as u64,
        "{restored}"
    );

    // Every attempt is on the audit trail, with how it went.
    source.rebuild(&["audit_trail"]);
    let read_models = source.read_models().await;
    let outcomes: Vec<(String, i64)> = sqlx::query_as(
        "SELECT outcome, count(*) FROM chartlog_audit_trail \
         WHERE entity = 'backup' AND action = 'export' GROUP BY outcome ORDER BY outcome",
    )
    .fetch_all(&read_models)
    .await
    .expect("the backup audit rows");
    assert_eq!(outcomes[0].0, "failure", "{outcomes:?}");
    assert!(outcomes[0].1 >= 1, "{outcomes:?}");
    assert_eq!(outcomes[1].0, "success", "{outcomes:?}");
    assert!(outcomes[1].1 >= 3, "{outcomes:?}");
}
