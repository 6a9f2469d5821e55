//! Who acts, in which role, and why: the clear part of every event's header.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::UserId;

/// The roles of the access policy. `System` is chartlog itself (projections, maintenance)
/// acting with no human behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(
        description = "A role of the access policy (see the role table). `system` is chartlog itself and is never given to an account."
    )
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Physician,
    Nurse,
    Radiologist,
    LabTechnician,
    Administrator,
    Auditor,
    Analyst,
    Patient,
    System,
}

impl Role {
    pub const ALL: [Role; 9] = [
        Role::Physician,
        Role::Nurse,
        Role::Radiologist,
        Role::LabTechnician,
        Role::Administrator,
        Role::Auditor,
        Role::Analyst,
        Role::Patient,
        Role::System,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Role::Physician => "physician",
            Role::Nurse => "nurse",
            Role::Radiologist => "radiologist",
            Role::LabTechnician => "lab_technician",
            Role::Administrator => "administrator",
            Role::Auditor => "auditor",
            Role::Analyst => "analyst",
            Role::Patient => "patient",
            Role::System => "system",
        }
    }
}

/// Why the actor touches the record (after HL7 v3 PurposeOfUse: TREAT, ETREAT, HPAYMT, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PurposeOfUse {
    Treatment,
    EmergencyTreatment,
    Payment,
    Operations,
    PatientRequest,
    Research,
    Oversight,
    SystemAdministration,
}

impl PurposeOfUse {
    pub const ALL: [PurposeOfUse; 8] = [
        PurposeOfUse::Treatment,
        PurposeOfUse::EmergencyTreatment,
        PurposeOfUse::Payment,
        PurposeOfUse::Operations,
        PurposeOfUse::PatientRequest,
        PurposeOfUse::Research,
        PurposeOfUse::Oversight,
        PurposeOfUse::SystemAdministration,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            PurposeOfUse::Treatment => "treatment",
            PurposeOfUse::EmergencyTreatment => "emergency_treatment",
            PurposeOfUse::Payment => "payment",
            PurposeOfUse::Operations => "operations",
            PurposeOfUse::PatientRequest => "patient_request",
            PurposeOfUse::Research => "research",
            PurposeOfUse::Oversight => "oversight",
            PurposeOfUse::SystemAdministration => "system_administration",
        }
    }
}

macro_rules! str_enum {
    ($ty:ident, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $ty {
            type Err = UnknownCode;
            fn from_str(raw: &str) -> Result<Self, Self::Err> {
                $ty::ALL
                    .into_iter()
                    .find(|candidate| candidate.as_str() == raw)
                    .ok_or(UnknownCode { what: $what })
            }
        }
    };
}

str_enum!(Role, "role");
str_enum!(PurposeOfUse, "purpose of use");

/// A code outside a closed list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what}")]
pub struct UnknownCode {
    what: &'static str,
}

/// The actor recorded in the clear header of every event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Actor {
    pub user_id: UserId,
    pub role: Role,
    pub purpose_of_use: PurposeOfUse,
    /// Set when access came through emergency (break-glass) access outside the care relationship.
    pub break_glass: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        for purpose in PurposeOfUse::ALL {
            assert_eq!(purpose.as_str().parse::<PurposeOfUse>(), Ok(purpose));
        }
        assert!("surgeon".parse::<Role>().is_err());
    }
}
