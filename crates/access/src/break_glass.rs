//! Break-glass grants: time-limited emergency access to one patient's chart, with the reason
//! sealed at rest and a review queue for auditors.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chartlog_domain::{PatientId, Role, Timestamp, UserId};
use chartlog_projections::db::{Backend, DbRow, ProjectionTx, SqlArg};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::accounts::Accounts;
use crate::error::AccessError;
use crate::rows::{at_arg, clamped_timestamp, plus, role_from_str, timestamp, user_arg, uuid_arg};
use crate::types::{BreakGlassGrant, BreakGlassReason, BreakGlassReview, ReviewVerdict};

/// The grant columns [`read_grant`] reads, in order.
macro_rules! grant_columns {
    () => {
        "grant_id, user_id, role, patient_id, opened_at_us, expires_at_us"
    };
}

/// Most grants one page of the review listing returns; a larger limit is clamped to it.
pub const BREAK_GLASS_REVIEWS_PER_LISTING_MAX: usize = 1000;

/// The review listing's SELECT, up to its WHERE: the grant columns, then the reason and the
/// review, as [`Accounts::read_review`] reads them.
macro_rules! review_select {
    () => {
        concat!(
            "SELECT ",
            grant_columns!(),
            ", reason_sealed, verdict, reviewed_by, reviewed_at_us \
             FROM chartlog_access_break_glass_grants"
        )
    };
}

/// The listing's order within each part, and its limit as `$1`. Grants opened in the same
/// microsecond are told apart by id, so a page boundary never skips or repeats one.
macro_rules! newest_first {
    () => {
        "ORDER BY opened_at_us DESC, grant_id DESC LIMIT $1"
    };
}

/// Where the next page of the review listing starts: just after this grant, in the listing's
/// order (pending first, then newest first). Opaque to callers: [`ReviewCursor::encode`] gives
/// URL-safe text and [`ReviewCursor::decode`] reads it back. It holds whether the grant was
/// pending, when it was opened and its id: nothing a URL must not carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReviewCursor {
    pending: bool,
    opened_at_us: i64,
    grant_id: Uuid,
}

/// Bytes of an encoded cursor: pending (1), the time (8, big-endian) and the id (16).
const CURSOR_BYTES: usize = 25;

impl ReviewCursor {
    /// The position just after `review`.
    pub fn after(review: &BreakGlassReview) -> Self {
        Self {
            pending: review.verdict.is_none(),
            opened_at_us: review.grant.opened_at.unix_micros(),
            grant_id: review.grant.grant_id,
        }
    }

    /// URL-safe text (base64url without padding).
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; CURSOR_BYTES];
        bytes[0] = u8::from(self.pending);
        bytes[1..9].copy_from_slice(&self.opened_at_us.to_be_bytes());
        bytes[9..].copy_from_slice(self.grant_id.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// `None` for anything [`ReviewCursor::encode`] did not produce.
    pub fn decode(raw: &str) -> Option<Self> {
        let bytes: [u8; CURSOR_BYTES] = URL_SAFE_NO_PAD.decode(raw).ok()?.try_into().ok()?;
        let pending = match bytes[0] {
            0 => false,
            1 => true,
            _ => return None,
        };
        let opened_at_us = i64::from_be_bytes(bytes[1..9].try_into().ok()?);
        // Only times a grant can have: a cursor names a grant that was read.
        Timestamp::from_unix_micros(opened_at_us).ok()?;
        Some(Self {
            pending,
            opened_at_us,
            grant_id: Uuid::from_bytes(bytes[9..].try_into().ok()?),
        })
    }
}

/// One page of the review listing.
#[derive(Debug)]
pub struct ReviewPage {
    pub reviews: Vec<BreakGlassReview>,
    /// Where the next page starts; `None` when this page reached the end.
    pub next: Option<ReviewCursor>,
}

/// The first key of the advisory locks that order openings of break-glass grants (the second
/// is taken from the user and patient ids). Two-key advisory locks are a space of their own:
/// no single-key lock, such as the projection runner's, can collide with them, and this class
/// differs from the patient-account lock's.
const BREAK_GLASS_LOCK_CLASS: i64 = 0x6368_6267;

