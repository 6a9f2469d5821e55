//! One database abstraction for both backends, so each projection's SQL is written once.
//!
//! [`ProjectionDb`] and [`ProjectionTx`] are enums over the SQLite and PostgreSQL pools and
//! transactions the store already opened (no second pool, no `Any` driver). SQL is written
//! with `$n` placeholders numbered in first-use order: PostgreSQL reads them natively and
//! SQLite numbers `$n` parameters by first appearance, so one text serves both (the same rule
//! as `chartlog_store`'s key table). Arguments are [`SqlArg`]s; rows come back as [`DbRow`].
//!
//! Never format a value into SQL text: bind it. Dynamic SQL (multi-row inserts) is built only
//! from placeholders, through [`values_placeholders`].

use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqlitePool, SqliteRow};
use sqlx::{Postgres, Row as _, SqlSafeStr, Sqlite, Transaction};
use uuid::Uuid;

/// Which backend a [`ProjectionDb`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The read-model database: the same database as the event store.
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
pub enum ProjectionTx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

impl ProjectionTx {
    pub fn backend(&self) -> Backend {
        match self {
            ProjectionTx::Sqlite(_) => Backend::Sqlite,
            ProjectionTx::Postgres(_) => Backend::Postgres,
        }
    }

    /// How many rows of `columns` columns one multi-row statement should carry here.
    pub fn rows_per_statement(&self, columns: usize) -> usize {
        assert!(columns > 0, "a row has at least one column");
        match self {
            ProjectionTx::Sqlite(_) => (SQLITE_PARAMETERS_PER_STATEMENT_MAX / columns).max(1),
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
            ProjectionTx::Sqlite(tx) => bind_all!(sqlx::query(sql), args)
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
            ProjectionTx::Sqlite(tx) => bind_all!(sqlx::query(sql), args)
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
            ProjectionTx::Sqlite(tx) => bind_all!(sqlx::query(sql), args)
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
            ProjectionTx::Sqlite(tx) => tx.commit().await,
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
                ProjectionTx::Sqlite(pool.begin_with("BEGIN IMMEDIATE").await?)
            }
            ProjectionDb::Postgres(pool) => ProjectionTx::Postgres(pool.begin().await?),
        })
    }

    pub async fn execute(
        &self,
        sql: impl SqlSafeStr,
        args: Vec<SqlArg>,
    ) -> Result<u64, sqlx::Error> {
        Ok(match self {
            ProjectionDb::Sqlite(pool) => bind_all!(sqlx::query(sql), args)
                .execute(pool)
                .await?
                .rows_affected(),
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
            ProjectionDb::Sqlite(pool) => bind_all!(sqlx::query(sql), args)
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
            ProjectionDb::Sqlite(pool) => bind_all!(sqlx::query(sql), args)
                .fetch_optional(pool)
                .await?
                .map(DbRow::Sqlite),
            ProjectionDb::Postgres(pool) => bind_all!(sqlx::query(sql), args)
                .fetch_optional(pool)
                .await?
                .map(DbRow::Postgres),
        })
    }

    /// The highest position in the global log (0 for an empty log): what a rebuild's
    /// progress is measured against. Events appended meanwhile move it on.
    pub async fn log_head_position(&self) -> Result<u64, sqlx::Error> {
        let row = self
            .fetch_optional(
                "SELECT COALESCE(MAX(position), 0) FROM chartlog_events",
                vec![],
            )
            .await?;
        let head = match row {
            Some(row) => row.i64(0)?,
            None => 0,
        };
        Ok(u64::try_from(head).unwrap_or(0))
    }
}

/// `($1, $2), ($3, $4)` for `rows` rows of `columns` placeholders, numbered from
/// `first_placeholder`: the VALUES list of a multi-row insert, built from placeholders only.
pub fn values_placeholders(rows: usize, columns: usize, first_placeholder: usize) -> String {
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
            sql.push('$');
            sql.push_str(&next.to_string());
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
/// Bound parameters per statement on SQLite. sqlx's SQLite driver looks each parameter up by
/// name among all of the statement's parameters, so binding costs grow with the square of the
/// count: measured, 4,500 parameters spent a fifth of a rebuild in `sqlite3_bind_parameter_name`.
pub const SQLITE_PARAMETERS_PER_STATEMENT_MAX: usize = 256;

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
}
