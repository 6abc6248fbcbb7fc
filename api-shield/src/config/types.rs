//! The config's types: what each key holds once parsed, with the defaults of those that
//! are not limits (see `limit` for those).

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use serde::{Deserialize, Deserializer, de};

use super::Limit;
use super::{
    DEFAULT_SOCKET,
    values::{Bounded, HumanDuration, InterfaceName, checked_str},
};

/// Drop events, written to standard output one per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsConfig {
    /// At most this many events per second per reason reach userspace (sampled in the
    /// kernel; the rest are counted as suppressed). 0: no events.
    pub rate: Bounded<0, 1_000_000>,
    pub format: EventFormat,
}

impl Default for EventsConfig {
    fn default() -> Self {
        EventsConfig {
            rate: Bounded(100),
            format: EventFormat::Text,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    #[default]
    Text,
    Json,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` to serve `/metrics` on, or `off`. Loopback unless the config says otherwise.
    pub listen: Listen,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: Listen(Some(std::net::SocketAddr::from(([127, 0, 0, 1], 9477)))),
        }
    }
}

/// A socket address, or `off` (None).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen(pub Option<std::net::SocketAddr>);

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Listen;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("`off` or an address like 127.0.0.1:9477")
            }
            // YAML reads a bare `off` as the boolean false.
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Listen, E> {
                if v {
                    Err(E::custom(
                        "expected `off` or an address like 127.0.0.1:9477",
                    ))
                } else {
                    Ok(Listen(None))
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Listen, E> {
                if s == "off" {
                    return Ok(Listen(None));
                }
                s.parse().map(|a| Listen(Some(a))).map_err(|_| E::custom(format!("invalid listen address `{s}`: expected `off` or host:port, like 127.0.0.1:9477 or [::1]:9477")))
            }
        }
        d.deserialize_any(V)
    }
}

/// One reputation feed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedConfig {
    pub name: FeedName,
    /// http:// or https:// URL (exactly one of `url` and `path`).
    pub url: Option<FeedUrl>,
    /// A local file (exactly one of `url` and `path`).
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub format: FeedFormat,
    #[serde(default = "default_refresh")]
    pub refresh: HumanDuration,
    /// A fetch yielding more entries is refused (the last good version stays).
    #[serde(default = "default_max_entries")]
    pub max_entries: Bounded<1, 16_777_216>,
    /// A fetch yielding fewer entries is treated as a failure.
    #[serde(default = "default_min_entries")]
    pub min_entries: Bounded<0, 16_777_216>,
    /// Whole download, connection included.
    #[serde(default = "default_feed_timeout")]
    pub timeout: HumanDuration,
    /// A body larger than this is refused.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: Bounded<1024, { 1 << 34 }>,
}

fn default_refresh() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn default_max_entries() -> Bounded<1, 16_777_216> {
    Bounded(1_000_000)
}
fn default_min_entries() -> Bounded<0, 16_777_216> {
    Bounded(1)
}
fn default_feed_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_max_bytes() -> Bounded<1024, { 1 << 34 }> {
    Bounded(64 << 20)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FeedFormat {
    /// Detected from the content: JSON lines, else one prefix per line.
    #[default]
    Auto,
    Plain,
    SpamhausDrop,
    SpamhausDropJson,
    FireholNetset,
}

/// A feed name: 1 to 64 of a-z, 0-9, '-', '_' (it names files and metric labels).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedName(pub String);

impl<'de> Deserialize<'de> for FeedName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            if s.is_empty()
                || s.len() > 64
                || !s
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
            {
                return Err(format!(
                    "invalid feed name `{s}`: 1 to 64 of a-z, 0-9, '-' and '_'"
                ));
            }
            Ok(FeedName(s.to_owned()))
        })
    }
}

/// An http:// or https:// URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedUrl(pub String);

impl<'de> Deserialize<'de> for FeedUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            let rest = s
                .strip_prefix("https://")
                .or_else(|| s.strip_prefix("http://"));
            match rest {
                Some(r)
                    if !r.is_empty() && !r.starts_with('/') && !s.contains(char::is_whitespace) =>
                {
                    Ok(FeedUrl(s.to_owned()))
                }
                _ => Err(format!(
                    "invalid feed URL `{s}`: expected http://host/... or https://host/..."
                )),
            }
        })
    }
}

/// The admin API: a Unix socket only (nothing admin listens on TCP).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub socket: PathBuf,
    /// Members of this group may use the socket too; otherwise only root.
    pub group: Option<String>,
}

impl Default for Admin {
    fn default() -> Self {
        Admin {
            socket: PathBuf::from(DEFAULT_SOCKET),
            group: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Interface {
    pub name: InterfaceName,
    #[serde(default)]
    pub mode: AttachMode,
}

/// How the program is attached to an interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) XDP, falling back to generic where the driver cannot.
    #[default]
    Auto,
    /// Native (driver) XDP only.
    Native,
    /// Generic (skb) XDP: works on every interface, slower.
    Generic,
    /// TC ingress (clsact) through a TCX link (Linux >= 6.6): the same verdicts, after the
    /// kernel built the skb; for interfaces or kernels where XDP is not wanted.
    Tc,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMalformed {
    #[default]
    Pass,
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Limits {
    /// The limit of sources no rule matches.
    pub default: Limit,
    pub default_policy: Policy,
    /// Matched in order; the first match's limit applies.
    pub rules: Vec<Rule>,
    /// Boxing sources that keep going over their limit; None: off.
    pub penalty: Option<Penalty>,
}

impl Limits {
    /// The name of limit slot `slot`: `default` or the rule's.
    pub fn slot_name(&self, slot: u32) -> String {
        match slot.checked_sub(1) {
            None => "default".into(),
            Some(i) => self
                .rules
                .get(i as usize)
                .map_or_else(|| format!("slot-{slot}"), |r| r.name.0.clone()),
        }
    }

    /// The names of every limit slot in use, by slot.
    pub fn slot_names(&self) -> Vec<String> {
        (0..=self.rules.len() as u32)
            .map(|s| self.slot_name(s))
            .collect()
    }

    /// What shares a bucket under limit slot `slot`.
    pub fn slot_key(&self, slot: u32) -> SourceKey {
        match slot.checked_sub(1) {
            None => self.default_policy.key,
            Some(i) => self
                .rules
                .get(i as usize)
                .map_or_else(SourceKey::default, |r| r.policy.key),
        }
    }
}

/// How a limit is applied: what shares a bucket, whether it drops, whether it boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub key: SourceKey,
    /// Count only: over-limit packets pass and count as would-drop.
    pub dry_run: bool,
    /// Drops under this limit count toward the penalty box (when `limits.penalty` is set).
    pub penalty: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            key: SourceKey::default(),
            dry_run: false,
            penalty: true,
        }
    }
}

/// One rule: packets it matches are limited per bucket by `limit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: RuleName,
    pub matcher: RuleMatch,
    pub limit: Limit,
    pub policy: Policy,
}

/// What a rule matches; every field given must match. Nothing given: every packet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleMatch {
    pub protocol: Option<Protocol>,
    /// Destination ports and inclusive ranges (TCP and UDP only).
    #[serde(default)]
    pub dst_ports: Vec<PortRange>,
    pub tcp_flags: Option<TcpFlags>,
}

/// An IP protocol, by name or number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
    /// ICMP and ICMPv6.
    Icmp,
    Icmpv6,
    Number(u8),
}

