//! `api-shield trace`: packets from the traced sources only, each with what the program
//! did to it and why; rate-bounded; ended by its time, its count, or its client's death,
//! and then off in the kernel too.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::IpAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use api_shield_common::trace::TraceFilter;
use api_shield_tests::{
    daemon::{Daemon, DaemonDirs, binary},
    frames::*,
    http,
    netns::Sandbox,
    require_root,
    traffic::{send_raw, send_raw_rounds},
};
use aya::maps::{Array, Map, MapData};
use serde_json::Value;

const IFACE: &str = "veth-server";

const CONFIG: &str = "interfaces:
  - name: veth-server
    mode: native
limits:
  default: {pps: 100000}
  rules:
    - {name: dns, match: {protocol: udp, dst_ports: [53]}, pps: 1, burst_packets: 2}
    - {name: load, match: {protocol: udp, dst_ports: [7777]}}
blocklist: [192.0.2.0/24]
";

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

/// A running `api-shield trace`, killed on drop if still running.
struct Tracer {
    child: Child,
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Tracer {
    /// Waits (at most 30 s) for it to exit: (exit code, stdout lines, stderr).
    fn finish(mut self) -> (i32, Vec<String>, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "trace did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (
            status.code().unwrap_or(-1),
            out.lines().map(str::to_owned).collect(),
            err,
        )
    }
}

impl Setup {
    fn new() -> Setup {
        require_root();
        let sb = Sandbox::new(IFACE).expect("sandbox");
        let dirs = DaemonDirs::new().unwrap();
        let daemon = Daemon::start_with(&sb.server, Some(CONFIG), 1, dirs.clone()).expect("daemon");
        Setup {
            daemon: Some(daemon),
            dirs,
            sb,
        }
    }

    /// Starts `api-shield trace ARGS` and waits until the daemon runs its session.
    fn trace(&self, args: &[&str]) -> Tracer {
        let before = self.sessions();
        let mut child = Command::new(binary())
            .arg("--socket")
            .arg(self.dirs.socket())
            .arg("trace")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting api-shield trace");
        // The CLI says so on stderr once the daemon answered: the filter is set by then.
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        err.read_line(&mut first).unwrap();
        assert!(first.starts_with("tracing "), "trace {args:?}: {first}");
        child.stderr = Some(err.into_inner());
        assert_eq!(self.sessions(), before + 1);
        Tracer { child }
    }

    fn sessions(&self) -> usize {
        let status: Value = serde_json::from_str(&self.dirs.cli_ok(&["status", "--json"])).unwrap();
        status["traces"].as_array().map_or(0, Vec::len)
    }

    /// The data plane's trace filter, read from its pinned map.
    fn kernel_filter(&self) -> TraceFilter {
        let path = self.dirs.pin_dir().join(IFACE).join("TRACE");
        let map = Map::Array(MapData::from_pin(&path).expect("the pinned trace map"));
        let array: Array<_, TraceFilter> = Array::try_from(map).unwrap();
        array.get(&0, 0).unwrap()
    }

    fn send(&self, source: &str, protocol: u8, payload: &[u8], count: u64) {
        let frame = match source.parse::<IpAddr>().unwrap() {
            IpAddr::V4(a) => ip4(a, protocol, payload),
            IpAddr::V6(a) => ip6(a, protocol, payload),
        };
        assert_eq!(
            send_raw(&self.sb.client, &self.sb.client_if, &frame, count).unwrap(),
            count
        );
    }

    fn rule_packets(&self, rule: &str, action: &str) -> f64 {
        let (_, body) = http::get(&self.sb.server, "127.0.0.1:9477", "/metrics").unwrap();
        http::metric(
            &body,
            "api_shield_rule_packets_total",
            &format!("{{interface=\"{IFACE}\",rule=\"{rule}\",action=\"{action}\"}}"),
        )
        .unwrap_or(0.0)
    }

