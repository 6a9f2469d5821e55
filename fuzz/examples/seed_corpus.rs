//! Writes the committed seed corpus, `fuzz/corpus/<target>/`, from real data: the synthetic
//! patient's events sealed and signed with the fixed test keys, the command bodies the API
//! takes, a complete backup, and sample configuration. Rerun it when a format changes:
//!
//! ```text
//! cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus
//! ```
//!
//! Output is deterministic except for the AES-SIV nonces, which are random by design.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use chartlog::backup_format::{
    EVENTS, FORMAT, FORMAT_VERSION, Header, Manifest, Record, RowOut, STREAMS, TABLES, Value,
    hex_encode, read_backup, table_headers,
};
use chartlog_api::fuzzing::decide_body;
use chartlog_crypto::{ContentDigest, EventHash, SealedEvent, open, seal, seal_event, seal_record};
use chartlog_domain::{PatientEvent, decode, encode};
use chartlog_fuzz::{SIGNER_ID, chart, clinician, data_key, header, now, owner, signer, verifier};
use serde_json::json;

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let (_, history) = chart();
    let events = sealed_history(history);

    // event_payload: one payload per event type met, plus a schema-1 observation to upcast.
    let mut seen = BTreeMap::new();
    for event in history {
        let encoded = encode(event);
        seen.entry(encoded.event_type).or_insert(encoded);
    }
    for (event_type, encoded) in &seen {
        let mut seed = format!("{event_type}\n{}\n", encoded.schema_version).into_bytes();
        seed.extend_from_slice(&encoded.payload);
        write(&root, "event_payload", event_type, &seed)?;
    }
    write(
        &root,
        "event_payload",
        "observation_recorded_v1",
        OBSERVATION_V1.as_bytes(),
    )?;

    // event_envelope: stored rows of the chain, and one event stored under schema version 1.
    for (index, (event, _)) in events.iter().enumerate().take(6) {
        let plaintext = open(data_key(), &event.header, &event.ciphertext).expect("opens");
        decode(
            &event.header.event_type,
            event.header.schema_version,
            &plaintext,
        )
        .expect("a seed event decodes");
        let row = event_row(index as i64 + 1, event);
        write(&root, "event_envelope", &format!("row_{}", index + 1), &row)?;
    }
    let v1_payload = OBSERVATION_V1
        .split_once("\n1\n")
        .map_or("", |(_, json)| json);
    let old = seal_event(
        signer(),
        data_key(),
        header(1, "observation_recorded", 1, EventHash::GENESIS),
        v1_payload.as_bytes(),
    );
    write(
        &root,
        "event_envelope",
        "row_schema_v1",
        &event_row(1, &old),
    )?;

    // sealed_payload: payloads sealed for the target's fixed header, a sealed record, and a
    // manifest signature followed by its manifest.
    let note_header = header(1, "note_written", 1, EventHash::GENESIS);
    for (name, plaintext) in [
        ("empty", &b""[..]),
        (
            "note",
            br#"{"note_id":"00000000-0000-0000-0000-000000000001","text":"Seen today."}"#,
        ),
    ] {
        write(
            &root,
            "sealed_payload",
            name,
            &seal(data_key(), &note_header, plaintext),
        )?;
    }
    let record = seal_record(
        data_key(),
        &[b"fuzz-owner", b"condition"],
        b"{\"code\":\"I10\"}",
    );
    write(&root, "sealed_payload", "record", &record)?;
    let manifest = br#"{"format":"chartlog-backup","version":1}"#;
    let mut signed = signer().sign_manifest(manifest).as_bytes().to_vec();
    signed.extend_from_slice(manifest);
    write(&root, "sealed_payload", "manifest_signature", &signed)?;

    // command_json: a body for every command.
    for (command, body) in command_bodies() {
        let mut seed = format!("{command}\n").into_bytes();
        seed.extend_from_slice(serde_json::to_string_pretty(&body)?.as_bytes());
        write(&root, "command_json", command, &seed)?;
        // A seed the chart refuses still reaches the parser; say so, to keep most accepted.
        let bytes = serde_json::to_vec(&body)?;
        let decided = decide_body(command, &bytes, &chart().0, clinician(), now());
        eprintln!(
            "command_json/{command}: {}",
            if decided.is_ok() {
                "accepted"
            } else {
                "refused"
            }
        );
        if let Err(refusal) = decided {
            eprintln!("    {refusal:?}");
        }
    }

    // backup_file: a complete small backup, an empty one, and the first one cut short.
    let full = backup(&events[..5]);
    for seed in [&full, &backup(&[])] {
        if let Err(error) = read_backup(&seed[..], verifier().clone(), drop) {
            panic!("a seed backup does not verify: {error:#}");
        }
    }
    write(&root, "backup_file", "five_events", &full)?;
    write(&root, "backup_file", "empty_log", &backup(&[]))?;
    let cut = full.len() * 2 / 3;
    let cut = full[..cut]
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |at| at + 1);
    write(&root, "backup_file", "truncated", &full[..cut])?;

    // configuration: settings files and key-ring values.
    for (name, text) in CONFIGURATIONS {
        write(&root, "configuration", name, text.as_bytes())?;
    }
    Ok(())
}

