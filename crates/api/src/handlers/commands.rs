//! One endpoint per clinical command: `POST /patients/{patient_id}/<command>`.
//!
//! Bodies are the command's fields (unknown fields refused, times in RFC 3339); the server
//! mints the ids of new records and returns them. `If-Match: "<version>"` makes the command
//! conditional (412 when the record moved on); `Idempotency-Key` makes a retry safe.

use actix_web::http::StatusCode;
use actix_web::http::header::{HeaderMap, IF_MATCH};
use actix_web::{HttpRequest, HttpResponse, web};
use chartlog_domain::codes::Code;
use chartlog_domain::patient::{
    AllergyCriticality, AllergyReaction, ConsentRestrictionKind, DemographicsCorrection,
    DiscontinuationReason, DosingFrequency, ErasureReason, LegalHoldReason, MedicationRoute,
    ObservationValue,
};
use chartlog_domain::phi::NoteText;
use chartlog_domain::quantity::Quantity;
use chartlog_domain::{
    AllergyId, ConditionId, ConsentRestrictionId, LegalHoldId, MedicationOrderId, NoteId,
    ObservationId, PatientCommand, PatientId, StreamId, Timestamp, UserId,
};
use chartlog_projections::audit::AuditAction;
use chartlog_store::ledger::CONFLICT_RETRIES_MAX;
use chartlog_store::{CommandOutcome, ExecuteOptions, LedgerError};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::patients::CommandAnswer;
use super::{
    PatientPath, audit_denial, idempotent, internal, ledger_error, parse_body, reach,
    reach_on_last_known_record, require_json,
};
use crate::guard::Caller;
use crate::policy::{self, Entity};
use crate::routes::Route;
use crate::{ApiConfig, ApiError};

/// What the handler needs from a command's body.
pub(crate) trait CommandBody: DeserializeOwned + 'static {
    /// The route the body is sent to.
    const ROUTE: &'static Route;
    /// The part of the chart the command touches, for the object-level check.
    const ENTITY: Entity;
    /// `Create` or `Update`, for a refusal's audit row.
    const ACTION: AuditAction;

    /// The domain command, and the id of the record it creates or touches.
    fn into_command(self, caller: &Caller) -> (PatientCommand, Option<uuid::Uuid>);

    /// How the command must be confirmed, if it must (signing a note).
    fn reauthentication(&self) -> Option<Reauthentication<'_>> {
        None
    }

    /// The user account the command names, if any, and what that account must be.
    fn named_account(&self) -> Option<(UserId, NamedAccount)> {
        None
    }
}

/// The proof, sent with a command that needs one, that the signed-in user is at the keyboard.
pub(crate) enum Reauthentication<'a> {
    /// The account's password.
    Password(&'a str),
    /// A fresh ID token from the identity provider, for an account linked to it.
    IdentityProvider(&'a str),
}

/// Checks a [`Reauthentication`] for the caller's account.
async fn reauthenticate(
    config: &ApiConfig,
    caller: &Caller,
    proof: Reauthentication<'_>,
) -> Result<(), ApiError> {
    let client_address = crate::guard::failure_address(caller.client_address);
    match proof {
        Reauthentication::Password(password) => config
            .accounts
            .reauthenticate(
                caller.session.user_id,
                &chartlog_access::Password::new(password.to_owned()),
                client_address,
                crate::now(),
            )
            .await
            .map_err(super::access::login_refusal),
        Reauthentication::IdentityProvider(token) => {
            let Some(provider) = &config.identity_provider else {
                return Err(ApiError::InvalidCredentials);
            };
            let identity = provider
                .verify(token, crate::now(), crate::sso::TokenUse::Reauthentication)
                .inspect_err(|refusal| {
                    tracing::warn!(%refusal, "re-authentication token refused");
                })
                .ok();
            config
                .accounts
                .sso_reauthenticate(
                    caller.session.user_id,
                    identity.as_ref(),
                    client_address,
                    crate::now(),
                )
                .await
                .map_err(super::access::login_refusal)
        }
    }
}

/// What a user id in a command's body must name. The domain cannot tell (accounts live
/// apart from the log), so the handler asks before the command runs: a care relationship
/// with, or a consent block on, an account that does not exist would be stored and do nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NamedAccount {
    /// A clinician's account: care relationships.
    Clinician,
    /// Any account: a consent block may name anyone who could ever reach the record.
    AnyRole,
}

