//! The record history read model: for each patient, every change of the record in order,
//! when (the event's recorded-at time), by whom (user id, role, purpose of use, break-glass),
//! what kind of change (the event type) and the before and after of each changed field.
//! This is what a patient who asks for the history of their record sees.
//!
//! **Invariants:**
//! - when and by whom come from the clear event header (never PHI) and are stored in the
//!   clear, so the history can be paged and filtered without a key; the field values are PHI
//!   and are sealed under the patient's data key, with patient id and stream version as
//!   associated data;
//! - the projection keeps its own sealed copy of each mutable entry's current value
//!   (`chartlog_history_entries`) to derive the next "before": it never reads another read
//!   model, so it rebuilds on its own;
//! - on the erasure tombstone every row of the patient is deleted through the primary key.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chartlog_crypto::{DataKey, DataKeys, KeyError, KeyStore, open_record, seal_record};
use chartlog_domain::codes::Code;
use chartlog_domain::patient::ObservationValue;
use chartlog_domain::{Actor, PatientEvent, PatientId, StreamId, Timestamp, UserId};
use serde::Serialize;
use serde_json::Value;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::db::{
    ProjectionDb, ProjectionTx, SqlArg, stored_entries_for_batch, to_i64, values_placeholders,
};
use crate::entries::{EntryKind, Fields, diff, evolve_entry, touched};
use crate::error::ProjectionError;
use crate::runner::{EventBody, ProjectedEvent, Projection};

/// The record history projection's name.
pub const HISTORY_PROJECTION: &str = "history";
/// Bump when the fold or the tables change.
pub const HISTORY_PROJECTION_VERSION: u32 = 1;
/// Most changes one history page returns.
pub const HISTORY_PAGE_MAX: u32 = 200;
const _: () = assert!(HISTORY_PAGE_MAX >= 1);

const ROW_AD: &[u8] = b"history-row";
const ENTRY_AD: &[u8] = b"history-entry";

/// Folds patient events into the record history.
#[derive(Debug, Default)]
pub struct HistoryProjection;

type Slot = crate::entries::EntrySlot;

struct Row<'a> {
    patient_id: PatientId,
    event: &'a ProjectedEvent,
    sealed: Vec<u8>,
}

fn row_ad(patient_id: &Uuid, stream_version: u64) -> ([u8; 16], [u8; 8]) {
    (*patient_id.as_bytes(), stream_version.to_be_bytes())
}

/// One field's change as sealed: a field absent before (or after) is left out rather than
/// written as null, which the reader takes to mean the same.
#[derive(Serialize)]
struct SealedChange<'a> {
    field: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    before: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<SealedValue<'a>>,
}

