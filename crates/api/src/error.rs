//! The one error type handlers return, and its stable JSON shape.

use actix_web::error::JsonPayloadError;
use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// An answer the API gives instead of success, rendered as
/// `{"error": code, "message": text}`.
///
/// `code` ([`ApiError::code`]) is stable and meant for programs; `message` is for people and
/// may change. Messages name the problem, never PHI: they are built from fixed text, limits
/// and positions, not from what the client sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No route matches the request's method and path.
    #[error("no route matches this method and path")]
    NotFound,
    /// The path exists but does not accept this method.
    #[error("this path does not accept the request method")]
    MethodNotAllowed,
    /// The backend cannot serve requests yet; the reason is operator-facing and carries no PHI.
    #[error("{reason}")]
    NotReady {
        /// Why the probe failed.
        reason: String,
    },
    /// The body is larger than the endpoint accepts.
    #[error("request body exceeds the limit of {limit_bytes} bytes")]
    PayloadTooLarge {
        /// The limit that was exceeded.
        limit_bytes: usize,
    },
    /// The body is not `application/json`.
    #[error("request body must have content type application/json")]
    UnsupportedMediaType,
    /// The body is not valid JSON, or not the shape the endpoint expects.
    ///
    /// Only the error category and the position are kept: serde_json's own message quotes the
    /// offending value, which may be PHI.
    #[error(
        "request body is not valid JSON for this endpoint ({category} error at line {line} column {column})"
    )]
    InvalidJson {
        /// `syntax`, `data`, `eof` or `io`.
        category: &'static str,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
    },
    /// The body could not be read to its end (a broken or truncated upload).
    #[error("request body could not be read completely")]
    BodyUnreadable,
    /// A path segment does not parse (for example a malformed id).
    #[error("a path segment is malformed")]
    InvalidPath,
    /// The query string does not parse.
    #[error("the query string is malformed")]
    InvalidQuery,
    /// No session: the request carries no session token, or one the server does not know.
    #[error("authentication required: log in at POST /auth/login")]
    Unauthenticated,
    /// The session ended by the idle or absolute limit.
    #[error("the session has expired; log in again")]
    SessionExpired,
    /// The user name or password (or second factor) is wrong, or the account is disabled.
    /// One answer for all, so an attacker cannot tell which.
    #[error("the user name, password or second factor is not correct")]
    InvalidCredentials,
    /// The account has a second factor and the login carried none.
    #[error("this account needs a second factor: send second_factor with the login")]
    SecondFactorRequired,
    /// The identity provider's token does not show a second factor, and the role needs one.
    #[error(
        "the identity provider's token shows no second factor (amr); this account's role needs one: sign in there with a second factor"
    )]
    IdentityProviderSecondFactorMissing,
    /// Too many failed attempts for the account or from this address.
    #[error("too many failed attempts; try again in {retry_after_seconds} seconds")]
    Throttled {
        /// When the client may try again.
        retry_after_seconds: u64,
    },
    /// The client sent more requests than its rate limit allows (see `crate::limits`).
    #[error(
        "too many requests from this client: over its rate limit; try again in {retry_after_seconds} seconds"
    )]
    RateLimited {
        /// When the client may send again.
        retry_after_seconds: u64,
    },
    /// The session is not yet allowed to do this (the password must be changed, or a second
    /// factor enrolled, first).
    #[error("{reason}")]
    SessionRestricted {
        /// Which step the user must take first.
        reason: &'static str,
    },
    /// The role's grants do not include this route.
    #[error("your role may not {action}")]
    Forbidden {
        /// What was refused, in words (built from fixed text).
        action: String,
    },
    /// The role may do this in general, but not on this patient's record.
    #[error("you have no access to this patient's record{hint}")]
    NoAccessToRecord {
        /// What the user may do about it (fixed text).
        hint: &'static str,
    },
    /// The caller reaches the record, but not to change who else does (see
    /// [`crate::policy::AccessChangeDenial`]).
    #[error("{message}")]
    AccessChangeRefused {
        /// Why, in fixed text.
        message: &'static str,
    },
    /// A request the endpoint understood but will not do; the message names the problem
    /// from fixed text and ids, never from PHI.
    #[error("{message}")]
    Unprocessable {
        /// Stable code for the problem.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A conflict with the current state of a resource (a user name taken, a review already
    /// closed, a record changed under a racing writer).
    #[error("{message}")]
    Conflict {
        /// Stable code for the conflict.
        code: &'static str,
        /// What conflicts.
        message: String,
    },
    /// The caller already holds an open break-glass grant to this patient; the answer names
    /// it and its end, so the client carries on with it. Nothing new was recorded.
    #[error(
        "your break-glass grant {grant_id} to this patient is open until {expires_at}; it is not extended or replaced"
    )]
    BreakGlassAlreadyOpen {
        /// The open grant.
        grant_id: uuid::Uuid,
        /// RFC 3339, UTC: when the open grant ends.
        expires_at: String,
    },
    /// Another request with the same Idempotency-Key and body is still running: its answer
    /// will be replayed to a retry.
    #[error(
        "a request with this Idempotency-Key is still in progress; retry after a second to get its answer (a claim left by a failed server expires after 60 seconds, and the request may then run again: check the record's version or history first)"
    )]
    IdempotencyKeyInProgress,
    /// `If-Match` names another version than the record's.
    #[error("the record is at version {current}, not the version {expected} named by If-Match")]
    PreconditionFailed {
        /// The version the client named.
        expected: u64,
        /// The version the record is at.
        current: u64,
    },
    /// The patient's key was destroyed: the record is gone for good.
    #[error("this patient's record was erased")]
    Erased,
    /// A required header is missing or malformed.
    #[error("{message}")]
    InvalidHeader {
        /// Which header and what is wrong (fixed text).
        message: &'static str,
    },
    /// The audit trail did not take the access record, so the access is refused.
    #[error("the audit trail is unavailable; the request was not served")]
    AuditUnavailable,
    /// Our fault. The detail is logged by whoever creates this, never returned.
    #[error("internal error")]
    Internal,
}

