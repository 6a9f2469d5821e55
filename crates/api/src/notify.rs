//! Security notifications: a security officer hears at once that someone opened a chart
//! outside the care relationship (break-glass), or keeps being refused
//! ([`crate::alerts`]); an operator, that a scheduled backup failed.
//!
//! **Invariant:** a notice carries ids, a time and a link to the review, never PHI: it leaves
//! the system through channels (chat, e-mail, pagers) that are not cleared for PHI. The
//! stated reason stays in the review queue, for auditors only.

use std::time::Duration;

use async_trait::async_trait;
use chartlog_domain::{PatientId, Role, Timestamp, UserId};
use serde::Serialize;
use uuid::Uuid;

use crate::alerts::RefusalAlert;

/// How long a webhook delivery may take before it is abandoned (and logged). The request
/// that opened break-glass does not wait for it.
pub const WEBHOOK_TIMEOUT_MS_MAX: u64 = 5_000;

/// What a notifier is told of a break-glass opening.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BreakGlassNotice {
    /// Always `break_glass_opened`: tells this notice from the others a webhook receives.
    pub kind: &'static str,
    pub grant_id: Uuid,
    pub user_id: UserId,
    pub role: Role,
    pub patient_id: PatientId,
    /// RFC 3339, UTC.
    pub opened_at: String,
    pub expires_at: String,
    /// Where an auditor reviews it, e.g. `https://chartlog.example/break-glass/reviews`.
    pub review_link: String,
}

impl BreakGlassNotice {
    pub fn new(
        grant_id: Uuid,
        user_id: UserId,
        role: Role,
        patient_id: PatientId,
        opened_at: Timestamp,
        expires_at: Timestamp,
        review_link: String,
    ) -> Self {
        Self {
            kind: "break_glass_opened",
            grant_id,
            user_id,
            role,
            patient_id,
            opened_at: opened_at.to_string(),
            expires_at: expires_at.to_string(),
            review_link,
        }
    }
}

/// What a notifier is told when a scheduled backup fails.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackupFailedNotice {
    /// Always `backup_failed`: tells this notice from the others a webhook receives.
    pub kind: &'static str,
    /// RFC 3339, UTC.
    pub failed_at: String,
    /// Scheduled backups failed in a row, this one included.
    pub failures_in_a_row: u32,
    /// The last scheduled backup written by this server process, if any.
    pub last_written_at: Option<String>,
}

impl BackupFailedNotice {
    pub fn new(
        failed_at: Timestamp,
        failures_in_a_row: u32,
        last_written_at: Option<Timestamp>,
    ) -> Self {
        Self {
            kind: "backup_failed",
            failed_at: failed_at.to_string(),
            failures_in_a_row,
            last_written_at: last_written_at.map(|at| at.to_string()),
        }
    }
}

/// Delivers notices. Delivery is best effort and never fails the request: what a notice
/// reports is already in the audit trail (and a grant in the review queue), which are the
/// record.
#[async_trait]
pub trait Notifier: Send + Sync + 'static {
    async fn break_glass_opened(&self, notice: &BreakGlassNotice);
    async fn repeated_refusals(&self, alert: &RefusalAlert);
    async fn backup_failed(&self, notice: &BackupFailedNotice);
}

/// Writes each notice to the log at WARN, for deployments that alert on log lines.
#[derive(Debug, Default)]
pub struct LogNotifier;

#[async_trait]
impl Notifier for LogNotifier {
    async fn break_glass_opened(&self, notice: &BreakGlassNotice) {
        tracing::warn!(
            grant_id = %notice.grant_id,
            user_id = %notice.user_id,
            role = notice.role.as_str(),
            patient_id = %notice.patient_id,
            expires_at = %notice.expires_at,
            review_link = %notice.review_link,
            "break-glass access opened"
        );
    }

