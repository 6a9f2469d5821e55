//! `chartlog backup` and `chartlog restore`.
//!
//! A backup is one age file (age-encryption.org/v1, X25519 recipients) holding JSON lines:
//!
//! 1. a header: `{"record":"header","format":"chartlog-backup","version":2,...,"tables":[...]}`
//!    naming every table and its columns, in the order their rows follow;
//! 2. one line per row, `{"record":"row","table":...,"values":[...]}`, the columns as stored
//!    (integers and booleans as JSON, text and UUIDs as strings, bytes as lower-case hex, NULL
//!    as null): the event log in position order with every header field, ciphertext, hash and
//!    signature, so restored events verify exactly as they did; the stream heads; the data-key
//!    table (wrapped keys and KEK ids only; the destroyed-key tombstones are the erasure
//!    ledger); user accounts and every `chartlog_access_*` table; the audit trail;
//! 3. a manifest, `{"record":"manifest","manifest":"<JSON text>","signature":"<hex>"}`: row
//!    counts, the last position, the root hash (SHA-256 over every event's 32-byte hash in
//!    position order) and the SHA-256 of every line before it, signed (Ed25519, domain-tagged)
//!    with the server's active signing key.
//!
//! Everything is read in one snapshot (one read transaction on SQLite, one repeatable-read,
//! read-only transaction on PostgreSQL). Read models are not in the backup: `chartlog rebuild`
//! derives them from the restored log. (On SQLite the audit-trail table backed up is the log
//! file's. Since the read models moved to a file of their own
//! (`chartlog_store::sqlite::read_models_path`) it holds only rows written before that; the
//! trail the server serves is folded from the signed audit streams, and a rebuild derives it
//! again.) Key files are not in it either, by design: a backup
//! must not carry what decrypts it. `<data-dir>/keys` is restored from the key backup.
//!
//! A restore decrypts and checks everything inside one transaction on an empty target and
//! commits only if all holds: the header is this format, every event's chain link, hash and
//! signature verify, the stream heads match the events, and the manifest's signature (by a
//! signer the target's key files trust), counts, root hash and content digest match. A data
//! key is never restored for an owner in an erasure ledger: the target database's, the
//! backup's own, the target key directory's `erasure-ledger.jsonl` and, when given,
//! `--erasure-ledger`'s file (`crate::erasure_ledger`,
//! written at every erasure and restored with the key backup: the one ledger that survives the
//! loss of the database), and any named with `--erasures-from` (a database or such a file).
//! The restore reports how many keys each ledger withheld, and warns when the key directory
//! has no ledger file. With no ledger naming a patient erased after the backup was taken,
//! their key comes back: nothing in the backup itself can know of a later erasure.
//!
//! After the commit the log is verified again from the database with
//! `chartlog_store::verify::verify_log`, and the restore is recorded on the audit trail. Once
//! committed, the restore is never reported as failed: the target is no longer empty, and a
//! retry would be refused. If that check cannot confirm the log (PostgreSQL holding the
//! global log back past `--verify-wait-seconds`, a database error) or finds a break, or if the
//! audit record cannot be written, the summary still says what was restored, with
//! `"committed": true` and the check's outcome, a warning on stderr says what is missing, and
//! the exit status is 3, not 1 (which promises an untouched target) nor 0 (someone has to
//! look). The audit record's outcome is `success` whenever the restore committed: it records
//! that the rows entered this database, which they did; the check's verdict is the
//! command's exit status and message.

use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use age::secrecy::ExposeSecret;
use anyhow::{Context, anyhow, bail, ensure};
use chartlog::backup_format::{
    Batch, DATA_KEYS, EVENTS, FORMAT, FORMAT_VERSION, Header, Kind, Manifest, Record, RowOut,
    STREAMS, TABLES, Table, USERS, Value, Verified, hex_encode, read_backup, table_headers,
};
use chartlog_crypto::{
    ContentDigest, KEK_FILE_NAME, KekId, KeyRing, SIGNING_FILE_NAME, SignatureVerifier, SigningKeys,
};
use chartlog_projections::db::{Backend, DbRow, ProjectionDb, ProjectionTx, SqlArg};
use chartlog_store::verify::verify_log;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::AssertSqlSafe;
use sqlx::types::Uuid;
use tokio::sync::mpsc;

use crate::erasure_ledger::{ErasureLedger, ErasureLedgerArgs};
use crate::{
    Database, DatabaseLocation, DatabaseUrl, KEY_DIR_NAME, StorageArgs, create_data_dir, keys,
    open_database,
};

/// Rows read per query while backing up (keyset pages inside the snapshot).
const PAGE_ROWS: usize = 1_000;
/// Plaintext bytes gathered before they go to the encrypting thread.
const WRITE_CHUNK_BYTES: usize = 1 << 20;
/// Chunks or batches in flight between the database task and the file thread.
const CHANNEL_DEPTH: usize = 4;
/// How long a restore waits, by default, for the global log to show every restored event to
/// `verify_log` (on PostgreSQL, any transaction open in the cluster holds readers back).
const VERIFY_WAIT_SECONDS_DEFAULT: u64 = 60;
/// The exit status of a restore that committed but whose check after the commit did not
/// confirm it, or whose audit record could not be written: not 1, which promises an
/// untouched target, and not 0, since someone has to look.
const EXIT_COMMITTED_UNCONFIRMED: i32 = 3;
const BACKUP_PROGRESS_TEMPLATE: &str =
    "backup [{elapsed_precise}] [{wide_bar}] {pos}/{len} rows, {per_sec}, {eta} left";
const RESTORE_PROGRESS_TEMPLATE: &str = "restore [{elapsed_precise}] [{wide_bar}] \
     {bytes}/{total_bytes}, {bytes_per_sec}, {eta} left";
const VERIFY_PROGRESS_TEMPLATE: &str = "verify [{elapsed_precise}] {spinner} {msg}";

const BACKUP_HELP: &str = "\
What the backup holds: the event log (every column as stored, so hashes and signatures verify
after a restore), the stream heads, the data-key table (wrapped keys and KEK ids only, never an
unwrapped key; destroyed-key tombstones are the erasure ledger), user accounts with every
access table, and the audit trail, all read in one consistent snapshot. Read models are not
in it: `chartlog rebuild` derives them after a restore.

Format: an age file (age-encryption.org/v1) of JSON lines: a header, one line per row, and a
manifest (row counts, last position, root hash = SHA-256 over every event hash in position
order, SHA-256 of the content) signed with the server's Ed25519 signing key.

The key files (<data-dir>/keys) are NOT in the backup, by design: keep them in a separate key
backup. A restore needs them (the KEK ring unwraps the data keys; the signing keys verify the
manifest). The backup holds every data key active when it was taken; keys/erasure-ledger.jsonl
is what keeps a patient erased later from getting theirs back when this backup is restored, so
take the key backup again after every erasure.

Make a backup key once, and keep the identity file offline:
  age-keygen -o backup-identity.txt        (prints the public key, age1...)
  chartlog backup --generate-identity backup-identity.txt
Then:
  chartlog backup --recipient age1... /backups/chartlog-2026-11-27.age

Exit status: 0 on success; 1 on any error (nothing is left under <FILE> then); 2 on a usage
error.";

