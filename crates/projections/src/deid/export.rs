//! Streaming export of de-identified rows as NDJSON or CSV: one row in, one line out, so an
//! export of any size runs in constant memory.
//!
//! Patient rows are re-checked against the release year ([`PatientRow::released_in`]): a
//! patient who turned 90 since their last event leaves as "90+".

use std::io::{self, Write};

use serde::Serialize;

use super::safe_harbor::{
    AllergyRow, ConditionRow, DeidValue, MedicationOrderRow, ObservationRow, PatientRow,
};

/// The output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// One JSON object per line, keys in column order.
    Ndjson,
    /// RFC 4180, with a header line.
    Csv,
}

/// The de-identified tables, by the name analysts see.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeidTable {
    Patients,
    Observations,
    Conditions,
    MedicationOrders,
    Allergies,
}

impl DeidTable {
    pub const ALL: [DeidTable; 5] = [
        DeidTable::Patients,
        DeidTable::Observations,
        DeidTable::Conditions,
        DeidTable::MedicationOrders,
        DeidTable::Allergies,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            DeidTable::Patients => "patients",
            DeidTable::Observations => "observations",
            DeidTable::Conditions => "conditions",
            DeidTable::MedicationOrders => "medication_orders",
            DeidTable::Allergies => "allergies",
        }
    }

    /// The columns, in output order; the same names as the SQL tables.
    pub const fn columns(self) -> &'static [&'static str] {
        match self {
            DeidTable::Patients => &[
                "pseudonym",
                "birth_year",
                "aged_90_or_over",
                "sex",
                "state",
                "zip3",
            ],
            DeidTable::Observations => &[
                "row_key",
                "pseudonym",
                "year",
                "code_system",
                "code",
                "value_kind",
                "value",
                "unit",
                "value_code_system",
                "value_code",
            ],
            DeidTable::Conditions => &[
                "row_key",
                "pseudonym",
                "code_system",
                "code",
                "onset_year",
                "resolved_year",
            ],
            DeidTable::MedicationOrders => &[
                "row_key",
                "pseudonym",
                "year",
                "code_system",
                "code",
                "dose_value",
                "dose_unit",
                "route",
                "frequency",
                "discontinued_year",
            ],
            DeidTable::Allergies => &[
                "row_key",
                "pseudonym",
                "substance_system",
                "substance_code",
                "criticality",
                "reaction",
            ],
        }
    }
}

/// One output value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    Text(String),
    /// A decimal kept as written (NDJSON writes it as a string so no precision is lost).
    Decimal(String),
    Integer(i64),
    Boolean(bool),
    Null,
}

fn text(value: impl Into<String>) -> Cell {
    Cell::Text(value.into())
}

fn year(value: Option<i32>) -> Cell {
    value.map_or(Cell::Null, |year| Cell::Integer(i64::from(year)))
}

/// The snake_case name of a closed-vocabulary value (sex, route, criticality, ...), as serde
/// writes it in the sealed payload.
pub(crate) fn vocabulary<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        // Every vocabulary is a fieldless enum; anything else is a bug caught in tests.
        _ => {
            debug_assert!(false, "a vocabulary value serializes as a string");
            String::new()
        }
    }
}

/// A de-identified row that can be exported.
pub trait DeidRecord {
    const TABLE: DeidTable;
    /// The row's values in [`DeidTable::columns`] order, as released in `release_year`.
    fn cells(&self, release_year: i32) -> Vec<Cell>;
}

impl DeidRecord for PatientRow {
    const TABLE: DeidTable = DeidTable::Patients;
    fn cells(&self, release_year: i32) -> Vec<Cell> {
        let row = self.released_in(release_year);
        vec![
            text(row.pseudonym.as_str()),
            year(row.birth_year.year()),
            Cell::Boolean(row.birth_year.is_ninety_or_over()),
            text(vocabulary(&row.sex)),
            row.geography
                .as_ref()
                .map_or(Cell::Null, |g| text(g.state.as_str())),
            row.geography
                .as_ref()
                .map_or(Cell::Null, |g| text(g.zip3.as_str())),
        ]
    }
}

impl DeidRecord for ObservationRow {
    const TABLE: DeidTable = DeidTable::Observations;
    fn cells(&self, _release_year: i32) -> Vec<Cell> {
        let (value, unit, value_system, value_code) = match &self.value {
            DeidValue::Quantity(quantity) => (
                Cell::Decimal(quantity.value().to_owned()),
                text(quantity.unit()),
                Cell::Null,
                Cell::Null,
            ),
            DeidValue::Coded(code) => (
                Cell::Null,
                Cell::Null,
                text(code.system().as_str()),
                text(code.code()),
            ),
            DeidValue::TextRemoved => (Cell::Null, Cell::Null, Cell::Null, Cell::Null),
        };
        vec![
            text(self.row_key.as_str()),
            text(self.pseudonym.as_str()),
            year(Some(self.year)),
            text(self.code.system().as_str()),
            text(self.code.code()),
            text(self.value.kind()),
            value,
            unit,
            value_system,
            value_code,
        ]
    }
}

impl DeidRecord for ConditionRow {
    const TABLE: DeidTable = DeidTable::Conditions;
    fn cells(&self, _release_year: i32) -> Vec<Cell> {
        vec![
            text(self.row_key.as_str()),
            text(self.pseudonym.as_str()),
            text(self.code.system().as_str()),
            text(self.code.code()),
            year(self.onset_year),
            year(self.resolved_year),
        ]
    }
}