impl Accounts {
    /// Opens a grant for `user` (acting as `role`) to `patient`'s chart, lasting the
    /// configured break-glass duration from `now`. The grant is *pending*: it gives no access
    /// until [`Accounts::mark_break_glass_opening_audited`] records that its opening is on the
    /// audit trail. While a grant of `user` to `patient` is open and in force, opening another
    /// is refused with [`AccessError::BreakGlassAlreadyOpen`] and records nothing: access ends
    /// when the grant does, and a grant is reviewed as given.
    ///
    /// While an open grant of `user` to `patient` is still pending (its audit row was never
    /// written, or the mark never set), that grant is returned instead of a new one, for the
    /// caller to complete: audit it, announce it, mark it. It keeps its opening time, end and
    /// sealed reason (`reason` is not stored again): the emergency access is the one first
    /// asked for, and it is never stretched by retrying.
    #[tracing::instrument(skip_all, fields(user_id = %user, patient_id = %patient, role = role.as_str()))]
    pub async fn open_break_glass(
        &self,
        user: UserId,
        role: Role,
        patient: PatientId,
        reason: &BreakGlassReason,
        now: Timestamp,
    ) -> Result<BreakGlassGrant, AccessError> {
        let account = self.existing_user(user).await?;
        if account.disabled {
            return Err(AccessError::UserDisabled { user_id: user });
        }
        let grant_id = Uuid::new_v4();
        let expires_at = clamped_timestamp(plus(now, self.settings().break_glass_duration));
        let sealed = self.secrets().seal(
            &[b"break-glass-reason", grant_id.as_bytes()],
            reason.expose().as_bytes(),
        );
        let mut tx = self.db().begin().await?;
        match open_grant(&mut tx, user, patient, now).await? {
            Some(OpenGrant::InForce(open)) => {
                tracing::info!(grant_id = %open.grant_id, "break-glass grant already open");
                return Err(AccessError::BreakGlassAlreadyOpen {
                    grant_id: open.grant_id,
                    expires_at: open.expires_at,
                });
            }
            Some(OpenGrant::Pending(pending)) => {
                tracing::warn!(
                    grant_id = %pending.grant_id,
                    "break-glass grant resumed: its opening was never audited"
                );
                return Ok(pending);
            }
            None => {}
        }
        tx.execute(
            "INSERT INTO chartlog_access_break_glass_grants \
             (grant_id, user_id, role, patient_id, opened_at_us, expires_at_us, reason_sealed) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            vec![
                uuid_arg(grant_id),
                user_arg(user),
                SqlArg::Text(role.as_str().to_owned()),
                SqlArg::Uuid(patient.as_uuid()),
                at_arg(now),
                at_arg(expires_at),
                SqlArg::Bytes(sealed),
            ],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(grant_id = %grant_id, "break-glass grant opened, pending its audit");
        Ok(BreakGlassGrant {
            grant_id,
            user_id: user,
            role,
            patient_id: patient,
            opened_at: now,
            expires_at,
        })
    }

    /// Puts a grant from [`Accounts::open_break_glass`] in force: its opening's success row
    /// is durable on the audit trail (as of `now`). Call it only after that write returned.
    /// Marking a grant already marked does nothing (two completions of one pending grant may
    /// race); an unknown grant is [`AccessError::GrantNotFound`].
    #[tracing::instrument(skip_all, fields(grant_id = %grant_id))]
    pub async fn mark_break_glass_opening_audited(
        &self,
        grant_id: Uuid,
        now: Timestamp,
    ) -> Result<(), AccessError> {
        let updated = self
            .db()
            .execute(
                "UPDATE chartlog_access_break_glass_grants SET opening_audited_at_us = $1 \
                 WHERE grant_id = $2 AND opening_audited_at_us IS NULL",
                vec![at_arg(now), uuid_arg(grant_id)],
            )
            .await?;
        if updated == 0 {
            let known = self
                .db()
                .fetch_optional(
                    "SELECT 1 FROM chartlog_access_break_glass_grants WHERE grant_id = $1",
                    vec![uuid_arg(grant_id)],
                )
                .await?;
            if known.is_none() {
                return Err(AccessError::GrantNotFound { grant_id });
            }
        }
        tracing::info!("break-glass grant in force: its opening is audited");
        Ok(())
    }

    /// The grant of `user` to `patient` in force at `now` (the latest-ending one), if any. A
    /// grant whose opening is not marked audited gives no access, however recent.
    pub async fn active_break_glass(
        &self,
        user: UserId,
        patient: PatientId,
        now: Timestamp,
    ) -> Result<Option<BreakGlassGrant>, AccessError> {
        let row = self
            .db()
            .fetch_optional(
                concat!(
                    "SELECT ",
                    grant_columns!(),
                    " FROM chartlog_access_break_glass_grants \
                     WHERE user_id = $1 AND patient_id = $2 \
                       AND opened_at_us <= $3 AND expires_at_us > $3 \
                       AND opening_audited_at_us IS NOT NULL \
                     ORDER BY expires_at_us DESC LIMIT 1"
                ),
                vec![user_arg(user), SqlArg::Uuid(patient.as_uuid()), at_arg(now)],
            )
            .await?;
        row.map(|row| read_grant(&row)).transpose()
    }

