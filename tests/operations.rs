//! The operator commands end to end: keys, erase, verify, against the built binary.
//!
//! Patients are written in-process through `PatientLedger` over the same database file and
//! key files the binary uses (no HTTP needed); tampering edits the database directly, as an
//! attacker with file access would, after dropping the append-only triggers.

#[path = "support/fresh_postgres.rs"]
mod fresh_postgres;
#[allow(dead_code)]
mod support;

use fresh_postgres::FreshPostgresDatabase;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use chartlog_crypto::{
    DataKeys, KEK_BYTES, KEK_FILE_NAME, KekId, KeyRing, KeyStore, SIGNING_FILE_NAME,
    load_or_create_key_files,
};
use chartlog_domain::{
    Actor, PatientCommand, PatientId, PurposeOfUse, Role, StreamId, Timestamp, UserId, synthetic,
};
use chartlog_store::postgres::{PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use chartlog_store::{EventStore, LedgerError, PatientLedger};
use serde_json::Value;
use support::{Server, TestDir};
use uuid::Uuid;

/// The actor `chartlog erase` records without `--operator` (documented in `chartlog erase
/// --help`).
const CLI_OPERATOR_USER_ID: &str = "00000000-0000-0000-0000-000000000001";
/// Events per test patient: the registration and four clinical commands.
const EVENTS_PER_PATIENT: u64 = 5;

fn now() -> Timestamp {
    Timestamp::from_unix_micros(1_763_000_000_000_000).expect("in range")
}

fn physician() -> Actor {
    Actor {
        user_id: UserId::from_uuid(Uuid::now_v7()),
        role: Role::Physician,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    }
}

fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("keys")
}

fn sqlite_path(data_dir: &Path) -> PathBuf {
    data_dir.join("chartlog.db")
}

/// The read models' file next to the SQLite log.
async fn sqlite_read_models(data_dir: &Path) -> sqlx::SqlitePool {
    let file = chartlog_store::sqlite::read_models_path(&sqlite_path(data_dir));
    sqlx::SqlitePool::connect(&format!("sqlite:{}", file.display()))
        .await
        .expect("open the read models")
}

/// `chartlog <args> --data-dir <data_dir> <extra>`, stdin not a terminal.
fn chartlog(args: &[&str], data_dir: &Path, extra: &[&str]) -> Output {
    chartlog_with_env(args, data_dir, extra, &[])
}

