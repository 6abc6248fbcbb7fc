//! The YAML config: parsing, defaults, validation. Every error names its key and line.
//!
//! Scalar errors (bad CIDR, negative rate, unknown key) are located by serde_yaml itself;
//! the few checks that span several entries locate their key with [`locate`].

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};

use crate::prefix::parse_prefix;
use api_shield_common::limiter::MAX_RULES;

/// The config the daemon runs without `--config`; documented in the README.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.yaml");

/// A config file that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub limits: Limits,
    /// Count only: nothing is dropped (lists, limits, malformed frames); would-be drops
    /// are counted and reported as such.
    pub dry_run: bool,
    pub allowlist: Vec<IpNet>,
    pub blocklist: Vec<IpNet>,
    pub on_malformed: OnMalformed,
    pub capacity: Capacity,
    /// How often the daemon logs its counters; zero: never.
    pub stats_interval: Duration,
    pub admin: Admin,
    /// Where CLI-added entries (and later feed lists and penalties) persist.
    pub state_dir: PathBuf,
    /// Where maps and XDP links are pinned, one folder per interface.
    pub pin_dir: PathBuf,
    /// Reputation feeds: lists of networks to block, refreshed on a schedule.
    pub feeds: Vec<FeedConfig>,
    pub metrics: MetricsConfig,
    pub events: EventsConfig,
}

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

pub const DEFAULT_SOCKET: &str = "/run/api-shield/api.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/api-shield";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/api-shield";

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

/// One token-bucket limit per source. Zero rates mean "no limit" in that dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub pps: u64,
    pub burst_packets: u64,
    pub bps: u64,
    pub burst_bytes: u64,
}

impl Default for Limit {
    fn default() -> Self {
        Limit {
            pps: 1000,
            burst_packets: 2000,
            bps: 0,
            burst_bytes: 0,
        }
    }
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

pub const MAX_PPS: u64 = 1_000_000_000;
/// The longest penalty block: a year.
pub const MAX_PENALTY_SECS: u64 = 365 * 24 * 3600;
pub const MAX_BPS: u64 = 1_000_000_000_000;
/// A byte bucket smaller than one full-size VLAN-tagged frame would drop every such frame.
pub const MIN_BURST_BYTES: u64 = 1522;

/// An integer that serde_yaml checks (and locates) against an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bounded<const MIN: u64, const MAX: u64>(pub u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Bounded<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_u64(d, |v| {
            if (MIN..=MAX).contains(&v) {
                Ok(Bounded(v))
            } else {
                Err(format!("{v} is out of range: expected {MIN} to {MAX}"))
            }
        })
    }
}

/// A rate: 0 (no limit) or MIN..=MAX.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Rate<const MIN: u64, const MAX: u64>(u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Rate<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_u64(d, |v| {
            if v == 0 || (MIN..=MAX).contains(&v) {
                Ok(Rate(v))
            } else {
                Err(format!(
                    "{v} is out of range: expected 0 (no limit) or {MIN} to {MAX}"
                ))
            }
        })
    }
}

/// Deserializes an unsigned integer and checks it while serde_yaml still points at it,
/// so the error carries the value's own key and line.
fn checked_u64<'de, D, T>(d: D, check: fn(u64) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T>(fn(u64) -> Result<T, String>);
    impl<T> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
            match u64::try_from(v) {
                Ok(v) => self.visit_u64(v),
                Err(_) => Err(E::custom(format!(
                    "{v} is negative: expected a non-negative integer"
                ))),
            }
        }
    }
    d.deserialize_u64(V(check))
}

/// Deserializes a string and parses it while serde_yaml still points at it (see [`checked_u64`]).
fn checked_str<'de, D, T>(d: D, parse: fn(&str) -> Result<T, String>) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<T>(fn(&str) -> Result<T, String>);
    impl<T> de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            (self.0)(v).map_err(E::custom)
        }
    }
    d.deserialize_str(V(parse))
}

/// A Linux interface name: 1 to 15 bytes, no '/', no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InterfaceName(pub String);

