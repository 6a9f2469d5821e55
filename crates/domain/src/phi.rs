//! Protected health information: newtypes that validate at the edge and never print.
//!
//! Every type here is parsed once (`parse` or `new`), keeps its value private, and gives it
//! back only through `expose_phi()` so each read of PHI is easy to grep and review. `Debug`
//! prints `TypeName(<phi>)` and none of them implements `Display`. They implement serde
//! because they travel inside the sealed (encrypted) event payload; deserializing
//! re-validates, so a payload can never smuggle in a value `parse` would refuse.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::Date;

/// Bytes in one given or family name.
pub const NAME_LENGTH_MAX: usize = 100;
/// Given names in one person's name (first, middle, ...).
pub const GIVEN_NAMES_MAX: usize = 5;
/// Bytes in one street line of an address.
pub const ADDRESS_LINE_LENGTH_MAX: usize = 100;
/// Street lines in one address.
pub const ADDRESS_LINES_MAX: usize = 3;
/// Bytes in a city name.
pub const CITY_LENGTH_MAX: usize = 64;
/// Bytes in a phone number as typed (digits plus separators).
pub const PHONE_NUMBER_LENGTH_MAX: usize = 32;
/// Digits in a phone number: E.164 allows at most 15.
pub const PHONE_DIGITS_MAX: usize = 15;
/// Digits in the shortest phone number worth storing (a local number without area code).
pub const PHONE_DIGITS_MIN: usize = 7;
/// Bytes in an email address (RFC 5321 path limit).
pub const EMAIL_ADDRESS_LENGTH_MAX: usize = 254;
/// Bytes in a medical record number.
pub const MRN_LENGTH_MAX: usize = 20;
/// Bytes in an identifier issued by another system (health plan member number, ...).
pub const IDENTIFIER_VALUE_LENGTH_MAX: usize = 64;
/// Bytes in a clinical note or an addendum.
pub const NOTE_TEXT_LENGTH_MAX: usize = 65_536;
/// Bytes in a short free-text clinical value (a narrative observation).
pub const FREE_TEXT_LENGTH_MAX: usize = 4_096;
/// The earliest birth year accepted: the same bound as [`crate::Timestamp`].
pub const BIRTH_YEAR_MIN: i32 = 1800;

const _: () = assert!(PHONE_DIGITS_MIN < PHONE_DIGITS_MAX);
const _: () = assert!(PHONE_DIGITS_MAX <= PHONE_NUMBER_LENGTH_MAX);
const _: () = assert!(FREE_TEXT_LENGTH_MAX < NOTE_TEXT_LENGTH_MAX);

/// A value that is not acceptable PHI. Names the field and the rule, never the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PhiError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is longer than {length_max} bytes")]
    TooLong {
        field: &'static str,
        length_max: usize,
    },
    #[error("{field} contains a control character")]
    ControlCharacter { field: &'static str },
    #[error("{field} is malformed: expected {expected}")]
    Malformed {
        field: &'static str,
        expected: &'static str,
    },
    #[error("{field} has {count} entries, more than {count_max}")]
    TooMany {
        field: &'static str,
        count: usize,
        count_max: usize,
    },
}

/// Trims, then checks emptiness, length and control characters. Line breaks and tabs are
/// allowed only in multi-line text (notes), because in a name or a code they are always
/// a paste accident or an injection attempt.
pub(crate) fn clean_text(
    raw: &str,
    field: &'static str,
    length_max: usize,
    multiline: bool,
) -> Result<String, PhiError> {
    let text = raw.trim();
    if text.is_empty() {
        return Err(PhiError::Empty { field });
    }
    if text.len() > length_max {
        return Err(PhiError::TooLong { field, length_max });
    }
    let allowed_control = |c: char| multiline && matches!(c, '\n' | '\r' | '\t');
    if text.chars().any(|c| c.is_control() && !allowed_control(c)) {
        return Err(PhiError::ControlCharacter { field });
    }
    Ok(text.to_owned())
}

