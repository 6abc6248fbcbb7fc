//! Rules, prefix keys, dry runs and penalty reports, through BPF_PROG_TEST_RUN on crafted
//! frames: each rule shape takes its own bucket, a prefix shares one, a dry run drops
//! nothing but counts, and the data plane reports a bucket for the penalty box once per
//! window.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use api_shield::{config::Config, shield::Shield};
use api_shield_common::{
    counters::Reason,
    limiter::LimiterKey,
    rules::{PENALTY_V6, PenaltyEvent},
};
use api_shield_tests::{frames::*, require_root};
use aya::programs::{TestRun, TestRunOptions};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

fn load(yaml: &str) -> Shield {
    require_root();
    let text = format!("interfaces: [{{name: unused0}}]\n{yaml}");
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    Shield::from_config(&config).expect("loading the program")
}

fn run(shield: &mut Shield, frame: &[u8]) -> u32 {
    let result = shield
        .program()
        .expect("program")
        .test_run(TestRunOptions {
            data_in: Some(frame),
            repeat: 1,
            ..TestRunOptions::default()
        })
        .expect("test run");
    assert_ne!(result.return_value, XDP_ABORTED, "XDP_ABORTED");
    result.return_value
}

/// Sends `frame` `n` times back to back; returns how many passed.
fn passes(shield: &mut Shield, frame: &[u8], n: usize) -> usize {
    (0..n).filter(|_| run(shield, frame) == XDP_PASS).count()
}

