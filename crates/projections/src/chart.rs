//! The chart read model: the current state of each patient's chart, for the clinician's screen.
//!
//! **Invariants:**
//! - every PHI value rests sealed under the patient's data key, one sealed JSON object per
//!   entry (`chartlog_chart_entries`), with patient id, entry kind and entry id as associated
//!   data, so a sealed entry copied to another row does not open;
//! - look-ups by MRN and by family name + birth date go through keyed blind indexes
//!   (`chartlog_chart_lookups`): HMAC-SHA-256 of the normalised value under the index key from
//!   the key files (never stored in the database);
//! - observations are kept as the latest per code (by effective time; the later recorded on a
//!   tie), in an entry whose id is keyed by the code (HMAC under the index key, so the id does
//!   not tell which test it holds): a device-fed chart of 100,000 readings is a handful of
//!   entries, and a chart read costs the same however long the history. Every observation is
//!   in the record history;
//! - on the erasure tombstone the patient's entries and look-ups are deleted through the
//!   primary key (patient id first: no scan); what stays is the patient id, the last stream
//!   version and the erasure time, none of them PHI, so a read answers "erased at ...".

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use async_trait::async_trait;
use chartlog_crypto::{
    DataKey, DataKeys, KeyError, KeyStore, MacKey, hmac_sha256, open_record, seal_record,
};
use chartlog_domain::codes::{Code, CodeSystem};
use chartlog_domain::patient::{
    AllergyCriticality, AllergyReaction, Demographics, DiscontinuationReason, DosingFrequency,
    MedicationRoute, ObservationValue,
};
use chartlog_domain::phi::{BirthDate, FamilyName, Mrn, NoteText};
use chartlog_domain::{
    AllergyId, ConditionId, MedicationOrderId, NoteId, ObservationId, PatientEvent, PatientId,
    Quantity, StreamId, Timestamp, UserId,
};
use chartlog_store::{EventStore, LedgerError, PatientLedger, StreamHead};
use serde::Deserialize;
use sqlx::AssertSqlSafe;
use uuid::Uuid;

use crate::db::{
    ProjectionDb, ProjectionTx, SqlArg, stored_entries_for_batch, to_i64, values_placeholders,
};
use crate::entries::{EntryKind, Fields, evolve_entry, touched};
use crate::error::ProjectionError;
use crate::runner::{EventBody, ProjectedEvent, Projection};

/// The chart projection's name (its checkpoint and lock).
pub const CHART_PROJECTION: &str = "chart";
/// Bump when the fold or the tables change: the chart is then rebuilt from position 0.
/// Version 2: observations are kept as the latest per code, not every one.
pub const CHART_PROJECTION_VERSION: u32 = 2;

const ENTRY_AD: &[u8] = b"chart-entry";
const LOOKUP_MRN: &str = "mrn";
const LOOKUP_NAME_BIRTH_DATE: &str = "family_name+birth_date";
const MRN_INDEX_TAG: &[u8] = b"chartlog/blind-index/mrn/v1";
const NAME_BIRTH_DATE_INDEX_TAG: &[u8] = b"chartlog/blind-index/family-name+birth-date/v1";
const OBSERVATION_CODE_SLOT_TAG: &[u8] = b"chartlog/chart/latest-observation-per-code/v1";

/// Folds patient events into the chart tables.
pub struct ChartProjection {
    index_key: Arc<MacKey>,
}

impl ChartProjection {
    /// `index_key`: the blind-index key ([`chartlog_crypto::load_or_create_mac_key`] with
    /// [`chartlog_crypto::INDEX_KEY_FILE_NAME`]).
    pub fn new(index_key: Arc<MacKey>) -> Self {
        Self { index_key }
    }
}

/// An entry waiting to be written at the end of a batch.
struct Pending<'a> {
    value: EntryValue<'a>,
    stream_version: u64,
    key: Arc<DataKey>,
}

enum EntryValue<'a> {
    Fields(Fields),
    /// A code's latest observation, kept as the event that recorded it until the batch is
    /// written: a batch of a device's readings supersedes most of them, and only the one
    /// written needs its JSON built.
    Observation(&'a PatientEvent),
}

impl Pending<'_> {
    fn into_fields(self) -> Fields {
        match self.value {
            EntryValue::Fields(fields) => fields,
            EntryValue::Observation(event) => observation_fields(event),
        }
    }

    fn fields(&self) -> Cow<'_, Fields> {
        match &self.value {
            EntryValue::Fields(fields) => Cow::Borrowed(fields),
            EntryValue::Observation(event) => Cow::Owned(observation_fields(event)),
        }
    }

    /// When the observation this entry holds took effect; `None` if it holds none, or a
    /// stored entry whose time does not decode (the new reading then replaces it).
    fn observation_effective_at(&self) -> Option<Timestamp> {
        match &self.value {
            EntryValue::Observation(PatientEvent::ObservationRecorded { effective_at, .. }) => {
                Some(*effective_at)
            }
            EntryValue::Observation(_) => None,
            EntryValue::Fields(fields) => stored_effective_at(fields),
        }
    }
}

