//! The access policy's numbers, with the defaults chartlog ships.

use std::time::Duration;

use chartlog_domain::Role;

/// NIST SP 800-63B 5.1.1.2: verifiers shall permit passwords of at least 64 characters.
pub const PASSWORD_LENGTH_MAX_FLOOR: usize = 64;
/// NIST SP 800-63B 5.1.1.2: memorized secrets are at least 8 characters.
pub const PASSWORD_LENGTH_MIN_FLOOR: usize = 8;
/// Passwords the user chose kept per account (the current one included), as hashes; a new
/// password may be none of them. One-time passwords are not kept, so a reset pushes none out.
pub const PASSWORD_HISTORY_GENERATIONS: usize = 5;
/// Failed logins of one account name within [`LOGIN_FAILURE_WINDOW`] before it is throttled.
pub const LOGIN_FAILURES_PER_ACCOUNT_MAX: usize = 5;
/// Failed logins from one client address (an IPv6 /64) within the window before it is throttled.
pub const LOGIN_FAILURES_PER_ADDRESS_MAX: usize = 20;
/// The window failed logins are counted in.
pub const LOGIN_FAILURE_WINDOW: Duration = Duration::from_secs(15 * 60);
const _: () = assert!(LOGIN_FAILURES_PER_ACCOUNT_MAX < LOGIN_FAILURES_PER_ADDRESS_MAX);
/// An attempt whose password is still being checked counts against the limits as a failure
/// would, but only for this long after it began: past it, its row counts as a failure (a
/// server that stopped mid-check leaves a failure behind, never a row that holds the limit
/// without end).
pub const LOGIN_ATTEMPT_IN_FLIGHT_MAX: Duration = Duration::from_secs(60);
const _: () = assert!(LOGIN_ATTEMPT_IN_FLIGHT_MAX.as_secs() < LOGIN_FAILURE_WINDOW.as_secs());
/// The wait asked of an attempt refused only because the limit's worth of attempts for its
/// account or address are still being checked, not because of failures: a second or so, when
/// those will have succeeded (and left nothing counted) or failed.
pub const LOGIN_IN_FLIGHT_RETRY_AFTER_SECONDS: u64 = 1;

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

    /// Checks the settings against the policy's floors and against each other. They are the
    /// operator's configuration: a caller turns the error into a message naming its own
    /// flags or keys.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let broken = |rule| Err(SettingsError::Rule(rule));
        if self.password_length_min_with_second_factor < PASSWORD_LENGTH_MIN_FLOOR {
            return broken("the shortest password is below the floor of NIST SP 800-63B");
        }
        if self.password_length_min_password_only < self.password_length_min_with_second_factor {
            return Err(SettingsError::PasswordAloneShorterThanWithSecondFactor {
                password_only: self.password_length_min_password_only,
                with_second_factor: self.password_length_min_with_second_factor,
            });
        }
        if self.password_length_max < PASSWORD_LENGTH_MAX_FLOOR {
            return broken("the longest password allowed is below the floor of NIST SP 800-63B");
        }
        if self.password_length_max > crate::password::PASSWORD_LENGTH_MAX_CEILING {
            return broken("the longest password allowed is above the ceiling");
        }
        if self.password_length_max < self.password_length_min_password_only {
            return broken("the longest password is shorter than the shortest");
        }
        if self.idle_timeout.is_zero() {
            return broken("an idle timeout is positive");
        }
        if self.absolute_lifetime < self.idle_timeout {
            return Err(SettingsError::IdleTimeoutLongerThanLifetime {
                idle_timeout: self.idle_timeout,
                absolute_lifetime: self.absolute_lifetime,
            });
        }
        if self.break_glass_duration.is_zero() {
            return broken("a break-glass grant lasts a while");
        }
        if self.inactivity_deactivation.is_zero() {
            return broken("the inactivity period is positive");
        }
        if self.idempotency_retention.is_zero() {
            return broken("idempotency records are kept a while");
        }
        if self.password_hashing.params().is_err() {
            return broken("argon2 parameters are within argon2's limits");
        }
        Ok(())
    }

    /// Panics on settings [`AccessSettings::validate`] refuses: a program that builds
    /// accounts from settings it did not validate has a bug.
    pub(crate) fn assert_valid(&self) {
        if let Err(error) = self.validate() {
            panic!("invalid access settings: {error}");
        }
    }
}

/// Access settings that break the policy's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    /// A session would end by its absolute lifetime before it could ever go idle.
    #[error(
        "the idle timeout ({} min) is longer than the session lifetime ({} min)",
        .idle_timeout.as_secs() / 60,
        .absolute_lifetime.as_secs() / 60
    )]
    IdleTimeoutLongerThanLifetime {
        idle_timeout: Duration,
        absolute_lifetime: Duration,
    },
    /// A second factor lets a password be shorter, never longer.
    #[error(
        "the shortest password without a second factor ({password_only}) is shorter than with \
         one ({with_second_factor})"
    )]
    PasswordAloneShorterThanWithSecondFactor {
        password_only: usize,
        with_second_factor: usize,
    },
    /// Another rule, in words.
    #[error("{0}")]
    Rule(&'static str),
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
