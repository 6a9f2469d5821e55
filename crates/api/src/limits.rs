//! Per-client rate limiting: one client flooding the server must not starve the others.
//!
//! A client is its session when the request carries a session token (bearer or cookie) to a
//! route that needs a session, so many users behind one address (a clinic's NAT, a proxy)
//! each get their own allowance; otherwise it is the peer address. The token is keyed by its
//! SHA-256, so the limiter's table holds nothing that could be replayed as a session.
//!
//! Tokens are client-chosen, so a bucket per presented token would let an anonymous client
//! escape its address's limit by inventing a token per request. Two things close that. On a
//! route that needs a session, the guard charges a token that does not authenticate to the
//! address as well ([`ClientRateLimiter::check_address`]), before the refusal is audited, so a
//! token spray costs the sprayer its address's allowance and cannot flood the audit trail. On
//! any other request (a public route such as `/auth/login`, or no route at all) nothing
//! checks the token, so it is not looked at here either: the address is the client.
//!
//! The algorithm is GCRA from the `governor` crate (a token bucket without a timer task).
//! `actix-governor` would do the wiring, but it is GPL-3.0-or-later; the wiring here is a
//! few lines.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::Method;
use actix_web::middleware::Next;
use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};

use crate::ApiError;
use crate::routes::{Permission, Verb, route_for};

/// Paths never limited: orchestrators probe them often, from one address, and a probe that
/// gets 429 would take a healthy server out of rotation.
const EXEMPT_PATHS: [&str; 2] = ["/healthz", "/readyz"];

/// How many checks pass between sweeps of idle entries out of the table.
const SWEEP_EVERY_CHECKS: u64 = 8192;

/// How one client may send requests: `per_second` sustained, with bursts up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests per second a client may send indefinitely.
    pub per_second: NonZeroU32,
    /// Requests a client may send at once after being idle.
    pub burst: NonZeroU32,
}

impl RateLimit {
    /// The shipped default sustained rate. Far above what a person at a screen sends; an
    /// integration pushing a whole clinic's traffic through one session is expected, and the
    /// HTTP load benchmark drives about 1,500 requests/s through one session on two cores.
    pub const DEFAULT_PER_SECOND: u32 = 2_000;
    /// The shipped default burst: two seconds at the default rate.
    pub const DEFAULT_BURST: u32 = 4_000;
}

impl Default for RateLimit {
    fn default() -> RateLimit {
        RateLimit {
            per_second: NonZeroU32::new(RateLimit::DEFAULT_PER_SECOND).unwrap_or(NonZeroU32::MIN),
            burst: NonZeroU32::new(RateLimit::DEFAULT_BURST).unwrap_or(NonZeroU32::MIN),
        }
    }
}

/// Whom a request is counted against.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    /// The SHA-256 of the session token the request carries.
    Session([u8; 32]),
    /// The peer's IPv4 address, or the /64 of its IPv6 address (one host usually holds a
    /// whole /64, so per-address keys would let it rotate freely).
    Address(IpAddr),
    /// No peer address is known (in-process tests); all such requests share one bucket.
    Unknown,
}

impl ClientKey {
    pub(crate) fn session(token: &str) -> ClientKey {
        ClientKey::Session(Sha256::digest(token.as_bytes()).into())
    }

    pub(crate) fn address(address: Option<IpAddr>) -> ClientKey {
        match address {
            // A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
            Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientKey::Address(IpAddr::V4(v4)),
                None => {
                    let mut octets = v6.octets();
                    octets[8..].fill(0);
                    ClientKey::Address(IpAddr::from(octets))
                }
            },
            Some(v4) => ClientKey::Address(v4),
            None => ClientKey::Unknown,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ClientKey::Session(_) => "session",
            ClientKey::Address(_) | ClientKey::Unknown => "address",
        }
    }
}

/// The limiter shared by every worker of one server.
pub struct ClientRateLimiter {
    limit: RateLimit,
    limiter: DefaultKeyedRateLimiter<ClientKey>,
    checks: AtomicU64,
    refused: AtomicU64,
    /// Refusals already reported in a log line, and the second of that line: one warning per
    /// second at most, so a flood cannot flood the log as well.
    refused_logged: AtomicU64,
    warned_at_second: AtomicU64,
}

impl ClientRateLimiter {
    /// A limiter allowing every client `limit`.
    pub fn new(limit: RateLimit) -> ClientRateLimiter {
        let quota = Quota::per_second(limit.per_second).allow_burst(limit.burst);
        ClientRateLimiter {
            limit,
            limiter: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            refused_logged: AtomicU64::new(0),
            warned_at_second: AtomicU64::new(0),
        }
    }

