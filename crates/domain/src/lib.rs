//! chartlog-domain: the clinical model of chartlog.
//!
//! Ids, PHI newtypes, clinical codes, the commands a clinic sends, the events they become,
//! the patient aggregate as two pure functions, [`decide`] and [`evolve`], and the event
//! [`codec`] (type name + schema version + JSON payload, with upcasting of old versions).
//!
//! **Invariants:** no I/O, no async, no clock, no randomness, no crypto. Everything here is
//! deterministic: the caller passes the time and the ids in. PHI values never print: their
//! `Debug` redacts and they implement no `Display`; the value is reached only through
//! `expose_phi()`. Errors and rejections name ids and rules, never PHI.
//!
//! ```
//! use chartlog_domain::{Patient, PatientCommand, PatientId, Timestamp, decide, evolve};
//! use chartlog_domain::patient::{Demographics, Rejection};
//! use chartlog_domain::phi::{BirthDate, FamilyName, GivenName, Mrn, PersonName, Sex};
//!
//! let now = Timestamp::from_unix_micros(1_700_000_000_000_000).unwrap();
//! let demographics = Demographics {
//!     name: PersonName::new(vec![GivenName::parse("Ada").unwrap()], FamilyName::parse("Lovelace").unwrap()).unwrap(),
//!     birth_date: BirthDate::parse("1985-12-10").unwrap(),
//!     sex: Sex::Female,
//!     address: None,
//!     contacts: vec![],
//!     mrn: Mrn::parse("MRN-1").unwrap(),
//!     ssn: None,
//!     identifiers: vec![],
//! };
//! let command = PatientCommand::RegisterPatient { patient_id: PatientId::from_uuid(uuid::Uuid::from_u128(1)), demographics };
//! let events = decide(&Patient::default(), command.clone(), now).unwrap();
//! let patient = events.iter().fold(Patient::default(), evolve);
//! assert_eq!(patient.version(), 1);
//! assert!(matches!(decide(&patient, command, now), Err(Rejection::AlreadyRegistered { .. })));
//! ```
#![forbid(unsafe_code)]

pub mod actor;
pub mod codec;
pub mod codes;
pub mod ids;
#[cfg(feature = "openapi")]
mod openapi;
pub mod patient;
pub mod phi;
pub mod quantity;
pub mod stream;
pub mod synthetic;
pub mod time;

pub use actor::{Actor, PurposeOfUse, Role};
pub use codec::{DecodeError, EncodedEvent, decode, encode};
pub use codes::{Code, CodeError, CodePurpose, CodeSystem};
pub use ids::*;
pub use patient::{Patient, PatientCommand, PatientEvent, Rejection, decide, evolve};
pub use quantity::{Decimal, Quantity, Unit};
pub use stream::StreamId;
pub use time::Timestamp;
