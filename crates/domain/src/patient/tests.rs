//! One test per rule of `decide`, plus the PHI-redaction sweep over every command and event.

use uuid::Uuid;

use super::*;
use crate::actor::Role;
use crate::codes::{Code, CodePurpose, CodeSystem};
use crate::ids::{
    AllergyId, ConditionId, ConsentRestrictionId, LegalHoldId, MedicationOrderId, NoteId,
    ObservationId, PatientId, UserId,
};
use crate::phi::{
    AddressLine, BirthDate, City, ContactPoint, EmailAddress, FamilyName, FreeText, GivenName,
    IdentifierSystem, IdentifierValue, Mrn, NoteText, PatientIdentifier, PersonName, PhoneNumber,
    PostalAddress, PostalCode, Sex, Ssn, UsState,
};
use crate::quantity::{Decimal, Quantity, Unit};
use crate::time::Timestamp;

const NOW_MICROS: i64 = 1_700_000_000_000_000;
const MINUTE_MICROS: i64 = 60 * 1_000_000;

fn now() -> Timestamp {
    Timestamp::from_unix_micros(NOW_MICROS).unwrap()
}

fn at(offset_micros: i64) -> Timestamp {
    Timestamp::from_unix_micros(NOW_MICROS + offset_micros).unwrap()
}

fn patient_id() -> PatientId {
    PatientId::from_uuid(Uuid::from_u128(1))
}

fn user(n: u128) -> UserId {
    UserId::from_uuid(Uuid::from_u128(1000 + n))
}

fn demographics() -> Demographics {
    Demographics {
        name: PersonName::new(
            vec![GivenName::parse("Ada").unwrap()],
            FamilyName::parse("Lovelace").unwrap(),
        )
        .unwrap(),
        birth_date: BirthDate::parse("1985-12-10").unwrap(),
        sex: Sex::Female,
        address: None,
        contacts: vec![],
        mrn: Mrn::parse("MRN-1").unwrap(),
        ssn: None,
        identifiers: vec![],
    }
}

fn loinc(code: &str) -> Code {
    Code::parse(CodeSystem::Loinc, code, None).unwrap()
}

fn rxnorm(code: &str) -> Code {
    Code::parse(CodeSystem::RxNorm, code, None).unwrap()
}

fn icd(code: &str) -> Code {
    Code::parse(CodeSystem::Icd10Cm, code, None).unwrap()
}

fn quantity(value: &str, unit: &str) -> Quantity {
    Quantity {
        value: Decimal::parse(value).unwrap(),
        unit: Unit::parse(unit).unwrap(),
    }
}

fn note_text(text: &str) -> NoteText {
    NoteText::parse(text).unwrap()
}

/// Applies commands that must all be accepted.
fn chart(commands: Vec<PatientCommand>) -> Patient {
    let mut patient = Patient::default();
    for command in commands {
        let kind = command.kind();
        let events = decide(&patient, command, now())
            .unwrap_or_else(|rejection| panic!("{kind} rejected: {rejection}"));
        patient = events.iter().fold(patient, evolve);
    }
    patient
}

fn registered() -> Patient {
    chart(vec![register()])
}

fn register() -> PatientCommand {
    PatientCommand::RegisterPatient {
        patient_id: patient_id(),
        demographics: demographics(),
    }
}

fn rejection(patient: &Patient, command: PatientCommand) -> Rejection {
    match decide(patient, command, now()) {
        Ok(events) => panic!("accepted with {} events", events.len()),
        Err(rejection) => rejection,
    }
}

fn observation(id: u128, effective_at: Timestamp) -> PatientCommand {
    PatientCommand::RecordObservation {
        observation_id: ObservationId::from_uuid(Uuid::from_u128(id)),
        code: loinc("8310-5"),
        value: ObservationValue::Quantity(quantity("37.2", "Cel")),
        effective_at,
    }
}

fn condition(id: u128, onset_at: Option<Timestamp>) -> PatientCommand {
    PatientCommand::RecordCondition {
        condition_id: ConditionId::from_uuid(Uuid::from_u128(id)),
        code: icd("E11.9"),
        onset_at,
    }
}

fn resolve(id: u128, resolved_at: Timestamp) -> PatientCommand {
    PatientCommand::ResolveCondition {
        condition_id: ConditionId::from_uuid(Uuid::from_u128(id)),
        resolved_at,
    }
}

fn allergy(id: u128, substance: &str) -> PatientCommand {
    PatientCommand::RecordAllergy {
        allergy_id: AllergyId::from_uuid(Uuid::from_u128(id)),
        substance: rxnorm(substance),
        criticality: AllergyCriticality::High,
        reaction: Some(AllergyReaction::Hives),
    }
}

