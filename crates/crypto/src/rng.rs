//! The one source of randomness: the thread-local CSPRNG of `rand`, seeded from the OS.

use rand::Rng as _;

/// Fills `dst` with cryptographically secure random bytes.
pub(crate) fn fill(dst: &mut [u8]) {
    rand::rng().fill_bytes(dst);
}

/// `N` cryptographically secure random bytes (for nonces and ids; secrets are filled in place).
pub(crate) fn array<const N: usize>() -> [u8; N] {
    let mut bytes = [0; N];
    fill(&mut bytes);
    bytes
}
