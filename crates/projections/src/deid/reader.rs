//! Reading the de-identified tables back for export, a page at a time.
//!
//! [`export_page`] reads up to `limit` rows of one table in primary-key order after a key
//! (keyset: each page is one index range scan, however far into the table) and writes them
//! through a [`DeidExportWriter`]. The first chunk of a CSV export starts with the header line,
//! later chunks carry rows only, so a caller streams an export of any size in constant memory
//! by sending each chunk as it comes and asking for the next with [`ExportChunk::next_key`]:
//! the chunks concatenate to the bytes of one export of the same rows.
//!
//! Rows written while an export runs may or may not be in it (each page is its own snapshot);
//! a row is never in it twice. Keys are HMAC pseudonyms and row keys, never identifiers, so a
//! key may travel in a URL.

use chartlog_domain::CodeSystem;
use serde::de::DeserializeOwned;

use super::export::{DeidExportWriter, DeidTable, ExportError, ExportFormat, vocabulary};
use super::safe_harbor::{
    AllergyRow, BirthYear, CodedConcept, ConditionRow, DeidQuantity, DeidValue, Geography,
    MedicationOrderRow, ObservationRow, PatientRow, Pseudonym, RowKey,
};
use super::zip3::Zip3;
use crate::db::{Backend, DbRow, ProjectionDb, SqlArg};

/// Rows per chunk a caller should ask for.
pub const EXPORT_PAGE_ROWS: u32 = 1_000;
/// The most rows one chunk holds; a larger limit is clamped to it.
pub const EXPORT_PAGE_ROWS_MAX: u32 = 10_000;

/// One chunk of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportChunk {
    /// NDJSON lines or CSV records (after the header line, in the first chunk).
    pub bytes: Vec<u8>,
    /// The key to ask the next chunk after; `None` when this chunk reached the end.
    pub next_key: Option<String>,
    /// Rows in this chunk.
    pub rows: u64,
}

