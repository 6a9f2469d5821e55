//! Synthetic patients with realistic coded data, for demos, tests and benchmarks.
//!
//! Deterministic: the same `seed` always gives the same commands, so a benchmark or a test
//! can regenerate exactly what it stored. Names and numbers are obviously fictional
//! (a `SYNTHETIC-` MRN prefix, 555-01xx phone numbers) so nobody mistakes them for real PHI.

use uuid::Uuid;

use crate::codes::{Code, CodeSystem};
use crate::ids::{AllergyId, ConditionId, MedicationOrderId, NoteId, ObservationId, PatientId};
use crate::patient::{
    AllergyCriticality, AllergyReaction, Demographics, DosingFrequency, MedicationRoute,
    ObservationValue, PatientCommand,
};
use crate::phi::{
    AddressLine, BirthDate, City, ContactPoint, FamilyName, GivenName, Mrn, NoteText, PersonName,
    PhoneNumber, PostalAddress, PostalCode, Sex, UsState,
};
use crate::quantity::{Decimal, Quantity, Unit};
use crate::time::Timestamp;

const GIVEN_NAMES: [&str; 8] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "John",
];
const FAMILY_NAMES: [&str; 8] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Backus",
];
/// (LOINC code, unit, base value, spread): vital signs and common labs.
const OBSERVATIONS: [(&str, &str, i64, i64); 6] = [
    ("8867-4", "/min", 60, 40),    // heart rate
    ("8310-5", "Cel", 365, 15),    // body temperature, tenths
    ("8480-6", "mm[Hg]", 105, 40), // systolic blood pressure
    ("2339-0", "mg/dL", 80, 60),   // glucose
    ("29463-7", "kg", 50, 60),     // body weight
    ("2160-0", "mg/dL", 6, 8),     // creatinine, tenths
];
const CONDITIONS: [&str; 4] = ["E11.9", "I10", "J45.909", "E78.5"];
/// (RxNorm code, dose, unit).
const MEDICATIONS: [(&str, &str, &str); 4] = [
    ("860975", "500", "mg"), // metformin
    ("314076", "10", "mg"),  // lisinopril
    ("617312", "20", "mg"),  // atorvastatin
    ("745679", "90", "ug"),  // albuterol inhaler
];
const ALLERGENS: [&str; 3] = ["7980", "733", "2670"]; // penicillin G, ampicillin, codeine

/// A deterministic id in its own namespace: `kind` keeps ids of different kinds apart.
pub fn synthetic_uuid(seed: u64, kind: u16, n: u64) -> Uuid {
    Uuid::from_u128(
        (u128::from(seed) << 64) | (u128::from(kind) << 48) | u128::from(n & 0xffff_ffff_ffff),
    )
}

/// A synthetic patient's id.
pub fn patient_id(seed: u64) -> PatientId {
    PatientId::from_uuid(synthetic_uuid(seed, 1, 0))
}

fn parsed<T, E: std::fmt::Debug>(result: Result<T, E>) -> T {
    result.expect("synthetic values are valid by construction")
}

/// Registers synthetic patient `seed`.
pub fn registration(seed: u64) -> PatientCommand {
    let pick = |list: &[&'static str], salt: u64| {
        list[((seed.wrapping_mul(31) + salt) % list.len() as u64) as usize]
    };
    let year = 1935 + (seed % 85) as i32;
    let month = 1 + (seed % 12) as u8;
    let day = 1 + (seed % 28) as u8;
    let demographics = Demographics {
        name: parsed(PersonName::new(
            vec![parsed(GivenName::parse(pick(&GIVEN_NAMES, 1)))],
            parsed(FamilyName::parse(pick(&FAMILY_NAMES, 2))),
        )),
        birth_date: parsed(BirthDate::parse(&format!("{year:04}-{month:02}-{day:02}"))),
        sex: if seed.is_multiple_of(2) {
            Sex::Female
        } else {
            Sex::Male
        },
        address: Some(parsed(PostalAddress::new(
            vec![parsed(AddressLine::parse(&format!(
                "{} Synthetic Way",
                1 + seed % 999
            )))],
            parsed(City::parse("Springfield")),
            parsed(UsState::parse("IL")),
            parsed(PostalCode::parse(&format!("627{:02}", seed % 100))),
        ))),
        contacts: vec![ContactPoint::Phone(parsed(PhoneNumber::parse(&format!(
            "+1-217-555-01{:02}",
            seed % 100
        ))))],
        mrn: parsed(Mrn::parse(&format!("SYNTHETIC-{seed}"))),
        ssn: None,
        identifiers: vec![],
    };
    PatientCommand::RegisterPatient {
        patient_id: patient_id(seed),
        demographics,
    }
}

