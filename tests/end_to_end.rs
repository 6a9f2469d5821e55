//! End-to-end tests of the `chartlog` binary: each test starts the real server on a free
//! port in a fresh data directory and talks to it over HTTPS (or HTTP) only.

// Shared with the other binary tests; this one uses part of it.
#[allow(dead_code)]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::{Server, TestDir, http_client, https_client};

const SECURITY_HEADERS: [(&str, &str); 5] = [
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    (
        "content-security-policy",
        "default-src 'none'; frame-ancestors 'none'",
    ),
    ("cache-control", "no-store"),
    ("referrer-policy", "no-referrer"),
];

fn assert_security_headers(response: &reqwest::Response) {
    for (name, expected) in SECURITY_HEADERS {
        let value = response
            .headers()
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(value.to_str().expect("ASCII header"), expected, "{name}");
    }
}

fn hsts(response: &reqwest::Response) -> Option<&str> {
    response
        .headers()
        .get("strict-transport-security")
        .map(|value| value.to_str().expect("ASCII header"))
}

fn mode(path: &std::path::Path) -> u32 {
    fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn healthz_answers_over_https_with_security_headers() {
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &[]);
    assert!(
        server.base_url().starts_with("https://127.0.0.1:"),
        "{}",
        server.base_url()
    );
    let client = https_client(&fs::read(dir.certificate_path()).expect("certificate"));

    let response = client
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), StatusCode::OK);
    assert_security_headers(&response);
    assert_eq!(hsts(&response), Some("max-age=63072000; includeSubDomains"));
    let body: Value = response.json().await.expect("JSON body");
    assert_eq!(body, json!({"status": "ok"}));

    let response = client
        .get(server.url("/readyz"))
        .send()
        .await
        .expect("readyz");
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.expect("JSON body");
    assert_eq!(body, json!({"status": "ready"}));
}

#[tokio::test]
async fn unknown_routes_get_a_json_404_in_the_error_shape() {
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &[]);
    let client = https_client(&fs::read(dir.certificate_path()).expect("certificate"));

    let response = client
        .get(server.url("/patients/does-not-exist"))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_security_headers(&response);
    let content_type = response
        .headers()
        .get("content-type")
        .expect("content type")
        .to_str()
        .expect("ASCII header")
        .to_owned();
    assert_eq!(content_type, "application/json");
    let body: Value = response.json().await.expect("JSON body");
    assert_eq!(body["error"], "not_found");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|message| !message.is_empty())
    );
    assert_eq!(body.as_object().map(|fields| fields.len()), Some(2));
}

#[tokio::test]
async fn the_data_dir_and_development_key_are_private() {
    let dir = TestDir::new();
    let _server = Server::start(dir.data_dir(), &[]);

    assert_eq!(mode(dir.data_dir()), 0o700);
    assert_eq!(mode(&dir.key_path()), 0o600);
    let certificate = fs::read_to_string(dir.certificate_path()).expect("certificate");
    assert!(certificate.starts_with("-----BEGIN CERTIFICATE-----"));
    let key = fs::read_to_string(dir.key_path()).expect("key");
    assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
}

#[tokio::test]
async fn insecure_http_serves_plain_http_and_warns() {
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &["--insecure-http"]);
    assert!(
        server.base_url().starts_with("http://127.0.0.1:"),
        "{}",
        server.base_url()
    );
    server.wait_for_stderr("WARNING: --insecure-http");

    let response = http_client()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz over HTTP");
    assert_eq!(response.status(), StatusCode::OK);
    assert_security_headers(&response);
    assert_eq!(hsts(&response), None, "HSTS is meaningless over plain HTTP");
    // No development certificate is needed, so none is made.
    assert!(!dir.certificate_path().exists());
}

