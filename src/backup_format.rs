//! The backup file's format, and the pure part of reading one: from the decrypted JSON lines
//! to checked rows and a verified manifest. `chartlog backup` writes these records and
//! `chartlog restore` reads them through [`read_backup`]; the database and the age layer stay
//! in the binary. Public so the fuzz targets reach the same code a restore runs: a backup is
//! untrusted input until its manifest's signature holds.
//!
//! The layout is described in the binary's `backup` module.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};

use anyhow::{anyhow, bail, ensure};
use chartlog_crypto::{
    ContentDigest, DataKeyId, EventHash, EventHeader, EventSignature, SealedEvent,
    SignatureVerifier, SignerKeyId, VERIFY_BATCH_EVENTS_MAX, verify_chain,
};
use chartlog_domain::{Actor, EventId, StreamId, Timestamp, UserId};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The `format` of the header and the manifest.
pub const FORMAT: &str = "chartlog-backup";
/// The version of the format this build writes and reads. Version 2 added the audit trail's
/// `trail_position` and `occurred_at_max_us`, a break-glass grant's `opening_audited_at_us`
/// and a login attempt's `attempt_id`; a version 1 backup is restored by the chartlog that
/// wrote it, whose database this one then migrates.
pub const FORMAT_VERSION: u32 = 2;
/// Rows handed from the reader to the inserting task at a time.
pub const RESTORE_BATCH_ROWS: usize = 500;
/// The longest line a backup may hold: far above any row (an event's ciphertext is a few
/// kilobytes), far below what would exhaust memory.
pub const LINE_BYTES_MAX: usize = 64 << 20;

// ---- The tables --------------------------------------------------------------------------

/// How a column is stored, read and written on both backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// bigint / INTEGER.
    Int,
    /// integer on PostgreSQL (read as bigint) / INTEGER.
    Int4,
    /// boolean / INTEGER 0 or 1. Never NULL in the tables backed up.
    Bool,
    Text,
    /// bytea / BLOB.
    Bytes,
    /// uuid / 16-byte BLOB.
    Uuid,
    /// inet on PostgreSQL / TEXT.
    Inet,
}

/// A table in the backup. Rows are read in `key` order (keyset pages; the whole table at once
/// when it has no unique key) and restored in the order of [`TABLES`].
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, Kind)],
    /// The unique key rows are paged by; empty when the table has none.
    pub key: &'static [&'static str],
}

pub const EVENTS: usize = 0;
pub const STREAMS: usize = 1;
pub const DATA_KEYS: usize = 2;
pub const USERS: usize = 3;

