//! De-identified views by the HIPAA Safe Harbor method (45 CFR 164.514(b)(2)): the only
//! plaintext read models chartlog writes.
//!
//! - [`safe_harbor`]: the transformation, pure: decoded events in, row changes out.
//! - [`zip3`]: the three-digit ZIP rule and the shipped restricted list (versioned data).
//! - [`export`]: streaming NDJSON and CSV writers over de-identified rows.
//! - [`reader`]: the tables read back a page at a time, through those writers.
//!
//! **Invariants:**
//! - no identifier of the 18 Safe Harbor categories and no free text is ever read into a row:
//!   the transformation reads only birth year, sex, state and ZIP code of the demographics,
//!   and codes, decimals, units and closed vocabularies of clinical events;
//! - patients and rows are keyed by HMAC pseudonyms under a secret that never leaves the
//!   server; raw patient and record ids never appear, because the audit trail and the API
//!   show them next to identities;
//! - a patient's rows go when the patient is erased.

pub mod export;
pub mod projection;
pub mod reader;
pub mod safe_harbor;
pub mod zip3;

pub use projection::{
    DEIDENTIFIED_PROJECTION_NAME, DEIDENTIFIED_PROJECTION_VERSION, DeidentifiedProjection,
};
pub use reader::{
    EXPORT_PAGE_ROWS, EXPORT_PAGE_ROWS_MAX, ExportChunk, ExportReadError, export_page,
};
pub use safe_harbor::{
    AGE_YEARS_GROUPED_MIN, AllergyRow, BirthYear, CodedConcept, ConditionRow, DeidChange,
    DeidQuantity, DeidTables, DeidValue, EventContext, Geography, MedicationOrderRow,
    ObservationRow, PatientRow, Pseudonym, Pseudonymizer, RecordKind, RowKey, deidentify_event,
};
pub use zip3::{RESTRICTED_ZIP3_COUNT, RESTRICTED_ZIP3_VERSION, Zip3};

/// The de-identification secret's key file in the data directory's key folder
/// ([`chartlog_crypto::load_or_create_mac_key`]). A key of its own, not the blind-index key:
/// pseudonyms are handed to analysts, and must not be comparable with the index digests.
pub const DEID_KEY_FILE_NAME: &str = "deid-key.json";

#[cfg(test)]
mod tests;
