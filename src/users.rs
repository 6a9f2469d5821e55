//! `chartlog users`: the operator's way to manage accounts from the server's own machine,
//! with the same rules as the administrator's HTTP endpoints, and on the audit trail as they
//! are (the command line's operator as the actor, the account touched, the outcome).

use anyhow::Context;
use chartlog_access::{NewUser, Username};
use chartlog_domain::{PatientId, Role, UserId};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};
use clap::{Args, Subcommand};

use crate::{KEY_DIR_NAME, StorageArgs, wiring};

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

pub(crate) async fn run(command: UsersCommand) -> anyhow::Result<()> {
    let storage = match &command {
        UsersCommand::Add(args) => &args.storage,
        UsersCommand::List(args) => &args.storage,
        UsersCommand::Disable(args)
        | UsersCommand::ResetPassword(args)
        | UsersCommand::ResetSecondFactor(args) => &args.storage,
        UsersCommand::LinkSso(args) => &args.user.storage,
    };
    let storage_key_dir = storage.data_dir.join(KEY_DIR_NAME);
    // Accounts live in the server's database: a new empty one would hold none.
    let database = wiring::open_existing_database(&storage.database_location()).await?;
    let accounts = wiring::operator_accounts(&database, &storage_key_dir)?;
    let now = chartlog_api::now();
    // Each branch: what it does to which account, for the audit trail, and how it went.
    let (action, account, result): (AuditAction, Option<UserId>, anyhow::Result<()>) = match command
    {
        UsersCommand::Add(args) => {
            let username = Username::parse(&args.username)
                .map_err(|error| anyhow::anyhow!("invalid --username: {error}"))?;
            let patient_id = args
                .patient_id
                .as_deref()
                .map(PatientId::parse)
                .transpose()
                .map_err(|_| anyhow::anyhow!("invalid --patient-id: expected a UUID"))?;
            let created = accounts
                .create_user(
                    NewUser {
                        username,
                        role: args.role,
                        patient_id,
                        sso_subject: args.sso_subject.clone(),
                    },
                    now,
                )
                .await
                .context("cannot create the account");
            match created {
                Ok((user, password)) => {
                    println!("user_id: {}", user.user_id);
                    println!("one-time password: {}", password.expose());
                    (AuditAction::Create, Some(user.user_id), Ok(()))
                }
                Err(error) => (AuditAction::Create, None, Err(error)),
            }
        }
        UsersCommand::List(_) => {
            let listed = accounts.list_users().await.context("cannot list accounts");
            if let Ok(users) = &listed {
                for user in users {
                    println!(
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
                    );
                }
            }
            (AuditAction::Read, None, listed.map(drop))
        }
        UsersCommand::Disable(args) => {
            let user_id = user_id(&args)?;
            let done = accounts
                .disable_user(user_id, now)
                .await
                .context("cannot disable the account");
            if done.is_ok() {
                println!("disabled {user_id}");
            }
            (AuditAction::Update, Some(user_id), done)
        }
        UsersCommand::ResetPassword(args) => {
            let user_id = user_id(&args)?;
            let done = accounts
                .reset_password(user_id, now)
                .await
                .context("cannot reset the password")
                .map(|password| println!("one-time password: {}", password.expose()));
            (AuditAction::Update, Some(user_id), done)
        }
        UsersCommand::ResetSecondFactor(args) => {
            let user_id = user_id(&args)?;
            let done = accounts
                .reset_second_factor(user_id, now)
                .await
                .context("cannot reset the second factor");
            if done.is_ok() {
                println!("second factor removed for {user_id}; it must enroll again");
            }
            (AuditAction::Update, Some(user_id), done)
        }
        UsersCommand::LinkSso(args) => {
            let user_id = user_id(&args.user)?;
            let done = accounts
                .link_sso_subject(user_id, args.subject.as_deref(), now)
                .await
                .context("cannot change the account's identity-provider link")
                .map(|account| match account.sso_subject {
                    Some(subject) => println!(
                        "{user_id} signs in through the identity provider as subject {subject}"
                    ),
                    None => println!("{user_id} signs in with its chartlog password"),
                });
            (AuditAction::Update, Some(user_id), done)
        }
    };
    // As over HTTP, where an administrator's account changes are audited: the operator's
    // are too, failed ones included, as the command line's operator.
    let audited = wiring::audit_operator_action_on(
        &database,
        &storage_key_dir,
        AuditEntity::User,
        account.map(|user| user.as_uuid()),
        action,
        if result.is_ok() {
            AuditOutcome::Success
        } else {
            AuditOutcome::Failure
        },
    )
    .await;
    database.close().await;
    result?;
    audited
}

fn user_id(args: &UserArgs) -> anyhow::Result<UserId> {
    UserId::parse(&args.user_id).map_err(|_| anyhow::anyhow!("invalid user id: expected a UUID"))
}
