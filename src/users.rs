//! `chartlog users`: the operator's way to manage accounts from the server's own machine,
//! with the same rules as the administrator's HTTP endpoints, and on the audit trail as they
//! are (the command line's operator as the actor, the account touched, the outcome).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use chartlog_access::{Accounts, NewUser, OneTimePassword, Username};
use chartlog_domain::{PatientId, Role, UserId};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};
use clap::{Args, Subcommand};

use crate::{Database, KEY_DIR_NAME, StorageArgs, wiring};

#[derive(Subcommand)]
pub(crate) enum UsersCommand {
    /// Create an account; prints its one-time password, which must be changed at first login.
    Add(AddArgs),
    /// List accounts (no secrets).
    List(ListArgs),
    /// Disable an account; its sessions end at once.
    Disable(UserArgs),
    /// Issue a new one-time password (printed); the account's sessions end. The way back in
    /// for a locked-out administrator.
    ResetPassword(UserArgs),
    /// Remove the account's second factor; it must enroll again at its next login.
    #[command(name = "reset-2fa")]
    ResetSecondFactor(UserArgs),
    /// Link the account to the identity provider's subject (`serve --oidc-issuer`): it then
    /// signs in there only. `--unlink` removes the link. Its sessions end either way.
    #[command(name = "link-sso")]
    LinkSso(LinkSsoArgs),
}

#[derive(Args)]
pub(crate) struct LinkSsoArgs {
    #[command(flatten)]
    user: UserArgs,
    /// The identity provider's `sub` for this user.
    #[arg(long, required_unless_present = "unlink", conflicts_with = "unlink")]
    subject: Option<String>,
    /// Remove the account's link: it signs in with its chartlog password again.
    #[arg(long)]
    unlink: bool,
}

#[derive(Args)]
pub(crate) struct AddArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// 3 to 64 characters of a-z, 0-9, '.', '_' and '-'.
    #[arg(long)]
    username: String,
    /// physician, nurse, radiologist, lab_technician, administrator, auditor, analyst or
    /// patient.
    #[arg(long)]
    role: Role,
    /// For a patient's account: the patient whose record it reads.
    #[arg(long)]
    patient_id: Option<String>,
    /// The identity provider's `sub` for this user: the account signs in there from the
    /// start, as after `chartlog users link-sso`.
    #[arg(long)]
    sso_subject: Option<String>,
}

#[derive(Args)]
pub(crate) struct ListArgs {
    #[command(flatten)]
    storage: StorageArgs,
}

#[derive(Args)]
pub(crate) struct UserArgs {
    #[command(flatten)]
    storage: StorageArgs,
    /// The account's user id (see `chartlog users list`).
    user_id: String,
}

/// What a command does to which account, parsed from its arguments before anything is opened.
enum Change {
    Add(NewUser),
    List,
    Disable(UserId),
    ResetPassword(UserId),
    ResetSecondFactor(UserId),
    LinkSso(UserId, Option<String>),
}

/// What a command prints once its audit record is durable.
struct Done {
    lines: Vec<String>,
    /// A one-time password, printed last; withheld when the change could not be audited, so
    /// no one signs in through an account change the audit trail lacks.
    password: Option<OneTimePassword>,
}

impl Done {
    fn lines(lines: Vec<String>) -> Self {
        Self {
            lines,
            password: None,
        }
    }
}

pub(crate) async fn run(command: UsersCommand) -> anyhow::Result<()> {
    let (storage, change) = parse(command)?;
    let key_dir = storage.data_dir.join(KEY_DIR_NAME);
    // Accounts live in the server's database: a new empty one would hold none.
    let database = wiring::open_existing_database(&storage.database_location()).await?;
    let outcome = run_on(&database, &key_dir, change).await;
    database.close().await;
    outcome
}

fn parse(command: UsersCommand) -> anyhow::Result<(StorageArgs, Change)> {
    Ok(match command {
        UsersCommand::Add(args) => {
            let username = Username::parse(&args.username)
                .map_err(|error| anyhow::anyhow!("invalid --username: {error}"))?;
            let patient_id = args
                .patient_id
                .as_deref()
                .map(PatientId::parse)
                .transpose()
                .map_err(|_| anyhow::anyhow!("invalid --patient-id: expected a UUID"))?;
            let new = NewUser {
                username,
                role: args.role,
                patient_id,
                sso_subject: args.sso_subject,
            };
            (args.storage, Change::Add(new))
        }
        UsersCommand::List(args) => (args.storage, Change::List),
        UsersCommand::Disable(args) => {
            let user_id = user_id(&args)?;
            (args.storage, Change::Disable(user_id))
        }
        UsersCommand::ResetPassword(args) => {
            let user_id = user_id(&args)?;
            (args.storage, Change::ResetPassword(user_id))
        }
        UsersCommand::ResetSecondFactor(args) => {
            let user_id = user_id(&args)?;
            (args.storage, Change::ResetSecondFactor(user_id))
        }
        UsersCommand::LinkSso(args) => {
            let user_id = user_id(&args.user)?;
            (args.user.storage, Change::LinkSso(user_id, args.subject))
        }
    })
}