fn refute(id: u128) -> PatientCommand {
    PatientCommand::RefuteAllergy {
        allergy_id: AllergyId::from_uuid(Uuid::from_u128(id)),
    }
}

fn prescribe(id: u128, dose: &str) -> PatientCommand {
    PatientCommand::PrescribeMedication {
        medication_order_id: MedicationOrderId::from_uuid(Uuid::from_u128(id)),
        medication: rxnorm("197361"),
        dose: quantity(dose, "mg"),
        route: MedicationRoute::Oral,
        frequency: DosingFrequency::Daily,
    }
}

fn discontinue(id: u128) -> PatientCommand {
    PatientCommand::DiscontinueMedication {
        medication_order_id: MedicationOrderId::from_uuid(Uuid::from_u128(id)),
        reason: DiscontinuationReason::CourseCompleted,
    }
}

fn note_id(id: u128) -> NoteId {
    NoteId::from_uuid(Uuid::from_u128(id))
}

fn write_note(id: u128, text: &str) -> PatientCommand {
    PatientCommand::WriteNote {
        note_id: note_id(id),
        text: note_text(text),
    }
}

fn sign(id: u128) -> PatientCommand {
    PatientCommand::SignNote {
        note_id: note_id(id),
        signer: user(1),
    }
}

fn hold_id(id: u128) -> LegalHoldId {
    LegalHoldId::from_uuid(Uuid::from_u128(0x40_0000 + id))
}

fn restriction_id(id: u128) -> ConsentRestrictionId {
    ConsentRestrictionId::from_uuid(Uuid::from_u128(id))
}

#[test]
fn commands_before_registration_are_rejected() {
    let rejection = rejection(&Patient::default(), observation(1, now()));
    assert_eq!(
        rejection,
        Rejection::NotRegistered {
            command: "record_observation"
        }
    );
    assert_eq!(rejection.code(), "not_registered");
}

#[test]
fn registers_once() {
    let patient = registered();
    assert_eq!(patient.patient_id(), Some(patient_id()));
    assert_eq!(patient.version(), 1);
    assert_eq!(patient.demographics(), Some(&demographics()));
    assert_eq!(
        rejection(&patient, register()),
        Rejection::AlreadyRegistered {
            patient_id: patient_id()
        }
    );
}

#[test]
fn birth_date_in_the_future_is_rejected() {
    let mut demographics = demographics();
    demographics.birth_date = BirthDate::from_date(now().date().next_day().unwrap()).unwrap();
    let command = PatientCommand::RegisterPatient {
        patient_id: patient_id(),
        demographics: demographics.clone(),
    };
    assert_eq!(
        rejection(&Patient::default(), command),
        Rejection::BirthDateInFuture
    );
    let correction = PatientCommand::CorrectDemographics {
        correction: DemographicsCorrection {
            birth_date: Some(demographics.birth_date),
            ..DemographicsCorrection::default()
        },
    };
    assert_eq!(
        rejection(&registered(), correction),
        Rejection::BirthDateInFuture
    );
    // Born today is fine.
    let mut today = self::demographics();
    today.birth_date = BirthDate::from_date(now().date()).unwrap();
    chart(vec![PatientCommand::RegisterPatient {
        patient_id: patient_id(),
        demographics: today,
    }]);
}

#[test]
fn too_many_contacts_are_rejected() {
    let mut demographics = demographics();
    demographics.contacts = vec![
        ContactPoint::Phone(PhoneNumber::parse("617-555-0100").unwrap());
        CONTACT_POINTS_MAX + 1
    ];
    let command = PatientCommand::RegisterPatient {
        patient_id: patient_id(),
        demographics,
    };
    assert!(matches!(
        rejection(&Patient::default(), command),
        Rejection::TooMany {
            what: "contact points",
            ..
        }
    ));
}

#[test]
fn corrections_keep_only_changed_fields() {
    let patient = registered();
    let empty = PatientCommand::CorrectDemographics {
        correction: DemographicsCorrection::default(),
    };
    assert_eq!(
        rejection(&patient, empty),
        Rejection::NothingToCorrect {
            patient_id: patient_id()
        }
    );
    let same = PatientCommand::CorrectDemographics {
        correction: DemographicsCorrection {
            sex: Some(Sex::Female),
            mrn: Some(Mrn::parse("mrn-1").unwrap()),
            address: Some(None),
            ..DemographicsCorrection::default()
        },
    };
    assert_eq!(rejection(&patient, same).code(), "nothing_to_correct");

    let ssn = Ssn::parse("123-45-6789").unwrap();
    let events = decide(
        &patient,
        PatientCommand::CorrectDemographics {
            correction: DemographicsCorrection {
                sex: Some(Sex::Female),
                ssn: Some(Some(ssn.clone())),
                ..DemographicsCorrection::default()
            },
        },
        now(),
    )
    .unwrap();
    let expected = DemographicsCorrection {
        ssn: Some(Some(ssn.clone())),
        ..DemographicsCorrection::default()
    };
    assert_eq!(
        events,
        vec![PatientEvent::DemographicsCorrected {
            correction: expected
        }]
    );
    let patient = events.iter().fold(patient, evolve);
    assert_eq!(patient.demographics().unwrap().ssn, Some(ssn));

    // Some(None) removes, and survives the codec (null is not "absent").
    let removal = decide(
        &patient,
        PatientCommand::CorrectDemographics {
            correction: DemographicsCorrection {
                ssn: Some(None),
                ..DemographicsCorrection::default()
            },
        },
        now(),
    )
    .unwrap();
    let encoded = crate::codec::encode(&removal[0]);
    let decoded =
        crate::codec::decode(encoded.event_type, encoded.schema_version, &encoded.payload).unwrap();
    assert_eq!(decoded, removal[0]);
    let patient = removal.iter().fold(patient, evolve);
    assert_eq!(patient.demographics().unwrap().ssn, None);
}

