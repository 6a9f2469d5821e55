use async_trait::async_trait;
use chartlog_crypto::{EventHash, SealedEvent};
use chartlog_domain::StreamId;
use tokio::sync::watch;

use crate::StoreError;

/// The most events one append may carry: enough for any single clinical command, small enough
/// that one append is one short transaction.
pub const EVENTS_PER_APPEND_MAX: usize = 1_000;
/// The most events one read returns.
pub const READ_BATCH_MAX: u32 = 10_000;
const _: () = assert!(EVENTS_PER_APPEND_MAX <= READ_BATCH_MAX as usize);

/// An event as stored: its global position and the sealed event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedEvent {
    /// Position in the global log. Increasing in read order; may have gaps (aborted appends).
    pub position: u64,
    pub event: SealedEvent,
}

/// The last event of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHead {
    pub version: u64,
    pub hash: EventHash,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    /// The stream's version after the append: the version of the batch's last event.
    pub stream_version: u64,
    pub first_position: u64,
    pub last_position: u64,
}

/// Append-only streams of sealed events, and the global log across them.
///
/// Every backend runs [`crate::conformance`]; a new backend is a new implementation of this
/// trait that passes it, and nothing else changes.
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically, if the stream is at `expected_version` (0: the
    /// stream must not exist yet) and its head is the event the batch's first `prev_hash` names.
    ///
    /// Appending a batch whose event ids are all stored already, with the same hashes, returns
    /// the original outcome and stores nothing (a retry after a lost acknowledgement).
    async fn append(
        &self,
        stream: &StreamId,
        expected_version: u64,
        events: &[SealedEvent],
    ) -> Result<AppendOutcome, StoreError>;

    /// The stream's last event, or `None` for a stream with no events.
    async fn stream_head(&self, stream: &StreamId) -> Result<Option<StreamHead>, StoreError>;

    /// Up to `limit` events of `stream` with versions from `from_version` on, in version order.
    /// Fewer than `limit` (capped at [`READ_BATCH_MAX`]) only when the stream ends there:
    /// loaders stop at a short page.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Up to `limit` events of the global log with positions above `after_position`, in
    /// position order. Never returns an event while an event below it may still commit.
    async fn read_all(
        &self,
        after_position: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The highest position in the global log, 0 for an empty log: what a reader starting now
    /// must reach to have seen every event committed so far (appends meanwhile move it on).
    async fn log_head_position(&self) -> Result<u64, StoreError>;

    /// Ticks after appends (in this process, and on PostgreSQL in any process), so subscribers
    /// wake without polling.
    fn append_notifications(&self) -> watch::Receiver<u64>;
}

/// The checks every backend makes before touching the database: a batch is one stream's
/// consecutive, internally chained versions starting right after `expected_version`.
pub fn check_append_batch(
    stream: &StreamId,
    expected_version: u64,
    events: &[SealedEvent],
) -> Result<(), StoreError> {
    let invalid = |reason| StoreError::InvalidAppend {
        stream: stream.clone(),
        reason,
    };
    if events.is_empty() {
        return Err(invalid("an append needs at least one event"));
    }
    if events.len() > EVENTS_PER_APPEND_MAX {
        return Err(invalid(
            "more events than EVENTS_PER_APPEND_MAX in one append",
        ));
    }
    let mut previous: Option<&SealedEvent> = None;
    for (offset, event) in (1u64..).zip(events) {
        let header = &event.header;
        if header.stream_id != *stream {
            return Err(invalid("an event names another stream"));
        }
        if Some(header.stream_version) != expected_version.checked_add(offset) {
            return Err(invalid("event versions do not follow the expected version"));
        }
        if let Some(previous) = previous
            && header.prev_hash != previous.hash
        {
            return Err(invalid("an event does not chain to the one before it"));
        }
        if expected_version == 0 && offset == 1 && header.prev_hash != EventHash::GENESIS {
            return Err(invalid(
                "the first event of a stream must chain to the genesis hash",
            ));
        }
        previous = Some(event);
    }
    Ok(())
}
