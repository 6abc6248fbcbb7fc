//! The packet fuzzer: random and mutated frames (seeded, reproducible) through a loaded
//! program with BPF_PROG_TEST_RUN, each checked against the independent oracle in
//! [`crate::oracle`]: the action of every frame, and every reason and rule counter per
//! batch of frames (a batch that disagrees is run again frame by frame to name the one).
//! Shared by the fuzz tests and the mutation tests, which must see it fail.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::{Result, bail};
use api_shield::shield::Shield;
use api_shield_common::counters::Reason;
use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::IpNet;

use crate::{
    frames::*,
    oracle::{Action, Expected, Judged, Key, Oracle, Policy, PolicyRule},
    rng::Rng,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Frames per batch between counter reads.
const BATCH: usize = 64;

/// The lists with edges (a blocked half inside an allowed /24, a blocked /64 inside an
/// allowed /48), rules of every shape, overlapping so that their order matters, each with
/// a small burst of its own so that a wrong rule changes actions.
pub fn edges_policy() -> Policy {
    let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<IpNet>>();
    let rule =
        |name, protocols: Option<Vec<u8>>, ports: Vec<(u16, u16)>, syn, limit, key, yaml_match| {
            PolicyRule {
                name,
                protocols,
                ports,
                syn,
                limit,
                key,
                yaml_match,
            }
        };
    Policy {
        allow: nets(&["198.51.100.0/24", "2001:db8:a11::/48"]),
        block: nets(&[
            "192.0.2.0/24",
            "203.0.113.0/25",
            "198.51.100.128/25",
            "2001:db8:bad::/48",
            "2001:db8:a11:1::/64",
        ]),
        rules: vec![
            rule(
                "web",
                Some(vec![6]),
                vec![(80, 80), (443, 443), (8000, 8999)],
                false,
                Some((1, 4)),
                Key { v4: 24, v6: 64 },
                "{protocol: tcp, dst_ports: [80, 443, \"8000-8999\"]}",
            ),
            rule(
                "syn",
                Some(vec![6]),
                vec![],
                true,
                Some((1, 5)),
                Key::SOURCE,
                "{protocol: tcp, tcp_flags: syn}",
            ),
            rule(
                "dns",
                Some(vec![17]),
                vec![(53, 53)],
                false,
                None,
                Key::SOURCE,
                "{protocol: udp, dst_ports: [53]}",
            ),
            rule(
                "ping",
                Some(vec![1, 58]),
                vec![],
                false,
                Some((1, 6)),
                Key::SOURCE,
                "{protocol: icmp}",
            ),
            rule(
                "port0",
                None,
                vec![(0, 0)],
                false,
                Some((1, 7)),
                Key::SOURCE,
                "{dst_ports: [0]}",
            ),
            rule(
                "gre",
                Some(vec![47]),
                vec![],
                false,
                Some((1, 8)),
                Key { v4: 16, v6: 48 },
                "{protocol: 47}",
            ),
        ],
        default_limit: (1, 1_000_000_000),
        drop_malformed: true,
        dry_run: false,
        list_capacity: 1024,
    }
}

/// Sources for [`edges_policy`]: inside and beside its lists, and elsewhere.
pub fn edges_source(rng: &mut Rng, v6: bool) -> IpAddr {
    if v6 {
        let low = rng.next_u64() & 0xffff;
        let high: u128 = match rng.below(6) {
            0 => 0x2001_0db8_0a11_0000 << 64,
            1 => 0x2001_0db8_0a11_0001 << 64,
            2 => 0x2001_0db8_0bad_0000 << 64,
            3 => 0x2001_0db8_0bae_0000 << 64,
            4 => 0x2001_0db8_ffff_0000 << 64 | u128::from(rng.next_u64() & 0xffff) << 64,
            _ => u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
        };
        IpAddr::V6(Ipv6Addr::from(high | u128::from(low)))
    } else {
        let host = rng.below(256) as u8;
        IpAddr::V4(match rng.below(7) {
            0 => Ipv4Addr::new(198, 51, 100, host),
            1 => Ipv4Addr::new(192, 0, 2, host),
            2 => Ipv4Addr::new(203, 0, 113, host),
            3 => Ipv4Addr::new(192, 0, 3, host),
            4 | 5 => Ipv4Addr::new(198, 18, rng.below(256) as u8, host),
            _ => Ipv4Addr::from(rng.next_u64() as u32),
        })
    }
}

/// Lists that take every lookup path: over 1,024 IPv6 entries (so the hash probes are on)
/// of every length, IPv6 entries of /25 to /39 (inner verdicts), IPv4 whole addresses
/// (the exact-match map), entries of /25 to /31 (inner verdicts) and shorter ones; a tenth
/// of them allowed, some inside blocked ones.
pub fn lookups_policy(seed: u64) -> (Policy, Vec<IpNet>) {
    let mut rng = Rng::new(seed);
    let mut entries: std::collections::BTreeSet<IpNet> = std::collections::BTreeSet::new();
    let v6_bases: [u128; 4] = [
        0x2001_0db8 << 96,
        0x2001_0db9 << 96,
        0x2a00_1450 << 96,
        0x2400_cb00 << 96,
    ];
    // The first two bases hold only entries of /48 or longer, spread over 64 /40s each:
    // half of those /40s only of the hashed lengths (their sources take the hash probes),
    // half with other lengths too (they walk the trie). The other two bases mix in /25
    // to /39 (inner verdicts, and /32s that ask the trie for what lies inside them).
    const HASHED: [u8; 4] = [48, 56, 64, 128];
    const OTHER: [u8; 6] = [52, 60, 63, 72, 96, 127];
    const SHORT: [u8; 7] = [25, 28, 31, 32, 33, 36, 39];
    while entries.iter().filter(|n| !n.addr().is_ipv4()).count() < 1300 {
        let which = rng.below(4);
        let slash40 = rng.below(64) as u128;
        let len = match which {
            0 | 1 if slash40 < 32 || rng.chance(70) => *rng.pick(&HASHED),
            0 | 1 => *rng.pick(&OTHER),
            _ if rng.chance(20) => *rng.pick(&SHORT),
            _ => *rng.pick(&HASHED),
        };
        let low = u128::from(rng.next_u64()) << 24 | u128::from(rng.next_u64() & 0xff_ffff);
        let addr = v6_bases[which] | slash40 << 88 | low;
        entries.insert(
            IpNet::new(IpAddr::V6(Ipv6Addr::from(addr)), len)
                .unwrap()
                .trunc(),
        );
    }
    let v4_bases: [u32; 4] = [0x0a00_0000, 0xac10_0000, 0xc612_0000, 0x6440_0000];
    while entries.iter().filter(|n| n.addr().is_ipv4()).count() < 900 {
        let base = *rng.pick(&v4_bases);
        let len = *rng.pick(&[
            32u8, 32, 32, 32, 32, 32, 31, 30, 29, 28, 27, 25, 24, 22, 20, 16,
        ]);
        let addr = base | (rng.next_u64() as u32 & 0x000f_ffff);
        entries.insert(
            IpNet::new(IpAddr::V4(Ipv4Addr::from(addr)), len)
                .unwrap()
                .trunc(),
        );
    }
    let entries: Vec<IpNet> = entries.into_iter().collect();
    let (mut allow, mut block) = (Vec::new(), Vec::new());
    for (i, net) in entries.iter().enumerate() {
        if i % 10 == 3 {
            allow.push(*net);
        } else {
            block.push(*net);
        }
    }
    let mut policy = edges_policy();
    policy.allow = allow;
    policy.block = block;
    policy.list_capacity = 4096;
    (policy, entries)
}

/// Sources for [`lookups_policy`]: mostly inside an entry (a random host of it), some
/// just past its end, some anywhere.
pub fn lookups_source(entries: &[IpNet]) -> impl Fn(&mut Rng, bool) -> IpAddr + '_ {
    move |rng, v6| {
        let family: Vec<&IpNet> = entries
            .iter()
            .filter(|n| n.addr().is_ipv4() != v6)
            .collect();
        let net = rng.pick(&family);
        match (rng.below(10), net) {
            (0..=6, IpNet::V4(n)) => {
                let host = rng.next_u64() as u32 & !u32::from(n.netmask());
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
            }
            (0..=6, IpNet::V6(n)) => {
                let host = (u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()))
                    & !u128::from(n.netmask());
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
            }
            (7..=8, IpNet::V4(n)) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(n.broadcast()).wrapping_add(1)))
            }
            (7..=8, IpNet::V6(n)) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(n.broadcast()).wrapping_add(1)))
            }
            (_, IpNet::V4(_)) => IpAddr::V4(Ipv4Addr::from(rng.next_u64() as u32)),
            (_, IpNet::V6(_)) => IpAddr::V6(Ipv6Addr::from(
                u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
            )),
        }
    }
}

