//! A patient's record: registration, lookup, the chart, its history, the accounting of
//! disclosures, consent restrictions, and break-glass.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use chartlog_domain::patient::{
    AllergyCriticality, AllergyReaction, ConsentRestrictionKind, Demographics,
    DiscontinuationReason, DosingFrequency, MedicationRoute, ObservationValue,
};
use chartlog_domain::phi::{BirthDate, FamilyName, Mrn};
use chartlog_domain::{
    AllergyId, ConditionId, ConsentRestrictionId, MedicationOrderId, NoteId, ObservationId,
    PatientCommand, PatientId, Role, UserId,
};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};
use chartlog_projections::chart::{Chart, ChartAnswer};
use chartlog_projections::history::HistoryAnswer;
use chartlog_store::ExecuteOptions;
use serde::{Deserialize, Serialize};

use super::{PatientPath, idempotent, internal, ledger_error, parse_body, reach, require_json};
use crate::guard::Caller;
use crate::notify::BreakGlassNotice;
use crate::policy::{self, Action, Entity, Grant};
use crate::{ApiConfig, ApiError, audit};

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CommandAnswer {
    pub(crate) patient_id: PatientId,
    /// The record's version after the command: send it as `If-Match` with the next one.
    pub(crate) stream_version: u64,
    /// The command's last event in the global log.
    pub(crate) position: u64,
    /// The id of the record the command created or touched, where it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) record_id: Option<uuid::Uuid>,
}

pub(crate) async fn register(
    config: web::Data<ApiConfig>,
    caller: Caller,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let demographics: Demographics = parse_body(&body)?;
    let route = crate::routes::REGISTER_PATIENT.path.as_bytes();
    idempotent(
        &config,
        &caller,
        request.headers(),
        &[route, &body],
        async {
            let patient = PatientId::from_uuid(uuid::Uuid::new_v4());
            let actor = caller.actor(None);
            let now = crate::now();
            let mut outcome = config
                .records
                .execute(
                    patient,
                    PatientCommand::RegisterPatient {
                        patient_id: patient,
                        demographics,
                    },
                    actor,
                    now,
                    ExecuteOptions {
                        expected_version: Some(0),
                        loaded: None,
                    },
                )
                .await
                .map_err(ledger_error)?;
            // The registering clinician starts the care relationship: without it they could not
            // read back the chart they just created.
            if policy::is_clinician(caller.session.role) {
                outcome = config
                    .records
                    .execute(
                        patient,
                        PatientCommand::AssignCareRelationship {
                            clinician: caller.session.user_id,
                        },
                        actor,
                        now,
                        ExecuteOptions::default(),
                    )
                    .await
                    .map_err(ledger_error)?;
            }
            let answer = CommandAnswer {
                patient_id: patient,
                stream_version: outcome.stream_version,
                position: outcome.position,
                record_id: Some(patient.as_uuid()),
            };
            Ok((
                StatusCode::CREATED,
                serde_json::to_value(answer).map_err(internal("answer encoding"))?,
            ))
        },
    )
    .await
}

/// The patients a search found: ids only, never who they are.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct PatientIds {
    patient_ids: Vec<PatientId>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SearchBody {
    #[serde(default)]
    mrn: Option<Mrn>,
    #[serde(default)]
    family_name: Option<FamilyName>,
    #[serde(default)]
    birth_date: Option<BirthDate>,
}

