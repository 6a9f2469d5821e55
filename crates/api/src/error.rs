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
            ApiError::Internal => "internal",
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
            JsonPayloadError::Deserialize(source) => {
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
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(ErrorBody {
            error: self.code(),
            message: self.to_string(),
        })
    }
}
