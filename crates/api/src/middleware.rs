//! The middleware every response passes through: security headers and the request log line.

use std::time::Instant;

use actix_web::ResponseError;
use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, HeaderName, HeaderValue, REFERRER_POLICY,
    STRICT_TRANSPORT_SECURITY, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use actix_web::middleware::Next;

use crate::{ApiError, REQUEST_BODY_BYTES_MAX, Transport};

/// Headers sent on every response. The API serves JSON to programs, never pages, so the
/// strictest values cost nothing: no caching of PHI by browsers or proxies, no framing, no
/// content sniffing, no referrer leaking ids in URLs.
const SECURITY_HEADERS: [(HeaderName, &str); 5] = [
    (X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (X_FRAME_OPTIONS, "DENY"),
    (
        CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (CACHE_CONTROL, "no-store"),
    (REFERRER_POLICY, "no-referrer"),
];

/// Two years, the value HSTS preload lists expect.
const HSTS: &str = "max-age=63072000; includeSubDomains";

/// Sets the security headers (overwriting any a handler set) and logs one line per request.
///
/// The log line names the matched route pattern, never the raw path or query string, because
/// those can carry identifiers; bodies are never read here.
pub(crate) async fn security_headers(
    transport: Transport,
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request.match_pattern();
    // Inner middleware must turn its errors into responses (`ServiceResponse::from_err`), as
    // handlers and extractors already do: an `Err` here has no request left to answer with,
    // so actix would render it without these headers. Nothing inside returns one today.
    let mut response = in_error_shape(next.call(request).await?.map_into_boxed_body());

    let headers = response.headers_mut();
    for (name, value) in SECURITY_HEADERS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    if transport == Transport::Tls {
        headers.insert(STRICT_TRANSPORT_SECURITY, HeaderValue::from_static(HSTS));
    }

    tracing::info!(
        method = %method,
        route = route.as_deref().unwrap_or("<unmatched>"),
        status = response.status().as_u16(),
        latency_ms = started.elapsed().as_millis() as u64,
        "request served"
    );
    Ok(response)
}

/// Renders body-reading failures in our error shape. Handlers read bodies with `web::Bytes`,
/// whose extractor (unlike `web::Json`'s) takes no error handler: actix would answer an
/// oversized body with its own plain-text 413.
fn in_error_shape(response: ServiceResponse<BoxBody>) -> ServiceResponse<BoxBody> {
    let payload_error = response
        .response()
        .error()
        .and_then(|error| error.as_error::<PayloadError>());
    let replacement = match payload_error {
        None => return response,
        // Raised before reading when Content-Length says too much, and while reading when
        // a chunked body grows past the limit.
        Some(PayloadError::Overflow) => ApiError::PayloadTooLarge {
            limit_bytes: REQUEST_BODY_BYTES_MAX,
        },
        Some(_) => ApiError::BodyUnreadable,
    };
    let (request, _) = response.into_parts();
    ServiceResponse::new(request, replacement.error_response())
}