const RESTORE_HELP: &str = "\
The target must be empty: no events, streams, active data keys, accounts or audit rows (it may
hold destroyed-key tombstones: its erasure ledger, which is honoured). Copy the key files of
the server the backup was taken from into <data-dir>/keys first (from the key backup): the
signing keys verify the manifest, the KEK ring unwraps the restored data keys.

Everything is checked before anything is committed: the manifest's signature, counts, root
hash and content digest, and every event's hash, chain link and signature. A patient whose
key is in an erasure ledger stays erased: their key is not restored, only its tombstone. The
ledgers: <data-dir>/keys/erasure-ledger.jsonl (every erasure is written there before the key
is destroyed; it comes back with the key backup, so take the key backup again after
erasures), the target database's, the backup's own, and any given with --erasures-from (the
live database, or another key directory's erasure-ledger.jsonl). The restore reports how many
keys each withheld. A patient erased after the backup was taken and named by none of them gets
their key back. After the commit the log is verified again from the database.

Then rebuild the read models:
  chartlog rebuild --data-dir <data-dir> [--database-url <url>]

Positions are kept. On PostgreSQL they derive from transaction ids, so a restore into another
PostgreSQL cluster needs that cluster's transaction ids to be past the backup's last position
divided by 1024; the restore checks it and refuses otherwise.

Exit status: 0 on success; 1 on any error before the commit (the target is left as it was); 2
on a usage error; 3 when the backup was restored and committed but the check after the commit
could not confirm the log or found a problem, or the audit record could not be written (the
target is no longer empty: do not restore again; read the warning, run `chartlog verify`).";

#[derive(Args)]
#[command(after_long_help = BACKUP_HELP)]
pub(crate) struct BackupArgs {
    #[command(flatten)]
    storage: StorageArgs,

    /// The backup file to write. Never overwritten: an existing file is an error.
    #[arg(value_name = "FILE", required_unless_present = "generate_identity")]
    file: Option<PathBuf>,

    /// An age recipient (X25519 public key, `age1...`) to encrypt the backup to. Repeatable.
    #[arg(long = "recipient", short = 'r', value_name = "AGE_PUBLIC_KEY")]
    recipients: Vec<String>,

    /// A file of age recipients, one per line (`#` starts a comment). Repeatable.
    #[arg(long = "recipient-file", short = 'R', value_name = "PATH")]
    recipient_files: Vec<PathBuf>,

    /// Write a new age identity (backup key) to this file, mode 0600, print its public key
    /// (the recipient), and exit without backing up.
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with_all = ["file", "recipients", "recipient_files"]
    )]
    generate_identity: Option<PathBuf>,

    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
#[command(after_long_help = RESTORE_HELP)]
pub(crate) struct RestoreArgs {
    #[command(flatten)]
    storage: StorageArgs,

    /// The backup file.
    #[arg(value_name = "FILE")]
    file: PathBuf,

    /// An age identity file (`AGE-SECRET-KEY-1...` lines, as age-keygen writes) holding the
    /// key the backup was encrypted to. Repeatable.
    #[arg(long = "identity", short = 'i', value_name = "PATH", required = true)]
    identities: Vec<PathBuf>,

    /// Another erasure ledger to honour: a database (postgres://..., sqlite:...) whose
    /// destroyed data keys count, e.g. the live database after later erasures, or an erasure
    /// ledger file (`erasure-ledger.jsonl`) of another key directory, e.g. another server's.
    /// Repeatable. The target's own `<data-dir>/keys/erasure-ledger.jsonl`, and
    /// --erasure-ledger's file, are always read.
    /// A database URL holding a password belongs in CHARTLOG_ERASURES_FROM (one value, read
    /// only when no --erasures-from is given), or leave the password out and give it in
    /// PGPASSWORD or a .pgpass file: the command line shows in `ps`.
    // hide_env_values: the URL can carry a password, and --help would print it.
    #[arg(
        long = "erasures-from",
        value_name = "DATABASE_URL|FILE",
        env = "CHARTLOG_ERASURES_FROM",
        hide_env_values = true
    )]
    erasures_from: Vec<ErasuresFrom>,

    /// How long the check after the commit waits for PostgreSQL to show every restored event
    /// (a transaction open elsewhere in the cluster holds the global log back).
    #[arg(long, value_name = "SECONDS", default_value_t = VERIFY_WAIT_SECONDS_DEFAULT)]
    verify_wait_seconds: u64,

    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    erasure_ledger: ErasureLedgerArgs,
}

/// A `--erasures-from` value: a database, or an erasure ledger file.
#[derive(Clone, Debug)]
enum ErasuresFrom {
    Database(DatabaseUrl),
    File(PathBuf),
}

impl FromStr for ErasuresFrom {
    type Err = String;

    fn from_str(raw: &str) -> Result<ErasuresFrom, String> {
        // Anything URL-like is a database: a mistyped URL must be refused as one, without
        // echoing it (it may hold a password), not looked for as a file.
        if raw.contains("://") || raw.starts_with("sqlite:") {
            DatabaseUrl::from_str(raw).map(ErasuresFrom::Database)
        } else {
            Ok(ErasuresFrom::File(PathBuf::from(raw)))
        }
    }
}

// ---- The tables and values on the database ----------------------------------------------

/// The SQL of a backed-up table on each backend. The tables themselves are the format's
/// ([`chartlog::backup_format::TABLES`]).
trait TableSql {
    fn select_list(&self, backend: Backend) -> String;
    fn page_sql(&self, backend: Backend, after: bool) -> String;
    fn insert_sql(&self, backend: Backend, rows: usize) -> String;
}

impl TableSql for Table {
    /// The select list, with the casts that make both backends return the same types.
    fn select_list(&self, backend: Backend) -> String {
        let columns: Vec<String> = self
            .columns
            .iter()
            .map(|&(name, kind)| match (backend, kind) {
                (Backend::Postgres, Kind::Int4) => format!("CAST({name} AS bigint)"),
                // abbrev: the address alone for a host (`10.0.0.1`, as SQLite stores it), the
                // prefix length only for a network.
                (Backend::Postgres, Kind::Inet) => format!("abbrev({name})"),
                _ => name.to_owned(),
            })
            .collect();
        columns.join(", ")
    }

    /// One keyset page: rows after `after` (the key of the last row read) in key order.
    fn page_sql(&self, backend: Backend, after: bool) -> String {
        let mut sql = format!("SELECT {} FROM {}", self.select_list(backend), self.name);
        if self.key.is_empty() {
            let all: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
            sql.push_str(&format!(" ORDER BY {}", all.join(", ")));
            return sql;
        }
        if after {
            let placeholders: Vec<String> = (1..=self.key.len()).map(|n| format!("${n}")).collect();
            sql.push_str(&format!(
                " WHERE ({}) > ({})",
                self.key.join(", "),
                placeholders.join(", ")
            ));
        }
        sql.push_str(&format!(
            " ORDER BY {} LIMIT {PAGE_ROWS}",
            self.key.join(", ")
        ));
        sql
    }

    /// `INSERT INTO ... VALUES (...), ...` for `rows` rows.
    fn insert_sql(&self, backend: Backend, rows: usize) -> String {
        let names: Vec<&str> = self.columns.iter().map(|(name, _)| *name).collect();
        let mut sql = format!("INSERT INTO {} ({}) VALUES ", self.name, names.join(", "));
        let mut next = 1;
        for row in 0..rows {
            if row > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for (index, (_, kind)) in self.columns.iter().enumerate() {
                if index > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("${next}"));
                if backend == Backend::Postgres && *kind == Kind::Inet {
                    sql.push_str("::inet");
                }
                next += 1;
            }
            sql.push(')');
        }
        sql
    }
}

