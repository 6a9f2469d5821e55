//! `chartlog erase`: crypto-erasure of one patient from the operator's command line.
//!
//! The erasure takes the same path as the HTTP `erase` command: `PatientErased` (a tombstone
//! with a reason from a closed list, no PHI) is decided and appended through the ledger, its
//! clear header naming the operator as the actor, the erasure is written to the erasure
//! ledger in `<data-dir>/keys` or `--erasure-ledger` (`crate::erasure_ledger`), and the
//! patient's data key is destroyed. A ledger that cannot be written refuses the erasure before
//! the tombstone is stored, leaving the record as it was. The patient's events in the database are unreadable from then on; the chain
//! still verifies. The key table keeps a tombstone row (key id and time), so the patient can
//! never be given a key again. A server running meanwhile may still hold the key in its cache
//! for up to `DATA_KEY_CACHE_TTL` (30 s); its projection runner drops the patient's
//! read-model rows when it reaches the tombstone.
//!
//! Backups taken before the erasure still hold the wrapped key. What keeps them unreadable is
//! not the destruction but the ledgers `chartlog restore` honours: the key directory's file
//! (restored from the key backup, so that backup must be taken again after erasures), the
//! target database's tombstones and those of any `--erasures-from`. Restoring an older backup
//! without any ledger that names the patient brings the key back; so does reading its wrapped
//! key with the KEK ring by hand, for as long as the KEKs it was wrapped under exist.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use chartlog_crypto::{DataKeyRecord, DataKeys, KeyRing, KeyStore, SigningKeys};
use chartlog_domain::patient::ErasureReason;
use chartlog_domain::{Actor, PatientCommand, PatientId, PurposeOfUse, Role, StreamId, UserId};
use chartlog_store::ledger::SNAPSHOT_EVERY_EVENTS;
use chartlog_store::postgres::{PostgresKeyStore, PostgresSnapshotStore};
use chartlog_store::sqlite::{SqliteKeyStore, SqliteSnapshotStore};
use chartlog_store::{EventStore, LedgerError, PatientLedger};
use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::erasure_ledger::{ErasureLedgerArgs, LedgeredKeyStore};
use crate::{Database, RetentionArgs, StorageArgs, keys, wiring};

/// The user id recorded as the actor when no `--operator` is given: chartlog's command line,
/// acting for whoever runs it on the server's machine (role `system`).
pub(crate) const CLI_OPERATOR_USER_ID: &str = "00000000-0000-0000-0000-000000000001";
/// The format tag of erasure certificates.
const CERTIFICATE_FORMAT: &str = "chartlog-erasure-certificate/v1";

#[derive(Args)]
pub(crate) struct EraseArgs {
    #[command(flatten)]
    storage: StorageArgs,

    /// The patient's id (a UUID).
    patient_id: String,

    /// Why the record is erased (a closed list: free text could hold PHI).
    #[arg(long, value_enum)]
    reason: Reason,

    /// Erase without asking. Without it, erase asks for the patient id to be typed again, and
    /// refuses when stdin is not a terminal.
    #[arg(long)]
    yes: bool,

    /// The user id of the administrator who erases, recorded as the actor (the account must
    /// exist, be active and have the administrator role). Default: the command-line operator
    /// 00000000-0000-0000-0000-000000000001 in the role `system`.
    #[arg(long)]
    operator: Option<String>,

    /// Print the erasure certificate as one JSON object on stdout.
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    retention: RetentionArgs,

    #[command(flatten)]
    erasure_ledger: ErasureLedgerArgs,
}

/// [`ErasureReason`], spelled as the HTTP API spells it.
#[derive(Clone, Copy, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Reason {
    PatientRequest,
    RetentionPeriodElapsed,
    DuplicateRegistration,
    RegisteredInError,
    LegalOrder,
}