/// [`chartlog`] with environment variables set for it alone.
fn chartlog_with_env(
    args: &[&str],
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR")
        .env_remove("CHARTLOG_KEK")
        .env_remove("CHARTLOG_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run chartlog")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Runs and expects success; returns stdout.
fn succeeds(args: &[&str], data_dir: &Path, extra: &[&str]) -> String {
    succeeds_with_env(args, data_dir, extra, &[])
}

/// [`succeeds`] with environment variables set for the command alone.
fn succeeds_with_env(
    args: &[&str],
    data_dir: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> String {
    let output = chartlog_with_env(args, data_dir, extra, env);
    assert!(
        output.status.success(),
        "chartlog {args:?} {extra:?} failed: {}\n{}",
        stdout(&output),
        stderr(&output)
    );
    stdout(&output)
}

/// Runs with `--json` added and expects success and one JSON object.
fn succeeds_json(args: &[&str], data_dir: &Path, extra: &[&str]) -> Value {
    let mut extra = extra.to_vec();
    extra.push("--json");
    let out = succeeds(args, data_dir, &extra);
    serde_json::from_str(out.trim()).unwrap_or_else(|error| panic!("{error}: {out}"))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("read")).expect("JSON")
}

async fn sqlite_ledger(data_dir: &Path) -> PatientLedger<SqliteEventStore, SqliteKeyStore> {
    let (ring, signing) = load_or_create_key_files(&key_dir(data_dir)).expect("key files");
    let store = SqliteEventStore::open(&sqlite_path(data_dir))
        .await
        .expect("SQLite store");
    let keys = DataKeys::new(Arc::new(ring), SqliteKeyStore::new(store.pool().clone()));
    PatientLedger::new(
        Arc::new(store),
        Arc::new(keys),
        Arc::clone(signing.active()),
        Arc::new(signing.verifier()),
    )
}

async fn postgres_ledger(
    data_dir: &Path,
    url: &str,
) -> PatientLedger<PostgresEventStore, PostgresKeyStore> {
    let (ring, signing) = load_or_create_key_files(&key_dir(data_dir)).expect("key files");
    let store = PostgresEventStore::connect(url)
        .await
        .expect("PostgreSQL store");
    let keys = DataKeys::new(Arc::new(ring), PostgresKeyStore::new(store.pool().clone()));
    PatientLedger::new(
        Arc::new(store),
        Arc::new(keys),
        Arc::clone(signing.active()),
        Arc::new(signing.verifier()),
    )
}

/// Registers synthetic patient `seed` with four clinical commands (versions 1 to 5).
async fn register<S: EventStore, K: KeyStore>(
    ledger: &PatientLedger<S, K>,
    seed: u64,
) -> PatientId {
    let patient = synthetic::patient_id(seed);
    let actor = physician();
    ledger
        .execute(patient, synthetic::registration(seed), actor, now())
        .await
        .expect("register");
    for n in 0..EVENTS_PER_PATIENT - 1 {
        ledger
            .execute(
                patient,
                synthetic::clinical_command(seed, n, now()),
                actor,
                now(),
            )
            .await
            .expect("clinical command");
    }
    patient
}

/// Patients `seeds` in a fresh SQLite data directory.
async fn sqlite_clinic(seeds: &[u64]) -> (TestDir, Vec<PatientId>) {
    let dir = TestDir::new();
    let ledger = sqlite_ledger(dir.data_dir()).await;
    let mut patients = Vec::new();
    for &seed in seeds {
        patients.push(register(&ledger, seed).await);
    }
    ledger.store().pool().close().await;
    (dir, patients)
}

/// Loads every patient through a ledger keyed from the current key files: each must open.
async fn assert_patients_open(data_dir: &Path, patients: &[PatientId]) {
    let ledger = sqlite_ledger(data_dir).await;
    for &patient in patients {
        let loaded = ledger.load(patient).await.expect("the record opens");
        assert_eq!(loaded.patient.version(), EVENTS_PER_PATIENT);
    }
    ledger.store().pool().close().await;
}

/// The PHI of synthetic patient `seed` as strings, to look for in output.
fn phi_of(seed: u64) -> Vec<String> {
    let PatientCommand::RegisterPatient { demographics, .. } = synthetic::registration(seed) else {
        unreachable!("a registration")
    };
    let mut phi = vec![
        demographics.mrn.expose_phi().to_owned(),
        demographics.name.family().expose_phi().to_owned(),
        "Synthetic Way".to_owned(),
        "555-01".to_owned(),
    ];
    phi.extend(
        demographics
            .name
            .given()
            .iter()
            .map(|given| given.expose_phi().to_owned()),
    );
    phi
}

/// Every secret string of the key files (KEKs and the active signing key, base64).
fn key_secrets(data_dir: &Path) -> Vec<String> {
    let kek = read_json(&key_dir(data_dir).join(KEK_FILE_NAME));
    let signing = read_json(&key_dir(data_dir).join(SIGNING_FILE_NAME));
    let mut secrets: Vec<String> = kek["keys"]
        .as_array()
        .expect("KEKs")
        .iter()
        .map(|entry| entry["key"].as_str().expect("a KEK").to_owned())
        .collect();
    secrets.push(
        signing["active"]["secret_key"]
            .as_str()
            .expect("a signing key")
            .to_owned(),
    );
    assert!(secrets.iter().all(|secret| secret.len() >= 40));
    secrets
}

fn assert_no_secret(output: &str, secrets: &[String]) {
    for secret in secrets {
        // A 16-character slice is enough to recognise a printed key, whole or cut.
        for start in (0..secret.len() - 16).step_by(8) {
            assert!(
                !output.contains(&secret[start..start + 16]),
                "key material in the output:\n{output}"
            );
        }
    }
}

fn kek_ids(data_dir: &Path) -> (String, Vec<String>) {
    let kek = read_json(&key_dir(data_dir).join(KEK_FILE_NAME));
    let ids = kek["keys"]
        .as_array()
        .expect("KEKs")
        .iter()
        .map(|entry| entry["id"].as_str().expect("an id").to_owned())
        .collect();
    (kek["active"].as_str().expect("active").to_owned(), ids)
}

/// The KEK ids wrapping the data keys that are not destroyed.
async fn wrapping_keks(data_dir: &Path) -> Vec<String> {
    let store = SqliteEventStore::open(&sqlite_path(data_dir))
        .await
        .expect("store");
    let keks: Vec<String> = sqlx::query_scalar(
        "SELECT kek_id FROM chartlog_data_keys WHERE wrapped_key IS NOT NULL ORDER BY kek_id",
    )
    .fetch_all(store.pool())
    .await
    .expect("data keys");
    store.pool().close().await;
    keks
}

#[tokio::test]
async fn keys_show_and_export_public_print_ids_and_never_key_material() {
    let (dir, _patients) = sqlite_clinic(&[1, 2]).await;
    let data_dir = dir.data_dir();
    let secrets = key_secrets(data_dir);
    let (active_kek, keks) = kek_ids(data_dir);
    let signing = read_json(&key_dir(data_dir).join(SIGNING_FILE_NAME));
    let signer = signing["active"]["id"].as_str().expect("signer id");

    let text = succeeds(&["keys", "show"], data_dir, &[]);
    assert!(text.contains(&active_kek), "{text}");
    assert!(text.contains(signer), "{text}");
    assert!(text.contains("wraps 2 data keys"), "{text}");
    assert_no_secret(&text, &secrets);

    let json = succeeds_json(&["keys", "show"], data_dir, &[]);
    assert_no_secret(&json.to_string(), &secrets);
    assert_eq!(
        json["key_encryption_keys"].as_array().map(Vec::len),
        Some(keks.len())
    );
    assert_eq!(json["key_encryption_keys"][0]["id"], active_kek.as_str());
    assert_eq!(json["key_encryption_keys"][0]["active"], true);
    assert_eq!(json["key_encryption_keys"][0]["data_keys"], 2);
    assert_eq!(json["data_keys"]["active"], 2);
    assert_eq!(json["data_keys"]["destroyed"], 0);
    assert_eq!(json["signing_keys"][0]["id"], signer);
    assert_eq!(json["signing_keys"][0]["active"], true);

    let export = succeeds(&["keys", "export-public"], data_dir, &[]);
    assert_no_secret(&export, &secrets);
    let export: Value = serde_json::from_str(&export).expect("JSON");
    assert_eq!(export["format"], "chartlog-public-keys/v1");
    assert_eq!(export["active"], signer);
    assert_eq!(export["keys"][0]["status"], "active");
    let public_key = export["keys"][0]["public_key_hex"].as_str().expect("hex");
    assert_eq!(public_key.len(), 64);
    assert!(public_key.bytes().all(|b| b.is_ascii_hexdigit()));

    for subcommand in ["show", "rotate-kek", "rotate-signing", "export-public"] {
        let help = succeeds(&["keys", subcommand, "--help"], data_dir, &[]);
        assert!(help.contains("--data-dir"), "{help}");
    }
    for command in ["erase", "verify"] {
        let help = succeeds(&[command, "--help"], data_dir, &[]);
        assert!(help.contains("--json"), "{help}");
    }

    // The operator commands never create keys where there are none.
    let empty = TestDir::new();
    let output = chartlog(&["keys", "show"], empty.data_dir(), &[]);
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("no key file"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test]
async fn rotate_kek_rewraps_every_data_key_and_finishes_an_interrupted_rotation() {
    let (dir, patients) = sqlite_clinic(&[11, 12, 13]).await;
    let data_dir = dir.data_dir();
    let (first_kek, _) = kek_ids(data_dir);

    // A complete rotation.
    let rotated = succeeds_json(&["keys", "rotate-kek"], data_dir, &[]);
    let second_kek = rotated["active_kek_id"]
        .as_str()
        .expect("new KEK")
        .to_owned();
    assert_ne!(second_kek, first_kek);
    assert_eq!(rotated["previous_kek_id"], first_kek.as_str());
    assert_eq!(rotated["resumed"], false);
    assert_eq!(rotated["rewrapped_data_keys"], 3);
    let (active, keks) = kek_ids(data_dir);
    assert_eq!(active, second_kek);
    assert_eq!(keks.len(), 2, "the old KEK stays until retired");
    // The rotation recorded itself on an audit stream sealed under a data key of its own,
    // made after the rotation, under the new KEK.
    assert_eq!(
        wrapping_keks(data_dir).await,
        vec![second_kek.clone(); 3 + 1]
    );
    assert_patients_open(data_dir, &patients).await;
    // The projections open every event through the rotated keys (and the rotation's record).
    let rebuilt = succeeds_json(&["rebuild"], data_dir, &[]);
    assert_eq!(rebuilt["events"], 3 * EVENTS_PER_PATIENT + 1);
    // The rebuild recorded itself the same way: from here on the rotations re-wrap both
    // records' keys with the patients'.
    let mut data_keys = 3 + 2;
    assert_eq!(
        wrapping_keks(data_dir).await,
        vec![second_kek.clone(); data_keys]
    );

    // An interrupted rotation: the new KEK was saved active and one data key of four was
    // re-wrapped under it when the process died.
    let third_kek = KekId::generate();
    {
        let kek_path = key_dir(data_dir).join(KEK_FILE_NAME);
        let mut ring = KeyRing::load(&kek_path).expect("ring");
        ring.add_generated(third_kek.clone()).expect("add");
        ring.set_active(&third_kek).expect("activate");
        ring.save(&kek_path).expect("save");
        let store = SqliteEventStore::open(&sqlite_path(data_dir))
            .await
            .expect("store");
        let key_store = SqliteKeyStore::new(store.pool().clone());
        let batch = key_store
            .list_for_rewrap(&third_kek, 1)
            .await
            .expect("list");
        let (owner, wrapped) = &batch[0];
        let key = ring.unwrap(owner, wrapped).expect("unwrap");
        let replacement = ring.wrap(owner, wrapped.key_id, &key);
        assert!(
            key_store
                .replace_wrapping(owner, wrapped, &replacement)
                .await
                .expect("re-wrap")
        );
        store.pool().close().await;
    }
    assert_patients_open(data_dir, &patients).await;

    let resumed = succeeds_json(&["keys", "rotate-kek"], data_dir, &[]);
    assert_eq!(resumed["resumed"], true, "{resumed}");
    assert_eq!(resumed["active_kek_id"], third_kek.as_str());
    assert_eq!(resumed["rewrapped_data_keys"], data_keys - 1);
    data_keys += 1; // its record
    let (active, keks) = kek_ids(data_dir);
    assert_eq!(active, third_kek.as_str());
    assert_eq!(keks.len(), 3, "resuming makes no new KEK");
    assert_eq!(
        wrapping_keks(data_dir).await,
        vec![third_kek.as_str().to_owned(); data_keys]
    );
    assert_patients_open(data_dir, &patients).await;

    // A new rotation that retires the older KEKs.
    let retired = succeeds_json(&["keys", "rotate-kek"], data_dir, &["--retire-old"]);
    assert_eq!(retired["resumed"], false);
    assert_eq!(retired["rewrapped_data_keys"], data_keys);
    data_keys += 1; // its record
    assert_eq!(retired["retired_kek_ids"].as_array().map(Vec::len), Some(3));
    let (active, keks) = kek_ids(data_dir);
    assert_eq!(keks, vec![active.clone()]);
    assert_eq!(wrapping_keks(data_dir).await, vec![active; data_keys]);
    assert_patients_open(data_dir, &patients).await;
    assert!(
        succeeds(&["keys", "show"], data_dir, &[])
            .contains(&format!("wraps {data_keys} data keys"))
    );
    succeeds(&["verify"], data_dir, &[]);
}

#[tokio::test]
async fn rotate_signing_keeps_earlier_events_verifiable() {
    let (dir, patients) = sqlite_clinic(&[21]).await;
    let data_dir = dir.data_dir();
    let before = read_json(&key_dir(data_dir).join(SIGNING_FILE_NAME));
    let old_signer = before["active"]["id"].as_str().expect("id").to_owned();

    let rotated = succeeds_json(&["keys", "rotate-signing"], data_dir, &[]);
    assert_eq!(rotated["retired_signer_key_id"], old_signer.as_str());
    let new_signer = rotated["active_signer_key_id"]
        .as_str()
        .expect("id")
        .to_owned();
    assert_ne!(new_signer, old_signer);
    let after = read_json(&key_dir(data_dir).join(SIGNING_FILE_NAME));
    assert_eq!(after["active"]["id"], new_signer.as_str());
    assert_eq!(after["retired"][0]["id"], old_signer.as_str());
    assert!(after["retired"][0].get("secret_key").is_none());

    // A new event signed by the new key, after five signed by the old one.
    let ledger = sqlite_ledger(data_dir).await;
    ledger
        .execute(
            patients[0],
            synthetic::clinical_command(21, EVENTS_PER_PATIENT - 1, now()),
            physician(),
            now(),
        )
        .await
        .expect("a command signed by the new key");
    ledger.store().pool().close().await;

    let report = succeeds_json(&["verify"], data_dir, &[]);
    assert_eq!(report["intact"], true, "{report}");
    // And the rotation's audit record, signed by the new key too.
    assert_eq!(report["events"], EVENTS_PER_PATIENT + 1 + 1);

    // An external verifier with only the public keys.
    let export = succeeds(&["keys", "export-public"], data_dir, &[]);
    let export_path = dir.data_dir().join("public-keys.json");
    std::fs::write(&export_path, &export).expect("write the export");
    let path = export_path.to_str().expect("UTF-8 path");
    let report = succeeds_json(&["verify"], data_dir, &["--public-keys", path]);
    assert_eq!(report["intact"], true, "{report}");

    // Without the retired key, the first five events name an unknown signer.
    let mut partial: Value = serde_json::from_str(&export).expect("JSON");
    partial["keys"]
        .as_array_mut()
        .expect("keys")
        .retain(|key| key["status"] == "active");
    std::fs::write(&export_path, partial.to_string()).expect("write");
    let output = chartlog(&["verify"], data_dir, &["--public-keys", path, "--json"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(report["breaks"][0]["problem"], "unknown_signer", "{report}");
    assert_eq!(report["breaks"][0]["version"], 1);
}

/// The data key row of `patient`: (key id, wrapped key present, destroyed).
async fn data_key_row(data_dir: &Path, patient: PatientId) -> (Uuid, bool, bool) {
    let store = SqliteEventStore::open(&sqlite_path(data_dir))
        .await
        .expect("store");
    let row: (Uuid, Option<Vec<u8>>, Option<i64>) = sqlx::query_as(
        "SELECT key_id, wrapped_key, destroyed_at_us FROM chartlog_data_keys \
         WHERE owner_stream_id = ?1",
    )
    .bind(StreamId::patient(patient).as_str())
    .fetch_one(store.pool())
    .await
    .expect("the data key row");
    store.pool().close().await;
    (row.0, row.1.is_some(), row.2.is_some())
}

fn user_id_of(added: &str) -> String {
    added
        .lines()
        .find_map(|line| line.strip_prefix("user_id: "))
        .expect("a user id")
        .to_owned()
}

#[tokio::test]
async fn erase_confirms_destroys_the_key_and_prints_a_certificate_without_phi() {
    let (dir, patients) = sqlite_clinic(&[31, 32, 33, 34]).await;
    let data_dir = dir.data_dir();
    let (erased, by_admin, kept, at_terminal) =
        (patients[0], patients[1], patients[2], patients[3]);
    let id = erased.to_string();

    // Without --yes and without a terminal: refused, nothing erased.
    let output = chartlog(&["erase", &id], data_dir, &["--reason", "patient_request"]);
    assert!(!output.status.success());
    assert!(stderr(&output).contains("--yes"), "{}", stderr(&output));
    assert!(stdout(&output).is_empty());
    let (key_id, wrapped, destroyed) = data_key_row(data_dir, erased).await;
    assert!(wrapped && !destroyed, "nothing was erased");
    assert_patients_open(data_dir, &[erased]).await;

    // Bad input is refused before anything happens.
    for (patient, reason) in [
        ("not-a-uuid", "patient_request"),
        (id.as_str(), "because"),
        ("00000000-0000-0000-0000-00000000beef", "patient_request"),
    ] {
        let output = chartlog(
            &["erase", patient],
            data_dir,
            &["--reason", reason, "--yes"],
        );
        assert!(!output.status.success(), "{patient} {reason}");
    }

    let certificate = succeeds_json(
        &["erase", &id],
        data_dir,
        &["--reason", "patient_request", "--yes"],
    );
    assert_eq!(certificate["format"], "chartlog-erasure-certificate/v1");
    assert_eq!(certificate["patient_id"], id.as_str());
    assert_eq!(certificate["reason"], "patient_request");
    assert_eq!(
        certificate["destroyed_data_key_id"],
        key_id.to_string().as_str()
    );
    assert_eq!(certificate["actor"]["user_id"], CLI_OPERATOR_USER_ID);
    assert_eq!(certificate["actor"]["role"], "system");
    assert_eq!(
        certificate["actor"]["purpose_of_use"],
        "system_administration"
    );
    assert!(
        certificate["erased_at"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z'))
    );
    assert_eq!(
        certificate["tombstone"]["stream_version"],
        EVENTS_PER_PATIENT + 1
    );
    let text = certificate.to_string();
    for phi in phi_of(31) {
        assert!(!text.contains(&phi), "PHI in the certificate: {text}");
    }
    let (_, wrapped, destroyed) = data_key_row(data_dir, erased).await;
    assert!(!wrapped && destroyed, "the data key is destroyed");

    // The record answers "erased"; the others still open.
    let ledger = sqlite_ledger(data_dir).await;
    assert!(matches!(
        ledger.load(erased).await,
        Err(LedgerError::Erased { .. })
    ));
    ledger.store().pool().close().await;
    assert_patients_open(data_dir, &[by_admin, kept]).await;

    // Again: refused, the earlier erasure named.
    let again = chartlog(
        &["erase", &id],
        data_dir,
        &["--reason", "patient_request", "--yes"],
    );
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("already erased"),
        "{}",
        stderr(&again)
    );

    // The chain still verifies, with no KEK file at hand: verification needs no data key.
    let kek_path = key_dir(data_dir).join(KEK_FILE_NAME);
    let moved = data_dir.join("kek.json.away");
    std::fs::rename(&kek_path, &moved).expect("move the KEK file away");
    let report = succeeds_json(&["verify"], data_dir, &[]);
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["events"], 4 * EVENTS_PER_PATIENT + 1);
    std::fs::rename(&moved, &kek_path).expect("put the KEK file back");

    // With --operator: an administrator's account, recorded as the actor in the clear header.
    let admin = user_id_of(&succeeds(
        &["users", "add"],
        data_dir,
        &["--username", "ops.admin", "--role", "administrator"],
    ));
    let nurse = user_id_of(&succeeds(
        &["users", "add"],
        data_dir,
        &["--username", "ops.nurse", "--role", "nurse"],
    ));
    let by_admin_id = by_admin.to_string();
    let refused = chartlog(
        &["erase", &by_admin_id],
        data_dir,
        &["--reason", "legal_order", "--yes", "--operator", &nurse],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("administrator"),
        "{}",
        stderr(&refused)
    );
    let text = succeeds(
        &["erase", &by_admin_id],
        data_dir,
        &["--reason", "legal_order", "--yes", "--operator", &admin],
    );
    assert!(text.contains("ERASURE CERTIFICATE"), "{text}");
    assert!(text.contains(&admin), "{text}");
    assert!(text.contains("role administrator"), "{text}");
    for phi in phi_of(32) {
        assert!(!text.contains(&phi), "PHI in the certificate: {text}");
    }
    let store = SqliteEventStore::open(&sqlite_path(data_dir))
        .await
        .expect("store");
    let actor: Uuid = sqlx::query_scalar(
        "SELECT actor_user_id FROM chartlog_events WHERE stream_id = ?1 AND event_type = 'patient_erased'",
    )
    .bind(StreamId::patient(by_admin).as_str())
    .fetch_one(store.pool())
    .await
    .expect("the tombstone");
    store.pool().close().await;
    assert_eq!(actor.to_string(), admin);
    assert_patients_open(data_dir, &[kept]).await;

    // At a terminal, the patient id must be typed again.
    let wrong = erase_at_a_terminal(data_dir, at_terminal, &kept.to_string());
    assert!(!wrong.status.success(), "{}", stdout(&wrong));
    assert!(
        stdout(&wrong).contains("Type the patient id"),
        "{}",
        stdout(&wrong)
    );
    assert!(
        stdout(&wrong).contains("not confirmed"),
        "{}",
        stdout(&wrong)
    );
    assert_patients_open(data_dir, &[at_terminal]).await;
    let confirmed = erase_at_a_terminal(data_dir, at_terminal, &at_terminal.to_string());
    assert!(confirmed.status.success(), "{}", stdout(&confirmed));
    assert!(
        stdout(&confirmed).contains("ERASURE CERTIFICATE"),
        "{}",
        stdout(&confirmed)
    );
    let (_, wrapped, destroyed) = data_key_row(data_dir, at_terminal).await;
    assert!(!wrapped && destroyed, "the data key is destroyed");
    assert_patients_open(data_dir, &[kept]).await;
}

/// `chartlog erase` on a pseudo-terminal (util-linux `script`), answering the prompt with
/// `answer`. The terminal's output (stdout and stderr together) is in `stdout`.
fn erase_at_a_terminal(data_dir: &Path, patient: PatientId, answer: &str) -> Output {
    use std::io::Write as _;
    let command = format!(
        "{} erase {patient} --reason duplicate_registration --data-dir {}",
        env!("CARGO_BIN_EXE_chartlog"),
        data_dir.display()
    );
    let mut child = Command::new("script")
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR")
        .env_remove("CHARTLOG_KEK")
        .env_remove("CHARTLOG_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run script(1) from util-linux");
    let mut stdin = child.stdin.take().expect("piped stdin");
    writeln!(stdin, "{answer}").expect("answer the prompt");
    drop(stdin);
    child.wait_with_output().expect("wait for script(1)")
}

/// One way of tampering with patient A's five events, and the first version it breaks.
#[derive(Debug, Clone, Copy)]
enum Tampering {
    FlipCiphertextByte,
    DeleteEvent,
    ReorderEvents,
    TruncateStream,
}

impl Tampering {
    fn first_broken_version(self) -> u64 {
        match self {
            Tampering::FlipCiphertextByte | Tampering::DeleteEvent => 3,
            Tampering::ReorderEvents => 2,
            Tampering::TruncateStream => 4,
        }
    }

    fn problem(self) -> &'static str {
        match self {
            Tampering::FlipCiphertextByte => "hash_mismatch",
            Tampering::DeleteEvent => "version_gap",
            Tampering::ReorderEvents => "chain_broken",
            Tampering::TruncateStream => "head_mismatch",
        }
    }

    fn statements(self) -> &'static [&'static str] {
        match self {
            // The flipped byte itself is written by `tamper`.
            Tampering::FlipCiphertextByte => &["DROP TRIGGER chartlog_events_no_update"],
            Tampering::DeleteEvent => &[
                "DROP TRIGGER chartlog_events_no_delete",
                "DELETE FROM chartlog_events WHERE stream_id = ?1 AND stream_version = 3",
            ],
            Tampering::ReorderEvents => &[
                "DROP TRIGGER chartlog_events_no_update",
                "UPDATE chartlog_events SET stream_version = 1000 \
                 WHERE stream_id = ?1 AND stream_version = 2",
                "UPDATE chartlog_events SET stream_version = 2 \
                 WHERE stream_id = ?1 AND stream_version = 3",
                "UPDATE chartlog_events SET stream_version = 3 \
                 WHERE stream_id = ?1 AND stream_version = 1000",
            ],
            Tampering::TruncateStream => &[
                "DROP TRIGGER chartlog_events_no_delete",
                "DELETE FROM chartlog_events WHERE stream_id = ?1 AND stream_version >= 4",
            ],
        }
    }
}

#[tokio::test]
async fn verify_finds_each_kind_of_tampering_and_names_the_first_broken_version() {
    for tampering in [
        Tampering::FlipCiphertextByte,
        Tampering::DeleteEvent,
        Tampering::ReorderEvents,
        Tampering::TruncateStream,
    ] {
        let (dir, patients) = sqlite_clinic(&[41, 42]).await;
        let data_dir = dir.data_dir();
        let (tampered, intact) = (patients[0], patients[1]);
        let stream = StreamId::patient(tampered);
        let report = succeeds_json(&["verify"], data_dir, &[]);
        assert_eq!(report["intact"], true, "{tampering:?} before: {report}");

        let store = SqliteEventStore::open(&sqlite_path(data_dir))
            .await
            .expect("store");
        for statement in tampering.statements() {
            let changed = sqlx::query(*statement)
                .bind(stream.as_str())
                .execute(store.pool())
                .await
                .unwrap_or_else(|error| panic!("{tampering:?}: {statement}: {error}"));
            assert!(
                statement.starts_with("DROP") || changed.rows_affected() > 0,
                "{tampering:?}: {statement} changed nothing"
            );
        }
        store.pool().close().await;
        if let Tampering::FlipCiphertextByte = tampering {
            flip_a_ciphertext_bit(data_dir, &stream).await;
        }

        let output = chartlog(&["verify"], data_dir, &["--json"]);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{tampering:?}: {}",
            stderr(&output)
        );
        let report: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
        assert_eq!(report["intact"], false, "{tampering:?}: {report}");
        assert_eq!(report["streams"], 2);
        assert_eq!(report["broken_streams"], 1, "{tampering:?}: {report}");
        let found = &report["breaks"][0];
        assert_eq!(found["stream"], stream.as_str(), "{tampering:?}: {report}");
        assert_eq!(
            found["version"],
            tampering.first_broken_version(),
            "{tampering:?}: {report}"
        );
        assert_eq!(
            found["problem"],
            tampering.problem(),
            "{tampering:?}: {report}"
        );
        assert!(
            !report.to_string().contains(&intact.to_string()),
            "{tampering:?}: the intact patient is not reported: {report}"
        );

        let output = chartlog(&["verify"], data_dir, &[]);
        assert_eq!(output.status.code(), Some(2), "{tampering:?}");
        let text = stdout(&output);
        let expected = format!(
            "BROKEN {} at version {}",
            stream.as_str(),
            tampering.first_broken_version()
        );
        assert!(text.contains(&expected), "{tampering:?}: {text}");

        // One record at a time, as a patient or an auditor asks: the tampered one is broken at
        // the same version, the other intact, and an unknown id is an error, not "intact".
        let tampered_id = tampered.to_string();
        let output = chartlog(
            &["verify"],
            data_dir,
            &["--json", "--patient", &tampered_id],
        );
        assert_eq!(output.status.code(), Some(2), "{tampering:?}");
        let report: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
        assert_eq!(report["streams"], 1, "{tampering:?}: {report}");
        assert_eq!(
            report["breaks"][0]["version"],
            tampering.first_broken_version(),
            "{tampering:?}: {report}"
        );
        let report = succeeds_json(&["verify"], data_dir, &["--patient", &intact.to_string()]);
        assert_eq!(report["intact"], true, "{tampering:?}: {report}");
        assert_eq!(report["streams"], 1);
        assert!(report["events"].as_u64().is_some_and(|events| events > 1));
        let unknown = chartlog(
            &["verify"],
            data_dir,
            &["--patient", &Uuid::now_v7().to_string()],
        );
        assert_eq!(unknown.status.code(), Some(1), "{tampering:?}");
        assert!(stderr(&unknown).contains("no record for this patient"));
    }
}

