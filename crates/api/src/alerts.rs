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
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Mutex;
use std::time::Duration;

use chartlog_domain::{Role, Timestamp, UserId};
use chartlog_projections::audit::{AuditOutcome, AuditRow};
use serde::Serialize;
use uuid::Uuid;

/// Addresses watched at once. Users are watched apart and never forgotten for want of room:
/// there are only as many as there are accounts. Addresses are the client's to choose, so past
/// this many the watch forgets the address refused least recently to make room for a new one:
/// a flood of addresses costs the flood's own oldest members their counts, never a user's
/// (the rate limiter and a proxy answer the flood itself).
pub const WATCHED_ADDRESSES_MAX: usize = 16_384;

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
    Address(Network),
    /// No session and no address (a listener that reports none).
    Unknown,
}

/// Where requests without a session come from, as far as counting goes: an IPv4 address, or
/// the /64 of an IPv6 address. A /64 is what one site or subscriber is handed, and any address
/// in it is theirs to send from: counted one by one, a client rotating through them would
/// never reach the threshold, and would fill the watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Network {
    V4(Ipv4Addr),
    V6([u8; 8]),
}

impl Network {
    fn of(address: IpAddr) -> Self {
        // An IPv4 client reaching a dual-stack listener shows as ::ffff:a.b.c.d.
        match address.to_canonical() {
            IpAddr::V4(address) => Network::V4(address),
            IpAddr::V6(address) => {
                let [a, b, c, d, e, f, g, h, ..] = address.octets();
                Network::V6([a, b, c, d, e, f, g, h])
            }
        }
    }
}

#[derive(Default)]
struct Watched {
    /// Times of the latest refusals, oldest first, at most `refusals` of them.
    refused_at: VecDeque<Timestamp>,
    /// No new alert before this time.
    quiet_until: Option<Timestamp>,
}

impl Watched {
    /// Counts a refusal at `at`; returns the first and the count of the refusals in the
    /// window when this one should raise an alert.
    fn refused(
        &mut self,
        at: Timestamp,
        threshold: usize,
        window: i64,
    ) -> Option<(Timestamp, usize)> {
        let within_window =
            |then: &Timestamp| at.unix_micros().saturating_sub(then.unix_micros()) <= window;
        self.refused_at.push_back(at);
        while self.refused_at.len() > threshold
            || self
                .refused_at
                .front()
                .is_some_and(|first| !within_window(first))
        {
            self.refused_at.pop_front();
        }
        if self.refused_at.len() < threshold || self.quiet_until.is_some_and(|quiet| quiet > at) {
            return None;
        }
        self.quiet_until = Timestamp::from_unix_micros(at.unix_micros().saturating_add(window))
            .ok()
            .or(Some(at));
        Some((
            self.refused_at.front().copied().unwrap_or(at),
            self.refused_at.len(),
        ))
    }
}

/// The watched addresses, and the order they were last refused in.
#[derive(Default)]
struct Addresses {
    /// Each address's counts, and the stamp of its latest refusal.
    watched: HashMap<Network, (Watched, u64)>,
    /// `(address, stamp)` for each refusal, oldest first. An entry whose stamp is no longer
    /// its address's is stale and skipped: finding the least recent address costs a pop, not
    /// a scan of the table under the lock every request takes.
    recency: VecDeque<(Network, u64)>,
    stamp: u64,
}