#[test]
fn observations() {
    let patient = chart(vec![register(), observation(1, at(-MINUTE_MICROS))]);
    assert!(patient.has_recent_observation(ObservationId::from_uuid(Uuid::from_u128(1))));
    assert_eq!(patient.observations_recorded(), 1);
    let duplicate = rejection(&patient, observation(1, now()));
    assert_eq!(duplicate.code(), "duplicate_observation");
    // Within the allowed clock skew, accepted; beyond it, rejected.
    chart(vec![register(), observation(2, at(FUTURE_SKEW_MICROS_MAX))]);
    let future = rejection(&patient, observation(2, at(FUTURE_SKEW_MICROS_MAX + 1)));
    assert_eq!(future.code(), "observation_in_future");
}

#[test]
fn quantities_must_carry_ucum_units() {
    let patient = registered();
    let mut typed = observation(1, now());
    if let PatientCommand::RecordObservation { value, .. } = &mut typed {
        *value = ObservationValue::Quantity(quantity("37.2", "123-45-6789"));
    }
    let refused = rejection(&patient, typed);
    assert_eq!(refused.code(), "unit_not_ucum");
    assert!(!refused.to_string().contains("123-45-6789"), "{refused}");
    let mut typed = prescribe(2, "5");
    if let PatientCommand::PrescribeMedication { dose, .. } = &mut typed {
        *dose = quantity("5", "jdoe@x.org");
    }
    assert_eq!(rejection(&patient, typed).code(), "unit_not_ucum");
    chart(vec![register(), observation(1, now()), prescribe(2, "5")]);
}

#[test]
fn code_systems_are_checked_per_purpose() {
    let patient = registered();
    let snomed = Code::parse(CodeSystem::SnomedCt, "38341003", None).unwrap();
    let wrong_observation = PatientCommand::RecordObservation {
        observation_id: ObservationId::from_uuid(Uuid::from_u128(1)),
        code: snomed.clone(),
        value: ObservationValue::Text(FreeText::parse("normal").unwrap()),
        effective_at: now(),
    };
    assert_eq!(
        rejection(&patient, wrong_observation),
        Rejection::CodeSystemNotAllowed {
            purpose: CodePurpose::Observation,
            system: CodeSystem::SnomedCt
        }
    );
    let wrong_answer = PatientCommand::RecordObservation {
        observation_id: ObservationId::from_uuid(Uuid::from_u128(1)),
        code: loinc("8310-5"),
        value: ObservationValue::Coded(rxnorm("197361")),
        effective_at: now(),
    };
    assert_eq!(
        rejection(&patient, wrong_answer).code(),
        "code_system_not_allowed"
    );
    let wrong_condition = PatientCommand::RecordCondition {
        condition_id: ConditionId::from_uuid(Uuid::from_u128(1)),
        code: loinc("8310-5"),
        onset_at: None,
    };
    assert_eq!(
        rejection(&patient, wrong_condition).code(),
        "code_system_not_allowed"
    );
    let snomed_condition = PatientCommand::RecordCondition {
        condition_id: ConditionId::from_uuid(Uuid::from_u128(1)),
        code: snomed.clone(),
        onset_at: None,
    };
    assert!(decide(&patient, snomed_condition, now()).is_ok());
    let wrong_allergy = PatientCommand::RecordAllergy {
        allergy_id: AllergyId::from_uuid(Uuid::from_u128(1)),
        substance: icd("E11.9"),
        criticality: AllergyCriticality::Low,
        reaction: None,
    };
    assert_eq!(
        rejection(&patient, wrong_allergy).code(),
        "code_system_not_allowed"
    );
    let wrong_medication = PatientCommand::PrescribeMedication {
        medication_order_id: MedicationOrderId::from_uuid(Uuid::from_u128(1)),
        medication: snomed,
        dose: quantity("5", "mg"),
        route: MedicationRoute::Oral,
        frequency: DosingFrequency::Daily,
    };
    assert_eq!(
        rejection(&patient, wrong_medication),
        Rejection::CodeSystemNotAllowed {
            purpose: CodePurpose::Medication,
            system: CodeSystem::SnomedCt
        }
    );
}