const PORTS: [u16; 14] = [
    0, 22, 53, 79, 80, 81, 443, 7999, 8000, 8500, 8999, 9000, 65535, 1,
];

fn transport_payload(rng: &mut Rng, v6: bool) -> (u8, Vec<u8>) {
    let port = if rng.chance(85) {
        *rng.pick(&PORTS)
    } else {
        rng.next_u64() as u16
    };
    match rng.below(8) {
        0..=2 => {
            let flags = match rng.below(5) {
                0 => TCP_SYN,
                1 => TCP_SYN | TCP_ACK,
                2 => TCP_ACK,
                _ => rng.next_u64() as u8,
            };
            (IPPROTO_TCP, tcp(40000, port, flags))
        }
        3..=4 => (IPPROTO_UDP, udp(40000, port, rng.below(64))),
        5 => (if v6 { IPPROTO_ICMPV6 } else { IPPROTO_ICMP }, echo(8)),
        6 => (47, vec![0; 4 + rng.below(40)]),
        _ => {
            let len = rng.below(48);
            (
                rng.next_u64() as u8,
                (0..len).map(|_| rng.next_u64() as u8).collect(),
            )
        }
    }
}

/// A well-formed frame: VLAN tags (up to three), IPv4 with options and fragments or IPv6
/// with up to nine extension headers, and a transport of any kind.
pub fn valid_frame(rng: &mut Rng, source: &dyn Fn(&mut Rng, bool) -> IpAddr) -> Vec<u8> {
    let v6 = rng.chance(40);
    let (protocol, payload) = transport_payload(rng, v6);
    let (ether_type, packet) = match source(rng, v6) {
        IpAddr::V6(src) => {
            let exts: Vec<Ext> = (0..[0, 0, 0, 1, 1, 2, 3, 8, 9][rng.below(9)])
                .map(|_| match rng.below(5) {
                    0 => Ext::HopByHop,
                    1 => Ext::Routing,
                    2 => Ext::DestOpts,
                    3 => Ext::Auth,
                    _ => Ext::Fragment {
                        offset: if rng.chance(50) {
                            0
                        } else {
                            rng.below(8000) as u16
                        },
                        more: rng.chance(50),
                    },
                })
                .collect();
            let dst: Ipv6Addr = "2001:db8:ffff::1".parse().unwrap();
            (ETH_P_IPV6, ipv6(src, dst, &exts, protocol, &payload))
        }
        IpAddr::V4(src) => {
            let options: Vec<u8> = (0..rng.below(11) * 4)
                .map(|_| rng.next_u64() as u8)
                .collect();
            let frag = if rng.chance(15) {
                Frag {
                    more: rng.chance(50),
                    offset: if rng.chance(50) {
                        0
                    } else {
                        rng.below(8000) as u16
                    },
                }
            } else {
                Frag::default()
            };
            let dst = Ipv4Addr::new(198, 18, 0, 1);
            (ETH_P_IP, ipv4(src, dst, protocol, &options, frag, &payload))
        }
    };
    let tags = [0, 0, 0, 0, 0, 0, 1, 1, 2, 3][rng.below(10)];
    let tpids: Vec<u16> = (0..tags)
        .map(|_| {
            if rng.chance(50) {
                ETH_P_8021Q
            } else {
                ETH_P_8021AD
            }
        })
        .collect();
    eth(&tpids, ether_type, &packet)
}

