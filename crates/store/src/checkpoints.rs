//! Signed checkpoints over the global log.
//!
//! Each stream's hash chain catches a changed, deleted or reordered event within that stream;
//! it cannot see events of different streams swapped in the global order, or a stream and its
//! head row cut back together. A checkpoint closes that gap: an event on the stream
//! [`LOG_CHECKPOINT_STREAM`] carrying a rolling digest over `(position, event hash)` of every
//! event of the global log up to a position, signed like every event. `verify` recomputes the
//! digest as it pages through the log and compares it at each checkpoint.
//!
//! **Invariant:** a checkpoint's payload holds positions, counts and a digest, nothing else, and
//! is stored in the clear (its signature covers it): verification needs no data key.

use std::collections::VecDeque;
use std::sync::Arc;

use chartlog_crypto::{
    DataKeyId, EventHash, EventHeader, EventSigner, SealedEvent, SignatureVerifier,
};
use chartlog_domain::{Actor, EventId, PurposeOfUse, Role, StreamId, Timestamp, UserId};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::{EventStore, StoreError, StreamHead};

/// The stream checkpoints are appended to.
pub const LOG_CHECKPOINT_STREAM: &str = "log-checkpoints";
/// The checkpoint event's type.
pub const LOG_CHECKPOINT_EVENT_TYPE: &str = "log_checkpoint";
/// The payload's schema version.
pub const LOG_CHECKPOINT_SCHEMA_VERSION: u32 = 1;
/// How far (in events) behind its own position a checkpoint's covered position may be and
/// still be checked: the writer reads the head and appends right after, so only events
/// committed in between separate them. Bounds verify's memory.
pub const CHECKPOINT_LAG_EVENTS_MAX: usize = 65_536;
/// Events read per page.
const PAGE_EVENTS: u32 = 1_000;
/// The header's key id: the payload is not sealed, so it names no data key.
const NO_DATA_KEY: DataKeyId = DataKeyId::from_uuid(Uuid::nil());
/// The header's actor: chartlog itself.
const CHECKPOINT_WRITER: UserId = UserId::from_uuid(Uuid::from_u128(0xc4ec));

/// The rolling digest of the global log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogDigest([u8; 32]);

impl LogDigest {
    /// The digest of the empty log.
    pub const START: LogDigest = LogDigest([0; 32]);

    /// The digest after one more event.
    pub fn then(self, position: u64, hash: &EventHash) -> LogDigest {
        let mut hasher = Sha256::new();
        hasher.update(b"chartlog-log-digest/v1\0");
        hasher.update(self.0);
        hasher.update(position.to_be_bytes());
        hasher.update(hash.as_bytes());
        LogDigest(hasher.finalize().into())
    }

    /// Lowercase hex, as checkpoints and `verify` print it.
    pub fn to_hex(self) -> String {
        self.0.iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// The digest [`LogDigest::to_hex`] printed; `None` for anything else.
    pub fn from_hex(raw: &str) -> Option<LogDigest> {
        parse_hex(raw)
    }
}

/// The latest point of the log a signed checkpoint vouches for: the position it covers and
/// the digest through it. Written down outside the database, it is what a later verify can be
/// held to, since a log cut back together with its checkpoints looks whole from inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogAnchor {
    pub position: u64,
    pub digest: LogDigest,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointPayload {
    /// The last position the digest covers.
    position: u64,
    /// Events covered.
    events: u64,
    /// Hex of the rolling digest through `position`.
    digest: String,
}

fn checkpoint_stream() -> StreamId {
    StreamId::parse(LOG_CHECKPOINT_STREAM).expect("a valid stream id")
}

/// Appends checkpoints; keeps the digest of what it has covered so each run reads only the
/// events since the last one.
pub struct LogCheckpointer<S: EventStore + ?Sized> {
    store: Arc<S>,
    signer: Arc<EventSigner>,
    position: u64,
    events: u64,
    digest: LogDigest,
    head: Option<StreamHead>,
}

impl<S: EventStore + ?Sized> LogCheckpointer<S> {
    /// Picks up from the last checkpoint in the store (or the start of the log).
    pub async fn resume(store: Arc<S>, signer: Arc<EventSigner>) -> Result<Self, StoreError> {
        let stream = checkpoint_stream();
        let head = store.stream_head(&stream).await?;
        let mut checkpointer = Self {
            store,
            signer,
            position: 0,
            events: 0,
            digest: LogDigest::START,
            head,
        };
        if let Some(head) = head {
            let last = checkpointer
                .store
                .read_stream(&stream, head.version, 1)
                .await?;
            if let Some(payload) = last.first().and_then(|event| payload_of(&event.event))
                && let Some(digest) = parse_hex(&payload.digest)
            {
                checkpointer.position = payload.position;
                checkpointer.events = payload.events;
                checkpointer.digest = digest;
            }
        }
        Ok(checkpointer)
    }