fn reasons(shield: &Shield) -> BTreeMap<Reason, u64> {
    shield
        .counters()
        .unwrap()
        .into_iter()
        .map(|(r, c)| (r, c.packets))
        .collect()
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

fn tcp4(src: &str, port: u16, flags: u8) -> Vec<u8> {
    ip4(v4(src), IPPROTO_TCP, &tcp(40000, port, flags))
}

fn udp4_to(src: &str, port: u16) -> Vec<u8> {
    ip4(v4(src), IPPROTO_UDP, &udp(40000, port, 16))
}

const RULES: &str = "limits:
  default: {pps: 1, burst_packets: 6}
  rules:
    - {name: web, match: {protocol: tcp, dst_ports: [443, \"8000-8443\"]}, pps: 1, burst_packets: 2}
    - {name: ssh-syn, match: {protocol: tcp, dst_ports: [22], tcp_flags: syn}, pps: 1, burst_packets: 3}
    - {name: ping, match: {protocol: icmp}, pps: 1, burst_packets: 4}
    - {name: dns, match: {protocol: udp, dst_ports: [53]}, pps: 0}
    - {name: bulk, match: {dst_ports: [\"9000-9099\"]}, bps: 1000, burst_bytes: 2000}
";

#[test]
fn each_rule_shape_takes_its_own_bucket() {
    let mut s = load(RULES);
    const SENT: usize = 20;
    // (what, frame, limit slot, passes expected of SENT back to back)
    let cases: Vec<(&str, Vec<u8>, u32, usize)> = vec![
        ("TCP ACK to 443", tcp4("198.18.1.1", 443, TCP_ACK), 1, 2),
        ("TCP SYN to 443", tcp4("198.18.1.2", 443, TCP_SYN), 1, 2),
        (
            "TCP to 8000, a range's first port",
            tcp4("198.18.1.3", 8000, TCP_ACK),
            1,
            2,
        ),
        (
            "TCP to 8443, its last",
            tcp4("198.18.1.4", 8443, TCP_ACK),
            1,
            2,
        ),
        (
            "TCP to 8444, past it",
            tcp4("198.18.1.5", 8444, TCP_ACK),
            0,
            6,
        ),
        ("UDP to 443", udp4_to("198.18.1.6", 443), 0, 6),
        ("SYN to 22", tcp4("198.18.1.7", 22, TCP_SYN), 2, 3),
        (
            "SYN+ACK to 22: not a connection attempt",
            tcp4("198.18.1.8", 22, TCP_SYN | TCP_ACK),
            0,
            6,
        ),
        ("ACK to 22", tcp4("198.18.1.9", 22, TCP_ACK), 0, 6),
        (
            "ICMP echo",
            ip4(v4("198.18.1.10"), IPPROTO_ICMP, &echo(8)),
            3,
            4,
        ),
        (
            "ICMPv6 echo",
            ip6(v6("2001:db8:1::10"), IPPROTO_ICMPV6, &echo(128)),
            3,
            4,
        ),
        (
            "UDP to 53: a rule without a rate",
            udp4_to("198.18.1.11", 53),
            4,
            SENT,
        ),
        ("UDP to 54", udp4_to("198.18.1.12", 54), 0, 6),
        (
            "IPv6 TCP to 443",
            ip6(v6("2001:db8:1::13"), IPPROTO_TCP, &tcp(40000, 443, TCP_ACK)),
            1,
            2,
        ),
        (
            "IPv6 SYN to 22",
            ip6(v6("2001:db8:1::14"), IPPROTO_TCP, &tcp(40000, 22, TCP_SYN)),
            2,
            3,
        ),
        // 2000 bytes of burst: 20 frames of 60 bytes, or 2 of 1000.
        ("UDP to 9050, small", udp4_to("198.18.1.15", 9050), 5, 20),
        (
            "UDP to 9050, large",
            ip4(v4("198.18.1.16"), IPPROTO_UDP, &udp(40000, 9050, 958)),
            5,
            2,
        ),
        (
            "TCP to 9099, large",
            ip4(v4("198.18.1.17"), IPPROTO_TCP, &{
                let mut t = tcp(40000, 9099, TCP_ACK);
                t.resize(946, 0);
                t
            }),
            5,
            2,
        ),
    ];
    let mut expected: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for (what, frame, slot, want) in &cases {
        let got = passes(&mut s, frame, SENT);
        assert_eq!(got, *want, "{what}: passes of {SENT} back to back");
        let e = expected.entry(*slot).or_default();
        e.0 += got as u64;
        e.1 += (SENT - got) as u64;
    }
    // A source that used up one rule's bucket still has the others'.
    assert_eq!(passes(&mut s, &udp4_to("198.18.1.1", 9), SENT), 6);
    let e = expected.entry(0).or_default();
    e.0 += 6;
    e.1 += 14;
    let counters = s.rule_counters().unwrap();
    for (slot, (passed, dropped)) in expected {
        let c = counters[slot as usize];
        assert_eq!(
            (c.passed_packets, c.dropped_packets, c.would_drop_packets),
            (passed, dropped, 0),
            "counters of limit slot {slot}"
        );
    }
}

#[test]
fn a_prefix_key_puts_a_whole_prefix_in_one_bucket() {
    let mut s = load(
        "limits:
  default: {pps: 1, burst_packets: 100}
  rules:
    - {name: agg, match: {protocol: udp}, pps: 1, burst_packets: 4, key: source/24/64}
",
    );
    // Two sources in 198.18.1.0/24 share 4 tokens; 198.18.2.0/24 has its own.
    assert_eq!(passes(&mut s, &udp4(v4("198.18.1.1"), 8), 3), 3);
    assert_eq!(passes(&mut s, &udp4(v4("198.18.1.200"), 8), 3), 1);
    assert_eq!(passes(&mut s, &udp4(v4("198.18.2.1"), 8), 3), 3);
    let mut key = LimiterKey {
        addr: [0; 16],
        limit: 1,
    };
    key.addr[10..].copy_from_slice(&[0xff, 0xff, 198, 18, 1, 0]);
    let state = s
        .limiter_state(&key)
        .unwrap()
        .expect("one bucket for the /24");
    assert_eq!((state.packets, state.drops), (6, 2));
    // IPv6: one /64 shares, the next /64 does not.
    assert_eq!(passes(&mut s, &udp6(v6("2001:db8:1:2::1"), 8), 3), 3);
    assert_eq!(passes(&mut s, &udp6(v6("2001:db8:1:2:ffff::9"), 8), 3), 1);
    assert_eq!(passes(&mut s, &udp6(v6("2001:db8:1:3::1"), 8), 3), 3);
    // TCP is under the default, one bucket per address.
    assert_eq!(passes(&mut s, &tcp4("198.18.1.1", 80, TCP_ACK), 5), 5);
}

#[test]
fn a_dry_run_rule_counts_would_drops_and_drops_nothing() {
    let mut s = load(
        "limits:
  default: {pps: 1, burst_packets: 2}
  rules:
    - {name: trial, match: {protocol: udp}, pps: 1, burst_packets: 2, dry_run: true}
",
    );
    let before = reasons(&s);
    assert_eq!(passes(&mut s, &udp4(v4("198.18.3.1"), 8), 10), 10);
    // The same source under the enforced default is dropped past its burst.
    assert_eq!(passes(&mut s, &tcp4("198.18.3.1", 80, TCP_ACK), 10), 2);
    let after = reasons(&s);
    let delta = |r| after[&r] - before[&r];
    assert_eq!(delta(Reason::Passed), 4);
    assert_eq!(delta(Reason::WouldDropRateLimited), 8);
    assert_eq!(delta(Reason::RateLimited), 8);
    let c = s.rule_counters().unwrap();
    assert_eq!(
        (
            c[1].passed_packets,
            c[1].dropped_packets,
            c[1].would_drop_packets
        ),
        (2, 0, 8)
    );
    assert_eq!((c[0].passed_packets, c[0].dropped_packets), (2, 8));
}

#[test]
fn a_global_dry_run_drops_nothing_and_counts_each_would_be_drop() {
    let mut s = load(
        "dry_run: true
on_malformed: drop
blocklist: [192.0.2.0/24]
allowlist: [198.51.100.0/24]
limits: {default: {pps: 1, burst_packets: 1}}
",
    );
    let before = reasons(&s);
    assert_eq!(run(&mut s, &udp4(v4("192.0.2.9"), 8)), XDP_PASS);
    let mut truncated = tcp4("198.18.4.1", 80, TCP_ACK);
    truncated.truncate(14 + 20 + 10);
    // Correct the IPv4 total length so only the TCP header is short.
    truncated[16..18].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(run(&mut s, &truncated), XDP_PASS);
    assert_eq!(passes(&mut s, &udp4(v4("198.18.4.2"), 8), 5), 5);
    assert_eq!(passes(&mut s, &udp4(v4("198.51.100.7"), 8), 5), 5);
    let after = reasons(&s);
    let delta = |r| after[&r] - before[&r];
    assert_eq!(delta(Reason::WouldDropBlocklisted), 1);
    assert_eq!(delta(Reason::Blocklisted), 0);
    // The truncated frame is its source's first packet: within the limit, would-be malformed.
    assert_eq!(delta(Reason::WouldDropMalformed), 1);
    assert_eq!(delta(Reason::Malformed), 0);
    assert_eq!(delta(Reason::Passed), 1);
    assert_eq!(delta(Reason::WouldDropRateLimited), 4);
    assert_eq!(delta(Reason::RateLimited), 0);
    assert_eq!(delta(Reason::Allowlisted), 5);

    // Switched off (a reload): the same checks drop again.
    let config = Config::parse(
        "interfaces: [{name: unused0}]\non_malformed: drop\nblocklist: [192.0.2.0/24]\nlimits: {default: {pps: 1, burst_packets: 1}}\n",
    )
    .unwrap();
    s.apply_settings(&config).unwrap();
    assert_eq!(run(&mut s, &udp4(v4("192.0.2.9"), 8)), XDP_DROP);
    assert_eq!(run(&mut s, &udp4(v4("198.18.4.2"), 8)), XDP_DROP);
}

fn reports(ring: &mut aya::maps::RingBuf<aya::maps::MapData>) -> Vec<PenaltyEvent> {
    let mut out = Vec::new();
    while let Some(item) = ring.next() {
        assert!(item.len() >= std::mem::size_of::<PenaltyEvent>());
        // SAFETY: the data plane writes whole PenaltyEvents.
        out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<PenaltyEvent>()) });
    }
    out
}

#[test]
fn penalty_reports_come_once_per_window_past_the_violations() {
    let mut s = load(
        "limits:
  default: {pps: 1, burst_packets: 2, penalty: false}
  rules:
    - {name: boxed, match: {protocol: udp, dst_ports: [9000]}, pps: 1, burst_packets: 2, key: source/24/64}
    - {name: trial, match: {protocol: udp, dst_ports: [9001]}, pps: 1, burst_packets: 2, dry_run: true}
  penalty: {after_violations: 3, window: 1s, block_for: 1m}
",
    );
    let mut ring = s.take_penalties().unwrap();
    let frame = udp4_to("198.18.7.9", 9000);
    // 2 pass, then 3 drops: not past the violations yet.
    let (emptied_from, emptied_by) = (Instant::now(), Instant::now());
    assert_eq!(passes(&mut s, &frame, 5), 2);
    let emptied_by = emptied_by.max(Instant::now());
    assert!(reports(&mut ring).is_empty(), "reported at 3 drops");
    // The 4th drop, from another address of the same /24, goes past them.
    assert_eq!(passes(&mut s, &udp4_to("198.18.7.200", 9000), 1), 0);
    let got = reports(&mut ring);
    assert_eq!(got.len(), 1, "one report: {got:?}");
    let r = got[0];
    assert_eq!(&r.addr[10..], &[0xff, 0xff, 198, 18, 7, 0]);
    assert_eq!((r.prefix_len, r.limit, r.drops, r.flags), (24, 1, 4, 0));
    // More drops in the same window report nothing more.
    assert_eq!(passes(&mut s, &frame, 20), 0);
    assert!(reports(&mut ring).is_empty());
    // The next window reports again (a token refilled first: one a second since the
    // burst went, two at most; the range is measured around the runs).
    std::thread::sleep(Duration::from_millis(1100));
    let began = Instant::now();
    let refilled = passes(&mut s, &frame, 20);
    let ended = Instant::now();
    let whole = |d: Duration| (d.as_secs() as usize).min(2);
    let range = whole(began - emptied_by)..=whole(ended - emptied_from);
    assert!(
        range.contains(&refilled) && refilled >= 1,
        "{refilled} passed, GCRA allows {range:?}"
    );
    assert_eq!(reports(&mut ring).len(), 1);

    // IPv6, keyed by /64.
    let frame6 = ip6(v6("2001:db8:7:8::1"), IPPROTO_UDP, &udp(40000, 9000, 16));
    assert_eq!(passes(&mut s, &frame6, 20), 2);
    let got = reports(&mut ring);
    assert_eq!(got.len(), 1);
    assert_eq!(
        (Ipv6Addr::from(got[0].addr), got[0].prefix_len, got[0].flags),
        (v6("2001:db8:7:8::"), 64, PENALTY_V6)
    );

    // A dry-run rule and a limit with `penalty: false` never report.
    assert_eq!(passes(&mut s, &udp4_to("198.18.8.1", 9001), 20), 20);
    assert_eq!(passes(&mut s, &udp4_to("198.18.8.2", 7), 20), 2);
    assert!(reports(&mut ring).is_empty());
}

#[test]
fn a_released_prefix_reports_again_within_the_window_that_boxed_it() {
    let mut s = load(
        "limits:
  default: {pps: 1, burst_packets: 2}
  penalty: {after_violations: 3, window: 1h, block_for: 1m}
",
    );
    let mut ring = s.take_penalties().unwrap();
    let frame = udp4_to("198.18.7.9", 9000);
    assert_eq!(passes(&mut s, &frame, 10), 2);
    assert_eq!(reports(&mut ring).len(), 1, "boxed: reported once");
    assert_eq!(passes(&mut s, &frame, 10), 0);
    assert!(reports(&mut ring).is_empty(), "the same window: once");
    // The box expires (as the daemon does on expiry): a repeat offence is reported as
    // soon as it passes the threshold again, not an hour later.
    let net: ipnet::IpNet = "198.18.7.9/32".parse().unwrap();
    assert_eq!(
        s.reset_penalty_windows(&net),
        1,
        "one bucket of that prefix"
    );
    assert_eq!(passes(&mut s, &frame, 3), 0);
    assert!(reports(&mut ring).is_empty(), "3 drops: not past 3 yet");
    assert_eq!(passes(&mut s, &frame, 1), 0);
    let got = reports(&mut ring);
    assert_eq!(got.len(), 1, "reported again: {got:?}");
    assert_eq!(got[0].drops, 4);
    assert_eq!(
        s.reset_penalty_windows(&"198.18.7.10/32".parse().unwrap()),
        0,
        "no bucket for a prefix never seen"
    );
}

#[test]
fn sixty_four_rules_load_and_each_owns_its_port() {
    let rules: String = (0..64)
        .map(|i| {
            format!(
                "    - {{name: r{i}, match: {{protocol: udp, dst_ports: [{}]}}, pps: 1, burst_packets: {}}}\n",
                10_000 + i,
                i + 1
            )
        })
        .collect();
    let mut s = load(&format!(
        "limits:\n  default: {{pps: 0}}\n  rules:\n{rules}"
    ));
    for i in [0u16, 1, 31, 62, 63] {
        let frame = udp4_to(&format!("198.18.9.{i}"), 10_000 + i);
        assert_eq!(
            passes(&mut s, &frame, 100),
            usize::from(i) + 1,
            "rule r{i}: its own burst"
        );
    }
    // A port no rule names: the default (no limit here).
    assert_eq!(passes(&mut s, &udp4_to("198.18.9.100", 10_064), 100), 100);
    let c = s.rule_counters().unwrap();
    assert_eq!(c[64].passed_packets, 64);
    assert_eq!(c[64].dropped_packets, 36);
}
