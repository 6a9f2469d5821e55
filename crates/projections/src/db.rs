//! One database abstraction for both backends, so each projection's SQL is written once.
//!
//! [`ProjectionDb`] and [`ProjectionTx`] are enums over SQLite and PostgreSQL pools and
//! transactions (no `Any` driver). SQL is written with `$n` placeholders numbered in first-use
//! order: PostgreSQL reads them natively and SQLite numbers `$n` parameters by first
//! appearance, so one text serves both (the same rule as `chartlog_store`'s key table).
//! Arguments are [`SqlArg`]s; rows come back as [`DbRow`].
//!
//! Never format a value into SQL text: bind it. Dynamic SQL (multi-row inserts) is built only
//! from placeholders, through [`values_placeholders`].

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;

use chartlog_crypto::DataKey;
use chartlog_domain::{PatientEvent, PatientId};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Postgres, Row as _, SqlSafeStr, SqlStr, Sqlite, Transaction};
use tokio::sync::OwnedMutexGuard;
use uuid::Uuid;

use crate::entries::{EntryKind, EntrySlot};
use crate::runner::{EventBody, ProjectedEvent};

/// Which backend a [`ProjectionDb`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database the read models or the access tables live in. On PostgreSQL both are in the
/// event store's database. On SQLite the read models have a file of their own next to the log
/// (`chartlog_store::sqlite::read_models_path`), with a write lock of its own; the access
/// tables stay in the log's file.
#[derive(Clone, Debug)]
pub enum ProjectionDb {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// One bound argument.
#[derive(Clone, PartialEq, Eq)]
pub enum SqlArg {
    I64(i64),
    OptI64(Option<i64>),
    Bool(bool),
    Text(String),
    OptText(Option<String>),
    Uuid(Uuid),
    OptUuid(Option<Uuid>),
    Bytes(Vec<u8>),
    OptBytes(Option<Vec<u8>>),
}

// Arguments may hold sealed bytes or blind-index digests; print only their shape.
impl std::fmt::Debug for SqlArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SqlArg::I64(_) | SqlArg::OptI64(_) => "SqlArg::I64",
            SqlArg::Bool(_) => "SqlArg::Bool",
            SqlArg::Text(_) | SqlArg::OptText(_) => "SqlArg::Text",
            SqlArg::Uuid(_) | SqlArg::OptUuid(_) => "SqlArg::Uuid",
            SqlArg::Bytes(_) | SqlArg::OptBytes(_) => "SqlArg::Bytes",
        })
    }
}

macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for arg in $args {
            query = match arg {
                SqlArg::I64(value) => query.bind(value),
                SqlArg::OptI64(value) => query.bind(value),
                SqlArg::Bool(value) => query.bind(value),
                SqlArg::Text(value) => query.bind(value),
                SqlArg::OptText(value) => query.bind(value),
                SqlArg::Uuid(value) => query.bind(value),
                SqlArg::OptUuid(value) => query.bind(value),
                SqlArg::Bytes(value) => query.bind(value),
                SqlArg::OptBytes(value) => query.bind(value),
            };
        }
        query
    }};
}

