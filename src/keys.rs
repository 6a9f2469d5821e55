//! `chartlog keys`: the ids of the keys in use, KEK and signing-key rotation, and the public
//! keys for external verifiers. Never prints, logs or exports secret key material.
//!
//! A running server read the key files when it started and keeps them in memory: rotate with
//! every chartlog process of the data directory stopped, and start them again afterwards.
//! Two rotations never run at once: each holds an exclusive lock on `<keys>/rotation.lock`.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use chartlog_crypto::{
    DataKeys, KEK_BYTES, KEK_FILE_NAME, KEKS_MAX, KekId, KeyError, KeyRing, KeyStore,
    RETIRED_SIGNERS_MAX, SIGNING_FILE_NAME, SignatureVerifier, SignerKeyId, SigningKeys,
    UnreadableKey, load_or_create_kek_ring,
};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};
use chartlog_projections::db::{ProjectionDb, SqlArg};
use chartlog_store::postgres::PostgresKeyStore;
use chartlog_store::sqlite::SqliteKeyStore;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::{Database, DatabaseLocation, KEY_DIR_NAME, StorageArgs, wiring};

/// Supplies the KEK ring instead of `<keys>/kek.json`, so that the key which unwraps every
/// data key can be kept in a secret manager, apart from the data directory and its backups:
/// `kek-id:base64-key[,kek-id:base64-key...]`, keys of [`KEK_BYTES`] bytes, the first active.
pub(crate) const KEK_ENV: &str = "CHARTLOG_KEK";
/// The file every rotation locks, in the key directory.
const ROTATION_LOCK_FILE_NAME: &str = "rotation.lock";
/// The format tag of `keys export-public` output.
pub(crate) const PUBLIC_KEYS_FORMAT: &str = "chartlog-public-keys/v1";
/// Largest public-key file `verify --public-keys` reads (1,025 keys take about 150 KiB).
const PUBLIC_KEYS_FILE_BYTES_MAX: u64 = 1024 * 1024;
/// How often the KEK rotation's progress bar counts the keys left.
const PROGRESS_REFRESH: Duration = Duration::from_secs(1);
/// Keys that do not unwrap named in the text of `keys rotate-kek` (`--json` names them all).
const UNREADABLE_KEYS_NAMED_MAX: usize = 20;
/// The KEK rotation's progress bar.
const ROTATION_PROGRESS_TEMPLATE: &str =
    "rotate-kek [{elapsed_precise}] [{wide_bar}] {pos}/{len} data keys, {per_sec}, {eta} left";

#[derive(Subcommand)]
pub(crate) enum KeysCommand {
    /// The ids of the key-encryption keys (with how many data keys each wraps) and of the
    /// signing keys. Never key material.
    Show(ShowArgs),
    /// Make a new key-encryption key active and re-wrap every data key under it; events are
    /// not touched. An interrupted rotation is finished by running this again. Stop the server
    /// first and start it again afterwards: it holds the old key ring in memory. Recorded on
    /// the audit trail, with its outcome.
    RotateKek(RotateKekArgs),
    /// Make a new event-signing key active. The old key's public half stays trusted, so events
    /// signed before still verify. Stop the server first and start it again afterwards.
    /// Recorded on the audit trail, with its outcome: it needs the KEK ring as the server has
    /// it.
    RotateSigning(JsonArgs),
    /// Print the public signing keys (active and retired) as JSON, for
    /// `chartlog verify --public-keys` and other external verifiers.
    ExportPublic(ExportPublicArgs),
}

#[derive(Args)]
pub(crate) struct ShowArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct RotateKekArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    json: bool,
    /// After a complete rotation, remove every older KEK from the key file. Backups taken
    /// before the rotation hold data keys wrapped under the older KEKs: keep a copy of the old
    /// key file with them, or they cannot be restored.
    #[arg(long)]
    retire_old: bool,
}

#[derive(Args)]
pub(crate) struct JsonArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// Print a one-line JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct ExportPublicArgs {
    /// Directory for local state: the key files are in its `keys` folder.
    #[arg(long, env = "CHARTLOG_DATA_DIR", default_value = "./chartlog-data")]
    data_dir: PathBuf,
}

pub(crate) async fn run(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Show(args) => show(args).await,
        KeysCommand::RotateKek(args) => rotate_kek(args).await,
        KeysCommand::RotateSigning(args) => rotate_signing(&args).await,
        KeysCommand::ExportPublic(args) => export_public(&args.data_dir),
    }
}

/// `<data-dir>/keys`.
pub(crate) fn key_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(KEY_DIR_NAME)
}

