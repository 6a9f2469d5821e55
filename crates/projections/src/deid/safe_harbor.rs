//! The Safe Harbor transformation (45 CFR 164.514(b)(2)) as pure functions: one decoded event
//! in, the de-identified row changes it causes out ([`deidentify_event`]), and an in-memory fold
//! of those changes ([`DeidTables`]) that states what the SQL tables must hold.
//!
//! What goes and what stays, per event:
//! - names, street lines, city, phone numbers, email addresses, MRN, SSN, other identifiers:
//!   never read;
//! - free text (notes, addenda, narrative observation values, code display texts): never read;
//! - birth date: the year only, or "90+" once the patient is, or could be computed to be, 90;
//! - every other date: the year only;
//! - ZIP code: the first three digits, `000` for restricted areas ([`Zip3`]); the state stays;
//! - clinical codes (system and code), numeric values with their UCUM units, sex, and the
//!   closed clinical vocabularies (criticality, reaction, route, frequency): kept;
//! - patient and record ids: replaced by keyed pseudonyms ([`Pseudonymizer`]), because the
//!   raw ids appear in the audit trail and the API, where they sit next to identities.

use std::collections::BTreeMap;
use std::fmt;

use chartlog_crypto::{MacKey, hmac_sha256};
use chartlog_domain::patient::{
    AllergyCriticality, AllergyReaction, Demographics, DosingFrequency, MedicationRoute,
    ObservationValue,
};
use chartlog_domain::phi::{BirthDate, PostalAddress, Sex};
use chartlog_domain::{Code, CodeSystem, PatientEvent, PatientId, Quantity, Timestamp};
use uuid::Uuid;

use super::zip3::Zip3;

/// Ages at or above this are reported only as "90+" (164.514(b)(2)(i)(C)).
pub const AGE_YEARS_GROUPED_MIN: i32 = 90;

/// Domain-separation tags: one secret serves patients and records without their pseudonyms
/// ever colliding, and a future scheme gets a new tag rather than silently new values.
const PATIENT_TAG: &[u8] = b"chartlog/deid/patient/v1";
const RECORD_TAG: &[u8] = b"chartlog/deid/record/v1";

/// Turns internal ids into keyed pseudonyms: HMAC-SHA-256 under the de-identification secret
/// over the random internal id (never a name, MRN, SSN or other identifier: 164.514(c)).
/// Stable for a given secret, so a rebuild gives the same pseudonyms; not reversible, and
/// not recomputable from a patient id, without the secret.
pub struct Pseudonymizer {
    key: MacKey,
}

impl Pseudonymizer {
    pub fn new(key: MacKey) -> Self {
        Self { key }
    }

    pub fn patient(&self, patient_id: PatientId) -> Pseudonym {
        Pseudonym(hex::encode(hmac_sha256(
            &self.key,
            &[PATIENT_TAG, patient_id.as_uuid().as_bytes()],
        )))
    }

    /// The key of one clinical row (an observation, condition, allergy or medication order).
    /// `kind` keeps equal UUIDs of different kinds apart.
    pub fn record(&self, kind: RecordKind, record_id: Uuid) -> RowKey {
        RowKey(hex::encode(hmac_sha256(
            &self.key,
            &[RECORD_TAG, kind.as_str().as_bytes(), record_id.as_bytes()],
        )))
    }
}

impl fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pseudonymizer(<secret>)")
    }
}

/// The kinds of clinical row that carry a [`RowKey`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    Observation,
    Condition,
    Allergy,
    MedicationOrder,
}

impl RecordKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            RecordKind::Observation => "observation",
            RecordKind::Condition => "condition",
            RecordKind::Allergy => "allergy",
            RecordKind::MedicationOrder => "medication_order",
        }
    }
}

