//! The access policy: one table of role × entity × action, and the attribute checks that
//! refine it (care relationship, the patient's own record, consent restrictions, break-glass).
//!
//! [`ROLE_GRANTS`] is the only place a role's rights are written. Routes name the
//! [`Permission`] they need (`routes::ROUTES`); the guard asks [`allows`]; README's role table
//! is this table (a test keeps them equal). Anything not granted here is denied.

use chartlog_domain::patient::{ConsentRestrictionKind, Patient};
use chartlog_domain::{Actor, PatientCommand, PatientId, Role, UserId};
use serde::Serialize;

/// What a route touches. Clinical entities are parts of one patient's chart; the others are
/// the system's own records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// Registration and demographics (name, birth date, address, identifiers).
    Demographics,
    Observation,
    Condition,
    Allergy,
    Medication,
    Note,
    /// The patient's consent restrictions.
    Consent,
    /// Which clinicians care for the patient.
    CareRelationship,
    /// The record history: who changed what, when.
    History,
    /// The patient's crypto-erasure.
    Erasure,
    /// Legal holds, which keep the record from being erased.
    LegalHold,
    /// The accounting of disclosures (HIPAA 45 CFR 164.528).
    Disclosures,
    /// The audit trail of every access.
    AuditTrail,
    /// Break-glass openings and their review queue.
    BreakGlassReview,
    /// De-identified (Safe Harbor) data for analysts.
    DeidentifiedData,
    /// User accounts.
    User,
}

impl Entity {
    pub const ALL: [Entity; 16] = [
        Entity::Demographics,
        Entity::Observation,
        Entity::Condition,
        Entity::Allergy,
        Entity::Medication,
        Entity::Note,
        Entity::Consent,
        Entity::CareRelationship,
        Entity::History,
        Entity::Erasure,
        Entity::LegalHold,
        Entity::Disclosures,
        Entity::AuditTrail,
        Entity::BreakGlassReview,
        Entity::DeidentifiedData,
        Entity::User,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Entity::Demographics => "demographics",
            Entity::Observation => "observation",
            Entity::Condition => "condition",
            Entity::Allergy => "allergy",
            Entity::Medication => "medication",
            Entity::Note => "note",
            Entity::Consent => "consent",
            Entity::CareRelationship => "care_relationship",
            Entity::History => "history",
            Entity::Erasure => "erasure",
            Entity::LegalHold => "legal_hold",
            Entity::Disclosures => "disclosures",
            Entity::AuditTrail => "audit_trail",
            Entity::BreakGlassReview => "break_glass_review",
            Entity::DeidentifiedData => "deidentified_data",
            Entity::User => "user",
        }
    }

    /// Entities that are part of one patient's chart: reaching them needs a relationship
    /// with that patient (care, self, or break-glass), not just the role.
    pub const fn is_patient_record(self) -> bool {
        matches!(
            self,
            Entity::Demographics
                | Entity::Observation
                | Entity::Condition
                | Entity::Allergy
                | Entity::Medication
                | Entity::Note
                | Entity::Consent
                | Entity::CareRelationship
                | Entity::History
                | Entity::Erasure
                | Entity::LegalHold
                | Entity::Disclosures
        )
    }
}

/// What is done to an entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Create,
    Read,
    Update,
}

impl Action {
    pub const ALL: [Action; 3] = [Action::Create, Action::Read, Action::Update];

    pub const fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Read => "read",
            Action::Update => "update",
        }
    }
}

/// A right: this action on this entity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Grant(pub Entity, pub Action);

const C: Action = Action::Create;
const R: Action = Action::Read;
const U: Action = Action::Update;