impl Addresses {
    /// `network`'s counts, making room for it when it is new and the table full.
    fn refused(&mut self, network: Network) -> &mut Watched {
        if !self.watched.contains_key(&network) {
            while self.watched.len() >= WATCHED_ADDRESSES_MAX {
                // Every watched address has its live entry in the queue: an empty queue here
                // would be a bug, and is no reason to spin.
                let Some((oldest, stamp)) = self.recency.pop_front() else {
                    break;
                };
                if self
                    .watched
                    .get(&oldest)
                    .is_some_and(|(_, latest)| *latest == stamp)
                {
                    self.watched.remove(&oldest);
                }
            }
        }
        self.stamp = self.stamp.wrapping_add(1);
        let stamp = self.stamp;
        self.watched.entry(network).or_default().1 = stamp;
        self.recency.push_back((network, stamp));
        // Stale entries pile up while addresses are refused again and again; dropping them
        // once they outnumber the live ones keeps the queue bounded at a cost amortized over
        // the refusals that made them.
        if self.recency.len() > 2 * WATCHED_ADDRESSES_MAX {
            let watched = &self.watched;
            self.recency.retain(|(network, stamp)| {
                watched
                    .get(network)
                    .is_some_and(|(_, latest)| latest == stamp)
            });
        }
        &mut self.watched.entry(network).or_default().0
    }
}

/// What the watch keeps.
#[derive(Default)]
struct Tables {
    /// Users, and requests with neither a session nor an address: never forgotten for room.
    others: HashMap<Subject, Watched>,
    addresses: Addresses,
}

/// Counts refusals per subject and says when to alert.
pub struct RefusalWatch {
    settings: RefusalAlertSettings,
    tables: Mutex<Tables>,
}

