//! The errors of chartlog-access. Messages name ids, roles and limits; never a password, a
//! token, a code, a break-glass reason or a response body.

use chartlog_crypto::CryptoError;
use chartlog_domain::{Role, UserId};
use uuid::Uuid;

/// A fault or a refusal of an account operation.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// Another account already has this name.
    #[error("the username is already taken")]
    UsernameTaken,
    /// The patient already has an account (enabled or disabled): a second one would be a
    /// second way into the same record.
    #[error("the patient already has an account")]
    PatientAccountExists,
    #[error("user {user_id} not found")]
    UserNotFound { user_id: UserId },
    /// A patient account needs the patient id it reads as.
    #[error("a patient account needs a patient id")]
    PatientIdRequired,
    /// Only a patient account is linked to a patient.
    #[error("role {} takes no patient id", .role.as_str())]
    PatientIdNotAllowed { role: Role },
    /// The role is not one an account may have (the internal `system` role).
    #[error("role {} cannot be given to an account", .role.as_str())]
    RoleNotAssignable { role: Role },
    /// The account is disabled.
    #[error("user {user_id} is disabled")]
    UserDisabled { user_id: UserId },
    /// A second factor is already enrolled; an administrator resets it first.
    #[error("user {user_id} already has a second factor enrolled")]
    SecondFactorAlreadyEnrolled { user_id: UserId },
    /// Confirmation without a pending enrollment.
    #[error("user {user_id} has no second-factor enrollment in progress")]
    NoPendingEnrollment { user_id: UserId },
    /// The code given to confirm an enrollment is not the authenticator's current code.
    #[error("the second-factor code does not match the enrollment")]
    InvalidSecondFactorCode,
    /// The user already holds an open grant to this patient: a second would overlap it and
    /// stretch the emergency access past the duration a grant is given.
    #[error("break-glass grant {grant_id} to this patient is already open, until {expires_at}")]
    BreakGlassAlreadyOpen {
        grant_id: Uuid,
        expires_at: chartlog_domain::Timestamp,
    },
    #[error("break-glass grant {grant_id} not found")]
    GrantNotFound { grant_id: Uuid },
    #[error("break-glass grant {grant_id} is already reviewed")]
    AlreadyReviewed { grant_id: Uuid },
    /// An auditor may not review their own break-glass access.
    #[error("user {user_id} cannot review their own break-glass grant {grant_id}")]
    SelfReview { grant_id: Uuid, user_id: UserId },
    /// Another account is already linked to this identity-provider subject.
    #[error("another account is linked to this identity-provider subject")]
    SsoSubjectTaken,
    /// A subject outside 1 to 255 characters, or holding control characters.
    #[error("an identity-provider subject has 1 to 255 characters and no control characters")]
    InvalidSsoSubject,
    /// An idempotency key outside 1 to 255 characters.
    #[error("an idempotency key has 1 to 255 characters")]
    InvalidIdempotencyKey,
    #[error("access database: {0}")]
    Database(#[from] sqlx::Error),
    /// A sealed column did not open under the access key: a wrong key file or a damaged row.
    #[error("a sealed access record did not open: {0}")]
    Crypto(#[from] CryptoError),
    /// A stored row breaks the schema's rules (a fault, not a refusal).
    #[error("corrupt access record: {0}")]
    Corrupt(&'static str),
    #[error("password hashing failed: {0}")]
    Hashing(String),
}

/// Why a login or a re-authentication was refused.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Unknown account, wrong password, wrong second factor or a disabled account: one answer
    /// for all, so a caller learns nothing about which accounts exist.
    #[error("invalid username or password")]
    InvalidCredentials,
    /// The password was right and the account has a second factor: send the code too.
    #[error("a second factor is required")]
    SecondFactorRequired,
    /// The identity provider vouched for the account's subject but not for a second factor,
    /// and the account's role needs one.
    #[error("the identity provider asserted no second factor")]
    IdentityProviderSecondFactorMissing,
    /// Too many recent failures for this account or this client address.
    #[error("too many failed logins; retry in {retry_after_seconds} s")]
    Throttled { retry_after_seconds: u64 },
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Why a session token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// No open session has this token (never issued, or already ended by expiry).
    #[error("unknown session")]
    Unknown,
    /// The session just expired; the next call with this token answers `Unknown`.
    #[error("session of user {user_id} expired ({})", .reason.as_str())]
    Expired {
        user_id: UserId,
        reason: ExpiryReason,
    },
    /// The session was ended by logout, a password change, or an administrator.
    #[error("session of user {user_id} was revoked")]
    Revoked { user_id: UserId },
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Which limit ended a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExpiryReason {
    /// No request within the idle timeout.
    Idle,
    /// The absolute lifetime passed.
    Absolute,
}

impl ExpiryReason {
    pub const fn as_str(self) -> &'static str {
        match self {
            ExpiryReason::Idle => "idle",
            ExpiryReason::Absolute => "absolute",
        }
    }
}

/// Why a new password was refused (NIST SP 800-63B 5.1.1.2).
#[derive(Debug, thiserror::Error)]
pub enum PasswordChangeError {
    #[error("the current password is not correct")]
    CurrentPasswordIncorrect,
    #[error("the password must have at least {length_min} characters")]
    TooShort { length_min: usize },
    #[error("the password must have at most {length_max} characters")]
    TooLong { length_max: usize },
    #[error("the password is on the list of commonly used passwords")]
    Common,
    #[error("the password must not contain the username")]
    ContainsUsername,
    #[error("the password was used recently; choose one not among the last {generations}")]
    Reused { generations: usize },
    /// Too many wrong current passwords recently.
    #[error("too many failed attempts; retry in {retry_after_seconds} s")]
    Throttled { retry_after_seconds: u64 },
    #[error(transparent)]
    Access(#[from] AccessError),
}

/// Why a stored response was not replayed.
#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    /// The key was used before for a request with other content.
    #[error("the idempotency key was used for a different request")]
    KeyReusedForDifferentRequest,
    #[error(transparent)]
    Access(#[from] AccessError),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsernameError {
    #[error("a username has 3 to 64 characters")]
    Length,
    #[error("a username has only the characters a-z, 0-9, '.', '_' and '-'")]
    Characters,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a second-factor code is 6 digits or a 20-character recovery code")]
pub struct SecondFactorCodeError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BreakGlassReasonError {
    #[error("a break-glass reason must not be blank")]
    Blank,
    #[error("a break-glass reason has at most {length_max} characters")]
    TooLong { length_max: usize },
}
