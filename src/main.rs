//! `chartlog`: the operator's command line and the wiring of the server.
//!
//! This binary is thin: it parses flags, sets up tracing, opens the backend and hands an
//! [`ApiConfig`] to `chartlog_api::app`. Behaviour lives in the crates.
#![forbid(unsafe_code)]

mod backup;
mod backup_schedule;
mod config_file;
mod deid;
mod demo;
mod erase;
mod erasure_ledger;
mod keys;
mod users;
mod verify;
mod wiring;

use std::fmt;
use std::fs::{self, DirBuilder};
use std::future::Future;
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener};
use std::num::NonZeroU32;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::HttpServer;
use anyhow::{Context, bail};
use chartlog_api::alerts::{RefusalAlertSettings, RefusalWatch};
use chartlog_api::limits::{ClientRateLimiter, RateLimit};
use chartlog_api::tls::{self, PemFiles};
use chartlog_api::{ApiConfig, NotReady, ReadinessProbe, Transport};
use chartlog_crypto::{
    DataKeys, INDEX_KEY_FILE_NAME, KeyRing, KeyStore, SignatureVerifier, load_or_create_mac_key,
};
use chartlog_domain::patient::RetentionPolicy;
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome, AuditTrailProjection};
use chartlog_projections::chart::ChartProjection;
use chartlog_projections::db::{ProjectionDb, SqlArg};
use chartlog_projections::deid::{DEID_KEY_FILE_NAME, DeidentifiedProjection, Pseudonymizer};
use chartlog_projections::history::HistoryProjection;
use chartlog_projections::{Projection, ProjectionRunner};
use chartlog_store::EventStore;
use chartlog_store::postgres::{self, PostgresEventStore, PostgresKeyStore};
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::sqlite::SqlitePool;
use tracing_subscriber::EnvFilter;

/// Seconds in-flight requests get to finish after SIGINT or SIGTERM before workers are
/// stopped. Long enough for a command to commit; short enough for an orchestrator's grace
/// period (Kubernetes defaults to 30 s).
const SHUTDOWN_TIMEOUT_SECONDS: u64 = 20;
const _: () = assert!(SHUTDOWN_TIMEOUT_SECONDS > 0);
const _: () = assert!(SHUTDOWN_TIMEOUT_SECONDS < 30);

/// The database file name inside the data directory when no `--database-url` is given.
const SQLITE_FILE_NAME: &str = "chartlog.db";
/// The folder of key files (KEKs, signing keys) inside the data directory.
pub(crate) const KEY_DIR_NAME: &str = "keys";

#[derive(Parser)]
#[command(
    name = "chartlog",
    version,
    about = "An event-sourced store for electronic health records"
)]
struct Cli {
    /// Log filter (tracing-subscriber EnvFilter syntax), e.g. `info` or `chartlog_api=debug`.
    #[arg(long, global = true, env = "CHARTLOG_LOG", default_value = "info")]
    log: String,

    /// A TOML file of settings: keys are the long flag names, at the top level (every command
    /// with the flag) or under `[<command>]`, e.g. `[serve]`; `[users]` applies to every
    /// `users` subcommand and `[users.add]` to one. An unknown key or table is an error. The
    /// command line and the environment override it; secrets (a URL with a password, the
    /// webhook URL) are refused there.
    #[arg(long, global = true, env = "CHARTLOG_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTPS API.
    Serve(Box<ServeArgs>),
    /// Apply database migrations, then exit.
    Migrate(StorageArgs),
    /// Rebuild read models from the event log (position 0), then exit. Recorded on the audit
    /// trail, with the command-line operator as the actor.
    Rebuild(RebuildArgs),
    /// Manage user accounts (the administrator's endpoints do the same over HTTP).
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// Inspect and rotate keys: key ids only, never key material.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Crypto-erase a patient: their data key is destroyed, and a certificate is printed.
    Erase(erase::EraseArgs),
    /// Check every stream's hash chain and signatures; exits non-zero on any break.
    Verify(verify::VerifyArgs),
    /// Write an encrypted, signed backup of events, wrapped keys, the erasure ledger and users.
    Backup(backup::BackupArgs),
    /// Restore a backup into an empty database.
    Restore(backup::RestoreArgs),
    /// The de-identified (Safe Harbor) tables, for operators.
    #[command(subcommand)]
    Deid(deid::DeidCommand),
    /// Load synthetic patients and one demo account per role, to try chartlog out.
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct RebuildArgs {
    #[command(flatten)]
    storage: StorageArgs,

    /// The projection to rebuild (chart, history, audit_trail, deidentified). Default: all.
    name: Option<String>,

    /// Print a one-line JSON summary `{"projection", "events", "seconds"}` on stdout.
    #[arg(long)]
    json: bool,
}

/// Where chartlog keeps its state.
#[derive(Args)]
pub(crate) struct StorageArgs {
    /// Directory for local state: the SQLite database, development TLS files, key files.
    #[arg(long, env = "CHARTLOG_DATA_DIR", default_value = "./chartlog-data")]
    pub(crate) data_dir: PathBuf,

    /// Database to use, e.g. `postgres://user@host/db`. Default: SQLite at
    /// `<data-dir>/chartlog.db`.
    // hide_env_values: the URL can carry a password, and --help would print it.
    #[arg(long, env = "CHARTLOG_DATABASE_URL", hide_env_values = true)]
    pub(crate) database_url: Option<DatabaseUrl>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    storage: StorageArgs,

    /// Address to listen on; port 0 picks a free port (the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,

    /// PEM certificate chain for production TLS (leaf first). Requires --tls-key.
    #[arg(long, requires = "tls_key", conflicts_with = "insecure_http")]
    tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert", conflicts_with = "insecure_http")]
    tls_key: Option<PathBuf>,

    /// Serve plain HTTP without TLS. For local development only: PHI would cross the
    /// network unencrypted.
    #[arg(long)]
    insecure_http: bool,