impl RefusalWatch {
    pub fn new(settings: RefusalAlertSettings) -> Self {
        Self {
            settings,
            tables: Mutex::new(Tables::default()),
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
        let Ok(mut tables) = self.tables.lock() else {
            return alerts;
        };
        let window = micros(self.settings.window);
        let threshold = usize::try_from(self.settings.refusals).unwrap_or(usize::MAX);
        for row in rows.iter().filter(|row| is_refusal(row)) {
            let subject = match (&row.actor, row.client_address) {
                (Some(actor), _) => Subject::User(actor.user_id, actor.role),
                (None, Some(address)) => Subject::Address(Network::of(address)),
                (None, None) => Subject::Unknown,
            };
            let watched = match subject {
                Subject::Address(network) => tables.addresses.refused(network),
                Subject::User(..) | Subject::Unknown => tables.others.entry(subject).or_default(),
            };
            if let Some((first, refusals)) = watched.refused(row.occurred_at, threshold, window) {
                alerts.push(self.alert(subject, first, row.occurred_at, refusals, base_url));
            }
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
    use std::net::{Ipv4Addr, Ipv6Addr};

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

    fn from(mut row: AuditRow, address: IpAddr) -> AuditRow {
        row.client_address = Some(address);
        row
    }

    fn flood_address(index: usize) -> IpAddr {
        let index = u64::try_from(index).unwrap();
        // A /64 of its own each: 2001:db8:<index>::1.
        IpAddr::V6(Ipv6Addr::from_bits(
            (0x2001_0db8_u128 << 96) | (u128::from(index) << 64) | 1,
        ))
    }

    /// Bug this catches: once the watch held 16,384 subjects in their window, every new
    /// subject was dropped, a signed-in user too, so a flood of failed logins from rotating
    /// addresses hid a clinician probing records.
    #[test]
    fn a_flood_of_addresses_does_not_stop_a_user_from_raising_an_alert() {
        let watch = watch(3);
        let flood: Vec<AuditRow> = (0..WATCHED_ADDRESSES_MAX + 1_000)
            .map(|index| {
                from(
                    row(None, AuditOutcome::Failure, at(0, 0)),
                    flood_address(index),
                )
            })
            .collect();
        assert!(watch.observe(&flood, BASE).is_empty());
        let probing = |micros| row(Some(nurse()), AuditOutcome::Denied, at(1, micros));
        let alerts = watch.observe(&[probing(0), probing(1), probing(2)], BASE);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].user_id, Some(nurse()));
        // A new address is still watched too, the flood's oldest making room for it.
        let newcomer = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 9));
        let guessing = |micros| from(row(None, AuditOutcome::Failure, at(2, micros)), newcomer);
        assert_eq!(
            watch
                .observe(&[guessing(0), guessing(1), guessing(2)], BASE)
                .len(),
            1
        );
    }

    /// Bug this catches: each IPv6 address was a subject of its own, so a client rotating
    /// through its /64 never reached the threshold.
    #[test]
    fn ipv6_addresses_in_one_64_count_as_one_subject() {
        let watch = watch(3);
        let failed = |minute, address: &str| {
            from(
                row(None, AuditOutcome::Failure, at(minute, 0)),
                address.parse().unwrap(),
            )
        };
        assert!(
            watch
                .observe(
                    &[
                        failed(0, "2001:db8:7:1::1"),
                        failed(1, "2001:db8:7:1:ffff:ffff:ffff:ffff"),
                        // The next /64: another subject.
                        failed(1, "2001:db8:7:2::1"),
                    ],
                    BASE
                )
                .is_empty()
        );
        let alerts = watch.observe(&[failed(2, "2001:db8:7:1:abcd::42")], BASE);
        assert_eq!(alerts.len(), 1, "{alerts:?}");
        assert_eq!(alerts[0].refusals, 3);
        assert!(!alerts[0].audit_link.contains("2001"), "{alerts:?}");

        // An IPv4 client seen through a dual-stack listener is its IPv4 address.
        assert!(
            watch
                .observe(
                    &[failed(3, "192.0.2.50"), failed(3, "::ffff:192.0.2.50")],
                    BASE
                )
                .is_empty()
        );
        assert_eq!(watch.observe(&[failed(4, "192.0.2.50")], BASE).len(), 1);
    }

    #[test]
    fn a_full_address_table_forgets_the_address_refused_least_recently() {
        let watch = watch(3);
        let failed = |index, micros| {
            from(
                row(None, AuditOutcome::Failure, at(0, micros)),
                flood_address(index),
            )
        };
        let rows: Vec<AuditRow> = (0..WATCHED_ADDRESSES_MAX)
            .map(|index| failed(index, 0))
            .collect();
        assert!(watch.observe(&rows, BASE).is_empty());
        // The first address is refused again; the second is now the least recent.
        assert!(watch.observe(&[failed(0, 1)], BASE).is_empty());
        assert!(
            watch
                .observe(&[failed(WATCHED_ADDRESSES_MAX, 2)], BASE)
                .is_empty()
        );
        // The first kept its count: its third refusal alerts.
        assert_eq!(watch.observe(&[failed(0, 3)], BASE).len(), 1);
        // The second was forgotten: two more refusals are two, not three.
        assert!(
            watch
                .observe(&[failed(1, 4), failed(1, 5)], BASE)
                .is_empty()
        );
    }

    #[test]
    fn addresses_refused_again_and_again_keep_the_recency_queue_bounded() {
        let watch = watch(3);
        let failed = |index, micros| {
            from(
                row(None, AuditOutcome::Failure, at(0, micros)),
                flood_address(index),
            )
        };
        let rows: Vec<AuditRow> = (0..WATCHED_ADDRESSES_MAX)
            .map(|index| failed(index, 0))
            .collect();
        watch.observe(&rows, BASE);
        let again: Vec<AuditRow> = (0..3 * WATCHED_ADDRESSES_MAX)
            .map(|micros| failed(0, i64::try_from(micros).unwrap()))
            .collect();
        watch.observe(&again, BASE);
        let queued = watch.tables.lock().unwrap().addresses.recency.len();
        assert!(queued <= 2 * WATCHED_ADDRESSES_MAX, "{queued}");
        // The queue still knows the order: the second address is the least recent, and the
        // first, refused throughout, is kept.
        watch.observe(&[failed(WATCHED_ADDRESSES_MAX, 0)], BASE);
        let tables = watch.tables.lock().unwrap();
        let watched = |index| {
            tables
                .addresses
                .watched
                .contains_key(&Network::of(flood_address(index)))
        };
        assert!(watched(0));
        assert!(!watched(1));
        assert!(watched(2));
        assert!(watched(WATCHED_ADDRESSES_MAX));
    }
}
