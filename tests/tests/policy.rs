//! Policy through the daemon and a veth: the penalty box (block, list, expiry, escalation,
//! restart, allowlist), dry runs seen in metrics and events, and a rotating-source flood
//! inside one /24 held to the /24's rate.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use api_shield_tests::{
    daemon::{Daemon, DaemonDirs},
    frames::udp4,
    http::{get, metric},
    netns::{SERVER_V4, Sandbox},
    registry_now, require_root,
    traffic::{Receiver, SERVER_PORT, send_raw_rounds, send_udp},
};
use serde_json::Value;

const FLOODER: &str = "198.18.0.50";
const PARTNER: &str = "198.18.0.60";

/// Sends `count` datagrams from `source` at `pps`; returns how many arrived.
fn delivered(sb: &Sandbox, source: &str, count: u64, pps: u64) -> u64 {
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let sent = send_udp(
        &sb.client,
        source,
        &format!("{SERVER_V4}:{SERVER_PORT}"),
        count,
        pps,
        32,
    )
    .unwrap();
    assert_eq!(sent.packets, count);
    rx.finish()
        .get(&source.parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0)
}

fn penalty_claim(dirs: &DaemonDirs, cidr: &str) -> Option<Value> {
    let out = dirs.cli_ok(&["block", "list", "--json"]);
    let list: Value = serde_json::from_str(&out).expect("block list --json is JSON");
    list.as_array()?
        .iter()
        .find(|e| e["cidr"] == cidr)?
        .get("claims")?
        .as_array()?
        .iter()
        .find(|c| c["origin"] == "penalty")
        .cloned()
}

#[test]
fn the_penalty_box_blocks_expires_escalates_survives_restarts_and_spares_the_allowlist() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    for a in [FLOODER, PARTNER] {
        sb.add_client_address(a).unwrap();
    }
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nallowlist: [{PARTNER}/32]\nlimits:\n  default: {{pps: 100000}}\n  rules:\n    - name: udp-flood\n      match: {{protocol: udp, dst_ports: [{SERVER_PORT}]}}\n      pps: 50\n      burst_packets: 50\n  penalty: {{after_violations: 20, window: 5s, block_for: 3s, escalate: 2, max_block: 10s}}\nstats_interval: 0\n",
        sb.server_if
    );
    let dirs = DaemonDirs::new().unwrap();
    let mut daemon = Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).unwrap();

    // Within the rule's rate: never boxed.
    assert_eq!(delivered(&sb, FLOODER, 40, 200), 40);
    assert!(penalty_claim(&dirs, "198.18.0.50/32").is_none());

    // A flood: 50 pass, then the limiter drops; past 20 drops the source is boxed.
    let began = Instant::now();
    let got = delivered(&sb, FLOODER, 400, 4000);
    // The rule's burst and rate over the time the frames took to arrive.
    let allowed = 50.0 + 50.0 * began.elapsed().as_secs_f64() + 1.0;
    assert!(
        (got as f64) <= allowed && got < 400,
        "the limiter held the flood: {got} of 400 arrived, at most {allowed:.0} allowed"
    );
    daemon
        .wait_for_log(
            "penalty: 198.18.0.50/32 blocked for 3s",
            1,
            Duration::from_secs(5),
        )
        .unwrap();
    let claim = penalty_claim(&dirs, "198.18.0.50/32").expect("listed with origin penalty");
    let expires = claim["expires_at"].as_u64().expect("an expiry");
    let now = registry_now();
    assert!(
        (now + 2..=now + 5).contains(&expires),
        "expires {expires}, now {now}"
    );
    assert!(
        claim["reason"]
            .as_str()
            .unwrap()
            .contains("rule udp-flood: over 20 drops within 5s; offence 1"),
        "{claim}"
    );
    let text = dirs.cli_ok(&["block", "list"]);
    assert!(
        text.contains("198.18.0.50/32") && text.contains("penalty"),
        "{text}"
    );
    // Boxed: even a trickle is dropped now, as blocklisted.
    assert_eq!(delivered(&sb, FLOODER, 10, 100), 0);

    // A restart keeps the box (and its expiry).
    daemon.stop().unwrap();
    let mut daemon = Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).unwrap();
    assert_eq!(
        penalty_claim(&dirs, "198.18.0.50/32").map(|c| c["expires_at"].clone()),
        Some(expires.into()),
        "the box survived the restart"
    );
    assert_eq!(delivered(&sb, FLOODER, 10, 100), 0);

    // It expires on time, and the source is served again.
    daemon
        .wait_for_log(
            "entry 198.18.0.50/32 by penalty expired",
            1,
            Duration::from_secs(8),
        )
        .unwrap();
    assert!(registry_now() >= expires);
    assert!(penalty_claim(&dirs, "198.18.0.50/32").is_none());
    assert_eq!(delivered(&sb, FLOODER, 10, 100), 10);

    // A repeat (remembered across the restart) is boxed twice as long.
    std::thread::sleep(Duration::from_secs(1)); // the bucket refills
    delivered(&sb, FLOODER, 400, 4000);
    daemon
        .wait_for_log(
            "penalty: 198.18.0.50/32 blocked for 6s",
            1,
            Duration::from_secs(5),
        )
        .unwrap();
    assert!(
        penalty_claim(&dirs, "198.18.0.50/32").unwrap()["reason"]
            .as_str()
            .unwrap()
            .contains("offence 2")
    );

    // An operator can release a box early.
    let out = dirs.cli_ok(&["block", "del", FLOODER]);
    assert!(out.contains("removed"), "{out}");
    assert!(penalty_claim(&dirs, "198.18.0.50/32").is_none());
    std::thread::sleep(Duration::from_millis(500)); // the bucket refills
    assert_eq!(delivered(&sb, FLOODER, 10, 100), 10);

    // The allowlist wins: an allowlisted source never meets the limiter or the box.
    let allowlisted = || -> u64 {
        let stats: Value = serde_json::from_str(&dirs.cli_ok(&["stats", "--json"])).unwrap();
        stats["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["reason"] == "allowlisted")
            .and_then(|r| r["packets"].as_u64())
            .unwrap_or(0)
    };
    let before = allowlisted();
    assert_eq!(delivered(&sb, PARTNER, 400, 4000), 400);
    // The frames were judged as allowlisted (the control), so none met a limiter; a
    // penalty report would have followed within the daemon's next turns.
    assert_eq!(allowlisted() - before, 400);
    std::thread::sleep(Duration::from_millis(300));
    assert!(penalty_claim(&dirs, "198.18.0.60/32").is_none());
    let log = daemon.stop().unwrap();
    assert!(!log.contains("198.18.0.60/32 blocked"), "{log}");
}

