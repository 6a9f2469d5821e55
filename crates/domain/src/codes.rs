//! Clinical codes, each kept with its code system as FHIR does (`Coding`), validated against
//! that system's syntax when parsed.
//!
//! Syntax is checked here; which systems fit which purpose is a clinical rule checked by
//! `decide` (see [`CodePurpose`]), so an edge can parse any code once and let the aggregate
//! say "a condition is coded in ICD-10-CM or SNOMED CT" in its own rejection.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

use crate::phi::{PhiError, clean_text};

/// Bytes in a code's human-readable display text.
pub const CODE_DISPLAY_LENGTH_MAX: usize = 256;

/// The terminologies chartlog accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CodeSystem {
    /// Observations: labs, vital signs.
    Loinc,
    /// Diagnoses (US clinical modification).
    Icd10Cm,
    /// Clinical findings, substances, answers.
    SnomedCt,
    /// Medications.
    RxNorm,
}

impl CodeSystem {
    pub const ALL: [CodeSystem; 4] = [
        CodeSystem::Loinc,
        CodeSystem::Icd10Cm,
        CodeSystem::SnomedCt,
        CodeSystem::RxNorm,
    ];

    /// The canonical FHIR system URI.
    pub const fn uri(self) -> &'static str {
        match self {
            CodeSystem::Loinc => "http://loinc.org",
            CodeSystem::Icd10Cm => "http://hl7.org/fhir/sid/icd-10-cm",
            CodeSystem::SnomedCt => "http://snomed.info/sct",
            CodeSystem::RxNorm => "http://www.nlm.nih.gov/research/umls/rxnorm",
        }
    }

    /// A short stable name for messages and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            CodeSystem::Loinc => "loinc",
            CodeSystem::Icd10Cm => "icd10cm",
            CodeSystem::SnomedCt => "snomed_ct",
            CodeSystem::RxNorm => "rxnorm",
        }
    }

    pub fn from_uri(uri: &str) -> Result<Self, CodeError> {
        Self::ALL
            .into_iter()
            .find(|system| system.uri() == uri)
            .ok_or(CodeError::UnknownSystem)
    }

    /// `code` is already trimmed and upper-cased.
    fn accepts(self, code: &str) -> bool {
        // Every system's codes are ASCII; the checks below may then count bytes as characters.
        if !code.is_ascii() {
            return false;
        }
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        let no_leading_zero = !code.starts_with('0');
        match self {
            // NNNNNNN-N: up to seven digits, a dash, one check digit.
            CodeSystem::Loinc => code.split_once('-').is_some_and(|(body, check)| {
                digits(body) && body.len() <= 7 && digits(check) && check.len() == 1
            }),
            CodeSystem::Icd10Cm => icd10cm_accepts(code),
            // SCTIDs are 6 to 18 digits.
            CodeSystem::SnomedCt => {
                digits(code) && (6..=18).contains(&code.len()) && no_leading_zero
            }
            // RxCUIs are positive integers; none has more than 8 digits yet, allow headroom.
            CodeSystem::RxNorm => digits(code) && code.len() <= 10 && no_leading_zero,
        }
    }
}

/// A letter, a digit, a digit or letter (the category), then up to four more characters,
/// optionally after a dot: `E11`, `E11.9`, `S72.001A`, `E119`.
fn icd10cm_accepts(code: &str) -> bool {
    let (category, subcategory) = match code.split_once('.') {
        Some((category, subcategory)) if !subcategory.is_empty() => (category, subcategory),
        Some(_) => return false,
        None => match code.split_at_checked(3) {
            Some(parts) => parts,
            None => return false,
        },
    };
    let bytes = category.as_bytes();
    let category_ok = bytes.len() == 3
        && bytes[0].is_ascii_uppercase()
        && bytes[1].is_ascii_digit()
        && (bytes[2].is_ascii_digit() || bytes[2].is_ascii_uppercase());
    let subcategory_ok = subcategory.len() <= 4
        && subcategory
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
    category_ok && subcategory_ok
}

impl fmt::Display for CodeSystem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for CodeSystem {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.uri())
    }
}

impl<'de> Deserialize<'de> for CodeSystem {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let uri = String::deserialize(deserializer)?;
        Self::from_uri(&uri).map_err(serde::de::Error::custom)
    }
}