/// Every table backed up, parents before children.
pub static TABLES: &[Table] = &[
    Table {
        name: "chartlog_events",
        columns: &[
            ("position", Kind::Int),
            ("stream_id", Kind::Text),
            ("stream_version", Kind::Int),
            ("event_id", Kind::Uuid),
            ("event_type", Kind::Text),
            ("schema_version", Kind::Int4),
            ("recorded_at_us", Kind::Int),
            ("actor_user_id", Kind::Uuid),
            ("actor_role", Kind::Text),
            ("purpose_of_use", Kind::Text),
            ("break_glass", Kind::Bool),
            ("data_key_id", Kind::Uuid),
            ("signer_key_id", Kind::Text),
            ("prev_hash", Kind::Bytes),
            ("hash", Kind::Bytes),
            ("signature", Kind::Bytes),
            ("ciphertext", Kind::Bytes),
        ],
        key: &["position"],
    },
    Table {
        name: "chartlog_streams",
        columns: &[
            ("stream_id", Kind::Text),
            ("version", Kind::Int),
            ("head_hash", Kind::Bytes),
        ],
        key: &["stream_id"],
    },
    Table {
        name: "chartlog_data_keys",
        columns: &[
            ("owner_stream_id", Kind::Text),
            ("key_id", Kind::Uuid),
            ("kek_id", Kind::Text),
            ("wrapped_key", Kind::Bytes),
            ("created_at_us", Kind::Int),
            ("destroyed_at_us", Kind::Int),
        ],
        key: &["owner_stream_id"],
    },
    Table {
        name: "chartlog_access_users",
        columns: &[
            ("user_id", Kind::Uuid),
            ("username", Kind::Text),
            ("role", Kind::Text),
            ("patient_id", Kind::Uuid),
            ("password_hash", Kind::Text),
            ("must_change_password", Kind::Bool),
            ("disabled", Kind::Bool),
            ("totp_sealed", Kind::Bytes),
            ("totp_pending_sealed", Kind::Bytes),
            ("totp_last_step", Kind::Int),
            ("created_at_us", Kind::Int),
            ("password_changed_at_us", Kind::Int),
            ("last_login_at_us", Kind::Int),
            ("disabled_at_us", Kind::Int),
            ("sso_subject", Kind::Text),
        ],
        key: &["user_id"],
    },
    Table {
        name: "chartlog_access_password_history",
        columns: &[
            ("user_id", Kind::Uuid),
            ("generation", Kind::Int),
            ("password_hash", Kind::Text),
            ("set_at_us", Kind::Int),
        ],
        key: &["user_id", "generation"],
    },
    Table {
        name: "chartlog_access_sessions",
        columns: &[
            ("session_id", Kind::Uuid),
            ("token_hash", Kind::Bytes),
            ("user_id", Kind::Uuid),
            ("created_at_us", Kind::Int),
            ("last_seen_at_us", Kind::Int),
            ("ended_at_us", Kind::Int),
            ("end_reason", Kind::Text),
        ],
        key: &["session_id"],
    },
    Table {
        name: "chartlog_access_recovery_codes",
        columns: &[
            ("user_id", Kind::Uuid),
            ("code_hash", Kind::Bytes),
            ("created_at_us", Kind::Int),
            ("used_at_us", Kind::Int),
        ],
        key: &["user_id", "code_hash"],
    },
    Table {
        name: "chartlog_access_login_failures",
        columns: &[
            ("username", Kind::Text),
            ("client_address", Kind::Text),
            ("failed_at_us", Kind::Int),
            ("attempt_id", Kind::Uuid),
        ],
        key: &[],
    },
    Table {
        name: "chartlog_access_break_glass_grants",
        columns: &[
            ("grant_id", Kind::Uuid),
            ("user_id", Kind::Uuid),
            ("role", Kind::Text),
            ("patient_id", Kind::Uuid),
            ("opened_at_us", Kind::Int),
            ("expires_at_us", Kind::Int),
            ("reason_sealed", Kind::Bytes),
            ("verdict", Kind::Text),
            ("reviewed_by", Kind::Uuid),
            ("reviewed_at_us", Kind::Int),
            ("opening_audited_at_us", Kind::Int),
        ],
        key: &["grant_id"],
    },
    Table {
        name: "chartlog_access_idempotency_records",
        columns: &[
            ("user_id", Kind::Uuid),
            ("key_hash", Kind::Bytes),
            ("fingerprint", Kind::Bytes),
            ("status", Kind::Int),
            ("body_sealed", Kind::Bytes),
            ("created_at_us", Kind::Int),
            ("expires_at_us", Kind::Int),
        ],
        key: &["user_id", "key_hash"],
    },
    Table {
        name: "chartlog_audit_trail",
        columns: &[
            ("audit_id", Kind::Uuid),
            ("source_position", Kind::Int),
            ("trail_position", Kind::Int),
            ("occurred_at_max_us", Kind::Int),
            ("occurred_at_us", Kind::Int),
            ("user_id", Kind::Uuid),
            ("role", Kind::Text),
            ("purpose_of_use", Kind::Text),
            ("break_glass", Kind::Bool),
            ("patient_id", Kind::Uuid),
            ("entity", Kind::Text),
            ("record_id", Kind::Uuid),
            ("action", Kind::Text),
            ("outcome", Kind::Text),
            ("client_address", Kind::Inet),
            ("event_type", Kind::Text),
        ],
        key: &["audit_id"],
    },
];

impl Table {
    pub fn column_index(&self, name: &str) -> usize {
        self.columns
            .iter()
            .position(|(column, _)| *column == name)
            .unwrap_or_else(|| panic!("{} has no column {name}", self.name))
    }
}

