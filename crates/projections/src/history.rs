//! The record history read model: for each patient, every change of the record in order,
//! when (the event's recorded-at time), by whom (user id, role, purpose of use, break-glass),
//! what kind of change (the event type) and the before and after of each changed field.
//! This is what a patient who asks for the history of their record sees.
//!
//! **Invariants:**
//! - changes are stored in segments: one row per [`HISTORY_SEGMENT_CHANGES`] consecutive
//!   stream versions of a patient, its bounds fixed by the versions alone, so however the
//!   events were batched (a rebuild, a live run one event at a time) the rows are the same;
//!   a batch that continues a segment opens it, appends and seals it again. One row and one
//!   seal per change was most of a rebuild's database work;
//! - when and by whom come from the clear event header (never PHI) and are stored in the
//!   clear (`headers`), so the history can be paged and filtered without a key; the field
//!   values are PHI and are sealed under the patient's data key, with patient id, segment
//!   start and the headers' bytes as associated data (a header edited in the clear no longer
//!   opens);
//! - a segment holds consecutive versions: a change that does not follow the segment's last
//!   one (an event applied twice, or one skipped within the segment) fails the batch instead
//!   of being written;
//! - the projection keeps its own sealed copy of each mutable entry's current value
//!   (`chartlog_history_entries`) to derive the next "before": it never reads another read
//!   model, so it rebuilds on its own;
//! - on the erasure tombstone every row of the patient is deleted through the primary key.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use chartlog_crypto::{
    DataKey, DataKeys, EventHeader, KeyError, KeyStore, open_record, seal_record,
};
use chartlog_domain::codes::Code;
use chartlog_domain::patient::ObservationValue;
use chartlog_domain::{Actor, PatientEvent, PatientId, StreamId, Timestamp, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::db::{
    Backend, ProjectionDb, ProjectionTx, SqlArg, stored_entries_for_batch, to_i64,
    values_placeholders,
};
use crate::entries::{EntryKind, Fields, diff, evolve_entry, touched};
use crate::error::ProjectionError;
use crate::runner::{EventBody, ProjectedEvent, Projection};

/// The record history projection's name.
pub const HISTORY_PROJECTION: &str = "history";
/// Bump when the fold or the tables change. 2: changes stored in segments.
pub const HISTORY_PROJECTION_VERSION: u32 = 2;
/// Most changes one history page returns.
pub const HISTORY_PAGE_MAX: u32 = 200;
const _: () = assert!(HISTORY_PAGE_MAX >= 1);
/// Changes one history row holds: stream versions `k * 16 + 1 ..= (k + 1) * 16`. Small
/// enough that a live run, which opens and seals its segment again for each event, seals a
/// few kilobytes per change; large enough that a rebuild writes a sixteenth of the rows.
pub const HISTORY_SEGMENT_CHANGES: u64 = 16;

const SEGMENT_AD: &[u8] = b"history-segment";
const ENTRY_AD: &[u8] = b"history-entry";

/// Folds patient events into the record history.
#[derive(Debug, Default)]
pub struct HistoryProjection;

type Slot = crate::entries::EntrySlot;

/// The first stream version of the segment that holds `stream_version`.
fn segment_start(stream_version: u64) -> u64 {
    stream_version.saturating_sub(1) / HISTORY_SEGMENT_CHANGES * HISTORY_SEGMENT_CHANGES + 1
}

/// The associated data of a segment's sealed bodies: whose they are, where the segment starts
/// (`start`, big-endian) and its clear headers.
fn segment_ad<'a>(patient_id: &'a Uuid, start: &'a [u8; 8], headers: &'a str) -> [&'a [u8]; 4] {
    [SEGMENT_AD, patient_id.as_bytes(), start, headers.as_bytes()]
}

