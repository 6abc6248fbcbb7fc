//! An oracle for the data plane's verdicts, written from the specifications and from the
//! config's documented meaning, not from the data plane's code or the controller's:
//!
//! - frames are parsed another way: the IP datagram is cut out first (RFC 791 total
//!   length, RFC 8200 payload length), then its headers are read as a chain inside it;
//! - the policy is plain data (lists, ordered rules, bursts), and the config the program
//!   gets is written from it ([`Policy::yaml`]), never parsed back for the oracle;
//! - of each token bucket it knows only what GCRA guarantees whatever the clock: a bucket
//!   that has passed fewer packets than its burst passes the next one.
//!
//! What the README documents as policy rather than RFC (at most two VLAN tags and eight
//! IPv6 extension headers, a frame malformed past the IP header still under the default
//! limit, the allowlist winning over the blocklist) is written here from the README.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
};

use api_shield_common::counters::Reason;
use ipnet::IpNet;

/// What shares a bucket: sources in one IPv4 /`v4`, one IPv6 /`v6`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key {
    pub v4: u8,
    pub v6: u8,
}

impl Key {
    pub const SOURCE: Key = Key { v4: 32, v6: 128 };
}

/// A rule as the config documents it.
#[derive(Debug, Clone)]
pub struct PolicyRule {
    pub name: &'static str,
    /// `match.protocol`: the protocol numbers it stands for (icmp is ICMP and ICMPv6).
    pub protocols: Option<Vec<u8>>,
    /// `match.dst_ports`, inclusive ranges (TCP and UDP only).
    pub ports: Vec<(u16, u16)>,
    /// `match.tcp_flags: syn`: SYN set, ACK clear.
    pub syn: bool,
    /// Packets per second and burst; None: no limit.
    pub limit: Option<(u64, u64)>,
    pub key: Key,
    /// How the rule's `match` is written in YAML (the program's config).
    pub yaml_match: &'static str,
}

/// Lists, rules and limits, as data.
#[derive(Debug, Clone)]
pub struct Policy {
    pub allow: Vec<IpNet>,
    pub block: Vec<IpNet>,
    pub rules: Vec<PolicyRule>,
    /// The default limit: packets per second and burst.
    pub default_limit: (u64, u64),
    pub drop_malformed: bool,
    pub dry_run: bool,
    /// `capacity.blocklist` (and allowlist), per family.
    pub list_capacity: usize,
}

impl Policy {
    /// The config the program runs, written from the policy.
    pub fn yaml(&self) -> String {
        let mut y = String::from("interfaces: [{name: unused0}]\n");
        if self.drop_malformed {
            y.push_str("on_malformed: drop\n");
        }
        if self.dry_run {
            y.push_str("dry_run: true\n");
        }
        let _ = writeln!(
            y,
            "capacity: {{blocklist: {cap}, allowlist: {cap}}}",
            cap = self.list_capacity
        );
        let list = |nets: &[IpNet]| {
            nets.iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(y, "allowlist: [{}]", list(&self.allow));
        let _ = writeln!(y, "blocklist: [{}]", list(&self.block));
        let _ = writeln!(
            y,
            "limits:\n  default: {{pps: {}, burst_packets: {}}}\n  rules:",
            self.default_limit.0, self.default_limit.1
        );
        for r in &self.rules {
            let limit = match r.limit {
                Some((pps, burst)) => format!("pps: {pps}, burst_packets: {burst}"),
                None => "pps: 0".to_owned(),
            };
            let _ = writeln!(
                y,
                "    - {{name: {}, match: {}, {limit}, key: {{ipv4: {}, ipv6: {}}}}}",
                r.name, r.yaml_match, r.key.v4, r.key.v6
            );
        }
        y
    }
}

/// The transport layer as the oracle reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    pub protocol: u8,
    pub dst_port: u16,
    /// TCP with SYN set and ACK clear.
    pub syn: bool,
}

/// A frame, read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// Not IPv4 or IPv6.
    NonIp,
    /// Broken up to the fixed IP header: no source.
    Broken,
    /// A source, and its transport (None: broken past the IP header).
    Ip {
        source: IpAddr,
        transport: Option<Transport>,
    },
}