/// Mutations aimed at what the parser reads (lengths, types, version), then anywhere.
pub fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let len = f.len();
        match rng.below(8) {
            0 => f.truncate(14 + rng.below(len.saturating_sub(13).max(1))),
            1 => {
                let at = rng.below(len.min(120));
                f[at] = rng.next_u64() as u8;
            }
            2 => {
                let at = rng.below(len.min(120));
                f[at] ^= 1 << rng.below(8);
            }
            // The EtherType, the IPv4 version/IHL and length, the IPv6 payload length and
            // next header (for an untagged frame).
            3 => f[12 + rng.below(2)] = rng.next_u64() as u8,
            4 if len > 20 => f[14 + [0, 2, 3, 4, 5, 6][rng.below(6)]] = rng.next_u64() as u8,
            5 => f.extend((0..rng.below(32)).map(|_| rng.next_u64() as u8)),
            // Ethernet padding: bytes past the datagram, which are not its own.
            6 => f.extend(std::iter::repeat_n(0, 1 + rng.below(40))),
            _ => {
                let at = rng.below(len);
                f[at] = 0;
            }
        }
    }
}

/// What a fuzzing run did.
#[derive(Debug, Default)]
pub struct Report {
    pub ran: usize,
    pub tally: BTreeMap<&'static str, u64>,
}

