//! Properties of the patient aggregate over generated command sequences:
//! (a) replaying the accepted events gives the live state, and every event survives the codec;
//! (b) `decide` never panics, whatever the state, the command and `now`.

use chartlog_domain::patient::{
    AllergyCriticality, AllergyReaction, ConsentRestrictionKind, Demographics,
    DemographicsCorrection, DiscontinuationReason, DosingFrequency, ErasureReason, MedicationRoute,
    ObservationValue,
};
use chartlog_domain::phi::{
    AddressLine, BirthDate, City, ContactPoint, EmailAddress, FamilyName, FreeText, GivenName,
    IdentifierSystem, IdentifierValue, Mrn, NoteText, PatientIdentifier, PersonName, PhoneNumber,
    PostalAddress, PostalCode, Sex, Ssn, UsState,
};
use chartlog_domain::{
    AllergyId, Code, CodeSystem, ConditionId, ConsentRestrictionId, Decimal, MedicationOrderId,
    NoteId, ObservationId, Patient, PatientCommand, PatientEvent, PatientId, Quantity, Role,
    Timestamp, Unit, UserId, decide, decode, encode, evolve,
};
use proptest::prelude::*;
use proptest::strategy::{BoxedStrategy, Union};
use uuid::Uuid;

/// 2024-01-01T00:00:00Z.
const BASE_MICROS: i64 = 1_704_067_200_000_000;
const DAY_MICROS: i64 = 86_400_000_000;
/// Small, so generated commands collide on ids and exercise the duplicate and unknown rules.
const IDS: u128 = 4;
const COMMANDS_PER_CASE_MAX: usize = 40;
/// Weight of each other command against 1 for `ErasePatient`.
const ERASURE_WEIGHT_OTHERS: u32 = 20;

fn near_times() -> BoxedStrategy<Timestamp> {
    (BASE_MICROS - 2 * DAY_MICROS..=BASE_MICROS + 12 * DAY_MICROS)
        .prop_map(|micros| Timestamp::from_unix_micros(micros).expect("within bounds"))
        .boxed()
}

fn any_times() -> BoxedStrategy<Timestamp> {
    prop_oneof![
        Just(Timestamp::MIN_UNIX_MICROS),
        Just(Timestamp::MAX_UNIX_MICROS),
        Timestamp::MIN_UNIX_MICROS..=Timestamp::MAX_UNIX_MICROS,
    ]
    .prop_map(|micros| Timestamp::from_unix_micros(micros).expect("within bounds"))
    .boxed()
}

fn id() -> impl Strategy<Value = Uuid> {
    (0..IDS).prop_map(Uuid::from_u128)
}

fn code() -> impl Strategy<Value = Code> {
    prop::sample::select(vec![
        (CodeSystem::Loinc, "8310-5"),
        (CodeSystem::Loinc, "2345-7"),
        (CodeSystem::Icd10Cm, "E11.9"),
        (CodeSystem::Icd10Cm, "I10"),
        (CodeSystem::SnomedCt, "38341003"),
        (CodeSystem::SnomedCt, "260385009"),
        (CodeSystem::RxNorm, "197361"),
        (CodeSystem::RxNorm, "7980"),
    ])
    .prop_flat_map(|(system, code)| {
        prop::option::of(prop::sample::select(vec!["Display", "Other display"])).prop_map(
            move |display| Code::parse(system, code, display).expect("fixture code is valid"),
        )
    })
}

/// Mostly codes of `system`, sometimes any code, so both the accepted path and the
/// code-system rule get exercised.
fn code_mostly(system: CodeSystem) -> impl Strategy<Value = Code> {
    prop_oneof![
        3 => code().prop_filter("in the system", move |code| code.system() == system),
        1 => code(),
    ]
}

fn quantity() -> impl Strategy<Value = Quantity> {
    (
        prop::sample::select(vec![
            "0",
            "0.00",
            "-1",
            "98.6",
            "2.50",
            "1000",
            "0.000000001",
        ]),
        prop::sample::select(vec!["mg", "[degF]", "mm[Hg]", "10*3/uL"]),
    )
        .prop_map(|(value, unit)| Quantity {
            value: Decimal::parse(value).expect("fixture decimal"),
            unit: Unit::parse(unit).expect("fixture unit"),
        })
}