/// An observation as schema 1 stored it, with the header lines of the payload target.
const OBSERVATION_V1: &str = "observation_recorded\n1\n{\"observation_id\":\
\"00000000-0000-0000-0000-000000000007\",\"code\":{\"system\":\"http://loinc.org\",\"code\":\
\"8310-5\",\"display\":\"Body temperature\"},\"value\":98.6,\"unit\":\"[degF]\",\
\"effective_at\":1700000000000000}";

const CONFIGURATIONS: [(&str, &str); 5] = [
    (
        "serve",
        "data-dir = \"/var/lib/chartlog\"\nlog = \"info\"\n\n[serve]\nlisten = \"0.0.0.0:8443\"\n\
         idle-timeout-minutes = 15\ninsecure-http = false\npublic-url = \"https://ehr.example\"\n",
    ),
    (
        "migrate",
        "database-url = \"postgres://chartlog@db.internal/chartlog\"\n\n[migrate]\n\
         data-dir = \"/srv/chartlog\"\n",
    ),
    (
        "secret_refused",
        "[serve]\nbreak-glass-webhook = \"https://hooks.example/T0KEN\"\n",
    ),
    (
        "kek_env",
        "kek-2026:S0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLS0tLQ==",
    ),
    (
        "backup",
        "[backup]\nrecipient = \"age1qyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqszqgpqyqs3290gq\"\njson = true\n",
    ),
];

/// The history as stored: sealed under the fixed key, signed, chained from genesis.
fn sealed_history(history: &[PatientEvent]) -> Vec<(SealedEvent, EventHash)> {
    let mut prev = EventHash::GENESIS;
    let mut sealed = Vec::with_capacity(history.len());
    for (index, event) in history.iter().enumerate() {
        let encoded = encode(event);
        let event_header = header(
            index as u64 + 1,
            encoded.event_type,
            encoded.schema_version,
            prev,
        );
        let event = seal_event(signer(), data_key(), event_header, &encoded.payload);
        prev = event.hash;
        sealed.push((event, prev));
    }
    sealed
}

fn event_values(position: i64, event: &SealedEvent) -> Vec<Value> {
    let header = &event.header;
    vec![
        Value::Int(position),
        Value::Text(header.stream_id.as_str().to_owned()),
        Value::Int(header.stream_version as i64),
        Value::Uuid(header.event_id.as_uuid()),
        Value::Text(header.event_type.clone()),
        Value::Int(i64::from(header.schema_version)),
        Value::Int(header.recorded_at.unix_micros()),
        Value::Uuid(header.actor.user_id.as_uuid()),
        Value::Text(header.actor.role.as_str().to_owned()),
        Value::Text(header.actor.purpose_of_use.as_str().to_owned()),
        Value::Bool(header.actor.break_glass),
        Value::Uuid(header.key_id.as_uuid()),
        Value::Text(header.signer_key_id.as_str().to_owned()),
        Value::Bytes(header.prev_hash.as_bytes().to_vec()),
        Value::Bytes(event.hash.as_bytes().to_vec()),
        Value::Bytes(event.signature.as_bytes().to_vec()),
        Value::Bytes(event.ciphertext.clone()),
    ]
}

fn event_row(position: i64, event: &SealedEvent) -> Vec<u8> {
    let json: Vec<serde_json::Value> = event_values(position, event)
        .iter()
        .map(Value::to_json)
        .collect();
    serde_json::to_vec_pretty(&json).expect("JSON values serialize")
}