#[tokio::test]
async fn a_second_start_reuses_the_development_certificate() {
    let dir = TestDir::new();
    let first = Server::start(dir.data_dir(), &[]);
    let certificate = fs::read(dir.certificate_path()).expect("certificate");
    let key = fs::read(dir.key_path()).expect("key");
    drop(first);

    let second = Server::start(dir.data_dir(), &[]);
    assert_eq!(
        fs::read(dir.certificate_path()).expect("certificate"),
        certificate
    );
    assert_eq!(fs::read(dir.key_path()).expect("key"), key);
    // Clients that trusted the first start's certificate still connect.
    let response = https_client(&certificate)
        .get(second.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn sigterm_and_sigint_stop_the_server_cleanly() {
    for signal in ["TERM", "INT"] {
        let dir = TestDir::new();
        let mut server = Server::start(dir.data_dir(), &[]);
        let status = server.signal_and_wait(signal);
        assert!(status.success(), "SIG{signal}: {status}");
        server.wait_for_stderr("shutting down gracefully");
        // The projection runner stops with the server, not killed half-way.
        server.wait_for_stderr("projections stopped");
    }
}

#[test]
fn a_tls_certificate_without_its_key_is_refused() {
    let dir = TestDir::new();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.data_dir())
        .args(["--listen", "127.0.0.1:0", "--tls-cert", "cert.pem"])
        .output()
        .expect("run chartlog");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--tls-key"), "{stderr}");
    assert!(output.stdout.is_empty(), "nothing may claim to listen");
}

/// Bug this catches: an idle timeout longer than the session lifetime reaching the access
/// settings' assertion, a panic instead of an error naming the flags.
#[test]
fn an_idle_timeout_longer_than_the_session_lifetime_is_refused() {
    let dir = TestDir::new();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.data_dir())
        .args(["--listen", "127.0.0.1:0", "--insecure-http"])
        .args([
            "--idle-timeout-minutes",
            "1440",
            "--session-lifetime-hours",
            "12",
        ])
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run chartlog");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        output.status.code(),
        Some(1),
        "an error exit, not a panic: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.contains("--idle-timeout-minutes") && stderr.contains("--session-lifetime-hours"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty(), "nothing may claim to listen");
    assert!(
        !dir.data_dir().exists(),
        "refused before anything is created"
    );
}

fn run_migrate(data_dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .arg("migrate")
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("CHARTLOG_DATABASE_URL")
        .output()
        .expect("run chartlog")
}

#[test]
fn migrate_creates_the_embedded_database_and_is_idempotent() {
    let dir = TestDir::new();
    for run in ["first", "second"] {
        let output = run_migrate(dir.data_dir(), &[]);
        assert!(output.status.success(), "{run} run: {output:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "database schema is up to date\n",
            "{run} run"
        );
    }
    assert!(dir.data_dir().join("chartlog.db").is_file());
    assert_eq!(mode(dir.data_dir()), 0o700);
}

#[test]
fn migrate_refuses_an_unreachable_database_with_a_clear_error() {
    let dir = TestDir::new();
    // Port 1 on loopback: nothing listens there.
    let output = run_migrate(
        dir.data_dir(),
        &[
            "--database-url",
            "postgres://chartlog:secret-password@127.0.0.1:1/chartlog",
        ],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot open the PostgreSQL database"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("secret-password"),
        "the URL's password never prints: {stderr}"
    );
}

#[tokio::test]
async fn serve_creates_private_key_files_and_the_database() {
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &[]);
    let client = https_client(&fs::read(dir.certificate_path()).expect("certificate"));
    let ready = client
        .get(format!("{}/readyz", server.base_url()))
        .send()
        .await
        .expect("readyz");
    assert_eq!(
        ready.status(),
        StatusCode::OK,
        "ready once the database answers"
    );
    let keys = dir.data_dir().join("keys");
    assert_eq!(mode(&keys), 0o700);
    for file in [
        "kek.json",
        "signing.json",
        "index-key.json",
        "deid-key.json",
    ] {
        assert_eq!(mode(&keys.join(file)), 0o600, "{file}");
    }
    assert!(dir.data_dir().join("chartlog.db").is_file());
    // The read models follow the log inside the server.
    server.wait_for_stderr("projections following the log");
}

fn run_chartlog(command: &str, data_dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .arg(command)
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR")
        .env_remove("CHARTLOG_KEK")
        .output()
        .expect("run chartlog")
}

