//! `decide`: the rules of the chart. Pure: the clock is the `now` argument, ids come in the
//! command, and the same state, command and `now` always give the same answer.

use crate::codes::{Code, CodePurpose};
use crate::patient::commands::{
    CONTACT_POINTS_MAX, Demographics, DemographicsCorrection, IDENTIFIERS_MAX, ObservationValue,
    PatientCommand,
};
use crate::patient::events::PatientEvent;
use crate::patient::rejection::Rejection;
use crate::patient::state::Patient;
use crate::phi::BirthDate;
use crate::time::Timestamp;

/// How far past `now` a clinical time may lie: clocks of devices and EHR front ends drift,
/// and a vital sign taken "now" on a tablet must not bounce.
pub const FUTURE_SKEW_MICROS_MAX: i64 = 5 * 60 * 1_000_000;
/// Addenda on one note.
pub const ADDENDA_PER_NOTE_MAX: usize = 64;
/// Clinicians in one patient's care team.
pub const CARE_TEAM_MAX: usize = 256;
/// Consent restrictions on one chart, revoked ones included (their ids stay reserved).
pub const CONSENT_RESTRICTIONS_MAX: usize = 64;
/// Legal holds on one record, released ones included (their ids stay reserved).
pub const LEGAL_HOLDS_MAX: usize = 64;

const _: () = assert!(FUTURE_SKEW_MICROS_MAX > 0);
const _: () = assert!(FUTURE_SKEW_MICROS_MAX <= 15 * 60 * 1_000_000);