/// Why a chunk could not be read. Names the table, never a value.
#[derive(Debug, thiserror::Error)]
pub enum ExportReadError {
    /// The key to continue after is not a key of these tables (the caller's mistake: 400).
    #[error("the export position is not a row key")]
    InvalidKey,
    #[error("read-model database")]
    Database(#[from] sqlx::Error),
    #[error("a stored {table} row is malformed: {reason}")]
    MalformedRow {
        table: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Export(#[from] ExportError),
}

/// Reads the rows of `table` after `after_key` (from the first row when `None`), at most
/// `limit` of them (clamped to `1..=`[`EXPORT_PAGE_ROWS_MAX`]), and writes them in `format`
/// as released in `release_year` (the 90+ rule is re-applied with it). The chunk asked without
/// a key starts the export: in CSV it begins with the header line, even when the table is
/// empty.
pub async fn export_page(
    db: &ProjectionDb,
    table: DeidTable,
    format: ExportFormat,
    release_year: i32,
    after_key: Option<&str>,
    limit: u32,
) -> Result<ExportChunk, ExportReadError> {
    // Pseudonyms and row keys have the same form: 64 lower-case hex digits.
    let after = after_key
        .map(|key| RowKey::parse(key).ok_or(ExportReadError::InvalidKey))
        .transpose()?;
    let limit = limit.clamp(1, EXPORT_PAGE_ROWS_MAX);
    let shape = Shape::of(table, db.backend());
    let mut args = Vec::new();
    let where_clause = match after {
        Some(after) => {
            args.push(SqlArg::Text(after.as_str().to_owned()));
            format!("WHERE {} > $1", shape.key)
        }
        None => String::new(),
    };
    // One row more than asked says whether there is a next chunk.
    args.push(SqlArg::I64(i64::from(limit) + 1));
    let sql = format!(
        "SELECT {} FROM {} {where_clause} ORDER BY {} LIMIT ${}",
        shape.columns,
        shape.table,
        shape.key,
        args.len()
    );
    // Built from the fixed table shapes and placeholders only.
    let found = db.fetch_all(sqlx::AssertSqlSafe(sql), args).await?;
    let more = found.len() > limit as usize;
    let page = &found[..found.len().min(limit as usize)];

    let mut writer = if after_key.is_none() {
        DeidExportWriter::new(Vec::new(), format, table, release_year)?
    } else {
        DeidExportWriter::resume(Vec::new(), format, table, release_year)
    };
    let mut last_key = None;
    for row in page {
        last_key = Some(row.text(0)?);
        match table {
            DeidTable::Patients => writer.write(&patient_row(row)?)?,
            DeidTable::Observations => writer.write(&observation_row(row)?)?,
            DeidTable::Conditions => writer.write(&condition_row(row)?)?,
            DeidTable::MedicationOrders => writer.write(&medication_order_row(row)?)?,
            DeidTable::Allergies => writer.write(&allergy_row(row)?)?,
        }
    }
    let rows = writer.rows_written();
    Ok(ExportChunk {
        bytes: writer.finish()?,
        next_key: if more { last_key } else { None },
        rows,
    })
}

/// Where a table lives and what to select: the key first, then the columns in
/// [`DeidTable::columns`] order. Integers are cast to BIGINT (PostgreSQL's `integer` does not
/// read as `i64`); decimals are read as text, as written (`numeric` keeps "1.50").
struct Shape {
    table: &'static str,
    key: &'static str,
    columns: &'static str,
}

impl Shape {
    fn of(table: DeidTable, backend: Backend) -> Shape {
        let pick = |sqlite: &'static str, postgres: &'static str| match backend {
            Backend::Sqlite => sqlite,
            Backend::Postgres => postgres,
        };
        match table {
            DeidTable::Patients => Shape {
                // The table under the analysts' view: the export re-applies the 90+ rule with
                // the release year itself.
                table: pick("deid_patients", "chartlog_deid_patients"),
                key: "pseudonym",
                columns: "pseudonym, CAST(birth_year AS BIGINT), aged_90_or_over, sex, state, zip3",
            },
            DeidTable::Observations => Shape {
                table: pick("deid_observations", "deidentified.observations"),
                key: "row_key",
                columns: pick(
                    "row_key, pseudonym, CAST(year AS BIGINT), code_system, code, value_kind, \
                     value, unit, value_code_system, value_code",
                    "row_key, pseudonym, CAST(year AS BIGINT), code_system, code, value_kind, \
                     CAST(value AS TEXT), unit, value_code_system, value_code",
                ),
            },
            DeidTable::Conditions => Shape {
                table: pick("deid_conditions", "deidentified.conditions"),
                key: "row_key",
                columns: "row_key, pseudonym, code_system, code, CAST(onset_year AS BIGINT), \
                          CAST(resolved_year AS BIGINT)",
            },
            DeidTable::MedicationOrders => Shape {
                table: pick("deid_medication_orders", "deidentified.medication_orders"),
                key: "row_key",
                columns: pick(
                    "row_key, pseudonym, CAST(year AS BIGINT), code_system, code, dose_value, \
                     dose_unit, route, frequency, CAST(discontinued_year AS BIGINT)",
                    "row_key, pseudonym, CAST(year AS BIGINT), code_system, code, \
                     CAST(dose_value AS TEXT), dose_unit, route, frequency, \
                     CAST(discontinued_year AS BIGINT)",
                ),
            },
            DeidTable::Allergies => Shape {
                table: pick("deid_allergies", "deidentified.allergies"),
                key: "row_key",
                columns: "row_key, pseudonym, substance_system, substance_code, criticality, \
                          reaction",
            },
        }
    }
}

fn malformed(table: DeidTable, reason: &'static str) -> ExportReadError {
    ExportReadError::MalformedRow {
        table: table.as_str(),
        reason,
    }
}

fn pseudonym(table: DeidTable, row: &DbRow, index: usize) -> Result<Pseudonym, ExportReadError> {
    Pseudonym::parse(&row.text(index)?).ok_or_else(|| malformed(table, "pseudonym"))
}

fn row_key(table: DeidTable, row: &DbRow) -> Result<RowKey, ExportReadError> {
    RowKey::parse(&row.text(0)?).ok_or_else(|| malformed(table, "row key"))
}

fn year(table: DeidTable, value: Option<i64>) -> Result<Option<i32>, ExportReadError> {
    value
        .map(|year| i32::try_from(year).map_err(|_| malformed(table, "year out of range")))
        .transpose()
}

fn required_year(table: DeidTable, value: i64) -> Result<i32, ExportReadError> {
    i32::try_from(value).map_err(|_| malformed(table, "year out of range"))
}

fn code_system(table: DeidTable, raw: &str) -> Result<CodeSystem, ExportReadError> {
    CodeSystem::ALL
        .into_iter()
        .find(|system| system.as_str() == raw)
        .ok_or_else(|| malformed(table, "unknown code system"))
}

fn concept(
    table: DeidTable,
    row: &DbRow,
    system: usize,
    code: usize,
) -> Result<CodedConcept, ExportReadError> {
    Ok(CodedConcept::from_stored(
        code_system(table, &row.text(system)?)?,
        row.text(code)?,
    ))
}

/// A closed vocabulary (sex, route, criticality, ...) from the snake_case name the projection
/// stored ([`vocabulary`]); checked to write back the same name.
fn parse_vocabulary<T: DeserializeOwned + serde::Serialize>(
    table: DeidTable,
    raw: String,
    what: &'static str,
) -> Result<T, ExportReadError> {
    let value: T = serde_json::from_value(serde_json::Value::String(raw.clone()))
        .map_err(|_| malformed(table, what))?;
    if vocabulary(&value) != raw {
        return Err(malformed(table, what));
    }
    Ok(value)
}

fn patient_row(row: &DbRow) -> Result<PatientRow, ExportReadError> {
    let table = DeidTable::Patients;
    let birth_year = match (year(table, row.opt_i64(1)?)?, row.bool(2)?) {
        (Some(year), false) => BirthYear::Year(year),
        (None, true) => BirthYear::NinetyOrOver,
        _ => return Err(malformed(table, "birth year and 90+ disagree")),
    };
    let geography = match (row.opt_text(4)?, row.opt_text(5)?) {
        (Some(state), Some(zip3)) => Some(Geography {
            state,
            zip3: Zip3::parse(&zip3).ok_or_else(|| malformed(table, "zip3"))?,
        }),
        (None, None) => None,
        _ => return Err(malformed(table, "state without zip3")),
    };
    Ok(PatientRow {
        pseudonym: pseudonym(table, row, 0)?,
        birth_year,
        sex: parse_vocabulary(table, row.text(3)?, "sex")?,
        geography,
    })
}

fn observation_row(row: &DbRow) -> Result<ObservationRow, ExportReadError> {
    let table = DeidTable::Observations;
    let value = match row.text(5)?.as_str() {
        "quantity" => match (row.opt_text(6)?, row.opt_text(7)?) {
            (Some(value), Some(unit)) => {
                DeidValue::Quantity(DeidQuantity::from_stored(value, unit))
            }
            _ => return Err(malformed(table, "quantity without value")),
        },
        "coded" => DeidValue::Coded(concept(table, row, 8, 9)?),
        "text_removed" => DeidValue::TextRemoved,
        _ => return Err(malformed(table, "unknown value kind")),
    };
    Ok(ObservationRow {
        row_key: row_key(table, row)?,
        pseudonym: pseudonym(table, row, 1)?,
        year: required_year(table, row.i64(2)?)?,
        code: concept(table, row, 3, 4)?,
        value,
    })
}

fn condition_row(row: &DbRow) -> Result<ConditionRow, ExportReadError> {
    let table = DeidTable::Conditions;
    Ok(ConditionRow {
        row_key: row_key(table, row)?,
        pseudonym: pseudonym(table, row, 1)?,
        code: concept(table, row, 2, 3)?,
        onset_year: year(table, row.opt_i64(4)?)?,
        resolved_year: year(table, row.opt_i64(5)?)?,
    })
}

fn medication_order_row(row: &DbRow) -> Result<MedicationOrderRow, ExportReadError> {
    let table = DeidTable::MedicationOrders;
    Ok(MedicationOrderRow {
        row_key: row_key(table, row)?,
        pseudonym: pseudonym(table, row, 1)?,
        year: required_year(table, row.i64(2)?)?,
        medication: concept(table, row, 3, 4)?,
        dose: DeidQuantity::from_stored(row.text(5)?, row.text(6)?),
        route: parse_vocabulary(table, row.text(7)?, "route")?,
        frequency: parse_vocabulary(table, row.text(8)?, "frequency")?,
        discontinued_year: year(table, row.opt_i64(9)?)?,
    })
}

fn allergy_row(row: &DbRow) -> Result<AllergyRow, ExportReadError> {
    let table = DeidTable::Allergies;
    Ok(AllergyRow {
        row_key: row_key(table, row)?,
        pseudonym: pseudonym(table, row, 1)?,
        substance: concept(table, row, 2, 3)?,
        criticality: parse_vocabulary(table, row.text(4)?, "criticality")?,
        reaction: row
            .opt_text(5)?
            .map(|raw| parse_vocabulary(table, raw, "reaction"))
            .transpose()?,
    })
}