    /// A page of grants with their reasons: those not yet reviewed first, then (unless
    /// `pending_only`) the reviewed ones, each newest first; after `after` (from the start
    /// when `None`), at most `limit` of them (clamped to
    /// `1..=`[`BREAK_GLASS_REVIEWS_PER_LISTING_MAX`]).
    pub async fn break_glass_reviews(
        &self,
        pending_only: bool,
        after: Option<&ReviewCursor>,
        limit: u32,
    ) -> Result<ReviewPage, AccessError> {
        let limit = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .clamp(1, BREAK_GLASS_REVIEWS_PER_LISTING_MAX);
        // One row more than asked says whether there is a next page. Each part is read in
        // its own query, so the pending part is served by the index of pending grants.
        let mut rows = Vec::new();
        if after.is_none_or(|after| after.pending) {
            rows = self.review_rows(true, after, limit + 1).await?;
        }
        if !pending_only && rows.len() <= limit {
            let after = after.filter(|after| !after.pending);
            let reviewed = self
                .review_rows(false, after, limit + 1 - rows.len())
                .await?;
            rows.extend(reviewed);
        }
        let more = rows.len() > limit;
        let reviews = rows
            .iter()
            .take(limit)
            .map(|row| self.read_review(row))
            .collect::<Result<Vec<_>, _>>()?;
        let next = if more {
            reviews.last().map(ReviewCursor::after)
        } else {
            None
        };
        Ok(ReviewPage { reviews, next })
    }

    /// Pending or reviewed grants, newest first, after `after`, at most `fetch`.
    async fn review_rows(
        &self,
        pending: bool,
        after: Option<&ReviewCursor>,
        fetch: usize,
    ) -> Result<Vec<DbRow>, AccessError> {
        let fetch = SqlArg::I64(i64::try_from(fetch).unwrap_or(i64::MAX));
        let rows = match (pending, after) {
            (true, None) => {
                self.db()
                    .fetch_all(
                        concat!(review_select!(), " WHERE verdict IS NULL ", newest_first!()),
                        vec![fetch],
                    )
                    .await?
            }
            (false, None) => {
                self.db()
                    .fetch_all(
                        concat!(
                            review_select!(),
                            " WHERE verdict IS NOT NULL ",
                            newest_first!()
                        ),
                        vec![fetch],
                    )
                    .await?
            }
            (true, Some(after)) => {
                self.db()
                    .fetch_all(
                        concat!(
                            review_select!(),
                            " WHERE verdict IS NULL AND (opened_at_us, grant_id) < ($2, $3) ",
                            newest_first!()
                        ),
                        vec![
                            fetch,
                            SqlArg::I64(after.opened_at_us),
                            uuid_arg(after.grant_id),
                        ],
                    )
                    .await?
            }
            (false, Some(after)) => {
                self.db()
                    .fetch_all(
                        concat!(
                            review_select!(),
                            " WHERE verdict IS NOT NULL AND (opened_at_us, grant_id) < ($2, $3) ",
                            newest_first!()
                        ),
                        vec![
                            fetch,
                            SqlArg::I64(after.opened_at_us),
                            uuid_arg(after.grant_id),
                        ],
                    )
                    .await?
            }
        };
        Ok(rows)
    }

    fn read_review(&self, row: &DbRow) -> Result<BreakGlassReview, AccessError> {
        let grant = read_grant(row)?;
        let reason = Zeroizing::new(self.secrets().open(
            &[b"break-glass-reason", grant.grant_id.as_bytes()],
            &row.bytes(6)?,
        )?);
        let reason = std::str::from_utf8(&reason)
            .ok()
            .and_then(|reason| BreakGlassReason::parse(reason).ok())
            .ok_or(AccessError::Corrupt("break-glass reason"))?;
        let verdict = row
            .opt_text(7)?
            .map(|verdict| ReviewVerdict::parse(&verdict).ok_or(AccessError::Corrupt("verdict")))
            .transpose()?;
        Ok(BreakGlassReview {
            grant,
            reason,
            verdict,
            reviewed_by: row.opt_uuid(8)?.map(UserId::from_uuid),
            reviewed_at: row.opt_i64(9)?.map(timestamp).transpose()?,
        })
    }