fn note_text() -> impl Strategy<Value = NoteText> {
    prop::sample::select(vec!["draft", "final", "addendum\nwith two lines"])
        .prop_map(|text| NoteText::parse(text).expect("fixture note"))
}

fn name() -> impl Strategy<Value = PersonName> {
    (
        prop::collection::vec(prop::sample::select(vec!["Ada", "Grace", "Mary"]), 0..3),
        prop::sample::select(vec!["Lovelace", "Hopper"]),
    )
        .prop_map(|(given, family)| {
            let given = given
                .into_iter()
                .map(|g| GivenName::parse(g).expect("fixture name"))
                .collect();
            PersonName::new(given, FamilyName::parse(family).expect("fixture name"))
                .expect("within limits")
        })
}

fn birth_date() -> impl Strategy<Value = BirthDate> {
    // 2030 lies in the future of `near_times`.
    prop::sample::select(vec![
        "1815-12-10",
        "1950-03-01",
        "1985-12-10",
        "2001-06-30",
        "2024-01-05",
        "2030-01-01",
    ])
    .prop_map(|date| BirthDate::parse(date).expect("fixture date"))
}

fn sex() -> impl Strategy<Value = Sex> {
    prop::sample::select(vec![Sex::Female, Sex::Male, Sex::Other, Sex::Unknown])
}

fn address() -> impl Strategy<Value = PostalAddress> {
    prop::sample::select(vec!["02139", "10001-1234"]).prop_map(|zip| {
        PostalAddress::new(
            vec![AddressLine::parse("1 Main Street").expect("fixture line")],
            City::parse("Springfield").expect("fixture city"),
            UsState::parse("MA").expect("fixture state"),
            PostalCode::parse(zip).expect("fixture zip"),
        )
        .expect("fixture address")
    })
}

fn contacts() -> impl Strategy<Value = Vec<ContactPoint>> {
    // Up to 9, one beyond CONTACT_POINTS_MAX.
    prop::collection::vec(
        prop_oneof![
            Just(ContactPoint::Phone(
                PhoneNumber::parse("617-555-0100").expect("fixture")
            )),
            Just(ContactPoint::Email(
                EmailAddress::parse("a@example.org").expect("fixture")
            )),
        ],
        0..=9,
    )
}

fn mrn() -> impl Strategy<Value = Mrn> {
    prop::sample::select(vec!["MRN-1", "MRN-2"]).prop_map(|mrn| Mrn::parse(mrn).expect("fixture"))
}

fn ssn() -> impl Strategy<Value = Ssn> {
    prop::sample::select(vec!["123-45-6789", "234-56-7890"])
        .prop_map(|ssn| Ssn::parse(ssn).expect("fixture"))
}

fn identifiers() -> impl Strategy<Value = Vec<PatientIdentifier>> {
    prop::collection::vec(
        Just(PatientIdentifier {
            system: IdentifierSystem::HealthPlanMemberNumber,
            value: IdentifierValue::parse("HP 123/45").expect("fixture"),
        }),
        0..3,
    )
}

fn demographics() -> impl Strategy<Value = Demographics> {
    (
        name(),
        birth_date(),
        sex(),
        prop::option::of(address()),
        contacts(),
        mrn(),
        prop::option::of(ssn()),
        identifiers(),
    )
        .prop_map(
            |(name, birth_date, sex, address, contacts, mrn, ssn, identifiers)| Demographics {
                name,
                birth_date,
                sex,
                address,
                contacts,
                mrn,
                ssn,
                identifiers,
            },
        )
}

fn correction() -> impl Strategy<Value = DemographicsCorrection> {
    (
        prop::option::of(name()),
        prop::option::of(birth_date()),
        prop::option::of(sex()),
        prop::option::of(prop::option::of(address())),
        prop::option::of(contacts()),
        prop::option::of(mrn()),
        prop::option::of(prop::option::of(ssn())),
        prop::option::of(identifiers()),
    )
        .prop_map(
            |(name, birth_date, sex, address, contacts, mrn, ssn, identifiers)| {
                DemographicsCorrection {
                    name,
                    birth_date,
                    sex,
                    address,
                    contacts,
                    mrn,
                    ssn,
                    identifiers,
                }
            },
        )
}

