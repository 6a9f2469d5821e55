//! A backup's plaintext, the JSON lines inside the age layer: read and checked exactly as a
//! restore does (header, every row by table and column kind, event chains and signatures,
//! stream heads, the signed manifest), with a verifier that trusts the fixed test signer.
//! A damaged or hostile backup must be refused with an error.
#![no_main]

use chartlog::backup_format::{hex_decode, read_backup};
use chartlog_fuzz::verifier;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rows = 0usize;
    let verified = read_backup(data, verifier().clone(), |batch| rows += batch.rows.len());
    if verified.is_ok() {
        // A verified backup came from the seeds' writer: it has at least its header's tables.
        assert!(data.ends_with(b"\n"));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = hex_decode(text);
    }
});
