//! Reading the audit trail back: the auditor's filtered trail and a patient's accounting of
//! disclosures (HIPAA 164.528), both in the order the trail recorded them and paged by keyset.
//!
//! Pages are ordered by `trail_position`, which [`insert_audit_rows`] hands out as rows are
//! inserted, so a page boundary never skips or repeats a row, including a row inserted after
//! the page before it was read: rows reach the table a little out of time order (each waits
//! for its process's audit writer and for the projection runner), and paging by time would
//! pass over one stamped earlier than a page already read. The recorded order is the time
//! order but for those stragglers. The position between pages is an [`AuditCursor`]: the last
//! row's trail position, encoded for a URL. It holds nothing a URL must not carry.
//!
//! [`insert_audit_rows`]: crate::audit::insert_audit_rows
//!
//! The SQL is written once for both backends; every filter value is bound, and the WHERE
//! clause is assembled from fixed fragments and placeholders only.

use std::net::IpAddr;

use chartlog_domain::{Actor, PatientId, PurposeOfUse, Role, Timestamp, UserId};
use uuid::Uuid;

use crate::ProjectionError;
use crate::audit::{AuditAction, AuditEntity, AuditOutcome, AuditRow, known_event_type};
use crate::db::{Backend, DbRow, ProjectionDb, SqlArg};

/// The most rows one page returns; a larger limit is clamped to it.
pub const AUDIT_PAGE_ROWS_MAX: u32 = 500;

/// The table, as named in errors.
const AUDIT_TABLE: &str = "chartlog_audit_trail";

/// The actions that are an access to a patient's record, for the accounting of disclosures:
/// reading, exporting, a break-glass opening, a search that found the chart, and writing to it.
pub const DISCLOSURE_ACTIONS: [AuditAction; 6] = [
    AuditAction::Read,
    AuditAction::Export,
    AuditAction::BreakGlass,
    AuditAction::Search,
    AuditAction::Create,
    AuditAction::Update,
];

/// Which rows of the trail to read. Every field narrows; the default reads everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Rows of this acting user.
    pub user_id: Option<UserId>,
    /// Rows about this patient.
    pub patient_id: Option<PatientId>,
    pub action: Option<AuditAction>,
    /// Rows at or after this time (inclusive).
    pub from: Option<Timestamp>,
    /// Rows before this time (exclusive): `from..to` is half-open, so consecutive ranges
    /// neither overlap nor leave a gap.
    pub to: Option<Timestamp>,
}

/// Where the next page starts: just after the row at this trail position. Opaque to callers;
/// [`AuditCursor::encode`] gives URL-safe text (base64url, no padding) and
/// [`AuditCursor::decode`] reads it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuditCursor {
    trail_position: i64,
}

/// Bytes of an encoded cursor: the trail position, 8 bytes big-endian.
const CURSOR_BYTES: usize = 8;

impl AuditCursor {
    /// URL-safe text (base64url without padding, 11 characters).
    pub fn encode(&self) -> String {
        base64url_encode(&self.trail_position.to_be_bytes())
    }

    /// `None` for anything [`AuditCursor::encode`] did not produce.
    pub fn decode(raw: &str) -> Option<Self> {
        let bytes = base64url_decode(raw)?;
        let bytes: [u8; CURSOR_BYTES] = bytes.try_into().ok()?;
        let trail_position = i64::from_be_bytes(bytes);
        // Positions start at 1: a cursor names a row that was read.
        (trail_position > 0).then_some(Self { trail_position })
    }
}

/// One page of the trail, in the order it was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    pub rows: Vec<AuditRow>,
    /// Where the next page starts; `None` when this page reached the end.
    pub next: Option<AuditCursor>,
}