macro_rules! hex_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Bytes of the lower-case hex form (an HMAC-SHA-256 tag).
            pub const LENGTH: usize = 64;

            /// Reads a stored value back: 64 lower-case hex digits.
            pub fn parse(raw: &str) -> Option<Self> {
                let ok = raw.len() == Self::LENGTH
                    && raw.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
                ok.then(|| Self(raw.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

hex_key!(
    /// A patient in the de-identified views. Not PHI (a keyed hash of a random id), so it prints.
    Pseudonym
);
hex_key!(
    /// One clinical row in the de-identified views: a keyed hash of the record's id, so rows
    /// can be updated in place without the raw id, which the audit trail links to a patient.
    RowKey
);

/// The birth year as Safe Harbor allows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BirthYear {
    Year(i32),
    /// 90 or older: no year, which would tell the age.
    NinetyOrOver,
}

impl BirthYear {
    /// The birth year as of `year`, conservatively: the group is decided on the difference of
    /// the years, not on the exact age, because an analyst holding a birth year and a row year
    /// can only compute that difference; an 89-year-old in the year of their 90th birthday
    /// would otherwise show a birth year that reads as 90.
    pub fn as_of(self, year: i32) -> BirthYear {
        match self {
            BirthYear::Year(born) if year - born >= AGE_YEARS_GROUPED_MIN => {
                BirthYear::NinetyOrOver
            }
            other => other,
        }
    }

    fn from_birth_date(birth_date: &BirthDate, as_of_year: i32) -> BirthYear {
        // The one read of the birth date: only its year leaves.
        BirthYear::Year(birth_date.expose_phi().year()).as_of(as_of_year)
    }

    pub fn year(self) -> Option<i32> {
        match self {
            BirthYear::Year(year) => Some(year),
            BirthYear::NinetyOrOver => None,
        }
    }

    pub fn is_ninety_or_over(self) -> bool {
        self == BirthYear::NinetyOrOver
    }
}

impl fmt::Display for BirthYear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BirthYear::Year(year) => write!(f, "{year}"),
            BirthYear::NinetyOrOver => f.write_str("90+"),
        }
    }
}

/// Geography below the state, as far as Safe Harbor allows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Geography {
    /// Two-letter USPS code: states are not identifiers under Safe Harbor.
    pub state: String,
    pub zip3: Zip3,
}

impl Geography {
    fn from_address(address: &PostalAddress) -> Geography {
        Geography {
            state: address.state().as_str().to_owned(),
            zip3: Zip3::from_postal_code(address.postal_code()),
        }
    }
}

/// A clinical code without its display text (free text typed or chosen by a person).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CodedConcept {
    system: CodeSystem,
    code: String,
}

impl CodedConcept {
    pub fn from_code(code: &Code) -> Self {
        // Codes are clinical data Safe Harbor keeps; the display text is dropped here.
        Self {
            system: code.system(),
            code: code.expose_phi().to_owned(),
        }
    }

    /// A concept read back from a de-identified table, where it was written by
    /// [`CodedConcept::from_code`].
    pub(crate) fn from_stored(system: CodeSystem, code: String) -> Self {
        Self { system, code }
    }

    pub fn system(&self) -> CodeSystem {
        self.system
    }

    pub fn code(&self) -> &str {
        &self.code
    }
}

/// A measured amount: the decimal as written (precision is clinical) and its UCUM unit with
/// annotations removed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeidQuantity {
    value: String,
    unit: String,
}

/// The unit the views show in place of one that is not UCUM once its annotations are gone:
/// such a unit is text a sender typed (events recorded before commands were held to UCUM, or
/// by another writer) and could hold an identifier. Itself a UCUM annotation, so the column
/// stays UCUM: the unit 1, with the reason in braces.
pub const UNIT_WITHHELD: &str = "{withheld}";

impl DeidQuantity {
    pub fn from_quantity(quantity: &Quantity) -> Self {
        let unit = strip_unit_annotations(quantity.unit.as_str());
        let unit = if chartlog_domain::quantity::is_ucum(&unit) {
            unit
        } else {
            UNIT_WITHHELD.to_owned()
        };
        Self {
            value: quantity.value.expose_phi().to_owned(),
            unit,
        }
    }

    /// A quantity read back from a de-identified table, where it was written by
    /// [`DeidQuantity::from_quantity`].
    pub(crate) fn from_stored(value: String, unit: String) -> Self {
        Self { value, unit }
    }

    pub fn value(&self) -> &str {
        &self.value
    }