/// When the observation an entry holds took effect; `None` if its time does not decode.
fn stored_effective_at(fields: &Fields) -> Option<Timestamp> {
    fields
        .get("effective_at")
        .and_then(|value| Timestamp::deserialize(value).ok())
}

/// Whether a code's entry keeps the observation it holds (effective at `kept`) when one
/// effective at `recorded` is recorded: only if it took effect later, so a device uploading
/// old readings does not hide the current value, and on a tie the later recorded wins.
fn keeps_held_observation(kept: Option<Timestamp>, recorded: Timestamp) -> bool {
    kept.is_some_and(|kept| kept > recorded)
}

/// The stored value of a code's latest observation.
fn observation_fields(event: &PatientEvent) -> Fields {
    let mut fields = evolve_entry(None, event);
    if let PatientEvent::ObservationRecorded { observation_id, .. } = event {
        fields.insert(
            "observation_id".to_owned(),
            serde_json::Value::String(observation_id.as_uuid().to_string()),
        );
    }
    fields
}

/// The entry id of each code a batch records an observation of ([`observation_slot`]),
/// worked out once per code: the keyed hash is the costliest step of
/// folding an observation into the chart.
struct ObservationSlots<'a>(HashMap<(CodeSystem, &'a str), Uuid>);

impl<'a> ObservationSlots<'a> {
    fn for_batch(projection: &ChartProjection, events: &'a [ProjectedEvent]) -> Self {
        let mut slots = HashMap::new();
        for event in events {
            if let EventBody::Patient {
                event: PatientEvent::ObservationRecorded { code, .. },
                ..
            } = &event.body
            {
                slots
                    .entry((code.system(), code.expose_phi()))
                    .or_insert_with(|| observation_slot(&projection.index_key, code));
            }
        }
        Self(slots)
    }

    fn of(&self, code: &Code) -> Uuid {
        self.0[&(code.system(), code.expose_phi())]
    }
}

type Slot = crate::entries::EntrySlot;

fn associated_data<'a>(patient_id: &'a Uuid, kind: EntryKind, entry_id: &'a Uuid) -> [&'a [u8]; 4] {
    [
        ENTRY_AD,
        patient_id.as_bytes(),
        kind.as_str().as_bytes(),
        entry_id.as_bytes(),
    ]
}

fn seal_fields(key: &DataKey, slot: &Slot, fields: &Fields) -> Vec<u8> {
    let patient = slot.0.as_uuid();
    let plaintext = serde_json::to_vec(fields).expect("a JSON object serializes");
    seal_record(key, &associated_data(&patient, slot.1, &slot.2), &plaintext)
}

fn open_fields(
    key: &DataKey,
    patient_id: PatientId,
    kind: EntryKind,
    entry_id: Uuid,
    sealed: &[u8],
) -> Result<Fields, ProjectionError> {
    let malformed = |reason| ProjectionError::MalformedRow {
        table: "chartlog_chart_entries",
        patient_id: patient_id.as_uuid(),
        reason,
    };
    let patient = patient_id.as_uuid();
    let plaintext = open_record(key, &associated_data(&patient, kind, &entry_id), sealed)
        .map_err(|_| malformed("does not open under the patient's key"))?;
    serde_json::from_slice(&plaintext).map_err(|_| malformed("not a JSON object"))
}

/// Normalises an MRN for its blind index: no whitespace, upper case (so "mrn 12" and "MRN12"
/// find the same chart; registration already refused anything else that could vary).
fn normalised_mrn(mrn: &Mrn) -> String {
    mrn.expose_phi()
        .split_whitespace()
        .collect::<String>()
        .to_uppercase()
}

/// Normalises a family name: words joined by one space, lower case.
fn normalised_family_name(family: &FamilyName) -> String {
    family
        .expose_phi()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

fn iso_date(birth_date: &BirthDate) -> String {
    let date = birth_date.expose_phi();
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    )
}

/// The blind-index digest of an MRN.
pub fn mrn_digest(index_key: &MacKey, mrn: &Mrn) -> [u8; 32] {
    hmac_sha256(index_key, &[MRN_INDEX_TAG, normalised_mrn(mrn).as_bytes()])
}

/// The blind-index digest of a family name with a birth date.
pub fn family_name_birth_date_digest(
    index_key: &MacKey,
    family: &FamilyName,
    birth_date: &BirthDate,
) -> [u8; 32] {
    hmac_sha256(
        index_key,
        &[
            NAME_BIRTH_DATE_INDEX_TAG,
            normalised_family_name(family).as_bytes(),
            iso_date(birth_date).as_bytes(),
        ],
    )
}