impl From<Reason> for ErasureReason {
    fn from(reason: Reason) -> Self {
        match reason {
            Reason::PatientRequest => ErasureReason::PatientRequest,
            Reason::RetentionPeriodElapsed => ErasureReason::RetentionPeriodElapsed,
            Reason::DuplicateRegistration => ErasureReason::DuplicateRegistration,
            Reason::RegisteredInError => ErasureReason::RegisteredInError,
            Reason::LegalOrder => ErasureReason::LegalOrder,
        }
    }
}

/// What `erase` prints: ids, times and codes only, never PHI.
#[derive(Serialize)]
struct Certificate {
    format: &'static str,
    patient_id: String,
    erased_at: String,
    reason: ErasureReason,
    actor: CertificateActor,
    /// The id of the destroyed data key, as in the header of every event it sealed.
    destroyed_data_key_id: String,
    /// The `PatientErased` event in the patient's signed chain.
    tombstone: Tombstone,
}

#[derive(Serialize)]
struct CertificateActor {
    user_id: String,
    role: Role,
    purpose_of_use: PurposeOfUse,
}

#[derive(Serialize)]
struct Tombstone {
    stream_id: String,
    stream_version: u64,
    position: u64,
    event_id: String,
    hash: String,
    signer_key_id: String,
}

pub(crate) async fn run(args: EraseArgs) -> anyhow::Result<()> {
    let patient = PatientId::parse(&args.patient_id)
        .map_err(|_| anyhow::anyhow!("invalid patient id: expected a UUID"))?;
    let operator = args
        .operator
        .as_deref()
        .map(UserId::parse)
        .transpose()
        .map_err(|_| anyhow::anyhow!("invalid --operator: expected a user id (a UUID)"))?;
    let data_dir = &args.storage.data_dir;
    let ring = keys::load_ring(data_dir)?;
    let signing = keys::load_signing_keys(data_dir)?;
    let database = wiring::open_existing_database(&args.storage.database_location()).await?;
    let erased = erase_on(&database, &args, patient, operator, ring, &signing).await;
    database.close().await;
    let certificate = erased?;

    let mut stdout = std::io::stdout().lock();
    if args.json {
        let json = serde_json::to_string(&certificate).context("cannot encode the certificate")?;
        writeln!(stdout, "{json}")
    } else {
        writeln!(stdout, "{}", describe(&certificate))
    }
    .and_then(|()| stdout.flush())
    .context("cannot write the certificate to stdout")
}

async fn erase_on(
    database: &Database,
    args: &EraseArgs,
    patient: PatientId,
    operator: Option<UserId>,
    ring: KeyRing,
    signing: &SigningKeys,
) -> anyhow::Result<Certificate> {
    keys::ensure_ring_fits(database, &ring).await?;
    let actor = actor(database, args, operator).await?;
    let ring = Arc::new(ring);
    let signer = Arc::clone(signing.active());
    let verifier = Arc::new(signing.verifier());
    let erasure_ledger = args
        .erasure_ledger
        .ledger(&keys::key_dir(&args.storage.data_dir));
    match database {
        Database::Sqlite(store, _) => {
            let keys = DataKeys::new(
                ring,
                LedgeredKeyStore::new(SqliteKeyStore::new(store.pool().clone()), erasure_ledger),
            );
            let snapshots = Arc::new(SqliteSnapshotStore::new(store.pool().clone()));
            let ledger =
                PatientLedger::new(Arc::new(store.clone()), Arc::new(keys), signer, verifier)
                    .with_snapshots(snapshots, SNAPSHOT_EVERY_EVENTS)
                    .with_retention(args.retention.policy());
            erase_with(&ledger, args, patient, actor).await
        }
        Database::Postgres(store) => {
            let keys = DataKeys::new(
                ring,
                LedgeredKeyStore::new(PostgresKeyStore::new(store.pool().clone()), erasure_ledger),
            );
            let snapshots = Arc::new(PostgresSnapshotStore::new(store.pool().clone()));
            let ledger =
                PatientLedger::new(Arc::new(store.clone()), Arc::new(keys), signer, verifier)
                    .with_snapshots(snapshots, SNAPSHOT_EVERY_EVENTS)
                    .with_retention(args.retention.policy());
            erase_with(&ledger, args, patient, actor).await
        }
    }
}