#[tokio::test]
async fn verify_finds_a_stream_whose_head_row_was_removed() {
    let (dir, patients) = sqlite_clinic(&[51]).await;
    let data_dir = dir.data_dir();
    let store = SqliteEventStore::open(&sqlite_path(data_dir))
        .await
        .expect("store");
    sqlx::query("DELETE FROM chartlog_streams WHERE stream_id = ?1")
        .bind(StreamId::patient(patients[0]).as_str())
        .execute(store.pool())
        .await
        .expect("remove the head row");
    store.pool().close().await;
    let output = chartlog(&["verify"], data_dir, &["--json"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(report["breaks"][0]["problem"], "head_mismatch", "{report}");
}

// ---- PostgreSQL ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_erase_and_verify_on_postgres() {
    let database = FreshPostgresDatabase::create().await;
    let dir = TestDir::new();
    let data_dir = dir.data_dir();
    let url = database.url.as_str();
    let db = ["--database-url", url];
    let ledger = postgres_ledger(data_dir, url).await;
    let erased = register(&ledger, 61).await;
    let tampered = register(&ledger, 62).await;
    ledger.store().close().await;

    let rotated = succeeds_json(&["keys", "rotate-kek"], data_dir, &db);
    assert_eq!(rotated["rewrapped_data_keys"], 2);
    let certificate = succeeds_json(
        &["erase", &erased.to_string()],
        data_dir,
        &[
            "--database-url",
            url,
            "--reason",
            "registered_in_error",
            "--yes",
        ],
    );
    assert_eq!(certificate["patient_id"], erased.to_string().as_str());
    let shown = succeeds_json(&["keys", "show"], data_dir, &db);
    // The other patient's key and the rotation's audit record's.
    assert_eq!(shown["data_keys"]["active"], 1 + 1, "{shown}");
    assert_eq!(shown["data_keys"]["destroyed"], 1, "{shown}");
    assert_eq!(
        shown["key_encryption_keys"][0]["id"], rotated["active_kek_id"],
        "{shown}"
    );
    let report = succeeds_json(&["verify"], data_dir, &db);
    assert_eq!(report["intact"], true, "{report}");
    // The erasure's tombstone, and the rotation's audit record.
    assert_eq!(report["events"], 2 * EVENTS_PER_PATIENT + 1 + 1);

    // The rotated key still opens the other patient.
    let ledger = postgres_ledger(data_dir, url).await;
    ledger.load(tampered).await.expect("opens after rotation");
    ledger.store().close().await;

    // An attacker with superuser access flips one bit.
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    sqlx::query("ALTER TABLE chartlog_events DISABLE TRIGGER chartlog_events_append_only")
        .execute(&pool)
        .await
        .expect("disable the trigger");
    sqlx::query(
        "UPDATE chartlog_events SET ciphertext = set_byte(ciphertext, 20, get_byte(ciphertext, 20) # 1) \
         WHERE stream_id = $1 AND stream_version = 2",
    )
    .bind(StreamId::patient(tampered).as_str())
    .execute(&pool)
    .await
    .expect("tamper");
    pool.close().await;
    let output = chartlog(&["verify"], data_dir, &["--database-url", url, "--json"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let report: Value = serde_json::from_str(&stdout(&output)).expect("JSON");
    assert_eq!(report["broken_streams"], 1, "{report}");
    assert_eq!(
        report["breaks"][0]["stream"],
        StreamId::patient(tampered).as_str()
    );
    assert_eq!(report["breaks"][0]["version"], 2);
    assert_eq!(report["breaks"][0]["problem"], "hash_mismatch");

    database.drop().await;
}

#[tokio::test]
async fn deid_export_writes_the_analysts_tables_without_identifiers() {
    let (dir, patients) = sqlite_clinic(&[31, 32]).await;
    succeeds(&["rebuild"], dir.data_dir(), &["deidentified"]);

    let csv = succeeds(
        &["deid", "export"],
        dir.data_dir(),
        &["patients", "--format", "csv"],
    );
    let mut lines = csv.lines();
    assert!(
        lines
            .next()
            .is_some_and(|header| header.starts_with("pseudonym,")),
        "{csv}"
    );
    assert_eq!(lines.count(), patients.len(), "one row per patient: {csv}");
    let ndjson = succeeds(&["deid", "export"], dir.data_dir(), &["observations"]);
    assert!(
        ndjson.lines().count() > 0,
        "the synthetic records have observations"
    );
    for output in [&csv, &ndjson] {
        for secret in phi_of(31).iter().chain(phi_of(32).iter()) {
            assert!(!output.contains(secret.as_str()), "the export holds PHI");
        }
        for patient in &patients {
            assert!(
                !output.contains(&patient.to_string()),
                "the export holds a patient id"
            );
        }
    }

    // To a private file, never over an existing one.
    let file = dir.data_dir().join("patients.ndjson");
    let file_arg = file.to_str().expect("utf-8 path");
    succeeds(
        &["deid", "export"],
        dir.data_dir(),
        &["patients", "--output", file_arg],
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).expect("stat").permissions().mode() & 0o777,
        0o600
    );
    let again = chartlog(
        &["deid", "export"],
        dir.data_dir(),
        &["patients", "--output", file_arg],
    );
    assert!(
        !again.status.success(),
        "an existing file is not overwritten"
    );

    // Each export is on the audit trail, the command-line operator as the actor.
    succeeds(&["rebuild"], dir.data_dir(), &["audit_trail"]);
    let pool = sqlite_read_models(dir.data_dir()).await;
    let exports: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM chartlog_audit_trail \
         WHERE entity = 'deidentified_data' AND action = 'export' AND role = 'system'",
    )
    .fetch_one(&pool)
    .await
    .expect("count");
    pool.close().await;
    assert_eq!(exports, 3, "three exports, three audit rows");

    let unknown = chartlog(&["deid", "export"], dir.data_dir(), &["charts"]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("unknown table \"charts\""),
        "{}",
        stderr(&unknown)
    );
}

/// Flips one bit of the ciphertext of `stream`'s third event; flipping it again puts it back.
/// The append-only trigger must have been dropped.
async fn flip_a_ciphertext_bit(data_dir: &Path, stream: &StreamId) {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", sqlite_path(data_dir).display()))
        .await
        .expect("open");
    let mut ciphertext: Vec<u8> = sqlx::query_scalar(
        "SELECT ciphertext FROM chartlog_events WHERE stream_id = ?1 AND stream_version = 3",
    )
    .bind(stream.as_str())
    .fetch_one(&pool)
    .await
    .expect("ciphertext");
    ciphertext[20] ^= 0x01;
    sqlx::query(
        "UPDATE chartlog_events SET ciphertext = ?1 WHERE stream_id = ?2 AND stream_version = 3",
    )
    .bind(ciphertext)
    .bind(stream.as_str())
    .execute(&pool)
    .await
    .expect("flip a bit");
    pool.close().await;
}

/// An audit row of an operator command: actor id (hex), role, purpose of use, break-glass,
/// action, outcome, and whether the patient id and the record id are empty.
type OperatorAuditRow = (String, String, String, i64, String, String, bool, bool);

#[tokio::test]
async fn rebuild_is_on_the_audit_trail_with_the_operator_as_actor_and_its_outcome() {
    let (dir, patients) = sqlite_clinic(&[51, 52]).await;
    let data_dir = dir.data_dir();
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", sqlite_path(data_dir).display()))
        .await
        .expect("open");

    // A rebuild decrypts every patient's events. It counts the events of the log it went
    // through; its audit record is written after the work, so it is not one of them.
    let rebuilt = succeeds_json(&["rebuild"], data_dir, &[]);
    assert_eq!(rebuilt["events"], 2 * EVENTS_PER_PATIENT);
    let audit_events: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM chartlog_events WHERE stream_id LIKE 'audit-%'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(audit_events, 1, "the rebuild's record, on an audit stream");

    // A rebuild that fails (on a forged event) is on the trail too, as a failure.
    sqlx::query("DROP TRIGGER chartlog_events_no_update")
        .execute(&pool)
        .await
        .expect("drop trigger");
    let forged = StreamId::patient(patients[0]);
    flip_a_ciphertext_bit(data_dir, &forged).await;
    let failed = chartlog(&["rebuild"], data_dir, &["chart"]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    assert!(
        stdout(&failed).is_empty(),
        "no summary: {}",
        stdout(&failed)
    );
    flip_a_ciphertext_bit(data_dir, &forged).await;

    // Folded by the next rebuild of the audit trail, which goes through both records (its own
    // comes after, and is not in the trail yet).
    let rebuilt = succeeds_json(&["rebuild"], data_dir, &["audit_trail"]);
    assert_eq!(rebuilt["events"], 2 * EVENTS_PER_PATIENT + 2);
    let read_models = sqlite_read_models(data_dir).await;
    let rows: Vec<OperatorAuditRow> = sqlx::query_as(
        "SELECT lower(hex(user_id)), role, purpose_of_use, break_glass, action, outcome, \
                patient_id IS NULL, record_id IS NULL \
         FROM chartlog_audit_trail WHERE entity = 'read_models' \
         ORDER BY occurred_at_us, audit_id",
    )
    .fetch_all(&read_models)
    .await
    .expect("the rebuilds' audit rows");
    let operator = CLI_OPERATOR_USER_ID.replace('-', "");
    let row = |outcome: &str| {
        (
            operator.clone(),
            "system".to_owned(),
            "system_administration".to_owned(),
            0,
            "create".to_owned(),
            outcome.to_owned(),
            true,
            true,
        )
    };
    assert_eq!(rows, vec![row("success"), row("failure")]);
    let all: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM chartlog_audit_trail")
        .fetch_one(&read_models)
        .await
        .expect("count");
    assert_eq!(
        all,
        2 * EVENTS_PER_PATIENT as i64 + 2,
        "a row per patient event, and the two rebuilds' rows"
    );
    pool.close().await;
    read_models.close().await;

    // The records are signed events like any other: the log verifies.
    let report = succeeds_json(&["verify"], data_dir, &[]);
    assert_eq!(report["intact"], true, "{report}");
}

#[test]
fn demo_loads_patients_and_an_account_per_role_and_refuses_a_database_with_patients() {
    let dir = TestDir::new();
    let out = succeeds(&["demo"], dir.data_dir(), &["--patients", "3"]);
    assert!(out.contains("loaded 3 synthetic patients"), "{out}");
    for name in [
        "demo.physician",
        "demo.nurse",
        "demo.radiologist",
        "demo.labtech",
        "demo.auditor",
        "demo.analyst",
        "demo.patient",
    ] {
        assert!(out.contains(name), "{name} missing: {out}");
    }
    let listed = succeeds(&["users", "list"], dir.data_dir(), &[]);
    assert!(listed.contains("demo.patient\tpatient\tactive"), "{listed}");
    // The records verify, and the de-identified views fill from them.
    succeeds(&["verify"], dir.data_dir(), &[]);
    succeeds(&["rebuild"], dir.data_dir(), &["deidentified"]);
    let patients = succeeds(&["deid", "export"], dir.data_dir(), &["patients"]);
    assert_eq!(patients.lines().count(), 3, "{patients}");

    let again = chartlog(&["demo"], dir.data_dir(), &[]);
    assert!(
        !again.status.success(),
        "a database with patients is refused"
    );
    assert!(
        stderr(&again).contains("already holds 3 patients"),
        "{}",
        stderr(&again)
    );
}

#[tokio::test]
async fn verify_finds_events_moved_across_streams_by_the_signed_checkpoints() {
    let (dir, patients) = sqlite_clinic(&[41, 42]).await;
    // What the server does every minute and at shutdown.
    let ledger = sqlite_ledger(dir.data_dir()).await;
    let (_, signing) = load_or_create_key_files(&key_dir(dir.data_dir())).expect("key files");
    let mut checkpointer = chartlog_store::checkpoints::LogCheckpointer::resume(
        ledger.store().clone(),
        Arc::clone(signing.active()),
    )
    .await
    .expect("resume");
    checkpointer.checkpoint(now()).await.expect("checkpoint");
    let pool = ledger.store().pool().clone();
    let intact = succeeds_json(&["verify"], dir.data_dir(), &[]);
    assert_eq!(intact["checkpoints"], 1, "{intact}");

    // The first patient's last event and the second patient's first trade places in the
    // global order; each stream keeps its own order, so only the checkpoint can tell.
    let position = |patient: PatientId, version: u64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT position FROM chartlog_events WHERE stream_id = ?1 AND stream_version = ?2",
            )
            .bind(format!("patient-{patient}"))
            .bind(version as i64)
            .fetch_one(&pool)
            .await
            .expect("position")
        }
    };
    let a = position(patients[0], EVENTS_PER_PATIENT).await;
    let b = position(patients[1], 1).await;
    assert_eq!(b, a + 1);
    sqlx::query("DROP TRIGGER chartlog_events_no_update")
        .execute(&pool)
        .await
        .expect("drop trigger");
    for (from, to) in [(a, -1), (b, a), (-1, b)] {
        sqlx::query("UPDATE chartlog_events SET position = ?1 WHERE position = ?2")
            .bind(to)
            .bind(from)
            .execute(&pool)
            .await
            .expect("swap");
    }
    pool.close().await;

    let output = chartlog(&["verify"], dir.data_dir(), &["--json"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let report: Value = serde_json::from_str(stdout(&output).trim()).expect("JSON");
    assert_eq!(report["breaks"][0]["stream"], "log-checkpoints", "{report}");
    assert_eq!(
        report["breaks"][0]["problem"], "checkpoint_mismatch",
        "{report}"
    );
}

/// Signs a checkpoint over the log, as the server does every minute and at shutdown; returns
/// the position it covers.
async fn checkpoint_log(data_dir: &Path) -> u64 {
    let ledger = sqlite_ledger(data_dir).await;
    let (_, signing) = load_or_create_key_files(&key_dir(data_dir)).expect("key files");
    let covered = chartlog_store::checkpoints::LogCheckpointer::resume(
        ledger.store().clone(),
        Arc::clone(signing.active()),
    )
    .await
    .expect("resume")
    .checkpoint(now())
    .await
    .expect("checkpoint")
    .expect("events to cover");
    ledger.store().pool().close().await;
    covered
}

async fn position_in_stream(pool: &sqlx::SqlitePool, stream: &StreamId, version: i64) -> i64 {
    sqlx::query_scalar(
        "SELECT position FROM chartlog_events WHERE stream_id = ?1 AND stream_version = ?2",
    )
    .bind(stream.as_str())
    .bind(version)
    .fetch_one(pool)
    .await
    .expect("position")
}

#[tokio::test]
async fn verify_finds_events_of_one_stream_reordered_after_the_last_checkpoint() {
    let (dir, _) = sqlite_clinic(&[41]).await;
    let data_dir = dir.data_dir();
    checkpoint_log(data_dir).await;
    let ledger = sqlite_ledger(data_dir).await;
    let later = register(&ledger, 42).await;
    let stream = StreamId::patient(later);
    let pool = ledger.store().pool().clone();
    // Versions 4 and 5 of a stream no checkpoint covers yet trade places in the global log:
    // the stream read in version order still chains, and no checkpoint has its order.
    let a = position_in_stream(&pool, &stream, 4).await;
    let b = position_in_stream(&pool, &stream, 5).await;
    sqlx::query("DROP TRIGGER chartlog_events_no_update")
        .execute(&pool)
        .await
        .expect("drop trigger");
    for (from, to) in [(a, -1), (b, a), (-1, b)] {
        sqlx::query("UPDATE chartlog_events SET position = ?1 WHERE position = ?2")
            .bind(to)
            .bind(from)
            .execute(&pool)
            .await
            .expect("swap");
    }
    pool.close().await;

    let output = chartlog(&["verify"], data_dir, &["--json"]);
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let report: Value = serde_json::from_str(stdout(&output).trim()).expect("JSON");
    assert_eq!(report["checkpoints"], 1, "{report}");
    assert_eq!(report["broken_streams"], 1, "{report}");
    let found = &report["breaks"][0];
    assert_eq!(found["stream"], stream.as_str(), "{report}");
    assert_eq!(found["version"], 5, "{report}");
    assert_eq!(found["position"], a, "{report}");
    assert_eq!(found["problem"], "position_out_of_order", "{report}");

    let output = chartlog(
        &["verify"],
        data_dir,
        &["--json", "--patient", &later.to_string()],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stdout(&output));
    let report: Value = serde_json::from_str(stdout(&output).trim()).expect("JSON");
    assert_eq!(
        report["breaks"][0]["problem"], "position_out_of_order",
        "{report}"
    );
}

/// The `POSITION:DIGEST` a verify report names as its last signed checkpoint.
fn last_checkpoint(report: &Value) -> (u64, String) {
    let anchor = &report["last_checkpoint"];
    let position = anchor["position"].as_u64().expect("a position");
    let digest = anchor["digest"].as_str().expect("a digest");
    (position, format!("{position}:{digest}"))
}

#[tokio::test]
async fn verify_expect_checkpoint_finds_a_log_cut_back_with_its_checkpoints() {
    let (dir, _) = sqlite_clinic(&[41]).await;
    let data_dir = dir.data_dir();
    let first = checkpoint_log(data_dir).await;
    let (position, first_anchor) = last_checkpoint(&succeeds_json(&["verify"], data_dir, &[]));
    assert_eq!(position, first);
    let ledger = sqlite_ledger(data_dir).await;
    let later = register(&ledger, 42).await;
    ledger.store().pool().close().await;
    let second = checkpoint_log(data_dir).await;
    let (position, anchor) = last_checkpoint(&succeeds_json(&["verify"], data_dir, &[]));
    assert_eq!(position, second);
    let text = succeeds(&["verify"], data_dir, &[]);
    assert!(
        text.contains(&format!("last signed checkpoint: {anchor}")),
        "{text}"
    );
    succeeds(&["verify"], data_dir, &["--expect-checkpoint", &anchor]);

    // The later patient's events and stream row go, with the checkpoint over them, and the
    // checkpoint stream's head is wound back to the first checkpoint.
    let store = SqliteEventStore::open(&sqlite_path(data_dir))
        .await
        .expect("store");
    for statement in [
        "DROP TRIGGER chartlog_events_no_delete",
        "DELETE FROM chartlog_events WHERE stream_id = ?1",
        "DELETE FROM chartlog_streams WHERE stream_id = ?1",
        "DELETE FROM chartlog_events WHERE stream_id = 'log-checkpoints' AND stream_version = 2",
        "UPDATE chartlog_streams SET version = 1, head_hash = (SELECT hash FROM chartlog_events \
         WHERE stream_id = 'log-checkpoints' AND stream_version = 1) \
         WHERE stream_id = 'log-checkpoints'",
    ] {
        sqlx::query(statement)
            .bind(StreamId::patient(later).as_str())
            .execute(store.pool())
            .await
            .unwrap_or_else(|error| panic!("{statement}: {error}"));
    }
    store.pool().close().await;

    // From inside the database, nothing is missing.
    let report = succeeds_json(&["verify"], data_dir, &[]);
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(last_checkpoint(&report).1, first_anchor, "{report}");
    succeeds(
        &["verify"],
        data_dir,
        &["--expect-checkpoint", &first_anchor],
    );

    // Held to the point recorded before the cut, the log falls short of it.
    let output = chartlog(
        &["verify"],
        data_dir,
        &["--json", "--expect-checkpoint", &anchor],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    let report: Value = serde_json::from_str(stdout(&output).trim()).expect("JSON");
    assert_eq!(report["intact"], false, "{report}");
    let problems: Vec<&str> = report["breaks"]
        .as_array()
        .expect("breaks")
        .iter()
        .filter_map(|found| found["problem"].as_str())
        .collect();
    assert_eq!(
        problems,
        ["checkpoint_anchor_missing", "checkpoint_anchor_mismatch"],
        "{report}"
    );
    // The position alone is enough to find the cut.
    let output = chartlog(
        &["verify"],
        data_dir,
        &["--expect-checkpoint", &second.to_string()],
    );
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(
        stdout(&output).contains("checkpoint_anchor_missing"),
        "{}",
        stdout(&output)
    );
}

/// A fresh KEK as a `CHARTLOG_KEK` entry, and its key in base64.
fn kek_entry(id: &str) -> (String, String) {
    let key: [u8; KEK_BYTES] = rand::random();
    let key = BASE64.encode(key);
    (format!("{id}:{key}"), key)
}

/// Runs with `CHARTLOG_KEK=<kek>` and expects success; returns stdout.
fn succeeds_with_kek(args: &[&str], data_dir: &Path, extra: &[&str], kek: &str) -> String {
    succeeds_with_env(args, data_dir, extra, &[("CHARTLOG_KEK", kek)])
}

/// [`succeeds_with_kek`] with `--json` added; returns the one JSON object printed.
fn succeeds_json_with_kek(args: &[&str], data_dir: &Path, kek: &str) -> Value {
    let out = succeeds_with_kek(args, data_dir, &["--json"], kek);
    serde_json::from_str(out.trim()).unwrap_or_else(|error| panic!("{error}: {out}"))
}

/// Runs with `CHARTLOG_KEK=<kek>` and expects a failure; returns stderr.
fn fails_with_kek(args: &[&str], data_dir: &Path, extra: &[&str], kek: &str) -> String {
    let output = chartlog_with_env(args, data_dir, extra, &[("CHARTLOG_KEK", kek)]);
    assert!(
        !output.status.success(),
        "chartlog {args:?} {extra:?} succeeded: {}",
        stdout(&output)
    );
    stderr(&output)
}

#[tokio::test]
async fn a_kek_ring_in_chartlog_kek_never_touches_the_data_directory() {
    let dir = TestDir::new();
    let data_dir = dir.data_dir();
    let kek_file = key_dir(data_dir).join(KEK_FILE_NAME);
    let (first, first_key) = kek_entry("kek-vault-1");
    let (second, second_key) = kek_entry("kek-vault-2");
    let secrets = [first_key.clone(), second_key.clone()];
    let mut printed = String::new();

    // The server's first start makes every key file but the KEK's.
    let mut server = Server::start_with_env(data_dir, "info", &[("CHARTLOG_KEK", &first)], &[]);
    assert!(server.signal_and_wait("TERM").success());
    printed.push_str(&server.stderr());
    assert!(key_dir(data_dir).join(SIGNING_FILE_NAME).is_file());
    assert!(!kek_file.exists(), "the KEK stays in the variable");

    printed.push_str(&succeeds_with_kek(
        &["demo"],
        data_dir,
        &["--patients", "3"],
        &first,
    ));
    assert!(!kek_file.exists());
    let shown = succeeds_json_with_kek(&["keys", "show"], data_dir, &first);
    assert_eq!(shown["kek_source"], "environment", "{shown}");
    assert_eq!(shown["key_encryption_keys"][0]["id"], "kek-vault-1");
    let data_keys = shown["data_keys"]["active"].as_u64().expect("a count");
    assert!(data_keys >= 3, "{shown}");
    assert_eq!(
        shown["key_encryption_keys"][0]["data_keys"], data_keys,
        "{shown}"
    );
    assert!(
        succeeds_with_kek(&["keys", "show"], data_dir, &[], &first)
            .contains("key-encryption keys (from CHARTLOG_KEK)")
    );

    // Without the variable there is no ring.
    let without = chartlog(&["keys", "show"], data_dir, &[]);
    assert!(!without.status.success());
    assert!(
        stderr(&without).contains("and CHARTLOG_KEK is not set"),
        "{}",
        stderr(&without)
    );
    // A ring that holds none of the KEKs wrapping the data keys (a mistyped variable) is
    // refused before anything is sealed under it.
    for args in [
        &["serve", "--listen", "127.0.0.1:0"][..],
        &["rebuild"],
        &["demo", "--force"],
        &["keys", "rotate-kek"],
    ] {
        let refused = fails_with_kek(args, data_dir, &[], &second);
        assert!(
            refused.contains("holds none of the KEKs that wrap this database's"),
            "{args:?}: {refused}"
        );
        printed.push_str(&refused);
    }
    assert_eq!(
        wrapping_keks(data_dir).await,
        vec!["kek-vault-1".to_owned(); usize::try_from(data_keys).expect("a count")],
        "nothing was sealed under the wrong ring"
    );

    // A forgotten key file next to the variable is refused, by every command.
    KeyRing::generate(KekId::generate())
        .save(&kek_file)
        .expect("a key file");
    for args in [&["keys", "show"][..], &["rebuild"], &["keys", "rotate-kek"]] {
        let refused = fails_with_kek(args, data_dir, &[], &first);
        assert!(
            refused.contains("both CHARTLOG_KEK and the key file"),
            "{args:?}: {refused}"
        );
        printed.push_str(&refused);
    }
    std::fs::remove_file(&kek_file).expect("remove the key file");

    // A malformed value is named, never echoed.
    let short = format!("kek-vault-1:{}", &first_key[..first_key.len() - 8]);
    let malformed = fails_with_kek(&["keys", "show"], data_dir, &[], &short);
    assert!(
        malformed.contains("CHARTLOG_KEK is not a KEK ring"),
        "{malformed}"
    );
    assert!(malformed.contains("must be 64 bytes"), "{malformed}");
    printed.push_str(&malformed);

    // Rotation: the operator puts a new KEK first; the command re-wraps every data key under
    // it. It cannot make a KEK itself, nor retire one from a variable.
    let both = format!("{second},{first}");
    let rotated = succeeds_json_with_kek(&["keys", "rotate-kek"], data_dir, &both);
    assert_eq!(rotated["kek_source"], "environment", "{rotated}");
    assert_eq!(rotated["active_kek_id"], "kek-vault-2");
    assert_eq!(rotated["resumed"], true);
    assert_eq!(rotated["rewrapped_data_keys"], data_keys);
    let again = fails_with_kek(&["keys", "rotate-kek"], data_dir, &[], &both);
    assert!(
        again.contains("put a new KEK first in CHARTLOG_KEK"),
        "{again}"
    );
    let retire = fails_with_kek(
        &["keys", "rotate-kek", "--retire-old"],
        data_dir,
        &[],
        &both,
    );
    assert!(
        retire.contains("--retire-old edits the key file"),
        "{retire}"
    );
    printed.push_str(&again);
    printed.push_str(&retire);
    // With the audit records of the rotation and of the refused second run, each under a
    // data key of its own (the refusal of --retire-old came before the database was opened).
    assert_eq!(
        wrapping_keks(data_dir).await,
        vec!["kek-vault-2".to_owned(); usize::try_from(data_keys).expect("a count") + 2]
    );

    // The new KEK alone opens every record now: the rebuild decrypts every event.
    let rebuilt = succeeds_json_with_kek(&["rebuild"], data_dir, &second);
    assert!(
        rebuilt["events"].as_u64().is_some_and(|events| events > 0),
        "{rebuilt}"
    );
    succeeds(&["verify"], data_dir, &[]);
    assert!(!kek_file.exists());
    assert_no_secret(&printed, &secrets);
}

#[tokio::test]
async fn erase_is_refused_while_a_legal_hold_is_in_force() {
    let (dir, patients) = sqlite_clinic(&[41]).await;
    let data_dir = dir.data_dir();
    let patient = patients[0];
    let id = patient.to_string();
    let hold_id = chartlog_domain::LegalHoldId::from_uuid(Uuid::now_v7());
    let ledger = sqlite_ledger(data_dir).await;
    ledger
        .execute(
            patient,
            PatientCommand::PlaceLegalHold {
                hold_id,
                reason: chartlog_domain::patient::LegalHoldReason::Litigation,
            },
            physician(),
            now(),
        )
        .await
        .expect("place the hold");
    ledger.store().pool().close().await;

    let refused = chartlog(
        &["erase", &id],
        data_dir,
        &["--reason", "patient_request", "--yes"],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("legal hold"),
        "{}",
        stderr(&refused)
    );
    assert!(stdout(&refused).is_empty(), "no certificate");
    let (_, wrapped, destroyed) = data_key_row(data_dir, patient).await;
    assert!(wrapped && !destroyed, "the key is kept under the hold");

    let ledger = sqlite_ledger(data_dir).await;
    let held = ledger.load(patient).await.expect("the record opens");
    assert_eq!(held.patient.legal_holds_in_force(), 1);
    ledger
        .execute(
            patient,
            PatientCommand::ReleaseLegalHold { hold_id },
            physician(),
            now(),
        )
        .await
        .expect("release the hold");
    ledger.store().pool().close().await;

    let certificate = succeeds_json(
        &["erase", &id],
        data_dir,
        &["--reason", "patient_request", "--yes"],
    );
    assert_eq!(certificate["patient_id"], id.as_str());
    let (_, wrapped, destroyed) = data_key_row(data_dir, patient).await;
    assert!(!wrapped && destroyed, "released, the erasure goes through");
}

#[tokio::test]
async fn erase_for_an_elapsed_retention_period_waits_the_period_out() {
    let (dir, patients) = sqlite_clinic(&[42]).await;
    let data_dir = dir.data_dir();
    let id = patients[0].to_string();
    let erase = ["--reason", "retention_period_elapsed", "--yes"];

    // The record's last entry is from November 2025: 200 years are far from elapsed.
    let refused = chartlog(
        &["erase", &id],
        data_dir,
        &[&erase[..], &["--retention-years", "200"]].concat(),
    );
    assert!(!refused.status.success());
    let message = stderr(&refused);
    assert!(
        message.contains("within the retention period")
            && message.contains("200 year(s) after their last entry"),
        "{message}"
    );
    for phi in phi_of(42) {
        assert!(!message.contains(&phi), "PHI in the refusal: {message}");
    }
    // The date the period ends would give away the date of the last entry.
    assert!(
        !message.contains("until") && !message.contains("2225"),
        "{message}"
    );
    assert!(stdout(&refused).is_empty(), "no certificate");
    let (_, wrapped, destroyed) = data_key_row(data_dir, patients[0]).await;
    assert!(wrapped && !destroyed, "the key is kept inside the period");

    // One year after the last entry has passed, and the patient came of age long ago.
    let certificate = succeeds_json(
        &["erase", &id],
        data_dir,
        &[
            &erase[..],
            &["--retention-years", "1", "--retention-age-of-majority", "0"],
        ]
        .concat(),
    );
    assert_eq!(certificate["reason"], "retention_period_elapsed");
    let (_, wrapped, destroyed) = data_key_row(data_dir, patients[0]).await;
    assert!(!wrapped && destroyed, "the period has elapsed");
}

/// Flips one bit of the wrapped data key of `owner`, as a damaged or tampered row would.
async fn alter_wrapped_key(data_dir: &Path, owner: &StreamId) {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", sqlite_path(data_dir).display()))
        .await
        .expect("open");
    let mut wrapped: Vec<u8> =
        sqlx::query_scalar("SELECT wrapped_key FROM chartlog_data_keys WHERE owner_stream_id = ?1")
            .bind(owner.as_str())
            .fetch_one(&pool)
            .await
            .expect("the wrapped key");
    wrapped[0] ^= 1;
    sqlx::query("UPDATE chartlog_data_keys SET wrapped_key = ?1 WHERE owner_stream_id = ?2")
        .bind(wrapped)
        .bind(owner.as_str())
        .execute(&pool)
        .await
        .expect("alter the wrapped key");
    pool.close().await;
}

#[tokio::test]
async fn rotate_kek_rewraps_every_other_key_past_one_that_does_not_unwrap_and_names_it() {
    let (dir, patients) = sqlite_clinic(&[71, 72, 73]).await;
    let data_dir = dir.data_dir();
    let (first_kek, _) = kek_ids(data_dir);
    // The key listed first: a rotation that stopped at it would re-wrap nothing.
    let mut owners: Vec<StreamId> = patients.iter().map(|&p| StreamId::patient(p)).collect();
    owners.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let damaged = owners[0].clone();
    alter_wrapped_key(data_dir, &damaged).await;

    for run in 0..2 {
        let output = chartlog(
            &["keys", "rotate-kek"],
            data_dir,
            &["--json", "--retire-old"],
        );
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        let summary: Value = serde_json::from_str(stdout(&output).trim()).expect("a summary");
        let active = summary["active_kek_id"]
            .as_str()
            .expect("active")
            .to_owned();
        assert_eq!(summary["rewrapped_data_keys"], if run == 0 { 2 } else { 0 });
        let unreadable = summary["unreadable_data_keys"].as_array().expect("named");
        assert_eq!(unreadable.len(), 1, "{summary}");
        assert_eq!(unreadable[0]["owner"], damaged.as_str());
        assert_eq!(unreadable[0]["kek_id"], first_kek.as_str());
        assert_eq!(unreadable[0]["problem"], "does_not_unwrap");
        assert_eq!(summary["retired_kek_ids"].as_array().map(Vec::len), Some(0));
        let message = stderr(&output);
        assert!(
            message.contains("1 data keys do not unwrap")
                && message.contains(damaged.as_str())
                && message.contains("Running this again will not change them"),
            "{message}"
        );
        assert!(
            !message.contains("every key is still readable"),
            "{message}"
        );
        let mut wrapping = wrapping_keks(data_dir).await;
        wrapping.sort();
        // Two patients' keys, and each run's audit record's key, under the new KEK.
        let mut expected = vec![active; 2 + run + 1];
        expected.push(first_kek.clone());
        expected.sort();
        assert_eq!(
            wrapping, expected,
            "every other key re-wrapped; none retired"
        );
        assert!(kek_ids(data_dir).1.contains(&first_kek));
    }
    // The others open under the ring.
    let ledger = sqlite_ledger(data_dir).await;
    for &patient in &patients {
        if StreamId::patient(patient) != damaged {
            ledger.load(patient).await.expect("the record opens");
        }
    }
    ledger.store().pool().close().await;
}

/// The bytes of every file in the key directory, by name.
fn key_files_of(data_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(key_dir(data_dir))
        .expect("the key directory")
        .map(|entry| {
            let entry = entry.expect("an entry");
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).expect("a key file"),
            )
        })
        .filter(|(name, _)| name != "rotation.lock")
        .collect();
    files.sort();
    files
}

