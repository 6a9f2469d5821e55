//! The decision state of one patient, and `evolve`, the fold that builds it from events.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde::{Deserialize, Serialize};

use crate::codes::Code;
use crate::ids::{
    AllergyId, ConditionId, ConsentRestrictionId, LegalHoldId, MedicationOrderId, NoteId,
    ObservationId, PatientId, UserId,
};
use crate::patient::commands::{
    AllergyCriticality, AllergyReaction, ConsentRestrictionKind, Demographics,
    DiscontinuationReason, DosingFrequency, ErasureReason, LegalHoldReason, MedicationRoute,
};
use crate::patient::events::PatientEvent;
use crate::phi::NoteText;
use crate::quantity::Quantity;
use crate::time::Timestamp;

/// The shape of [`Patient`] as serialized in a snapshot. Bump it with any change to the
/// fields of [`Patient`] or of the types it holds: a snapshot of another version is ignored
/// and rebuilt from the events, never decoded into a state it was not taken from.
pub const DECISION_STATE_SCHEMA_VERSION: u32 = 3;

/// How many of the latest observation ids the decision state remembers, to refuse a command
/// replayed with the same id. Observation ids are minted by the server (UUID v7), so a repeat
/// can only be a client resending a command it already sent, which happens within moments;
/// remembering every id would make the state, and so every command and snapshot, grow with
/// the length of the patient's history.
pub const RECENT_OBSERVATION_IDS_KEPT: usize = 256;

/// What `decide` needs to know about a patient: the fold of the patient's events.
///
/// Read-only from outside (getters, no setters): the only way to change it is [`evolve`].
/// Serializable so it can be snapshotted (sealed, like events, since it holds PHI). `Debug`
/// redacts PHI because every PHI field is a redacting newtype.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Patient {
    version: u64,
    patient_id: Option<PatientId>,
    demographics: Option<Demographics>,
    /// Every observation recorded, as a count: a device-fed chart gathers tens of thousands,
    /// and a decision state that grew with them would make each command cost more than the
    /// last (see [`RECENT_OBSERVATION_IDS_KEPT`] for what is remembered of them).
    observations_recorded: u64,
    recent_observation_ids: VecDeque<ObservationId>,
    conditions: BTreeMap<ConditionId, Condition>,
    allergies: BTreeMap<AllergyId, Allergy>,
    medication_orders: BTreeMap<MedicationOrderId, MedicationOrder>,
    notes: BTreeMap<NoteId, Note>,
    consent_restrictions: BTreeMap<ConsentRestrictionId, ConsentRestriction>,
    care_team: BTreeSet<UserId>,
    legal_holds: BTreeMap<LegalHoldId, LegalHold>,
    erasure: Option<Erasure>,
}

impl Patient {
    /// Events applied so far: the stream version this state is current at.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// `Some` once registered, and still after an erasure.
    pub fn patient_id(&self) -> Option<PatientId> {
        self.patient_id
    }

    pub fn is_registered(&self) -> bool {
        self.patient_id.is_some()
    }

    /// `None` before registration and after an erasure.
    pub fn demographics(&self) -> Option<&Demographics> {
        self.demographics.as_ref()
    }

    pub fn is_erased(&self) -> bool {
        self.erasure.is_some()
    }

    pub fn erased_at(&self) -> Option<Timestamp> {
        self.erasure.map(|erasure| erasure.erased_at)
    }

    pub fn erasure_reason(&self) -> Option<ErasureReason> {
        self.erasure.map(|erasure| erasure.reason)
    }

    /// Whether `observation_id` is one of the last [`RECENT_OBSERVATION_IDS_KEPT`] recorded.
    pub fn has_recent_observation(&self, observation_id: ObservationId) -> bool {
        self.recent_observation_ids.contains(&observation_id)
    }

    pub fn observations_recorded(&self) -> u64 {
        self.observations_recorded
    }

    pub fn conditions(&self) -> &BTreeMap<ConditionId, Condition> {
        &self.conditions
    }

    pub fn allergies(&self) -> &BTreeMap<AllergyId, Allergy> {
        &self.allergies
    }

    pub fn medication_orders(&self) -> &BTreeMap<MedicationOrderId, MedicationOrder> {
        &self.medication_orders
    }

    pub fn notes(&self) -> &BTreeMap<NoteId, Note> {
        &self.notes
    }

