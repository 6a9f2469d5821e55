//! What auditors and analysts read: the audit trail, the break-glass review queue, and the
//! de-identified export.

use actix_web::{HttpRequest, HttpResponse, web};
use chartlog_access::{ReviewCursor, ReviewVerdict};
use chartlog_domain::{PatientId, Role, UserId};
use chartlog_projections::audit::{AuditAction, AuditEntity, AuditRow};
use chartlog_projections::audit_queries::{AuditCursor, AuditFilter, AuditPage};
use chartlog_projections::deid::export::{DeidTable, ExportFormat};
use serde::{Deserialize, Serialize};

use super::{internal, parse_body, require_json};
use crate::guard::Caller;
use crate::{ApiConfig, ApiError, audit};

pub(crate) const AUDIT_PAGE_LIMIT_DEFAULT: u32 = 100;

/// Rows of the de-identified export read per database query (and sent per chunk).
const EXPORT_CHUNK_ROWS: u32 = 1_000;

pub(crate) fn cursor(raw: Option<&str>) -> Result<Option<AuditCursor>, ApiError> {
    raw.map(|raw| {
        AuditCursor::decode(raw).ok_or(ApiError::InvalidHeader {
            message: "the after cursor is malformed; pass back the next value of a page",
        })
    })
    .transpose()
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AuditRowView {
    audit_id: uuid::Uuid,
    occurred_at: String,
    user_id: Option<UserId>,
    role: Option<Role>,
    /// Why the record was touched: the purpose an accounting of disclosures states
    /// (45 CFR 164.528(b)(2)(iv)).
    purpose_of_use: Option<chartlog_domain::PurposeOfUse>,
    break_glass: bool,
    patient_id: Option<PatientId>,
    #[schema(value_type = Option<String>)]
    entity: Option<&'static str>,
    record_id: Option<uuid::Uuid>,
    #[schema(value_type = String)]
    action: &'static str,
    #[schema(value_type = String)]
    outcome: &'static str,
    client_address: Option<String>,
    event_type: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct AuditPageView {
    rows: Vec<AuditRowView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

impl AuditPageView {
    pub(crate) fn of(page: &AuditPage) -> Self {
        Self {
            rows: page.rows.iter().map(row_view).collect(),
            next: page.next.as_ref().map(AuditCursor::encode),
        }
    }

    /// The accounting of disclosures as the patient reads it: who, when, what and why (45
    /// CFR 164.528(b)(2)), without the address of the workstation each came from, which is
    /// the staff's and stays with the auditors.
    pub(crate) fn for_patient(page: &AuditPage) -> Self {
        let mut view = Self::of(page);
        for row in &mut view.rows {
            row.client_address = None;
        }
        view
    }
}

fn row_view(row: &AuditRow) -> AuditRowView {
    AuditRowView {
        audit_id: row.audit_id,
        occurred_at: row.occurred_at.to_string(),
        user_id: row.actor.map(|actor| actor.user_id),
        role: row.actor.map(|actor| actor.role),
        purpose_of_use: row.actor.map(|actor| actor.purpose_of_use),
        break_glass: row.actor.is_some_and(|actor| actor.break_glass),
        patient_id: row.patient_id,
        entity: row.entity.map(AuditEntity::as_str),
        record_id: row.record_id,
        action: row.action.as_str(),
        outcome: row.outcome.as_str(),
        client_address: row.client_address.map(|address| address.to_string()),
        event_type: row.event_type.as_ref().map(|t| t.to_string()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditTrailQuery {
    user_id: Option<UserId>,
    patient_id: Option<PatientId>,
    action: Option<String>,
    /// RFC 3339, inclusive.
    from: Option<String>,
    /// RFC 3339, exclusive.
    to: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
}

fn time_parameter(raw: Option<&str>) -> Result<Option<chartlog_domain::Timestamp>, ApiError> {
    raw.map(|raw| {
        super::commands::parse_rfc3339(raw).ok_or(ApiError::InvalidHeader {
            message: "from and to must be RFC 3339 times, e.g. 2026-11-27T00:00:00Z",
        })
    })
    .transpose()
}

pub(crate) async fn audit_trail(
    config: web::Data<ApiConfig>,
    caller: Caller,
    query: super::Query<AuditTrailQuery>,
) -> Result<HttpResponse, ApiError> {
    let action = query
        .action
        .as_deref()
        .map(|raw| {
            AuditAction::parse(raw).ok_or(ApiError::InvalidHeader {
                message: "action must be one of create, read, update, delete, login, logout, \
                          session_expiry, break_glass, export, search",
            })
        })
        .transpose()?;
    let filter = AuditFilter {
        user_id: query.user_id,
        patient_id: query.patient_id,
        action,
        from: time_parameter(query.from.as_deref())?,
        to: time_parameter(query.to.as_deref())?,
    };
    let after = cursor(query.after.as_deref())?;
    let page = chartlog_projections::audit_queries::read_audit_trail(
        &config.read_models,
        &filter,
        after.as_ref(),
        query.limit.unwrap_or(AUDIT_PAGE_LIMIT_DEFAULT),
    )
    .await
    .map_err(internal("audit trail read"))?;
    audit::record(
        &config,
        vec![audit::access_row(
            caller.actor(None),
            caller.client_address,
            query.patient_id,
            AuditEntity::AuditTrail,
            AuditAction::Read,
        )],
    )
    .await?;
    Ok(HttpResponse::Ok().json(AuditPageView::of(&page)))
}

pub(crate) const REVIEWS_PAGE_LIMIT_DEFAULT: u32 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReviewsQuery {
    /// Only the reviews still open (default true).
    pending: Option<bool>,
    after: Option<String>,
    limit: Option<u32>,
}

/// Break-glass openings, pending review first, then newest first, one page of them.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReviewList {
    reviews: Vec<ReviewView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ReviewView {
    grant_id: uuid::Uuid,
    user_id: UserId,
    role: Role,
    patient_id: PatientId,
    opened_at: String,
    expires_at: String,
    reason: String,
    /// `justified` or `unjustified`; absent while the review is open.
    #[schema(value_type = Option<String>)]
    verdict: Option<&'static str>,
    reviewed_by: Option<UserId>,
    reviewed_at: Option<String>,
}

pub(crate) async fn break_glass_reviews(
    config: web::Data<ApiConfig>,
    caller: Caller,
    query: super::Query<ReviewsQuery>,
) -> Result<HttpResponse, ApiError> {
    let after = query
        .after
        .as_deref()
        .map(|raw| {
            ReviewCursor::decode(raw).ok_or(ApiError::InvalidHeader {
                message: "the after cursor is malformed; pass back the next value of a page",
            })
        })
        .transpose()?;
    let page = config
        .accounts
        .break_glass_reviews(
            query.pending.unwrap_or(true),
            after.as_ref(),
            query.limit.unwrap_or(REVIEWS_PAGE_LIMIT_DEFAULT),
        )
        .await
        .map_err(internal("break-glass reviews"))?;
    audit::record(
        &config,
        vec![audit::access_row(
            caller.actor(None),
            caller.client_address,
            None,
            AuditEntity::BreakGlassReview,
            AuditAction::Read,
        )],
    )
    .await?;
    let reviews: Vec<ReviewView> = page
        .reviews
        .iter()
        .map(|review| ReviewView {
            grant_id: review.grant.grant_id,
            user_id: review.grant.user_id,
            role: review.grant.role,
            patient_id: review.grant.patient_id,
            opened_at: review.grant.opened_at.to_string(),
            expires_at: review.grant.expires_at.to_string(),
            reason: review.reason.expose().to_owned(),
            verdict: review.verdict.map(|verdict| match verdict {
                ReviewVerdict::Justified => "justified",
                ReviewVerdict::Unjustified => "unjustified",
            }),
            reviewed_by: review.reviewed_by,
            reviewed_at: review.reviewed_at.map(|at| at.to_string()),
        })
        .collect();
    Ok(HttpResponse::Ok().json(ReviewList {
        reviews,
        next: page.next.as_ref().map(ReviewCursor::encode),
    }))
}

#[derive(Deserialize)]
pub(crate) struct GrantPath {
    grant_id: uuid::Uuid,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct VerdictBody {
    /// `justified` or `unjustified`.
    verdict: String,
}

pub(crate) async fn review_break_glass(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<GrantPath>,
    request: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_json(request.headers())?;
    let body: VerdictBody = parse_body(&body)?;
    let verdict = match body.verdict.as_str() {
        "justified" => ReviewVerdict::Justified,
        "unjustified" => ReviewVerdict::Unjustified,
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_verdict",
                "verdict must be justified or unjustified",
            ));
        }
    };
    config
        .accounts
        .review_break_glass(path.grant_id, caller.session.user_id, verdict, crate::now())
        .await
        .map_err(super::access::access_error)?;
    let mut row = audit::access_row(
        caller.actor(None),
        caller.client_address,
        None,
        AuditEntity::BreakGlassReview,
        AuditAction::Update,
    );
    row.record_id = Some(path.grant_id);
    audit::record(&config, vec![row]).await?;
    Ok(HttpResponse::NoContent().finish())
}

#[derive(Deserialize)]
pub(crate) struct TablePath {
    table: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExportQuery {
    /// `ndjson` (default) or `csv`.
    format: Option<String>,
}

pub(crate) async fn deidentified_export(
    config: web::Data<ApiConfig>,
    caller: Caller,
    path: web::Path<TablePath>,
    query: super::Query<ExportQuery>,
) -> Result<HttpResponse, ApiError> {
    let table = DeidTable::ALL
        .into_iter()
        .find(|table| table.as_str() == path.table)
        .ok_or(ApiError::NotFound)?;
    let (format, content_type) = match query.format.as_deref().unwrap_or("ndjson") {
        "ndjson" => (ExportFormat::Ndjson, "application/x-ndjson"),
        "csv" => (ExportFormat::Csv, "text/csv; charset=utf-8"),
        _ => {
            return Err(ApiError::unprocessable(
                "invalid_format",
                "format must be ndjson or csv",
            ));
        }
    };
    audit::record(
        &config,
        vec![audit::access_row(
            caller.actor(None),
            caller.client_address,
            None,
            AuditEntity::DeidentifiedData,
            AuditAction::Export,
        )],
    )
    .await?;
    let db = config.read_models.clone();
    // Ages are released as of this year: someone who turned 90 since their last event
    // leaves as "90+".
    let release_year = crate::now().to_datetime().year();
    // One page per chunk, read only when the client takes the previous one: constant memory
    // whatever the table's size.
    let chunks = futures::stream::unfold(Some(None::<String>), move |after| {
        let db = db.clone();
        async move {
            let after = after?;
            match chartlog_projections::deid::reader::export_page(
                &db,
                table,
                format,
                release_year,
                after.as_deref(),
                EXPORT_CHUNK_ROWS,
            )
            .await
            {
                Ok(chunk) => {
                    let next = chunk.next_key.map(Some);
                    Some((
                        Ok::<_, actix_web::Error>(web::Bytes::from(chunk.bytes)),
                        next,
                    ))
                }
                Err(error) => {
                    // The status line is gone; ending the stream early is all that is left,
                    // and the client sees a truncated body.
                    tracing::error!(error = %error, "de-identified export failed mid-stream");
                    Some((
                        Err(actix_web::error::ErrorInternalServerError("export failed")),
                        None,
                    ))
                }
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type(content_type)
        .streaming(chunks))
}
