use chartlog_crypto::{IntegrityError, KeyError};
use chartlog_domain::{EventId, StreamId};
use chartlog_store::StoreError;

/// Why a projection run, a rebuild or a read-model query failed. Messages name projections,
/// positions, streams and ids, never PHI. Every variant is a fault (5xx), not the caller's to
/// fix; an erased patient is never an error here (events come through header-only, queries
/// answer "erased").
#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("event store")]
    Store(#[from] StoreError),

    #[error("read-model database")]
    Database(#[from] sqlx::Error),

    /// A stored event fails its hash or signature check: the log was tampered with, so the
    /// runner stops rather than fold forged events into a chart.
    #[error("event at position {position} fails verification")]
    Integrity {
        position: u64,
        #[source]
        source: IntegrityError,
    },

    #[error("event {event_id} at position {position} is unreadable")]
    Unreadable {
        position: u64,
        event_id: EventId,
        #[source]
        source: chartlog_store::UnreadableEvent,
    },

    /// An audit event (see `crate::audit_log`) that does not open or decode.
    #[error("audit event {event_id} at position {position} is unreadable: {reason}")]
    UnreadableAudit {
        position: u64,
        event_id: EventId,
        reason: &'static str,
    },

    /// The data key of a stream could not be read (a fault of the key table, or a patient
    /// stream without a key); an erased key is not an error.
    #[error("data key of {stream} unavailable")]
    Key {
        stream: StreamId,
        #[source]
        source: KeyError,
    },

    /// A sealed read-model row does not open, or holds something other than what was written.
    #[error("read-model row {table} of patient {patient_id} is malformed: {reason}")]
    MalformedRow {
        table: &'static str,
        patient_id: uuid::Uuid,
        reason: &'static str,
    },

    /// The events a chart read folds itself (the read model trails the record) could not be
    /// read, verified or opened.
    #[error("the newest events of patient {patient_id} could not be read")]
    Tail {
        patient_id: uuid::Uuid,
        #[source]
        source: Box<chartlog_store::LedgerError>,
    },

    /// Another runner moved this projection's checkpoint: the batch is rolled back, so no
    /// event takes effect twice.
    #[error("checkpoint of projection {name} moved from {expected} under this runner")]
    CheckpointMoved { name: &'static str, expected: u64 },

    /// The dedicated connection that holds this runner's advisory locks dropped: another
    /// process may take over, so this one stands down.
    #[error("projection lock connection lost")]
    LockLost,

    /// A rebuild was asked for a projection another process holds the lock of.
    #[error("projection {name} is running in another process")]
    RunningElsewhere { name: &'static str },

    #[error("no projection named {name:?}")]
    UnknownProjection { name: String },

    #[error("projection {name} reached position {reached}, not {wanted}, within the wait")]
    WaitTimedOut {
        name: String,
        wanted: u64,
        reached: u64,
    },

    /// A blocking open-and-verify task panicked or was cancelled (a bug).
    #[error("open-and-verify worker failed")]
    Worker(#[source] tokio::task::JoinError),
}
