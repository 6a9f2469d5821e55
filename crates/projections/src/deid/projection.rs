//! The de-identified projection: applies [`deidentify_event`]'s changes to the SQL tables
//! (`deidentified.*` on PostgreSQL, `deid_*` on SQLite; see migrations 0003).

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;

use super::export::vocabulary;
use super::safe_harbor::{
    AGE_YEARS_GROUPED_MIN, DeidChange, DeidValue, EventContext, Geography, ObservationRow,
    PatientRow, Pseudonym, Pseudonymizer, deidentify_event,
};
use crate::db::{Backend, ProjectionTx, SqlArg, values_placeholders_cast};
use crate::error::ProjectionError;
use crate::runner::{EventBody, ProjectedEvent, Projection};
use sqlx::AssertSqlSafe;

/// The projection's name: its checkpoint key.
pub const DEIDENTIFIED_PROJECTION_NAME: &str = "deidentified";
/// Bump when the transformation or the restricted ZIP3 list
/// ([`super::RESTRICTED_ZIP3_VERSION`]) changes: every row is then rebuilt.
pub const DEIDENTIFIED_PROJECTION_VERSION: u32 = 1;

/// The de-identified views, folded from the log.
pub struct DeidentifiedProjection {
    pseudonymizer: Pseudonymizer,
}

impl DeidentifiedProjection {
    pub fn new(pseudonymizer: Pseudonymizer) -> Self {
        Self { pseudonymizer }
    }
}

/// One SQL text per backend: the table names differ (a schema of its own on PostgreSQL, a
/// prefix on SQLite) and so does the decimal type.
fn pick(backend: Backend, sqlite: &'static str, postgres: &'static str) -> &'static str {
    match backend {
        Backend::Sqlite => sqlite,
        Backend::Postgres => postgres,
    }
}

fn year(value: i32) -> SqlArg {
    SqlArg::I64(i64::from(value))
}

fn opt_year(value: Option<i32>) -> SqlArg {
    SqlArg::OptI64(value.map(i64::from))
}

fn geography_args(geography: Option<&Geography>) -> [SqlArg; 2] {
    [
        SqlArg::OptText(geography.map(|g| g.state.clone())),
        SqlArg::OptText(geography.map(|g| g.zip3.as_str().to_owned())),
    ]
}

async fn insert_patient(tx: &mut ProjectionTx, row: &PatientRow) -> Result<(), sqlx::Error> {
    let backend = tx.backend();
    let [state, zip3] = geography_args(row.geography.as_ref());
    tx.execute(
        pick(
            backend,
            "INSERT INTO deid_patients (pseudonym, birth_year, aged_90_or_over, sex, state, zip3) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (pseudonym) DO NOTHING",
            "INSERT INTO chartlog_deid_patients (pseudonym, birth_year, aged_90_or_over, sex, state, zip3) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (pseudonym) DO NOTHING",
        ),
        vec![
            SqlArg::Text(row.pseudonym.as_str().to_owned()),
            opt_year(row.birth_year.year()),
            SqlArg::Bool(row.birth_year.is_ninety_or_over()),
            SqlArg::Text(vocabulary(&row.sex)),
            state,
            zip3,
        ],
    )
    .await?;
    Ok(())
}

