//! chartlog-domain: the clinical model of chartlog.
//!
//! Ids, PHI newtypes, the commands a clinic sends, the events they become, and the patient
//! aggregate as two pure functions, `decide` and `evolve`.
//!
//! **Invariants:** no I/O, no async, no clock, no randomness, no crypto. Everything here is
//! deterministic: the caller passes the time and the ids in. PHI values never print: their
//! `Debug` and `Display` redact.
#![forbid(unsafe_code)]

pub mod actor;
pub mod ids;
pub mod stream;
pub mod time;

pub use actor::{Actor, PurposeOfUse, Role};
pub use ids::*;
pub use stream::StreamId;
pub use time::Timestamp;