fn seal_segment(
    key: &DataKey,
    patient_id: &Uuid,
    start: u64,
    headers: &str,
    bodies: &[u8],
) -> Vec<u8> {
    seal_record(
        key,
        &segment_ad(patient_id, &start.to_be_bytes(), headers),
        bodies,
    )
}

/// Opens what [`seal_segment`] sealed; `None` when it does not open.
fn open_segment(
    key: &DataKey,
    patient_id: &Uuid,
    start: u64,
    headers: &str,
    sealed: &[u8],
) -> Option<Vec<u8>> {
    open_record(
        key,
        &segment_ad(patient_id, &start.to_be_bytes(), headers),
        sealed,
    )
    .ok()
}

/// Who and when of one change, from the clear event header: stored in the clear.
#[derive(Serialize, Deserialize)]
struct ChangeHeader<'a> {
    stream_version: u64,
    recorded_at_us: i64,
    actor_user_id: Uuid,
    #[serde(borrow)]
    actor_role: Cow<'a, str>,
    #[serde(borrow)]
    purpose_of_use: Cow<'a, str>,
    break_glass: bool,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
}

impl<'a> ChangeHeader<'a> {
    fn of(header: &'a EventHeader) -> Self {
        Self {
            stream_version: header.stream_version,
            recorded_at_us: header.recorded_at.unix_micros(),
            actor_user_id: header.actor.user_id.as_uuid(),
            actor_role: Cow::Borrowed(header.actor.role.as_str()),
            purpose_of_use: Cow::Borrowed(header.actor.purpose_of_use.as_str()),
            break_glass: header.actor.break_glass,
            event_type: Cow::Borrowed(&header.event_type),
        }
    }
}

/// What a batch adds to one segment: its changes' headers and bodies as JSON array items,
/// comma-separated, without the brackets, so that appending them to a stored segment gives
/// the same bytes as writing the segment at once.
struct SegmentChanges {
    key: Arc<DataKey>,
    /// The version of the first change this batch adds.
    first: u64,
    last: u64,
    headers: Vec<u8>,
    bodies: Vec<u8>,
}

impl SegmentChanges {
    fn new(key: Arc<DataKey>, first: u64) -> Self {
        Self {
            key,
            first,
            last: first.saturating_sub(1),
            headers: Vec::new(),
            bodies: Vec::new(),
        }
    }

    /// Adds one change; false when it does not follow the last one.
    fn push(&mut self, header: &EventHeader, body: &[u8]) -> bool {
        if header.stream_version != self.last + 1 {
            return false;
        }
        if !self.bodies.is_empty() {
            self.headers.push(b',');
            self.bodies.push(b',');
        }
        // Written in place: no string of its own per change.
        serde_json::to_writer(&mut self.headers, &ChangeHeader::of(header))
            .expect("JSON serializes into memory");
        self.bodies.extend_from_slice(body);
        self.last = header.stream_version;
        true
    }

    fn starts_segment(&self) -> bool {
        self.first == segment_start(self.first)
    }
}

/// A segment as written: the whole of its headers and its sealed bodies.
struct SegmentRow {
    patient_id: Uuid,
    start: u64,
    last: u64,
    headers: String,
    sealed: Vec<u8>,
}