pub(crate) async fn search(
    config: web::Data<ApiConfig>,
    caller: Caller,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: SearchBody = parse_body(&body)?;
    let found = match (body.mrn, body.family_name, body.birth_date) {
        (Some(mrn), None, None) => config.records.find_by_mrn(&mrn).await,
        (None, Some(family), Some(birth_date)) => {
            config
                .records
                .find_by_family_name_and_birth_date(&family, &birth_date)
                .await
        }
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_search",
                "search by mrn alone, or by family_name and birth_date together",
            ));
        }
    }
    .map_err(internal("patient search"))?;
    let actor = caller.actor(None);
    let mut rows: Vec<_> = found
        .iter()
        .map(|patient| {
            audit::access_row(
                actor,
                caller.client_address,
                Some(*patient),
                AuditEntity::Patient,
                AuditAction::Search,
            )
        })
        .collect();
    if rows.is_empty() {
        rows.push(audit::access_row(
            actor,
            caller.client_address,
            None,
            AuditEntity::Patient,
            AuditAction::Search,
        ));
    }
    audit::record(&config, rows).await?;
    // Ids only: the caller opens a chart through its own access check.
    Ok(HttpResponse::Ok().json(PatientIds { patient_ids: found }))
}

/// `?min_position=N`: answer only once the read model has applied the log up to position N
/// (a command's answer carries its position), waiting at most [`MIN_POSITION_WAIT_MS_MAX`].
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ChartQuery {
    min_position: Option<u64>,
}

/// How long a query with `min_position` waits for the read model before answering 503.
pub(crate) const MIN_POSITION_WAIT_MS_MAX: u64 = 5_000;

/// Waits until `projection` has applied the log up to `min_position`, if one was asked for.
async fn wait_for(
    config: &ApiConfig,
    projection: &str,
    min_position: Option<u64>,
) -> Result<(), ApiError> {
    let Some(position) = min_position else {
        return Ok(());
    };
    // Only an acknowledged command's position can be waited for, and the log holds every
    // one: a position past its end could only time out.
    let head = config
        .records
        .log_head_position()
        .await
        .map_err(internal("log head read"))?;
    if position > head {
        return Err(ApiError::Unprocessable {
            code: "position_beyond_log",
            message: format!(
                "min_position {position} is past the end of the log; pass the position a \
                 command returned"
            ),
        });
    }
    chartlog_projections::wait_for_position(
        &config.read_models,
        projection,
        position,
        std::time::Duration::from_millis(MIN_POSITION_WAIT_MS_MAX),
    )
    .await
    .map(drop)
    .map_err(|error| match error {
        chartlog_projections::ProjectionError::WaitTimedOut { .. } => ApiError::NotReady {
            reason: format!(
                "the read model did not reach position {position} within \
                 {MIN_POSITION_WAIT_MS_MAX} ms; retry"
            ),
        },
        other => internal("read-your-writes wait")(other),
    })
}

pub(crate) async fn chart(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
    query: super::Query<ChartQuery>,
) -> Result<HttpResponse, ApiError> {
    let reach = reach(
        &config,
        &caller,
        path.patient_id,
        Entity::Demographics,
        AuditAction::Read,
    )
    .await?;
    wait_for(
        &config,
        chartlog_projections::chart::CHART_PROJECTION,
        query.min_position,
    )
    .await?;
    let answer = config
        .records
        .chart(
            reach.patient,
            reach.loaded.as_ref().and_then(|loaded| loaded.head),
        )
        .await
        .map_err(internal("chart read"))?;
    let refusal = match answer {
        ChartAnswer::Found(chart) => Ok(chart),
        ChartAnswer::Erased { .. } => Err(ApiError::Erased),
        ChartAnswer::NotFound => Err(ApiError::NotFound),
    };
    let chart = match refusal {
        Ok(chart) => chart,
        Err(refusal) => {
            return Err(audit_unanswered_read(
                &config,
                &caller,
                &reach,
                AuditEntity::Patient,
                refusal,
            )
            .await);
        }
    };
    let hide_notes = reach
        .loaded
        .as_ref()
        .is_some_and(|loaded| policy::notes_hidden_from(&loaded.patient, caller.session.role));
    let view = ChartView::of(&chart, caller.session.role, hide_notes);
    audit_read(&config, &caller, &reach, AuditEntity::Patient).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("ETag", format!("\"{}\"", chart.stream_version)))
        .json(view))
}

