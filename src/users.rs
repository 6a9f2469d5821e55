//! `chartlog users`: the operator's way to manage accounts from the server's own machine,
//! with the same rules as the administrator's HTTP endpoints.

use anyhow::Context;
use chartlog_access::{AccessSettings, NewUser, Username};
use chartlog_domain::{PatientId, Role, UserId};
use clap::{Args, Subcommand};

use crate::{KEY_DIR_NAME, StorageArgs, create_data_dir, open_database, wiring};

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
    create_data_dir(&storage.data_dir)?;
    let database = open_database(&storage.database_location()).await?;
    let accounts = wiring::accounts(
        &database,
        &storage.data_dir.join(KEY_DIR_NAME),
        AccessSettings::default(),
    )?;
    let now = chartlog_api::now();
    let result = match command {
        UsersCommand::Add(args) => {
            let username = Username::parse(&args.username)
                .map_err(|error| anyhow::anyhow!("invalid --username: {error}"))?;
            let patient_id = args
                .patient_id
                .as_deref()
                .map(PatientId::parse)
                .transpose()
                .map_err(|_| anyhow::anyhow!("invalid --patient-id: expected a UUID"))?;
            let (user, password) = accounts
                .create_user(
                    NewUser {
                        username,
                        role: args.role,
                        patient_id,
                    },
                    now,
                )
                .await
                .context("cannot create the account")?;
            println!("user_id: {}", user.user_id);
            println!("one-time password: {}", password.expose());
            Ok(())
        }
        UsersCommand::List(_) => {
            for user in accounts
                .list_users()
                .await
                .context("cannot list accounts")?
            {
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
            Ok(())
        }
        UsersCommand::Disable(args) => {
            let user_id = user_id(&args)?;
            accounts
                .disable_user(user_id, now)
                .await
                .context("cannot disable the account")?;
            println!("disabled {user_id}");
            Ok(())
        }
        UsersCommand::ResetPassword(args) => {
            let user_id = user_id(&args)?;
            let password = accounts
                .reset_password(user_id, now)
                .await
                .context("cannot reset the password")?;
            println!("one-time password: {}", password.expose());
            Ok(())
        }
        UsersCommand::ResetSecondFactor(args) => {
            let user_id = user_id(&args)?;
            accounts
                .reset_second_factor(user_id, now)
                .await
                .context("cannot reset the second factor")?;
            println!("second factor removed for {user_id}; it must enroll again");
            Ok(())
        }
        UsersCommand::LinkSso(args) => {
            let user_id = user_id(&args.user)?;
            let account = accounts
                .link_sso_subject(user_id, args.subject.as_deref(), now)
                .await
                .context("cannot change the account's identity-provider link")?;
            match account.sso_subject {
                Some(subject) => println!(
                    "{user_id} signs in through the identity provider as subject {subject}"
                ),
                None => println!("{user_id} signs in with its chartlog password"),
            }
            Ok(())
        }
    };
    database.close().await;
    result
}

fn user_id(args: &UserArgs) -> anyhow::Result<UserId> {
    UserId::parse(&args.user_id).map_err(|_| anyhow::anyhow!("invalid user id: expected a UUID"))
}