    /// The limit every client gets.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// How many requests were refused since start.
    pub fn refused_total(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Counts one request against `key`; refuses it when the key's allowance is spent.
    pub(crate) fn check(&self, key: &ClientKey) -> Result<(), ApiError> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SWEEP_EVERY_CHECKS)
        {
            // Entries whose bucket has refilled say nothing a fresh entry would not; dropping
            // them bounds the table by the clients of the last `burst / per_second` seconds.
            self.limiter.retain_recent();
            self.limiter.shrink_to_fit();
        }
        match self.limiter.check_key(key) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.limiter.clock().now());
                self.note_refusal(key);
                Err(ApiError::RateLimited {
                    retry_after_seconds: whole_seconds_up(wait),
                })
            }
        }
    }

    /// Counts a request whose session token did not authenticate against its address too.
    pub(crate) fn check_address(&self, address: Option<IpAddr>) -> Result<(), ApiError> {
        self.check(&ClientKey::address(address))
    }

    fn note_refusal(&self, key: &ClientKey) {
        let total = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let last = self.warned_at_second.load(Ordering::Relaxed);
        if last != second
            && self
                .warned_at_second
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let before = self.refused_logged.swap(total, Ordering::Relaxed);
            // No key, address or path: the count is what an operator needs to notice a
            // flood; which session it was is in the access log's timing if ever needed.
            tracing::warn!(
                client_kind = key.kind(),
                refused_since_last_warning = total.saturating_sub(before),
                refused_total = total,
                per_second = self.limit.per_second.get(),
                burst = self.limit.burst.get(),
                "requests over a client's rate limit refused with 429"
            );
        }
    }
}

/// Whether the request is for a route behind the guard's session check: only there is a
/// token that does not authenticate charged to its address. Routing has not run yet, so the
/// route is found from the app's resource map, as routing will find it.
fn needs_session(request: &ServiceRequest) -> bool {
    let verb = match *request.method() {
        Method::GET => Verb::Get,
        Method::POST => Verb::Post,
        _ => return false,
    };
    request
        .match_pattern()
        .and_then(|pattern| route_for(verb, &pattern))
        .is_some_and(|route| route.permission != Permission::Public)
}

/// At least one second: `Retry-After: 0` would invite an immediate retry into the same wall.
fn whole_seconds_up(wait: Duration) -> u64 {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    seconds.max(1)
}

/// The middleware: refuses a request over its client's limit with 429 before any routing,
/// authentication or body reading happens.
pub(crate) async fn limit_rate(
    limiter: std::sync::Arc<ClientRateLimiter>,
    trusted_proxies: crate::client_address::TrustedProxies,
    request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if EXEMPT_PATHS.contains(&request.path()) {
        return Ok(next.call(request).await?.map_into_boxed_body());
    }
    let key = match crate::guard::session_token(&request) {
        Some(token) if needs_session(&request) => ClientKey::session(&token),
        _ => ClientKey::address(trusted_proxies.client_of(request.request())),
    };
    match limiter.check(&key) {
        Ok(()) => Ok(next.call(request).await?.map_into_boxed_body()),
        Err(error) => Ok(request.error_response(error)),
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    fn limiter(per_second: u32, burst: u32) -> ClientRateLimiter {
        ClientRateLimiter::new(RateLimit {
            per_second: NonZeroU32::new(per_second).expect("non-zero"),
            burst: NonZeroU32::new(burst).expect("non-zero"),
        })
    }

    #[test]
    fn a_client_over_its_burst_is_refused_and_others_are_not() {
        let limiter = limiter(1, 3);
        let flooding = ClientKey::session("token-a");
        for _ in 0..3 {
            assert!(limiter.check(&flooding).is_ok());
        }
        let Err(ApiError::RateLimited {
            retry_after_seconds,
        }) = limiter.check(&flooding)
        else {
            panic!("the fourth request within a second must be refused");
        };
        assert_eq!(retry_after_seconds, 1);
        assert!(limiter.check(&ClientKey::session("token-b")).is_ok());
        assert!(
            limiter
                .check(&ClientKey::address(Some([127, 0, 0, 1].into())))
                .is_ok()
        );
        assert_eq!(limiter.refused_total(), 1);
    }

    #[test]
    fn ipv6_addresses_share_their_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("address");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("address");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("address");
        assert_eq!(ClientKey::address(Some(a)), ClientKey::address(Some(b)));
        assert_ne!(ClientKey::address(Some(a)), ClientKey::address(Some(c)));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("address");
        assert_eq!(
            ClientKey::address(Some(mapped)),
            ClientKey::Address([10, 0, 0, 1].into())
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds_up(Duration::ZERO), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_up(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds_up(Duration::from_secs(3)), 3);
    }
}