/// `[items]` when there is nothing before, else `before` (a JSON array) with `items`
/// appended; `None` when `before` is not an array.
fn json_array_with(before: Option<&[u8]>, items: &[u8]) -> Option<Vec<u8>> {
    let mut whole = match before {
        None => Vec::with_capacity(items.len() + 2),
        Some(before) => {
            let open = before.strip_suffix(b"]").filter(|b| b.len() > 1)?;
            let mut whole = Vec::with_capacity(open.len() + items.len() + 2);
            whole.extend_from_slice(open);
            whole
        }
    };
    whole.push(if whole.is_empty() { b'[' } else { b',' });
    whole.extend_from_slice(items);
    whole.push(b']');
    Some(whole)
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

/// One change's body: which entry, and its fields' before and after, as JSON.
fn change_body(kind: EntryKind, entry_id: Uuid, changes: Vec<SealedChange<'_>>) -> Vec<u8> {
    // Serialized straight from borrowed values: building a `json!` tree first copied every
    // changed value once more, which showed in a rebuild's profile.
    #[derive(Serialize)]
    struct ChangeBody<'a> {
        entry_kind: &'static str,
        entry_id: Uuid,
        changes: Vec<SealedChange<'a>>,
    }
    let body = ChangeBody {
        entry_kind: kind.as_str(),
        entry_id,
        changes,
    };
    serde_json::to_vec(&body).expect("JSON serializes")
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
        let mut segments: BTreeMap<(PatientId, u64), SegmentChanges> = BTreeMap::new();
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
                        erase(&mut entries, &mut segments, &mut erased, *patient_id);
                        continue;
                    };
                    let encode =
                        |changes: Vec<SealedChange<'_>>| change_body(touch.kind, touch.id, changes);
                    let body = match observation_changes(patient_event) {
                        // Recorded once and never changed: nothing to diff against or keep.
                        Some(changes) => encode(changes),
                        None => {
                            let slot = (*patient_id, touch.kind, touch.id);
                            let before = match entries.remove(&slot) {
                                Some((fields, _)) => Some(fields),
                                None if touch.creates => None,
                                None => stored.remove(&slot),
                            };
                            let (after, body) = changed_entry(before, patient_event, encode);
                            if touch.kind.is_mutable() {
                                entries.insert(slot, (after, key.clone()));
                            }
                            body
                        }
                    };
                    let version = event.header.stream_version;
                    let added = segments
                        .entry((*patient_id, segment_start(version)))
                        .or_insert_with(|| SegmentChanges::new(key.clone(), version))
                        .push(&event.header, &body);
                    if !added {
                        return Err(out_of_order(*patient_id));
                    }
                }
                EventBody::Erased { patient_id } if event.is_erasure() => {
                    erase(&mut entries, &mut segments, &mut erased, *patient_id);
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
        let (new, continued): (Vec<_>, Vec<_>) = segments
            .into_iter()
            .partition(|(_, changes)| changes.starts_segment());
        let new = new
            .into_iter()
            .map(|((patient_id, start), changes)| {
                segment_row(patient_id.as_uuid(), start, None, changes)
            })
            .collect::<Result<Vec<_>, _>>()?;
        write_segments(tx, new, false).await?;
        let continued = continue_segments(tx, continued).await?;
        write_segments(tx, continued, true).await?;

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

    /// On SQLite, the reset frees the tables' pages without zeroing them (`secure_delete`
    /// FAST for these two statements only). Zeroing is how the store makes a destroyed key's
    /// bytes unrecoverable; here it bought nothing: the field values are sealed under the
    /// patients' keys, and the clear headers repeat what the log's own headers keep by design.
    /// It cost a tenth of a rebuild (0.4 s of 4.3 s for 200,000 events: every page of the
    /// history written as zeros into the WAL, then fsynced). Erasure still deletes a patient's
    /// rows with zeroing.
    async fn reset(&self, tx: &mut ProjectionTx) -> Result<(), ProjectionError> {
        let sqlite = tx.backend() == Backend::Sqlite;
        if sqlite {
            tx.execute("PRAGMA secure_delete = FAST", vec![]).await?;
        }
        let mut deleted = Ok(0);
        for table in [
            "DELETE FROM chartlog_history",
            "DELETE FROM chartlog_history_entries",
        ] {
            deleted = tx.execute(table, vec![]).await;
            if deleted.is_err() {
                break;
            }
        }
        // Restored whether or not the deletes went through: the connection goes back to the
        // pool, and everything else relies on zeroing.
        if sqlite {
            tx.execute("PRAGMA secure_delete = ON", vec![]).await?;
        }
        deleted?;
        Ok(())
    }
}