/// 422 unless `user` is an account of the kind `must_be`. Disabled accounts pass: a patient
/// may block, and a team keep, someone whose account is disabled for now.
async fn check_named_account(
    config: &ApiConfig,
    user: UserId,
    must_be: NamedAccount,
) -> Result<(), ApiError> {
    let account = config
        .accounts
        .user(user)
        .await
        .map_err(internal("named account lookup"))?;
    match account {
        None => Err(ApiError::Unprocessable {
            code: "unknown_user",
            message: format!("no user account has the id {user}"),
        }),
        Some(account)
            if must_be == NamedAccount::Clinician && !crate::policy::is_clinician(account.role) =>
        {
            Err(ApiError::Unprocessable {
                code: "not_a_clinician",
                message: format!(
                    "user {user} is a {}; a care relationship names a physician, nurse, \
                     radiologist or lab technician",
                    account.role.as_str()
                ),
            })
        }
        Some(_) => Ok(()),
    }
}

/// Executes any [`CommandBody`] on the patient of the path.
///
/// Every attempt's append names the stream version its access check and decision saw, so a
/// command is stored only on the state it was checked against. Without `If-Match`, the first
/// attempt is checked and decided on the record as this server last left it, without reading
/// the stream; if the stream has moved on since (another request, another server), the store
/// refuses the append and the command is checked and decided again on the fresh record, up to
/// the ledger's [`CONFLICT_RETRIES_MAX`] attempts before 409 `contended`. The common case
/// costs no read of the stream (on PostgreSQL about a third more commands per second;
/// docs/PERFORMANCE.md, "HTTP load").
pub(crate) async fn execute<B: CommandBody>(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let patient = path.patient_id;
    // The object-level check comes first: a caller who may not touch this record learns
    // nothing about what a valid body would be, and the refusal is audited.
    let last_known = if request.headers().contains_key(IF_MATCH) {
        None
    } else {
        reach_on_last_known_record(&config, &caller, patient, B::ENTITY).await?
    };
    // `on_last_known`: the check and decision ran on the record as last known, so a refusal
    // may not be final.
    let (mut checked, mut on_last_known) = match last_known {
        Some(reach) => (reach, true),
        None => (
            reach(&config, &caller, patient, B::ENTITY, B::ACTION).await?,
            false,
        ),
    };
    require_json(request.headers())?;
    let expected_version = if_match(request.headers())?;
    let command: B = parse_body(&body)?;
    if let Some((user, must_be)) = command.named_account() {
        check_named_account(&config, user, must_be).await?;
    }
    let patient_bytes = patient.as_uuid();
    let identity: [&[u8]; 3] = [B::ROUTE.path.as_bytes(), patient_bytes.as_bytes(), &body];
    idempotent(&config, &caller, request.headers(), &identity, async {
        if let Some(proof) = command.reauthentication() {
            reauthenticate(&config, &caller, proof).await?;
        }
        let (domain_command, record_id) = command.into_command(&caller);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let record = checked.loaded.as_ref().map(|loaded| &loaded.patient);
            if let Err(denial) = policy::may_change_access(&checked.actor, record, &domain_command)
            {
                // A last-known record may be behind the stream (a grant since expired, a
                // restriction since revoked): only the fresh record's answer is final.
                if on_last_known {
                    checked = reach(&config, &caller, patient, B::ENTITY, B::ACTION).await?;
                    on_last_known = false;
                    continue;
                }
                audit_denial(
                    &config,
                    &caller,
                    checked.actor,
                    patient,
                    B::ENTITY,
                    B::ACTION,
                )
                .await?;
                return Err(ApiError::AccessChangeRefused {
                    message: denial.message(),
                });
            }
            let outcome = config
                .records
                .execute(
                    patient,
                    domain_command.clone(),
                    checked.actor,
                    crate::now(),
                    ExecuteOptions {
                        expected_version: Some(expected_version.unwrap_or(checked.version())),
                        loaded: checked.loaded,
                    },
                )
                .await;
            // Neither stored anything: the record moved on after the check (a client's own
            // If-Match is answered, not retried), or a last-known record that may be behind
            // the stream refused the command.
            let check_again = match &outcome {
                Err(LedgerError::VersionMismatch { .. }) => expected_version.is_none(),
                Err(LedgerError::Rejected(_)) => on_last_known,
                _ => false,
            };
            if !check_again {
                return command_answer(outcome, patient, record_id);
            }
            if attempt >= CONFLICT_RETRIES_MAX {
                return command_answer(
                    Err(LedgerError::Contended {
                        stream: StreamId::patient(patient),
                        retries: attempt,
                    }),
                    patient,
                    record_id,
                );
            }
            checked = reach(&config, &caller, patient, B::ENTITY, B::ACTION).await?;
            on_last_known = false;
        }
    })
    .await
}

