//! The second factor: TOTP (RFC 6238: HMAC-SHA1, 6 digits, 30-second steps, one step of skew
//! either way) and single-use recovery codes.

use sha2::{Digest as _, Sha256};
use totp_rs::{Algorithm, Builder, Secret, Totp};
use zeroize::Zeroizing;

use crate::error::AccessError;
use crate::types::{
    RECOVERY_CODE_ALPHABET, RECOVERY_CODE_LENGTH, RECOVERY_CODES_PER_ENROLLMENT, RecoveryCodes,
    SecondFactorCode,
};

/// Bytes of a TOTP secret: 160 bits, as RFC 4226 recommends.
pub const TOTP_SECRET_BYTES: usize = 20;
/// Seconds per TOTP step.
pub const TOTP_STEP_SECONDS: u64 = 30;
/// Steps of clock skew accepted either way.
pub const TOTP_SKEW_STEPS: u16 = 1;
/// The issuer shown by authenticator apps.
pub const TOTP_ISSUER: &str = "chartlog";

pub(crate) fn generate_secret() -> Zeroizing<Vec<u8>> {
    let mut secret = Zeroizing::new(vec![0u8; TOTP_SECRET_BYTES]);
    crate::random::fill(&mut secret);
    secret
}

pub(crate) fn totp(secret: &[u8], account_name: &str) -> Result<Totp, AccessError> {
    Builder::new()
        .with_algorithm(Algorithm::SHA1)
        .with_digits(6)
        .with_step_duration(TOTP_STEP_SECONDS)
        .with_skew(TOTP_SKEW_STEPS)
        .with_secret(Secret::from(secret.to_vec()))
        .with_issuer(Some(TOTP_ISSUER))
        .with_account_name(account_name)
        .build()
        .map_err(|_| AccessError::Corrupt("TOTP secret"))
}

/// The time step `code` matches at `unix_seconds` (within the skew), if any. Recovery codes
/// never match.
pub(crate) fn matching_step(
    totp: &Totp,
    code: &SecondFactorCode,
    unix_seconds: u64,
) -> Option<u64> {
    if !code.is_totp() {
        return None;
    }
    totp.check(code.expose(), unix_seconds)
}

/// Ten fresh recovery codes, and the digests to store.
pub(crate) fn generate_recovery_codes() -> (RecoveryCodes, Vec<[u8; 32]>) {
    let mut shown = Vec::with_capacity(RECOVERY_CODES_PER_ENROLLMENT);
    let mut digests = Vec::with_capacity(RECOVERY_CODES_PER_ENROLLMENT);
    for _ in 0..RECOVERY_CODES_PER_ENROLLMENT {
        let code = Zeroizing::new(crate::random::string_from(
            RECOVERY_CODE_ALPHABET,
            RECOVERY_CODE_LENGTH,
        ));
        digests.push(recovery_code_digest(&code));
        let groups: Vec<&str> = (0..RECOVERY_CODE_LENGTH)
            .step_by(5)
            .map(|start| &code[start..start + 5])
            .collect();
        shown.push(groups.join("-"));
    }
    (RecoveryCodes::new(shown), digests)
}

/// SHA-256 of a normalized recovery code. The codes carry 100 random bits, so a fast hash is
/// enough: no guessing of the preimage is feasible.
pub(crate) fn recovery_code_digest(normalized: &str) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"chartlog-access/recovery-code/v1\0");
    hasher.update(normalized.as_bytes());
    hasher.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_within_one_step_of_skew() {
        let secret = generate_secret();
        let totp = totp(&secret, "alice").unwrap();
        let at = 1_763_000_000u64;
        let code = SecondFactorCode::parse(&totp.generate(at).to_string()).unwrap();
        let step = at / TOTP_STEP_SECONDS;
        assert_eq!(matching_step(&totp, &code, at), Some(step));
        assert_eq!(matching_step(&totp, &code, at + 30), Some(step));
        assert_eq!(matching_step(&totp, &code, at - 30), Some(step));
        assert_eq!(matching_step(&totp, &code, at + 90), None);
    }

    #[test]
    fn recovery_codes_parse_back_to_their_digest() {
        let (codes, digests) = generate_recovery_codes();
        assert_eq!(codes.expose().len(), 10);
        for (shown, digest) in codes.expose().iter().zip(&digests) {
            let parsed = SecondFactorCode::parse(shown).unwrap();
            assert!(!parsed.is_totp());
            assert_eq!(recovery_code_digest(parsed.expose()), *digest);
        }
    }
}