/// Reads the rows that match `filter`, in the order the trail recorded them, after
/// `after` (from the start when `None`), at most `limit` of them (clamped to
/// `1..=`[`AUDIT_PAGE_ROWS_MAX`]).
pub async fn read_audit_trail(
    db: &ProjectionDb,
    filter: &AuditFilter,
    after: Option<&AuditCursor>,
    limit: u32,
) -> Result<AuditPage, ProjectionError> {
    let mut query = Query::default();
    if let Some(user_id) = filter.user_id {
        let p = query.bind(SqlArg::Uuid(user_id.as_uuid()));
        query.condition(format!("user_id = {p}"));
    }
    if let Some(patient_id) = filter.patient_id {
        let p = query.bind(SqlArg::Uuid(patient_id.as_uuid()));
        query.condition(format!("patient_id = {p}"));
    }
    if let Some(action) = filter.action {
        let p = query.bind(SqlArg::Text(action.as_str().to_owned()));
        query.condition(format!("action = {p}"));
    }
    if let Some(from) = filter.from {
        let p = query.bind(SqlArg::I64(from.unix_micros()));
        query.condition(format!("occurred_at_us >= {p}"));
        // Rows at or after `from` are all at or after the first position whose latest time so
        // far reaches it (see `insert_audit_rows`): the page's scan starts there, through an
        // index, rather than at the start of the trail.
        query.condition(format!(
            "trail_position >= (SELECT trail_position FROM {AUDIT_TABLE} \
             WHERE occurred_at_max_us >= {p} ORDER BY occurred_at_max_us, trail_position LIMIT 1)"
        ));
    }
    if let Some(to) = filter.to {
        let p = query.bind(SqlArg::I64(to.unix_micros()));
        query.condition(format!("occurred_at_us < {p}"));
    }
    query.page(db, after, limit).await
}

/// The accounting of disclosures of `patient`'s record (HIPAA 164.528): every access to it
/// ([`DISCLOSURE_ACTIONS`]) by anyone acting in a role other than `patient`, in the order
/// recorded, paged as [`read_audit_trail`]. The patient's own reads are not disclosures; rows about
/// other patients and rows about no patient (logins) never appear. Refused and failed
/// attempts are listed with their outcome.
pub async fn accounting_of_disclosures(
    db: &ProjectionDb,
    patient: PatientId,
    after: Option<&AuditCursor>,
    limit: u32,
) -> Result<AuditPage, ProjectionError> {
    let mut query = Query::default();
    let p = query.bind(SqlArg::Uuid(patient.as_uuid()));
    query.condition(format!("patient_id = {p}"));
    let actions: Vec<String> = DISCLOSURE_ACTIONS
        .iter()
        .map(|action| query.bind(SqlArg::Text(action.as_str().to_owned())))
        .collect();
    query.condition(format!("action IN ({})", actions.join(", ")));
    let p = query.bind(SqlArg::Text(Role::Patient.as_str().to_owned()));
    query.condition(format!("(role IS NULL OR role <> {p})"));
    query.page(db, after, limit).await
}

/// A WHERE clause under construction: fixed fragments and `$n` placeholders, numbered in
/// first-use order (each fragment is added right after its arguments are bound).
#[derive(Default)]
struct Query {
    conditions: Vec<String>,
    args: Vec<SqlArg>,
}

impl Query {
    fn bind(&mut self, arg: SqlArg) -> String {
        self.args.push(arg);
        format!("${}", self.args.len())
    }

    fn condition(&mut self, fragment: String) {
        self.conditions.push(fragment);
    }

    async fn page(
        mut self,
        db: &ProjectionDb,
        after: Option<&AuditCursor>,
        limit: u32,
    ) -> Result<AuditPage, ProjectionError> {
        let limit = limit.clamp(1, AUDIT_PAGE_ROWS_MAX);
        if let Some(after) = after {
            let p = self.bind(SqlArg::I64(after.trail_position));
            self.condition(format!("trail_position > {p}"));
        }
        // One row more than asked says whether there is a next page.
        let fetch = self.bind(SqlArg::I64(i64::from(limit) + 1));
        let client_address = match db.backend() {
            Backend::Sqlite => "client_address",
            Backend::Postgres => "host(client_address)",
        };
        let where_clause = if self.conditions.is_empty() {
            String::new()
        } else {
            format!("WHERE {}", self.conditions.join(" AND "))
        };
        let sql = format!(
            "SELECT audit_id, occurred_at_us, user_id, role, purpose_of_use, break_glass, \
             patient_id, entity, record_id, action, outcome, {client_address}, event_type, \
             trail_position FROM {AUDIT_TABLE} {where_clause} \
             ORDER BY trail_position LIMIT {fetch}"
        );
        // Built from the fixed fragments above and placeholders only: no value is in the text.
        let found = db.fetch_all(sqlx::AssertSqlSafe(sql), self.args).await?;
        let more = found.len() > limit as usize;
        let page = &found[..found.len().min(limit as usize)];
        let rows = page.iter().map(decode_row).collect::<Result<Vec<_>, _>>()?;
        let next = match page.last() {
            Some(last) if more => Some(AuditCursor {
                trail_position: last.i64(13)?,
            }),
            _ => None,
        };
        Ok(AuditPage { rows, next })
    }
}