/// A backup of `events` as `chartlog backup` writes its plaintext, signed by the fixed signer.
fn backup(events: &[(SealedEvent, EventHash)]) -> Vec<u8> {
    let created_at = "2026-11-27T09:00:00Z".to_owned();
    let header = Record::Header(Header {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        created_at: created_at.clone(),
        source_backend: "sqlite".to_owned(),
        chartlog_version: "0.1.0".to_owned(),
        signer_key_id: SIGNER_ID.to_owned(),
        tables: table_headers(),
    });
    let mut lines = vec![serde_json::to_vec(&header).expect("header")];
    let mut rows: BTreeMap<String, u64> = TABLES.iter().map(|t| (t.name.to_owned(), 0)).collect();
    let mut table_rows = Vec::new();
    let mut root = ContentDigest::new();
    for (index, (event, hash)) in events.iter().enumerate() {
        table_rows.push((EVENTS, event_values(index as i64 + 1, event)));
        root.update(hash.as_bytes());
    }
    if let Some((last, hash)) = events.last() {
        let head = vec![
            Value::Text(owner().as_str().to_owned()),
            Value::Int(last.header.stream_version as i64),
            Value::Bytes(hash.as_bytes().to_vec()),
        ];
        table_rows.push((STREAMS, head));
    }
    for (table, values) in table_rows {
        let json: Vec<serde_json::Value> = values.iter().map(Value::to_json).collect();
        let record = RowOut {
            record: "row",
            table: TABLES[table].name,
            values: &json,
        };
        *rows.entry(TABLES[table].name.to_owned()).or_default() += 1;
        lines.push(serde_json::to_vec(&record).expect("row"));
    }
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(&line);
        out.push(b'\n');
    }
    let mut content = ContentDigest::new();
    content.update(&out);
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        created_at,
        source_backend: "sqlite".to_owned(),
        signer_key_id: SIGNER_ID.to_owned(),
        events: events.len() as u64,
        streams: u64::from(!events.is_empty()),
        last_position: events.len() as u64,
        root_hash: hex_encode(&root.finish()),
        rows,
        content_sha256: hex_encode(&content.finish()),
    };
    let text = serde_json::to_string(&manifest).expect("manifest");
    let signature = signer().sign_manifest(text.as_bytes());
    let record = Record::Manifest {
        manifest: text,
        signature: hex_encode(signature.as_bytes()),
    };
    out.extend_from_slice(&serde_json::to_vec(&record).expect("manifest record"));
    out.push(b'\n');
    out
}

/// A body for every command of the API, naming records the fixed chart holds.
fn command_bodies() -> Vec<(&'static str, serde_json::Value)> {
    let (patient, _) = chart();
    let condition = patient.conditions().keys().next().map(|id| id.as_uuid());
    let medication = patient
        .medication_orders()
        .keys()
        .next()
        .map(|id| id.as_uuid());
    let allergy = patient.allergies().keys().next().map(|id| id.as_uuid());
    let note = patient.notes().keys().next().map(|id| id.as_uuid());
    let care_team_member = patient
        .care_team()
        .iter()
        .next()
        .map_or_else(|| clinician().as_uuid(), |member| member.as_uuid());
    let registration = match chartlog_domain::synthetic::registration(99) {
        chartlog_domain::PatientCommand::RegisterPatient { demographics, .. } => {
            serde_json::to_value(demographics).expect("demographics serialize")
        }
        _ => json!({}),
    };
    vec![
        ("register-patient", registration),
        (
            "correct-demographics",
            json!({ "address": null, "contacts": [{ "phone": "+1-217-555-0142" }] }),
        ),
        (
            "record-observation",
            json!({
                "code": { "system": "http://loinc.org", "code": "8867-4" },
                "value": { "quantity": { "value": "72", "unit": "/min" } },
                "effective_at": "2026-11-27T08:30:00Z",
            }),
        ),
        (
            "record-condition",
            json!({
                "code": { "system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10" },
                "onset_at": "2025-03-01T00:00:00Z",
            }),
        ),
        (
            "resolve-condition",
            json!({ "condition_id": condition, "resolved_at": "2026-11-27T09:01:00Z" }),
        ),
        (
            "record-allergy",
            json!({
                "substance": { "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "7980" },
                "criticality": "high",
                "reaction": "hives",
            }),
        ),
        ("refute-allergy", json!({ "allergy_id": allergy })),
        (
            "prescribe-medication",
            json!({
                "medication": { "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975" },
                "dose": { "value": "500", "unit": "mg" },
                "route": "oral",
                "frequency": "twice_daily",
            }),
        ),
        (
            "discontinue-medication",
            json!({ "medication_order_id": medication, "reason": "course_completed" }),
        ),
        (
            "write-note",
            json!({ "text": "Seen for palpitations; ECG normal." }),
        ),
        (
            "amend-note",
            json!({ "note_id": note, "text": "ECG normal; follow up in 2 weeks." }),
        ),
        (
            "sign-note",
            json!({ "note_id": note, "password": "correct horse battery staple" }),
        ),
        (
            "add-note-addendum",
            json!({ "note_id": note, "text": "Addendum: labs normal." }),
        ),
        (
            "grant-consent-restriction",
            json!({ "kind": { "hide_notes_from_role": "nurse" } }),
        ),
        (
            "revoke-consent-restriction",
            json!({ "restriction_id": "00000000-0000-0000-0000-0000000000aa" }),
        ),
        (
            "assign-care-relationship",
            json!({ "clinician": clinician().as_uuid() }),
        ),
        (
            "end-care-relationship",
            json!({ "clinician": care_team_member }),
        ),
        ("erase", json!({ "reason": "patient_request" })),
    ]
}

fn write(root: &Path, target: &str, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let directory = root.join(target);
    fs::create_dir_all(&directory)?;
    fs::write(directory.join(name), bytes)
}
