//! JSON schemas of the domain types that request bodies carry (feature `openapi`), for the
//! API's OpenAPI document. Types whose serde shape is derived derive `ToSchema` where they are
//! defined; the ones with hand-written serde (validated strings, ids, code systems) are
//! described here and in their macros, as strings with the bounds their parsers enforce.

use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
use utoipa::openapi::{RefOr, Schema};
use utoipa::{PartialSchema, ToSchema};

use crate::codes::CodeSystem;
use crate::phi::{BirthDate, UsState};
use crate::quantity::{
    DECIMAL_FRACTION_DIGITS_MAX, DECIMAL_INTEGER_DIGITS_MAX, Decimal, UNIT_LENGTH_MAX, Unit,
};
use crate::time::Timestamp;

/// A string schema: what it is, and the longest value its parser accepts.
pub(crate) fn string(description: &str, length_max: Option<usize>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .description(Some(description))
        .max_length(length_max)
}

/// A UUID, as every id is written.
pub(crate) fn uuid(description: &str) -> RefOr<Schema> {
    string(description, None)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
        .into()
}

impl PartialSchema for CodeSystem {
    fn schema() -> RefOr<Schema> {
        string("A code system, by its FHIR URI.", None)
            .enum_values(Some(CodeSystem::ALL.map(CodeSystem::uri)))
            .into()
    }
}
impl ToSchema for CodeSystem {}

impl PartialSchema for Decimal {
    fn schema() -> RefOr<Schema> {
        string(
            "A finite decimal number as written, e.g. \"98.6\" (a string, so no digit is lost).",
            Some(1 + DECIMAL_INTEGER_DIGITS_MAX + 1 + DECIMAL_FRACTION_DIGITS_MAX),
        )
        .pattern(Some(format!(
            "^-?[0-9]{{1,{DECIMAL_INTEGER_DIGITS_MAX}}}(\\.[0-9]{{1,{DECIMAL_FRACTION_DIGITS_MAX}}})?$"
        )))
        .into()
    }
}
impl ToSchema for Decimal {}

impl PartialSchema for Unit {
    fn schema() -> RefOr<Schema> {
        string(
            "A unit in UCUM case-sensitive syntax, e.g. mg, mm[Hg], /min.",
            Some(UNIT_LENGTH_MAX),
        )
        .min_length(Some(1))
        .into()
    }
}
impl ToSchema for Unit {}

impl PartialSchema for BirthDate {
    fn schema() -> RefOr<Schema> {
        string("A date of birth, YYYY-MM-DD, from 1800 (PHI).", Some(10))
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Date)))
            .into()
    }
}
impl ToSchema for BirthDate {}

impl PartialSchema for UsState {
    fn schema() -> RefOr<Schema> {
        string("A US state, district or territory: its USPS code.", Some(2))
            .enum_values(Some(UsState::CODES))
            .into()
    }
}
impl ToSchema for UsState {}

impl PartialSchema for Timestamp {
    fn schema() -> RefOr<Schema> {
        string(
            "A time, RFC 3339 with its offset, e.g. 2026-11-27T08:30:00Z.",
            None,
        )
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::DateTime)))
        .into()
    }
}
impl ToSchema for Timestamp {}