    /// Serve the self-signed development certificate (used when no --tls-cert is given) on
    /// an address other than loopback. Without it such a --listen is refused: clients
    /// elsewhere would have to be told to trust a certificate no authority vouches for.
    #[arg(long)]
    allow_development_certificate: bool,

    #[command(flatten)]
    access: AccessArgs,

    #[command(flatten)]
    retention: RetentionArgs,

    #[command(flatten)]
    backup_schedule: backup_schedule::ScheduleArgs,

    /// The base URL clients reach this server at, for links in notifications. Default:
    /// the listening address.
    #[arg(long)]
    public_url: Option<String>,

    /// An https URL that is POSTed a JSON notice (ids and a link, no PHI) at every
    /// break-glass opening, every refusal alert and every failed scheduled backup; its `kind`
    /// field tells them apart. Notices always go to the log as well.
    #[arg(long, env = "CHARTLOG_BREAK_GLASS_WEBHOOK", hide_env_values = true)]
    break_glass_webhook: Option<String>,

    /// Refusals (denied or failed requests) of one user, or of one address without a
    /// session, within --refusal-alert-minutes that raise an alert to the notifiers. One
    /// alert per subject per window.
    #[arg(long, default_value_t = RefusalAlertSettings::default().refusals, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    refusal_alert_count: u32,

    /// Single sign-on: the OpenID Connect issuer whose ID tokens sign linked accounts in
    /// (`POST /auth/sso`), exactly as its tokens' `iss`. Requires --oidc-audience and
    /// --oidc-jwks.
    #[arg(long, requires_all = ["oidc_audience", "oidc_jwks"])]
    oidc_issuer: Option<String>,

    /// This server's client id at the identity provider: its tokens' `aud`.
    #[arg(long, requires = "oidc_issuer")]
    oidc_audience: Option<String>,

    /// The identity provider's JSON Web Key Set, as a file kept current from its `jwks_uri`;
    /// read again when a token names a key it does not hold.
    #[arg(long, requires = "oidc_issuer")]
    oidc_jwks: Option<PathBuf>,

    /// The window --refusal-alert-count is counted over, in minutes.
    #[arg(long, default_value_t = RefusalAlertSettings::default().window.as_secs() / 60, value_parser = clap::value_parser!(u64).range(1..=1440))]
    refusal_alert_minutes: u64,

    /// Requests per second one client (a session, or else an address) may send sustained;
    /// more get 429 with Retry-After. The health probes are exempt.
    #[arg(long, default_value_t = RateLimit::DEFAULT_PER_SECOND, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate_limit_per_second: u32,

    /// A reverse proxy or load balancer in front of this server, as a network (`10.0.0.0/8`,
    /// `2001:db8::/48`) or one address; repeat for several. A request from one names its
    /// client in `X-Forwarded-For`, which is then believed, read from the right up to the
    /// first address that is not such a proxy. That address is what the audit trail records
    /// and what login throttling and the rate limit count. Without it the header is ignored.
    #[arg(long = "trusted-proxy", env = "CHARTLOG_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_trusted_proxy)]
    trusted_proxies: Vec<ipnet::IpNet>,

    /// Requests one client may send at once, above the sustained rate, after a quiet spell.
    #[arg(long, default_value_t = RateLimit::DEFAULT_BURST, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    rate_limit_burst: u32,

    /// Most connections this server opens to a PostgreSQL database (no effect on SQLite).
    /// More than the cores can serve only makes queries wait on each other for the CPU.
    #[arg(
        long,
        env = "CHARTLOG_DATABASE_CONNECTIONS",
        default_value_t = postgres::CONNECTIONS_DEFAULT,
        value_parser = clap::value_parser!(u32).range(i64::from(postgres::CONNECTIONS_MIN)..=1_000)
    )]
    database_connections: u32,

    #[command(flatten)]
    erasure_ledger: erasure_ledger::ErasureLedgerArgs,
}

/// A network, or a single address as the network of that address alone.
fn parse_trusted_proxy(raw: &str) -> Result<ipnet::IpNet, String> {
    let raw = raw.trim();
    let network = raw
        .parse::<ipnet::IpNet>()
        .map(|network| network.trunc())
        .or_else(|_| raw.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!("{raw:?} is not a network or an address, e.g. 10.0.0.0/8 or 192.0.2.10")
        })?;
    if network.prefix_len() == 0 {
        return Err(format!(
            "{raw:?} would trust every client to name its own address; name the proxies' network"
        ));
    }
    Ok(network)
}

impl ServeArgs {
    fn rate_limit(&self) -> RateLimit {
        // clap's ranges exclude 0; MIN keeps this total without a panic path.
        RateLimit {
            per_second: NonZeroU32::new(self.rate_limit_per_second).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(self.rate_limit_burst).unwrap_or(NonZeroU32::MIN),
        }
    }

    /// The identity provider of --oidc-issuer, its keys read from --oidc-jwks.
    fn identity_provider(
        &self,
    ) -> anyhow::Result<Option<Arc<chartlog_api::sso::IdentityProvider>>> {
        let (Some(issuer), Some(audience), Some(jwks_path)) =
            (&self.oidc_issuer, &self.oidc_audience, &self.oidc_jwks)
        else {
            return Ok(None);
        };
        let provider = chartlog_api::sso::IdentityProvider::load(chartlog_api::sso::SsoSettings {
            issuer: issuer.clone(),
            audience: audience.clone(),
            jwks_path: jwks_path.clone(),
        })?;
        tracing::info!(
            issuer = provider.issuer(),
            "single sign-on through the identity provider"
        );
        Ok(Some(Arc::new(provider)))
    }
}

/// The retention period an erasure for `retention_period_elapsed` must wait out; `serve` and
/// `erase` share it (a top-level key in the configuration file sets both).
#[derive(Args)]
pub(crate) struct RetentionArgs {
    /// Years a record is kept after its last entry, and after its patient comes of age,
    /// before it may be erased with the reason `retention_period_elapsed`. Set it to what
    /// the law of the place requires; 0 takes the requester's word for it.
    #[arg(long, env = "CHARTLOG_RETENTION_YEARS", default_value_t = RetentionPolicy::DEFAULT.years(), value_parser = clap::value_parser!(u16).range(0..=200))]
    retention_years: u16,