/// A row of either backend, read by column index.
pub enum DbRow {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

macro_rules! row_getter {
    ($(#[$doc:meta])* $name:ident, $ty:ty) => {
        $(#[$doc])*
        pub fn $name(&self, index: usize) -> Result<$ty, sqlx::Error> {
            match self {
                DbRow::Sqlite(row) => row.try_get(index),
                DbRow::Postgres(row) => row.try_get(index),
            }
        }
    };
}

impl DbRow {
    row_getter!(i64, i64);
    row_getter!(opt_i64, Option<i64>);
    row_getter!(bool, bool);
    row_getter!(text, String);
    row_getter!(opt_text, Option<String>);
    row_getter!(uuid, Uuid);
    row_getter!(opt_uuid, Option<Uuid>);
    row_getter!(bytes, Vec<u8>);
    row_getter!(opt_bytes, Option<Vec<u8>>);
}

/// A transaction on either backend. Dropped without [`ProjectionTx::commit`], it rolls back.
///
/// On SQLite a write transaction from [`ProjectionDb::begin`] holds the database's in-process
/// write lock ([`chartlog_store::sqlite::write_lock`]) until it ends; declared after the
/// transaction, so it is released only once the transaction is done with.
pub enum ProjectionTx {
    Sqlite(Transaction<'static, Sqlite>, Option<OwnedMutexGuard<()>>),
    Postgres(Transaction<'static, Postgres>),
}

impl ProjectionTx {
    pub fn backend(&self) -> Backend {
        match self {
            ProjectionTx::Sqlite(..) => Backend::Sqlite,
            ProjectionTx::Postgres(_) => Backend::Postgres,
        }
    }

    /// How many rows of `columns` columns one multi-row statement should carry here.
    pub fn rows_per_statement(&self, columns: usize) -> usize {
        assert!(columns > 0, "a row has at least one column");
        match self {
            ProjectionTx::Sqlite(..) => (SQLITE_PARAMETERS_PER_STATEMENT_MAX / columns).max(1),
            ProjectionTx::Postgres(_) => ROWS_PER_STATEMENT_MAX,
        }
    }

    /// Runs a statement; returns the rows it affected.
    pub async fn execute(
        &mut self,
        sql: impl SqlSafeStr,
        args: Vec<SqlArg>,
    ) -> Result<u64, sqlx::Error> {
        Ok(match self {
            ProjectionTx::Sqlite(tx, _) => bind_all!(sqlx::query(for_sqlite(sql)), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            ProjectionTx::Postgres(tx) => bind_all!(sqlx::query(sql), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        })
    }

    pub async fn fetch_all(
        &mut self,
        sql: impl SqlSafeStr,
        args: Vec<SqlArg>,
    ) -> Result<Vec<DbRow>, sqlx::Error> {
        Ok(match self {
            ProjectionTx::Sqlite(tx, _) => bind_all!(sqlx::query(for_sqlite(sql)), args)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(DbRow::Sqlite)
                .collect(),
            ProjectionTx::Postgres(tx) => bind_all!(sqlx::query(sql), args)
                .fetch_all(&mut **tx)
                .await?
                .into_iter()
                .map(DbRow::Postgres)
                .collect(),
        })
    }

    pub async fn fetch_optional(
        &mut self,
        sql: impl SqlSafeStr,
        args: Vec<SqlArg>,
    ) -> Result<Option<DbRow>, sqlx::Error> {
        Ok(match self {
            ProjectionTx::Sqlite(tx, _) => bind_all!(sqlx::query(for_sqlite(sql)), args)
                .fetch_optional(&mut **tx)
                .await?
                .map(DbRow::Sqlite),
            ProjectionTx::Postgres(tx) => bind_all!(sqlx::query(sql), args)
                .fetch_optional(&mut **tx)
                .await?
                .map(DbRow::Postgres),
        })
    }

    pub async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            ProjectionTx::Sqlite(tx, _) => tx.commit().await,
            ProjectionTx::Postgres(tx) => tx.commit().await,
        }
    }
}

impl ProjectionDb {
    pub fn backend(&self) -> Backend {
        match self {
            ProjectionDb::Sqlite(_) => Backend::Sqlite,
            ProjectionDb::Postgres(_) => Backend::Postgres,
        }
    }

    /// Begins a write transaction. On SQLite it is `BEGIN IMMEDIATE`: it takes the write lock
    /// up front, so it waits its turn behind appends instead of failing when a read inside it
    /// would have to upgrade to a write after another writer committed.
    pub async fn begin(&self) -> Result<ProjectionTx, sqlx::Error> {
        Ok(match self {
            ProjectionDb::Sqlite(pool) => {
                let writer = sqlite_writer(pool).await?;
                ProjectionTx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?, Some(writer))
            }
            ProjectionDb::Postgres(pool) => ProjectionTx::Postgres(pool.begin().await?),
        })
    }

    /// Runs one statement in a transaction of its own. On SQLite, a write, it waits its turn
    /// on the file's in-process write lock as [`ProjectionDb::begin`] does (a session's
    /// activity, a login failure, an idempotency record), so it never meets SQLite's busy
    /// handler while an append group holds the file. Never call it while holding a
    /// [`ProjectionTx`] of the same database: the lock is not re-entrant.
    pub async fn execute(
        &self,
        sql: impl SqlSafeStr,
        args: Vec<SqlArg>,
    ) -> Result<u64, sqlx::Error> {
        Ok(match self {
            ProjectionDb::Sqlite(pool) => {
                let _writer = sqlite_writer(pool).await?;
                bind_all!(sqlx::query(for_sqlite(sql)), args)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            ProjectionDb::Postgres(pool) => bind_all!(sqlx::query(sql), args)
                .execute(pool)
                .await?
                .rows_affected(),
        })
    }

    pub async fn fetch_all(
        &self,
        sql: impl SqlSafeStr,
        args: Vec<SqlArg>,
    ) -> Result<Vec<DbRow>, sqlx::Error> {
        Ok(match self {
            ProjectionDb::Sqlite(pool) => bind_all!(sqlx::query(for_sqlite(sql)), args)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(DbRow::Sqlite)
                .collect(),
            ProjectionDb::Postgres(pool) => bind_all!(sqlx::query(sql), args)
                .fetch_all(pool)
                .await?
                .into_iter()
                .map(DbRow::Postgres)
                .collect(),
        })
    }

    pub async fn fetch_optional(
        &self,
        sql: impl SqlSafeStr,
        args: Vec<SqlArg>,
    ) -> Result<Option<DbRow>, sqlx::Error> {
        Ok(match self {
            ProjectionDb::Sqlite(pool) => bind_all!(sqlx::query(for_sqlite(sql)), args)
                .fetch_optional(pool)
                .await?
                .map(DbRow::Sqlite),
            ProjectionDb::Postgres(pool) => bind_all!(sqlx::query(sql), args)
                .fetch_optional(pool)
                .await?
                .map(DbRow::Postgres),
        })
    }
}

/// The write lock of the SQLite file behind `pool`, waited for no longer than SQLite's own
/// wait for a lock, so a writer stuck in this process fails as clearly as one in another
/// process would.
async fn sqlite_writer(pool: &SqlitePool) -> Result<OwnedMutexGuard<()>, sqlx::Error> {
    tokio::time::timeout(
        chartlog_store::sqlite::BUSY_TIMEOUT,
        chartlog_store::sqlite::write_lock(pool).lock_owned(),
    )
    .await
    .map_err(|_| sqlx::Error::PoolTimedOut)
}

/// The sealed stored value of each entry a batch changes whose value before it needs: for the
/// first change of each entry in `events`, `entry_of` names the entry and says whether the
/// change needs the stored value (a creation does not). Read in one statement per chunk of
/// entries, before the fold: a look-up per change cost a round trip each, and since a
/// projection writes nothing until its fold ends, this is what those look-ups would have read.
/// Entries with no row are left out; each found one comes with the key to open it under.
pub(crate) async fn stored_entries_for_batch(
    tx: &mut ProjectionTx,
    table: &'static str,
    events: &[ProjectedEvent],
    entry_of: impl Fn(PatientId, &PatientEvent) -> Option<(EntrySlot, bool)>,
) -> Result<Vec<(EntrySlot, Arc<DataKey>, Vec<u8>)>, sqlx::Error> {
    let mut changed_before: HashSet<EntrySlot> = HashSet::new();
    let mut wanted: HashMap<EntrySlot, Arc<DataKey>> = HashMap::new();
    for event in events {
        let EventBody::Patient {
            patient_id,
            event: patient_event,
            key,
        } = &event.body
        else {
            continue;
        };
        let Some((slot, needs_stored)) = entry_of(*patient_id, patient_event) else {
            continue;
        };
        if changed_before.insert(slot) && needs_stored {
            wanted.insert(slot, key.clone());
        }
    }
    let slots: Vec<EntrySlot> = wanted.keys().copied().collect();
    let mut found = Vec::new();
    for chunk in slots.chunks(tx.rows_per_statement(3)) {
        let sql = format!(
            "SELECT patient_id, kind, entry_id, sealed FROM {table} \
             WHERE (patient_id, kind, entry_id) IN (VALUES {})",
            values_placeholders(chunk.len(), 3, 1)
        );
        let mut args = Vec::with_capacity(chunk.len() * 3);
        for (patient_id, kind, entry_id) in chunk {
            args.push(SqlArg::Uuid(patient_id.as_uuid()));
            args.push(SqlArg::Text(kind.as_str().to_owned()));
            args.push(SqlArg::Uuid(*entry_id));
        }
        for row in tx.fetch_all(AssertSqlSafe(sql), args).await? {
            let (patient, entry_id) = (PatientId::from_uuid(row.uuid(0)?), row.uuid(2)?);
            let slot = EntryKind::parse(&row.text(1)?).map(|kind| (patient, kind, entry_id));
            // The key columns compare exactly, so every row is one asked for.
            if let Some((slot, key)) = slot.and_then(|slot| Some((slot, wanted.get(&slot)?))) {
                found.push((slot, key.clone(), row.bytes(3)?));
            }
        }
    }
    Ok(found)
}

/// `($1, $2), ($3, $4)` for `rows` rows of `columns` placeholders, numbered from
/// `first_placeholder`: the VALUES list of a multi-row insert, built from placeholders only.
pub fn values_placeholders(rows: usize, columns: usize, first_placeholder: usize) -> String {
    values_placeholders_cast(rows, columns, first_placeholder, None)
}

/// [`values_placeholders`], with `cast` (a column index and a type, e.g. `(12, "inet")`)
/// appended to that column's placeholder in every row: `$13::inet`. For PostgreSQL columns
/// whose values are bound as text.
pub fn values_placeholders_cast(
    rows: usize,
    columns: usize,
    first_placeholder: usize,
    cast: Option<(usize, &'static str)>,
) -> String {
    assert!(columns > 0, "a row has at least one column");
    let mut sql = String::with_capacity(rows * columns * 5);
    let mut next = first_placeholder;
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for column in 0..columns {
            if column > 0 {
                sql.push_str(", ");
            }
            // Written in place: a `to_string` per placeholder was an allocation for each of
            // the millions of values a rebuild binds.
            let _ = write!(sql, "${next}");
            if let Some((cast_column, type_name)) = cast
                && cast_column == column
            {
                sql.push_str("::");
                sql.push_str(type_name);
            }
            next += 1;
        }
        sql.push(')');
    }
    sql
}

/// Rows per multi-row statement on PostgreSQL: far below its 65,535 bound parameters for the
/// widest row a read model writes (under 16 columns).
pub const ROWS_PER_STATEMENT_MAX: usize = 500;
const _: () = assert!(ROWS_PER_STATEMENT_MAX * 16 <= 65_535);
/// Bound parameters per statement on SQLite. SQLite caps them (32,766), and a statement's
/// text and plan grow with them; 256 keeps both small while a batch of rows still costs a few
/// statements.
pub const SQLITE_PARAMETERS_PER_STATEMENT_MAX: usize = 256;

/// The statement as SQLite should get it: `$1, $2, ... $n`, each used once and in order, become
/// anonymous `?` placeholders. sqlx's SQLite driver asks SQLite for every parameter's name to
/// place its argument, and SQLite finds a name by walking the statement's list of names, so
/// binding a statement with named (or numbered) parameters costs the square of their count:
/// measured, 256-parameter inserts spent 6% of a rebuild in `sqlite3_bind_parameter_name`.
/// Anonymous parameters have no name to look up. Any other use of `$n` (a repeat, a gap, out of
/// order) keeps the text as written, which SQLite numbers by first appearance.
fn for_sqlite(sql: impl SqlSafeStr) -> SqlStr {
    let sql = sql.into_sql_str();
    match anonymous_placeholders(sql.as_str()) {
        Some(rewritten) => AssertSqlSafe(rewritten).into_sql_str(),
        None => sql,
    }
}

/// `sql` with `$1..$n` replaced by `?`, when they appear exactly once each, in order, outside
/// quoted text; `None` when there is nothing to replace or they do not.
fn anonymous_placeholders(sql: &str) -> Option<String> {
    let bytes = sql.as_bytes();
    let mut rewritten = String::with_capacity(sql.len());
    let mut next_expected = 1usize;
    let mut quote: Option<u8> = None;
    let mut copied_up_to = 0;
    let mut at = 0;
    while at < bytes.len() {
        let byte = bytes[at];
        if let Some(open) = quote {
            if byte == open {
                quote = None;
            }
            at += 1;
            continue;
        }
        match byte {
            b'\'' | b'"' => quote = Some(byte),
            b'$' => {
                let digits = bytes[at + 1..]
                    .iter()
                    .take_while(|b| b.is_ascii_digit())
                    .count();
                if digits == 0 {
                    return None;
                }
                let number: usize = sql[at + 1..at + 1 + digits].parse().ok()?;
                if number != next_expected {
                    return None;
                }
                next_expected += 1;
                rewritten.push_str(&sql[copied_up_to..at]);
                rewritten.push('?');
                at += 1 + digits;
                copied_up_to = at;
                continue;
            }
            _ => {}
        }
        at += 1;
    }
    if next_expected == 1 {
        return None;
    }
    rewritten.push_str(&sql[copied_up_to..]);
    Some(rewritten)
}

/// Positions and versions are stored as SQL bigints; they stay far below 2^63.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).expect("positions and versions stay below 2^63")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_number_in_first_use_order() {
        assert_eq!(values_placeholders(2, 2, 1), "($1, $2), ($3, $4)");
        assert_eq!(values_placeholders(1, 3, 4), "($4, $5, $6)");
        assert_eq!(values_placeholders(0, 3, 1), "");
    }

    #[test]
    fn a_cast_applies_to_its_column_in_every_row() {
        assert_eq!(
            values_placeholders_cast(2, 3, 1, Some((1, "inet"))),
            "($1, $2::inet, $3), ($4, $5::inet, $6)"
        );
        assert_eq!(values_placeholders_cast(1, 2, 1, None), "($1, $2)");
    }

    #[test]
    fn sqlite_gets_anonymous_placeholders_only_when_they_mean_the_same() {
        let rewrite = |sql: &str| anonymous_placeholders(sql);
        assert_eq!(
            rewrite("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)").as_deref(),
            Some("INSERT INTO t (a, b) VALUES (?, ?), (?, ?)")
        );
        assert_eq!(
            rewrite("SELECT x FROM t WHERE k = 'a$1' AND v = $1 AND \"c$\" = $2").as_deref(),
            Some("SELECT x FROM t WHERE k = 'a$1' AND v = ? AND \"c$\" = ?")
        );
        // $10 is one placeholder, not $1 followed by 0.
        let ten: String = (1..=10).map(|n| format!("${n},")).collect();
        assert_eq!(rewrite(&ten).as_deref(), Some("?,?,?,?,?,?,?,?,?,?,"));
        // Repeated, out of order, skipped, or none: SQLite's own numbering must decide.
        assert_eq!(rewrite("UPDATE t SET a = $1 WHERE b = $1"), None);
        assert_eq!(rewrite("SELECT $2, $1"), None);
        assert_eq!(rewrite("SELECT $1, $3"), None);
        assert_eq!(rewrite("SELECT 1"), None);
        assert_eq!(rewrite("SELECT $"), None);
    }
}
