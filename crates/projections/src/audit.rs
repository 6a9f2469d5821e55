//! The audit trail: who did what to which record, when, from where, and with what outcome.
//! Never a PHI payload.
//!
//! Rows for changes to a chart are derived from the event's clear header alone
//! ([`audit_row_for_event`]), so the audit trail needs no data key and survives the erasure
//! of the patient it describes (HIPAA retention). Reads, logins, logouts, session expiries,
//! access denials, break-glass openings and exports are [`AuditRow`]s built by the HTTP layer
//! (and appended as events to audit streams that hold no PHI).
//!
//! **Invariant:** every field of an [`AuditRow`] is an id, a closed-vocabulary code, a time or a
//! client address; there is no field that could carry clinical content or an identifier of
//! the patient other than the random patient id.

use std::borrow::{Borrow, Cow};
use std::fmt;
use std::net::IpAddr;

use chartlog_crypto::EventHeader;
use chartlog_domain::{Actor, PatientEvent, PatientId, StreamId, Timestamp};
use uuid::Uuid;

/// Bytes of an event type echoed in an error: the header is not PHI, but an error message is
/// not the place for arbitrary stored text.
const EVENT_TYPE_ECHO_LENGTH_MAX: usize = 64;

/// What kind of record an audit row is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditEntity {
    Patient,
    Observation,
    Condition,
    Allergy,
    MedicationOrder,
    Note,
    Consent,
    CareRelationship,
    /// A legal hold on a record, which keeps it from being erased.
    LegalHold,
    /// A user account (creation, role change, lockout).
    User,
    /// A login session (login, logout, expiry).
    Session,
    /// The audit trail itself, when an auditor reads it.
    AuditTrail,
    /// A patient's record history (who changed what).
    History,
    /// A patient's accounting of disclosures (HIPAA 164.528).
    Disclosures,
    /// The de-identified views, when exported.
    DeidentifiedData,
    /// The queue of break-glass openings awaiting review.
    BreakGlassReview,
    /// A backup or a restore of the whole store, by an operator.
    Backup,
    /// The read models (chart, history, audit trail, de-identified views), rebuilt from the
    /// log by an operator: every patient's events are decrypted to re-create them.
    ReadModels,
    /// The key files: a key-encryption key or the event-signing key, rotated by an operator.
    Keys,
}

impl AuditEntity {
    pub const ALL: [AuditEntity; 19] = [
        AuditEntity::Patient,
        AuditEntity::Observation,
        AuditEntity::Condition,
        AuditEntity::Allergy,
        AuditEntity::MedicationOrder,
        AuditEntity::Note,
        AuditEntity::Consent,
        AuditEntity::CareRelationship,
        AuditEntity::LegalHold,
        AuditEntity::User,
        AuditEntity::Session,
        AuditEntity::AuditTrail,
        AuditEntity::History,
        AuditEntity::Disclosures,
        AuditEntity::DeidentifiedData,
        AuditEntity::BreakGlassReview,
        AuditEntity::Backup,
        AuditEntity::ReadModels,
        AuditEntity::Keys,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AuditEntity::Patient => "patient",
            AuditEntity::Observation => "observation",
            AuditEntity::Condition => "condition",
            AuditEntity::Allergy => "allergy",
            AuditEntity::MedicationOrder => "medication_order",
            AuditEntity::Note => "note",
            AuditEntity::Consent => "consent",
            AuditEntity::CareRelationship => "care_relationship",
            AuditEntity::LegalHold => "legal_hold",
            AuditEntity::User => "user",
            AuditEntity::Session => "session",
            AuditEntity::AuditTrail => "audit_trail",
            AuditEntity::History => "history",
            AuditEntity::Disclosures => "disclosures",
            AuditEntity::DeidentifiedData => "deidentified_data",
            AuditEntity::BreakGlassReview => "break_glass_review",
            AuditEntity::Backup => "backup",
            AuditEntity::ReadModels => "read_models",
            AuditEntity::Keys => "keys",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|entity| entity.as_str() == raw)
    }
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditAction {
    Create,
    Read,
    Update,
    Delete,
    Login,
    Logout,
    /// A session ended by the idle or absolute limit.
    SessionExpiry,
    /// A clinician outside the care relationship opened a chart for an emergency.
    BreakGlass,
    /// De-identified or record-history data left the system.
    Export,
    /// A patient look-up (by MRN, or family name and birth date): which charts matched is
    /// recorded, never what was typed.
    Search,
}