// ---- Values ------------------------------------------------------------------------------

/// One column value, as both backends hold it. No `Debug`: values are wrapped keys, sealed
/// bytes and password hashes.
#[derive(Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
    Uuid(Uuid),
}

impl Value {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Null => serde_json::Value::Null,
            Value::Int(value) => serde_json::Value::from(*value),
            Value::Bool(value) => serde_json::Value::Bool(*value),
            Value::Text(value) => serde_json::Value::String(value.clone()),
            Value::Bytes(value) => serde_json::Value::String(hex_encode(value)),
            Value::Uuid(value) => serde_json::Value::String(value.hyphenated().to_string()),
        }
    }

    /// Reads a JSON value as a column of `kind`; `None` when it is not one.
    pub fn from_json(json: serde_json::Value, kind: Kind) -> Option<Value> {
        Some(match (kind, json) {
            (_, serde_json::Value::Null) if kind != Kind::Bool => Value::Null,
            (Kind::Int | Kind::Int4, serde_json::Value::Number(number)) => {
                Value::Int(number.as_i64()?)
            }
            (Kind::Bool, serde_json::Value::Bool(value)) => Value::Bool(value),
            (Kind::Text | Kind::Inet, serde_json::Value::String(text)) => Value::Text(text),
            (Kind::Bytes, serde_json::Value::String(text)) => Value::Bytes(hex_decode(&text)?),
            (Kind::Uuid, serde_json::Value::String(text)) => {
                Value::Uuid(Uuid::parse_str(&text).ok()?)
            }
            _ => return None,
        })
    }

    pub fn int(&self) -> Option<i64> {
        match self {
            Value::Int(value) => Some(*value),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Value::Text(value) => Some(value),
            _ => None,
        }
    }

    pub fn bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Bytes(value) => Some(value),
            _ => None,
        }
    }

    pub fn uuid(&self) -> Option<Uuid> {
        match self {
            Value::Uuid(value) => Some(*value),
            _ => None,
        }
    }

    pub fn boolean(&self) -> Option<bool> {
        match self {
            Value::Bool(value) => Some(*value),
            _ => None,
        }
    }
}

pub fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(DIGITS[usize::from(byte >> 4)]));
        text.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    text
}

/// Lower-case hex only: one spelling per byte string.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    fn nibble(digit: u8) -> Option<u8> {
        match digit {
            b'0'..=b'9' => Some(digit - b'0'),
            b'a'..=b'f' => Some(digit - b'a' + 10),
            _ => None,
        }
    }
    if !text.len().is_multiple_of(2) {
        return None;
    }
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

// ---- Records -----------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    Header(Header),
    Row {
        table: String,
        values: Vec<serde_json::Value>,
    },
    Manifest {
        /// The manifest's JSON text, exactly as signed.
        manifest: String,
        /// Hex of the Ed25519 signature.
        signature: String,
    },
}

/// A row as written: borrowed, in [`Record::Row`]'s shape.
#[derive(Serialize)]
pub struct RowOut<'a> {
    pub record: &'static str,
    pub table: &'static str,
    pub values: &'a [serde_json::Value],
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub created_at: String,
    pub source_backend: String,
    pub chartlog_version: String,
    /// The signer of the manifest, named up front so a restore onto the wrong key files
    /// stops at once.
    pub signer_key_id: String,
    pub tables: Vec<TableHeader>,
}

#[derive(Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TableHeader {
    pub name: String,
    pub columns: Vec<String>,
}

pub fn table_headers() -> Vec<TableHeader> {
    TABLES
        .iter()
        .map(|table| TableHeader {
            name: table.name.to_owned(),
            columns: table
                .columns
                .iter()
                .map(|(name, _)| (*name).to_owned())
                .collect(),
        })
        .collect()
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub created_at: String,
    pub source_backend: String,
    /// The signing key that signed this manifest.
    pub signer_key_id: String,
    pub events: u64,
    pub streams: u64,
    /// The highest position in the log (0 when it is empty).
    pub last_position: u64,
    /// Hex SHA-256 over every event's 32-byte hash, in position order.
    pub root_hash: String,
    /// Rows per table.
    pub rows: BTreeMap<String, u64>,
    /// Hex SHA-256 of every byte before the manifest's line (header and rows, newlines
    /// included).
    pub content_sha256: String,
}

