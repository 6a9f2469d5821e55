//! Assembles what the HTTP API needs from the opened backend and the key folder: the record
//! store over the ledger, the accounts service, the signed audit log and the notifiers.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use chartlog_access::{ACCESS_KEY_FILE_NAME, AccessSecrets, AccessSettings, Accounts, Username};
use chartlog_api::audit::{AuditSink, SignedAuditSink};
use chartlog_api::notify::{LogNotifier, Notifier, Notifiers, WebhookNotifier};
use chartlog_api::records::{LedgerRecords, Records};
use chartlog_crypto::{
    DataKeys, EventSigner, INDEX_KEY_FILE_NAME, KeyRing, MacKey, SigningKeys, load_mac_key,
    load_or_create_mac_key, load_or_create_signing_keys,
};
use chartlog_domain::patient::RetentionPolicy;
use chartlog_domain::{Actor, PurposeOfUse, Role, UserId};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome, AuditRow};
use chartlog_projections::audit_log::{AuditLog, new_audit_stream};
use chartlog_projections::db::ProjectionDb;
use chartlog_projections::deid::DEID_KEY_FILE_NAME;
use chartlog_store::PatientLedger;
use chartlog_store::checkpoints::LogCheckpointer;
use chartlog_store::ledger::SNAPSHOT_EVERY_EVENTS;
use chartlog_store::postgres::{PostgresKeyStore, PostgresSnapshotStore};
use chartlog_store::sqlite::{SqliteKeyStore, SqliteSnapshotStore};

use crate::erasure_ledger::{ErasureLedger, LedgeredKeyStore};
use crate::{Database, DatabaseLocation, keys, open_database};

/// The user name of the administrator created on first start.
pub const FIRST_ADMINISTRATOR: &str = "admin";
/// Where the first administrator's one-time password is written, inside the data directory.
pub const FIRST_ADMINISTRATOR_PASSWORD_FILE: &str = "first-administrator-password";
/// How often accounts unused for the configured period are looked for and disabled.
const INACTIVITY_SWEEP_INTERVAL: Duration = Duration::from_secs(60 * 60);

/// Opens the database the flags name for a command that only makes sense on a store that
/// exists: never creates a SQLite file. Opening a missing one would create an empty database,
/// and a command run on it would act on nothing, or worse: a key rotation on an empty
/// database finds no data key under the old KEK and could retire the KEK that the server's
/// real database (on PostgreSQL, named only in the server's environment) needs.
pub(crate) async fn open_existing_database(
    location: &DatabaseLocation,
) -> anyhow::Result<Database> {
    ensure_database_exists(location)?;
    open_database(location).await
}

/// The check of [`open_existing_database`], for a command that must fail on a missing SQLite
/// file before it does anything else.
pub(crate) fn ensure_database_exists(location: &DatabaseLocation) -> anyhow::Result<()> {
    if let Some(path) = sqlite_file(location) {
        ensure!(
            path.is_file(),
            "no database at {}: check --data-dir, and if the server runs on PostgreSQL pass \
             --database-url (or set CHARTLOG_DATABASE_URL) as the server has it",
            path.display()
        );
    }
    Ok(())
}

/// The SQLite file `location` names, if it names one.
fn sqlite_file(location: &DatabaseLocation) -> Option<PathBuf> {
    match location {
        DatabaseLocation::SqliteFile(path) => Some(path.clone()),
        // As `open_database` reads a `sqlite:` URL.
        DatabaseLocation::Url(url) if url.scheme() == "sqlite" => Some(PathBuf::from(
            url.expose()
                .trim_start_matches("sqlite:")
                .trim_start_matches("//"),
        )),
        DatabaseLocation::Url(_) => None,
    }
}

/// The database the read models live in: on SQLite their own file, on PostgreSQL the store's.
pub fn read_models(database: &Database) -> ProjectionDb {
    match database {
        Database::Sqlite(_, read_models) => ProjectionDb::Sqlite(read_models.clone()),
        Database::Postgres(store) => ProjectionDb::Postgres(store.pool().clone()),
    }
}

/// The store's own database, on its pool: the log, the data keys and the access tables.
pub fn log_db(database: &Database) -> ProjectionDb {
    match database {
        Database::Sqlite(store, _) => ProjectionDb::Sqlite(store.pool().clone()),
        Database::Postgres(store) => ProjectionDb::Postgres(store.pool().clone()),
    }
}