/// Every right of every role. One line per (role, entity); the actions are those listed.
///
/// Why each role has what it has:
/// - physicians create, read and update the whole clinical record, and manage the care team;
/// - nurses register patients, correct demographics, chart vitals, allergies and nursing
///   notes, and read the rest;
/// - radiologists and lab technicians record results (and radiologists their reports) and
///   read what they need to interpret them, never editing demographics;
/// - administrators manage accounts and the care team, place and release legal holds, and
///   erase on a documented request (never under a hold), and see no PHI;
/// - auditors read the audit trail, the disclosures and the break-glass queue, which they
///   close; they see no chart;
/// - analysts read de-identified data only;
/// - patients read their own record, its care team, its history and its accounting of
///   disclosures, and grant and revoke their own consent restrictions (HIPAA's right to
///   request restrictions, 45 CFR 164.522): the only thing a patient changes.
pub static ROLE_GRANTS: &[(Role, Entity, &[Action])] = &[
    (Role::Physician, Entity::Demographics, &[C, R, U]),
    (Role::Physician, Entity::Observation, &[C, R, U]),
    (Role::Physician, Entity::Condition, &[C, R, U]),
    (Role::Physician, Entity::Allergy, &[C, R, U]),
    (Role::Physician, Entity::Medication, &[C, R, U]),
    (Role::Physician, Entity::Note, &[C, R, U]),
    (Role::Physician, Entity::Consent, &[C, R, U]),
    (Role::Physician, Entity::CareRelationship, &[C, R, U]),
    (Role::Physician, Entity::History, &[R]),
    (Role::Nurse, Entity::Demographics, &[C, R, U]),
    (Role::Nurse, Entity::Observation, &[C, R]),
    (Role::Nurse, Entity::Condition, &[R]),
    (Role::Nurse, Entity::Allergy, &[C, R, U]),
    (Role::Nurse, Entity::Medication, &[R]),
    (Role::Nurse, Entity::Note, &[C, R, U]),
    (Role::Nurse, Entity::Consent, &[C, R, U]),
    (Role::Nurse, Entity::CareRelationship, &[R]),
    (Role::Nurse, Entity::History, &[R]),
    (Role::Radiologist, Entity::Demographics, &[R]),
    (Role::Radiologist, Entity::Observation, &[C, R]),
    (Role::Radiologist, Entity::Condition, &[R]),
    (Role::Radiologist, Entity::Allergy, &[R]),
    (Role::Radiologist, Entity::Medication, &[R]),
    (Role::Radiologist, Entity::Note, &[C, R, U]),
    (Role::LabTechnician, Entity::Demographics, &[R]),
    (Role::LabTechnician, Entity::Observation, &[C, R]),
    (Role::Administrator, Entity::User, &[C, R, U]),
    (Role::Administrator, Entity::CareRelationship, &[C, U]),
    (Role::Administrator, Entity::Erasure, &[C]),
    (Role::Administrator, Entity::LegalHold, &[C, U]),
    (Role::Auditor, Entity::AuditTrail, &[R]),
    (Role::Auditor, Entity::Disclosures, &[R]),
    (Role::Auditor, Entity::BreakGlassReview, &[R, U]),
    (Role::Analyst, Entity::DeidentifiedData, &[R]),
    (Role::Patient, Entity::Demographics, &[R]),
    (Role::Patient, Entity::Observation, &[R]),
    (Role::Patient, Entity::Condition, &[R]),
    (Role::Patient, Entity::Allergy, &[R]),
    (Role::Patient, Entity::Medication, &[R]),
    (Role::Patient, Entity::Note, &[R]),
    (Role::Patient, Entity::Consent, &[C, R, U]),
    (Role::Patient, Entity::CareRelationship, &[R]),
    (Role::Patient, Entity::History, &[R]),
    (Role::Patient, Entity::Disclosures, &[R]),
];

/// Whether `role` holds `grant`. `System` holds nothing over HTTP.
pub fn allows(role: Role, grant: Grant) -> bool {
    let Grant(entity, action) = grant;
    ROLE_GRANTS
        .iter()
        .any(|&(r, e, actions)| r == role && e == entity && actions.contains(&action))
}

/// Clinical roles: they reach a chart through a care relationship or break-glass.
pub const fn is_clinician(role: Role) -> bool {
    matches!(
        role,
        Role::Physician | Role::Nurse | Role::Radiologist | Role::LabTechnician
    )
}

/// Why a user with the right role still may not reach this patient's record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordDenial {
    /// A patient asking for someone else's record.
    NotOwnRecord,
    /// A clinician outside the care relationship, without break-glass.
    NoCareRelationship,
    /// The patient's consent blocks this user.
    BlockedByConsent,
    /// The role has no relationship-based path to a chart (e.g. an auditor reading a chart).
    NoPathToRecord,
}

/// How a user reaches a patient's record, when they do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordAccess {
    /// The patient's own record.
    OwnRecord,
    /// Through the care relationship.
    CareRelationship,
    /// Through an open break-glass grant: every audit row is marked.
    BreakGlass,
    /// A role whose grant on this entity is not relationship-based (administrators assigning
    /// care, auditors reading disclosures).
    RoleWide,
}

/// Who is asking, as far as the attribute checks need to know.
#[derive(Clone, Copy, Debug)]
pub struct Requester {
    pub user_id: UserId,
    pub role: Role,
    /// For a patient's account: the patient it belongs to.
    pub own_patient: Option<PatientId>,
    /// Whether the requester holds an open break-glass grant for this patient.
    pub break_glass_open: bool,
}

