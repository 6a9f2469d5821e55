//! Entry point for the fuzz targets in `fuzz/`: the decoding of a stored event row, without a
//! database. Not part of the API; kept public only so `fuzz/` links it.

use uuid::Uuid;

use crate::row::EventRow;
use crate::{RecordedEvent, StoreError};

/// The columns of one `chartlog_events` row, as both backends return them.
#[derive(Debug, Clone)]
pub struct RawEventRow {
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

/// Decodes a row exactly as a read from either backend does.
pub fn recorded_event(row: RawEventRow) -> Result<RecordedEvent, StoreError> {
    EventRow {
        position: row.position,
        stream_id: row.stream_id,
        stream_version: row.stream_version,
        event_id: row.event_id,
        event_type: row.event_type,
        schema_version: row.schema_version,
        recorded_at_us: row.recorded_at_us,
        actor_user_id: row.actor_user_id,
        actor_role: row.actor_role,
        purpose_of_use: row.purpose_of_use,
        break_glass: row.break_glass,
        data_key_id: row.data_key_id,
        signer_key_id: row.signer_key_id,
        prev_hash: row.prev_hash,
        hash: row.hash,
        signature: row.signature,
        ciphertext: row.ciphertext,
    }
    .into_recorded()
}