/// A column value read from and bound to either backend.
trait ValueSql: Sized {
    fn read(row: &DbRow, index: usize, kind: Kind) -> Result<Self, sqlx::Error>;
    fn to_arg(&self, kind: Kind) -> SqlArg;
}

impl ValueSql for Value {
    fn read(row: &DbRow, index: usize, kind: Kind) -> Result<Self, sqlx::Error> {
        Ok(match kind {
            Kind::Int | Kind::Int4 => row.opt_i64(index)?.map_or(Value::Null, Value::Int),
            Kind::Bool => Value::Bool(row.bool(index)?),
            Kind::Text | Kind::Inet => row.opt_text(index)?.map_or(Value::Null, Value::Text),
            Kind::Bytes => row.opt_bytes(index)?.map_or(Value::Null, Value::Bytes),
            Kind::Uuid => row.opt_uuid(index)?.map_or(Value::Null, Value::Uuid),
        })
    }

    fn to_arg(&self, kind: Kind) -> SqlArg {
        match (kind, self) {
            (Kind::Bool, Value::Bool(value)) => SqlArg::Bool(*value),
            (Kind::Int | Kind::Int4, Value::Int(value)) => SqlArg::OptI64(Some(*value)),
            (Kind::Int | Kind::Int4, _) => SqlArg::OptI64(None),
            (Kind::Text | Kind::Inet, Value::Text(value)) => SqlArg::OptText(Some(value.clone())),
            (Kind::Text | Kind::Inet, _) => SqlArg::OptText(None),
            (Kind::Bytes, Value::Bytes(value)) => SqlArg::OptBytes(Some(value.clone())),
            (Kind::Bytes, _) => SqlArg::OptBytes(None),
            (Kind::Uuid, Value::Uuid(value)) => SqlArg::OptUuid(Some(*value)),
            (Kind::Uuid, _) => SqlArg::OptUuid(None),
            // `from_json` never makes a non-boolean for a boolean column.
            (Kind::Bool, _) => unreachable!("a boolean column holds a boolean"),
        }
    }
}

fn backend_name(backend: Backend) -> &'static str {
    match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    }
}

fn progress_bar(length: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template(template)
            // Constants, checked by a test; never worth failing over.
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

fn print_summary(json: bool, summary: &serde_json::Value, human: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    if json {
        writeln!(stdout, "{summary}")
    } else {
        writeln!(stdout, "{human}")
    }
    .and_then(|()| stdout.flush())
    .context("cannot write the summary to stdout")
}

// ---- Backup ------------------------------------------------------------------------------

pub(crate) async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.generate_identity {
        return generate_identity(path, args.json);
    }
    let Some(file) = args.file.clone() else {
        bail!("give the backup file to write (see chartlog backup --help)");
    };
    let recipients = recipients(&args)?;
    if fs::symlink_metadata(&file).is_ok() {
        bail!(
            "{} exists; a backup never overwrites a file: choose a new name",
            file.display()
        );
    }
    let key_dir = args.storage.data_dir.join(KEY_DIR_NAME);
    let signing_path = key_dir.join(SIGNING_FILE_NAME);
    let signing = SigningKeys::load(&signing_path).with_context(|| {
        format!(
            "cannot load the signing keys from {}: a backup's manifest is signed with the \
             server's signing key",
            signing_path.display()
        )
    })?;
    let location = args.storage.database_location();
    if let DatabaseLocation::SqliteFile(path) = &location
        && !path.exists()
    {
        bail!(
            "no database at {}: nothing to back up (wrong --data-dir, or give --database-url)",
            path.display()
        );
    }
    tracing::info!(database = location.describe(), "backup");
    let database = open_database(&location).await?;
    let started = Instant::now();
    let written = write_backup(&database, &signing, &recipients, &file).await;
    // Every copy of the store leaving it is on the audit trail, failed attempts too.
    let outcome = AuditOutcome::of(written.is_ok());
    let audited = crate::wiring::audit_operator_action(
        &database,
        &key_dir,
        AuditEntity::Backup,
        AuditAction::Export,
        outcome,
    )
    .await;
    database.close().await;
    let written = written?;
    audited?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        events = written.manifest.events,
        bytes = written.bytes,
        seconds,
        "backed up"
    );
    let summary = serde_json::json!({
        "file": file.display().to_string(),
        "bytes": written.bytes,
        "events": written.manifest.events,
        "streams": written.manifest.streams,
        "last_position": written.manifest.last_position,
        "root_hash": written.manifest.root_hash,
        "rows": written.manifest.rows,
        "source_backend": written.manifest.source_backend,
        "signer_key_id": written.manifest.signer_key_id,
        "created_at": written.manifest.created_at,
        "seconds": seconds,
    });
    let human = format!(
        "backed up {} events of {} streams (last position {}, root hash {}) and {} accounts \
         to {} ({} bytes) in {seconds:.1} s",
        written.manifest.events,
        written.manifest.streams,
        written.manifest.last_position,
        written.manifest.root_hash,
        written
            .manifest
            .rows
            .get(TABLES[USERS].name)
            .copied()
            .unwrap_or(0),
        file.display(),
        written.bytes,
    );
    print_summary(args.json, &summary, &human)
}

/// The recipients from `--recipient` and `--recipient-file`.
fn recipients(args: &BackupArgs) -> anyhow::Result<Vec<age::x25519::Recipient>> {
    recipients_from(&args.recipients, &args.recipient_files)
}

/// Age recipients given one by one (`keys`) and in files of one per line (`files`): at
/// least one in all.
pub(crate) fn recipients_from(
    keys: &[String],
    files: &[PathBuf],
) -> anyhow::Result<Vec<age::x25519::Recipient>> {
    let mut recipients = Vec::new();
    for raw in keys {
        recipients.push(parse_recipient(raw.trim()).context("invalid --recipient")?);
    }
    for path in files {
        let text = fs::read_to_string(path)
            .with_context(|| format!("cannot read the recipient file {}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            recipients.push(parse_recipient(line).with_context(|| {
                format!("recipient file {} line {}", path.display(), number + 1)
            })?);
        }
    }
    ensure!(
        !recipients.is_empty(),
        "no recipient: give --recipient age1... or --recipient-file PATH (a backup is always \
         encrypted; see chartlog backup --help to make a backup key)"
    );
    Ok(recipients)
}

fn parse_recipient(raw: &str) -> anyhow::Result<age::x25519::Recipient> {
    age::x25519::Recipient::from_str(raw).map_err(|reason| {
        anyhow!("not an age X25519 recipient (a public key starting age1...): {reason}")
    })
}