#[test]
fn conditions() {
    let onset = at(-60 * MINUTE_MICROS);
    let patient = chart(vec![register(), condition(1, Some(onset))]);
    assert_eq!(
        rejection(&patient, condition(1, None)).code(),
        "duplicate_condition"
    );
    assert_eq!(
        rejection(&patient, condition(2, Some(at(FUTURE_SKEW_MICROS_MAX + 1)))).code(),
        "onset_in_future"
    );
    assert_eq!(
        rejection(&patient, resolve(9, now())).code(),
        "unknown_condition"
    );
    assert_eq!(
        rejection(&patient, resolve(1, at(FUTURE_SKEW_MICROS_MAX + 1))).code(),
        "resolution_in_future"
    );
    assert_eq!(
        rejection(&patient, resolve(1, at(-61 * MINUTE_MICROS))).code(),
        "resolution_before_onset"
    );
    let resolved = chart(vec![
        register(),
        condition(1, Some(onset)),
        resolve(1, now()),
    ]);
    let condition = &resolved.conditions()[&ConditionId::from_uuid(Uuid::from_u128(1))];
    assert!(!condition.is_active());
    assert_eq!(condition.resolved_at(), Some(now()));
    assert_eq!(
        rejection(&resolved, resolve(1, now())).code(),
        "condition_already_resolved"
    );
}

#[test]
fn allergies() {
    let patient = chart(vec![register(), allergy(1, "7980")]);
    assert_eq!(
        rejection(&patient, allergy(1, "1191")).code(),
        "duplicate_allergy"
    );
    assert_eq!(
        rejection(&patient, allergy(2, "7980")),
        Rejection::DuplicateActiveAllergy {
            allergy_id: AllergyId::from_uuid(Uuid::from_u128(2)),
            existing_allergy_id: AllergyId::from_uuid(Uuid::from_u128(1)),
        }
    );
    assert_eq!(rejection(&patient, refute(9)).code(), "unknown_allergy");
    // Once refuted, the substance may be recorded again under a new id.
    let refuted = chart(vec![
        register(),
        allergy(1, "7980"),
        refute(1),
        allergy(2, "7980"),
    ]);
    assert!(refuted.allergies()[&AllergyId::from_uuid(Uuid::from_u128(1))].is_refuted());
    assert_eq!(
        rejection(&refuted, refute(1)).code(),
        "allergy_already_refuted"
    );
}

#[test]
fn medication_orders() {
    let patient = chart(vec![register(), prescribe(1, "5")]);
    let order = &patient.medication_orders()[&MedicationOrderId::from_uuid(Uuid::from_u128(1))];
    assert!(order.is_active());
    assert_eq!(order.prescribed_at(), now());
    assert_eq!(
        rejection(&patient, prescribe(1, "5")).code(),
        "duplicate_medication_order"
    );
    assert_eq!(
        rejection(&patient, prescribe(2, "0.0")).code(),
        "dose_not_positive"
    );
    assert_eq!(
        rejection(&patient, prescribe(2, "-1")).code(),
        "dose_not_positive"
    );
    assert_eq!(
        rejection(&patient, discontinue(9)).code(),
        "unknown_medication_order"
    );
    let stopped = chart(vec![register(), prescribe(1, "5"), discontinue(1)]);
    assert_eq!(
        rejection(&stopped, discontinue(1)).code(),
        "medication_order_already_discontinued"
    );
}

#[test]
fn notes_are_amended_until_signed_then_take_addenda() {
    let patient = chart(vec![register(), write_note(1, "draft")]);
    assert_eq!(
        rejection(&patient, write_note(1, "again")).code(),
        "duplicate_note"
    );
    let amend = |text: &str| PatientCommand::AmendNote {
        note_id: note_id(1),
        text: note_text(text),
    };
    let addendum = |id: u128| PatientCommand::AddNoteAddendum {
        note_id: note_id(id),
        text: note_text("later finding"),
    };
    assert_eq!(rejection(&patient, amend("draft")).code(), "note_unchanged");
    assert_eq!(rejection(&patient, addendum(1)).code(), "note_not_signed");
    assert_eq!(rejection(&patient, sign(9)).code(), "unknown_note");
    assert_eq!(rejection(&patient, addendum(9)).code(), "unknown_note");

    let signed = chart(vec![
        register(),
        write_note(1, "draft"),
        amend("final"),
        sign(1),
        addendum(1),
    ]);
    let note = &signed.notes()[&note_id(1)];
    assert_eq!(note.text().expose_phi(), "final");
    assert_eq!(note.signer(), Some(user(1)));
    assert_eq!(note.addenda().len(), 1);
    assert_eq!(
        rejection(&signed, amend("changed")),
        Rejection::SignedNoteNotAmendable {
            note_id: note_id(1)
        }
    );
    assert_eq!(rejection(&signed, sign(1)).code(), "note_already_signed");

    let mut full = signed;
    for _ in 1..ADDENDA_PER_NOTE_MAX {
        let events = decide(&full, addendum(1), now()).unwrap();
        full = events.iter().fold(full, evolve);
    }
    assert!(matches!(
        rejection(&full, addendum(1)),
        Rejection::TooMany {
            what: "addenda on the note",
            ..
        }
    ));
}