/// At most this many VLAN tags; more hide the packet (README, "How it works").
const MAX_VLAN_TAGS: usize = 2;
/// At most this many IPv6 extension headers before the transport header.
const MAX_EXTENSIONS: usize = 8;

/// Reads a frame from the RFCs: Ethernet and 802.1Q/802.1ad tags, then the IP datagram
/// its length field bounds, then the headers inside it.
pub fn read(frame: &[u8]) -> Read {
    let mut at = 12;
    let mut tags = 0;
    let ether_type = loop {
        let Some(t) = u16_at(frame, at) else {
            return Read::Broken;
        };
        if t != 0x8100 && t != 0x88a8 {
            break t;
        }
        tags += 1;
        if tags > MAX_VLAN_TAGS {
            return Read::Broken;
        }
        at += 4;
    };
    let l3 = &frame[(at + 2).min(frame.len())..];
    match ether_type {
        0x0800 => read_ipv4(l3),
        0x86dd => read_ipv6(l3),
        _ => Read::NonIp,
    }
}

/// RFC 791: version, IHL (header length in words, at least 5), total length (header and
/// data, at most what arrived), source at bytes 12-15, fragment offset in the low 13 bits
/// of bytes 6-7 (a fragment other than the first carries no transport header).
fn read_ipv4(packet: &[u8]) -> Read {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return Read::Broken;
    }
    let header = usize::from(packet[0] & 0xf) * 4;
    let total = usize::from(u16_at(packet, 2).unwrap_or(0));
    if header < 20 || total < header || total > packet.len() {
        return Read::Broken;
    }
    let source = IpAddr::from(<[u8; 4]>::try_from(&packet[12..16]).expect("4 bytes"));
    let datagram = &packet[..total];
    let protocol = packet[9];
    let fragment_offset = u16_at(packet, 6).unwrap_or(0) & 0x1fff;
    let transport = if fragment_offset != 0 {
        Some(Transport {
            protocol,
            dst_port: 0,
            syn: false,
        })
    } else {
        read_transport(protocol, &datagram[header..])
    };
    Read::Ip { source, transport }
}

/// RFC 8200: version, payload length (what follows the 40-byte header, at most what
/// arrived), source at bytes 8-23; then the chain of extension headers inside the payload.
fn read_ipv6(packet: &[u8]) -> Read {
    if packet.len() < 40 || packet[0] >> 4 != 6 {
        return Read::Broken;
    }
    let payload_len = usize::from(u16_at(packet, 4).unwrap_or(0));
    if 40 + payload_len > packet.len() {
        return Read::Broken;
    }
    let source = IpAddr::from(<[u8; 16]>::try_from(&packet[8..24]).expect("16 bytes"));
    let payload = &packet[40..40 + payload_len];
    Read::Ip {
        source,
        transport: read_chain(packet[6], payload),
    }
}

/// The extension headers (RFC 8200 4.3-4.6, RFC 4302 for AH) from `next`, each wholly
/// inside `rest`, then the transport header.
fn read_chain(mut next: u8, mut rest: &[u8]) -> Option<Transport> {
    let mut extensions = 0;
    loop {
        if matches!(next, 0 | 43 | 60 | 51 | 44) {
            extensions += 1;
            if extensions > MAX_EXTENSIONS {
                return None;
            }
        }
        let length = match next {
            // Hop-by-hop, routing, destination options: length in 8-octet units, not
            // counting the first 8.
            0 | 43 | 60 => 8 * (usize::from(*rest.get(1)?) + 1),
            // Authentication header: length in 4-octet units, less 2.
            51 => 4 * (usize::from(*rest.get(1)?) + 2),
            // Fragment: 8 octets; a non-zero offset means no transport header here.
            44 => {
                if rest.len() < 8 {
                    return None;
                }
                if u16_at(rest, 2)? >> 3 != 0 {
                    return Some(Transport {
                        protocol: rest[0],
                        dst_port: 0,
                        syn: false,
                    });
                }
                8
            }
            protocol => return read_transport(protocol, rest),
        };
        if rest.len() < length {
            return None;
        }
        next = rest[0];
        rest = &rest[length..];
    }
}