/// Decides what `command` does to `patient` at `now`: the events to append, or why not.
/// An accepted command always yields at least one event.
pub fn decide(
    patient: &Patient,
    command: PatientCommand,
    now: Timestamp,
) -> Result<Vec<PatientEvent>, Rejection> {
    let Some(patient_id) = patient.patient_id() else {
        return match command {
            PatientCommand::RegisterPatient {
                patient_id,
                demographics,
            } => {
                check_demographics(&demographics, now)?;
                Ok(vec![PatientEvent::PatientRegistered {
                    patient_id,
                    demographics,
                }])
            }
            other => Err(Rejection::NotRegistered {
                command: other.kind(),
            }),
        };
    };
    if let Some(erased_at) = patient.erased_at() {
        return Err(Rejection::PatientErased {
            patient_id,
            erased_at,
        });
    }

    let event = match command {
        PatientCommand::RegisterPatient { .. } => {
            return Err(Rejection::AlreadyRegistered { patient_id });
        }
        PatientCommand::CorrectDemographics { correction } => {
            // A registered, unerased patient always has demographics; the `None` arm only
            // keeps this total.
            let changed = match patient.demographics() {
                Some(current) => changed_fields(current, correction),
                None => correction,
            };
            if changed.is_empty() {
                return Err(Rejection::NothingToCorrect { patient_id });
            }
            check_correction(&changed, now)?;
            PatientEvent::DemographicsCorrected {
                correction: changed,
            }
        }
        PatientCommand::RecordObservation {
            observation_id,
            code,
            value,
            effective_at,
        } => {
            if patient.has_recent_observation(observation_id) {
                return Err(Rejection::DuplicateObservation { observation_id });
            }
            check_purpose(&code, CodePurpose::Observation)?;
            match &value {
                ObservationValue::Coded(answer) => {
                    check_purpose(answer, CodePurpose::ObservationValue)?;
                }
                ObservationValue::Quantity(quantity) if !quantity.unit.is_ucum() => {
                    return Err(Rejection::UnitNotUcum {
                        field: "the observation's value",
                    });
                }
                _ => {}
            }
            if in_future(effective_at, now) {
                return Err(Rejection::ObservationInFuture { observation_id });
            }
            PatientEvent::ObservationRecorded {
                observation_id,
                code,
                value,
                effective_at,
            }
        }
        PatientCommand::RecordCondition {
            condition_id,
            code,
            onset_at,
        } => {
            if patient.conditions().contains_key(&condition_id) {
                return Err(Rejection::DuplicateCondition { condition_id });
            }
            check_purpose(&code, CodePurpose::Condition)?;
            if onset_at.is_some_and(|onset_at| in_future(onset_at, now)) {
                return Err(Rejection::OnsetInFuture { condition_id });
            }
            PatientEvent::ConditionRecorded {
                condition_id,
                code,
                onset_at,
            }
        }
        PatientCommand::ResolveCondition {
            condition_id,
            resolved_at,
        } => {
            let Some(condition) = patient.conditions().get(&condition_id) else {
                return Err(Rejection::UnknownCondition { condition_id });
            };
            if !condition.is_active() {
                return Err(Rejection::ConditionAlreadyResolved { condition_id });
            }
            if in_future(resolved_at, now) {
                return Err(Rejection::ResolutionInFuture { condition_id });
            }
            if condition
                .onset_at()
                .is_some_and(|onset_at| resolved_at < onset_at)
            {
                return Err(Rejection::ResolutionBeforeOnset { condition_id });
            }
            PatientEvent::ConditionResolved {
                condition_id,
                resolved_at,
            }
        }
        PatientCommand::RecordAllergy {
            allergy_id,
            substance,
            criticality,
            reaction,
        } => {
            if patient.allergies().contains_key(&allergy_id) {
                return Err(Rejection::DuplicateAllergy { allergy_id });
            }
            check_purpose(&substance, CodePurpose::AllergySubstance)?;
            let existing = patient.allergies().iter().find(|(_, allergy)| {
                !allergy.is_refuted() && allergy.substance().same_concept(&substance)
            });
            if let Some((existing_allergy_id, _)) = existing {
                return Err(Rejection::DuplicateActiveAllergy {
                    allergy_id,
                    existing_allergy_id: *existing_allergy_id,
                });
            }
            PatientEvent::AllergyRecorded {
                allergy_id,
                substance,
                criticality,
                reaction,
            }
        }
        PatientCommand::RefuteAllergy { allergy_id } => {
            let Some(allergy) = patient.allergies().get(&allergy_id) else {
                return Err(Rejection::UnknownAllergy { allergy_id });
            };
            if allergy.is_refuted() {
                return Err(Rejection::AllergyAlreadyRefuted { allergy_id });
            }
            PatientEvent::AllergyRefuted { allergy_id }
        }
        PatientCommand::PrescribeMedication {
            medication_order_id,
            medication,
            dose,
            route,
            frequency,
        } => {
            if patient
                .medication_orders()
                .contains_key(&medication_order_id)
            {
                return Err(Rejection::DuplicateMedicationOrder {
                    medication_order_id,
                });
            }
            check_purpose(&medication, CodePurpose::Medication)?;
            if !dose.unit.is_ucum() {
                return Err(Rejection::UnitNotUcum { field: "the dose" });
            }
            if !dose.value.is_positive() {
                return Err(Rejection::DoseNotPositive {
                    medication_order_id,
                });
            }
            PatientEvent::MedicationPrescribed {
                medication_order_id,
                medication,
                dose,
                route,
                frequency,
                prescribed_at: now,
            }
        }
        PatientCommand::DiscontinueMedication {
            medication_order_id,
            reason,
        } => {
            let Some(order) = patient.medication_orders().get(&medication_order_id) else {
                return Err(Rejection::UnknownMedicationOrder {
                    medication_order_id,
                });
            };
            if !order.is_active() {
                return Err(Rejection::MedicationOrderAlreadyDiscontinued {
                    medication_order_id,
                });
            }
            PatientEvent::MedicationDiscontinued {
                medication_order_id,
                reason,
                discontinued_at: now,
            }
        }
        PatientCommand::WriteNote { note_id, text } => {
            if patient.notes().contains_key(&note_id) {
                return Err(Rejection::DuplicateNote { note_id });
            }
            PatientEvent::NoteWritten {
                note_id,
                text,
                written_at: now,
            }
        }
        PatientCommand::AmendNote { note_id, text } => {
            let Some(note) = patient.notes().get(&note_id) else {
                return Err(Rejection::UnknownNote { note_id });
            };
            if note.is_signed() {
                return Err(Rejection::SignedNoteNotAmendable { note_id });
            }
            if *note.text() == text {
                return Err(Rejection::NoteUnchanged { note_id });
            }
            PatientEvent::NoteAmended {
                note_id,
                text,
                amended_at: now,
            }
        }
        PatientCommand::SignNote { note_id, signer } => {
            let Some(note) = patient.notes().get(&note_id) else {
                return Err(Rejection::UnknownNote { note_id });
            };
            if note.is_signed() {
                return Err(Rejection::NoteAlreadySigned { note_id });
            }
            PatientEvent::NoteSigned {
                note_id,
                signer,
                signed_at: now,
            }
        }
        PatientCommand::AddNoteAddendum { note_id, text } => {
            let Some(note) = patient.notes().get(&note_id) else {
                return Err(Rejection::UnknownNote { note_id });
            };
            if !note.is_signed() {
                return Err(Rejection::NoteNotSigned { note_id });
            }
            check_count(
                "addenda on the note",
                note.addenda().len() + 1,
                ADDENDA_PER_NOTE_MAX,
            )?;
            PatientEvent::NoteAddendumAdded {
                note_id,
                text,
                added_at: now,
            }
        }
        PatientCommand::GrantConsentRestriction {
            restriction_id,
            kind,
        } => {
            if patient.consent_restrictions().contains_key(&restriction_id) {
                return Err(Rejection::DuplicateConsentRestriction { restriction_id });
            }
            check_count(
                "consent restrictions",
                patient.consent_restrictions().len() + 1,
                CONSENT_RESTRICTIONS_MAX,
            )?;
            PatientEvent::ConsentRestrictionGranted {
                restriction_id,
                kind,
            }
        }
        PatientCommand::RevokeConsentRestriction { restriction_id } => {
            let Some(restriction) = patient.consent_restrictions().get(&restriction_id) else {
                return Err(Rejection::UnknownConsentRestriction { restriction_id });
            };
            if restriction.is_revoked() {
                return Err(Rejection::ConsentRestrictionAlreadyRevoked { restriction_id });
            }
            PatientEvent::ConsentRestrictionRevoked { restriction_id }
        }
        PatientCommand::AssignCareRelationship { clinician } => {
            if patient.has_care_relationship(clinician) {
                return Err(Rejection::CareRelationshipExists { clinician });
            }
            check_count("care team", patient.care_team().len() + 1, CARE_TEAM_MAX)?;
            PatientEvent::CareRelationshipAssigned { clinician }
        }
        PatientCommand::EndCareRelationship { clinician } => {
            if !patient.has_care_relationship(clinician) {
                return Err(Rejection::NoCareRelationship { clinician });
            }
            PatientEvent::CareRelationshipEnded { clinician }
        }
        PatientCommand::PlaceLegalHold { hold_id, reason } => {
            if patient.legal_holds().contains_key(&hold_id) {
                return Err(Rejection::DuplicateLegalHold { hold_id });
            }
            check_count(
                "legal holds",
                patient.legal_holds().len() + 1,
                LEGAL_HOLDS_MAX,
            )?;
            PatientEvent::LegalHoldPlaced {
                hold_id,
                reason,
                placed_at: now,
            }
        }
        PatientCommand::ReleaseLegalHold { hold_id } => {
            let Some(hold) = patient.legal_holds().get(&hold_id) else {
                return Err(Rejection::UnknownLegalHold { hold_id });
            };
            if hold.is_released() {
                return Err(Rejection::LegalHoldAlreadyReleased { hold_id });
            }
            PatientEvent::LegalHoldReleased {
                hold_id,
                released_at: now,
            }
        }
        PatientCommand::ErasePatient { reason } => {
            let holds = patient.legal_holds_in_force();
            if holds > 0 {
                return Err(Rejection::UnderLegalHold { patient_id, holds });
            }
            PatientEvent::PatientErased {
                reason,
                erased_at: now,
            }
        }
    };
    Ok(vec![event])
}