#[async_trait]
impl Projection for ChartProjection {
    fn name(&self) -> &'static str {
        CHART_PROJECTION
    }

    fn version(&self) -> u32 {
        CHART_PROJECTION_VERSION
    }

    async fn apply(
        &self,
        tx: &mut ProjectionTx,
        events: &[ProjectedEvent],
    ) -> Result<(), ProjectionError> {
        // Entries are folded in memory for the batch and written once each at the end: a
        // batch of 2,000 events touching 1,500 entries costs a few multi-row statements.
        let mut pending: BTreeMap<Slot, Pending> = BTreeMap::new();
        let mut patients: BTreeMap<PatientId, (u64, Option<i64>)> = BTreeMap::new();
        let mut erased: BTreeSet<PatientId> = BTreeSet::new();
        let observation_slots = ObservationSlots::for_batch(self, events);
        let mut stored = stored_entries(tx, events, &observation_slots).await?;
        for event in events {
            let version = event.header.stream_version;
            match &event.body {
                EventBody::Patient {
                    patient_id,
                    event: patient_event,
                    key,
                } => {
                    if let PatientEvent::ObservationRecorded { code, .. } = patient_event {
                        let slot = (
                            *patient_id,
                            EntryKind::Observation,
                            observation_slots.of(code),
                        );
                        let before = match pending.remove(&slot) {
                            Some(entry) => Some(entry),
                            None => stored.remove(&slot).map(|fields| Pending {
                                value: EntryValue::Fields(fields),
                                stream_version: version,
                                key: key.clone(),
                            }),
                        };
                        let entry = latest_observation(before, patient_event, version, key);
                        pending.insert(slot, entry);
                        patients.insert(*patient_id, (version, None));
                        continue;
                    }
                    let Some(touch) = touched(*patient_id, patient_event) else {
                        debug_assert!(matches!(patient_event, PatientEvent::PatientErased { .. }));
                        erase(&mut pending, &mut patients, &mut erased, event);
                        continue;
                    };
                    let slot = (*patient_id, touch.kind, touch.id);
                    let before = match pending.remove(&slot) {
                        Some(entry) => Some(entry.into_fields()),
                        None if touch.creates => None,
                        None => stored.remove(&slot),
                    };
                    let fields = evolve_entry(before, patient_event);
                    pending.insert(
                        slot,
                        Pending {
                            value: EntryValue::Fields(fields),
                            stream_version: version,
                            key: key.clone(),
                        },
                    );
                    patients.insert(*patient_id, (version, None));
                }
                // Before the key was destroyed these events were applied (live), or they never
                // will be (rebuild): either way only the tombstone matters now.
                EventBody::Erased { .. } if event.is_erasure() => {
                    erase(&mut pending, &mut patients, &mut erased, event);
                }
                EventBody::Erased { .. } | EventBody::Audit { .. } | EventBody::NotPatient => {}
            }
        }

        for patient_id in &erased {
            let id = SqlArg::Uuid(patient_id.as_uuid());
            tx.execute(
                "DELETE FROM chartlog_chart_entries WHERE patient_id = $1",
                vec![id.clone()],
            )
            .await?;
            tx.execute(
                "DELETE FROM chartlog_chart_lookups WHERE patient_id = $1",
                vec![id],
            )
            .await?;
        }
        write_entries(tx, &pending).await?;
        self.write_lookups(tx, &pending).await?;
        write_patients(tx, &patients).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut ProjectionTx) -> Result<(), ProjectionError> {
        for table in [
            "DELETE FROM chartlog_chart_entries",
            "DELETE FROM chartlog_chart_lookups",
            "DELETE FROM chartlog_chart_patients",
        ] {
            tx.execute(table, vec![]).await?;
        }
        Ok(())
    }
}

/// The entry id that holds a code's latest observation for every patient: keyed, so the id of
/// an entry does not tell which test it is.
fn observation_slot(index_key: &MacKey, code: &Code) -> Uuid {
    let digest = hmac_sha256(
        index_key,
        &[
            OBSERVATION_CODE_SLOT_TAG,
            code.system().as_str().as_bytes(),
            code.expose_phi().as_bytes(),
        ],
    );
    let mut id = [0; 16];
    id.copy_from_slice(&digest[..16]);
    Uuid::from_bytes(id)
}

/// The code's latest observation after `event`: the one recorded now, unless the entry holds
/// one effective later (a device uploading old readings must not hide the current value).
fn latest_observation<'a>(
    before: Option<Pending<'a>>,
    event: &'a PatientEvent,
    version: u64,
    key: &Arc<DataKey>,
) -> Pending<'a> {
    let PatientEvent::ObservationRecorded { effective_at, .. } = event else {
        unreachable!("called for observations only");
    };
    if let Some(before) = before
        && keeps_held_observation(before.observation_effective_at(), *effective_at)
    {
        return before;
    }
    Pending {
        value: EntryValue::Observation(event),
        stream_version: version,
        key: key.clone(),
    }
}

fn erase(
    pending: &mut BTreeMap<Slot, Pending<'_>>,
    patients: &mut BTreeMap<PatientId, (u64, Option<i64>)>,
    erased: &mut BTreeSet<PatientId>,
    event: &ProjectedEvent,
) {
    let Some(patient_id) = event.patient_id() else {
        return;
    };
    pending.retain(|slot, _| slot.0 != patient_id);
    // The header's time, not the sealed tombstone's: a rebuild after the key is gone can read
    // only the header, and must write what the live run wrote.
    patients.insert(
        patient_id,
        (
            event.header.stream_version,
            Some(event.header.recorded_at.unix_micros()),
        ),
    );
    erased.insert(patient_id);
}

