//! The values the access API takes and returns: account names, secrets that redact when
//! printed, accounts, sessions, grants and stored responses.

use std::fmt;
use std::net::IpAddr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chartlog_domain::{PatientId, Role, Timestamp, UserId};
use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::error::{BreakGlassReasonError, SecondFactorCodeError, UsernameError};

/// Shortest account name, in characters.
pub const USERNAME_LENGTH_MIN: usize = 3;
/// Longest account name, in characters.
pub const USERNAME_LENGTH_MAX: usize = 64;
/// Longest break-glass reason, in characters.
pub const BREAK_GLASS_REASON_LENGTH_MAX: usize = 500;
/// Random bytes in a session token.
pub const SESSION_TOKEN_BYTES: usize = 32;
/// Characters of a session token: 32 bytes in unpadded base64url.
pub const SESSION_TOKEN_LENGTH: usize = 43;
const _: () = assert!(SESSION_TOKEN_LENGTH == (SESSION_TOKEN_BYTES * 4).div_ceil(3));
/// Digits of a TOTP code.
pub const TOTP_DIGITS: usize = 6;
/// Characters of a recovery code, without its separators.
pub const RECOVERY_CODE_LENGTH: usize = 20;
/// Recovery codes issued at each enrollment.
pub const RECOVERY_CODES_PER_ENROLLMENT: usize = 10;
/// The alphabet recovery codes are drawn from: lower-case RFC 4648 base32, which has no 0, 1
/// or 8 to mistake for o, l or b. 20 characters carry 100 bits.
pub(crate) const RECOVERY_CODE_ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";

/// An account name: 3 to 64 characters of `a-z`, `0-9`, `.`, `_` and `-`. Parsed lower-cased,
/// so `Alice` and `alice` are one account.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Username(String);

impl Username {
    /// Lower-cases `raw` and checks its length and characters.
    pub fn parse(raw: &str) -> Result<Self, UsernameError> {
        let length = raw.chars().count();
        if !(USERNAME_LENGTH_MIN..=USERNAME_LENGTH_MAX).contains(&length) {
            return Err(UsernameError::Length);
        }
        let lowered = raw.to_ascii_lowercase();
        if !lowered.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        }) {
            return Err(UsernameError::Characters);
        }
        Ok(Self(lowered))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Username({})", self.0)
    }
}

macro_rules! secret_string {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Zeroize, ZeroizeOnDrop)]
        pub struct $name(String);

        impl $name {
            /// The secret itself: every read of it is a call to this method.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("<redacted>")
            }
        }
    };
}

secret_string!(
    /// A password as typed. Any text: the policy ([`crate::Accounts::change_password`]) judges
    /// it, not the constructor. Zeroized on drop; prints as `<redacted>`.
    Password
);

impl Password {
    pub fn new(password: String) -> Self {
        Self(password)
    }
}

secret_string!(
    /// A random password chosen by chartlog for a new or reset account, shown once to the
    /// administrator; the account must replace it at its first login.
    OneTimePassword
);

impl OneTimePassword {
    pub(crate) fn new(password: String) -> Self {
        Self(password)
    }

    /// The same text as a [`Password`], to log in with.
    pub fn to_password(&self) -> Password {
        Password(self.0.clone())
    }
}

secret_string!(
    /// A session's bearer token: 32 random bytes as unpadded base64url (43 characters). Shown
    /// to the client once; only its SHA-256 digest is stored.
    SessionToken
);

impl SessionToken {
    pub(crate) fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; SESSION_TOKEN_BYTES]);
        crate::random::fill(bytes.as_mut());
        Self(URL_SAFE_NO_PAD.encode(bytes.as_ref()))
    }
}

/// A second factor as typed at login: a 6-digit TOTP code or a recovery code (20 characters of
/// base32, separators and case ignored). Prints as `<redacted>`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct SecondFactorCode {
    normalized: String,
    #[zeroize(skip)]
    kind: SecondFactorKind,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum SecondFactorKind {
    Totp,
    Recovery,
}

impl SecondFactorCode {
    /// Reads a TOTP code (6 digits) or a recovery code (20 base32 characters); spaces and
    /// hyphens are dropped and letters lower-cased first.
    pub fn parse(raw: &str) -> Result<Self, SecondFactorCodeError> {
        // Bounded before copying: a code is at most a few dozen characters.
        if raw.len() > 64 {
            return Err(SecondFactorCodeError);
        }
        let normalized: String = raw
            .chars()
            .filter(|c| !matches!(c, ' ' | '-'))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let kind =
            if normalized.len() == TOTP_DIGITS && normalized.bytes().all(|b| b.is_ascii_digit()) {
                SecondFactorKind::Totp
            } else if normalized.len() == RECOVERY_CODE_LENGTH
                && normalized
                    .bytes()
                    .all(|b| RECOVERY_CODE_ALPHABET.contains(&b))
            {
                SecondFactorKind::Recovery
            } else {
                return Err(SecondFactorCodeError);
            };
        Ok(Self { normalized, kind })
    }