/// The accounts service on the backend's database, its secrets from `key_dir`, the file
/// created on first use: for the server. Operator commands use [`operator_accounts`].
pub fn accounts(
    database: &Database,
    key_dir: &Path,
    settings: AccessSettings,
) -> anyhow::Result<Accounts> {
    let secrets = AccessSecrets::load_or_create(key_dir).with_context(|| {
        format!(
            "cannot load or create the access secrets in {}",
            key_dir.display()
        )
    })?;
    Ok(Accounts::new(log_db(database), secrets, settings))
}

/// The accounts service for the operator's account commands (`users`, `demo`): never creates
/// the access key file. Those commands seal and open nothing under it (it seals TOTP secrets,
/// break-glass reasons and stored responses, all written over HTTP), so when the file is
/// missing an in-memory key stands in and nothing is written where the server would not look;
/// when it is there, it is loaded, and a file that does not load is an error.
pub fn operator_accounts(database: &Database, key_dir: &Path) -> anyhow::Result<Accounts> {
    let path = key_dir.join(ACCESS_KEY_FILE_NAME);
    let secrets = if path.exists() {
        AccessSecrets::load(&path)
            .with_context(|| format!("cannot load the access key {}", path.display()))?
    } else {
        AccessSecrets::ephemeral()
    };
    Ok(Accounts::new(
        log_db(database),
        secrets,
        AccessSettings::default(),
    ))
}

/// Commands and reads over the backend, and the signed audit log, both signing with the
/// active signing key. Erasures wait out `retention`, and each is written to `erasure_ledger`
/// before the patient's key is destroyed (and refused, with nothing stored, when that file
/// cannot be written). The key files are created on first use: for the server.
pub(crate) fn records_and_audit(
    database: &Database,
    key_dir: &Path,
    erasure_ledger: ErasureLedger,
    retention: RetentionPolicy,
) -> anyhow::Result<(Arc<dyn Records>, Arc<dyn AuditSink>)> {
    let (ring, signing) = key_files(key_dir)?;
    let index_key = load_or_create_mac_key(key_dir, INDEX_KEY_FILE_NAME)
        .with_context(|| format!("cannot load the blind-index key in {}", key_dir.display()))?;
    assemble_records_and_audit(
        database,
        erasure_ledger,
        ring,
        &signing,
        index_key,
        retention,
    )
}

fn assemble_records_and_audit(
    database: &Database,
    erasure_ledger: ErasureLedger,
    ring: KeyRing,
    signing: &SigningKeys,
    index_key: MacKey,
    retention: RetentionPolicy,
) -> anyhow::Result<(Arc<dyn Records>, Arc<dyn AuditSink>)> {
    let ring = Arc::new(ring);
    let signer = Arc::clone(signing.active());
    let verifier = Arc::new(signing.verifier());
    let index_key = Arc::new(index_key);
    let read_models = read_models(database);
    let parts: (Arc<dyn Records>, Arc<dyn AuditSink>) = match database {
        Database::Sqlite(store, _) => {
            let store = Arc::new(store.clone());
            let keys = Arc::new(DataKeys::new(
                ring,
                LedgeredKeyStore::new(SqliteKeyStore::new(store.pool().clone()), erasure_ledger),
            ));
            let audit = AuditLog::spawn(
                store.clone(),
                keys.clone(),
                signer.clone(),
                new_audit_stream(),
            );
            let snapshots = Arc::new(SqliteSnapshotStore::new(store.pool().clone()));
            let ledger = PatientLedger::new(store, keys, signer, verifier)
                .with_snapshots(snapshots, SNAPSHOT_EVERY_EVENTS)
                .with_retention(retention);
            (
                Arc::new(LedgerRecords::new(ledger, read_models, index_key)),
                Arc::new(SignedAuditSink::new(audit)),
            )
        }
        Database::Postgres(store) => {
            let store = Arc::new(store.clone());
            let keys = Arc::new(DataKeys::new(
                ring,
                LedgeredKeyStore::new(PostgresKeyStore::new(store.pool().clone()), erasure_ledger),
            ));
            let audit = AuditLog::spawn(
                store.clone(),
                keys.clone(),
                signer.clone(),
                new_audit_stream(),
            );
            let snapshots = Arc::new(PostgresSnapshotStore::new(store.pool().clone()));
            let ledger = PatientLedger::new(store, keys, signer, verifier)
                .with_snapshots(snapshots, SNAPSHOT_EVERY_EVENTS)
                .with_retention(retention);
            (
                Arc::new(LedgerRecords::new(ledger, read_models, index_key)),
                Arc::new(SignedAuditSink::new(audit)),
            )
        }
    };
    Ok(parts)
}