    pub fn unit(&self) -> &str {
        &self.unit
    }
}

/// UCUM annotations (`{...}`) are free text with no meaning to the unit (UCUM §2.6: an
/// annotation alone equals the unit 1), and a sender can write anything in them. Removing
/// them keeps the unit's meaning and drops the text: `mg{total}` -> `mg`, `{beats}/min` ->
/// `1/min`.
fn strip_unit_annotations(unit: &str) -> String {
    let mut out = String::with_capacity(unit.len());
    let mut in_annotation = false;
    for c in unit.chars() {
        match (in_annotation, c) {
            (false, '{') => {
                in_annotation = true;
                // An annotation standing alone as a term is the unit 1.
                let follows_term = out.chars().last().is_some_and(|last| {
                    last.is_ascii_alphanumeric() || matches!(last, ']' | ')' | '%' | '\'')
                });
                if !follows_term {
                    out.push('1');
                }
            }
            (true, '}') => in_annotation = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    if out.is_empty() { "1".to_owned() } else { out }
}

/// An observation's value in the de-identified views.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DeidValue {
    Quantity(DeidQuantity),
    Coded(CodedConcept),
    /// A narrative value: free text, removed. The row stays: that the observation was made,
    /// and when, is coded data.
    TextRemoved,
}

impl DeidValue {
    fn from_observation_value(value: &ObservationValue) -> Self {
        match value {
            ObservationValue::Quantity(quantity) => {
                DeidValue::Quantity(DeidQuantity::from_quantity(quantity))
            }
            ObservationValue::Coded(code) => DeidValue::Coded(CodedConcept::from_code(code)),
            ObservationValue::Text(_) => DeidValue::TextRemoved,
        }
    }

    pub const fn kind(&self) -> &'static str {
        match self {
            DeidValue::Quantity(_) => "quantity",
            DeidValue::Coded(_) => "coded",
            DeidValue::TextRemoved => "text_removed",
        }
    }
}

/// One patient.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PatientRow {
    pub pseudonym: Pseudonym,
    pub birth_year: BirthYear,
    pub sex: Sex,
    /// `None` when the chart has no address.
    pub geography: Option<Geography>,
}

impl PatientRow {
    /// The row as it may be released in `year`: a birth year that reads as 90 or more by
    /// then becomes "90+". Exports call this with the export's year, because a patient ages
    /// between their last event and the release.
    pub fn released_in(&self, year: i32) -> PatientRow {
        PatientRow {
            birth_year: self.birth_year.as_of(year),
            ..self.clone()
        }
    }
}

/// One observation (vital sign, lab result).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObservationRow {
    pub row_key: RowKey,
    pub pseudonym: Pseudonym,
    /// The year of the effective time.
    pub year: i32,
    /// LOINC.
    pub code: CodedConcept,
    pub value: DeidValue,
}

/// One condition of the problem list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConditionRow {
    pub row_key: RowKey,
    pub pseudonym: Pseudonym,
    /// ICD-10-CM or SNOMED CT.
    pub code: CodedConcept,
    pub onset_year: Option<i32>,
    pub resolved_year: Option<i32>,
}

/// One medication order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MedicationOrderRow {
    pub row_key: RowKey,
    pub pseudonym: Pseudonym,
    /// The year it was prescribed.
    pub year: i32,
    /// RxNorm.
    pub medication: CodedConcept,
    pub dose: DeidQuantity,
    pub route: MedicationRoute,
    pub frequency: DosingFrequency,
    pub discontinued_year: Option<i32>,
}

/// One allergy or intolerance (refuted ones are removed: they were never true).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllergyRow {
    pub row_key: RowKey,
    pub pseudonym: Pseudonym,
    /// RxNorm or SNOMED CT.
    pub substance: CodedConcept,
    pub criticality: AllergyCriticality,
    /// A closed list, not free text, so it stays.
    pub reaction: Option<AllergyReaction>,
}

