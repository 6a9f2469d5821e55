//! Attacks on authentication, against the real binary over HTTPS: password guessing is
//! throttled per account and per client address, an attacker cannot tell unknown accounts from
//! wrong passwords (by answer or by timing), and a session stolen before a logout, a disable, a
//! password change or a second-factor reset is worth nothing afterwards; and a patient has one
//! account.

#[allow(dead_code)]
#[path = "support/api_client.rs"]
mod api_client;
#[path = "support/fresh_postgres.rs"]
mod fresh_postgres;
#[allow(dead_code)]
mod support;

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use api_client::{Api, first_administrator_password, https_client_from, passphrase};
use fresh_postgres::FreshPostgresDatabase;
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use support::{Server, TestDir};

/// The server's limits (`chartlog_access::settings`): failed logins per account name, and per
/// client address, within 15 minutes.
const FAILURES_PER_ACCOUNT_MAX: usize = 5;
const FAILURES_PER_ADDRESS_MAX: usize = 20;

/// The tests of this file take turns: the timing comparison must not share the two cores
/// with another test's password hashing, and the others lose nothing by waiting.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A client whose connections come from `127.a.b.c`: the loopback /8 gives a test as many
/// client addresses as it needs, so per-address throttling can be exercised and avoided.
fn client_from(dir: &TestDir, address: [u8; 3]) -> Client {
    let certificate = fs::read(dir.certificate_path()).expect("certificate");
    let ip = IpAddr::V4(Ipv4Addr::new(127, address[0], address[1], address[2]));
    https_client_from(&certificate, ip)
}

async fn login(
    client: &Client,
    server: &Server,
    username: &str,
    password: &str,
) -> reqwest::Response {
    client
        .post(server.url("/auth/login"))
        .json(&json!({ "username": username, "password": password }))
        .send()
        .await
        .expect("login request")
}