/// Fails unless the key file exists: the operator commands never create keys (that is the
/// server's first start), since keys made here would seal nothing anyone has.
pub(crate) fn require_key_file(path: &Path) -> anyhow::Result<()> {
    ensure!(
        path.exists(),
        "no key file at {}: check --data-dir (the server creates the keys on first start)",
        path.display()
    );
    Ok(())
}

/// The KEK ring of the data directory ([`kek_ring`]); never creates one.
pub(crate) fn load_ring(data_dir: &Path) -> anyhow::Result<KeyRing> {
    kek_ring(&key_dir(data_dir), CreateKekFile::No).map(|(ring, _)| ring)
}

/// Where a KEK ring came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum KekSource {
    /// [`KEK_ENV`].
    Environment,
    /// The key file at this path.
    KeyFile(PathBuf),
}

impl KekSource {
    fn name(&self) -> &'static str {
        match self {
            KekSource::Environment => "environment",
            KekSource::KeyFile(_) => "key_file",
        }
    }
}

/// Whether [`kek_ring`] may create the key file: only the server's first start (and the
/// commands that open a backend the way it does) makes keys.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreateKekFile {
    IfMissing,
    No,
}

/// The KEK ring: from [`KEK_ENV`] when it is set, else from `<key_dir>/kek.json`. Refuses
/// both at once, since data keys wrapped under one ring would not unwrap under the other, and
/// an operator who moved the ring into a secret manager must not find a forgotten copy used.
/// Errors name the variable or the file, never key bytes.
pub(crate) fn kek_ring(
    key_dir: &Path,
    create: CreateKekFile,
) -> anyhow::Result<(KeyRing, KekSource)> {
    let path = key_dir.join(KEK_FILE_NAME);
    let Some(value) = std::env::var_os(KEK_ENV) else {
        let ring = match create {
            CreateKekFile::IfMissing => load_or_create_kek_ring(key_dir).with_context(|| {
                format!("cannot load or create the KEK ring {}", path.display())
            })?,
            CreateKekFile::No => {
                ensure!(
                    path.exists(),
                    "no key file at {} and {KEK_ENV} is not set: check --data-dir, and set \
                     {KEK_ENV} as the server has it if it runs with one (the server creates the \
                     key file on first start otherwise)",
                    path.display()
                );
                KeyRing::load(&path)
                    .with_context(|| format!("cannot load the KEK ring {}", path.display()))?
            }
        };
        return Ok((ring, KekSource::KeyFile(path)));
    };
    ensure!(
        !path.exists(),
        "both {KEK_ENV} and the key file {} hold a KEK ring: keep one (to move to {KEK_ENV}, \
         put every KEK of the file in it, the file's active one first, then remove the file)",
        path.display()
    );
    let value = zeroize::Zeroizing::new(
        value
            .into_string()
            .map_err(|_| anyhow!("{KEK_ENV} is not valid UTF-8"))?,
    );
    let ring = KeyRing::from_env_value(&value).with_context(|| {
        format!(
            "{KEK_ENV} is not a KEK ring (kek-id:base64-key[,kek-id:base64-key...], \
             {KEK_BYTES}-byte keys, the first active)"
        )
    })?;
    Ok((ring, KekSource::Environment))
}