fn out_of_order(patient_id: PatientId) -> ProjectionError {
    ProjectionError::MalformedRow {
        table: "chartlog_history",
        patient_id: patient_id.as_uuid(),
        reason: "a change does not follow the last one of its segment",
    }
}

/// The segment row `stored` (its headers and opened bodies; `None` for a new segment) with
/// `changes` appended, sealed.
fn segment_row(
    patient_id: Uuid,
    start: u64,
    stored: Option<(&str, &[u8])>,
    changes: SegmentChanges,
) -> Result<SegmentRow, ProjectionError> {
    let malformed = |reason| ProjectionError::MalformedRow {
        table: "chartlog_history",
        patient_id,
        reason,
    };
    let headers = json_array_with(
        stored.map(|(headers, _)| headers.as_bytes()),
        &changes.headers,
    )
    .and_then(|headers| String::from_utf8(headers).ok())
    .ok_or_else(|| malformed("headers are not a JSON array"))?;
    let bodies = json_array_with(stored.map(|(_, bodies)| bodies), &changes.bodies)
        .ok_or_else(|| malformed("changes are not a JSON array"))?;
    let sealed = seal_segment(&changes.key, &patient_id, start, &headers, &bodies);
    Ok(SegmentRow {
        patient_id,
        start,
        last: changes.last,
        headers,
        sealed,
    })
}

/// Segments this batch continues: each stored row read in one statement per chunk, opened,
/// checked to end just before the batch's first change to it, and extended.
async fn continue_segments(
    tx: &mut ProjectionTx,
    continued: Vec<((PatientId, u64), SegmentChanges)>,
) -> Result<Vec<SegmentRow>, ProjectionError> {
    let mut rows = Vec::with_capacity(continued.len());
    let mut continued: HashMap<(Uuid, u64), SegmentChanges> = continued
        .into_iter()
        .map(|((patient_id, start), changes)| ((patient_id.as_uuid(), start), changes))
        .collect();
    let wanted: Vec<(Uuid, u64)> = continued.keys().copied().collect();
    for chunk in wanted.chunks(tx.rows_per_statement(2)) {
        let sql = format!(
            "SELECT patient_id, first_version, last_version, headers, sealed \
             FROM chartlog_history WHERE (patient_id, first_version) IN (VALUES {})",
            values_placeholders(chunk.len(), 2, 1)
        );
        let mut args = Vec::with_capacity(chunk.len() * 2);
        for (patient_id, start) in chunk {
            args.push(SqlArg::Uuid(*patient_id));
            args.push(SqlArg::I64(to_i64(*start)));
        }
        for row in tx.fetch_all(AssertSqlSafe(sql), args).await? {
            let patient_id = row.uuid(0)?;
            let start = u64::try_from(row.i64(1)?).unwrap_or(0);
            let Some(changes) = continued.remove(&(patient_id, start)) else {
                continue;
            };
            let last = u64::try_from(row.i64(2)?).unwrap_or(0);
            if last.checked_add(1) != Some(changes.first) {
                return Err(out_of_order(PatientId::from_uuid(patient_id)));
            }
            let headers = row.text(3)?;
            let bodies = open_segment(&changes.key, &patient_id, start, &headers, &row.bytes(4)?)
                .ok_or_else(|| ProjectionError::MalformedRow {
                table: "chartlog_history",
                patient_id,
                reason: "does not open under the patient's key",
            })?;
            rows.push(segment_row(
                patient_id,
                start,
                Some((&headers, &bodies)),
                changes,
            )?);
        }
    }
    // A segment continued but never started: the changes before this batch's are missing.
    if let Some((patient_id, _)) = continued.keys().next() {
        return Err(out_of_order(PatientId::from_uuid(*patient_id)));
    }
    Ok(rows)
}