/// `--generate-identity`: a new age identity in a new 0600 file, in age-keygen's layout.
fn generate_identity(path: &Path, json: bool) -> anyhow::Result<()> {
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let text = age::secrecy::SecretString::from(format!(
        "# created: {}\n# public key: {recipient}\n{}\n",
        chartlog_api::now(),
        identity.to_string().expose_secret()
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {} (an existing identity file is never overwritten)",
                path.display()
            )
        })?;
    file.write_all(text.expose_secret().as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))?;
    let summary = serde_json::json!({
        "identity_file": path.display().to_string(),
        "recipient": recipient,
    });
    let human = format!(
        "wrote a new backup identity to {} (keep it offline; restores need it)\n\
         public key (use with chartlog backup --recipient): {recipient}",
        path.display()
    );
    print_summary(json, &summary, &human)
}

pub(crate) struct Written {
    pub(crate) manifest: Manifest,
    pub(crate) bytes: u64,
}

/// The hidden file a backup named `name` is written to before it is linked into place; the
/// process id keeps two writers of one name apart.
fn partial_file_name(name: &str) -> String {
    format!(".{name}.{}.partial", std::process::id())
}

/// The backup name a [`partial_file_name`] stands for, by whichever process wrote it; `None`
/// for any other file name.
pub(crate) fn partial_file_target(file_name: &str) -> Option<&str> {
    let (name, pid) = file_name
        .strip_prefix('.')?
        .strip_suffix(".partial")?
        .rsplit_once('.')?;
    (!pid.is_empty() && pid.bytes().all(|byte| byte.is_ascii_digit())).then_some(name)
}

/// Writes the backup to a private temporary file beside `file`, then links it into place.
pub(crate) async fn write_backup(
    database: &Database,
    signing: &SigningKeys,
    recipients: &[age::x25519::Recipient],
    file: &Path,
) -> anyhow::Result<Written> {
    let directory = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .ok_or_else(|| anyhow!("{} is not a file name", file.display()))?
        .to_string_lossy()
        .into_owned();
    let partial = directory.join(partial_file_name(&name));
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;

    let result = async {
        let manifest = snapshot(database, signing, recipients, output).await?;
        // Linking (not renaming) never replaces a file that appeared meanwhile.
        fs::hard_link(&partial, file)
            .with_context(|| format!("cannot create {}", file.display()))?;
        File::open(&directory)
            .and_then(|directory| directory.sync_all())
            .with_context(|| format!("cannot sync {}", directory.display()))?;
        let bytes = fs::metadata(file)
            .with_context(|| format!("cannot inspect {}", file.display()))?
            .len();
        Ok(Written { manifest, bytes })
    }
    .await;
    let _ = fs::remove_file(&partial);
    result
}

/// Reads every table in one snapshot and streams it, encrypted, into `output`.
async fn snapshot(
    database: &Database,
    signing: &SigningKeys,
    recipients: &[age::x25519::Recipient],
    output: File,
) -> anyhow::Result<Manifest> {
    let db = crate::wiring::log_db(database);
    let backend = db.backend();
    let mut tx = match &db {
        // A deferred BEGIN: the snapshot starts at the first read and never blocks appends.
        ProjectionDb::Sqlite(pool) => ProjectionTx::Sqlite(pool.begin().await?, None),
        ProjectionDb::Postgres(pool) => {
            let mut tx = ProjectionTx::Postgres(pool.begin().await?);
            tx.execute(
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
                vec![],
            )
            .await?;
            tx
        }
    };
    let mut total = 0u64;
    for table in TABLES {
        let row = tx
            .fetch_optional(
                AssertSqlSafe(format!("SELECT COUNT(*) FROM {}", table.name)),
                vec![],
            )
            .await
            .with_context(|| format!("cannot count the rows of {}", table.name))?;
        total += row.map_or(Ok(0), |row| row.i64(0))?.max(0).unsigned_abs();
    }

    let mut sink = Sink::start(output, recipients)?;
    let bar = progress_bar(total, BACKUP_PROGRESS_TEMPLATE);
    let created_at = chartlog_api::now().to_string();
    let header = Header {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        created_at: created_at.clone(),
        source_backend: backend_name(backend).to_owned(),
        chartlog_version: env!("CARGO_PKG_VERSION").to_owned(),
        signer_key_id: signing.active().key_id().as_str().to_owned(),
        tables: table_headers(),
    };
    sink.line(&Record::Header(header)).await?;

    let mut root = ContentDigest::new();
    let mut last_position = 0u64;
    let mut rows = BTreeMap::new();
    let hash_index = TABLES[EVENTS].column_index("hash");
    for (table_index, table) in TABLES.iter().enumerate() {
        let mut count = 0u64;
        let mut after: Option<Vec<SqlArg>> = None;
        loop {
            let sql = table.page_sql(backend, after.is_some());
            let page = tx
                .fetch_all(AssertSqlSafe(sql), after.take().unwrap_or_default())
                .await
                .with_context(|| format!("cannot read {}", table.name))?;
            let page_rows = page.len();
            let mut last: Option<Vec<Value>> = None;
            for row in &page {
                let values = table
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(index, (_, kind))| Value::read(row, index, *kind))
                    .collect::<Result<Vec<_>, _>>()
                    .with_context(|| format!("cannot decode a row of {}", table.name))?;
                if table_index == EVENTS {
                    let hash = values[hash_index]
                        .bytes()
                        .ok_or_else(|| anyhow!("an event without a hash"))?;
                    root.update(hash);
                    let position = values[0].int().unwrap_or(0);
                    last_position = u64::try_from(position).unwrap_or(0);
                }
                let json: Vec<serde_json::Value> = values.iter().map(Value::to_json).collect();
                sink.row(table.name, &json).await?;
                count += 1;
                last = Some(values);
            }
            bar.inc(page_rows as u64);
            match (table.key.is_empty(), last) {
                (false, Some(last)) if page_rows == PAGE_ROWS => {
                    after = Some(
                        table
                            .key
                            .iter()
                            .map(|key| {
                                let index = table.column_index(key);
                                last[index].to_arg(table.columns[index].1)
                            })
                            .collect(),
                    );
                }
                _ => break,
            }
        }
        rows.insert(table.name.to_owned(), count);
    }
    // Read-only: ending it either way releases the snapshot.
    tx.commit().await.context("cannot end the snapshot")?;
    bar.finish_and_clear();

    let signer = signing.active();
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: FORMAT_VERSION,
        created_at,
        source_backend: backend_name(backend).to_owned(),
        signer_key_id: signer.key_id().as_str().to_owned(),
        events: rows[TABLES[EVENTS].name],
        streams: rows[TABLES[STREAMS].name],
        last_position,
        root_hash: hex_encode(&root.finish()),
        rows,
        content_sha256: hex_encode(&sink.content_digest()),
    };
    let text = serde_json::to_string(&manifest).context("cannot encode the manifest")?;
    let signature = signer.sign_manifest(text.as_bytes());
    sink.manifest(&Record::Manifest {
        manifest: text,
        signature: hex_encode(signature.as_bytes()),
    })
    .await?;
    sink.finish().await?;
    Ok(manifest)
}

