//! `chartlog`: the operator's command line and the wiring of the server.
//!
//! This binary is thin: it parses flags, sets up tracing, opens the backend and hands an
//! [`ApiConfig`] to `chartlog_api::app`. Behaviour lives in the crates.
#![forbid(unsafe_code)]

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io::{IsTerminal, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actix_web::HttpServer;
use anyhow::{Context, bail};
use chartlog_api::tls::{self, PemFiles};
use chartlog_api::{ApiConfig, NotReady, ReadinessProbe, Transport};
use chartlog_store::postgres::PostgresEventStore;
use chartlog_store::sqlite::SqliteEventStore;
use clap::{Args, Parser, Subcommand};
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
const KEY_DIR_NAME: &str = "keys";

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

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTPS API.
    Serve(ServeArgs),
    /// Apply database migrations, then exit.
    Migrate(StorageArgs),
}

/// Where chartlog keeps its state.
#[derive(Args)]
struct StorageArgs {
    /// Directory for local state: the SQLite database, development TLS files, key files.
    #[arg(long, env = "CHARTLOG_DATA_DIR", default_value = "./chartlog-data")]
    data_dir: PathBuf,

    /// Database to use, e.g. `postgres://user@host/db`. Default: SQLite at
    /// `<data-dir>/chartlog.db`.
    // hide_env_values: the URL can carry a password, and --help would print it.
    #[arg(long, env = "CHARTLOG_DATABASE_URL", hide_env_values = true)]
    database_url: Option<DatabaseUrl>,
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
        if raw.starts_with("postgres://")
            || raw.starts_with("postgresql://")
            || raw.starts_with("sqlite:")
        {
            Ok(DatabaseUrl(raw.to_owned()))
        } else {
            Err("expected a postgres://, postgresql:// or sqlite: URL".to_owned())
        }
    }
}

/// The database the store should open, resolved from the flags.
#[derive(Debug)]
enum DatabaseLocation {
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
    fn database_location(&self) -> DatabaseLocation {
        match &self.database_url {
            Some(url) => DatabaseLocation::Url(url.clone()),
            None => DatabaseLocation::SqliteFile(self.data_dir.join(SQLITE_FILE_NAME)),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(&cli.log)?;
    // Before anything opens a TLS connection (database drivers, the server).
    tls::install_default_crypto_provider();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
        Command::Migrate(args) => runtime.block_on(migrate(args)),
    }
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
    let data_dir = &args.storage.data_dir;
    create_data_dir(data_dir)?;

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

    let backend = open_backend(data_dir, &args.storage.database_location())
        .await
        .context("cannot open the backend")?;

    let listener = TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener
        .local_addr()
        .context("cannot read the bound address")?;

    let config = ApiConfig {
        transport: if tls_config.is_some() {
            Transport::Tls
        } else {
            Transport::PlainHttp
        },
        readiness: Arc::clone(&backend.readiness),
    };
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
    let server = server.run();
    tokio::spawn(stop_on_signal(server.handle()));

    // `run` has started the accept loop: connections are served from here on. Tests and
    // scripts parse this line; keep its format.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "chartlog listening on {scheme}://{address}")
        .and_then(|()| stdout.flush())
        .context("cannot write the listening address to stdout")?;
    drop(stdout);
    tracing::info!(%address, scheme, "serving");

    server.await.context("the HTTP server failed")?;
    backend.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Stops the server gracefully on the first SIGINT or SIGTERM.
async fn stop_on_signal(server: actix_web::dev::ServerHandle) {
    use tokio::signal::unix::{SignalKind, signal};

    let (mut interrupt, mut terminate) = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(interrupt), Ok(terminate)) => (interrupt, terminate),
        (Err(error), _) | (_, Err(error)) => {
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
fn create_data_dir(data_dir: &Path) -> anyhow::Result<()> {
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
        match self.database {
            Database::Sqlite(store) => store.pool().close().await,
            Database::Postgres(store) => store.close().await,
        }
    }
}

/// The opened, migrated event store.
#[derive(Clone)]
enum Database {
    Sqlite(SqliteEventStore),
    Postgres(PostgresEventStore),
}

/// Opens (creating and migrating) the database the flags name.
async fn open_database(database: &DatabaseLocation) -> anyhow::Result<Database> {
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
            let store = SqliteEventStore::open(&path)
                .await
                .with_context(|| format!("cannot open the SQLite database {}", path.display()))?;
            Ok(Database::Sqlite(store))
        }
        (None, DatabaseLocation::Url(url)) => {
            let store = PostgresEventStore::connect(url.expose())
                .await
                .context("cannot open the PostgreSQL database")?;
            Ok(Database::Postgres(store))
        }
        (None, DatabaseLocation::SqliteFile(_)) => unreachable!("a SQLite file always has a path"),
    }
}

async fn open_backend(data_dir: &Path, database: &DatabaseLocation) -> anyhow::Result<Backend> {
    tracing::info!(
        data_dir = %data_dir.display(),
        database = database.describe(),
        "opening backend"
    );
    let key_dir = data_dir.join(KEY_DIR_NAME);
    chartlog_crypto::load_or_create_key_files(&key_dir).with_context(|| {
        format!(
            "cannot load or create the key files in {}",
            key_dir.display()
        )
    })?;
    let database = open_database(database).await?;
    Ok(Backend {
        readiness: Arc::new(DatabaseReadiness(database.clone())),
        database,
    })
}

/// Ready while the database answers a trivial query.
struct DatabaseReadiness(Database);

#[chartlog_api::async_trait]
impl ReadinessProbe for DatabaseReadiness {
    async fn check(&self) -> Result<(), NotReady> {
        let answered = match &self.0 {
            Database::Sqlite(store) => sqlx::query("SELECT 1")
                .execute(store.pool())
                .await
                .map(drop),
            Database::Postgres(store) => sqlx::query("SELECT 1")
                .execute(store.pool())
                .await
                .map(drop),
        };
        answered.map_err(|error| {
            tracing::warn!(%error, "readiness: database did not answer");
            NotReady::new("database unreachable")
        })
    }
}