#[test]
fn consent_restrictions() {
    let grant = |id: u128| PatientCommand::GrantConsentRestriction {
        restriction_id: restriction_id(id),
        kind: ConsentRestrictionKind::HideNotesFromRole(Role::Nurse),
    };
    let revoke = |id: u128| PatientCommand::RevokeConsentRestriction {
        restriction_id: restriction_id(id),
    };
    let patient = chart(vec![register(), grant(1)]);
    assert_eq!(
        patient.active_consent_restrictions().collect::<Vec<_>>(),
        vec![ConsentRestrictionKind::HideNotesFromRole(Role::Nurse)]
    );
    assert_eq!(
        rejection(&patient, grant(1)).code(),
        "duplicate_consent_restriction"
    );
    assert_eq!(
        rejection(&patient, revoke(9)).code(),
        "unknown_consent_restriction"
    );
    let revoked = chart(vec![register(), grant(1), revoke(1)]);
    assert_eq!(revoked.active_consent_restrictions().count(), 0);
    assert_eq!(
        rejection(&revoked, revoke(1)).code(),
        "consent_restriction_already_revoked"
    );
    assert_eq!(
        rejection(&revoked, grant(1)).code(),
        "duplicate_consent_restriction"
    );
}

#[test]
fn care_relationships() {
    let assign = PatientCommand::AssignCareRelationship { clinician: user(1) };
    let end = PatientCommand::EndCareRelationship { clinician: user(1) };
    let patient = chart(vec![register(), assign.clone()]);
    assert!(patient.has_care_relationship(user(1)));
    assert_eq!(
        rejection(&patient, assign),
        Rejection::CareRelationshipExists { clinician: user(1) }
    );
    let ended = chart(vec![
        register(),
        PatientCommand::AssignCareRelationship { clinician: user(1) },
        end.clone(),
    ]);
    assert!(ended.care_team().is_empty());
    assert_eq!(rejection(&ended, end).code(), "no_care_relationship");
}

#[test]
fn a_legal_hold_keeps_the_record_from_erasure_until_released() {
    let place = |id| PatientCommand::PlaceLegalHold {
        hold_id: hold_id(id),
        reason: LegalHoldReason::Litigation,
    };
    let release = |id| PatientCommand::ReleaseLegalHold {
        hold_id: hold_id(id),
    };
    let erase = PatientCommand::ErasePatient {
        reason: ErasureReason::PatientRequest,
    };
    let held = chart(vec![register(), place(1), place(2)]);
    assert_eq!(held.legal_holds_in_force(), 2);
    assert_eq!(
        held.legal_holds()[&hold_id(1)].reason(),
        LegalHoldReason::Litigation
    );
    assert_eq!(
        rejection(&held, erase.clone()),
        Rejection::UnderLegalHold {
            patient_id: patient_id(),
            holds: 2
        }
    );
    assert_eq!(rejection(&held, place(1)).code(), "duplicate_legal_hold");
    assert_eq!(rejection(&held, release(3)).code(), "unknown_legal_hold");

    // One released, one in force: still held.
    let one_left = chart(vec![register(), place(1), place(2), release(1)]);
    assert_eq!(one_left.legal_holds_in_force(), 1);
    assert!(one_left.legal_holds()[&hold_id(1)].is_released());
    assert_eq!(
        rejection(&one_left, erase.clone()).code(),
        "under_legal_hold"
    );
    assert_eq!(
        rejection(&one_left, release(1)).code(),
        "legal_hold_already_released"
    );
    // A released id stays reserved.
    assert_eq!(
        rejection(&one_left, place(1)).code(),
        "duplicate_legal_hold"
    );

    // Both released: the erasure goes through.
    let released = chart(vec![register(), place(1), place(2), release(1), release(2)]);
    assert_eq!(released.legal_holds_in_force(), 0);
    let erased = chart(vec![
        register(),
        place(1),
        release(1),
        PatientCommand::ErasePatient {
            reason: ErasureReason::PatientRequest,
        },
    ]);
    assert!(erased.is_erased());
    assert!(
        erased.legal_holds().is_empty(),
        "the tombstone keeps no hold"
    );
}

