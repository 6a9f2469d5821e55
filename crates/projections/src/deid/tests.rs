//! Unit tests of the Safe Harbor transformation. Fixtures carry marker values in every
//! identifying and free-text field; no de-identified output may contain any of them.

use chartlog_crypto::{MAC_KEY_BYTES, MacKey};
use chartlog_domain::patient::{
    AllergyCriticality, AllergyReaction, Demographics, DemographicsCorrection,
    DiscontinuationReason, DosingFrequency, ErasureReason, MedicationRoute, ObservationValue,
};
use chartlog_domain::phi::{
    AddressLine, BirthDate, City, ContactPoint, EmailAddress, FamilyName, FreeText, GivenName,
    IdentifierSystem, IdentifierValue, Mrn, NoteText, PatientIdentifier, PersonName, PhoneNumber,
    PostalAddress, PostalCode, Sex, Ssn, UsState,
};
use chartlog_domain::{
    AllergyId, Code, CodeSystem, ConditionId, Decimal, MedicationOrderId, NoteId, ObservationId,
    PatientEvent, PatientId, Quantity, Timestamp, Unit,
};
use uuid::Uuid;

use super::export::{DeidExportWriter, DeidRecord, DeidTable, ExportFormat, csv_text_field};
use super::*;

/// Every identifying or free-text value of the fixtures contains this.
const MARKER: &str = "Qzmarker";

fn keys() -> Pseudonymizer {
    Pseudonymizer::new(MacKey::from_bytes(&[42; MAC_KEY_BYTES]))
}

