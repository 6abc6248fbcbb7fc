//! `api-shield explain`: for every reason and several rules, the verdict explain gives is
//! the one the program then gives a real packet sent through the veth, seen in the
//! daemon's counters. Limits are small (1 packet/s, bursts of 1 or 2), so the expected
//! verdicts follow from the config's documented meaning: a burst of N passes N packets
//! back to back, then drops.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use api_shield_tests::{
    daemon::{Daemon, DaemonDirs},
    frames::*,
    http,
    netns::Sandbox,
    require_root,
    traffic::send_raw,
};
use serde_json::Value;

const IFACE: &str = "veth-server";

fn config(dry_run: bool) -> String {
    format!(
        "interfaces:
  - name: {IFACE}
    mode: native
dry_run: {dry_run}
limits:
  default: {{pps: 100000}}
  rules:
    - {{name: web, match: {{protocol: tcp, dst_ports: [443], tcp_flags: syn}}, pps: 1, burst_packets: 2}}
    - {{name: dns, match: {{protocol: udp, dst_ports: [53]}}, pps: 1, burst_packets: 2, key: source/24/64}}
    - {{name: probe, match: {{protocol: udp, dst_ports: [9999]}}, pps: 1, burst_packets: 1, dry_run: true}}
    - {{name: ping, match: {{protocol: 1}}, pps: 1, burst_packets: 1}}
  penalty: {{after_violations: 1000, window: 10s, block_for: 1m}}
allowlist: [198.18.0.70/32]
blocklist: [192.0.2.0/24]
"
    )
}

struct Setup {
    daemon: Option<Daemon>,
    dirs: Arc<DaemonDirs>,
    sb: Sandbox,
}

impl Drop for Setup {
    fn drop(&mut self) {
        if let Some(d) = self.daemon.take() {
            let _ = d.stop();
        }
    }
}

/// The packet explain is asked about, and the frame that is then sent.
#[derive(Clone, Copy)]
enum Packet {
    Udp(u16),
    Syn(u16),
    Ack(u16),
    Ping,
}

impl Packet {
    fn args(self) -> Vec<String> {
        let v: Vec<&str> = match self {
            Packet::Udp(_) => vec!["--proto", "udp", "--port"],
            Packet::Syn(_) => vec!["--proto", "tcp", "--syn", "--port"],
            Packet::Ack(_) => vec!["--proto", "tcp", "--port"],
            Packet::Ping => vec!["--proto", "icmp"],
        };
        let mut v: Vec<String> = v.into_iter().map(str::to_owned).collect();
        if let Packet::Udp(p) | Packet::Syn(p) | Packet::Ack(p) = self {
            v.push(p.to_string());
        }
        v
    }

    fn frame(self, source: IpAddr) -> Vec<u8> {
        let (protocol, payload) = match self {
            Packet::Udp(p) => (IPPROTO_UDP, udp(40000, p, 16)),
            Packet::Syn(p) => (IPPROTO_TCP, tcp(40000, p, TCP_SYN)),
            Packet::Ack(p) => (IPPROTO_TCP, tcp(40000, p, TCP_ACK)),
            Packet::Ping => (IPPROTO_ICMP, echo(8)),
        };
        match source {
            IpAddr::V4(a) => ip4(a, protocol, &payload),
            IpAddr::V6(a) => ip6(a, protocol, &payload),
        }
    }
}

/// Counters as the metrics endpoint gives them: series (name and labels) -> value.
type Scrape = BTreeMap<String, f64>;

impl Setup {
    fn new() -> Setup {
        require_root();
        let sb = Sandbox::new(IFACE).expect("sandbox");
        let dirs = DaemonDirs::new().unwrap();
        let daemon =
            Daemon::start_with(&sb.server, Some(&config(false)), 1, dirs.clone()).expect("daemon");
        Setup {
            daemon: Some(daemon),
            dirs,
            sb,
        }
    }