fn register() -> BoxedStrategy<PatientCommand> {
    (id(), demographics())
        .prop_map(|(id, demographics)| PatientCommand::RegisterPatient {
            patient_id: PatientId::from_uuid(id),
            demographics,
        })
        .boxed()
}

fn observation_value() -> impl Strategy<Value = ObservationValue> {
    prop_oneof![
        quantity().prop_map(ObservationValue::Quantity),
        code().prop_map(ObservationValue::Coded),
        Just(ObservationValue::Text(
            FreeText::parse("normal").expect("fixture")
        )),
    ]
}

fn command(times: BoxedStrategy<Timestamp>) -> BoxedStrategy<PatientCommand> {
    let user = || id().prop_map(UserId::from_uuid);
    let arms: Vec<BoxedStrategy<PatientCommand>> = vec![
        register(),
        correction()
            .prop_map(|correction| PatientCommand::CorrectDemographics { correction })
            .boxed(),
        (
            id(),
            code_mostly(CodeSystem::Loinc),
            observation_value(),
            times.clone(),
        )
            .prop_map(
                |(id, code, value, effective_at)| PatientCommand::RecordObservation {
                    observation_id: ObservationId::from_uuid(id),
                    code,
                    value,
                    effective_at,
                },
            )
            .boxed(),
        (
            id(),
            code_mostly(CodeSystem::Icd10Cm),
            prop::option::of(times.clone()),
        )
            .prop_map(|(id, code, onset_at)| PatientCommand::RecordCondition {
                condition_id: ConditionId::from_uuid(id),
                code,
                onset_at,
            })
            .boxed(),
        (id(), times)
            .prop_map(|(id, resolved_at)| PatientCommand::ResolveCondition {
                condition_id: ConditionId::from_uuid(id),
                resolved_at,
            })
            .boxed(),
        (
            id(),
            code_mostly(CodeSystem::RxNorm),
            prop::sample::select(vec![
                AllergyCriticality::Low,
                AllergyCriticality::High,
                AllergyCriticality::UnableToAssess,
            ]),
            prop::option::of(Just(AllergyReaction::Rash)),
        )
            .prop_map(
                |(id, substance, criticality, reaction)| PatientCommand::RecordAllergy {
                    allergy_id: AllergyId::from_uuid(id),
                    substance,
                    criticality,
                    reaction,
                },
            )
            .boxed(),
        id().prop_map(|id| PatientCommand::RefuteAllergy {
            allergy_id: AllergyId::from_uuid(id),
        })
        .boxed(),
        (id(), code_mostly(CodeSystem::RxNorm), quantity())
            .prop_map(
                |(id, medication, dose)| PatientCommand::PrescribeMedication {
                    medication_order_id: MedicationOrderId::from_uuid(id),
                    medication,
                    dose,
                    route: MedicationRoute::Oral,
                    frequency: DosingFrequency::AsNeeded,
                },
            )
            .boxed(),
        id().prop_map(|id| PatientCommand::DiscontinueMedication {
            medication_order_id: MedicationOrderId::from_uuid(id),
            reason: DiscontinuationReason::Ineffective,
        })
        .boxed(),
        (id(), note_text())
            .prop_map(|(id, text)| PatientCommand::WriteNote {
                note_id: NoteId::from_uuid(id),
                text,
            })
            .boxed(),
        (id(), note_text())
            .prop_map(|(id, text)| PatientCommand::AmendNote {
                note_id: NoteId::from_uuid(id),
                text,
            })
            .boxed(),
        (id(), user())
            .prop_map(|(id, signer)| PatientCommand::SignNote {
                note_id: NoteId::from_uuid(id),
                signer,
            })
            .boxed(),
        (id(), note_text())
            .prop_map(|(id, text)| PatientCommand::AddNoteAddendum {
                note_id: NoteId::from_uuid(id),
                text,
            })
            .boxed(),
        (id(), user(), any::<bool>())
            .prop_map(
                |(id, user, block)| PatientCommand::GrantConsentRestriction {
                    restriction_id: ConsentRestrictionId::from_uuid(id),
                    kind: if block {
                        ConsentRestrictionKind::BlockUser(user)
                    } else {
                        ConsentRestrictionKind::HideNotesFromRole(Role::Nurse)
                    },
                },
            )
            .boxed(),
        id().prop_map(|id| PatientCommand::RevokeConsentRestriction {
            restriction_id: ConsentRestrictionId::from_uuid(id),
        })
        .boxed(),
        user()
            .prop_map(|clinician| PatientCommand::AssignCareRelationship { clinician })
            .boxed(),
        user()
            .prop_map(|clinician| PatientCommand::EndCareRelationship { clinician })
            .boxed(),
    ];
    let erase = prop::sample::select(vec![
        ErasureReason::PatientRequest,
        ErasureReason::LegalOrder,
    ])
    .prop_map(|reason| PatientCommand::ErasePatient { reason })
    .boxed();
    // Erasure is rare, or most sequences would spend their length on a closed chart.
    let weighted = arms.into_iter().map(|arm| (ERASURE_WEIGHT_OTHERS, arm));
    Union::new_weighted(weighted.chain([(1, erase)]).collect()).boxed()
}

