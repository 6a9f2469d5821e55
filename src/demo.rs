//! `chartlog demo`: synthetic patients with realistic coded data and one demo account per
//! role, so a new user can try every feature minutes after `serve`. Never run by default; it
//! refuses a database that already holds patients unless `--force`, and, even then, one with
//! accounts other than the first administrator and its own: demo data never goes where people
//! work. Each demo account it creates is on the audit trail, as `chartlog users add` is.
//!
//! The patients come from `chartlog_domain::synthetic`, the generator the benchmarks use:
//! LOINC vital signs and labs, ICD-10-CM conditions, RxNorm medications and allergies, notes.
//! Every record is written through the ledger with the demo physician as the actor, so the
//! audit trail shows who wrote it.

use anyhow::{Context, bail};
use chartlog_access::{Accounts, NewUser, OneTimePassword, UserAccount, Username};
use chartlog_domain::{Actor, PatientCommand, PurposeOfUse, Role, synthetic};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};
use chartlog_projections::db::{ProjectionDb, SqlArg};
use chartlog_store::ExecuteOptions;
use clap::Args;

use crate::{KEY_DIR_NAME, StorageArgs, create_data_dir, open_database, wiring};

/// Commands after registration per demo patient: about two months of vitals and labs, a
/// condition, a prescription, an allergy and a note.
const DEMO_COMMANDS_PER_PATIENT: u64 = 40;

#[derive(Args)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// How many synthetic patients to load.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    patients: u64,
    /// Load even though the database already holds patients.
    #[arg(long)]
    force: bool,
}

/// The demo accounts' user names begin with this.
const DEMO_USERNAME_PREFIX: &str = "demo.";

/// Seeds stay below this (see [`run`]); the largest load stays within 10 digits.
const SEED_RANGE: u64 = 900_000_000;

/// The demo accounts: one per role (the administrator exists from the first start).
const DEMO_USERS: [(&str, Role); 6] = [
    ("demo.physician", Role::Physician),
    ("demo.nurse", Role::Nurse),
    ("demo.radiologist", Role::Radiologist),
    ("demo.labtech", Role::LabTechnician),
    ("demo.auditor", Role::Auditor),
    ("demo.analyst", Role::Analyst),
];

pub(crate) async fn run(args: DemoArgs) -> anyhow::Result<()> {
    create_data_dir(&args.storage.data_dir)?;
    let database = open_database(&args.storage.database_location()).await?;
    let outcome = load(&args, &database).await;
    database.close().await;
    outcome
}

