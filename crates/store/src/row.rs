//! The stored shape of an event, shared by both backends' SQL.

use chartlog_crypto::{
    DataKeyId, EventHash, EventHeader, EventSignature, SealedEvent, SignerKeyId,
};
use chartlog_domain::{Actor, EventId, StreamId, Timestamp, UserId};
use sqlx::Row;
use uuid::Uuid;

use crate::{RecordedEvent, StoreError, StreamHead};

/// One row of `chartlog_events`, as both dialects return it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub position: i64,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_id: Uuid,
    pub event_type: String,
    pub schema_version: i32,
    pub recorded_at_us: i64,
    pub actor_user_id: Uuid,
    pub actor_role: String,
    pub purpose_of_use: String,
    pub break_glass: bool,
    pub data_key_id: Uuid,
    pub signer_key_id: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub signature: Vec<u8>,
    pub ciphertext: Vec<u8>,
}

/// The column list both dialects select, in [`EventRow`]'s order.
pub(crate) const EVENT_COLUMNS: &str = "position, stream_id, stream_version, event_id, \
    event_type, schema_version, recorded_at_us, actor_user_id, actor_role, purpose_of_use, \
    break_glass, data_key_id, signer_key_id, prev_hash, hash, signature, ciphertext";

impl EventRow {
    pub(crate) fn into_recorded(self) -> Result<RecordedEvent, StoreError> {
        let position = to_u64(self.position, "position", 0)?;
        let corrupt = |reason: &str| StoreError::Corrupt {
            position,
            reason: reason.to_owned(),
        };
        let header = EventHeader {
            stream_id: StreamId::parse(&self.stream_id).map_err(|_| corrupt("stream id"))?,
            stream_version: to_u64(self.stream_version, "stream version", position)?,
            event_id: EventId::from_uuid(self.event_id),
            event_type: self.event_type,
            schema_version: u32::try_from(self.schema_version)
                .map_err(|_| corrupt("schema version"))?,
            recorded_at: Timestamp::from_unix_micros(self.recorded_at_us)
                .map_err(|_| corrupt("recorded-at time"))?,
            actor: Actor {
                user_id: UserId::from_uuid(self.actor_user_id),
                role: self.actor_role.parse().map_err(|_| corrupt("actor role"))?,
                purpose_of_use: self
                    .purpose_of_use
                    .parse()
                    .map_err(|_| corrupt("purpose of use"))?,
                break_glass: self.break_glass,
            },
            key_id: DataKeyId::from_uuid(self.data_key_id),
            prev_hash: EventHash::from_slice(&self.prev_hash)
                .map_err(|_| corrupt("previous hash length"))?,
            signer_key_id: SignerKeyId::parse(&self.signer_key_id)
                .map_err(|_| corrupt("signer key id"))?,
        };
        Ok(RecordedEvent {
            position,
            event: SealedEvent {
                header,
                ciphertext: self.ciphertext,
                hash: EventHash::from_slice(&self.hash).map_err(|_| corrupt("hash length"))?,
                signature: EventSignature::from_slice(&self.signature)
                    .map_err(|_| corrupt("signature length"))?,
            },
        })
    }
}

pub(crate) fn to_u64(value: i64, what: &str, position: u64) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        position,
        reason: format!("negative {what}"),
    })
}

/// Versions and positions are far below 2^63; a larger one is a bug upstream.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).expect("versions and positions stay below 2^63")
}

/// The outcome of a conflicting append: a true conflict, a chain mismatch at the same
/// version, or an idempotent retry (decided by the caller from the stored events).
pub(crate) fn conflict_error(stream: &StreamId, expected: u64, actual: Option<u64>) -> StoreError {
    let actual = actual.unwrap_or(0);
    if actual == expected {
        StoreError::ChainMismatch {
            stream: stream.clone(),
            version: actual,
        }
    } else {
        StoreError::Conflict {
            stream: stream.clone(),
            expected,
            actual,
        }
    }
}

/// Decides whether a refused batch was a retry of one already stored: every event id present
/// with the same hash, in one contiguous run. Returns the original outcome if so.
pub(crate) fn idempotent_outcome(
    batch: &[SealedEvent],
    stored: &[RecordedEvent],
) -> Result<Option<crate::AppendOutcome>, StoreError> {
    if stored.is_empty() {
        return Ok(None);
    }
    for event in batch {
        let Some(found) = stored
            .iter()
            .find(|r| r.event.header.event_id == event.header.event_id)
        else {
            // Some ids stored, some not: the batch is not a retry of one append.
            return Err(StoreError::IdempotencyConflict {
                event_id: event.header.event_id,
            });
        };
        if found.event.hash != event.hash || found.event.header.stream_id != event.header.stream_id
        {
            return Err(StoreError::IdempotencyConflict {
                event_id: event.header.event_id,
            });
        }
    }
    let first = stored.iter().map(|r| r.position).min().unwrap_or(0);
    let last = stored.iter().map(|r| r.position).max().unwrap_or(0);
    let version = stored
        .iter()
        .map(|r| r.event.header.stream_version)
        .max()
        .unwrap_or(0);
    Ok(Some(crate::AppendOutcome {
        stream_version: version,
        first_position: first,
        last_position: last,
    }))
}

/// Reads a `chartlog_streams` row (`version`, `head_hash`).
pub(crate) fn head_from_row<R: Row>(stream: &StreamId, row: &R) -> Result<StreamHead, StoreError>
where
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
{
    let version = to_u64(row.try_get("version")?, "stream version", 0)?;
    let hash: Vec<u8> = row.try_get("head_hash")?;
    let hash = EventHash::from_slice(&hash).map_err(|_| StoreError::Corrupt {
        position: 0,
        reason: format!("head hash of stream {stream}"),
    })?;
    Ok(StreamHead { version, hash })
}