/// The `n`th clinical command (n from 0) for synthetic patient `seed`, recorded at `at`.
/// Mostly observations, as in a real chart; every command is accepted by a registered
/// patient that has seen commands 0..n.
pub fn clinical_command(seed: u64, n: u64, at: Timestamp) -> PatientCommand {
    match n % 20 {
        5 => {
            let code = CONDITIONS[(n / 20 % CONDITIONS.len() as u64) as usize];
            PatientCommand::RecordCondition {
                condition_id: ConditionId::from_uuid(synthetic_uuid(seed, 3, n)),
                code: parsed(Code::parse(CodeSystem::Icd10Cm, code, None)),
                onset_at: Some(at),
            }
        }
        10 => {
            let (code, dose, unit) = MEDICATIONS[(n / 20 % MEDICATIONS.len() as u64) as usize];
            PatientCommand::PrescribeMedication {
                medication_order_id: MedicationOrderId::from_uuid(synthetic_uuid(seed, 4, n)),
                medication: parsed(Code::parse(CodeSystem::RxNorm, code, None)),
                dose: Quantity {
                    value: parsed(Decimal::parse(dose)),
                    unit: parsed(Unit::parse(unit)),
                },
                route: MedicationRoute::Oral,
                frequency: DosingFrequency::Daily,
            }
        }
        15 if n < 20 => PatientCommand::RecordAllergy {
            allergy_id: AllergyId::from_uuid(synthetic_uuid(seed, 5, n)),
            substance: parsed(Code::parse(
                CodeSystem::RxNorm,
                ALLERGENS[(seed % ALLERGENS.len() as u64) as usize],
                None,
            )),
            criticality: AllergyCriticality::High,
            reaction: Some(AllergyReaction::Hives),
        },
        19 => PatientCommand::WriteNote {
            note_id: NoteId::from_uuid(synthetic_uuid(seed, 6, n)),
            text: parsed(NoteText::parse(&format!(
                "Synthetic visit note {n}: patient seen, vitals reviewed, plan unchanged."
            ))),
        },
        _ => {
            let (code, unit, base, spread) = OBSERVATIONS[(n % OBSERVATIONS.len() as u64) as usize];
            let raw = base + (seed.wrapping_add(n.wrapping_mul(7)) % spread as u64) as i64;
            let value = if matches!(code, "8310-5" | "2160-0") {
                format!("{}.{}", raw / 10, raw % 10)
            } else {
                raw.to_string()
            };
            PatientCommand::RecordObservation {
                observation_id: ObservationId::from_uuid(synthetic_uuid(seed, 2, n)),
                code: parsed(Code::parse(CodeSystem::Loinc, code, None)),
                value: ObservationValue::Quantity(Quantity {
                    value: parsed(Decimal::parse(&value)),
                    unit: parsed(Unit::parse(unit)),
                }),
                effective_at: at,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Patient, decide, evolve};

    #[test]
    fn every_synthetic_command_is_accepted_in_order() {
        let at = Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap();
        for seed in 0..5 {
            let mut patient = Patient::default();
            let commands = std::iter::once(registration(seed))
                .chain((0..200).map(|n| clinical_command(seed, n, at)));
            for command in commands {
                let kind = command.kind();
                let events = decide(&patient, command, at).unwrap_or_else(|rejection| {
                    panic!("seed {seed}: {kind} rejected: {rejection}")
                });
                patient = events.iter().fold(patient, evolve);
            }
            assert_eq!(patient.version(), 201);
        }
    }

    #[test]
    fn same_seed_same_commands() {
        let at = Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap();
        assert_eq!(registration(7), registration(7));
        assert_eq!(clinical_command(7, 3, at), clinical_command(7, 3, at));
        assert_ne!(patient_id(7), patient_id(8));
    }
}