macro_rules! phi_string {
    (
        $(#[$doc:meta])*
        $name:ident, field = $field:literal, length_max = $length_max:expr, multiline = $multiline:expr,
        check = $check:expr
    ) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
        #[serde(try_from = "String")]
        pub struct $name(String);

        impl $name {
            /// Trims and validates; the error names the rule, never the value.
            pub fn parse(raw: &str) -> Result<Self, PhiError> {
                let text = clean_text(raw, $field, $length_max, $multiline)?;
                let check: fn(String) -> Result<String, PhiError> = $check;
                check(text).map(Self)
            }

            /// The PHI itself. Every call site is a place PHI leaves the type: keep them few.
            pub fn expose_phi(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = PhiError;
            fn try_from(raw: String) -> Result<Self, Self::Error> {
                Self::parse(&raw)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::Schema> {
                crate::openapi::string(concat!("A ", $field, " (PHI)."), Some($length_max)).into()
            }
        }
        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<phi>)"))
            }
        }
    };
}

fn accept(text: String) -> Result<String, PhiError> {
    Ok(text)
}

phi_string!(
    /// One given name (first or middle name).
    GivenName, field = "given name", length_max = NAME_LENGTH_MAX, multiline = false,
    check = accept
);
phi_string!(
    /// A family name (surname).
    FamilyName, field = "family name", length_max = NAME_LENGTH_MAX, multiline = false,
    check = accept
);
phi_string!(
    /// One street line of a postal address.
    AddressLine, field = "address line", length_max = ADDRESS_LINE_LENGTH_MAX, multiline = false,
    check = accept
);
phi_string!(
    /// A city or town.
    City, field = "city", length_max = CITY_LENGTH_MAX, multiline = false, check = accept
);
phi_string!(
    /// A US ZIP code, `NNNNN` or `NNNNN-NNNN`. PHI: Safe Harbor keeps at most three digits.
    PostalCode, field = "postal code", length_max = 10, multiline = false, check = check_zip
);
phi_string!(
    /// A phone number as typed: digits with an optional leading `+` and the usual separators.
    PhoneNumber, field = "phone number", length_max = PHONE_NUMBER_LENGTH_MAX, multiline = false,
    check = check_phone
);
phi_string!(
    /// An email address, checked for shape only (one `@`, a dotted domain, no spaces).
    EmailAddress, field = "email address", length_max = EMAIL_ADDRESS_LENGTH_MAX,
    multiline = false, check = check_email
);
phi_string!(
    /// A medical record number: ASCII letters, digits and `-`, stored upper-case.
    Mrn, field = "medical record number", length_max = MRN_LENGTH_MAX, multiline = false,
    check = check_mrn
);
phi_string!(
    /// A US Social Security number, stored as `NNN-NN-NNNN`.
    Ssn, field = "social security number", length_max = 11, multiline = false, check = check_ssn
);
phi_string!(
    /// The value of an identifier issued by another system (see [`IdentifierSystem`]).
    IdentifierValue, field = "identifier value", length_max = IDENTIFIER_VALUE_LENGTH_MAX,
    multiline = false, check = check_identifier_value
);
phi_string!(
    /// The text of a clinical note or addendum. Line breaks and tabs are kept.
    NoteText, field = "note text", length_max = NOTE_TEXT_LENGTH_MAX, multiline = true,
    check = accept
);
phi_string!(
    /// A short narrative clinical value (an observation reported as text).
    FreeText, field = "free text", length_max = FREE_TEXT_LENGTH_MAX, multiline = true,
    check = accept
);

fn check_zip(text: String) -> Result<String, PhiError> {
    let malformed = PhiError::Malformed {
        field: "postal code",
        expected: "a US ZIP code NNNNN or NNNNN-NNNN",
    };
    let (zip5, plus4) = match text.split_once('-') {
        Some((zip5, plus4)) => (zip5, Some(plus4)),
        None => (text.as_str(), None),
    };
    let digits =
        |part: &str, count: usize| part.len() == count && part.bytes().all(|b| b.is_ascii_digit());
    if !digits(zip5, 5) || plus4.is_some_and(|plus4| !digits(plus4, 4)) {
        return Err(malformed);
    }
    Ok(text)
}

fn check_phone(text: String) -> Result<String, PhiError> {
    let malformed = PhiError::Malformed {
        field: "phone number",
        expected: "7 to 15 digits, an optional leading '+', and spaces, '-', '.', '(' or ')'",
    };
    let body = text.strip_prefix('+').unwrap_or(&text);
    let allowed = body
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, ' ' | '-' | '.' | '(' | ')'));
    let digit_count = body.chars().filter(char::is_ascii_digit).count();
    if !allowed || !(PHONE_DIGITS_MIN..=PHONE_DIGITS_MAX).contains(&digit_count) {
        return Err(malformed);
    }
    Ok(text)
}