#[test]
fn a_dry_run_rule_shows_in_metrics_and_events_and_drops_nothing() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    sb.add_client_address(FLOODER).unwrap();
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nlimits:\n  default: {{pps: 100000}}\n  rules:\n    - {{name: trial, match: {{protocol: udp}}, pps: 10, burst_packets: 10, dry_run: true}}\n  penalty: {{after_violations: 5}}\nevents: {{rate: 1000}}\nstats_interval: 0\n",
        sb.server_if
    );
    let daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    let began = Instant::now();
    assert_eq!(
        delivered(&sb, FLOODER, 200, 2000),
        200,
        "a dry run drops nothing"
    );
    // The rule conforms to its burst and rate over the time the frames took to arrive.
    let conforming = |d: Duration| 10.0 + 10.0 * d.as_secs_f64() + 1.0;
    let most_conforming = conforming(began.elapsed());
    let (_, body) = get(&sb.server, "127.0.0.1:9477", "/metrics").unwrap();
    let rule = |action: &str| {
        metric(
            &body,
            "api_shield_rule_packets_total",
            &format!("{{interface=\"veth-server\",rule=\"trial\",action=\"{action}\"}}"),
        )
        .unwrap_or_else(|| panic!("no rule metric for {action}:\n{body}"))
    };
    let (passed, dropped, would_drop) = (rule("passed"), rule("dropped"), rule("would_drop"));
    assert_eq!(dropped, 0.0);
    assert_eq!(passed + would_drop, 200.0);
    assert!(
        would_drop >= 200.0 - most_conforming,
        "over the limit: {would_drop} of 200, at most {most_conforming:.0} conforming"
    );
    let by_reason = metric(
        &body,
        "api_shield_packets_total",
        "{interface=\"veth-server\",action=\"would_drop\",reason=\"rate_limited\"}",
    )
    .unwrap();
    assert_eq!(by_reason, would_drop);
    assert_eq!(
        metric(&body, "api_shield_penalties_total", "{rule=\"trial\"}"),
        Some(0.0),
        "a dry run boxes nobody"
    );
    // Enforced by a reload: the same flood is now held to the rule's limit.
    daemon
        .write_config(&yaml.replace("dry_run: true", "dry_run: false"))
        .unwrap();
    daemon.dirs.cli_ok(&["reload"]);
    let began = Instant::now();
    let got = delivered(&sb, FLOODER, 200, 2000);
    let allowed = conforming(began.elapsed());
    assert!(
        (got as f64) <= allowed,
        "enforced after the reload: {got} of 200 arrived, at most {allowed:.0} allowed"
    );
    let log = daemon.stop().unwrap();
    let events: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("would_drop time="))
        .collect();
    assert_eq!(
        events.len() as f64,
        would_drop,
        "one would_drop event each (under events.rate)"
    );
    assert!(
        events[0].contains("source=198.18.0.50")
            && events[0].ends_with("reason=rate_limited rule=trial"),
        "{}",
        events[0]
    );
    let (before, after) = log
        .split_once("reloaded config")
        .expect("the reload is logged");
    assert!(
        !before.lines().any(|l| l.starts_with("drop time=")),
        "a drop under the dry run: {log}"
    );
    assert!(
        after.lines().any(|l| l.starts_with("drop time=")),
        "no drop once enforced: {log}"
    );
}