    /// The age of majority the retention period of a minor's record counts from.
    #[arg(long, env = "CHARTLOG_RETENTION_AGE_OF_MAJORITY", default_value_t = RetentionPolicy::DEFAULT.age_of_majority(), value_parser = clap::value_parser!(u8).range(0..=30))]
    retention_age_of_majority: u8,
}

impl RetentionArgs {
    pub(crate) fn policy(&self) -> RetentionPolicy {
        RetentionPolicy::new(self.retention_years, self.retention_age_of_majority)
    }
}

/// The access policy's tunable limits (HIPAA 164.312(a)(2)(iii) automatic logoff, and the
/// NIST SP 800-63B password lengths).
#[derive(Args)]
pub(crate) struct AccessArgs {
    /// Minutes without a request after which a session ends.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1440))]
    idle_timeout_minutes: u64,

    /// Seconds form of --idle-timeout-minutes, for tests and demonstrations; wins when given.
    #[arg(long, hide = true, value_parser = clap::value_parser!(u64).range(1..=86400))]
    idle_timeout_seconds: Option<u64>,

    /// Hours after which a session ends, active or not.
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u64).range(1..=168))]
    session_lifetime_hours: u64,

    /// Minutes a break-glass grant lasts.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(5..=1440))]
    break_glass_minutes: u64,

    /// Days without a login after which an account is disabled.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3650))]
    inactive_account_days: u64,

    /// Shortest password for accounts without a second factor.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(8..=64))]
    password_length_min: u64,

    /// Shortest password for accounts with a second factor.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(8..=64))]
    password_length_min_with_second_factor: u64,
}

impl AccessArgs {
    /// The settings the flags describe, refused (naming the flags) when they contradict each
    /// other, before anything starts.
    pub(crate) fn settings(&self) -> anyhow::Result<chartlog_access::AccessSettings> {
        let idle_timeout = match self.idle_timeout_seconds {
            Some(seconds) => Duration::from_secs(seconds),
            None => Duration::from_secs(self.idle_timeout_minutes * 60),
        };
        let settings = chartlog_access::AccessSettings {
            idle_timeout,
            absolute_lifetime: Duration::from_secs(self.session_lifetime_hours * 60 * 60),
            break_glass_duration: Duration::from_secs(self.break_glass_minutes * 60),
            inactivity_deactivation: Duration::from_secs(self.inactive_account_days * 24 * 60 * 60),
            password_length_min_password_only: self.password_length_min as usize,
            password_length_min_with_second_factor: self.password_length_min_with_second_factor
                as usize,
            ..chartlog_access::AccessSettings::default()
        };
        match settings.validate() {
            Ok(()) => Ok(settings),
            Err(error @ chartlog_access::SettingsError::IdleTimeoutLongerThanLifetime { .. }) => {
                bail!("--idle-timeout-minutes must not exceed --session-lifetime-hours: {error}")
            }
            Err(
                error @ chartlog_access::SettingsError::PasswordAloneShorterThanWithSecondFactor {
                    ..
                },
            ) => bail!(
                "--password-length-min must be at least \
                 --password-length-min-with-second-factor: {error}"
            ),
            Err(error) => bail!("invalid access settings: {error}"),
        }
    }
}

/// A database URL. Redacted in `Debug` because it can carry a password.
#[derive(Clone)]
struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The full URL, password included: for the driver only, never for logs.
    fn expose(&self) -> &str {
        &self.0
    }

    /// `postgres`, `postgresql` or `sqlite`: safe to log.
    fn scheme(&self) -> &str {
        self.expose().split(':').next().unwrap_or_default()
    }
}

impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DatabaseUrl(<redacted>)")
    }
}

impl std::str::FromStr for DatabaseUrl {
    type Err = String;

    fn from_str(raw: &str) -> Result<DatabaseUrl, String> {
        // Checked here so a typo fails at the command line, not deep inside the driver. The
        // message must not echo the value: it may hold a password.
        if !(raw.starts_with("postgres://")
            || raw.starts_with("postgresql://")
            || raw.starts_with("sqlite:"))
        {
            return Err("expected a postgres://, postgresql:// or sqlite: URL".to_owned());
        }
        // The driver takes `password` and logs any parameter it does not know with its value
        // (a warning): `sslpassword` would reach the log in clear.
        let parameters = chartlog::config_layer::password_parameters(raw);
        if let Some(name) = parameters.iter().find(|name| *name != "password") {
            // A name is printed only when it can hold nothing else (`password%3Dvalue`).
            let name = if name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                format!("{name:?} parameter")
            } else {
                "password parameter".to_owned()
            };
            return Err(format!(
                "the URL's {name} is not supported by the database driver, which would write \
                 its value to the log; leave it out"
            ));
        }
        Ok(DatabaseUrl(raw.to_owned()))
    }
}

/// The database the store should open, resolved from the flags.
#[derive(Debug)]
pub(crate) enum DatabaseLocation {
    /// The embedded default.
    SqliteFile(PathBuf),
    /// An explicit `--database-url` / `DATABASE_URL`.
    Url(DatabaseUrl),
}

impl DatabaseLocation {
    /// A description safe to log: no credentials.
    fn describe(&self) -> String {
        match self {
            DatabaseLocation::SqliteFile(path) => format!("sqlite file {}", path.display()),
            DatabaseLocation::Url(url) => format!("{} database from --database-url", url.scheme()),
        }
    }
}

