//! Request handlers, one module per area, and what they share: the object-level check on a
//! patient's record, body parsing that never echoes PHI, and idempotent replays.

pub(crate) mod access;
pub(crate) mod commands;
pub(crate) mod meta;
pub(crate) mod oversight;
pub(crate) mod patients;

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::http::header::HeaderMap;
use actix_web::{HttpResponse, web};
use chartlog_access::{IdempotencyClaim, IdempotencyError, StoredResponse};
use chartlog_domain::{Actor, PatientId};
use chartlog_projections::audit::{AuditAction, AuditOutcome, AuditRow};
use chartlog_store::{LedgerError, LoadedPatient};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::guard::Caller;
use crate::policy::{self, Entity, RecordDenial, Requester};
use crate::records::load_for_policy;
use crate::{ApiConfig, ApiError, audit};

/// The `{patient_id}` path segment.
#[derive(serde::Deserialize)]
pub(crate) struct PatientPath {
    pub(crate) patient_id: PatientId,
}

/// A caller cleared to touch one patient's record, with the record as loaded for the check.
pub(crate) struct Reach {
    pub(crate) patient: PatientId,
    pub(crate) loaded: Option<LoadedPatient>,
    pub(crate) actor: Actor,
}

impl Reach {
    /// The stream version the caller's check saw (0: no record).
    pub(crate) fn version(&self) -> u64 {
        self.loaded
            .as_ref()
            .and_then(|loaded| loaded.head)
            .map_or(0, |head| head.version)
    }
}

/// The object-level check: may `caller` touch `patient`'s record as `entity`? A refusal is
/// audited and answered with 403, whether or not the record exists, so the answer reveals
/// nothing about who is a patient here.
pub(crate) async fn reach(
    config: &ApiConfig,
    caller: &Caller,
    patient: PatientId,
    entity: Entity,
    action: AuditAction,
) -> Result<Reach, ApiError> {
    let loaded = match load_for_policy(config.records.as_ref(), patient).await {
        Ok(loaded) => loaded,
        // An erased record has no state to check against; the roles that may still ask
        // about it (the patient, administrators, auditors) are decided without it.
        Err(LedgerError::Erased { .. }) => None,
        Err(error) => return Err(ledger_error(error)),
    };
    match check_reach(config, caller, patient, entity, loaded).await? {
        Ok(reach) => Ok(reach),
        Err(denial) => {
            audit_denial(config, caller, caller.actor(None), patient, entity, action).await?;
            Err(ApiError::NoAccessToRecord {
                hint: match denial {
                    RecordDenial::NoCareRelationship | RecordDenial::BlockedByConsent => {
                        "; in an emergency, request access with POST /patients/{patient_id}/break-glass"
                    }
                    RecordDenial::NotOwnRecord | RecordDenial::NoPathToRecord => "",
                },
            })
        }
    }
}

/// Audits a refusal to touch `patient`'s record, before the refusal is answered.
pub(crate) async fn audit_denial(
    config: &ApiConfig,
    caller: &Caller,
    actor: Actor,
    patient: PatientId,
    entity: Entity,
    action: AuditAction,
) -> Result<(), ApiError> {
    let row = AuditRow {
        audit_id: uuid::Uuid::now_v7(),
        occurred_at: crate::now(),
        actor: Some(actor),
        patient_id: Some(patient),
        entity: Some(audit::audit_entity(entity)),
        record_id: None,
        action,
        outcome: AuditOutcome::Denied,
        client_address: caller.client_address,
        event_type: None,
    };
    audit::record(config, vec![row]).await
}

/// The object-level check against the record as this server last left it, without reading
/// the store: `Some` only when the check passes on that record. A command may be decided on
/// it because the append it leads to names that record's version ([`Reach::version`]) and
/// is refused if the stream has moved on; the command is then checked and decided again on
/// the fresh record ([`reach`]). `None` (nothing cached, or refused on the cached record)
/// sends the caller to [`reach`], which also audits a refusal.
pub(crate) async fn reach_on_last_known_record(
    config: &ApiConfig,
    caller: &Caller,
    patient: PatientId,
    entity: Entity,
) -> Result<Option<Reach>, ApiError> {
    let Some(last_known) = config.records.last_known(patient) else {
        return Ok(None);
    };
    Ok(
        check_reach(config, caller, patient, entity, Some(last_known))
            .await?
            .ok(),
    )
}