#[test]
fn a_rotating_source_flood_inside_one_slash_24_is_held_to_the_slash_24_rate() {
    require_root();
    const RATE: u64 = 500;
    let sb = Sandbox::new("veth-server").unwrap();
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nlimits:\n  default: {{pps: 100000}}\n  rules:\n    - {{name: per24, match: {{protocol: udp}}, pps: {RATE}, burst_packets: {RATE}, key: source/24/64}}\nstats_interval: 0\n",
        sb.server_if
    );
    let _daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    let mac = sb.server_mac().unwrap();
    let prefix = |third: u8| -> Vec<Vec<u8>> {
        (0..=255u8)
            .map(|host| {
                let mut f = udp4(Ipv4Addr::new(198, 18, third, host), 18);
                f[..6].copy_from_slice(&mac);
                f
            })
            .collect()
    };
    // Every address of 198.18.5.0/24 in turn, and one other /24 sending as much.
    let (rotating, other) = (prefix(5), prefix(6));
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let started = Instant::now();
    let mut sent = 0;
    // Bounded: 40 rounds of 512 frames, or 10 s.
    for _ in 0..40 {
        let frames: Vec<Vec<u8>> = rotating.iter().chain(&other).cloned().collect();
        sent += send_raw_rounds(&sb.client, &sb.client_if, frames, 1)
            .unwrap()
            .0;
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let elapsed = started.elapsed();
    let got = rx.finish();
    // Every frame reached the program inside this window.
    let window = started.elapsed();
    let in_prefix = |third: u8| -> u64 {
        got.iter()
            .filter(|(a, _)| matches!(a, IpAddr::V4(v4) if v4.octets()[..3] == [198, 18, third]))
            .map(|(_, n)| *n)
            .sum()
    };
    let (rotating_got, other_got) = (in_prefix(5), in_prefix(6));
    let sources = got
        .keys()
        .filter(|a| matches!(a, IpAddr::V4(v4) if v4.octets()[..3] == [198, 18, 5]))
        .count();
    // The /24's bucket: its burst, then the rate, over the time the frames arrived in
    // (inside `window`); about that much over the send itself.
    let allowed = RATE + (RATE as f64 * window.as_secs_f64()).ceil() as u64;
    let expected = RATE + (RATE as f64 * elapsed.as_secs_f64()) as u64;
    println!(
        "{sent} frames in {elapsed:?}: 198.18.5.0/24 got {rotating_got} from {sources} sources, 198.18.6.0/24 got {other_got}; the /24 rate allows {allowed}"
    );
    assert!(sent >= 10_000, "the flood was large enough: {sent}");
    for (what, n) in [
        ("198.18.5.0/24", rotating_got),
        ("198.18.6.0/24", other_got),
    ] {
        assert!(
            n <= allowed,
            "{what}: {n} arrived, more than its /24's {allowed}"
        );
        assert!(
            n >= expected * 8 / 10,
            "{what}: {n} arrived, well under its /24's {expected}: the prefixes should not share"
        );
    }
    // Per address, 256 sources would each have had a full burst of their own.
    assert!(sources > 1, "the passes came from many addresses");
}