impl AuditAction {
    pub const ALL: [AuditAction; 10] = [
        AuditAction::Create,
        AuditAction::Read,
        AuditAction::Update,
        AuditAction::Delete,
        AuditAction::Login,
        AuditAction::Logout,
        AuditAction::SessionExpiry,
        AuditAction::BreakGlass,
        AuditAction::Export,
        AuditAction::Search,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AuditAction::Create => "create",
            AuditAction::Read => "read",
            AuditAction::Update => "update",
            AuditAction::Delete => "delete",
            AuditAction::Login => "login",
            AuditAction::Logout => "logout",
            AuditAction::SessionExpiry => "session_expiry",
            AuditAction::BreakGlass => "break_glass",
            AuditAction::Export => "export",
            AuditAction::Search => "search",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|action| action.as_str() == raw)
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditOutcome {
    Success,
    /// The attempt failed (a wrong password, a fault).
    Failure,
    /// The access policy refused it.
    Denied,
}

impl AuditOutcome {
    pub const ALL: [AuditOutcome; 3] = [
        AuditOutcome::Success,
        AuditOutcome::Failure,
        AuditOutcome::Denied,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Success => "success",
            AuditOutcome::Failure => "failure",
            AuditOutcome::Denied => "denied",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|outcome| outcome.as_str() == raw)
    }

    /// Success or failure of work the policy did not refuse (an operator's command).
    pub const fn of(succeeded: bool) -> Self {
        if succeeded {
            AuditOutcome::Success
        } else {
            AuditOutcome::Failure
        }
    }
}