/// Lines out: gathered into chunks, digested, and encrypted to a file by a thread of its own.
struct Sink {
    buffer: Vec<u8>,
    digest: ContentDigest,
    sender: Option<mpsc::Sender<Vec<u8>>>,
    writer: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Sink {
    fn start(output: File, recipients: &[age::x25519::Recipient]) -> anyhow::Result<Sink> {
        let encryptor =
            age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
                .map_err(|error| anyhow!("cannot encrypt to these recipients: {error}"))?;
        let (sender, mut receiver) = mpsc::channel::<Vec<u8>>(CHANNEL_DEPTH);
        let writer = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut encrypted = encryptor
                .wrap_output(BufWriter::new(output))
                .context("cannot write the backup file")?;
            while let Some(chunk) = receiver.blocking_recv() {
                encrypted
                    .write_all(&chunk)
                    .context("cannot write the backup file")?;
            }
            let buffered = encrypted.finish().context("cannot write the backup file")?;
            let file = buffered
                .into_inner()
                .map_err(|error| error.into_error())
                .context("cannot write the backup file")?;
            file.sync_all().context("cannot sync the backup file")
        });
        Ok(Sink {
            buffer: Vec::with_capacity(WRITE_CHUNK_BYTES + 64 * 1024),
            digest: ContentDigest::new(),
            sender: Some(sender),
            writer: Some(writer),
        })
    }

    async fn line(&mut self, record: &Record) -> anyhow::Result<()> {
        let start = self.buffer.len();
        serde_json::to_writer(&mut self.buffer, record).context("cannot encode a record")?;
        self.buffer.push(b'\n');
        self.digest.update(&self.buffer[start..]);
        self.flush_if_full().await
    }

    async fn row(
        &mut self,
        table: &'static str,
        values: &[serde_json::Value],
    ) -> anyhow::Result<()> {
        let start = self.buffer.len();
        serde_json::to_writer(
            &mut self.buffer,
            &RowOut {
                record: "row",
                table,
                values,
            },
        )
        .context("cannot encode a row")?;
        self.buffer.push(b'\n');
        self.digest.update(&self.buffer[start..]);
        self.flush_if_full().await
    }

    /// The digest of every line so far.
    fn content_digest(&self) -> [u8; 32] {
        self.digest.clone().finish()
    }

    /// The manifest's line: last, and outside the digest it states.
    async fn manifest(&mut self, record: &Record) -> anyhow::Result<()> {
        serde_json::to_writer(&mut self.buffer, record).context("cannot encode the manifest")?;
        self.buffer.push(b'\n');
        self.send().await
    }

    async fn flush_if_full(&mut self) -> anyhow::Result<()> {
        if self.buffer.len() >= WRITE_CHUNK_BYTES {
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> anyhow::Result<()> {
        let chunk = std::mem::replace(
            &mut self.buffer,
            Vec::with_capacity(WRITE_CHUNK_BYTES + 64 * 1024),
        );
        let sent = match &self.sender {
            Some(sender) => sender.send(chunk).await.is_ok(),
            None => false,
        };
        if !sent {
            // The writer stopped: its error says why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| anyhow!("the backup file's writer stopped")));
        }
        Ok(())
    }

    async fn finish(mut self) -> anyhow::Result<()> {
        self.send().await?;
        self.sender = None;
        tokio::task::block_in_place(|| self.join())
    }

    fn join(&mut self) -> anyhow::Result<()> {
        self.sender = None;
        match self.writer.take() {
            Some(writer) => writer
                .join()
                .map_err(|_| anyhow!("the backup file's writer panicked"))?,
            None => Ok(()),
        }
    }
}

// ---- Restore -----------------------------------------------------------------------------

/// A destroyed key's tombstone: an erasure ledger entry.
#[derive(Clone)]
struct Tombstone {
    key_id: Uuid,
    /// Unknown for an entry of a ledger file, which records erasures, not key creations.
    created_at_us: Option<i64>,
    destroyed_at_us: i64,
}

impl Tombstone {
    /// The key-table row that stands for the owner's destroyed key. The backup's own row, when
    /// it has one, gives the key id (the one its events' headers name) and creation time.
    fn row(&self, owner: &str, backup_row: Option<&[Value]>) -> Vec<Value> {
        let (key_id, created_at_us) = match backup_row {
            Some(row) => (row[1].clone(), row[4].clone()),
            None => (
                Value::Uuid(self.key_id),
                Value::Int(self.created_at_us.unwrap_or(self.destroyed_at_us)),
            ),
        };
        vec![
            Value::Text(owner.to_owned()),
            key_id,
            Value::Null,
            Value::Null,
            created_at_us,
            Value::Int(self.destroyed_at_us),
        ]
    }
}

/// The erasure ledger of a database: its destroyed data keys by owner.
async fn read_ledger(db: &ProjectionDb) -> anyhow::Result<BTreeMap<String, Tombstone>> {
    let rows = db
        .fetch_all(
            "SELECT owner_stream_id, key_id, created_at_us, destroyed_at_us \
             FROM chartlog_data_keys WHERE wrapped_key IS NULL",
            vec![],
        )
        .await
        .context("cannot read the erasure ledger (chartlog_data_keys)")?;
    let mut ledger = BTreeMap::new();
    for row in rows {
        ledger.insert(
            row.text(0)?,
            Tombstone {
                key_id: row.uuid(1)?,
                created_at_us: Some(row.i64(2)?),
                destroyed_at_us: row.opt_i64(3)?.unwrap_or(0),
            },
        );
    }
    Ok(ledger)
}

/// One erasure ledger a restore honoured, and what it did: reported so that an operator can
/// see which ledger kept which patients erased, and notice one that was missing.
#[derive(serde::Serialize)]
struct LedgerReport {
    /// `target_database`, `key_directory_file`, `erasure_ledger_file` (--erasure-ledger's),
    /// `file`, `database` or `backup`.
    kind: &'static str,
    /// A path, or a description of a database without credentials.
    source: String,
    /// Whether the ledger was there (only the key directory's file and --erasure-ledger's may
    /// be missing).
    present: bool,
    /// Erased owners it names.
    erasures: u64,
    /// Keys in the backup it names, which were therefore not restored. A key named by several
    /// ledgers counts in each.
    keys_withheld: u64,
}

/// The ledgers a restore honours: the target database's (read in the restore's transaction)
/// first, the backup's own last, and in between those read before it starts.
struct Ledgers {
    reports: Vec<LedgerReport>,
    /// Owners named by the ledgers read before the restore, with the indexes of the reports
    /// naming them.
    erased: BTreeMap<String, (Tombstone, Vec<usize>)>,
}

const TARGET_LEDGER: usize = 0;

impl Ledgers {
    fn new() -> Ledgers {
        Ledgers {
            reports: vec![LedgerReport {
                kind: "target_database",
                source: "the target database".to_owned(),
                present: true,
                erasures: 0,
                keys_withheld: 0,
            }],
            erased: BTreeMap::new(),
        }
    }

    fn add(
        &mut self,
        kind: &'static str,
        source: String,
        present: bool,
        entries: impl IntoIterator<Item = (String, Tombstone)>,
    ) {
        let index = self.reports.len();
        let mut erasures = 0;
        for (owner, tombstone) in entries {
            erasures += 1;
            self.erased
                .entry(owner)
                .or_insert_with(|| (tombstone, Vec::new()))
                .1
                .push(index);
        }
        self.reports.push(LedgerReport {
            kind,
            source,
            present,
            erasures,
            keys_withheld: 0,
        });
    }

    /// Reads an erasure ledger file; `if_missing` says what a missing one is.
    fn add_file(
        &mut self,
        kind: &'static str,
        ledger: &ErasureLedger,
        if_missing: IfMissing,
    ) -> anyhow::Result<()> {
        let source = ledger.path().display().to_string();
        let Some(contents) = ledger.read()? else {
            ensure!(
                if_missing != IfMissing::Refuse,
                "--erasures-from: no erasure ledger at {source}"
            );
            if if_missing == IfMissing::Skip {
                self.add(kind, source, false, []);
                return Ok(());
            }
            eprintln!(
                "WARNING: no erasure ledger at {source}. A patient erased after this backup was \
                 taken gets their data key back unless the target database or an \
                 --erasures-from names the erasure. If anyone was erased since, restore the key \
                 directory from a key backup taken after the last erasure, or name the live \
                 database or its ledger with --erasures-from."
            );
            self.add(kind, source, false, []);
            return Ok(());
        };
        if contents.torn_tail {
            eprintln!(
                "WARNING: the last line of {source} is incomplete (an append cut short); it \
                 never led to a destroyed key and is ignored."
            );
        }
        let entries = contents.erasures.into_iter().map(|(owner, erasure)| {
            let tombstone = Tombstone {
                key_id: erasure.data_key_id,
                created_at_us: None,
                destroyed_at_us: erasure.erased_at.unix_micros(),
            };
            (owner, tombstone)
        });
        self.add(kind, source, true, entries);
        Ok(())
    }

    async fn add_database(&mut self, url: &DatabaseUrl, number: usize) -> anyhow::Result<()> {
        let location = DatabaseLocation::Url(url.clone());
        let other = open_database(&location).await.with_context(|| {
            format!(
                "--erasures-from #{number}: cannot open the {}",
                location.describe()
            )
        })?;
        let ledger = read_ledger(&crate::wiring::log_db(&other)).await;
        other.close().await;
        // A SQLite URL names a file and holds no secret; another URL may hold a password.
        let source = if url.scheme() == "sqlite" {
            url.expose().to_owned()
        } else {
            format!("the {} database of --erasures-from #{number}", url.scheme())
        };
        self.add("database", source, true, ledger?);
        Ok(())
    }
}

/// What a missing erasure ledger file is to a restore.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IfMissing {
    /// An error: the operator named it.
    Refuse,
    /// A warning: the ledger the server writes, which may not have been restored.
    Warn,
    /// Nothing to say: the key directory's file when the server keeps its ledger elsewhere.
    Skip,
}