impl StorageArgs {
    pub(crate) fn database_location(&self) -> DatabaseLocation {
        match &self.database_url {
            Some(url) => DatabaseLocation::Url(url.clone()),
            None => DatabaseLocation::SqliteFile(self.data_dir.join(SQLITE_FILE_NAME)),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = parse_cli(config_file::layered_args(std::env::args_os().collect())?);
    init_tracing(&cli.log)?;
    // Before anything opens a TLS connection (database drivers, the server).
    tls::install_default_crypto_provider();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(*args)),
        Command::Migrate(args) => runtime.block_on(migrate(args)),
        Command::Rebuild(args) => runtime.block_on(rebuild(args)),
        Command::Users(command) => runtime.block_on(users::run(command)),
        Command::Keys(command) => runtime.block_on(keys::run(command)),
        Command::Erase(args) => runtime.block_on(erase::run(args)),
        Command::Verify(args) => runtime.block_on(verify::run(args)),
        Command::Backup(args) => runtime.block_on(backup::backup(args)),
        Command::Restore(args) => runtime.block_on(backup::restore(args)),
        Command::Deid(command) => runtime.block_on(deid::run(command)),
        Command::Demo(args) => runtime.block_on(demo::run(args)),
    }
}

/// Flags whose values may hold a password: an error about their value never quotes it.
const SECRET_VALUED_FLAGS: [&str; 3] =
    ["--database-url", "--erasures-from", "--break-glass-webhook"];

/// What stands in an error for a value that may hold a password.
const NOT_SHOWN: &str = "<not shown: it may hold a password>";

/// The command line parsed, or clap's error printed and the process ended, as `parse_from`
/// would, except that a value that may hold a password is never printed: clap quotes the
/// value it rejects (`invalid value '...' for '--database-url'`), and stderr ends up in
/// journald and terminal scrollback.
fn parse_cli(args: Vec<std::ffi::OsString>) -> Cli {
    let error = match Cli::try_parse_from(args) {
        Ok(cli) => return cli,
        Err(error) => error,
    };
    match redacted_parse_error(&error) {
        Some(message) => {
            let mut stderr = std::io::stderr().lock();
            // Nothing better to do with a failed write to stderr than to exit anyway.
            let _ = stderr
                .write_all(message.as_bytes())
                .and_then(|()| stderr.flush());
            std::process::exit(error.exit_code());
        }
        None => error.exit(),
    }
}

/// clap's message for `error` without any value that may hold a password, or `None` when it
/// quotes none.
fn redacted_parse_error(error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |kind| match error.get(kind) {
        Some(ContextValue::String(text)) => Some(text.as_str()),
        _ => None,
    };
    let argument = text(ContextKind::InvalidArg);
    let value = text(ContextKind::InvalidValue);
    let secret_flag = argument.is_some_and(|argument| {
        SECRET_VALUED_FLAGS
            .iter()
            .any(|flag| argument.split([' ', '=']).next() == Some(flag))
    });
    if error.kind() == ErrorKind::ValueValidation && secret_flag {
        // Our own message: clap's quotes the value in more than one place.
        let argument = argument.unwrap_or("the argument");
        let reason = std::error::Error::source(error)
            .map_or_else(String::new, |source| format!(": {source}"));
        return Some(format!(
            "error: invalid value {NOT_SHOWN} for '{argument}'{reason}\n\nFor more \
             information, try '--help'.\n"
        ));
    }
    let secrets: Vec<&str> = [argument, value]
        .into_iter()
        .flatten()
        .filter(|text| chartlog::config_layer::may_hold_password(text))
        .collect();
    if secrets.is_empty() {
        return None;
    }
    let mut message = error.render().to_string();
    for secret in secrets {
        message = message.replace(secret, NOT_SHOWN);
    }
    Some(message)
}

