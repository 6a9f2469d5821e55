//! A day at a clinic, end to end: the real binary on a random port, over HTTPS trusting its
//! development certificate, on the embedded SQLite default.

#[path = "support/fresh_postgres.rs"]
mod fresh_postgres;
#[allow(dead_code)]
mod support;

use fresh_postgres::FreshPostgresDatabase;

use std::fs;
use std::time::{Duration, Instant};

use chartlog_domain::{PatientCommand, synthetic};
use reqwest::{Client, Method, StatusCode};
use serde_json::{Value, json};
use support::{Server, TestDir, https_client, passphrase, totp};

struct Api<'a> {
    server: &'a Server,
    client: Client,
}

struct Response {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text)
            .unwrap_or_else(|_| panic!("not JSON ({}): {}", self.status, self.text))
    }

    fn expect(self, status: StatusCode) -> Response {
        assert_eq!(self.status, status, "body: {}", self.text);
        self
    }
}

impl Api<'_> {
    async fn call(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, String)],
    ) -> Response {
        let mut request = self.client.request(method, self.server.url(path));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let text = response.text().await.expect("body");
        Response {
            status,
            headers,
            text,
        }
    }

    async fn get(&self, path: &str, token: &str) -> Response {
        self.call(Method::GET, path, Some(token), None, &[]).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> Response {
        self.call(Method::POST, path, Some(token), Some(body), &[])
            .await
    }

    async fn login(
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

    /// Logs in with a one-time password, sets the user's passphrase, enrolls TOTP when the
    /// role asks for it, and returns a full session's token and the TOTP secret.
    async fn first_login(
        &self,
        username: &str,
        one_time_password: &str,
    ) -> (String, Option<String>) {
        let answer = self
            .login(username, one_time_password, None)
            .await
            .expect(StatusCode::OK)
            .json();
        assert_eq!(answer["session"]["stage"], "must_change_password");
        let token = answer["token"].as_str().expect("token").to_owned();
        // Nothing else is allowed before the password is changed.
        self.get(
            "/patients/00000000-0000-0000-0000-000000000000/chart",
            &token,
        )
        .await
        .expect(StatusCode::FORBIDDEN);
        self.post(
            "/auth/password",
            &token,
            json!({ "current_password": one_time_password, "new_password": passphrase(username) }),
        )
        .await
        .expect(StatusCode::NO_CONTENT);
        // A password change ends every session, this one included.
        self.get("/auth/session", &token)
            .await
            .expect(StatusCode::UNAUTHORIZED);

        let answer = self
            .login(username, &passphrase(username), None)
            .await
            .expect(StatusCode::OK)
            .json();
        let token = answer["token"].as_str().expect("token").to_owned();
        if answer["session"]["stage"] == "full" {
            return (token, None);
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
        assert!(
            enrollment["otpauth_uri"]
                .as_str()
                .expect("uri")
                .starts_with("otpauth://totp/")
        );
        let codes = self
            .post(
                "/auth/second-factor/confirmation",
                &token,
                json!({ "code": totp(&secret, 0) }),
            )
            .await
            .expect(StatusCode::OK)
            .json();
        assert_eq!(codes["recovery_codes"].as_array().expect("codes").len(), 10);

        // From now on the password alone is not enough.
        self.login(username, &passphrase(username), None)
            .await
            .expect(StatusCode::UNAUTHORIZED);
        // The next step's code: the enrollment's own code is spent (replay protection).
        let answer = self
            .login(username, &passphrase(username), Some(totp(&secret, 30)))
            .await
            .expect(StatusCode::OK)
            .json();
        assert_eq!(answer["session"]["stage"], "full");
        (
            answer["token"].as_str().expect("token").to_owned(),
            Some(secret),
        )
    }
}

fn demographics(seed: u64) -> (Value, String, String) {
    let PatientCommand::RegisterPatient { demographics, .. } = synthetic::registration(seed) else {
        unreachable!("registration registers")
    };
    let json = serde_json::to_value(&demographics).expect("demographics serialize");
    let family = json["name"]["family"].as_str().expect("family").to_owned();
    let mrn = json["mrn"].as_str().expect("mrn").to_owned();
    (json, family, mrn)
}

async fn create_user(
    api: &Api<'_>,
    admin: &str,
    username: &str,
    role: &str,
    patient: Option<&str>,
) -> (String, String) {
    let mut body = json!({ "username": username, "role": role });
    if let Some(patient) = patient {
        body["patient_id"] = json!(patient);
    }
    let answer = api
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

/// Polls until `ready` accepts the answer: read models follow the log asynchronously.
async fn eventually(
    api: &Api<'_>,
    path: &str,
    token: &str,
    ready: impl Fn(&Response) -> bool,
) -> Response {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = api.get(path, token).await;
        if ready(&response) || Instant::now() > deadline {
            return response;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_at_the_clinic_on_sqlite() {
    a_day_at_the_clinic(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_day_at_the_clinic_on_postgres() {
    let database = FreshPostgresDatabase::create().await;
    a_day_at_the_clinic(&["--database-url", &database.url]).await;
    database.drop().await;
}

async fn a_day_at_the_clinic(extra_args: &[&str]) {
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), extra_args);
    let api = Api {
        server: &server,
        client: https_client(&fs::read(dir.certificate_path()).expect("certificate")),
    };

    // ---- The administrator bootstraps. ----
    let password_file = dir.data_dir().join("first-administrator-password");
    let stderr = server.wait_for_stderr("first-administrator-password");
    let admin_password = fs::read_to_string(&password_file).expect("password file");
    let admin_password = admin_password.trim();
    assert!(
        !stderr.contains(admin_password),
        "the password is never printed"
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&password_file)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let (admin, _) = api.first_login("admin", admin_password).await;

    let (physician_id, physician_otp) =
        create_user(&api, &admin, "dr.grey", "physician", None).await;
    let (_, nurse_otp) = create_user(&api, &admin, "nurse.joy", "nurse", None).await;
    let (radiologist_id, radiologist_otp) =
        create_user(&api, &admin, "dr.rad", "radiologist", None).await;
    let (auditor_id, auditor_otp) = create_user(&api, &admin, "auditor.ann", "auditor", None).await;
    let (_, analyst_otp) = create_user(&api, &admin, "analyst.al", "analyst", None).await;
    api.post(
        "/users",
        &admin,
        json!({ "username": "dr.grey", "role": "nurse" }),
    )
    .await
    .expect(StatusCode::CONFLICT);
    // Administrators see no PHI.
    api.get(
        "/patients/00000000-0000-0000-0000-000000000000/chart",
        &admin,
    )
    .await
    .expect(StatusCode::FORBIDDEN);

    // ---- The physician logs in with TOTP, registers a patient and records the visit. ----
    let (physician, _) = api.first_login("dr.grey", &physician_otp).await;
    let (demographics_a, family_a, mrn_a) = demographics(11);
    let registered = api
        .post("/patients", &physician, demographics_a)
        .await
        .expect(StatusCode::CREATED)
        .json();
    let patient = registered["patient_id"]
        .as_str()
        .expect("patient id")
        .to_owned();
    assert_eq!(
        registered["stream_version"], 2,
        "registered, then the care relationship"
    );

    let observation = json!({
        "code": { "system": "http://loinc.org", "code": "8867-4" },
        "value": { "quantity": { "value": "72", "unit": "/min" } },
        "effective_at": "2026-11-27T08:30:00Z",
    });
    let first = api
        .call(
            Method::POST,
            &format!("/patients/{patient}/record-observation"),
            Some(&physician),
            Some(observation.clone()),
            &[
                ("idempotency-key", "visit-1-pulse".to_owned()),
                ("if-match", "\"2\"".to_owned()),
            ],
        )
        .await
        .expect(StatusCode::OK);
    // A retry with the same key gets the same answer, and records nothing twice.
    let retry = api
        .call(
            Method::POST,
            &format!("/patients/{patient}/record-observation"),
            Some(&physician),
            Some(observation.clone()),
            &[
                ("idempotency-key", "visit-1-pulse".to_owned()),
                ("if-match", "\"2\"".to_owned()),
            ],
        )
        .await
        .expect(StatusCode::OK);
    assert_eq!(first.json(), retry.json());
    assert_eq!(
        retry
            .headers
            .get("idempotent-replayed")
            .map(|v| v.to_str().expect("ascii")),
        Some("true")
    );
    // A stale If-Match is refused.
    api.call(
        Method::POST,
        &format!("/patients/{patient}/record-observation"),
        Some(&physician),
        Some(observation),
        &[("if-match", "\"2\"".to_owned())],
    )
    .await
    .expect(StatusCode::PRECONDITION_FAILED);
    // Unknown fields are refused, naming nothing of the body.
    let refused = api
        .post(
            &format!("/patients/{patient}/write-note"),
            &physician,
            json!({ "text": "Chest pain", "colour": "blue" }),
        )
        .await
        .expect(StatusCode::BAD_REQUEST);
    assert!(!refused.text.contains("Chest pain"));

    let note = api
        .post(
            &format!("/patients/{patient}/write-note"),
            &physician,
            json!({ "text": "Seen for palpitations; ECG normal." }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let note_id = note["record_id"].as_str().expect("note id").to_owned();
    api.post(
        &format!("/patients/{patient}/sign-note"),
        &physician,
        json!({ "note_id": note_id, "password": "not the password at all" }),
    )
    .await
    .expect(StatusCode::UNAUTHORIZED);
    let signed = api
        .post(
            &format!("/patients/{patient}/sign-note"),
            &physician,
            json!({ "note_id": note_id, "password": passphrase("dr.grey") }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    // Read-your-writes by global position: the answer waits for the read model.
    let position = signed["position"].as_u64().expect("position");
    let chart = api
        .get(
            &format!("/patients/{patient}/chart?min_position={position}"),
            &physician,
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let unreachable = api
        .get(
            &format!("/patients/{patient}/chart?min_position={}", u64::MAX / 2),
            &physician,
        )
        .await
        .expect(StatusCode::UNPROCESSABLE_ENTITY)
        .json();
    assert_eq!(unreachable["error"], "position_beyond_log", "{unreachable}");
    assert_eq!(chart["demographics"]["mrn"], mrn_a);
    assert_eq!(
        chart["observations"]
            .as_array()
            .expect("observations")
            .len(),
        1
    );
    assert!(chart["notes"][0]["signed_at"].is_string(), "{chart}");

    // Look-up by MRN, and by family name with birth date, in the body (never the URL).
    let found = api
        .post("/patients/search", &physician, json!({ "mrn": mrn_a }))
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(found["patient_ids"], json!([patient]));
    let birth_date = chart["demographics"]["birth_date"].clone();
    let found = api
        .post(
            "/patients/search",
            &physician,
            json!({ "family_name": family_a, "birth_date": birth_date }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(found["patient_ids"], json!([patient]));
    api.post(
        "/patients/search",
        &physician,
        json!({ "family_name": family_a }),
    )
    .await
    .expect(StatusCode::UNPROCESSABLE_ENTITY);

    // ---- A nurse outside the care team is denied, and breaks the glass. ----
    let (nurse, _) = api.first_login("nurse.joy", &nurse_otp).await;
    let denied = api
        .get(&format!("/patients/{patient}/chart"), &nurse)
        .await
        .expect(StatusCode::FORBIDDEN);
    assert!(!denied.text.contains(&family_a));
    let grant = api
        .post(
            &format!("/patients/{patient}/break-glass"),
            &nurse,
            json!({ "reason": "Patient collapsed in the waiting room; attending unavailable." }),
        )
        .await
        .expect(StatusCode::CREATED)
        .json();
    let grant_id = grant["grant_id"].as_str().expect("grant").to_owned();
    let chart = api
        .get(&format!("/patients/{patient}/chart"), &nurse)
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(chart["demographics"]["mrn"], mrn_a);
    server.wait_for_stderr("break-glass access opened");

    // ---- Consent: notes hidden from nurses; a named radiologist blocked inside the team. ----
    let hidden_from_nurses = api
        .post(
            &format!("/patients/{patient}/grant-consent-restriction"),
            &physician,
            json!({ "kind": { "hide_notes_from_role": "nurse" } }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let nurse_view = api
        .get(&format!("/patients/{patient}/chart"), &nurse)
        .await
        .expect(StatusCode::OK)
        .json();
    assert!(nurse_view["notes"].is_null(), "{nurse_view}");
    assert!(nurse_view["observations"].is_array());
    // Break-glass is for the emergency: it does not lift the restriction aimed at the nurse
    // (nor, policy::may_change_access, change the care team).
    let refused = api
        .post(
            &format!("/patients/{patient}/revoke-consent-restriction"),
            &nurse,
            json!({ "restriction_id": hidden_from_nurses["record_id"] }),
        )
        .await
        .expect(StatusCode::FORBIDDEN)
        .json();
    assert_eq!(refused["error"], "access_change_refused", "{refused}");
    let nurse_chart = api
        .get(&format!("/patients/{patient}/chart"), &nurse)
        .await
        .expect(StatusCode::OK);
    let nurse_view = nurse_chart.json();
    assert!(nurse_view["notes"].is_null(), "{nurse_view}");
    // The note's text is nowhere in what the nurse reads: not in the chart under another
    // name, not in the history's changes. The physician's history shows it (the control).
    let note_text = "Seen for palpitations";
    assert!(nurse_chart.text.contains(&mrn_a), "{}", nurse_chart.text);
    assert!(
        !nurse_chart.text.contains(note_text),
        "the nurse's chart holds the hidden note: {}",
        nurse_chart.text
    );
    let history_path = format!("/patients/{patient}/history?limit=200");
    let physician_history = eventually(&api, &history_path, &physician, |r| {
        r.status == StatusCode::OK && r.text.contains(note_text)
    })
    .await
    .expect(StatusCode::OK);
    assert!(
        physician_history.text.contains(note_text),
        "{}",
        physician_history.text
    );
    let nurse_history = api.get(&history_path, &nurse).await.expect(StatusCode::OK);
    let nurse_entries = nurse_history.json()["entries"]
        .as_array()
        .expect("entries")
        .len();
    assert!(
        nurse_entries > 0,
        "the nurse reads the rest of the history: {}",
        nurse_history.text
    );
    assert!(
        !nurse_history.text.contains(note_text),
        "the nurse's history holds the hidden note: {}",
        nurse_history.text
    );
    api.post(
        &format!("/patients/{patient}/assign-care-relationship"),
        &physician,
        json!({ "clinician": radiologist_id }),
    )
    .await
    .expect(StatusCode::OK);
    api.post(
        &format!("/patients/{patient}/grant-consent-restriction"),
        &physician,
        json!({ "kind": { "block_user": radiologist_id } }),
    )
    .await
    .expect(StatusCode::OK);
    // A user id in a body must name an account, and a care relationship a clinician's.
    let nobody = "00000000-0000-7000-8000-000000000000";
    for (command, body, code) in [
        (
            "assign-care-relationship",
            json!({ "clinician": nobody }),
            "unknown_user",
        ),
        (
            "assign-care-relationship",
            json!({ "clinician": auditor_id }),
            "not_a_clinician",
        ),
        (
            "grant-consent-restriction",
            json!({ "kind": { "block_user": nobody } }),
            "unknown_user",
        ),
    ] {
        let refused = api
            .post(&format!("/patients/{patient}/{command}"), &physician, body)
            .await
            .expect(StatusCode::UNPROCESSABLE_ENTITY)
            .json();
        assert_eq!(refused["error"], code, "{command}: {refused}");
    }

    // ---- The auditor sees it and reviews it. ----
    let (auditor, _) = api.first_login("auditor.ann", &auditor_otp).await;
    // Reads and break-glass openings reach the trail through the signed audit stream and its
    // projection: moments after they happened.
    let trail = eventually(
        &api,
        &format!("/audit-trail?patient_id={patient}&action=break_glass"),
        &auditor,
        |r| {
            r.status == StatusCode::OK
                && r.json()["rows"]
                    .as_array()
                    .is_some_and(|rows| !rows.is_empty())
        },
    )
    .await
    .expect(StatusCode::OK)
    .json();
    assert_eq!(trail["rows"].as_array().expect("rows").len(), 1, "{trail}");
    assert_eq!(trail["rows"][0]["break_glass"], true);
    let reads = eventually(
        &api,
        &format!("/audit-trail?patient_id={patient}&action=read"),
        &auditor,
        |r| {
            r.status == StatusCode::OK
                && r.json()["rows"].as_array().is_some_and(|rows| {
                    rows.iter()
                        .any(|row| row["break_glass"] == true && row["outcome"] == "success")
                })
        },
    )
    .await
    .expect(StatusCode::OK)
    .json();
    assert!(
        reads["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .any(|row| row["break_glass"] == true && row["outcome"] == "success"),
        "the nurse's read is marked: {reads}"
    );
    let reviews = api
        .get("/break-glass/reviews", &auditor)
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(reviews["reviews"][0]["grant_id"], grant_id.as_str());
    api.post(
        &format!("/break-glass/reviews/{grant_id}"),
        &auditor,
        json!({ "verdict": "justified" }),
    )
    .await
    .expect(StatusCode::NO_CONTENT);
    let reviews = api
        .get("/break-glass/reviews", &auditor)
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(reviews["reviews"].as_array().expect("reviews").len(), 0);
    // Auditors read no chart.
    api.get(&format!("/patients/{patient}/chart"), &auditor)
        .await
        .expect(StatusCode::FORBIDDEN);

    // ---- The patient reads their history and their accounting of disclosures. ----
    let (_, patient_otp) = create_user(&api, &admin, "pat.a", "patient", Some(&patient)).await;
    let (patient_token, _) = api.first_login("pat.a", &patient_otp).await;
    let history = eventually(
        &api,
        &format!("/patients/{patient}/history"),
        &patient_token,
        |r| {
            r.status == StatusCode::OK
                && r.json()["entries"].as_array().is_some_and(|e| e.len() >= 5)
        },
    )
    .await
    .expect(StatusCode::OK)
    .json();
    assert!(
        history["entries"].as_array().expect("entries").len() >= 5,
        "{history}"
    );
    let disclosures = eventually(
        &api,
        &format!("/patients/{patient}/disclosures"),
        &patient_token,
        |r| {
            r.status == StatusCode::OK
                && r.json()["rows"]
                    .as_array()
                    .is_some_and(|rows| rows.iter().any(|row| row["break_glass"] == true))
        },
    )
    .await
    .expect(StatusCode::OK)
    .json();
    let rows = disclosures["rows"].as_array().expect("rows");
    assert!(
        rows.iter().any(|row| row["break_glass"] == true),
        "{disclosures}"
    );
    // Each disclosure states its purpose: the emergency's, treatment for the care team, and
    // oversight for the auditor.
    assert!(
        rows.iter().all(|row| {
            let purpose = &row["purpose_of_use"];
            if row["break_glass"] == true {
                purpose == "emergency_treatment"
            } else if row["role"] == "auditor" {
                purpose == "oversight"
            } else {
                purpose == "treatment"
            }
        }),
        "{disclosures}"
    );
    assert!(
        rows.iter().all(|row| row["role"] != "patient"),
        "own reads are not disclosures"
    );
    // Who, when, what and why; not the staff's workstation addresses, which the trail keeps
    // for auditors.
    assert!(
        rows.iter().all(|row| row["client_address"].is_null()),
        "{disclosures}"
    );
    // The patient sees the restrictions recorded on their behalf, and records their own: a
    // block on their physician holds inside the care team until they revoke it.
    let consent = api
        .get(
            &format!("/patients/{patient}/consent-restrictions"),
            &patient_token,
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let restrictions = consent["restrictions"].as_array().expect("restrictions");
    assert_eq!(restrictions.len(), 2, "{consent}");
    assert!(
        restrictions
            .iter()
            .any(|r| r["kind"]["block_user"] == radiologist_id.as_str() && r["revoked"] == false),
        "{consent}"
    );
    assert!(
        restrictions
            .iter()
            .any(|r| r["kind"]["hide_notes_from_role"] == "nurse"),
        "{consent}"
    );
    let block = api
        .post(
            &format!("/patients/{patient}/grant-consent-restriction"),
            &patient_token,
            json!({ "kind": { "block_user": physician_id } }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let block_id = block["record_id"]
        .as_str()
        .expect("restriction id")
        .to_owned();
    api.get(&format!("/patients/{patient}/chart"), &physician)
        .await
        .expect(StatusCode::FORBIDDEN);
    let consent = api
        .get(
            &format!("/patients/{patient}/consent-restrictions"),
            &patient_token,
        )
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(consent["stream_version"], block["stream_version"]);
    let stale_version = consent["stream_version"].as_u64().expect("version") - 1;
    let revoke = json!({ "restriction_id": block_id });
    let revoke_path = format!("/patients/{patient}/revoke-consent-restriction");
    api.call(
        Method::POST,
        &revoke_path,
        Some(&patient_token),
        Some(revoke.clone()),
        &[("if-match", format!("\"{stale_version}\""))],
    )
    .await
    .expect(StatusCode::PRECONDITION_FAILED);
    api.call(
        Method::POST,
        &revoke_path,
        Some(&patient_token),
        Some(revoke),
        &[("if-match", format!("\"{}\"", consent["stream_version"]))],
    )
    .await
    .expect(StatusCode::OK);
    api.get(&format!("/patients/{patient}/chart"), &physician)
        .await
        .expect(StatusCode::OK);
    // The patient sees who cares for them; so does the physician; the administrator, who
    // assigns the team, reads no part of a record.
    for token in [&patient_token, &physician] {
        let team = api
            .get(&format!("/patients/{patient}/care-team"), token)
            .await
            .expect(StatusCode::OK)
            .json();
        let clinicians = team["clinicians"].as_array().expect("clinicians");
        assert!(clinicians.contains(&json!(physician_id)), "{team}");
        assert!(clinicians.contains(&json!(radiologist_id)), "{team}");
    }
    api.get(&format!("/patients/{patient}/care-team"), &admin)
        .await
        .expect(StatusCode::FORBIDDEN);
    // Consent is the only thing a patient changes.
    api.post(
        &format!("/patients/{patient}/assign-care-relationship"),
        &patient_token,
        json!({ "clinician": physician_id }),
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    // A patient may not look up who else is a patient here.
    api.post("/patients/search", &patient_token, json!({ "mrn": mrn_a }))
        .await
        .expect(StatusCode::FORBIDDEN);
    api.get("/audit-trail", &patient_token)
        .await
        .expect(StatusCode::FORBIDDEN);

    // ---- Object-level checks: every PHI route, as everyone who must not pass. ----
    let (demographics_b, _, _) = demographics(12);
    let other = api
        .post("/patients", &physician, demographics_b)
        .await
        .expect(StatusCode::CREATED)
        .json();
    let other_patient = other["patient_id"].as_str().expect("id").to_owned();
    let (radiologist, _) = api.first_login("dr.rad", &radiologist_otp).await;
    // In the care team, yet blocked by the patient's consent.
    api.get(&format!("/patients/{patient}/chart"), &radiologist)
        .await
        .expect(StatusCode::FORBIDDEN);
    let revoked = api
        .login(
            "nurse.joy",
            &passphrase("nurse.joy"),
            Some("000000".to_owned()),
        )
        .await;
    assert_eq!(
        revoked.status,
        StatusCode::UNAUTHORIZED,
        "a wrong code is refused"
    );
    let logged_out = api
        .login("auditor.ann", &passphrase("auditor.ann"), None)
        .await
        .expect(StatusCode::OK)
        .json()["token"]
        .as_str()
        .expect("token")
        .to_owned();
    api.post("/auth/logout", &logged_out, json!({}))
        .await
        .expect(StatusCode::NO_CONTENT);

    // Every route on a patient's record, from the server's own OpenAPI document, except
    // break-glass, whose purpose is to let a clinician outside the care team in.
    let document = api
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await
        .expect(StatusCode::OK)
        .json();
    let mut phi_routes: Vec<(Method, String, Value)> = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        if !path.contains("{patient_id}") || path.ends_with("/break-glass") {
            continue;
        }
        let concrete = path.replace("{patient_id}", &other_patient);
        if item.get("get").is_some() {
            phi_routes.push((Method::GET, concrete.clone(), Value::Null));
        }
        if item.get("post").is_some() {
            phi_routes.push((Method::POST, concrete, json!({})));
        }
    }
    assert!(phi_routes.len() >= 20, "{phi_routes:?}");
    let callers: Vec<(&str, Option<&str>)> = vec![
        ("another patient", Some(&patient_token)),
        ("an unrelated clinician", Some(&radiologist)),
        ("a revoked session", Some(&logged_out)),
        ("no session", None),
    ];
    let other_family = serde_json::to_value(demographics(12).0).expect("json")["name"]["family"]
        .as_str()
        .expect("family")
        .to_owned();
    for (method, path, body) in &phi_routes {
        for (who, token) in &callers {
            let body = (!body.is_null()).then(|| body.clone());
            let response = api.call(method.clone(), path, *token, body, &[]).await;
            assert!(
                matches!(
                    response.status,
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
                ),
                "{who} on {method} {path}: {} {}",
                response.status,
                response.text
            );
            assert!(
                !response.text.contains(&other_family),
                "{who} on {path} leaked PHI"
            );
            assert!(response.json()["error"].is_string());
        }
    }
    let expected_denials = phi_routes.len() * callers.len();
    let denied_in = |response: &Response| {
        response.json()["rows"].as_array().map_or(0, |rows| {
            rows.iter().filter(|row| row["outcome"] == "denied").count()
        })
    };
    let denials = eventually(
        &api,
        &format!("/audit-trail?patient_id={other_patient}&limit=500"),
        &auditor,
        |r| r.status == StatusCode::OK && denied_in(r) >= expected_denials,
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(
        denied_in(&denials),
        expected_denials,
        "every denial is audited, once"
    );

    // A read the caller was cleared for that finds no record is audited too.
    let unregistered = "01900000-0000-7000-8000-00000000beef";
    api.post(
        &format!("/patients/{unregistered}/break-glass"),
        &nurse,
        json!({ "reason": "Unconscious arrival; checking for an existing record." }),
    )
    .await
    .expect(StatusCode::CREATED);
    for read in ["chart", "history", "care-team"] {
        api.get(&format!("/patients/{unregistered}/{read}"), &nurse)
            .await
            .expect(StatusCode::NOT_FOUND);
    }
    let failures_in = |response: &Response| {
        response.json()["rows"].as_array().map_or(0, |rows| {
            rows.iter()
                .filter(|row| row["outcome"] == "failure" && row["action"] == "read")
                .count()
        })
    };
    let failures = eventually(
        &api,
        &format!("/audit-trail?patient_id={unregistered}"),
        &auditor,
        |r| r.status == StatusCode::OK && failures_in(r) >= 3,
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(failures_in(&failures), 3, "{}", failures.text);

    // ---- The analyst exports de-identified data holding no identifier. ----
    let (analyst, _) = api.first_login("analyst.al", &analyst_otp).await;
    let export = eventually(
        &api,
        "/deidentified/patients?format=ndjson",
        &analyst,
        |r| r.status == StatusCode::OK && r.text.lines().count() >= 2,
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(export.text.lines().count(), 2, "{}", export.text);
    for identifier in [&family_a, &mrn_a, &patient, &other_patient, &other_family] {
        assert!(
            !export.text.contains(identifier.as_str()),
            "the export holds an identifier"
        );
    }
    let csv = api
        .get("/deidentified/observations?format=csv", &analyst)
        .await
        .expect(StatusCode::OK);
    assert!(csv.text.starts_with("row_key,pseudonym,"), "{}", csv.text);
    assert_eq!(
        csv.text.lines().count(),
        2,
        "a header and the one observation"
    );
    api.get(&format!("/patients/{patient}/chart"), &analyst)
        .await
        .expect(StatusCode::FORBIDDEN);

    // ---- A legal hold keeps a record from erasure until it is released. ----
    let hold = api
        .post(
            &format!("/patients/{other_patient}/place-legal-hold"),
            &admin,
            json!({ "reason": "litigation" }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let hold_id = hold["record_id"]
        .as_str()
        .expect("the hold's id")
        .to_owned();
    let erase = format!("/patients/{other_patient}/erase");
    let refused = api
        .post(&erase, &admin, json!({ "reason": "patient_request" }))
        .await
        .expect(StatusCode::UNPROCESSABLE_ENTITY)
        .json();
    assert_eq!(refused["error"], "under_legal_hold", "{refused}");
    api.post(
        &format!("/patients/{other_patient}/release-legal-hold"),
        &physician,
        json!({ "hold_id": hold_id }),
    )
    .await
    .expect(StatusCode::FORBIDDEN);
    let released = api
        .post(
            &format!("/patients/{other_patient}/release-legal-hold"),
            &admin,
            json!({ "hold_id": hold_id }),
        )
        .await
        .expect(StatusCode::OK)
        .json();
    // The hold is the administrators' business: the record history shows it to no role
    // that reads history (the physician caring for the patient here), as the chart does.
    // Read once the history has folded the release.
    let history = api
        .get(
            &format!(
                "/patients/{other_patient}/history?min_position={}",
                released["position"]
            ),
            &physician,
        )
        .await
        .expect(StatusCode::OK)
        .json();
    let kinds: Vec<&str> = history["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|entry| entry["entry_kind"].as_str())
        .collect();
    assert!(kinds.contains(&"demographics"), "{history}");
    assert!(!kinds.contains(&"legal_hold"), "{history}");
    // The record was written minutes ago: its retention period (10 years by default) has
    // not elapsed, and the answer says so without the patient's birth date.
    let refused = api
        .post(
            &erase,
            &admin,
            json!({ "reason": "retention_period_elapsed" }),
        )
        .await
        .expect(StatusCode::UNPROCESSABLE_ENTITY)
        .json();
    assert_eq!(
        refused["error"], "retention_period_not_elapsed",
        "{refused}"
    );
    assert!(
        refused["message"]
            .as_str()
            .is_some_and(|message| message.contains("10 year(s)")),
        "{refused}"
    );
    // The de-identified rows before the erasure: the patient with the observation stays;
    // the other patient row is the one to be erased.
    let pseudonyms = |export: &Response| -> Vec<String> {
        export
            .text
            .lines()
            .map(|line| {
                let row: Value = serde_json::from_str(line).expect("an NDJSON row");
                row["pseudonym"].as_str().expect("pseudonym").to_owned()
            })
            .collect()
    };
    let observations = api
        .get("/deidentified/observations?format=ndjson", &analyst)
        .await
        .expect(StatusCode::OK);
    let kept = pseudonyms(&observations);
    assert_eq!(kept.len(), 1, "{}", observations.text);
    let kept = kept[0].clone();
    let patients = api
        .get("/deidentified/patients?format=ndjson", &analyst)
        .await
        .expect(StatusCode::OK);
    let erased: Vec<String> = pseudonyms(&patients)
        .into_iter()
        .filter(|pseudonym| *pseudonym != kept)
        .collect();
    assert_eq!(erased.len(), 1, "{}", patients.text);
    let erased = erased[0].clone();
    let other_mrn = demographics(12).2;
    let found = api
        .post("/patients/search", &physician, json!({ "mrn": other_mrn }))
        .await
        .expect(StatusCode::OK)
        .json();
    assert_eq!(found["patient_ids"], json!([other_patient]), "{found}");

    api.post(&erase, &admin, json!({ "reason": "patient_request" }))
        .await
        .expect(StatusCode::OK);

    // The erasure takes effect on the running server: the chart and history answer that
    // the record was erased, the MRN finds no one, and the de-identified views drop the
    // patient's rows. Each is polled (read models follow the log), then asserted. The care
    // relationship went with the record: the physician is refused like any outsider, and
    // a clinician who breaks the glass is told the record was erased.
    api.post(
        &format!("/patients/{other_patient}/break-glass"),
        &nurse,
        json!({ "reason": "Readmitted unconscious; checking the earlier record." }),
    )
    .await
    .expect(StatusCode::CREATED);
    for read in ["chart", "history"] {
        let path = format!("/patients/{other_patient}/{read}");
        let gone = eventually(&api, &path, &nurse, |r| r.status == StatusCode::GONE)
            .await
            .expect(StatusCode::GONE);
        assert_eq!(gone.json()["error"], "erased", "{read}: {}", gone.text);
        assert!(!gone.text.contains(&other_family), "{read}: {}", gone.text);
        let refused = api
            .get(&path, &physician)
            .await
            .expect(StatusCode::FORBIDDEN);
        assert!(
            !refused.text.contains(&other_family),
            "{read}: {}",
            refused.text
        );
    }
    let search_deadline = Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found = api
            .post("/patients/search", &physician, json!({ "mrn": other_mrn }))
            .await
            .expect(StatusCode::OK)
            .json();
        if found["patient_ids"] == json!([]) || Instant::now() > search_deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        found["patient_ids"],
        json!([]),
        "the erased MRN finds no one: {found}"
    );
    let export = eventually(
        &api,
        "/deidentified/patients?format=ndjson",
        &analyst,
        |r| r.status == StatusCode::OK && !r.text.contains(&erased),
    )
    .await
    .expect(StatusCode::OK);
    assert_eq!(
        pseudonyms(&export),
        vec![kept.clone()],
        "only the patient not erased is left"
    );
    for table in [
        "observations",
        "conditions",
        "medication_orders",
        "allergies",
    ] {
        let export = api
            .get(&format!("/deidentified/{table}?format=ndjson"), &analyst)
            .await
            .expect(StatusCode::OK);
        assert!(!export.text.contains(&erased), "{table}: {}", export.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_is_logged_out() {
    let dir = TestDir::new();
    let server = Server::start(dir.data_dir(), &["--idle-timeout-seconds", "2"]);
    let api = Api {
        server: &server,
        client: https_client(&fs::read(dir.certificate_path()).expect("certificate")),
    };
    server.wait_for_stderr("first-administrator-password");
    let password =
        fs::read_to_string(dir.data_dir().join("first-administrator-password")).expect("password");
    let (admin, _) = api.first_login("admin", password.trim()).await;
    api.get("/users", &admin).await.expect(StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(3_000)).await;
    let expired = api
        .get("/users", &admin)
        .await
        .expect(StatusCode::UNAUTHORIZED)
        .json();
    assert_eq!(expired["error"], "session_expired");
    // Once ended, it stays ended, on every route of a patient's record too.
    api.get("/auth/session", &admin)
        .await
        .expect(StatusCode::UNAUTHORIZED);
    let document = api
        .call(Method::GET, "/openapi.json", None, None, &[])
        .await
        .expect(StatusCode::OK)
        .json();
    let patient = uuid::Uuid::now_v7().to_string();
    let mut checked = 0;
    for (path, item) in document["paths"].as_object().expect("paths") {
        if !path.contains("{patient_id}") {
            continue;
        }
        let path = path.replace("{patient_id}", &patient);
        for (method, present) in [
            (Method::GET, item.get("get")),
            (Method::POST, item.get("post")),
        ] {
            if present.is_some() {
                let body = (method == Method::POST).then(|| json!({}));
                api.call(method, &path, Some(&admin), body, &[])
                    .await
                    .expect(StatusCode::UNAUTHORIZED);
                checked += 1;
            }
        }
    }
    assert!(checked >= 20);
}
