//! Break-glass grants: time-limited emergency access to one patient's chart, with the reason
//! sealed at rest and a review queue for auditors.

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

/// Most grants one review listing returns (oldest first).
pub const BREAK_GLASS_REVIEWS_PER_LISTING_MAX: i64 = 1000;

/// The first key of the advisory locks that order openings of break-glass grants (the second
/// is taken from the user and patient ids). Two-key advisory locks are a space of their own:
/// no single-key lock, such as the projection runner's, can collide with them, and this class
/// differs from the patient-account lock's.
const BREAK_GLASS_LOCK_CLASS: i64 = 0x6368_6267;

impl Accounts {
    /// Opens a grant for `user` (acting as `role`) to `patient`'s chart, lasting the
    /// configured break-glass duration from `now`. While a grant of `user` to `patient` is
    /// open, opening another is refused with [`AccessError::BreakGlassAlreadyOpen`] and
    /// records nothing: access ends when the grant does, and a grant is reviewed as given.
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
        if let Some(open) = open_grant(&mut tx, user, patient, now).await? {
            tracing::info!(grant_id = %open.0, "break-glass grant already open");
            return Err(AccessError::BreakGlassAlreadyOpen {
                grant_id: open.0,
                expires_at: open.1,
            });
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
        tracing::info!(grant_id = %grant_id, "break-glass grant opened");
        Ok(BreakGlassGrant {
            grant_id,
            user_id: user,
            role,
            patient_id: patient,
            opened_at: now,
            expires_at,
        })
    }

    /// The grant of `user` to `patient` in force at `now` (the latest-ending one), if any.
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
                     ORDER BY expires_at_us DESC LIMIT 1"
                ),
                vec![user_arg(user), SqlArg::Uuid(patient.as_uuid()), at_arg(now)],
            )
            .await?;
        row.map(|row| read_grant(&row)).transpose()
    }

    /// Grants with their reasons, oldest first: all of them, or only those not yet reviewed.
    /// At most [`BREAK_GLASS_REVIEWS_PER_LISTING_MAX`].
    pub async fn break_glass_reviews(
        &self,
        pending_only: bool,
    ) -> Result<Vec<BreakGlassReview>, AccessError> {
        let rows = if pending_only {
            self.db()
                .fetch_all(
                    concat!(
                        "SELECT ",
                        grant_columns!(),
                        ", reason_sealed, verdict, reviewed_by, reviewed_at_us \
                         FROM chartlog_access_break_glass_grants WHERE verdict IS NULL \
                         ORDER BY opened_at_us, grant_id LIMIT $1"
                    ),
                    vec![SqlArg::I64(BREAK_GLASS_REVIEWS_PER_LISTING_MAX)],
                )
                .await?
        } else {
            self.db()
                .fetch_all(
                    concat!(
                        "SELECT ",
                        grant_columns!(),
                        ", reason_sealed, verdict, reviewed_by, reviewed_at_us \
                         FROM chartlog_access_break_glass_grants \
                         ORDER BY opened_at_us, grant_id LIMIT $1"
                    ),
                    vec![SqlArg::I64(BREAK_GLASS_REVIEWS_PER_LISTING_MAX)],
                )
                .await?
        };
        rows.iter()
            .map(|row| {
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
                    .map(|verdict| {
                        ReviewVerdict::parse(&verdict).ok_or(AccessError::Corrupt("verdict"))
                    })
                    .transpose()?;
                Ok(BreakGlassReview {
                    grant,
                    reason,
                    verdict,
                    reviewed_by: row.opt_uuid(8)?.map(UserId::from_uuid),
                    reviewed_at: row.opt_i64(9)?.map(timestamp).transpose()?,
                })
            })
            .collect()
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

/// The id and end of a grant of `user` to `patient` that has not ended at `now`, if any (one
/// opened after `now` counts too: it would overlap a grant opened now). On PostgreSQL the
/// transaction first takes a lock on the pair, held until it ends, so two openings cannot both
/// find none: no unique index can say "not ended", which depends on the time. On SQLite the
/// file's write lock, taken by `begin`, already orders the transactions.
async fn open_grant(
    tx: &mut ProjectionTx,
    user: UserId,
    patient: PatientId,
    now: Timestamp,
) -> Result<Option<(Uuid, Timestamp)>, AccessError> {
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
            "SELECT grant_id, expires_at_us FROM chartlog_access_break_glass_grants \
             WHERE user_id = $1 AND patient_id = $2 AND expires_at_us > $3 \
             ORDER BY expires_at_us DESC LIMIT 1",
            vec![user_arg(user), SqlArg::Uuid(patient.as_uuid()), at_arg(now)],
        )
        .await?;
    row.map(|row| Ok((row.uuid(0)?, timestamp(row.i64(1)?)?)))
        .transpose()
}
