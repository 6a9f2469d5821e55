//! chartlog-api: the HTTP face of chartlog, an actix-web application.
//!
//! The binary builds one [`app`] per worker from an [`ApiConfig`] and serves it over TLS
//! (see [`tls`]); plain HTTP exists only behind the binary's explicit development flag.
//!
//! **Invariant:** this crate never talks SQL. Storage is reached through the record store
//! ([`records::Records`]), the accounts service (`chartlog_access`), the audit sink and the
//! read-model query functions of `chartlog_projections`; backends never know HTTP.
//!
//! **Invariant:** every route declares the permission it needs in one table,
//! [`routes::ROUTES`], and is registered from that table behind the guard ([`guard`]), so a
//! route cannot exist without a declared policy. Object-level checks on a patient's record
//! ([`policy::reach_record`]) run in the handler before anything is read or decided.
//!
//! **Invariant:** every PHI read is in the audit trail before its response leaves; when the
//! audit sink fails, the request fails with 503.
//!
//! **Invariant:** every response, including errors and the 404 for unknown routes, carries the
//! security headers (`Cache-Control: no-store`, `X-Content-Type-Options: nosniff`, ...; HSTS
//! when served over TLS).
//!
//! **Invariant:** errors leave as `{"error": code, "message": text}` with a stable `code`, and
//! neither the message nor any log line carries PHI: request bodies are never logged, and
//! request logs name the matched route pattern, never the raw path or query.
//!
//! **Invariant:** request bodies are bounded by [`REQUEST_BODY_BYTES_MAX`], with or without a
//! `Content-Length`; a larger one gets 413 in the error shape above.
//!
//! **Invariant:** every client (its session, else its address) is held to one rate limit
//! ([`limits`]); a client over it gets 429 with `Retry-After`, and other clients do not notice.
//! The health probes are exempt.
//!
//! The crate assumes a Unix host: private key files are created with mode 0600.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod audit;
pub mod client_address;
mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
mod handlers;
pub mod limits;
mod middleware;
pub mod notify;
pub mod openapi;
pub mod policy;
mod readiness;
pub mod records;
pub mod routes;
pub mod sso;
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
    /// Patient records: commands through the ledger, reads through the read models.
    pub records: Arc<dyn records::Records>,
    /// User accounts, sessions, break-glass grants and idempotency records.
    pub accounts: chartlog_access::Accounts,
    /// Where audit rows of reads, logins and denials go before a response leaves.
    pub audit: Arc<dyn audit::AuditSink>,
    /// Told of every break-glass opening, and of repeated refusals.
    pub notifier: Arc<dyn notify::Notifier>,
    /// Counts the refusals the API audits, and says when they call for an alert.
    pub refusal_watch: Arc<alerts::RefusalWatch>,
    /// The read-model database, for the audit trail and the de-identified export.
    pub read_models: chartlog_projections::db::ProjectionDb,
    /// How clients reach this server, e.g. `https://127.0.0.1:8443`: links in notifications.
    pub public_base_url: String,
    /// The per-client rate limit, shared by all workers (one `Arc` for the whole server).
    pub rate_limiter: Arc<limits::ClientRateLimiter>,
    /// The identity provider whose ID tokens sign users in (`POST /auth/sso`), if any.
    pub identity_provider: Option<Arc<sso::IdentityProvider>>,
    /// The proxies whose `X-Forwarded-For` names the client; none by default.
    pub trusted_proxies: client_address::TrustedProxies,
}

/// The current time, as the domain counts it (the domain itself never reads the clock).
pub fn now() -> chartlog_domain::Timestamp {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_micros()).unwrap_or(i64::MAX)
        });
    // The clock is within the representable range for millennia.
    chartlog_domain::Timestamp::from_unix_micros(micros)
        .unwrap_or_else(|_| chartlog_domain::Timestamp::from_unix_micros(0).expect("epoch"))
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
    let rate_limiter = Arc::clone(&config.rate_limiter);
    let trusted_proxies = config.trusted_proxies.clone();
    App::new()
        .app_data(web::Data::from(config.readiness.clone()))
        .app_data(web::Data::new(config))
        .configure(configure)
        .default_service(web::to(handlers::meta::not_found))
        // Inside the security headers, so a 429 carries them too; outside everything else,
        // so a refused request costs no routing, session lookup or body read.
        .wrap(actix_web::middleware::from_fn(move |request, next| {
            limits::limit_rate(
                Arc::clone(&rate_limiter),
                trusted_proxies.clone(),
                request,
                next,
            )
        }))
        .wrap(actix_web::middleware::from_fn(move |request, next| {
            middleware::security_headers(transport, request, next)
        }))
}

/// Registers every route of [`routes::ROUTES`] and the extractor configuration (body limits
/// and JSON error shapes). Useful on its own to mount the API under a scope in tests.
///
/// The handlers expect `web::Data<dyn ReadinessProbe>` and `web::Data<ApiConfig>` in the app
/// data; [`app`] provides them.
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
