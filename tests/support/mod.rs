//! Runs the real `chartlog` binary as a child process and talks to it over the network only.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// How long the server may take to print its listening line. Generous: a debug build on a
/// shared two-core machine, generating a key on first start.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long any one HTTP request, or a wait for output or exit, may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

const LISTENING_PREFIX: &str = "chartlog listening on ";

/// A running `chartlog serve`. Killed on drop, so a failing test leaves no server behind.
pub struct Server {
    child: Child,
    base_url: String,
    stderr: Arc<Mutex<String>>,
    // Read only by the tests that scan the server's output.
    #[allow(dead_code)]
    stdout: Arc<Mutex<String>>,
}

impl Server {
    /// Starts `chartlog serve --data-dir <data_dir> --listen 127.0.0.1:0 <extra_args>` and
    /// waits for the line announcing the bound address.
    pub fn start(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::start_with_log(data_dir, "info", extra_args)
    }

    /// [`Server::start`] with another `--log` filter (e.g. `trace`): clap refuses a second
    /// `--log` in `extra_args`.
    pub fn start_with_log(data_dir: &Path, log: &str, extra_args: &[&str]) -> Server {
        Server::start_with_env(data_dir, log, &[], extra_args)
    }

    /// [`Server::start_with_log`] with environment variables set for the server alone.
    pub fn start_with_env(
        data_dir: &Path,
        log: &str,
        env: &[(&str, &str)],
        extra_args: &[&str],
    ) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chartlog"))
            .arg("serve")
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", "127.0.0.1:0", "--log", log])
            .args(extra_args)
            // The tests choose the database; never inherit the developer's.
            .env_remove("CHARTLOG_DATABASE_URL")
            .env_remove("CHARTLOG_DATA_DIR")
            .env_remove("CHARTLOG_KEK")
            .env_remove("CHARTLOG_LOG")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the chartlog binary");

        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let stderr = collect(stderr);
        let (line_sender, line_receiver) = mpsc::channel();
        let stdout_lines = Arc::new(Mutex::new(String::new()));
        let stdout_sink = Arc::clone(&stdout_lines);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                {
                    let mut sink = stdout_sink.lock().expect("stdout buffer");
                    sink.push_str(&line);
                    sink.push('\n');
                }
                // Receiver gone means the test stopped listening; keep draining anyway.
                let _ = line_sender.send(line);
            }
        });

        let mut server = Server {
            child,
            base_url: String::new(),
            stderr,
            stdout: stdout_lines,
        };
        let line = match line_receiver.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(error) => panic!(
                "no listening line within {STARTUP_TIMEOUT:?} ({error}); stderr:\n{}",
                server.stderr()
            ),
        };
        let base_url = line
            .strip_prefix(LISTENING_PREFIX)
            .unwrap_or_else(|| panic!("unexpected first stdout line {line:?}"));
        server.base_url = base_url.to_owned();
        server
    }

    /// The server process's id, for reading its CPU time from /proc.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `https://127.0.0.1:PORT` (or `http://` with `--insecure-http`), as printed.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr buffer").clone()
    }

    /// Everything the server wrote to stdout so far, the listening line included.
    #[allow(dead_code)]
    pub fn stdout(&self) -> String {
        self.stdout.lock().expect("stdout buffer").clone()
    }

    /// Waits, bounded, until stderr contains `needle`.
    pub fn wait_for_stderr(&self, needle: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let stderr = self.stderr();
            if stderr.contains(needle) {
                return stderr;
            }
            assert!(
                Instant::now() < deadline,
                "stderr never contained {needle:?}:\n{stderr}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. `TERM`) and waits, bounded, for the process to exit.
    pub fn signal_and_wait(&mut self, signal: &str) -> ExitStatus {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit within {STEP_TIMEOUT:?} of SIG{signal}; stderr:\n{}",
                self.stderr()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Already exited (after signal_and_wait) is fine; kill then reaps nothing.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads `stream` to its end on a thread, into a shared buffer.
fn collect(mut stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buffer = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&buffer);
    thread::spawn(move || {
        let mut chunk = [0_u8; 4096];
        loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(read) => sink
                    .lock()
                    .expect("stderr buffer")
                    .push_str(&String::from_utf8_lossy(&chunk[..read])),
            }
        }
    });
    buffer
}

/// A fresh directory for one test; the server creates `data` inside it.
pub struct TestDir {
    _root: tempfile::TempDir,
    data_dir: PathBuf,
}

impl TestDir {
    pub fn new() -> TestDir {
        let root = tempfile::tempdir().expect("temporary directory");
        let data_dir = root.path().join("data");
        TestDir {
            _root: root,
            data_dir,
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn certificate_path(&self) -> PathBuf {
        self.data_dir.join("tls").join("dev-cert.pem")
    }

    pub fn key_path(&self) -> PathBuf {
        self.data_dir.join("tls").join("dev-key.pem")
    }
}

/// A strong passphrase per user: long, not common, not containing the user name. The
/// "quartz lantern" prefix lets the scans find a password wherever it lands.
pub fn passphrase(user: &str) -> String {
    let salt: u64 = user.bytes().map(u64::from).sum();
    format!("quartz lantern meadow {}", salt * 7919 + user.len() as u64)
}

/// The TOTP code for now plus `offset_seconds` (steps of 30 s).
pub fn totp(secret_base32: &str, offset_seconds: u64) -> String {
    let secret = totp_rs::Secret::try_from_base32(secret_base32).expect("base32 secret");
    let totp = totp_rs::Builder::new()
        .with_algorithm(totp_rs::Algorithm::SHA1)
        .with_digits(6)
        .with_step_duration(30)
        .with_secret(secret)
        .build()
        .expect("totp");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    totp.generate(now + offset_seconds).to_string()
}

/// An HTTPS client that trusts exactly the development certificate in `certificate_pem`:
/// verification stays on, and no built-in roots are consulted.
pub fn https_client(certificate_pem: &[u8]) -> reqwest::Client {
    let certificate =
        reqwest::Certificate::from_pem(certificate_pem).expect("development certificate is PEM");
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(certificate)
        .https_only(true)
        .timeout(STEP_TIMEOUT)
        .build()
        .expect("build the HTTPS client")
}

/// A plain HTTP client, for `--insecure-http`.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(STEP_TIMEOUT)
        .build()
        .expect("build the HTTP client")
}
