//! Randomness: the thread-local CSPRNG of `rand` (ChaCha, seeded and reseeded from the OS).

use rand::Rng as _;
use rand::RngExt as _;

/// Fills `bytes` with random bytes.
pub(crate) fn fill(bytes: &mut [u8]) {
    rand::rng().fill_bytes(bytes);
}

/// `length` characters drawn uniformly from `alphabet`.
pub(crate) fn string_from(alphabet: &[u8], length: usize) -> String {
    assert!(!alphabet.is_empty(), "an alphabet has characters");
    assert!(alphabet.is_ascii(), "an alphabet is ASCII");
    let mut rng = rand::rng();
    (0..length)
        .map(|_| char::from(alphabet[rng.random_range(0..alphabet.len())]))
        .collect()
}
