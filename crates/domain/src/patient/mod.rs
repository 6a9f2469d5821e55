//! The patient aggregate: one patient's chart as commands, events, a decision state, and
//! the two pure functions between them, [`decide`] and [`evolve`].

mod commands;
mod decide;
mod events;
mod rejection;
mod retention;
mod state;

pub use commands::{
    AllergyCriticality, AllergyReaction, CONTACT_POINTS_MAX, ConsentRestrictionKind, Demographics,
    DemographicsCorrection, DiscontinuationReason, DosingFrequency, ErasureReason, IDENTIFIERS_MAX,
    LegalHoldReason, MedicationRoute, ObservationValue, PatientCommand,
};
pub use decide::{
    ADDENDA_PER_NOTE_MAX, CARE_TEAM_MAX, CONSENT_RESTRICTIONS_MAX, FUTURE_SKEW_MICROS_MAX,
    LEGAL_HOLDS_MAX, decide,
};
pub use events::PatientEvent;
pub use rejection::{Rejection, RetentionBasis};
pub use retention::RetentionPolicy;
pub use state::{
    Allergy, Condition, ConsentRestriction, DECISION_STATE_SCHEMA_VERSION, MedicationOrder, Note,
    NoteAddendum, Patient, RECENT_OBSERVATION_IDS_KEPT, evolve,
};

#[cfg(test)]
mod tests;