/// A value as sealed: a JSON tree, or a recorded observation's field serialized straight
/// from the event (the same JSON its tree would give), since building the tree of each new
/// observation only to serialize it was a large part of a rebuild's history fold.
#[derive(Serialize)]
#[serde(untagged)]
enum SealedValue<'a> {
    Json(&'a Value),
    Code(&'a Code),
    Result(&'a ObservationValue),
    Time(&'a Timestamp),
}

/// The changes of a newly recorded observation, field by field in name order (as
/// [`crate::entries::evolve_entry`] and [`diff`] would give them); `None` for any other event.
fn observation_changes(event: &PatientEvent) -> Option<Vec<SealedChange<'_>>> {
    let PatientEvent::ObservationRecorded {
        code,
        value,
        effective_at,
        ..
    } = event
    else {
        return None;
    };
    let new = |field, after| SealedChange {
        field,
        before: None,
        after: Some(after),
    };
    Some(vec![
        new("code", SealedValue::Code(code)),
        new("effective_at", SealedValue::Time(effective_at)),
        new("value", SealedValue::Result(value)),
    ])
}

fn seal_changes(
    key: &DataKey,
    patient_id: PatientId,
    stream_version: u64,
    kind: EntryKind,
    entry_id: Uuid,
    changes: Vec<SealedChange<'_>>,
) -> Vec<u8> {
    // Serialized straight from borrowed values: building a `json!` tree first copied every
    // changed value once more, which showed in a rebuild's profile.
    #[derive(Serialize)]
    struct SealedChanges<'a> {
        entry_kind: &'static str,
        entry_id: Uuid,
        changes: Vec<SealedChange<'a>>,
    }
    let body = SealedChanges {
        entry_kind: kind.as_str(),
        entry_id,
        changes,
    };
    let plaintext = serde_json::to_vec(&body).expect("JSON serializes");
    let (patient, version) = row_ad(&patient_id.as_uuid(), stream_version);
    seal_record(key, &[ROW_AD, &patient, &version], &plaintext)
}

#[async_trait]
impl Projection for HistoryProjection {
    fn name(&self) -> &'static str {
        HISTORY_PROJECTION
    }

    fn version(&self) -> u32 {
        HISTORY_PROJECTION_VERSION
    }

    async fn apply(
        &self,
        tx: &mut ProjectionTx,
        events: &[ProjectedEvent],
    ) -> Result<(), ProjectionError> {
        let mut entries: BTreeMap<Slot, (Fields, Arc<DataKey>)> = BTreeMap::new();
        let mut rows: Vec<Row> = Vec::new();
        let mut erased: BTreeSet<PatientId> = BTreeSet::new();
        let mut stored = stored_entries(tx, events).await?;
        for event in events {
            match &event.body {
                EventBody::Patient {
                    patient_id,
                    event: patient_event,
                    key,
                } => {
                    let Some(touch) = touched(*patient_id, patient_event) else {
                        erase(&mut entries, &mut rows, &mut erased, *patient_id);
                        continue;
                    };
                    let seal = |changes: Vec<SealedChange<'_>>| {
                        seal_changes(
                            key,
                            *patient_id,
                            event.header.stream_version,
                            touch.kind,
                            touch.id,
                            changes,
                        )
                    };
                    let sealed = match observation_changes(patient_event) {
                        // Recorded once and never changed: nothing to diff against or keep.
                        Some(changes) => seal(changes),
                        None => {
                            let slot = (*patient_id, touch.kind, touch.id);
                            let before = match entries.remove(&slot) {
                                Some((fields, _)) => Some(fields),
                                None if touch.creates => None,
                                None => stored.remove(&slot),
                            };
                            let (after, sealed) = changed_entry(before, patient_event, seal);
                            if touch.kind.is_mutable() {
                                entries.insert(slot, (after, key.clone()));
                            }
                            sealed
                        }
                    };
                    rows.push(Row {
                        patient_id: *patient_id,
                        event,
                        sealed,
                    });
                }
                EventBody::Erased { patient_id } if event.is_erasure() => {
                    erase(&mut entries, &mut rows, &mut erased, *patient_id);
                }
                EventBody::Erased { .. } | EventBody::Audit { .. } | EventBody::NotPatient => {}
            }
        }

        for patient_id in &erased {
            for sql in [
                "DELETE FROM chartlog_history WHERE patient_id = $1",
                "DELETE FROM chartlog_history_entries WHERE patient_id = $1",
            ] {
                tx.execute(sql, vec![SqlArg::Uuid(patient_id.as_uuid())])
                    .await?;
            }
        }
        let rows_per_statement = tx.rows_per_statement(9);
        for chunk in rows.chunks_mut(rows_per_statement) {
            let sql = format!(
                "INSERT INTO chartlog_history (patient_id, stream_version, recorded_at_us, \
                 actor_user_id, actor_role, purpose_of_use, break_glass, event_type, sealed) \
                 VALUES {}",
                values_placeholders(chunk.len(), 9, 1)
            );
            let mut args = Vec::with_capacity(chunk.len() * 9);
            for row in chunk {
                let header = &row.event.header;
                args.push(SqlArg::Uuid(row.patient_id.as_uuid()));
                args.push(SqlArg::I64(to_i64(header.stream_version)));
                args.push(SqlArg::I64(header.recorded_at.unix_micros()));
                args.push(SqlArg::Uuid(header.actor.user_id.as_uuid()));
                args.push(SqlArg::Text(header.actor.role.as_str().to_owned()));
                args.push(SqlArg::Text(
                    header.actor.purpose_of_use.as_str().to_owned(),
                ));
                args.push(SqlArg::Bool(header.actor.break_glass));
                args.push(SqlArg::Text(header.event_type.clone()));
                args.push(SqlArg::Bytes(std::mem::take(&mut row.sealed)));
            }
            tx.execute(AssertSqlSafe(sql), args).await?;
        }
        let entries: Vec<_> = entries.iter().collect();
        for chunk in entries.chunks(tx.rows_per_statement(4)) {
            let sql = format!(
                "INSERT INTO chartlog_history_entries (patient_id, kind, entry_id, sealed) \
                 VALUES {} ON CONFLICT (patient_id, kind, entry_id) DO UPDATE SET \
                 sealed = excluded.sealed",
                values_placeholders(chunk.len(), 4, 1)
            );
            let mut args = Vec::with_capacity(chunk.len() * 4);
            for (slot, (fields, key)) in chunk {
                let plaintext = serde_json::to_vec(fields).expect("a JSON object serializes");
                let patient = slot.0.as_uuid();
                let sealed = seal_record(
                    key,
                    &[
                        ENTRY_AD,
                        patient.as_bytes(),
                        slot.1.as_str().as_bytes(),
                        slot.2.as_bytes(),
                    ],
                    &plaintext,
                );
                args.push(SqlArg::Uuid(patient));
                args.push(SqlArg::Text(slot.1.as_str().to_owned()));
                args.push(SqlArg::Uuid(slot.2));
                args.push(SqlArg::Bytes(sealed));
            }
            tx.execute(AssertSqlSafe(sql), args).await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut ProjectionTx) -> Result<(), ProjectionError> {
        tx.execute("DELETE FROM chartlog_history", vec![]).await?;
        tx.execute("DELETE FROM chartlog_history_entries", vec![])
            .await?;
        Ok(())
    }
}