/// A frame (or a batch's counters) the program and the oracle disagree on.
#[derive(Debug)]
pub struct Disagreement(pub String);

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn run(shield: &mut Shield, frame: &[u8]) -> Result<Option<u32>> {
    let result = shield.program()?.test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: 1,
        ..TestRunOptions::default()
    });
    match result {
        Ok(r) => Ok(Some(r.return_value)),
        // The kernel refuses test frames shorter than an Ethernet header (no NIC delivers
        // one); the fuzzer only makes those by truncation.
        Err(_) if frame.len() < 14 => Ok(None),
        Err(e) => bail!("test run failed on {frame:02x?}: {e}"),
    }
}

/// The counters a batch moves: per reason, and per limit slot (passed, dropped,
/// would-drop), with the dry-run frames that may be either of the last two.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Counts {
    reasons: BTreeMap<Reason, u64>,
    slots: BTreeMap<u32, [u64; 3]>,
    /// Dry-run frames of a bucket past its burst, per slot: passed or would-drop.
    either: BTreeMap<u32, u64>,
}

impl Counts {
    fn add(&mut self, e: &Expected, dry_either: bool) {
        if let Some(slot) = e.slot {
            if dry_either {
                *self.either.entry(slot).or_default() += 1;
                return;
            }
            let column = match e.reason {
                Reason::RateLimited => 1,
                Reason::WouldDropRateLimited => 2,
                _ => 0,
            };
            self.slots.entry(slot).or_default()[column] += 1;
        }
        *self.reasons.entry(e.reason).or_default() += 1;
    }

    /// Whether `actual` is what these allow.
    fn allows(&self, actual: &Counts) -> bool {
        let either_total: u64 = self.either.values().sum();
        for r in Reason::ALL {
            let want = self.reasons.get(&r).copied().unwrap_or(0);
            let got = actual.reasons.get(&r).copied().unwrap_or(0);
            let slack = if matches!(r, Reason::Passed | Reason::WouldDropRateLimited) {
                either_total
            } else {
                0
            };
            if got < want || got > want + slack {
                return false;
            }
        }
        let passed_or_would = |c: &Counts, r| c.reasons.get(&r).copied().unwrap_or(0);
        if passed_or_would(actual, Reason::Passed)
            + passed_or_would(actual, Reason::WouldDropRateLimited)
            != passed_or_would(self, Reason::Passed)
                + passed_or_would(self, Reason::WouldDropRateLimited)
                + either_total
        {
            return false;
        }
        let slots: std::collections::BTreeSet<u32> = self
            .slots
            .keys()
            .chain(self.either.keys())
            .chain(actual.slots.keys())
            .copied()
            .collect();
        slots.into_iter().all(|s| {
            let want = self.slots.get(&s).copied().unwrap_or_default();
            let got = actual.slots.get(&s).copied().unwrap_or_default();
            let either = self.either.get(&s).copied().unwrap_or(0);
            got[1] == want[1]
                && got[0] >= want[0]
                && got[2] >= want[2]
                && got[0] + got[2] == want[0] + want[2] + either
        })
    }
}

/// The counters now: per reason, and per slot of `slots`.
fn counters(shield: &Shield, slots: u32) -> Result<Counts> {
    let mut c = Counts::default();
    for (reason, counter) in shield.counters()? {
        c.reasons.insert(reason, counter.packets);
    }
    for slot in 0..slots {
        let r = shield.rule_counter(slot)?;
        c.slots.insert(
            slot,
            [r.passed_packets, r.dropped_packets, r.would_drop_packets],
        );
    }
    Ok(c)
}

fn delta(after: &Counts, before: &Counts) -> Counts {
    let mut d = Counts::default();
    for (r, n) in &after.reasons {
        let v = n - before.reasons.get(r).copied().unwrap_or(0);
        if v > 0 {
            d.reasons.insert(*r, v);
        }
    }
    for (s, n) in &after.slots {
        let b = before.slots.get(s).copied().unwrap_or_default();
        let v = [n[0] - b[0], n[1] - b[1], n[2] - b[2]];
        if v != [0, 0, 0] {
            d.slots.insert(*s, v);
        }
    }
    d
}

fn action_of(ret: u32) -> Option<Action> {
    match ret {
        XDP_PASS => Some(Action::Pass),
        XDP_DROP => Some(Action::Drop),
        _ => None,
    }
}