#[tokio::test]
async fn operator_commands_never_create_a_database_and_retire_old_refuses_one_without_keys() {
    // The key directory of a server whose database is on PostgreSQL, named only in the
    // server's environment: there is no SQLite file in the data directory.
    let dir = TestDir::new();
    let data_dir = dir.data_dir();
    load_or_create_key_files(&key_dir(data_dir)).expect("key files");
    let keys_before = key_files_of(data_dir);
    let database = sqlite_path(data_dir);
    for args in [
        &["keys", "rotate-kek", "--retire-old"][..],
        &["keys", "rotate-kek"],
        &["keys", "show"],
        &["users", "list"],
        &["users", "add", "--username", "a.nurse", "--role", "nurse"],
        &["rebuild"],
        &[
            "erase",
            "01900000-0000-7000-8000-0000000000e1",
            "--reason",
            "patient_request",
            "--yes",
        ],
        &["deid", "export", "observations"],
    ] {
        let output = chartlog(args, data_dir, &[]);
        assert!(!output.status.success(), "{args:?}: {}", stdout(&output));
        let message = stderr(&output);
        assert!(
            message.contains(&format!("no database at {}", database.display()))
                && message.contains("--database-url"),
            "{args:?}: {message}"
        );
        assert!(
            !database.exists(),
            "{args:?} created {}",
            database.display()
        );
        assert_eq!(key_files_of(data_dir), keys_before, "{args:?}");
    }

    // A database that exists but wraps no data key (made by mistake, or by an older chartlog
    // that created one here): retiring KEKs on it would check nothing.
    succeeds(&["migrate"], data_dir, &[]);
    let output = chartlog(&["keys", "rotate-kek"], data_dir, &["--retire-old"]);
    assert!(!output.status.success(), "{}", stdout(&output));
    let message = stderr(&output);
    assert!(
        message.contains(&format!(
            "nothing is wrapped under any KEK in the sqlite file {}",
            database.display()
        )) && message.contains("is this the server's database?"),
        "{message}"
    );
    assert_eq!(
        key_files_of(data_dir),
        keys_before,
        "no KEK made or retired"
    );
}

