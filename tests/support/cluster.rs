//! A PostgreSQL cluster of a test's own, in a temporary directory, on a free port.
//!
//! The crash tests stop PostgreSQL with an immediate shutdown (the database's equivalent of a
//! power cut: no checkpoint, crash recovery from the WAL at the next start). Doing that to the
//! shared server at `DATABASE_URL` would break every other test running against it, so they
//! run this private cluster instead.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Where the PostgreSQL server binaries are looked for when `CHARTLOG_PG_BIN` is not set.
const PG_LIB: &str = "/usr/lib/postgresql";

/// A running private cluster. Stopped (fast) and deleted on drop.
pub struct PrivatePostgres {
    root: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// initdb refuses to run as root, so as root every PostgreSQL command runs as the
    /// `postgres` OS user.
    as_postgres_user: bool,
}

impl PrivatePostgres {
    /// initdb (trust authentication, socket in the temp dir), start, and create `chartlog`.
    pub fn start() -> PrivatePostgres {
        let bin = server_binaries();
        let root = tempfile::tempdir().expect("temporary directory for the cluster");
        let as_postgres_user = running_as_root();
        if as_postgres_user {
            run_checked(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(root.path()),
                "chown the cluster directory to the postgres user",
            );
        }
        let cluster = PrivatePostgres {
            root,
            bin,
            port: free_port(),
            as_postgres_user,
        };
        cluster.run_pg(
            "initdb",
            &[
                "-D",
                path_str(&cluster.data_dir()),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
                // initdb's own fsyncs only slow the test; the crash cycles exercise the
                // server's WAL, which keeps fsync on.
                "--no-sync",
            ],
        );
        cluster.start_server();
        cluster.psql("CREATE DATABASE chartlog");
        cluster
    }

    /// A URL for database `chartlog` over TCP on loopback.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/chartlog", self.port)
    }

    /// Starts the server (after `initdb`, or after a stop: crash recovery runs here).
    pub fn start_server(&self) {
        // After a crash PostgreSQL fsyncs every file of the data directory before recovery;
        // syncfs does the same in one call per file system (4 s become under 1 s here).
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c shared_buffers=32MB \
             -c max_connections=200 -c recovery_init_sync_method=syncfs",
            self.port,
            path_str(self.root.path()),
        );
        self.run_pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data_dir()),
                "-l",
                path_str(&self.root.path().join("postgres.log")),
                "-o",
                &options,
                "-w",
                "-t",
                "120",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m immediate`: every backend is killed without a checkpoint, as in a
    /// crash; the next start replays the WAL.
    pub fn stop_immediately(&self) {
        self.run_pg(
            "pg_ctl",
            &[
                "-D",
                path_str(&self.data_dir()),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
    }

    /// The server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("postgres.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn psql(&self, sql: &str) {
        let socket_dir = path_str(self.root.path()).to_owned();
        let port = self.port.to_string();
        self.run_pg(
            "psql",
            &[
                "-h",
                &socket_dir,
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        );
    }

    fn command(&self, program: &str) -> Command {
        // psql is not in the server's bin directory on every layout; the server binaries are.
        let path = match self.bin.join(program) {
            candidate if candidate.exists() => candidate,
            _ => PathBuf::from(program),
        };
        if self.as_postgres_user {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command
        } else {
            Command::new(path)
        }
    }

    fn run_pg(&self, program: &str, args: &[&str]) -> Output {
        let mut command = self.command(program);
        command.args(args);
        // The cluster's commands run in its own directory: the postgres user may not be able to
        // enter the test's working directory.
        command.current_dir(self.root.path());
        let output = command
            .output()
            .unwrap_or_else(|error| panic!("run {program}: {error}"));
        assert!(
            output.status.success(),
            "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}\nserver log:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log(),
        );
        output
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Stopped already (a test that panicked mid-cycle) is fine: nothing to do then.
        let _ = self
            .command("pg_ctl")
            .args(["-D", path_str(&self.data_dir()), "-m", "fast", "-w", "stop"])
            .current_dir(self.root.path())
            .output();
    }
}

/// The newest `/usr/lib/postgresql/<version>/bin` with `initdb`, or `CHARTLOG_PG_BIN`.
fn server_binaries() -> PathBuf {
    if let Ok(bin) = std::env::var("CHARTLOG_PG_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.join("initdb").is_file(),
            "CHARTLOG_PG_BIN={} holds no initdb",
            bin.display()
        );
        return bin;
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(PG_LIB)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "the crash tests need the PostgreSQL server binaries (initdb, pg_ctl) to run a \
             private cluster they can stop with an immediate shutdown; none found under \
             {PG_LIB}/<version>/bin. Install PostgreSQL (apt-get install postgresql) or set \
             CHARTLOG_PG_BIN to the directory holding initdb."
        ),
    }
}

fn running_as_root() -> bool {
    let output = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// A port nothing listens on right now. Another process could take it before PostgreSQL
/// binds it; then pg_ctl fails loudly rather than the test going wrong quietly.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn run_checked(command: &mut Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("{what}: {error}"));
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}