fn command_answer(
    outcome: Result<CommandOutcome, LedgerError>,
    patient: PatientId,
    record_id: Option<uuid::Uuid>,
) -> Result<(StatusCode, serde_json::Value), ApiError> {
    let outcome = outcome.map_err(ledger_error)?;
    let answer = CommandAnswer {
        patient_id: patient,
        stream_version: outcome.stream_version,
        position: outcome.position,
        record_id,
    };
    Ok((
        StatusCode::OK,
        serde_json::to_value(answer).map_err(internal("answer encoding"))?,
    ))
}

/// `If-Match: "7"` (or `7`, or `W/"7"`) names the stream version the client decided on.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    const MALFORMED: ApiError = ApiError::InvalidHeader {
        message: "If-Match must be the record's stream version, e.g. \"7\"",
    };
    let raw = value.to_str().map_err(|_| MALFORMED)?.trim();
    let raw = raw.strip_prefix("W/").unwrap_or(raw);
    let raw = raw.trim_matches('"');
    raw.parse::<u64>().map(Some).map_err(|_| MALFORMED)
}

/// An RFC 3339 time, e.g. `2026-11-27T09:30:00Z`.
fn rfc3339<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Timestamp, D::Error> {
    let raw = String::deserialize(deserializer)?;
    parse_rfc3339(&raw).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 time"))
}

fn rfc3339_optional<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Timestamp>, D::Error> {
    let raw = Option::<String>::deserialize(deserializer)?;
    raw.map(|raw| {
        parse_rfc3339(&raw).ok_or_else(|| serde::de::Error::custom("not an RFC 3339 time"))
    })
    .transpose()
}

pub(crate) fn parse_rfc3339(raw: &str) -> Option<Timestamp> {
    let at =
        time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339).ok()?;
    let micros = i64::try_from(at.unix_timestamp_nanos() / 1_000).ok()?;
    Timestamp::from_unix_micros(micros).ok()
}

fn new_id() -> uuid::Uuid {
    uuid::Uuid::now_v7()
}

macro_rules! command_body {
    ($name:ident, $route:ident, $entity:ident, $action:ident, { $($field:tt)* }, |$this:ident, $caller:ident| $build:expr $(, names |$named:ident| $account:expr)?) => {
        #[derive(Deserialize, utoipa::ToSchema)]
        #[serde(deny_unknown_fields)]
        pub(crate) struct $name { $($field)* }

        impl CommandBody for $name {
            const ROUTE: &'static Route = &crate::routes::$route;
            const ENTITY: Entity = Entity::$entity;
            const ACTION: AuditAction = AuditAction::$action;

            #[allow(unused_variables)]
            fn into_command(self, $caller: &Caller) -> (PatientCommand, Option<uuid::Uuid>) {
                let $this = self;
                $build
            }

            $(
                fn named_account(&self) -> Option<(UserId, NamedAccount)> {
                    let $named = self;
                    $account
                }
            )?
        }
    };
}

/// The correction is the body itself: the fields to change.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
pub(crate) struct CorrectDemographics(DemographicsCorrection);