/// The chart as one role may see it: sections the role may not read are left out.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ChartView {
    patient_id: PatientId,
    stream_version: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    demographics: Option<Demographics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conditions: Option<Vec<ConditionView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allergies: Option<Vec<AllergyView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    medication_orders: Option<Vec<MedicationOrderView>>,
    /// The latest observation of each code; the record history holds every one.
    #[serde(skip_serializing_if = "Option::is_none")]
    observations: Option<Vec<ObservationView>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notes: Option<Vec<NoteView>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ConditionView {
    condition_id: ConditionId,
    code: chartlog_domain::codes::Code,
    onset_at: Option<String>,
    resolved_at: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AllergyView {
    allergy_id: AllergyId,
    substance: chartlog_domain::codes::Code,
    criticality: AllergyCriticality,
    reaction: Option<AllergyReaction>,
    refuted: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct MedicationOrderView {
    medication_order_id: MedicationOrderId,
    medication: chartlog_domain::codes::Code,
    dose: chartlog_domain::quantity::Quantity,
    route: MedicationRoute,
    frequency: DosingFrequency,
    prescribed_at: String,
    discontinuation_reason: Option<DiscontinuationReason>,
    discontinued_at: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ObservationView {
    observation_id: ObservationId,
    code: chartlog_domain::codes::Code,
    value: ObservationValue,
    effective_at: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct NoteView {
    note_id: NoteId,
    text: chartlog_domain::phi::NoteText,
    written_at: String,
    amended_at: Option<String>,
    signed_by: Option<UserId>,
    signed_at: Option<String>,
    addenda: Vec<AddendumView>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AddendumView {
    text: chartlog_domain::phi::NoteText,
    added_at: String,
}

fn rfc3339(at: chartlog_domain::Timestamp) -> String {
    at.to_string()
}

impl ChartView {
    fn of(chart: &Chart, role: Role, hide_notes: bool) -> Self {
        let may_read = |entity| policy::allows(role, Grant(entity, Action::Read));
        Self {
            patient_id: chart.patient_id,
            stream_version: chart.stream_version,
            demographics: chart
                .demographics
                .clone()
                .filter(|_| may_read(Entity::Demographics)),
            conditions: may_read(Entity::Condition).then(|| {
                chart
                    .conditions
                    .iter()
                    .map(|c| ConditionView {
                        condition_id: c.condition_id,
                        code: c.code.clone(),
                        onset_at: c.onset_at.map(rfc3339),
                        resolved_at: c.resolved_at.map(rfc3339),
                    })
                    .collect()
            }),
            allergies: may_read(Entity::Allergy).then(|| {
                chart
                    .allergies
                    .iter()
                    .map(|a| AllergyView {
                        allergy_id: a.allergy_id,
                        substance: a.substance.clone(),
                        criticality: a.criticality,
                        reaction: a.reaction,
                        refuted: a.refuted,
                    })
                    .collect()
            }),
            medication_orders: may_read(Entity::Medication).then(|| {
                chart
                    .medication_orders
                    .iter()
                    .map(|m| MedicationOrderView {
                        medication_order_id: m.medication_order_id,
                        medication: m.medication.clone(),
                        dose: m.dose.clone(),
                        route: m.route,
                        frequency: m.frequency,
                        prescribed_at: rfc3339(m.prescribed_at),
                        discontinuation_reason: m.discontinuation_reason,
                        discontinued_at: m.discontinued_at.map(rfc3339),
                    })
                    .collect()
            }),
            observations: may_read(Entity::Observation).then(|| {
                chart
                    .observations
                    .iter()
                    .map(|o| ObservationView {
                        observation_id: o.observation_id,
                        code: o.code.clone(),
                        value: o.value.clone(),
                        effective_at: rfc3339(o.effective_at),
                    })
                    .collect()
            }),
            notes: (may_read(Entity::Note) && !hide_notes).then(|| {
                chart
                    .notes
                    .iter()
                    .map(|n| NoteView {
                        note_id: n.note_id,
                        text: n.text.clone(),
                        written_at: rfc3339(n.written_at),
                        amended_at: n.amended_at.map(rfc3339),
                        signed_by: n.signed_by,
                        signed_at: n.signed_at.map(rfc3339),
                        addenda: n
                            .addenda
                            .iter()
                            .map(|a| AddendumView {
                                text: a.text.clone(),
                                added_at: rfc3339(a.added_at),
                            })
                            .collect(),
                    })
                    .collect()
            }),
        }
    }
}

/// Most history entries one page returns.
const HISTORY_PAGE_LIMIT_MAX: u32 = 200;
const HISTORY_PAGE_LIMIT_DEFAULT: u32 = 50;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    before_version: Option<u64>,
    limit: Option<u32>,
    /// As for the chart: wait until the history has applied the log up to here.
    min_position: Option<u64>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct HistoryEntryView {
    stream_version: u64,
    recorded_at: String,
    user_id: UserId,
    role: Role,
    break_glass: bool,
    event_type: String,
    /// The part of the chart the entry is: `demographics`, `observation`, `condition`, ...
    #[schema(value_type = String)]
    entry_kind: chartlog_projections::EntryKind,
    entry_id: uuid::Uuid,
    changes: Vec<FieldChangeView>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct FieldChangeView {
    field: String,
    /// The field's value before the change (any JSON value), absent for a new field.
    before: Option<serde_json::Value>,
    /// The field's value after the change (any JSON value), absent for a removed field.
    after: Option<serde_json::Value>,
}

/// Writes the times in a history value as the rest of the API does, RFC 3339, where the
/// read model keeps the domain's microseconds since the epoch. Every time in the domain's
/// records, and nothing else, is a field named `*_at` (`written_at`, an addendum's
/// `added_at`, ...).
fn times_as_rfc3339(field: &str, value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Number(number) if field.ends_with("_at") => {
            if let Some(at) = number
                .as_i64()
                .and_then(|micros| chartlog_domain::Timestamp::from_unix_micros(micros).ok())
            {
                *value = serde_json::Value::String(rfc3339(at));
            }
        }
        serde_json::Value::Array(items) => {
            for item in items {
                times_as_rfc3339(field, item);
            }
        }
        serde_json::Value::Object(fields) => {
            for (name, inner) in fields.iter_mut() {
                times_as_rfc3339(name, inner);
            }
        }
        _ => {}
    }
}

/// A page of the record history, newest first.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct HistoryPage {
    patient_id: PatientId,
    entries: Vec<HistoryEntryView>,
    /// Pass as `before_version` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_before_version: Option<u64>,
}

pub(crate) async fn history(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
    query: super::Query<HistoryQuery>,
) -> Result<HttpResponse, ApiError> {
    let limit = query
        .limit
        .unwrap_or(HISTORY_PAGE_LIMIT_DEFAULT)
        .clamp(1, HISTORY_PAGE_LIMIT_MAX);
    let reach = reach(
        &config,
        &caller,
        path.patient_id,
        Entity::History,
        AuditAction::Read,
    )
    .await?;
    wait_for(
        &config,
        chartlog_projections::history::HISTORY_PROJECTION,
        query.min_position,
    )
    .await?;
    let answer = config
        .records
        .history(reach.patient, query.before_version, limit, reach.version())
        .await
        .map_err(internal("history read"))?;
    let refusal = match answer {
        HistoryAnswer::Found(page) => Ok(page),
        HistoryAnswer::Erased { .. } => Err(ApiError::Erased),
        HistoryAnswer::NotFound => Err(ApiError::NotFound),
    };
    let page = match refusal {
        Ok(page) => page,
        Err(refusal) => {
            return Err(audit_unanswered_read(
                &config,
                &caller,
                &reach,
                AuditEntity::History,
                refusal,
            )
            .await);
        }
    };
    let hide_notes = reach
        .loaded
        .as_ref()
        .is_some_and(|loaded| policy::notes_hidden_from(&loaded.patient, caller.session.role));
    // The history shows what the chart would: each entry only to a role that may read its
    // part of the record (a legal hold to nobody who reads history), notes not to a role the
    // patient hid them from.
    let role = caller.session.role;
    let entries: Vec<HistoryEntryView> = page
        .entries
        .iter()
        .filter(|entry| {
            let entity = history_entity(entry.entry_kind);
            policy::allows(role, Grant(entity, Action::Read))
                && !(hide_notes && entity == Entity::Note)
        })
        .map(|entry| HistoryEntryView {
            stream_version: entry.stream_version,
            recorded_at: rfc3339(entry.recorded_at),
            user_id: entry.actor.user_id,
            role: entry.actor.role,
            break_glass: entry.actor.break_glass,
            event_type: entry.event_type.clone(),
            entry_kind: entry.entry_kind,
            entry_id: entry.entry_id,
            changes: entry
                .changes
                .iter()
                .map(|change| {
                    let shown = |value: &chartlog_projections::history::PhiValue| {
                        let mut value = value.expose_phi().clone();
                        times_as_rfc3339(&change.field, &mut value);
                        value
                    };
                    FieldChangeView {
                        field: change.field.clone(),
                        before: change.before.as_ref().map(shown),
                        after: change.after.as_ref().map(shown),
                    }
                })
                .collect(),
        })
        .collect();
    audit_read(&config, &caller, &reach, AuditEntity::History).await?;
    Ok(HttpResponse::Ok().json(HistoryPage {
        patient_id: reach.patient,
        entries,
        next_before_version: page.next_before_version,
    }))
}

/// The part of the record a history entry is about, for the role's read grant.
const fn history_entity(kind: chartlog_projections::EntryKind) -> Entity {
    use chartlog_projections::EntryKind;
    match kind {
        EntryKind::Demographics => Entity::Demographics,
        EntryKind::Observation => Entity::Observation,
        EntryKind::Condition => Entity::Condition,
        EntryKind::Allergy => Entity::Allergy,
        EntryKind::MedicationOrder => Entity::Medication,
        EntryKind::Note => Entity::Note,
        EntryKind::ConsentRestriction => Entity::Consent,
        EntryKind::CareRelationship => Entity::CareRelationship,
        EntryKind::LegalHold => Entity::LegalHold,
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PageQuery {
    after: Option<String>,
    limit: Option<u32>,
}

pub(crate) async fn disclosures(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
    query: super::Query<PageQuery>,
) -> Result<HttpResponse, ApiError> {
    let after = super::oversight::cursor(query.after.as_deref())?;
    let reach = reach(
        &config,
        &caller,
        path.patient_id,
        Entity::Disclosures,
        AuditAction::Read,
    )
    .await?;
    let page = chartlog_projections::audit_queries::accounting_of_disclosures(
        &config.read_models,
        reach.patient,
        after.as_ref(),
        query
            .limit
            .unwrap_or(super::oversight::AUDIT_PAGE_LIMIT_DEFAULT),
    )
    .await
    .map_err(internal("disclosures read"))?;
    audit_read(&config, &caller, &reach, AuditEntity::Disclosures).await?;
    let view = if caller.session.role == Role::Patient {
        super::oversight::AuditPageView::for_patient(&page)
    } else {
        super::oversight::AuditPageView::of(&page)
    };
    Ok(HttpResponse::Ok().json(view))
}

/// One consent restriction, as the patient and their care team see it.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ConsentRestrictionView {
    /// What `revoke-consent-restriction` takes.
    restriction_id: ConsentRestrictionId,
    kind: ConsentRestrictionKind,
    revoked: bool,
}

/// Records the caller's read of `entity` on `reach`'s record, before the answer leaves.
async fn audit_read(
    config: &ApiConfig,
    caller: &Caller,
    reach: &super::Reach,
    entity: AuditEntity,
) -> Result<(), ApiError> {
    audit::record(
        config,
        vec![audit::access_row(
            reach.actor,
            caller.client_address,
            Some(reach.patient),
            entity,
            AuditAction::Read,
        )],
    )
    .await
}

/// Audits a read the caller was cleared for that found no record to show (never registered,
/// erased, or unreadable), and gives back `refusal` to answer with; the audit trail's own
/// failure wins (503), as for every PHI read.
async fn audit_unanswered_read(
    config: &ApiConfig,
    caller: &Caller,
    reach: &super::Reach,
    entity: AuditEntity,
    refusal: ApiError,
) -> ApiError {
    let mut row = audit::access_row(
        reach.actor,
        caller.client_address,
        Some(reach.patient),
        entity,
        AuditAction::Read,
    );
    row.outcome = AuditOutcome::Failure;
    match audit::record(config, vec![row]).await {
        Ok(()) => refusal,
        Err(unavailable) => unavailable,
    }
}

/// The patient's consent restrictions, revoked ones included.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ConsentRestrictions {
    patient_id: PatientId,
    /// The record's version: send it as `If-Match` to revoke on exactly what was seen.
    stream_version: u64,
    restrictions: Vec<ConsentRestrictionView>,
}

/// The clinicians in a care relationship with the patient.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct CareTeam {
    patient_id: PatientId,
    /// The record's version: send it as `If-Match` with a change to the team.
    stream_version: u64,
    clinicians: Vec<UserId>,
}

pub(crate) async fn consent_restrictions(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
) -> Result<HttpResponse, ApiError> {
    decision_state_read(
        &config,
        &caller,
        path.patient_id,
        Entity::Consent,
        |patient_id, stream_version, record| ConsentRestrictions {
            patient_id,
            stream_version,
            restrictions: record
                .consent_restrictions()
                .iter()
                .map(|(restriction_id, restriction)| ConsentRestrictionView {
                    restriction_id: *restriction_id,
                    kind: restriction.kind(),
                    revoked: restriction.is_revoked(),
                })
                .collect(),
        },
    )
    .await
}

/// Whom `end-care-relationship` takes, and whom a patient may want to know about.
pub(crate) async fn care_team(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
) -> Result<HttpResponse, ApiError> {
    decision_state_read(
        &config,
        &caller,
        path.patient_id,
        Entity::CareRelationship,
        |patient_id, stream_version, record| CareTeam {
            patient_id,
            stream_version,
            clinicians: record.care_team().iter().copied().collect(),
        },
    )
    .await
}

/// A read of the part of the record access is decided on (`view` renders it), from the state
/// the access check loaded, not from a read model that may trail it. The answer carries the
/// record's stream version, also as the ETag, so a change can be sent with `If-Match` on
/// exactly what was seen; audited as a read of `entity`.
async fn decision_state_read<T: Serialize>(
    config: &ApiConfig,
    caller: &Caller,
    patient: PatientId,
    entity: Entity,
    view: impl FnOnce(PatientId, u64, &chartlog_domain::patient::Patient) -> T,
) -> Result<HttpResponse, ApiError> {
    let reach = reach(config, caller, patient, entity, AuditAction::Read).await?;
    let loaded_now;
    let loaded = match &reach.loaded {
        Some(loaded) => loaded,
        // The check does not tell a record never registered from an erased one; the load
        // names which (404 or 410).
        None => {
            loaded_now = match config.records.load(reach.patient).await {
                Ok(loaded) => loaded,
                Err(error) => {
                    let refusal = ledger_error(error);
                    let entity = audit::audit_entity(entity);
                    return Err(
                        audit_unanswered_read(config, caller, &reach, entity, refusal).await,
                    );
                }
            };
            &loaded_now
        }
    };
    let stream_version = loaded.head.map_or(0, |head| head.version);
    let answer = view(reach.patient, stream_version, &loaded.patient);
    audit_read(config, caller, &reach, audit::audit_entity(entity)).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("ETag", format!("\"{stream_version}\"")))
        .json(answer))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BreakGlassBody {
    /// Why the emergency needs this record; shown to the reviewing auditor.
    reason: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct BreakGlassAnswer {
    grant_id: uuid::Uuid,
    patient_id: PatientId,
    expires_at: String,
}

/// Opens break-glass in three steps, each durable before the next, so that a grant gives
/// access only once its opening is a success row on the audit trail and has been announced:
///
/// 1. the grant is committed *pending* (no access);
/// 2. its success row is written to the audit trail, then its notice sent;
/// 3. it is marked audited, which puts it in force.
///
/// The grant and its audit row live in different stores (the access tables and the signed
/// audit log) and cannot share a transaction, so one of them has to come first. Writing the
/// audit row first would record a success for a grant that may never be committed (and, for
/// an opening refused as overlapping, for one that never existed). Ending the grant when the
/// audit write fails needs a second write that fails with the first when the database is the
/// trouble, leaving the grant usable unaudited. A pending grant fails safe at every step: if
/// the audit write, the notice or the mark does not happen, the grant gives no access, and
/// the next opening by the same clinician for the same patient resumes it (the accounts
/// service hands it back instead of refusing it as already open), audits it, announces it
/// and marks it, and is answered as a fresh opening. The retry never meets 409 for a grant
/// it could not use. At worst an opening is audited and announced twice (a mark that failed
/// after both, or two simultaneous completions), never not at all. The notice is sent
/// before the mark, so a grant in force has always had its notice sent.
pub(crate) async fn break_glass(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: BreakGlassBody = parse_body(&body)?;
    let reason = chartlog_access::BreakGlassReason::parse(&body.reason)
        .map_err(|error| ApiError::unprocessable("invalid_reason", error.to_string()))?;
    let actor = caller.actor(Some(policy::RecordAccess::BreakGlass));
    let opened = config
        .accounts
        .open_break_glass(
            caller.session.user_id,
            caller.session.role,
            path.patient_id,
            &reason,
            crate::now(),
        )
        .await
        .map_err(super::access::access_error);
    let grant = match opened {
        Ok(grant) => grant,
        // Refused, not served, yet an attempt at emergency access that an auditor should see
        // next to the grant it names, and one that counts toward the refusal alerts. A grant
        // whose opening was never audited is not open in this sense: the accounts service
        // hands it back above, so a failed audit write never leads here.
        Err(refusal @ ApiError::BreakGlassAlreadyOpen { grant_id, .. }) => {
            let mut row = audit::access_row(
                actor,
                caller.client_address,
                Some(path.patient_id),
                AuditEntity::Patient,
                AuditAction::BreakGlass,
            );
            row.outcome = AuditOutcome::Denied;
            row.record_id = Some(grant_id);
            audit::record(&config, vec![row]).await?;
            return Err(refusal);
        }
        Err(refusal) => return Err(refusal),
    };
    let mut row = audit::access_row(
        actor,
        caller.client_address,
        Some(path.patient_id),
        AuditEntity::Patient,
        AuditAction::BreakGlass,
    );
    row.record_id = Some(grant.grant_id);
    if let Err(error) = audit::record(&config, vec![row]).await {
        tracing::error!(
            grant_id = %grant.grant_id,
            "break-glass grant left pending: its opening was not audited"
        );
        return Err(error);
    }

    let notice = BreakGlassNotice::new(
        grant.grant_id,
        grant.user_id,
        grant.role,
        grant.patient_id,
        grant.opened_at,
        grant.expires_at,
        format!("{}/break-glass/reviews", config.public_base_url),
    );
    // Delivery never holds up the clinician: the grant is already in the review queue and
    // the audit trail, which are the record.
    let notifier = config.notifier.clone();
    actix_web::rt::spawn(async move { notifier.break_glass_opened(&notice).await });

    config
        .accounts
        .mark_break_glass_opening_audited(grant.grant_id, crate::now())
        .await
        .map_err(internal("break-glass grant not put in force"))?;
    Ok(HttpResponse::Created().json(BreakGlassAnswer {
        grant_id: grant.grant_id,
        patient_id: path.patient_id,
        expires_at: grant.expires_at.to_string(),
    }))
}
