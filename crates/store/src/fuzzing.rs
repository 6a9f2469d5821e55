//! Entry point for the fuzz targets in `fuzz/`: the decoding of a stored event row, without a
//! database. Not part of the API; kept public only so `fuzz/` links it.

/// The columns of one `chartlog_events` row, as both backends return them: the very type the
/// backends decode, so the fuzz target cannot drift from them.
pub use crate::row::EventRow as RawEventRow;
use crate::{RecordedEvent, StoreError};

/// Decodes a row exactly as a read from either backend does.
pub fn recorded_event(row: RawEventRow) -> Result<RecordedEvent, StoreError> {
    row.into_recorded()
}
