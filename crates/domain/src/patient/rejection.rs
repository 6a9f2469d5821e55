//! Why `decide` refused a command: answers a clinician can act on (HTTP 4xx).

use std::fmt;

use crate::codes::{CodePurpose, CodeSystem};
use crate::ids::{
    AllergyId, ConditionId, ConsentRestrictionId, LegalHoldId, MedicationOrderId, NoteId,
    ObservationId, PatientId, UserId,
};
use crate::time::Timestamp;

/// A refused command. Messages name ids and rules, never PHI, so they may be returned,
/// logged and traced as they are.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no patient is registered on this chart; {command} needs a registered patient")]
    NotRegistered { command: &'static str },
    #[error("patient {patient_id} is already registered")]
    AlreadyRegistered { patient_id: PatientId },
    #[error("patient {patient_id} was erased at {erased_at}")]
    PatientErased {
        patient_id: PatientId,
        erased_at: Timestamp,
    },
    #[error("birth date lies after today")]
    BirthDateInFuture,
    #[error("{what} has {count} entries, more than {count_max}")]
    TooMany {
        what: &'static str,
        count: usize,
        count_max: usize,
    },
    #[error("correction changes no demographic field of patient {patient_id}")]
    NothingToCorrect { patient_id: PatientId },
    #[error("code system {system} is not allowed for {purpose}")]
    CodeSystemNotAllowed {
        purpose: CodePurpose,
        system: CodeSystem,
    },
    #[error("observation {observation_id} is already recorded")]
    DuplicateObservation { observation_id: ObservationId },
    #[error("observation {observation_id} is effective in the future")]
    ObservationInFuture { observation_id: ObservationId },
    #[error("condition {condition_id} is already recorded")]
    DuplicateCondition { condition_id: ConditionId },
    #[error("condition {condition_id} has its onset in the future")]
    OnsetInFuture { condition_id: ConditionId },
    #[error("condition {condition_id} is not on this chart")]
    UnknownCondition { condition_id: ConditionId },
    #[error("condition {condition_id} is already resolved")]
    ConditionAlreadyResolved { condition_id: ConditionId },
    #[error("condition {condition_id} cannot be resolved in the future")]
    ResolutionInFuture { condition_id: ConditionId },
    #[error("condition {condition_id} cannot be resolved before its onset")]
    ResolutionBeforeOnset { condition_id: ConditionId },
    #[error("allergy {allergy_id} is already recorded")]
    DuplicateAllergy { allergy_id: AllergyId },
    #[error(
        "allergy {allergy_id} duplicates active allergy {existing_allergy_id} to the same substance"
    )]
    DuplicateActiveAllergy {
        allergy_id: AllergyId,
        existing_allergy_id: AllergyId,
    },
    #[error("allergy {allergy_id} is not on this chart")]
    UnknownAllergy { allergy_id: AllergyId },
    #[error("allergy {allergy_id} is already refuted")]
    AllergyAlreadyRefuted { allergy_id: AllergyId },
    #[error("medication order {medication_order_id} is already recorded")]
    DuplicateMedicationOrder {
        medication_order_id: MedicationOrderId,
    },
    /// The unit is never echoed: text that is not UCUM may be anything.
    #[error("the unit of {field} is not a UCUM unit (e.g. mg, mm[Hg], 10*3/uL, [degF])")]
    UnitNotUcum { field: &'static str },
    #[error("medication order {medication_order_id} needs a dose greater than zero")]
    DoseNotPositive {
        medication_order_id: MedicationOrderId,
    },
    #[error("medication order {medication_order_id} is not on this chart")]
    UnknownMedicationOrder {
        medication_order_id: MedicationOrderId,
    },
    #[error("medication order {medication_order_id} is already discontinued")]
    MedicationOrderAlreadyDiscontinued {
        medication_order_id: MedicationOrderId,
    },
    #[error("note {note_id} is already written")]
    DuplicateNote { note_id: NoteId },
    #[error("note {note_id} is not on this chart")]
    UnknownNote { note_id: NoteId },
    #[error("note {note_id} is signed and cannot be amended; add an addendum instead")]
    SignedNoteNotAmendable { note_id: NoteId },
    #[error("amendment leaves note {note_id} unchanged")]
    NoteUnchanged { note_id: NoteId },
    #[error("note {note_id} is already signed")]
    NoteAlreadySigned { note_id: NoteId },
    #[error("note {note_id} is not signed; amend it instead of adding an addendum")]
    NoteNotSigned { note_id: NoteId },
    #[error("consent restriction {restriction_id} is already granted")]
    DuplicateConsentRestriction {
        restriction_id: ConsentRestrictionId,
    },
    #[error("consent restriction {restriction_id} is not on this chart")]
    UnknownConsentRestriction {
        restriction_id: ConsentRestrictionId,
    },
    #[error("consent restriction {restriction_id} is already revoked")]
    ConsentRestrictionAlreadyRevoked {
        restriction_id: ConsentRestrictionId,
    },
    #[error("clinician {clinician} is already in a care relationship with this patient")]
    CareRelationshipExists { clinician: UserId },
    #[error("clinician {clinician} has no care relationship with this patient")]
    NoCareRelationship { clinician: UserId },
    #[error("legal hold {hold_id} is already placed")]
    DuplicateLegalHold { hold_id: LegalHoldId },
    #[error("legal hold {hold_id} is not on this record")]
    UnknownLegalHold { hold_id: LegalHoldId },
    #[error("legal hold {hold_id} is already released")]
    LegalHoldAlreadyReleased { hold_id: LegalHoldId },
    #[error(
        "patient {patient_id} is under {holds} legal hold(s); release them before erasing the record"
    )]
    UnderLegalHold { patient_id: PatientId, holds: usize },
    #[error("patient {patient_id} is within the retention period: {basis}; nothing was erased")]
    RetentionPeriodNotElapsed {
        patient_id: PatientId,
        basis: RetentionBasis,
    },
}