macro_rules! display_as_str {
    ($($ty:ty),*) => {$(
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(AuditEntity, AuditAction, AuditOutcome);

/// Every patient event type, the entity it touches and the action it is. Exhaustive over
/// [`PatientEvent::EVENT_TYPES`] (tested): a new event type without a line here fails a test
/// rather than going unaudited.
pub const PATIENT_EVENT_AUDIT: [(&str, AuditEntity, AuditAction); 20] = [
    (
        "patient_registered",
        AuditEntity::Patient,
        AuditAction::Create,
    ),
    (
        "demographics_corrected",
        AuditEntity::Patient,
        AuditAction::Update,
    ),
    (
        "observation_recorded",
        AuditEntity::Observation,
        AuditAction::Create,
    ),
    (
        "condition_recorded",
        AuditEntity::Condition,
        AuditAction::Create,
    ),
    (
        "condition_resolved",
        AuditEntity::Condition,
        AuditAction::Update,
    ),
    (
        "allergy_recorded",
        AuditEntity::Allergy,
        AuditAction::Create,
    ),
    ("allergy_refuted", AuditEntity::Allergy, AuditAction::Update),
    (
        "medication_prescribed",
        AuditEntity::MedicationOrder,
        AuditAction::Create,
    ),
    (
        "medication_discontinued",
        AuditEntity::MedicationOrder,
        AuditAction::Update,
    ),
    ("note_written", AuditEntity::Note, AuditAction::Create),
    ("note_amended", AuditEntity::Note, AuditAction::Update),
    ("note_signed", AuditEntity::Note, AuditAction::Update),
    // An addendum changes the (signed) note it is attached to; it has no id of its own.
    (
        "note_addendum_added",
        AuditEntity::Note,
        AuditAction::Update,
    ),
    (
        "consent_restriction_granted",
        AuditEntity::Consent,
        AuditAction::Create,
    ),
    // Revoked restrictions stay on the chart, marked: a change, not a removal.
    (
        "consent_restriction_revoked",
        AuditEntity::Consent,
        AuditAction::Update,
    ),
    (
        "care_relationship_assigned",
        AuditEntity::CareRelationship,
        AuditAction::Create,
    ),
    (
        "care_relationship_ended",
        AuditEntity::CareRelationship,
        AuditAction::Update,
    ),
    (
        "legal_hold_placed",
        AuditEntity::LegalHold,
        AuditAction::Create,
    ),
    // Released holds stay on the record, marked: a change, not a removal.
    (
        "legal_hold_released",
        AuditEntity::LegalHold,
        AuditAction::Update,
    ),
    // Crypto-erasure: the patient's data is gone for good.
    ("patient_erased", AuditEntity::Patient, AuditAction::Delete),
];

/// The entity and action of a patient event type, or `None` for a type this build does not know.
pub fn entity_and_action(event_type: &str) -> Option<(AuditEntity, AuditAction)> {
    PATIENT_EVENT_AUDIT
        .iter()
        .find(|(known, _, _)| *known == event_type)
        .map(|&(_, entity, action)| (entity, action))
}

/// One row of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRow {
    /// Unique per row: the event id for rows derived from events, so a rebuild or a replay
    /// inserts each row once.
    pub audit_id: Uuid,
    /// UTC.
    pub occurred_at: Timestamp,
    /// `None` only for a failed login under a user name that matches no account (the name
    /// typed is not kept: it may be a mistyped password).
    pub actor: Option<Actor>,
    pub patient_id: Option<PatientId>,
    pub entity: Option<AuditEntity>,
    /// The record's id where known in the clear; for a change derived from a header alone,
    /// the patient id for patient-level events, otherwise the event id (the record's own id
    /// is sealed in the payload). See [`AuditRow::with_record_of`].
    pub record_id: Option<Uuid>,
    pub action: AuditAction,
    pub outcome: AuditOutcome,
    /// Where the request came from; `None` for rows derived from events (the event header
    /// does not carry it) and for chartlog's own work.
    pub client_address: Option<IpAddr>,
    /// The event type for rows derived from events.
    pub event_type: Option<&'static str>,
}

/// An event header the audit trail cannot describe.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("event {event_id} of stream {stream_id} is not on a patient stream")]
    NotAPatientStream { stream_id: StreamId, event_id: Uuid },
    #[error("event {event_id} has unknown event type {event_type:?}")]
    UnknownEventType { event_id: Uuid, event_type: String },
}

/// The audit row of a change to a chart, from the event's clear header alone (no data key,
/// no plaintext): it works for an erased patient's events too.
pub fn audit_row_for_event(header: &EventHeader) -> Result<AuditRow, AuditError> {
    let event_id = header.event_id.as_uuid();
    let patient_id =
        header
            .stream_id
            .patient_id()
            .ok_or_else(|| AuditError::NotAPatientStream {
                stream_id: header.stream_id.clone(),
                event_id,
            })?;
    let (event_type, entity, action) = PATIENT_EVENT_AUDIT
        .iter()
        .find(|(known, _, _)| *known == header.event_type)
        .copied()
        .ok_or_else(|| AuditError::UnknownEventType {
            event_id,
            event_type: header
                .event_type
                .chars()
                .take(EVENT_TYPE_ECHO_LENGTH_MAX)
                .collect(),
        })?;
    let record_id = match entity {
        AuditEntity::Patient => patient_id.as_uuid(),
        _ => event_id,
    };
    Ok(AuditRow {
        audit_id: event_id,
        occurred_at: header.recorded_at,
        actor: Some(header.actor),
        patient_id: Some(patient_id),
        entity: Some(entity),
        record_id: Some(record_id),
        action,
        // An event is in the log only if its command was accepted and committed.
        outcome: AuditOutcome::Success,
        client_address: None,
        event_type: Some(event_type),
    })
}

impl AuditRow {
    /// Replaces the header-only record id by the record's own id, taken from the decoded
    /// event when the caller has it (ids are random UUIDs, never PHI).
    pub fn with_record_of(mut self, event: &PatientEvent) -> AuditRow {
        debug_assert_eq!(
            self.event_type,
            Some(event.event_type()),
            "the row's own event"
        );
        if let Some(record_id) = record_id_of(event) {
            self.record_id = Some(record_id);
        }
        self
    }
}

/// The id of the record an event touches. For a care relationship that is the clinician's
/// user id (the relationship has no id of its own). `None` for the patient-level events that
/// carry no id: their record is the patient of the stream, which the header gives.
pub fn record_id_of(event: &PatientEvent) -> Option<Uuid> {
    let record_id = match event {
        PatientEvent::PatientRegistered { patient_id, .. } => patient_id.as_uuid(),
        PatientEvent::ObservationRecorded { observation_id, .. } => observation_id.as_uuid(),
        PatientEvent::ConditionRecorded { condition_id, .. }
        | PatientEvent::ConditionResolved { condition_id, .. } => condition_id.as_uuid(),
        PatientEvent::AllergyRecorded { allergy_id, .. }
        | PatientEvent::AllergyRefuted { allergy_id } => allergy_id.as_uuid(),
        PatientEvent::MedicationPrescribed {
            medication_order_id,
            ..
        }
        | PatientEvent::MedicationDiscontinued {
            medication_order_id,
            ..
        } => medication_order_id.as_uuid(),
        PatientEvent::NoteWritten { note_id, .. }
        | PatientEvent::NoteAmended { note_id, .. }
        | PatientEvent::NoteSigned { note_id, .. }
        | PatientEvent::NoteAddendumAdded { note_id, .. } => note_id.as_uuid(),
        PatientEvent::ConsentRestrictionGranted { restriction_id, .. }
        | PatientEvent::ConsentRestrictionRevoked { restriction_id } => restriction_id.as_uuid(),
        PatientEvent::CareRelationshipAssigned { clinician }
        | PatientEvent::CareRelationshipEnded { clinician } => clinician.as_uuid(),
        PatientEvent::LegalHoldPlaced { hold_id, .. }
        | PatientEvent::LegalHoldReleased { hold_id, .. } => hold_id.as_uuid(),
        PatientEvent::DemographicsCorrected { .. } | PatientEvent::PatientErased { .. } => {
            return None;
        }
    };
    Some(record_id)
}

/// The audit projection's name: its checkpoint key.
pub const AUDIT_PROJECTION_NAME: &str = "audit_trail";
/// Bump when the derivation changes. A rebuild re-inserts idempotently (by `audit_id`) and
/// never removes a row: the trail is append-only and outlives erasures.
pub const AUDIT_PROJECTION_VERSION: u32 = 1;

/// Columns of one `chartlog_audit_trail` row as [`insert_audit_rows`] binds them.
const AUDIT_COLUMNS: usize = 16;
/// `client_address`, which PostgreSQL stores as `inet` and receives as text.
const AUDIT_CLIENT_ADDRESS_COLUMN: usize = 14;
/// The first key of the advisory lock that takes writers to the trail one at a time. Two-key
/// advisory locks are a space of their own, apart from the projection runner's single-key
/// locks; the access crate's classes are `chlp` and `chbg`, this one is `chat`.
const AUDIT_TRAIL_WRITER_LOCK_CLASS: i64 = 0x6368_6174;

/// Inserts [`AuditRow`]s (each with the log position it was folded from, if any) into
/// `chartlog_audit_trail`, many rows per statement, ignoring a row whose `audit_id` is already
/// there (a replay or a rebuild). One statement per row cost the projection runner a round
/// trip per audited event, which on PostgreSQL left it trailing the writers it follows.
///
/// Each row gets the next `trail_position`, the order auditors page the trail in (migration
/// 0014/0013): positions are handed out here, in insertion order, one writer at a time (on
/// PostgreSQL under an advisory lock held to the end of the transaction; readers are not held
/// up), so a row inserted later never sorts before a page already read. A row
/// ignored as already there leaves its position unused: the positions have gaps, never ties.
/// Each row also carries `occurred_at_max_us`, the latest `occurred_at` up to and including
/// it in that order, which a time range's first page starts from.
pub async fn insert_audit_rows<R: Borrow<AuditRow> + Sync>(
    tx: &mut crate::db::ProjectionTx,
    rows: &[(R, Option<u64>)],
) -> Result<(), sqlx::Error> {
    use crate::db::{Backend, SqlArg};
    if rows.is_empty() {
        return Ok(());
    }
    let cast = (tx.backend() == Backend::Postgres).then_some((AUDIT_CLIENT_ADDRESS_COLUMN, "inet"));
    if tx.backend() == Backend::Postgres {
        // An advisory lock, not LOCK TABLE: a table lock strong enough to keep other writers
        // out also waits for (auto)vacuum of the table, which an anti-wraparound vacuum does
        // not give up, and the projection runner would stall behind it.
        tx.execute(
            "SELECT pg_advisory_xact_lock(CAST($1 AS integer), 0)",
            vec![SqlArg::I64(AUDIT_TRAIL_WRITER_LOCK_CLASS)],
        )
        .await?;
    }
    let (mut next_position, mut occurred_at_max) = match tx
        .fetch_optional(
            "SELECT trail_position, occurred_at_max_us FROM chartlog_audit_trail \
             ORDER BY trail_position DESC LIMIT 1",
            vec![],
        )
        .await?
    {
        Some(last) => (last.i64(0)?, last.i64(1)?),
        None => (0, i64::MIN),
    };
    for chunk in rows.chunks(tx.rows_per_statement(AUDIT_COLUMNS)) {
        let values = crate::db::values_placeholders_cast(chunk.len(), AUDIT_COLUMNS, 1, cast);
        let sql = format!(
            "INSERT INTO chartlog_audit_trail (audit_id, source_position, trail_position, \
             occurred_at_max_us, occurred_at_us, user_id, role, purpose_of_use, break_glass, \
             patient_id, entity, record_id, action, outcome, client_address, event_type) \
             VALUES {values} ON CONFLICT (audit_id) DO NOTHING"
        );
        let mut args = Vec::with_capacity(chunk.len() * AUDIT_COLUMNS);
        for (row, source_position) in chunk {
            let row: &AuditRow = row.borrow();
            let position = source_position.map(|p| i64::try_from(p).unwrap_or(i64::MAX));
            next_position += 1;
            // A row skipped as already there still counts: the bound only gets looser.
            occurred_at_max = occurred_at_max.max(row.occurred_at.unix_micros());
            args.extend([
                SqlArg::Uuid(row.audit_id),
                SqlArg::OptI64(position),
                SqlArg::I64(next_position),
                SqlArg::I64(occurred_at_max),
                SqlArg::I64(row.occurred_at.unix_micros()),
                SqlArg::OptUuid(row.actor.map(|a| a.user_id.as_uuid())),
                SqlArg::OptText(row.actor.map(|a| a.role.as_str().to_owned())),
                SqlArg::OptText(row.actor.map(|a| a.purpose_of_use.as_str().to_owned())),
                SqlArg::Bool(row.actor.is_some_and(|a| a.break_glass)),
                SqlArg::OptUuid(row.patient_id.map(|p| p.as_uuid())),
                SqlArg::OptText(row.entity.map(|e| e.as_str().to_owned())),
                SqlArg::OptUuid(row.record_id),
                SqlArg::Text(row.action.as_str().to_owned()),
                SqlArg::Text(row.outcome.as_str().to_owned()),
                SqlArg::OptText(row.client_address.map(|a| a.to_string())),
                SqlArg::OptText(row.event_type.map(str::to_owned)),
            ]);
        }
        tx.execute(sqlx::AssertSqlSafe(sql), args).await?;
    }
    Ok(())
}

/// Appends the HTTP layer's [`AuditRow`]s (reads, searches, logins, denials, exports, ...) in
/// one transaction, and returns once it is committed and durable: on SQLite when `db` is the
/// log's file, which runs with `synchronous=FULL` (the read models' own file does not), and on
/// PostgreSQL the transaction asks for a synchronous commit even where the server's default
/// is off. Call it before a PHI response leaves (HIPAA 164.312(b)).
///
/// The rows carry no log position (`source_position` NULL): no projection reset or rebuild
/// touches them (the audit projection deletes nothing, and the table refuses DELETE). A row
/// whose `audit_id` is already there is left as it was, so a retry after a lost reply does not
/// double it.
pub async fn append_audit_rows(
    db: &crate::db::ProjectionDb,
    rows: &[AuditRow],
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut tx = db.begin().await?;
    if tx.backend() == crate::db::Backend::Postgres {
        tx.execute("SET LOCAL synchronous_commit = on", vec![])
            .await?;
    }
    let rows: Vec<_> = rows.iter().map(|row| (row, None)).collect();
    insert_audit_rows(&mut tx, &rows).await?;
    tx.commit().await
}

/// The `&'static` name of a known patient event type, for reading a stored row back.
pub fn known_event_type(raw: &str) -> Option<&'static str> {
    PATIENT_EVENT_AUDIT
        .iter()
        .find(|(known, _, _)| *known == raw)
        .map(|&(known, _, _)| known)
}

