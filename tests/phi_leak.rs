//! The PHI leak scan (DESIGN.md "Cross-cutting rules"): a full workload through the real
//! binary, logging at trace level, puts a marker value in every PHI field. Afterwards no marker
//! may appear in the server's output, in an error body, in any answer other than the chart and
//! history the authorised caller asked for, in the audit rows, in any database table outside
//! sealed columns, or in any other file of the data directory.
//!
//! The server has no metrics endpoint (see `crates/api/src/routes.rs`), so there is no metrics
//! output to scan.

#[allow(dead_code)]
#[path = "support/api_client.rs"]
mod api_client;
#[path = "support/fresh_postgres.rs"]
mod fresh_postgres;
#[allow(dead_code)]
mod support;

use std::fs;
use std::path::Path;

use api_client::{Api, Exchange, first_administrator_password, passphrase};
use fresh_postgres::FreshPostgresDatabase;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sqlx::Row;
use support::{Server, TestDir, https_client};

/// Where a marker may legitimately be shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// A PHI field accepted by the server: only in the chart and history answers.
    Phi,
    /// The break-glass reason: only in the break-glass review queue the auditor reads.
    Reason,
    /// PHI in a request the server refused: nowhere at all.
    Refused,
    /// Passwords, TOTP secrets, recovery codes and session tokens: nowhere the server writes.
    Secret,
}

/// One value to look for, under every spelling it could take.
#[derive(Clone, Debug)]
struct Marker {
    label: String,
    kind: Kind,
    spellings: Vec<String>,
}

