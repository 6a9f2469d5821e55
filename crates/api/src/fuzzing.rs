//! Entry points for the fuzz targets in `fuzz/`: the decoding a command endpoint does, without
//! HTTP, a session or a database. Not part of the API; kept public only so `fuzz/` links it.

use chartlog_access::{Session, SessionStage, Username};
use chartlog_domain::patient::Demographics;
use chartlog_domain::{
    Patient, PatientCommand, PatientEvent, PatientId, Rejection, Role, Timestamp, UserId, decide,
};

use crate::ApiError;
use crate::handlers::commands::{self as c, CommandBody};
use crate::handlers::parse_body;

/// The command names [`decide_body`] takes: the last path segment of each command route, and
/// `register-patient` for `POST /patients`.
pub const COMMANDS: [&str; 20] = [
    "register-patient",
    "correct-demographics",
    "record-observation",
    "record-condition",
    "resolve-condition",
    "record-allergy",
    "refute-allergy",
    "prescribe-medication",
    "discontinue-medication",
    "write-note",
    "amend-note",
    "sign-note",
    "add-note-addendum",
    "grant-consent-restriction",
    "revoke-consent-restriction",
    "assign-care-relationship",
    "end-care-relationship",
    "place-legal-hold",
    "release-legal-hold",
    "erase",
];

/// Why a body produced no events.
#[derive(Debug)]
pub enum Refusal {
    /// `command` is not in [`COMMANDS`].
    UnknownCommand,
    /// The body does not parse: the 400 the endpoint answers.
    Body(ApiError),
    /// The domain refused the command: the 409/422 the endpoint answers.
    Rejected(Rejection),
}

/// Parses `body` as the endpoint named `command` does, turns it into the domain command as the
/// handler does (a note is signed by `signer`), and decides it on `patient` at `now`. A
/// registration is decided on an empty state, as the register endpoint does for a new id.
pub fn decide_body(
    command: &str,
    body: &[u8],
    patient: &Patient,
    signer: UserId,
    now: Timestamp,
) -> Result<Vec<PatientEvent>, Refusal> {
    if command == "register-patient" {
        let demographics: Demographics = parse_body(body).map_err(Refusal::Body)?;
        let patient_id = patient
            .patient_id()
            .unwrap_or_else(|| PatientId::from_uuid(uuid::Uuid::nil()));
        let registration = PatientCommand::RegisterPatient {
            patient_id,
            demographics,
        };
        return decide(&Patient::default(), registration, now).map_err(Refusal::Rejected);
    }
    let domain_command = match command {
        "correct-demographics" => into_command::<c::CorrectDemographics>(body, signer, now),
        "record-observation" => into_command::<c::RecordObservation>(body, signer, now),
        "record-condition" => into_command::<c::RecordCondition>(body, signer, now),
        "resolve-condition" => into_command::<c::ResolveCondition>(body, signer, now),
        "record-allergy" => into_command::<c::RecordAllergy>(body, signer, now),
        "refute-allergy" => into_command::<c::RefuteAllergy>(body, signer, now),
        "prescribe-medication" => into_command::<c::PrescribeMedication>(body, signer, now),
        "discontinue-medication" => into_command::<c::DiscontinueMedication>(body, signer, now),
        "write-note" => into_command::<c::WriteNote>(body, signer, now),
        "amend-note" => into_command::<c::AmendNote>(body, signer, now),
        "sign-note" => into_command::<c::SignNote>(body, signer, now),
        "add-note-addendum" => into_command::<c::AddNoteAddendum>(body, signer, now),
        "grant-consent-restriction" => {
            into_command::<c::GrantConsentRestriction>(body, signer, now)
        }
        "revoke-consent-restriction" => {
            into_command::<c::RevokeConsentRestriction>(body, signer, now)
        }
        "assign-care-relationship" => into_command::<c::AssignCareRelationship>(body, signer, now),
        "end-care-relationship" => into_command::<c::EndCareRelationship>(body, signer, now),
        "place-legal-hold" => into_command::<c::PlaceLegalHold>(body, signer, now),
        "release-legal-hold" => into_command::<c::ReleaseLegalHold>(body, signer, now),
        "erase" => into_command::<c::ErasePatient>(body, signer, now),
        _ => return Err(Refusal::UnknownCommand),
    }?;
    decide(patient, domain_command, now).map_err(Refusal::Rejected)
}

fn into_command<B: CommandBody>(
    body: &[u8],
    signer: UserId,
    now: Timestamp,
) -> Result<PatientCommand, Refusal> {
    let parsed: B = parse_body(body).map_err(Refusal::Body)?;
    let session = Session {
        session_id: uuid::Uuid::nil(),
        user_id: signer,
        username: Username::parse("fuzzer").map_err(|_| Refusal::UnknownCommand)?,
        role: Role::Physician,
        patient_id: None,
        stage: SessionStage::Full,
        created_at: now,
        expires_at: now,
    };
    let caller = crate::guard::Caller::without_request(session);
    Ok(parsed.into_command(&caller).0)
}