    /// Records an auditor's verdict on a grant, once. An auditor cannot review their own grant.
    #[tracing::instrument(skip_all, fields(grant_id = %grant_id, auditor = %auditor, verdict = verdict.as_str()))]
    pub async fn review_break_glass(
        &self,
        grant_id: Uuid,
        auditor: UserId,
        verdict: ReviewVerdict,
        now: Timestamp,
    ) -> Result<(), AccessError> {
        let mut tx = self.db().begin().await?;
        let Some(row) = tx
            .fetch_optional(
                "SELECT user_id, verdict FROM chartlog_access_break_glass_grants \
                 WHERE grant_id = $1",
                vec![uuid_arg(grant_id)],
            )
            .await?
        else {
            return Err(AccessError::GrantNotFound { grant_id });
        };
        let holder = UserId::from_uuid(row.uuid(0)?);
        if row.opt_text(1)?.is_some() {
            return Err(AccessError::AlreadyReviewed { grant_id });
        }
        if holder == auditor {
            return Err(AccessError::SelfReview {
                grant_id,
                user_id: auditor,
            });
        }
        let updated = tx
            .execute(
                "UPDATE chartlog_access_break_glass_grants \
                 SET verdict = $1, reviewed_by = $2, reviewed_at_us = $3 \
                 WHERE grant_id = $4 AND verdict IS NULL",
                vec![
                    SqlArg::Text(verdict.as_str().to_owned()),
                    user_arg(auditor),
                    at_arg(now),
                    uuid_arg(grant_id),
                ],
            )
            .await?;
        if updated == 0 {
            return Err(AccessError::AlreadyReviewed { grant_id });
        }
        tx.commit().await?;
        tracing::info!("break-glass grant reviewed");
        Ok(())
    }
}

fn read_grant(row: &DbRow) -> Result<BreakGlassGrant, AccessError> {
    Ok(BreakGlassGrant {
        grant_id: row.uuid(0)?,
        user_id: UserId::from_uuid(row.uuid(1)?),
        role: role_from_str(&row.text(2)?)?,
        patient_id: PatientId::from_uuid(row.uuid(3)?),
        opened_at: timestamp(row.i64(4)?)?,
        expires_at: timestamp(row.i64(5)?)?,
    })
}

/// A grant that has not ended, as [`open_grant`] finds it.
enum OpenGrant {
    /// Its opening is audited: it gives access.
    InForce(BreakGlassGrant),
    /// Its opening was never marked audited: it gives no access yet.
    Pending(BreakGlassGrant),
}

/// A grant of `user` to `patient` that has not ended at `now`, if any, one in force before a
/// pending one (one opened after `now` counts too: it would overlap a grant opened now). On
/// PostgreSQL the transaction first takes a lock on the pair, held until it ends, so two
/// openings cannot both find none: no unique index can say "not ended", which depends on the
/// time. On SQLite the file's write lock, taken by `begin`, already orders the transactions.
async fn open_grant(
    tx: &mut ProjectionTx,
    user: UserId,
    patient: PatientId,
    now: Timestamp,
) -> Result<Option<OpenGrant>, AccessError> {
    if tx.backend() == Backend::Postgres {
        // Random bits of both ids (the tail of a v4 or v7 UUID): pairs that share a key only
        // wait for each other.
        let (user_bytes, patient_bytes) =
            (user.as_uuid().into_bytes(), patient.as_uuid().into_bytes());
        let key = i32::from_be_bytes([
            user_bytes[12] ^ patient_bytes[12],
            user_bytes[13] ^ patient_bytes[13],
            user_bytes[14] ^ patient_bytes[14],
            user_bytes[15] ^ patient_bytes[15],
        ]);
        tx.execute(
            "SELECT pg_advisory_xact_lock(CAST($1 AS integer), CAST($2 AS integer))",
            vec![
                SqlArg::I64(BREAK_GLASS_LOCK_CLASS),
                SqlArg::I64(i64::from(key)),
            ],
        )
        .await?;
    }
    let row = tx
        .fetch_optional(
            concat!(
                "SELECT ",
                grant_columns!(),
                ", opening_audited_at_us FROM chartlog_access_break_glass_grants \
                 WHERE user_id = $1 AND patient_id = $2 AND expires_at_us > $3 \
                 ORDER BY (opening_audited_at_us IS NULL), expires_at_us DESC LIMIT 1"
            ),
            vec![user_arg(user), SqlArg::Uuid(patient.as_uuid()), at_arg(now)],
        )
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let grant = read_grant(&row)?;
    Ok(Some(if row.opt_i64(6)?.is_some() {
        OpenGrant::InForce(grant)
    } else {
        OpenGrant::Pending(grant)
    }))
}
