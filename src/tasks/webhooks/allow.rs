//! Who a completion webhook may call: pure rules, read by the config's validation at start
//! and by the deliveries. (The signing secret's form is `auth::secret_bytes`.)

use std::net::IpAddr;

/// One allow-list entry.
#[derive(Debug, Clone, PartialEq)]
pub enum AllowEntry {
    /// A host name or an address, exactly (lowercase).
    Host(String),
    /// `*.example.com`: any name under it (never an address).
    Under(String),
    /// An address network, `10.1.0.0/16` or `fd00::/8`.
    Net(IpAddr, u8),
}

impl AllowEntry {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() {
            return Err("empty".into());
        }
        if let Some(rest) = s.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err("a wildcard is *.domain".into());
            }
            return Ok(Self::Under(format!(".{rest}")));
        }
        if let Some((ip, bits)) = s.split_once('/') {
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| "not an address/prefix".to_string())?;
            let bits: u8 = bits
                .parse()
                .map_err(|_| "not an address/prefix".to_string())?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            if bits > max {
                return Err(format!("a prefix is at most /{max}"));
            }
            return Ok(Self::Net(ip, bits));
        }
        if s.contains('*') || s.contains('/') || s.contains(':') && s.parse::<IpAddr>().is_err() {
            return Err("a host, *.domain, an address or address/prefix".into());
        }
        Ok(Self::Host(
            s.trim_matches(|c| c == '[' || c == ']').to_string(),
        ))
    }

    pub(super) fn holds(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Self::Host(h), ip) => h.parse::<IpAddr>().ok() == Some(ip),
            (Self::Net(IpAddr::V4(net), bits), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*bits)).unwrap_or(0);
                u32::from(*net) & mask == u32::from(a) & mask
            }
            (Self::Net(IpAddr::V6(net), bits), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*bits)).unwrap_or(0);
                u128::from(*net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// Whether an address is one the public internet routes (not private, loopback, link-local,
/// shared, unspecified, multicast or documentation space).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            !(a.is_private()
                || a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_broadcast()
                || a.is_multicast()
                || a.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])))
        }
        IpAddr::V6(a) => {
            if let Some(v4) = a.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = a.segments()[0];
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_sorted_public_or_not() {
        for a in [
            "10.0.0.1",
            "172.16.5.4",
            "192.168.1.1",
            "127.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(!is_public(a.parse().unwrap()), "{a}");
        }
        for a in ["8.8.8.8", "1.1.1.1", "2606:4700::1111"] {
            assert!(is_public(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn entries_parse_or_say_why() {
        assert_eq!(
            AllowEntry::parse("*.Example.com").unwrap(),
            AllowEntry::Under(".example.com".into())
        );
        assert!(AllowEntry::parse("10.0.0.0/33").is_err());
        assert!(AllowEntry::parse("a*b").is_err());
        assert!(AllowEntry::parse("").is_err());
        assert!(matches!(
            AllowEntry::parse("fd00::/8"),
            Ok(AllowEntry::Net(..))
        ));
    }
}
