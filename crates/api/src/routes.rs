//! The route table: every route, the permission it needs, and its handler.
//!
//! A handler is mounted only through [`Route`] entries listed in [`ROUTES`], and a `Route`
//! cannot be written without a [`Permission`], so "a route without a declared policy" cannot
//! be built. Mounting asserts the entry is in [`ROUTES`]; the tests check every entry answers.
//! Later routes (commands, queries, audit) join this table with non-public permissions.

use std::time::Duration;

use actix_web::{FromRequest, Handler, HttpResponse, Resource, Responder, web};
use serde::Serialize;

use crate::{ApiError, ReadinessProbe};

/// How long `GET /readyz` waits for the probe before answering 503. Load balancers call it
/// every few seconds; a probe that hangs must not pile up requests.
pub const READINESS_CHECK_TIMEOUT_MS_MAX: u64 = 2_000;
const _: () = assert!(READINESS_CHECK_TIMEOUT_MS_MAX >= 100);
const _: () = assert!(READINESS_CHECK_TIMEOUT_MS_MAX <= 10_000);

/// What a caller must hold to use a route.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Permission {
    /// No authentication. Only for routes that reveal no PHI and no user data (probes).
    Public,
}

/// HTTP methods a route may answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    /// `GET`
    Get,
    /// `POST`
    Post,
}

/// One entry of the route table.
#[derive(Debug)]
pub struct Route {
    /// The method the route answers.
    pub verb: Verb,
    /// The actix path pattern, e.g. `/patients/{patient_id}`.
    pub path: &'static str,
    /// What the caller must hold.
    pub permission: Permission,
}

/// Liveness: the process is up and serving HTTP.
pub static HEALTHZ: Route = Route {
    verb: Verb::Get,
    path: "/healthz",
    permission: Permission::Public,
};

/// Readiness: the backend can serve requests.
pub static READYZ: Route = Route {
    verb: Verb::Get,
    path: "/readyz",
    permission: Permission::Public,
};

/// Every route the API serves, with its permission.
pub static ROUTES: &[&Route] = &[&HEALTHZ, &READYZ];

/// The permission declared for `verb path`, if such a route exists.
pub fn permission_for(verb: Verb, path: &str) -> Option<Permission> {
    ROUTES
        .iter()
        .find(|route| route.verb == verb && route.path == path)
        .map(|route| route.permission)
}

pub(crate) fn register(config: &mut web::ServiceConfig) {
    config.service(Mount::new(&HEALTHZ, healthz).finish());
    config.service(Mount::new(&READYZ, readyz).finish());
}

/// Builds the actix resource for one path from its table entries.
///
/// actix matches the path first and then the method *within* that resource, so every verb
/// of a path must be mounted on the same resource: `Mount::new(&A, a).and(&B, b).finish()`.
struct Mount {
    path: &'static str,
    resource: Resource,
}

impl Mount {
    fn new<F, Args>(route: &'static Route, handler: F) -> Mount
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        Mount {
            path: route.path,
            // Other methods get 405 in our error shape rather than actix's empty body.
            resource: web::resource(route.path).default_service(web::to(method_not_allowed)),
        }
        .and(route, handler)
    }

    fn and<F, Args>(self, route: &'static Route, handler: F) -> Mount
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        // A handler mounted from a Route that is not in the table would escape the policy
        // checks that read the table.
        assert!(
            ROUTES.iter().any(|listed| std::ptr::eq(*listed, route)),
            "route {} is mounted but not listed in ROUTES",
            route.path
        );
        assert_eq!(route.path, self.path, "one Mount serves one path");
        let method = match route.verb {
            Verb::Get => web::get(),
            Verb::Post => web::post(),
        };
        Mount {
            path: self.path,
            resource: self.resource.route(method.to(handler)),
        }
    }

    fn finish(self) -> Resource {
        self.resource
    }
}

#[derive(Serialize)]
struct Status {
    status: &'static str,
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Status { status: "ok" })
}

async fn readyz(probe: web::Data<dyn ReadinessProbe>) -> Result<HttpResponse, ApiError> {
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

pub(crate) async fn not_found() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound)
}

async fn method_not_allowed() -> Result<HttpResponse, ApiError> {
    Err(ApiError::MethodNotAllowed)
}
