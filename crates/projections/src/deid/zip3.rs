//! Three-digit ZIP areas: the only part of a ZIP code Safe Harbor lets through, and the list
//! of areas too small to let even that through.
//!
//! The list is versioned data ([`RESTRICTED_ZIP3_SOURCE`]) parsed at compile time, so a
//! malformed or duplicated line fails the build rather than a de-identification run.

use std::fmt;

use chartlog_domain::phi::PostalCode;

/// The shipped list: see its header for sources, date and format.
pub const RESTRICTED_ZIP3_SOURCE: &str = include_str!("restricted_zip3.txt");
/// The list's version, as written in its header (a test keeps the two equal). Part of the
/// de-identified projection's version: a new list must rebuild every row.
pub const RESTRICTED_ZIP3_VERSION: &str = "2026-11-22.1";

/// How many prefixes the shipped list holds; checked against the parse at compile time so an
/// accidental deletion shows up in review as a change to this number.
pub const RESTRICTED_ZIP3_COUNT: usize = 38;

/// `RESTRICTED[n]` is true when the prefix `n` (0..=999) is restricted.
const RESTRICTED: [bool; 1000] = parse_restricted(RESTRICTED_ZIP3_SOURCE);

const _: () = assert!(count(&RESTRICTED) == RESTRICTED_ZIP3_COUNT);
// The 17 prefixes of the HHS 2000-Census list must all be present (the union only grows).
const _: () = {
    let hhs_2000: [usize; 17] = [
        36, 59, 63, 102, 203, 556, 692, 790, 821, 823, 830, 831, 878, 879, 884, 890, 893,
    ];
    let mut i = 0;
    while i < hhs_2000.len() {
        assert!(
            RESTRICTED[hhs_2000[i]],
            "an HHS 2000-Census prefix is missing"
        );
        i += 1;
    }
};

/// Parses the list format: comment lines start with `#`, blank lines are skipped, every other
/// line starts with three ASCII digits followed by a space or the end of the line.
const fn parse_restricted(source: &str) -> [bool; 1000] {
    let bytes = source.as_bytes();
    let mut table = [false; 1000];
    let mut at = 0;
    while at < bytes.len() {
        let line_start = at;
        while at < bytes.len() && bytes[at] != b'\n' {
            at += 1;
        }
        let line_end = at;
        at += 1; // past the newline
        if line_end == line_start || bytes[line_start] == b'#' {
            continue;
        }
        assert!(
            line_end - line_start >= 3,
            "restricted_zip3.txt: a data line is shorter than three digits"
        );
        let mut value = 0;
        let mut i = 0;
        while i < 3 {
            let digit = bytes[line_start + i];
            assert!(
                digit.is_ascii_digit(),
                "restricted_zip3.txt: a data line does not start with three digits"
            );
            value = value * 10 + (digit - b'0') as usize;
            i += 1;
        }
        assert!(
            line_end - line_start == 3 || bytes[line_start + 3] == b' ',
            "restricted_zip3.txt: three digits must be followed by a space or the end of the line"
        );
        assert!(
            !table[value],
            "restricted_zip3.txt: a prefix is listed twice"
        );
        table[value] = true;
    }
    table
}

const fn count(table: &[bool; 1000]) -> usize {
    let mut n = 0;
    let mut i = 0;
    while i < table.len() {
        if table[i] {
            n += 1;
        }
        i += 1;
    }
    n
}

/// Whether the three-digit area `prefix` (0..=999) is on the restricted list.
pub fn is_restricted(prefix: u16) -> bool {
    RESTRICTED.get(usize::from(prefix)).copied().unwrap_or(true)
}

/// The first three digits of a ZIP code as Safe Harbor allows them: the real prefix, or `000`
/// for a restricted area. Not PHI: it prints.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Zip3([u8; 3]);

impl Zip3 {
    /// What areas on the restricted list become.
    pub const SUPPRESSED: Zip3 = Zip3(*b"000");

