//! What happened to a patient's chart, in the past tense. Events are facts: `evolve` applies
//! them without re-checking, and `codec` stores them under a name and a schema version.

use serde::{Deserialize, Serialize};

use crate::codes::Code;
use crate::ids::{
    AllergyId, ConditionId, ConsentRestrictionId, LegalHoldId, MedicationOrderId, NoteId,
    ObservationId, PatientId, UserId,
};
use crate::patient::commands::{
    AllergyCriticality, AllergyReaction, ConsentRestrictionKind, Demographics,
    DemographicsCorrection, DiscontinuationReason, DosingFrequency, ErasureReason, LegalHoldReason,
    MedicationRoute, ObservationValue,
};
use crate::phi::NoteText;
use crate::quantity::Quantity;
use crate::time::Timestamp;

/// An event of a patient's stream. The serde form (`type` + `data`) is used by
/// [`crate::codec`]; the `type` names are [`PatientEvent::event_type`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
pub enum PatientEvent {
    PatientRegistered {
        patient_id: PatientId,
        demographics: Demographics,
    },
    /// Holds only the fields that changed.
    DemographicsCorrected {
        correction: DemographicsCorrection,
    },
    ObservationRecorded {
        observation_id: ObservationId,
        code: Code,
        value: ObservationValue,
        effective_at: Timestamp,
    },
    ConditionRecorded {
        condition_id: ConditionId,
        code: Code,
        onset_at: Option<Timestamp>,
    },
    ConditionResolved {
        condition_id: ConditionId,
        resolved_at: Timestamp,
    },
    AllergyRecorded {
        allergy_id: AllergyId,
        substance: Code,
        criticality: AllergyCriticality,
        reaction: Option<AllergyReaction>,
    },
    AllergyRefuted {
        allergy_id: AllergyId,
    },
    MedicationPrescribed {
        medication_order_id: MedicationOrderId,
        medication: Code,
        dose: Quantity,
        route: MedicationRoute,
        frequency: DosingFrequency,
        prescribed_at: Timestamp,
    },
    MedicationDiscontinued {
        medication_order_id: MedicationOrderId,
        reason: DiscontinuationReason,
        discontinued_at: Timestamp,
    },
    NoteWritten {
        note_id: NoteId,
        text: NoteText,
        written_at: Timestamp,
    },
    NoteAmended {
        note_id: NoteId,
        text: NoteText,
        amended_at: Timestamp,
    },
    NoteSigned {
        note_id: NoteId,
        signer: UserId,
        signed_at: Timestamp,
    },
    NoteAddendumAdded {
        note_id: NoteId,
        text: NoteText,
        added_at: Timestamp,
    },
    ConsentRestrictionGranted {
        restriction_id: ConsentRestrictionId,
        kind: ConsentRestrictionKind,
    },
    ConsentRestrictionRevoked {
        restriction_id: ConsentRestrictionId,
    },
    CareRelationshipAssigned {
        clinician: UserId,
    },
    CareRelationshipEnded {
        clinician: UserId,
    },
    LegalHoldPlaced {
        hold_id: LegalHoldId,
        reason: LegalHoldReason,
        placed_at: Timestamp,
    },
    LegalHoldReleased {
        hold_id: LegalHoldId,
        released_at: Timestamp,
    },
    /// The tombstone. Holds no PHI: it outlives the patient's data key.
    PatientErased {
        reason: ErasureReason,
        erased_at: Timestamp,
    },
}

impl PatientEvent {
    /// Every event type, in declaration order.
    pub const EVENT_TYPES: [&'static str; 20] = [
        "patient_registered",
        "demographics_corrected",
        "observation_recorded",
        "condition_recorded",
        "condition_resolved",
        "allergy_recorded",
        "allergy_refuted",
        "medication_prescribed",
        "medication_discontinued",
        "note_written",
        "note_amended",
        "note_signed",
        "note_addendum_added",
        "consent_restriction_granted",
        "consent_restriction_revoked",
        "care_relationship_assigned",
        "care_relationship_ended",
        "legal_hold_placed",
        "legal_hold_released",
        "patient_erased",
    ];

    /// The stable name stored in the clear event header. Never rename one: add a new type.
    pub const fn event_type(&self) -> &'static str {
        match self {
            PatientEvent::PatientRegistered { .. } => "patient_registered",
            PatientEvent::DemographicsCorrected { .. } => "demographics_corrected",
            PatientEvent::ObservationRecorded { .. } => "observation_recorded",
            PatientEvent::ConditionRecorded { .. } => "condition_recorded",
            PatientEvent::ConditionResolved { .. } => "condition_resolved",
            PatientEvent::AllergyRecorded { .. } => "allergy_recorded",
            PatientEvent::AllergyRefuted { .. } => "allergy_refuted",
            PatientEvent::MedicationPrescribed { .. } => "medication_prescribed",
            PatientEvent::MedicationDiscontinued { .. } => "medication_discontinued",
            PatientEvent::NoteWritten { .. } => "note_written",
            PatientEvent::NoteAmended { .. } => "note_amended",
            PatientEvent::NoteSigned { .. } => "note_signed",
            PatientEvent::NoteAddendumAdded { .. } => "note_addendum_added",
            PatientEvent::ConsentRestrictionGranted { .. } => "consent_restriction_granted",
            PatientEvent::ConsentRestrictionRevoked { .. } => "consent_restriction_revoked",
            PatientEvent::CareRelationshipAssigned { .. } => "care_relationship_assigned",
            PatientEvent::CareRelationshipEnded { .. } => "care_relationship_ended",
            PatientEvent::LegalHoldPlaced { .. } => "legal_hold_placed",
            PatientEvent::LegalHoldReleased { .. } => "legal_hold_released",
            PatientEvent::PatientErased { .. } => "patient_erased",
        }
    }
}
