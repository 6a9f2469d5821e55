//! Counts of forgets (erasures) by patient, for the caches that hold decrypted records: a
//! read that began before a forget of its patient keeps nothing afterwards.

use chartlog_domain::PatientId;

/// How many stripes the patients are counted in.
const STRIPES: usize = 1024;

/// Forgets, counted per stripe of patients (a patient id's low bits, which are random in the
/// version 7 ids the server mints). One count for every patient let any read of an erased
/// record (which forgets it) stop every cache fill in flight, for anyone who polls one; a
/// count per patient would grow with every erased patient. A stripe is shared by about one
/// patient in 1,024, whose reads in flight at that moment are the only ones to keep nothing.
pub struct ForgetCounts {
    counts: Box<[u64]>,
}

impl Default for ForgetCounts {
    fn default() -> Self {
        Self {
            counts: vec![0; STRIPES].into_boxed_slice(),
        }
    }
}

impl ForgetCounts {
    /// The count for `patient`'s stripe: taken when a read begins, compared when it keeps.
    pub fn of(&self, patient: PatientId) -> u64 {
        self.counts[stripe(patient)]
    }

    /// Counts a forget of `patient`.
    pub fn bump(&mut self, patient: PatientId) {
        let count = &mut self.counts[stripe(patient)];
        *count = count.wrapping_add(1);
    }
}

fn stripe(patient: PatientId) -> usize {
    // The remainder is below STRIPES, so it fits.
    (patient.as_uuid().as_u128() % STRIPES as u128) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patient(n: u128) -> PatientId {
        PatientId::from_uuid(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn a_forget_counts_against_its_patients_stripe_only() {
        let mut counts = ForgetCounts::default();
        let (erased, other, same_stripe) = (patient(7), patient(8), patient(7 + STRIPES as u128));
        let before = (counts.of(erased), counts.of(other));
        counts.bump(erased);
        assert_ne!(counts.of(erased), before.0);
        assert_eq!(
            counts.of(other),
            before.1,
            "another patient's reads keep theirs"
        );
        assert_eq!(counts.of(same_stripe), counts.of(erased));
    }
}