/// What one event does to the de-identified tables. Applied in stream order, these give the
/// same tables whether run live or in a rebuild.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeidChange {
    InsertPatient(PatientRow),
    /// Only the fields the correction changed; `geography: Some(None)` removes it.
    CorrectPatient {
        pseudonym: Pseudonym,
        birth_year: Option<BirthYear>,
        sex: Option<Sex>,
        geography: Option<Option<Geography>>,
    },
    /// The patient has data dated in `year`: a birth year that reads as 90 or more by then
    /// becomes "90+" (the only way a de-identified birth year changes without a correction).
    AgeAsOf {
        pseudonym: Pseudonym,
        year: i32,
    },
    InsertObservation(ObservationRow),
    InsertCondition(ConditionRow),
    ResolveCondition {
        row_key: RowKey,
        resolved_year: i32,
    },
    InsertAllergy(AllergyRow),
    /// A refuted allergy leaves the views.
    RemoveAllergy {
        row_key: RowKey,
    },
    InsertMedicationOrder(MedicationOrderRow),
    DiscontinueMedicationOrder {
        row_key: RowKey,
        discontinued_year: i32,
    },
    /// The patient was erased: every row of theirs goes.
    ErasePatient {
        pseudonym: Pseudonym,
    },
}

impl DeidChange {
    /// The patient the change concerns, when it names one (row-keyed updates do not need to).
    pub fn pseudonym(&self) -> Option<&Pseudonym> {
        match self {
            DeidChange::InsertPatient(row) => Some(&row.pseudonym),
            DeidChange::CorrectPatient { pseudonym, .. }
            | DeidChange::AgeAsOf { pseudonym, .. }
            | DeidChange::ErasePatient { pseudonym } => Some(pseudonym),
            DeidChange::InsertObservation(row) => Some(&row.pseudonym),
            DeidChange::InsertCondition(row) => Some(&row.pseudonym),
            DeidChange::InsertAllergy(row) => Some(&row.pseudonym),
            DeidChange::InsertMedicationOrder(row) => Some(&row.pseudonym),
            DeidChange::ResolveCondition { .. }
            | DeidChange::RemoveAllergy { .. }
            | DeidChange::DiscontinueMedicationOrder { .. } => None,
        }
    }
}

/// What the transformation needs from the event's clear header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventContext {
    /// From the stream id.
    pub patient_id: PatientId,
    /// When chartlog recorded the event.
    pub recorded_at: Timestamp,
}

