//! Request limits against the real binary: oversized bodies get 413 (with or without a
//! Content-Length), a client over its rate gets 429 with Retry-After, and neither affects
//! other clients.
//!
//! The server runs with `--insecure-http` here: the chunked and oversized requests are written
//! on a plain socket, byte for byte, so the test knows exactly what framing the server saw
//! (an HTTP library decides that itself, and may fail on the server's early answer before
//! reading it). The limits sit in the application, which is the same over TLS.

// Shared with the other binary tests; this one uses part of it.
#[allow(dead_code)]
mod support;

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use support::{STEP_TIMEOUT, Server, TestDir, http_client};

/// The server's body limit (`chartlog_api::REQUEST_BODY_BYTES_MAX`), as its 413 message names it.
const BODY_LIMIT_BYTES: usize = 256 * 1024;

/// Low enough that a test exceeds it in a few dozen requests, high enough for the setup.
const RATE_PER_SECOND: &str = "2";
const BURST: u32 = 10;

const ADMIN_PASSPHRASE: &str = "limits test operator passphrase 7919";

async fn post(
    client: &Client,
    server: &Server,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (StatusCode, Value) {
    let mut request = client.post(server.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("request");
    let status = response.status();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn login(client: &Client, server: &Server, password: &str) -> Value {
    let (status, answer) = post(
        client,
        server,
        "/auth/login",
        None,
        json!({ "username": "admin", "password": password }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "login: {answer}");
    answer
}

/// Logs the first administrator in, replaces the one-time password, and returns `sessions`
/// independent full sessions' tokens (each login is its own session, so its own client).
async fn admin_sessions(
    client: &Client,
    server: &Server,
    data_dir: &TestDir,
    sessions: usize,
) -> Vec<String> {
    let one_time = fs::read_to_string(data_dir.data_dir().join("first-administrator-password"))
        .expect("password file");
    let first = login(client, server, one_time.trim()).await;
    let token = first["token"].as_str().expect("token");
    let (status, answer) = post(
        client,
        server,
        "/auth/password",
        Some(token),
        json!({ "current_password": one_time.trim(), "new_password": ADMIN_PASSPHRASE }),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "change password: {answer}");
    let mut tokens = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let answer = login(client, server, ADMIN_PASSPHRASE).await;
        assert_eq!(answer["session"]["stage"], "full", "{answer}");
        tokens.push(answer["token"].as_str().expect("token").to_owned());
    }
    tokens
}

/// Writes `request` on a fresh connection (from another thread, so a server that answers
/// before reading everything cannot block the test) and returns the status and JSON body.
fn raw_exchange(server: &Server, request: Vec<u8>) -> (u16, Value) {
    let address = server
        .base_url()
        .strip_prefix("http://")
        .expect("plain HTTP server");
    let mut stream = TcpStream::connect(address).expect("connect");
    stream
        .set_read_timeout(Some(STEP_TIMEOUT))
        .expect("read timeout");
    stream
        .set_write_timeout(Some(STEP_TIMEOUT))
        .expect("write timeout");
    let mut writer = stream.try_clone().expect("clone the socket");
    let writing = std::thread::spawn(move || {
        // The server may stop reading (and close) once it has seen enough: a failed write is
        // expected then, and the answer is what the test checks.
        let _ = writer.write_all(&request).and_then(|()| writer.flush());
    });
    let mut answer = Vec::new();
    let mut chunk = [0_u8; 8192];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(read) => answer.extend_from_slice(&chunk[..read]),
            // A reset after the answer arrived (unread request bytes on close) ends it too.
            Err(error) => {
                assert!(!answer.is_empty(), "no answer: {error}");
                break;
            }
        }
        if complete(&answer) {
            break;
        }
    }
    drop(stream);
    writing.join().expect("writer thread");
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .expect("a complete response head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("status line in {head:?}"));
    let body = serde_json::from_str(body).unwrap_or_else(|_| panic!("JSON body in {text:?}"));
    (status, body)
}

/// Whether `answer` holds a whole response with a Content-Length body.
fn complete(answer: &[u8]) -> bool {
    let text = String::from_utf8_lossy(answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().ok())?
        })
        .is_some_and(|length| body.len() >= length)
}

fn assert_too_large(status: u16, body: &Value, what: &str) {
    assert_eq!(status, 413, "{what}: {body}");
    assert_eq!(body["error"], "payload_too_large", "{what}: {body}");
    let message = body["message"].as_str().expect("message");
    assert!(
        message.contains(&BODY_LIMIT_BYTES.to_string()),
        "{what}: the message names the limit: {message}"
    );
}

/// A request announcing a body over the limit in Content-Length: refused from the header.
fn oversized_with_length(path: &str, token: Option<&str>) -> Vec<u8> {
    let body = vec![b' '; BODY_LIMIT_BYTES + 1];
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

/// The same over the limit in chunks, with no Content-Length: refused while reading.
fn oversized_chunked(path: &str, token: Option<&str>) -> Vec<u8> {
    let mut request = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n"
    );
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    let chunk = vec![b' '; 16 * 1024];
    let mut sent = 0;
    while sent <= BODY_LIMIT_BYTES {
        bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        bytes.extend_from_slice(&chunk);
        bytes.extend_from_slice(b"\r\n");
        sent += chunk.len();
    }
    bytes.extend_from_slice(b"0\r\n\r\n");
    bytes
}

