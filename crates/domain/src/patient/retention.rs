//! The retention period: how long a record must be kept before it may be erased because that
//! period elapsed.
//!
//! Medical-record retention is set by state law, not by HIPAA, and differs between states
//! and between adults and minors; a common shape is "N years after the last entry, and for a
//! minor at least N years after reaching the age of majority". [`RetentionPolicy`] is that
//! shape with both numbers configurable. It gates only erasures whose reason is
//! [`ErasureReason::RetentionPeriodElapsed`]: the other reasons (a duplicate registration, a
//! court order, ...) say why the record may go regardless of its age.
//!
//! Every date here errs late: a leap day moves to 1 March, and a birthday counts from the
//! end of that day in UTC, so no time zone makes a record erasable early.

use time::{Date, Month, OffsetDateTime, Time};

use crate::patient::commands::ErasureReason;
use crate::patient::rejection::{Rejection, RetentionBasis};
use crate::patient::state::Patient;
use crate::time::Timestamp;

/// How long records are kept. See the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionPolicy {
    years: u16,
    age_of_majority: u8,
}

impl RetentionPolicy {
    /// Ten years after the last entry, and for minors ten years after they turn eighteen:
    /// at or beyond what most US states require of hospitals. A deployment sets its own.
    pub const DEFAULT: Self = Self {
        years: 10,
        age_of_majority: 18,
    };

    /// `years` may be 0: then the requester's statement that the period elapsed is taken as
    /// it is, and only legal holds keep a record.
    pub const fn new(years: u16, age_of_majority: u8) -> Self {
        Self {
            years,
            age_of_majority,
        }
    }

    pub const fn years(self) -> u16 {
        self.years
    }

    pub const fn age_of_majority(self) -> u8 {
        self.age_of_majority
    }

    /// When the record may first be erased for its retention period, and which rule sets
    /// that time. `last_entry_at` is when the last event on the record was stored.
    pub fn kept_until(
        self,
        last_entry_at: Timestamp,
        birth_date: Option<Date>,
    ) -> (Timestamp, RetentionBasis) {
        let years = i32::from(self.years);
        let after_last_entry = add_years(last_entry_at.to_datetime(), years);
        // No period at all, for minors too: the requester's statement stands.
        let birth_date = birth_date.filter(|_| self.years > 0);
        let after_majority = birth_date.map(|born| {
            let majority = add_years_to_date(born, i32::from(self.age_of_majority) + years);
            // The end of that day in UTC: the patient's own time zone is not recorded.
            majority
                .next_day()
                .unwrap_or(Date::MAX)
                .with_time(Time::MIDNIGHT)
                .assume_utc()
        });
        match after_majority {
            Some(majority) if majority > after_last_entry => (
                clamp(majority),
                RetentionBasis::AgeOfMajority {
                    age: self.age_of_majority,
                    years: self.years,
                },
            ),
            _ => {
                let kept_until = clamp(after_last_entry);
                (
                    kept_until,
                    RetentionBasis::LastEntry {
                        years: self.years,
                        kept_until,
                    },
                )
            }
        }
    }

