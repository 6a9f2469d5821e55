//! The guard in front of every mounted resource: authenticates the session, checks the
//! route's declared [`Permission`], audits every refusal, and hands the handler a [`Caller`].
//!
//! Object-level checks (is this patient's record within the caller's reach?) need the record
//! and happen in the handlers through [`crate::handlers::reach`]; the guard knows only the
//! route.

use std::net::IpAddr;
use std::pin::Pin;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::http::header::AUTHORIZATION;
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage, HttpRequest, web};
use chartlog_access::{Session, SessionError, SessionStage};
use chartlog_domain::{Actor, PatientId, PurposeOfUse, Role};
use chartlog_projections::audit::{AuditAction, AuditOutcome, AuditRow};

use crate::routes::{Permission, Route, Verb, route_for};
use crate::{ApiConfig, ApiError, audit, policy};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "chartlog_session";

/// The authenticated user behind a request, put in the request's extensions by the guard.
#[derive(Clone)]
pub struct Caller {
    pub(crate) session: Session,
    pub(crate) client_address: Option<IpAddr>,
    token: SessionTokenText,
}

/// The address login failures of a request are counted under. A connection without a peer
/// address (none over TCP; a harness calling the app in process) counts with every other
/// such connection, under 0.0.0.0, rather than escaping the per-address limit.
pub(crate) fn failure_address(client_address: Option<IpAddr>) -> IpAddr {
    client_address.unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED))
}

/// The raw session token of this request, kept to log the session out. Never printed.
#[derive(Clone)]
struct SessionTokenText(String);

impl Caller {
    /// A caller with this session and no token or address, for [`crate::fuzzing`], which
    /// turns bodies into commands without a request.
    pub(crate) fn without_request(session: Session) -> Caller {
        Caller {
            session,
            client_address: None,
            token: SessionTokenText(String::new()),
        }
    }

    /// The session's token as the client sent it.
    pub(crate) fn token(&self) -> &str {
        &self.token.0
    }

    /// The actor recorded in events and audit rows for an access of the given kind.
    pub(crate) fn actor(&self, access: Option<policy::RecordAccess>) -> Actor {
        let break_glass = access == Some(policy::RecordAccess::BreakGlass);
        let purpose_of_use = match (access, self.session.role) {
            (Some(policy::RecordAccess::BreakGlass), _) => PurposeOfUse::EmergencyTreatment,
            (Some(policy::RecordAccess::OwnRecord), _) | (_, Role::Patient) => {
                PurposeOfUse::PatientRequest
            }
            (_, Role::Administrator) => PurposeOfUse::SystemAdministration,
            (_, Role::Auditor) => PurposeOfUse::Oversight,
            (_, Role::Analyst) => PurposeOfUse::Research,
            _ => PurposeOfUse::Treatment,
        };
        Actor {
            user_id: self.session.user_id,
            role: self.session.role,
            purpose_of_use,
            break_glass,
        }
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = std::future::Ready<Result<Caller, ApiError>>;

    fn from_request(request: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        // Only the guard inserts a Caller; a handler asking for one on a route the guard let
        // through without a session (a public route) is a programming error.
        std::future::ready(
            request
                .extensions()
                .get::<Caller>()
                .cloned()
                .ok_or_else(|| {
                    tracing::error!("a handler asked for a caller the guard did not establish");
                    ApiError::Internal
                }),
        )
    }
}

type BoxedResponse = Result<ServiceResponse<BoxBody>, actix_web::Error>;

/// Checks `path`'s permission for the request's method, then calls the handler.
pub(crate) fn guard<B: MessageBody + 'static>(
    path: &'static str,
    request: ServiceRequest,
    next: Next<B>,
) -> Pin<Box<dyn std::future::Future<Output = BoxedResponse>>> {
    Box::pin(async move {
        let verb = match *request.method() {
            Method::GET => Some(Verb::Get),
            Method::POST => Some(Verb::Post),
            _ => None,
        };
        // A method the path does not serve reaches the resource's 405 handler, which reveals
        // nothing and does nothing.
        let Some(route) = verb.and_then(|verb| route_for(verb, path)) else {
            return Ok(next.call(request).await?.map_into_boxed_body());
        };
        if route.permission == Permission::Public {
            return Ok(next.call(request).await?.map_into_boxed_body());
        }
        let Some(config) = request.app_data::<web::Data<ApiConfig>>().cloned() else {
            tracing::error!("the API configuration is missing from the app data");
            return Ok(request.error_response(ApiError::Internal));
        };
        match authorize(&config, route, &request).await {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(next.call(request).await?.map_into_boxed_body())
            }
            Err(error) => Ok(request.error_response(error)),
        }
    })
}

