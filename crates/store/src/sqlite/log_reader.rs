//! Reads of the event log through read-only SQLite connections of the store's own, stepped on
//! a blocking thread.
//!
//! Why not through sqlx: its SQLite driver steps every statement on a worker thread and hands
//! each row to the async task over a channel, copying every column on the way. For the bulk
//! reads (a projection catching up, a rebuild, a ledger folding a stream) that hand-off, not
//! SQLite, was the cost: 200,000 events of 400 bytes read in about 2 s through sqlx and in
//! 0.2 s stepped here, and in a rebuild on two cores the reader ran behind the verifiers
//! (README, "Projection rebuild", the row "reading the log alone"). Writes stay on sqlx, which
//! owns the transactions. These connections only read, in autocommit, so each statement sees
//! what was committed when it began, as a sqlx connection would; SQLite commits positions in
//! order, so a page never skips an event that commits later.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, params};
use uuid::Uuid;

use super::BUSY_TIMEOUT;
use crate::row::{EVENT_COLUMNS, EventRow};
use crate::{RecordedEvent, StoreError};

/// Read connections kept open between reads; more are opened when reads overlap and closed
/// after.
const IDLE_CONNECTIONS_MAX: usize = 4;

/// What to read.
pub(crate) enum LogRead {
    /// The global log after a position, in position order.
    All { after_position: i64, limit: i64 },
    /// One stream from a version, in version order.
    Stream {
        stream_id: String,
        from_version: i64,
        limit: i64,
    },
}

/// A small pool of read-only connections to one database file.
pub(crate) struct LogReader {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl LogReader {
    /// A reader of the database file at `path`, which the store's sqlx pool has opened and
    /// migrated (so the file and its WAL exist).
    pub(crate) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) async fn read(
        self: &Arc<Self>,
        what: LogRead,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let reader = Arc::clone(self);
        tokio::task::spawn_blocking(move || reader.read_blocking(&what))
            .await
            .map_err(|_| StoreError::ReadLog {
                reason: "the reading thread stopped".to_owned(),
            })?
    }

    fn read_blocking(&self, what: &LogRead) -> Result<Vec<RecordedEvent>, StoreError> {
        let idle = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let connection = match idle {
            Some(connection) => connection,
            None => self.open().map_err(read_error)?,
        };
        let rows = read_rows(&connection, what).map_err(read_error)?;
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < IDLE_CONNECTIONS_MAX
        {
            idle.push(connection);
        }
        rows.into_iter().map(EventRow::into_recorded).collect()
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let connection = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        connection.busy_timeout(BUSY_TIMEOUT)?;
        Ok(connection)
    }
}

fn read_error(error: rusqlite::Error) -> StoreError {
    // SQLite's messages name tables and constraints, never values: nothing here is PHI.
    StoreError::ReadLog {
        reason: error.to_string(),
    }
}

fn read_rows(connection: &Connection, what: &LogRead) -> rusqlite::Result<Vec<EventRow>> {
    let (mut statement, bound) = match what {
        LogRead::All {
            after_position,
            limit,
        } => (
            connection.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM chartlog_events \
                 WHERE position > ?1 ORDER BY position LIMIT ?2"
            ))?,
            (None, *after_position, *limit),
        ),
        LogRead::Stream {
            stream_id,
            from_version,
            limit,
        } => (
            connection.prepare_cached(&format!(
                "SELECT {EVENT_COLUMNS} FROM chartlog_events \
                 WHERE stream_id = ?3 AND stream_version >= ?1 ORDER BY stream_version LIMIT ?2"
            ))?,
            (Some(stream_id.as_str()), *from_version, *limit),
        ),
    };
    let mut rows = match bound {
        (None, from, limit) => statement.query(params![from, limit])?,
        (Some(stream_id), from, limit) => statement.query(params![from, limit, stream_id])?,
    };
    let mut read = Vec::new();
    while let Some(row) = rows.next()? {
        read.push(EventRow {
            position: row.get(0)?,
            stream_id: row.get(1)?,
            stream_version: row.get(2)?,
            event_id: uuid_column(row, 3)?,
            event_type: row.get(4)?,
            schema_version: row.get(5)?,
            recorded_at_us: row.get(6)?,
            actor_user_id: uuid_column(row, 7)?,
            actor_role: row.get(8)?,
            purpose_of_use: row.get(9)?,
            break_glass: row.get(10)?,
            data_key_id: uuid_column(row, 11)?,
            signer_key_id: row.get(12)?,
            prev_hash: row.get(13)?,
            hash: row.get(14)?,
            signature: row.get(15)?,
            ciphertext: row.get(16)?,
        });
    }
    Ok(read)
}

/// A UUID column as sqlx stores it in SQLite: 16 bytes.
fn uuid_column(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Uuid> {
    let bytes = row.get_ref(index)?.as_blob()?;
    Uuid::from_slice(bytes).map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(
            index,
            rusqlite::types::Type::Blob,
            Box::new(error),
        )
    })
}