    /// Refuses an erasure for `reason` at `now` while the record is still within its
    /// retention period; any other reason passes.
    pub fn check_erasure(
        self,
        patient: &Patient,
        reason: ErasureReason,
        last_entry_at: Timestamp,
        now: Timestamp,
    ) -> Result<(), Rejection> {
        if reason != ErasureReason::RetentionPeriodElapsed {
            return Ok(());
        }
        let Some(patient_id) = patient.patient_id() else {
            return Ok(());
        };
        let birth_date = patient
            .demographics()
            .map(|demographics| demographics.birth_date.expose_phi());
        let (kept_until, basis) = self.kept_until(last_entry_at, birth_date);
        if now < kept_until {
            return Err(Rejection::RetentionPeriodNotElapsed { patient_id, basis });
        }
        Ok(())
    }
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

fn add_years(at: OffsetDateTime, years: i32) -> OffsetDateTime {
    at.replace_date(add_years_to_date(at.date(), years))
}

/// `date` moved `years` on; 29 February lands on 1 March of a common year (later, never
/// earlier), and a year past what `time` represents saturates.
fn add_years_to_date(date: Date, years: i32) -> Date {
    let year = date.year().saturating_add(years);
    if year > Date::MAX.year() {
        return Date::MAX;
    }
    date.replace_year(year)
        .unwrap_or_else(|_| Date::from_calendar_date(year, Month::March, 1).unwrap_or(Date::MAX))
}

/// Into the range a [`Timestamp`] holds (years past 9999 are "not in our lifetime").
fn clamp(at: OffsetDateTime) -> Timestamp {
    Timestamp::from_datetime(at).unwrap_or_else(|_| {
        let max = Timestamp::MAX_UNIX_MICROS;
        Timestamp::from_unix_micros(max).expect("the largest timestamp is in range")
    })
}

#[cfg(test)]
mod tests {
    use time::Duration;
    use time::macros::{date, datetime};

    use super::*;

    fn at(datetime: OffsetDateTime) -> Timestamp {
        Timestamp::from_datetime(datetime).expect("in range")
    }

    #[test]
    fn an_adults_record_is_kept_the_set_years_after_its_last_entry() {
        let policy = RetentionPolicy::new(10, 18);
        let (kept_until, basis) = policy.kept_until(
            at(datetime!(2020-06-15 09:30 UTC)),
            Some(date!(1970 - 01 - 01)),
        );
        assert_eq!(kept_until, at(datetime!(2030-06-15 09:30 UTC)));
        assert_eq!(
            basis,
            RetentionBasis::LastEntry {
                years: 10,
                kept_until
            }
        );
    }

    #[test]
    fn a_minors_record_is_kept_the_set_years_after_they_come_of_age() {
        let policy = RetentionPolicy::new(10, 18);
        let (kept_until, basis) = policy.kept_until(
            at(datetime!(2020-06-15 09:30 UTC)),
            Some(date!(2015 - 03 - 04)),
        );
        // 18 + 10 years after 2015-03-04, from the end of that day.
        assert_eq!(kept_until, at(datetime!(2043-03-05 00:00 UTC)));
        assert_eq!(basis, RetentionBasis::AgeOfMajority { age: 18, years: 10 });
    }

    #[test]
    fn a_leap_day_moves_later_never_earlier() {
        let policy = RetentionPolicy::new(1, 18);
        let (kept_until, _) = policy.kept_until(at(datetime!(2024-02-29 12:00 UTC)), None);
        assert_eq!(kept_until, at(datetime!(2025-03-01 12:00 UTC)));
        let (kept_until, _) = policy.kept_until(
            at(datetime!(2000-01-01 00:00 UTC)),
            Some(date!(2004 - 02 - 29)),
        );
        // 29 February 2004 + 19 years is 1 March 2023; the record is kept through that day.
        assert_eq!(kept_until, at(datetime!(2023-03-02 00:00 UTC)));
        assert_eq!(
            kept_until.to_datetime() - datetime!(2023-03-01 00:00 UTC),
            Duration::DAY
        );
    }

    #[test]
    fn no_years_means_the_period_has_elapsed_at_the_last_entry() {
        let policy = RetentionPolicy::new(0, 18);
        let last = at(datetime!(2020-06-15 09:30 UTC));
        assert_eq!(policy.kept_until(last, None).0, last);
        assert_eq!(
            policy.kept_until(last, Some(date!(2019 - 01 - 01))).0,
            last,
            "for a minor too"
        );
    }

    #[test]
    fn years_beyond_the_calendar_saturate() {
        let policy = RetentionPolicy::new(u16::MAX, u8::MAX);
        let (kept_until, _) = policy.kept_until(
            at(datetime!(9990-01-01 00:00 UTC)),
            Some(date!(9990 - 01 - 01)),
        );
        assert!(kept_until >= at(datetime!(9999-12-31 00:00 UTC)));
    }
}