/// RFC 9293 (TCP: a 20-octet header, destination port at 2, flags at 13) and RFC 768
/// (UDP: 8 octets, destination port at 2); other protocols need no header.
fn read_transport(protocol: u8, rest: &[u8]) -> Option<Transport> {
    let (dst_port, syn) = match protocol {
        6 if rest.len() >= 20 => (u16_at(rest, 2)?, rest[13] & 0x12 == 0x02),
        17 if rest.len() >= 8 => (u16_at(rest, 2)?, false),
        6 | 17 => return None,
        _ => (0, false),
    };
    Some(Transport {
        protocol,
        dst_port,
        syn,
    })
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// Prefixes by length, for "is this address inside any of them".
#[derive(Default)]
struct PrefixSet {
    by_length: HashMap<u8, HashSet<IpNet>>,
}

impl PrefixSet {
    fn new(nets: &[IpNet]) -> PrefixSet {
        let mut set = PrefixSet::default();
        for net in nets {
            set.by_length
                .entry(net.prefix_len())
                .or_default()
                .insert(net.trunc());
        }
        set
    }

    fn contains(&self, addr: IpAddr) -> bool {
        self.by_length.iter().any(|(&len, nets)| {
            IpNet::new(addr, len)
                .ok()
                .is_some_and(|n| nets.contains(&n.trunc()))
        })
    }
}

/// The verdict the oracle expects for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    pub action: Action,
    pub reason: Reason,
    /// The limit slot whose counters move (0: default, i + 1: rule i); None: no limit
    /// was taken (lists, non-IP, broken before the source).
    pub slot: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pass,
    Drop,
}

/// The oracle: a policy, and what it has seen of each bucket.
pub struct Oracle {
    policy: Policy,
    allow: PrefixSet,
    block: PrefixSet,
    /// Packets each bucket has passed: (slot, masked source).
    passed: HashMap<(u32, IpAddr), u64>,
}

/// What a frame does to the oracle's knowledge, once the program's action is known.
pub struct Judged {
    pub expected: Expected,
    /// Where the oracle allows either action (a bucket past its burst: whether the clock
    /// refilled it is not the oracle's to know), the action taken decides the reason.
    pub either: bool,
    bucket: Option<(u32, IpAddr)>,
}