impl ApiError {
    /// The stable, machine-readable error code.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound => "not_found",
            ApiError::MethodNotAllowed => "method_not_allowed",
            ApiError::NotReady { .. } => "not_ready",
            ApiError::PayloadTooLarge { .. } => "payload_too_large",
            ApiError::UnsupportedMediaType => "unsupported_media_type",
            ApiError::InvalidJson { .. } => "invalid_json",
            ApiError::BodyUnreadable => "body_unreadable",
            ApiError::InvalidPath => "invalid_path",
            ApiError::InvalidQuery => "invalid_query",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::SessionExpired => "session_expired",
            ApiError::InvalidCredentials => "invalid_credentials",
            ApiError::SecondFactorRequired => "second_factor_required",
            ApiError::IdentityProviderSecondFactorMissing => {
                "identity_provider_second_factor_missing"
            }
            ApiError::Throttled { .. } => "throttled",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::SessionRestricted { .. } => "session_restricted",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::NoAccessToRecord { .. } => "no_access_to_record",
            ApiError::AccessChangeRefused { .. } => "access_change_refused",
            ApiError::Unprocessable { code, .. } | ApiError::Conflict { code, .. } => code,
            ApiError::BreakGlassAlreadyOpen { .. } => "break_glass_already_open",
            ApiError::IdempotencyKeyInProgress => "idempotency_key_in_progress",
            ApiError::PreconditionFailed { .. } => "precondition_failed",
            ApiError::Erased => "erased",
            ApiError::InvalidHeader { .. } => "invalid_header",
            ApiError::AuditUnavailable => "audit_unavailable",
            ApiError::Internal => "internal",
        }
    }

    /// A body that parsed but is not acceptable, with a message built from fixed text.
    pub(crate) fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::Unprocessable {
            code,
            message: message.into(),
        }
    }

    /// A body that does not deserialize: only serde's error category and position are kept,
    /// because its message can quote the value, which may be PHI.
    pub(crate) fn from_serde_error(source: &serde_json::Error) -> ApiError {
        let category = match source.classify() {
            serde_json::error::Category::Io => "io",
            serde_json::error::Category::Syntax => "syntax",
            serde_json::error::Category::Data => "data",
            serde_json::error::Category::Eof => "eof",
        };
        ApiError::InvalidJson {
            category,
            line: source.line(),
            column: source.column(),
        }
    }

    /// Maps actix's JSON extractor errors onto our shape without echoing the body.
    pub(crate) fn from_json_error(error: &JsonPayloadError) -> ApiError {
        match error {
            JsonPayloadError::Overflow { limit } => ApiError::PayloadTooLarge {
                limit_bytes: *limit,
            },
            JsonPayloadError::OverflowKnownLength { limit, .. } => ApiError::PayloadTooLarge {
                limit_bytes: *limit,
            },
            JsonPayloadError::ContentType => ApiError::UnsupportedMediaType,
            JsonPayloadError::Deserialize(source) => ApiError::from_serde_error(source),
            // A broken or truncated upload is the client's problem, but its detail is a
            // transport error, not something the client can act on beyond "send it again".
            JsonPayloadError::Payload(_) => ApiError::BodyUnreadable,
            // Serialize is a response-side failure (ours); the enum is non-exhaustive.
            _ => {
                tracing::error!(
                    error_kind = "json_payload",
                    "unexpected JSON extractor error"
                );
                ApiError::Internal
            }
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: String,
    /// With `break_glass_already_open`: the grant already open, and when it ends.
    #[serde(skip_serializing_if = "Option::is_none")]
    grant_id: Option<uuid::Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires_at: Option<&'a str>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::NotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::InvalidJson { .. }
            | ApiError::BodyUnreadable
            | ApiError::InvalidPath
            | ApiError::InvalidQuery => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated
            | ApiError::SessionExpired
            | ApiError::InvalidCredentials
            | ApiError::SecondFactorRequired
            | ApiError::IdentityProviderSecondFactorMissing => StatusCode::UNAUTHORIZED,
            ApiError::Throttled { .. } | ApiError::RateLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ApiError::SessionRestricted { .. }
            | ApiError::Forbidden { .. }
            | ApiError::NoAccessToRecord { .. }
            | ApiError::AccessChangeRefused { .. } => StatusCode::FORBIDDEN,
            ApiError::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::Conflict { .. }
            | ApiError::BreakGlassAlreadyOpen { .. }
            | ApiError::IdempotencyKeyInProgress => StatusCode::CONFLICT,
            ApiError::PreconditionFailed { .. } => StatusCode::PRECONDITION_FAILED,
            ApiError::Erased => StatusCode::GONE,
            ApiError::InvalidHeader { .. } => StatusCode::BAD_REQUEST,
            ApiError::AuditUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status_code());
        if let ApiError::Throttled {
            retry_after_seconds,
        }
        | ApiError::RateLimited {
            retry_after_seconds,
        } = self
        {
            response.insert_header(("Retry-After", retry_after_seconds.to_string()));
        }
        if matches!(self, ApiError::IdempotencyKeyInProgress) {
            response.insert_header(("Retry-After", "1"));
        }
        if matches!(
            self,
            ApiError::Unauthenticated | ApiError::SessionExpired | ApiError::InvalidCredentials
        ) {
            response.insert_header(("WWW-Authenticate", "Bearer"));
        }
        let (grant_id, expires_at) = match self {
            ApiError::BreakGlassAlreadyOpen {
                grant_id,
                expires_at,
            } => (Some(*grant_id), Some(expires_at.as_str())),
            _ => (None, None),
        };
        response.json(ErrorBody {
            error: self.code(),
            message: self.to_string(),
            grant_id,
            expires_at,
        })
    }
}