async fn session_status(client: &Client, server: &Server, token: &str) -> reqwest::Response {
    client
        .get(server.url("/auth/session"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request")
}

#[tokio::test]
async fn oversized_bodies_get_413_and_a_flooding_client_gets_429_while_others_are_served() {
    let data_dir = TestDir::new();
    let server = Server::start(
        data_dir.data_dir(),
        &[
            "--insecure-http",
            "--rate-limit-per-second",
            RATE_PER_SECOND,
            "--rate-limit-burst",
            &BURST.to_string(),
        ],
    );
    server.wait_for_stderr("first-administrator-password");
    let client = http_client();
    let tokens = admin_sessions(&client, &server, &data_dir, 3).await;
    let (flooding, steady, uploading) = (&tokens[0], &tokens[1], &tokens[2]);

    // 413, announced and chunked, on a public route, an any-session route and a granted one
    // (every handler reads its body through the same bounded extractor).
    for (path, token) in [
        ("/auth/login", None),
        ("/auth/password", Some(uploading.as_str())),
        ("/users", Some(uploading.as_str())),
    ] {
        let (status, body) = raw_exchange(&server, oversized_with_length(path, token));
        assert_too_large(status, &body, &format!("{path} with Content-Length"));
        let (status, body) = raw_exchange(&server, oversized_chunked(path, token));
        assert_too_large(status, &body, &format!("{path} chunked"));
    }
    // The uploader is still served, and so is everyone else.
    let response = session_status(&client, &server, uploading).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = session_status(&client, &server, steady).await;
    assert_eq!(response.status(), StatusCode::OK);

    // One client floods while another sends within its allowance, at the same time.
    let flood = async {
        let mut answers = Vec::new();
        for _ in 0..(3 * BURST) {
            let response = session_status(&client, &server, flooding).await;
            let status = response.status();
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|value| value.to_str().expect("ASCII").to_owned());
            let body: Value = response.json().await.expect("JSON body");
            answers.push((status, retry_after, body));
        }
        answers
    };
    let steady_requests = async {
        let mut statuses = Vec::new();
        for _ in 0..(BURST - 4) {
            statuses.push(session_status(&client, &server, steady).await.status());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        statuses
    };
    let (flood, steady_statuses) = tokio::join!(flood, steady_requests);
    assert!(
        steady_statuses
            .iter()
            .all(|status| *status == StatusCode::OK),
        "the steady client is unaffected: {steady_statuses:?}"
    );
    let refused: Vec<_> = flood
        .iter()
        .filter(|(status, ..)| *status == StatusCode::TOO_MANY_REQUESTS)
        .collect();
    assert!(
        refused.len() >= BURST as usize,
        "the flooding client is refused once its burst is spent: {} of {}",
        refused.len(),
        flood.len()
    );
    for (_, retry_after, body) in &refused {
        let seconds: u64 = retry_after
            .as_deref()
            .expect("Retry-After on a 429")
            .parse()
            .expect("Retry-After in seconds");
        assert!((1..=60).contains(&seconds), "Retry-After {seconds}");
        assert_eq!(body["error"], "rate_limited", "{body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|message| message.contains("rate limit")),
            "{body}"
        );
    }
    assert!(
        flood[..BURST as usize]
            .iter()
            .all(|(status, ..)| *status == StatusCode::OK),
        "the burst itself is served"
    );

    // Invented tokens are charged to the address: spraying them does not escape the limit.
    let mut sprayed = Vec::new();
    for n in 0..(3 * BURST) {
        let response = session_status(&client, &server, &format!("invented-token-{n}")).await;
        sprayed.push(response.status());
    }
    assert!(
        sprayed.contains(&StatusCode::TOO_MANY_REQUESTS),
        "token spraying is limited by address: {sprayed:?}"
    );
    assert!(
        sprayed.iter().all(|status| matches!(
            *status,
            StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
        )),
        "{sprayed:?}"
    );

    // The address's allowance is spent now, and the probes still answer.
    for _ in 0..(2 * BURST) {
        let response = client
            .get(server.url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(
            response.status(),
            StatusCode::OK,
            "health probes are exempt"
        );
    }

    // The flooding client is served again once its bucket refills.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let response = session_status(&client, &server, flooding).await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "served again after waiting"
    );

    let stderr = server.stderr();
    assert!(
        stderr.contains("requests over a client's rate limit refused with 429"),
        "the refusals are counted in the log:\n{stderr}"
    );
    assert!(
        !stderr.contains(flooding.as_str()),
        "no session token in the log"
    );
}

/// `serve --trusted-proxy`: requests through the proxy (here the test itself, on loopback)
/// count against the client it names in `X-Forwarded-For`, each client on its own.
#[tokio::test]
async fn behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit() {
    const PROXIED_BURST: u32 = 2;
    let data_dir = TestDir::new();
    let server = Server::start(
        data_dir.data_dir(),
        &[
            "--insecure-http",
            "--rate-limit-per-second",
            "1",
            "--rate-limit-burst",
            &PROXIED_BURST.to_string(),
            "--trusted-proxy",
            "127.0.0.0/8",
        ],
    );
    server.wait_for_stderr("first-administrator-password");
    let client = http_client();
    // No session: refused with 401 at once, and limited by address.
    let status = |forwarded_for: &'static str| {
        let request = client
            .get(server.url("/auth/session"))
            .header("x-forwarded-for", forwarded_for)
            .timeout(STEP_TIMEOUT)
            .send();
        async move { request.await.expect("answered").status() }
    };
    // One client spends its burst and is refused; the next one behind the same proxy is not.
    for _ in 0..PROXIED_BURST {
        assert_eq!(status("203.0.113.9").await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(status("203.0.113.9").await, StatusCode::TOO_MANY_REQUESTS);
    for _ in 0..PROXIED_BURST {
        assert_eq!(status("203.0.113.10").await, StatusCode::UNAUTHORIZED);
    }
}