fn init_tracing(filter: &str) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("invalid --log filter {filter:?}"))?;
    // stderr, so stdout carries only the machine-readable "listening" line.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in files or log collectors.
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .map_err(|error| anyhow::anyhow!("cannot install the tracing subscriber: {error}"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let access_settings = args.access.settings()?;
    let backup_schedule = args.backup_schedule.schedule()?;
    let development_certificate =
        !args.insecure_http && args.tls_cert.is_none() && args.tls_key.is_none();
    // Before anything is created: a typo should cost nothing.
    if development_certificate
        && !args.listen.ip().is_loopback()
        && !args.allow_development_certificate
    {
        bail!(
            "--listen {} is reachable from other machines, and no --tls-cert was given: they \
             would be served the self-signed development certificate. Give --tls-cert and \
             --tls-key, listen on a loopback address, or add --allow-development-certificate",
            args.listen
        );
    }
    let data_dir = &args.storage.data_dir;
    create_data_dir(data_dir)?;
    if let Some(schedule) = &backup_schedule {
        schedule.warn_if_inside(data_dir);
    }

    let tls_config = if args.insecure_http {
        eprintln!(
            "WARNING: --insecure-http: serving plain HTTP without TLS. Anything sent to this \
             server, including PHI and passwords, crosses the network unencrypted. Use it only \
             for local development."
        );
        None
    } else {
        let files = match (&args.tls_cert, &args.tls_key) {
            (Some(certificate_chain), Some(private_key)) => PemFiles {
                certificate_chain: certificate_chain.clone(),
                private_key: private_key.clone(),
            },
            (None, None) => {
                let files = tls::ensure_development_certificate(data_dir)
                    .context("cannot prepare the development TLS certificate")?;
                // On stderr whatever --log says, as --insecure-http's warning is.
                eprintln!(
                    "WARNING: no --tls-cert: serving a self-signed development certificate \
                     ({}). Clients must be told to trust that file, and no authority vouches \
                     for it. Use it only for local development; give --tls-cert and --tls-key \
                     in production.",
                    files.certificate_chain.display()
                );
                tracing::warn!(
                    certificate = %files.certificate_chain.display(),
                    "no --tls-cert given; serving a self-signed development certificate"
                );
                files
            }
            // clap's `requires` makes these unreachable; kept as an error, not a panic.
            _ => bail!("--tls-cert and --tls-key must be given together"),
        };
        Some(tls::server_config(&files).context("cannot load the TLS certificate")?)
    };

    let backend = open_backend(
        data_dir,
        &args.storage.database_location(),
        args.database_connections,
    )
    .await
    .context("cannot open the backend")?;
    let projection_keys = projection_keys(&data_dir.join(KEY_DIR_NAME), KeyFiles::CreateMissing)?;
    // An erasure stores the patient's tombstone, then writes the erasure ledger, then destroys
    // the key; each erasure checks the file first, but a file that cannot be written at all (a
    // read-only key mount) is found here, at start-up, not at the first erasure.
    let erasure_ledger = args.erasure_ledger.ledger(&data_dir.join(KEY_DIR_NAME));
    erasure_ledger
        .ensure_writable()
        .await
        .context("refusing to start")?;
    // Erasures this ledger has not seen (made before it was kept, or by a server with other
    // key files or another ledger) join it, so that a key backup taken from here holds them.
    match erasure_ledger::copy_from_database(&backend.database, &erasure_ledger).await {
        Ok(0) => {}
        Ok(copied) => tracing::info!(copied, "erasures copied into the erasure ledger"),
        Err(error) => {
            return Err(error.context(
                "refusing to start: the erasure ledger cannot be brought up to date with the \
                 database's erased patients",
            ));
        }
    }

    let listener = TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener
        .local_addr()
        .context("cannot read the bound address")?;

    let key_dir = data_dir.join(KEY_DIR_NAME);
    let accounts = wiring::accounts(&backend.database, &key_dir, access_settings)?;
    if let Some(path) = wiring::bootstrap_administrator(&accounts, data_dir).await? {
        // The path, never the password: logs and terminals are kept.
        eprintln!(
            "First start: the administrator account '{}' was created. Its one-time password \
             is in {} (readable only by this user); it must be changed at first login.",
            wiring::FIRST_ADMINISTRATOR,
            path.display()
        );
    }
    let inactivity_sweep = wiring::spawn_inactivity_sweep(accounts.clone());
    let (_, signing) = wiring::key_files(&key_dir)?;
    let signer = Arc::clone(signing.active());
    let log_checkpoints = wiring::spawn_log_checkpoints(backend.database.clone(), signer.clone());
    let scheme = if tls_config.is_some() {
        "https"
    } else {
        "http"
    };
    let (records, audit) = wiring::records_and_audit(
        &backend.database,
        &key_dir,
        erasure_ledger,
        args.retention.policy(),
    )?;
    let notifier = wiring::notifier(args.break_glass_webhook.as_deref())?;
    let scheduled_backups = backup_schedule.map(|schedule| {
        backup_schedule::spawn(
            schedule,
            backend.database.clone(),
            signing,
            backup_schedule::Reporting {
                audit: Arc::clone(&audit),
                notifier: Arc::clone(&notifier),
            },
        )
    });
    let config = ApiConfig {
        transport: if tls_config.is_some() {
            Transport::Tls
        } else {
            Transport::PlainHttp
        },
        readiness: Arc::clone(&backend.readiness),
        records,
        accounts,
        audit,
        notifier,
        refusal_watch: Arc::new(RefusalWatch::new(RefusalAlertSettings {
            refusals: args.refusal_alert_count,
            window: Duration::from_secs(args.refusal_alert_minutes * 60),
        })),
        read_models: wiring::read_models(&backend.database),
        public_base_url: args
            .public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://{address}")),
        rate_limiter: Arc::new(ClientRateLimiter::new(args.rate_limit())),
        identity_provider: args.identity_provider()?,
        trusted_proxies: chartlog_api::client_address::TrustedProxies::new(
            args.trusted_proxies.clone(),
        ),
    };
    if !args.trusted_proxies.is_empty() {
        let networks: Vec<String> = args
            .trusted_proxies
            .iter()
            .map(ToString::to_string)
            .collect();
        tracing::info!(
            proxies = %networks.join(", "),
            "clients behind these proxies are named by X-Forwarded-For"
        );
    }
    let server = HttpServer::new(move || chartlog_api::app(config.clone()))
        .shutdown_timeout(SHUTDOWN_TIMEOUT_SECONDS)
        // Our own handler below makes SIGINT graceful too; actix's default treats it as forced.
        .disable_signals();
    let (server, scheme) = match tls_config {
        Some(tls_config) => (
            server
                .listen_rustls_0_23(listener, tls_config)
                .with_context(|| format!("cannot serve HTTPS on {address}"))?,
            "https",
        ),
        None => (
            server
                .listen(listener)
                .with_context(|| format!("cannot serve HTTP on {address}"))?,
            "http",
        ),
    };
    // The handlers are installed here, before the listening line below: a signal that
    // arrives once a caller knows the address must find them in place, not the default
    // disposition that kills the process mid-request.
    let signals = ShutdownSignals::install();
    let server = server.run();
    tokio::spawn(stop_on_signal(signals, server.handle()));
    // The read models follow the log beside the server. Readiness stays the database's:
    // a lagging or stopped runner makes reads stale, not the server unable to take commands.
    let (stop_projections, projections_stopped) = tokio::sync::oneshot::channel();
    let projections = spawn_projection_runner(&backend.database, projection_keys, async move {
        // A dropped sender (the server future failed) stops the runner as well.
        let _ = projections_stopped.await;
    });

    // `run` has started the accept loop: connections are served from here on. Tests and
    // scripts parse this line; keep its format.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "chartlog listening on {scheme}://{address}")
        .and_then(|()| stdout.flush())
        .context("cannot write the listening address to stdout")?;
    drop(stdout);
    tracing::info!(%address, scheme, "serving");

    let served = server.await;
    inactivity_sweep.abort();
    log_checkpoints.abort();
    if let Some(scheduled_backups) = scheduled_backups {
        scheduled_backups.abort();
    }
    // The last events are vouched for before the process ends.
    if let Err(error) = wiring::checkpoint_log(&backend.database, &signer).await {
        tracing::warn!(%error, "final log checkpoint not written");
    }
    let _ = stop_projections.send(());
    // The runner commits batch by batch; waiting lets the one in flight finish cleanly.
    match tokio::time::timeout(Duration::from_secs(SHUTDOWN_TIMEOUT_SECONDS), projections).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::error!(%error, "the projection runner task failed"),
        Err(_) => tracing::warn!("the projection runner did not stop in time"),
    }
    served.context("the HTTP server failed")?;
    backend.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGINT and SIGTERM streams, or why they could not be installed.
struct ShutdownSignals(std::io::Result<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>);

impl ShutdownSignals {
    fn install() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        Self(signal(SignalKind::interrupt()).and_then(|interrupt| {
            signal(SignalKind::terminate()).map(|terminate| (interrupt, terminate))
        }))
    }
}