    pub fn consent_restrictions(&self) -> &BTreeMap<ConsentRestrictionId, ConsentRestriction> {
        &self.consent_restrictions
    }

    /// Restrictions in force (granted and not revoked).
    pub fn active_consent_restrictions(&self) -> impl Iterator<Item = ConsentRestrictionKind> + '_ {
        self.consent_restrictions
            .values()
            .filter(|restriction| !restriction.revoked)
            .map(|restriction| restriction.kind)
    }

    /// Legal holds placed on the record, released ones included (their ids stay reserved).
    pub fn legal_holds(&self) -> &BTreeMap<LegalHoldId, LegalHold> {
        &self.legal_holds
    }

    /// How many legal holds are in force: while any is, the record cannot be erased.
    pub fn legal_holds_in_force(&self) -> usize {
        self.legal_holds
            .values()
            .filter(|hold| !hold.released)
            .count()
    }

    /// Clinicians in a care relationship with the patient.
    pub fn care_team(&self) -> &BTreeSet<UserId> {
        &self.care_team
    }

    pub fn has_care_relationship(&self, clinician: UserId) -> bool {
        self.care_team.contains(&clinician)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Erasure {
    reason: ErasureReason,
    erased_at: Timestamp,
}

/// A condition on the problem list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Condition {
    code: Code,
    onset_at: Option<Timestamp>,
    resolved_at: Option<Timestamp>,
}

impl Condition {
    pub fn code(&self) -> &Code {
        &self.code
    }

    pub fn onset_at(&self) -> Option<Timestamp> {
        self.onset_at
    }

    pub fn resolved_at(&self) -> Option<Timestamp> {
        self.resolved_at
    }

    pub fn is_active(&self) -> bool {
        self.resolved_at.is_none()
    }
}

/// An allergy or intolerance; refuted ones stay, marked, so their id is never reused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allergy {
    substance: Code,
    criticality: AllergyCriticality,
    reaction: Option<AllergyReaction>,
    refuted: bool,
}

impl Allergy {
    pub fn substance(&self) -> &Code {
        &self.substance
    }

    pub fn criticality(&self) -> AllergyCriticality {
        self.criticality
    }

    pub fn reaction(&self) -> Option<AllergyReaction> {
        self.reaction
    }

    pub fn is_refuted(&self) -> bool {
        self.refuted
    }
}

/// A medication order (prescription).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MedicationOrder {
    medication: Code,
    dose: Quantity,
    route: MedicationRoute,
    frequency: DosingFrequency,
    prescribed_at: Timestamp,
    discontinued: Option<(DiscontinuationReason, Timestamp)>,
}

impl MedicationOrder {
    pub fn medication(&self) -> &Code {
        &self.medication
    }

    pub fn dose(&self) -> &Quantity {
        &self.dose
    }

    pub fn route(&self) -> MedicationRoute {
        self.route
    }

    pub fn frequency(&self) -> DosingFrequency {
        self.frequency
    }

    pub fn prescribed_at(&self) -> Timestamp {
        self.prescribed_at
    }

    pub fn discontinuation_reason(&self) -> Option<DiscontinuationReason> {
        self.discontinued.map(|(reason, _)| reason)
    }

    pub fn discontinued_at(&self) -> Option<Timestamp> {
        self.discontinued.map(|(_, at)| at)
    }

    pub fn is_active(&self) -> bool {
        self.discontinued.is_none()
    }
}

/// A clinical note: amendable until signed, then only addenda.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    text: NoteText,
    written_at: Timestamp,
    amended_at: Option<Timestamp>,
    signature: Option<(UserId, Timestamp)>,
    addenda: Vec<NoteAddendum>,
}

impl Note {
    pub fn text(&self) -> &NoteText {
        &self.text
    }

    pub fn written_at(&self) -> Timestamp {
        self.written_at
    }

    pub fn amended_at(&self) -> Option<Timestamp> {
        self.amended_at
    }

    pub fn is_signed(&self) -> bool {
        self.signature.is_some()
    }

    pub fn signer(&self) -> Option<UserId> {
        self.signature.map(|(signer, _)| signer)
    }

    pub fn signed_at(&self) -> Option<Timestamp> {
        self.signature.map(|(_, at)| at)
    }

    pub fn addenda(&self) -> &[NoteAddendum] {
        &self.addenda
    }
}