impl Marker {
    fn new(label: &str, kind: Kind, spellings: &[&str]) -> Marker {
        Marker {
            label: label.to_owned(),
            kind,
            spellings: spellings.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// Case-insensitive byte search: blind indexes upper-case names and MRNs, so a leak could
/// come out in either case.
fn contains(haystack_lowercase: &[u8], needle: &str) -> bool {
    let needle = needle.to_ascii_lowercase();
    let needle = needle.as_bytes();
    !needle.is_empty()
        && haystack_lowercase.len() >= needle.len()
        && haystack_lowercase
            .windows(needle.len())
            .any(|window| window == needle)
}

/// Every marker (and the catch-all prefixes) found in `bytes`, as readable labels.
fn found_in(bytes: &[u8], markers: &[Marker], kinds: &[Kind]) -> Vec<String> {
    let lowercase = bytes.to_ascii_lowercase();
    let mut found = Vec::new();
    for marker in markers.iter().filter(|m| kinds.contains(&m.kind)) {
        for spelling in &marker.spellings {
            if contains(&lowercase, spelling) {
                found.push(format!("{} ({spelling:?})", marker.label));
            }
        }
    }
    // Every free-text marker starts with one of these: a partial copy still shows. The
    // `zqx?` ones count only as a marker starts, at the beginning of a word and followed by
    // its hyphen (`true` below): four letters alone turned up inside a random recovery code
    // ("...-zqxbu-...").
    let prefixes: &[(&str, Kind, bool)] = &[
        ("zqxm", Kind::Phi, true),
        ("zqxr", Kind::Reason, true),
        ("zqxb", Kind::Refused, true),
        ("quartz lantern", Kind::Secret, false),
    ];
    for &(prefix, kind, only_where_a_marker_starts) in prefixes {
        if !kinds.contains(&kind) {
            continue;
        }
        let hit = if only_where_a_marker_starts {
            starts_a_marker(&lowercase, prefix)
        } else {
            contains(&lowercase, prefix)
        };
        if hit {
            found.push(format!("marker prefix {prefix:?}"));
        }
    }
    found
}

/// Whether `prefix` followed by `-` starts a word somewhere in `haystack_lowercase`.
fn starts_a_marker(haystack_lowercase: &[u8], prefix: &str) -> bool {
    let needle = format!("{prefix}-");
    let needle = needle.as_bytes();
    haystack_lowercase
        .windows(needle.len())
        .enumerate()
        .any(|(at, window)| {
            window == needle && (at == 0 || !haystack_lowercase[at - 1].is_ascii_alphanumeric())
        })
}

/// About 200 bytes either side of the first hit, for the failure message.
fn context(text: &str, markers: &[Marker], kinds: &[Kind]) -> String {
    let lowercase = text.to_ascii_lowercase();
    let spellings = markers
        .iter()
        .filter(|m| kinds.contains(&m.kind))
        .flat_map(|m| m.spellings.iter().map(|s| s.to_ascii_lowercase()))
        .chain(["zqxm", "zqxr", "zqxb", "quartz lantern"].map(str::to_owned));
    for spelling in spellings {
        if let Some(at) = lowercase.find(&spelling) {
            let bytes = text.as_bytes();
            let window = &bytes[at.saturating_sub(200)..(at + 200).min(bytes.len())];
            return String::from_utf8_lossy(window).into_owned();
        }
    }
    String::new()
}

/// Whether `text` holds one of `marker`'s own spellings (no catch-all prefixes).
fn shows(text: &str, marker: &Marker) -> bool {
    let lowercase = text.to_ascii_lowercase();
    marker
        .spellings
        .iter()
        .any(|spelling| contains(lowercase.as_bytes(), spelling))
}

const ALL_KINDS: [Kind; 4] = [Kind::Phi, Kind::Reason, Kind::Refused, Kind::Secret];

/// The PHI of one registration and one correction: every field a distinct, valid value.
fn phi_markers() -> Vec<Marker> {
    vec![
        Marker::new("family name", Kind::Phi, &["ZQXM-FAMILY-01"]),
        Marker::new("given name", Kind::Phi, &["ZQXM-GIVEN-02"]),
        Marker::new("second given name", Kind::Phi, &["ZQXM-GIVEN-03"]),
        Marker::new("birth date", Kind::Phi, &["1937-08-19"]),
        Marker::new("address line", Kind::Phi, &["ZQXM-LINE-04"]),
        Marker::new("city", Kind::Phi, &["ZQXM-CITY-05"]),
        Marker::new("postal code", Kind::Phi, &["02139-4307", "021394307"]),
        Marker::new("phone", Kind::Phi, &["(555) 017-9264", "5550179264"]),
        Marker::new("email", Kind::Phi, &["zqxm-email-06@example.org"]),
        Marker::new("MRN", Kind::Phi, &["ZQXM-MRN-07"]),
        Marker::new("SSN", Kind::Phi, &["271-83-6402", "271836402"]),
        Marker::new("health plan number", Kind::Phi, &["ZQXM-PLAN-08"]),
        Marker::new("driver's licence", Kind::Phi, &["ZQXM-DL-09"]),
        Marker::new("corrected family name", Kind::Phi, &["ZQXM-FAMILY-10"]),
        Marker::new("corrected given name", Kind::Phi, &["ZQXM-GIVEN-11"]),
        Marker::new("corrected birth date", Kind::Phi, &["1941-02-27"]),
        Marker::new("corrected address line", Kind::Phi, &["ZQXM-LINE-12"]),
        Marker::new("corrected city", Kind::Phi, &["ZQXM-CITY-13"]),
        Marker::new(
            "corrected postal code",
            Kind::Phi,
            &["10027-6902", "100276902"],
        ),
        Marker::new(
            "corrected phone",
            Kind::Phi,
            &["555-014-3381", "5550143381"],
        ),
        Marker::new("corrected email", Kind::Phi, &["zqxm-email-14@example.net"]),
        Marker::new("corrected MRN", Kind::Phi, &["ZQXM-MRN-15"]),
        Marker::new("corrected SSN", Kind::Phi, &["318-52-7049", "318527049"]),
        Marker::new("passport", Kind::Phi, &["ZQXM-PASS-16"]),
        Marker::new("observation code display", Kind::Phi, &["ZQXM-DISPLAY-17"]),
        Marker::new("observation text", Kind::Phi, &["ZQXM-OBS-18"]),
        Marker::new("condition display", Kind::Phi, &["ZQXM-DISPLAY-19"]),
        Marker::new("allergy substance display", Kind::Phi, &["ZQXM-DISPLAY-20"]),
        Marker::new("medication display", Kind::Phi, &["ZQXM-DISPLAY-21"]),
        Marker::new("note text", Kind::Phi, &["ZQXM-NOTE-22"]),
        Marker::new("amended note text", Kind::Phi, &["ZQXM-NOTE-23"]),
        Marker::new("addendum text", Kind::Phi, &["ZQXM-NOTE-24"]),
        Marker::new("break-glass reason", Kind::Reason, &["ZQXR-REASON-25"]),
    ]
}

fn registration() -> Value {
    json!({
        "name": { "family": "ZQXM-FAMILY-01", "given": ["ZQXM-GIVEN-02", "ZQXM-GIVEN-03"] },
        "birth_date": "1937-08-19",
        "sex": "female",
        "address": {
            "lines": ["ZQXM-LINE-04 Elm Street"],
            "city": "ZQXM-CITY-05",
            "state": "MA",
            "postal_code": "02139-4307",
        },
        "contacts": [{ "phone": "+1 (555) 017-9264" }, { "email": "zqxm-email-06@example.org" }],
        "mrn": "ZQXM-MRN-07",
        "ssn": "271-83-6402",
        "identifiers": [
            { "system": "health_plan_member_number", "value": "ZQXM-PLAN-08" },
            { "system": "drivers_license", "value": "ZQXM-DL-09" },
        ],
    })
}

fn correction() -> Value {
    json!({
        "name": { "family": "ZQXM-FAMILY-10", "given": ["ZQXM-GIVEN-11"] },
        "birth_date": "1941-02-27",
        "address": {
            "lines": ["ZQXM-LINE-12 Apartment 4"],
            "city": "ZQXM-CITY-13",
            "state": "NY",
            "postal_code": "10027-6902",
        },
        "contacts": [{ "phone": "+1 555-014-3381" }, { "email": "zqxm-email-14@example.net" }],
        "mrn": "ZQXM-MRN-15",
        "ssn": "318-52-7049",
        "identifiers": [{ "system": "passport", "value": "ZQXM-PASS-16" }],
    })
}

const LOINC: &str = "http://loinc.org";
const ICD10: &str = "http://hl7.org/fhir/sid/icd-10-cm";
const RXNORM: &str = "http://www.nlm.nih.gov/research/umls/rxnorm";

fn record_id(answer: &Value) -> String {
    answer["record_id"].as_str().expect("record id").to_owned()
}

/// The scan itself: it finds a marker in any case, inside binary bytes, and by its prefix
/// alone when only part of it was copied.
#[test]
fn the_scan_finds_what_it_looks_for() {
    let markers = phi_markers();
    let mut bytes = vec![0_u8, 0xff, 0x10];
    bytes.extend_from_slice(b"zqxm-family-01");
    bytes.extend_from_slice(&[0x80, 0x00]);
    assert!(
        found_in(&bytes, &markers, &[Kind::Phi])
            .iter()
            .any(|hit| hit.starts_with("family name"))
    );
    assert_eq!(
        found_in(b"...ZQXM-FAM...", &markers, &[Kind::Phi]),
        vec!["marker prefix \"zqxm\"".to_owned()]
    );
    assert!(!found_in(b"...271836402...", &markers, &[Kind::Phi]).is_empty());
    // Random secrets may hold the letters of a prefix; only a marker's start counts.
    assert!(found_in(b"xkcrm-spfqm-zqxbu-6vp4q azqxm-1", &markers, &ALL_KINDS).is_empty());
    assert!(found_in(b"ZQXM-FAMILY-01", &markers, &[Kind::Refused]).is_empty());
    assert!(found_in(b"nothing to see", &markers, &ALL_KINDS).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_phi_leaks_on_sqlite() {
    let dir = TestDir::new();
    let server = Server::start_with_log(dir.data_dir(), "trace", &[]);
    let outcome = workload(&server, dir.data_dir()).await;
    let mut database = sqlite_dump(dir.data_dir()).await;
    let mut server = server;
    // A clean stop checkpoints the WAL into the main file: scan the files before and after.
    let mut files = data_dir_files(dir.data_dir());
    let status = server.signal_and_wait("TERM");
    assert!(status.success(), "{status}");
    let commands = operator_commands(dir.data_dir(), &[]);
    files.extend(data_dir_files(dir.data_dir()));
    database.extend(sqlite_dump(dir.data_dir()).await);
    scan(&server, &outcome, &database, &files, &commands);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_phi_leaks_on_postgres() {
    let database_url = FreshPostgresDatabase::create().await;
    let dir = TestDir::new();
    let mut server = Server::start_with_log(
        dir.data_dir(),
        "trace",
        &["--database-url", &database_url.url],
    );
    let outcome = workload(&server, dir.data_dir()).await;
    let status = server.signal_and_wait("TERM");
    assert!(status.success(), "{status}");
    let commands = operator_commands(dir.data_dir(), &["--database-url", &database_url.url]);
    let database = postgres_dump(&database_url.url).await;
    let files = data_dir_files(dir.data_dir());
    scan(&server, &outcome, &database, &files, &commands);
    database_url.drop().await;
}

/// The operator's commands that read every event or read model (a rebuild decrypts and
/// re-folds every patient's stream), at trace level: their stdout and stderr, labelled.
fn operator_commands(data_dir: &Path, storage: &[&str]) -> Vec<(String, String)> {
    let commands: [&[&str]; 6] = [
        &["rebuild"],
        &["verify", "--json"],
        &["deid", "export", "patients"],
        &["deid", "export", "observations", "--format", "csv"],
        &["users", "list"],
        &["keys", "show"],
    ];
    let mut outputs = Vec::new();
    for command in commands {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
            .args(["--log", "trace"])
            .args(command)
            .arg("--data-dir")
            .arg(data_dir)
            .args(storage)
            .env_remove("CHARTLOG_DATABASE_URL")
            .env_remove("CHARTLOG_DATA_DIR")
            .env_remove("CHARTLOG_KEK")
            .env_remove("CHARTLOG_LOG")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run chartlog");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "chartlog {command:?}: {}\n{stdout}\n{stderr}",
            output.status
        );
        outputs.push((
            format!("chartlog {}", command.join(" ")),
            format!("{stdout}\n{stderr}"),
        ));
    }
    outputs
}

/// What the workload leaves for the scan.
struct Outcome {
    exchanges: Vec<Exchange>,
    /// Markers, and the secrets the workload learnt (TOTP secrets, recovery codes, tokens).
    markers: Vec<Marker>,
    /// Audit rows as the auditor read them through the API.
    audit_trail: String,
}

async fn workload(server: &Server, data_dir: &Path) -> Outcome {
    let api = Api::new(
        server,
        https_client(&fs::read(data_dir.join("tls").join("dev-cert.pem")).expect("certificate")),
    );
    let mut markers = phi_markers();
    let admin_password = first_administrator_password(server, data_dir);
    let admin = api.first_login("admin", &admin_password).await;
    let mut sessions = vec![admin.token.clone()];

    let (_, physician_otp) = api
        .create_user(&admin.token, "dr.scan", "physician", None)
        .await;
    let (nurse_id, nurse_otp) = api
        .create_user(&admin.token, "nurse.scan", "nurse", None)
        .await;
    let (_, auditor_otp) = api
        .create_user(&admin.token, "auditor.scan", "auditor", None)
        .await;
    let (_, analyst_otp) = api
        .create_user(&admin.token, "analyst.scan", "analyst", None)
        .await;
    let physician = api.first_login("dr.scan", &physician_otp).await;
    let nurse = api.first_login("nurse.scan", &nurse_otp).await;
    let auditor = api.first_login("auditor.scan", &auditor_otp).await;
    let analyst = api.first_login("analyst.scan", &analyst_otp).await;
    let p = physician.token.clone();

    // ---- Every PHI-carrying command, each field a marker. ----
    let registered = api
        .post("/patients", &p, registration())
        .await
        .expect(StatusCode::CREATED)
        .json();
    let patient = registered["patient_id"].as_str().expect("id").to_owned();
    let at = |command: &str| format!("/patients/{patient}/{command}");
    // The registration's values are replaced by the correction: read them while current.
    let position = registered["position"].as_u64().expect("position");
    api.get(
        &format!("/patients/{patient}/chart?min_position={position}"),
        &p,
    )
    .await
    .expect(StatusCode::OK);

    api.post(&at("correct-demographics"), &p, correction())
        .await
        .expect(StatusCode::OK);
    api.post(
        &at("record-observation"),
        &p,
        json!({
            "code": { "system": LOINC, "code": "8661-1", "display": "ZQXM-DISPLAY-17 complaint" },
            "value": { "text": "ZQXM-OBS-18 pain since the fall on the stairs" },
            "effective_at": "2026-11-27T08:30:00Z",
        }),
    )
    .await
    .expect(StatusCode::OK);
    api.post(
        &at("record-observation"),
        &p,
        json!({
            "code": { "system": LOINC, "code": "8867-4" },
            "value": { "quantity": { "value": "72", "unit": "/min" } },
            "effective_at": "2026-11-27T08:31:00Z",
        }),
    )
    .await
    .expect(StatusCode::OK);
    let condition = api
        .post(
            &at("record-condition"),
            &p,
            json!({
                "code": { "system": ICD10, "code": "I10", "display": "ZQXM-DISPLAY-19 hypertension" },
                "onset_at": "2026-01-05T00:00:00Z",
            }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    api.post(
        &at("resolve-condition"),
        &p,
        json!({ "condition_id": record_id(&condition), "resolved_at": "2026-11-27T09:00:00Z" }),
    )
    .await
    .expect(StatusCode::OK);
    let allergy = api
        .post(
            &at("record-allergy"),
            &p,
            json!({
                "substance": { "system": RXNORM, "code": "7980", "display": "ZQXM-DISPLAY-20 penicillin" },
                "criticality": "high",
                "reaction": "hives",
            }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    api.post(
        &at("refute-allergy"),
        &p,
        json!({ "allergy_id": record_id(&allergy) }),
    )
    .await
    .expect(StatusCode::OK);
    let order = api
        .post(
            &at("prescribe-medication"),
            &p,
            json!({
                "medication": { "system": RXNORM, "code": "197361", "display": "ZQXM-DISPLAY-21 amlodipine" },
                "dose": { "value": "5", "unit": "mg" },
                "route": "oral",
                "frequency": "daily",
            }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    api.post(
        &at("discontinue-medication"),
        &p,
        json!({ "medication_order_id": record_id(&order), "reason": "course_completed" }),
    )
    .await
    .expect(StatusCode::OK);
    // With an idempotency key, and sent twice: the idempotency record keeps the answer for
    // the replay, and must keep nothing of the note.
    let note_body = json!({ "text": "ZQXM-NOTE-22 seen today.\nLives alone; daughter visits." });
    let headers = [("idempotency-key", "scan-note-1".to_owned())];
    let note = api
        .call(
            Method::POST,
            &at("write-note"),
            Some(&p),
            Some(note_body.clone()),
            &headers,
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let replay = api
        .call(
            Method::POST,
            &at("write-note"),
            Some(&p),
            Some(note_body),
            &headers,
        )
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(
        note, replay,
        "the retry is answered from the idempotency record"
    );
    let note_id = record_id(&note);
    api.post(
        &at("amend-note"),
        &p,
        json!({ "note_id": note_id, "text": "ZQXM-NOTE-23 seen today, amended." }),
    )
    .await
    .expect(StatusCode::OK);
    api.post(
        &at("sign-note"),
        &p,
        json!({ "note_id": note_id, "password": passphrase("dr.scan") }),
    )
    .await
    .expect(StatusCode::OK);
    api.post(
        &at("add-note-addendum"),
        &p,
        json!({ "note_id": note_id, "text": "ZQXM-NOTE-24 addendum: results back." }),
    )
    .await
    .expect(StatusCode::OK);
    let restriction = api
        .post(
            &at("grant-consent-restriction"),
            &p,
            json!({ "kind": { "hide_notes_from_role": "radiologist" } }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    api.post(
        &at("revoke-consent-restriction"),
        &p,
        json!({ "restriction_id": record_id(&restriction) }),
    )
    .await
    .expect(StatusCode::OK);

    // ---- Break-glass by a nurse outside the care team, then a relationship. ----
    api.post(
        &at("break-glass"),
        &nurse.token,
        json!({ "reason": "ZQXR-REASON-25 collapsed in the waiting room" }),
    )
    .await
    .expect(StatusCode::CREATED);
    api.get(&at("chart"), &nurse.token)
        .await
        .expect(StatusCode::OK);
    api.post(
        &at("assign-care-relationship"),
        &p,
        json!({ "clinician": nurse_id }),
    )
    .await
    .expect(StatusCode::OK);
    let ended = api
        .post(
            &at("end-care-relationship"),
            &p,
            json!({ "clinician": nurse_id }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let last_position = ended["position"].as_u64().expect("position");

    // ---- Look-ups by identifier, in the body. ----
    let found = api
        .post("/patients/search", &p, json!({ "mrn": "zqxm-mrn-15" }))
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(
        found["patient_ids"],
        json!([patient]),
        "the MRN search works"
    );
    let found = api
        .post(
            "/patients/search",
            &p,
            json!({ "family_name": "ZQXM-FAMILY-10", "birth_date": "1941-02-27" }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(
        found["patient_ids"],
        json!([patient]),
        "the name search works"
    );

    // ---- Refused requests carrying PHI: the refusal must not echo or keep it. ----
    refused_requests(&api, &p, &patient, &note_id).await;
    for index in 1..=22 {
        markers.push(Marker::new(
            &format!("refused request value {index}"),
            Kind::Refused,
            &[&format!("ZQXB-{index:02}")],
        ));
    }

    // ---- Reads: the chart, the history, the oversight views, the de-identified export. ----
    let chart = api
        .get(&format!("{}?min_position={last_position}", at("chart")), &p)
        .await
        .expect(StatusCode::OK);
    assert!(chart.text.contains("ZQXM-FAMILY-10"), "{}", chart.text);
    // Nineteen events: registration, care team, correction and the sixteen commands after.
    let history = api
        .eventually(&format!("{}?limit=200", at("history")), &p, |r| {
            r.status == StatusCode::OK
                && r.json()["entries"]
                    .as_array()
                    .is_some_and(|entries| entries.len() >= 19)
        })
        .await
        .expect(StatusCode::OK);
    assert!(
        history.json()["entries"].as_array().expect("entries").len() >= 19,
        "{}",
        history.text
    );
    // The trail holds one row per event of the patient's stream (each event type at least as
    // often as the history shows it) and the nurse's break-glass opening. Polled, then
    // asserted: a poll that timed out on a short or empty trail fails here.
    let history_event_types: Vec<String> = history.json()["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|entry| entry["event_type"].as_str().expect("event type").to_owned())
        .collect();
    let trail_is_complete = |trail: &Value| -> Result<(), String> {
        let rows = trail["rows"].as_array().ok_or("no rows array")?;
        let opened = rows.iter().any(|row| {
            row["action"] == "break_glass"
                && row["break_glass"] == true
                && row["outcome"] == "success"
                && row["user_id"] == nurse_id.as_str()
                && row["patient_id"] == patient.as_str()
        });
        if !opened {
            return Err("no break-glass row for the nurse".to_owned());
        }
        for event_type in &history_event_types {
            let in_history = history_event_types
                .iter()
                .filter(|t| *t == event_type)
                .count();
            let in_trail = rows
                .iter()
                .filter(|row| row["event_type"] == event_type.as_str())
                .count();
            if in_trail < in_history {
                return Err(format!(
                    "{event_type}: {in_trail} row(s), {in_history} in the history"
                ));
            }
        }
        Ok(())
    };
    let trail = api
        .eventually(
            &format!("/audit-trail?patient_id={patient}&limit=500"),
            &auditor.token,
            |r| r.status == StatusCode::OK && trail_is_complete(&r.json()).is_ok(),
        )
        .await
        .expect(StatusCode::OK);
    if let Err(missing) = trail_is_complete(&trail.json()) {
        panic!("the audit trail misses rows: {missing}\n{}", trail.text);
    }
    let everything = api
        .get("/audit-trail?limit=500", &auditor.token)
        .await
        .expect(StatusCode::OK);
    assert!(
        everything.json()["rows"]
            .as_array()
            .is_some_and(|rows| rows.len() > history_event_types.len()
                && rows.iter().any(|row| row["action"] == "login")),
        "the whole trail holds at least the patient's rows and the logins: {}",
        everything.text
    );
    let reviews = api
        .get("/break-glass/reviews", &auditor.token)
        .await
        .expect(StatusCode::OK);
    assert!(
        reviews.text.contains("ZQXR-REASON-25"),
        "the auditor sees the reason: {}",
        reviews.text
    );
    api.get(&at("disclosures"), &auditor.token)
        .await
        .expect(StatusCode::OK);
    // The de-identified views follow the log: wait for the last observation's row, then
    // read every table (a refuted allergy leaves none).
    for table in ["patients", "observations"] {
        let export = api
            .eventually(
                &format!("/deidentified/{table}?format=ndjson"),
                &analyst.token,
                |r| r.status == StatusCode::OK && r.text.lines().count() >= 1,
            )
            .await
            .expect(StatusCode::OK);
        assert!(!export.text.trim().is_empty(), "{table} has rows");
    }
    for table in [
        "patients",
        "observations",
        "conditions",
        "medication_orders",
        "allergies",
    ] {
        api.get(
            &format!("/deidentified/{table}?format=ndjson"),
            &analyst.token,
        )
        .await
        .expect(StatusCode::OK);
        api.get(&format!("/deidentified/{table}?format=csv"), &analyst.token)
            .await
            .expect(StatusCode::OK);
    }
    api.get("/openapi.json", &p).await.expect(StatusCode::OK);

    // The patient's own view: history and disclosures.
    let (_, patient_otp) = api
        .create_user(&admin.token, "pat.scan", "patient", Some(&patient))
        .await;
    let own = api.first_login("pat.scan", &patient_otp).await;
    api.get(&at("history"), &own.token)
        .await
        .expect(StatusCode::OK);
    api.get(&at("disclosures"), &own.token)
        .await
        .expect(StatusCode::OK);

    // A logout, so the log has one to show.
    api.post("/auth/logout", &auditor.token, json!({}))
        .await
        .expect(StatusCode::NO_CONTENT);

    for logged_in in [&admin, &physician, &nurse, &auditor, &analyst, &own] {
        sessions.push(logged_in.token.clone());
        if let Some(secret) = &logged_in.totp_secret {
            markers.push(Marker::new("a TOTP secret", Kind::Secret, &[secret]));
        }
        for code in &logged_in.recovery_codes {
            markers.push(Marker::new("a recovery code", Kind::Secret, &[code]));
        }
    }
    for token in &sessions {
        markers.push(Marker::new("a session token", Kind::Secret, &[token]));
    }
    for user in [
        "admin",
        "dr.scan",
        "nurse.scan",
        "auditor.scan",
        "analyst.scan",
        "pat.scan",
    ] {
        markers.push(Marker::new(
            &format!("{user}'s password"),
            Kind::Secret,
            &[&passphrase(user)],
        ));
    }
    Outcome {
        exchanges: api.exchanges(),
        markers,
        audit_trail: format!("{}\n{}", trail.text, everything.text),
    }
}

/// Requests the server must refuse, each with PHI-like values beside the fault.
async fn refused_requests(api: &Api<'_>, p: &str, patient: &str, note_id: &str) {
    let at = |command: &str| format!("/patients/{patient}/{command}");
    let refused = |response: &api_client::Response| {
        assert!(
            response.status.is_client_error(),
            "refused: {} {}",
            response.status,
            response.text
        );
    };
    // An unknown field beside valid PHI.
    let mut body = registration();
    body["name"]["family"] = json!("ZQXB-01");
    body["nickname"] = json!("ZQXB-02");
    refused(&api.post("/patients", p, body).await);
    // A malformed SSN and a malformed email.
    let mut body = registration();
    body["name"]["family"] = json!("ZQXB-03");
    body["ssn"] = json!("ZQXB-04");
    refused(&api.post("/patients", p, body).await);
    let mut body = registration();
    body["mrn"] = json!("ZQXB-05");
    body["contacts"] = json!([{ "email": "ZQXB-06 at nowhere" }]);
    refused(&api.post("/patients", p, body).await);
    // A wrong-typed field next to free text.
    refused(
        &api.post(
            &at("record-observation"),
            p,
            json!({
                "code": { "system": LOINC, "code": "8661-1" },
                "value": { "text": "ZQXB-07 reports" },
                "effective_at": 12345,
            }),
        )
        .await,
    );
    refused(
        &api.post(
            &at("write-note"),
            p,
            json!({ "text": "ZQXB-08 chest pain", "colour": "ZQXB-09" }),
        )
        .await,
    );
    // Truncated JSON, and the wrong media type.
    refused(
        &api.raw(
            Method::POST,
            &at("write-note"),
            Some(p),
            "application/json",
            br#"{"text": "ZQXB-10 truncated"#.to_vec(),
        )
        .await,
    );
    refused(
        &api.raw(
            Method::POST,
            &at("write-note"),
            Some(p),
            "text/plain",
            br#"{"text": "ZQXB-11 as plain text"}"#.to_vec(),
        )
        .await,
    );
    // Too long for a note (and perhaps for the body limit).
    let long = format!("ZQXB-12 {}", "x".repeat(70_000));
    refused(
        &api.post(&at("write-note"), p, json!({ "text": long }))
            .await,
    );
    // A control character in free text; a birth date that is not a date.
    refused(
        &api.post(
            &at("record-observation"),
            p,
            json!({
                "code": { "system": LOINC, "code": "8661-1" },
                "value": { "text": "ZQXB-13\u{1}" },
                "effective_at": "2026-11-27T08:30:00Z",
            }),
        )
        .await,
    );
    refused(
        &api.post(
            &at("correct-demographics"),
            p,
            json!({ "birth_date": "ZQXB-14", "name": { "family": "ZQXB-15", "given": [] } }),
        )
        .await,
    );
    // Searches: a malformed MRN, and a name without its birth date.
    refused(
        &api.post("/patients/search", p, json!({ "mrn": "ZQXB-16 !!" }))
            .await,
    );
    refused(
        &api.post("/patients/search", p, json!({ "family_name": "ZQXB-17" }))
            .await,
    );
    // An unknown code system, with a display.
    refused(
        &api.post(
            &at("record-condition"),
            p,
            json!({ "code": { "system": "http://example.org", "code": "X", "display": "ZQXB-18" } }),
        )
        .await,
    );
    // The note is signed: amending it is a domain refusal, after parsing.
    refused(
        &api.post(
            &at("amend-note"),
            p,
            json!({ "note_id": note_id, "text": "ZQXB-19 too late" }),
        )
        .await,
    );
    // A command on a patient that does not exist.
    refused(
        &api.post(
            "/patients/00000000-0000-7000-8000-000000000000/write-note",
            p,
            json!({ "text": "ZQXB-20 wrong patient" }),
        )
        .await,
    );
    // A wrong password when signing, and a login as nobody with a password-like value.
    refused(
        &api.post(
            &at("sign-note"),
            p,
            json!({ "note_id": note_id, "password": "ZQXB-21 wrong password" }),
        )
        .await,
    );
    refused(
        &api.login("nobody.here", "ZQXB-22 wrong password", None)
            .await,
    );
    // The search unknown MRN answers (no match), but must not keep the value either.
    api.post("/patients/search", p, json!({ "mrn": "ZQXB-16" }))
        .await
        .expect(StatusCode::OK);
}

/// Text dumps of every table's rows, one string per table.
type Dump = Vec<(String, String)>;

/// Every row of every table of the SQLite log and of its read models' file, each column cast
/// to bytes (so blobs and text both show), read beside the running server (WAL readers do not
/// block it). A read model's table is named with the file's name in front.
async fn sqlite_dump(data_dir: &Path) -> Dump {
    let log = data_dir.join("chartlog.db");
    let read_models = chartlog_store::sqlite::read_models_path(&log);
    let mut dump = sqlite_file_dump(&log, "").await;
    dump.extend(sqlite_file_dump(&read_models, "chartlog.read-models.db:").await);
    dump
}

async fn sqlite_file_dump(path: &Path, table_prefix: &str) -> Dump {
    // Not read-only: a read-only connection cannot open a WAL database whose -shm is gone,
    // as after the server's clean stop.
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(path);
    let pool = sqlx::SqlitePool::connect_with(options)
        .await
        .unwrap_or_else(|error| panic!("open {}: {error}", path.display()));
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT name FROM sqlite_master WHERE type = 'table'")
            .fetch_all(&pool)
            .await
            .expect("list tables");
    let mut dump = Vec::new();
    for table in tables {
        let columns: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?)")
            .bind(&table)
            .fetch_all(&pool)
            .await
            .expect("list columns");
        let mut text = String::new();
        for column in &columns {
            // Names come from the schema itself; quoted as identifiers.
            let sql = format!(
                "SELECT CAST(\"{}\" AS BLOB) FROM \"{}\"",
                column.replace('"', "\"\""),
                table.replace('"', "\"\"")
            );
            let values: Vec<Option<Vec<u8>>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .expect("read a column");
            for value in values.into_iter().flatten() {
                text.push_str(&String::from_utf8_lossy(&value));
                text.push('\n');
            }
        }
        dump.push((format!("{table_prefix}{table}"), text));
    }
    pool.close().await;
    dump
}

/// Every row of every table and view outside the system schemas, as `t::text`, and every
/// bytea column again through `encode(.., 'escape')`: `t::text` shows bytea as hex, where
/// plaintext PHI stored in a bytea column would never match a marker. Sealed bytes come out
/// as random escapes, which match no marker.
async fn postgres_dump(url: &str) -> Dump {
    let pool = sqlx::PgPool::connect(url).await.expect("connect");
    let tables = sqlx::query(
        "SELECT table_schema, table_name FROM information_schema.tables \
         WHERE table_schema NOT IN ('pg_catalog', 'information_schema')",
    )
    .fetch_all(&pool)
    .await
    .expect("list tables");
    let mut dump = Vec::new();
    let mut bytea_read = Vec::new();
    for row in tables {
        let schema: String = row.get(0);
        let table: String = row.get(1);
        let sql = format!(
            "SELECT t::text FROM \"{}\".\"{}\" t",
            schema.replace('"', "\"\""),
            table.replace('"', "\"\"")
        );
        let mut rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_all(&pool)
            .await
            .unwrap_or_else(|error| panic!("read {schema}.{table}: {error}"));
        let bytea_columns: Vec<String> = sqlx::query_scalar(
            "SELECT column_name::text FROM information_schema.columns \
             WHERE table_schema = $1 AND table_name = $2 AND data_type = 'bytea'",
        )
        .bind(&schema)
        .bind(&table)
        .fetch_all(&pool)
        .await
        .expect("list bytea columns");
        for column in bytea_columns {
            let sql = format!(
                "SELECT encode(\"{}\", 'escape') FROM \"{}\".\"{}\"",
                column.replace('"', "\"\""),
                schema.replace('"', "\"\""),
                table.replace('"', "\"\"")
            );
            let values: Vec<Option<String>> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_all(&pool)
                .await
                .unwrap_or_else(|error| panic!("read {schema}.{table}.{column}: {error}"));
            rows.extend(values.into_iter().flatten());
            bytea_read.push(format!("{table}.{column}"));
        }
        dump.push((format!("{schema}.{table}"), rows.join("\n")));
    }
    pool.close().await;
    assert!(
        bytea_read
            .iter()
            .any(|column| column.ends_with(".ciphertext")),
        "the dump read the bytea columns, the events' ciphertext among them: {bytea_read:?}"
    );
    dump
}

/// Every file under the data directory, raw: the SQLite file with its -wal and -shm, key files,
/// the TLS material, anything else the server wrote.
fn data_dir_files(data_dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![data_dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).expect("read the data directory") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path);
            } else if let Ok(bytes) = fs::read(&path) {
                files.push((path.display().to_string(), bytes));
            }
        }
    }
    files
}

fn scan(
    server: &Server,
    outcome: &Outcome,
    database: &Dump,
    files: &[(String, Vec<u8>)],
    commands: &[(String, String)],
) {
    let markers = &outcome.markers;
    let mut leaks: Vec<String> = Vec::new();

    // The scan's own controls: markers are spelt as the server shows them, and the sources
    // scanned are not empty.
    let shown: String = outcome
        .exchanges
        .iter()
        .filter(|e| {
            e.status.is_success() && (e.path.contains("/chart") || e.path.contains("/history"))
        })
        .map(|e| e.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let reviews: String = outcome
        .exchanges
        .iter()
        .filter(|e| e.path == "/break-glass/reviews")
        .map(|e| e.text.as_str())
        .collect();
    for marker in markers.iter().filter(|m| m.kind == Kind::Phi) {
        assert!(
            shows(&shown, marker),
            "positive control: {} must show in the chart or history the physician asked for",
            marker.label
        );
    }
    assert!(
        contains(reviews.to_ascii_lowercase().as_bytes(), "ZQXR-REASON-25"),
        "positive control: the reason shows in the review queue"
    );
    let logs = format!("{}\n{}", server.stderr(), server.stdout());
    assert!(
        logs.contains("TRACE"),
        "the server logged at trace level: {}",
        &logs[..logs.len().min(2000)]
    );
    // The access log, the SQL trace and the dependencies' TRACE events all reach the scan.
    for expected in ["request served", "sqlx::query", "rustls", "chartlog_access"] {
        assert!(logs.contains(expected), "the server log shows {expected:?}");
    }
    assert!(
        database.iter().any(|(_, rows)| rows.contains("dr.scan")),
        "positive control: the table dump reads plaintext columns (user names)"
    );
    // The workload checked the trail's rows; here, that the text scanned is that trail.
    for expected in [
        "\"break_glass\":true",
        "\"event_type\":\"",
        "\"action\":\"login\"",
    ] {
        assert!(
            outcome.audit_trail.contains(expected),
            "the audit trail read holds {expected}"
        );
    }
    let audit_tables: Vec<&(String, String)> = database
        .iter()
        .filter(|(table, rows)| table.contains("audit") && !rows.is_empty())
        .collect();
    assert!(
        !audit_tables.is_empty(),
        "audit rows were read from the database"
    );

    // The server's output: every line, at trace level.
    let hits = found_in(logs.as_bytes(), markers, &ALL_KINDS);
    if !hits.is_empty() {
        leaks.push(format!(
            "server log: {hits:?}\n  ...{}...",
            context(&logs, markers, &ALL_KINDS)
        ));
    }

    // Every answer: error bodies hold nothing; only the chart and history hold PHI, and only
    // the review queue holds the reason.
    for exchange in &outcome.exchanges {
        assert!(
            found_in(exchange.path.as_bytes(), markers, &ALL_KINDS).is_empty(),
            "the test put PHI in a URL: {}",
            exchange.path
        );
        let is_record = exchange.status.is_success()
            && (exchange.path.contains("/chart") || exchange.path.contains("/history"));
        let is_reviews = exchange.status.is_success() && exchange.path == "/break-glass/reviews";
        // Logins answer a token, enrollment a TOTP secret and recovery codes, once, to the
        // user they belong to.
        let is_credentials = exchange.status.is_success() && exchange.path.starts_with("/auth/");
        let forbidden: Vec<Kind> = ALL_KINDS
            .iter()
            .copied()
            .filter(|kind| {
                !(is_record && *kind == Kind::Phi
                    || is_reviews && *kind == Kind::Reason
                    || is_credentials && *kind == Kind::Secret)
            })
            .collect();
        let hits = found_in(exchange.text.as_bytes(), markers, &forbidden);
        if !hits.is_empty() {
            leaks.push(format!(
                "{} {} answered {}: {hits:?}\n  ...{}...",
                exchange.method,
                exchange.path,
                exchange.status,
                context(&exchange.text, markers, &forbidden)
            ));
        }
    }

    // The audit rows, through the API and in the tables.
    let hits = found_in(outcome.audit_trail.as_bytes(), markers, &ALL_KINDS);
    if !hits.is_empty() {
        leaks.push(format!("audit trail (API): {hits:?}"));
    }
    for (table, rows) in database {
        let hits = found_in(rows.as_bytes(), markers, &ALL_KINDS);
        if !hits.is_empty() {
            leaks.push(format!(
                "table {table}: {hits:?}\n  ...{}...",
                context(rows, markers, &ALL_KINDS)
            ));
        }
    }
    // The rebuild re-folded every event at trace level; the export holds rows.
    assert!(
        commands
            .iter()
            .any(|(command, output)| command.contains("observations")
                && output.contains("pseudonym")),
        "the CLI export shows its rows"
    );
    for (command, output) in commands {
        let hits = found_in(output.as_bytes(), markers, &ALL_KINDS);
        if !hits.is_empty() {
            leaks.push(format!(
                "{command}: {hits:?}\n  ...{}...",
                context(output, markers, &ALL_KINDS)
            ));
        }
    }
    for (path, bytes) in files {
        let hits = found_in(bytes, markers, &ALL_KINDS);
        if !hits.is_empty() {
            leaks.push(format!("file {path}: {hits:?}"));
        }
    }
    eprintln!(
        "scanned {} markers in {} bytes of server output ({} TRACE lines), {} answers, {} tables ({} bytes), \
         {} files ({} bytes), {} operator commands ({} bytes): {} leak(s)",
        markers.len(),
        logs.len(),
        logs.lines().filter(|line| line.contains(" TRACE ")).count(),
        outcome.exchanges.len(),
        database.len(),
        database.iter().map(|(_, rows)| rows.len()).sum::<usize>(),
        files.len(),
        files.iter().map(|(_, bytes)| bytes.len()).sum::<usize>(),
        commands.len(),
        commands
            .iter()
            .map(|(_, output)| output.len())
            .sum::<usize>(),
        leaks.len()
    );
    assert!(
        leaks.is_empty(),
        "{} leak(s):\n{}",
        leaks.len(),
        leaks.join("\n")
    );
}