/// Inserts segment rows; `replace` for segments that continue stored ones. A new segment
/// that is already there (a batch applied twice) fails on the primary key.
async fn write_segments(
    tx: &mut ProjectionTx,
    rows: Vec<SegmentRow>,
    replace: bool,
) -> Result<(), ProjectionError> {
    let on_conflict = if replace {
        " ON CONFLICT (patient_id, first_version) DO UPDATE SET \
         last_version = excluded.last_version, headers = excluded.headers, \
         sealed = excluded.sealed"
    } else {
        ""
    };
    let mut rows = rows.into_iter().peekable();
    let rows_per_statement = tx.rows_per_statement(5);
    while rows.peek().is_some() {
        let chunk: Vec<SegmentRow> = rows.by_ref().take(rows_per_statement).collect();
        let sql = format!(
            "INSERT INTO chartlog_history (patient_id, first_version, last_version, headers, \
             sealed) VALUES {}{on_conflict}",
            values_placeholders(chunk.len(), 5, 1)
        );
        let mut args = Vec::with_capacity(chunk.len() * 5);
        for row in chunk {
            args.push(SqlArg::Uuid(row.patient_id));
            args.push(SqlArg::I64(to_i64(row.start)));
            args.push(SqlArg::I64(to_i64(row.last)));
            args.push(SqlArg::Text(row.headers));
            args.push(SqlArg::Bytes(row.sealed));
        }
        tx.execute(AssertSqlSafe(sql), args).await?;
    }
    Ok(())
}

/// The entry after `event` and the encoded changes from `before`. A new entry's change is
/// every field it has: no empty entry to diff against.
fn changed_entry(
    before: Option<Fields>,
    event: &PatientEvent,
    encode: impl FnOnce(Vec<SealedChange<'_>>) -> Vec<u8>,
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
        let body = encode(changes);
        return (after, body);
    };
    let after = evolve_entry(Some(before.clone()), event);
    let changes = diff(Some(&before), &after);
    let body = encode(
        changes
            .iter()
            .map(|change| SealedChange {
                field: &change.field,
                before: change.before.as_ref(),
                after: change.after.as_ref().map(SealedValue::Json),
            })
            .collect(),
    );
    (after, body)
}