impl<'de> Deserialize<'de> for InterfaceName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            if s.is_empty()
                || s.len() > 15
                || s.contains(['/', ':'])
                || s.contains(char::is_whitespace)
            {
                return Err(format!(
                    "invalid interface name `{s}`: 1 to 15 characters, no '/', ':' or spaces"
                ));
            }
            Ok(InterfaceName(s.to_owned()))
        })
    }
}

impl fmt::Display for InterfaceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A prefix written as a CIDR or a bare address; host bits are cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Prefix(IpNet);

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            parse_prefix(s)
                .map(|p| Prefix(p.net))
                .map_err(|e| e.to_string())
        })
    }
}

/// A duration like `500ms`, `10s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "0" || s == "off" {
            return Ok(HumanDuration(Duration::ZERO));
        }
        humantime::parse_duration(s)
            .map(HumanDuration)
            .map_err(|e| {
                format!("invalid duration `{s}`: {e} (write it like 500ms, 10s, 5m or 1h)")
            })
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, str::parse)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    allowlist: Vec<Prefix>,
    #[serde(default)]
    blocklist: Vec<Prefix>,
    #[serde(default)]
    on_malformed: OnMalformed,
    #[serde(default)]
    capacity: Capacity,
    stats_interval: Option<HumanDuration>,
    #[serde(default)]
    admin: Admin,
    state_dir: Option<AbsolutePath>,
    pin_dir: Option<AbsolutePath>,
    #[serde(default)]
    feeds: Vec<FeedConfig>,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    events: EventsConfig,
}

/// An absolute path (relative ones would depend on where the daemon was started).
#[derive(Debug, Clone, PartialEq, Eq)]
struct AbsolutePath(PathBuf);

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        checked_str(d, |s| {
            if s.starts_with('/') {
                Ok(AbsolutePath(PathBuf::from(s)))
            } else {
                Err(format!("`{s}` is not an absolute path"))
            }
        })
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    default: Option<RawLimit>,
    #[serde(default)]
    rules: Vec<RawRule>,
    penalty: Option<Penalty>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimit {
    pps: Option<Rate<1, MAX_PPS>>,
    burst_packets: Option<Bounded<1, MAX_PPS>>,
    bps: Option<Rate<64, MAX_BPS>>,
    burst_bytes: Option<Bounded<MIN_BURST_BYTES, MAX_BPS>>,
    key: Option<SourceKey>,
    dry_run: Option<bool>,
    penalty: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: RuleName,
    #[serde(rename = "match", default)]
    matcher: RuleMatch,
    pps: Option<Rate<1, MAX_PPS>>,
    burst_packets: Option<Bounded<1, MAX_PPS>>,
    bps: Option<Rate<64, MAX_BPS>>,
    burst_bytes: Option<Bounded<MIN_BURST_BYTES, MAX_BPS>>,
    key: Option<SourceKey>,
    dry_run: Option<bool>,
    penalty: Option<bool>,
}

impl RawRule {
    /// A rule limits only the dimensions it names (0 or absent: no limit); a missing
    /// burst is one second's worth of the rate.
    fn resolve(self) -> Rule {
        let pps = self.pps.map_or(0, |r| r.0);
        let bps = self.bps.map_or(0, |r| r.0);
        Rule {
            name: self.name,
            matcher: self.matcher,
            limit: Limit {
                pps,
                burst_packets: self.burst_packets.map_or(pps.max(1), |b| b.0),
                bps,
                burst_bytes: self.burst_bytes.map_or(bps.max(MIN_BURST_BYTES), |b| b.0),
            },
            policy: Policy {
                key: self.key.unwrap_or_default(),
                dry_run: self.dry_run.unwrap_or(false),
                penalty: self.penalty.unwrap_or(true),
            },
        }
    }
}

impl RawLimit {
    fn policy(&self) -> Policy {
        Policy {
            key: self.key.unwrap_or_default(),
            dry_run: self.dry_run.unwrap_or(false),
            penalty: self.penalty.unwrap_or(true),
        }
    }