fn check_email(text: String) -> Result<String, PhiError> {
    let malformed = PhiError::Malformed {
        field: "email address",
        expected: "local@domain.tld without spaces",
    };
    let Some((local, domain)) = text.split_once('@') else {
        return Err(malformed);
    };
    let domain_ok = domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains("..")
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '.'));
    let local_ok = !local.is_empty() && !local.chars().any(|c| c.is_whitespace() || c == '@');
    if !local_ok || !domain_ok {
        return Err(malformed);
    }
    Ok(text)
}

fn check_mrn(text: String) -> Result<String, PhiError> {
    let ok = text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && text.bytes().any(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(PhiError::Malformed {
            field: "medical record number",
            expected: "ASCII letters, digits and '-'",
        });
    }
    // One MRN, one spelling: lookups by blind index hash the stored form.
    Ok(text.to_ascii_uppercase())
}

fn check_ssn(text: String) -> Result<String, PhiError> {
    let malformed = PhiError::Malformed {
        field: "social security number",
        expected: "NNN-NN-NNNN with a valid area, group and serial",
    };
    let digits: String = match text.len() {
        9 => text.clone(),
        11 if text.as_bytes()[3] == b'-' && text.as_bytes()[6] == b'-' => text.replace('-', ""),
        _ => return Err(malformed),
    };
    if digits.len() != 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed);
    }
    let (area, rest) = digits.split_at(3);
    let (group, serial) = rest.split_at(2);
    // The SSA never issues area 000, 666 or 900-999, group 00 or serial 0000.
    let area_invalid = area == "000" || area == "666" || area.starts_with('9');
    if area_invalid || group == "00" || serial == "0000" {
        return Err(malformed);
    }
    Ok(format!("{area}-{group}-{serial}"))
}

fn check_identifier_value(text: String) -> Result<String, PhiError> {
    let ok = text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b' ' | b'-' | b'.' | b'/'));
    if !ok {
        return Err(PhiError::Malformed {
            field: "identifier value",
            expected: "ASCII letters, digits, spaces, '-', '.' or '/'",
        });
    }
    Ok(text)
}

/// A date of birth. Whether it lies in the future is checked by `decide`, which knows `now`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BirthDate(Date);

const DATE_FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    time::macros::format_description!("[year]-[month]-[day]");

impl BirthDate {
    /// Parses `YYYY-MM-DD`.
    pub fn parse(raw: &str) -> Result<Self, PhiError> {
        let date = Date::parse(raw.trim(), DATE_FORMAT).map_err(|_| PhiError::Malformed {
            field: "birth date",
            expected: "a calendar date YYYY-MM-DD",
        })?;
        Self::from_date(date)
    }

    pub fn from_date(date: Date) -> Result<Self, PhiError> {
        if date.year() < BIRTH_YEAR_MIN {
            return Err(PhiError::Malformed {
                field: "birth date",
                expected: "a year from 1800",
            });
        }
        Ok(Self(date))
    }

    /// The PHI itself.
    pub fn expose_phi(&self) -> Date {
        self.0
    }
}

impl fmt::Debug for BirthDate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BirthDate(<phi>)")
    }
}

impl Serialize for BirthDate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let text = self
            .0
            .format(DATE_FORMAT)
            .map_err(|_| serde::ser::Error::custom("birth date does not format"))?;
        serializer.serialize_str(&text)
    }
}

impl<'de> Deserialize<'de> for BirthDate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        Self::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// Administrative sex (FHIR `AdministrativeGender`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Sex {
    Female,
    Male,
    Other,
    Unknown,
}

/// A person's name: given names in order, then the family name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(try_from = "PersonNameWire")]
pub struct PersonName {
    given: Vec<GivenName>,
    family: FamilyName,
}

#[derive(Deserialize)]
// Request bodies reach these types: a misspelt field must be an error, not silently dropped.
#[serde(deny_unknown_fields)]
struct PersonNameWire {
    given: Vec<GivenName>,
    family: FamilyName,
}

impl TryFrom<PersonNameWire> for PersonName {
    type Error = PhiError;
    fn try_from(wire: PersonNameWire) -> Result<Self, Self::Error> {
        Self::new(wire.given, wire.family)
    }
}