/// A code that cannot be accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CodeError {
    #[error(
        "unknown code system: expected http://loinc.org, http://hl7.org/fhir/sid/icd-10-cm, http://snomed.info/sct or http://www.nlm.nih.gov/research/umls/rxnorm"
    )]
    UnknownSystem,
    #[error("code is not valid {system} syntax")]
    Malformed { system: CodeSystem },
    #[error(transparent)]
    Display(#[from] PhiError),
}

/// A code in its system, with the display text the sender showed the clinician.
///
/// A code attached to a patient is health information (a diagnosis, a drug), so `Debug`
/// shows only the system.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(
    feature = "openapi",
    derive(utoipa::ToSchema),
    schema(
        description = "A code in its system (LOINC, ICD-10-CM, SNOMED CT or RxNorm), checked against the system's syntax, with the display text the sender showed the clinician."
    )
)]
#[serde(try_from = "CodeWire")]
pub struct Code {
    system: CodeSystem,
    code: String,
    display: Option<String>,
}

#[derive(Deserialize)]
// Request bodies reach these types: a misspelt field must be an error, not silently dropped.
#[serde(deny_unknown_fields)]
struct CodeWire {
    system: CodeSystem,
    code: String,
    display: Option<String>,
}

impl TryFrom<CodeWire> for Code {
    type Error = CodeError;
    fn try_from(wire: CodeWire) -> Result<Self, Self::Error> {
        Self::parse(wire.system, &wire.code, wire.display.as_deref())
    }
}

impl Code {
    /// Validates `code` against `system`'s syntax (trimmed, upper-cased) and bounds `display`.
    pub fn parse(system: CodeSystem, code: &str, display: Option<&str>) -> Result<Self, CodeError> {
        let code = code.trim().to_ascii_uppercase();
        if !system.accepts(&code) {
            return Err(CodeError::Malformed { system });
        }
        let display = display
            .map(|display| clean_text(display, "code display", CODE_DISPLAY_LENGTH_MAX, false))
            .transpose()?;
        Ok(Self {
            system,
            code,
            display,
        })
    }

    /// Like [`Code::parse`], with the system given as its FHIR URI.
    pub fn parse_uri(
        system_uri: &str,
        code: &str,
        display: Option<&str>,
    ) -> Result<Self, CodeError> {
        Self::parse(CodeSystem::from_uri(system_uri)?, code, display)
    }

    pub fn system(&self) -> CodeSystem {
        self.system
    }

    /// The code value: PHI once attached to a patient.
    pub fn expose_phi(&self) -> &str {
        &self.code
    }

    /// The display text: PHI once attached to a patient.
    pub fn expose_display_phi(&self) -> Option<&str> {
        self.display.as_deref()
    }

    /// Same concept, whatever the display text says.
    pub fn same_concept(&self, other: &Code) -> bool {
        self.system == other.system && self.code == other.code
    }
}

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Code({}|<phi>)", self.system)
    }
}

/// What a code is used for, which decides the systems allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CodePurpose {
    /// What was observed.
    Observation,
    /// A coded observation result.
    ObservationValue,
    Condition,
    AllergySubstance,
    Medication,
}

impl CodePurpose {
    pub const fn allowed_systems(self) -> &'static [CodeSystem] {
        match self {
            CodePurpose::Observation => &[CodeSystem::Loinc],
            CodePurpose::ObservationValue => &[CodeSystem::SnomedCt, CodeSystem::Loinc],
            CodePurpose::Condition => &[CodeSystem::Icd10Cm, CodeSystem::SnomedCt],
            CodePurpose::AllergySubstance => &[CodeSystem::RxNorm, CodeSystem::SnomedCt],
            CodePurpose::Medication => &[CodeSystem::RxNorm],
        }
    }

    pub fn allows(self, system: CodeSystem) -> bool {
        self.allowed_systems().contains(&system)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            CodePurpose::Observation => "observation",
            CodePurpose::ObservationValue => "observation value",
            CodePurpose::Condition => "condition",
            CodePurpose::AllergySubstance => "allergy substance",
            CodePurpose::Medication => "medication",
        }
    }
}

