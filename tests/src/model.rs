//! A reference model of the data plane's verdict, written from the spec rather than from
//! the eBPF code: what a frame should get under a config, to check the loaded program
//! against on millions of random and mutated frames.
//!
//! It covers everything but time: the token buckets are left to the tests that control
//! time, so a fuzzing config gives its limits bursts no test can exhaust, except where the
//! model answers [`Expect::Limited`] with either action allowed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use api_shield::config::{Config, Protocol, Rule, TcpFlags};
use api_shield_common::counters::Reason;
use ipnet::IpNet;

/// What the model says a frame gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    NonIp,
    /// Malformed up to the fixed IP header: no source, no limiter.
    MalformedL3,
    Allowlisted,
    Blocklisted,
    /// Under limit slot `slot` (0: default); `complete`: the transport header was read,
    /// else the frame is malformed after the limiter.
    Limited {
        slot: u32,
        complete: bool,
    },
}

/// The transport layer as the model reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    pub protocol: u8,
    pub dst_port: u16,
    pub syn: bool,
}

pub struct Model {
    allow: Vec<IpNet>,
    block: Vec<IpNet>,
    rules: Vec<Rule>,
    pub drop_malformed: bool,
    pub dry_run: bool,
}

impl Model {
    pub fn new(config: &Config) -> Model {
        Model {
            allow: config.allowlist.clone(),
            block: config.blocklist.clone(),
            rules: config.limits.rules.clone(),
            drop_malformed: config.on_malformed == api_shield::config::OnMalformed::Drop,
            dry_run: config.dry_run,
        }
    }

    /// The verdict class of `frame`.
    pub fn expect(&self, frame: &[u8]) -> Expect {
        let Some((ether_type, l3)) = ethernet(frame) else {
            return Expect::MalformedL3;
        };
        let (source, transport) = match ether_type {
            0x0800 => match ipv4(frame, l3) {
                Some(v) => v,
                None => return Expect::MalformedL3,
            },
            0x86dd => match ipv6(frame, l3) {
                Some(v) => v,
                None => return Expect::MalformedL3,
            },
            _ => return Expect::NonIp,
        };
        // The allowlist wins over the blocklist, whatever their prefix lengths.
        if self.allow.iter().any(|n| n.contains(&source)) {
            return Expect::Allowlisted;
        }
        if self.block.iter().any(|n| n.contains(&source)) {
            return Expect::Blocklisted;
        }
        match transport {
            Some(t) => Expect::Limited {
                slot: self.rule_slot(&t),
                complete: true,
            },
            None => Expect::Limited {
                slot: 0,
                complete: false,
            },
        }
    }

    /// The limit slot of the first rule matching `t` (rule i is slot i + 1), else 0.
    pub fn rule_slot(&self, t: &Transport) -> u32 {
        self.rules
            .iter()
            .position(|r| matches(r, t))
            .map_or(0, |i| i as u32 + 1)
    }

    /// The reason counter a frame of `expect` moves, given the action the program took
    /// where the model allows either (a limit that may run out).
    pub fn reason(&self, expect: Expect, limiter_dropped: bool) -> Reason {
        let dry = |r: Reason, wd: Reason| if self.dry_run { wd } else { r };
        match expect {
            Expect::NonIp => Reason::NonIp,
            Expect::MalformedL3
            | Expect::Limited {
                complete: false, ..
            } if !limiter_dropped => {
                if self.drop_malformed {
                    dry(Reason::Malformed, Reason::WouldDropMalformed)
                } else {
                    Reason::Malformed
                }
            }
            Expect::Allowlisted => Reason::Allowlisted,
            Expect::Blocklisted => dry(Reason::Blocklisted, Reason::WouldDropBlocklisted),
            _ if limiter_dropped => dry(Reason::RateLimited, Reason::WouldDropRateLimited),
            _ => Reason::Passed,
        }
    }

    /// Whether a frame moving `reason` is dropped.
    pub fn dropped(&self, reason: Reason) -> bool {
        match reason {
            Reason::Blocklisted | Reason::RateLimited => true,
            Reason::Malformed => self.drop_malformed,
            _ => false,
        }
    }
}