async fn run_on(database: &Database, key_dir: &Path, change: Change) -> anyhow::Result<()> {
    // As over HTTP, where an administrator's account changes are audited: the operator's
    // are too, failed ones included, as the command line's operator. The audit log is opened
    // first, so a change is made only once its record can be written.
    let audit = wiring::OperatorAudit::open(database, key_dir).await?;
    let accounts = wiring::operator_accounts(database, key_dir)?;
    let (action, account, result) = apply(&accounts, change).await;
    let outcome = AuditOutcome::of(result.is_ok());
    let audited = audit
        .record(
            AuditEntity::User,
            account.map(|user| user.as_uuid()),
            action,
            outcome,
        )
        .await;
    let done = result?;
    let mut stdout = std::io::stdout().lock();
    for line in &done.lines {
        writeln!(stdout, "{line}").context("cannot write to stdout")?;
    }
    match (audited, &done.password, account) {
        (Ok(()), Some(password), _) => {
            // Straight from the password: a formatted copy would outlive it unzeroized.
            write!(stdout, "one-time password: ")
                .and_then(|()| stdout.write_all(password.expose().as_bytes()))
                .and_then(|()| writeln!(stdout))
                .context("cannot write to stdout")?;
        }
        (Ok(()), None, _) => {}
        (Err(error), Some(_), Some(user_id)) => {
            return Err(error.context(format!(
                "the change to account {user_id} was made, but not recorded in the audit \
                 trail, so its one-time password is withheld: once the audit log can be \
                 written, issue a new one with `chartlog users reset-password {user_id}`"
            )));
        }
        (Err(error), _, _) => {
            return Err(error.context("the change was made, but not recorded in the audit trail"));
        }
    }
    stdout.flush().context("cannot write to stdout")
}

/// Makes the change: what it did to which account, for the audit trail, and how it went.
async fn apply(
    accounts: &Accounts,
    change: Change,
) -> (AuditAction, Option<UserId>, anyhow::Result<Done>) {
    let now = chartlog_api::now();
    match change {
        Change::Add(new) => {
            let created = accounts
                .create_user(new, now)
                .await
                .context("cannot create the account");
            match created {
                Ok((user, password)) => (
                    AuditAction::Create,
                    Some(user.user_id),
                    Ok(Done {
                        lines: vec![format!("user_id: {}", user.user_id)],
                        password: Some(password),
                    }),
                ),
                Err(error) => (AuditAction::Create, None, Err(error)),
            }
        }
        Change::List => {
            let listed = accounts.list_users().await.context("cannot list accounts");
            let listed = listed.map(|users| {
                Done::lines(
                    users
                        .iter()
                        .map(|user| {
                            format!(
                                "{}\t{}\t{}\t{}\t{}",
                                user.user_id,
                                user.username.as_str(),
                                user.role.as_str(),
                                if user.disabled { "disabled" } else { "active" },
                                if user.sso_subject.is_some() {
                                    "identity provider"
                                } else {
                                    "password"
                                }
                            )
                        })
                        .collect(),
                )
            });
            (AuditAction::Read, None, listed)
        }
        Change::Disable(user_id) => {
            let done = accounts
                .disable_user(user_id, now)
                .await
                .context("cannot disable the account")
                .map(|()| Done::lines(vec![format!("disabled {user_id}")]));
            (AuditAction::Update, Some(user_id), done)
        }
        Change::ResetPassword(user_id) => {
            let done = accounts
                .reset_password(user_id, now)
                .await
                .context("cannot reset the password")
                .map(|password| Done {
                    lines: Vec::new(),
                    password: Some(password),
                });
            (AuditAction::Update, Some(user_id), done)
        }
        Change::ResetSecondFactor(user_id) => {
            let done = accounts
                .reset_second_factor(user_id, now)
                .await
                .context("cannot reset the second factor")
                .map(|()| {
                    Done::lines(vec![format!(
                        "second factor removed for {user_id}; it must enroll again"
                    )])
                });
            (AuditAction::Update, Some(user_id), done)
        }
        Change::LinkSso(user_id, subject) => {
            let done = accounts
                .link_sso_subject(user_id, subject.as_deref(), now)
                .await
                .context("cannot change the account's identity-provider link")
                .map(|account| {
                    Done::lines(vec![match account.sso_subject {
                        Some(subject) => format!(
                            "{user_id} signs in through the identity provider as subject \
                             {subject}"
                        ),
                        None => format!("{user_id} signs in with its chartlog password"),
                    }])
                });
            (AuditAction::Update, Some(user_id), done)
        }
    }
}

fn user_id(args: &UserArgs) -> anyhow::Result<UserId> {
    UserId::parse(&args.user_id).map_err(|_| anyhow::anyhow!("invalid user id: expected a UUID"))
}
