//! chartlog-store: the event store.
//!
//! One trait, [`EventStore`], over append-only streams of sealed, signed, hash-chained events,
//! and two backends behind it: [`sqlite`] (the embedded default) and [`postgres`]. The
//! [`conformance`] suite states the trait's promises as executable checks, and every backend's
//! tests run all of it.
//!
//! **Invariants:**
//! - events arrive sealed and signed ([`chartlog_crypto::SealedEvent`]); a backend never sees a
//!   data key or plaintext, and never needs one;
//! - an append is atomic and guarded by the stream's expected version and head hash: of racing
//!   writers exactly one wins;
//! - the global log is read in position order and never skips an event that commits late;
//! - stored events are never updated or deleted (the schema refuses it); erasure destroys keys.
//!
//! Deliberately absent: HTTP, domain decisions, anything that decrypts.
#![forbid(unsafe_code)]

pub mod checkpoints;
pub mod conformance;
mod error;
mod event_store;
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "postgres")]
mod group_commit;
mod keys;
pub mod ledger;
mod row;
pub mod snapshots;
mod subscription;
pub mod verify;

#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
pub mod sqlite;

pub use error::StoreError;
pub use event_store::{
    AppendOutcome, EVENTS_PER_APPEND_MAX, EventStore, READ_BATCH_MAX, RecordedEvent, StreamHead,
    check_append_batch,
};
pub use ledger::{
    CommandOutcome, ExecuteOptions, LedgerError, LoadedPatient, PatientLedger, UnreadableEvent,
    open_patient_event,
};
pub use snapshots::{SnapshotStore, StoredSnapshot};
pub use subscription::{SUBSCRIPTION_POLL_INTERVAL, Subscription};