fn matches(rule: &Rule, t: &Transport) -> bool {
    let m = &rule.matcher;
    let protocol_ok = match m.protocol {
        Some(Protocol::Tcp) => t.protocol == 6,
        Some(Protocol::Udp) => t.protocol == 17,
        Some(Protocol::Icmp) => t.protocol == 1 || t.protocol == 58,
        Some(Protocol::Icmpv6) => t.protocol == 58,
        Some(Protocol::Number(n)) => t.protocol == n,
        // Ports without a protocol mean TCP or UDP.
        None => m.dst_ports.is_empty() || t.protocol == 6 || t.protocol == 17,
    };
    let ports_ok = m.dst_ports.is_empty()
        || m.dst_ports
            .iter()
            .any(|r| (r.first..=r.last).contains(&t.dst_port));
    let flags_ok = match m.tcp_flags {
        Some(TcpFlags::Syn) => t.protocol == 6 && t.syn,
        None => true,
    };
    protocol_ok && ports_ok && flags_ok
}

/// Skips Ethernet and up to two VLAN tags: (EtherType, offset of the L3 header).
fn ethernet(f: &[u8]) -> Option<(u16, usize)> {
    let mut ether_type = be16(f, 12)?;
    let mut offset = 14;
    let is_vlan = |t| t == 0x8100 || t == 0x88a8;
    for _ in 0..2 {
        if !is_vlan(ether_type) {
            break;
        }
        ether_type = be16(f, offset + 2)?;
        offset += 4;
    }
    if is_vlan(ether_type) {
        return None;
    }
    Some((ether_type, offset))
}

type Parsed = (IpAddr, Option<Transport>);

fn ipv4(f: &[u8], off: usize) -> Option<Parsed> {
    let h = f.get(off..off + 20)?;
    let header_len = usize::from(h[0] & 0x0f) * 4;
    let total_len = usize::from(u16::from_be_bytes([h[2], h[3]]));
    if h[0] >> 4 != 4 || header_len < 20 || total_len < header_len || off + total_len > f.len() {
        return None;
    }
    let source = IpAddr::V4(Ipv4Addr::new(h[12], h[13], h[14], h[15]));
    let protocol = h[9];
    let non_first = u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0;
    let transport = if non_first {
        Some(Transport {
            protocol,
            dst_port: 0,
            syn: false,
        })
    } else {
        transport(f, protocol, off + header_len)
    };
    Some((source, transport))
}

fn ipv6(f: &[u8], off: usize) -> Option<Parsed> {
    let h = f.get(off..off + 40)?;
    let payload_len = usize::from(u16::from_be_bytes([h[4], h[5]]));
    if h[0] >> 4 != 6 || off + 40 + payload_len > f.len() {
        return None;
    }
    let source = IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&h[8..24]).ok()?));
    Some((source, ipv6_transport(f, h[6], off + 40)))
}

const EXTENSIONS: [u8; 5] = [0, 43, 60, 44, 51];

/// Up to 8 extension headers, then the transport header.
fn ipv6_transport(f: &[u8], first: u8, mut offset: usize) -> Option<Transport> {
    let mut next = first;
    for _ in 0..8 {
        match next {
            0 | 43 | 60 => {
                let e = f.get(offset..offset + 2)?;
                next = e[0];
                offset += (usize::from(e[1]) + 1) * 8;
            }
            51 => {
                let e = f.get(offset..offset + 2)?;
                next = e[0];
                offset += (usize::from(e[1]) + 2) * 4;
            }
            44 => {
                let e = f.get(offset..offset + 8)?;
                next = e[0];
                offset += 8;
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    return Some(Transport {
                        protocol: next,
                        dst_port: 0,
                        syn: false,
                    });
                }
            }
            _ => break,
        }
    }
    if EXTENSIONS.contains(&next) {
        return None;
    }
    transport(f, next, offset)
}

fn transport(f: &[u8], protocol: u8, offset: usize) -> Option<Transport> {
    let (dst_port, syn) = match protocol {
        6 => {
            let t = f.get(offset..offset + 20)?;
            (u16::from_be_bytes([t[2], t[3]]), t[13] & 0x12 == 0x02)
        }
        17 => {
            let u = f.get(offset..offset + 8)?;
            (u16::from_be_bytes([u[2], u[3]]), false)
        }
        _ => (0, false),
    };
    Some(Transport {
        protocol,
        dst_port,
        syn,
    })
}

fn be16(f: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(at)?, *f.get(at + 1)?]))
}

/// SplitMix64: a tiny seeded generator, so every fuzzing run can be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}