/// Moves the KEK ring of the key file into a `CHARTLOG_KEK` value, as an operator who keeps it
/// in a secret manager has it, and removes the file.
fn kek_file_to_variable(data_dir: &Path) -> String {
    let path = key_dir(data_dir).join(KEK_FILE_NAME);
    let file = read_json(&path);
    let active = file["active"].as_str().expect("active");
    let key = file["keys"]
        .as_array()
        .expect("KEKs")
        .iter()
        .find(|entry| entry["id"] == active)
        .and_then(|entry| entry["key"].as_str())
        .expect("the active KEK");
    std::fs::remove_file(&path).expect("remove the key file");
    format!("{active}:{key}")
}

/// The events on audit streams.
async fn audit_events(data_dir: &Path) -> i64 {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", sqlite_path(data_dir).display()))
        .await
        .expect("open");
    let count =
        sqlx::query_scalar("SELECT COUNT(*) FROM chartlog_events WHERE stream_id LIKE 'audit-%'")
            .fetch_one(&pool)
            .await
            .expect("count");
    pool.close().await;
    count
}

#[tokio::test]
async fn operator_commands_in_a_wrong_data_directory_make_no_key_and_sign_nothing() {
    let (dir, _patients) = sqlite_clinic(&[81]).await;
    let data_dir = dir.data_dir();
    let kek = kek_file_to_variable(data_dir);
    // The database named by URL, as on a server whose data directory is elsewhere; the KEK
    // ring in the variable, which fits it: only the signing key is missing.
    let url = format!("sqlite:{}", sqlite_path(data_dir).display());
    let wrong = TestDir::new();
    for args in [&["users", "list"][..], &["keys", "show"], &["rebuild"]] {
        let output = chartlog_with_env(
            args,
            wrong.data_dir(),
            &["--database-url", &url],
            &[("CHARTLOG_KEK", &kek)],
        );
        assert!(!output.status.success(), "{args:?}: {}", stdout(&output));
        let message = stderr(&output);
        let signing = key_dir(wrong.data_dir()).join(SIGNING_FILE_NAME);
        assert!(
            message.contains(&format!("no key file at {}", signing.display())),
            "{args:?}: {message}"
        );
        let made: Vec<_> = std::fs::read_dir(key_dir(wrong.data_dir()))
            .map(|entries| {
                entries
                    .map(|entry| entry.expect("entry").file_name())
                    .collect()
            })
            .unwrap_or_default();
        assert!(made.is_empty(), "{args:?} made key files: {made:?}");
    }
    assert_eq!(
        audit_events(data_dir).await,
        0,
        "nothing signed into the log"
    );
    let report = succeeds_json(&["verify"], data_dir, &[]);
    assert_eq!(report["intact"], true, "{report}");
}