/// The de-identified changes one decoded patient event causes. Pure: the same event, context
/// and secret always give the same changes.
pub fn deidentify_event(
    context: &EventContext,
    event: &PatientEvent,
    pseudonymizer: &Pseudonymizer,
) -> Vec<DeidChange> {
    let pseudonym = pseudonymizer.patient(context.patient_id);
    let year_of = |at: Timestamp| at.date().year();
    // The latest date this event puts in the views: its own clinical date, or when it was
    // recorded if later (clinical dates may lead the clock only by a bounded skew).
    let event_year = |clinical: Option<Timestamp>| {
        let recorded = year_of(context.recorded_at);
        clinical.map_or(recorded, |at| recorded.max(year_of(at)))
    };
    let age_as_of = |year: i32| DeidChange::AgeAsOf {
        pseudonym: pseudonym.clone(),
        year,
    };
    match event {
        PatientEvent::PatientRegistered {
            patient_id,
            demographics,
        } => {
            debug_assert_eq!(
                *patient_id, context.patient_id,
                "the stream is the patient's"
            );
            vec![DeidChange::InsertPatient(patient_row(
                pseudonym.clone(),
                demographics,
                event_year(None),
            ))]
        }
        PatientEvent::DemographicsCorrected { correction } => {
            let year = event_year(None);
            let change = DeidChange::CorrectPatient {
                pseudonym: pseudonym.clone(),
                birth_year: correction
                    .birth_date
                    .as_ref()
                    .map(|birth_date| BirthYear::from_birth_date(birth_date, year)),
                sex: correction.sex,
                geography: correction
                    .address
                    .as_ref()
                    .map(|address| address.as_ref().map(Geography::from_address)),
            };
            // Names, contacts, MRN, SSN and identifiers are never read. A correction of only
            // those changes nothing here, but the patient is still seen in `year`.
            match change {
                DeidChange::CorrectPatient {
                    birth_year: None,
                    sex: None,
                    geography: None,
                    ..
                } => vec![age_as_of(year)],
                change => vec![change, age_as_of(year)],
            }
        }
        PatientEvent::ObservationRecorded {
            observation_id,
            code,
            value,
            effective_at,
        } => vec![
            DeidChange::InsertObservation(ObservationRow {
                row_key: pseudonymizer.record(RecordKind::Observation, observation_id.as_uuid()),
                pseudonym: pseudonym.clone(),
                year: year_of(*effective_at),
                code: CodedConcept::from_code(code),
                value: DeidValue::from_observation_value(value),
            }),
            age_as_of(event_year(Some(*effective_at))),
        ],
        PatientEvent::ConditionRecorded {
            condition_id,
            code,
            onset_at,
        } => vec![
            DeidChange::InsertCondition(ConditionRow {
                row_key: pseudonymizer.record(RecordKind::Condition, condition_id.as_uuid()),
                pseudonym: pseudonym.clone(),
                code: CodedConcept::from_code(code),
                onset_year: onset_at.map(year_of),
                resolved_year: None,
            }),
            age_as_of(event_year(*onset_at)),
        ],
        PatientEvent::ConditionResolved {
            condition_id,
            resolved_at,
        } => vec![
            DeidChange::ResolveCondition {
                row_key: pseudonymizer.record(RecordKind::Condition, condition_id.as_uuid()),
                resolved_year: year_of(*resolved_at),
            },
            age_as_of(event_year(Some(*resolved_at))),
        ],
        PatientEvent::AllergyRecorded {
            allergy_id,
            substance,
            criticality,
            reaction,
        } => vec![
            DeidChange::InsertAllergy(AllergyRow {
                row_key: pseudonymizer.record(RecordKind::Allergy, allergy_id.as_uuid()),
                pseudonym: pseudonym.clone(),
                substance: CodedConcept::from_code(substance),
                criticality: *criticality,
                reaction: *reaction,
            }),
            age_as_of(event_year(None)),
        ],
        PatientEvent::AllergyRefuted { allergy_id } => vec![
            DeidChange::RemoveAllergy {
                row_key: pseudonymizer.record(RecordKind::Allergy, allergy_id.as_uuid()),
            },
            age_as_of(event_year(None)),
        ],
        PatientEvent::MedicationPrescribed {
            medication_order_id,
            medication,
            dose,
            route,
            frequency,
            prescribed_at,
        } => vec![
            DeidChange::InsertMedicationOrder(MedicationOrderRow {
                row_key: pseudonymizer
                    .record(RecordKind::MedicationOrder, medication_order_id.as_uuid()),
                pseudonym: pseudonym.clone(),
                year: year_of(*prescribed_at),
                medication: CodedConcept::from_code(medication),
                dose: DeidQuantity::from_quantity(dose),
                route: *route,
                frequency: *frequency,
                discontinued_year: None,
            }),
            age_as_of(event_year(Some(*prescribed_at))),
        ],
        PatientEvent::MedicationDiscontinued {
            medication_order_id,
            discontinued_at,
            ..
        } => vec![
            DeidChange::DiscontinueMedicationOrder {
                row_key: pseudonymizer
                    .record(RecordKind::MedicationOrder, medication_order_id.as_uuid()),
                discontinued_year: year_of(*discontinued_at),
            },
            age_as_of(event_year(Some(*discontinued_at))),
        ],
        // Notes are free text through and through; consent and care relationships are
        // access control, not clinical data. None reaches the views, but each still dates
        // the patient's record.
        PatientEvent::NoteWritten { .. }
        | PatientEvent::NoteAmended { .. }
        | PatientEvent::NoteSigned { .. }
        | PatientEvent::NoteAddendumAdded { .. }
        | PatientEvent::ConsentRestrictionGranted { .. }
        | PatientEvent::ConsentRestrictionRevoked { .. }
        | PatientEvent::CareRelationshipAssigned { .. }
        | PatientEvent::CareRelationshipEnded { .. }
        | PatientEvent::LegalHoldPlaced { .. }
        | PatientEvent::LegalHoldReleased { .. } => vec![age_as_of(event_year(None))],
        PatientEvent::PatientErased { .. } => vec![DeidChange::ErasePatient { pseudonym }],
    }
}