/// Commands and reads over the backend (for operator commands; the server also needs the
/// audit log, see [`records_and_audit`]), from the key files as they are: never creates one.
/// Must be called inside the runtime. Erasures wait out the default retention period;
/// `chartlog erase` builds its own ledger.
pub fn records(database: &Database, key_dir: &Path) -> anyhow::Result<Arc<dyn Records>> {
    let (ring, signing) = existing_key_files(key_dir)?;
    let index_path = key_dir.join(INDEX_KEY_FILE_NAME);
    keys::require_key_file(&index_path)?;
    let index_key = load_mac_key(&index_path)
        .with_context(|| format!("cannot load the blind-index key {}", index_path.display()))?;
    // The operator commands that use these records never erase; the key directory's ledger
    // stands in for the server's.
    assemble_records_and_audit(
        database,
        ErasureLedger::in_key_dir(key_dir),
        ring,
        &signing,
        index_key,
        RetentionPolicy::DEFAULT,
    )
    .map(|(records, _audit)| records)
}

/// Records one operator action (a backup, a restore, an export, a rebuild) in the signed audit
/// log, with the command-line operator as the actor, and returns once it is durable.
pub async fn audit_operator_action(
    database: &Database,
    key_dir: &Path,
    entity: AuditEntity,
    action: AuditAction,
    outcome: AuditOutcome,
) -> anyhow::Result<()> {
    audit_operator_action_on(database, key_dir, entity, None, action, outcome).await
}

/// [`audit_operator_action`] on one record of `entity` (an account, by its user id).
pub async fn audit_operator_action_on(
    database: &Database,
    key_dir: &Path,
    entity: AuditEntity,
    record_id: Option<uuid::Uuid>,
    action: AuditAction,
    outcome: AuditOutcome,
) -> anyhow::Result<()> {
    OperatorAudit::open(database, key_dir)
        .await?
        .record(entity, record_id, action, outcome)
        .await
}

/// The signed audit log of one operator command, opened before the command changes anything:
/// a change whose audit record then cannot be written would be a change with no record.
pub struct OperatorAudit {
    log: AuditLog,
}

impl OperatorAudit {
    /// Checks what recording needs, with the key files as they are: the signing key, a KEK
    /// ring that fits the database, and the data key of a new audit stream, created now
    /// (wrapped under the active KEK), so the key table is known to take it.
    pub async fn open(database: &Database, key_dir: &Path) -> anyhow::Result<Self> {
        let (ring, signing) = existing_key_files(key_dir)?;
        keys::ensure_ring_fits(database, &ring).await?;
        let ring = Arc::new(ring);
        let signer = Arc::clone(signing.active());
        let stream = new_audit_stream();
        let key_error = "cannot create the data key of the operator's audit stream";
        let log = match database {
            Database::Sqlite(store, _) => {
                let keys = Arc::new(DataKeys::new(
                    ring,
                    SqliteKeyStore::new(store.pool().clone()),
                ));
                keys.key_for_append(&stream).await.context(key_error)?;
                AuditLog::spawn(Arc::new(store.clone()), keys, signer, stream)
            }
            Database::Postgres(store) => {
                let keys = Arc::new(DataKeys::new(
                    ring,
                    PostgresKeyStore::new(store.pool().clone()),
                ));
                keys.key_for_append(&stream).await.context(key_error)?;
                AuditLog::spawn(Arc::new(store.clone()), keys, signer, stream)
            }
        };
        Ok(Self { log })
    }

    /// Records one operator action on `record_id` of `entity`, with the command-line operator
    /// as the actor; returns once it is durable.
    pub async fn record(
        &self,
        entity: AuditEntity,
        record_id: Option<uuid::Uuid>,
        action: AuditAction,
        outcome: AuditOutcome,
    ) -> anyhow::Result<()> {
        let row = operator_audit_row(entity, record_id, action, outcome);
        self.log
            .record(vec![row])
            .await
            .context("cannot record the operation in the audit log")
    }
}