/// Which rule of the retention period keeps a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionBasis {
    /// `years` after the last entry on the record: until `kept_until`, which the message
    /// leaves out: the date of a patient's last entry is PHI, and whoever asks to erase (an
    /// administrator) sees none.
    LastEntry { years: u16, kept_until: Timestamp },
    /// `years` after the patient reaches the age of majority, `age`. No date is given: it
    /// would tell whoever asked the patient's birth date.
    AgeOfMajority { age: u8, years: u16 },
}

impl fmt::Display for RetentionBasis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetentionBasis::LastEntry { years, .. } => {
                write!(f, "records are kept {years} year(s) after their last entry")
            }
            RetentionBasis::AgeOfMajority { age, years } => write!(
                f,
                "a record is kept at least {years} year(s) after the patient turns {age}"
            ),
        }
    }
}

impl Rejection {
    /// A stable machine-readable code for API clients. Never change one.
    pub const fn code(&self) -> &'static str {
        match self {
            Rejection::NotRegistered { .. } => "not_registered",
            Rejection::AlreadyRegistered { .. } => "already_registered",
            Rejection::PatientErased { .. } => "patient_erased",
            Rejection::BirthDateInFuture => "birth_date_in_future",
            Rejection::TooMany { .. } => "too_many",
            Rejection::NothingToCorrect { .. } => "nothing_to_correct",
            Rejection::CodeSystemNotAllowed { .. } => "code_system_not_allowed",
            Rejection::DuplicateObservation { .. } => "duplicate_observation",
            Rejection::ObservationInFuture { .. } => "observation_in_future",
            Rejection::DuplicateCondition { .. } => "duplicate_condition",
            Rejection::OnsetInFuture { .. } => "onset_in_future",
            Rejection::UnknownCondition { .. } => "unknown_condition",
            Rejection::ConditionAlreadyResolved { .. } => "condition_already_resolved",
            Rejection::ResolutionInFuture { .. } => "resolution_in_future",
            Rejection::ResolutionBeforeOnset { .. } => "resolution_before_onset",
            Rejection::DuplicateAllergy { .. } => "duplicate_allergy",
            Rejection::DuplicateActiveAllergy { .. } => "duplicate_active_allergy",
            Rejection::UnknownAllergy { .. } => "unknown_allergy",
            Rejection::AllergyAlreadyRefuted { .. } => "allergy_already_refuted",
            Rejection::DuplicateMedicationOrder { .. } => "duplicate_medication_order",
            Rejection::UnitNotUcum { .. } => "unit_not_ucum",
            Rejection::DoseNotPositive { .. } => "dose_not_positive",
            Rejection::UnknownMedicationOrder { .. } => "unknown_medication_order",
            Rejection::MedicationOrderAlreadyDiscontinued { .. } => {
                "medication_order_already_discontinued"
            }
            Rejection::DuplicateNote { .. } => "duplicate_note",
            Rejection::UnknownNote { .. } => "unknown_note",
            Rejection::SignedNoteNotAmendable { .. } => "signed_note_not_amendable",
            Rejection::NoteUnchanged { .. } => "note_unchanged",
            Rejection::NoteAlreadySigned { .. } => "note_already_signed",
            Rejection::NoteNotSigned { .. } => "note_not_signed",
            Rejection::DuplicateConsentRestriction { .. } => "duplicate_consent_restriction",
            Rejection::UnknownConsentRestriction { .. } => "unknown_consent_restriction",
            Rejection::ConsentRestrictionAlreadyRevoked { .. } => {
                "consent_restriction_already_revoked"
            }
            Rejection::CareRelationshipExists { .. } => "care_relationship_exists",
            Rejection::NoCareRelationship { .. } => "no_care_relationship",
            Rejection::DuplicateLegalHold { .. } => "duplicate_legal_hold",
            Rejection::UnknownLegalHold { .. } => "unknown_legal_hold",
            Rejection::LegalHoldAlreadyReleased { .. } => "legal_hold_already_released",
            Rejection::UnderLegalHold { .. } => "under_legal_hold",
            Rejection::RetentionPeriodNotElapsed { .. } => "retention_period_not_elapsed",
        }
    }
}
