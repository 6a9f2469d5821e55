//! The application's behaviour through actix's in-process test service, over a real SQLite
//! database in a temp dir (the end-to-end tests drive the real binary over HTTPS).

use std::sync::Arc;

use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use chartlog_access::{AccessSecrets, AccessSettings, Accounts};
use chartlog_crypto::{
    DataKeys, EventSigner, KekId, KeyRing, MacKey, SignatureVerifier, SignerKeyId,
};
use chartlog_projections::audit::AuditRow;
use chartlog_projections::db::ProjectionDb;
use chartlog_store::PatientLedger;
use chartlog_store::sqlite::{SqliteEventStore, SqliteKeyStore};
use serde_json::Value;

use crate::audit::{AuditSink, AuditUnavailable, DatabaseAuditSink};
use crate::notify::LogNotifier;
use crate::records::LedgerRecords;
use crate::routes::{Permission, ROUTES, Verb};
use crate::{ApiConfig, NotReady, ReadinessProbe, Transport, app};

struct Ready;

#[async_trait::async_trait]
impl ReadinessProbe for Ready {
    async fn check(&self) -> Result<(), NotReady> {
        Ok(())
    }
}

struct DatabaseDown;

#[async_trait::async_trait]
impl ReadinessProbe for DatabaseDown {
    async fn check(&self) -> Result<(), NotReady> {
        Err(NotReady::new("database unreachable"))
    }
}

struct AuditDown;

#[async_trait::async_trait]
impl AuditSink for AuditDown {
    async fn record(&self, _rows: Vec<AuditRow>) -> Result<(), AuditUnavailable> {
        Err(AuditUnavailable)
    }
}

/// A complete configuration over a fresh SQLite database.
async fn config(
    transport: Transport,
    readiness: Arc<dyn ReadinessProbe>,
) -> (ApiConfig, tempfile::TempDir) {
    let (config, dir, _) = config_and_runner(transport, readiness, AccessSettings::default()).await;
    (config, dir)
}

type SqliteRunner = chartlog_projections::ProjectionRunner<SqliteEventStore, SqliteKeyStore>;

/// [`config`] with these access settings, and a projection runner (chart and history) over
/// the same store, for a test to catch the read models up when it needs them.
async fn config_and_runner(
    transport: Transport,
    readiness: Arc<dyn ReadinessProbe>,
    access: AccessSettings,
) -> (ApiConfig, tempfile::TempDir, SqliteRunner) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = SqliteEventStore::open(&dir.path().join("chartlog.db"))
        .await
        .expect("open the store");
    let pool = store.pool().clone();
    let signer = EventSigner::generate(SignerKeyId::generate());
    let mut verifier = SignatureVerifier::new();
    verifier
        .trust(signer.key_id().clone(), signer.verifying_key_bytes())
        .expect("trust the signer");
    let keys = Arc::new(DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        SqliteKeyStore::new(pool.clone()),
    ));
    let store = Arc::new(store);
    let verifier = Arc::new(verifier);
    let ledger = PatientLedger::new(
        store.clone(),
        keys.clone(),
        Arc::new(signer),
        verifier.clone(),
    );
    let db = ProjectionDb::Sqlite(pool);
    let index_key = Arc::new(MacKey::generate());
    let runner = chartlog_projections::ProjectionRunner::new(
        store,
        keys,
        verifier,
        db.clone(),
        vec![
            Arc::new(chartlog_projections::chart::ChartProjection::new(
                index_key.clone(),
            )),
            Arc::new(chartlog_projections::history::HistoryProjection),
        ],
    );
    let config = ApiConfig {
        transport,
        readiness,
        records: Arc::new(LedgerRecords::new(ledger, db.clone(), index_key)),
        accounts: Accounts::new(db.clone(), AccessSecrets::ephemeral(), access),
        audit: Arc::new(DatabaseAuditSink::new(db.clone())),
        notifier: Arc::new(LogNotifier),
        refusal_watch: Arc::new(crate::alerts::RefusalWatch::new(
            crate::alerts::RefusalAlertSettings::default(),
        )),
        read_models: db,
        public_base_url: "https://chartlog.test".to_owned(),
        rate_limiter: Arc::new(crate::limits::ClientRateLimiter::new(
            crate::limits::RateLimit::default(),
        )),
        identity_provider: None,
        trusted_proxies: crate::client_address::TrustedProxies::default(),
    };
    (config, dir, runner)
}

fn header<'a, B>(response: &'a ServiceResponse<B>, name: &str) -> Option<&'a str> {
    response
        .headers()
        .get(name)
        .map(|value| value.to_str().expect("ASCII header"))
}

