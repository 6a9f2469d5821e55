//! Identifiers. None of them is PHI: they are random UUIDs minted by chartlog, never derived
//! from a name, an MRN or any other identifier of the patient.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// Wraps an id minted elsewhere (the domain has no clock and no randomness).
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// Parses the hyphenated UUID form.
            pub fn parse(raw: &str) -> Result<Self, IdError> {
                Uuid::parse_str(raw).map(Self).map_err(|_| IdError { kind: $prefix })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
                crate::openapi::uuid(concat!("A ", $prefix, "."))
            }
        }
        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }
    };
}

uuid_id!(
    /// A patient: the owner of one event stream and of one data key.
    PatientId,
    "patient id"
);
uuid_id!(
    /// A person or service account that acts on chartlog.
    UserId,
    "user id"
);
uuid_id!(
    /// An event's identity and idempotency key. Minted as UUID v7 so ids sort by creation time.
    EventId,
    "event id"
);
uuid_id!(
    /// A clinical observation (vital sign, lab result).
    ObservationId,
    "observation id"
);
uuid_id!(
    /// A condition on the problem list.
    ConditionId,
    "condition id"
);
uuid_id!(
    /// An allergy or intolerance.
    AllergyId,
    "allergy id"
);
uuid_id!(
    /// A medication order (prescription).
    MedicationOrderId,
    "medication order id"
);
uuid_id!(
    /// A clinical note.
    NoteId,
    "note id"
);
uuid_id!(
    /// A consent restriction a patient placed on their record.
    ConsentRestrictionId,
    "consent restriction id"
);
uuid_id!(
    /// A legal hold on a record: while one is in force, the record cannot be erased.
    LegalHoldId,
    "legal hold id"
);

/// A string that is not a valid id of the named kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid {kind}: expected a hyphenated UUID")]
pub struct IdError {
    kind: &'static str,
}
