//! The address a request comes from: what the audit trail records, what login throttling
//! and the rate limit count per address, and what refusal alerts name.
//!
//! It is the connection's peer, unless the peer is one of the operator's trusted proxies
//! (`serve --trusted-proxy <CIDR>`). Then the client is read from `X-Forwarded-For`, right to
//! left: each trusted proxy appends the address it received the request from, so the first
//! address from the right that is not a trusted proxy is the client as the outermost trusted
//! proxy saw it. Anything left of it was written by the client and proves nothing, so a
//! client cannot pick the address it is throttled, limited and audited under. Without
//! trusted proxies (the default) the header is ignored: behind a proxy every client would
//! share the proxy's address, and one client's failed logins would throttle them all.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header::HeaderMap;
use ipnet::IpNet;

/// The header proxies append the client's address to.
const FORWARDED_FOR: &str = "x-forwarded-for";

/// Addresses of the proxies whose `X-Forwarded-For` is believed; empty by default.
#[derive(Debug, Clone, Default)]
pub struct TrustedProxies {
    networks: Arc<[IpNet]>,
}

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self {
            networks: networks.into(),
        }
    }

    fn trusts(&self, address: IpAddr) -> bool {
        self.networks
            .iter()
            .any(|network| network.contains(&address))
    }

    /// The client `request` comes from.
    pub fn client_of(&self, request: &HttpRequest) -> Option<IpAddr> {
        self.client(request.peer_addr(), request.headers())
    }

    /// The client of a request from `peer` with these headers; `None` only when the
    /// connection has no peer address (never on a TCP listener).
    pub fn client(&self, peer: Option<SocketAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        let mut hop = peer?.ip().to_canonical();
        if !self.trusts(hop) {
            return Some(hop);
        }
        // Header lines in order, each a comma-separated list: together one list, oldest hop
        // first. Read from the newest hop back.
        let mut hops: Vec<&str> = Vec::new();
        for value in headers.get_all(FORWARDED_FOR) {
            let Ok(text) = value.to_str() else {
                return Some(hop);
            };
            hops.extend(text.split(',').map(str::trim));
        }
        for raw in hops.into_iter().rev() {
            // What a trusted proxy wrote is readable; if it is not, the request came from
            // that proxy as far as anyone can tell.
            let Some(address) = forwarded_address(raw) else {
                return Some(hop);
            };
            hop = address;
            if !self.trusts(hop) {
                return Some(hop);
            }
        }
        Some(hop)
    }
}

/// One element of `X-Forwarded-For`: an address, or an address with a port as some proxies
/// write it (`192.0.2.7:4711`, `[2001:db8::7]:4711`).
fn forwarded_address(raw: &str) -> Option<IpAddr> {
    raw.parse::<IpAddr>()
        .or_else(|_| raw.parse::<SocketAddr>().map(|socket| socket.ip()))
        .ok()
        .map(|address| address.to_canonical())
}

#[cfg(test)]
mod tests {
    use actix_web::http::header::{HeaderName, HeaderValue};

    use super::*;

    fn proxies(networks: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            networks
                .iter()
                .map(|network| network.parse().expect("a network"))
                .collect(),
        )
    }

    fn client(trusted: &TrustedProxies, peer: &str, forwarded: &[&str]) -> Option<IpAddr> {
        let mut headers = HeaderMap::new();
        for line in forwarded {
            headers.append(
                HeaderName::from_static(FORWARDED_FOR),
                HeaderValue::from_str(line).expect("a header value"),
            );
        }
        trusted.client(Some(peer.parse().expect("a peer")), &headers)
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().expect("an address"))
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::default();
        assert_eq!(
            client(&none, "198.51.100.4:443", &["203.0.113.9"]),
            ip("198.51.100.4")
        );
        assert_eq!(none.client(None, &HeaderMap::new()), None);
    }

    #[test]
    fn a_peer_that_is_not_a_trusted_proxy_is_the_client_whatever_it_claims() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            client(&trusted, "198.51.100.4:443", &["10.0.0.1, 203.0.113.9"]),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn the_client_is_the_first_untrusted_hop_from_the_right() {
        let trusted = proxies(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        // One proxy: the address it appended.
        assert_eq!(
            client(&trusted, "10.1.2.3:50000", &["203.0.113.9"]),
            ip("203.0.113.9")
        );
        // A client that forged a first entry: the proxy's entry wins.
        assert_eq!(
            client(&trusted, "10.1.2.3:50000", &["192.0.2.66, 203.0.113.9"]),
            ip("203.0.113.9")
        );
        // Two trusted proxies in a row, over two header lines; IPv6 and ports.
        assert_eq!(
            client(
                &trusted,
                "[2001:db8:ffff::1]:443",
                &["192.0.2.66, [2001:db8::7]:4711", "10.9.9.9"]
            ),
            ip("2001:db8::7")
        );
        assert_eq!(
            client(&trusted, "10.1.2.3:50000", &["203.0.113.9:61000"]),
            ip("203.0.113.9")
        );
        // Every hop trusted: the oldest one.
        assert_eq!(
            client(&trusted, "10.1.2.3:50000", &["10.7.7.7, 10.8.8.8"]),
            ip("10.7.7.7")
        );
    }

    #[test]
    fn an_unreadable_or_missing_entry_leaves_the_proxy_that_wrote_it() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(client(&trusted, "10.1.2.3:50000", &[]), ip("10.1.2.3"));
        assert_eq!(
            client(&trusted, "10.1.2.3:50000", &["203.0.113.9, unknown"]),
            ip("10.1.2.3")
        );
        assert_eq!(
            client(&trusted, "10.1.2.3:50000", &["203.0.113.9, 10.4.4.4, "]),
            ip("10.1.2.3")
        );
        assert_eq!(
            client(
                &trusted,
                "10.1.2.3:50000",
                &["203.0.113.9, garbage, 10.4.4.4"]
            ),
            ip("10.4.4.4")
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_read_as_ipv4() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            client(&trusted, "[::ffff:10.1.2.3]:50000", &["::ffff:203.0.113.9"]),
            ip("203.0.113.9")
        );
    }
}