/// Stops the server gracefully on the first SIGINT or SIGTERM.
async fn stop_on_signal(signals: ShutdownSignals, server: actix_web::dev::ServerHandle) {
    let (mut interrupt, mut terminate) = match signals.0 {
        Ok(streams) => streams,
        Err(error) => {
            // Without handlers the default disposition still ends the process, only
            // without draining requests; worth a loud log, not a refusal to serve.
            tracing::error!(%error, "cannot install signal handlers; shutdown will not be graceful");
            return;
        }
    };
    let name = tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    };
    tracing::info!(
        signal = name,
        timeout_seconds = SHUTDOWN_TIMEOUT_SECONDS,
        "shutting down gracefully"
    );
    server.stop(true).await;
}

async fn migrate(args: StorageArgs) -> anyhow::Result<()> {
    let location = args.database_location();
    tracing::info!(database = location.describe(), "migrate");
    create_data_dir(&args.data_dir)?;
    // Opening applies every embedded migration, and refuses a database that has applied a
    // migration this binary does not know (a schema newer than the binary).
    let database = open_database(&location).await?;
    println!("database schema is up to date");
    Backend {
        readiness: Arc::new(DatabaseReadiness(database.clone())),
        database,
    }
    .close()
    .await;
    Ok(())
}

/// Creates the data directory private to the service user (0700): it will hold the database
/// and key files. An existing directory is kept, with a warning if others can read it.
pub(crate) fn create_data_dir(data_dir: &Path) -> anyhow::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let mode = fs::metadata(data_dir)
        .with_context(|| format!("cannot inspect data directory {}", data_dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(
            data_dir = %data_dir.display(),
            mode = format!("{:o}", mode & 0o777),
            "data directory is accessible to other users; expected 0700"
        );
    }
    Ok(())
}

/// What the server needs from the storage side.
struct Backend {
    readiness: Arc<dyn ReadinessProbe>,
    database: Database,
}

impl Backend {
    /// Releases the backend (closing pools, so PostgreSQL does not log connection resets).
    async fn close(self) {
        self.database.close().await;
    }
}

impl Database {
    async fn close(&self) {
        match self {
            Database::Sqlite(store, read_models) => {
                read_models.close().await;
                store.pool().close().await;
            }
            Database::Postgres(store) => store.close().await,
        }
    }

    /// The highest position in the global log (0 for an empty log).
    async fn log_head_position(&self) -> Result<u64, chartlog_store::StoreError> {
        match self {
            Database::Sqlite(store, _) => store.log_head_position().await,
            Database::Postgres(store) => store.log_head_position().await,
        }
    }
}

/// The opened, migrated event store; on SQLite, with the pool of its read-model file
/// ([`chartlog_store::sqlite::read_models_path`]).
#[derive(Clone)]
pub(crate) enum Database {
    Sqlite(SqliteEventStore, SqlitePool),
    Postgres(PostgresEventStore),
}

/// Opens (creating and migrating) the database the flags name.
pub(crate) async fn open_database(database: &DatabaseLocation) -> anyhow::Result<Database> {
    open_database_with(database, postgres::CONNECTIONS_DEFAULT).await
}

/// [`open_database`] with at most `postgres_connections` connections to PostgreSQL.
async fn open_database_with(
    database: &DatabaseLocation,
    postgres_connections: u32,
) -> anyhow::Result<Database> {
    let sqlite_path = match database {
        DatabaseLocation::SqliteFile(path) => Some(path.clone()),
        DatabaseLocation::Url(url) if url.scheme() == "sqlite" => {
            let raw = url
                .expose()
                .trim_start_matches("sqlite:")
                .trim_start_matches("//");
            Some(PathBuf::from(raw))
        }
        DatabaseLocation::Url(_) => None,
    };
    match (sqlite_path, database) {
        (Some(path), _) => {
            let (store, read_models) = chartlog_store::sqlite::open_log_and_read_models(&path)
                .await
                .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
            Ok(Database::Sqlite(store, read_models))
        }
        (None, DatabaseLocation::Url(url)) => {
            let store = PostgresEventStore::connect_with(url.expose(), postgres_connections)
                .await
                .context("cannot open the PostgreSQL database")?;
            Ok(Database::Postgres(store))
        }
        (None, DatabaseLocation::SqliteFile(_)) => unreachable!("a SQLite file always has a path"),
    }
}

async fn open_backend(
    data_dir: &Path,
    database: &DatabaseLocation,
    postgres_connections: u32,
) -> anyhow::Result<Backend> {
    tracing::info!(
        data_dir = %data_dir.display(),
        database = database.describe(),
        "opening backend"
    );
    let key_dir = data_dir.join(KEY_DIR_NAME);
    let (ring, _) = wiring::key_files(&key_dir)?;
    let database = open_database_with(database, postgres_connections).await?;
    if let Err(error) = keys::ensure_ring_fits(&database, &ring).await {
        database.close().await;
        return Err(error);
    }
    Ok(Backend {
        readiness: Arc::new(DatabaseReadiness(database.clone())),
        database,
    })
}

/// How far (in events) the slowest read model may trail the log before the server reports
/// itself not ready: reads would be minutes stale, and a load balancer should prefer a peer.
const PROJECTION_LAG_EVENTS_MAX: u64 = 10_000;

/// Ready while the database answers and the read models follow the log closely.
struct DatabaseReadiness(Database);