    fn scrape(&self) -> Scrape {
        let (status, body) = http::get(&self.sb.server, "127.0.0.1:9477", "/metrics").unwrap();
        assert!(status.contains("200"), "{status}");
        body.lines()
            .filter(|l| {
                l.starts_with("api_shield_packets_total")
                    || l.starts_with("api_shield_rule_packets_total")
            })
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse().ok()?))
            })
            .collect()
    }

    fn explain(&self, source: &str, packet: Packet) -> Value {
        let mut args = vec!["explain".to_owned(), source.to_owned(), "--json".to_owned()];
        args.extend(packet.args());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.dirs.cli_ok(&args);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("explain --json: {e}: {out}"))
    }

    /// Asks explain about `packet` from `source`, sends it, and returns explain's answer
    /// and the counter series that moved. Retried (at most 5 times) if the packet left
    /// later than the bucket's next refill that explain announced: then the bucket it met
    /// was not the one explained.
    fn explain_then_send(&self, source: &str, packet: Packet) -> (Value, Vec<String>) {
        for _ in 0..5 {
            let before = self.scrape();
            let at = Instant::now();
            let explained = self.explain(source, packet);
            let frame = packet.frame(source.parse().unwrap());
            assert_eq!(
                send_raw(&self.sb.client, &self.sb.client_if, &frame, 1).unwrap(),
                1
            );
            let sent_after = at.elapsed().as_secs_f64();
            let refill = explained["interfaces"][0]["rule"]["next_packet_in_secs"].as_f64();
            let moved = self.wait_for_counts(&before, &explained);
            if refill.is_some_and(|r| r <= sent_after) {
                // Sleep until the refill is past, so the next try starts afresh.
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            return (explained, moved);
        }
        panic!("5 tries of {source} each sent only after the bucket refilled");
    }

    /// Waits (at most 5 s) until the counters the sent packet lands in have moved: its
    /// rule's, or for listed sources its reason's; returns every series that moved, but
    /// the default rule's and plain passes (the namespaces' own neighbour discovery
    /// lands there).
    fn wait_for_counts(&self, before: &Scrape, explained: &Value) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = self.scrape();
            let moved: Vec<String> = now
                .iter()
                .filter(|(k, v)| before.get(*k).copied().unwrap_or(0.0) != **v)
                .map(|(k, v)| format!("{k} +{}", v - before.get(k).copied().unwrap_or(0.0)))
                .filter(|k| !k.contains("rule=\"default\""))
                .filter(|k| !k.contains("action=\"pass\",reason=\"passed\""))
                .collect();
            let rule = explained["interfaces"][0]["rule"]["name"].as_str();
            let seen = match rule {
                Some("default") => now
                    .iter()
                    .any(|(k, v)| k.contains("rule=\"default\"") && before.get(k) != Some(v)),
                Some(name) => moved
                    .iter()
                    .any(|m| m.contains(&format!("rule=\"{name}\""))),
                None => !moved.is_empty(),
            };
            if seen || Instant::now() > deadline {
                return moved;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Explains, sends, and checks the program did what explain said: `verdict` and
    /// `reason` are what the config's meaning gives; the counters must agree.
    fn check(&self, source: &str, packet: Packet, verdict: &str, reason: &str) -> Value {
        let (explained, moved) = self.explain_then_send(source, packet);
        let i = &explained["interfaces"][0];
        assert_eq!(i["interface"], IFACE);
        assert_eq!(
            (i["verdict"].as_str(), i["reason"].as_str()),
            (Some(verdict), Some(reason)),
            "explain {source}: {explained:#}"
        );
        // The action as the packet counters name it, and as the rule counters do.
        let (action, rule_action) = match (verdict, reason) {
            ("drop", _) => ("drop", "dropped"),
            (_, r) if r.starts_with("would_drop") => ("would_drop", "would_drop"),
            _ => ("pass", "passed"),
        };
        let base = reason.trim_start_matches("would_drop_");
        let expected: Vec<String> = match i["rule"]["name"].as_str() {
            // Listed: only the reason's counter moves.
            None => vec![format!(
                "api_shield_packets_total{{interface=\"{IFACE}\",action=\"{action}\",reason=\"{base}\"}} +1"
            )],
            Some("default") => vec![],
            Some(rule) => {
                let mut v = vec![format!(
                    "api_shield_rule_packets_total{{interface=\"{IFACE}\",rule=\"{rule}\",action=\"{rule_action}\"}} +1"
                )];
                if action != "pass" {
                    v.insert(
                        0,
                        format!(
                            "api_shield_packets_total{{interface=\"{IFACE}\",action=\"{action}\",reason=\"{base}\"}} +1"
                        ),
                    );
                }
                v
            }
        };
        assert_eq!(
            moved, expected,
            "explain said {verdict} as {reason} for {source}; the program did otherwise"
        );
        explained
    }
}

fn left(explained: &Value) -> u64 {
    explained["interfaces"][0]["rule"]["packets_left"]
        .as_u64()
        .unwrap_or_else(|| panic!("no packets_left: {explained:#}"))
}

#[test]
fn explain_gives_the_verdict_the_program_then_gives_a_real_packet() {
    let s = Setup::new();

    // Rule dns, key /24: three sources of one /24 share a burst of 2.
    let e = s.check("198.18.7.7", Packet::Udp(53), "pass", "passed");
    assert_eq!(e["interfaces"][0]["rule"]["bucket"], "198.18.7.0/24");
    assert_eq!(e["interfaces"][0]["listed"], Value::Null);
    assert_eq!(e["allowlist"], serde_json::json!([]));
    assert_eq!(e["blocklist"], serde_json::json!([]));
    assert_eq!(left(&e), 2, "an untracked /24 starts with its burst");
    assert_eq!(e["interfaces"][0]["rule"]["packets_burst"], 2);
    assert_eq!(e["interfaces"][0]["rule"]["tracked"], false);
    let e = s.check("198.18.7.8", Packet::Udp(53), "pass", "passed");
    assert!(left(&e) >= 1, "{e:#}");
    assert_eq!(e["interfaces"][0]["rule"]["tracked"], true);
    let e = s.check("198.18.7.9", Packet::Udp(53), "drop", "rate_limited");
    assert_eq!(left(&e), 0);
    assert!(e["interfaces"][0]["rule"]["penalty"]["window_drops"].as_u64() == Some(0));
    let e = s.check("198.18.7.10", Packet::Udp(53), "drop", "rate_limited");
    assert_eq!(
        e["interfaces"][0]["rule"]["penalty"]["window_drops"], 1,
        "the drop before counts in the /24's penalty window"
    );
    // Another /24 has a bucket of its own.
    s.check("198.18.8.1", Packet::Udp(53), "pass", "passed");

    // Rule web matches SYNs to 443 only: a burst of 2 for each source.
    s.check("198.18.9.1", Packet::Syn(443), "pass", "passed");
    s.check("198.18.9.1", Packet::Syn(443), "pass", "passed");
    let e = s.check("198.18.9.1", Packet::Syn(443), "drop", "rate_limited");
    assert_eq!(e["interfaces"][0]["rule"]["name"], "web");
    assert_eq!(e["interfaces"][0]["rule"]["bucket"], "198.18.9.1");
    // An ACK from the same source is no SYN: the default limit applies, which passes it.
    let e = s.check("198.18.9.1", Packet::Ack(443), "pass", "passed");
    assert_eq!(e["interfaces"][0]["rule"]["name"], "default");

    // Rule probe is a dry run: over its burst of 1, passed and counted as would-drop.
    s.check("198.18.10.1", Packet::Udp(9999), "pass", "passed");
    let e = s.check(
        "198.18.10.1",
        Packet::Udp(9999),
        "pass",
        "would_drop_rate_limited",
    );
    assert_eq!(e["interfaces"][0]["rule"]["dry_run"], true);

    // Rule ping (protocol 1, ICMP): a burst of 1.
    s.check("198.18.11.1", Packet::Ping, "pass", "passed");
    s.check("198.18.11.1", Packet::Ping, "drop", "rate_limited");

    // The blocklist decides before any rule, whatever the packet.
    let e = s.check("192.0.2.5", Packet::Udp(53), "drop", "blocklisted");
    assert_eq!(e["interfaces"][0]["listed"], "block");
    assert_eq!(e["interfaces"][0]["rule"], Value::Null);
    assert_eq!(e["blocklist"][0]["cidr"], "192.0.2.0/24");
    assert_eq!(e["blocklist"][0]["claims"][0]["origin"], "config");
    s.dirs.cli_ok(&[
        "block",
        "add",
        "198.18.12.0/24",
        "--reason",
        "ticket 7",
        "--ttl",
        "1h",
    ]);
    let e = s.check("198.18.12.34", Packet::Syn(443), "drop", "blocklisted");
    let claim = &e["blocklist"][0]["claims"][0];
    assert_eq!(e["blocklist"][0]["cidr"], "198.18.12.0/24");
    assert_eq!(
        (claim["origin"].as_str(), claim["reason"].as_str()),
        (Some("cli"), Some("ticket 7"))
    );
    let expires = claim["expires_at"].as_u64().expect("an expiry");
    let now = api_shield::lists::unix_now();
    assert!(
        (now + 3500..=now + 3602).contains(&expires),
        "{expires} vs {now}"
    );

    // The allowlist wins over every rule.
    let e = s.check("198.18.0.70", Packet::Ping, "pass", "allowlisted");
    assert_eq!(e["allowlist"][0]["cidr"], "198.18.0.70/32");

    // IPv6: the dns rule's key is /64 for IPv6.
    let e = s.check("2001:db8:ffff:7::1", Packet::Udp(53), "pass", "passed");
    assert_eq!(e["interfaces"][0]["rule"]["bucket"], "2001:db8:ffff:7::/64");
    s.check("2001:db8:ffff:7::2", Packet::Udp(53), "pass", "passed");
    s.check(
        "2001:db8:ffff:7::3",
        Packet::Udp(53),
        "drop",
        "rate_limited",
    );
    s.dirs.cli_ok(&["block", "add", "2001:db8:bad::/48"]);
    let e = s.check("2001:db8:bad::1", Packet::Udp(53), "drop", "blocklisted");
    assert_eq!(e["blocklist"][0]["cidr"], "2001:db8:bad::/48");
    assert_eq!(e["address"], "2001:db8:bad::1");

    // A global dry run: the blocked source passes, counted as a would-drop.
    s.daemon
        .as_ref()
        .unwrap()
        .write_config(&config(true))
        .unwrap();
    s.dirs.cli_ok(&["reload"]);
    let e = s.check(
        "192.0.2.9",
        Packet::Udp(53),
        "pass",
        "would_drop_blocklisted",
    );
    assert_eq!(e["interfaces"][0]["dry_run"], true);
}

#[test]
fn explain_refuses_bad_arguments_and_says_when_the_port_decides() {
    let s = Setup::new();
    let before = s.dirs.cli_ok(&["block", "list", "--json"]);
    for (args, message) in [
        (vec!["explain", "300.1.1.1"], "invalid address"),
        (vec!["explain", "198.18.0.0/24"], "invalid address"),
        (
            vec!["explain", "198.18.3.3", "--proto", "sctp"],
            "unknown protocol",
        ),
        (vec!["explain", "198.18.3.3", "--port", "70000"], "70000"),
        (
            vec!["explain", "198.18.3.3", "--proto", "icmp", "--port", "5"],
            "--port applies",
        ),
        (
            vec!["explain", "198.18.3.3", "--proto", "udp", "--syn"],
            "--syn applies",
        ),
        (vec!["explain"], "ADDRESS"),
        // UDP port 53 and 9999 have rules of their own: without a port there is no verdict.
        (
            vec!["explain", "198.18.3.3", "--proto", "udp"],
            "give --port",
        ),
    ] {
        let (code, out, err) = s.dirs.cli(&args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    // The lists decide for a listed source whatever the port.
    let out = s.dirs.cli_ok(&["explain", "192.0.2.1", "--proto", "udp"]);
    assert!(out.contains("DROP as blocklisted"), "{out}");
    // An address nothing covers, in the human form.
    let out = s.dirs.cli_ok(&["explain", "198.18.3.3"]);
    assert!(out.contains("allowlist: no entry covers it"), "{out}");
    assert!(out.contains("blocklist: no entry covers it"), "{out}");
    assert!(out.contains("PASS as passed"), "{out}");
    assert!(out.contains("rule default"), "{out}");
    let out = s
        .dirs
        .cli_ok(&["explain", "2001:db8::1", "--proto", "icmp"]);
    assert!(out.contains("2001:db8::1 (icmp)"), "{out}");
    assert!(out.contains("PASS as passed"), "{out}");
    // The admin socket refuses a bad request the same way.
    assert_eq!(
        s.dirs.cli_ok(&["block", "list", "--json"]),
        before,
        "nothing changed"
    );
}