    async fn repeated_refusals(&self, alert: &RefusalAlert) {
        tracing::warn!(
            alert_id = %alert.alert_id,
            user_id = alert.user_id.map(|user| user.to_string()),
            role = alert.role.map(Role::as_str),
            refusals = alert.refusals,
            window_minutes = alert.window_minutes,
            first_at = %alert.first_at,
            last_at = %alert.last_at,
            audit_link = %alert.audit_link,
            "repeated refusals"
        );
    }

    async fn backup_failed(&self, notice: &BackupFailedNotice) {
        tracing::warn!(
            failed_at = %notice.failed_at,
            failures_in_a_row = notice.failures_in_a_row,
            last_written_at = notice.last_written_at.as_deref(),
            "backup failure notice"
        );
    }
}

/// POSTs each notice as JSON to a webhook (chat, paging or SIEM integration).
pub struct WebhookNotifier {
    client: reqwest::Client,
    url: reqwest::Url,
}

/// The webhook notifier could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook URL is not a valid https URL")]
    InvalidUrl,
    #[error("the HTTP client could not be built")]
    Client(#[source] reqwest::Error),
}

impl WebhookNotifier {
    /// `url` must be https unless `allow_plain_http` (tests, a local relay).
    pub fn new(url: &str, allow_plain_http: bool) -> Result<Self, WebhookError> {
        let url = reqwest::Url::parse(url).map_err(|_| WebhookError::InvalidUrl)?;
        match url.scheme() {
            "https" => {}
            "http" if allow_plain_http => {}
            _ => return Err(WebhookError::InvalidUrl),
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(WEBHOOK_TIMEOUT_MS_MAX))
            .build()
            .map_err(WebhookError::Client)?;
        Ok(Self { client, url })
    }
}

#[async_trait]
impl Notifier for WebhookNotifier {
    async fn break_glass_opened(&self, notice: &BreakGlassNotice) {
        match self.post(notice).await {
            Ok(()) => tracing::info!(grant_id = %notice.grant_id, "break-glass notice delivered"),
            Err(status) => tracing::error!(
                grant_id = %notice.grant_id,
                status,
                "break-glass notice not delivered"
            ),
        }
    }

    async fn repeated_refusals(&self, alert: &RefusalAlert) {
        match self.post(alert).await {
            Ok(()) => tracing::info!(alert_id = %alert.alert_id, "refusal alert delivered"),
            Err(status) => tracing::error!(
                alert_id = %alert.alert_id,
                status,
                "refusal alert not delivered"
            ),
        }
    }

    async fn backup_failed(&self, notice: &BackupFailedNotice) {
        match self.post(notice).await {
            Ok(()) => tracing::info!("backup failure notice delivered"),
            Err(status) => tracing::error!(status, "backup failure notice not delivered"),
        }
    }
}

impl WebhookNotifier {
    /// POSTs `notice` as JSON. The error is the HTTP status, if any: the URL may carry a
    /// token, so the error itself is not logged.
    async fn post(&self, notice: &impl Serialize) -> Result<(), Option<u16>> {
        self.client
            .post(self.url.clone())
            .json(notice)
            .send()
            .await
            .and_then(|response| response.error_for_status())
            .map(drop)
            .map_err(|error| error.status().map(|status| status.as_u16()))
    }
}

/// Sends each notice to every notifier in turn.
pub struct Notifiers(pub Vec<Box<dyn Notifier>>);

#[async_trait]
impl Notifier for Notifiers {
    async fn break_glass_opened(&self, notice: &BreakGlassNotice) {
        for notifier in &self.0 {
            notifier.break_glass_opened(notice).await;
        }
    }

    async fn repeated_refusals(&self, alert: &RefusalAlert) {
        for notifier in &self.0 {
            notifier.repeated_refusals(alert).await;
        }
    }

    async fn backup_failed(&self, notice: &BackupFailedNotice) {
        for notifier in &self.0 {
            notifier.backup_failed(notice).await;
        }
    }
}