#[test]
fn erasure_drops_phi_and_closes_the_chart() {
    let erased = chart(vec![
        register(),
        observation(1, now()),
        write_note(1, "draft"),
        allergy(1, "7980"),
        PatientCommand::ErasePatient {
            reason: ErasureReason::PatientRequest,
        },
    ]);
    assert!(erased.is_erased());
    assert_eq!(erased.erased_at(), Some(now()));
    assert_eq!(erased.erasure_reason(), Some(ErasureReason::PatientRequest));
    assert_eq!(erased.patient_id(), Some(patient_id()));
    assert_eq!(erased.version(), 5);
    assert!(erased.demographics().is_none());
    assert!(erased.notes().is_empty());
    assert!(erased.allergies().is_empty());
    assert_eq!(erased.observations_recorded(), 0);
    let snapshot = serde_json::to_string(&erased).unwrap();
    assert!(!snapshot.contains("Lovelace") && !snapshot.contains("draft"));

    let expected = Rejection::PatientErased {
        patient_id: patient_id(),
        erased_at: now(),
    };
    assert_eq!(rejection(&erased, register()), expected);
    assert_eq!(rejection(&erased, write_note(2, "more")), expected);
    assert_eq!(
        rejection(
            &erased,
            PatientCommand::ErasePatient {
                reason: ErasureReason::LegalOrder
            }
        ),
        expected
    );
}

#[test]
fn snapshots_round_trip() {
    let patient = chart(vec![
        register(),
        observation(1, now()),
        condition(1, None),
        allergy(1, "7980"),
        prescribe(1, "2.50"),
        write_note(1, "draft"),
        sign(1),
        PatientCommand::AssignCareRelationship { clinician: user(2) },
    ]);
    let json = serde_json::to_value(&patient).unwrap();
    assert_eq!(serde_json::from_value::<Patient>(json).unwrap(), patient);
}

const MARKER: &str = "Zqxmarker";