/// Counts a restore reports.
#[derive(Default)]
struct Restored {
    rows: BTreeMap<String, u64>,
    keys_restored: u64,
    tombstones: u64,
    keys_withheld: u64,
    last_position: u64,
    ledgers: Vec<LedgerReport>,
}

/// What the check after the commit found.
enum AfterCheck {
    /// Every restored event verified; how many events `verify_log` read.
    Intact(u64),
    /// The check could not finish (the global log held back, a database error).
    Unconfirmed(String),
    /// The log read back does not verify.
    Broken(String),
}

pub(crate) async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let key_dir = args.storage.data_dir.join(KEY_DIR_NAME);
    let signing_path = key_dir.join(SIGNING_FILE_NAME);
    let keys_hint = "restore needs the key files of the server the backup was taken from: copy \
                     its keys/ folder from the key backup into the target's data directory first";
    let signing = SigningKeys::load(&signing_path)
        .with_context(|| format!("cannot load {}; {keys_hint}", signing_path.display()))?;
    let (ring, _) = keys::kek_ring(&key_dir, keys::CreateKekFile::No)
        .with_context(|| format!("cannot load the KEK ring; {keys_hint}"))?;
    let verifier = signing.verifier();

    let mut identities: Vec<Box<dyn age::Identity + Send + Sync>> = Vec::new();
    for path in &args.identities {
        let file = age::IdentityFile::from_file(path.display().to_string())
            .with_context(|| format!("cannot read the identity file {}", path.display()))?;
        identities.extend(
            file.into_identities()
                .map_err(|error| anyhow!("identity file {}: {error}", path.display()))?,
        );
    }
    ensure!(
        !identities.is_empty(),
        "the identity files hold no age identity (AGE-SECRET-KEY-1...)"
    );

    let input = File::open(&args.file)
        .with_context(|| format!("cannot open the backup {}", args.file.display()))?;
    let size = input
        .metadata()
        .with_context(|| format!("cannot inspect {}", args.file.display()))?
        .len();
    let bar = progress_bar(size, RESTORE_PROGRESS_TEMPLATE);
    let counted = BufReader::new(Counted {
        inner: input,
        bar: bar.clone(),
    });
    let decryptor = age::Decryptor::new_buffered(counted).map_err(|error| {
        anyhow!(
            "{} is not an age-encrypted backup: {error}",
            args.file.display()
        )
    })?;
    let plaintext = decryptor
        .decrypt(
            identities
                .iter()
                .map(|identity| identity.as_ref() as &dyn age::Identity),
        )
        .map_err(|error| {
            anyhow!(
                "cannot decrypt {}: {error} (is --identity the key it was encrypted to?)",
                args.file.display()
            )
        })?;

    // The server's ledger is read whether or not it is named: it is the one that survives
    // the loss of the database, and it arrives with the key backup a restore needs. Kept
    // outside a read-only key directory (--erasure-ledger), the key directory's own file,
    // if any, holds the erasures from before it moved.
    let mut ledgers = Ledgers::new();
    let key_directory_file = ErasureLedger::in_key_dir(&key_dir);
    if args.erasure_ledger.is_given() {
        ledgers.add_file(
            "erasure_ledger_file",
            &args.erasure_ledger.ledger(&key_dir),
            IfMissing::Warn,
        )?;
        ledgers.add_file("key_directory_file", &key_directory_file, IfMissing::Skip)?;
    } else {
        ledgers.add_file("key_directory_file", &key_directory_file, IfMissing::Warn)?;
    }
    for (index, from) in args.erasures_from.iter().enumerate() {
        match from {
            ErasuresFrom::File(path) => {
                ledgers.add_file("file", &ErasureLedger::at(path.clone()), IfMissing::Refuse)?;
            }
            ErasuresFrom::Database(url) => ledgers.add_database(url, index + 1).await?,
        }
    }

    create_data_dir(&args.storage.data_dir)?;
    let location = args.storage.database_location();
    tracing::info!(database = location.describe(), "restore");
    let database = open_database(&location).await?;
    let started = Instant::now();
    let restored = restore_into(&database, plaintext, &verifier, &ring, ledgers, &bar).await;
    bar.finish_and_clear();
    let (restored, verified) = match restored {
        Ok(restored) => restored,
        Err(error) => {
            // Nothing was committed: the target is as it was, empty, and a retry needs it so.
            database.close().await;
            return Err(error);
        }
    };

    // Committed: from here on nothing may be reported as a failed restore. What goes wrong
    // is reported as what it is, the data restored and the check or the record missing.
    let wait = Duration::from_secs(args.verify_wait_seconds);
    let after_check = check_restored(&database, &verifier, &restored, wait).await;
    let audited = crate::wiring::audit_operator_action(
        &database,
        &key_dir,
        AuditEntity::Backup,
        AuditAction::Create,
        AuditOutcome::Success,
    )
    .await;
    database.close().await;
    let seconds = started.elapsed().as_secs_f64();
    let manifest = verified.manifest;
    tracing::info!(events = manifest.events, seconds, "restored");

    let withheld: Vec<String> = restored
        .ledgers
        .iter()
        .filter(|report| report.present)
        .map(|report| {
            format!(
                "{} ({} erasures, {} keys withheld)",
                report.source, report.erasures, report.keys_withheld
            )
        })
        .collect();
    eprintln!(
        "{} data keys withheld because the patient is erased; erasure ledgers honoured: {}",
        restored.keys_withheld,
        withheld.join("; ")
    );

    let (check_name, problem, verified_events) = match &after_check {
        AfterCheck::Intact(events) => ("intact", None, Some(*events)),
        AfterCheck::Unconfirmed(problem) => ("unconfirmed", Some(problem.as_str()), None),
        AfterCheck::Broken(problem) => ("broken", Some(problem.as_str()), None),
    };
    let audit_problem = audited.as_ref().err().map(|error| format!("{error:#}"));
    let summary = serde_json::json!({
        "file": args.file.display().to_string(),
        "committed": true,
        "after_check": check_name,
        "after_check_problem": problem,
        "audit_recorded": audit_problem.is_none(),
        "audit_problem": audit_problem,
        "events": manifest.events,
        "streams": manifest.streams,
        "last_position": manifest.last_position,
        "root_hash": manifest.root_hash,
        "rows": restored.rows,
        "data_keys_restored": restored.keys_restored,
        "erased_keys": restored.tombstones,
        "keys_withheld_for_erasure": restored.keys_withheld,
        "erasure_ledgers": restored.ledgers,
        "verified_events": verified_events,
        "source_backend": manifest.source_backend,
        "backup_created_at": manifest.created_at,
        "signer_key_id": manifest.signer_key_id,
        "seconds": seconds,
    });
    let checked = if verified_events.is_some() {
        "the log verifies"
    } else {
        "the check after the commit did NOT confirm it (see below)"
    };
    let human = format!(
        "restored {} events of {} streams (last position {}, root hash {}), {} data keys, {} \
         erasure tombstones ({} keys withheld because the patient is erased) and {} accounts \
         from {} in {seconds:.1} s; {checked}.\n\
         Next: rebuild the read models with `chartlog rebuild` on this database.",
        manifest.events,
        manifest.streams,
        manifest.last_position,
        manifest.root_hash,
        restored.keys_restored,
        restored.tombstones,
        restored.keys_withheld,
        restored.rows.get(TABLES[USERS].name).copied().unwrap_or(0),
        args.file.display(),
    );
    print_summary(args.json, &summary, &human)?;

    let mut problems = Vec::new();
    match &after_check {
        AfterCheck::Intact(_) => {}
        AfterCheck::Unconfirmed(problem) => problems.push(format!(
            "the check after the commit could not confirm the restored log: {problem}. Run \
             `chartlog verify` on this database once that is resolved"
        )),
        AfterCheck::Broken(problem) => problems.push(format!(
            "the check after the commit found a problem: {problem}. Every event verified \
             before the commit, so something changed the database since; do not serve it \
             before `chartlog verify` passes"
        )),
    }
    if let Some(problem) = &audit_problem {
        problems.push(format!(
            "the restore's audit record could not be written ({problem}); note the restore in \
             your own records"
        ));
    }
    if problems.is_empty() {
        return Ok(());
    }
    eprintln!(
        "WARNING: the backup IS restored and committed: the target is no longer empty and \
         running restore again would be refused. But {}.",
        problems.join("; and ")
    );
    // After the pool is closed and stdout flushed: nothing is left to clean up.
    std::process::exit(EXIT_COMMITTED_UNCONFIRMED);
}

