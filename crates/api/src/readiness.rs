//! The readiness contract between the API and whatever backs it.

/// Answers "can this process serve requests right now?" for `GET /readyz`.
///
/// The binary implements it over the store (for example: the database answers and the
/// migrations are applied). A probe should be cheap and bounded in time, because load
/// balancers call it often.
#[async_trait::async_trait]
pub trait ReadinessProbe: Send + Sync + 'static {
    /// `Ok(())` when ready; otherwise why not.
    async fn check(&self) -> Result<(), NotReady>;
}

/// Why the process is not ready.
///
/// The reason is returned to unauthenticated callers, so it names the failing dependency
/// ("database unreachable"), never PHI, credentials, connection strings or internal errors
/// verbatim; log the detail where the failure is caught instead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    reason: String,
}

impl NotReady {
    /// A failed readiness check with an operator-facing reason.
    pub fn new(reason: impl Into<String>) -> NotReady {
        let reason = reason.into();
        assert!(!reason.is_empty(), "a NotReady reason must say why");
        NotReady { reason }
    }

    /// The operator-facing reason.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}