/// The audit row of an action chartlog takes for the operator (a command, or the server's
/// own schedule): the command-line operator, role `system`, is the actor.
pub fn operator_audit_row(
    entity: AuditEntity,
    record_id: Option<uuid::Uuid>,
    action: AuditAction,
    outcome: AuditOutcome,
) -> AuditRow {
    AuditRow {
        audit_id: uuid::Uuid::now_v7(),
        occurred_at: chartlog_api::now(),
        actor: Some(Actor {
            user_id: UserId::parse(crate::erase::CLI_OPERATOR_USER_ID)
                .expect("a valid UUID literal"),
            role: Role::System,
            purpose_of_use: PurposeOfUse::SystemAdministration,
            break_glass: false,
        }),
        patient_id: None,
        entity: Some(entity),
        record_id,
        action,
        outcome,
        client_address: None,
        event_type: None,
    }
}

/// The KEK ring ([`keys::kek_ring`]: from `CHARTLOG_KEK` or `key_dir`) and the signing keys
/// of `key_dir`, the key files created on first use: for the server's first start only.
/// Every other command uses [`existing_key_files`]: keys made in a mistyped --data-dir would
/// sign events no verifier trusts (an audit record signed so, appended to the real log,
/// stops the server's projections and fails `verify`) or seal what nothing else can open.
pub(crate) fn key_files(key_dir: &Path) -> anyhow::Result<(KeyRing, SigningKeys)> {
    let (ring, _) = keys::kek_ring(key_dir, keys::CreateKekFile::IfMissing)?;
    let signing = load_or_create_signing_keys(key_dir).with_context(|| {
        format!(
            "cannot load or create the signing keys in {}",
            key_dir.display()
        )
    })?;
    Ok((ring, signing))
}

/// The KEK ring and the signing keys of `key_dir` as they are, failing with the missing
/// file's path: never creates one.
pub(crate) fn existing_key_files(key_dir: &Path) -> anyhow::Result<(KeyRing, SigningKeys)> {
    let (ring, _) = keys::kek_ring(key_dir, keys::CreateKekFile::No)?;
    let signing = keys::load_signing_keys_in(key_dir)?;
    Ok((ring, signing))
}

/// Makes every key file the server's first start makes that is missing in `key_dir` (the KEK
/// ring's only when `CHARTLOG_KEK` is unset): for `chartlog demo` on a database it creates,
/// so the server started on it afterwards finds its keys.
pub(crate) fn create_key_files(key_dir: &Path) -> anyhow::Result<()> {
    key_files(key_dir)?;
    for name in [INDEX_KEY_FILE_NAME, DEID_KEY_FILE_NAME] {
        load_or_create_mac_key(key_dir, name)
            .with_context(|| format!("cannot load or create {name} in {}", key_dir.display()))?;
    }
    AccessSecrets::load_or_create(key_dir).with_context(|| {
        format!(
            "cannot load or create the access secrets in {}",
            key_dir.display()
        )
    })?;
    Ok(())
}

/// How often the server signs a checkpoint over the global log.
const LOG_CHECKPOINT_INTERVAL: Duration = Duration::from_secs(60);

/// Signs a checkpoint over the global log if anything was appended since the last one.
pub async fn checkpoint_log(
    database: &Database,
    signer: &Arc<EventSigner>,
) -> anyhow::Result<Option<u64>> {
    let signer = Arc::clone(signer);
    let now = chartlog_api::now();
    let written = match database {
        Database::Sqlite(store, _) => {
            LogCheckpointer::resume(Arc::new(store.clone()), signer)
                .await?
                .checkpoint(now)
                .await?
        }
        Database::Postgres(store) => {
            LogCheckpointer::resume(Arc::new(store.clone()), signer)
                .await?
                .checkpoint(now)
                .await?
        }
    };
    Ok(written)
}

/// Signs checkpoints over the global log every minute for as long as the server runs.
pub fn spawn_log_checkpoints(
    database: Database,
    signer: Arc<EventSigner>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(LOG_CHECKPOINT_INTERVAL);
        loop {
            ticks.tick().await;
            if let Err(error) = checkpoint_log(&database, &signer).await {
                // Another server may have checkpointed first; the next tick tries again.
                tracing::warn!(error = %error, "log checkpoint not written");
            }
        }
    })
}