impl PersonName {
    /// At most [`GIVEN_NAMES_MAX`] given names; none is fine (mononymous people exist).
    pub fn new(given: Vec<GivenName>, family: FamilyName) -> Result<Self, PhiError> {
        if given.len() > GIVEN_NAMES_MAX {
            return Err(PhiError::TooMany {
                field: "given names",
                count: given.len(),
                count_max: GIVEN_NAMES_MAX,
            });
        }
        Ok(Self { given, family })
    }

    pub fn given(&self) -> &[GivenName] {
        &self.given
    }

    pub fn family(&self) -> &FamilyName {
        &self.family
    }
}

/// A US state, district or territory by its two-letter USPS code. Not an identifier under
/// Safe Harbor (states are kept in de-identified data), so it prints.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct UsState(String);

impl UsState {
    /// The 50 states, DC, the inhabited territories and the military "states".
    pub const CODES: [&'static str; 59] = [
        "AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA",
        "KS", "KY", "LA", "ME", "MD", "MA", "MI", "MN", "MS", "MO", "MT", "NE", "NV", "NH", "NJ",
        "NM", "NY", "NC", "ND", "OH", "OK", "OR", "PA", "RI", "SC", "SD", "TN", "TX", "UT", "VT",
        "VA", "WA", "WV", "WI", "WY", "DC", "PR", "GU", "VI", "AS", "MP", "AA", "AE", "AP",
    ];

    pub fn parse(raw: &str) -> Result<Self, PhiError> {
        let code = raw.trim().to_ascii_uppercase();
        if !Self::CODES.contains(&code.as_str()) {
            return Err(PhiError::Malformed {
                field: "state",
                expected: "a two-letter USPS state code",
            });
        }
        Ok(Self(code))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UsState {
    type Error = PhiError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

/// A US postal address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(try_from = "PostalAddressWire")]
pub struct PostalAddress {
    lines: Vec<AddressLine>,
    city: City,
    state: UsState,
    postal_code: PostalCode,
}

#[derive(Deserialize)]
// Request bodies reach these types: a misspelt field must be an error, not silently dropped.
#[serde(deny_unknown_fields)]
struct PostalAddressWire {
    lines: Vec<AddressLine>,
    city: City,
    state: UsState,
    postal_code: PostalCode,
}

impl TryFrom<PostalAddressWire> for PostalAddress {
    type Error = PhiError;
    fn try_from(wire: PostalAddressWire) -> Result<Self, Self::Error> {
        Self::new(wire.lines, wire.city, wire.state, wire.postal_code)
    }
}

impl PostalAddress {
    /// One to [`ADDRESS_LINES_MAX`] street lines.
    pub fn new(
        lines: Vec<AddressLine>,
        city: City,
        state: UsState,
        postal_code: PostalCode,
    ) -> Result<Self, PhiError> {
        if lines.is_empty() {
            return Err(PhiError::Empty {
                field: "address lines",
            });
        }
        if lines.len() > ADDRESS_LINES_MAX {
            return Err(PhiError::TooMany {
                field: "address lines",
                count: lines.len(),
                count_max: ADDRESS_LINES_MAX,
            });
        }
        Ok(Self {
            lines,
            city,
            state,
            postal_code,
        })
    }

    pub fn lines(&self) -> &[AddressLine] {
        &self.lines
    }

    pub fn city(&self) -> &City {
        &self.city
    }

    pub fn state(&self) -> &UsState {
        &self.state
    }

    pub fn postal_code(&self) -> &PostalCode {
        &self.postal_code
    }
}

/// A way to reach the patient.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ContactPoint {
    Phone(PhoneNumber),
    Email(EmailAddress),
}

/// Who issued an identifier the patient carries. The MRN and the SSN have their own fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum IdentifierSystem {
    HealthPlanMemberNumber,
    MedicareBeneficiaryIdentifier,
    MedicaidNumber,
    DriversLicense,
    Passport,
}

/// An identifier issued by another system. The system prints; the value is PHI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// Request bodies reach these types: a misspelt field must be an error, not silently dropped.
#[serde(deny_unknown_fields)]
pub struct PatientIdentifier {
    pub system: IdentifierSystem,
    pub value: IdentifierValue,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_trimmed_and_bounded() {
        assert_eq!(GivenName::parse("  Ada ").unwrap().expose_phi(), "Ada");
        assert_eq!(
            GivenName::parse("   "),
            Err(PhiError::Empty {
                field: "given name"
            })
        );
        assert!(matches!(
            FamilyName::parse(&"x".repeat(NAME_LENGTH_MAX + 1)),
            Err(PhiError::TooLong { .. })
        ));
        assert!(FamilyName::parse(&"x".repeat(NAME_LENGTH_MAX)).is_ok());
        assert!(matches!(
            FamilyName::parse("Lo\u{0}ve"),
            Err(PhiError::ControlCharacter { .. })
        ));
        assert!(NoteText::parse("line one\nline two\ttab").is_ok());
        assert!(matches!(
            GivenName::parse("a\nb"),
            Err(PhiError::ControlCharacter { .. })
        ));
    }