fn erase(
    entries: &mut BTreeMap<Slot, (Fields, Arc<DataKey>)>,
    segments: &mut BTreeMap<(PatientId, u64), SegmentChanges>,
    erased: &mut BTreeSet<PatientId>,
    patient_id: PatientId,
) {
    entries.retain(|slot, _| slot.0 != patient_id);
    segments.retain(|(segment_of, _), _| *segment_of != patient_id);
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

/// The change body as stored: which entry, and each field's before and after (absent or null
/// when there was none: serde reads both as `None`).
#[derive(Deserialize)]
struct StoredChange {
    entry_kind: String,
    entry_id: Uuid,
    changes: Vec<StoredField>,
}

#[derive(Deserialize)]
struct StoredField {
    field: String,
    before: Option<Value>,
    after: Option<Value>,
}

fn history_entry(header: ChangeHeader<'_>, body: StoredChange) -> Option<HistoryEntry> {
    Some(HistoryEntry {
        stream_version: header.stream_version,
        recorded_at: Timestamp::from_unix_micros(header.recorded_at_us).ok()?,
        actor: Actor {
            user_id: UserId::from_uuid(header.actor_user_id),
            role: header.actor_role.parse().ok()?,
            purpose_of_use: header.purpose_of_use.parse().ok()?,
            break_glass: header.break_glass,
        },
        event_type: header.event_type.into_owned(),
        entry_kind: EntryKind::parse(&body.entry_kind)?,
        entry_id: body.entry_id,
        changes: body
            .changes
            .into_iter()
            .map(|change| FieldChange {
                field: change.field,
                before: change.before.map(PhiValue),
                after: change.after.map(PhiValue),
            })
            .collect(),
    })
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
    let limit = limit.clamp(1, HISTORY_PAGE_MAX) as usize;
    let before = before_version.unwrap_or(u64::MAX);
    let patient = patient_id.as_uuid();
    let malformed = |reason| ProjectionError::MalformedRow {
        table: "chartlog_history",
        patient_id: patient,
        reason,
    };
    // One more change than the page, to know whether an older page exists; segments newest
    // first, as many at a time as the page needs when they are full.
    let wanted = limit + 1;
    let segments_per_read = wanted.div_ceil(HISTORY_SEGMENT_CHANGES as usize) + 1;
    let mut entries = Vec::with_capacity(wanted);
    // A segment that starts below `before` holds a version below it. A `before_version`
    // past any version (it comes from a query string) reads from the newest.
    let mut below = i64::try_from(before).unwrap_or(i64::MAX);
    'segments: loop {
        let rows = db
            .fetch_all(
                "SELECT first_version, headers, sealed FROM chartlog_history \
                 WHERE patient_id = $1 AND first_version < $2 \
                 ORDER BY first_version DESC LIMIT $3",
                vec![
                    SqlArg::Uuid(patient),
                    SqlArg::I64(below),
                    SqlArg::I64(to_i64(segments_per_read as u64)),
                ],
            )
            .await?;
        for row in &rows {
            below = row.i64(0)?;
            let start = u64::try_from(below).map_err(|_| malformed("negative version"))?;
            let headers_text = row.text(1)?;
            let bodies = open_segment(&key, &patient, start, &headers_text, &row.bytes(2)?)
                .ok_or_else(|| malformed("does not open under the patient's key"))?;
            let headers: Vec<ChangeHeader> =
                serde_json::from_str(&headers_text).map_err(|_| malformed("headers"))?;
            let bodies: Vec<StoredChange> =
                serde_json::from_slice(&bodies).map_err(|_| malformed("changes"))?;
            if headers.len() != bodies.len() {
                return Err(malformed("as many headers as changes"));
            }
            for (offset, (header, body)) in headers.into_iter().zip(bodies).enumerate().rev() {
                if start.checked_add(offset as u64) != Some(header.stream_version) {
                    return Err(malformed("versions of a segment"));
                }
                if header.stream_version >= before {
                    continue;
                }
                entries.push(
                    history_entry(header, body)
                        .ok_or_else(|| malformed("actor, time or entry kind"))?,
                );
                if entries.len() == wanted {
                    break 'segments;
                }
            }
        }
        if rows.len() < segments_per_read {
            break;
        }
    }
    let more = entries.len() > limit;
    entries.truncate(limit);
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

    #[test]
    fn segments_hold_sixteen_versions_from_one() {
        let starts: Vec<u64> = [1, 2, 16, 17, 32, 33, 160, 161]
            .into_iter()
            .map(segment_start)
            .collect();
        assert_eq!(starts, [1, 1, 1, 17, 17, 33, 145, 161]);
    }

    #[test]
    fn an_absent_or_null_before_reads_as_none() {
        let field: StoredField =
            serde_json::from_str(r#"{"field":"status","before":null}"#).unwrap();
        assert_eq!((field.before, field.after), (None, None));
    }

    /// Appending a batch's items to a stored segment gives the bytes the segment written at
    /// once would have: a rebuild and a live run write the same headers.
    #[test]
    fn appending_to_a_segment_is_writing_it_at_once() {
        let at_once = json_array_with(None, br#"{"a":1},{"b":2},{"c":3}"#).unwrap();
        let first = json_array_with(None, br#"{"a":1}"#).unwrap();
        let second = json_array_with(Some(&first), br#"{"b":2}"#).unwrap();
        let third = json_array_with(Some(&second), br#"{"c":3}"#).unwrap();
        assert_eq!(third, at_once);
        assert_eq!(at_once, br#"[{"a":1},{"b":2},{"c":3}]"#);
        for not_a_segment in [&b"[]"[..], b"", b"{}", b"[1"] {
            assert_eq!(json_array_with(Some(not_a_segment), b"1"), None);
        }
    }

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