/// Refuses a KEK ring that holds none of the KEKs wrapping the database's data keys: with a
/// mistyped [`KEK_ENV`] or another server's key file, every record would fail to open and the
/// new ones would be sealed under data keys that nothing else can unwrap. A ring lacking only
/// some of those KEKs passes (`chartlog keys show` names them), so one lost KEK does not
/// keep every other record from being served.
pub(crate) async fn ensure_ring_fits(database: &Database, ring: &KeyRing) -> anyhow::Result<()> {
    let (by_kek, _) = data_key_counts(&wiring::log_db(database)).await?;
    let known = ring.kek_ids();
    if by_kek.is_empty()
        || by_kek
            .keys()
            .any(|id| known.iter().any(|k| k.as_str() == id))
    {
        return Ok(());
    }
    let wrapped: u64 = by_kek.values().sum();
    bail!(
        "the KEK ring holds none of the KEKs that wrap this database's {wrapped} data keys ({}): \
         {KEK_ENV}, or <data-dir>/keys/{KEK_FILE_NAME} when it is unset, is not the ring this \
         database was sealed with",
        by_kek.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

/// The signing keys of the data directory; never creates them.
pub(crate) fn load_signing_keys(data_dir: &Path) -> anyhow::Result<SigningKeys> {
    load_signing_keys_in(&key_dir(data_dir))
}

/// The signing keys in `key_dir`; never creates them.
pub(crate) fn load_signing_keys_in(key_dir: &Path) -> anyhow::Result<SigningKeys> {
    let path = key_dir.join(SIGNING_FILE_NAME);
    require_key_file(&path)?;
    SigningKeys::load(&path)
        .with_context(|| format!("cannot load the signing keys {}", path.display()))
}

/// Takes the rotation lock; released when the returned file is dropped (or the process ends).
fn lock_rotation(key_dir: &Path) -> anyhow::Result<File> {
    let path = key_dir.join(ROTATION_LOCK_FILE_NAME);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open the rotation lock {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => bail!(
            "another key rotation holds {}; let it finish, then run this again",
            path.display()
        ),
        Err(TryLockError::Error(error)) => {
            Err(error).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")
        .and_then(|()| stdout.flush())
        .context("cannot write to stdout")
}

fn count(row: Option<chartlog_projections::db::DbRow>) -> anyhow::Result<u64> {
    let value = match row {
        Some(row) => row.i64(0).context("cannot read a count")?,
        None => 0,
    };
    Ok(u64::try_from(value).unwrap_or(0))
}

/// Data keys (not destroyed) that are not wrapped under `active`: what a rotation to it has
/// left to do.
async fn keys_to_rewrap(db: &ProjectionDb, active: &KekId) -> anyhow::Result<u64> {
    count(
        db.fetch_optional(
            "SELECT COUNT(*) FROM chartlog_data_keys \
             WHERE wrapped_key IS NOT NULL AND kek_id <> $1",
            vec![SqlArg::Text(active.as_str().to_owned())],
        )
        .await
        .context("cannot count the data keys to re-wrap")?,
    )
}

/// Data keys (not destroyed) wrapped under `kek`.
async fn keys_under(db: &ProjectionDb, kek: &KekId) -> anyhow::Result<u64> {
    count(
        db.fetch_optional(
            "SELECT COUNT(*) FROM chartlog_data_keys \
             WHERE wrapped_key IS NOT NULL AND kek_id = $1",
            vec![SqlArg::Text(kek.as_str().to_owned())],
        )
        .await
        .context("cannot count the data keys under a KEK")?,
    )
}

// ---- show ----

#[derive(Serialize)]
struct KeysReport {
    /// `key_file` or `environment` ([`KEK_ENV`]).
    kek_source: &'static str,
    key_encryption_keys: Vec<KekReport>,
    /// KEK ids that wrap data keys but are missing from the KEK ring: those keys cannot be
    /// unwrapped with this ring.
    unknown_key_encryption_keys: Vec<KekReport>,
    data_keys: DataKeyCounts,
    signing_keys: Vec<SignerReport>,
}

#[derive(Serialize)]
struct KekReport {
    id: String,
    active: bool,
    /// Data keys wrapped under it.
    data_keys: u64,
}

#[derive(Serialize)]
struct DataKeyCounts {
    active: u64,
    destroyed: u64,
}

#[derive(Serialize)]
struct SignerReport {
    id: String,
    active: bool,
}

async fn show(args: ShowArgs) -> anyhow::Result<()> {
    let (ring, source) = kek_ring(&key_dir(&args.storage.data_dir), CreateKekFile::No)?;
    let signing = load_signing_keys(&args.storage.data_dir)?;
    let database = wiring::open_existing_database(&args.storage.database_location()).await?;
    let counts = data_key_counts(&wiring::log_db(&database)).await;
    database.close().await;
    let (mut by_kek, destroyed) = counts?;

    let active_kek = ring.active_kek_id();
    let mut key_encryption_keys: Vec<KekReport> = ring
        .kek_ids()
        .into_iter()
        .map(|id| KekReport {
            active: id == *active_kek,
            data_keys: by_kek.remove(id.as_str()).unwrap_or(0),
            id: id.as_str().to_owned(),
        })
        .collect();
    // The active KEK first, then the others by id.
    key_encryption_keys.sort_by_key(|kek| !kek.active);
    let unknown_key_encryption_keys: Vec<KekReport> = by_kek
        .into_iter()
        .map(|(id, data_keys)| KekReport {
            id,
            active: false,
            data_keys,
        })
        .collect();
    let mut signing_keys = vec![SignerReport {
        id: signing.active().key_id().as_str().to_owned(),
        active: true,
    }];
    signing_keys.extend(signing.retired().map(|(id, _)| SignerReport {
        id: id.as_str().to_owned(),
        active: false,
    }));
    let active_data_keys = key_encryption_keys
        .iter()
        .chain(&unknown_key_encryption_keys)
        .map(|kek| kek.data_keys)
        .sum();
    let report = KeysReport {
        kek_source: source.name(),
        key_encryption_keys,
        unknown_key_encryption_keys,
        data_keys: DataKeyCounts {
            active: active_data_keys,
            destroyed,
        },
        signing_keys,
    };

    if args.json {
        return write_stdout(&serde_json::to_string(&report).context("cannot encode the report")?);
    }
    let mut text = match &source {
        KekSource::Environment => format!("key-encryption keys (from {KEK_ENV}):\n"),
        KekSource::KeyFile(path) => format!("key-encryption keys ({}):\n", path.display()),
    };
    for kek in &report.key_encryption_keys {
        let state = if kek.active { "active" } else { "older " };
        text.push_str(&format!(
            "  {}  {state}  wraps {} data keys\n",
            kek.id, kek.data_keys
        ));
    }
    for kek in &report.unknown_key_encryption_keys {
        text.push_str(&format!(
            "  {}  MISSING from the KEK ring  wraps {} data keys (they cannot be unwrapped)\n",
            kek.id, kek.data_keys
        ));
    }
    text.push_str(&format!(
        "data keys: {} active, {} destroyed\nsigning keys:\n",
        report.data_keys.active, report.data_keys.destroyed
    ));
    for signer in &report.signing_keys {
        let state = if signer.active {
            "active (signs new events)"
        } else {
            "retired (verifies older events)"
        };
        text.push_str(&format!("  {}  {state}\n", signer.id));
    }
    write_stdout(text.trim_end())
}

/// Active data keys by KEK id, and the number destroyed.
async fn data_key_counts(db: &ProjectionDb) -> anyhow::Result<(BTreeMap<String, u64>, u64)> {
    let rows = db
        .fetch_all(
            "SELECT kek_id, COUNT(*) FROM chartlog_data_keys \
             WHERE wrapped_key IS NOT NULL GROUP BY kek_id ORDER BY kek_id",
            vec![],
        )
        .await
        .context("cannot count the data keys")?;
    let mut by_kek = BTreeMap::new();
    for row in rows {
        let kek = row.text(0).context("cannot read a KEK id")?;
        let keys = row.i64(1).context("cannot read a count")?;
        by_kek.insert(kek, u64::try_from(keys).unwrap_or(0));
    }
    let destroyed = count(
        db.fetch_optional(
            "SELECT COUNT(*) FROM chartlog_data_keys WHERE wrapped_key IS NULL",
            vec![],
        )
        .await
        .context("cannot count the destroyed data keys")?,
    )?;
    Ok((by_kek, destroyed))
}

// ---- rotate-kek ----

#[derive(Serialize)]
struct KekRotation {
    active_kek_id: String,
    /// The KEK that was active before, when this run started the rotation.
    previous_kek_id: Option<String>,
    /// Whether this run finished a rotation begun before it (no new KEK was made): by an
    /// interrupted run, or, with [`KEK_ENV`], by the operator putting a new KEK first in it.
    resumed: bool,
    rewrapped_data_keys: u64,
    /// Data keys that do not unwrap under the ring, left as they were: the rotation is not
    /// complete while there are any, and running it again does not change them.
    unreadable_data_keys: Vec<UnreadableKeyReport>,
    retired_kek_ids: Vec<String>,
    /// `key_file` or `environment` ([`KEK_ENV`]).
    kek_source: &'static str,
}

/// A data key the rotation could not unwrap: ids only.
#[derive(Serialize)]
struct UnreadableKeyReport {
    owner: String,
    key_id: String,
    kek_id: String,
    /// `kek_missing` (the KEK is not in the ring) or `does_not_unwrap` (it is, and the wrapped
    /// bytes do not open under it: altered, or moved from another owner).
    problem: &'static str,
}

impl UnreadableKeyReport {
    fn of(key: &UnreadableKey) -> Self {
        Self {
            owner: key.owner.as_str().to_owned(),
            key_id: key.key_id.as_uuid().to_string(),
            kek_id: key.kek_id.as_str().to_owned(),
            problem: if key.kek_missing {
                "kek_missing"
            } else {
                "does_not_unwrap"
            },
        }
    }
}

async fn rotate_kek(args: RotateKekArgs) -> anyhow::Result<()> {
    let key_dir = key_dir(&args.storage.data_dir);
    // Checked before the lock, which would create the key directory.
    kek_ring(&key_dir, CreateKekFile::No)?;
    // The rotation's audit record is signed with the server's signing key: it must be there
    // before anything changes.
    load_signing_keys_in(&key_dir)?;
    let _lock = lock_rotation(&key_dir)?;
    // Loaded under the lock: a rotation that finished meanwhile is seen.
    let (ring, source) = kek_ring(&key_dir, CreateKekFile::No)?;
    ensure!(
        !(args.retire_old && source == KekSource::Environment),
        "--retire-old edits the key file, and {KEK_ENV} supplies the KEK ring: remove the older \
         KEKs from {KEK_ENV} yourself once `chartlog keys show` reports that they wrap no data keys"
    );
    let location = args.storage.database_location();
    let database = wiring::open_existing_database(&location).await?;
    // Refusals before the rotation starts (a ring or a database that is not the server's)
    // change nothing and are not recorded: a record sealed here could be in the wrong place.
    let checked = match ensure_ring_fits(&database, &ring).await {
        Ok(()) if args.retire_old => ensure_keys_are_wrapped(&database, &location).await,
        other => other,
    };
    let (rotated, audited) = match checked {
        Ok(()) => {
            let rotated = rotate_kek_on(&database, ring, &source, args.retire_old).await;
            let complete = rotated
                .as_ref()
                .is_ok_and(|rotation| rotation.unreadable_data_keys.is_empty());
            // With the key files as the rotation left them: its record's data key is wrapped
            // under the new KEK, and retired KEKs are gone from the ring.
            let audited = audit_key_rotation(&database, &key_dir, complete).await;
            (rotated, audited)
        }
        Err(error) => (Err(error), Ok(())),
    };
    database.close().await;
    let rotation = rotated?;

    if args.json {
        write_stdout(&serde_json::to_string(&rotation).context("cannot encode the summary")?)?;
    } else {
        write_stdout(&rotation_text(&rotation))?;
    }
    audited.context("the rotation was made, but its audit record could not be written")?;
    unreadable_keys_refusal(&rotation)
}

/// Records a key rotation on the audit trail: the command-line operator as the actor, the
/// key files as the entity, and whether it completed.
async fn audit_key_rotation(
    database: &Database,
    key_dir: &Path,
    complete: bool,
) -> anyhow::Result<()> {
    wiring::audit_operator_action(
        database,
        key_dir,
        AuditEntity::Keys,
        AuditAction::Update,
        AuditOutcome::of(complete),
    )
    .await
}

/// The error a rotation that left keys it could not unwrap ends with.
fn unreadable_keys_refusal(rotation: &KekRotation) -> anyhow::Result<()> {
    let unreadable = &rotation.unreadable_data_keys;
    if unreadable.is_empty() {
        return Ok(());
    }
    let mut named: Vec<String> = unreadable
        .iter()
        .take(UNREADABLE_KEYS_NAMED_MAX)
        .map(|key| {
            format!(
                "{} (key {} under {}, {})",
                key.owner, key.key_id, key.kek_id, key.problem
            )
        })
        .collect();
    if unreadable.len() > UNREADABLE_KEYS_NAMED_MAX {
        named.push(format!(
            "and {} more (--json names them all)",
            unreadable.len() - UNREADABLE_KEYS_NAMED_MAX
        ));
    }
    bail!(
        "the rotation is not complete: {} data keys do not unwrap under the KEK ring and were \
         left as they were; every other data key is wrapped under {} ({} re-wrapped by this \
         run). Running this again will not \
         change them: a key whose KEK is missing needs that KEK back in the ring (`chartlog keys \
         show` names the missing KEKs); a key that does not unwrap under a KEK of the ring was \
         altered and cannot be recovered from this database. No KEK was retired. The keys: {}",
        unreadable.len(),
        rotation.active_kek_id,
        rotation.rewrapped_data_keys,
        named.join(", ")
    )
}

/// The text summary of `keys rotate-kek`.
fn rotation_text(rotation: &KekRotation) -> String {
    let from_environment = rotation.kek_source == KekSource::Environment.name();
    let mut text = match (&rotation.previous_kek_id, rotation.resumed) {
        (_, true) if from_environment => format!(
            "{} data keys re-wrapped under KEK {}, the first in {KEK_ENV}",
            rotation.rewrapped_data_keys, rotation.active_kek_id
        ),
        (_, true) => format!(
            "resumed an interrupted rotation: {} data keys re-wrapped under KEK {}",
            rotation.rewrapped_data_keys, rotation.active_kek_id
        ),
        (Some(previous), false) => format!(
            "KEK rotated from {previous} to {}: {} data keys re-wrapped",
            rotation.active_kek_id, rotation.rewrapped_data_keys
        ),
        (None, false) => unreachable!("a new rotation names the KEK it replaces"),
    };
    if !rotation.retired_kek_ids.is_empty() {
        text.push_str(&format!(
            "\nretired KEKs removed from the key file: {}",
            rotation.retired_kek_ids.join(", ")
        ));
    }
    if !rotation.unreadable_data_keys.is_empty() {
        text.push_str(&format!(
            "\n{} data keys do not unwrap under the KEK ring and were left as they were",
            rotation.unreadable_data_keys.len()
        ));
    }
    text.push_str("\nrestart the server (it holds the old key ring in memory)");
    text
}

/// Refuses a database whose key table wraps no data key at all: retiring KEKs on it would
/// check nothing, since no key is under any of them, and it is most likely not the server's
/// database (an empty one created by mistake, or the default SQLite file of a server that
/// runs on PostgreSQL), whose keys may well be under the KEKs to be removed.
async fn ensure_keys_are_wrapped(
    database: &Database,
    location: &DatabaseLocation,
) -> anyhow::Result<()> {
    let (by_kek, _) = data_key_counts(&wiring::log_db(database)).await?;
    ensure!(
        !by_kek.is_empty(),
        "nothing is wrapped under any KEK in the {}: is this the server's database? \
         --retire-old removes KEKs from the key file, and a KEK removed while another database \
         still has keys under it loses them for good; pass --database-url as the server has it \
         (nothing was changed)",
        location.describe()
    );
    Ok(())
}

/// The rotation protocol. A rotation is resumable because of its order:
/// 1. if data keys are still wrapped under a KEK other than the key file's active one, an
///    earlier run was interrupted after step 2: this run only finishes it (step 3);
/// 2. otherwise a new KEK is added to the ring and made active, and the key file is saved
///    (atomically, fsynced) before any data key is wrapped under it; the older KEKs stay in
///    the ring, so every data key unwraps whichever KEK wraps it;
/// 3. data keys are re-wrapped in batches, each by compare-and-swap (`DataKeys::rotate_kek`):
///    an interruption leaves some keys under the old KEK and some under the new, all readable.
async fn rotate_kek_on(
    database: &Database,
    mut ring: KeyRing,
    source: &KekSource,
    retire_old: bool,
) -> anyhow::Result<KekRotation> {
    let db = wiring::log_db(database);
    let resumed = keys_to_rewrap(&db, ring.active_kek_id()).await? > 0;
    let previous_kek_id = if resumed {
        None
    } else {
        let KekSource::KeyFile(kek_path) = source else {
            bail!(
                "every data key is already wrapped under {}, the first KEK in {KEK_ENV}, and \
                 this command cannot change a variable: put a new KEK first in {KEK_ENV}, keep \
                 the older ones after it, and run this again",
                ring.active_kek_id()
            );
        };
        ensure!(
            ring.kek_ids().len() < KEKS_MAX,
            "the key file already holds {KEKS_MAX} KEKs: rotate once with --retire-old"
        );
        let previous = ring.active_kek_id().clone();
        let new = KekId::generate();
        ring.add_generated(new.clone())
            .context("cannot add the new KEK")?;
        ring.set_active(&new)
            .context("cannot make the new KEK active")?;
        ring.save(kek_path)
            .with_context(|| format!("cannot save the KEK ring {}", kek_path.display()))?;
        tracing::info!(kek_id = %new, previous = %previous, "new KEK saved; re-wrapping data keys");
        Some(previous.as_str().to_owned())
    };
    let ring = Arc::new(ring);
    let active = ring.active_kek_id().clone();
    let pending = keys_to_rewrap(&db, &active).await?;
    let (rewrapped, unreadable) = match database {
        Database::Sqlite(store, _) => {
            let keys = DataKeys::new(ring.clone(), SqliteKeyStore::new(store.pool().clone()));
            rewrap_with_progress(&db, &keys, ring.clone(), pending).await?
        }
        Database::Postgres(store) => {
            let keys = DataKeys::new(ring.clone(), PostgresKeyStore::new(store.pool().clone()));
            rewrap_with_progress(&db, &keys, ring.clone(), pending).await?
        }
    };
    // `rotate_kek` returns once no key is left under an older KEK but those it cannot unwrap;
    // another one found now was created by a process still using the old ring.
    let left = keys_to_rewrap(&db, &active)
        .await?
        .saturating_sub(unreadable.len() as u64);
    ensure!(
        left == 0,
        "{left} data keys were wrapped under an older KEK during the rotation (is a server still \
         running on the old key file?); stop it and run `chartlog keys rotate-kek` again"
    );
    let mut retired_kek_ids = Vec::new();
    // A KEK is retired only after a complete rotation: with keys left unread, one of them
    // could still be under it.
    if let (true, KekSource::KeyFile(kek_path), true) = (retire_old, source, unreadable.is_empty())
    {
        let mut ring = KeyRing::load(kek_path)
            .with_context(|| format!("cannot reload the KEK ring {}", kek_path.display()))?;
        for kek in ring.kek_ids() {
            if kek == active {
                continue;
            }
            // Checked per KEK right before it goes: a KEK removed while it still wraps a key
            // would lose that key for good.
            let under = keys_under(&db, &kek).await?;
            ensure!(
                under == 0,
                "KEK {kek} still wraps {under} data keys; it is kept (run the rotation again)"
            );
            ring.remove(&kek)
                .with_context(|| format!("cannot remove KEK {kek}"))?;
            retired_kek_ids.push(kek.as_str().to_owned());
        }
        ring.save(kek_path)
            .with_context(|| format!("cannot save the KEK ring {}", kek_path.display()))?;
    }
    Ok(KekRotation {
        active_kek_id: active.as_str().to_owned(),
        previous_kek_id,
        resumed,
        rewrapped_data_keys: rewrapped,
        unreadable_data_keys: unreadable.iter().map(UnreadableKeyReport::of).collect(),
        retired_kek_ids,
        kek_source: source.name(),
    })
}

/// Re-wraps every data key under `ring`'s active KEK with a progress bar on stderr (drawn only
/// at a terminal), counting the keys left once a second. Returns how many it re-wrapped, and
/// the keys it left because they do not unwrap under `ring`.
async fn rewrap_with_progress<K: KeyStore>(
    db: &ProjectionDb,
    keys: &DataKeys<K>,
    ring: Arc<KeyRing>,
    pending: u64,
) -> anyhow::Result<(u64, Vec<UnreadableKey>)> {
    let bar = progress_bar(pending, ROTATION_PROGRESS_TEMPLATE);
    let progress = tokio::spawn({
        let bar = bar.clone();
        let db = db.clone();
        let active = ring.active_kek_id().clone();
        async move {
            let mut refresh = tokio::time::interval(PROGRESS_REFRESH);
            loop {
                refresh.tick().await;
                // A failed count only leaves the bar where it was.
                if let Ok(left) = keys_to_rewrap(&db, &active).await {
                    bar.set_position(pending.saturating_sub(left));
                }
            }
        }
    });
    let rewrapped = keys.rotate_kek(ring).await;
    progress.abort();
    bar.finish_and_clear();
    match rewrapped {
        Ok(rewrapped) => Ok((rewrapped, Vec::new())),
        Err(KeyError::RotationLeftUnreadable {
            rewrapped,
            unreadable,
        }) => Ok((rewrapped, unreadable)),
        // Each key is wrapped as before or under the new KEK, both in the saved ring.
        Err(error) => Err(error).context(
            "re-wrapping the data keys stopped before the end; no key was lost (each is \
             wrapped as before or under the new KEK): run `chartlog keys rotate-kek` again to \
             finish",
        ),
    }
}

/// A progress bar on stderr with `template` (a constant, checked by a test).
pub(crate) fn progress_bar(length: u64, template: &str) -> ProgressBar {
    let bar = ProgressBar::new(length);
    bar.set_style(
        ProgressStyle::with_template(template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

// ---- rotate-signing ----

async fn rotate_signing(args: &JsonArgs) -> anyhow::Result<()> {
    let key_dir = key_dir(&args.storage.data_dir);
    require_key_file(&key_dir.join(SIGNING_FILE_NAME))?;
    // The rotation is recorded in the server's database, sealed under its KEK ring: both are
    // checked before the key changes.
    let (ring, _) = kek_ring(&key_dir, CreateKekFile::No)?;
    let database = wiring::open_existing_database(&args.storage.database_location()).await?;
    let rotated = match ensure_ring_fits(&database, &ring).await {
        Ok(()) => rotate_signing_on(&database, &key_dir).await,
        Err(error) => Err(error),
    };
    database.close().await;
    let (active, retired) = rotated?;
    if args.json {
        let summary = serde_json::json!({
            "active_signer_key_id": active.as_str(),
            "retired_signer_key_id": retired.as_str(),
        });
        return write_stdout(&summary.to_string());
    }
    write_stdout(&format!(
        "signing key rotated: {active} signs new events; {retired} is retired and still \
         verifies the events it signed\nrestart the server (it holds the old signing key in \
         memory), and give verifiers the new public keys (`chartlog keys export-public`)"
    ))
}

/// Rotates the signing key of `key_dir` and records the rotation, signed with the key then
/// active; returns the new active key's id and the retired one's.
async fn rotate_signing_on(
    database: &Database,
    key_dir: &Path,
) -> anyhow::Result<(SignerKeyId, SignerKeyId)> {
    let _lock = lock_rotation(key_dir)?;
    let rotated = rotate_signing_file(key_dir);
    let audited = audit_key_rotation(database, key_dir, rotated.is_ok()).await;
    let rotated = rotated?;
    audited.context("the signing key was rotated, but its audit record could not be written")?;
    Ok(rotated)
}

/// Makes a new signing key active in `key_dir`'s signing file, keeping the old one's public
/// half; returns the new active key's id and the retired one's.
fn rotate_signing_file(key_dir: &Path) -> anyhow::Result<(SignerKeyId, SignerKeyId)> {
    let path = key_dir.join(SIGNING_FILE_NAME);
    let mut signing = load_signing_keys_in(key_dir)?;
    ensure!(
        signing.retired().count() < RETIRED_SIGNERS_MAX,
        "the key file already keeps {RETIRED_SIGNERS_MAX} retired signing keys"
    );
    let retired = signing.active().key_id().clone();
    signing
        .rotate(SignerKeyId::generate())
        .context("cannot rotate the signing key")?;
    signing
        .save(&path)
        .with_context(|| format!("cannot save the signing keys {}", path.display()))?;
    let active = signing.active().key_id().clone();
    tracing::info!(active = %active, retired = %retired, "signing key rotated");
    Ok((active, retired))
}

// ---- export-public ----

/// The public signing keys, as `keys export-public` writes them and `verify --public-keys`
/// reads them.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublicKeys {
    format: String,
    algorithm: String,
    /// The signer of new events.
    active: String,
    keys: Vec<PublicKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublicKey {
    id: String,
    /// `active` or `retired`.
    status: String,
    /// The 32-byte Ed25519 public key, lowercase hex.
    public_key_hex: String,
}

impl PublicKeys {
    fn of(signing: &SigningKeys) -> Self {
        let active = signing.active();
        let mut keys = vec![PublicKey {
            id: active.key_id().as_str().to_owned(),
            status: "active".to_owned(),
            public_key_hex: hex(&active.verifying_key_bytes()),
        }];
        keys.extend(signing.retired().map(|(id, public_key)| PublicKey {
            id: id.as_str().to_owned(),
            status: "retired".to_owned(),
            public_key_hex: hex(public_key),
        }));
        Self {
            format: PUBLIC_KEYS_FORMAT.to_owned(),
            algorithm: "ed25519".to_owned(),
            active: active.key_id().as_str().to_owned(),
            keys,
        }
    }

    /// Reads a file written by `keys export-public`.
    pub(crate) fn read(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, PUBLIC_KEYS_FILE_BYTES_MAX + 1),
            &mut bytes,
        )
        .with_context(|| format!("cannot read {}", path.display()))?;
        ensure!(
            bytes.len() as u64 <= PUBLIC_KEYS_FILE_BYTES_MAX,
            "{} is larger than {PUBLIC_KEYS_FILE_BYTES_MAX} bytes",
            path.display()
        );
        let keys: PublicKeys = serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "{} is not a public-key file from `chartlog keys export-public`",
                path.display()
            )
        })?;
        ensure!(
            keys.format == PUBLIC_KEYS_FORMAT && keys.algorithm == "ed25519",
            "{}: expected format {PUBLIC_KEYS_FORMAT} with ed25519 keys",
            path.display()
        );
        Ok(keys)
    }

    /// A verifier trusting every key of the file.
    pub(crate) fn verifier(&self) -> anyhow::Result<SignatureVerifier> {
        let mut verifier = SignatureVerifier::new();
        for key in &self.keys {
            let id = SignerKeyId::parse(&key.id)
                .map_err(|error| anyhow::anyhow!("public key {:?}: {error}", key.id))?;
            let bytes = unhex_32(&key.public_key_hex)
                .with_context(|| format!("public key {id}: expected 64 hex digits"))?;
            verifier
                .trust(id.clone(), bytes)
                .with_context(|| format!("public key {id} is not usable"))?;
        }
        Ok(verifier)
    }
}

fn export_public(data_dir: &Path) -> anyhow::Result<()> {
    let signing = load_signing_keys(data_dir)?;
    let keys = PublicKeys::of(&signing);
    write_stdout(&serde_json::to_string_pretty(&keys).context("cannot encode the public keys")?)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex_32(text: &str) -> anyhow::Result<[u8; 32]> {
    ensure!(
        text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()),
        "not 64 hex digits"
    );
    let mut bytes = [0; 32];
    for (byte, pair) in bytes.iter_mut().zip(text.as_bytes().chunks(2)) {
        let pair = std::str::from_utf8(pair).context("not ASCII")?;
        *byte = u8::from_str_radix(pair, 16).context("not hex")?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_template_parses() {
        assert!(ProgressStyle::with_template(ROTATION_PROGRESS_TEMPLATE).is_ok());
    }

    #[test]
    fn public_keys_round_trip_through_hex() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i * 8 + 3) as u8);
        assert_eq!(unhex_32(&hex(&bytes)).expect("hex"), bytes);
        assert!(unhex_32("+f").is_err());
        assert!(unhex_32(&"g".repeat(64)).is_err());
    }

    #[test]
    fn an_export_trusts_the_active_and_retired_signers() {
        let mut signing = SigningKeys::generate(SignerKeyId::generate());
        let first = signing.active().key_id().clone();
        signing.rotate(SignerKeyId::generate()).expect("rotate");
        let export = PublicKeys::of(&signing);
        let json = serde_json::to_string(&export).expect("encode");
        let parsed: PublicKeys = serde_json::from_str(&json).expect("decode");
        let verifier = parsed.verifier().expect("verifier");
        assert!(verifier.trusts(&first));
        assert!(verifier.trusts(signing.active().key_id()));
    }
}