impl fmt::Display for CodePurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(system: CodeSystem, code: &str) -> bool {
        Code::parse(system, code, None).is_ok()
    }

    #[test]
    fn loinc_syntax() {
        assert!(ok(CodeSystem::Loinc, "8310-5"));
        assert!(ok(CodeSystem::Loinc, "1234567-8"));
        for bad in ["8310", "8310-", "-5", "12345678-9", "8310-55", "83a0-5", ""] {
            assert!(!ok(CodeSystem::Loinc, bad), "{bad}");
        }
    }

    #[test]
    fn icd10cm_syntax() {
        for good in ["E11", "E11.9", "S72.001A", "e11.65", "E119", "C4A.0"] {
            assert!(ok(CodeSystem::Icd10Cm, good), "{good}");
        }
        for bad in ["E1", "11.9", "E11.", "E11.12345", "EE1.1", "E11-9", ".9"] {
            assert!(!ok(CodeSystem::Icd10Cm, bad), "{bad}");
        }
        assert_eq!(
            Code::parse(CodeSystem::Icd10Cm, " e11.9 ", None)
                .unwrap()
                .expose_phi(),
            "E11.9"
        );
    }

    /// A multi-byte character where a byte count would split it was a panic, not a refusal
    /// (found by the `command_json` fuzz target: `I0\u{96}r/sid` as an ICD-10-CM code).
    #[test]
    fn non_ascii_codes_are_refused_in_every_system() {
        for system in [
            CodeSystem::Loinc,
            CodeSystem::Icd10Cm,
            CodeSystem::SnomedCt,
            CodeSystem::RxNorm,
        ] {
            for bad in [
                "I0\u{96}r/sid",
                "E1\u{e9}",
                "\u{e9}11",
                "E11.\u{e9}",
                "\u{1f600}",
                "838\u{0663}-5",
            ] {
                assert_eq!(
                    Code::parse(system, bad, None),
                    Err(CodeError::Malformed { system }),
                    "{system}: {bad:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn parsing_any_code_in_any_system_never_panics(code in "\\PC{0,12}", system in 0usize..4) {
            let system = [
                CodeSystem::Loinc,
                CodeSystem::Icd10Cm,
                CodeSystem::SnomedCt,
                CodeSystem::RxNorm,
            ][system];
            let _ = Code::parse(system, &code, None);
        }
    }

    #[test]
    fn snomed_and_rxnorm_syntax() {
        assert!(ok(CodeSystem::SnomedCt, "38341003"));
        assert!(!ok(CodeSystem::SnomedCt, "12345"));
        assert!(!ok(CodeSystem::SnomedCt, "0123456"));
        assert!(!ok(CodeSystem::SnomedCt, &"1".repeat(19)));
        assert!(ok(CodeSystem::RxNorm, "197361"));
        assert!(!ok(CodeSystem::RxNorm, "19736a"));
        assert!(!ok(CodeSystem::RxNorm, "0"));
    }

    #[test]
    fn systems_by_uri() {
        for system in CodeSystem::ALL {
            assert_eq!(CodeSystem::from_uri(system.uri()), Ok(system));
        }
        assert_eq!(
            CodeSystem::from_uri("http://example.org/codes"),
            Err(CodeError::UnknownSystem)
        );
        assert_eq!(
            Code::parse_uri("urn:oid:2.16.840.1.113883.6.1", "8310-5", None),
            Err(CodeError::UnknownSystem)
        );
    }

    #[test]
    fn purposes() {
        assert!(CodePurpose::Observation.allows(CodeSystem::Loinc));
        assert!(!CodePurpose::Observation.allows(CodeSystem::SnomedCt));
        assert!(CodePurpose::Condition.allows(CodeSystem::Icd10Cm));
        assert!(CodePurpose::Condition.allows(CodeSystem::SnomedCt));
        assert!(!CodePurpose::Condition.allows(CodeSystem::RxNorm));
        assert!(CodePurpose::AllergySubstance.allows(CodeSystem::RxNorm));
        assert!(!CodePurpose::Medication.allows(CodeSystem::SnomedCt));
    }

    #[test]
    fn serde_round_trip_and_revalidation() {
        let code = Code::parse(CodeSystem::Loinc, "8310-5", Some("Body temperature")).unwrap();
        let json = serde_json::to_value(&code).unwrap();
        assert_eq!(json["system"], "http://loinc.org");
        assert_eq!(serde_json::from_value::<Code>(json).unwrap(), code);
        let bad = serde_json::json!({"system": "http://loinc.org", "code": "E11", "display": null});
        assert!(serde_json::from_value::<Code>(bad).is_err());
        assert_eq!(format!("{code:?}"), "Code(loinc|<phi>)");
    }
}
