//! Measured amounts: a decimal value with a UCUM unit.
//!
//! Values are kept as decimal text, not `f64`, because precision is clinical information
//! (`1.50` mg is not reported like `1.5` mg) and because a float does not survive every JSON
//! round trip bit for bit; NaN and infinities cannot even be written down.

use std::fmt;

use serde::{Deserialize, Serialize, Serializer};

/// Digits before the decimal point.
pub const DECIMAL_INTEGER_DIGITS_MAX: usize = 12;
/// Digits after the decimal point.
pub const DECIMAL_FRACTION_DIGITS_MAX: usize = 9;
/// Bytes in a unit.
pub const UNIT_LENGTH_MAX: usize = 32;

/// A value or unit that cannot be accepted. Never echoes the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "decimal is malformed: expected an optional '-', 1 to 12 digits, and optionally '.' and 1 to 9 digits"
    )]
    MalformedDecimal,
    #[error("decimal is not finite")]
    NotFinite,
    #[error("unit is malformed: expected 1 to 32 printable ASCII characters of UCUM syntax")]
    MalformedUnit,
}

/// A finite decimal number, kept as written.
#[derive(Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(try_from = "String")]
pub struct Decimal(String);

impl Decimal {
    pub fn parse(raw: &str) -> Result<Self, QuantityError> {
        let text = raw.trim();
        let unsigned = text.strip_prefix('-').unwrap_or(text);
        let (integer, fraction) = match unsigned.split_once('.') {
            Some((integer, fraction)) => (integer, Some(fraction)),
            None => (unsigned, None),
        };
        let digits = |part: &str, max: usize| {
            !part.is_empty() && part.len() <= max && part.bytes().all(|b| b.is_ascii_digit())
        };
        let ok = digits(integer, DECIMAL_INTEGER_DIGITS_MAX)
            && fraction.is_none_or(|fraction| digits(fraction, DECIMAL_FRACTION_DIGITS_MAX));
        if !ok {
            return Err(QuantityError::MalformedDecimal);
        }
        Ok(Self(text.to_owned()))
    }

    /// Shortest text that reads back as `value`; NaN and infinities are refused.
    pub fn from_f64(value: f64) -> Result<Self, QuantityError> {
        if !value.is_finite() {
            return Err(QuantityError::NotFinite);
        }
        Self::parse(&value.to_string())
    }

    pub fn expose_phi(&self) -> &str {
        &self.0
    }

    /// For arithmetic in projections; exact enough for every value that parses.
    pub fn to_f64(&self) -> f64 {
        // Parsing validated decimal syntax as f64 cannot fail; fall back to NaN defensively.
        self.0.parse().unwrap_or(f64::NAN)
    }

    pub fn is_positive(&self) -> bool {
        !self.0.starts_with('-') && self.0.bytes().any(|b| matches!(b, b'1'..=b'9'))
    }
}

impl TryFrom<String> for Decimal {
    type Error = QuantityError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

impl Serialize for Decimal {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl fmt::Debug for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decimal(<phi>)")
    }
}

/// A unit in UCUM case-sensitive syntax (`mg`, `mm[Hg]`, `[degF]`, `10*3/uL`, `%`).
/// Parsing checks its shape only, so that every stored event decodes whatever the UCUM
/// tables say; commands are held to full UCUM by [`Unit::is_ucum`]. Not PHI: it prints.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Unit(String);

impl Unit {
    pub fn parse(raw: &str) -> Result<Self, QuantityError> {
        let text = raw.trim();
        let printable = text.bytes().all(|b| b.is_ascii_graphic());
        if text.is_empty() || text.len() > UNIT_LENGTH_MAX || !printable || !brackets_balanced(text)
        {
            return Err(QuantityError::MalformedUnit);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the unit is UCUM (case-sensitive): its grammar, and only atoms and prefixes
    /// of UCUM's tables. A unit that is not could be any text a sender typed, an identifier
    /// included, so new commands must send UCUM and the de-identified views keep no other.
    pub fn is_ucum(&self) -> bool {
        is_ucum(&self.0)
    }
}

/// Whether `text` is a UCUM (case-sensitive) unit expression; see [`Unit::is_ucum`].
pub fn is_ucum(text: &str) -> bool {
    ucum::validate(text).is_ok()
}

/// UCUM brackets (`[...]` for special units, `{...}` for annotations) never nest.
fn brackets_balanced(text: &str) -> bool {
    let mut open: Option<u8> = None;
    for b in text.bytes() {
        match (open, b) {
            (None, b'[') => open = Some(b']'),
            (None, b'{') => open = Some(b'}'),
            (Some(close), _) if b == close => open = None,
            (Some(_), b'[' | b'{' | b']' | b'}') | (None, b']' | b'}') => return false,
            _ => {}
        }
    }
    open.is_none()
}

impl TryFrom<String> for Unit {
    type Error = QuantityError;
    fn try_from(raw: String) -> Result<Self, Self::Error> {
        Self::parse(&raw)
    }
}

/// A measured amount. Numeric values always carry a unit: there is no unitless quantity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
// Request bodies reach these types: a misspelt field must be an error, not silently dropped.
#[serde(deny_unknown_fields)]
pub struct Quantity {
    pub value: Decimal,
    pub unit: Unit,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        for good in ["0", "98.6", "-3.25", "1.50", "123456789012"] {
            assert_eq!(Decimal::parse(good).unwrap().expose_phi(), good);
        }
        for bad in [
            "",
            ".5",
            "5.",
            "1e3",
            "NaN",
            "inf",
            "--1",
            "1.2.3",
            "1234567890123",
        ] {
            assert!(Decimal::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Decimal::from_f64(f64::NAN), Err(QuantityError::NotFinite));
        assert_eq!(
            Decimal::from_f64(f64::INFINITY),
            Err(QuantityError::NotFinite)
        );
        assert_eq!(Decimal::from_f64(98.6).unwrap().expose_phi(), "98.6");
        assert!(Decimal::parse("0.01").unwrap().is_positive());
        assert!(!Decimal::parse("0.00").unwrap().is_positive());
        assert!(!Decimal::parse("-1").unwrap().is_positive());
        assert_eq!(
            format!("{:?}", Decimal::parse("98.6").unwrap()),
            "Decimal(<phi>)"
        );
    }

    #[test]
    fn units() {
        for good in [
            "mg",
            "mm[Hg]",
            "[degF]",
            "10*3/uL",
            "%",
            "kg/m2",
            "{beats}/min",
        ] {
            assert!(Unit::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "m g", "[degF", "mm]Hg[", "[a[b]]", &"m".repeat(33)] {
            assert!(Unit::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ucum_units_are_told_from_text_of_their_shape() {
        for ucum in [
            "mg",
            "ug",
            "mm[Hg]",
            "[degF]",
            "Cel",
            "10*3/uL",
            "%",
            "kg/m2",
            "{beats}/min",
            "/min",
            "mg/dL",
            "[iU]/L",
            "mL/min/{1.73_m2}",
        ] {
            assert!(Unit::parse(ucum).unwrap().is_ucum(), "{ucum}");
        }
        // Shaped like units, but text: identifiers, words, formulas.
        for text in [
            "123-45-6789",
            "jdoe@x.org",
            "555-867-5309",
            "[MRN_A12345]",
            "smith",
            "=HYPERLINK(1)",
            "@SUM(1+1)",
        ] {
            let unit = Unit::parse(text).unwrap();
            assert!(!unit.is_ucum(), "{text}");
        }
    }
}