    /// Cuts a ZIP code to its area, and the area to `000` when it is restricted.
    pub fn from_postal_code(postal_code: &PostalCode) -> Zip3 {
        // The one read of the full ZIP code in de-identification: only the first three
        // digits leave this function.
        let digits = postal_code.expose_phi().as_bytes();
        match digits {
            [a, b, c, ..] if a.is_ascii_digit() && b.is_ascii_digit() && c.is_ascii_digit() => {
                let prefix =
                    u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
                if is_restricted(prefix) {
                    Zip3::SUPPRESSED
                } else {
                    Zip3([*a, *b, *c])
                }
            }
            // PostalCode guarantees five digits; should that ever change, fail closed.
            _ => Zip3::SUPPRESSED,
        }
    }

    /// Reads a stored three-digit value back (from a de-identified table). Refuses a value on
    /// the restricted list: a stored restricted prefix would be a leak, never a valid row.
    pub fn parse(raw: &str) -> Option<Zip3> {
        let bytes: [u8; 3] = raw.as_bytes().try_into().ok()?;
        if !bytes.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let zip3 = Zip3(bytes);
        let prefix = u16::from(bytes[0] - b'0') * 100
            + u16::from(bytes[1] - b'0') * 10
            + u16::from(bytes[2] - b'0');
        (zip3 == Zip3::SUPPRESSED || !is_restricted(prefix)).then_some(zip3)
    }

    pub fn as_str(&self) -> &str {
        // Three ASCII digits by construction.
        std::str::from_utf8(&self.0).unwrap_or("000")
    }
}

impl fmt::Display for Zip3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Zip3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Zip3({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zip3(zip: &str) -> String {
        Zip3::from_postal_code(&PostalCode::parse(zip).unwrap()).to_string()
    }

    #[test]
    fn keeps_the_first_three_digits_of_populous_areas() {
        assert_eq!(zip3("02139"), "021");
        assert_eq!(zip3("02139-4307"), "021");
        assert_eq!(zip3("90210"), "902");
        assert_eq!(zip3("00601"), "006");
    }

    #[test]
    fn suppresses_every_area_of_the_hhs_2000_list() {
        for prefix in [
            "036", "059", "063", "102", "203", "556", "692", "790", "821", "823", "830", "831",
            "878", "879", "884", "890", "893",
        ] {
            assert_eq!(zip3(&format!("{prefix}01")), "000", "{prefix}");
        }
    }

    #[test]
    fn suppresses_the_newer_census_and_military_areas_too() {
        for prefix in [
            "202", "204", "205", "369", "753", "772", "090", "340", "966",
        ] {
            assert_eq!(zip3(&format!("{prefix}99-1234")), "000", "{prefix}");
        }
    }

    #[test]
    fn the_file_header_names_the_version_the_code_declares() {
        assert!(
            RESTRICTED_ZIP3_SOURCE.contains(&format!("# version: {RESTRICTED_ZIP3_VERSION}\n")),
            "bump RESTRICTED_ZIP3_VERSION with the file"
        );
        let tagged = |tag: &str| {
            RESTRICTED_ZIP3_SOURCE
                .lines()
                .filter(|line| !line.starts_with('#'))
                .filter(|line| line.split(' ').skip(1).any(|t| t == tag))
                .count()
        };
        assert_eq!(tagged("hhs-2000"), 17);
        assert_eq!(tagged("census-2010"), 18);
        assert_eq!(tagged("military"), 15);
    }

    #[test]
    fn parses_stored_values_and_refuses_restricted_ones() {
        assert_eq!(
            Zip3::parse("021").map(|z| z.to_string()),
            Some("021".into())
        );
        assert_eq!(Zip3::parse("000"), Some(Zip3::SUPPRESSED));
        assert_eq!(Zip3::parse("036"), None);
        assert_eq!(Zip3::parse("02"), None);
        assert_eq!(Zip3::parse("0a1"), None);
        assert!(is_restricted(1000), "out of range fails closed");
    }
}