/// The log notifier always; a webhook too when configured.
pub fn notifier(webhook: Option<&str>) -> anyhow::Result<Arc<dyn Notifier>> {
    let mut notifiers: Vec<Box<dyn Notifier>> = vec![Box::new(LogNotifier)];
    if let Some(url) = webhook {
        notifiers.push(Box::new(
            WebhookNotifier::new(url, false).context("invalid --break-glass-webhook")?,
        ));
    }
    Ok(Arc::new(Notifiers(notifiers)))
}

/// On first start (no accounts at all), creates the administrator and writes the one-time
/// password to a 0600 file in the data directory. Returns that file's path when it did.
pub async fn bootstrap_administrator(
    accounts: &Accounts,
    data_dir: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    let username = Username::parse(FIRST_ADMINISTRATOR)
        .map_err(|error| anyhow::anyhow!("the first administrator's name: {error}"))?;
    let Some(password) = accounts
        .bootstrap_administrator(&username, chartlog_api::now())
        .await
        .context("cannot create the first administrator")?
    else {
        return Ok(None);
    };
    let path = data_dir.join(FIRST_ADMINISTRATOR_PASSWORD_FILE);
    // Straight from the password: a formatted copy would outlive it unzeroized.
    write_private_line(&path, password.expose())?;
    Ok(Some(path))
}

/// Writes `line` and a newline to `path` as a new file of mode 0600 that only this process
/// opened.
///
/// Opening `path` itself would write through whatever is there: a leftover file keeps its mode
/// (0644 stays readable; `mode` applies only to a file the open creates), and a symlink hands
/// the contents to its target. So the contents go to a fresh name opened with `create_new`
/// (which refuses any existing entry, symlinks included), and that file is renamed over
/// `path`, which replaces the directory entry, never the file a symlink there points to.
fn write_private_line(path: &Path, line: &str) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?
        .to_string_lossy();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    let temporary = path.with_file_name(format!(".{name}.{}.{nanos}.tmp", std::process::id()));
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut file| {
            file.write_all(line.as_bytes())
                .and_then(|()| file.write_all(b"\n"))
                .and_then(|()| file.sync_all())
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        // Best effort: the error that matters is the write's.
        let _ = std::fs::remove_file(&temporary);
        return Err(error).with_context(|| format!("cannot write {}", path.display()));
    }
    // The rename is durable once the directory is.
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("cannot sync {}", dir.display()))?;
    }
    Ok(())
}

/// Disables accounts unused for the configured period and prunes spent access records,
/// hourly, for as long as the server runs.
pub fn spawn_inactivity_sweep(accounts: Accounts) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(INACTIVITY_SWEEP_INTERVAL);
        loop {
            ticks.tick().await;
            match accounts.deactivate_inactive(chartlog_api::now()).await {
                Ok(disabled) if disabled.is_empty() => {}
                Ok(disabled) => {
                    for user_id in &disabled {
                        tracing::warn!(%user_id, "account disabled after a period without use");
                    }
                }
                Err(error) => tracing::error!(%error, "inactive-account sweep failed"),
            }
            // Spent sessions, old failed-login counts and expired idempotency records.
            if let Err(error) = accounts.prune(chartlog_api::now()).await {
                tracing::error!(%error, "pruning access records failed");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_private_file_replaces_a_readable_leftover_with_a_0600_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(FIRST_ADMINISTRATOR_PASSWORD_FILE);
        std::fs::write(&path, "old\n").expect("leftover");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        write_private_line(&path, "secret").expect("write");
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "secret\n");
        assert_eq!(mode(&path), 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    }

    #[test]
    fn a_private_file_replaces_a_symlink_and_leaves_its_target_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "").expect("target");
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let path = dir.path().join(FIRST_ADMINISTRATOR_PASSWORD_FILE);
        std::os::unix::fs::symlink(&target, &path).expect("symlink");
        write_private_line(&path, "secret").expect("write");
        assert_eq!(std::fs::read_to_string(&target).expect("target"), "");
        assert!(
            !std::fs::symlink_metadata(&path)
                .expect("metadata")
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "secret\n");
        assert_eq!(mode(&path), 0o600);
    }
}