impl Protocol {
    /// The protocol numbers it stands for.
    pub fn numbers(self) -> Vec<u8> {
        match self {
            Protocol::Tcp => vec![6],
            Protocol::Udp => vec![17],
            Protocol::Icmp => vec![1, 58],
            Protocol::Icmpv6 => vec![58],
            Protocol::Number(n) => vec![n],
        }
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("tcp, udp, icmp, icmpv6 or a protocol number 0-255")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Protocol, E> {
                match u8::try_from(v) {
                    Ok(6) => Ok(Protocol::Tcp),
                    Ok(17) => Ok(Protocol::Udp),
                    Ok(n) => Ok(Protocol::Number(n)),
                    Err(_) => Err(E::custom(format!(
                        "protocol {v} is out of range: expected 0 to 255"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Protocol, E> {
                Err(E::custom(format!(
                    "protocol {v} is out of range: expected 0 to 255"
                )))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Protocol, E> {
                match s {
                    "tcp" => Ok(Protocol::Tcp),
                    "udp" => Ok(Protocol::Udp),
                    "icmp" => Ok(Protocol::Icmp),
                    "icmpv6" => Ok(Protocol::Icmpv6),
                    _ => Err(E::custom(format!(
                        "unknown protocol `{s}`: expected tcp, udp, icmp, icmpv6 or a number 0-255"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A destination port or an inclusive range, written `443` or `"8000-8443"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid port `{s}`: expected a port 0-65535 or a range like 8000-8443");
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first > last {
            return Err(format!("invalid port range `{s}`: {first} is above {last}"));
        }
        Ok(PortRange { first, last })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port 0-65535 or a range like \"8000-8443\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                u16::try_from(v)
                    .map(|p| PortRange { first: p, last: p })
                    .map_err(|_| {
                        E::custom(format!("port {v} is out of range: expected 0 to 65535"))
                    })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                Err(E::custom(format!(
                    "port {v} is out of range: expected 0 to 65535"
                )))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<PortRange, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// TCP flags a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TcpFlags {
    /// SYN set and ACK clear: connection attempts (SYN floods).
    Syn,
}

/// What shares a bucket: sources in one IPv4 prefix of `v4` bits, one IPv6 prefix of `v6`.
///
/// Written `source` (/32 and /128), `source/N/M` (IPv4 /N, IPv6 /M), `source/N` (N up
/// to 32: IPv4 /N with IPv6 per address; above 32: IPv6 /N with IPv4 per address), or
/// `{ipv4: N, ipv6: M}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceKey {
    pub v4: u8,
    pub v6: u8,
}

impl Default for SourceKey {
    fn default() -> Self {
        SourceKey { v4: 32, v6: 128 }
    }
}

impl FromStr for SourceKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "invalid key `{s}`: expected source, source/N (IPv4 /0-32 or IPv6 /33-128) or source/N/M (IPv4 /N, IPv6 /M)"
            )
        };
        let mut parts = s.trim().split('/');
        if parts.next() != Some("source") {
            return Err(bad());
        }
        let lens: Vec<u8> = parts
            .map(|p| p.parse::<u8>().map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        match lens[..] {
            [] => Ok(SourceKey::default()),
            [n] if n <= 32 => Ok(SourceKey { v4: n, v6: 128 }),
            [n] if n <= 128 => Ok(SourceKey { v4: 32, v6: n }),
            [v4, v6] if v4 <= 32 && v6 <= 128 => Ok(SourceKey { v4, v6 }),
            _ => Err(bad()),
        }
    }
}

impl<'de> Deserialize<'de> for SourceKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Lengths {
            ipv4: Option<Bounded<0, 32>>,
            ipv6: Option<Bounded<0, 128>>,
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = SourceKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("source, source/N, source/N/M or {ipv4: N, ipv6: M}")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<SourceKey, E> {
                s.parse().map_err(E::custom)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<SourceKey, A::Error> {
                let l = Lengths::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(SourceKey {
                    v4: l.ipv4.map_or(32, |b| b.0 as u8),
                    v6: l.ipv6.map_or(128, |b| b.0 as u8),
                })
            }
        }
        d.deserialize_any(V)
    }
}

impl fmt::Display for SourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "source/{}/{}", self.v4, self.v6)
    }
}

/// A rule name: 1 to 64 of a-z, A-Z, 0-9, '-', '_' (it is a metric label).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RuleName(pub String);

impl<'de> Deserialize<'de> for RuleName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            if s.is_empty()
                || s.len() > 64
                || s == "default"
                || !s
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "invalid rule name `{s}`: 1 to 64 of a-z, A-Z, 0-9, '-' and '_', not `default`"
                ));
            }
            Ok(RuleName(s.to_owned()))
        })
    }
}

