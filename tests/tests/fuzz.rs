//! Packet fuzzing: at least a million random and mutated frames (seeded, reproducible)
//! through the loaded program with BPF_PROG_TEST_RUN, each verdict checked against the
//! reference model in `api_shield_tests::model`, and every counter checked at the end.
//! No XDP_ABORTED, ever.
//!
//! `API_SHIELD_FUZZ_SEED` replays a run; `API_SHIELD_SOAK=1` runs ten times as many frames,
//! `API_SHIELD_FUZZ_FRAMES=N` runs N.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use api_shield::{config::Config, shield::Shield};
use api_shield_common::counters::Reason;
use api_shield_tests::{
    frames::*,
    model::{Expect, Model, Rng},
    require_root,
};
use aya::programs::{TestRun, TestRunOptions};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// Lists with edges (a blocked half inside an allowed /24, a blocked /64 inside an allowed
/// /48), rules of every shape, and limits that cannot run out except `ping`'s.
const CONFIG: &str = "interfaces: [{name: unused0}]
on_malformed: drop
allowlist: [198.51.100.0/24, \"2001:db8:a11::/48\"]
blocklist: [192.0.2.0/24, 203.0.113.0/25, 198.51.100.128/25, \"2001:db8:bad::/48\", \"2001:db8:a11:1::/64\"]
limits:
  default: {pps: 1, burst_packets: 1000000000}
  rules:
    - {name: web, match: {protocol: tcp, dst_ports: [80, 443, \"8000-8999\"]}, pps: 1, burst_packets: 1000000000, key: source/24/64}
    - {name: syn, match: {protocol: tcp, tcp_flags: syn}, pps: 1, burst_packets: 1000000000}
    - {name: dns, match: {protocol: udp, dst_ports: [53]}, pps: 0}
    - {name: ping, match: {protocol: icmp}, pps: 1, burst_packets: 5}
    - {name: port0, match: {dst_ports: [0]}, pps: 1, burst_packets: 1000000000}
    - {name: gre, match: {protocol: 47}, bps: 1000000000000, burst_bytes: 1000000000000}
";
/// The rule whose bucket may run out: the model allows either action for it.
const PING_SLOT: u32 = 4;

const PORTS: [u16; 14] = [
    0, 22, 53, 79, 80, 81, 443, 7999, 8000, 8500, 8999, 9000, 65535, 1,
];

fn source_v4(rng: &mut Rng) -> Ipv4Addr {
    let host = rng.below(256) as u8;
    match rng.below(7) {
        0 => Ipv4Addr::new(198, 51, 100, host),
        1 => Ipv4Addr::new(192, 0, 2, host),
        2 => Ipv4Addr::new(203, 0, 113, host),
        3 => Ipv4Addr::new(192, 0, 3, host),
        4 | 5 => Ipv4Addr::new(198, 18, rng.below(256) as u8, host),
        _ => Ipv4Addr::from(rng.next_u64() as u32),
    }
}

fn source_v6(rng: &mut Rng) -> Ipv6Addr {
    let low = rng.next_u64() & 0xffff;
    let mut s: u128 = match rng.below(6) {
        0 => 0x2001_0db8_0a11_0000 << 64,
        1 => 0x2001_0db8_0a11_0001 << 64,
        2 => 0x2001_0db8_0bad_0000 << 64,
        3 => 0x2001_0db8_0bae_0000 << 64,
        4 => 0x2001_0db8_ffff_0000 << 64 | u128::from(rng.next_u64() & 0xffff) << 64,
        _ => u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()),
    };
    s |= u128::from(low);
    Ipv6Addr::from(s)
}

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

fn valid_frame(rng: &mut Rng) -> Vec<u8> {
    let v6 = rng.chance(40);
    let (protocol, payload) = transport_payload(rng, v6);
    let (ether_type, packet) = if v6 {
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
        (
            ETH_P_IPV6,
            ipv6(source_v6(rng), dst, &exts, protocol, &payload),
        )
    } else {
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
        (
            ETH_P_IP,
            ipv4(
                source_v4(rng),
                Ipv4Addr::new(198, 18, 0, 1),
                protocol,
                &options,
                frag,
                &payload,
            ),
        )
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

/// Mutations aimed at what the parser reads, then anywhere.
fn mutate(rng: &mut Rng, f: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let len = f.len();
        match rng.below(7) {
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
            _ => {
                let at = rng.below(len);
                f[at] = 0;
            }
        }
    }
}

fn run(shield: &mut Shield, frame: &[u8]) -> Option<u32> {
    let result = shield.program().expect("program").test_run(TestRunOptions {
        data_in: Some(frame),
        repeat: 1,
        ..TestRunOptions::default()
    });
    match result {
        Ok(r) => Some(r.return_value),
        // The kernel refuses test frames shorter than an Ethernet header (no NIC delivers
        // one); the fuzzer only makes those by truncation.
        Err(_) if frame.len() < 14 => None,
        Err(e) => panic!("test run failed on {frame:02x?}: {e}"),
    }
}

fn reasons(shield: &Shield) -> BTreeMap<Reason, u64> {
    shield
        .counters()
        .unwrap()
        .into_iter()
        .map(|(r, c)| (r, c.packets))
        .collect()
}

fn frames_to_fuzz() -> usize {
    // Fewer where the kernel runs emulated (`cargo xtask test` sets it in its VMs).
    if let Some(n) = std::env::var("API_SHIELD_FUZZ_FRAMES")
        .ok()
        .and_then(|n| n.parse().ok())
    {
        return n;
    }
    if std::env::var_os("API_SHIELD_SOAK").is_some() {
        10_000_000
    } else {
        1_000_000
    }
}

/// Fuzzes one program instance with `count` frames; returns (frames run, per-class tally).
fn fuzz(config_text: &str, seed: u64, count: usize) -> (usize, BTreeMap<&'static str, u64>) {
    require_root();
    let config = Config::parse(config_text).unwrap();
    let model = Model::new(&config);
    let mut shield = Shield::from_config(&config).expect("loading the program");
    let mut rng = Rng::new(seed);
    let before = reasons(&shield);
    let mut want: BTreeMap<Reason, u64> = BTreeMap::new();
    let mut per_slot: BTreeMap<u32, u64> = BTreeMap::new();
    let mut tally: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut ran = 0;
    for i in 0..count {
        let mut frame = valid_frame(&mut rng);
        let mutated = rng.chance(50);
        if mutated {
            mutate(&mut rng, &mut frame);
        }
        let Some(action) = run(&mut shield, &frame) else {
            *tally
                .entry("refused by the kernel (< 14 bytes)")
                .or_default() += 1;
            continue;
        };
        ran += 1;
        assert_ne!(
            action, XDP_ABORTED,
            "frame {i} (seed {seed}): XDP_ABORTED on {frame:02x?}"
        );
        let expect = model.expect(&frame);
        *tally
            .entry(match expect {
                Expect::NonIp => "non-IP",
                Expect::MalformedL3 => "malformed at L2/L3",
                Expect::Allowlisted => "allowlisted",
                Expect::Blocklisted => "blocklisted",
                Expect::Limited {
                    complete: false, ..
                } => "malformed past L3",
                Expect::Limited { .. } => "limiter",
            })
            .or_default() += 1;
        if mutated {
            *tally.entry("mutated").or_default() += 1;
        }
        if let Expect::Limited { slot, .. } = expect {
            *per_slot.entry(slot).or_default() += 1;
            if slot == PING_SLOT {
                // Either action: the counters settle it below.
                continue;
            }
        }
        let reason = model.reason(expect, false);
        let want_action = if model.dropped(reason) {
            XDP_DROP
        } else {
            XDP_PASS
        };
        assert_eq!(
            action,
            want_action,
            "frame {i} (seed {seed}): model says {expect:?} ({}), program disagrees on {frame:02x?}",
            reason.name()
        );
        *want.entry(reason).or_default() += 1;
    }
    // Every counter moved exactly as the model says; ping's bucket tells its own split.
    let rules = shield.rule_counters().unwrap();
    let ping = rules[PING_SLOT as usize];
    assert_eq!(
        ping.passed_packets + ping.dropped_packets + ping.would_drop_packets,
        per_slot.get(&PING_SLOT).copied().unwrap_or(0)
    );
    *want.entry(Reason::Passed).or_default() += ping.passed_packets;
    *want.entry(Reason::RateLimited).or_default() += ping.dropped_packets;
    *want.entry(Reason::WouldDropRateLimited).or_default() += ping.would_drop_packets;
    let after = reasons(&shield);
    for r in Reason::ALL {
        assert_eq!(
            after[&r] - before[&r],
            want.get(&r).copied().unwrap_or(0),
            "counter {} (seed {seed})",
            r.name()
        );
    }
    for (slot, n) in per_slot {
        let c = rules[slot as usize];
        assert_eq!(
            c.passed_packets + c.dropped_packets + c.would_drop_packets,
            n,
            "frames under limit slot {slot} (seed {seed})"
        );
        if slot != PING_SLOT {
            assert_eq!(c.passed_packets, n, "slot {slot} never runs out");
        }
    }
    (ran, tally)
}

fn seed() -> u64 {
    std::env::var("API_SHIELD_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x05ee_da91_5e1d)
}

#[test]
fn a_million_fuzzed_frames_agree_with_the_reference_model() {
    let (seed, count) = (seed(), frames_to_fuzz());
    let started = Instant::now();
    let (ran, tally) = fuzz(CONFIG, seed, count);
    api_shield_tests::figure(&format!(
        "packet fuzzing: {ran} frames through the program in {:.1?} (seed {seed}), 0 disagreements with the model, 0 XDP_ABORTED; {tally:?}",
        started.elapsed()
    ));
    assert!(ran >= count * 99 / 100, "only {ran} of {count} frames ran");
}

#[test]
fn fuzzed_frames_under_a_global_dry_run_are_all_passed_and_counted() {
    let config = CONFIG.replace("on_malformed: drop", "on_malformed: drop\ndry_run: true");
    let (seed, count) = (seed() ^ 0xd7, frames_to_fuzz() / 10);
    let (ran, _) = fuzz(&config, seed, count);
    api_shield_tests::figure(&format!(
        "packet fuzzing (global dry run): {ran} frames (seed {seed}), all passed, every would-drop counted"
    ));
}
