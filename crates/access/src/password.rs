//! Passwords: the NIST SP 800-63B policy (length, common list, not the username), argon2id
//! hashing, and one-time passwords.
//!
//! The common-password list is `data/common-passwords.txt`: the 30,000 most frequent passwords
//! of the `zxcvbn` crate 3.1.1 (`src/frequency_lists.rs`, MIT, Copyright (c) 2016 Joshua
//! Holmer, from Dan Wheeler's zxcvbn); see `data/README.md`.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock};

use argon2::password_hash::phc::PasswordHash;
use argon2::{Algorithm, Argon2, PasswordHasher as _, PasswordVerifier as _, Version};
use chartlog_domain::Role;

use crate::error::{AccessError, PasswordChangeError};
use crate::settings::{AccessSettings, PasswordHashing};
use crate::types::{OneTimePassword, Password, Username};

static COMMON_PASSWORDS_TEXT: &str = include_str!("../data/common-passwords.txt");
/// Entries the shipped list has at least.
pub const COMMON_PASSWORDS_MIN: usize = 10_000;

static COMMON_PASSWORDS: LazyLock<HashSet<&'static str>> = LazyLock::new(|| {
    let set: HashSet<&'static str> = COMMON_PASSWORDS_TEXT
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    assert!(
        set.len() >= COMMON_PASSWORDS_MIN,
        "the common-password list has at least {COMMON_PASSWORDS_MIN} entries"
    );
    set
});

/// Whether `password` (compared lower-cased) is on the shipped common-password list.
pub fn is_common_password(password: &str) -> bool {
    COMMON_PASSWORDS.contains(password.to_lowercase().as_str())
}

/// Longest password hashed or verified, in bytes: four bytes per character of the longest
/// allowed password (see [`crate::AccessSettings::password_length_max`]).
pub const PASSWORD_BYTES_MAX: usize = 4 * PASSWORD_LENGTH_MAX_CEILING;
/// The longest `password_length_max` setting accepted.
pub const PASSWORD_LENGTH_MAX_CEILING: usize = 1024;

/// Characters of a one-time password.
pub const ONE_TIME_PASSWORD_LENGTH: usize = 24;
const _: () = assert!(ONE_TIME_PASSWORD_LENGTH >= 20);
/// Letters and digits without the look-alikes 0/O, 1/l/I: 24 of them carry about 141 bits.
const ONE_TIME_PASSWORD_ALPHABET: &[u8] =
    b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";

pub(crate) fn generate_one_time_password() -> OneTimePassword {
    OneTimePassword::new(crate::random::string_from(
        ONE_TIME_PASSWORD_ALPHABET,
        ONE_TIME_PASSWORD_LENGTH,
    ))
}

/// The checks that need no stored hash, in the order they are reported: length, then the
/// common list, then the username.
pub(crate) fn check_policy(
    settings: &AccessSettings,
    role: Role,
    username: &Username,
    password: &Password,
) -> Result<(), PasswordChangeError> {
    let length = password.expose().chars().count();
    let length_min = settings.password_length_min(role);
    if length < length_min {
        return Err(PasswordChangeError::TooShort { length_min });
    }
    if length > settings.password_length_max {
        return Err(PasswordChangeError::TooLong {
            length_max: settings.password_length_max,
        });
    }
    if is_common_password(password.expose()) {
        return Err(PasswordChangeError::Common);
    }
    if password.expose().to_lowercase().contains(username.as_str()) {
        return Err(PasswordChangeError::ContainsUsername);
    }
    Ok(())
}

/// Hashes `password` with argon2id and a fresh salt into a PHC string. CPU- and memory-heavy:
/// call it on a blocking thread ([`hash_blocking`]).
fn hash(cost: PasswordHashing, password: &str) -> Result<String, AccessError> {
    let params = cost
        .params()
        .map_err(|error| AccessError::Hashing(error.to_string()))?;
    let hash = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password(password.as_bytes())
        .map_err(|error| AccessError::Hashing(error.to_string()))?;
    Ok(hash.to_string())
}