/// Text added to a signed note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoteAddendum {
    text: NoteText,
    added_at: Timestamp,
}

impl NoteAddendum {
    pub fn text(&self) -> &NoteText {
        &self.text
    }

    pub fn added_at(&self) -> Timestamp {
        self.added_at
    }
}

/// A restriction the patient placed on their record; revoked ones stay so ids stay unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentRestriction {
    kind: ConsentRestrictionKind,
    revoked: bool,
}

impl ConsentRestriction {
    pub fn kind(&self) -> ConsentRestrictionKind {
        self.kind
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked
    }
}

/// A legal hold on the record; released ones stay so ids stay unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegalHold {
    reason: LegalHoldReason,
    placed_at: Timestamp,
    released: bool,
}

impl LegalHold {
    pub fn reason(&self) -> LegalHoldReason {
        self.reason
    }

    pub fn placed_at(&self) -> Timestamp {
        self.placed_at
    }

    pub fn is_released(&self) -> bool {
        self.released
    }
}

/// Applies one event. Total for every event `decide` produces; an event `decide` could not
/// have produced for this state is a bug upstream (caught by debug assertions) and is
/// applied as best it can be rather than panicking in a production read.
pub fn evolve(mut patient: Patient, event: &PatientEvent) -> Patient {
    let version_before = patient.version;
    debug_assert!(
        patient.erasure.is_none(),
        "no event follows PatientErased in a stream"
    );
    debug_assert!(
        patient.patient_id.is_some() || matches!(event, PatientEvent::PatientRegistered { .. }),
        "the first event of a stream is PatientRegistered"
    );
    match event {
        PatientEvent::PatientRegistered {
            patient_id,
            demographics,
        } => {
            debug_assert!(patient.patient_id.is_none(), "registered once");
            patient.patient_id = Some(*patient_id);
            patient.demographics = Some(demographics.clone());
        }
        PatientEvent::DemographicsCorrected { correction } => {
            if let Some(current) = patient.demographics.as_mut() {
                let correction = correction.clone();
                if let Some(name) = correction.name {
                    current.name = name;
                }
                if let Some(birth_date) = correction.birth_date {
                    current.birth_date = birth_date;
                }
                if let Some(sex) = correction.sex {
                    current.sex = sex;
                }
                if let Some(address) = correction.address {
                    current.address = address;
                }
                if let Some(contacts) = correction.contacts {
                    current.contacts = contacts;
                }
                if let Some(mrn) = correction.mrn {
                    current.mrn = mrn;
                }
                if let Some(ssn) = correction.ssn {
                    current.ssn = ssn;
                }
                if let Some(identifiers) = correction.identifiers {
                    current.identifiers = identifiers;
                }
            }
        }
        PatientEvent::ObservationRecorded { observation_id, .. } => {
            patient.observations_recorded += 1;
            if patient.recent_observation_ids.len() == RECENT_OBSERVATION_IDS_KEPT {
                patient.recent_observation_ids.pop_front();
            }
            patient.recent_observation_ids.push_back(*observation_id);
        }
        PatientEvent::ConditionRecorded {
            condition_id,
            code,
            onset_at,
        } => {
            let previous = patient.conditions.insert(
                *condition_id,
                Condition {
                    code: code.clone(),
                    onset_at: *onset_at,
                    resolved_at: None,
                },
            );
            debug_assert!(previous.is_none(), "condition ids are unique");
        }
        PatientEvent::ConditionResolved {
            condition_id,
            resolved_at,
        } => {
            if let Some(condition) = patient.conditions.get_mut(condition_id) {
                debug_assert!(condition.resolved_at.is_none(), "resolved once");
                condition.resolved_at = Some(*resolved_at);
            }
        }
        PatientEvent::AllergyRecorded {
            allergy_id,
            substance,
            criticality,
            reaction,
        } => {
            let previous = patient.allergies.insert(
                *allergy_id,
                Allergy {
                    substance: substance.clone(),
                    criticality: *criticality,
                    reaction: *reaction,
                    refuted: false,
                },
            );
            debug_assert!(previous.is_none(), "allergy ids are unique");
        }
        PatientEvent::AllergyRefuted { allergy_id } => {
            if let Some(allergy) = patient.allergies.get_mut(allergy_id) {
                allergy.refuted = true;
            }
        }
        PatientEvent::MedicationPrescribed {
            medication_order_id,
            medication,
            dose,
            route,
            frequency,
            prescribed_at,
        } => {
            let previous = patient.medication_orders.insert(
                *medication_order_id,
                MedicationOrder {
                    medication: medication.clone(),
                    dose: dose.clone(),
                    route: *route,
                    frequency: *frequency,
                    prescribed_at: *prescribed_at,
                    discontinued: None,
                },
            );
            debug_assert!(previous.is_none(), "medication order ids are unique");
        }
        PatientEvent::MedicationDiscontinued {
            medication_order_id,
            reason,
            discontinued_at,
        } => {
            if let Some(order) = patient.medication_orders.get_mut(medication_order_id) {
                debug_assert!(order.discontinued.is_none(), "discontinued once");
                order.discontinued = Some((*reason, *discontinued_at));
            }
        }
        PatientEvent::NoteWritten {
            note_id,
            text,
            written_at,
        } => {
            let previous = patient.notes.insert(
                *note_id,
                Note {
                    text: text.clone(),
                    written_at: *written_at,
                    amended_at: None,
                    signature: None,
                    addenda: Vec::new(),
                },
            );
            debug_assert!(previous.is_none(), "note ids are unique");
        }
        PatientEvent::NoteAmended {
            note_id,
            text,
            amended_at,
        } => {
            if let Some(note) = patient.notes.get_mut(note_id) {
                debug_assert!(note.signature.is_none(), "signed notes are not amended");
                note.text = text.clone();
                note.amended_at = Some(*amended_at);
            }
        }
        PatientEvent::NoteSigned {
            note_id,
            signer,
            signed_at,
        } => {
            if let Some(note) = patient.notes.get_mut(note_id) {
                debug_assert!(note.signature.is_none(), "signed once");
                note.signature = Some((*signer, *signed_at));
            }
        }
        PatientEvent::NoteAddendumAdded {
            note_id,
            text,
            added_at,
        } => {
            if let Some(note) = patient.notes.get_mut(note_id) {
                debug_assert!(note.signature.is_some(), "addenda follow the signature");
                note.addenda.push(NoteAddendum {
                    text: text.clone(),
                    added_at: *added_at,
                });
            }
        }
        PatientEvent::ConsentRestrictionGranted {
            restriction_id,
            kind,
        } => {
            let previous = patient.consent_restrictions.insert(
                *restriction_id,
                ConsentRestriction {
                    kind: *kind,
                    revoked: false,
                },
            );
            debug_assert!(previous.is_none(), "consent restriction ids are unique");
        }
        PatientEvent::ConsentRestrictionRevoked { restriction_id } => {
            if let Some(restriction) = patient.consent_restrictions.get_mut(restriction_id) {
                restriction.revoked = true;
            }
        }
        PatientEvent::CareRelationshipAssigned { clinician } => {
            let inserted = patient.care_team.insert(*clinician);
            debug_assert!(inserted, "assigned once");
        }
        PatientEvent::CareRelationshipEnded { clinician } => {
            let removed = patient.care_team.remove(clinician);
            debug_assert!(removed, "ended only when assigned");
        }
        PatientEvent::LegalHoldPlaced {
            hold_id,
            reason,
            placed_at,
        } => {
            let previous = patient.legal_holds.insert(
                *hold_id,
                LegalHold {
                    reason: *reason,
                    placed_at: *placed_at,
                    released: false,
                },
            );
            debug_assert!(previous.is_none(), "legal hold ids are unique");
        }
        PatientEvent::LegalHoldReleased { hold_id, .. } => {
            if let Some(hold) = patient.legal_holds.get_mut(hold_id) {
                hold.released = true;
            }
        }
        PatientEvent::PatientErased { reason, erased_at } => {
            // Keep only what answers "who was this and when was it erased": the random id,
            // the version, the tombstone. Everything PHI goes with the data key.
            patient = Patient {
                version: patient.version,
                patient_id: patient.patient_id,
                erasure: Some(Erasure {
                    reason: *reason,
                    erased_at: *erased_at,
                }),
                ..Patient::default()
            };
        }
    }
    patient.version = version_before + 1;
    debug_assert!(
        patient.erasure.is_none() || patient.demographics.is_none(),
        "an erased patient keeps no demographics"
    );
    patient
}