/// Every command and every event, built with marker values in every PHI field.
fn everything_with_markers() -> (Vec<PatientCommand>, Vec<PatientEvent>) {
    let marker_text = NoteText::parse(&format!("{MARKER} note")).unwrap();
    let demographics = Demographics {
        name: PersonName::new(
            vec![GivenName::parse(MARKER).unwrap()],
            FamilyName::parse(MARKER).unwrap(),
        )
        .unwrap(),
        birth_date: BirthDate::parse("1961-07-04").unwrap(),
        sex: Sex::Other,
        address: Some(
            PostalAddress::new(
                vec![AddressLine::parse(&format!("1 {MARKER} Street")).unwrap()],
                City::parse(MARKER).unwrap(),
                UsState::parse("MA").unwrap(),
                PostalCode::parse("02139-4307").unwrap(),
            )
            .unwrap(),
        ),
        contacts: vec![
            ContactPoint::Phone(PhoneNumber::parse("+1 617 555 0142").unwrap()),
            ContactPoint::Email(EmailAddress::parse(&format!("{MARKER}@example.org")).unwrap()),
        ],
        mrn: Mrn::parse(MARKER).unwrap(),
        ssn: Some(Ssn::parse("123-45-6789").unwrap()),
        identifiers: vec![PatientIdentifier {
            system: IdentifierSystem::HealthPlanMemberNumber,
            value: IdentifierValue::parse(MARKER).unwrap(),
        }],
    };
    let correction = DemographicsCorrection {
        name: Some(demographics.name.clone()),
        birth_date: Some(demographics.birth_date),
        sex: Some(Sex::Other),
        address: Some(demographics.address.clone()),
        contacts: Some(demographics.contacts.clone()),
        mrn: Some(demographics.mrn.clone()),
        ssn: Some(demographics.ssn.clone()),
        identifiers: Some(demographics.identifiers.clone()),
    };
    let observation_code = Code::parse(CodeSystem::Loinc, "8310-5", Some(MARKER)).unwrap();
    let condition_code = Code::parse(CodeSystem::Icd10Cm, "F32.9", Some(MARKER)).unwrap();
    let substance = Code::parse(CodeSystem::RxNorm, "7980", Some(MARKER)).unwrap();
    let dose = quantity("987.654", "mg");
    let values = [
        ObservationValue::Quantity(quantity("987.654", "[degF]")),
        ObservationValue::Coded(
            Code::parse(CodeSystem::SnomedCt, "260385009", Some(MARKER)).unwrap(),
        ),
        ObservationValue::Text(FreeText::parse(MARKER).unwrap()),
    ];
    let observation_id = ObservationId::from_uuid(Uuid::from_u128(1));
    let condition_id = ConditionId::from_uuid(Uuid::from_u128(1));
    let allergy_id = AllergyId::from_uuid(Uuid::from_u128(1));
    let order_id = MedicationOrderId::from_uuid(Uuid::from_u128(1));

    let mut commands = vec![
        PatientCommand::RegisterPatient {
            patient_id: patient_id(),
            demographics: demographics.clone(),
        },
        PatientCommand::CorrectDemographics {
            correction: correction.clone(),
        },
    ];
    let mut events = vec![
        PatientEvent::PatientRegistered {
            patient_id: patient_id(),
            demographics,
        },
        PatientEvent::DemographicsCorrected { correction },
    ];
    for value in values {
        commands.push(PatientCommand::RecordObservation {
            observation_id,
            code: observation_code.clone(),
            value: value.clone(),
            effective_at: now(),
        });
        events.push(PatientEvent::ObservationRecorded {
            observation_id,
            code: observation_code.clone(),
            value,
            effective_at: now(),
        });
    }
    commands.extend([
        PatientCommand::RecordCondition {
            condition_id,
            code: condition_code.clone(),
            onset_at: Some(now()),
        },
        PatientCommand::ResolveCondition {
            condition_id,
            resolved_at: now(),
        },
        PatientCommand::RecordAllergy {
            allergy_id,
            substance: substance.clone(),
            criticality: AllergyCriticality::High,
            reaction: Some(AllergyReaction::Anaphylaxis),
        },
        PatientCommand::RefuteAllergy { allergy_id },
        PatientCommand::PrescribeMedication {
            medication_order_id: order_id,
            medication: substance.clone(),
            dose: dose.clone(),
            route: MedicationRoute::Oral,
            frequency: DosingFrequency::TwiceDaily,
        },
        PatientCommand::DiscontinueMedication {
            medication_order_id: order_id,
            reason: DiscontinuationReason::AdverseReaction,
        },
        PatientCommand::WriteNote {
            note_id: note_id(1),
            text: marker_text.clone(),
        },
        PatientCommand::AmendNote {
            note_id: note_id(1),
            text: marker_text.clone(),
        },
        PatientCommand::SignNote {
            note_id: note_id(1),
            signer: user(1),
        },
        PatientCommand::AddNoteAddendum {
            note_id: note_id(1),
            text: marker_text.clone(),
        },
        PatientCommand::GrantConsentRestriction {
            restriction_id: restriction_id(1),
            kind: ConsentRestrictionKind::BlockUser(user(2)),
        },
        PatientCommand::RevokeConsentRestriction {
            restriction_id: restriction_id(1),
        },
        PatientCommand::AssignCareRelationship { clinician: user(1) },
        PatientCommand::EndCareRelationship { clinician: user(1) },
        PatientCommand::PlaceLegalHold {
            hold_id: hold_id(1),
            reason: LegalHoldReason::Litigation,
        },
        PatientCommand::ReleaseLegalHold {
            hold_id: hold_id(1),
        },
        PatientCommand::ErasePatient {
            reason: ErasureReason::PatientRequest,
        },
    ]);
    events.extend([
        PatientEvent::ConditionRecorded {
            condition_id,
            code: condition_code,
            onset_at: Some(now()),
        },
        PatientEvent::ConditionResolved {
            condition_id,
            resolved_at: now(),
        },
        PatientEvent::AllergyRecorded {
            allergy_id,
            substance: substance.clone(),
            criticality: AllergyCriticality::High,
            reaction: Some(AllergyReaction::Anaphylaxis),
        },
        PatientEvent::AllergyRefuted { allergy_id },
        PatientEvent::MedicationPrescribed {
            medication_order_id: order_id,
            medication: substance,
            dose,
            route: MedicationRoute::Oral,
            frequency: DosingFrequency::TwiceDaily,
            prescribed_at: now(),
        },
        PatientEvent::MedicationDiscontinued {
            medication_order_id: order_id,
            reason: DiscontinuationReason::AdverseReaction,
            discontinued_at: now(),
        },
        PatientEvent::NoteWritten {
            note_id: note_id(1),
            text: marker_text.clone(),
            written_at: now(),
        },
        PatientEvent::NoteAmended {
            note_id: note_id(1),
            text: marker_text.clone(),
            amended_at: now(),
        },
        PatientEvent::NoteSigned {
            note_id: note_id(1),
            signer: user(1),
            signed_at: now(),
        },
        PatientEvent::NoteAddendumAdded {
            note_id: note_id(1),
            text: marker_text,
            added_at: now(),
        },
        PatientEvent::ConsentRestrictionGranted {
            restriction_id: restriction_id(1),
            kind: ConsentRestrictionKind::BlockUser(user(2)),
        },
        PatientEvent::ConsentRestrictionRevoked {
            restriction_id: restriction_id(1),
        },
        PatientEvent::CareRelationshipAssigned { clinician: user(1) },
        PatientEvent::CareRelationshipEnded { clinician: user(1) },
        PatientEvent::LegalHoldPlaced {
            hold_id: hold_id(1),
            reason: LegalHoldReason::Litigation,
            placed_at: now(),
        },
        PatientEvent::LegalHoldReleased {
            hold_id: hold_id(1),
            released_at: now(),
        },
        PatientEvent::PatientErased {
            reason: ErasureReason::PatientRequest,
            erased_at: now(),
        },
    ]);
    (commands, events)
}

