//! Probes, the OpenAPI document, and the answers for unknown paths and methods.

use std::time::Duration;

use actix_web::http::header::{ALLOW, HeaderValue};
use actix_web::{HttpRequest, HttpResponse, ResponseError, web};
use serde::Serialize;

use crate::{ApiError, ReadinessProbe};

/// How long `GET /readyz` waits for the probe before answering 503. Load balancers call it
/// every few seconds; a probe that hangs must not pile up requests.
pub const READINESS_CHECK_TIMEOUT_MS_MAX: u64 = 2_000;
const _: () = assert!(READINESS_CHECK_TIMEOUT_MS_MAX >= 100);
const _: () = assert!(READINESS_CHECK_TIMEOUT_MS_MAX <= 10_000);

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Status {
    status: &'static str,
}

pub(crate) async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Status { status: "ok" })
}

pub(crate) async fn readyz(probe: web::Data<dyn ReadinessProbe>) -> Result<HttpResponse, ApiError> {
    let timeout = Duration::from_millis(READINESS_CHECK_TIMEOUT_MS_MAX);
    match actix_web::rt::time::timeout(timeout, probe.check()).await {
        Ok(Ok(())) => Ok(HttpResponse::Ok().json(Status { status: "ready" })),
        Ok(Err(not_ready)) => {
            tracing::warn!(reason = not_ready.reason(), "readiness check failed");
            Err(ApiError::NotReady {
                reason: not_ready.reason().to_owned(),
            })
        }
        Err(_elapsed) => {
            tracing::warn!(
                timeout_ms = READINESS_CHECK_TIMEOUT_MS_MAX,
                "readiness check timed out"
            );
            Err(ApiError::NotReady {
                reason: format!(
                    "readiness check took longer than {READINESS_CHECK_TIMEOUT_MS_MAX} ms"
                ),
            })
        }
    }
}

pub(crate) async fn openapi() -> HttpResponse {
    HttpResponse::Ok().json(crate::openapi::document())
}

pub(crate) async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

/// 405 with the `Allow` header RFC 9110 requires: the methods the route table mounts on the
/// matched path.
pub(crate) async fn method_not_allowed(request: HttpRequest) -> HttpResponse {
    let pattern = request.match_pattern();
    let allow = crate::routes::ROUTES
        .iter()
        .filter(|route| pattern.as_deref() == Some(route.path))
        .map(|route| route.verb.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let mut response = ApiError::MethodNotAllowed.error_response();
    if let Ok(value) = HeaderValue::from_str(&allow) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}