/// The entry after `event` and the sealed changes from `before`. A new entry's change is
/// every field it has: no empty entry to diff against.
fn changed_entry(
    before: Option<Fields>,
    event: &PatientEvent,
    seal: impl FnOnce(Vec<SealedChange<'_>>) -> Vec<u8>,
) -> (Fields, Vec<u8>) {
    let Some(before) = before else {
        let after = evolve_entry(None, event);
        let changes = after
            .iter()
            .map(|(field, value)| SealedChange {
                field,
                before: None,
                after: Some(SealedValue::Json(value)),
            })
            .collect();
        let sealed = seal(changes);
        return (after, sealed);
    };
    let after = evolve_entry(Some(before.clone()), event);
    let changes = diff(Some(&before), &after);
    let sealed = seal(
        changes
            .iter()
            .map(|change| SealedChange {
                field: &change.field,
                before: change.before.as_ref(),
                after: change.after.as_ref().map(SealedValue::Json),
            })
            .collect(),
    );
    (after, sealed)
}

fn erase(
    entries: &mut BTreeMap<Slot, (Fields, Arc<DataKey>)>,
    rows: &mut Vec<Row<'_>>,
    erased: &mut BTreeSet<PatientId>,
    patient_id: PatientId,
) {
    entries.retain(|slot, _| slot.0 != patient_id);
    rows.retain(|row| row.patient_id != patient_id);
    erased.insert(patient_id);
}

/// The stored value of every entry a batch changes and needs the value before of, opened
/// ([`stored_entries_for_batch`]).
async fn stored_entries(
    tx: &mut ProjectionTx,
    events: &[ProjectedEvent],
) -> Result<HashMap<Slot, Fields>, ProjectionError> {
    let entry_of = |patient_id: PatientId, event: &PatientEvent| {
        let touch = touched(patient_id, event)?;
        Some(((patient_id, touch.kind, touch.id), !touch.creates))
    };
    let mut stored = HashMap::new();
    for (slot, key, sealed) in
        stored_entries_for_batch(tx, "chartlog_history_entries", events, entry_of).await?
    {
        stored.insert(slot, open_entry(&key, &slot, &sealed)?);
    }
    Ok(stored)
}

fn open_entry(key: &DataKey, slot: &Slot, sealed: &[u8]) -> Result<Fields, ProjectionError> {
    let patient = slot.0.as_uuid();
    let malformed = |reason| ProjectionError::MalformedRow {
        table: "chartlog_history_entries",
        patient_id: patient,
        reason,
    };
    let plaintext = open_record(
        key,
        &[
            ENTRY_AD,
            patient.as_bytes(),
            slot.1.as_str().as_bytes(),
            slot.2.as_bytes(),
        ],
        sealed,
    )
    .map_err(|_| malformed("does not open under the patient's key"))?;
    serde_json::from_slice(&plaintext).map_err(|_| malformed("not a JSON object"))
}

// ---- Queries ----------------------------------------------------------------------------

/// A PHI value from the record (a field's before or after), as JSON. Redacted in `Debug`, no
/// `Display`; reach it through [`PhiValue::expose_phi`].
#[derive(Clone, PartialEq, Eq)]
pub struct PhiValue(Value);

impl PhiValue {
    pub fn expose_phi(&self) -> &Value {
        &self.0
    }
}

impl fmt::Debug for PhiValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PhiValue(<phi>)")
    }
}

