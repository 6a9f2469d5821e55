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
    let keys = DataKeys::new(
        Arc::new(KeyRing::generate(KekId::generate())),
        SqliteKeyStore::new(pool.clone()),
    );
    let ledger = PatientLedger::new(
        Arc::new(store),
        Arc::new(keys),
        Arc::new(signer),
        Arc::new(verifier),
    );
    let db = ProjectionDb::Sqlite(pool);
    let config = ApiConfig {
        transport,
        readiness,
        records: Arc::new(LedgerRecords::new(
            ledger,
            db.clone(),
            Arc::new(MacKey::generate()),
        )),
        accounts: Accounts::new(
            db.clone(),
            AccessSecrets::ephemeral(),
            AccessSettings::default(),
        ),
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
    };
    (config, dir)
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
