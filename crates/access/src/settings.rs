//! The access policy's numbers, with the defaults chartlog ships.

use std::time::Duration;

use chartlog_domain::Role;

/// NIST SP 800-63B 5.1.1.2: verifiers shall permit passwords of at least 64 characters.
pub const PASSWORD_LENGTH_MAX_FLOOR: usize = 64;
/// NIST SP 800-63B 5.1.1.2: memorized secrets are at least 8 characters.
pub const PASSWORD_LENGTH_MIN_FLOOR: usize = 8;
/// Password hashes kept per account (the current one included); a new password may be none
/// of them.
pub const PASSWORD_HISTORY_GENERATIONS: usize = 5;
/// Failed logins of one account name within [`LOGIN_FAILURE_WINDOW`] before it is throttled.
pub const LOGIN_FAILURES_PER_ACCOUNT_MAX: usize = 5;
/// Failed logins from one client address (an IPv6 /64) within the window before it is throttled.
pub const LOGIN_FAILURES_PER_ADDRESS_MAX: usize = 20;
/// The window failed logins are counted in.
pub const LOGIN_FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
const _: () = assert!(LOGIN_FAILURES_PER_ACCOUNT_MAX < LOGIN_FAILURES_PER_ADDRESS_MAX);

/// The access policy. [`AccessSettings::default`] is what chartlog ships: HIPAA automatic
/// logoff after 10 idle minutes, NIST SP 800-63B password lengths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessSettings {
    /// Shortest password for an account whose role needs no second factor (15).
    pub password_length_min_password_only: usize,
    /// Shortest password for an account whose role needs a second factor (8).
    pub password_length_min_with_second_factor: usize,
    /// Longest password (128); at least 64.
    pub password_length_max: usize,
    /// Roles that must enroll a second factor: those that read PHI.
    pub second_factor_required_for: Vec<Role>,
    /// A session ends after this long without a request (10 minutes).
    pub idle_timeout: Duration,
    /// A session ends this long after login, however active (12 hours).
    pub absolute_lifetime: Duration,
    /// Accounts with no login for this long are disabled by
    /// [`crate::Accounts::deactivate_inactive`] (90 days).
    pub inactivity_deactivation: Duration,
    /// How long a break-glass grant lasts (60 minutes).
    pub break_glass_duration: Duration,
    /// How long a response is kept for replay under its idempotency key (24 hours).
    pub idempotency_retention: Duration,
    /// The argon2id cost of new password hashes.
    pub password_hashing: PasswordHashing,
}

impl Default for AccessSettings {
    fn default() -> Self {
        Self {
            password_length_min_password_only: 15,
            password_length_min_with_second_factor: 8,
            password_length_max: 128,
            second_factor_required_for: vec![
                Role::Physician,
                Role::Nurse,
                Role::Radiologist,
                Role::LabTechnician,
                Role::Patient,
            ],
            idle_timeout: Duration::from_secs(10 * 60),
            absolute_lifetime: Duration::from_secs(12 * 60 * 60),
            inactivity_deactivation: Duration::from_secs(90 * 24 * 60 * 60),
            break_glass_duration: Duration::from_secs(60 * 60),
            idempotency_retention: Duration::from_secs(24 * 60 * 60),
            password_hashing: PasswordHashing::default(),
        }
    }
}

impl AccessSettings {
    /// Whether accounts of `role` must enroll a second factor.
    pub fn second_factor_required(&self, role: Role) -> bool {
        self.second_factor_required_for.contains(&role)
    }

    /// The shortest password an account of `role` may choose.
    pub fn password_length_min(&self, role: Role) -> usize {
        if self.second_factor_required(role) {
            self.password_length_min_with_second_factor
        } else {
            self.password_length_min_password_only
        }
    }

    /// Panics on settings that break the policy's floors: they are the operator's
    /// configuration, checked once at start.
    pub(crate) fn assert_valid(&self) {
        assert!(
            self.password_length_min_with_second_factor >= PASSWORD_LENGTH_MIN_FLOOR,
            "passwords have at least {PASSWORD_LENGTH_MIN_FLOOR} characters"
        );
        assert!(
            self.password_length_min_password_only >= self.password_length_min_with_second_factor,
            "a password alone is at least as long as one with a second factor"
        );
        assert!(
            self.password_length_max >= PASSWORD_LENGTH_MAX_FLOOR,
            "passwords of {PASSWORD_LENGTH_MAX_FLOOR} characters are allowed"
        );
        assert!(
            self.password_length_max <= crate::password::PASSWORD_LENGTH_MAX_CEILING,
            "passwords are at most {} characters",
            crate::password::PASSWORD_LENGTH_MAX_CEILING
        );
        assert!(
            self.password_length_max >= self.password_length_min_password_only,
            "the longest password is at least the shortest"
        );
        assert!(!self.idle_timeout.is_zero(), "an idle timeout is positive");
        assert!(
            self.absolute_lifetime >= self.idle_timeout,
            "the absolute lifetime is at least the idle timeout"
        );
        assert!(
            !self.break_glass_duration.is_zero(),
            "a break-glass grant lasts a while"
        );
        assert!(
            !self.inactivity_deactivation.is_zero(),
            "the inactivity period is positive"
        );
        assert!(
            !self.idempotency_retention.is_zero(),
            "idempotency records are kept a while"
        );
        self.password_hashing
            .params()
            .expect("argon2 parameters within argon2's limits");
    }
}

/// The argon2id cost of new password hashes. Stored hashes carry their own parameters, so
/// raising the cost leaves old hashes verifiable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PasswordHashing {
    /// Memory in KiB (19,456: 19 MiB).
    pub memory_kib: u32,
    /// Passes over the memory (2).
    pub iterations: u32,
    /// Lanes (1).
    pub parallelism: u32,
}

impl Default for PasswordHashing {
    /// OWASP's password storage recommendation for argon2id: m = 19 MiB, t = 2, p = 1.
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

impl PasswordHashing {
    pub(crate) fn params(&self) -> Result<argon2::Params, argon2::Error> {
        argon2::Params::new(self.memory_kib, self.iterations, self.parallelism, None)
    }
}