    /// The code, normalized (no separators, lower case).
    pub fn expose(&self) -> &str {
        &self.normalized
    }

    /// Whether it is a TOTP code rather than a recovery code.
    pub fn is_totp(&self) -> bool {
        self.kind == SecondFactorKind::Totp
    }

    pub(crate) fn kind(&self) -> SecondFactorKind {
        self.kind
    }
}

impl fmt::Debug for SecondFactorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecondFactorCode({:?}, <redacted>)", self.kind)
    }
}

/// The ten recovery codes issued when a second factor is enrolled, shown once. Each lets its
/// holder log in once without the authenticator. Prints as `<redacted>`.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct RecoveryCodes(Vec<String>);

impl RecoveryCodes {
    pub(crate) fn new(codes: Vec<String>) -> Self {
        assert_eq!(codes.len(), RECOVERY_CODES_PER_ENROLLMENT);
        Self(codes)
    }

    /// The codes, formatted `xxxxx-xxxxx-xxxxx-xxxxx`.
    pub fn expose(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Debug for RecoveryCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecoveryCodes({} codes, <redacted>)", self.0.len())
    }
}

/// Why a clinician opened a chart by break-glass: 1 to 500 characters, not blank. It may
/// describe the patient, so it is sealed at rest and prints as `<redacted>`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct BreakGlassReason(String);

impl BreakGlassReason {
    pub fn parse(raw: &str) -> Result<Self, BreakGlassReasonError> {
        if raw.trim().is_empty() {
            return Err(BreakGlassReasonError::Blank);
        }
        if raw.chars().count() > BREAK_GLASS_REASON_LENGTH_MAX {
            return Err(BreakGlassReasonError::TooLong {
                length_max: BREAK_GLASS_REASON_LENGTH_MAX,
            });
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BreakGlassReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BreakGlassReason(<redacted>)")
    }
}

/// An account to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    pub username: Username,
    pub role: Role,
    /// The patient a patient account reads as: required for [`Role::Patient`], refused for
    /// every other role.
    pub patient_id: Option<PatientId>,
    /// The identity provider's subject, for an account that signs in there from the start
    /// (as [`crate::Accounts::link_sso_subject`] would link it afterwards).
    pub sso_subject: Option<String>,
}

/// An account as the administrator sees it (no secret, no hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserAccount {
    pub user_id: UserId,
    pub username: Username,
    pub role: Role,
    pub patient_id: Option<PatientId>,
    pub disabled: bool,
    pub second_factor_enrolled: bool,
    pub must_change_password: bool,
    pub created_at: Timestamp,
    pub last_login_at: Option<Timestamp>,
    /// The identity provider's subject the account is linked to, if any.
    pub sso_subject: Option<String>,
}

/// What a login presents.
#[derive(Debug)]
pub struct LoginAttempt {
    /// As typed: parsed here, so a malformed name fails exactly like an unknown one.
    pub username: String,
    pub password: Password,
    /// A TOTP code or a recovery code, for accounts with an enrolled second factor.
    pub second_factor: Option<SecondFactorCode>,
    /// The client's address, for throttling.
    pub client_address: IpAddr,
}

/// An identity provider's ID token, verified by the caller: who it names, whether the
/// provider checked a second factor, and what makes the token single-use.
#[derive(Clone, PartialEq, Eq)]
pub struct IdentityAssertion {
    /// The provider's stable id of the user (`sub`).
    pub subject: String,
    /// Whether the provider says it checked a second factor (`amr`).
    pub second_factor: bool,
    /// SHA-256 of what the provider signed (the token less its signature, which is not
    /// unique to it): accepted once, by every server on the database.
    pub token_digest: [u8; 32],
    /// Until when the token could be presented at all; its digest is kept that long.
    pub usable_until: Timestamp,
}

impl fmt::Debug for IdentityAssertion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityAssertion")
            .field("second_factor", &self.second_factor)
            .field("usable_until", &self.usable_until)
            .finish_non_exhaustive()
    }
}

/// A successful login: the token (shown once) and the session it opens.
#[derive(Debug)]
pub struct LoginSuccess {
    pub token: SessionToken,
    pub session: Session,
}

/// How far a session may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionStage {
    /// Everything the role allows.
    Full,
    /// Only changing the password: the account logged in with a one-time password.
    MustChangePassword,
    /// Only enrolling a second factor: the role requires one and none is enrolled.
    MustEnrollSecondFactor,
}

