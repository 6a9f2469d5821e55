//! What a clinic asks of a patient's chart, and the clinical value types they carry.

use serde::{Deserialize, Deserializer, Serialize};

use crate::actor::Role;
use crate::codes::Code;
use crate::ids::{
    AllergyId, ConditionId, ConsentRestrictionId, LegalHoldId, MedicationOrderId, NoteId,
    ObservationId, PatientId, UserId,
};
use crate::phi::{
    BirthDate, ContactPoint, FreeText, Mrn, NoteText, PatientIdentifier, PersonName, PostalAddress,
    Sex, Ssn,
};
use crate::quantity::Quantity;
use crate::time::Timestamp;

/// Contact points (phones, emails) on one chart.
pub const CONTACT_POINTS_MAX: usize = 8;
/// Identifiers from other systems on one chart.
pub const IDENTIFIERS_MAX: usize = 8;
// `Demographics` repeats both in its OpenAPI `max_items`, which takes only literals.
const _: () = assert!(CONTACT_POINTS_MAX == 8 && IDENTIFIERS_MAX == 8);

/// Who the patient is. All of it is PHI except `sex`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// Request bodies reach these types: a misspelt field must be an error, not silently dropped.
#[serde(deny_unknown_fields)]
pub struct Demographics {
    pub name: PersonName,
    pub birth_date: BirthDate,
    pub sex: Sex,
    pub address: Option<PostalAddress>,
    /// At most `CONTACT_POINTS_MAX` (8), checked when the command is decided.
    #[cfg_attr(feature = "openapi", schema(max_items = 8))]
    pub contacts: Vec<ContactPoint>,
    pub mrn: Mrn,
    pub ssn: Option<Ssn>,
    /// At most `IDENTIFIERS_MAX` (8), checked when the command is decided.
    #[cfg_attr(feature = "openapi", schema(max_items = 8))]
    pub identifiers: Vec<PatientIdentifier>,
}

/// Fields to correct; `None` leaves a field as it is. For the optional fields,
/// `Some(None)` removes the value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(
        description = "Fields to correct: an absent field is left as it is, and `null` removes an optional one (address, ssn)."
    )
)]
// Request bodies reach these types: a misspelt field must be an error, not silently dropped.
#[serde(deny_unknown_fields)]
pub struct DemographicsCorrection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<PersonName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub birth_date: Option<BirthDate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sex: Option<Sex>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub address: Option<Option<PostalAddress>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contacts: Option<Vec<ContactPoint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mrn: Option<Mrn>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub ssn: Option<Option<Ssn>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifiers: Option<Vec<PatientIdentifier>>,
}

/// A field that is present is `Some`, even when it holds `null` (which means "remove"):
/// serde alone would read `null` as "absent" and lose the removal.
fn present<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer).map(Some)
}

impl DemographicsCorrection {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// An observation's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ObservationValue {
    /// A measurement; the unit is mandatory by construction.
    Quantity(Quantity),
    /// A coded answer (SNOMED CT finding, LOINC answer).
    Coded(Code),
    /// A narrative result.
    Text(FreeText),
}

/// How dangerous a future reaction could be (FHIR `AllergyIntoleranceCriticality`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AllergyCriticality {
    Low,
    High,
    UnableToAssess,
}

/// The reaction seen, when one was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AllergyReaction {
    Anaphylaxis,
    Angioedema,
    Bronchospasm,
    Hives,
    Rash,
    GastrointestinalUpset,
    Other,
}

/// How a medication is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum MedicationRoute {
    Oral,
    Sublingual,
    Intravenous,
    Intramuscular,
    Subcutaneous,
    Topical,
    Transdermal,
    Inhaled,
    Nasal,
    Ophthalmic,
    Otic,
    Rectal,
}

/// How often a dose is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DosingFrequency {
    Once,
    Daily,
    TwiceDaily,
    ThreeTimesDaily,
    FourTimesDaily,
    Every4Hours,
    Every6Hours,
    Every8Hours,
    Every12Hours,
    Weekly,
    AsNeeded,
}

/// Why a medication order was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DiscontinuationReason {
    CourseCompleted,
    AdverseReaction,
    Ineffective,
    PatientRequest,
    ReplacedByAnotherOrder,
    EnteredInError,
}

/// What a consent restriction does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ConsentRestrictionKind {
    /// This user may not open the chart (outside break-glass).
    BlockUser(UserId),
    /// Users in this role do not see the notes.
    HideNotesFromRole(Role),
}