/// What the decrypting thread checked.
pub struct Verified {
    pub manifest: Manifest,
}

/// Rows of one table, on their way to the database.
pub struct Batch {
    /// Index into [`TABLES`].
    pub table: usize,
    pub rows: Vec<Vec<Value>>,
}

/// Reads, checks and forwards every row to `deliver`, a batch at a time; returns the verified
/// manifest. Rows are delivered before the manifest is checked: the caller commits nothing
/// until this returns `Ok`. CPU work (JSON and signature checks): run it off the async runtime.
pub fn read_backup<R: Read>(
    plaintext: R,
    verifier: SignatureVerifier,
    mut deliver: impl FnMut(Batch),
) -> anyhow::Result<Verified> {
    let mut reader = BufReader::with_capacity(256 * 1024, plaintext);
    let mut line = Vec::new();

    if !next_line(&mut reader, &mut line)? {
        bail!("the backup is empty");
    }
    let header = match serde_json::from_slice::<Record>(&line) {
        Ok(Record::Header(header)) => header,
        _ => bail!("not a chartlog backup: the first record is not a chartlog-backup header"),
    };
    ensure!(
        header.format == FORMAT,
        "not a chartlog backup (format {:?})",
        header.format
    );
    ensure!(
        header.version == FORMAT_VERSION,
        "backup format version {} is not readable by this chartlog (reads version \
         {FORMAT_VERSION})",
        header.version
    );
    ensure!(
        header.tables == table_headers(),
        "the backup's tables differ from this chartlog's (it was written by chartlog {}): \
         restore it with that version",
        header.chartlog_version
    );
    let signer = SignerKeyId::parse(&header.signer_key_id)
        .map_err(|_| anyhow!("the backup's header names a malformed signer id"))?;
    ensure!(
        verifier.trusts(&signer),
        "the backup is signed by signer {signer}, which this data directory's key files do not \
         trust: copy the key files of the server the backup was taken from (its keys/ folder, \
         from the key backup) before restoring"
    );
    let mut check = Check::new(verifier);
    check.content.update(&line);

    let mut batch: Option<Batch> = None;
    let mut table_at = 0usize;
    let manifest = loop {
        if !next_line(&mut reader, &mut line)? {
            bail!("the backup ends without its manifest: it is truncated");
        }
        let record: Record = serde_json::from_slice(&line).map_err(|error| {
            anyhow!(
                "a malformed record after {} rows: {}",
                check.total_rows,
                json_error(&error)
            )
        })?;
        match record {
            Record::Header(_) => bail!("a second header in the backup"),
            Record::Manifest {
                manifest,
                signature,
            } => break (manifest, signature),
            Record::Row { table, values } => {
                check.content.update(&line);
                let index = TABLES
                    .iter()
                    .position(|known| known.name == table)
                    .ok_or_else(|| anyhow!("a row of an unknown table {table:?}"))?;
                ensure!(
                    index >= table_at,
                    "rows of {table} after rows of {}: tables must come in order",
                    TABLES[table_at].name
                );
                table_at = index;
                let spec = &TABLES[index];
                ensure!(
                    values.len() == spec.columns.len(),
                    "a row of {table} with {} values for {} columns",
                    values.len(),
                    spec.columns.len()
                );
                let values = values
                    .into_iter()
                    .zip(spec.columns)
                    .map(|(json, (column, kind))| {
                        Value::from_json(json, *kind)
                            .ok_or_else(|| anyhow!("{table}.{column} holds a malformed value"))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                check.row(index, &values)?;
                if batch.as_ref().is_some_and(|batch| batch.table != index) {
                    send(&mut deliver, batch.take());
                }
                let current = batch.get_or_insert_with(|| Batch {
                    table: index,
                    rows: Vec::with_capacity(RESTORE_BATCH_ROWS),
                });
                current.rows.push(values);
                if current.rows.len() >= RESTORE_BATCH_ROWS {
                    send(&mut deliver, batch.take());
                }
            }
        }
    };
    if next_line(&mut reader, &mut line)? {
        bail!("the backup has data after its manifest");
    }
    let verified = check.finish(&manifest.0, &manifest.1)?;
    send(&mut deliver, batch.take());
    Ok(verified)
}

/// A JSON error by kind and place: serde's own messages can quote the value (a row's bytes).
pub fn json_error(error: &serde_json::Error) -> String {
    format!("{:?} error at column {}", error.classify(), error.column())
}

fn send(deliver: &mut impl FnMut(Batch), batch: Option<Batch>) {
    if let Some(batch) = batch {
        deliver(batch);
    }
}

/// Reads one line (newline included) into `line`; false at the end of the input.
pub fn next_line<R: BufRead>(reader: &mut R, line: &mut Vec<u8>) -> anyhow::Result<bool> {
    line.clear();
    let read = (&mut *reader)
        .take(LINE_BYTES_MAX as u64 + 1)
        .read_until(b'\n', line)
        .map_err(|error| {
            anyhow!("the backup does not decrypt: it was changed, truncated or damaged ({error})")
        })?;
    if read == 0 {
        return Ok(false);
    }
    if line.last() != Some(&b'\n') {
        if read > LINE_BYTES_MAX {
            bail!("a record longer than {LINE_BYTES_MAX} bytes");
        }
        bail!("the backup ends in the middle of a record: it is truncated");
    }
    Ok(true)
}

/// The checks made while reading: chains and signatures of the events, stream heads against
/// them, counts, the root hash and the content digest.
struct Check {
    verifier: SignatureVerifier,
    content: ContentDigest,
    root: ContentDigest,
    heads: HashMap<StreamId, (u64, EventHash)>,
    heads_matched: u64,
    unsigned: Vec<SealedEvent>,
    last_position: u64,
    rows: BTreeMap<String, u64>,
    total_rows: u64,
}

impl Check {
    fn new(verifier: SignatureVerifier) -> Check {
        Check {
            verifier,
            content: ContentDigest::new(),
            root: ContentDigest::new(),
            heads: HashMap::new(),
            heads_matched: 0,
            unsigned: Vec::with_capacity(VERIFY_BATCH_EVENTS_MAX),
            last_position: 0,
            rows: BTreeMap::new(),
            total_rows: 0,
        }
    }

    fn row(&mut self, table: usize, values: &[Value]) -> anyhow::Result<()> {
        *self.rows.entry(TABLES[table].name.to_owned()).or_default() += 1;
        self.total_rows += 1;
        match table {
            EVENTS => self.event(values),
            STREAMS => {
                self.verify_signatures()?;
                self.stream_head(values)
            }
            _ => {
                self.verify_signatures()?;
                Ok(())
            }
        }
    }

    fn event(&mut self, values: &[Value]) -> anyhow::Result<()> {
        let (position, event) = sealed_event(values)?;
        ensure!(
            position > self.last_position,
            "event positions are not increasing at position {position}"
        );
        self.last_position = position;
        let stream = event.header.stream_id.clone();
        let (version, prev) = self
            .heads
            .get(&stream)
            .copied()
            .unwrap_or((0, EventHash::GENESIS));
        let hash = verify_chain(prev, version + 1, std::slice::from_ref(&event))
            .map_err(|error| anyhow!("the backup's log does not verify: {error}"))?;
        self.heads
            .insert(stream, (event.header.stream_version, hash));
        self.root.update(hash.as_bytes());
        self.unsigned.push(event);
        if self.unsigned.len() >= VERIFY_BATCH_EVENTS_MAX {
            self.verify_signatures()?;
        }
        Ok(())
    }

    fn verify_signatures(&mut self) -> anyhow::Result<()> {
        if !self.unsigned.is_empty() {
            self.verifier
                .verify_batch(&self.unsigned)
                .map_err(|error| anyhow!("the backup's log does not verify: {error}"))?;
            self.unsigned.clear();
        }
        Ok(())
    }

    fn stream_head(&mut self, values: &[Value]) -> anyhow::Result<()> {
        let malformed = || anyhow!("a malformed chartlog_streams row");
        let stream =
            StreamId::parse(values[0].text().ok_or_else(malformed)?).map_err(|_| malformed())?;
        let version = values[1]
            .int()
            .and_then(|version| u64::try_from(version).ok())
            .ok_or_else(malformed)?;
        let hash = EventHash::from_slice(values[2].bytes().ok_or_else(malformed)?)
            .map_err(|_| malformed())?;
        match self.heads.get(&stream) {
            Some(&(found_version, found_hash))
                if found_version == version && found_hash == hash => {}
            Some(&(found_version, _)) => bail!(
                "stream {stream}: its head names version {version}, the backup's events end at \
                 version {found_version} (events are missing or the head was changed)"
            ),
            None => bail!("stream {stream} has a head but no events in the backup"),
        }
        self.heads_matched += 1;
        Ok(())
    }

    fn finish(mut self, manifest_text: &str, signature: &str) -> anyhow::Result<Verified> {
        self.verify_signatures()?;
        let signature = hex_decode(signature)
            .and_then(|bytes| EventSignature::from_slice(&bytes).ok())
            .ok_or_else(|| anyhow!("the manifest's signature is malformed"))?;
        let manifest: Manifest = serde_json::from_str(manifest_text)
            .map_err(|error| anyhow!("the manifest is malformed: {}", json_error(&error)))?;
        let signer = SignerKeyId::parse(&manifest.signer_key_id)
            .map_err(|_| anyhow!("the manifest names a malformed signer id"))?;
        self.verifier
            .verify_manifest(&signer, manifest_text.as_bytes(), &signature)
            .map_err(|error| {
                anyhow!(
                    "the backup is refused: {error} (a changed manifest, or key files that are \
                     not the backed-up server's)"
                )
            })?;
        // From here the manifest is the server's word; the content must match it.
        ensure!(
            manifest.format == FORMAT && manifest.version == FORMAT_VERSION,
            "the manifest is not a chartlog-backup version {FORMAT_VERSION} manifest"
        );
        ensure!(
            manifest.content_sha256 == hex_encode(&self.content.finish()),
            "the backup is refused: its content does not match the signed manifest's digest"
        );
        let events = self.rows.get(TABLES[EVENTS].name).copied().unwrap_or(0);
        ensure!(
            manifest.events == events,
            "the backup is refused: the manifest states {} events, the backup holds {events}",
            manifest.events
        );
        ensure!(
            manifest.last_position == self.last_position,
            "the backup is refused: the manifest states last position {}, the backup's log ends \
             at {}",
            manifest.last_position,
            self.last_position
        );
        ensure!(
            manifest.root_hash == hex_encode(&self.root.finish()),
            "the backup is refused: the root hash of its events is not the manifest's"
        );
        for table in TABLES {
            let found = self.rows.get(table.name).copied().unwrap_or(0);
            let stated = manifest.rows.get(table.name).copied().unwrap_or(0);
            ensure!(
                found == stated,
                "the backup is refused: the manifest states {stated} rows of {}, the backup holds \
                 {found}",
                table.name
            );
        }
        let streams = self.heads.len() as u64;
        ensure!(
            self.heads_matched == streams && manifest.streams == streams,
            "the backup is refused: {streams} streams have events, {} have heads, the manifest \
             states {}",
            self.heads_matched,
            manifest.streams
        );
        Ok(Verified { manifest })
    }
}

/// The event a `chartlog_events` row holds, with its position.
pub fn sealed_event(values: &[Value]) -> anyhow::Result<(u64, SealedEvent)> {
    let position = values[0]
        .int()
        .and_then(|position| u64::try_from(position).ok())
        .filter(|position| *position > 0)
        .ok_or_else(|| anyhow!("an event with a malformed position"))?;
    let malformed = |what: &str| anyhow!("the event at position {position} has a malformed {what}");
    let header = EventHeader {
        stream_id: values[1]
            .text()
            .and_then(|raw| StreamId::parse(raw).ok())
            .ok_or_else(|| malformed("stream id"))?,
        stream_version: values[2]
            .int()
            .and_then(|version| u64::try_from(version).ok())
            .ok_or_else(|| malformed("stream version"))?,
        event_id: EventId::from_uuid(values[3].uuid().ok_or_else(|| malformed("event id"))?),
        event_type: values[4]
            .text()
            .ok_or_else(|| malformed("event type"))?
            .to_owned(),
        schema_version: values[5]
            .int()
            .and_then(|version| u32::try_from(version).ok())
            .ok_or_else(|| malformed("schema version"))?,
        recorded_at: values[6]
            .int()
            .and_then(|micros| Timestamp::from_unix_micros(micros).ok())
            .ok_or_else(|| malformed("recorded-at time"))?,
        actor: Actor {
            user_id: UserId::from_uuid(values[7].uuid().ok_or_else(|| malformed("actor"))?),
            role: values[8]
                .text()
                .and_then(|raw| raw.parse().ok())
                .ok_or_else(|| malformed("actor role"))?,
            purpose_of_use: values[9]
                .text()
                .and_then(|raw| raw.parse().ok())
                .ok_or_else(|| malformed("purpose of use"))?,
            break_glass: values[10]
                .boolean()
                .ok_or_else(|| malformed("break-glass flag"))?,
        },
        key_id: DataKeyId::from_uuid(values[11].uuid().ok_or_else(|| malformed("data key id"))?),
        prev_hash: values[13]
            .bytes()
            .and_then(|bytes| EventHash::from_slice(bytes).ok())
            .ok_or_else(|| malformed("previous hash"))?,
        signer_key_id: values[12]
            .text()
            .and_then(|raw| SignerKeyId::parse(raw).ok())
            .ok_or_else(|| malformed("signer key id"))?,
    };
    let event = SealedEvent {
        header,
        hash: values[14]
            .bytes()
            .and_then(|bytes| EventHash::from_slice(bytes).ok())
            .ok_or_else(|| malformed("hash"))?,
        signature: values[15]
            .bytes()
            .and_then(|bytes| EventSignature::from_slice(bytes).ok())
            .ok_or_else(|| malformed("signature"))?,
        ciphertext: values[16]
            .bytes()
            .ok_or_else(|| malformed("ciphertext"))?
            .to_vec(),
    };
    Ok((position, event))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_other_spellings() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(hex_decode(&hex_encode(&bytes)), Some(bytes));
        assert_eq!(hex_encode(&[0xab, 0x01]), "ab01");
        assert_eq!(hex_decode("AB01"), None);
        assert_eq!(hex_decode("abc"), None);
        assert_eq!(hex_decode("zz"), None);
    }

    #[test]
    fn the_event_columns_are_where_sealed_event_reads_them() {
        let events = &TABLES[EVENTS];
        for (index, name) in [
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
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(events.column_index(name), index, "{name}");
        }
        assert_eq!(TABLES[STREAMS].name, "chartlog_streams");
        assert_eq!(TABLES[DATA_KEYS].name, "chartlog_data_keys");
        assert_eq!(TABLES[DATA_KEYS].column_index("wrapped_key"), 3);
        assert_eq!(TABLES[DATA_KEYS].column_index("kek_id"), 2);
        assert_eq!(TABLES[USERS].name, "chartlog_access_users");
        assert_eq!(TABLES[10].name, "chartlog_audit_trail");
    }

    #[test]
    fn values_round_trip_through_json_by_kind() {
        let cases = [
            (Kind::Int, Value::Int(-7)),
            (Kind::Int4, Value::Int(3)),
            (Kind::Bool, Value::Bool(true)),
            (Kind::Text, Value::Text("a\"b".to_owned())),
            (Kind::Bytes, Value::Bytes(vec![0, 255, 16])),
            (Kind::Uuid, Value::Uuid(Uuid::from_u128(42))),
            (Kind::Inet, Value::Text("10.0.0.1".to_owned())),
            (Kind::Text, Value::Null),
        ];
        for (kind, value) in cases {
            assert!(
                Value::from_json(value.to_json(), kind) == Some(value),
                "{kind:?}"
            );
        }
        assert!(Value::from_json(serde_json::Value::Null, Kind::Bool).is_none());
        assert!(Value::from_json(serde_json::json!("1"), Kind::Int).is_none());
    }
}