impl SessionStage {
    pub const fn as_str(self) -> &'static str {
        match self {
            SessionStage::Full => "full",
            SessionStage::MustChangePassword => "must_change_password",
            SessionStage::MustEnrollSecondFactor => "must_enroll_second_factor",
        }
    }
}

/// An open session, as [`crate::Accounts::authenticate`] finds it. The stage is derived from
/// the account each time, so an enrollment finished in one request upgrades the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub session_id: Uuid,
    pub user_id: UserId,
    pub username: Username,
    pub role: Role,
    pub patient_id: Option<PatientId>,
    pub stage: SessionStage,
    pub created_at: Timestamp,
    /// The earlier of the idle deadline (last activity plus the idle timeout) and the end of
    /// the absolute lifetime.
    pub expires_at: Timestamp,
}

/// A TOTP secret handed out for enrollment, to type or scan into an authenticator app.
pub struct SecondFactorEnrollment {
    /// The secret in RFC 4648 base32, no padding.
    pub secret_base32: String,
    /// `otpauth://totp/...` with the secret, for a QR code.
    pub otpauth_uri: String,
}

impl fmt::Debug for SecondFactorEnrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecondFactorEnrollment(<redacted>)")
    }
}

impl Drop for SecondFactorEnrollment {
    fn drop(&mut self) {
        self.secret_base32.zeroize();
        self.otpauth_uri.zeroize();
    }
}

/// Emergency access to one patient's chart for a limited time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakGlassGrant {
    pub grant_id: Uuid,
    pub user_id: UserId,
    pub role: Role,
    pub patient_id: PatientId,
    pub opened_at: Timestamp,
    pub expires_at: Timestamp,
}

/// An auditor's judgement of a break-glass access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReviewVerdict {
    Justified,
    Unjustified,
}

impl ReviewVerdict {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReviewVerdict::Justified => "justified",
            ReviewVerdict::Unjustified => "unjustified",
        }
    }

    pub(crate) fn parse(raw: &str) -> Option<Self> {
        match raw {
            "justified" => Some(ReviewVerdict::Justified),
            "unjustified" => Some(ReviewVerdict::Unjustified),
            _ => None,
        }
    }
}

/// A grant in the review queue, with its reason opened for the auditor.
#[derive(Debug, Clone)]
pub struct BreakGlassReview {
    pub grant: BreakGlassGrant,
    pub reason: BreakGlassReason,
    pub verdict: Option<ReviewVerdict>,
    pub reviewed_by: Option<UserId>,
    pub reviewed_at: Option<Timestamp>,
}

/// A response kept for an idempotent request, replayed when the same key comes again.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

// A response body may hold PHI: print only its shape.
impl fmt::Debug for StoredResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "StoredResponse {{ status: {}, body: <{} bytes> }}",
            self.status,
            self.body.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_lower_cased_and_checked() {
        assert_eq!(Username::parse("Dr.Grey_1").unwrap().as_str(), "dr.grey_1");
        assert!(Username::parse("ab").is_err());
        assert!(Username::parse(&"a".repeat(65)).is_err());
        assert!(Username::parse(&"a".repeat(64)).is_ok());
        assert!(Username::parse("a b c").is_err());
        assert!(Username::parse("élodie").is_err());
    }

    #[test]
    fn secrets_redact() {
        let password = Password::new("correct horse battery staple".to_owned());
        assert_eq!(format!("{password:?}"), "Password(<redacted>)");
        assert_eq!(password.to_string(), "<redacted>");
        let token = SessionToken::generate();
        assert_eq!(token.expose().len(), SESSION_TOKEN_LENGTH);
        assert!(!format!("{token:?}").contains(token.expose()));
        let reason = BreakGlassReason::parse("unconscious in the ED").unwrap();
        assert!(!format!("{reason:?}").contains("unconscious"));
        let code = SecondFactorCode::parse("123 456").unwrap();
        assert!(code.is_totp());
        assert!(!format!("{code:?}").contains("123456"));
    }

    #[test]
    fn second_factor_codes_parse() {
        assert!(SecondFactorCode::parse("12345").is_err());
        assert!(SecondFactorCode::parse("12345a").is_err());
        let recovery = SecondFactorCode::parse("ABCDE-FGHIJ-KLMNO-PQRST").unwrap();
        assert!(!recovery.is_totp());
        assert_eq!(recovery.expose(), "abcdefghijklmnopqrst");
        assert!(SecondFactorCode::parse("abcde-fghij-klmno-pqrs1").is_err());
    }

    #[test]
    fn break_glass_reasons_are_bounded() {
        assert!(BreakGlassReason::parse("  ").is_err());
        assert!(BreakGlassReason::parse(&"é".repeat(500)).is_ok());
        assert!(BreakGlassReason::parse(&"é".repeat(501)).is_err());
    }
}