/// The attribute checks for a record of `patient` (whose decision state is `record`, when it
/// exists), after [`allows`] said yes to the role.
pub fn reach_record(
    requester: &Requester,
    patient: PatientId,
    record: Option<&Patient>,
    entity: Entity,
) -> Result<RecordAccess, RecordDenial> {
    match requester.role {
        Role::Patient => {
            if requester.own_patient == Some(patient) {
                Ok(RecordAccess::OwnRecord)
            } else {
                Err(RecordDenial::NotOwnRecord)
            }
        }
        role if is_clinician(role) => {
            let blocked = record.is_some_and(|record| blocks_user(record, requester.user_id));
            let in_care =
                record.is_some_and(|record| record.has_care_relationship(requester.user_id));
            // A consent block holds even inside the care relationship; only break-glass (an
            // emergency, reviewed afterwards) overrides it.
            if requester.break_glass_open {
                Ok(RecordAccess::BreakGlass)
            } else if blocked {
                Err(RecordDenial::BlockedByConsent)
            } else if in_care {
                Ok(RecordAccess::CareRelationship)
            } else {
                Err(RecordDenial::NoCareRelationship)
            }
        }
        Role::Administrator
            if matches!(
                entity,
                Entity::CareRelationship | Entity::Erasure | Entity::LegalHold
            ) =>
        {
            Ok(RecordAccess::RoleWide)
        }
        Role::Auditor if entity == Entity::Disclosures => Ok(RecordAccess::RoleWide),
        _ => Err(RecordDenial::NoPathToRecord),
    }
}

/// Whether the patient's consent blocks `user` from the record (outside break-glass).
pub fn blocks_user(record: &Patient, user: UserId) -> bool {
    record
        .active_consent_restrictions()
        .any(|kind| kind == ConsentRestrictionKind::BlockUser(user))
}

/// Whether the patient's consent hides notes from `role`.
pub fn notes_hidden_from(record: &Patient, role: Role) -> bool {
    record
        .active_consent_restrictions()
        .any(|kind| kind == ConsentRestrictionKind::HideNotesFromRole(role))
}

/// Why a command that changes who reaches the record (the care team, consent restrictions)
/// is refused to a caller the record's checks otherwise let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessChangeDenial {
    /// Break-glass opens the record for an emergency, reviewed afterwards; it must not be a
    /// way to stay in after the grant expires (assigning oneself to the care team) or to
    /// lift the patient's restrictions.
    UnderBreakGlass,
    /// A restriction aimed at the caller (a block on them, or notes hidden from their role)
    /// is the patient's decision about that caller: only the patient lifts it.
    RestrictionAimedAtCaller,
}

impl AccessChangeDenial {
    /// The refusal's message, fixed text.
    pub fn message(self) -> &'static str {
        match self {
            AccessChangeDenial::UnderBreakGlass => {
                "break-glass access does not extend to the care team or the patient's consent \
                 restrictions"
            }
            AccessChangeDenial::RestrictionAimedAtCaller => {
                "a consent restriction aimed at you or your role can be revoked only by the \
                 patient"
            }
        }
    }
}

/// The checks on commands that change who reaches the record, after [`reach_record`] let
/// `actor` in: `record` is the state the command will be decided on.
pub fn may_change_access(
    actor: &Actor,
    record: Option<&Patient>,
    command: &PatientCommand,
) -> Result<(), AccessChangeDenial> {
    let changes_access = matches!(
        command,
        PatientCommand::AssignCareRelationship { .. }
            | PatientCommand::EndCareRelationship { .. }
            | PatientCommand::GrantConsentRestriction { .. }
            | PatientCommand::RevokeConsentRestriction { .. }
    );
    if changes_access && actor.break_glass {
        return Err(AccessChangeDenial::UnderBreakGlass);
    }
    if let PatientCommand::RevokeConsentRestriction { restriction_id } = command
        && actor.role != Role::Patient
    {
        let aimed_at_caller = record
            .and_then(|record| record.consent_restrictions().get(restriction_id))
            .is_some_and(|restriction| match restriction.kind() {
                ConsentRestrictionKind::BlockUser(user) => user == actor.user_id,
                ConsentRestrictionKind::HideNotesFromRole(role) => role == actor.role,
            });
        if aimed_at_caller {
            return Err(AccessChangeDenial::RestrictionAimedAtCaller);
        }
    }
    Ok(())
}