impl fmt::Display for RuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The penalty box: sources (bucket prefixes) that keep going over their limit are
/// blocklisted for a while, longer on each repeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Penalty {
    /// Drops by the limiter within `window` after which the bucket's prefix is boxed.
    pub after_violations: Bounded<1, 1_000_000_000>,
    #[serde(default = "default_penalty_window")]
    pub window: HumanDuration,
    #[serde(default = "default_block_for")]
    pub block_for: HumanDuration,
    /// Each repeat multiplies `block_for` by this, up to `max_block`.
    #[serde(default = "default_escalate")]
    pub escalate: Bounded<1, 1000>,
    #[serde(default = "default_max_block")]
    pub max_block: HumanDuration,
    /// A prefix boxed no more within this long starts again from `block_for`.
    #[serde(default = "default_forget_after")]
    pub forget_after: HumanDuration,
}

fn default_penalty_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}
fn default_block_for() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_escalate() -> Bounded<1, 1000> {
    Bounded(2)
}
fn default_max_block() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}
fn default_forget_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(24 * 3600))
}

/// Map capacities, fixed when the program is loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Capacity {
    /// Blocklist prefixes per address family.
    pub blocklist: Bounded<1, { u32::MAX as u64 / 2 }>,
    /// Allowlist prefixes per address family.
    pub allowlist: Bounded<1, { u32::MAX as u64 / 2 }>,
    /// Buckets the limiter holds (in sets of 4); a new source whose set is full replaces
    /// the set's least busy bucket.
    pub sources: Bounded<1, 67_108_864>,
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            blocklist: Bounded(1_000_000),
            allowlist: Bounded(65_536),
            sources: Bounded(1_000_000),
        }
    }
}
