//! chartlog-access: who may sign in, and how.
//!
//! [`Accounts`] keeps user accounts, passwords, the TOTP second factor, sessions, login
//! throttling, break-glass grants and idempotency records in the chartlog database (SQLite
//! or PostgreSQL, through [`chartlog_projections::db::ProjectionDb`]; tables
//! `chartlog_access_*`, migration `0004_access.sql`). The HTTP layer calls it; it knows
//! nothing of HTTP.
//!
//! **Invariants:**
//! - No secret is stored in the clear: passwords are argon2id PHC strings (hashed on tokio's
//!   blocking pool), session tokens and recovery codes SHA-256 digests; TOTP secrets,
//!   break-glass reasons and idempotent response bodies are sealed under the access key of
//!   [`AccessSecrets`], kept in the key directory (`access-key.json`), not in the database.
//! - Secret values ([`Password`], [`OneTimePassword`], [`SessionToken`], [`SecondFactorCode`],
//!   [`RecoveryCodes`], [`BreakGlassReason`]) redact in `Debug` and `Display`, are zeroized on
//!   drop, and are read only through `expose()`. Errors and traces name ids, roles and limits.
//! - A login answers the same [`LoginError::InvalidCredentials`], after the same argon2 work,
//!   for an unknown account, a wrong password, a wrong second factor and a disabled account.
//! - The clock is the caller's: every operation takes `now`.
//! - Password policy after NIST SP 800-63B: length only (no composition rules), a list of
//!   common passwords, not containing the username, none of the last five.
#![forbid(unsafe_code)]

mod accounts;
mod break_glass;
mod error;
mod idempotency;
mod password;
mod random;
mod rows;
mod second_factor;
mod secrets;
mod settings;
mod types;

pub use accounts::{Accounts, PRUNE_GRACE, SESSION_TOUCH_INTERVAL, SSO_SUBJECT_LENGTH_MAX};
pub use break_glass::{BREAK_GLASS_REVIEWS_PER_LISTING_MAX, ReviewCursor, ReviewPage};
pub use error::{
    AccessError, BreakGlassReasonError, ExpiryReason, IdempotencyError, LoginError,
    PasswordChangeError, SecondFactorCodeError, SessionError, UsernameError,
};
pub use idempotency::{
    IDEMPOTENCY_IN_PROGRESS_TIMEOUT, IDEMPOTENCY_KEY_LENGTH_MAX, IdempotencyClaim,
    IdempotencyReservation,
};
pub use password::{
    COMMON_PASSWORDS_MIN, ONE_TIME_PASSWORD_LENGTH, PASSWORD_BYTES_MAX,
    PASSWORD_LENGTH_MAX_CEILING, is_common_password,
};
pub use second_factor::{TOTP_ISSUER, TOTP_SECRET_BYTES, TOTP_SKEW_STEPS, TOTP_STEP_SECONDS};
pub use secrets::{ACCESS_KEY_FILE_NAME, AccessSecrets};
pub use settings::{
    AccessSettings, LOGIN_ATTEMPT_IN_FLIGHT_MAX, LOGIN_FAILURE_WINDOW,
    LOGIN_FAILURES_PER_ACCOUNT_MAX, LOGIN_FAILURES_PER_ADDRESS_MAX,
    LOGIN_IN_FLIGHT_RETRY_AFTER_SECONDS, PASSWORD_HISTORY_GENERATIONS, PASSWORD_LENGTH_MAX_FLOOR,
    PASSWORD_LENGTH_MIN_FLOOR, PasswordHashing, SettingsError,
};
pub use types::{
    BREAK_GLASS_REASON_LENGTH_MAX, BreakGlassGrant, BreakGlassReason, BreakGlassReview,
    IdentityAssertion, LoginAttempt, LoginSuccess, NewUser, OneTimePassword, Password,
    RECOVERY_CODE_LENGTH, RECOVERY_CODES_PER_ENROLLMENT, RecoveryCodes, ReviewVerdict,
    SESSION_TOKEN_LENGTH, SecondFactorCode, SecondFactorEnrollment, Session, SessionStage,
    SessionToken, StoredResponse, TOTP_DIGITS, USERNAME_LENGTH_MAX, USERNAME_LENGTH_MIN,
    UserAccount, Username,
};