/// The stored value of every entry a batch changes and needs the value before of, opened
/// ([`stored_entries_for_batch`]).
async fn stored_entries(
    tx: &mut ProjectionTx,
    events: &[ProjectedEvent],
    observation_slots: &ObservationSlots<'_>,
) -> Result<HashMap<Slot, Fields>, ProjectionError> {
    let entry_of = |patient_id: PatientId, event: &PatientEvent| {
        if let PatientEvent::ObservationRecorded { code, .. } = event {
            let slot = (
                patient_id,
                EntryKind::Observation,
                observation_slots.of(code),
            );
            return Some((slot, true));
        }
        let touch = touched(patient_id, event)?;
        Some(((patient_id, touch.kind, touch.id), !touch.creates))
    };
    let mut stored = HashMap::new();
    for (slot, key, sealed) in
        stored_entries_for_batch(tx, "chartlog_chart_entries", events, entry_of).await?
    {
        stored.insert(slot, open_fields(&key, slot.0, slot.1, slot.2, &sealed)?);
    }
    Ok(stored)
}

async fn write_entries(
    tx: &mut ProjectionTx,
    pending: &BTreeMap<Slot, Pending<'_>>,
) -> Result<(), ProjectionError> {
    let entries: Vec<(&Slot, &Pending)> = pending.iter().collect();
    for rows in entries.chunks(tx.rows_per_statement(5)) {
        let sql = format!(
            "INSERT INTO chartlog_chart_entries (patient_id, kind, entry_id, stream_version, sealed) \
             VALUES {} ON CONFLICT (patient_id, kind, entry_id) DO UPDATE SET \
             stream_version = excluded.stream_version, sealed = excluded.sealed",
            values_placeholders(rows.len(), 5, 1)
        );
        let mut args = Vec::with_capacity(rows.len() * 5);
        for (slot, entry) in rows {
            args.push(SqlArg::Uuid(slot.0.as_uuid()));
            args.push(SqlArg::Text(slot.1.as_str().to_owned()));
            args.push(SqlArg::Uuid(slot.2));
            args.push(SqlArg::I64(to_i64(entry.stream_version)));
            args.push(SqlArg::Bytes(seal_fields(
                &entry.key,
                slot,
                &entry.fields(),
            )));
        }
        tx.execute(AssertSqlSafe(sql), args).await?;
    }
    Ok(())
}