/// The audit trail of changes to charts, folded from the log.
#[derive(Debug, Default)]
pub struct AuditTrailProjection;

#[async_trait::async_trait]
impl crate::runner::Projection for AuditTrailProjection {
    fn name(&self) -> &'static str {
        AUDIT_PROJECTION_NAME
    }

    fn version(&self) -> u32 {
        AUDIT_PROJECTION_VERSION
    }

    async fn apply(
        &self,
        tx: &mut crate::db::ProjectionTx,
        events: &[crate::runner::ProjectedEvent],
    ) -> Result<(), crate::ProjectionError> {
        use crate::runner::EventBody;
        let mut trail: Vec<(Cow<AuditRow>, Option<u64>)> = Vec::new();
        for projected in events {
            let row = match &projected.body {
                // Reads, logins, denials and the rest, as the API recorded them. Several rows
                // share one event, so none claims its position; audit ids keep replays single.
                EventBody::Audit { rows } => {
                    trail.extend(rows.iter().map(|row| (Cow::Borrowed(row), None)));
                    continue;
                }
                // Other streams holding no PHI have no audit meaning yet.
                EventBody::NotPatient => continue,
                EventBody::Patient { .. } | EventBody::Erased { .. } => {
                    match audit_row_for_event(&projected.header) {
                        Ok(row) => row,
                        Err(error) => {
                            // Only an event type newer than this build gets here (the runner
                            // refuses undecodable opened events); skip it visibly.
                            tracing::warn!(position = projected.position, error = %error, "event not audited");
                            continue;
                        }
                    }
                }
            };
            let row = match &projected.body {
                EventBody::Patient { event, .. } => row.with_record_of(event),
                _ => row,
            };
            trail.push((Cow::Owned(row), Some(projected.position)));
        }
        insert_audit_rows(tx, &trail).await?;
        Ok(())
    }

    /// Deletes nothing: the trail is append-only (the tables refuse it) and kept for
    /// retention; a rebuild re-inserts idempotently.
    async fn reset(&self, _tx: &mut crate::db::ProjectionTx) -> Result<(), crate::ProjectionError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use chartlog_crypto::{DataKeyId, EventHash, SignerKeyId};
    use chartlog_domain::{EventId, PurposeOfUse, Role, UserId};

    use super::*;

    fn header(event_type: &str) -> EventHeader {
        EventHeader {
            stream_id: StreamId::patient(PatientId::from_uuid(Uuid::from_u128(1))),
            stream_version: 2,
            event_id: EventId::from_uuid(Uuid::from_u128(2)),
            event_type: event_type.to_owned(),
            schema_version: 1,
            recorded_at: Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap(),
            actor: Actor {
                user_id: UserId::from_uuid(Uuid::from_u128(3)),
                role: Role::Physician,
                purpose_of_use: PurposeOfUse::EmergencyTreatment,
                break_glass: true,
            },
            key_id: DataKeyId::from_uuid(Uuid::from_u128(4)),
            prev_hash: EventHash::from_bytes([5; 32]),
            signer_key_id: SignerKeyId::parse("signer-1").unwrap(),
        }
    }

    #[test]
    fn every_patient_event_type_has_exactly_one_mapping() {
        for event_type in PatientEvent::EVENT_TYPES {
            let lines = PATIENT_EVENT_AUDIT
                .iter()
                .filter(|(known, _, _)| *known == event_type)
                .count();
            assert_eq!(lines, 1, "{event_type}");
        }
        assert_eq!(PATIENT_EVENT_AUDIT.len(), PatientEvent::EVENT_TYPES.len());
    }

    #[test]
    fn maps_each_event_type_to_its_entity_and_action() {
        use AuditAction::{Create, Delete, Update};
        use AuditEntity::*;
        let expected = [
            ("patient_registered", Patient, Create),
            ("demographics_corrected", Patient, Update),
            ("observation_recorded", Observation, Create),
            ("condition_recorded", Condition, Create),
            ("condition_resolved", Condition, Update),
            ("allergy_recorded", Allergy, Create),
            ("allergy_refuted", Allergy, Update),
            ("medication_prescribed", MedicationOrder, Create),
            ("medication_discontinued", MedicationOrder, Update),
            ("note_written", Note, Create),
            ("note_amended", Note, Update),
            ("note_signed", Note, Update),
            ("note_addendum_added", Note, Update),
            ("consent_restriction_granted", Consent, Create),
            ("consent_restriction_revoked", Consent, Update),
            ("care_relationship_assigned", CareRelationship, Create),
            ("care_relationship_ended", CareRelationship, Update),
            ("legal_hold_placed", LegalHold, Create),
            ("legal_hold_released", LegalHold, Update),
            ("patient_erased", Patient, Delete),
        ];
        for (event_type, entity, action) in expected {
            assert_eq!(
                entity_and_action(event_type),
                Some((entity, action)),
                "{event_type}"
            );
            let row = audit_row_for_event(&header(event_type)).unwrap();
            assert_eq!(
                (row.entity, row.action),
                (Some(entity), action),
                "{event_type}"
            );
            assert_eq!(row.event_type, Some(event_type));
        }
        assert_eq!(entity_and_action("note_shredded"), None);
    }

    #[test]
    fn a_row_carries_the_clear_header_and_nothing_else() {
        let header = header("observation_recorded");
        let row = audit_row_for_event(&header).unwrap();
        assert_eq!(row.audit_id, header.event_id.as_uuid());
        assert_eq!(row.occurred_at, header.recorded_at);
        assert_eq!(row.actor, Some(header.actor));
        assert!(row.actor.unwrap().break_glass);
        assert_eq!(row.patient_id, header.stream_id.patient_id());
        assert_eq!(row.outcome, AuditOutcome::Success);
        assert_eq!(row.client_address, None);
        // The observation's own id is sealed: the header gives the event id.
        assert_eq!(row.record_id, Some(header.event_id.as_uuid()));
        let patient_row = audit_row_for_event(&self::header("patient_erased")).unwrap();
        assert_eq!(
            patient_row.record_id,
            Some(Uuid::from_u128(1)),
            "the patient itself"
        );
    }

    #[test]
    fn the_decoded_event_gives_the_record_id() {
        let event = PatientEvent::AllergyRefuted {
            allergy_id: chartlog_domain::AllergyId::from_uuid(Uuid::from_u128(99)),
        };
        let row = audit_row_for_event(&header("allergy_refuted"))
            .unwrap()
            .with_record_of(&event);
        assert_eq!(row.record_id, Some(Uuid::from_u128(99)));
        let erased = PatientEvent::PatientErased {
            reason: chartlog_domain::patient::ErasureReason::PatientRequest,
            erased_at: Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap(),
        };
        let row = audit_row_for_event(&header("patient_erased"))
            .unwrap()
            .with_record_of(&erased);
        assert_eq!(row.record_id, Some(Uuid::from_u128(1)), "still the patient");
    }

    #[test]
    fn refuses_other_streams_and_unknown_types_naming_ids_only() {
        let mut security = header("login_succeeded");
        security.stream_id = StreamId::parse("security-logins").unwrap();
        assert!(matches!(
            audit_row_for_event(&security),
            Err(AuditError::NotAPatientStream { .. })
        ));
        let long = "x".repeat(500);
        let error = audit_row_for_event(&header(&long)).unwrap_err();
        assert!(error.to_string().len() < 200, "the echo is bounded");
    }

    #[test]
    fn codes_are_distinct_snake_case() {
        let codes: Vec<&str> = AuditEntity::ALL
            .iter()
            .map(|e| e.as_str())
            .chain(AuditAction::ALL.iter().map(|a| a.as_str()))
            .chain(AuditOutcome::ALL.iter().map(|o| o.as_str()))
            .collect();
        for code in &codes {
            assert!(
                code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{code}"
            );
        }
        let entities: std::collections::HashSet<_> =
            AuditEntity::ALL.iter().map(|e| e.as_str()).collect();
        assert_eq!(entities.len(), AuditEntity::ALL.len());
        let actions: std::collections::HashSet<_> =
            AuditAction::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(actions.len(), AuditAction::ALL.len());
        assert_eq!(
            AuditEntity::parse("break_glass_review"),
            Some(AuditEntity::BreakGlassReview)
        );
        assert_eq!(AuditAction::parse("search"), Some(AuditAction::Search));
    }

    #[test]
    fn known_event_types_map_back_to_the_table() {
        for (event_type, _, _) in PATIENT_EVENT_AUDIT {
            assert_eq!(known_event_type(event_type), Some(event_type));
        }
        assert_eq!(known_event_type("note_shredded"), None);
    }

    #[test]
    fn vocabularies_round_trip() {
        for entity in AuditEntity::ALL {
            assert_eq!(AuditEntity::parse(entity.as_str()), Some(entity));
        }
        for action in AuditAction::ALL {
            assert_eq!(AuditAction::parse(&action.to_string()), Some(action));
        }
        for outcome in AuditOutcome::ALL {
            assert_eq!(AuditOutcome::parse(outcome.as_str()), Some(outcome));
        }
    }
}