/// One field's change. `before` is `None` when the entry was new.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldChange {
    pub field: String,
    pub before: Option<PhiValue>,
    pub after: Option<PhiValue>,
}

/// One change of a patient's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub stream_version: u64,
    pub recorded_at: Timestamp,
    pub actor: Actor,
    /// The event type, e.g. `condition_resolved`.
    pub event_type: String,
    pub entry_kind: EntryKind,
    pub entry_id: Uuid,
    pub changes: Vec<FieldChange>,
}

/// A page of history, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Pass as `before_version` for the next (older) page; `None` on the last page.
    pub next_before_version: Option<u64>,
}

/// What a history read finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryAnswer {
    Found(HistoryPage),
    /// The patient was erased: their history went with their key.
    Erased {
        erased_at: Timestamp,
    },
    NotFound,
}

/// A page of a patient's record history, newest first: changes with a stream version below
/// `before_version` (all, when `None`), at most `limit` (capped at [`HISTORY_PAGE_MAX`]).
#[tracing::instrument(skip_all, fields(patient = %patient_id))]
pub async fn read_history<K: KeyStore>(
    db: &ProjectionDb,
    keys: &DataKeys<K>,
    patient_id: PatientId,
    before_version: Option<u64>,
    limit: u32,
) -> Result<HistoryAnswer, ProjectionError> {
    let stream = StreamId::patient(patient_id);
    let key = match keys.key_for_read(&stream).await {
        Ok((_, key)) => key,
        Err(KeyError::Erased { destroyed_at, .. }) => {
            return Ok(HistoryAnswer::Erased {
                erased_at: destroyed_at,
            });
        }
        Err(KeyError::NoKey { .. }) => return Ok(HistoryAnswer::NotFound),
        Err(source) => return Err(ProjectionError::Key { stream, source }),
    };
    let limit = limit.clamp(1, HISTORY_PAGE_MAX);
    let before = before_version.map_or(i64::MAX, to_i64);
    // One more than the page, to know whether an older page exists.
    let rows = db
        .fetch_all(
            "SELECT stream_version, recorded_at_us, actor_user_id, actor_role, purpose_of_use, \
             break_glass, event_type, sealed FROM chartlog_history \
             WHERE patient_id = $1 AND stream_version < $2 \
             ORDER BY stream_version DESC LIMIT $3",
            vec![
                SqlArg::Uuid(patient_id.as_uuid()),
                SqlArg::I64(before),
                SqlArg::I64(i64::from(limit) + 1),
            ],
        )
        .await?;
    let malformed = |reason| ProjectionError::MalformedRow {
        table: "chartlog_history",
        patient_id: patient_id.as_uuid(),
        reason,
    };
    let more = rows.len() > limit as usize;
    let mut entries = Vec::with_capacity(rows.len().min(limit as usize));
    for row in rows.iter().take(limit as usize) {
        let stream_version =
            u64::try_from(row.i64(0)?).map_err(|_| malformed("negative version"))?;
        let (patient, version) = row_ad(&patient_id.as_uuid(), stream_version);
        let plaintext = open_record(&key, &[ROW_AD, &patient, &version], &row.bytes(7)?)
            .map_err(|_| malformed("does not open under the patient's key"))?;
        let body: Value = serde_json::from_slice(&plaintext).map_err(|_| malformed("not JSON"))?;
        let entry_kind = body["entry_kind"]
            .as_str()
            .and_then(EntryKind::parse)
            .ok_or_else(|| malformed("entry kind"))?;
        let entry_id = body["entry_id"]
            .as_str()
            .and_then(|raw| Uuid::parse_str(raw).ok())
            .ok_or_else(|| malformed("entry id"))?;
        let changes = body["changes"]
            .as_array()
            .ok_or_else(|| malformed("changes"))?
            .iter()
            .map(|change| {
                let value = |name: &str| match change.get(name) {
                    None | Some(Value::Null) => None,
                    Some(value) => Some(PhiValue(value.clone())),
                };
                Ok(FieldChange {
                    field: change["field"]
                        .as_str()
                        .ok_or_else(|| malformed("field name"))?
                        .to_owned(),
                    before: value("before"),
                    after: value("after"),
                })
            })
            .collect::<Result<Vec<_>, ProjectionError>>()?;
        entries.push(HistoryEntry {
            stream_version,
            recorded_at: Timestamp::from_unix_micros(row.i64(1)?)
                .map_err(|_| malformed("recorded-at time"))?,
            actor: Actor {
                user_id: UserId::from_uuid(row.uuid(2)?),
                role: row.text(3)?.parse().map_err(|_| malformed("role"))?,
                purpose_of_use: row
                    .text(4)?
                    .parse()
                    .map_err(|_| malformed("purpose of use"))?,
                break_glass: row.bool(5)?,
            },
            event_type: row.text(6)?,
            entry_kind,
            entry_id,
            changes,
        });
    }
    let next_before_version = if more {
        entries.last().map(|entry| entry.stream_version)
    } else {
        None
    };
    Ok(HistoryAnswer::Found(HistoryPage {
        entries,
        next_before_version,
    }))
}