    /// Waits (at most 5 s) until `f` holds.
    fn wait(&self, what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "waited 5 s for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn records(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// (source, protocol, src port, dst port, verdict, reason, rule, tokens) of a record.
fn fields(r: &Value) -> (String, String, u64, u64, String, String, Value, Value) {
    let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
    (
        s("source"),
        s("protocol"),
        r["src_port"].as_u64().unwrap(),
        r["dst_port"].as_u64().unwrap(),
        s("verdict"),
        s("reason"),
        r["rule"].clone(),
        r["tokens"].clone(),
    )
}

#[test]
fn a_trace_shows_each_packet_of_its_sources_with_what_the_program_did() {
    let s = Setup::new();
    assert_eq!(s.kernel_filter().active, 0, "no trace runs yet");
    s.dirs.cli_ok(&["block", "add", "198.18.5.99"]);
    let v4 = s.trace(&["198.18.5.0/24", "--for", "20s", "--max", "5", "--json"]);
    let v6 = s.trace(&[
        "2001:db8:ffff:9::/64",
        "--for",
        "20s",
        "--max",
        "1",
        "--json",
    ]);
    assert_ne!(s.kernel_filter().active, 0);
    // A source outside the traced prefixes, judged like the others (its counters move):
    // none of its packets may show.
    let judged = s.rule_packets("dns", "passed");
    s.send("198.18.6.1", IPPROTO_UDP, &udp(41000, 53, 8), 1);
    s.wait("the untraced packet to be judged", || {
        s.rule_packets("dns", "passed") > judged
    });
    // Rule dns: a burst of 2, then drops; the tokens are what is left after the packet.
    s.send("198.18.5.1", IPPROTO_UDP, &udp(40001, 53, 8), 3);
    // The blocklist decides before any rule: no rule, no tokens.
    s.send("198.18.5.99", IPPROTO_TCP, &tcp(40002, 443, TCP_SYN), 1);
    // An address nothing covers under the default limit; then IPv6.
    s.send("198.18.5.2", IPPROTO_TCP, &tcp(40003, 8080, TCP_SYN), 1);
    s.send("2001:db8:ffff:9::1", IPPROTO_UDP, &udp(40004, 53, 8), 1);

    let (code, lines, err) = v4.finish();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("trace ended: it showed --max packets; 5 packets shown"),
        "{err}"
    );
    let got: Vec<_> = records(&lines).iter().map(fields).collect();
    let rec = |src: &str,
               proto: &str,
               sport,
               dport,
               verdict: &str,
               reason: &str,
               rule: Value,
               tokens: Value| {
        (
            src.to_owned(),
            proto.to_owned(),
            sport,
            dport,
            verdict.to_owned(),
            reason.to_owned(),
            rule,
            tokens,
        )
    };
    let default_tokens = Value::from(99_999);
    assert_eq!(
        got,
        vec![
            rec(
                "198.18.5.1",
                "udp",
                40001,
                53,
                "pass",
                "passed",
                "dns".into(),
                1.into()
            ),
            rec(
                "198.18.5.1",
                "udp",
                40001,
                53,
                "pass",
                "passed",
                "dns".into(),
                0.into()
            ),
            rec(
                "198.18.5.1",
                "udp",
                40001,
                53,
                "drop",
                "rate_limited",
                "dns".into(),
                0.into()
            ),
            rec(
                "198.18.5.99",
                "tcp",
                40002,
                443,
                "drop",
                "blocklisted",
                Value::Null,
                Value::Null
            ),
            rec(
                "198.18.5.2",
                "tcp",
                40003,
                8080,
                "pass",
                "passed",
                "default".into(),
                default_tokens
            ),
        ]
    );
    let first = records(&lines)[0].clone();
    assert_eq!(first["interface"], IFACE);
    assert!(first["time"].as_str().unwrap().starts_with("20"), "{first}");

    let (code, lines, err) = v6.finish();
    assert_eq!(code, 0, "{err}");
    let got: Vec<_> = records(&lines).iter().map(fields).collect();
    assert_eq!(
        got,
        vec![rec(
            "2001:db8:ffff:9::1",
            "udp",
            40004,
            53,
            "pass",
            "passed",
            "dns".into(),
            1.into()
        )]
    );
    s.wait("both sessions to end", || s.sessions() == 0);
    assert_eq!(s.kernel_filter().active, 0, "the kernel traces no more");
}

#[test]
fn a_trace_is_rate_bounded_and_counts_what_it_did_not_show() {
    let s = Setup::new();
    let human = s.trace(&["198.18.7.0/24", "--for", "3s", "--max", "100000"]);
    let before = s.rule_packets("load", "passed");
    let frames: Vec<Vec<u8>> = (1..=250u8)
        .map(|n| {
            ip4(
                std::net::Ipv4Addr::new(198, 18, 7, n),
                IPPROTO_UDP,
                &udp(40000, 7777, 8),
            )
        })
        .collect();
    let started = Instant::now();
    let (sent, _) = send_raw_rounds(&s.sb.client, &s.sb.client_if, frames, 8).unwrap();
    assert_eq!(sent, 2000);
    let (code, lines, err) = human.finish();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "{err}");
    let judged = s.rule_packets("load", "passed") - before;
    assert!(
        judged > 1000.0,
        "only {judged} of 2000 frames reached the program"
    );
    // The summary line: N shown, M not shown; every judged packet is one or the other.
    let summary = err.lines().last().unwrap_or_default().to_owned();
    assert!(summary.contains("its time is up"), "{summary}");
    let number = |after: &str| -> f64 {
        let i = summary.find(after).unwrap_or_else(|| panic!("{summary}"));
        summary[..i]
            .split_whitespace()
            .last()
            .unwrap()
            .trim_start_matches(';')
            .parse()
            .unwrap()
    };
    let (shown, missed) = (number(" packets shown"), number(" not shown"));
    eprintln!("{summary} ({judged} judged in {elapsed:.1} s)");
    assert_eq!(shown as usize, lines.len());
    assert_eq!(shown + missed, judged, "{summary}");
    // 200 a second in bursts of 200 (the documented trace rate).
    assert!(
        shown <= 200.0 + 200.0 * elapsed,
        "{shown} shown in {elapsed:.1} s"
    );
    assert!(shown >= 150.0, "the burst was shown: {shown}");
    assert!(
        lines[0].contains(" udp 40000 -> 7777 PASS passed rule=load"),
        "{}",
        lines[0]
    );
}