impl ChartProjection {
    async fn write_lookups(
        &self,
        tx: &mut ProjectionTx,
        pending: &BTreeMap<Slot, Pending<'_>>,
    ) -> Result<(), ProjectionError> {
        let mut rows: Vec<(PatientId, &'static str, [u8; 32])> = Vec::new();
        for (slot, entry) in pending {
            if slot.1 != EntryKind::Demographics {
                continue;
            }
            let demographics: Demographics =
                serde_json::from_value(serde_json::Value::Object(entry.fields().into_owned()))
                    .map_err(|_| ProjectionError::MalformedRow {
                        table: "chartlog_chart_entries",
                        patient_id: slot.0.as_uuid(),
                        reason: "demographics do not decode",
                    })?;
            rows.push((
                slot.0,
                LOOKUP_MRN,
                mrn_digest(&self.index_key, &demographics.mrn),
            ));
            rows.push((
                slot.0,
                LOOKUP_NAME_BIRTH_DATE,
                family_name_birth_date_digest(
                    &self.index_key,
                    demographics.name.family(),
                    &demographics.birth_date,
                ),
            ));
        }
        for rows in rows.chunks(tx.rows_per_statement(3)) {
            let sql = format!(
                "INSERT INTO chartlog_chart_lookups (patient_id, kind, digest) VALUES {} \
                 ON CONFLICT (patient_id, kind) DO UPDATE SET digest = excluded.digest",
                values_placeholders(rows.len(), 3, 1)
            );
            let mut args = Vec::with_capacity(rows.len() * 3);
            for (patient_id, kind, digest) in rows {
                args.push(SqlArg::Uuid(patient_id.as_uuid()));
                args.push(SqlArg::Text((*kind).to_owned()));
                args.push(SqlArg::Bytes(digest.to_vec()));
            }
            tx.execute(AssertSqlSafe(sql), args).await?;
        }
        Ok(())
    }
}

async fn write_patients(
    tx: &mut ProjectionTx,
    patients: &BTreeMap<PatientId, (u64, Option<i64>)>,
) -> Result<(), ProjectionError> {
    let rows: Vec<_> = patients.iter().collect();
    for rows in rows.chunks(tx.rows_per_statement(3)) {
        let sql = format!(
            "INSERT INTO chartlog_chart_patients (patient_id, stream_version, erased_at_us) \
             VALUES {} ON CONFLICT (patient_id) DO UPDATE SET \
             stream_version = excluded.stream_version, erased_at_us = excluded.erased_at_us",
            values_placeholders(rows.len(), 3, 1)
        );
        let mut args = Vec::with_capacity(rows.len() * 3);
        for (patient_id, (version, erased_at)) in rows {
            args.push(SqlArg::Uuid(patient_id.as_uuid()));
            args.push(SqlArg::I64(to_i64(*version)));
            args.push(SqlArg::OptI64(*erased_at));
        }
        tx.execute(AssertSqlSafe(sql), args).await?;
    }
    Ok(())
}

// ---- Queries ----------------------------------------------------------------------------

/// A patient's chart as the chart read model holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chart {
    pub patient_id: PatientId,
    /// The stream version the chart is current at (for If-Match and freshness).
    pub stream_version: u64,
    pub demographics: Option<Demographics>,
    /// Active and resolved; see [`ChartCondition::is_active`].
    pub conditions: Vec<ChartCondition>,
    /// Refuted allergies stay, marked.
    pub allergies: Vec<ChartAllergy>,
    /// Active and discontinued.
    pub medication_orders: Vec<ChartMedicationOrder>,
    /// The latest observation of each code, in order of effective time (the record history
    /// holds every one).
    pub observations: Vec<ChartObservation>,
    pub notes: Vec<ChartNote>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChartCondition {
    pub condition_id: ConditionId,
    pub code: Code,
    pub onset_at: Option<Timestamp>,
    pub resolved_at: Option<Timestamp>,
}

impl ChartCondition {
    pub fn is_active(&self) -> bool {
        self.resolved_at.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChartAllergy {
    pub allergy_id: AllergyId,
    pub substance: Code,
    pub criticality: AllergyCriticality,
    pub reaction: Option<AllergyReaction>,
    pub refuted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChartMedicationOrder {
    pub medication_order_id: MedicationOrderId,
    pub medication: Code,
    pub dose: Quantity,
    pub route: MedicationRoute,
    pub frequency: DosingFrequency,
    pub prescribed_at: Timestamp,
    pub discontinuation_reason: Option<DiscontinuationReason>,
    pub discontinued_at: Option<Timestamp>,
}

impl ChartMedicationOrder {
    pub fn is_active(&self) -> bool {
        self.discontinued_at.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChartObservation {
    pub observation_id: ObservationId,
    pub code: Code,
    pub value: ObservationValue,
    pub effective_at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChartNote {
    pub note_id: NoteId,
    pub text: NoteText,
    pub written_at: Timestamp,
    pub amended_at: Option<Timestamp>,
    pub signed_by: Option<UserId>,
    pub signed_at: Option<Timestamp>,
    pub addenda: Vec<ChartNoteAddendum>,
}

impl ChartNote {
    pub fn is_signed(&self) -> bool {
        self.signed_at.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ChartNoteAddendum {
    pub text: NoteText,
    pub added_at: Timestamp,
}

/// What a chart read finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChartAnswer {
    Found(Box<Chart>),
    /// The patient was erased: a clear answer, with the time, never a decryption error.
    Erased {
        erased_at: Timestamp,
    },
    /// No such patient in the chart (yet: see `wait_for_position` for read-your-writes).
    NotFound,
}

/// Reads a patient's chart, opening its entries with the patient's data key.
#[tracing::instrument(skip_all, fields(patient = %patient_id))]
pub async fn read_chart<K: KeyStore>(
    db: &ProjectionDb,
    keys: &DataKeys<K>,
    patient_id: PatientId,
) -> Result<ChartAnswer, ProjectionError> {
    match read_stored(db, keys, patient_id).await? {
        Stored::Chart(stored) => stored.into_answer(),
        Stored::Answer(answer) => Ok(answer),
    }
}

/// Most events a chart read folds from the log itself when the read model trails the record
/// ([`ChartReader::read_at`]): a read costs at most this many events more. A read model
/// further behind is rebuilding or stalled, and the caller waits for it instead.
pub const CHART_TAIL_FOLD_EVENTS_MAX: u64 = 256;

/// Patients whose last chart a [`ChartReader`] keeps; beyond it the memory starts over (a miss
/// costs a read of the read model's copy, and a fold of the tail where it trails).
pub const KEPT_CHARTS_MAX: usize = 1_024;

/// Reads charts as of the stream head the caller's own load verified (its access check),
/// without waiting for the projection runner.
///
/// Where the read model is at that head or past it, a read is [`read_chart`]. Where it trails
/// by at most [`CHART_TAIL_FOLD_EVENTS_MAX`] events, the events it has not applied are read
/// from the log ([`PatientLedger::events_between`]: hash-chained to the head, which the ledger
/// verified) and folded onto its entries in memory, as the projection will fold them, so a
/// clinician who has just written reads the chart with the write in it.
///
/// The chart last answered for each patient is kept with its head (version and hash):
/// - a read at that same head answers from it, with no statement and no decryption, since a
///   chart is a function of its stream's events and the verified head names them all (charts
///   are read far more often than written);
/// - a read at a later head folds only the events after it: after a burst of writes, every
///   read until the runner catches up would otherwise fold the whole burst again.
///
/// It is dropped on [`ChartReader::forget`] (erasure), and replaced by the read model's copy
/// once that reaches the head. A read that began before a forget keeps nothing: an erasure
/// that lands while it decrypts must not leave the chart in memory after it.
pub struct ChartReader {
    index_key: Arc<MacKey>,
    kept: std::sync::Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    charts: HashMap<PatientId, KeptChart>,
    /// Bumped by every forget; compared with the patient's count when a read began.
    forgets: crate::forgets::ForgetCounts,
}

/// A chart as of `head`: the read model's copy, or one folded past it.
struct KeptChart {
    head: StreamHead,
    chart: StoredChart,
}

impl ChartReader {
    /// `index_key`: the chart projection's blind-index key (it names observation entries).
    pub fn new(index_key: Arc<MacKey>) -> Self {
        Self {
            index_key,
            kept: std::sync::Mutex::new(Kept::default()),
        }
    }

    /// The chart as of `head`; `None` where the read model trails it by more than
    /// [`CHART_TAIL_FOLD_EVENTS_MAX`] events. `head` must come from `ledger` (a load or a
    /// command), never from a request.
    #[tracing::instrument(skip_all, fields(patient = %patient_id))]
    pub async fn read_at<S: EventStore + ?Sized, K: KeyStore>(
        &self,
        db: &ProjectionDb,
        ledger: &PatientLedger<S, K>,
        patient_id: PatientId,
        head: StreamHead,
    ) -> Result<Option<ChartAnswer>, ProjectionError> {
        let began = self.forgets(patient_id);
        if let Some(chart) = self.kept_at(patient_id, head) {
            return chart.into_answer().map(Some);
        }
        let stored = match read_stored(db, ledger.keys(), patient_id).await? {
            Stored::Chart(stored) => stored,
            Stored::Answer(ChartAnswer::NotFound) => StoredChart::empty(patient_id),
            Stored::Answer(answer) => {
                self.forget(patient_id);
                return Ok(Some(answer));
            }
        };
        if stored.stream_version == head.version {
            self.keep(
                patient_id,
                KeptChart {
                    head,
                    chart: stored.clone(),
                },
                began,
            );
            return stored.into_answer().map(Some);
        }
        if stored.stream_version > head.version {
            // The stream moved on after the caller's load: answer what the read model holds
            // and keep nothing, since `head` does not name it. Not a forget: nothing was
            // erased, and other reads in flight may keep theirs.
            self.take_kept(patient_id);
            return stored.into_answer().map(Some);
        }
        // Fold onto the kept chart where it is ahead of the read model's copy.
        let (mut chart, after_hash) = match self.take_kept(patient_id) {
            Some(kept)
                if kept.head.version > stored.stream_version
                    && kept.head.version <= head.version =>
            {
                (kept.chart, Some(kept.head.hash))
            }
            _ => (stored, None),
        };
        if head.version - chart.stream_version > CHART_TAIL_FOLD_EVENTS_MAX {
            return Ok(None);
        }
        let tail = match ledger
            .events_between(patient_id, chart.stream_version, after_hash, head)
            .await
        {
            Ok(tail) => tail,
            Err(LedgerError::Erased { erased_at, .. }) => {
                return Ok(Some(ChartAnswer::Erased { erased_at }));
            }
            Err(source) => {
                return Err(ProjectionError::Tail {
                    patient_id: patient_id.as_uuid(),
                    source: Box::new(source),
                });
            }
        };
        for event in &tail {
            if let PatientEvent::PatientErased { erased_at, .. } = event {
                return Ok(Some(ChartAnswer::Erased {
                    erased_at: *erased_at,
                }));
            }
            chart.fold(&self.index_key, event);
        }
        chart.stream_version = head.version;
        self.keep(
            patient_id,
            KeptChart {
                head,
                chart: chart.clone(),
            },
            began,
        );
        chart.into_answer().map(Some)
    }

    /// Drops what is kept of a patient's chart (their record was erased), and stops every read
    /// already under way from keeping the chart it is reading.
    pub fn forget(&self, patient_id: PatientId) {
        // A poisoned lock only means another read panicked mid-insert; `keep` then keeps
        // nothing, so there is nothing to drop.
        if let Ok(mut kept) = self.kept.lock() {
            kept.forgets.bump(patient_id);
            kept.charts.remove(&patient_id);
        }
    }

    /// Forgets of `patient_id`'s stripe so far: taken when a read begins, for
    /// [`ChartReader::keep`].
    fn forgets(&self, patient_id: PatientId) -> u64 {
        self.kept
            .lock()
            .map_or(0, |kept| kept.forgets.of(patient_id))
    }

    /// A copy of the chart kept at exactly `head`.
    fn kept_at(&self, patient_id: PatientId, head: StreamHead) -> Option<StoredChart> {
        let kept = self.kept.lock().ok()?;
        let chart = kept.charts.get(&patient_id)?;
        (chart.head == head).then(|| chart.chart.clone())
    }

    fn take_kept(&self, patient_id: PatientId) -> Option<KeptChart> {
        self.kept.lock().ok()?.charts.remove(&patient_id)
    }

    /// Keeps a chart read since `began` ([`ChartReader::forgets`]), unless a forget came in
    /// between: it may have been this patient's erasure, which the read did not see.
    fn keep(&self, patient_id: PatientId, chart: KeptChart, began: u64) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        if kept.forgets.of(patient_id) != began {
            return;
        }
        // Two reads of one patient at once: keep the further one.
        if kept
            .charts
            .get(&patient_id)
            .is_some_and(|held| held.head.version >= chart.head.version)
        {
            return;
        }
        if kept.charts.len() >= KEPT_CHARTS_MAX {
            kept.charts.clear();
        }
        kept.charts.insert(patient_id, chart);
    }
}

/// What the read model holds of a patient: the chart's entries, or an answer already.
enum Stored {
    Chart(StoredChart),
    Answer(ChartAnswer),
}

/// A chart's entries as the read model holds them, opened: PHI, so no `Debug`.
#[derive(Clone)]
struct StoredChart {
    patient_id: PatientId,
    stream_version: u64,
    entries: BTreeMap<(EntryKind, Uuid), Fields>,
}

impl StoredChart {
    fn empty(patient_id: PatientId) -> Self {
        Self {
            patient_id,
            stream_version: 0,
            entries: BTreeMap::new(),
        }
    }

    /// Folds one event the read model has not applied yet, as [`ChartProjection::apply`]
    /// does (not the erasure tombstone, which ends the chart).
    fn fold(&mut self, index_key: &MacKey, event: &PatientEvent) {
        if let PatientEvent::ObservationRecorded {
            code, effective_at, ..
        } = event
        {
            let slot = (EntryKind::Observation, observation_slot(index_key, code));
            let kept = self.entries.get(&slot).and_then(stored_effective_at);
            if !keeps_held_observation(kept, *effective_at) {
                self.entries.insert(slot, observation_fields(event));
            }
            return;
        }
        let Some(touch) = touched(self.patient_id, event) else {
            return;
        };
        let slot = (touch.kind, touch.id);
        let before = self.entries.remove(&slot).filter(|_| !touch.creates);
        self.entries.insert(slot, evolve_entry(before, event));
    }

    fn into_answer(self) -> Result<ChartAnswer, ProjectionError> {
        let patient_id = self.patient_id;
        let mut chart = Chart {
            patient_id,
            stream_version: self.stream_version,
            demographics: None,
            conditions: Vec::new(),
            allergies: Vec::new(),
            medication_orders: Vec::new(),
            observations: Vec::new(),
            notes: Vec::new(),
        };
        let undecodable = |_| ProjectionError::MalformedRow {
            table: "chartlog_chart_entries",
            patient_id: patient_id.as_uuid(),
            reason: "entry does not decode",
        };
        for ((kind, entry_id), mut fields) in self.entries {
            let id = serde_json::Value::String(entry_id.to_string());
            let mut typed = |id_field: &str| {
                fields.insert(id_field.to_owned(), id.clone());
                serde_json::Value::Object(std::mem::take(&mut fields))
            };
            match kind {
                EntryKind::Demographics => {
                    chart.demographics = Some(
                        serde_json::from_value(serde_json::Value::Object(fields))
                            .map_err(undecodable)?,
                    );
                }
                EntryKind::Condition => chart
                    .conditions
                    .push(serde_json::from_value(typed("condition_id")).map_err(undecodable)?),
                EntryKind::Allergy => chart
                    .allergies
                    .push(serde_json::from_value(typed("allergy_id")).map_err(undecodable)?),
                EntryKind::MedicationOrder => chart.medication_orders.push(
                    serde_json::from_value(typed("medication_order_id")).map_err(undecodable)?,
                ),
                // The entry id names the code's slot; the observation's own id is in the fields.
                EntryKind::Observation => chart.observations.push(
                    serde_json::from_value(serde_json::Value::Object(fields))
                        .map_err(undecodable)?,
                ),
                EntryKind::Note => chart
                    .notes
                    .push(serde_json::from_value(typed("note_id")).map_err(undecodable)?),
                // Kept for the fold (and for the record history); the care team, consent and
                // legal holds live on the command side (`PatientLedger::load`), where access
                // and erasure are decided.
                EntryKind::ConsentRestriction
                | EntryKind::CareRelationship
                | EntryKind::LegalHold => {}
            }
        }
        chart
            .observations
            .sort_by_key(|o| (o.effective_at, o.observation_id));
        chart.notes.sort_by_key(|n| (n.written_at, n.note_id));
        Ok(ChartAnswer::Found(Box::new(chart)))
    }
}

/// The read model's copy of a patient's chart, its entries opened.
async fn read_stored<K: KeyStore>(
    db: &ProjectionDb,
    keys: &DataKeys<K>,
    patient_id: PatientId,
) -> Result<Stored, ProjectionError> {
    // One statement, so the version and the entries come from one snapshot (two statements
    // on PostgreSQL could straddle a projection commit), in one round trip. Every row carries
    // the patient's columns; a patient with no entries has one row, with NULL entry columns.
    let rows = db
        .fetch_all(
            "SELECT p.stream_version, p.erased_at_us, e.kind, e.entry_id, e.sealed \
             FROM chartlog_chart_patients p \
             LEFT JOIN chartlog_chart_entries e ON e.patient_id = p.patient_id \
             WHERE p.patient_id = $1",
            vec![SqlArg::Uuid(patient_id.as_uuid())],
        )
        .await?;
    let Some(first) = rows.first() else {
        return Ok(Stored::Answer(ChartAnswer::NotFound));
    };
    let malformed = |reason| ProjectionError::MalformedRow {
        table: "chartlog_chart_patients",
        patient_id: patient_id.as_uuid(),
        reason,
    };
    let stream_version = u64::try_from(first.i64(0)?).map_err(|_| malformed("negative version"))?;
    if let Some(at) = first.opt_i64(1)? {
        let erased_at = Timestamp::from_unix_micros(at).map_err(|_| malformed("erasure time"))?;
        return Ok(Stored::Answer(ChartAnswer::Erased { erased_at }));
    }
    let stream = StreamId::patient(patient_id);
    let key = match keys.key_for_read(&stream).await {
        Ok((_, key)) => key,
        // Erased, and the projection has not applied the tombstone yet.
        Err(KeyError::Erased { destroyed_at, .. }) => {
            return Ok(Stored::Answer(ChartAnswer::Erased {
                erased_at: destroyed_at,
            }));
        }
        Err(source) => return Err(ProjectionError::Key { stream, source }),
    };
    let mut stored = StoredChart {
        stream_version,
        ..StoredChart::empty(patient_id)
    };
    for row in &rows {
        let (Some(kind), Some(entry_id), Some(sealed)) =
            (row.opt_text(2)?, row.opt_uuid(3)?, row.opt_bytes(4)?)
        else {
            continue;
        };
        let kind = EntryKind::parse(&kind).ok_or_else(|| malformed("unknown entry kind"))?;
        let fields = open_fields(&key, patient_id, kind, entry_id, &sealed)?;
        stored.entries.insert((kind, entry_id), fields);
    }
    Ok(Stored::Chart(stored))
}

/// Patients whose MRN is `mrn` (normally one), through the blind index. Erased patients are
/// not found.
pub async fn find_by_mrn(
    db: &ProjectionDb,
    index_key: &MacKey,
    mrn: &Mrn,
) -> Result<Vec<PatientId>, ProjectionError> {
    find_by_digest(db, LOOKUP_MRN, mrn_digest(index_key, mrn)).await
}

/// Patients with this family name and birth date, through the blind index.
pub async fn find_by_family_name_and_birth_date(
    db: &ProjectionDb,
    index_key: &MacKey,
    family: &FamilyName,
    birth_date: &BirthDate,
) -> Result<Vec<PatientId>, ProjectionError> {
    let digest = family_name_birth_date_digest(index_key, family, birth_date);
    find_by_digest(db, LOOKUP_NAME_BIRTH_DATE, digest).await
}

/// Most patients one look-up returns (a common name with a common birth date).
pub const LOOKUP_RESULTS_MAX: i64 = 100;

async fn find_by_digest(
    db: &ProjectionDb,
    kind: &str,
    digest: [u8; 32],
) -> Result<Vec<PatientId>, ProjectionError> {
    let rows = db
        .fetch_all(
            "SELECT patient_id FROM chartlog_chart_lookups WHERE kind = $1 AND digest = $2 \
             ORDER BY patient_id LIMIT $3",
            vec![
                SqlArg::Text(kind.to_owned()),
                SqlArg::Bytes(digest.to_vec()),
                SqlArg::I64(LOOKUP_RESULTS_MAX),
            ],
        )
        .await?;
    rows.iter()
        .map(|row| Ok(PatientId::from_uuid(row.uuid(0)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chartlog_crypto::EventHash;

    #[test]
    fn a_read_that_began_before_a_forget_keeps_nothing() {
        let reader = ChartReader::new(Arc::new(MacKey::generate()));
        let patient = PatientId::from_uuid(Uuid::now_v7());
        let head = StreamHead {
            version: 3,
            hash: EventHash::GENESIS,
        };
        let chart = || KeptChart {
            head,
            chart: StoredChart::empty(patient),
        };
        // A read begins, the patient is erased (forget), the read finishes.
        let began = reader.forgets(patient);
        reader.forget(patient);
        reader.keep(patient, chart(), began);
        assert!(reader.kept_at(patient, head).is_none());
        // A read that began after the forget keeps its chart as before.
        let began = reader.forgets(patient);
        reader.keep(patient, chart(), began);
        assert!(reader.kept_at(patient, head).is_some());
    }

    #[test]
    fn look_ups_normalise_before_hashing() {
        let key = MacKey::generate();
        let one = mrn_digest(&key, &Mrn::parse("abc-12").unwrap());
        assert_eq!(one, mrn_digest(&key, &Mrn::parse("ABC-12").unwrap()));
        assert_ne!(one, mrn_digest(&key, &Mrn::parse("ABC-13").unwrap()));
        let birth = BirthDate::parse("1985-12-10").unwrap();
        assert_eq!(
            family_name_birth_date_digest(&key, &FamilyName::parse("De  La Cruz").unwrap(), &birth),
            family_name_birth_date_digest(&key, &FamilyName::parse("de la cruz").unwrap(), &birth)
        );
    }
}