/// Fragments of the marker PHI that must never show in `Debug` output.
const LEAKS: [&str; 12] = [
    MARKER,
    "ZQXMARKER",
    "1961",
    "07-04",
    "02139",
    "617",
    "123-45-6789",
    "8310-5",
    "F32.9",
    "7980",
    "987.654",
    "260385009",
];

fn assert_no_leak(debug: &str) {
    for leak in LEAKS {
        assert!(!debug.contains(leak), "{leak:?} leaked in {debug}");
    }
}

#[test]
fn debug_never_shows_phi() {
    let (commands, events) = everything_with_markers();
    assert_eq!(
        commands.len(),
        22,
        "every command variant, each observation value"
    );
    assert_eq!(
        events.len(),
        22,
        "every event variant, each observation value"
    );
    let event_types: std::collections::BTreeSet<_> =
        events.iter().map(PatientEvent::event_type).collect();
    assert_eq!(event_types.len(), PatientEvent::EVENT_TYPES.len());
    for command in &commands {
        assert_no_leak(&format!("{command:?}"));
        assert_no_leak(&format!("{command:#?}"));
    }
    for event in &events {
        assert_no_leak(&format!("{event:?}"));
        assert_no_leak(&format!("{:?}", crate::codec::encode(event)));
    }
    // A live chart holding all of it, before the erasure.
    let mut patient = Patient::default();
    for command in commands
        .into_iter()
        .take_while(|c| c.kind() != "erase_patient")
    {
        let Ok(accepted) = decide(&patient, command, now()) else {
            continue;
        };
        patient = accepted.iter().fold(patient, evolve);
    }
    assert!(patient.demographics().is_some() && !patient.notes().is_empty());
    assert_no_leak(&format!("{patient:?}"));
}

#[test]
fn rejection_messages_never_show_phi_and_codes_are_unique() {
    let (commands, _) = everything_with_markers();
    let mut codes = std::collections::BTreeSet::new();
    let mut patient = Patient::default();
    for command in commands {
        // Each command twice: the second time most are rejected.
        for _ in 0..2 {
            match decide(&patient, command.clone(), now()) {
                Ok(events) => patient = events.iter().fold(patient, evolve),
                Err(rejection) => {
                    assert_no_leak(&rejection.to_string());
                    assert!(!rejection.to_string().ends_with('.'));
                    codes.insert(rejection.code());
                }
            }
        }
    }
    assert!(codes.len() > 5);
}

#[test]
fn every_event_round_trips_through_the_codec() {
    let (_, events) = everything_with_markers();
    for event in events {
        let encoded = crate::codec::encode(&event);
        assert_eq!(encoded.event_type, event.event_type());
        assert_eq!(
            Some(encoded.schema_version),
            crate::codec::current_schema_version(encoded.event_type)
        );
        let decoded =
            crate::codec::decode(encoded.event_type, encoded.schema_version, &encoded.payload)
                .unwrap();
        assert_eq!(decoded, event);
    }
}

#[test]
fn the_tombstone_holds_no_phi() {
    let (_, events) = everything_with_markers();
    let Some(tombstone) = events.last() else {
        panic!("fixture ends with the tombstone");
    };
    assert_eq!(tombstone.event_type(), "patient_erased");
    let payload = crate::codec::encode(tombstone).payload;
    let json: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        json,
        serde_json::json!({"reason": "patient_request", "erased_at": NOW_MICROS})
    );
}

#[test]
fn the_decision_state_stays_bounded_however_many_observations() {
    let extra = 44;
    let count = RECENT_OBSERVATION_IDS_KEPT as u128 + extra;
    let mut events = vec![register()];
    events.extend((1..=count).map(|n| observation(n, at(-MINUTE_MICROS))));
    let patient = chart(events);
    assert_eq!(patient.observations_recorded(), count as u64);
    let id = |n: u128| ObservationId::from_uuid(Uuid::from_u128(n));
    assert!(patient.has_recent_observation(id(count)));
    assert!(patient.has_recent_observation(id(extra + 1)));
    assert!(!patient.has_recent_observation(id(extra)));
    assert_eq!(
        rejection(&patient, observation(count, now())).code(),
        "duplicate_observation"
    );
}