#[test]
fn a_trace_ends_in_the_kernel_too_when_its_cli_dies() {
    let s = Setup::new();
    let mut tracer = s.trace(&["198.18.8.0/24", "--for", "60s"]);
    assert_ne!(s.kernel_filter().active, 0);
    // SIGKILL: the CLI says nothing to anyone; the daemon sees its socket close.
    tracer.child.kill().unwrap();
    tracer.child.wait().unwrap();
    s.wait("the session to end", || s.sessions() == 0);
    assert_eq!(s.kernel_filter().active, 0);
    // Ended by its time, too.
    let (code, _, err) = s.trace(&["198.18.8.0/24", "--for", "1s"]).finish();
    assert_eq!(code, 0);
    assert!(err.contains("its time is up"), "{err}");
    s.wait("the timed session to end", || s.sessions() == 0);
    assert_eq!(s.kernel_filter().active, 0);
    // Four sessions at once, no more.
    let running: Vec<Tracer> = (0..4)
        .map(|i| s.trace(&[&format!("198.18.{i}.0/24"), "--for", "30s"]))
        .collect();
    let (code, _, err) = s.dirs.cli(&["trace", "198.18.9.0/24"]);
    assert_eq!(code, 1);
    assert!(err.contains("4 traces are running already"), "{err}");
    drop(running);
    s.wait("the four sessions to end", || s.sessions() == 0);
    assert_eq!(s.kernel_filter().active, 0);
}

#[test]
fn trace_refuses_bad_arguments_with_one_line_and_starts_nothing() {
    let s = Setup::new();
    for (args, message) in [
        (vec!["trace", "300.1.1.0/24"], "invalid CIDR"),
        (vec!["trace", "198.18.0.0/33"], "invalid CIDR"),
        (vec!["trace", "198.18.0.0/24", "--for", "2h"], "1s to 1h"),
        (
            vec!["trace", "198.18.0.0/24", "--for", "soon"],
            "invalid duration",
        ),
        (vec!["trace", "198.18.0.0/24", "--max", "0"], "--max"),
        (vec!["trace"], "TARGET"),
    ] {
        let (code, out, err) = s.dirs.cli(&args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(message), "{args:?}: {err}");
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    assert_eq!(s.sessions(), 0);
    assert_eq!(s.kernel_filter().active, 0);
}