/// Fuzzes `shield`, configured as `oracle`'s policy says (or deliberately not, by a
/// mutation test), with `count` frames from `seed`.
pub fn fuzz(
    shield: &mut Shield,
    oracle: &mut Oracle,
    source: &dyn Fn(&mut Rng, bool) -> IpAddr,
    seed: u64,
    count: usize,
) -> Result<Report, Disagreement> {
    let fail = |m: String| Disagreement(format!("{m} (seed {seed})"));
    let slots = oracle.policy().rules.len() as u32 + 1;
    let mut rng = Rng::new(seed);
    let mut report = Report::default();
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    let mut want = Counts::default();
    let mut before = counters(shield, slots).map_err(|e| fail(format!("{e:#}")))?;
    let mut i = 0;
    while i < count {
        let mut frame = valid_frame(&mut rng, source);
        if rng.chance(50) {
            mutate(&mut rng, &mut frame);
            *report.tally.entry("mutated").or_default() += 1;
        }
        i += 1;
        let judged = oracle.judge(&frame);
        let Some(ret) = run(shield, &frame).map_err(|e| fail(format!("{e:#}")))? else {
            *report
                .tally
                .entry("refused by the kernel (< 14 bytes)")
                .or_default() += 1;
            continue;
        };
        report.ran += 1;
        let settled = action_of(ret).and_then(|action| oracle.settle(&judged, action));
        let Some(expected) = settled else {
            return Err(fail(format!(
                "frame {i}: the program returned {ret}, the oracle expects {:?}{} on {frame:02x?}",
                judged.expected,
                if judged.either { " (or a drop)" } else { "" }
            )));
        };
        *report
            .tally
            .entry(tally_name(&expected, &judged))
            .or_default() += 1;
        want.add(&expected, oracle.dry_either(&judged));
        batch.push(frame);
        if batch.len() == BATCH || i == count {
            let after = counters(shield, slots).map_err(|e| fail(format!("{e:#}")))?;
            let got = delta(&after, &before);
            if !want.allows(&got) {
                return Err(fail(format!(
                    "frames {}..={i}: the counters moved {got:?}, the oracle expects {want:?}; \
                     the batch: {}",
                    i + 1 - batch.len(),
                    name_the_frame(shield, oracle, &batch, slots)
                )));
            }
            before = after;
            want = Counts::default();
            batch.clear();
        }
    }
    Ok(report)
}

/// Runs a batch that disagreed again, one frame at a time, and names the first whose
/// counters differ from the oracle's (whose buckets go on from where they were).
fn name_the_frame(
    shield: &mut Shield,
    oracle: &mut Oracle,
    batch: &[Vec<u8>],
    slots: u32,
) -> String {
    for frame in batch {
        let Ok(before) = counters(shield, slots) else {
            return "counters unreadable".into();
        };
        let judged = oracle.judge(frame);
        let Ok(Some(ret)) = run(shield, frame) else {
            continue;
        };
        let Some(expected) = action_of(ret).and_then(|a| oracle.settle(&judged, a)) else {
            return format!("{frame:02x?}: action {ret}, expected {:?}", judged.expected);
        };
        let mut want = Counts::default();
        want.add(&expected, oracle.dry_either(&judged));
        let Ok(after) = counters(shield, slots) else {
            return "counters unreadable".into();
        };
        let got = delta(&after, &before);
        if !want.allows(&got) {
            return format!("{frame:02x?} moved {got:?}, expected {want:?}");
        }
    }
    "no single frame disagrees when run again".into()
}

fn tally_name(e: &Expected, judged: &Judged) -> &'static str {
    match (e.reason, e.slot, judged.either) {
        (Reason::NonIp, _, _) => "non-IP",
        (Reason::Allowlisted, _, _) => "allowlisted",
        (Reason::Blocklisted | Reason::WouldDropBlocklisted, _, _) => "blocklisted",
        (Reason::Malformed | Reason::WouldDropMalformed, None, _) => "malformed at L2/L3",
        (Reason::Malformed | Reason::WouldDropMalformed, Some(_), _) => "malformed past L3",
        (_, Some(0), _) => "default limit",
        (_, _, false) => "a rule's limit, under its burst",
        (_, _, true) => "a rule's limit, past its burst",
    }
}

/// Also a check on the oracle itself: its policy's config is what the program gets.
pub fn load(policy: &Policy) -> Shield {
    let config = api_shield::config::Config::parse(&policy.yaml())
        .unwrap_or_else(|e| panic!("the policy's config is refused: {e}\n{}", policy.yaml()));
    Shield::from_config(&config).expect("loading the program")
}