/// Counts the encrypted bytes read, for the progress bar.
struct Counted {
    inner: File,
    bar: ProgressBar,
}

impl Read for Counted {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.bar.inc(read as u64);
        Ok(read)
    }
}

/// Inserts the backup into the empty target in one transaction, committed only once the
/// decrypting thread has verified everything.
async fn restore_into<R: Read + Send + 'static>(
    database: &Database,
    plaintext: R,
    verifier: &SignatureVerifier,
    ring: &KeyRing,
    ledgers: Ledgers,
    bar: &ProgressBar,
) -> anyhow::Result<(Restored, Verified)> {
    let db = crate::wiring::log_db(database);
    let backend = db.backend();
    let mut tx = db.begin().await.context("cannot begin the restore")?;
    if backend == Backend::Postgres {
        // Nobody appends, creates keys or accounts while the target is checked and filled.
        tx.execute(
            "LOCK TABLE chartlog_events, chartlog_streams, chartlog_data_keys, \
             chartlog_access_users IN SHARE ROW EXCLUSIVE MODE",
            vec![],
        )
        .await
        .context("cannot lock the target's tables")?;
    }
    refuse_non_empty(&mut tx).await?;
    let target_ledger = {
        let rows = tx
            .fetch_all(
                "SELECT owner_stream_id FROM chartlog_data_keys WHERE wrapped_key IS NULL",
                vec![],
            )
            .await
            .context("cannot read the target's erasure ledger")?;
        rows.iter()
            .map(|row| row.text(0))
            .collect::<Result<BTreeSet<String>, _>>()?
    };
    let Ledgers {
        mut reports,
        erased,
    } = ledgers;
    reports[TARGET_LEDGER].erasures = target_ledger.len() as u64;
    let backup_ledger = reports.len();
    reports.push(LedgerReport {
        kind: "backup",
        source: "the backup itself".to_owned(),
        present: true,
        erasures: 0,
        keys_withheld: 0,
    });

    let (sender, mut receiver) = mpsc::channel::<Batch>(CHANNEL_DEPTH);
    let reader = {
        let verifier = verifier.clone();
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || {
            // If the inserting task stopped (a database error, which it reports), reading goes
            // on to the end regardless: a backup that fails its checks is reported as such,
            // not as the database error its rows caused.
            let verified = read_backup(plaintext, verifier, |batch| {
                let _ = sender.blocking_send(batch);
            });
            if verified.is_err() {
                bar.abandon();
            }
            verified
        })
    };

    let mut restored = Restored::default();
    let mut handled_owners = BTreeSet::new();
    let mut missing_keks = BTreeSet::new();
    let inserted = async {
        while let Some(batch) = receiver.recv().await {
            let table = &TABLES[batch.table];
            let rows = if batch.table == DATA_KEYS {
                let mut kept = Vec::with_capacity(batch.rows.len());
                for row in batch.rows {
                    let owner = row[0].text().unwrap_or_default().to_owned();
                    let active = row[3] != Value::Null;
                    handled_owners.insert(owner.clone());
                    let in_target = target_ledger.contains(&owner);
                    let named = erased.get(&owner);
                    if !active {
                        reports[backup_ledger].erasures += 1;
                    }
                    if active && (in_target || named.is_some()) {
                        restored.keys_withheld += 1;
                        if in_target {
                            reports[TARGET_LEDGER].keys_withheld += 1;
                        }
                        for &index in named.map_or(&[][..], |(_, named_by)| named_by) {
                            reports[index].keys_withheld += 1;
                        }
                    }
                    if in_target {
                        // The target's own tombstone stays; the key is not restored.
                        continue;
                    }
                    if let Some((tombstone, _)) = named
                        && active
                    {
                        restored.tombstones += 1;
                        kept.push(tombstone.row(&owner, Some(&row)));
                        continue;
                    }
                    if active {
                        let kek = row[2].text().unwrap_or_default();
                        if !KekId::parse(kek).is_ok_and(|kek| ring.contains(&kek)) {
                            missing_keks.insert(kek.to_owned());
                        }
                        restored.keys_restored += 1;
                    } else {
                        restored.tombstones += 1;
                    }
                    kept.push(row);
                }
                kept
            } else {
                batch.rows
            };
            if batch.table == EVENTS
                && let Some(last) = rows.last()
            {
                restored.last_position = u64::try_from(last[0].int().unwrap_or(0)).unwrap_or(0);
            }
            *restored.rows.entry(table.name.to_owned()).or_default() += rows.len() as u64;
            insert_rows(&mut tx, table, &rows).await?;
        }
        // The other ledgers' tombstones of owners the backup does not know: the ledger
        // travels whole, so none of those owners can ever be given a key.
        let extra: Vec<Vec<Value>> = erased
            .iter()
            .filter(|(owner, _)| {
                !handled_owners.contains(*owner) && !target_ledger.contains(*owner)
            })
            .map(|(owner, (tombstone, _))| tombstone.row(owner, None))
            .collect();
        restored.tombstones += extra.len() as u64;
        insert_rows(&mut tx, &TABLES[DATA_KEYS], &extra).await?;
        anyhow::Ok(())
    }
    .await;
    // Unblocks the reader if the inserts stopped early.
    drop(receiver);
    // The reader's verdict first: a refused backup explains an insert that failed.
    let verified = match reader.await {
        Ok(verified) => verified,
        Err(error) => Err(anyhow!("the backup reader failed: {error}")),
    };
    let verified = verified?;
    inserted?;
    ensure!(
        missing_keks.is_empty(),
        "the backup's data keys are wrapped under key-encryption keys this data directory's \
         KEK ring ({KEK_FILE_NAME}, or {}) lacks ({}): restore the key files from the key \
         backup first",
        keys::KEK_ENV,
        missing_keks.into_iter().collect::<Vec<_>>().join(", ")
    );
    if backend == Backend::Postgres && restored.last_position > 0 {
        // Appends after the restore take positions from their transaction ids: they must
        // sort after every restored position.
        let row = tx
            .fetch_optional("SELECT pg_current_xact_id()::text::bigint", vec![])
            .await?;
        let xid = row.map_or(Ok(0), |row| row.i64(0))?;
        let floor = u64::try_from(xid).unwrap_or(0).saturating_mul(1024);
        ensure!(
            restored.last_position < floor,
            "the backup's last position {} is not below this PostgreSQL cluster's next \
             positions (transaction id {xid} x 1024): events appended after the restore would \
             sort before restored ones. Restore into a cluster whose transaction ids are past \
             {}",
            restored.last_position,
            restored.last_position / 1024 + 1
        );
    }
    tx.commit().await.context("cannot commit the restore")?;
    restored.ledgers = reports;
    Ok((restored, verified))
}

