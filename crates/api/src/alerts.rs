//! Alerts on repeated refusals: a security officer hears at once that someone keeps being
//! turned away (a clinician probing records outside their care, a stolen session trying
//! routes, passwords being guessed), instead of finding it at the next audit review.
//!
//! Every refusal the API audits passes through [`RefusalWatch::observe`] once it is durable,
//! never before: rows the audit trail did not take count for nothing. Denied and failed rows
//! are counted per subject over a sliding window: the user when the request carried a
//! session, else the client's address. The request that reaches the threshold
//! raises one [`RefusalAlert`]; the subject raises no other until a window has passed, so a
//! long attack pages once per window, not once per request.
//!
//! **Invariant:** an alert carries ids, counts, times and a link to the audit trail, never an
//! address or a user name: it leaves through channels not cleared for PHI, and a patient's
//! address or name tied to this clinic would be PHI. The audit trail keeps the addresses.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use chartlog_domain::{Role, Timestamp, UserId};
use chartlog_projections::audit::{AuditOutcome, AuditRow};
use serde::Serialize;
use uuid::Uuid;

/// Subjects watched at once. Users are bounded by the accounts; addresses are not, so past
/// this the watch forgets subjects whose last refusal left the window, and if none has, it
/// stops taking new ones until some do (the rate limiter and a proxy answer a flood).
pub const WATCHED_SUBJECTS_MAX: usize = 16_384;

/// When to alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefusalAlertSettings {
    /// Refusals of one subject within `window` that raise an alert.
    pub refusals: u32,
    pub window: Duration,
}

impl Default for RefusalAlertSettings {
    /// Ten refusals in ten minutes: well above a user's honest mistakes (a few wrong
    /// passwords, a link to a record they may not open), well below a scan.
    fn default() -> Self {
        Self {
            refusals: 10,
            window: Duration::from_secs(10 * 60),
        }
    }
}

/// What the notifiers are told.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusalAlert {
    /// Always `repeated_refusals`: tells this notice from the others a webhook receives.
    pub kind: &'static str,
    pub alert_id: Uuid,
    /// The user refused, when the requests carried a session. `None`: requests without a
    /// valid session (failed logins, missing or unknown tokens) from one address, which the
    /// audit trail holds.
    pub user_id: Option<UserId>,
    pub role: Option<Role>,
    /// Refusals counted within the window, this one included.
    pub refusals: u32,
    pub window_minutes: u64,
    /// RFC 3339, UTC: the first and last refusal counted.
    pub first_at: String,
    pub last_at: String,
    /// The audit trail over those refusals, e.g.
    /// `https://chartlog.example/audit-trail?user_id=...&from=...&to=...`.
    pub audit_link: String,
}

/// Whose refusals are counted together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Subject {
    User(UserId, Role),
    Address(IpAddr),
    /// No session and no address (a listener that reports none).
    Unknown,
}

#[derive(Default)]
struct Watched {
    /// Times of the latest refusals, oldest first, at most `refusals` of them.
    refused_at: VecDeque<Timestamp>,
    /// No new alert before this time.
    quiet_until: Option<Timestamp>,
}

/// Counts refusals per subject and says when to alert.
pub struct RefusalWatch {
    settings: RefusalAlertSettings,
    watched: Mutex<HashMap<Subject, Watched>>,
}

impl RefusalWatch {
    pub fn new(settings: RefusalAlertSettings) -> Self {
        Self {
            settings,
            watched: Mutex::new(HashMap::new()),
        }
    }