#[test]
fn rebuild_runs_every_projection_on_an_empty_log() {
    let dir = TestDir::new();
    let output = run_migrate(dir.data_dir(), &[]);
    assert!(output.status.success(), "migrate: {output:?}");
    // The KEK ring and signing key the server's first start makes: rebuild makes neither.
    chartlog_crypto::load_or_create_key_files(&dir.data_dir().join("keys")).expect("key files");

    let output = run_chartlog("rebuild", dir.data_dir(), &["--json"]);
    assert!(output.status.success(), "rebuild: {output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.lines().count(), 1, "one summary line: {stdout}");
    let summary: Value = serde_json::from_str(&stdout).expect("a JSON summary");
    assert_eq!(summary["projection"], "all");
    assert_eq!(summary["events"], 0);
    assert!(
        summary["seconds"].as_f64().is_some_and(|s| s >= 0.0),
        "{summary}"
    );

    // The summary counts the events of the log the rebuild went through. Each rebuild records
    // itself on an audit stream after its work: the first one's record is not among the events
    // it counted, and is the one event the second goes through.
    let output = run_chartlog("rebuild", dir.data_dir(), &["deidentified"]);
    assert!(output.status.success(), "rebuild one: {output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).starts_with("rebuilt deidentified: 1 events"),
        "{output:?}"
    );
    let keys = dir.data_dir().join("keys");
    for file in ["index-key.json", "deid-key.json"] {
        assert_eq!(mode(&keys.join(file)), 0o600, "{file}");
    }
}

#[test]
fn rebuild_refuses_an_unknown_projection_by_name() {
    let dir = TestDir::new();
    let output = run_chartlog("rebuild", dir.data_dir(), &["no-such-projection"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-such-projection"), "{stderr}");
    assert!(
        stderr.contains("chart, history, audit_trail, deidentified"),
        "{stderr}"
    );
    assert!(output.stdout.is_empty());
}

fn run_users(subcommand: &str, data_dir: &std::path::Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .args(["users", subcommand, "--data-dir"])
        .arg(data_dir)
        .args(extra)
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR")
        .env_remove("CHARTLOG_KEK")
        .output()
        .expect("run chartlog users")
}

#[tokio::test]
async fn users_are_added_listed_reset_and_disabled_from_the_command_line() {
    let dir = TestDir::new();
    // The store and the key files the server's first start makes: the account commands work
    // on an existing store, and create neither.
    assert!(run_migrate(dir.data_dir(), &[]).status.success());
    chartlog_crypto::load_or_create_key_files(&dir.data_dir().join("keys")).expect("key files");
    let added = run_users(
        "add",
        dir.data_dir(),
        &["--username", "dr.cli", "--role", "physician"],
    );
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let stdout = String::from_utf8_lossy(&added.stdout);
    let user_id = stdout
        .lines()
        .find_map(|line| line.strip_prefix("user_id: "))
        .expect("the new user's id")
        .to_owned();
    let first = stdout
        .lines()
        .find_map(|line| line.strip_prefix("one-time password: "))
        .expect("a one-time password")
        .to_owned();

    let listed = run_users("list", dir.data_dir(), &[]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(
        listing.contains(&format!("{user_id}\tdr.cli\tphysician\tactive\tpassword")),
        "{listing}"
    );
    assert!(!listing.contains(&first), "no secret is listed");

    // Linked to the identity provider, and back.
    let linked = run_users(
        "link-sso",
        dir.data_dir(),
        &[&user_id, "--subject", "00u-dr-cli"],
    );
    assert!(
        linked.status.success(),
        "{}",
        String::from_utf8_lossy(&linked.stderr)
    );
    let listing =
        String::from_utf8_lossy(&run_users("list", dir.data_dir(), &[]).stdout).into_owned();
    assert!(listing.contains("\tidentity provider"), "{listing}");
    let refused = run_users("link-sso", dir.data_dir(), &[&user_id]);
    assert!(!refused.status.success(), "a subject or --unlink is needed");
    let unlinked = run_users("link-sso", dir.data_dir(), &[&user_id, "--unlink"]);
    assert!(unlinked.status.success());
    assert!(String::from_utf8_lossy(&unlinked.stdout).contains("chartlog password"));
    // Or linked from the start; a subject already linked creates nothing.
    let sso_user = ["--role", "nurse", "--sso-subject", "00u-rn-cli"];
    let added_linked = run_users(
        "add",
        dir.data_dir(),
        &[&["--username", "rn.cli"][..], &sso_user[..]].concat(),
    );
    assert!(
        added_linked.status.success(),
        "{}",
        String::from_utf8_lossy(&added_linked.stderr)
    );
    let linked_id = String::from_utf8_lossy(&added_linked.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("user_id: "))
        .expect("the linked user's id")
        .replace('-', "");
    let taken = run_users(
        "add",
        dir.data_dir(),
        &[&["--username", "rn.cli2"][..], &sso_user[..]].concat(),
    );
    assert!(!taken.status.success());
    let listing =
        String::from_utf8_lossy(&run_users("list", dir.data_dir(), &[]).stdout).into_owned();
    assert!(
        listing.contains("\trn.cli\tnurse\tactive\tidentity provider"),
        "{listing}"
    );
    assert!(!listing.contains("rn.cli2"), "{listing}");

    let reset = run_users("reset-password", dir.data_dir(), &[&user_id]);
    assert!(reset.status.success());
    let second = String::from_utf8_lossy(&reset.stdout);
    assert!(second.starts_with("one-time password: "));
    assert!(!second.contains(&first), "a new password each time");

    let disabled = run_users("disable", dir.data_dir(), &[&user_id]);
    assert!(disabled.status.success());
    let listing =
        String::from_utf8_lossy(&run_users("list", dir.data_dir(), &[]).stdout).into_owned();
    assert!(listing.contains("\tdisabled"), "{listing}");

    // Bad input: a clear error, a non-zero exit, nothing created.
    let refused = run_users(
        "add",
        dir.data_dir(),
        &["--username", "dr.cli", "--role", "surgeon"],
    );
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("--role"),
        "the error names the flag"
    );
    let refused = run_users(
        "add",
        dir.data_dir(),
        &["--username", "dr.cli", "--role", "nurse"],
    );
    assert!(!refused.status.success(), "the name is taken");
    let refused = run_users("disable", dir.data_dir(), &["not-a-uuid"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid user id"));

    // Every command that reached the accounts is on the audit trail, with the account it
    // touched and how it went; input refused before that (a bad role, a malformed id) is not.
    let rebuilt = run_chartlog("rebuild", dir.data_dir(), &["audit_trail"]);
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    let read_models = sqlx::SqlitePool::connect(&format!(
        "sqlite:{}",
        dir.data_dir().join("chartlog.read-models.db").display()
    ))
    .await
    .expect("open the read models");
    let rows: Vec<(String, String, Option<String>, String)> = sqlx::query_as(
        "SELECT action, outcome, nullif(lower(hex(record_id)), ''), role \
         FROM chartlog_audit_trail WHERE entity = 'user' ORDER BY occurred_at_us, audit_id",
    )
    .fetch_all(&read_models)
    .await
    .expect("the account audit rows");
    let account = Some(user_id.replace('-', ""));
    let row = |action: &str, outcome: &str, record: Option<String>| {
        (
            action.to_owned(),
            outcome.to_owned(),
            record,
            "system".to_owned(),
        )
    };
    assert_eq!(
        rows,
        vec![
            row("create", "success", account.clone()),
            row("read", "success", None),
            row("update", "success", account.clone()),
            row("read", "success", None),
            row("update", "success", account.clone()),
            row("create", "success", Some(linked_id)),
            row("create", "failure", None),
            row("read", "success", None),
            row("update", "success", account.clone()),
            row("update", "success", account.clone()),
            row("read", "success", None),
            row("create", "failure", None),
        ]
    );
}

#[tokio::test]
async fn migrate_refuses_a_database_whose_schema_is_newer_than_the_binary() {
    let dir = TestDir::new();
    assert!(run_migrate(dir.data_dir(), &[]).status.success());
    // A newer chartlog applied a migration this binary does not know.
    let database = dir.data_dir().join("chartlog.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", database.display()))
        .await
        .expect("open the database");
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer chartlog', 1, X'00', 0)",
    )
    .execute(&pool)
    .await
    .expect("record a newer migration");
    pool.close().await;

    let output = run_migrate(dir.data_dir(), &[]);
    assert!(!output.status.success(), "a newer schema must be refused");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("9999"),
        "the error names the unknown migration: {stderr}"
    );
}

#[tokio::test]
async fn serve_reads_settings_from_a_configuration_file() {
    let dir = TestDir::new();
    std::fs::create_dir_all(dir.data_dir()).expect("data dir");
    let config = dir.data_dir().join("chartlog.toml");
    std::fs::write(
        &config,
        "[serve]\ninsecure-http = true\nidle-timeout-minutes = 5\n",
    )
    .expect("write the configuration");
    let config = config.to_str().expect("utf-8 path");
    let server = Server::start(dir.data_dir(), &["--config", config]);
    assert!(
        server.base_url().starts_with("http://"),
        "the file's insecure-http applies: {}",
        server.base_url()
    );
    let response = http_client()
        .get(server.url("/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(response.status(), reqwest::StatusCode::OK);

    // A secret in the file is refused before anything starts.
    let secret = dir.data_dir().join("secret.toml");
    std::fs::write(
        &secret,
        "[serve]\nbreak-glass-webhook = \"https://hooks.example/TOKEN\"\n",
    )
    .expect("write");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .args(["serve", "--data-dir"])
        .arg(dir.data_dir())
        .arg("--config")
        .arg(&secret)
        .output()
        .expect("run chartlog");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("CHARTLOG_BREAK_GLASS_WEBHOOK"), "{stderr}");
    assert!(
        !stderr.contains("TOKEN"),
        "the secret is not echoed: {stderr}"
    );
}

#[tokio::test]
async fn a_stopping_server_signs_a_checkpoint_that_verify_agrees_with() {
    let dir = TestDir::new();
    let mut server = Server::start(dir.data_dir(), &["--insecure-http"]);
    // A failed login is an audit event: the log is no longer empty.
    let response = http_client()
        .post(server.url("/auth/login"))
        .json(&serde_json::json!({ "username": "nobody", "password": "not a password at all" }))
        .send()
        .await
        .expect("login");
    assert_eq!(response.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(server.signal_and_wait("TERM").success());

    let output = std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"))
        .args(["verify", "--json", "--data-dir"])
        .arg(dir.data_dir())
        .output()
        .expect("run verify");
    assert!(output.status.success(), "{output:?}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("one JSON report");
    assert_eq!(report["intact"], true, "{report}");
    assert!(
        report["checkpoints"].as_u64().is_some_and(|n| n >= 1),
        "the shutdown signed a checkpoint: {report}"
    );
}

// ---- The configuration file, secrets on the command line, the development certificate ----

/// `chartlog <args>` run in `cwd`, with none of the developer's chartlog settings inherited.
fn chartlog_in(cwd: &std::path::Path, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_chartlog"));
    command
        .args(args)
        .current_dir(cwd)
        .env_remove("CHARTLOG_CONFIG")
        .env_remove("CHARTLOG_DATABASE_URL")
        .env_remove("CHARTLOG_DATA_DIR")
        .env_remove("CHARTLOG_ERASURES_FROM")
        .env_remove("CHARTLOG_KEK")
        .env_remove("CHARTLOG_LOG")
        .env("RUST_BACKTRACE", "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// Runs `command` to its exit. One still running after the startup timeout is killed and
/// fails the test: a command that should have refused to start is serving instead.
fn run_bounded(mut command: std::process::Command) -> std::process::Output {
    let mut child = command.spawn().expect("run chartlog");
    let deadline = std::time::Instant::now() + support::STARTUP_TIMEOUT;
    while child.try_wait().expect("poll chartlog").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let output = child.wait_with_output().expect("chartlog's output");
            panic!(
                "chartlog still running after {:?}; stdout:\n{}\nstderr:\n{}",
                support::STARTUP_TIMEOUT,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("chartlog's output")
}

fn utf8(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_configuration_file_reaches_the_subcommands_of_users() {
    let dir = TestDir::new();
    let root = dir.data_dir().parent().expect("the test directory");
    let data_dir = dir.data_dir().to_str().expect("utf-8 path");
    // What the server's first start makes: the account commands create neither.
    let migrated = run_bounded(chartlog_in(root, &["migrate", "--data-dir", data_dir]));
    assert!(migrated.status.success(), "{}", utf8(&migrated.stderr));
    chartlog_crypto::load_or_create_key_files(&dir.data_dir().join("keys")).expect("key files");
    let top_level = root.join("top-level.toml");
    fs::write(&top_level, format!("data-dir = {data_dir:?}\n")).expect("write");
    let top_level = top_level.to_str().expect("utf-8 path");
    let added = run_bounded(chartlog_in(
        root,
        &[
            "--config",
            top_level,
            "users",
            "add",
            "--username",
            "dr.grey",
            "--role",
            "physician",
        ],
    ));
    assert!(added.status.success(), "{}", utf8(&added.stderr));
    assert!(
        !root.join("chartlog-data").exists(),
        "the account went to the default data directory, not the file's"
    );
    let listed = run_bounded(chartlog_in(
        root,
        &["users", "list", "--data-dir", data_dir],
    ));
    assert!(listed.status.success(), "{}", utf8(&listed.stderr));
    assert!(
        utf8(&listed.stdout).contains("dr.grey"),
        "{}",
        utf8(&listed.stdout)
    );

    // A table for `users` applies to each of its subcommands.
    let section = root.join("section.toml");
    fs::write(&section, format!("[users]\ndata-dir = {data_dir:?}\n")).expect("write");
    let listed = run_bounded(chartlog_in(
        root,
        &[
            "--config",
            section.to_str().expect("utf-8"),
            "users",
            "list",
        ],
    ));
    assert!(listed.status.success(), "{}", utf8(&listed.stderr));
    assert!(
        utf8(&listed.stdout).contains("dr.grey"),
        "{}",
        utf8(&listed.stdout)
    );
    assert!(!root.join("chartlog-data").exists());
}

#[test]
fn a_misspelt_setting_stops_serve_before_it_creates_anything() {
    let dir = TestDir::new();
    let root = dir.data_dir().parent().expect("the test directory");
    let data_dir = dir.data_dir().to_str().expect("utf-8 path");
    for (text, named, suggested) in [
        (
            format!("data_dir = {data_dir:?}\n"),
            "\"data_dir\"",
            "\"data-dir\"",
        ),
        (
            format!("data-dir = {data_dir:?}\n[server]\ninsecure-http = true\n"),
            "[server]",
            "[serve]",
        ),
    ] {
        let config = root.join("chartlog.toml");
        fs::write(&config, text).expect("write");
        let output = run_bounded(chartlog_in(
            root,
            &[
                "--config",
                config.to_str().expect("utf-8"),
                "serve",
                "--listen",
                "127.0.0.1:0",
            ],
        ));
        assert!(!output.status.success(), "served with a misspelt setting");
        let stderr = utf8(&output.stderr);
        assert!(
            stderr.contains(named) && stderr.contains(suggested),
            "{stderr}"
        );
        assert!(!root.join("chartlog-data").exists());
        assert!(!dir.data_dir().exists());
    }
}

#[test]
fn a_database_password_never_reaches_stderr() {
    let dir = TestDir::new();
    let root = dir.data_dir().parent().expect("the test directory");
    let secret = "s3cretPassw0rd";
    let refused = |mut command: std::process::Command, names: &str| {
        command.env("CHARTLOG_LOG", "trace");
        let output = run_bounded(command);
        let stderr = utf8(&output.stderr);
        assert!(!output.status.success(), "accepted: {stderr}");
        assert!(!stderr.contains(secret), "the password is echoed: {stderr}");
        assert!(
            !utf8(&output.stdout).contains(secret),
            "the password is echoed"
        );
        assert!(stderr.contains(names), "{names} is not named: {stderr}");
    };

    let bad_scheme = format!("postgresql+ssl://chartlog:{secret}@db/chartlog");
    let mut from_environment = chartlog_in(root, &["migrate"]);
    from_environment.env("CHARTLOG_DATABASE_URL", &bad_scheme);
    refused(from_environment, "--database-url");
    refused(
        chartlog_in(root, &["migrate", "--database-url", &bad_scheme]),
        "--database-url",
    );
    // The driver would log a parameter it does not know, value and all.
    let mut unsupported = chartlog_in(root, &["migrate"]);
    unsupported.env(
        "CHARTLOG_DATABASE_URL",
        format!("postgres://chartlog@127.0.0.1:1/x?sslpassword={secret}"),
    );
    refused(unsupported, "sslpassword");
    refused(
        chartlog_in(
            root,
            &["migrate", &format!("postgres://chartlog:{secret}@db/x")],
        ),
        "unexpected argument",
    );

    // --erasures-from has an environment variable, and its value is not echoed either.
    let mut erasures = chartlog_in(root, &["restore", "-i", "identity.txt", "old.backup"]);
    erasures.env(
        "CHARTLOG_ERASURES_FROM",
        format!("mysql://u:{secret}@db/live"),
    );
    refused(erasures, "--erasures-from");

    // Nor from the configuration file, under any database-URL key or in the query.
    for (text, variable) in [
        (
            format!("database-url = \"postgres://chartlog@db/x?password={secret}\"\n"),
            "CHARTLOG_DATABASE_URL",
        ),
        (
            format!("[restore]\nerasures-from = \"postgres://chartlog:{secret}@db/live\"\n"),
            "CHARTLOG_ERASURES_FROM",
        ),
    ] {
        let config = root.join("chartlog.toml");
        fs::write(&config, text).expect("write");
        refused(
            chartlog_in(
                root,
                &[
                    "--config",
                    config.to_str().expect("utf-8"),
                    "restore",
                    "-i",
                    "identity.txt",
                    "old.backup",
                ],
            ),
            variable,
        );
    }
}

#[tokio::test]
async fn the_development_certificate_is_announced_and_kept_to_loopback() {
    let dir = TestDir::new();
    // On stderr whatever the log filter: an operator must not miss it.
    let server = Server::start_with_log(dir.data_dir(), "error", &[]);
    server.wait_for_stderr("WARNING: no --tls-cert");
    drop(server);

    let root = dir.data_dir().parent().expect("the test directory");
    let other = root.join("other");
    let other_dir = other.to_str().expect("utf-8 path");
    let refused = run_bounded(chartlog_in(
        root,
        &["serve", "--data-dir", other_dir, "--listen", "0.0.0.0:0"],
    ));
    assert!(
        !refused.status.success(),
        "served the development certificate on 0.0.0.0"
    );
    let stderr = utf8(&refused.stderr);
    assert!(
        stderr.contains("--allow-development-certificate"),
        "{stderr}"
    );
    assert!(!other.exists(), "refused before anything was created");

    // Allowed when asked for.
    let mut command = chartlog_in(
        root,
        &[
            "serve",
            "--data-dir",
            other_dir,
            "--listen",
            "0.0.0.0:0",
            "--allow-development-certificate",
        ],
    );
    command.stderr(std::process::Stdio::null());
    let mut child = command.spawn().expect("run chartlog");
    let stdout = child.stdout.take().expect("piped stdout");
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let _ = sender.send(lines.next());
    });
    let line = receiver.recv_timeout(support::STARTUP_TIMEOUT);
    let _ = child.kill();
    let _ = child.wait();
    let line = line
        .expect("a line in time")
        .expect("a line")
        .expect("utf-8");
    assert!(
        line.starts_with("chartlog listening on https://0.0.0.0:"),
        "{line}"
    );
}

#[test]
fn a_deid_export_that_cannot_start_leaves_no_file_to_refuse_the_retry() {
    let dir = TestDir::new();
    let root = dir.data_dir().parent().expect("the test directory");
    let data_dir = dir.data_dir().to_str().expect("utf-8 path");
    let output = root.join("patients.ndjson");
    let export = || {
        chartlog_in(
            root,
            &[
                "deid",
                "export",
                "patients",
                "--data-dir",
                data_dir,
                "--output",
                output.to_str().expect("utf-8"),
            ],
        )
    };
    // The data directory does not exist yet: there is no database to open.
    let failed = run_bounded(export());
    assert!(!failed.status.success());
    assert!(!output.exists(), "a failed export left a file behind");
    // A database, but no key files to sign the export's audit record with.
    let migrated = run_bounded(chartlog_in(root, &["migrate", "--data-dir", data_dir]));
    assert!(migrated.status.success(), "{}", utf8(&migrated.stderr));
    let failed = run_bounded(export());
    assert!(!failed.status.success(), "exported with no audit record");
    assert!(!output.exists(), "a failed export left a file behind");

    chartlog_crypto::load_or_create_key_files(&dir.data_dir().join("keys")).expect("key files");
    let retried = run_bounded(export());
    assert!(retried.status.success(), "{}", utf8(&retried.stderr));
    assert!(output.exists());
    assert_eq!(mode(&output), 0o600);
    let again = run_bounded(export());
    assert!(!again.status.success(), "an export never overwrites a file");
}