impl DeidRecord for MedicationOrderRow {
    const TABLE: DeidTable = DeidTable::MedicationOrders;
    fn cells(&self, _release_year: i32) -> Vec<Cell> {
        vec![
            text(self.row_key.as_str()),
            text(self.pseudonym.as_str()),
            year(Some(self.year)),
            text(self.medication.system().as_str()),
            text(self.medication.code()),
            Cell::Decimal(self.dose.value().to_owned()),
            text(self.dose.unit()),
            text(vocabulary(&self.route)),
            text(vocabulary(&self.frequency)),
            year(self.discontinued_year),
        ]
    }
}

impl DeidRecord for AllergyRow {
    const TABLE: DeidTable = DeidTable::Allergies;
    fn cells(&self, _release_year: i32) -> Vec<Cell> {
        vec![
            text(self.row_key.as_str()),
            text(self.pseudonym.as_str()),
            text(self.substance.system().as_str()),
            text(self.substance.code()),
            text(vocabulary(&self.criticality)),
            self.reaction
                .as_ref()
                .map_or(Cell::Null, |reaction| text(vocabulary(reaction))),
        ]
    }
}

/// An export that cannot be written. Names the table, never a value.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("a {row_table} row was written to the {table} export")]
    WrongTable {
        table: &'static str,
        row_table: &'static str,
    },
    #[error("writing the {table} export failed")]
    Io {
        table: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Writes the rows of one table, one line per row.
pub struct DeidExportWriter<W: Write> {
    out: W,
    format: ExportFormat,
    table: DeidTable,
    release_year: i32,
    rows_written: u64,
}

impl<W: Write> DeidExportWriter<W> {
    /// Starts an export of `table` released in `release_year` (the year the data leaves, for
    /// the 90+ rule); writes the CSV header line right away.
    pub fn new(
        mut out: W,
        format: ExportFormat,
        table: DeidTable,
        release_year: i32,
    ) -> Result<Self, ExportError> {
        if format == ExportFormat::Csv {
            let header = table.columns().join(",");
            writeln!(out, "{header}\r").map_err(|source| ExportError::Io {
                table: table.as_str(),
                source,
            })?;
        }
        Ok(Self {
            out,
            format,
            table,
            release_year,
            rows_written: 0,
        })
    }

    /// Continues an export whose CSV header line was already written (by [`Self::new`], in
    /// an earlier chunk of the same stream): writes no header.
    pub fn resume(out: W, format: ExportFormat, table: DeidTable, release_year: i32) -> Self {
        Self {
            out,
            format,
            table,
            release_year,
            rows_written: 0,
        }
    }

    pub fn write<R: DeidRecord>(&mut self, row: &R) -> Result<(), ExportError> {
        if R::TABLE != self.table {
            return Err(ExportError::WrongTable {
                table: self.table.as_str(),
                row_table: R::TABLE.as_str(),
            });
        }
        let cells = row.cells(self.release_year);
        let columns = self.table.columns();
        debug_assert_eq!(cells.len(), columns.len(), "one cell per column");
        let line = match self.format {
            ExportFormat::Ndjson => ndjson_line(columns, cells),
            ExportFormat::Csv => csv_line(cells),
        };
        self.out
            .write_all(line.as_bytes())
            .map_err(|source| ExportError::Io {
                table: self.table.as_str(),
                source,
            })?;
        self.rows_written += 1;
        Ok(())
    }

    pub fn rows_written(&self) -> u64 {
        self.rows_written
    }

    /// Flushes and gives the writer back.
    pub fn finish(mut self) -> Result<W, ExportError> {
        self.out.flush().map_err(|source| ExportError::Io {
            table: self.table.as_str(),
            source,
        })?;
        Ok(self.out)
    }
}

fn ndjson_line(columns: &[&str], cells: Vec<Cell>) -> String {
    let object: serde_json::Map<String, serde_json::Value> = columns
        .iter()
        .zip(cells)
        .map(|(column, cell)| {
            let value = match cell {
                Cell::Text(text) | Cell::Decimal(text) => serde_json::Value::String(text),
                Cell::Integer(n) => serde_json::Value::from(n),
                Cell::Boolean(b) => serde_json::Value::Bool(b),
                Cell::Null => serde_json::Value::Null,
            };
            ((*column).to_owned(), value)
        })
        .collect();
    let mut line = serde_json::Value::Object(object).to_string();
    line.push('\n');
    line
}

fn csv_line(cells: Vec<Cell>) -> String {
    let mut line = String::new();
    for (i, cell) in cells.into_iter().enumerate() {
        if i > 0 {
            line.push(',');
        }
        match cell {
            Cell::Text(text) => csv_text_field(&mut line, &text),
            Cell::Decimal(text) => csv_field(&mut line, &text),
            Cell::Integer(n) => line.push_str(&n.to_string()),
            Cell::Boolean(b) => line.push_str(if b { "true" } else { "false" }),
            Cell::Null => {}
        }
    }
    line.push_str("\r\n");
    line
}

/// A text cell: RFC 4180 quoting, and a cell a spreadsheet would run as a formula (CSV
/// injection: a leading `=`, `+`, `-`, `@`, tab or carriage return) is prefixed with `'`,
/// as OWASP advises; quoting alone does not stop it, spreadsheets drop the quotes. No
/// de-identified text should start so (codes and units are checked); this holds if one does.
pub(crate) fn csv_text_field(line: &mut String, value: &str) {
    if value.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        csv_field(line, &format!("'{value}"));
    } else {
        csv_field(line, value);
    }
}

/// RFC 4180 quoting. Decimals come here as written: a leading `-` is a negative number.
fn csv_field(line: &mut String, value: &str) {
    let needs_quotes = value.contains([',', '"', '\r', '\n']);
    if needs_quotes {
        line.push('"');
        line.push_str(&value.replace('"', "\"\""));
        line.push('"');
    } else {
        line.push_str(value);
    }
}