fn sequence(times: BoxedStrategy<Timestamp>) -> BoxedStrategy<Vec<(PatientCommand, Timestamp)>> {
    (
        prop::option::weighted(0.9, register()),
        prop::collection::vec(
            (command(times.clone()), times.clone()),
            0..COMMANDS_PER_CASE_MAX,
        ),
        times.clone(),
    )
        .prop_map(|(first, rest, registered_at)| {
            first
                .map(|command| (command, registered_at))
                .into_iter()
                .chain(rest)
                .collect()
        })
        .boxed()
}

/// Runs the commands against the live state; returns the state and the accepted events.
fn run(commands: Vec<(PatientCommand, Timestamp)>) -> (Patient, Vec<PatientEvent>) {
    let mut live = Patient::default();
    let mut accepted = Vec::new();
    for (command, now) in commands {
        let version_before = live.version();
        if let Ok(events) = decide(&live, command, now) {
            assert!(!events.is_empty(), "an accepted command yields events");
            for event in events {
                live = evolve(live, &event);
                accepted.push(event);
            }
        }
        assert!(live.version() >= version_before);
    }
    (live, accepted)
}

#[test]
fn generated_sequences_are_mostly_accepted_commands() {
    // Guards the generator: a property over sequences that decide rejects at the first
    // command would prove nothing.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = sequence(near_times());
    let (mut accepted_total, mut erased) = (0, 0);
    let cases = 200;
    for _ in 0..cases {
        let commands = strategy
            .new_tree(&mut runner)
            .expect("strategy generates")
            .current();
        let (live, accepted) = run(commands);
        accepted_total += accepted.len();
        erased += usize::from(live.is_erased());
    }
    assert!(
        accepted_total / cases >= 5,
        "{accepted_total} events accepted in {cases} cases"
    );
    assert!(
        erased > 0 && erased < cases / 2,
        "{erased} of {cases} erased"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn replay_gives_the_live_state_and_events_survive_the_codec(
        commands in sequence(near_times())
    ) {
        let (live, accepted) = run(commands);
        prop_assert_eq!(live.version(), accepted.len() as u64);

        let replayed = accepted.iter().fold(Patient::default(), evolve);
        prop_assert_eq!(&replayed, &live);

        for event in &accepted {
            let encoded = encode(event);
            let decoded = decode(encoded.event_type, encoded.schema_version, &encoded.payload);
            prop_assert_eq!(decoded.as_ref(), Ok(event));
        }

        let snapshot = serde_json::to_value(&live).expect("state serializes");
        let restored: Patient = serde_json::from_value(snapshot).expect("state deserializes");
        prop_assert_eq!(&restored, &live);
    }

    #[test]
    fn decide_never_panics(
        commands in sequence(any_times()),
        last in command(any_times()),
        now in any_times(),
    ) {
        let (live, _) = run(commands);
        let _ = decide(&live, last, now);
    }
}
