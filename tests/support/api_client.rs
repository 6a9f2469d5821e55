//! An HTTP client for the security tests (`phi_leak`, `auth_attacks`): logs in, enrolls TOTP,
//! sends commands, and keeps every exchange so a test can scan what the server answered.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};

use crate::support::{STEP_TIMEOUT, Server};

pub use crate::support::{passphrase, totp};

/// One request and its answer, as the client saw them.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: Method,
    pub path: String,
    pub status: StatusCode,
    pub text: String,
}

pub struct Response {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Response {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, self.text))
    }

    #[track_caller]
    pub fn expect(self, status: StatusCode) -> Response {
        assert_eq!(self.status, status, "body: {}", self.text);
        self
    }
}

/// What a full login left behind: the session token, and the TOTP secret and recovery codes
/// when the role enrolled a second factor.
pub struct LoggedIn {
    pub token: String,
    pub totp_secret: Option<String>,
    pub recovery_codes: Vec<String>,
}

pub struct Api<'a> {
    pub server: &'a Server,
    pub client: Client,
    exchanges: Mutex<Vec<Exchange>>,
}

impl<'a> Api<'a> {
    pub fn new(server: &'a Server, client: Client) -> Self {
        Self {
            server,
            client,
            exchanges: Mutex::new(Vec::new()),
        }
    }

    /// Every exchange so far, in order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.exchanges.lock().expect("exchanges").clone()
    }

    /// Sends a request with a raw body and content type, for bodies `serde_json` cannot make
    /// (truncated JSON, the wrong media type).
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Response {
        let mut request = self
            .client
            .request(method.clone(), self.server.url(path))
            .header("content-type", content_type)
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        self.finish(method, path, request).await
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Response {
        let mut request = self.client.request(method.clone(), self.server.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        self.finish(method, path, request).await
    }

    async fn finish(
        &self,
        method: Method,
        path: &str,
        request: reqwest::RequestBuilder,
    ) -> Response {
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        self.exchanges.lock().expect("exchanges").push(Exchange {
            method,
            path: path.to_owned(),
            status,
            text: text.clone(),
        });
        Response {
            status,
            headers,
            text,
        }
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.call(Method::GET, path, Some(token), None, &[]).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.call(Method::POST, path, Some(token), Some(body), &[])
            .await
    }

    pub async fn login(
        &self,
        username: &str,
        password: &str,
        second_factor: Option<String>,
    ) -> Response {
        let mut body = json!({ "username": username, "password": password });
        if let Some(code) = second_factor {
            body["second_factor"] = json!(code);
        }
        self.call(Method::POST, "/auth/login", None, Some(body), &[])
            .await
    }

    /// Logs in with a one-time password, sets [`passphrase`], enrolls TOTP when the role asks
    /// for it, and returns a full session.
    pub async fn first_login(&self, username: &str, one_time_password: &str) -> LoggedIn {
        let answer = self
            .login(username, one_time_password, None)
            .await
            .expect(StatusCode::OK)
            .json();
        assert_eq!(answer["session"]["stage"], "must_change_password");
        let token = answer["token"].as_str().expect("token").to_owned();
        self.post(
            "/auth/password",
            &token,
            json!({ "current_password": one_time_password, "new_password": passphrase(username) }),
        )
        .await
        .expect(StatusCode::NO_CONTENT);

        let answer = self
            .login(username, &passphrase(username), None)
            .await
            .expect(StatusCode::OK)
            .json();
        let token = answer["token"].as_str().expect("token").to_owned();
        if answer["session"]["stage"] == "full" {
            return LoggedIn {
                token,
                totp_secret: None,
                recovery_codes: Vec::new(),
            };
        }
        assert_eq!(answer["session"]["stage"], "must_enroll_second_factor");
        let enrollment = self
            .post("/auth/second-factor/enrollment", &token, json!({}))
            .await
            .expect(StatusCode::OK)
            .json();
        let secret = enrollment["secret_base32"]
            .as_str()
            .expect("secret")
            .to_owned();
        let codes = self
            .post(
                "/auth/second-factor/confirmation",
                &token,
                json!({ "code": totp(&secret, 0) }),
            )
            .await
            .expect(StatusCode::OK)
            .json();
        let recovery_codes = codes["recovery_codes"]
            .as_array()
            .expect("codes")
            .iter()
            .map(|code| code.as_str().expect("code").to_owned())
            .collect();
        // The enrollment's own code is spent (replay protection): use the next step's.
        let answer = self
            .login(username, &passphrase(username), Some(totp(&secret, 30)))
            .await
            .expect(StatusCode::OK)
            .json();
        assert_eq!(answer["session"]["stage"], "full");
        LoggedIn {
            token: answer["token"].as_str().expect("token").to_owned(),
            totp_secret: Some(secret),
            recovery_codes,
        }
    }

    /// Creates an account as `admin`; returns its user id and one-time password.
    pub async fn create_user(
        &self,
        admin: &str,
        username: &str,
        role: &str,
        patient: Option<&str>,
    ) -> (String, String) {
        let mut body = json!({ "username": username, "role": role });
        if let Some(patient) = patient {
            body["patient_id"] = json!(patient);
        }
        let answer = self
            .post("/users", admin, body)
            .await
            .expect(StatusCode::CREATED)
            .json();
        (
            answer["user"]["user_id"].as_str().expect("id").to_owned(),
            answer["one_time_password"]
                .as_str()
                .expect("password")
                .to_owned(),
        )
    }

    /// Polls `path` until `ready` accepts the answer: read models follow the log
    /// asynchronously.
    pub async fn eventually(
        &self,
        path: &str,
        token: &str,
        ready: impl Fn(&Response) -> bool,
    ) -> Response {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let response = self.get(path, token).await;
            if ready(&response) || Instant::now() > deadline {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The administrator's one-time password, from the file the first start writes.
pub fn first_administrator_password(server: &Server, data_dir: &std::path::Path) -> String {
    server.wait_for_stderr("first-administrator-password");
    std::fs::read_to_string(data_dir.join("first-administrator-password"))
        .expect("password file")
        .trim()
        .to_owned()
}

/// An HTTPS client like [`crate::support::https_client`] whose connections leave from
/// `local_address` (any of 127.0.0.0/8 reaches a server on 127.0.0.1), so a test can speak
/// from several client addresses.
pub fn https_client_from(certificate_pem: &[u8], local_address: IpAddr) -> Client {
    let certificate =
        reqwest::Certificate::from_pem(certificate_pem).expect("development certificate is PEM");
    Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(certificate)
        .https_only(true)
        .timeout(STEP_TIMEOUT)
        .local_address(local_address)
        .build()
        .expect("build the HTTPS client")
}