/// Why a patient's record is erased. A closed list on purpose: free text here would be
/// PHI that outlives the erasure in the tombstone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErasureReason {
    PatientRequest,
    RetentionPeriodElapsed,
    DuplicateRegistration,
    RegisteredInError,
    LegalOrder,
}

/// Why a record is held. A closed list on purpose, as for erasure: the matter itself (a case
/// name, a subpoena) would be text that identifies and outlives what it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum LegalHoldReason {
    Litigation,
    GovernmentInvestigation,
    RegulatoryAudit,
    RetentionRequirement,
}

/// A request to change a patient's chart. `decide` turns it into events or a rejection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatientCommand {
    RegisterPatient {
        patient_id: PatientId,
        demographics: Demographics,
    },
    CorrectDemographics {
        correction: DemographicsCorrection,
    },
    RecordObservation {
        observation_id: ObservationId,
        /// LOINC.
        code: Code,
        value: ObservationValue,
        effective_at: Timestamp,
    },
    RecordCondition {
        condition_id: ConditionId,
        /// ICD-10-CM or SNOMED CT.
        code: Code,
        onset_at: Option<Timestamp>,
    },
    ResolveCondition {
        condition_id: ConditionId,
        resolved_at: Timestamp,
    },
    RecordAllergy {
        allergy_id: AllergyId,
        /// RxNorm or SNOMED CT.
        substance: Code,
        criticality: AllergyCriticality,
        reaction: Option<AllergyReaction>,
    },
    RefuteAllergy {
        allergy_id: AllergyId,
    },
    PrescribeMedication {
        medication_order_id: MedicationOrderId,
        /// RxNorm.
        medication: Code,
        dose: Quantity,
        route: MedicationRoute,
        frequency: DosingFrequency,
    },
    DiscontinueMedication {
        medication_order_id: MedicationOrderId,
        reason: DiscontinuationReason,
    },
    WriteNote {
        note_id: NoteId,
        text: NoteText,
    },
    /// Only while the note is unsigned.
    AmendNote {
        note_id: NoteId,
        text: NoteText,
    },
    SignNote {
        note_id: NoteId,
        signer: UserId,
    },
    /// Only on a signed note.
    AddNoteAddendum {
        note_id: NoteId,
        text: NoteText,
    },
    GrantConsentRestriction {
        restriction_id: ConsentRestrictionId,
        kind: ConsentRestrictionKind,
    },
    RevokeConsentRestriction {
        restriction_id: ConsentRestrictionId,
    },
    AssignCareRelationship {
        clinician: UserId,
    },
    EndCareRelationship {
        clinician: UserId,
    },
    /// Keeps the record from being erased until the hold is released.
    PlaceLegalHold {
        hold_id: LegalHoldId,
        reason: LegalHoldReason,
    },
    ReleaseLegalHold {
        hold_id: LegalHoldId,
    },
    ErasePatient {
        reason: ErasureReason,
    },
}

impl PatientCommand {
    /// A stable name for traces, metrics and messages.
    pub const fn kind(&self) -> &'static str {
        match self {
            PatientCommand::RegisterPatient { .. } => "register_patient",
            PatientCommand::CorrectDemographics { .. } => "correct_demographics",
            PatientCommand::RecordObservation { .. } => "record_observation",
            PatientCommand::RecordCondition { .. } => "record_condition",
            PatientCommand::ResolveCondition { .. } => "resolve_condition",
            PatientCommand::RecordAllergy { .. } => "record_allergy",
            PatientCommand::RefuteAllergy { .. } => "refute_allergy",
            PatientCommand::PrescribeMedication { .. } => "prescribe_medication",
            PatientCommand::DiscontinueMedication { .. } => "discontinue_medication",
            PatientCommand::WriteNote { .. } => "write_note",
            PatientCommand::AmendNote { .. } => "amend_note",
            PatientCommand::SignNote { .. } => "sign_note",
            PatientCommand::AddNoteAddendum { .. } => "add_note_addendum",
            PatientCommand::GrantConsentRestriction { .. } => "grant_consent_restriction",
            PatientCommand::RevokeConsentRestriction { .. } => "revoke_consent_restriction",
            PatientCommand::AssignCareRelationship { .. } => "assign_care_relationship",
            PatientCommand::EndCareRelationship { .. } => "end_care_relationship",
            PatientCommand::PlaceLegalHold { .. } => "place_legal_hold",
            PatientCommand::ReleaseLegalHold { .. } => "release_legal_hold",
            PatientCommand::ErasePatient { .. } => "erase_patient",
        }
    }
}