async fn authorize(
    config: &ApiConfig,
    route: &'static Route,
    request: &ServiceRequest,
) -> Result<Caller, ApiError> {
    let now = crate::now();
    let client_address = config.trusted_proxies.client_of(request.request());
    let patient_id = request
        .match_info()
        .get("patient_id")
        .and_then(|raw| PatientId::parse(raw).ok());
    let denial = |actor: Option<Actor>, action: AuditAction| AuditRow {
        audit_id: uuid::Uuid::now_v7(),
        occurred_at: now,
        actor,
        patient_id,
        entity: audit::entity_of_route(route),
        record_id: None,
        action,
        outcome: AuditOutcome::Denied,
        client_address,
        event_type: None,
    };

    let Some(token) = session_token(request) else {
        audit::record(config, vec![denial(None, audit::action_of_route(route))]).await?;
        return Err(ApiError::Unauthenticated);
    };
    let session = match config.accounts.authenticate(&token, now).await {
        Ok(session) => session,
        Err(SessionError::Expired { user_id, .. }) => {
            let mut row = denial(None, AuditAction::SessionExpiry);
            row.actor = Some(Actor {
                user_id,
                role: Role::System,
                purpose_of_use: PurposeOfUse::SystemAdministration,
                break_glass: false,
            });
            row.entity = Some(chartlog_projections::audit::AuditEntity::Session);
            row.outcome = AuditOutcome::Success;
            audit::record(
                config,
                vec![row, denial(None, audit::action_of_route(route))],
            )
            .await?;
            return Err(ApiError::SessionExpired);
        }
        Err(SessionError::Unknown | SessionError::Revoked { .. }) => {
            // Tokens are the client's choice: one it invented is charged to its address too,
            // before the denial is audited, so inventing tokens neither escapes the address's
            // limit nor floods the audit trail (see `crate::limits`).
            config.rate_limiter.check_address(client_address)?;
            audit::record(config, vec![denial(None, audit::action_of_route(route))]).await?;
            return Err(ApiError::Unauthenticated);
        }
        Err(other) => {
            tracing::error!(error = %other, "session lookup failed");
            return Err(ApiError::Internal);
        }
    };
    let caller = Caller {
        session,
        client_address,
        token: SessionTokenText(token),
    };
    let refuse = |error: ApiError| async {
        let row = denial(Some(caller.actor(None)), audit::action_of_route(route));
        audit::record(config, vec![row]).await?;
        Err(error)
    };

    if route.permission != Permission::AnySession {
        match caller.session.stage {
            SessionStage::Full => {}
            SessionStage::MustChangePassword => {
                return refuse(ApiError::SessionRestricted {
                    reason: "change the one-time password first (POST /auth/password)",
                })
                .await;
            }
            SessionStage::MustEnrollSecondFactor => {
                return refuse(ApiError::SessionRestricted {
                    reason: "enroll a second factor first (POST /auth/second-factor/enrollment)",
                })
                .await;
            }
        }
    }
    match route.permission {
        Permission::Public | Permission::AnySession => {}
        Permission::Grant(grant) => {
            if !policy::allows(caller.session.role, grant) {
                let policy::Grant(entity, action) = grant;
                return refuse(ApiError::Forbidden {
                    action: format!("{} {}", action.as_str(), entity.as_str().replace('_', " ")),
                })
                .await;
            }
        }
        Permission::Clinician => {
            if !policy::is_clinician(caller.session.role) {
                return refuse(ApiError::Forbidden {
                    action: "use this route: only clinical roles can".to_owned(),
                })
                .await;
            }
        }
    }
    Ok(caller)
}

/// The session token from the bearer header, or else from the session cookie.
pub(crate) fn session_token(request: &ServiceRequest) -> Option<String> {
    let bearer = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|token| !token.is_empty());
    if let Some(token) = bearer {
        return Some(token.to_owned());
    }
    request
        .cookie(SESSION_COOKIE)
        .map(|cookie| cookie.value().to_owned())
        .filter(|token| !token.is_empty())
}
