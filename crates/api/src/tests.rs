//! The application's behaviour through actix's in-process test service.

use std::sync::Arc;

use actix_web::dev::ServiceResponse;
use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use serde_json::Value;

use crate::routes::{ROUTES, Verb};
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

fn config(transport: Transport, readiness: Arc<dyn ReadinessProbe>) -> ApiConfig {
    ApiConfig {
        transport,
        readiness,
    }
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
    let service = test::init_service(app(config(Transport::Tls, Arc::new(Ready)))).await;
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
    let service = test::init_service(app(config(Transport::PlainHttp, Arc::new(Ready)))).await;
    let response =
        test::call_service(&service, TestRequest::get().uri("/healthz").to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_security_headers(&response);
    assert_eq!(header(&response, "strict-transport-security"), None);
}

#[actix_web::test]
async fn readyz_reports_the_probe() {
    let ready = test::init_service(app(config(Transport::Tls, Arc::new(Ready)))).await;
    let response = test::call_service(&ready, TestRequest::get().uri("/readyz").to_request()).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body, serde_json::json!({"status": "ready"}));

    let down = test::init_service(app(config(Transport::Tls, Arc::new(DatabaseDown)))).await;
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
    let service = test::init_service(app(config(Transport::Tls, Arc::new(Ready)))).await;

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
    let body: Value = test::read_body_json(response).await;
    assert_eq!(body["error"], "method_not_allowed");
}

#[actix_web::test]
async fn every_listed_route_is_mounted() {
    let service = test::init_service(app(config(Transport::Tls, Arc::new(Ready)))).await;
    for route in ROUTES {
        let request = match route.verb {
            Verb::Get => TestRequest::get(),
            Verb::Post => TestRequest::post(),
        };
        let response = test::call_service(&service, request.uri(route.path).to_request()).await;
        assert_ne!(response.status(), StatusCode::NOT_FOUND, "{}", route.path);
        assert_ne!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{}",
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