fn at(date: &str) -> Timestamp {
    let date = time::Date::parse(
        date,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .unwrap();
    Timestamp::from_datetime(date.midnight().assume_utc()).unwrap()
}

fn patient_id() -> PatientId {
    PatientId::from_uuid(Uuid::from_u128(0x1234))
}

fn context(date: &str) -> EventContext {
    EventContext {
        patient_id: patient_id(),
        recorded_at: at(date),
    }
}

fn address(zip: &str) -> PostalAddress {
    PostalAddress::new(
        vec![AddressLine::parse(&format!("1 {MARKER} Street")).unwrap()],
        City::parse(&format!("{MARKER}ville")).unwrap(),
        UsState::parse("NH").unwrap(),
        PostalCode::parse(zip).unwrap(),
    )
    .unwrap()
}

fn demographics(birth: &str, zip: &str) -> Demographics {
    Demographics {
        name: PersonName::new(
            vec![GivenName::parse(MARKER).unwrap()],
            FamilyName::parse(&format!("{MARKER}son")).unwrap(),
        )
        .unwrap(),
        birth_date: BirthDate::parse(birth).unwrap(),
        sex: Sex::Female,
        address: Some(address(zip)),
        contacts: vec![
            ContactPoint::Phone(PhoneNumber::parse("+1 617 555 0100").unwrap()),
            ContactPoint::Email(EmailAddress::parse(&format!("{MARKER}@example.org")).unwrap()),
        ],
        mrn: Mrn::parse(&format!("{MARKER}-7")).unwrap(),
        ssn: Some(Ssn::parse("123-45-6789").unwrap()),
        identifiers: vec![PatientIdentifier {
            system: IdentifierSystem::HealthPlanMemberNumber,
            value: IdentifierValue::parse(&format!("{MARKER} 99")).unwrap(),
        }],
    }
}

fn registered(birth: &str, zip: &str) -> PatientEvent {
    PatientEvent::PatientRegistered {
        patient_id: patient_id(),
        demographics: demographics(birth, zip),
    }
}

fn code(system: CodeSystem, code: &str) -> Code {
    Code::parse(system, code, Some(&format!("{MARKER} display"))).unwrap()
}

fn quantity(value: &str, unit: &str) -> Quantity {
    Quantity {
        value: Decimal::parse(value).unwrap(),
        unit: Unit::parse(unit).unwrap(),
    }
}

/// One event of every type, for a patient born in 1960 living in 02139.
fn full_chart() -> Vec<(EventContext, PatientEvent)> {
    let uuid = |n: u128| Uuid::from_u128(n);
    let note_text = || NoteText::parse(&format!("{MARKER} says the chest hurts")).unwrap();
    vec![
        (
            context("2024-03-01"),
            registered("1960-07-04", "02139-4307"),
        ),
        (
            context("2024-03-02"),
            PatientEvent::ObservationRecorded {
                observation_id: ObservationId::from_uuid(uuid(1)),
                code: code(CodeSystem::Loinc, "8867-4"),
                value: ObservationValue::Quantity(quantity("72.50", "{beats}/min")),
                effective_at: at("2024-03-02"),
            },
        ),
        (
            context("2024-03-02"),
            PatientEvent::ObservationRecorded {
                observation_id: ObservationId::from_uuid(uuid(2)),
                code: code(CodeSystem::Loinc, "11329-0"),
                value: ObservationValue::Text(
                    FreeText::parse(&format!("{MARKER} history")).unwrap(),
                ),
                effective_at: at("2024-03-02"),
            },
        ),
        (
            context("2024-03-02"),
            PatientEvent::ObservationRecorded {
                observation_id: ObservationId::from_uuid(uuid(3)),
                code: code(CodeSystem::Loinc, "72166-2"),
                value: ObservationValue::Coded(code(CodeSystem::SnomedCt, "266919005")),
                effective_at: at("2024-03-02"),
            },
        ),
        (
            context("2024-03-03"),
            PatientEvent::ConditionRecorded {
                condition_id: ConditionId::from_uuid(uuid(4)),
                code: code(CodeSystem::Icd10Cm, "E11.9"),
                onset_at: Some(at("2019-05-17")),
            },
        ),
        (
            context("2025-01-10"),
            PatientEvent::ConditionResolved {
                condition_id: ConditionId::from_uuid(uuid(4)),
                resolved_at: at("2025-01-09"),
            },
        ),
        (
            context("2024-03-03"),
            PatientEvent::AllergyRecorded {
                allergy_id: AllergyId::from_uuid(uuid(5)),
                substance: code(CodeSystem::RxNorm, "7980"),
                criticality: AllergyCriticality::High,
                reaction: Some(AllergyReaction::Hives),
            },
        ),
        (
            context("2024-03-03"),
            PatientEvent::AllergyRecorded {
                allergy_id: AllergyId::from_uuid(uuid(6)),
                substance: code(CodeSystem::RxNorm, "733"),
                criticality: AllergyCriticality::Low,
                reaction: None,
            },
        ),
        (
            context("2024-03-04"),
            PatientEvent::AllergyRefuted {
                allergy_id: AllergyId::from_uuid(uuid(6)),
            },
        ),
        (
            context("2024-03-04"),
            PatientEvent::MedicationPrescribed {
                medication_order_id: MedicationOrderId::from_uuid(uuid(7)),
                medication: code(CodeSystem::RxNorm, "860975"),
                dose: quantity("500", "mg"),
                route: MedicationRoute::Oral,
                frequency: DosingFrequency::TwiceDaily,
                prescribed_at: at("2024-03-04"),
            },
        ),
        (
            context("2026-02-01"),
            PatientEvent::MedicationDiscontinued {
                medication_order_id: MedicationOrderId::from_uuid(uuid(7)),
                reason: DiscontinuationReason::CourseCompleted,
                discontinued_at: at("2026-02-01"),
            },
        ),
        (
            context("2024-03-05"),
            PatientEvent::NoteWritten {
                note_id: NoteId::from_uuid(uuid(8)),
                text: note_text(),
                written_at: at("2024-03-05"),
            },
        ),
        (
            context("2024-03-05"),
            PatientEvent::NoteAmended {
                note_id: NoteId::from_uuid(uuid(8)),
                text: note_text(),
                amended_at: at("2024-03-05"),
            },
        ),
        (
            context("2024-03-05"),
            PatientEvent::NoteSigned {
                note_id: NoteId::from_uuid(uuid(8)),
                signer: chartlog_domain::UserId::from_uuid(uuid(9)),
                signed_at: at("2024-03-05"),
            },
        ),
        (
            context("2024-03-06"),
            PatientEvent::NoteAddendumAdded {
                note_id: NoteId::from_uuid(uuid(8)),
                text: note_text(),
                added_at: at("2024-03-06"),
            },
        ),
        (
            context("2024-03-07"),
            PatientEvent::DemographicsCorrected {
                correction: DemographicsCorrection {
                    name: Some(
                        PersonName::new(vec![], FamilyName::parse(&format!("{MARKER}ez")).unwrap())
                            .unwrap(),
                    ),
                    ..DemographicsCorrection::default()
                },
            },
        ),
    ]
}

fn tables(events: &[(EventContext, PatientEvent)]) -> DeidTables {
    DeidTables::from_events(events.iter().map(|(c, e)| (*c, e)), &keys())
}

#[test]
fn every_event_type_is_covered_by_the_fixture_or_tested_apart() {
    let mut seen: Vec<&str> = full_chart().iter().map(|(_, e)| e.event_type()).collect();
    // Tested in their own tests below.
    seen.extend([
        "consent_restriction_granted",
        "consent_restriction_revoked",
        "care_relationship_assigned",
        "care_relationship_ended",
        "legal_hold_placed",
        "legal_hold_released",
        "patient_erased",
    ]);
    for event_type in PatientEvent::EVENT_TYPES {
        assert!(
            seen.contains(&event_type),
            "{event_type} has no de-identification test"
        );
    }
}

#[test]
fn keeps_coded_data_years_and_values_and_drops_everything_identifying() {
    let tables = tables(&full_chart());
    let pseudonym = keys().patient(patient_id());

    let patient = &tables.patients[&pseudonym];
    assert_eq!(patient.birth_year, BirthYear::Year(1960));
    assert_eq!(patient.sex, Sex::Female);
    let geography = patient.geography.as_ref().unwrap();
    assert_eq!(geography.state, "NH");
    assert_eq!(geography.zip3.as_str(), "021");

    assert_eq!(tables.observations.len(), 3);
    let values: Vec<&DeidValue> = tables.observations.values().map(|row| &row.value).collect();
    assert!(values.iter().any(
        |v| matches!(v, DeidValue::Quantity(q) if q.value() == "72.50" && q.unit() == "1/min")
    ));
    assert!(values.iter().any(|v| matches!(v, DeidValue::Coded(c) if c.code() == "266919005" && c.system() == CodeSystem::SnomedCt)));
    assert!(values.iter().any(|v| matches!(v, DeidValue::TextRemoved)));
    assert!(
        tables
            .observations
            .values()
            .all(|row| row.year == 2024 && row.pseudonym == pseudonym)
    );

    let condition = tables.conditions.values().next().unwrap();
    assert_eq!(
        (condition.code.system(), condition.code.code()),
        (CodeSystem::Icd10Cm, "E11.9")
    );
    assert_eq!(
        (condition.onset_year, condition.resolved_year),
        (Some(2019), Some(2025))
    );

    assert_eq!(tables.allergies.len(), 1, "the refuted allergy is gone");
    let allergy = tables.allergies.values().next().unwrap();
    assert_eq!(allergy.substance.code(), "7980");
    assert_eq!(allergy.criticality, AllergyCriticality::High);
    assert_eq!(allergy.reaction, Some(AllergyReaction::Hives));

    let order = tables.medication_orders.values().next().unwrap();
    assert_eq!((order.medication.code(), order.year), ("860975", 2024));
    assert_eq!((order.dose.value(), order.dose.unit()), ("500", "mg"));
    assert_eq!(order.discontinued_year, Some(2026));
}

#[test]
fn no_output_contains_a_marker_a_raw_id_or_a_full_date() {
    let events = full_chart();
    let tables = tables(&events);
    let mut outputs = format!("{tables:?}");
    for format in [ExportFormat::Ndjson, ExportFormat::Csv] {
        outputs.push_str(&export_all(&tables, format, 2026));
    }
    assert!(!outputs.contains(MARKER), "a marker value leaked");
    for raw in ["02139", "1960-07-04", "2024-03-02", "123-45-6789", "555"] {
        assert!(!outputs.contains(raw), "{raw} leaked");
    }
    for n in 1..=9u128 {
        let raw_id = Uuid::from_u128(n).to_string();
        assert!(!outputs.contains(&raw_id), "record id {n} leaked");
    }
    assert!(
        !outputs.contains(&patient_id().to_string()),
        "the patient id leaked"
    );
    assert!(!outputs.contains(&hex::encode(patient_id().as_uuid().as_bytes())));
}

fn export_all(tables: &DeidTables, format: ExportFormat, release_year: i32) -> String {
    fn write<R: DeidRecord>(
        rows: impl Iterator<Item = R>,
        format: ExportFormat,
        year: i32,
    ) -> String {
        let mut writer = DeidExportWriter::new(Vec::new(), format, R::TABLE, year).unwrap();
        for row in rows {
            writer.write(&row).unwrap();
        }
        String::from_utf8(writer.finish().unwrap()).unwrap()
    }
    [
        write(tables.patients.values().cloned(), format, release_year),
        write(tables.observations.values().cloned(), format, release_year),
        write(tables.conditions.values().cloned(), format, release_year),
        write(
            tables.medication_orders.values().cloned(),
            format,
            release_year,
        ),
        write(tables.allergies.values().cloned(), format, release_year),
    ]
    .concat()
}

#[test]
fn pseudonyms_are_keyed_stable_and_distinct_per_kind() {
    let a = keys().patient(patient_id());
    assert_eq!(a, keys().patient(patient_id()), "stable across rebuilds");
    assert_eq!(a.as_str().len(), Pseudonym::LENGTH);
    assert_eq!(Pseudonym::parse(a.as_str()), Some(a.clone()));
    let other_key = Pseudonymizer::new(MacKey::from_bytes(&[43; MAC_KEY_BYTES]));
    assert_ne!(a, other_key.patient(patient_id()), "depends on the secret");
    assert_ne!(
        a,
        keys().patient(PatientId::from_uuid(Uuid::from_u128(0x1235)))
    );
    let id = Uuid::from_u128(0x1234);
    assert_ne!(
        a.as_str(),
        keys().record(RecordKind::Observation, id).as_str()
    );
    assert_ne!(
        keys().record(RecordKind::Observation, id),
        keys().record(RecordKind::Condition, id)
    );
    assert_eq!(format!("{:?}", keys()), "Pseudonymizer(<secret>)");
    assert_eq!(Pseudonym::parse("ABC"), None);
}

#[test]
fn ninety_or_older_at_registration_has_no_birth_year() {
    let tables = tables(&[(context("2024-06-01"), registered("1934-01-01", "02139"))]);
    let patient = tables.patients.values().next().unwrap();
    assert_eq!(patient.birth_year, BirthYear::NinetyOrOver);
    assert_eq!(patient.birth_year.to_string(), "90+");
    let json = export_all(&tables, ExportFormat::Ndjson, 2024);
    assert!(
        json.contains("\"birth_year\":null") && json.contains("\"aged_90_or_over\":true"),
        "{json}"
    );
    assert!(!json.contains("1934"));
}

#[test]
fn eighty_nine_keeps_the_birth_year_and_the_year_of_the_90th_birthday_does_not() {
    let at_89 = tables(&[(context("2024-06-01"), registered("1935-01-01", "02139"))]);
    assert_eq!(
        at_89.patients.values().next().unwrap().birth_year,
        BirthYear::Year(1935)
    );
    // Aged 89 on the event's date, but the years read 90: grouped, conservatively.
    let birthday_later = tables(&[(context("2025-06-01"), registered("1935-12-31", "02139"))]);
    assert_eq!(
        birthday_later.patients.values().next().unwrap().birth_year,
        BirthYear::NinetyOrOver
    );
}

#[test]
fn a_later_event_groups_a_patient_who_turned_ninety() {
    let events = [
        (context("2020-01-01"), registered("1935-05-05", "02139")),
        (
            context("2026-01-01"),
            PatientEvent::CareRelationshipAssigned {
                clinician: chartlog_domain::UserId::from_uuid(Uuid::from_u128(9)),
            },
        ),
    ];
    assert_eq!(
        tables(&events[..1])
            .patients
            .values()
            .next()
            .unwrap()
            .birth_year,
        BirthYear::Year(1935)
    );
    assert_eq!(
        tables(&events).patients.values().next().unwrap().birth_year,
        BirthYear::NinetyOrOver
    );
}

#[test]
fn the_export_groups_patients_who_turned_ninety_since_their_last_event() {
    let tables = tables(&[(context("2020-01-01"), registered("1935-05-05", "02139"))]);
    let in_2020 = export_all(&tables, ExportFormat::Csv, 2020);
    let in_2030 = export_all(&tables, ExportFormat::Csv, 2030);
    assert!(in_2020.contains(",1935,false,"), "{in_2020}");
    assert!(
        !in_2030.contains("1935") && in_2030.contains(",,true,"),
        "{in_2030}"
    );
}

#[test]
fn restricted_zip_areas_become_000_and_the_state_stays() {
    let tables = tables(&[(context("2024-01-01"), registered("1980-01-01", "03601"))]);
    let geography = tables
        .patients
        .values()
        .next()
        .unwrap()
        .geography
        .clone()
        .unwrap();
    assert_eq!(geography.zip3.as_str(), "000");
    assert_eq!(geography.state, "NH");
}

#[test]
fn corrections_touch_only_what_they_change_and_never_read_identifiers() {
    let mut events = vec![(context("2024-01-01"), registered("1980-01-01", "02139"))];
    events.push((
        context("2024-02-01"),
        PatientEvent::DemographicsCorrected {
            correction: DemographicsCorrection {
                birth_date: Some(BirthDate::parse("1981-02-02").unwrap()),
                address: Some(Some(address("90210"))),
                mrn: Some(Mrn::parse(&format!("{MARKER}-8")).unwrap()),
                ..DemographicsCorrection::default()
            },
        },
    ));
    let row = tables(&events).patients.values().next().unwrap().clone();
    assert_eq!(row.birth_year, BirthYear::Year(1981));
    assert_eq!(row.geography.as_ref().unwrap().zip3.as_str(), "902");
    assert_eq!(row.sex, Sex::Female);
    events.push((
        context("2024-03-01"),
        PatientEvent::DemographicsCorrected {
            correction: DemographicsCorrection {
                address: Some(None),
                sex: Some(Sex::Male),
                ..DemographicsCorrection::default()
            },
        },
    ));
    let row = tables(&events).patients.values().next().unwrap().clone();
    assert_eq!((row.geography, row.sex), (None, Sex::Male));
}

#[test]
fn access_control_events_add_no_rows() {
    let base = vec![(context("2024-01-01"), registered("1980-01-01", "02139"))];
    let mut events = base.clone();
    let restriction = chartlog_domain::ConsentRestrictionId::from_uuid(Uuid::from_u128(77));
    let clinician = chartlog_domain::UserId::from_uuid(Uuid::from_u128(78));
    let hold_id = chartlog_domain::LegalHoldId::from_uuid(Uuid::from_u128(79));
    events.extend([
        (
            context("2024-01-02"),
            PatientEvent::ConsentRestrictionGranted {
                restriction_id: restriction,
                kind: chartlog_domain::patient::ConsentRestrictionKind::BlockUser(clinician),
            },
        ),
        (
            context("2024-01-03"),
            PatientEvent::ConsentRestrictionRevoked {
                restriction_id: restriction,
            },
        ),
        (
            context("2024-01-04"),
            PatientEvent::CareRelationshipAssigned { clinician },
        ),
        (
            context("2024-01-05"),
            PatientEvent::CareRelationshipEnded { clinician },
        ),
        (
            context("2024-01-06"),
            PatientEvent::LegalHoldPlaced {
                hold_id,
                reason: chartlog_domain::patient::LegalHoldReason::Litigation,
                placed_at: at("2024-01-06"),
            },
        ),
        (
            context("2024-01-07"),
            PatientEvent::LegalHoldReleased {
                hold_id,
                released_at: at("2024-01-07"),
            },
        ),
    ]);
    assert_eq!(tables(&events), tables(&base));
}

#[test]
fn erasure_drops_every_row_of_the_patient_and_only_theirs() {
    let mut events = full_chart();
    let other = PatientId::from_uuid(Uuid::from_u128(0x9999));
    let other_context = EventContext {
        patient_id: other,
        recorded_at: at("2024-01-01"),
    };
    events.push((
        other_context,
        PatientEvent::PatientRegistered {
            patient_id: other,
            demographics: demographics("1970-01-01", "02139"),
        },
    ));
    events.push((
        other_context,
        PatientEvent::ObservationRecorded {
            observation_id: ObservationId::from_uuid(Uuid::from_u128(100)),
            code: code(CodeSystem::Loinc, "8867-4"),
            value: ObservationValue::Quantity(quantity("60", "/min")),
            effective_at: at("2024-01-01"),
        },
    ));
    events.push((
        context("2026-03-01"),
        PatientEvent::PatientErased {
            reason: ErasureReason::PatientRequest,
            erased_at: at("2026-03-01"),
        },
    ));
    let tables = tables(&events);
    let survivor = keys().patient(other);
    assert_eq!(tables.patients.keys().collect::<Vec<_>>(), vec![&survivor]);
    assert_eq!(tables.observations.len(), 1);
    assert!(tables.conditions.is_empty() && tables.allergies.is_empty());
    assert!(tables.medication_orders.is_empty());
}

#[test]
fn the_transformation_is_deterministic() {
    assert_eq!(tables(&full_chart()), tables(&full_chart()));
}

#[test]
fn unit_annotations_are_removed_without_changing_the_unit() {
    let strip = |unit: &str| {
        DeidQuantity::from_quantity(&quantity("1", unit))
            .unit()
            .to_owned()
    };
    assert_eq!(strip("mg"), "mg");
    assert_eq!(strip("mg{total}"), "mg");
    assert_eq!(strip("{beats}/min"), "1/min");
    assert_eq!(strip("10*3/{cells}"), "10*3/1");
    assert_eq!(strip("{Qzmarker}"), "1");
    assert_eq!(strip("mm[Hg]"), "mm[Hg]");
}

#[test]
fn a_unit_that_is_not_ucum_is_withheld() {
    for text in [
        "123-45-6789",
        "jdoe@x.org",
        "555-867-5309",
        "[MRN_A12345]",
        "=HYPERLINK(1)",
        "smith{note}",
    ] {
        let unit = DeidQuantity::from_quantity(&quantity("1", text))
            .unit()
            .to_owned();
        assert_eq!(unit, crate::deid::safe_harbor::UNIT_WITHHELD, "{text}");
    }
}

#[test]
fn a_text_cell_a_spreadsheet_would_run_is_defused() {
    for formula in ["=1+1", "+1", "-1+1", "@SUM(1)", "\t=1", "\r=1"] {
        let mut line = String::new();
        csv_text_field(&mut line, formula);
        let cell = line.strip_prefix('"').unwrap_or(&line);
        assert!(cell.starts_with('\''), "{formula}: {line}");
    }
    let mut line = String::new();
    csv_text_field(&mut line, "mg");
    assert_eq!(line, "mg");
}

#[test]
fn csv_quotes_what_needs_quoting_and_writers_refuse_other_tables() {
    let tables = tables(&full_chart());
    let csv = export_all(&tables, ExportFormat::Csv, 2026);
    assert!(csv.starts_with("pseudonym,birth_year,aged_90_or_over,sex,state,zip3\r\n"));
    let mut writer =
        DeidExportWriter::new(Vec::new(), ExportFormat::Csv, DeidTable::Patients, 2026).unwrap();
    let observation = tables.observations.values().next().unwrap();
    assert!(writer.write(observation).is_err());
    assert_eq!(writer.rows_written(), 0);
    for table in DeidTable::ALL {
        assert!(!table.columns().is_empty());
    }
}