/// Refuses a target that holds anything but an erasure ledger.
async fn refuse_non_empty(tx: &mut ProjectionTx) -> anyhow::Result<()> {
    for (index, table) in TABLES.iter().enumerate() {
        let filter = if index == DATA_KEYS {
            " WHERE wrapped_key IS NOT NULL"
        } else {
            ""
        };
        let found = tx
            .fetch_optional(
                AssertSqlSafe(format!("SELECT 1 FROM {}{filter} LIMIT 1", table.name)),
                vec![],
            )
            .await
            .with_context(|| format!("cannot inspect the target's {}", table.name))?;
        if found.is_some() {
            bail!(
                "the target database is not empty ({} has rows): a backup is restored only \
                 into an empty database; nothing was changed",
                table.name
            );
        }
    }
    Ok(())
}

async fn insert_rows(
    tx: &mut ProjectionTx,
    table: &Table,
    rows: &[Vec<Value>],
) -> anyhow::Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let backend = tx.backend();
    let per_statement = tx.rows_per_statement(table.columns.len());
    for chunk in rows.chunks(per_statement) {
        let args = chunk
            .iter()
            .flat_map(|row| {
                row.iter()
                    .zip(table.columns)
                    .map(|(value, (_, kind))| value.to_arg(*kind))
            })
            .collect();
        tx.execute(AssertSqlSafe(table.insert_sql(backend, chunk.len())), args)
            .await
            .with_context(|| format!("cannot insert into {}", table.name))?;
    }
    Ok(())
}

/// After the commit: `verify_log` over the restored database must find every event intact.
/// Never an error: the restore is committed whatever it finds, and says so.
async fn check_restored(
    database: &Database,
    verifier: &SignatureVerifier,
    restored: &Restored,
    wait: Duration,
) -> AfterCheck {
    let expected = restored.rows.get(TABLES[EVENTS].name).copied().unwrap_or(0);
    let spinner = ProgressBar::new_spinner();
    spinner.set_style(
        ProgressStyle::with_template(VERIFY_PROGRESS_TEMPLATE)
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    spinner.set_message("checking the restored log's hashes, chains and signatures");
    spinner.enable_steady_tick(Duration::from_millis(200));
    let started = Instant::now();
    let outcome = loop {
        let report = match database {
            Database::Sqlite(store, _) => verify_log(store, verifier).await,
            Database::Postgres(store) => verify_log(store, verifier).await,
        };
        let report = match report {
            Ok(report) => report,
            Err(error) => {
                break AfterCheck::Unconfirmed(format!("cannot verify the restored log: {error}"));
            }
        };
        if !report.is_intact() {
            let first = &report.breaks[0];
            break AfterCheck::Broken(format!(
                "the restored log does not verify: {} broken streams, the first {} at version {} \
                 (position {}): {:?}",
                report.breaks.len(),
                first.stream,
                first.version,
                first.position,
                first.problem
            ));
        }
        if report.events >= expected {
            break AfterCheck::Intact(report.events);
        }
        // On PostgreSQL the global log shows events only below the oldest transaction open
        // in the cluster; wait for it rather than report events as missing.
        if started.elapsed() > wait {
            break AfterCheck::Unconfirmed(format!(
                "the restored log showed {} of {expected} events to verification after {} s \
                 (a long transaction elsewhere in the cluster holds it back; \
                 --verify-wait-seconds waits longer)",
                report.events,
                wait.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    spinner.finish_and_clear();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_templates_parse() {
        for template in [
            BACKUP_PROGRESS_TEMPLATE,
            RESTORE_PROGRESS_TEMPLATE,
            VERIFY_PROGRESS_TEMPLATE,
        ] {
            assert!(ProgressStyle::with_template(template).is_ok(), "{template}");
        }
    }

    #[test]
    fn keyset_pages_and_inserts_are_built_from_the_table_list_only() {
        let history = &TABLES[4];
        assert_eq!(
            history.page_sql(Backend::Sqlite, true),
            "SELECT user_id, generation, password_hash, set_at_us FROM \
             chartlog_access_password_history WHERE (user_id, generation) > ($1, $2) ORDER BY \
             user_id, generation LIMIT 1000"
        );
        let audit = &TABLES[10];
        assert!(
            audit
                .insert_sql(Backend::Postgres, 2)
                .contains("$15::inet, $16), ($17")
        );
        assert!(
            audit
                .page_sql(Backend::Postgres, false)
                .contains("abbrev(client_address)")
        );
    }
}
