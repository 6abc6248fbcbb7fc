//! The Prometheus endpoint during a flood: counters agree with the packets sent, and
//! `promtool check metrics` accepts the output.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream},
    process::{Command, Stdio},
};

use api_shield_tests::{
    daemon::{Daemon, tempdir::TempDir},
    netns::{NetNs, SERVER_V4, Sandbox},
    require_root,
    traffic::{Receiver, SERVER_PORT, send_udp},
};

const BLOCKED: &str = "192.0.2.40";
const FLOODER: &str = "198.18.0.30";
const ALLOWED: &str = "198.18.0.10";

/// GET `path` from 127.0.0.1:9477 inside `netns`: (status line, body).
fn get(netns: &NetNs, path: &str) -> (String, String) {
    let path = path.to_owned();
    netns
        .run(move || {
            let mut s = TcpStream::connect("127.0.0.1:9477").expect("metrics endpoint");
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut response = String::new();
            s.read_to_string(&mut response).unwrap();
            let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
            (
                head.lines().next().unwrap_or_default().to_owned(),
                body.to_owned(),
            )
        })
        .unwrap()
}

/// Samples of one metric: label set (as written) -> value.
fn samples(body: &str, name: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            if !(labels.is_empty() || labels.starts_with('{')) {
                return None;
            }
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn value(body: &str, name: &str, labels: &str) -> f64 {
    samples(body, name)
        .get(labels)
        .copied()
        .unwrap_or_else(|| panic!("no {name}{labels} in:\n{body}"))
}

#[test]
fn counters_during_a_flood_match_the_traffic_and_pass_promtool() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    for a in [BLOCKED, FLOODER, ALLOWED] {
        sb.add_client_address(a).unwrap();
    }
    let files = TempDir::new().unwrap();
    let feed = files.path().join("feed.txt");
    std::fs::write(&feed, "203.0.113.0/24\n203.0.113.7/32\ngarbage\n").unwrap();
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nlimits:\n  default: {{pps: 100, burst_packets: 50}}\nallowlist: [{ALLOWED}/32]\nblocklist: [192.0.2.0/24]\nfeeds:\n  - name: local\n    path: {}\n",
        sb.server_if,
        feed.display()
    );
    let daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    daemon.dirs.cli_ok(&["feeds", "refresh", "local"]);
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let dest = format!("{SERVER_V4}:{SERVER_PORT}");
    let blocked = send_udp(&sb.client, BLOCKED, &dest, 300, 0, 64)
        .unwrap()
        .packets;
    let flood = send_udp(&sb.client, FLOODER, &dest, 2000, 0, 64)
        .unwrap()
        .packets;
    let allowed = send_udp(&sb.client, ALLOWED, &dest, 400, 0, 64)
        .unwrap()
        .packets;
    let got = rx.finish();
    let flood_in = got
        .get(&FLOODER.parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0);

    let (status, body) = get(&sb.server, "/metrics");
    assert!(status.contains("200"), "{status}");
    let iface = |action: &str, reason: &str| {
        format!("{{interface=\"veth-server\",action=\"{action}\",reason=\"{reason}\"}}")
    };
    assert_eq!(
        value(
            &body,
            "api_shield_packets_total",
            &iface("drop", "blocklisted")
        ),
        blocked as f64
    );
    assert_eq!(
        value(
            &body,
            "api_shield_packets_total",
            &iface("drop", "rate_limited")
        ),
        (flood - flood_in) as f64
    );
    assert_eq!(
        value(
            &body,
            "api_shield_packets_total",
            &iface("pass", "allowlisted")
        ),
        allowed as f64
    );
    assert!(value(&body, "api_shield_packets_total", &iface("pass", "passed")) >= flood_in as f64);
    // 64 + 8 + 20 + 14 bytes a frame.
    assert_eq!(
        value(
            &body,
            "api_shield_bytes_total",
            &iface("drop", "blocklisted")
        ),
        (blocked * 106) as f64
    );
    assert_eq!(
        value(
            &body,
            "api_shield_list_entries",
            "{list=\"blocklist\",origin=\"config\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &body,
            "api_shield_list_entries",
            "{list=\"blocklist\",origin=\"feed:local\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &body,
            "api_shield_list_entries",
            "{list=\"allowlist\",origin=\"config\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &body,
            "api_shield_map_entries",
            "{interface=\"veth-server\",map=\"LIST_V4\"}"
        ),
        4.0
    );
    assert_eq!(
        value(
            &body,
            "api_shield_map_capacity",
            "{interface=\"veth-server\",map=\"LIMITER\"}"
        ),
        1_000_000.0
    );
    assert_eq!(
        value(
            &body,
            "api_shield_map_update_failures_total",
            "{map=\"LIST_V4\"}"
        ),
        0.0
    );
    assert!(value(&body, "api_shield_tracked_sources", "") >= 1.0);
    assert_eq!(
        value(&body, "api_shield_feed_entries", "{feed=\"local\"}"),
        2.0
    );
    assert_eq!(
        value(&body, "api_shield_feed_rejected_lines", "{feed=\"local\"}"),
        1.0
    );
    assert_eq!(
        value(
            &body,
            "api_shield_feed_fetch_failures_total",
            "{feed=\"local\"}"
        ),
        0.0
    );
    assert!(
        value(
            &body,
            "api_shield_feed_last_success_timestamp_seconds",
            "{feed=\"local\"}"
        ) > 1.7e9
    );
    assert_eq!(
        value(
            &body,
            "api_shield_build_info",
            &format!("{{version=\"{}\"}}", "0.1.0")
        ),
        1.0
    );

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (status, _) = get(&sb.server, "/other");
    assert!(status.contains("404"), "{status}");
    daemon.stop().unwrap();
}

#[test]
fn metrics_can_be_switched_off() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nmetrics:\n  listen: off\n",
        sb.server_if
    );
    let daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    let refused = sb
        .server
        .run(|| TcpStream::connect("127.0.0.1:9477").is_err())
        .unwrap();
    assert!(refused, "nothing listens when metrics are off");
    assert!(!daemon.log().contains("metrics at"));
    daemon.stop().unwrap();
}