#[cfg(test)]
mod tests {
    use chartlog_domain::{Timestamp, synthetic};

    use super::*;

    /// A new observation's changes serialized straight from the event read back as the same
    /// JSON as the changes of the entry it makes, diffed against nothing.
    #[test]
    fn an_observation_seals_what_its_entry_diff_would() {
        let at = Timestamp::from_unix_micros(1_763_000_000_000_000).unwrap();
        let patient_id = synthetic::patient_id(3);
        let state = chartlog_domain::Patient::default();
        let state = chartlog_domain::evolve(
            state,
            &chartlog_domain::decide(
                &chartlog_domain::Patient::default(),
                synthetic::registration(3),
                at,
            )
            .unwrap()[0],
        );
        let command = synthetic::clinical_command(3, 1, at);
        let events = chartlog_domain::decide(&state, command, at).unwrap();
        let event = &events[0];
        assert!(matches!(event, PatientEvent::ObservationRecorded { .. }));
        assert_eq!(
            touched(patient_id, event).map(|t| t.kind),
            Some(EntryKind::Observation)
        );

        let direct = serde_json::to_value(observation_changes(event).unwrap()).unwrap();
        let entry = evolve_entry(None, event);
        let changes = diff(None, &entry);
        let diffed: Vec<SealedChange> = changes
            .iter()
            .map(|change| SealedChange {
                field: &change.field,
                before: change.before.as_ref(),
                after: change.after.as_ref().map(SealedValue::Json),
            })
            .collect();
        assert_eq!(direct, serde_json::to_value(diffed).unwrap());
        assert!(direct[0].get("before").is_none(), "absent, not null");
    }
}
