//! SHA-256 over a stream of bytes, for fingerprints of whole files and logs (a backup's
//! content, the root hash over a log's event hashes).

use sha2::{Digest as _, Sha256};

/// A running SHA-256: feed it parts in order, then [`ContentDigest::finish`].
#[derive(Clone, Default)]
pub struct ContentDigest(Sha256);

impl ContentDigest {
    /// An empty digest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The SHA-256 of everything appended.
    pub fn finish(self) -> [u8; 32] {
        self.0.finalize().into()
    }
}

impl std::fmt::Debug for ContentDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ContentDigest")
    }
}