/// The access policy on `loaded` (`None`: no record, or an erased one).
async fn check_reach(
    config: &ApiConfig,
    caller: &Caller,
    patient: PatientId,
    entity: Entity,
    loaded: Option<LoadedPatient>,
) -> Result<Result<Reach, RecordDenial>, ApiError> {
    let role = caller.session.role;
    let in_care = loaded
        .as_ref()
        .is_some_and(|loaded| loaded.patient.has_care_relationship(caller.session.user_id));
    // Only a clinician the relationship (or a consent block) keeps out needs the lookup.
    let blocked = loaded
        .as_ref()
        .is_some_and(|loaded| policy::blocks_user(&loaded.patient, caller.session.user_id));
    let break_glass_open = if policy::is_clinician(role) && (!in_care || blocked) {
        config
            .accounts
            .active_break_glass(caller.session.user_id, patient, crate::now())
            .await
            .map_err(internal("break-glass lookup"))?
            .is_some()
    } else {
        false
    };
    let requester = Requester {
        user_id: caller.session.user_id,
        role,
        own_patient: caller.session.patient_id,
        break_glass_open,
    };
    Ok(policy::reach_record(
        &requester,
        patient,
        loaded.as_ref().map(|loaded| &loaded.patient),
        entity,
    )
    .map(|access| Reach {
        patient,
        loaded,
        actor: caller.actor(Some(access)),
    }))
}

/// Parses a JSON body without ever echoing it (see [`ApiError::from_serde_error`]).
pub(crate) fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|error| ApiError::from_serde_error(&error))
}

/// Requires `Content-Type: application/json` on a body-carrying request.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let is_json = headers
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            value
                .split(';')
                .next()
                .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
        });
    if is_json {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType)
    }
}

/// Longest accepted `Idempotency-Key`.
const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 128;

/// The `Idempotency-Key` header, when present and well formed.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|key| {
            !key.is_empty()
                && key.len() <= IDEMPOTENCY_KEY_LENGTH_MAX
                && key.chars().all(|c| c.is_ascii_graphic())
        })
        .ok_or(ApiError::InvalidHeader {
            message: "Idempotency-Key must be 1 to 128 visible ASCII characters",
        })?;
    Ok(Some(key.to_owned()))
}

/// How long a request waits for another request with its key and body to answer, before it
/// is told to retry: long enough for a command on a busy server, well inside a client's
/// own timeout.
const IDEMPOTENCY_WAIT: Duration = Duration::from_secs(5);
/// The first pause between looks at a key in progress; it doubles up to the longest.
const IDEMPOTENCY_POLL_FIRST: Duration = Duration::from_millis(10);
const IDEMPOTENCY_POLL_LONGEST: Duration = Duration::from_millis(200);