/// The actor the tombstone's header records.
async fn actor(
    database: &Database,
    args: &EraseArgs,
    operator: Option<UserId>,
) -> anyhow::Result<Actor> {
    let Some(user_id) = operator else {
        return Ok(Actor {
            user_id: UserId::parse(CLI_OPERATOR_USER_ID).expect("a valid UUID literal"),
            role: Role::System,
            purpose_of_use: PurposeOfUse::SystemAdministration,
            break_glass: false,
        });
    };
    let accounts = wiring::operator_accounts(database, &keys::key_dir(&args.storage.data_dir))?;
    let account = accounts
        .user(user_id)
        .await
        .context("cannot look the operator up")?;
    let Some(account) = account else {
        bail!("--operator {user_id}: no such account (see `chartlog users list`)");
    };
    if account.disabled {
        bail!("--operator {user_id}: the account is disabled");
    }
    if account.role != Role::Administrator {
        bail!(
            "--operator {user_id}: erasure is an administrator's act; the account's role is {}",
            account.role
        );
    }
    Ok(Actor {
        user_id,
        role: Role::Administrator,
        purpose_of_use: PurposeOfUse::SystemAdministration,
        break_glass: false,
    })
}

async fn erase_with<S: EventStore, K: KeyStore>(
    ledger: &PatientLedger<S, K>,
    args: &EraseArgs,
    patient: PatientId,
    actor: Actor,
) -> anyhow::Result<Certificate> {
    let stream = StreamId::patient(patient);
    // Checked before asking, from clear data only (no PHI is opened for them).
    if ledger
        .store()
        .stream_head(&stream)
        .await
        .context("cannot read the patient's stream")?
        .is_none()
    {
        bail!("patient {patient} has no record; nothing was erased");
    }
    let record = ledger
        .keys()
        .store()
        .fetch(&stream)
        .await
        .context("cannot read the patient's data key")?;
    if let Some(DataKeyRecord::Destroyed {
        key_id,
        destroyed_at,
    }) = record
    {
        bail!(
            "patient {patient} was already erased at {destroyed_at} (data key {key_id} destroyed)"
        );
    }
    // Checked again by the ledger right before the tombstone is stored; here so that a
    // ledger that cannot be written is reported before anyone is asked to confirm.
    ledger
        .keys()
        .prepare_destroy(&stream)
        .await
        .context("the erasure was refused")?;
    if !args.yes {
        let ledger = args
            .erasure_ledger
            .ledger(&keys::key_dir(&args.storage.data_dir));
        confirm(patient, ledger.path())?;
    }

    let now = chartlog_api::now();
    let command = PatientCommand::ErasePatient {
        reason: args.reason.into(),
    };
    let outcome = match ledger.execute(patient, command, actor, now).await {
        Ok(outcome) => outcome,
        Err(LedgerError::Erased { erased_at, .. }) => {
            bail!("patient {patient} was already erased at {erased_at}")
        }
        Err(LedgerError::Rejected(rejection)) => {
            bail!("the erasure was refused: {rejection}")
        }
        Err(error) => return Err(error).context("the erasure failed"),
    };
    tracing::info!(%patient, version = outcome.stream_version, "patient erased");

    let destroyed_key = match ledger.keys().store().fetch(&stream).await {
        Ok(Some(DataKeyRecord::Destroyed { key_id, .. })) => key_id,
        Ok(_) => bail!(
            "patient {patient}'s tombstone is stored but the data key is not destroyed; run \
             `chartlog erase` again to finish"
        ),
        Err(error) => return Err(error).context("cannot read the destroyed data key"),
    };
    let recorded = ledger
        .store()
        .read_stream(&stream, outcome.stream_version, 1)
        .await
        .context("cannot read the tombstone back")?;
    let Some(tombstone) = recorded.first() else {
        bail!(
            "the tombstone at version {} is missing",
            outcome.stream_version
        );
    };
    let header = &tombstone.event.header;
    assert_eq!(
        header.event_type, "patient_erased",
        "the last event is the tombstone"
    );
    assert_eq!(
        header.key_id, destroyed_key,
        "the tombstone is sealed under the destroyed key"
    );
    Ok(Certificate {
        format: CERTIFICATE_FORMAT,
        patient_id: patient.to_string(),
        erased_at: header.recorded_at.to_string(),
        reason: args.reason.into(),
        actor: CertificateActor {
            user_id: header.actor.user_id.to_string(),
            role: header.actor.role,
            purpose_of_use: header.actor.purpose_of_use,
        },
        destroyed_data_key_id: destroyed_key.to_string(),
        tombstone: Tombstone {
            stream_id: stream.as_str().to_owned(),
            stream_version: header.stream_version,
            position: tombstone.position,
            event_id: header.event_id.to_string(),
            hash: tombstone.event.hash.to_string(),
            signer_key_id: header.signer_key_id.as_str().to_owned(),
        },
    })
}