/// A stored row back as an [`AuditRow`]. A code this build does not know (a row written by a
/// newer version) is an error naming the column, never a guess.
fn decode_row(row: &DbRow) -> Result<AuditRow, ProjectionError> {
    let audit_id = row.uuid(0)?;
    let patient_id = row.opt_uuid(6)?;
    let malformed = |reason: &'static str| {
        tracing::warn!(%audit_id, reason, "unreadable audit row");
        ProjectionError::MalformedRow {
            table: AUDIT_TABLE,
            patient_id: patient_id.unwrap_or(Uuid::nil()),
            reason,
        }
    };
    let occurred_at = Timestamp::from_unix_micros(row.i64(1)?)
        .map_err(|_| malformed("occurred_at_us out of range"))?;
    let actor = match (row.opt_uuid(2)?, row.opt_text(3)?, row.opt_text(4)?) {
        (Some(user_id), Some(role), Some(purpose)) => Some(Actor {
            user_id: UserId::from_uuid(user_id),
            role: role
                .parse::<Role>()
                .map_err(|_| malformed("unknown role"))?,
            purpose_of_use: purpose
                .parse::<PurposeOfUse>()
                .map_err(|_| malformed("unknown purpose of use"))?,
            break_glass: row.bool(5)?,
        }),
        (None, None, None) => None,
        _ => return Err(malformed("partial actor")),
    };
    let entity = row
        .opt_text(7)?
        .map(|raw| AuditEntity::parse(&raw).ok_or_else(|| malformed("unknown entity")))
        .transpose()?;
    let action = AuditAction::parse(&row.text(9)?).ok_or_else(|| malformed("unknown action"))?;
    let outcome =
        AuditOutcome::parse(&row.text(10)?).ok_or_else(|| malformed("unknown outcome"))?;
    let client_address = row
        .opt_text(11)?
        .map(|raw| {
            raw.parse::<IpAddr>()
                .map_err(|_| malformed("unreadable client address"))
        })
        .transpose()?;
    let event_type = row
        .opt_text(12)?
        .map(|raw| known_event_type(&raw).ok_or_else(|| malformed("unknown event type")))
        .transpose()?;
    Ok(AuditRow {
        audit_id,
        occurred_at,
        actor,
        patient_id: patient_id.map(PatientId::from_uuid),
        entity,
        record_id: row.opt_uuid(8)?,
        action,
        outcome,
        client_address,
        event_type,
    })
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64url_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        // 2, 3 or 4 characters for 1, 2 or 3 bytes: no padding.
        for i in 0..=chunk.len() {
            out.push(char::from(BASE64URL[((n >> (18 - 6 * i)) & 0x3f) as usize]));
        }
    }
    out
}

/// Strict: the alphabet only, no padding, and no stray bits in the last character, so each
/// byte string has exactly one encoding.
fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let sextet = |c: u8| BASE64URL.iter().position(|&a| a == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    for chunk in text.as_bytes().chunks(4) {
        if chunk.len() == 1 {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= sextet(c)? << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        let decoded = &bytes[1..chunk.len()];
        let spare_bits = 8 * (3 - decoded.len());
        if n & ((1 << spare_bits) - 1) != 0 {
            return None;
        }
        out.extend_from_slice(decoded);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64url_round_trips_and_is_strict() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let text = base64url_encode(&bytes);
            assert!(
                text.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            );
            assert_eq!(base64url_decode(&text), Some(bytes), "length {len}");
        }
        assert_eq!(base64url_encode(b"\xfb\xff"), "-_8");
        assert_eq!(base64url_encode(b"Man"), "TWFu");
        assert_eq!(base64url_decode("TWE"), Some(b"Ma".to_vec()));
        assert_eq!(base64url_decode("TWF"), None, "stray low bits");
        assert_eq!(base64url_decode("TWFu="), None, "padding");
        assert_eq!(base64url_decode("T"), None);
        assert_eq!(base64url_decode("TW+u"), None, "not the URL alphabet");
    }

    #[test]
    fn cursors_round_trip_and_refuse_anything_else() {
        let cursor = AuditCursor {
            trail_position: 0x0123_4567_89ab_cdef,
        };
        let text = cursor.encode();
        assert_eq!(text.len(), 11);
        assert_eq!(AuditCursor::decode(&text), Some(cursor));
        assert_eq!(AuditCursor::decode(""), None);
        assert_eq!(AuditCursor::decode(&text[..10]), None);
        assert_eq!(AuditCursor::decode(&format!("{text}AA")), None);
        for no_row in [0, -1, i64::MIN] {
            let cursor = AuditCursor {
                trail_position: no_row,
            };
            assert_eq!(AuditCursor::decode(&cursor.encode()), None, "{no_row}");
        }
    }
}
