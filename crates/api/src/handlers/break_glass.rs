//! POST /patients/{patient_id}/break-glass. The grant is opened, audited and announced by
//! [`super::patients::break_glass`], and gives access only once all of that is done; an
//! opening refused because the caller's grant to the patient is still open and in force (409
//! `break_glass_already_open`) is audited here. It is refused, not served, yet it is an
//! attempt at emergency access an auditor should see next to the grant it names, and it
//! counts toward the refusal alerts. A grant whose opening was never audited is not "open"
//! in this sense: the next opening completes it and is answered 201 (see
//! [`super::patients::break_glass`]), so a failed audit write never leads to this 409.

use actix_web::{HttpRequest, HttpResponse, web};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditOutcome};

use super::PatientPath;
use crate::guard::Caller;
use crate::{ApiConfig, ApiError, audit, policy};

pub(crate) async fn open(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<PatientPath>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let patient_id = path.patient_id;
    let actor = caller.actor(Some(policy::RecordAccess::BreakGlass));
    let client_address = caller.client_address;
    let answer = super::patients::break_glass(config.clone(), caller, path, request, body).await;
    if let Err(ApiError::BreakGlassAlreadyOpen { grant_id, .. }) = &answer {
        let mut row = audit::access_row(
            actor,
            client_address,
            Some(patient_id),
            AuditEntity::Patient,
            AuditAction::BreakGlass,
        );
        row.outcome = AuditOutcome::Denied;
        row.record_id = Some(*grant_id);
        audit::record(&config, vec![row]).await?;
    }
    answer
}