    /// Counts the refusals among `rows` and returns the alerts they raise, with links under
    /// `base_url`.
    pub fn observe(&self, rows: &[AuditRow], base_url: &str) -> Vec<RefusalAlert> {
        let mut alerts = Vec::new();
        // Almost every audited request is a success: those never wait for the lock.
        if !rows.iter().any(is_refusal) {
            return alerts;
        }
        // A poisoned lock means a panic mid-update of counters: alerting is best effort, and
        // the audit trail is the record.
        let Ok(mut watched) = self.watched.lock() else {
            return alerts;
        };
        let window = micros(self.settings.window);
        let threshold = usize::try_from(self.settings.refusals).unwrap_or(usize::MAX);
        for row in rows.iter().filter(|row| is_refusal(row)) {
            let subject = match (&row.actor, row.client_address) {
                (Some(actor), _) => Subject::User(actor.user_id, actor.role),
                (None, Some(address)) => Subject::Address(address),
                (None, None) => Subject::Unknown,
            };
            let at = row.occurred_at;
            let within_window =
                |then: &Timestamp| at.unix_micros().saturating_sub(then.unix_micros()) <= window;
            if !watched.contains_key(&subject) && watched.len() >= WATCHED_SUBJECTS_MAX {
                watched.retain(|_, state| {
                    state.refused_at.back().is_some_and(within_window)
                        || state.quiet_until.is_some_and(|quiet| quiet > at)
                });
                if watched.len() >= WATCHED_SUBJECTS_MAX {
                    continue;
                }
            }
            let state = watched.entry(subject).or_default();
            state.refused_at.push_back(at);
            while state.refused_at.len() > threshold
                || state
                    .refused_at
                    .front()
                    .is_some_and(|first| !within_window(first))
            {
                state.refused_at.pop_front();
            }
            if state.refused_at.len() < threshold
                || state.quiet_until.is_some_and(|quiet| quiet > at)
            {
                continue;
            }
            state.quiet_until =
                Timestamp::from_unix_micros(at.unix_micros().saturating_add(window))
                    .ok()
                    .or(Some(at));
            let first = state.refused_at.front().copied().unwrap_or(at);
            alerts.push(self.alert(subject, first, at, state.refused_at.len(), base_url));
        }
        alerts
    }

    fn alert(
        &self,
        subject: Subject,
        first: Timestamp,
        last: Timestamp,
        refusals: usize,
        base_url: &str,
    ) -> RefusalAlert {
        let (user_id, role) = match subject {
            Subject::User(user_id, role) => (Some(user_id), Some(role)),
            Subject::Address(_) | Subject::Unknown => (None, None),
        };
        // `to` is exclusive: one microsecond past the last refusal.
        let to = Timestamp::from_unix_micros(last.unix_micros().saturating_add(1)).unwrap_or(last);
        let mut audit_link = format!("{base_url}/audit-trail?from={first}&to={to}");
        if let Some(user_id) = user_id {
            audit_link.push_str(&format!("&user_id={user_id}"));
        }
        RefusalAlert {
            kind: "repeated_refusals",
            alert_id: Uuid::now_v7(),
            user_id,
            role,
            refusals: u32::try_from(refusals).unwrap_or(u32::MAX),
            window_minutes: self.settings.window.as_secs().div_ceil(60),
            first_at: first.to_string(),
            last_at: last.to_string(),
            audit_link,
        }
    }
}