async fn apply_change(tx: &mut ProjectionTx, change: DeidChange) -> Result<(), sqlx::Error> {
    let backend = tx.backend();
    match change {
        DeidChange::InsertPatient(row) => insert_patient(tx, &row).await?,
        DeidChange::CorrectPatient {
            pseudonym,
            birth_year,
            sex,
            geography,
        } => {
            let key = || SqlArg::Text(pseudonym.as_str().to_owned());
            if let Some(birth_year) = birth_year {
                tx.execute(
                    pick(
                        backend,
                        "UPDATE deid_patients SET birth_year = $2, aged_90_or_over = $3 WHERE pseudonym = $1",
                        "UPDATE chartlog_deid_patients SET birth_year = $2, aged_90_or_over = $3 WHERE pseudonym = $1",
                    ),
                    vec![key(), opt_year(birth_year.year()), SqlArg::Bool(birth_year.is_ninety_or_over())],
                )
                .await?;
            }
            if let Some(sex) = sex {
                tx.execute(
                    pick(
                        backend,
                        "UPDATE deid_patients SET sex = $2 WHERE pseudonym = $1",
                        "UPDATE chartlog_deid_patients SET sex = $2 WHERE pseudonym = $1",
                    ),
                    vec![key(), SqlArg::Text(vocabulary(&sex))],
                )
                .await?;
            }
            if let Some(geography) = geography {
                let [state, zip3] = geography_args(geography.as_ref());
                tx.execute(
                    pick(
                        backend,
                        "UPDATE deid_patients SET state = $2, zip3 = $3 WHERE pseudonym = $1",
                        "UPDATE chartlog_deid_patients SET state = $2, zip3 = $3 WHERE pseudonym = $1",
                    ),
                    vec![key(), state, zip3],
                )
                .await?;
            }
        }
        DeidChange::AgeAsOf { pseudonym, year } => {
            group_aged(tx, std::iter::once((pseudonym, year))).await?;
        }
        DeidChange::InsertObservation(row) => insert_observations(tx, &[row]).await?,
        DeidChange::InsertCondition(row) => {
            tx.execute(
                pick(
                    backend,
                    "INSERT INTO deid_conditions (row_key, pseudonym, code_system, code, onset_year, resolved_year) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (row_key) DO NOTHING",
                    "INSERT INTO deidentified.conditions (row_key, pseudonym, code_system, code, onset_year, resolved_year) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (row_key) DO NOTHING",
                ),
                vec![
                    SqlArg::Text(row.row_key.as_str().to_owned()),
                    SqlArg::Text(row.pseudonym.as_str().to_owned()),
                    SqlArg::Text(row.code.system().as_str().to_owned()),
                    SqlArg::Text(row.code.code().to_owned()),
                    opt_year(row.onset_year),
                    opt_year(row.resolved_year),
                ],
            )
            .await?;
        }
        DeidChange::ResolveCondition {
            row_key,
            resolved_year,
        } => {
            tx.execute(
                pick(
                    backend,
                    "UPDATE deid_conditions SET resolved_year = $2 WHERE row_key = $1",
                    "UPDATE deidentified.conditions SET resolved_year = $2 WHERE row_key = $1",
                ),
                vec![
                    SqlArg::Text(row_key.as_str().to_owned()),
                    year(resolved_year),
                ],
            )
            .await?;
        }
        DeidChange::InsertAllergy(row) => {
            tx.execute(
                pick(
                    backend,
                    "INSERT INTO deid_allergies (row_key, pseudonym, substance_system, substance_code, criticality, reaction) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (row_key) DO NOTHING",
                    "INSERT INTO deidentified.allergies (row_key, pseudonym, substance_system, substance_code, criticality, reaction) \
                     VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (row_key) DO NOTHING",
                ),
                vec![
                    SqlArg::Text(row.row_key.as_str().to_owned()),
                    SqlArg::Text(row.pseudonym.as_str().to_owned()),
                    SqlArg::Text(row.substance.system().as_str().to_owned()),
                    SqlArg::Text(row.substance.code().to_owned()),
                    SqlArg::Text(vocabulary(&row.criticality)),
                    SqlArg::OptText(row.reaction.as_ref().map(vocabulary)),
                ],
            )
            .await?;
        }
        DeidChange::RemoveAllergy { row_key } => {
            tx.execute(
                pick(
                    backend,
                    "DELETE FROM deid_allergies WHERE row_key = $1",
                    "DELETE FROM deidentified.allergies WHERE row_key = $1",
                ),
                vec![SqlArg::Text(row_key.as_str().to_owned())],
            )
            .await?;
        }
        DeidChange::InsertMedicationOrder(row) => {
            tx.execute(
                pick(
                    backend,
                    "INSERT INTO deid_medication_orders (row_key, pseudonym, year, code_system, code, \
                     dose_value, dose_unit, route, frequency, discontinued_year) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT (row_key) DO NOTHING",
                    "INSERT INTO deidentified.medication_orders (row_key, pseudonym, year, code_system, code, \
                     dose_value, dose_unit, route, frequency, discontinued_year) \
                     VALUES ($1, $2, $3, $4, $5, $6::numeric, $7, $8, $9, $10) ON CONFLICT (row_key) DO NOTHING",
                ),
                vec![
                    SqlArg::Text(row.row_key.as_str().to_owned()),
                    SqlArg::Text(row.pseudonym.as_str().to_owned()),
                    year(row.year),
                    SqlArg::Text(row.medication.system().as_str().to_owned()),
                    SqlArg::Text(row.medication.code().to_owned()),
                    SqlArg::Text(row.dose.value().to_owned()),
                    SqlArg::Text(row.dose.unit().to_owned()),
                    SqlArg::Text(vocabulary(&row.route)),
                    SqlArg::Text(vocabulary(&row.frequency)),
                    opt_year(row.discontinued_year),
                ],
            )
            .await?;
        }
        DeidChange::DiscontinueMedicationOrder {
            row_key,
            discontinued_year,
        } => {
            tx.execute(
                pick(
                    backend,
                    "UPDATE deid_medication_orders SET discontinued_year = $2 WHERE row_key = $1",
                    "UPDATE deidentified.medication_orders SET discontinued_year = $2 WHERE row_key = $1",
                ),
                vec![SqlArg::Text(row_key.as_str().to_owned()), year(discontinued_year)],
            )
            .await?;
        }
        DeidChange::ErasePatient { pseudonym } => {
            for (sqlite, postgres) in ERASE_STATEMENTS {
                tx.execute(
                    pick(backend, sqlite, postgres),
                    vec![SqlArg::Text(pseudonym.as_str().to_owned())],
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// Columns of one de-identified observation row as [`insert_observations`] binds them.
const OBSERVATION_COLUMNS: usize = 10;
/// `value`, which PostgreSQL stores as `numeric` and receives as text.
const OBSERVATION_VALUE_COLUMN: usize = 6;

/// Inserts observation rows, many per statement: observations are most of a clinic's events,
/// and a statement each cost the projection runner a round trip each.
/// Asks, for each `(patient, year)`, whether the patient's birth year reads as 90 or more by
/// that year, and groups it as 90+ if so ([`DeidChange::AgeAsOf`]), in one statement per
/// distinct year (and per chunk of patients) instead of one per patient: nearly every event
/// asks, the answer is nearly always no (an index probe), and on SQLite each statement is a
/// round trip to the connection's thread.
async fn group_aged(
    tx: &mut ProjectionTx,
    seen: impl IntoIterator<Item = (Pseudonym, i32)>,
) -> Result<(), sqlx::Error> {
    let mut by_year: BTreeMap<i32, Vec<Pseudonym>> = BTreeMap::new();
    for (pseudonym, year) in seen {
        by_year.entry(year).or_default().push(pseudonym);
    }
    let backend = tx.backend();
    // One parameter is the cut-off year.
    let per_statement = tx.rows_per_statement(1).saturating_sub(1).max(1);
    for (year, mut pseudonyms) in by_year {
        pseudonyms.sort_unstable();
        for chunk in pseudonyms.chunks(per_statement) {
            let sql = format!(
                "UPDATE {} SET birth_year = NULL, aged_90_or_over = {} \
                 WHERE birth_year IS NOT NULL AND birth_year <= $1 AND pseudonym IN ({})",
                pick(backend, "deid_patients", "chartlog_deid_patients"),
                pick(backend, "1", "TRUE"),
                (2..chunk.len() + 2)
                    .map(|n| format!("${n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            let mut args = Vec::with_capacity(chunk.len() + 1);
            args.push(SqlArg::I64(
                i64::from(year) - i64::from(AGE_YEARS_GROUPED_MIN),
            ));
            args.extend(
                chunk
                    .iter()
                    .map(|pseudonym| SqlArg::Text(pseudonym.as_str().to_owned())),
            );
            tx.execute(AssertSqlSafe(sql), args).await?;
        }
    }
    Ok(())
}

async fn insert_observations(
    tx: &mut ProjectionTx,
    rows: &[ObservationRow],
) -> Result<(), sqlx::Error> {
    let backend = tx.backend();
    let cast = (backend == Backend::Postgres).then_some((OBSERVATION_VALUE_COLUMN, "numeric"));
    for chunk in rows.chunks(tx.rows_per_statement(OBSERVATION_COLUMNS)) {
        let sql = format!(
            "INSERT INTO {} (row_key, pseudonym, year, code_system, code, value_kind, value, unit, \
             value_code_system, value_code) VALUES {} ON CONFLICT (row_key) DO NOTHING",
            pick(backend, "deid_observations", "deidentified.observations"),
            values_placeholders_cast(chunk.len(), OBSERVATION_COLUMNS, 1, cast),
        );
        let mut args = Vec::with_capacity(chunk.len() * OBSERVATION_COLUMNS);
        for row in chunk {
            let (value, unit, value_system, value_code) = match &row.value {
                DeidValue::Quantity(q) => (
                    Some(q.value().to_owned()),
                    Some(q.unit().to_owned()),
                    None,
                    None,
                ),
                DeidValue::Coded(c) => (
                    None,
                    None,
                    Some(c.system().as_str().to_owned()),
                    Some(c.code().to_owned()),
                ),
                DeidValue::TextRemoved => (None, None, None, None),
            };
            args.extend([
                SqlArg::Text(row.row_key.as_str().to_owned()),
                SqlArg::Text(row.pseudonym.as_str().to_owned()),
                year(row.year),
                SqlArg::Text(row.code.system().as_str().to_owned()),
                SqlArg::Text(row.code.code().to_owned()),
                SqlArg::Text(row.value.kind().to_owned()),
                SqlArg::OptText(value),
                SqlArg::OptText(unit),
                SqlArg::OptText(value_system),
                SqlArg::OptText(value_code),
            ]);
        }
        tx.execute(AssertSqlSafe(sql), args).await?;
    }
    Ok(())
}

/// Every table's rows of one patient, through the pseudonym indexes.
const ERASE_STATEMENTS: [(&str, &str); 5] = [
    (
        "DELETE FROM deid_observations WHERE pseudonym = $1",
        "DELETE FROM deidentified.observations WHERE pseudonym = $1",
    ),
    (
        "DELETE FROM deid_conditions WHERE pseudonym = $1",
        "DELETE FROM deidentified.conditions WHERE pseudonym = $1",
    ),
    (
        "DELETE FROM deid_medication_orders WHERE pseudonym = $1",
        "DELETE FROM deidentified.medication_orders WHERE pseudonym = $1",
    ),
    (
        "DELETE FROM deid_allergies WHERE pseudonym = $1",
        "DELETE FROM deidentified.allergies WHERE pseudonym = $1",
    ),
    (
        "DELETE FROM deid_patients WHERE pseudonym = $1",
        "DELETE FROM chartlog_deid_patients WHERE pseudonym = $1",
    ),
];

const RESET_STATEMENTS: [(&str, &str); 5] = [
    (
        "DELETE FROM deid_observations",
        "DELETE FROM deidentified.observations",
    ),
    (
        "DELETE FROM deid_conditions",
        "DELETE FROM deidentified.conditions",
    ),
    (
        "DELETE FROM deid_medication_orders",
        "DELETE FROM deidentified.medication_orders",
    ),
    (
        "DELETE FROM deid_allergies",
        "DELETE FROM deidentified.allergies",
    ),
    (
        "DELETE FROM deid_patients",
        "DELETE FROM chartlog_deid_patients",
    ),
];

#[async_trait]
impl Projection for DeidentifiedProjection {
    fn name(&self) -> &'static str {
        DEIDENTIFIED_PROJECTION_NAME
    }

    fn version(&self) -> u32 {
        DEIDENTIFIED_PROJECTION_VERSION
    }

    async fn apply(
        &self,
        tx: &mut ProjectionTx,
        events: &[ProjectedEvent],
    ) -> Result<(), ProjectionError> {
        let mut observations = Vec::new();
        // Patients asked about since their birth year last changed, each with the latest year
        // it was seen in (a later year subsumes an earlier one): asked together at the end,
        // or before anything else touches that patient's row, so the answer is the one
        // event-by-event application would give, however the log is cut into batches.
        let mut seen_in: HashMap<Pseudonym, i32> = HashMap::new();
        for projected in events {
            let changes = match &projected.body {
                EventBody::Patient {
                    patient_id, event, ..
                } => deidentify_event(
                    &EventContext {
                        patient_id: *patient_id,
                        recorded_at: projected.header.recorded_at,
                    },
                    event,
                    &self.pseudonymizer,
                ),
                // The tombstone after its key is gone: drop the patient's rows. Other events of
                // an erased patient (in a rebuild) never reach the views.
                EventBody::Erased { patient_id } if projected.is_erasure() => {
                    vec![DeidChange::ErasePatient {
                        pseudonym: self.pseudonymizer.patient(*patient_id),
                    }]
                }
                EventBody::Erased { .. } | EventBody::Audit { .. } | EventBody::NotPatient => {
                    Vec::new()
                }
            };
            for change in changes {
                match change {
                    // Held back and inserted together; only an erasure touches the
                    // observations table otherwise, so it goes after the ones held back.
                    DeidChange::InsertObservation(row) => observations.push(row),
                    DeidChange::AgeAsOf { pseudonym, year } => {
                        let latest = seen_in.entry(pseudonym).or_insert(year);
                        *latest = (*latest).max(year);
                    }
                    DeidChange::InsertPatient(_)
                    | DeidChange::CorrectPatient { .. }
                    | DeidChange::ErasePatient { .. } => {
                        if matches!(change, DeidChange::ErasePatient { .. }) {
                            insert_observations(tx, &std::mem::take(&mut observations)).await?;
                        }
                        if let Some(pseudonym) = change.pseudonym()
                            && let Some((pseudonym, year)) = seen_in.remove_entry(pseudonym)
                        {
                            group_aged(tx, [(pseudonym, year)]).await?;
                        }
                        apply_change(tx, change).await?;
                    }
                    other => apply_change(tx, other).await?,
                }
            }
        }
        insert_observations(tx, &observations).await?;
        group_aged(tx, seen_in).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut ProjectionTx) -> Result<(), ProjectionError> {
        let backend = tx.backend();
        for (sqlite, postgres) in RESET_STATEMENTS {
            tx.execute(pick(backend, sqlite, postgres), vec![]).await?;
        }
        Ok(())
    }
}