fn patient_row(pseudonym: Pseudonym, demographics: &Demographics, as_of_year: i32) -> PatientRow {
    // Only these three fields of the demographics are read; everything else is identifying.
    PatientRow {
        pseudonym,
        birth_year: BirthYear::from_birth_date(&demographics.birth_date, as_of_year),
        sex: demographics.sex,
        geography: demographics.address.as_ref().map(Geography::from_address),
    }
}

/// The de-identified tables in memory: the reference the SQL tables are tested against, and
/// the fold for callers that de-identify one patient's events at a time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeidTables {
    pub patients: BTreeMap<Pseudonym, PatientRow>,
    pub observations: BTreeMap<RowKey, ObservationRow>,
    pub conditions: BTreeMap<RowKey, ConditionRow>,
    pub allergies: BTreeMap<RowKey, AllergyRow>,
    pub medication_orders: BTreeMap<RowKey, MedicationOrderRow>,
}

impl DeidTables {
    /// Applies one change. Changes for rows that are gone (after an erasure) do nothing, as
    /// the SQL `UPDATE ... WHERE` does.
    pub fn apply(&mut self, change: DeidChange) {
        match change {
            DeidChange::InsertPatient(row) => {
                self.patients.insert(row.pseudonym.clone(), row);
            }
            DeidChange::CorrectPatient {
                pseudonym,
                birth_year,
                sex,
                geography,
            } => {
                if let Some(row) = self.patients.get_mut(&pseudonym) {
                    if let Some(birth_year) = birth_year {
                        row.birth_year = birth_year;
                    }
                    if let Some(sex) = sex {
                        row.sex = sex;
                    }
                    if let Some(geography) = geography {
                        row.geography = geography;
                    }
                }
            }
            DeidChange::AgeAsOf { pseudonym, year } => {
                if let Some(row) = self.patients.get_mut(&pseudonym) {
                    row.birth_year = row.birth_year.as_of(year);
                }
            }
            DeidChange::InsertObservation(row) => {
                self.observations.insert(row.row_key.clone(), row);
            }
            DeidChange::InsertCondition(row) => {
                self.conditions.insert(row.row_key.clone(), row);
            }
            DeidChange::ResolveCondition {
                row_key,
                resolved_year,
            } => {
                if let Some(row) = self.conditions.get_mut(&row_key) {
                    row.resolved_year = Some(resolved_year);
                }
            }
            DeidChange::InsertAllergy(row) => {
                self.allergies.insert(row.row_key.clone(), row);
            }
            DeidChange::RemoveAllergy { row_key } => {
                self.allergies.remove(&row_key);
            }
            DeidChange::InsertMedicationOrder(row) => {
                self.medication_orders.insert(row.row_key.clone(), row);
            }
            DeidChange::DiscontinueMedicationOrder {
                row_key,
                discontinued_year,
            } => {
                if let Some(row) = self.medication_orders.get_mut(&row_key) {
                    row.discontinued_year = Some(discontinued_year);
                }
            }
            DeidChange::ErasePatient { pseudonym } => {
                self.patients.remove(&pseudonym);
                self.observations
                    .retain(|_, row| row.pseudonym != pseudonym);
                self.conditions.retain(|_, row| row.pseudonym != pseudonym);
                self.allergies.retain(|_, row| row.pseudonym != pseudonym);
                self.medication_orders
                    .retain(|_, row| row.pseudonym != pseudonym);
            }
        }
    }

    /// De-identifies a sequence of decoded events (in stream order per patient).
    pub fn from_events<'a>(
        events: impl IntoIterator<Item = (EventContext, &'a PatientEvent)>,
        pseudonymizer: &Pseudonymizer,
    ) -> DeidTables {
        let mut tables = DeidTables::default();
        for (context, event) in events {
            for change in deidentify_event(&context, event, pseudonymizer) {
                tables.apply(change);
            }
        }
        tables
    }
}