fn assert_security_headers<B>(response: &ServiceResponse<B>) {
    assert_eq!(header(response, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(response, "x-frame-options"), Some("DENY"));
    assert_eq!(
        header(response, "content-security-policy"),
        Some("default-src 'none'; frame-ancestors 'none'")
    );
    assert_eq!(header(response, "cache-control"), Some("no-store"));
    assert_eq!(header(response, "referrer-policy"), Some("no-referrer"));
}

#[actix_web::test]
async fn healthz_is_ok_with_security_headers_and_hsts_over_tls() {
    let (config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    let service = test::init_service(app(config)).await;
    let response =
        test::call_service(&service, TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_security_headers(&response);
    assert_eq!(
        header(&response, "strict-transport-security"),
        Some("max-age=63072000; includeSubDomains")
    );
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body, serde_json::json!({"status": "ok"}));
}

#[actix_web::test]
async fn plain_http_sends_no_hsts() {
    let (config, _dir) = config(Transport::PlainHttp, Arc::new(Ready)).await;
    let service = test::init_service(app(config)).await;
    let response =
        test::call_service(&service, TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_security_headers(&response);
    assert_eq!(header(&response, "strict-transport-security"), None);
}

#[actix_web::test]
async fn readyz_reports_the_probe() {
    let (ready_config, _ready_dir) = config(Transport::Tls, Arc::new(Ready)).await;
    let ready = test::init_service(app(ready_config)).await;
    let response = test::call_service(&ready, TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body, serde_json::json!({"status": "ready"}));

    let (down_config, _down_dir) = config(Transport::Tls, Arc::new(DatabaseDown)).await;
    let down = test::init_service(app(down_config)).await;
    let response = test::call_service(&down, TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_security_headers(&response);
    let body: Value = test::read_body_json(response).await;
    assert_eq!(
        body,
        serde_json::json!({"error": "not_ready", "message": "database unreachable"})
    );
}

#[actix_web::test]
async fn unknown_routes_and_methods_answer_in_the_error_shape() {
    let (config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    let service = test::init_service(app(config)).await;

    let response = test::call_service(&service, TestRequest::get().uri("/nope").to_request()).await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert_security_headers(&response);
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body["error"], "not_found");
    assert!(body["message"].is_string());

    let response =
        test::call_service(&service, TestRequest::post().uri("/healthz").to_request()).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_security_headers(&response);
    assert_eq!(
        header(&response, "allow"),
        Some("GET"),
        "RFC 9110 wants Allow on 405"
    );
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body["error"], "method_not_allowed");

    let response =
        test::call_service(&service, TestRequest::delete().uri("/users").to_request()).await;
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(header(&response, "allow"), Some("GET, POST"));
}

/// A rate limit of `burst` requests, then one per second: small enough to spend in a test.
fn burst_then_one_per_second(burst: u32) -> Arc<crate::limits::ClientRateLimiter> {
    Arc::new(crate::limits::ClientRateLimiter::new(
        crate::limits::RateLimit {
            per_second: std::num::NonZeroU32::MIN,
            burst: std::num::NonZeroU32::new(burst).expect("non-zero"),
        },
    ))
}

/// Bug this catches: the rate limiter keyed a public route's request on whatever bearer
/// token it carried, which nothing there checks, so a client inventing a token per request
/// had a fresh allowance for every login attempt.
#[actix_web::test]
async fn invented_tokens_on_public_routes_are_limited_by_address() {
    const BURST: u32 = 3;
    let (mut config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    config.rate_limiter = burst_then_one_per_second(BURST);
    let accounts = config.accounts.clone();
    let service = test::init_service(app(config)).await;
    let (_, one_time) = accounts
        .create_user(
            chartlog_access::NewUser {
                username: chartlog_access::Username::parse("dr.quinn").expect("name"),
                role: chartlog_domain::Role::Auditor,
                patient_id: None,
                sso_subject: None,
            },
            crate::now(),
        )
        .await
        .expect("account");
    let client: std::net::SocketAddr = "192.0.2.10:40000".parse().expect("address");
    let session = accounts
        .login(
            chartlog_access::LoginAttempt {
                username: "dr.quinn".to_owned(),
                password: one_time.to_password(),
                second_factor: None,
                client_address: client.ip(),
            },
            crate::now(),
        )
        .await
        .expect("login");

    let mut statuses = Vec::new();
    for n in 0..3 * BURST {
        // An empty body: refused before any password is hashed, after the limiter.
        let request = TestRequest::post()
            .uri("/auth/login")
            .peer_addr(client)
            .insert_header(("authorization", format!("Bearer invented-token-{n}")))
            .insert_header(("content-type", "application/json"))
            .set_payload("{}")
            .to_request();
        statuses.push(test::call_service(&service, request).await.status());
    }
    let limited = statuses
        .iter()
        .filter(|status| **status == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(
        limited,
        statuses.len() - BURST as usize,
        "the address's burst, then 429: {statuses:?}"
    );
    // A session on a route that checks it keeps its own allowance behind the spent address.
    let request = TestRequest::get()
        .uri("/auth/session")
        .peer_addr(client)
        .insert_header((
            "authorization",
            format!("Bearer {}", session.token.expose()),
        ))
        .to_request();
    assert_eq!(
        test::call_service(&service, request).await.status(),
        StatusCode::OK
    );
    // The same session's token on the public route counts against the address.
    let request = TestRequest::post()
        .uri("/auth/login")
        .peer_addr(client)
        .insert_header((
            "authorization",
            format!("Bearer {}", session.token.expose()),
        ))
        .insert_header(("content-type", "application/json"))
        .set_payload("{}")
        .to_request();
    assert_eq!(
        test::call_service(&service, request).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[actix_web::test]
async fn an_oversized_body_gets_413_in_the_error_shape() {
    let (config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    let service = test::init_service(app(config)).await;
    let oversized = vec![b' '; crate::REQUEST_BODY_BYTES_MAX + 1];

    let response = test::call_service(
        &service,
        TestRequest::post()
            .uri("/auth/login")
            .insert_header(("content-type", "application/json"))
            .set_payload(oversized.clone())
            .to_request(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_security_headers(&response);
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body["error"], "payload_too_large");
    // Chunked bodies (no Content-Length) are covered against the real binary in
    // tests/limits.rs, where the framing on the wire is under the test's control.
}

/// The path with every `{parameter}` replaced by a well-formed id.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment == "{table}" {
                "patients".to_owned()
            } else if segment.starts_with('{') {
                uuid::Uuid::now_v7().to_string()
            } else {
                segment.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn request_for(verb: Verb, path: &str) -> TestRequest {
    match verb {
        Verb::Get => TestRequest::get().uri(path),
        Verb::Post => TestRequest::post()
            .uri(path)
            .insert_header(("content-type", "application/json"))
            .set_payload("{}"),
    }
}

#[actix_web::test]
async fn every_listed_route_is_mounted_and_every_guarded_one_refuses_no_session() {
    let (config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    let read_models = config.read_models.clone();
    let service = test::init_service(app(config)).await;
    let mut guarded = 0;
    for route in ROUTES {
        let response = test::call_service(
            &service,
            request_for(route.verb, &concrete(route.path)).to_request(),
        )
        .await;
        let status = response.status();
        assert_ne!(
            status,
            StatusCode::NOT_FOUND,
            "{} is not mounted",
            route.path
        );
        assert_ne!(status, StatusCode::METHOD_NOT_ALLOWED, "{}", route.path);
        if route.permission == Permission::Public {
            continue;
        }
        guarded += 1;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{} {}",
            route.verb.as_str(),
            route.path
        );
        assert_security_headers(&response);
        let body: Value = test::read_body_json(response).await;
        assert_eq!(body["error"], "unauthenticated", "{}", route.path);
    }
    assert!(guarded > 30, "the table guards every PHI route");
    let denials = read_models
        .fetch_all(
            "SELECT count(*) FROM chartlog_audit_trail WHERE outcome = 'denied'",
            Vec::new(),
        )
        .await
        .expect("count denials");
    assert_eq!(
        denials[0].i64(0).expect("count"),
        guarded,
        "each refusal is in the audit trail"
    );
}

#[actix_web::test]
async fn a_failing_audit_trail_fails_the_request_with_503() {
    let (mut config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    config.audit = Arc::new(AuditDown);
    let service = test::init_service(app(config)).await;
    let response = test::call_service(
        &service,
        request_for(Verb::Get, &concrete("/patients/{patient_id}/chart")).to_request(),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body["error"], "audit_unavailable");
}

/// An audit trail that is down until told otherwise.
struct AuditUntilUp {
    up: std::sync::atomic::AtomicBool,
    sink: DatabaseAuditSink,
}

#[async_trait::async_trait]
impl AuditSink for AuditUntilUp {
    async fn record(&self, rows: Vec<AuditRow>) -> Result<(), AuditUnavailable> {
        if !self.up.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AuditUnavailable);
        }
        self.sink.record(rows).await
    }
}

/// Hands every refusal alert to the test.
struct AlertsTo(tokio::sync::mpsc::UnboundedSender<crate::alerts::RefusalAlert>);

#[async_trait::async_trait]
impl crate::notify::Notifier for AlertsTo {
    async fn break_glass_opened(&self, _notice: &crate::notify::BreakGlassNotice) {}

    async fn repeated_refusals(&self, alert: &crate::alerts::RefusalAlert) {
        let _ = self.0.send(alert.clone());
    }

    async fn backup_failed(&self, _notice: &crate::notify::BackupFailedNotice) {}
}

/// Bug this catches: refusals were counted before their rows were written, so a write that
/// failed still started the subject's quiet window, and the refusals that followed once the
/// audit trail was back raised no alert for a whole window.
#[actix_web::test]
async fn refusals_the_audit_trail_did_not_take_start_no_quiet_window() {
    const THRESHOLD: u32 = 3;
    let (mut config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    let audit = Arc::new(AuditUntilUp {
        up: std::sync::atomic::AtomicBool::new(false),
        sink: DatabaseAuditSink::new(config.read_models.clone()),
    });
    config.audit = audit.clone();
    let (sent, mut alerts) = tokio::sync::mpsc::unbounded_channel();
    config.notifier = Arc::new(AlertsTo(sent));
    config.refusal_watch = Arc::new(crate::alerts::RefusalWatch::new(
        crate::alerts::RefusalAlertSettings {
            refusals: THRESHOLD,
            ..crate::alerts::RefusalAlertSettings::default()
        },
    ));
    let actor = chartlog_domain::Actor {
        user_id: chartlog_domain::UserId::from_uuid(uuid::Uuid::new_v4()),
        role: chartlog_domain::Role::Nurse,
        purpose_of_use: chartlog_domain::PurposeOfUse::Treatment,
        break_glass: false,
    };
    let refusals = || {
        (0..THRESHOLD)
            .map(|_| {
                let mut row = crate::audit::access_row(
                    actor,
                    None,
                    Some(chartlog_domain::PatientId::from_uuid(uuid::Uuid::new_v4())),
                    chartlog_projections::audit::AuditEntity::Patient,
                    chartlog_projections::audit::AuditAction::Read,
                );
                row.outcome = chartlog_projections::audit::AuditOutcome::Denied;
                row
            })
            .collect::<Vec<_>>()
    };

    assert!(matches!(
        crate::audit::record(&config, refusals()).await,
        Err(crate::ApiError::AuditUnavailable)
    ));
    audit.up.store(true, std::sync::atomic::Ordering::SeqCst);
    crate::audit::record(&config, refusals())
        .await
        .expect("recorded");
    let alert = tokio::time::timeout(std::time::Duration::from_secs(5), alerts.recv())
        .await
        .expect("an alert for the refusals that were recorded")
        .expect("the notifier is alive");
    assert_eq!(alert.user_id, Some(actor.user_id));
    assert_eq!(alert.refusals, THRESHOLD);
}

/// A signed-in account of `role` with a full session, for tests that need a caller and
/// not the login flow (the configuration must not require it a second factor).
async fn full_session(
    accounts: &Accounts,
    username: &str,
    role: chartlog_domain::Role,
) -> (chartlog_domain::UserId, String) {
    let (account, one_time) = accounts
        .create_user(
            chartlog_access::NewUser {
                username: chartlog_access::Username::parse(username).expect("name"),
                role,
                patient_id: None,
                sso_subject: None,
            },
            crate::now(),
        )
        .await
        .expect("account");
    let chosen = chartlog_access::Password::new("seven quiet lanterns over the harbour".to_owned());
    accounts
        .change_password(
            account.user_id,
            &one_time.to_password(),
            &chosen,
            crate::now(),
        )
        .await
        .expect("password changed");
    let login = accounts
        .login(
            chartlog_access::LoginAttempt {
                username: username.to_owned(),
                password: chosen,
                second_factor: None,
                client_address: std::net::IpAddr::from([192, 0, 2, 20]),
            },
            crate::now(),
        )
        .await
        .expect("login");
    assert_eq!(login.session.stage, chartlog_access::SessionStage::Full);
    (account.user_id, login.token.expose().to_owned())
}

/// Bug this catches: each opening inserted a new grant even while the caller's grant to the
/// patient was open, so grants overlapped and the emergency access was extended at will.
#[actix_web::test]
async fn break_glass_is_not_opened_again_while_open_and_the_attempt_is_audited() {
    let access = AccessSettings {
        second_factor_required_for: Vec::new(),
        ..AccessSettings::default()
    };
    let (config, _dir, _) = config_and_runner(Transport::Tls, Arc::new(Ready), access).await;
    let (accounts, db) = (config.accounts.clone(), config.read_models.clone());
    let service = test::init_service(app(config)).await;
    let document = serde_json::to_value(crate::openapi::document()).expect("serialize");
    let (_, token) = full_session(&accounts, "dr.ward", chartlog_domain::Role::Physician).await;
    let patient = uuid::Uuid::new_v4();
    let open = || {
        TestRequest::post()
            .uri(&format!("/patients/{patient}/break-glass"))
            .insert_header(("authorization", format!("Bearer {token}")))
            .insert_header(("content-type", "application/json"))
            .set_payload(r#"{"reason":"found unresponsive, no care team on shift"}"#)
            .to_request()
    };

    let first = test::call_service(&service, open()).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = test::read_body_json(first).await;
    let again = test::call_service(&service, open()).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let again: Value = test::read_body_json(again).await;
    assert_eq!(again["error"], "break_glass_already_open", "{again}");
    assert_eq!(again["grant_id"], first["grant_id"], "{again}");
    assert_eq!(again["expires_at"], first["expires_at"], "{again}");
    assert!(!again.to_string().contains("unresponsive"), "{again}");
    crate::openapi::schema_check::answer_conforms(
        &document,
        &serde_json::json!({ "$ref": "#/components/schemas/Error" }),
        &again,
        "error",
    )
    .expect("the error as documented");

    let grant_id: uuid::Uuid = first["grant_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("grant id");
    let count = |sql: &'static str| {
        let db = db.clone();
        async move {
            db.fetch_all(sql, vec![chartlog_projections::db::SqlArg::Uuid(grant_id)])
                .await
                .expect("count")[0]
                .i64(0)
                .expect("count")
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM chartlog_access_break_glass_grants WHERE grant_id <> $1").await,
        0,
        "no second grant"
    );
    assert_eq!(
        count(
            "SELECT count(*) FROM chartlog_audit_trail WHERE record_id = $1 \
             AND action = 'break_glass' AND outcome = 'denied'"
        )
        .await,
        1,
        "the refused opening is audited, naming the open grant"
    );
}

/// Hands every break-glass notice to the test.
struct NoticesTo(tokio::sync::mpsc::UnboundedSender<crate::notify::BreakGlassNotice>);

#[async_trait::async_trait]
impl crate::notify::Notifier for NoticesTo {
    async fn break_glass_opened(&self, notice: &crate::notify::BreakGlassNotice) {
        let _ = self.0.send(notice.clone());
    }

    async fn repeated_refusals(&self, _alert: &crate::alerts::RefusalAlert) {}

    async fn backup_failed(&self, _notice: &crate::notify::BackupFailedNotice) {}
}

/// Bug this catches: the grant was committed (and in force) before its opening was audited.
/// When the audit write failed the request answered 503 before the notice was sent, the grant
/// stayed open and usable, and every retry was refused 409 `break_glass_already_open`: the
/// clinician worked under a grant never audited as opened nor announced.
#[actix_web::test]
async fn break_glass_whose_audit_failed_gives_no_access_until_a_retry_audits_and_announces_it() {
    let access = AccessSettings {
        second_factor_required_for: Vec::new(),
        ..AccessSettings::default()
    };
    let (mut config, _dir, _) = config_and_runner(Transport::Tls, Arc::new(Ready), access).await;
    let audit = Arc::new(AuditUntilUp {
        up: std::sync::atomic::AtomicBool::new(false),
        sink: DatabaseAuditSink::new(config.read_models.clone()),
    });
    config.audit = audit.clone();
    let (sent, mut notices) = tokio::sync::mpsc::unbounded_channel();
    config.notifier = Arc::new(NoticesTo(sent));
    let (accounts, db) = (config.accounts.clone(), config.read_models.clone());
    let service = test::init_service(app(config)).await;
    let (doctor, token) =
        full_session(&accounts, "dr.retry", chartlog_domain::Role::Physician).await;
    let patient = chartlog_domain::PatientId::from_uuid(uuid::Uuid::new_v4());
    let open = || {
        TestRequest::post()
            .uri(&format!("/patients/{patient}/break-glass"))
            .insert_header(("authorization", format!("Bearer {token}")))
            .insert_header(("content-type", "application/json"))
            .set_payload(r#"{"reason":"collapsed in triage, allergy list needed"}"#)
            .to_request()
    };
    let in_force = || async {
        accounts
            .active_break_glass(doctor, patient, crate::now())
            .await
            .expect("lookup")
    };
    let audited = |outcome: &'static str| {
        let db = db.clone();
        async move {
            db.fetch_all(
                "SELECT record_id FROM chartlog_audit_trail \
                 WHERE action = 'break_glass' AND outcome = $1",
                vec![chartlog_projections::db::SqlArg::Text(outcome.to_owned())],
            )
            .await
            .expect("audit rows")
            .iter()
            .map(|row| row.opt_uuid(0).expect("record id"))
            .collect::<Vec<_>>()
        }
    };

    let failed = test::call_service(&service, open()).await;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    let failed: Value = test::read_body_json(failed).await;
    assert_eq!(failed["error"], "audit_unavailable", "{failed}");
    assert!(!failed.to_string().contains("collapsed"), "{failed}");
    assert_eq!(
        in_force().await,
        None,
        "no access without the opening's audit row"
    );

    // The audit trail is back: the retry completes the opening, audited and announced.
    audit.up.store(true, std::sync::atomic::Ordering::SeqCst);
    let retried = test::call_service(&service, open()).await;
    assert_eq!(retried.status(), StatusCode::CREATED);
    let retried: Value = test::read_body_json(retried).await;
    let grant_id: uuid::Uuid = retried["grant_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .expect("grant id");
    let grant = in_force().await.expect("in force once audited");
    assert_eq!(grant.grant_id, grant_id);
    assert_eq!(audited("success").await, vec![Some(grant_id)]);
    let notice = tokio::time::timeout(std::time::Duration::from_secs(5), notices.recv())
        .await
        .expect("a notice for the grant in force")
        .expect("the notifier is alive");
    assert_eq!(notice.grant_id, grant_id);
    assert_eq!(notice.user_id, doctor);
    assert_eq!(notice.patient_id, patient);
    let notice = serde_json::to_string(&notice).expect("serialize");
    assert!(!notice.contains("collapsed"), "{notice}");
    assert!(
        notices.try_recv().is_err(),
        "one notice: none for the failed attempt"
    );
    assert_eq!(
        db.fetch_all(
            "SELECT count(*) FROM chartlog_access_break_glass_grants WHERE user_id = $1",
            vec![chartlog_projections::db::SqlArg::Uuid(doctor.as_uuid())],
        )
        .await
        .expect("count")[0]
            .i64(0)
            .expect("count"),
        1,
        "the retry completed the grant the failed attempt left, and opened no other"
    );

    // Now it is open and in force: a further opening is refused, naming it.
    let again = test::call_service(&service, open()).await;
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let again: Value = test::read_body_json(again).await;
    assert_eq!(again["error"], "break_glass_already_open", "{again}");
    assert_eq!(again["grant_id"], retried["grant_id"], "{again}");
    assert_eq!(audited("denied").await, vec![Some(grant_id)]);
}

/// Bug this catches: `pending=false` listed the 1,000 oldest grants ever, with no paging,
/// though the route promised pending reviews first.
#[actix_web::test]
async fn break_glass_reviews_are_pending_first_then_newest_first_and_paged() {
    use crate::routes as r;

    let access = AccessSettings {
        second_factor_required_for: Vec::new(),
        ..AccessSettings::default()
    };
    let (config, _dir, _) = config_and_runner(Transport::Tls, Arc::new(Ready), access).await;
    let accounts = config.accounts.clone();
    let service = test::init_service(app(config)).await;
    let document = serde_json::to_value(crate::openapi::document()).expect("serialize");
    let (_, physician) = full_session(&accounts, "dr.page", chartlog_domain::Role::Physician).await;
    let (auditor_id, auditor) =
        full_session(&accounts, "auditor.page", chartlog_domain::Role::Auditor).await;
    let mut opened = Vec::new();
    for _ in 0..3 {
        let patient = uuid::Uuid::new_v4();
        let (status, grant) = call_checked(
            &service,
            &document,
            &r::BREAK_GLASS,
            &format!("/patients/{patient}/break-glass"),
            Some(&physician),
            Some(serde_json::json!({ "reason": "unresponsive in the corridor" })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{grant}");
        opened.push(grant["grant_id"].as_str().expect("grant id").to_owned());
    }
    let oldest: uuid::Uuid = opened[0].parse().expect("uuid");
    accounts
        .review_break_glass(
            oldest,
            auditor_id,
            chartlog_access::ReviewVerdict::Justified,
            crate::now(),
        )
        .await
        .expect("reviewed");
    let listed = |answer: &Value| -> Vec<String> {
        answer["reviews"]
            .as_array()
            .expect("reviews")
            .iter()
            .map(|review| review["grant_id"].as_str().expect("id").to_owned())
            .collect()
    };
    let expected = vec![opened[2].clone(), opened[1].clone(), opened[0].clone()];

    let (status, all) = call_checked(
        &service,
        &document,
        &r::BREAK_GLASS_REVIEWS,
        "/break-glass/reviews?pending=false",
        Some(&auditor),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{all}");
    assert_eq!(listed(&all), expected, "{all}");
    assert!(all.get("next").is_none(), "{all}");

    let (_, first) = call_checked(
        &service,
        &document,
        &r::BREAK_GLASS_REVIEWS,
        "/break-glass/reviews?pending=false&limit=2",
        Some(&auditor),
        None,
    )
    .await;
    assert_eq!(listed(&first), expected[..2], "{first}");
    let next = first["next"].as_str().expect("a next page");
    let (_, second) = call_checked(
        &service,
        &document,
        &r::BREAK_GLASS_REVIEWS,
        &format!("/break-glass/reviews?pending=false&limit=2&after={next}"),
        Some(&auditor),
        None,
    )
    .await;
    assert_eq!(listed(&second), expected[2..], "{second}");
    assert!(second.get("next").is_none(), "{second}");

    let (_, pending) = call_checked(
        &service,
        &document,
        &r::BREAK_GLASS_REVIEWS,
        "/break-glass/reviews",
        Some(&auditor),
        None,
    )
    .await;
    assert_eq!(listed(&pending), expected[..2], "{pending}");

    let (status, refused) = call_checked(
        &service,
        &document,
        &r::BREAK_GLASS_REVIEWS,
        "/break-glass/reviews?after=not-a-cursor",
        Some(&auditor),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
}

#[test]
fn the_openapi_document_lists_every_route() {
    let document = serde_json::to_value(crate::openapi::document()).expect("serialize");
    for route in ROUTES {
        let method = route.verb.as_str().to_lowercase();
        assert!(
            document["paths"][route.path][&method].is_object(),
            "{} {} is missing from /openapi.json",
            route.verb.as_str(),
            route.path
        );
    }
    let listed: usize = document["paths"]
        .as_object()
        .expect("paths")
        .values()
        .map(|item| item.as_object().map_or(0, |methods| methods.len()))
        .sum();
    assert_eq!(
        listed,
        ROUTES.len(),
        "no route outside the table is documented"
    );
}

/// schemathesis (.ci/schemathesis) cannot generate a parameter without a schema, and checks
/// every error body against the `Error` schema through the `default` response.
#[test]
fn the_openapi_document_types_every_parameter_and_every_error() {
    let document = serde_json::to_value(crate::openapi::document()).expect("serialize");
    for route in ROUTES {
        let operation = &document["paths"][route.path][route.verb.as_str().to_lowercase()];
        assert_eq!(
            operation["responses"]["default"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/Error",
            "{}",
            route.path
        );
        for parameter in operation["parameters"].as_array().into_iter().flatten() {
            assert!(
                parameter["schema"].is_object(),
                "{} {}",
                route.path,
                parameter["name"]
            );
        }
    }
    assert_eq!(
        document["components"]["schemas"]["Error"]["required"],
        serde_json::json!(["error", "message"])
    );
}

/// A client generated from the document gets a type for every JSON answer; the test below
/// holds the answers to those types.
#[test]
fn the_openapi_document_types_every_json_answer() {
    let document = serde_json::to_value(crate::openapi::document()).expect("serialize");
    for route in ROUTES {
        let method = route.verb.as_str().to_lowercase();
        let responses = &document["paths"][route.path][&method]["responses"];
        let Some((status, success)) = responses
            .as_object()
            .and_then(|all| all.iter().find(|(status, _)| status.starts_with('2')))
        else {
            panic!("{method} {} declares no success", route.path);
        };
        let json = &success["content"]["application/json"];
        let describes_itself = std::ptr::eq(*route, &crate::routes::OPENAPI);
        if status == "204" || json.is_null() || describes_itself {
            continue;
        }
        assert!(
            json["schema"].is_object(),
            "{method} {} answers JSON without a schema",
            route.path
        );
    }
}

#[test]
fn the_route_table_has_no_duplicates() {
    for (index, route) in ROUTES.iter().enumerate() {
        for other in &ROUTES[index + 1..] {
            assert!(
                !(route.verb == other.verb && route.path == other.path),
                "{:?} {} is listed twice",
                route.verb,
                route.path
            );
        }
    }
}

#[test]
fn the_readme_role_table_is_the_policy_table() {
    let readme = include_str!("../../../README.md");
    let table = crate::policy::role_table_markdown();
    assert!(
        readme.contains(&table),
        "README.md's role table differs from policy::ROLE_GRANTS; paste this:\n{table}"
    );
}

/// Calls `uri` (a concrete path of `route`) and, when it succeeds with a JSON body, checks the
/// body against the answer schema /openapi.json declares for the route, every field declared.
async fn call_checked<S, B>(
    service: &S,
    document: &Value,
    route: &crate::routes::Route,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value)
where
    S: actix_web::dev::Service<
            actix_http::Request,
            Response = ServiceResponse<B>,
            Error = actix_web::Error,
        >,
    B: actix_web::body::MessageBody,
{
    let mut request = match route.verb {
        Verb::Get => TestRequest::get().uri(uri),
        Verb::Post => TestRequest::post()
            .uri(uri)
            .insert_header(("content-type", "application/json"))
            .set_payload(body.unwrap_or(Value::Null).to_string()),
    };
    if let Some(token) = token {
        request = request.insert_header(("authorization", format!("Bearer {token}")));
    }
    let response = test::call_service(service, request.to_request()).await;
    let status = response.status();
    let bytes = test::read_body(response).await;
    if bytes.is_empty() {
        return (status, Value::Null);
    }
    let answer: Value = serde_json::from_slice(&bytes).expect("a JSON answer");
    if status.is_success() {
        let method = route.verb.as_str().to_lowercase();
        let schema = &document["paths"][route.path][&method]["responses"][status.as_str()]["content"]
            ["application/json"]["schema"];
        assert!(
            schema.is_object(),
            "{method} {} answers {status} with no schema",
            route.path
        );
        if let Err(mismatch) =
            crate::openapi::schema_check::answer_conforms(document, schema, &answer, "answer")
        {
            panic!("{method} {uri}: {mismatch}\n{answer}");
        }
    }
    (status, answer)
}

/// Every JSON answer a day's requests get holds to its schema in /openapi.json: a client
/// generated from the document reads what the server sends.
#[actix_web::test]
async fn every_answer_matches_its_schema_in_the_openapi_document() {
    use crate::routes as r;
    use chartlog_access::NewUser;
    use chartlog_domain::Role;

    let access = AccessSettings {
        second_factor_required_for: Vec::new(),
        ..AccessSettings::default()
    };
    let (config, _dir, runner) = config_and_runner(Transport::Tls, Arc::new(Ready), access).await;
    let accounts = config.accounts.clone();
    let service = test::init_service(app(config)).await;
    let document = serde_json::to_value(crate::openapi::document()).expect("serialize");
    let service = &service;
    let doc = &document;

    // An account's first login must change the one-time password; the next one is full.
    let log_in = |username: &'static str, one_time: String| async move {
        let (status, first) = call_checked(
            service,
            doc,
            &r::LOGIN,
            "/auth/login",
            None,
            Some(serde_json::json!({ "username": username, "password": one_time })),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{first}");
        let token = first["token"].as_str().expect("token").to_owned();
        let passphrase = "quiet schemas hold every morning at nine".to_owned();
        let (status, _) = call_checked(
            service,
            doc,
            &r::CHANGE_PASSWORD,
            "/auth/password",
            Some(&token),
            Some(serde_json::json!({ "current_password": one_time, "new_password": passphrase })),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "{username}'s new password refused"
        );
        let (_, again) = call_checked(
            service,
            doc,
            &r::LOGIN,
            "/auth/login",
            None,
            Some(serde_json::json!({ "username": username, "password": passphrase })),
        )
        .await;
        assert_eq!(again["session"]["stage"], "full", "{again}");
        again["token"].as_str().expect("token").to_owned()
    };

    for (route, uri) in [(&r::HEALTHZ, "/healthz"), (&r::READYZ, "/readyz")] {
        let (status, _) = call_checked(service, doc, route, uri, None, None).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (_, one_time) = accounts
        .create_user(
            NewUser {
                username: chartlog_access::Username::parse("admin").expect("name"),
                role: Role::Administrator,
                patient_id: None,
                sso_subject: None,
            },
            crate::now(),
        )
        .await
        .expect("administrator");
    let admin = log_in("admin", one_time.expose().to_owned()).await;
    call_checked(
        service,
        doc,
        &r::SESSION,
        "/auth/session",
        Some(&admin),
        None,
    )
    .await;
    let mut one_time_of = std::collections::HashMap::new();
    let mut user_id_of = std::collections::HashMap::new();
    for (username, role) in [("dr.grey", "physician"), ("auditor.ann", "auditor")] {
        let (status, created) = call_checked(
            service,
            doc,
            &r::CREATE_USER,
            "/users",
            Some(&admin),
            Some(serde_json::json!({ "username": username, "role": role })),
        )
        .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        one_time_of.insert(
            username,
            created["one_time_password"]
                .as_str()
                .expect("otp")
                .to_owned(),
        );
        user_id_of.insert(
            username,
            created["user"]["user_id"].as_str().expect("id").to_owned(),
        );
    }
    let (status, reset) = call_checked(
        service,
        doc,
        &r::RESET_PASSWORD,
        &format!("/users/{}/password-reset", user_id_of["auditor.ann"]),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{reset}");
    let (_, users) = call_checked(service, doc, &r::LIST_USERS, "/users", Some(&admin), None).await;
    assert_eq!(users["users"].as_array().map(Vec::len), Some(3), "{users}");

    let physician = log_in("dr.grey", one_time_of["dr.grey"].clone()).await;
    let (status, _) = call_checked(
        service,
        doc,
        &r::ENROLL_SECOND_FACTOR,
        "/auth/second-factor/enrollment",
        Some(&physician),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let chartlog_domain::PatientCommand::RegisterPatient { demographics, .. } =
        chartlog_domain::synthetic::registration(3)
    else {
        unreachable!("a registration")
    };
    let (status, registered) = call_checked(
        service,
        doc,
        &r::REGISTER_PATIENT,
        "/patients",
        Some(&physician),
        Some(serde_json::to_value(&demographics).expect("json")),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{registered}");
    let patient = registered["patient_id"].as_str().expect("id").to_owned();
    let at = |command: &str| format!("/patients/{patient}/{command}");
    for (route, command, body) in [
        (
            &r::RECORD_OBSERVATION,
            "record-observation",
            serde_json::json!({
                "code": { "system": "http://loinc.org", "code": "8867-4" },
                "value": { "quantity": { "value": "72", "unit": "/min" } },
                "effective_at": "2026-11-27T08:30:00Z"
            }),
        ),
        (
            &r::RECORD_CONDITION,
            "record-condition",
            serde_json::json!({ "code": { "system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.9" } }),
        ),
        (
            &r::RECORD_ALLERGY,
            "record-allergy",
            serde_json::json!({
                "substance": { "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "7980" },
                "criticality": "high"
            }),
        ),
        (
            &r::PRESCRIBE_MEDICATION,
            "prescribe-medication",
            serde_json::json!({
                "medication": { "system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "860975" },
                "dose": { "value": "500", "unit": "mg" },
                "route": "oral",
                "frequency": "twice_daily"
            }),
        ),
        (
            &r::WRITE_NOTE,
            "write-note",
            serde_json::json!({ "text": "Seen for follow-up; well." }),
        ),
        (
            &r::GRANT_CONSENT_RESTRICTION,
            "grant-consent-restriction",
            serde_json::json!({ "kind": { "hide_notes_from_role": "lab_technician" } }),
        ),
    ] {
        let (status, answer) = call_checked(
            service,
            doc,
            route,
            &at(command),
            Some(&physician),
            Some(body),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{command}: {answer}");
    }
    runner.catch_up().await.expect("read models caught up");
    for (route, path) in [
        (&r::CHART, "chart"),
        (&r::HISTORY, "history"),
        (&r::CONSENT_RESTRICTIONS, "consent-restrictions"),
        (&r::CARE_TEAM, "care-team"),
    ] {
        let (status, answer) =
            call_checked(service, doc, route, &at(path), Some(&physician), None).await;
        assert_eq!(status, StatusCode::OK, "{path}: {answer}");
    }
    let (_, chart) = call_checked(
        service,
        doc,
        &r::CHART,
        &at("chart"),
        Some(&physician),
        None,
    )
    .await;
    for section in [
        "conditions",
        "allergies",
        "medication_orders",
        "observations",
        "notes",
    ] {
        assert_eq!(
            chart[section].as_array().map(Vec::len),
            Some(1),
            "{section}: {chart}"
        );
    }
    let (_, history) = call_checked(
        service,
        doc,
        &r::HISTORY,
        &at("history"),
        Some(&physician),
        None,
    )
    .await;
    assert!(
        history["entries"].as_array().is_some_and(|e| e.len() >= 7),
        "{history}"
    );
    // Times in the history read as everywhere else in the API.
    let note_written = history["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|entry| entry["event_type"] == "note_written")
        .expect("the note's entry");
    let written_at = note_written["changes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|change| change["field"] == "written_at")
        .expect("written_at changed");
    assert!(
        written_at["after"]
            .as_str()
            .is_some_and(|at| at.ends_with('Z') && at.contains('T')),
        "{written_at}"
    );
    let (_, found) = call_checked(
        service,
        doc,
        &r::SEARCH_PATIENTS,
        "/patients/search",
        Some(&physician),
        Some(serde_json::json!({ "mrn": demographics.mrn.expose_phi() })),
    )
    .await;
    assert_eq!(found["patient_ids"][0], patient.as_str(), "{found}");
    let (status, opened) = call_checked(
        service,
        doc,
        &r::BREAK_GLASS,
        &at("break-glass"),
        Some(&physician),
        Some(serde_json::json!({ "reason": "checking the schema of an emergency" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{opened}");

    let (_, one_time) = accounts
        .create_user(
            NewUser {
                username: chartlog_access::Username::parse("pat.a").expect("name"),
                role: Role::Patient,
                patient_id: Some(chartlog_domain::PatientId::from_uuid(
                    patient.parse().expect("uuid"),
                )),
                sso_subject: None,
            },
            crate::now(),
        )
        .await
        .expect("patient account");
    let patient_token = log_in("pat.a", one_time.expose().to_owned()).await;
    let (status, disclosures) = call_checked(
        service,
        doc,
        &r::DISCLOSURES,
        &at("disclosures"),
        Some(&patient_token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{disclosures}");

    let auditor = log_in(
        "auditor.ann",
        reset["one_time_password"].as_str().expect("otp").to_owned(),
    )
    .await;
    let (_, trail) = call_checked(
        service,
        doc,
        &r::AUDIT_TRAIL,
        &format!("/audit-trail?patient_id={patient}"),
        Some(&auditor),
        None,
    )
    .await;
    assert!(
        trail["rows"]
            .as_array()
            .is_some_and(|rows| !rows.is_empty()),
        "{trail}"
    );
    let (_, reviews) = call_checked(
        service,
        doc,
        &r::BREAK_GLASS_REVIEWS,
        "/break-glass/reviews",
        Some(&auditor),
        None,
    )
    .await;
    assert_eq!(
        reviews["reviews"].as_array().map(Vec::len),
        Some(1),
        "{reviews}"
    );
}

/// Behind a trusted proxy the client is the address the proxy forwarded: the audit trail
/// records it, and the rate limit counts each client apart rather than every client as the
/// proxy. From anywhere else the header is ignored, so a client cannot choose its address.
#[actix_web::test]
async fn a_trusted_proxy_names_the_client_and_nobody_else_can() {
    const BURST: u32 = 2;
    let (mut config, _dir) = config(Transport::Tls, Arc::new(Ready)).await;
    config.rate_limiter = burst_then_one_per_second(BURST);
    config.trusted_proxies =
        crate::client_address::TrustedProxies::new(vec!["10.0.0.0/8".parse().expect("a network")]);
    let read_models = config.read_models.clone();
    let service = test::init_service(app(config)).await;
    let proxy: std::net::SocketAddr = "10.1.2.3:50000".parse().expect("address");
    let elsewhere: std::net::SocketAddr = "192.0.2.10:40000".parse().expect("address");
    let failed_login = |peer: std::net::SocketAddr, forwarded: &str| {
        TestRequest::post()
            .uri("/auth/login")
            .peer_addr(peer)
            .insert_header(("x-forwarded-for", forwarded.to_owned()))
            .insert_header(("content-type", "application/json"))
            .set_payload(r#"{"username":"nobody.here","password":"not the password at all"}"#)
            .to_request()
    };

    // Two clients behind the proxy, each with its own allowance: none of these is limited,
    // though the proxy alone sends twice the burst.
    for client in ["203.0.113.9", "203.0.113.77"] {
        for _ in 0..BURST {
            let response = test::call_service(
                &service,
                failed_login(proxy, &format!("192.0.2.66, {client}")),
            )
            .await;
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{client}");
        }
    }
    // A client that is no proxy names someone else: ignored, it is itself.
    let response = test::call_service(&service, failed_login(elsewhere, "203.0.113.200")).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // The first proxied client is spent now.
    let response = test::call_service(&service, failed_login(proxy, "203.0.113.9")).await;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);

    let rows = read_models
        .fetch_all(
            "SELECT client_address, count(*) FROM chartlog_audit_trail \
             WHERE action = 'login' GROUP BY client_address ORDER BY client_address",
            Vec::new(),
        )
        .await
        .expect("the failed logins' rows");
    let addresses: Vec<(String, i64)> = rows
        .iter()
        .map(|row| {
            (
                row.text(0).expect("an address"),
                row.i64(1).expect("a count"),
            )
        })
        .collect();
    assert_eq!(
        addresses,
        [
            ("192.0.2.10".to_owned(), 1),
            ("203.0.113.77".to_owned(), i64::from(BURST)),
            ("203.0.113.9".to_owned(), i64::from(BURST)),
        ]
    );
}
