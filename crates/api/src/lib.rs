//! chartlog-api: the HTTP face of chartlog, an actix-web application.
//!
//! The binary builds one [`app`] per worker from an [`ApiConfig`] and serves it over TLS
//! (see [`tls`]); plain HTTP exists only behind the binary's explicit development flag.
//!
//! **Invariant:** this crate never talks SQL. Storage is reached through traits the binary
//! supplies (today only [`ReadinessProbe`]); backends never know HTTP.
//!
//! **Invariant:** every route declares the permission it needs in one table,
//! [`routes::ROUTES`], and is registered from that table, so a route cannot exist without a
//! declared policy. Today the table holds only the two public probes (`/healthz`, `/readyz`).
//!
//! **Invariant:** every response, including errors and the 404 for unknown routes, carries the
//! security headers (`Cache-Control: no-store`, `X-Content-Type-Options: nosniff`, ...; HSTS
//! when served over TLS).
//!
//! **Invariant:** errors leave as `{"error": code, "message": text}` with a stable `code`, and
//! neither the message nor any log line carries PHI: request bodies are never logged, and
//! request logs name the matched route pattern, never the raw path or query.
//!
//! **Invariant:** request bodies are bounded by [`REQUEST_BODY_BYTES_MAX`].
//!
//! The crate assumes a Unix host: private key files are created with mode 0600.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod middleware;
mod readiness;
pub mod routes;
pub mod tls;

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{App, web};

/// Re-exported so implementors of [`ReadinessProbe`] use the same macro version.
pub use async_trait::async_trait;
pub use error::ApiError;
pub use readiness::{NotReady, ReadinessProbe};

/// Largest request body any endpoint accepts, in bytes. Clinical commands are small JSON
/// documents; anything larger is a mistake or an attack, and is refused with 413.
pub const REQUEST_BODY_BYTES_MAX: usize = 256 * 1024;
const _: () = assert!(REQUEST_BODY_BYTES_MAX >= 16 * 1024);
const _: () = assert!(REQUEST_BODY_BYTES_MAX <= 4 * 1024 * 1024);

/// How the application is reached by clients; decides whether HSTS is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Served over TLS: responses carry `Strict-Transport-Security`.
    Tls,
    /// Plain HTTP for local development only. HSTS is not sent, because browsers ignore it
    /// over HTTP and it would pin `localhost` to HTTPS for other development servers.
    PlainHttp,
}

/// Everything the application needs from the binary. Cloned once per worker.
#[derive(Clone)]
pub struct ApiConfig {
    /// How clients reach this server.
    pub transport: Transport,
    /// Answers `GET /readyz`: is the backend able to serve requests?
    pub readiness: Arc<dyn ReadinessProbe>,
}

/// Builds the complete application: routes from [`routes::ROUTES`], the JSON 404 default
/// service, body limits, JSON error shapes and the security-header middleware.
pub fn app(
    config: ApiConfig,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let transport = config.transport;
    App::new()
        .app_data(web::Data::from(config.readiness))
        .configure(configure)
        .default_service(web::to(routes::not_found))
        .wrap(actix_web::middleware::from_fn(move |request, next| {
            middleware::security_headers(transport, request, next)
        }))
}

/// Registers every route of [`routes::ROUTES`] and the extractor configuration (body limits
/// and JSON error shapes). Useful on its own to mount the API under a scope in tests.
///
/// The handlers expect `web::Data<dyn ReadinessProbe>` in the app data; [`app`] provides it.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .app_data(
            web::JsonConfig::default()
                .limit(REQUEST_BODY_BYTES_MAX)
                .error_handler(|error, _request| ApiError::from_json_error(&error).into()),
        )
        .app_data(web::PayloadConfig::new(REQUEST_BODY_BYTES_MAX))
        .app_data(
            web::PathConfig::default()
                .error_handler(|_error, _request| ApiError::InvalidPath.into()),
        )
        .app_data(
            web::QueryConfig::default()
                .error_handler(|_error, _request| ApiError::InvalidQuery.into()),
        );
    routes::register(config);
}

#[cfg(test)]
mod tests;