async fn status_and_code(response: reqwest::Response) -> (StatusCode, String) {
    let status = response.status();
    let body: Value = response.json().await.expect("JSON error body");
    (
        status,
        body["error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// Starts a server, logs the administrator in, and creates `names` as auditors (a role with no
/// second factor, so the password alone decides a login). With `set_passwords` each account
/// logs in once to replace its one-time password with [`passphrase`].
async fn setup<'a>(
    server: &'a Server,
    dir: &TestDir,
    names: &[String],
    set_passwords: bool,
) -> (Api<'a>, String, Vec<String>) {
    let api = Api::new(server, client_from(dir, [0, 0, 1]));
    let admin_password = first_administrator_password(server, dir.data_dir());
    let admin = api.first_login("admin", &admin_password).await.token;
    let mut ids = Vec::new();
    for name in names {
        let (id, one_time) = api.create_user(&admin, name, "auditor", None).await;
        if set_passwords {
            api.first_login(name, &one_time).await;
        }
        ids.push(id);
    }
    (api, admin, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_is_throttled_per_account_and_per_address() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &[]);
    let names = ["victim.vera", "bystander.bo"].map(str::to_owned);
    let (_api, _admin, _) = setup(&server, &dir, &names, true).await;
    let attacker = client_from(&dir, [0, 0, 2]);

    for attempt in 1..=FAILURES_PER_ACCOUNT_MAX {
        let answer = status_and_code(login(&attacker, &server, "victim.vera", "guess").await).await;
        assert_eq!(
            answer,
            (StatusCode::UNAUTHORIZED, "invalid_credentials".to_owned()),
            "guess {attempt}"
        );
    }
    let throttled = login(&attacker, &server, "victim.vera", "guess").await;
    assert_eq!(throttled.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = throttled
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .expect("ASCII")
        .parse()
        .expect("seconds");
    assert!((1..=15 * 60).contains(&retry_after), "{retry_after}");
    assert_eq!(status_and_code(throttled).await.1, "throttled");

    // The right password does not get through while the account is throttled, from the
    // attacker's address or any other: the limit is on the account name.
    for client in [&attacker, &client_from(&dir, [0, 0, 3])] {
        let answer = login(client, &server, "victim.vera", &passphrase("victim.vera")).await;
        assert_eq!(
            status_and_code(answer).await,
            (StatusCode::TOO_MANY_REQUESTS, "throttled".to_owned())
        );
    }
    // Another account, even from the attacker's address (5 failures, under its limit), is
    // not affected.
    let answer = login(
        &attacker,
        &server,
        "bystander.bo",
        &passphrase("bystander.bo"),
    )
    .await;
    assert_eq!(answer.status(), StatusCode::OK);

    // Per address: guesses spread over many account names, each under its own limit, still
    // run into the address's limit; then even a right password from that address waits,
    // while the same account from another address logs in.
    let sprayer = client_from(&dir, [0, 0, 4]);
    for attempt in 1..=FAILURES_PER_ADDRESS_MAX {
        let name = format!("spray.{attempt:03}");
        let answer = status_and_code(login(&sprayer, &server, &name, "guess").await).await;
        assert_eq!(
            answer,
            (StatusCode::UNAUTHORIZED, "invalid_credentials".to_owned()),
            "spray {attempt}"
        );
    }
    let answer = login(
        &sprayer,
        &server,
        "bystander.bo",
        &passphrase("bystander.bo"),
    )
    .await;
    assert_eq!(
        status_and_code(answer).await,
        (StatusCode::TOO_MANY_REQUESTS, "throttled".to_owned())
    );
    let elsewhere = client_from(&dir, [0, 0, 5]);
    let answer = login(
        &elsewhere,
        &server,
        "bystander.bo",
        &passphrase("bystander.bo"),
    )
    .await;
    assert_eq!(answer.status(), StatusCode::OK);
}

/// One login attempt's answer, and how long the client waited for all of it.
struct Trial {
    status: StatusCode,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    elapsed: Duration,
}

async fn timed_login(client: &Client, server: &Server, username: &str, password: &str) -> Trial {
    let started = Instant::now();
    let response = login(client, server, username, password).await;
    let status = response.status();
    let mut headers: Vec<(String, Vec<u8>)> = response
        .headers()
        .iter()
        // The only header allowed to differ: the time of the answer.
        .filter(|(name, _)| name.as_str() != "date")
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    headers.sort();
    let body = response.bytes().await.expect("body").to_vec();
    Trial {
        status,
        headers,
        body,
        elapsed: started.elapsed(),
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    let middle = samples.len() / 2;
    if samples.len().is_multiple_of(2) {
        (samples[middle - 1] + samples[middle]) / 2
    } else {
        samples[middle]
    }
}

/// Trials of each kind per round.
const ENUMERATION_TRIALS: usize = 200;
/// Rounds at most: a round adds trials only when the medians so far differ by the limit or
/// more, so noise from other work on a shared machine averages out while a real difference
/// (a skipped password hash costs tens of milliseconds) fails every round.
const ENUMERATION_ROUNDS_MAX: usize = 5;
const TIMING_DIFFERENCE_MAX: Duration = Duration::from_millis(5);
/// Failed logins per account name in the wrong-password trials: under the account limit.
const TRIALS_PER_ACCOUNT: usize = FAILURES_PER_ACCOUNT_MAX - 1;
/// Trial pairs per client address: two failures each, under the address limit.
const PAIRS_PER_ADDRESS: usize = (FAILURES_PER_ADDRESS_MAX - 1) / 2;
const WARM_UP_PAIRS: usize = PAIRS_PER_ADDRESS;

/// Clients from fresh addresses `127.1.round.n`, each with its TLS connection already open,
/// so no handshake lands inside a timed trial.
async fn fresh_clients(dir: &TestDir, server: &Server, round: usize, count: usize) -> Vec<Client> {
    let mut clients = Vec::new();
    for index in 0..count {
        let client = client_from(
            dir,
            [
                1,
                u8::try_from(round).expect("few rounds"),
                u8::try_from(index + 1).expect("few clients"),
            ],
        );
        let health = client
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(health.status(), StatusCode::OK);
        clients.push(client);
    }
    clients
}

/// One unknown name and one existing name with a wrong password, in an order that alternates
/// so a drift in load hits both alike; answers (unknown, wrong password).
async fn trial_pair(
    client: &Client,
    server: &Server,
    pair: usize,
    ghost: &str,
    existing: &str,
) -> (Trial, Trial) {
    if pair.is_multiple_of(2) {
        let unknown = timed_login(client, server, ghost, "a wrong password").await;
        let wrong = timed_login(client, server, existing, "a wrong password").await;
        (unknown, wrong)
    } else {
        let wrong = timed_login(client, server, existing, "a wrong password").await;
        let unknown = timed_login(client, server, ghost, "a wrong password").await;
        (unknown, wrong)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_accounts_and_wrong_passwords_look_the_same() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &[]);
    let (api, admin, _) = setup(&server, &dir, &[], false).await;

    // Names of one length, existing or not, so nothing but existence differs. Accounts keep
    // their one-time passwords, which a guess never matches, and none reaches the account
    // limit; each client address stays under the address limit.
    let accounts_per_round = ENUMERATION_TRIALS.div_ceil(TRIALS_PER_ACCOUNT);
    let mut unknown: Vec<Trial> = Vec::new();
    let mut wrong: Vec<Trial> = Vec::new();
    let mut last_account = String::new();
    for round in 0..ENUMERATION_ROUNDS_MAX {
        let mut names = Vec::new();
        for index in 0..accounts_per_round {
            let name = format!("usr{round}.{index:03}");
            api.create_user(&admin, &name, "auditor", None).await;
            last_account.clone_from(&name);
            names.push(name);
        }
        let warm_up_pairs = if round == 0 { WARM_UP_PAIRS } else { 0 };
        let mut warm_up_accounts = Vec::new();
        for index in 0..warm_up_pairs.div_ceil(TRIALS_PER_ACCOUNT) {
            let name = format!("wrm{round}.{index:03}");
            api.create_user(&admin, &name, "auditor", None).await;
            warm_up_accounts.push(name);
        }
        let clients = fresh_clients(
            &dir,
            &server,
            round,
            (ENUMERATION_TRIALS + warm_up_pairs).div_ceil(PAIRS_PER_ADDRESS),
        )
        .await;
        // The warm-up pairs go first and are dropped: the first unknown name builds the
        // server's dummy hash, and caches fill.
        for pair in 0..warm_up_pairs + ENUMERATION_TRIALS {
            let client = &clients[pair / PAIRS_PER_ADDRESS];
            let ghost = format!("gst{round}.{pair:03}");
            if pair < warm_up_pairs {
                let existing = &warm_up_accounts[pair / TRIALS_PER_ACCOUNT];
                trial_pair(client, &server, pair, &ghost, existing).await;
                continue;
            }
            let timed = pair - warm_up_pairs;
            let existing = &names[timed / TRIALS_PER_ACCOUNT];
            let (a, b) = trial_pair(client, &server, pair, &ghost, existing).await;
            unknown.push(a);
            wrong.push(b);
        }
        let (unknown_median, wrong_median) = medians(&unknown, &wrong);
        // Reported, not asserted: the median of the differences within each pair, which a
        // change of load between pairs does not move.
        let mut paired: Vec<f64> = unknown
            .iter()
            .zip(&wrong)
            .map(|(u, w)| u.elapsed.as_secs_f64() - w.elapsed.as_secs_f64())
            .collect();
        paired.sort_by(f64::total_cmp);
        eprintln!(
            "round {round}: median login answer over {} trials each: unknown account \
             {unknown_median:?}, wrong password {wrong_median:?}; median paired difference \
             {:.2} ms",
            unknown.len(),
            paired[paired.len() / 2] * 1000.0
        );
        if unknown_median.abs_diff(wrong_median) < TIMING_DIFFERENCE_MAX {
            break;
        }
    }

    let reference = &unknown[0];
    assert_eq!(reference.status, StatusCode::UNAUTHORIZED);
    let body: Value = serde_json::from_slice(&reference.body).expect("JSON");
    assert_eq!(body["error"], "invalid_credentials");
    // A disabled account answers like an unknown one, even to its correct password: the
    // account has a password of its own, which logs in until the account is disabled.
    let disabled_name = "dsb0.000";
    let (disabled_id, one_time) = api
        .create_user(&admin, disabled_name, "auditor", None)
        .await;
    api.first_login(disabled_name, &one_time).await;
    let disabled_client = client_from(&dir, [2, 0, 1]);
    let before = timed_login(
        &disabled_client,
        &server,
        disabled_name,
        &passphrase(disabled_name),
    )
    .await;
    assert_eq!(
        before.status,
        StatusCode::OK,
        "the password logs in before the disable: {}",
        String::from_utf8_lossy(&before.body)
    );
    api.post(&format!("/users/{disabled_id}/disable"), &admin, json!({}))
        .await
        .expect(StatusCode::NO_CONTENT);
    let from_disabled = timed_login(
        &disabled_client,
        &server,
        disabled_name,
        &passphrase(disabled_name),
    )
    .await;
    for (index, trial) in unknown
        .iter()
        .chain(&wrong)
        .chain([&from_disabled])
        .enumerate()
    {
        assert_eq!(trial.status, reference.status, "trial {index}");
        assert_eq!(
            trial.body,
            reference.body,
            "trial {index}: {}",
            String::from_utf8_lossy(&trial.body)
        );
        assert_eq!(trial.headers, reference.headers, "trial {index}");
    }

    // The control that shows the measurement can see a skipped password hash: a malformed
    // second-factor code is refused before any account is looked up or any hash computed
    // (for every name alike, so it tells nothing), with the same body.
    let control_client = client_from(&dir, [2, 0, 2]);
    let mut skipped_hash = Vec::new();
    for _ in 0..40 {
        let started = Instant::now();
        let response = control_client
            .post(server.url("/auth/login"))
            .json(&json!({
                "username": last_account,
                "password": "a wrong password",
                "second_factor": "not a code",
            }))
            .send()
            .await
            .expect("login request");
        let status = response.status();
        let body = response.bytes().await.expect("body");
        skipped_hash.push(started.elapsed());
        assert_eq!(status, reference.status);
        assert_eq!(body.as_ref(), reference.body.as_slice());
    }
    let skipped_median = median(&mut skipped_hash);
    let (unknown_median, wrong_median) = medians(&unknown, &wrong);
    eprintln!("control: an answer with no password hash, median {skipped_median:?}");
    assert!(
        wrong_median.saturating_sub(skipped_median) > TIMING_DIFFERENCE_MAX,
        "the control: a hash costs more than the limit ({skipped_median:?} without one, \
         {wrong_median:?} with), or the timing assertion could not fail"
    );
    assert!(
        unknown_median.abs_diff(wrong_median) < TIMING_DIFFERENCE_MAX,
        "over {} trials each, an unknown account answers in {unknown_median:?} (median), a \
         wrong password in {wrong_median:?}: the timing tells them apart",
        unknown.len()
    );
}

fn medians(unknown: &[Trial], wrong: &[Trial]) -> (Duration, Duration) {
    let mut unknown: Vec<Duration> = unknown.iter().map(|t| t.elapsed).collect();
    let mut wrong: Vec<Duration> = wrong.iter().map(|t| t.elapsed).collect();
    (median(&mut unknown), median(&mut wrong))
}

/// `GET /auth/session` with `token` as a bearer token and, separately, as the session cookie.
async fn session_statuses(api: &Api<'_>, token: &str) -> (StatusCode, StatusCode) {
    let bearer = api.get("/auth/session", token).await.status;
    let cookie = api
        .call(
            Method::GET,
            "/auth/session",
            None,
            None,
            &[("cookie", format!("chartlog_session={token}"))],
        )
        .await
        .status;
    (bearer, cookie)
}

#[track_caller]
fn assert_ended(statuses: (StatusCode, StatusCode), after: &str) {
    assert_eq!(
        statuses,
        (StatusCode::UNAUTHORIZED, StatusCode::UNAUTHORIZED),
        "a session kept from before {after} still works (bearer, cookie)"
    );
}

async fn fresh_session(api: &Api<'_>, username: &str) -> String {
    api.login(username, &passphrase(username), None)
        .await
        .expect(StatusCode::OK)
        .json()["token"]
        .as_str()
        .expect("token")
        .to_owned()
}

/// A patient has one account: an administrator cannot bind a second to the same patient, a
/// second way into one record, even once the first is disabled. The refusal names no patient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_gets_one_account() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &[]);
    let (api, admin, _) = setup(&server, &dir, &[], false).await;
    let patient = uuid::Uuid::new_v4().to_string();
    let (first, _) = api
        .create_user(&admin, "pat.only", "patient", Some(&patient))
        .await;
    let second = json!({ "username": "pat.again", "role": "patient", "patient_id": patient });
    let refused = api
        .post("/users", &admin, second.clone())
        .await
        .expect(StatusCode::CONFLICT)
        .json();
    assert_eq!(refused["error"], "patient_account_exists", "{refused}");
    assert!(!refused.to_string().contains(&patient), "{refused}");
    api.post(&format!("/users/{first}/disable"), &admin, json!({}))
        .await
        .expect(StatusCode::NO_CONTENT);
    api.post("/users", &admin, second)
        .await
        .expect(StatusCode::CONFLICT);
    // Another patient still gets theirs.
    api.create_user(
        &admin,
        "pat.other",
        "patient",
        Some(&uuid::Uuid::new_v4().to_string()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_session_stays_ended_on_sqlite() {
    let _turn = ONE_AT_A_TIME.lock().await;
    an_ended_session_stays_ended(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_session_stays_ended_on_postgres() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let database = FreshPostgresDatabase::create().await;
    an_ended_session_stays_ended(&["--database-url", &database.url]).await;
    database.drop().await;
}

async fn an_ended_session_stays_ended(extra_args: &[&str]) {
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), extra_args);
    let names = ["aud.logout", "aud.disabled", "aud.changes", "aud.reset"].map(str::to_owned);
    let (api, admin, ids) = setup(&server, &dir, &names, true).await;

    // Logout: the session and a copy of its token (a cookie kept by another tab) both end.
    let token = fresh_session(&api, "aud.logout").await;
    assert_eq!(
        session_statuses(&api, &token).await,
        (StatusCode::OK, StatusCode::OK)
    );
    api.post("/auth/logout", &token, json!({}))
        .await
        .expect(StatusCode::NO_CONTENT);
    assert_ended(session_statuses(&api, &token).await, "logout");
    api.get("/audit-trail", &token)
        .await
        .expect(StatusCode::UNAUTHORIZED);

    // Disable: every session of the account ends at once, and no new one opens.
    let token = fresh_session(&api, "aud.disabled").await;
    api.get("/audit-trail", &token).await.expect(StatusCode::OK);
    api.post(&format!("/users/{}/disable", ids[1]), &admin, json!({}))
        .await
        .expect(StatusCode::NO_CONTENT);
    assert_ended(
        session_statuses(&api, &token).await,
        "the account was disabled",
    );
    api.get("/audit-trail", &token)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    api.login("aud.disabled", &passphrase("aud.disabled"), None)
        .await
        .expect(StatusCode::UNAUTHORIZED);

    // Password change: the session that changed it and any other (a stolen one) both end.
    let stolen = fresh_session(&api, "aud.changes").await;
    let own = fresh_session(&api, "aud.changes").await;
    api.post(
        "/auth/password",
        &own,
        json!({
            "current_password": passphrase("aud.changes"),
            "new_password": "an entirely different passphrase 4417",
        }),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    assert_ended(session_statuses(&api, &stolen).await, "a password change");
    assert_ended(session_statuses(&api, &own).await, "a password change");
    api.get("/audit-trail", &stolen)
        .await
        .expect(StatusCode::UNAUTHORIZED);

    // An administrator's password reset ends the account's sessions too.
    let token = fresh_session(&api, "aud.reset").await;
    api.post(
        &format!("/users/{}/password-reset", ids[3]),
        &admin,
        json!({}),
    )
    .await
    .expect(StatusCode::OK);
    assert_ended(session_statuses(&api, &token).await, "a password reset");

    // Second-factor reset: a physician's full session, opened with TOTP, ends.
    let (physician_id, one_time) = api
        .create_user(&admin, "dr.second", "physician", None)
        .await;
    let physician = api.first_login("dr.second", &one_time).await;
    assert!(physician.totp_secret.is_some(), "physicians enroll TOTP");
    assert_eq!(
        session_statuses(&api, &physician.token).await,
        (StatusCode::OK, StatusCode::OK)
    );
    api.post(
        &format!("/users/{physician_id}/second-factor-reset"),
        &admin,
        json!({}),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    assert_ended(
        session_statuses(&api, &physician.token).await,
        "a second-factor reset",
    );
    api.get(
        "/patients/00000000-0000-7000-8000-000000000000/chart",
        &physician.token,
    )
    .await
    .expect(StatusCode::UNAUTHORIZED);
}

/// The server's log lines that report refusal alerts (the log notifier's WARN lines).
fn alert_lines(server: &Server) -> Vec<String> {
    server
        .stderr()
        .lines()
        .filter(|line| line.contains("repeated refusals"))
        .map(str::to_owned)
        .collect()
}

/// Waits, bounded, until the server has reported `count` refusal alerts, and returns them.
async fn alerts_reach(server: &Server, count: usize) -> Vec<String> {
    let deadline = Instant::now() + support::STEP_TIMEOUT;
    loop {
        let lines = alert_lines(server);
        if lines.len() >= count {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{count} refusal alerts expected, {} seen; stderr:\n{}",
            lines.len(),
            server.stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_refusals_raise_one_alert_per_subject_naming_no_address() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &["--refusal-alert-count", "3"]);
    let names = ["auditor.ada"].map(str::to_owned);
    let (api, _admin, ids) = setup(&server, &dir, &names, true).await;
    assert!(alert_lines(&server).is_empty(), "{}", server.stderr());

    // An auditor opening charts is refused by the role table, five times: one alert, at the
    // third, naming the auditor by id.
    let auditor = fresh_session(&api, "auditor.ada").await;
    let chart = format!("/patients/{}/chart", uuid::Uuid::now_v7());
    for attempt in 1..=5 {
        let refused = api.get(&chart, &auditor).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "attempt {attempt}");
    }
    let lines = alerts_reach(&server, 1).await;
    let auditor_alert = &lines[0];
    assert!(auditor_alert.contains(&ids[0]), "{auditor_alert}");
    assert!(auditor_alert.contains("auditor"), "{auditor_alert}");
    assert!(auditor_alert.contains("refusals=3"), "{auditor_alert}");
    assert!(
        auditor_alert.contains("/audit-trail?from="),
        "{auditor_alert}"
    );

    // Requests without a session from one address: counted by the address, which the alert
    // does not carry.
    let stranger = client_from(&dir, [0, 0, 9]);
    for attempt in 1..=3 {
        let refused = stranger
            .get(server.url(&chart))
            .send()
            .await
            .expect("request");
        assert_eq!(
            refused.status(),
            StatusCode::UNAUTHORIZED,
            "attempt {attempt}"
        );
    }
    let lines = alerts_reach(&server, 2).await;
    let anonymous_alert = &lines[1];
    assert!(!anonymous_alert.contains("user_id"), "{anonymous_alert}");
    assert!(!anonymous_alert.contains("127.0.0.9"), "{anonymous_alert}");

    // The window has not passed: the auditor's later refusals raise nothing more.
    api.get(&chart, &auditor)
        .await
        .expect(StatusCode::FORBIDDEN);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(alert_lines(&server).len(), 2, "{}", server.stderr());
}

/// An identity provider for the tests: an Ed25519 key, its JWKS, and ID tokens signed with it.
struct IdentityProvider {
    key: jsonwebtoken::EncodingKey,
    public: Vec<u8>,
}

const ISSUER: &str = "https://id.clinic.test";
const AUDIENCE: &str = "chartlog-ehr";

impl IdentityProvider {
    fn new() -> Self {
        use ring::signature::KeyPair as _;
        let pkcs8 =
            ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
                .expect("key");
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        IdentityProvider {
            key: jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref()),
            public: pair.public_key().as_ref().to_vec(),
        }
    }

    fn jwks(&self) -> Value {
        use base64::Engine as _;
        json!({ "keys": [{
            "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig", "kid": "clinic-1",
            "x": base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&self.public),
        }]})
    }

    /// An ID token for `subject`, issued now, whose `amr` lists `methods`.
    fn id_token(&self, subject: &str, methods: &[&str]) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_secs();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some("clinic-1".to_owned());
        let claims = json!({
            "iss": ISSUER, "aud": AUDIENCE, "sub": subject, "iat": now, "exp": now + 300,
            "auth_time": now, "amr": methods, "nonce": uuid::Uuid::new_v4().to_string(),
        });
        jsonwebtoken::encode(&header, &claims, &self.key).expect("token")
    }
}

/// Single sign-on, against the real binary: an administrator links a physician's account to
/// the identity provider's subject; the physician signs in with the provider's ID token (no
/// chartlog password, no chartlog TOTP), signs a note with a fresh token, and cannot sign in
/// with a password any more; a replayed token, a token from another key, one without a second
/// factor for a role that needs one, and one for an unlinked subject are all refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_sign_on_with_the_identity_providers_id_tokens() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = TestDir::new();
    let provider = IdentityProvider::new();
    let jwks = dir.data_dir().with_extension("jwks.json");
    fs::write(&jwks, provider.jwks().to_string()).expect("write the JWKS");
    let jwks_arg = jwks.to_string_lossy().into_owned();
    let server = Server::start(
        dir.data_dir(),
        &[
            "--oidc-issuer",
            ISSUER,
            "--oidc-audience",
            AUDIENCE,
            "--oidc-jwks",
            &jwks_arg,
        ],
    );
    let (api, admin, _) = setup(&server, &dir, &[], false).await;
    let (physician_id, one_time) = api.create_user(&admin, "dr.sso", "physician", None).await;
    let subject = "00u1a2b3c4d5e6f7g8h9";
    let sso = |token: String| {
        let api = &api;
        async move {
            api.call(
                Method::POST,
                "/auth/sso",
                None,
                Some(json!({ "id_token": token })),
                &[],
            )
            .await
        }
    };

    // Not linked yet: the provider's word about a stranger opens nothing.
    let refused = sso(provider.id_token(subject, &["pwd", "otp"])).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{}", refused.text);
    let linked = api
        .post(
            &format!("/users/{physician_id}/sso-subject"),
            &admin,
            json!({ "subject": subject }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(linked["sso_subject"], subject);

    // Signed in by the provider: a full session, though the account never set a password or
    // enrolled TOTP here.
    let token = provider.id_token(subject, &["pwd", "otp"]);
    let answer = sso(token.clone()).await.expect(StatusCode::OK).json();
    assert_eq!(answer["session"]["stage"], "full", "{answer}");
    assert_eq!(answer["session"]["user_id"], physician_id.as_str());
    let session = answer["token"].as_str().expect("token").to_owned();
    let patient = api
        .post(
            "/patients",
            &session,
            json!({
                "name": { "family": "Ssotest", "given": ["Ada"] }, "birth_date": "1970-01-02",
                "sex": "female", "address": null, "contacts": [], "mrn": "SSO-1", "ssn": null,
                "identifiers": []
            }),
        )
        .await
        .expect(StatusCode::CREATED)
        .json()["patient_id"]
        .as_str()
        .expect("patient")
        .to_owned();
    let note = api
        .post(
            &format!("/patients/{patient}/write-note"),
            &session,
            json!({ "text": "Signed in through the identity provider." }),
        )
        .await
        .expect(StatusCode::OK)
        .json()["record_id"]
        .as_str()
        .expect("note")
        .to_owned();
    // Signing re-authenticates with a fresh token; the chartlog one-time password is no proof.
    let sign = format!("/patients/{patient}/sign-note");
    api.post(
        &sign,
        &session,
        json!({ "note_id": note, "password": one_time }),
    )
    .await
    .expect(StatusCode::UNAUTHORIZED);
    let forged = IdentityProvider::new().id_token(subject, &["pwd", "otp"]);
    api.post(
        &sign,
        &session,
        json!({ "note_id": note, "id_token": forged }),
    )
    .await
    .expect(StatusCode::UNAUTHORIZED);
    api.post(
        &sign,
        &session,
        json!({ "note_id": note, "id_token": provider.id_token(subject, &["pwd", "otp"]) }),
    )
    .await
    .expect(StatusCode::OK);

    // The same token again, a token from a key the provider never published, a token for
    // another subject: refused alike.
    for (case, token) in [
        ("replayed", token),
        (
            "forged",
            IdentityProvider::new().id_token(subject, &["pwd", "otp"]),
        ),
        ("stranger", provider.id_token("someone-else", &["mfa"])),
    ] {
        let refused = sso(token).await;
        assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{case}");
        assert_eq!(refused.json()["error"], "invalid_credentials", "{case}");
    }
    // A physician reads PHI: the provider must have checked a second factor.
    let one_factor = sso(provider.id_token(subject, &["pwd"])).await;
    assert_eq!(one_factor.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        one_factor.json()["error"],
        "identity_provider_second_factor_missing"
    );
    // A linked account signs in at the provider only.
    let by_password = api.login("dr.sso", &one_time, None).await;
    assert_eq!(by_password.status, StatusCode::UNAUTHORIZED);
    // An account created linked signs in there at once; its subject cannot be taken twice.
    let nurse = json!({ "username": "rn.sso", "role": "nurse", "sso_subject": "00u-rn-sso" });
    let created = api
        .post("/users", &admin, nurse)
        .await
        .expect(StatusCode::CREATED)
        .json();
    assert_eq!(created["user"]["sso_subject"], "00u-rn-sso", "{created}");
    sso(provider.id_token("00u-rn-sso", &["pwd", "otp"]))
        .await
        .expect(StatusCode::OK);
    let twice = json!({ "username": "rn.sso2", "role": "nurse", "sso_subject": subject });
    api.post("/users", &admin, twice)
        .await
        .expect(StatusCode::CONFLICT);

    // Unlinking ends the provider's sessions and its way in.
    api.post(
        &format!("/users/{physician_id}/sso-subject"),
        &admin,
        json!({ "subject": null }),
    )
    .await
    .expect(StatusCode::OK);
    api.get("/auth/session", &session)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    sso(provider.id_token(subject, &["pwd", "otp"]))
        .await
        .expect(StatusCode::UNAUTHORIZED);
    assert!(
        server.stderr().contains("identity-provider token refused"),
        "the operator sees why a token was refused"
    );
}