    /// Folds the events appended since the last checkpoint and, if there are any, appends a
    /// new checkpoint. Returns the position covered when one was written.
    pub async fn checkpoint(&mut self, now: Timestamp) -> Result<Option<u64>, StoreError> {
        let (mut position, mut events, mut digest) = (self.position, self.events, self.digest);
        // Only checkpoints since the last one: nothing to vouch for (an idle server would
        // otherwise checkpoint its own checkpoints forever).
        let mut substantive = false;
        loop {
            let page = self.store.read_all(position, PAGE_EVENTS).await?;
            let Some(last) = page.last().map(|event| event.position) else {
                break;
            };
            for recorded in &page {
                digest = digest.then(recorded.position, &recorded.event.hash);
                events += 1;
                substantive |= recorded.event.header.stream_id.as_str() != LOG_CHECKPOINT_STREAM;
            }
            position = last;
        }
        if !substantive {
            (self.position, self.events, self.digest) = (position, events, digest);
            return Ok(None);
        }
        let stream = checkpoint_stream();
        let (version, prev_hash) = self
            .head
            .map_or((0, EventHash::GENESIS), |head| (head.version, head.hash));
        let payload = serde_json::to_vec(&CheckpointPayload {
            position,
            events,
            digest: digest.to_hex(),
        })
        .expect("a checkpoint payload serializes");
        let header = EventHeader {
            stream_id: stream.clone(),
            stream_version: version + 1,
            event_id: EventId::from_uuid(Uuid::now_v7()),
            event_type: LOG_CHECKPOINT_EVENT_TYPE.to_owned(),
            schema_version: LOG_CHECKPOINT_SCHEMA_VERSION,
            recorded_at: now,
            actor: Actor {
                user_id: CHECKPOINT_WRITER,
                role: Role::System,
                purpose_of_use: PurposeOfUse::SystemAdministration,
                break_glass: false,
            },
            key_id: NO_DATA_KEY,
            prev_hash,
            signer_key_id: self.signer.key_id().clone(),
        };
        let event = self.signer.sign_event(header, payload);
        let hash = event.hash;
        match self.store.append(&stream, version, &[event]).await {
            Ok(outcome) => {
                self.head = Some(StreamHead {
                    version: outcome.stream_version,
                    hash,
                });
                self.position = position;
                self.events = events;
                self.digest = digest;
                Ok(Some(position))
            }
            Err(error) => {
                // Another writer (a second server) checkpointed first: start from its.
                if let Ok(resumed) = Self::resume(self.store.clone(), self.signer.clone()).await {
                    *self = resumed;
                }
                Err(error)
            }
        }
    }
}

fn payload_of(event: &SealedEvent) -> Option<CheckpointPayload> {
    if event.header.event_type != LOG_CHECKPOINT_EVENT_TYPE
        || event.header.schema_version != LOG_CHECKPOINT_SCHEMA_VERSION
    {
        return None;
    }
    serde_json::from_slice(&event.ciphertext).ok()
}

fn parse_hex(raw: &str) -> Option<LogDigest> {
    if raw.len() != 64 {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (index, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(raw.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(LogDigest(bytes))
}

/// What the checkpoint pass of `verify` found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CheckpointReport {
    pub events: u64,
    pub checkpoints: u64,
    /// The first checkpoint that does not match the log, if any.
    pub first_mismatch: Option<CheckpointMismatch>,
    /// The last checkpoint that matched the log (none after the first mismatch count).
    pub last_verified: Option<LogAnchor>,
    /// The recomputed digest through the position [`verify_checkpoints_with`] was asked
    /// about, if the log holds an event there.
    pub digest_at: Option<LogDigest>,
}

impl CheckpointReport {
    pub fn is_intact(&self) -> bool {
        self.first_mismatch.is_none()
    }
}

/// A checkpoint the log does not agree with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointMismatch {
    /// The checkpoint event's own position.
    pub checkpoint_position: u64,
    /// The position it covers.
    pub covered_position: u64,
    pub problem: &'static str,
}

/// Recomputes the rolling digest over the whole global log and compares it with every
/// checkpoint whose signature verifies. Bounded memory: the digests of the last
/// [`CHECKPOINT_LAG_EVENTS_MAX`] positions.
pub async fn verify_checkpoints<S: EventStore + ?Sized>(
    store: &S,
    verifier: &SignatureVerifier,
) -> Result<CheckpointReport, StoreError> {
    verify_checkpoints_with(store, verifier, None).await
}

/// [`verify_checkpoints`], also keeping the digest through the event at `digest_at` (for an
/// anchor recorded earlier: [`CheckpointReport::digest_at`]).
pub async fn verify_checkpoints_with<S: EventStore + ?Sized>(
    store: &S,
    verifier: &SignatureVerifier,
    digest_at: Option<u64>,
) -> Result<CheckpointReport, StoreError> {
    let mut report = CheckpointReport::default();
    let mut digest = LogDigest::START;
    let mut recent: VecDeque<(u64, u64, LogDigest)> = VecDeque::new();
    let mut after = 0;
    loop {
        let page = store.read_all(after, PAGE_EVENTS).await?;
        let Some(last) = page.last().map(|event| event.position) else {
            break;
        };
        for recorded in &page {
            if recorded.event.header.stream_id.as_str() == LOG_CHECKPOINT_STREAM
                && report.first_mismatch.is_none()
            {
                report.checkpoints += 1;
                match check(&recorded.event, &recent, verifier) {
                    Ok(anchor) => report.last_verified = Some(anchor),
                    Err(problem) => {
                        report.first_mismatch = Some(CheckpointMismatch {
                            checkpoint_position: recorded.position,
                            covered_position: payload_of(&recorded.event).map_or(0, |p| p.position),
                            problem,
                        });
                    }
                }
            }
            digest = digest.then(recorded.position, &recorded.event.hash);
            if digest_at == Some(recorded.position) {
                report.digest_at = Some(digest);
            }
            report.events += 1;
            recent.push_back((recorded.position, report.events, digest));
            if recent.len() > CHECKPOINT_LAG_EVENTS_MAX {
                recent.pop_front();
            }
        }
        after = last;
    }
    Ok(report)
}

/// The point of the log a checkpoint vouches for, or why it does not.
fn check(
    event: &SealedEvent,
    recent: &VecDeque<(u64, u64, LogDigest)>,
    verifier: &SignatureVerifier,
) -> Result<LogAnchor, &'static str> {
    if verifier.verify(event).is_err() {
        return Err("checkpoint_signature");
    }
    let payload = payload_of(event).ok_or("checkpoint_malformed")?;
    let claimed = parse_hex(&payload.digest).ok_or("checkpoint_malformed")?;
    match recent
        .iter()
        .rev()
        .find(|(position, _, _)| *position == payload.position)
    {
        Some((_, events, digest)) if *digest == claimed && *events == payload.events => {
            Ok(LogAnchor {
                position: payload.position,
                digest: claimed,
            })
        }
        Some(_) => Err("checkpoint_mismatch"),
        // The covered position is not in the log (deleted), or too far behind to check.
        None => Err("checkpoint_position_missing"),
    }
}
