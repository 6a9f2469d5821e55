//! Conversions between stored columns and the crate's types, and time arithmetic in unix
//! microseconds.

use std::time::Duration;

use chartlog_domain::{PatientId, Role, Timestamp, UserId};
use chartlog_projections::db::{DbRow, SqlArg};
use uuid::Uuid;

use crate::error::AccessError;
use crate::types::{UserAccount, Username};

/// The columns [`UserRow::read`] reads, in order, as a literal for `concat!`; with a table
/// alias prefix for joins.
macro_rules! user_columns {
    () => {
        "user_id, username, role, patient_id, password_hash, must_change_password, disabled, \
         totp_sealed, totp_pending_sealed, totp_last_step, created_at_us, last_login_at_us, \
         sso_subject"
    };
    (u) => {
        "u.user_id, u.username, u.role, u.patient_id, u.password_hash, \
         u.must_change_password, u.disabled, u.totp_sealed, u.totp_pending_sealed, \
         u.totp_last_step, u.created_at_us, u.last_login_at_us, u.sso_subject"
    };
}
pub(crate) use user_columns;

/// One row of `chartlog_access_users`.
pub(crate) struct UserRow {
    pub user_id: UserId,
    pub username: Username,
    pub role: Role,
    pub patient_id: Option<PatientId>,
    pub password_hash: String,
    pub must_change_password: bool,
    pub disabled: bool,
    pub totp_sealed: Option<Vec<u8>>,
    pub totp_pending_sealed: Option<Vec<u8>>,
    pub created_at: Timestamp,
    pub last_login_at: Option<Timestamp>,
    /// The identity provider's subject this account is linked to: it then signs in only
    /// through the identity provider.
    pub sso_subject: Option<String>,
}

impl UserRow {
    /// Reads the columns of `user_columns!()` starting at column `first` (`totp_last_step` is
    /// selected but not read: only its conditional UPDATE uses it).
    pub fn read(row: &DbRow, first: usize) -> Result<Self, AccessError> {
        Ok(Self {
            user_id: UserId::from_uuid(row.uuid(first)?),
            username: Username::parse(&row.text(first + 1)?)
                .map_err(|_| AccessError::Corrupt("username"))?,
            role: role_from_str(&row.text(first + 2)?)?,
            patient_id: row.opt_uuid(first + 3)?.map(PatientId::from_uuid),
            password_hash: row.text(first + 4)?,
            must_change_password: row.bool(first + 5)?,
            disabled: row.bool(first + 6)?,
            totp_sealed: row.opt_bytes(first + 7)?,
            totp_pending_sealed: row.opt_bytes(first + 8)?,
            created_at: timestamp(row.i64(first + 10)?)?,
            last_login_at: row.opt_i64(first + 11)?.map(timestamp).transpose()?,
            sso_subject: row.opt_text(first + 12)?,
        })
    }

    pub fn account(&self) -> UserAccount {
        UserAccount {
            user_id: self.user_id,
            username: self.username.clone(),
            role: self.role,
            patient_id: self.patient_id,
            disabled: self.disabled,
            second_factor_enrolled: self.totp_sealed.is_some(),
            must_change_password: self.must_change_password,
            created_at: self.created_at,
            last_login_at: self.last_login_at,
            sso_subject: self.sso_subject.clone(),
        }
    }
}

pub(crate) fn role_from_str(raw: &str) -> Result<Role, AccessError> {
    Role::ALL
        .into_iter()
        .find(|role| role.as_str() == raw)
        .ok_or(AccessError::Corrupt("role"))
}

pub(crate) fn timestamp(micros: i64) -> Result<Timestamp, AccessError> {
    Timestamp::from_unix_micros(micros).map_err(|_| AccessError::Corrupt("timestamp"))
}

/// A time computed by adding a setting to a time, kept within [`Timestamp`]'s range.
pub(crate) fn clamped_timestamp(micros: i64) -> Timestamp {
    Timestamp::from_unix_micros(
        micros.clamp(Timestamp::MIN_UNIX_MICROS, Timestamp::MAX_UNIX_MICROS),
    )
    .expect("clamped into range")
}

pub(crate) fn duration_micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// `at + duration` in microseconds, saturating.
pub(crate) fn plus(at: Timestamp, duration: Duration) -> i64 {
    at.unix_micros().saturating_add(duration_micros(duration))
}

/// `at - duration` in microseconds, saturating.
pub(crate) fn minus(at: Timestamp, duration: Duration) -> i64 {
    at.unix_micros().saturating_sub(duration_micros(duration))
}

pub(crate) fn uuid_arg(id: Uuid) -> SqlArg {
    SqlArg::Uuid(id)
}

pub(crate) fn user_arg(id: UserId) -> SqlArg {
    SqlArg::Uuid(id.as_uuid())
}

pub(crate) fn at_arg(at: Timestamp) -> SqlArg {
    SqlArg::I64(at.unix_micros())
}