/// The accounts of the SQLite database of `data_dir`, by user name.
async fn usernames(data_dir: &Path) -> Vec<String> {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", sqlite_path(data_dir).display()))
        .await
        .expect("open");
    let names = sqlx::query_scalar("SELECT username FROM chartlog_access_users ORDER BY username")
        .fetch_all(&pool)
        .await
        .expect("accounts");
    pool.close().await;
    names
}

#[tokio::test]
async fn an_account_change_is_made_only_when_its_audit_record_can_be_written() {
    let (dir, _patients) = sqlite_clinic(&[91]).await;
    let data_dir = dir.data_dir();
    let kek = kek_file_to_variable(data_dir);
    let add = ["--username", "x.nurse", "--role", "nurse"];

    // A KEK ring the audit record cannot be sealed under: refused before the account is made.
    let (other, _) = kek_entry("kek-other");
    let output = chartlog_with_env(
        &["users", "add"],
        data_dir,
        &add,
        &[("CHARTLOG_KEK", &other)],
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("holds none of the KEKs that wrap this database's"),
        "{}",
        stderr(&output)
    );
    assert!(stdout(&output).is_empty(), "{}", stdout(&output));
    assert!(usernames(data_dir).await.is_empty(), "no account made");

    // An audit append that fails after the change: the one-time password is withheld, and
    // the message says how to get one once the audit log can be written.
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", sqlite_path(data_dir).display()))
        .await
        .expect("open");
    sqlx::query(
        "CREATE TRIGGER refuse_audit BEFORE INSERT ON chartlog_events \
         WHEN NEW.stream_id LIKE 'audit-%' BEGIN SELECT RAISE(ABORT, 'audit refused'); END",
    )
    .execute(&pool)
    .await
    .expect("a trigger");
    let output = chartlog_with_env(&["users", "add"], data_dir, &add, &[("CHARTLOG_KEK", &kek)]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let user_id = user_id_of(&stdout(&output));
    assert!(
        !stdout(&output).contains("one-time password"),
        "{}",
        stdout(&output)
    );
    assert!(
        stderr(&output).contains(&format!("chartlog users reset-password {user_id}")),
        "{}",
        stderr(&output)
    );
    sqlx::query("DROP TRIGGER refuse_audit")
        .execute(&pool)
        .await
        .expect("drop the trigger");
    pool.close().await;

    let reset = succeeds_with_env(
        &["users", "reset-password", &user_id],
        data_dir,
        &[],
        &[("CHARTLOG_KEK", &kek)],
    );
    assert!(reset.contains("one-time password: "), "{reset}");
    assert_eq!(audit_events(data_dir).await, 1, "the reset's record");
}

/// The audit trail's rows of `entity` after a rebuild of it: (user id, role, action, outcome,
/// record id), oldest first.
async fn audit_rows_of(
    data_dir: &Path,
    entity: &str,
) -> Vec<(String, String, String, String, Option<String>)> {
    succeeds(&["rebuild"], data_dir, &["audit_trail"]);
    let read_models = sqlite_read_models(data_dir).await;
    let rows = sqlx::query_as(
        "SELECT lower(hex(user_id)), role, action, outcome, nullif(lower(hex(record_id)), '') \
         FROM chartlog_audit_trail WHERE entity = ?1 ORDER BY occurred_at_us, audit_id",
    )
    .bind(entity)
    .fetch_all(&read_models)
    .await
    .expect("audit rows");
    read_models.close().await;
    rows
}

#[tokio::test]
async fn key_rotations_are_on_the_audit_trail_with_the_operator_as_actor_and_their_outcome() {
    let (dir, patients) = sqlite_clinic(&[101, 102]).await;
    let data_dir = dir.data_dir();
    succeeds(&["keys", "rotate-kek"], data_dir, &[]);
    succeeds(&["keys", "rotate-signing"], data_dir, &[]);
    // A rotation that cannot complete (a key that does not unwrap) is recorded as a failure.
    alter_wrapped_key(data_dir, &StreamId::patient(patients[0])).await;
    let failed = chartlog(&["keys", "rotate-kek"], data_dir, &[]);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    // Flipped back (the key was left under the old KEK), so the rebuild below opens it.
    alter_wrapped_key(data_dir, &StreamId::patient(patients[0])).await;

    let operator = CLI_OPERATOR_USER_ID.replace('-', "");
    let row = |outcome: &str| {
        (
            operator.clone(),
            "system".to_owned(),
            "update".to_owned(),
            outcome.to_owned(),
            None,
        )
    };
    assert_eq!(
        audit_rows_of(data_dir, "keys").await,
        vec![row("success"), row("success"), row("failure")]
    );
}

#[test]
fn demo_records_its_accounts_and_refuses_a_database_with_accounts_of_its_own() {
    let dir = TestDir::new();
    let out = succeeds(&["demo"], dir.data_dir(), &["--patients", "1"]);
    let created: Vec<String> = succeeds(&["users", "list"], dir.data_dir(), &[])
        .lines()
        .filter(|line| line.contains("\tdemo."))
        .map(|line| line.split('\t').next().expect("a user id").replace('-', ""))
        .collect();
    assert_eq!(created.len(), 7, "{out}");
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    let rows = runtime.block_on(audit_rows_of(dir.data_dir(), "user"));
    let operator = CLI_OPERATOR_USER_ID.replace('-', "");
    let mut recorded: Vec<String> = rows
        .iter()
        .filter(|row| row.2 == "create")
        .map(|(user, role, _, outcome, record)| {
            assert_eq!(
                (user, role.as_str(), outcome.as_str()),
                (&operator, "system", "success")
            );
            record.clone().expect("the account")
        })
        .collect();
    recorded.sort();
    let mut created = created;
    created.sort();
    assert_eq!(
        recorded, created,
        "each demo account's creation is recorded"
    );

    // A database people work in: patients, and an account of its own. --force adds patients
    // to a database of demo data; it never puts demo accounts next to people's.
    let (clinic, _patients) = runtime.block_on(sqlite_clinic(&[111]));
    succeeds(
        &["users", "add"],
        clinic.data_dir(),
        &["--username", "real.nurse", "--role", "nurse"],
    );
    let refused = chartlog(
        &["demo"],
        clinic.data_dir(),
        &["--force", "--patients", "1"],
    );
    assert!(!refused.status.success(), "{}", stdout(&refused));
    assert!(
        stderr(&refused).contains("holds 1 accounts besides 'admin' and the demo's"),
        "{}",
        stderr(&refused)
    );
    let listed = succeeds(&["users", "list"], clinic.data_dir(), &[]);
    assert!(!listed.contains("demo."), "{listed}");
}
