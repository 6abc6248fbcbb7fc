//! Parsing of the prefixes operators write: CIDRs and bare addresses, IPv4 and IPv6.

use std::net::IpAddr;

use ipnet::IpNet;

/// Why a prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid CIDR `{text}`: expected an address or address/prefix-length, like 192.0.2.0/24 or 2001:db8::/32"
)]
pub struct PrefixError {
    pub text: String,
}

/// A parsed prefix, normalised (host bits cleared), and whether host bits had to be cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed {
    pub net: IpNet,
    pub had_host_bits: bool,
}

/// Parses `192.0.2.0/24`, `192.0.2.7` (a /32), `2001:db8::/32` or `2001:db8::1` (a /128).
pub fn parse_prefix(text: &str) -> Result<Parsed, PrefixError> {
    let text = text.trim();
    let err = || PrefixError {
        text: text.to_owned(),
    };
    let net = if text.contains('/') {
        text.parse::<IpNet>().map_err(|_| err())?
    } else {
        IpNet::from(text.parse::<IpAddr>().map_err(|_| err())?)
    };
    let normalised = net.trunc();
    Ok(Parsed {
        net: normalised,
        had_host_bits: normalised != net,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cidrs_and_bare_addresses() {
        let p = parse_prefix("192.0.2.0/24").unwrap();
        assert_eq!(p.net.to_string(), "192.0.2.0/24");
        assert!(!p.had_host_bits);
        assert_eq!(
            parse_prefix(" 192.0.2.7 ").unwrap().net.to_string(),
            "192.0.2.7/32"
        );
        assert_eq!(
            parse_prefix("2001:db8::1").unwrap().net.to_string(),
            "2001:db8::1/128"
        );
        assert_eq!(
            parse_prefix("2001:db8:bad::/48").unwrap().net.to_string(),
            "2001:db8:bad::/48"
        );
    }

    #[test]
    fn clears_host_bits_and_says_so() {
        let p = parse_prefix("10.0.0.1/8").unwrap();
        assert_eq!(p.net.to_string(), "10.0.0.0/8");
        assert!(p.had_host_bits);
    }

    #[test]
    fn refuses_garbage() {
        for bad in [
            "",
            "bad",
            "1.2.3.4/33",
            "1.2.3/24",
            "::/129",
            "1.2.3.4/-1",
            "1.2.3.4/",
            "/8",
        ] {
            let e = parse_prefix(bad).unwrap_err();
            assert!(e.to_string().contains("invalid CIDR"), "{bad}: {e}");
        }
    }
}
