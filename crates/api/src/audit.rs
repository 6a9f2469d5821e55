//! Where the API's audit rows go before a response leaves.
//!
//! Changes to a chart are audited by the audit projection from the events themselves (their
//! headers name the actor, and mark break-glass). Everything else the API does with PHI or
//! with access (chart, history and disclosure reads, searches, exports, logins, logouts,
//! session expiries, denials, break-glass openings) is an [`AuditRow`] the handler records
//! through the [`AuditSink`] *before* it answers; when the sink fails, the request fails with
//! 503 (HIPAA 164.312(b): no access without its audit record). The server's sink,
//! [`SignedAuditSink`], appends them as signed events to an audit stream.

use async_trait::async_trait;
use chartlog_domain::{Actor, PatientId};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome, AuditRow};
use chartlog_projections::db::ProjectionDb;

use crate::policy::{Action, Entity, Grant};
use crate::routes::{Permission, Route, Verb};
use crate::{ApiConfig, ApiError};

/// The audit trail could not take a row; the caller answers 503 and reveals nothing.
#[derive(Debug, thiserror::Error)]
#[error("the audit trail is unavailable")]
pub struct AuditUnavailable;

/// Durable destination of the API's audit rows.
#[async_trait]
pub trait AuditSink: Send + Sync + 'static {
    /// Returns once the rows are durable.
    async fn record(&self, rows: Vec<AuditRow>) -> Result<(), AuditUnavailable>;
}

/// Appends rows as signed events to this process's audit stream (group-committed), so reads
/// and denials are as tamper-evident as the record; the audit projection folds them into
/// the audit trail. What the server uses.
pub struct SignedAuditSink {
    log: chartlog_projections::audit_log::AuditLog,
}

impl SignedAuditSink {
    pub fn new(log: chartlog_projections::audit_log::AuditLog) -> Self {
        Self { log }
    }
}

#[async_trait]
impl AuditSink for SignedAuditSink {
    async fn record(&self, rows: Vec<AuditRow>) -> Result<(), AuditUnavailable> {
        let count = rows.len();
        self.log.record(rows).await.map_err(|error| {
            tracing::error!(error = %error, rows = count, "audit rows not recorded");
            AuditUnavailable
        })
    }
}

/// Appends rows to the audit-trail table of the read-model database directly, in one
/// transaction: durable and immediately visible, but not signed. For tests of the API alone.
pub struct DatabaseAuditSink {
    db: ProjectionDb,
}

impl DatabaseAuditSink {
    pub fn new(db: ProjectionDb) -> Self {
        Self { db }
    }
}

#[async_trait]
impl AuditSink for DatabaseAuditSink {
    async fn record(&self, rows: Vec<AuditRow>) -> Result<(), AuditUnavailable> {
        chartlog_projections::audit::append_audit_rows(&self.db, &rows)
            .await
            .map_err(|error| {
                tracing::error!(error = %error, rows = rows.len(), "audit rows not recorded");
                AuditUnavailable
            })
    }
}

/// Records `rows`, or fails the request with 503. Refusals among them are counted once
/// they are durable; an alert they raise is sent beside the request, which never waits for it.
pub(crate) async fn record(config: &ApiConfig, rows: Vec<AuditRow>) -> Result<(), ApiError> {
    // The rows go to the sink, so the watch reads a copy, and only after the write: an alert
    // raised by rows that were never recorded would be dropped with them, yet still start the
    // subject's quiet window, silencing its alerts for a window once the trail is back.
    let refusals: Vec<AuditRow> = rows
        .iter()
        .filter(|row| crate::alerts::is_refusal(row))
        .cloned()
        .collect();
    config
        .audit
        .record(rows)
        .await
        .map_err(|AuditUnavailable| ApiError::AuditUnavailable)?;
    let alerts = config
        .refusal_watch
        .observe(&refusals, &config.public_base_url);
    for alert in alerts {
        let notifier = config.notifier.clone();
        actix_web::rt::spawn(async move { notifier.repeated_refusals(&alert).await });
    }
    Ok(())
}

/// A successful access by `actor`, stamped now.
pub(crate) fn access_row(
    actor: Actor,
    client_address: Option<std::net::IpAddr>,
    patient_id: Option<PatientId>,
    entity: AuditEntity,
    action: AuditAction,
) -> AuditRow {
    AuditRow {
        audit_id: uuid::Uuid::now_v7(),
        occurred_at: crate::now(),
        actor: Some(actor),
        patient_id,
        entity: Some(entity),
        record_id: patient_id.map(|patient| patient.as_uuid()),
        action,
        outcome: AuditOutcome::Success,
        client_address,
        event_type: None,
    }
}

/// The audit vocabulary's entity for a policy entity.
pub(crate) const fn audit_entity(entity: Entity) -> AuditEntity {
    match entity {
        Entity::Demographics | Entity::Erasure => AuditEntity::Patient,
        Entity::LegalHold => AuditEntity::LegalHold,
        Entity::Observation => AuditEntity::Observation,
        Entity::Condition => AuditEntity::Condition,
        Entity::Allergy => AuditEntity::Allergy,
        Entity::Medication => AuditEntity::MedicationOrder,
        Entity::Note => AuditEntity::Note,
        Entity::Consent => AuditEntity::Consent,
        Entity::CareRelationship => AuditEntity::CareRelationship,
        Entity::History => AuditEntity::History,
        Entity::Disclosures => AuditEntity::Disclosures,
        Entity::AuditTrail => AuditEntity::AuditTrail,
        Entity::BreakGlassReview => AuditEntity::BreakGlassReview,
        Entity::DeidentifiedData => AuditEntity::DeidentifiedData,
        Entity::User => AuditEntity::User,
    }
}

/// What a denial of this route is filed under.
pub(crate) fn entity_of_route(route: &Route) -> Option<AuditEntity> {
    match route.permission {
        Permission::Grant(Grant(entity, _)) => Some(audit_entity(entity)),
        Permission::Clinician => Some(AuditEntity::Patient),
        Permission::AnySession => Some(AuditEntity::Session),
        Permission::Public => None,
    }
}

/// The action a refused request attempted.
pub(crate) fn action_of_route(route: &Route) -> AuditAction {
    match route.permission {
        Permission::Grant(Grant(_, Action::Create)) => AuditAction::Create,
        Permission::Grant(Grant(_, Action::Update)) => AuditAction::Update,
        Permission::Grant(Grant(_, Action::Read)) => AuditAction::Read,
        Permission::Clinician if route.path.ends_with("/search") => AuditAction::Search,
        Permission::Clinician => AuditAction::BreakGlass,
        Permission::AnySession | Permission::Public => match route.verb {
            Verb::Get => AuditAction::Read,
            Verb::Post => AuditAction::Update,
        },
    }
}