    #[test]
    fn debug_redacts_and_errors_omit_values() {
        let name = GivenName::parse("Zyxmarker").unwrap();
        assert_eq!(format!("{name:?}"), "GivenName(<phi>)");
        let birth = BirthDate::parse("1961-07-04").unwrap();
        assert_eq!(format!("{birth:?}"), "BirthDate(<phi>)");
        let error = Ssn::parse("Zyxmarker").unwrap_err();
        assert!(!error.to_string().contains("Zyxmarker"));
    }

    #[test]
    fn zip_codes() {
        for ok in ["02139", "02139-4307"] {
            assert!(PostalCode::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "2139",
            "021399",
            "02139-43",
            "0213a",
            "02139 4307",
            "02139-",
        ] {
            assert!(PostalCode::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ssns() {
        assert_eq!(Ssn::parse("123456789").unwrap().expose_phi(), "123-45-6789");
        assert_eq!(
            Ssn::parse("123-45-6789").unwrap().expose_phi(),
            "123-45-6789"
        );
        for bad in [
            "000-45-6789",
            "666-45-6789",
            "900-45-6789",
            "999-45-6789",
            "123-00-6789",
            "123-45-0000",
            "123-456-789",
            "12-345-6789",
            "12345678",
            "abc-de-fghi",
        ] {
            assert!(Ssn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn phones_emails_mrns() {
        assert!(PhoneNumber::parse("+1 (617) 555-0100").is_ok());
        assert!(PhoneNumber::parse("555-0100").is_ok());
        assert!(PhoneNumber::parse("12345").is_err());
        assert!(PhoneNumber::parse("call me").is_err());
        assert!(EmailAddress::parse("a.b@example.org").is_ok());
        for bad in [
            "a@b",
            "@example.org",
            "a b@example.org",
            "a@example..org",
            "a@@x.org",
        ] {
            assert!(EmailAddress::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Mrn::parse("ab-123").unwrap().expose_phi(), "AB-123");
        assert!(Mrn::parse("AB 123").is_err());
        assert!(Mrn::parse("---").is_err());
        assert!(Mrn::parse(&"1".repeat(MRN_LENGTH_MAX + 1)).is_err());
    }

    #[test]
    fn birth_dates() {
        assert!(BirthDate::parse("1799-12-31").is_err());
        assert!(BirthDate::parse("2001-02-29").is_err());
        assert!(BirthDate::parse("04/07/1961").is_err());
        let date = BirthDate::parse("1961-07-04").unwrap();
        let json = serde_json::to_string(&date).unwrap();
        assert_eq!(json, "\"1961-07-04\"");
        assert_eq!(serde_json::from_str::<BirthDate>(&json).unwrap(), date);
    }

    #[test]
    fn deserialize_revalidates() {
        assert!(serde_json::from_str::<Ssn>("\"666-45-6789\"").is_err());
        assert!(serde_json::from_str::<GivenName>("\"  \"").is_err());
        assert!(serde_json::from_str::<UsState>("\"XX\"").is_err());
        let too_many = serde_json::json!({
            "given": ["a", "b", "c", "d", "e", "f"],
            "family": "x"
        });
        assert!(serde_json::from_value::<PersonName>(too_many).is_err());
        let no_lines = serde_json::json!({
            "lines": [], "city": "Boston", "state": "MA", "postal_code": "02139"
        });
        assert!(serde_json::from_value::<PostalAddress>(no_lines).is_err());
    }

    #[test]
    fn states() {
        assert_eq!(UsState::parse("ma").unwrap().as_str(), "MA");
        assert!(UsState::parse("ZZ").is_err());
    }
}