impl Oracle {
    pub fn new(policy: Policy) -> Oracle {
        Oracle {
            allow: PrefixSet::new(&policy.allow),
            block: PrefixSet::new(&policy.block),
            policy,
            passed: HashMap::new(),
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The verdict for `frame`, before its action is known.
    pub fn judge(&self, frame: &[u8]) -> Judged {
        let p = &self.policy;
        let drop = |reason: Reason, would: Reason| {
            if p.dry_run {
                (Action::Pass, would)
            } else {
                (Action::Drop, reason)
            }
        };
        let malformed = || {
            if p.drop_malformed {
                drop(Reason::Malformed, Reason::WouldDropMalformed)
            } else {
                (Action::Pass, Reason::Malformed)
            }
        };
        let fixed = |(action, reason): (Action, Reason), slot| Judged {
            expected: Expected {
                action,
                reason,
                slot,
            },
            either: false,
            bucket: None,
        };
        let (source, transport) = match read(frame) {
            Read::NonIp => return fixed((Action::Pass, Reason::NonIp), None),
            Read::Broken => return fixed(malformed(), None),
            Read::Ip { source, transport } => (source, transport),
        };
        // The allowlist wins over the blocklist, whatever the prefix lengths (README).
        if self.allow.contains(source) {
            return fixed((Action::Pass, Reason::Allowlisted), None);
        }
        if self.block.contains(source) {
            return fixed(
                drop(Reason::Blocklisted, Reason::WouldDropBlocklisted),
                None,
            );
        }
        // A frame broken past the IP header is under the default limit (README).
        let rule = transport.and_then(|t| self.first_rule(&t));
        let (slot, limit, key) = match rule {
            Some(i) => {
                let r = &p.rules[i];
                (i as u32 + 1, r.limit, r.key)
            }
            None => (0, Some(p.default_limit), Key::SOURCE),
        };
        let after_limit = if transport.is_some() {
            (Action::Pass, Reason::Passed)
        } else {
            malformed()
        };
        let Some((_, burst)) = limit else {
            return fixed(after_limit, Some(slot));
        };
        let bucket = (slot, masked(source, key));
        let passed = self.passed.get(&bucket).copied().unwrap_or(0);
        Judged {
            expected: Expected {
                action: after_limit.0,
                reason: after_limit.1,
                slot: Some(slot),
            },
            // Under its burst a bucket certainly conforms; past it, the clock decides.
            either: passed >= burst,
            bucket: Some(bucket),
        }
    }

    /// Records what the program did with a frame the oracle judged; returns the verdict
    /// the counters must show, or None if the action is one the oracle rules out. A
    /// verdict whose reason is [`Reason::WouldDropRateLimited`] under a dry run may have
    /// been counted as [`Reason::Passed`] instead ([`Oracle::dry_either`] says which).
    pub fn settle(&mut self, judged: &Judged, action: Action) -> Option<Expected> {
        let p = &self.policy;
        let mut expected = judged.expected;
        if action != expected.action {
            // Only a bucket past its burst may have dropped what would pass (or, under a
            // dry run, counted it as a would-drop and passed it anyway).
            if !judged.either || p.dry_run {
                return None;
            }
            expected = Expected {
                action: Action::Drop,
                reason: Reason::RateLimited,
                ..expected
            };
        } else if judged.either && p.dry_run {
            // A dry run passes either way: the counters settle whether it was over. The
            // bucket is counted as passed: an upper bound keeps `either` on the safe side.
            if let Some(bucket) = judged.bucket {
                *self.passed.entry(bucket).or_insert(0) += 1;
            }
            return Some(Expected {
                reason: Reason::WouldDropRateLimited,
                ..expected
            });
        }
        if let Some(bucket) = judged.bucket
            && expected.reason != Reason::RateLimited
        {
            *self.passed.entry(bucket).or_insert(0) += 1;
        }
        Some(expected)
    }

    /// Whether a settled verdict is a dry run's bucket past its burst: counted as a
    /// pass or as a would-drop, as the clock had it.
    pub fn dry_either(&self, judged: &Judged) -> bool {
        self.policy.dry_run && judged.either
    }

    fn first_rule(&self, t: &Transport) -> Option<usize> {
        self.policy.rules.iter().position(|r| {
            let protocol = match &r.protocols {
                Some(ps) => ps.contains(&t.protocol),
                // Ports without a protocol mean TCP or UDP.
                None => r.ports.is_empty() || t.protocol == 6 || t.protocol == 17,
            };
            let port = r.ports.is_empty()
                || ((t.protocol == 6 || t.protocol == 17)
                    && r.ports.iter().any(|&(a, b)| (a..=b).contains(&t.dst_port)));
            let flags = !r.syn || (t.protocol == 6 && t.syn);
            protocol && port && flags
        })
    }
}

/// `addr` masked to its key's prefix.
fn masked(addr: IpAddr, key: Key) -> IpAddr {
    let len = if addr.is_ipv4() { key.v4 } else { key.v6 };
    IpNet::new(addr, len).map_or(addr, |n| n.network())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::*;

    #[test]
    fn a_transport_header_past_the_datagram_is_not_read() {
        let mut f = udp4("198.18.0.1".parse().unwrap(), 0);
        // Total length: the IPv4 header alone; the UDP header becomes padding.
        f[16..18].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(
            read(&f),
            Read::Ip {
                source: "198.18.0.1".parse().unwrap(),
                transport: None
            }
        );
    }

    #[test]
    fn nine_extension_headers_are_too_many_and_eight_are_not() {
        let src = "2001:db8::1".parse().unwrap();
        let dst = "2001:db8::2".parse().unwrap();
        let frame = |n| {
            eth(
                &[],
                ETH_P_IPV6,
                &ipv6(
                    src,
                    dst,
                    &vec![Ext::DestOpts; n],
                    IPPROTO_UDP,
                    &udp(1, 53, 0),
                ),
            )
        };
        assert!(matches!(
            read(&frame(8)),
            Read::Ip {
                transport: Some(Transport { dst_port: 53, .. }),
                ..
            }
        ));
        assert!(matches!(
            read(&frame(9)),
            Read::Ip {
                transport: None,
                ..
            }
        ));
    }
}