impl CommandBody for CorrectDemographics {
    const ROUTE: &'static Route = &crate::routes::CORRECT_DEMOGRAPHICS;
    const ENTITY: Entity = Entity::Demographics;
    const ACTION: AuditAction = AuditAction::Update;

    fn into_command(self, _caller: &Caller) -> (PatientCommand, Option<uuid::Uuid>) {
        (
            PatientCommand::CorrectDemographics { correction: self.0 },
            None,
        )
    }
}

command_body!(RecordObservation, RECORD_OBSERVATION, Observation, Create, {
    code: Code,
    value: ObservationValue,
    #[serde(deserialize_with = "rfc3339")]
    effective_at: Timestamp,
}, |body, caller| {
    let id = new_id();
    (PatientCommand::RecordObservation {
        observation_id: ObservationId::from_uuid(id),
        code: body.code,
        value: body.value,
        effective_at: body.effective_at,
    }, Some(id))
});

command_body!(RecordCondition, RECORD_CONDITION, Condition, Create, {
    code: Code,
    #[serde(default, deserialize_with = "rfc3339_optional")]
    onset_at: Option<Timestamp>,
}, |body, caller| {
    let id = new_id();
    (PatientCommand::RecordCondition {
        condition_id: ConditionId::from_uuid(id),
        code: body.code,
        onset_at: body.onset_at,
    }, Some(id))
});

command_body!(ResolveCondition, RESOLVE_CONDITION, Condition, Update, {
    condition_id: ConditionId,
    #[serde(deserialize_with = "rfc3339")]
    resolved_at: Timestamp,
}, |body, caller| {
    (PatientCommand::ResolveCondition {
        condition_id: body.condition_id,
        resolved_at: body.resolved_at,
    }, Some(body.condition_id.as_uuid()))
});

command_body!(RecordAllergy, RECORD_ALLERGY, Allergy, Create, {
    substance: Code,
    criticality: AllergyCriticality,
    #[serde(default)]
    reaction: Option<AllergyReaction>,
}, |body, caller| {
    let id = new_id();
    (PatientCommand::RecordAllergy {
        allergy_id: AllergyId::from_uuid(id),
        substance: body.substance,
        criticality: body.criticality,
        reaction: body.reaction,
    }, Some(id))
});

command_body!(RefuteAllergy, REFUTE_ALLERGY, Allergy, Update, {
    allergy_id: AllergyId,
}, |body, caller| {
    (PatientCommand::RefuteAllergy { allergy_id: body.allergy_id }, Some(body.allergy_id.as_uuid()))
});

command_body!(PrescribeMedication, PRESCRIBE_MEDICATION, Medication, Create, {
    medication: Code,
    dose: Quantity,
    route: MedicationRoute,
    frequency: DosingFrequency,
}, |body, caller| {
    let id = new_id();
    (PatientCommand::PrescribeMedication {
        medication_order_id: MedicationOrderId::from_uuid(id),
        medication: body.medication,
        dose: body.dose,
        route: body.route,
        frequency: body.frequency,
    }, Some(id))
});

command_body!(DiscontinueMedication, DISCONTINUE_MEDICATION, Medication, Update, {
    medication_order_id: MedicationOrderId,
    reason: DiscontinuationReason,
}, |body, caller| {
    (PatientCommand::DiscontinueMedication {
        medication_order_id: body.medication_order_id,
        reason: body.reason,
    }, Some(body.medication_order_id.as_uuid()))
});

command_body!(WriteNote, WRITE_NOTE, Note, Create, {
    text: NoteText,
}, |body, caller| {
    let id = new_id();
    (PatientCommand::WriteNote { note_id: NoteId::from_uuid(id), text: body.text }, Some(id))
});

command_body!(AmendNote, AMEND_NOTE, Note, Update, {
    note_id: NoteId,
    text: NoteText,
}, |body, caller| {
    (PatientCommand::AmendNote { note_id: body.note_id, text: body.text }, Some(body.note_id.as_uuid()))
});