/// Whether `password` matches the PHC string `stored` (with the parameters it names).
fn verify(password: &str, stored: &str) -> Result<bool, AccessError> {
    let parsed = PasswordHash::new(stored).map_err(|_| AccessError::Corrupt("password hash"))?;
    match Argon2::default().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::PasswordInvalid) => Ok(false),
        Err(error) => Err(AccessError::Hashing(error.to_string())),
    }
}

/// Fewest argon2 computations allowed at once, whatever the machine reports.
const ARGON2_CONCURRENT_MIN: usize = 2;

/// Permits for argon2 computations: one per core the process may use, at least
/// [`ARGON2_CONCURRENT_MIN`]. Each computation holds its memory cost (19 MiB by default) for
/// tens of milliseconds; without a bound a burst of logins would each take a blocking thread
/// (512 of them in tokio's pool) and its memory at once, and more at once than there are cores
/// finish no sooner. The rest wait their turn holding nothing but their request.
static ARGON2_PERMITS: LazyLock<Arc<tokio::sync::Semaphore>> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    Arc::new(tokio::sync::Semaphore::new(
        cores.max(ARGON2_CONCURRENT_MIN),
    ))
});

/// Runs `work` (argon2) on tokio's blocking pool once a permit is free. The permit moves into
/// the blocking task: if the caller goes away, the computation already started still counts
/// until it ends.
async fn argon2_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, AccessError> + Send + 'static,
) -> Result<T, AccessError> {
    let permit = Arc::clone(&ARGON2_PERMITS)
        .acquire_owned()
        .await
        .map_err(|_| AccessError::Hashing("the argon2 permits are closed".to_owned()))?;
    tokio::task::spawn_blocking(move || {
        let _permit = permit;
        work()
    })
    .await
    .expect("argon2 does not panic")
}

/// [`hash`] on tokio's blocking pool, at most [`ARGON2_PERMITS`] at once.
pub(crate) async fn hash_blocking(
    cost: PasswordHashing,
    password: &Password,
) -> Result<String, AccessError> {
    let password = zeroize::Zeroizing::new(password.expose().to_owned());
    argon2_blocking(move || hash(cost, &password)).await
}

/// Whether `password` matches any of `stored` (tried in order, stopping at the first match),
/// on tokio's blocking pool, at most [`ARGON2_PERMITS`] at once. A password longer than [`PASSWORD_BYTES_MAX`] matches nothing
/// and is not hashed: no password the policy allows is that long, and hashing megabytes
/// would let a caller spend the server's CPU.
pub(crate) async fn verify_any_blocking(
    password: &Password,
    stored: Vec<String>,
) -> Result<bool, AccessError> {
    if password.expose().len() > PASSWORD_BYTES_MAX {
        return Ok(false);
    }
    let password = zeroize::Zeroizing::new(password.expose().to_owned());
    argon2_blocking(move || {
        for hash in &stored {
            if verify(&password, hash)? {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cheap() -> PasswordHashing {
        PasswordHashing {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[test]
    fn the_common_list_is_loaded_and_case_blind() {
        assert!(COMMON_PASSWORDS.len() >= COMMON_PASSWORDS_MIN);
        assert!(is_common_password("password"));
        assert!(is_common_password("PassWord1"));
        assert!(is_common_password("qwertyuiop"));
        assert!(!is_common_password("violet tractor moonlight 42"));
    }

    #[test]
    fn hashes_are_argon2id_and_verify() {
        let stored = hash(cheap(), "violet tractor").unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=64,t=1,p=1$"));
        assert!(verify("violet tractor", &stored).unwrap());
        assert!(!verify("violet tractor!", &stored).unwrap());
        assert_ne!(stored, hash(cheap(), "violet tractor").unwrap(), "salted");
        assert!(verify("x", "not a hash").is_err());
    }

    #[test]
    fn the_default_cost_is_owasp() {
        let stored = hash(PasswordHashing::default(), "violet tractor").unwrap();
        assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
    }

    #[test]
    fn one_time_passwords_are_long_and_random() {
        let one = generate_one_time_password();
        let two = generate_one_time_password();
        assert_eq!(one.expose().chars().count(), ONE_TIME_PASSWORD_LENGTH);
        assert_ne!(one.expose(), two.expose());
    }
}
