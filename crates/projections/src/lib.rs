//! chartlog-projections: the projection runner and the read models it folds the log into.
//!
//! A [`Projection`] is a named, versioned fold over the global log. The [`ProjectionRunner`]
//! feeds it verified, opened events in position order and commits its rows together with its
//! checkpoint, so after any crash each event has taken effect exactly once. Read models:
//! [`chart`] (current state per patient), [`history`] (who changed what, when).
//!
//! **Invariants:**
//! - a read model's rows and its checkpoint change in one transaction; a checkpoint only moves
//!   forward, by compare-and-swap, so two runners never both apply a batch;
//! - PHI never rests in plaintext in a table written here: it is sealed under the patient's
//!   data key ([`chartlog_crypto::seal_record`]), and look-ups by identifier go through keyed
//!   blind indexes; erasing a patient (the tombstone) deletes the patient's rows by primary key;
//! - a patient whose data key is destroyed reaches projections header-only ([`EventBody::Erased`]),
//!   never as an error that stops the runner; a rebuild from position 0 and the live run give
//!   the same rows;
//! - events are verified (hash and signature) before any projection sees them; a forged or
//!   tampered event stops the runner;
//! - memory is bounded whatever the length of the log (see [`RunnerOptions`]);
//! - one SQL text per statement serves both backends ([`db`]: `$n` placeholders in first-use
//!   order over an enum of the store's own pools).
//!
//! Deliberately absent: HTTP, access decisions, anything that writes the event log.
#![forbid(unsafe_code)]

pub mod audit;
pub mod audit_log;
pub mod audit_queries;
pub mod chart;
pub mod db;
pub mod deid;
mod entries;
mod error;
pub mod forgets;
pub mod history;
pub mod runner;

/// The attribute [`Projection`] implementations use (re-exported so they need not depend on it).
pub use async_trait::async_trait;
pub use entries::EntryKind;
pub use error::ProjectionError;
pub use runner::{
    EventBody, PATIENT_ERASED_EVENT_TYPE, ProjectedEvent, Projection, ProjectionRunner,
    RunnerOptions, STANDBY_RETRY_INTERVAL, WAIT_FOR_POSITION_MAX, checkpoint, wait_for_position,
};