fn in_future(at: Timestamp, now: Timestamp) -> bool {
    at.unix_micros() > now.unix_micros().saturating_add(FUTURE_SKEW_MICROS_MAX)
}

fn check_purpose(code: &Code, purpose: CodePurpose) -> Result<(), Rejection> {
    if purpose.allows(code.system()) {
        Ok(())
    } else {
        Err(Rejection::CodeSystemNotAllowed {
            purpose,
            system: code.system(),
        })
    }
}

fn check_count(what: &'static str, count: usize, count_max: usize) -> Result<(), Rejection> {
    if count > count_max {
        return Err(Rejection::TooMany {
            what,
            count,
            count_max,
        });
    }
    Ok(())
}

fn check_birth_date(birth_date: &BirthDate, now: Timestamp) -> Result<(), Rejection> {
    if birth_date.expose_phi() > now.date() {
        return Err(Rejection::BirthDateInFuture);
    }
    Ok(())
}

fn check_demographics(demographics: &Demographics, now: Timestamp) -> Result<(), Rejection> {
    check_birth_date(&demographics.birth_date, now)?;
    check_count(
        "contact points",
        demographics.contacts.len(),
        CONTACT_POINTS_MAX,
    )?;
    check_count(
        "identifiers",
        demographics.identifiers.len(),
        IDENTIFIERS_MAX,
    )
}

fn check_correction(correction: &DemographicsCorrection, now: Timestamp) -> Result<(), Rejection> {
    if let Some(birth_date) = &correction.birth_date {
        check_birth_date(birth_date, now)?;
    }
    if let Some(contacts) = &correction.contacts {
        check_count("contact points", contacts.len(), CONTACT_POINTS_MAX)?;
    }
    if let Some(identifiers) = &correction.identifiers {
        check_count("identifiers", identifiers.len(), IDENTIFIERS_MAX)?;
    }
    Ok(())
}

/// Keeps only the fields whose new value differs, so the event says exactly what changed.
fn changed_fields(
    current: &Demographics,
    correction: DemographicsCorrection,
) -> DemographicsCorrection {
    DemographicsCorrection {
        name: correction.name.filter(|name| *name != current.name),
        birth_date: correction
            .birth_date
            .filter(|birth_date| *birth_date != current.birth_date),
        sex: correction.sex.filter(|sex| *sex != current.sex),
        address: correction
            .address
            .filter(|address| *address != current.address),
        contacts: correction
            .contacts
            .filter(|contacts| *contacts != current.contacts),
        mrn: correction.mrn.filter(|mrn| *mrn != current.mrn),
        ssn: correction.ssn.filter(|ssn| *ssn != current.ssn),
        identifiers: correction
            .identifiers
            .filter(|identifiers| *identifiers != current.identifiers),
    }
}