#[chartlog_api::async_trait]
impl ReadinessProbe for DatabaseReadiness {
    async fn check(&self) -> Result<(), NotReady> {
        let read_models = wiring::read_models(&self.0);
        let unreachable = |error: &dyn std::fmt::Display| {
            tracing::warn!(%error, "readiness: database did not answer");
            NotReady::new("database unreachable")
        };
        let head = self
            .0
            .log_head_position()
            .await
            .map_err(|error| unreachable(&error))?;
        let slowest = read_models
            .fetch_optional(
                "SELECT MIN(position) FROM chartlog_projection_checkpoints",
                Vec::new(),
            )
            .await
            .map_err(|error| unreachable(&error))?
            .and_then(|row| row.opt_i64(0).ok().flatten())
            .map_or(0, |position| u64::try_from(position).unwrap_or(0));
        let lag = head.saturating_sub(slowest);
        if lag > PROJECTION_LAG_EVENTS_MAX {
            return Err(NotReady::new(format!(
                "read models are {lag} events behind the log (limit {PROJECTION_LAG_EVENTS_MAX})"
            )));
        }
        Ok(())
    }
}

/// How often the progress bar re-reads the head of the log: events appended during a rebuild
/// move the goal.
const PROGRESS_HEAD_REFRESH: Duration = Duration::from_secs(1);

/// The rebuild's progress bar: events applied of the log's head, events/s and the time left.
const PROGRESS_TEMPLATE: &str =
    "rebuild [{elapsed_precise}] [{wide_bar}] {pos}/{len} events, {per_sec}, {eta} left";

/// Whether a command may make the key files it finds missing.
#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyFiles {
    CreateMissing,
    Existing,
}

/// The key material the projections need, from the data directory's key folder.
struct ProjectionKeys {
    ring: Arc<KeyRing>,
    verifier: Arc<SignatureVerifier>,
    projections: Vec<Arc<dyn Projection>>,
}

/// Every read model, keyed from `key_dir`: the blind-index key for the chart's look-ups and
/// the de-identification secret for the pseudonyms (both must be the server's own, or the
/// rebuilt rows would not match the ones it writes).
///
/// `serve` makes a missing KEK ring or signing key on its first start; `rebuild`
/// (`KeyFiles::Existing`) only loads them: made in a wrong `--data-dir`, they would sign its
/// audit record with a key nobody trusts. The two read-model keys are made when missing by
/// either, as the server's first start would make them: the folder holds the server's
/// signing key, so it is the server's.
fn projection_keys(key_dir: &Path, key_files: KeyFiles) -> anyhow::Result<ProjectionKeys> {
    let (ring, signing) = match key_files {
        KeyFiles::CreateMissing => wiring::key_files(key_dir)?,
        KeyFiles::Existing => wiring::existing_key_files(key_dir)?,
    };
    let index_key = load_or_create_mac_key(key_dir, INDEX_KEY_FILE_NAME)
        .with_context(|| format!("cannot load the blind-index key in {}", key_dir.display()))?;
    let deid_key = load_or_create_mac_key(key_dir, DEID_KEY_FILE_NAME).with_context(|| {
        format!(
            "cannot load the de-identification key in {}",
            key_dir.display()
        )
    })?;
    Ok(ProjectionKeys {
        ring: Arc::new(ring),
        verifier: Arc::new(signing.verifier()),
        projections: vec![
            Arc::new(ChartProjection::new(Arc::new(index_key))),
            Arc::new(HistoryProjection),
            Arc::new(AuditTrailProjection),
            Arc::new(DeidentifiedProjection::new(Pseudonymizer::new(deid_key))),
        ],
    })
}

/// Starts every projection following the log until `shutdown` completes, on the server's
/// own store and pool.
fn spawn_projection_runner(
    database: &Database,
    keys: ProjectionKeys,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    match database {
        Database::Sqlite(store, read_models) => {
            let runner = ProjectionRunner::new(
                Arc::new(store.clone()),
                Arc::new(DataKeys::new(
                    keys.ring,
                    SqliteKeyStore::new(store.pool().clone()),
                )),
                keys.verifier,
                ProjectionDb::Sqlite(read_models.clone()),
                keys.projections,
            );
            tokio::spawn(run_projections(runner, shutdown))
        }
        Database::Postgres(store) => {
            let runner = ProjectionRunner::new(
                Arc::new(store.clone()),
                Arc::new(DataKeys::new(
                    keys.ring,
                    PostgresKeyStore::new(store.pool().clone()),
                )),
                keys.verifier,
                ProjectionDb::Postgres(store.pool().clone()),
                keys.projections,
            );
            tokio::spawn(run_projections(runner, shutdown))
        }
    }
}

#[tracing::instrument(skip_all)]
async fn run_projections<S: EventStore, K: KeyStore + 'static>(
    runner: ProjectionRunner<S, K>,
    shutdown: impl Future<Output = ()> + Send,
) {
    tracing::info!(projections = ?runner.names(), "projections following the log");
    match runner.run(shutdown).await {
        Ok(()) => tracing::info!("projections stopped"),
        // Transient faults are retried inside `run`; what reaches here (a forged or
        // undecodable event) needs an operator, and the log names its position.
        Err(error) => tracing::error!(
            %error,
            "the projection runner stopped; read models no longer follow the log"
        ),
    }
}

/// The read models, by name, in the order [`projection_keys`] builds them.
const PROJECTION_NAMES: [&str; 4] = [
    chartlog_projections::chart::CHART_PROJECTION,
    chartlog_projections::history::HISTORY_PROJECTION,
    chartlog_projections::audit::AUDIT_PROJECTION_NAME,
    chartlog_projections::deid::projection::DEIDENTIFIED_PROJECTION_NAME,
];