    /// A missing burst defaults to one second's worth of the rate.
    fn resolve(&self) -> Limit {
        let pps = self.pps.map_or(Limit::default().pps, |r| r.0);
        let bps = self.bps.map_or(0, |r| r.0);
        Limit {
            pps,
            burst_packets: self.burst_packets.map_or(pps, |b| b.0),
            bps,
            burst_bytes: self.burst_bytes.map_or(bps.max(MIN_BURST_BYTES), |b| b.0),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        use std::os::unix::fs::PermissionsExt as _;
        let refuse = |problem: String| ConfigError {
            problems: vec![problem],
        };
        let meta = fs::metadata(path)
            .map_err(|e| refuse(format!("cannot read {}: {e}", path.display())))?;
        // Anyone who can write the config can rewrite the firewall.
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 {
            return Err(refuse(format!(
                "{} is writable by others (mode {:o}): refusing it; `chmod o-w {}`",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
        let text = fs::read_to_string(path)
            .map_err(|e| refuse(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError {
            problems: vec![describe_yaml_error(&e)],
        })?;
        let config = Config {
            interfaces: raw.interfaces,
            limits: Limits {
                default: raw
                    .limits
                    .default
                    .as_ref()
                    .map_or_else(Limit::default, RawLimit::resolve),
                default_policy: raw
                    .limits
                    .default
                    .as_ref()
                    .map_or_else(Policy::default, RawLimit::policy),
                rules: raw.limits.rules.into_iter().map(RawRule::resolve).collect(),
                penalty: raw.limits.penalty,
            },
            dry_run: raw.dry_run,
            allowlist: raw.allowlist.into_iter().map(|p| p.0).collect(),
            blocklist: raw.blocklist.into_iter().map(|p| p.0).collect(),
            on_malformed: raw.on_malformed,
            capacity: raw.capacity,
            stats_interval: raw.stats_interval.map_or(Duration::from_secs(10), |d| d.0),
            admin: raw.admin,
            state_dir: raw
                .state_dir
                .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |p| p.0),
            pin_dir: raw
                .pin_dir
                .map_or_else(|| PathBuf::from(DEFAULT_PIN_DIR), |p| p.0),
            feeds: raw.feeds,
            metrics: raw.metrics,
            events: raw.events,
        };
        let problems = config.problems(text);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }

    /// Checks that span several entries.
    fn problems(&self, text: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut at = |path: &[Seg<'_>], message: String| {
            problems.push(format!(
                "{}: {message} at line {}",
                display_path(path),
                locate(text, path)
            ));
        };
        if self.interfaces.is_empty() {
            at(
                &[Seg::Key("interfaces")],
                "at least one interface is required".into(),
            );
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            if let Some(first) = self.interfaces[..i]
                .iter()
                .position(|o| o.name == iface.name)
            {
                at(
                    &[Seg::Key("interfaces"), Seg::Index(i), Seg::Key("name")],
                    format!(
                        "duplicate interface `{}` (already listed as interfaces[{first}])",
                        iface.name
                    ),
                );
            }
        }
        for (list, entries, capacity) in [
            ("blocklist", &self.blocklist, self.capacity.blocklist.0),
            ("allowlist", &self.allowlist, self.capacity.allowlist.0),
        ] {
            for family_is_v4 in [true, false] {
                let n = entries
                    .iter()
                    .filter(|p| matches!(p, IpNet::V4(_)) == family_is_v4)
                    .count();
                if n as u64 > capacity {
                    at(
                        &[Seg::Key(list)],
                        format!(
                            "{n} {} entries do not fit capacity.{list} ({capacity})",
                            if family_is_v4 { "IPv4" } else { "IPv6" }
                        ),
                    );
                }
            }
        }
        let rules = &self.limits.rules;
        if rules.len() > MAX_RULES as usize {
            at(
                &[Seg::Key("limits"), Seg::Key("rules")],
                format!("{} rules: at most {MAX_RULES} are supported", rules.len()),
            );
        }
        for (i, rule) in rules.iter().enumerate() {
            let path = |key| {
                [
                    Seg::Key("limits"),
                    Seg::Key("rules"),
                    Seg::Index(i),
                    Seg::Key(key),
                ]
            };
            if let Some(first) = rules[..i].iter().position(|o| o.name == rule.name) {
                at(
                    &path("name"),
                    format!(
                        "duplicate rule `{}` (already listed as limits.rules[{first}])",
                        rule.name
                    ),
                );
            }
            let m = &rule.matcher;
            let transport = matches!(m.protocol, None | Some(Protocol::Tcp | Protocol::Udp));
            if !m.dst_ports.is_empty() && !transport {
                at(
                    &path("match"),
                    "dst_ports needs protocol tcp or udp (or no protocol: both)".into(),
                );
            }
            if m.tcp_flags.is_some() && m.protocol != Some(Protocol::Tcp) {
                at(&path("match"), "tcp_flags needs protocol: tcp".into());
            }
        }
        if let Some(p) = &self.limits.penalty {
            let path = |key| [Seg::Key("limits"), Seg::Key("penalty"), Seg::Key(key)];
            for (key, d) in [
                ("window", p.window.0),
                ("block_for", p.block_for.0),
                ("max_block", p.max_block.0),
            ] {
                if d < Duration::from_secs(1) {
                    at(&path(key), "must be at least 1s".into());
                }
            }
            if p.max_block.0 < p.block_for.0 {
                at(&path("max_block"), "must be at least block_for".into());
            }
            if p.max_block.0 > Duration::from_secs(MAX_PENALTY_SECS) {
                at(&path("max_block"), "must be at most 365d".into());
            }
        }
        for (i, feed) in self.feeds.iter().enumerate() {
            let path = |key| [Seg::Key("feeds"), Seg::Index(i), Seg::Key(key)];
            if let Some(first) = self.feeds[..i].iter().position(|o| o.name == feed.name) {
                at(
                    &path("name"),
                    format!(
                        "duplicate feed `{}` (already listed as feeds[{first}])",
                        feed.name.0
                    ),
                );
            }
            match (&feed.url, &feed.path) {
                (Some(_), Some(_)) => at(
                    &path("path"),
                    "a feed has either `url` or `path`, not both".into(),
                ),
                (None, None) => at(
                    &[Seg::Key("feeds"), Seg::Index(i)],
                    "a feed needs `url` or `path`".into(),
                ),
                (None, Some(p)) if !p.is_absolute() => at(
                    &path("path"),
                    format!("`{}` is not an absolute path", p.display()),
                ),
                _ => {}
            }
            if feed.refresh.0 < Duration::from_secs(1) {
                at(&path("refresh"), "must be at least 1s".into());
            }
            if feed.timeout.0 < Duration::from_secs(1) {
                at(&path("timeout"), "must be at least 1s".into());
            }
            if feed.min_entries.0 > feed.max_entries.0 {
                at(
                    &path("min_entries"),
                    format!(
                        "{} is more than max_entries ({})",
                        feed.min_entries.0, feed.max_entries.0
                    ),
                );
            }
        }
        problems
    }
}

/// serde_yaml says "path: message at line L column C"; make sure a line is always named.
fn describe_yaml_error(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    if message.contains(" at line ") {
        return message;
    }
    // Errors about the document's overall shape carry no location: that is line 1.
    let line = e.location().map_or(1, |l| l.line());
    if message.contains(": ") {
        format!("{message} at line {line}")
    } else {
        format!("(document): {message} at line {line}")
    }
}

/// One step of a path into the YAML document.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

fn display_path(path: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) if out.is_empty() => out.push_str(k),
            Seg::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A non-blank, non-comment line of YAML: its number, the indent of its content after
/// any `- ` markers, that content, and the columns of its `- ` markers.
struct YamlLine<'a> {
    number: usize,
    indent: usize,
    content: &'a str,
    dashes: Vec<usize>,
}

impl YamlLine<'_> {
    /// The column where the line starts: its first `- ` marker, or its content.
    fn start(&self) -> usize {
        self.dashes.first().copied().unwrap_or(self.indent)
    }

    fn key(&self) -> Option<&str> {
        let (key, _) = self.content.split_once(':')?;
        Some(key.trim().trim_matches(['"', '\'']))
    }
}

fn yaml_lines(text: &str) -> Vec<YamlLine<'_>> {
    text.lines()
        .enumerate()
        .filter_map(|(n, line)| {
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                return None;
            }
            let mut indent = line.len() - trimmed.len();
            let mut content = trimmed;
            let mut dashes = Vec::new();
            while content == "-" || content.starts_with("- ") {
                dashes.push(indent);
                let rest = content[1..].trim_start();
                indent += content.len() - rest.len();
                content = rest;
            }
            Some(YamlLine {
                number: n + 1,
                indent,
                content,
                dashes,
            })
        })
        .collect()
}

/// The 1-based line of `path` in block-style YAML, or of its deepest ancestor found
/// (flow-style collections are not walked into).
pub(crate) fn locate(text: &str, path: &[Seg<'_>]) -> usize {
    let lines = yaml_lines(text);
    let mut found = 1;
    // The lines of the current node's children, and the column their keys or items start at.
    let (mut from, mut to) = (0, lines.len());
    let mut child_col = lines.first().map_or(0, YamlLine::start);
    for seg in path {
        let hit = match seg {
            Seg::Key(k) => {
                (from..to).find(|&i| lines[i].indent == child_col && lines[i].key() == Some(k))
            }
            Seg::Index(n) => (from..to)
                .filter(|&i| lines[i].dashes.first() == Some(&child_col))
                .nth(*n),
        };
        let Some(i) = hit else { break };
        found = lines[i].number;
        match seg {
            Seg::Key(_) => {
                // Children: the following lines that start right of this key.
                from = i + 1;
                to = (from..to)
                    .find(|&j| lines[j].start() <= child_col)
                    .unwrap_or(to);
                child_col = lines
                    .get(from)
                    .filter(|_| from < to)
                    .map_or(usize::MAX, YamlLine::start);
            }
            Seg::Index(_) => {
                // The item's keys: on its own line after "- ", and below it at that column.
                let item_col = child_col;
                from = i;
                to = (i + 1..to)
                    .find(|&j| lines[j].start() <= item_col)
                    .unwrap_or(to);
                child_col = lines[i].indent;
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/api-shield.example.yaml");

    fn errors(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_example_and_default_configs_are_valid() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.interfaces[0].name.0, "eth0");
        assert_eq!(c.limits.default.pps, 1000);
        assert_eq!(c.limits.default.burst_bytes, 25_000_000);
        assert_eq!(c.allowlist, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(c.blocklist.len(), 2);
        let rules = &c.limits.rules;
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].name.0, "https");
        assert_eq!(
            rules[0].matcher.dst_ports,
            vec![
                PortRange {
                    first: 443,
                    last: 443
                },
                PortRange {
                    first: 8000,
                    last: 8443
                }
            ]
        );
        assert_eq!(rules[0].policy.key, SourceKey { v4: 24, v6: 64 });
        assert_eq!(rules[1].matcher.tcp_flags, Some(TcpFlags::Syn));
        assert!(rules[1].policy.dry_run);
        assert_eq!((rules[2].limit.pps, rules[2].limit.bps), (0, 0));
        let p = c.limits.penalty.unwrap();
        assert_eq!(p.after_violations.0, 50);
        assert_eq!(p.max_block.0, Duration::from_secs(3600));
        assert!(!c.dry_run);
        let d = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(d.interfaces[0].mode, AttachMode::Auto);
        assert_eq!(d.on_malformed, OnMalformed::Pass);
    }

    #[test]
    fn rule_keys_and_shapes_parse() {
        let c = Config::parse(
            "interfaces: [{name: a}]\ndry_run: true\nlimits:\n  rules:\n    - name: v4only\n      key: source/24\n      pps: 5\n    - name: v6only\n      match: {protocol: icmp}\n      key: source/48\n      bps: 1000\n    - name: both\n      match: {dst_ports: [\"1-1024\"]}\n      key: {ipv4: 16, ipv6: 56}\n      pps: 1\n    - name: n\n      match: {protocol: 132}\n      pps: 1\n",
        )
        .unwrap();
        assert!(c.dry_run);
        let r = &c.limits.rules;
        assert_eq!(r[0].policy.key, SourceKey { v4: 24, v6: 128 });
        assert_eq!(
            (r[0].limit.pps, r[0].limit.burst_packets, r[0].limit.bps),
            (5, 5, 0)
        );
        assert_eq!(r[1].policy.key, SourceKey { v4: 32, v6: 48 });
        assert_eq!(
            (r[1].limit.pps, r[1].limit.bps, r[1].limit.burst_bytes),
            (0, 1000, 1522)
        );
        assert_eq!(r[1].matcher.protocol, Some(Protocol::Icmp));
        assert_eq!(r[2].policy.key, SourceKey { v4: 16, v6: 56 });
        assert_eq!(r[3].matcher.protocol, Some(Protocol::Number(132)));
        assert_eq!(
            c.limits.slot_names(),
            ["default", "v4only", "v6only", "both", "n"]
        );
        assert!(c.limits.penalty.is_none());
    }

    #[test]
    fn bad_rules_are_refused_with_their_key_and_line() {
        let base = "interfaces: [{name: a}]\nlimits:\n  rules:\n    - name: r\n";
        for (extra, wants) in [
            ("      match: {protocol: tcpp}\n", "unknown protocol `tcpp`"),
            (
                "      match: {protocol: 256}\n",
                "protocol 256 is out of range",
            ),
            (
                "      match: {dst_ports: [70000]}\n",
                "port 70000 is out of range",
            ),
            ("      match: {dst_ports: [\"90-80\"]}\n", "90 is above 80"),
            (
                "      match: {dst_ports: [\"http\"]}\n",
                "invalid port `http`",
            ),
            (
                "      match: {protocol: icmp, dst_ports: [1]}\n",
                "dst_ports needs protocol tcp or udp",
            ),
            (
                "      match: {protocol: udp, tcp_flags: syn}\n",
                "tcp_flags needs protocol: tcp",
            ),
            (
                "      match: {protocol: tcp, tcp_flags: fin}\n",
                "unknown variant `fin`",
            ),
            ("      match: {port: 1}\n", "unknown field `port`"),
            ("      key: source/33/64\n", "invalid key `source/33/64`"),
            ("      key: src/24\n", "invalid key `src/24`"),
            ("      key: {ipv4: 40}\n", "40 is out of range"),
            ("      pps: -1\n", "integer `-1`"),
        ] {
            let e = errors(&format!("{base}{extra}"));
            assert!(e.contains(wants), "{extra}: {e}");
            assert!(e.contains("limits.rules[0]"), "{extra}: no key in {e}");
            assert!(e.contains("line "), "{extra}: no line in {e}");
        }
        let e =
            errors("interfaces: [{name: a}]\nlimits:\n  rules:\n    - name: r\n    - name: r\n");
        assert!(
            e.contains("duplicate rule `r`") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces: [{name: a}]\nlimits:\n  rules:\n    - name: default\n");
        assert!(e.contains("invalid rule name `default`"), "{e}");
        let many: String = (0..65).map(|i| format!("    - name: r{i}\n")).collect();
        let e = errors(&format!(
            "interfaces: [{{name: a}}]\nlimits:\n  rules:\n{many}"
        ));
        assert!(e.contains("65 rules: at most 64"), "{e}");
        for (penalty, wants) in [
            ("{after_violations: 0}", "0 is out of range"),
            ("{window: 10s}", "missing field `after_violations`"),
            (
                "{after_violations: 5, block_for: 2h}",
                "max_block: must be at least block_for",
            ),
            (
                "{after_violations: 5, window: 0}",
                "window: must be at least 1s",
            ),
            ("{after_violations: 5, escalate: 0}", "0 is out of range"),
        ] {
            let e = errors(&format!(
                "interfaces: [{{name: a}}]\nlimits:\n  penalty: {penalty}\n"
            ));
            assert!(
                e.contains(wants) && e.contains("limits.penalty"),
                "{penalty}: {e}"
            );
        }
    }

    #[test]
    fn the_contract_keys_parse() {
        let c = Config::parse(
            "interfaces:\n  - name: eth0\n    mode: generic\nlimits:\n  default:\n    pps: 10\n    burst_packets: 20\n    bps: 0\n    burst_bytes: 2000\nallowlist: [10.0.0.0/8]\nblocklist: [192.0.2.0/24, \"2001:db8:bad::/48\"]\non_malformed: drop\n",
        )
        .unwrap();
        assert_eq!(c.interfaces[0].mode, AttachMode::Generic);
        assert_eq!(
            c.limits.default,
            Limit {
                pps: 10,
                burst_packets: 20,
                bps: 0,
                burst_bytes: 2000
            }
        );
        assert_eq!(c.on_malformed, OnMalformed::Drop);
        assert_eq!(c.blocklist[1].to_string(), "2001:db8:bad::/48");
    }

    #[test]
    fn missing_bursts_default_to_one_second_of_rate() {
        let c = Config::parse(
            "interfaces: [{name: a}]\nlimits: { default: { pps: 50, bps: 100000 } }\n",
        )
        .unwrap();
        assert_eq!(c.limits.default.burst_packets, 50);
        assert_eq!(c.limits.default.burst_bytes, 100_000);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e =
            errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    pps: 5\n    burst: 3\n");
        assert!(
            e.contains("limits.default")
                && e.contains("unknown field `burst`")
                && e.contains("line 6"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nblocklst: []\n");
        assert!(
            e.contains("unknown field `blocklst`") && e.contains("line 3"),
            "{e}"
        );
    }

    #[test]
    fn bad_cidr_is_named_with_its_line() {
        let e =
            errors("interfaces:\n  - name: eth0\nblocklist:\n  - 192.0.2.0/24\n  - 192.0.2.0/33\n");
        assert!(
            e.contains("blocklist") && e.contains("192.0.2.0/33") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nallowlist: [not-an-ip]\n");
        assert!(
            e.contains("allowlist") && e.contains("not-an-ip") && e.contains("line 3"),
            "{e}"
        );
    }

    #[test]
    fn negative_or_absurd_rates_are_refused() {
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    pps: -5\n");
        assert!(
            e.contains("limits.default.pps") && e.contains("-5") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    bps: -1\n");
        assert!(
            e.contains("limits.default.bps") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    burst_packets: 0\n");
        assert!(
            e.contains("burst_packets") && e.contains("out of range") && e.contains("line 5"),
            "{e}"
        );
        let e = errors(
            "interfaces:\n  - name: eth0\nlimits:\n  default:\n    bps: 1000\n    burst_bytes: 100\n",
        );
        assert!(e.contains("burst_bytes") && e.contains("line 6"), "{e}");
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    pps: ten\n");
        assert!(
            e.contains("limits.default.pps") && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_interface_is_named_with_its_line() {
        let e = errors(
            "interfaces:\n  - name: eth0\n    mode: native\n  - name: eth1\n  - name: eth0\n",
        );
        assert!(
            e.contains("interfaces[2].name")
                && e.contains("duplicate interface `eth0`")
                && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn other_bad_values_are_refused_with_their_line() {
        let e = errors("interfaces:\n  - name: eth0\n    mode: turbo\n");
        assert!(
            e.contains("interfaces[0].mode") && e.contains("turbo") && e.contains("line 3"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\non_malformed: maybe\n");
        assert!(e.contains("on_malformed") && e.contains("line 3"), "{e}");
        let e = errors("interfaces:\n  - name: this-name-is-too-long\n");
        assert!(
            e.contains("interfaces[0].name") && e.contains("line 2"),
            "{e}"
        );
        let e = errors("interfaces: []\n");
        assert!(
            e.contains("interfaces") && e.contains("at least one") && e.contains("line 1"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nstats_interval: 5x\n");
        assert!(
            e.contains("stats_interval") && e.contains("5x") && e.contains("line 3"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\ncapacity:\n  sources: 0\n");
        assert!(
            e.contains("capacity.sources") && e.contains("line 4"),
            "{e}"
        );
        let e = errors(
            "interfaces:\n  - name: eth0\ncapacity:\n  blocklist: 1\nblocklist: [192.0.2.0/24, 198.51.100.0/24]\n",
        );
        assert!(
            e.contains("blocklist")
                && e.contains("do not fit capacity.blocklist")
                && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn feeds_parse_with_defaults_and_bad_ones_are_located() {
        let c = Config::parse("interfaces: [{name: a}]\nfeeds:\n  - name: drop\n    url: https://www.spamhaus.org/drop/drop.txt\n  - name: local\n    path: /etc/x.txt\n    format: firehol-netset\n    refresh: 5m\n").unwrap();
        assert_eq!(c.feeds[0].refresh.0, Duration::from_secs(3600));
        assert_eq!(
            (c.feeds[0].max_entries.0, c.feeds[0].min_entries.0),
            (1_000_000, 1)
        );
        assert_eq!(c.feeds[1].format, FeedFormat::FireholNetset);
        let base = "interfaces: [{name: a}]\nfeeds:\n";
        for (feed, key, line) in [
            (
                "  - name: a\n    url: https://x/a\n  - name: a\n    path: /b\n",
                "feeds[1].name",
                "line 5",
            ),
            (
                "  - name: a\n    url: https://x/a\n    path: /b\n",
                "feeds[0].path",
                "line 5",
            ),
            ("  - name: a\n    refresh: 1h\n", "feeds[0]", "line 3"),
            (
                "  - name: a\n    url: ftp://x/a\n",
                "feeds[0].url",
                "line 4",
            ),
            (
                "  - name: a\n    path: relative.txt\n",
                "feeds[0].path",
                "line 4",
            ),
            (
                "  - name: a\n    url: https://x/a\n    format: csv\n",
                "feeds[0].format",
                "line 5",
            ),
            (
                "  - name: A B\n    url: https://x/a\n",
                "feeds[0].name",
                "line 3",
            ),
            (
                "  - name: a\n    url: https://x/a\n    min_entries: 10\n    max_entries: 5\n",
                "feeds[0].min_entries",
                "line 5",
            ),
            (
                "  - name: a\n    url: https://x/a\n    refresh: soon\n",
                "feeds[0].refresh",
                "line 5",
            ),
        ] {
            let e = errors(&format!("{base}{feed}"));
            assert!(e.contains(key) && e.contains(line), "{feed}: {e}");
        }
    }

    #[test]
    fn metrics_listen_defaults_to_loopback_and_can_be_off() {
        let c = Config::parse("interfaces: [{name: a}]\n").unwrap();
        assert_eq!(c.metrics.listen.0, Some("127.0.0.1:9477".parse().unwrap()));
        for off in ["off", "\"off\""] {
            let c = Config::parse(&format!(
                "interfaces: [{{name: a}}]\nmetrics: {{listen: {off}}}\n"
            ))
            .unwrap();
            assert_eq!(c.metrics.listen.0, None);
        }
        let c =
            Config::parse("interfaces: [{name: a}]\nmetrics: {listen: \"[::1]:9100\"}\n").unwrap();
        assert_eq!(c.metrics.listen.0, Some("[::1]:9100".parse().unwrap()));
        let e = errors("interfaces: [{name: a}]\nmetrics:\n  listen: localhost\n");
        assert!(e.contains("metrics.listen") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_config_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let path =
            std::env::temp_dir().join(format!("api-shield-config-{}.yaml", std::process::id()));
        fs::write(&path, "interfaces: [{name: a}]\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o646)).unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("writable by others (mode 646)") && e.contains("chmod o-w"),
            "{e}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::from_file(&path).is_ok());
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn broken_yaml_is_refused_with_its_line() {
        let e = errors("interfaces: [\n");
        assert!(e.contains("line"), "{e}");
        let e = errors("- just\n- a list\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn locate_walks_keys_and_sequence_items() {
        let text = "# c\na:\n  b: 1\n  c:\n    - x: 1\n      y: 2\n    - x: 3\n      y: 4\nd: 5\n";
        assert_eq!(
            locate(
                text,
                &[Seg::Key("a"), Seg::Key("c"), Seg::Index(1), Seg::Key("y")]
            ),
            8
        );
        assert_eq!(
            locate(
                text,
                &[Seg::Key("a"), Seg::Key("c"), Seg::Index(0), Seg::Key("x")]
            ),
            5
        );
        assert_eq!(locate(text, &[Seg::Key("d")]), 9);
        assert_eq!(locate(text, &[Seg::Key("a"), Seg::Key("zz")]), 2);
    }

    #[test]
    fn durations_parse_and_refuse_garbage() {
        assert_eq!(
            "10m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(600)
        );
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("off".parse::<HumanDuration>().unwrap().0, Duration::ZERO);
        assert!("5x".parse::<HumanDuration>().unwrap_err().contains("5x"));
        assert!("".parse::<HumanDuration>().is_err());
    }
}
