//! Who the client is, when proxies stand in front of the gateway.
//!
//! `X-Forwarded-For` is believed only from configured trusted proxies, and read
//! right to left: each trusted hop vouches for the address before it, so the client
//! is the first address (from the right) that is not a trusted proxy. Anything a
//! client writes further left is its own claim and never becomes its identity.

use std::net::IpAddr;

use chassis::http::ip_text;
use http::HeaderMap;
use ipnet::IpNet;

/// Configured trusted proxies (addresses or CIDR ranges).
#[derive(Clone, Debug, Default)]
pub struct TrustedProxies {
    nets: Vec<IpNet>,
}

/// What the gateway concludes about a request's origin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forwarded {
    pub client: IpAddr,
    /// Whether the direct peer is a trusted proxy (its `X-Forwarded-*` kept).
    pub trusted_peer: bool,
    /// The `X-Forwarded-For` to send on: the trusted chain plus the peer.
    pub chain: String,
}

impl TrustedProxies {
    /// Parses `10.0.0.0/8`, `192.168.1.7`, `::1`...; every bad entry is named.
    pub fn parse(entries: &[String]) -> Result<Self, Vec<String>> {
        let mut nets = Vec::new();
        let mut errors = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match e
                .parse::<IpNet>()
                .or_else(|_| e.parse::<IpAddr>().map(IpNet::from))
            {
                Ok(net) => nets.push(net),
                Err(_) => errors.push(format!(
                    "gateway.trusted_proxies[{i}]: `{e}` is not an address or a CIDR range"
                )),
            }
        }
        if errors.is_empty() {
            Ok(Self { nets })
        } else {
            Err(errors)
        }
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(&ip))
    }

    pub fn forwarded(&self, peer: IpAddr, headers: &HeaderMap) -> Forwarded {
        if !self.trusts(peer) {
            return Forwarded {
                client: peer,
                trusted_peer: false,
                chain: ip_text(peer),
            };
        }
        // Every X-Forwarded-For line, in order, as one list.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .collect();
        let mut client = peer;
        let mut kept = hops.len();
        for (i, hop) in hops.iter().enumerate().rev() {
            // A malformed entry ends what can be believed.
            let Ok(ip) = hop.parse::<IpAddr>() else { break };
            client = ip;
            kept = i;
            if !self.trusts(ip) {
                break;
            }
        }
        // Forward only what was believed (the client and the trusted hops after it).
        let believed = &hops[kept.min(hops.len())..];
        let chain = match believed {
            [] => ip_text(peer),
            _ => {
                let mut chain = believed.join(", ");
                chain.push_str(", ");
                chain.push_str(&ip_text(peer));
                chain
            }
        };
        Forwarded {
            client,
            trusted_peer: true,
            chain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for text in [
            "0.0.0.0",
            "1.2.3.4",
            "10.20.30.40",
            "100.200.255.9",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:1.2.3.4",
        ] {
            let addr = ip(text);
            assert_eq!(ip_text(addr), addr.to_string(), "{text}");
        }
    }

    #[test]
    fn untrusted_peers_are_the_client_whatever_they_claim() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into()]).unwrap();
        let f = t.forwarded(ip("203.0.113.9"), &headers(&["1.2.3.4"]));
        assert_eq!(f.client, ip("203.0.113.9"));
        assert_eq!(f.chain, "203.0.113.9");
        assert!(!f.trusted_peer);
    }

    #[test]
    fn trusted_chains_are_read_right_to_left() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "192.168.1.7".into()]).unwrap();
        // spoofed, real client, trusted hop; peer trusted.
        let f = t.forwarded(
            ip("10.0.0.2"),
            &headers(&["6.6.6.6, 198.51.100.4", "192.168.1.7"]),
        );
        assert_eq!(f.client, ip("198.51.100.4"));
        assert_eq!(f.chain, "198.51.100.4, 192.168.1.7, 10.0.0.2");
        // Only trusted hops: the leftmost is the client.
        let f = t.forwarded(ip("10.0.0.2"), &headers(&["10.1.1.1"]));
        assert_eq!(f.client, ip("10.1.1.1"));
        // Garbage stops the walk.
        let f = t.forwarded(ip("10.0.0.2"), &headers(&["1.1.1.1, nonsense"]));
        assert_eq!(f.client, ip("10.0.0.2"));
        assert_eq!(f.chain, "10.0.0.2");
        // No header: the peer itself.
        let f = t.forwarded(ip("10.0.0.2"), &HeaderMap::new());
        assert_eq!(f.client, ip("10.0.0.2"));
    }

    #[test]
    fn bad_entries_are_named() {
        let errors =
            TrustedProxies::parse(&["10.0.0.0/33".into(), "x".into(), "::1".into()]).unwrap_err();
        assert_eq!(errors.len(), 2);
    }
}