#[tracing::instrument(skip_all)]
async fn rebuild(args: RebuildArgs) -> anyhow::Result<()> {
    let location = args.storage.database_location();
    tracing::info!(database = location.describe(), "rebuild");
    // Checked before anything is opened: a typo should cost nothing.
    if let Some(name) = &args.name
        && !PROJECTION_NAMES.contains(&name.as_str())
    {
        bail!(
            "no projection named {name:?}; known projections: {}",
            PROJECTION_NAMES.join(", ")
        );
    }
    wiring::ensure_database_exists(&location)?;
    let key_dir = args.storage.data_dir.join(KEY_DIR_NAME);
    let mut keys = projection_keys(&key_dir, KeyFiles::Existing)?;
    if let Some(name) = &args.name {
        keys.projections.retain(|p| p.name() == name);
    }
    let label = args.name.clone().unwrap_or_else(|| "all".to_owned());

    let database = wiring::open_existing_database(&location).await?;
    // Not recorded: a record sealed under this ring could not be opened with the right one.
    if let Err(error) = keys::ensure_ring_fits(&database, &keys.ring).await {
        database.close().await;
        return Err(error);
    }
    let started = Instant::now();
    let rebuilt = match &database {
        Database::Sqlite(store, read_models) => {
            let key_store = SqliteKeyStore::new(store.pool().clone());
            let log = ProjectionDb::Sqlite(store.pool().clone());
            let db = ProjectionDb::Sqlite(read_models.clone());
            rebuild_with(Arc::new(store.clone()), key_store, log, db, keys).await
        }
        Database::Postgres(store) => {
            let key_store = PostgresKeyStore::new(store.pool().clone());
            let db = ProjectionDb::Postgres(store.pool().clone());
            rebuild_with(Arc::new(store.clone()), key_store, db.clone(), db, keys).await
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    // A rebuild decrypts every patient's events, so it is on the audit trail, failed attempts
    // too. As for a backup or a de-identified export, the row is written after the work, when
    // its outcome is known; it is therefore not among the events the summary counts.
    let outcome = AuditOutcome::of(rebuilt.is_ok());
    let audited = wiring::audit_operator_action(
        &database,
        &key_dir,
        AuditEntity::ReadModels,
        AuditAction::Create,
        outcome,
    )
    .await;
    database.close().await;
    let events = rebuilt?;
    audited?;
    tracing::info!(projection = label, events, seconds, "rebuilt");
    let mut stdout = std::io::stdout().lock();
    if args.json {
        let summary = serde_json::json!({
            "projection": label,
            "events": events,
            "seconds": seconds,
        });
        writeln!(stdout, "{summary}")
    } else {
        writeln!(stdout, "rebuilt {label}: {events} events in {seconds:.1} s")
    }
    .and_then(|()| stdout.flush())
    .context("cannot write the summary to stdout")?;
    Ok(())
}

/// Rebuilds `keys.projections` over one backend with a progress bar on stderr (drawn only
/// at a terminal); returns the number of events in the log up to the position reached.
/// `log` is the database holding the events table, `read_models` the one the runner writes.
#[tracing::instrument(skip_all)]
async fn rebuild_with<S: EventStore, K: KeyStore + 'static>(
    store: Arc<S>,
    key_store: K,
    log: ProjectionDb,
    read_models: ProjectionDb,
    keys: ProjectionKeys,
) -> anyhow::Result<u64> {
    let runner = ProjectionRunner::new(
        store.clone(),
        Arc::new(DataKeys::new(keys.ring, key_store)),
        keys.verifier,
        read_models,
        keys.projections,
    );
    let head = store
        .log_head_position()
        .await
        .context("cannot read the head of the log")?;
    let bar = ProgressBar::new(head);
    bar.set_style(
        ProgressStyle::with_template(PROGRESS_TEMPLATE)
            // A constant, checked by a test; never worth failing a rebuild over.
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let progress = tokio::spawn({
        let bar = bar.clone();
        let store = store.clone();
        let mut applied = runner.applied();
        async move {
            let mut refresh = tokio::time::interval(PROGRESS_HEAD_REFRESH);
            loop {
                tokio::select! {
                    changed = applied.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let reached = *applied.borrow_and_update();
                        bar.set_position(reached);
                    }
                    _ = refresh.tick() => {
                        // A failed read only leaves the goal where it was.
                        if let Ok(head) = store.log_head_position().await {
                            bar.set_length(head.max(bar.position()));
                        }
                    }
                }
            }
        }
    });
    let rebuilt = runner.rebuild().await;
    progress.abort();
    bar.finish_and_clear();
    let reached = rebuilt.context("the rebuild failed")?;
    let row = log
        .fetch_optional(
            "SELECT COUNT(*) FROM chartlog_events WHERE position <= $1",
            vec![SqlArg::I64(i64::try_from(reached).unwrap_or(i64::MAX))],
        )
        .await
        .context("cannot count the events rebuilt")?;
    let events = match row {
        Some(row) => row.i64(0).context("cannot count the events rebuilt")?,
        None => 0,
    };
    Ok(u64::try_from(events).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_template_parses() {
        assert!(ProgressStyle::with_template(PROGRESS_TEMPLATE).is_ok());
    }

    #[test]
    fn rebuild_knows_every_projection_by_name() {
        let dir = tempfile::tempdir().expect("dir");
        let keys = projection_keys(dir.path(), KeyFiles::CreateMissing).expect("keys");
        let names: Vec<&str> = keys.projections.iter().map(|p| p.name()).collect();
        assert_eq!(names, PROJECTION_NAMES);
    }

    #[test]
    fn trusted_proxies_are_networks_or_addresses_never_everyone() {
        let parsed = |raw: &str| parse_trusted_proxy(raw).map(|network| network.to_string());
        assert_eq!(parsed("10.0.0.0/8").as_deref(), Ok("10.0.0.0/8"));
        assert_eq!(parsed(" 10.9.9.9/8").as_deref(), Ok("10.0.0.0/8"));
        assert_eq!(parsed("192.0.2.10").as_deref(), Ok("192.0.2.10/32"));
        assert_eq!(parsed("2001:db8::/48").as_deref(), Ok("2001:db8::/48"));
        assert_eq!(parsed("2001:db8::1").as_deref(), Ok("2001:db8::1/128"));
        for everyone in ["0.0.0.0/0", "::/0"] {
            let refused = parsed(everyone).expect_err(everyone);
            assert!(refused.contains("every client"), "{refused}");
        }
        for wrong in ["", "proxy.example", "10.0.0.0/33", "10.0.0.0/8/8"] {
            let refused = parsed(wrong).expect_err(wrong);
            assert!(refused.contains("not a network or an address"), "{refused}");
        }
    }
}