/// Asks the person at the terminal to type the patient id again; refuses without a terminal.
fn confirm(patient: PatientId, ledger: &Path) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!(
            "refusing to erase patient {patient} without confirmation: stdin is not a terminal; \
             pass --yes to erase non-interactively. Nothing was erased"
        );
    }
    let mut stderr = std::io::stderr().lock();
    write!(
        stderr,
        "Erasing patient {patient} destroys their data key: their record in this database \
         becomes unreadable for good. Backups taken before now still hold the key; they stay \
         unreadable only while the erasure ledger in {} is kept (back that directory up \
         again after erasing) or the live database is named with `chartlog restore \
         --erasures-from`.\nType the patient id to confirm: ",
        ledger.display()
    )
    .and_then(|()| stderr.flush())
    .context("cannot write the prompt")?;
    drop(stderr);
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .context("cannot read the confirmation")?;
    if answer.trim() != patient.to_string() {
        bail!("not confirmed; nothing was erased");
    }
    Ok(())
}

fn describe(certificate: &Certificate) -> String {
    let tombstone = &certificate.tombstone;
    format!(
        "ERASURE CERTIFICATE ({})\n\
         patient:            {}\n\
         erased at:          {}\n\
         reason:             {}\n\
         actor:              {} (role {}, purpose {})\n\
         destroyed data key: {}\n\
         tombstone:          {} version {}, position {}, event {}\n\
         tombstone hash:     {} (signed by {})",
        certificate.format,
        certificate.patient_id,
        certificate.erased_at,
        serde_json::to_value(certificate.reason)
            .ok()
            .and_then(|value| value.as_str().map(str::to_owned))
            .unwrap_or_default(),
        certificate.actor.user_id,
        certificate.actor.role,
        certificate.actor.purpose_of_use,
        certificate.destroyed_data_key_id,
        tombstone.stream_id,
        tombstone.stream_version,
        tombstone.position,
        tombstone.event_id,
        tombstone.hash,
        tombstone.signer_key_id,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_operator_is_a_user_id() {
        assert!(UserId::parse(CLI_OPERATOR_USER_ID).is_ok());
    }

    #[test]
    fn reasons_are_spelled_as_in_the_api() {
        for reason in Reason::value_variants() {
            let name = reason
                .to_possible_value()
                .expect("no variant is skipped")
                .get_name()
                .to_owned();
            let api = serde_json::to_value(ErasureReason::from(*reason)).expect("encode");
            assert_eq!(api, serde_json::Value::String(name));
        }
    }
}