/// Runs `work` at most once per (user, Idempotency-Key): a retry with the same key and the
/// same request gets the stored response; the same key on another request is refused.
/// Without the header, `work` simply runs.
///
/// The key is claimed before `work` runs, so of simultaneous requests with one key only one
/// acts; the others wait for its answer and replay it, or, if it takes longer than
/// [`IDEMPOTENCY_WAIT`], are answered 409 `idempotency_key_in_progress`. A failure (any
/// error `work` returns) is not kept: the claim is given up and a retry runs again.
pub(crate) async fn idempotent<F>(
    config: &ApiConfig,
    caller: &Caller,
    headers: &HeaderMap,
    request_identity: &[&[u8]],
    work: F,
) -> Result<HttpResponse, ApiError>
where
    F: std::future::Future<Output = Result<(StatusCode, serde_json::Value), ApiError>>,
{
    let Some(key) = idempotency_key(headers)? else {
        let (status, body) = work.await?;
        return Ok(HttpResponse::build(status).json(body));
    };
    let mut hasher = Sha256::new();
    for part in request_identity {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    let fingerprint: [u8; 32] = hasher.finalize().into();
    let user = caller.session.user_id;
    let deadline = tokio::time::Instant::now() + IDEMPOTENCY_WAIT;
    let mut pause = IDEMPOTENCY_POLL_FIRST;
    let reservation = loop {
        match config
            .accounts
            .reserve_idempotency_key(user, &key, fingerprint, crate::now())
            .await
        {
            Ok(IdempotencyClaim::Reserved(reservation)) => break reservation,
            Ok(IdempotencyClaim::Replay(stored)) => {
                let status = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
                return Ok(HttpResponse::build(status)
                    .insert_header(("Idempotent-Replayed", "true"))
                    .content_type("application/json")
                    .body(stored.body));
            }
            Ok(IdempotencyClaim::InProgress) => {
                if tokio::time::Instant::now() + pause > deadline {
                    return Err(ApiError::IdempotencyKeyInProgress);
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(IDEMPOTENCY_POLL_LONGEST);
            }
            Err(IdempotencyError::KeyReusedForDifferentRequest) => {
                return Err(ApiError::Conflict {
                    code: "idempotency_key_reused",
                    message: "this Idempotency-Key was used for a different request".to_owned(),
                });
            }
            Err(other) => {
                tracing::error!(error = %other, "idempotency lookup failed");
                return Err(ApiError::Internal);
            }
        }
    };
    // If this future is dropped while `work` runs (the client went away), the claim is
    // neither completed nor released: whether the command committed is unknown, so the key
    // stays locked until the claim expires rather than risk acting twice.
    let (status, body) = match work.await {
        Ok(answer) => answer,
        Err(error) => {
            if let Err(release_error) = config.accounts.release_idempotency_key(reservation).await {
                // The claim expires on its own; until then a retry is told to wait.
                tracing::error!(error = %release_error, "idempotency claim not released");
            }
            return Err(error);
        }
    };
    let bytes = serde_json::to_vec(&body).map_err(internal("response encoding"))?;
    let stored = StoredResponse {
        status: status.as_u16(),
        body: bytes.clone(),
    };
    // The command is committed: failing to remember the answer must not turn it into an
    // error the client would retry without the key's protection. Log and answer.
    match config
        .accounts
        .complete_idempotency_key(reservation, &stored, crate::now())
        .await
    {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            "idempotent response not stored: the claim on its key expired and was taken over"
        ),
        Err(error) => tracing::error!(error = %error, "idempotent response not stored"),
    }
    Ok(HttpResponse::build(status)
        .content_type("application/json")
        .body(bytes))
}

/// Maps a ledger failure onto the API's answers; details go to the log, ids only.
pub(crate) fn ledger_error(error: LedgerError) -> ApiError {
    match error {
        LedgerError::Rejected(rejection) => ApiError::Unprocessable {
            code: rejection.code(),
            message: rejection.to_string(),
        },
        LedgerError::Erased { .. } => ApiError::Erased,
        LedgerError::NotFound { .. } => ApiError::NotFound,
        LedgerError::VersionMismatch {
            expected, current, ..
        } => ApiError::PreconditionFailed { expected, current },
        LedgerError::Contended { .. } => ApiError::Conflict {
            code: "contended",
            message: "the record changed under concurrent writers; send the command again"
                .to_owned(),
        },
        other => {
            tracing::error!(error = %other, "ledger failure");
            ApiError::Internal
        }
    }
}

/// Logs an unexpected failure (its Display carries ids, never PHI) and answers 500.
pub(crate) fn internal<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> ApiError {
    move |error| {
        tracing::error!(error = %error, what, "unexpected failure");
        ApiError::Internal
    }
}

/// A query string parsed into `T`, with our error shape.
pub(crate) type Query<T> = web::Query<T>;