/// Whether `row` is one the watch counts.
pub(crate) fn is_refusal(row: &AuditRow) -> bool {
    matches!(row.outcome, AuditOutcome::Denied | AuditOutcome::Failure)
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use chartlog_domain::{Actor, PurposeOfUse};
    use chartlog_projections::audit::{AuditAction, AuditEntity};

    use super::*;

    const BASE: &str = "https://chartlog.example";
    const MINUTE: i64 = 60_000_000;
    const START: i64 = 1_796_000_000_000_000;

    fn at(minutes: i64, micros: i64) -> Timestamp {
        Timestamp::from_unix_micros(START + minutes * MINUTE + micros).unwrap()
    }

    fn nurse() -> UserId {
        UserId::parse("0190a6f4-0000-7000-8000-00000000000a").unwrap()
    }

    fn row(actor: Option<UserId>, outcome: AuditOutcome, when: Timestamp) -> AuditRow {
        AuditRow {
            audit_id: Uuid::now_v7(),
            occurred_at: when,
            actor: actor.map(|user_id| Actor {
                user_id,
                role: Role::Nurse,
                purpose_of_use: PurposeOfUse::Treatment,
                break_glass: false,
            }),
            patient_id: None,
            entity: Some(AuditEntity::Observation),
            record_id: None,
            action: AuditAction::Read,
            outcome,
            client_address: Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))),
            event_type: None,
        }
    }

    fn watch(refusals: u32) -> RefusalWatch {
        RefusalWatch::new(RefusalAlertSettings {
            refusals,
            window: Duration::from_secs(10 * 60),
        })
    }

    #[test]
    fn the_refusal_that_reaches_the_threshold_raises_one_alert_per_window() {
        let watch = watch(3);
        let denied = |minute| row(Some(nurse()), AuditOutcome::Denied, at(minute, 0));
        assert!(watch.observe(&[denied(0), denied(1)], BASE).is_empty());
        let alerts = watch.observe(&[denied(2)], BASE);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        let alert = &alerts[0];
        assert_eq!(alert.user_id, Some(nurse()));
        assert_eq!(alert.role, Some(Role::Nurse));
        assert_eq!(alert.refusals, 3);
        assert_eq!(alert.window_minutes, 10);
        assert_eq!(alert.first_at, at(0, 0).to_string());
        assert_eq!(alert.last_at, at(2, 0).to_string());
        assert_eq!(
            alert.audit_link,
            format!(
                "{BASE}/audit-trail?from={}&to={}&user_id={}",
                at(0, 0),
                at(2, 1),
                nurse()
            )
        );
        // The same subject goes on being refused: quiet for a window, then alerted again.
        for minute in 3..12 {
            assert!(
                watch.observe(&[denied(minute)], BASE).is_empty(),
                "{minute}"
            );
        }
        let again = watch.observe(&[denied(12)], BASE);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].first_at, at(10, 0).to_string());
    }

    #[test]
    fn refusals_spread_wider_than_the_window_raise_nothing() {
        let watch = watch(3);
        for minute in [0, 6, 12, 18, 24] {
            let denied = row(Some(nurse()), AuditOutcome::Denied, at(minute, 0));
            assert!(watch.observe(&[denied], BASE).is_empty(), "{minute}");
        }
    }

    #[test]
    fn successes_are_not_counted_and_failures_are() {
        let watch = watch(2);
        let success = row(Some(nurse()), AuditOutcome::Success, at(0, 0));
        assert!(watch.observe(&[success.clone(), success], BASE).is_empty());
        let failed = row(Some(nurse()), AuditOutcome::Failure, at(1, 0));
        let denied = row(Some(nurse()), AuditOutcome::Denied, at(1, 5));
        assert_eq!(watch.observe(&[failed, denied], BASE).len(), 1);
    }

    #[test]
    fn requests_without_a_session_are_counted_by_address_and_the_alert_names_none() {
        let watch = watch(2);
        let anonymous = |minute| row(None, AuditOutcome::Failure, at(minute, 0));
        let alerts = watch.observe(&[anonymous(0), anonymous(1)], BASE);
        assert_eq!(alerts.len(), 1);
        assert_eq!(alerts[0].user_id, None);
        assert_eq!(alerts[0].role, None);
        assert!(!alerts[0].audit_link.contains("user_id"));
        let json = serde_json::to_string(&alerts[0]).unwrap();
        assert!(!json.contains("192.0.2.7"), "{json}");

        // Another address is another subject.
        let mut elsewhere = anonymous(2);
        elsewhere.client_address = Some(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)));
        assert!(watch.observe(&[elsewhere], BASE).is_empty());
    }

    #[test]
    fn a_full_watch_forgets_quiet_subjects_before_refusing_new_ones() {
        let watch = watch(2);
        let address_row = |index: usize, when| {
            let mut row = row(None, AuditOutcome::Failure, when);
            let index = u32::try_from(index).unwrap();
            row.client_address = Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + index)));
            row
        };
        let rows: Vec<AuditRow> = (0..WATCHED_SUBJECTS_MAX)
            .map(|index| address_row(index, at(0, 0)))
            .collect();
        assert!(watch.observe(&rows, BASE).is_empty());
        // Full, and every subject still in its window: a new one is not taken.
        let newcomer = |when| row(Some(nurse()), AuditOutcome::Denied, when);
        assert!(
            watch
                .observe(&[newcomer(at(1, 0)), newcomer(at(1, 1))], BASE)
                .is_empty()
        );
        // Once the others' window has passed, they make room.
        assert_eq!(
            watch
                .observe(&[newcomer(at(20, 0)), newcomer(at(20, 1))], BASE)
                .len(),
            1
        );
    }
}