/// Signing needs the signer's password again (re-authentication at the moment of signing).
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct SignNote {
    note_id: NoteId,
    /// The signer's password again: signing re-authenticates. Accounts that sign in through
    /// the identity provider send `id_token` instead.
    #[serde(default)]
    #[schema(format = Password)]
    password: Option<String>,
    /// A fresh ID token (issued within 5 minutes) from the identity provider, for an account
    /// linked to it.
    #[serde(default)]
    id_token: Option<String>,
}

impl CommandBody for SignNote {
    const ROUTE: &'static Route = &crate::routes::SIGN_NOTE;
    const ENTITY: Entity = Entity::Note;
    const ACTION: AuditAction = AuditAction::Update;

    fn into_command(self, caller: &Caller) -> (PatientCommand, Option<uuid::Uuid>) {
        (
            PatientCommand::SignNote {
                note_id: self.note_id,
                signer: caller.session.user_id,
            },
            Some(self.note_id.as_uuid()),
        )
    }

    fn reauthentication(&self) -> Option<Reauthentication<'_>> {
        // Neither (or both) is a wrong proof, not a missing field: it fails like a wrong
        // password, after the same checks.
        Some(match (&self.password, &self.id_token) {
            (None, Some(token)) => Reauthentication::IdentityProvider(token),
            (Some(password), _) => Reauthentication::Password(password),
            (None, None) => Reauthentication::Password(""),
        })
    }
}

command_body!(AddNoteAddendum, ADD_NOTE_ADDENDUM, Note, Update, {
    note_id: NoteId,
    text: NoteText,
}, |body, caller| {
    (PatientCommand::AddNoteAddendum { note_id: body.note_id, text: body.text }, Some(body.note_id.as_uuid()))
});

command_body!(GrantConsentRestriction, GRANT_CONSENT_RESTRICTION, Consent, Create, {
    kind: ConsentRestrictionKind,
}, |body, caller| {
    let id = new_id();
    (PatientCommand::GrantConsentRestriction {
        restriction_id: ConsentRestrictionId::from_uuid(id),
        kind: body.kind,
    }, Some(id))
}, names |body| match body.kind {
    ConsentRestrictionKind::BlockUser(user) => Some((user, NamedAccount::AnyRole)),
    ConsentRestrictionKind::HideNotesFromRole(_) => None,
});

command_body!(RevokeConsentRestriction, REVOKE_CONSENT_RESTRICTION, Consent, Update, {
    restriction_id: ConsentRestrictionId,
}, |body, caller| {
    (PatientCommand::RevokeConsentRestriction { restriction_id: body.restriction_id }, Some(body.restriction_id.as_uuid()))
});

command_body!(AssignCareRelationship, ASSIGN_CARE_RELATIONSHIP, CareRelationship, Create, {
    clinician: UserId,
}, |body, caller| {
    (PatientCommand::AssignCareRelationship { clinician: body.clinician }, Some(body.clinician.as_uuid()))
}, names |body| Some((body.clinician, NamedAccount::Clinician)));

command_body!(EndCareRelationship, END_CARE_RELATIONSHIP, CareRelationship, Update, {
    clinician: UserId,
}, |body, caller| {
    (PatientCommand::EndCareRelationship { clinician: body.clinician }, Some(body.clinician.as_uuid()))
});

command_body!(PlaceLegalHold, PLACE_LEGAL_HOLD, LegalHold, Create, {
    reason: LegalHoldReason,
}, |body, caller| {
    let id = new_id();
    (PatientCommand::PlaceLegalHold { hold_id: LegalHoldId::from_uuid(id), reason: body.reason }, Some(id))
});

command_body!(ReleaseLegalHold, RELEASE_LEGAL_HOLD, LegalHold, Update, {
    hold_id: LegalHoldId,
}, |body, caller| {
    (PatientCommand::ReleaseLegalHold { hold_id: body.hold_id }, Some(body.hold_id.as_uuid()))
});

command_body!(ErasePatient, ERASE_PATIENT, Erasure, Create, {
    reason: ErasureReason,
}, |body, caller| {
    (PatientCommand::ErasePatient { reason: body.reason }, None)
});