/// The role table as Markdown, one row per role, one column per entity: what README shows.
pub fn role_table_markdown() -> String {
    let mut table = String::from("| role |");
    for entity in Entity::ALL {
        table.push_str(&format!(" {} |", entity.as_str()));
    }
    table.push_str("\n|---|");
    for _ in Entity::ALL {
        table.push_str("---|");
    }
    table.push('\n');
    for role in Role::ALL.into_iter().filter(|role| *role != Role::System) {
        table.push_str(&format!("| {} |", role.as_str()));
        for entity in Entity::ALL {
            let letters: String = Action::ALL
                .into_iter()
                .filter(|action| allows(role, Grant(entity, *action)))
                .map(|action| match action {
                    Action::Create => 'C',
                    Action::Read => 'R',
                    Action::Update => 'U',
                })
                .collect();
            table.push_str(&format!(
                " {} |",
                if letters.is_empty() { "" } else { &letters }
            ));
        }
        table.push('\n');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_and_entity_has_at_most_one_line() {
        for (index, (role, entity, actions)) in ROLE_GRANTS.iter().enumerate() {
            assert!(!actions.is_empty(), "{role:?} {entity:?} lists no action");
            let later = ROLE_GRANTS[index + 1..]
                .iter()
                .any(|(r, e, _)| r == role && e == entity);
            assert!(!later, "{role:?} {entity:?} appears twice");
        }
    }

    #[test]
    fn administrators_auditors_and_analysts_see_no_chart() {
        for role in [
            Role::Administrator,
            Role::Auditor,
            Role::Analyst,
            Role::System,
        ] {
            for entity in [
                Entity::Demographics,
                Entity::Observation,
                Entity::Condition,
                Entity::Allergy,
                Entity::Medication,
                Entity::Note,
                Entity::History,
            ] {
                assert!(
                    !allows(role, Grant(entity, Action::Read)),
                    "{role:?} reads {entity:?}"
                );
            }
        }
        assert!(allows(
            Role::Auditor,
            Grant(Entity::AuditTrail, Action::Read)
        ));
        assert!(!allows(
            Role::Physician,
            Grant(Entity::AuditTrail, Action::Read)
        ));
        assert!(allows(
            Role::Analyst,
            Grant(Entity::DeidentifiedData, Action::Read)
        ));
        assert!(!allows(
            Role::Physician,
            Grant(Entity::DeidentifiedData, Action::Read)
        ));
    }

    #[test]
    fn results_roles_never_edit_demographics_and_patients_change_only_their_consent() {
        for role in [Role::Radiologist, Role::LabTechnician] {
            assert!(allows(role, Grant(Entity::Observation, Action::Create)));
            assert!(!allows(role, Grant(Entity::Demographics, Action::Update)));
            assert!(!allows(role, Grant(Entity::Demographics, Action::Create)));
        }
        for (role, entity, actions) in ROLE_GRANTS {
            if *role == Role::Patient && *entity != Entity::Consent {
                assert_eq!(*actions, &[Action::Read][..], "patients change {entity:?}");
            }
        }
        assert!(allows(
            Role::Patient,
            Grant(Entity::Consent, Action::Create)
        ));
        assert!(allows(
            Role::Patient,
            Grant(Entity::Consent, Action::Update)
        ));
    }

    #[test]
    fn the_markdown_table_has_a_row_per_human_role() {
        let table = role_table_markdown();
        assert_eq!(table.lines().count(), 2 + Role::ALL.len() - 1);
        assert!(table.contains("| physician |"));
        assert!(!table.contains("| system |"));
    }

    fn requester(role: Role, break_glass_open: bool) -> Requester {
        Requester {
            user_id: UserId::from_uuid(uuid::Uuid::from_u128(10)),
            role,
            own_patient: None,
            break_glass_open,
        }
    }

    #[test]
    fn clinicians_need_a_care_relationship_or_break_glass() {
        let patient = PatientId::from_uuid(uuid::Uuid::from_u128(1));
        let nurse = requester(Role::Nurse, false);
        assert_eq!(
            reach_record(&nurse, patient, None, Entity::Observation),
            Err(RecordDenial::NoCareRelationship)
        );
        let nurse = requester(Role::Nurse, true);
        assert_eq!(
            reach_record(&nurse, patient, None, Entity::Observation),
            Ok(RecordAccess::BreakGlass)
        );
        let mut own = requester(Role::Patient, false);
        assert_eq!(
            reach_record(&own, patient, None, Entity::History),
            Err(RecordDenial::NotOwnRecord)
        );
        own.own_patient = Some(patient);
        assert_eq!(
            reach_record(&own, patient, None, Entity::History),
            Ok(RecordAccess::OwnRecord)
        );
        assert_eq!(
            reach_record(
                &requester(Role::Auditor, false),
                patient,
                None,
                Entity::Observation
            ),
            Err(RecordDenial::NoPathToRecord)
        );
    }

    /// A registered record with the given restrictions granted, folded through the domain.
    fn record_with(restrictions: &[(u128, ConsentRestrictionKind)]) -> Patient {
        use chartlog_domain::patient::{decide, evolve};
        use chartlog_domain::{ConsentRestrictionId, Timestamp, synthetic};
        let now = Timestamp::from_unix_micros(1_790_000_000_000_000).expect("a valid time");
        let mut commands = vec![synthetic::registration(7)];
        commands.extend(restrictions.iter().map(|&(id, kind)| {
            PatientCommand::GrantConsentRestriction {
                restriction_id: ConsentRestrictionId::from_uuid(uuid::Uuid::from_u128(id)),
                kind,
            }
        }));
        commands
            .into_iter()
            .fold(Patient::default(), |record, command| {
                decide(&record, command, now)
                    .expect("accepted")
                    .iter()
                    .fold(record, evolve)
            })
    }

    fn actor(role: Role, user: u128, break_glass: bool) -> Actor {
        Actor {
            user_id: UserId::from_uuid(uuid::Uuid::from_u128(user)),
            role,
            purpose_of_use: chartlog_domain::PurposeOfUse::Treatment,
            break_glass,
        }
    }

    fn revoke(id: u128) -> PatientCommand {
        PatientCommand::RevokeConsentRestriction {
            restriction_id: chartlog_domain::ConsentRestrictionId::from_uuid(
                uuid::Uuid::from_u128(id),
            ),
        }
    }

    #[test]
    fn only_the_patient_lifts_a_restriction_aimed_at_the_caller() {
        let blocked_physician = UserId::from_uuid(uuid::Uuid::from_u128(20));
        let record = record_with(&[
            (1, ConsentRestrictionKind::BlockUser(blocked_physician)),
            (2, ConsentRestrictionKind::HideNotesFromRole(Role::Nurse)),
        ]);
        let refused = Err(AccessChangeDenial::RestrictionAimedAtCaller);
        assert_eq!(
            may_change_access(
                &actor(Role::Physician, 20, false),
                Some(&record),
                &revoke(1)
            ),
            refused
        );
        assert_eq!(
            may_change_access(&actor(Role::Nurse, 30, false), Some(&record), &revoke(2)),
            refused
        );
        // Acting on the patient's request for someone else, or as the patient, is allowed.
        assert_eq!(
            may_change_access(
                &actor(Role::Physician, 21, false),
                Some(&record),
                &revoke(1)
            ),
            Ok(())
        );
        assert_eq!(
            may_change_access(
                &actor(Role::Physician, 20, false),
                Some(&record),
                &revoke(2)
            ),
            Ok(())
        );
        assert_eq!(
            may_change_access(&actor(Role::Patient, 20, false), Some(&record), &revoke(1)),
            Ok(())
        );
    }

    #[test]
    fn break_glass_changes_neither_the_care_team_nor_consent() {
        let record = record_with(&[]);
        let me = UserId::from_uuid(uuid::Uuid::from_u128(40));
        let emergency = actor(Role::Physician, 40, true);
        for command in [
            PatientCommand::AssignCareRelationship { clinician: me },
            PatientCommand::EndCareRelationship { clinician: me },
            PatientCommand::GrantConsentRestriction {
                restriction_id: chartlog_domain::ConsentRestrictionId::from_uuid(
                    uuid::Uuid::from_u128(3),
                ),
                kind: ConsentRestrictionKind::HideNotesFromRole(Role::Nurse),
            },
            revoke(3),
        ] {
            assert_eq!(
                may_change_access(&emergency, Some(&record), &command),
                Err(AccessChangeDenial::UnderBreakGlass)
            );
            assert_eq!(
                may_change_access(&actor(Role::Physician, 40, false), Some(&record), &command),
                Ok(())
            );
        }
        // Treatment under break-glass goes on.
        let treatment = chartlog_domain::synthetic::clinical_command(7, 1, record_time());
        assert_eq!(
            may_change_access(&emergency, Some(&record), &treatment),
            Ok(())
        );
    }

    fn record_time() -> chartlog_domain::Timestamp {
        chartlog_domain::Timestamp::from_unix_micros(1_790_000_000_000_000).expect("a valid time")
    }
}