async fn load(args: &DemoArgs, database: &crate::Database) -> anyhow::Result<()> {
    let log = wiring::log_db(database);
    let existing = log
        .fetch_all(
            "SELECT COUNT(*) FROM chartlog_streams WHERE stream_id LIKE $1",
            vec![SqlArg::Text("patient-%".to_owned())],
        )
        .await
        .context("cannot count the patients already stored")?;
    let existing = existing
        .first()
        .map(|row| row.i64(0))
        .transpose()
        .context("cannot count the patients already stored")?
        .unwrap_or(0);
    if existing > 0 && !args.force {
        bail!(
            "this database already holds {existing} patients; demo data is for empty databases \
             (pass --force to add it anyway)"
        );
    }
    // --force adds patients, never demo accounts next to people's own.
    let others = accounts_of_others(&log).await?;
    if others > 0 {
        bail!(
            "this database holds {others} accounts besides '{}' and the demo's: demo data is \
             for a database of its own, never one people work in (--force does not change that)",
            wiring::FIRST_ADMINISTRATOR
        );
    }
    let key_dir = args.storage.data_dir.join(KEY_DIR_NAME);
    // Keys are made only with a new database, as the server's first start makes them; a
    // database in use was sealed and signed with keys that exist already, and keys made in a
    // mistyped --data-dir would sign records no verifier trusts.
    if is_new(&log).await? {
        wiring::create_key_files(&key_dir)?;
    }
    // Opened before any account is made: each is recorded as it is created.
    let audit = wiring::OperatorAudit::open(database, &key_dir).await?;
    let accounts = wiring::operator_accounts(database, &key_dir)?;
    let records = wiring::records(database, &key_dir)?;
    let now = chartlog_api::now();

    let mut created = Vec::new();
    for (name, role) in DEMO_USERS {
        let username = Username::parse(name).map_err(|error| anyhow::anyhow!("{name}: {error}"))?;
        let new = NewUser {
            username,
            role,
            patient_id: None,
            sso_subject: None,
        };
        let (user, password) = create_account(&accounts, &audit, new, now)
            .await
            .with_context(|| format!("cannot create the demo account {name} (already loaded?)"))?;
        created.push((name.to_owned(), role, user.user_id, password));
    }
    let physician = created[0].2;
    let nurse = created[1].2;
    let actor = Actor {
        user_id: physician,
        role: Role::Physician,
        purpose_of_use: PurposeOfUse::Treatment,
        break_glass: false,
    };

    // Seeds from the clock, so a second load (with --force) gets new patients; below 10^9,
    // because the synthetic MRN spells the seed out and an MRN has at most 20 characters.
    let first_seed = (now.unix_micros().unsigned_abs() / 1_000) % SEED_RANGE;
    let progress = indicatif::ProgressBar::new(args.patients);
    let mut first_patient = None;
    for seed in first_seed..first_seed + args.patients {
        let patient = synthetic::patient_id(seed);
        first_patient.get_or_insert(patient);
        let mut commands = vec![
            synthetic::registration(seed),
            PatientCommand::AssignCareRelationship {
                clinician: physician,
            },
            PatientCommand::AssignCareRelationship { clinician: nurse },
        ];
        commands.extend((0..DEMO_COMMANDS_PER_PATIENT).map(|n| {
            // Spread over the last two months, oldest first.
            let days_ago = (DEMO_COMMANDS_PER_PATIENT - n) as i64 * 36 / 24;
            let at = chartlog_domain::Timestamp::from_unix_micros(
                now.unix_micros() - days_ago * 86_400_000_000,
            )
            .unwrap_or(now);
            synthetic::clinical_command(seed, n, at)
        }));
        for command in commands {
            let kind = command.kind();
            records
                .execute(patient, command, actor, now, ExecuteOptions::default())
                .await
                .with_context(|| format!("demo patient {patient}: {kind} refused"))?;
        }
        progress.inc(1);
    }
    progress.finish_and_clear();

    let patient_account = match first_patient {
        Some(patient_id) => {
            let username = Username::parse("demo.patient")
                .map_err(|error| anyhow::anyhow!("demo.patient: {error}"))?;
            let new = NewUser {
                username,
                role: Role::Patient,
                patient_id: Some(patient_id),
                sso_subject: None,
            };
            let (user, password) = create_account(&accounts, &audit, new, now)
                .await
                .context("cannot create the demo patient's account")?;
            Some((user.user_id, patient_id, password))
        }
        None => None,
    };

    println!(
        "loaded {} synthetic patients ({} events each)",
        args.patients,
        DEMO_COMMANDS_PER_PATIENT + 3
    );
    println!("demo accounts (one-time passwords: change at first login; clinical roles and");
    println!("patients then enroll a TOTP second factor):");
    for (name, role, user_id, password) in &created {
        println!(
            "  {name:<18} {:<15} {user_id}  {}",
            role.as_str(),
            password.expose()
        );
    }
    if let Some((user_id, patient_id, password)) = patient_account {
        println!(
            "  {:<18} {:<15} {user_id}  {}  (reads patient {patient_id})",
            "demo.patient",
            "patient",
            password.expose()
        );
    }
    Ok(())
}

/// Creates a demo account and records it on the audit trail, as `chartlog users add` does:
/// the command-line operator as the actor, the account, the outcome.
async fn create_account(
    accounts: &Accounts,
    audit: &wiring::OperatorAudit,
    new: NewUser,
    now: chartlog_domain::Timestamp,
) -> anyhow::Result<(UserAccount, OneTimePassword)> {
    let created = accounts.create_user(new, now).await;
    let (account, outcome) = match &created {
        Ok((user, _)) => (Some(user.user_id.as_uuid()), AuditOutcome::Success),
        Err(_) => (None, AuditOutcome::Failure),
    };
    let audited = audit
        .record(AuditEntity::User, account, AuditAction::Create, outcome)
        .await;
    let created = created?;
    audited?;
    Ok(created)
}

/// Accounts that are neither the first administrator nor the demo's.
async fn accounts_of_others(log: &ProjectionDb) -> anyhow::Result<i64> {
    let row = log
        .fetch_optional(
            "SELECT COUNT(*) FROM chartlog_access_users WHERE username <> $1 AND username NOT LIKE $2",
            vec![
                SqlArg::Text(wiring::FIRST_ADMINISTRATOR.to_owned()),
                SqlArg::Text(format!("{DEMO_USERNAME_PREFIX}%")),
            ],
        )
        .await
        .context("cannot count the accounts")?;
    row.map(|row| row.i64(0))
        .transpose()
        .context("cannot count the accounts")
        .map(Option::unwrap_or_default)
}

/// Whether the database holds nothing yet: no event, no data key, no account.
async fn is_new(log: &ProjectionDb) -> anyhow::Result<bool> {
    for statement in [
        "SELECT 1 FROM chartlog_events LIMIT 1",
        "SELECT 1 FROM chartlog_data_keys LIMIT 1",
        "SELECT 1 FROM chartlog_access_users LIMIT 1",
    ] {
        let row = log
            .fetch_optional(statement, Vec::new())
            .await
            .context("cannot tell whether the database is new")?;
        if row.is_some() {
            return Ok(false);
        }
    }
    Ok(true)
}
