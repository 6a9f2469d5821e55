use chartlog_domain::{EventId, StreamId};

/// Why the store refused or failed an operation. Messages carry ids and versions, never PHI:
/// the store holds none in the clear.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency: another writer appended first.
    #[error("stream {stream} is at version {actual}, not the expected version {expected}")]
    Conflict {
        stream: StreamId,
        expected: u64,
        actual: u64,
    },

    /// The stream is at the expected version but its head is a different event than the one the
    /// batch chains to: the writer built on a history that is not the stored one.
    #[error("stream {stream} head at version {version} is not the event the batch chains to")]
    ChainMismatch { stream: StreamId, version: u64 },

    /// An event id is stored already with another body (the idempotency key was reused).
    #[error("event {event_id} is already stored with a different body")]
    IdempotencyConflict { event_id: EventId },

    /// The batch itself is malformed (a bug in the writer, not a race).
    #[error("append to stream {stream} refused: {reason}")]
    InvalidAppend {
        stream: StreamId,
        reason: &'static str,
    },

    /// A stored row does not decode into a well-formed event.
    #[error("stored event at position {position} is malformed: {reason}")]
    Corrupt { position: u64, reason: String },

    /// A stored snapshot row does not decode (the snapshot is ignored, never trusted).
    #[error("snapshot of stream {stream} is malformed: {reason}")]
    CorruptSnapshot { stream: StreamId, reason: String },

    #[error("database error")]
    Database(#[from] sqlx::Error),

    /// A read of the event log on the embedded backend's own read connections failed.
    #[error("reading the event log failed: {reason}")]
    ReadLog { reason: String },

    #[error("database migration failed")]
    Migration(#[from] sqlx::migrate::MigrateError),
}
