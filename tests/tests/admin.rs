//! Operating the shield: CLI -> admin socket -> maps, proven by traffic through a veth;
//! TTLs, persistence, refusals, restarts (also after SIGKILL) and detach.

use std::{
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use api_shield_tests::{
    daemon::{Daemon, DaemonDirs, binary, last_counters},
    netns::{SERVER_V4, Sandbox},
    require_root,
    traffic::{Receiver, SERVER_PORT, send_udp},
};
use serde_json::Value;

const SOURCE: &str = "198.18.0.50";
const SOURCE6: &str = "2001:db8:ffff::50";
const OTHER: &str = "198.18.0.60";

fn config(server_if: &str) -> String {
    format!(
        "interfaces:\n  - name: {server_if}\n    mode: native\nlimits:\n  default: {{pps: 100000}}\nblocklist: [192.0.2.0/24]\nstats_interval: 1s\n"
    )
}

struct Setup {
    daemon: Option<Daemon>,
    dirs: Arc<DaemonDirs>,
    // Last: the daemon must stop before its namespace goes.
    sb: Sandbox,
}

impl Setup {
    fn new() -> Setup {
        require_root();
        let sb = Sandbox::new("veth-server").expect("sandbox");
        for addr in [SOURCE, SOURCE6, OTHER] {
            sb.add_client_address(addr).unwrap();
        }
        let dirs = DaemonDirs::new().unwrap();
        let daemon = Daemon::start_with(&sb.server, Some(&config(&sb.server_if)), 1, dirs.clone())
            .expect("daemon");
        Setup {
            daemon: Some(daemon),
            dirs,
            sb,
        }
    }

    /// A new daemon on the same state and pin directories.
    fn start_again(&self) -> Daemon {
        Daemon::start_with(
            &self.sb.server,
            Some(&config(&self.sb.server_if)),
            1,
            self.dirs.clone(),
        )
        .expect("restarted daemon")
    }

    fn restart(&mut self) -> String {
        let daemon = self.start_again();
        let log = daemon.log();
        self.daemon = Some(daemon);
        log
    }

    /// Sends `count` datagrams from `source` at 1000 pps; returns how many arrived.
    fn delivered(&self, source: &str, count: u64) -> u64 {
        let rx = Receiver::start(&self.sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
        let dest = if source.contains(':') {
            "[2001:db8:ffff::1]".to_owned()
        } else {
            SERVER_V4.to_owned()
        };
        let sent = send_udp(
            &self.sb.client,
            source,
            &format!("{dest}:{SERVER_PORT}"),
            count,
            1000,
            32,
        )
        .unwrap();
        assert_eq!(sent.packets, count);
        rx.finish()
            .get(&source.parse::<IpAddr>().unwrap())
            .copied()
            .unwrap_or(0)
    }

    fn list(&self, verb: &str) -> Vec<Value> {
        let out = self.dirs.cli_ok(&[verb, "list", "--json"]);
        serde_json::from_str::<Value>(&out)
            .expect("list --json is JSON")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn listed(&self, verb: &str, cidr: &str) -> Option<Value> {
        self.list(verb).into_iter().find(|e| e["cidr"] == cidr)
    }
}

#[test]
fn block_and_allow_round_trip_through_socket_and_maps() {
    let s = Setup::new();
    assert_eq!(s.delivered(SOURCE, 20), 20, "not blocked yet");

    let out = s
        .dirs
        .cli_ok(&["block", "add", SOURCE, "--reason", "abuse report 42"]);
    assert!(out.contains("blocklist 198.18.0.50/32 added"), "{out}");
    assert_eq!(s.delivered(SOURCE, 20), 0, "blocked by the CLI");
    let entry = s.listed("block", "198.18.0.50/32").expect("listed");
    assert_eq!(entry["claims"][0]["origin"], "cli");
    assert_eq!(entry["claims"][0]["reason"], "abuse report 42");
    assert!(entry["claims"][0]["expires_at"].is_null());
    let config_entry = s
        .listed("block", "192.0.2.0/24")
        .expect("config entry listed");
    assert_eq!(config_entry["claims"][0]["origin"], "config");
    let text = s.dirs.cli_ok(&["block", "list"]);
    assert!(
        text.contains("198.18.0.50/32")
            && text.contains("cli")
            && text.contains("abuse report 42")
            && text.contains("never"),
        "{text}"
    );

    // IPv6 and CIDRs too.
    s.dirs.cli_ok(&["block", "add", "2001:db8:ffff::/120"]);
    assert_eq!(s.delivered(SOURCE6, 10), 0);

    // The allowlist wins over the CLI's block.
    s.dirs
        .cli_ok(&["allow", "add", "198.18.0.48/29", "--reason", "partner"]);
    assert_eq!(s.delivered(SOURCE, 20), 20, "allowlisted");
    assert_eq!(
        s.listed("allow", "198.18.0.48/29").unwrap()["claims"][0]["origin"],
        "cli"
    );
    let out = s.dirs.cli_ok(&["allow", "del", "198.18.0.48/29"]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(s.delivered(SOURCE, 20), 0, "blocked again");

    let out = s.dirs.cli_ok(&["block", "del", SOURCE]);
    assert!(out.contains("blocklist 198.18.0.50/32 removed"), "{out}");
    assert_eq!(s.delivered(SOURCE, 20), 20, "unblocked");
    assert!(s.listed("block", "198.18.0.50/32").is_none());
    s.dirs.cli_ok(&["block", "del", "2001:db8:ffff::/120"]);
    assert_eq!(s.delivered(SOURCE6, 10), 10);

    // A config entry cannot be removed from the CLI.
    let (code, _, err) = s.dirs.cli(&["block", "del", "192.0.2.0/24"]);
    assert_eq!(code, 1);
    assert!(err.contains("listed by config"), "{err}");
}

#[test]
fn bad_input_is_a_one_line_error_and_changes_nothing() {
    let s = Setup::new();
    let before = s.dirs.cli_ok(&["block", "list", "--json"]);
    for args in [
        vec!["block", "add", "198.18.0.300"],
        vec!["block", "add", "198.18.0.0/33"],
        vec!["block", "add", SOURCE, "--ttl", "5x"],
        vec!["block", "add", SOURCE, "--ttl", "0s"],
        vec!["block", "frobnicate", SOURCE],
        vec!["blok", "add", SOURCE],
        vec!["block", "del", "not-an-ip"],
        vec!["block", "del", "203.0.113.9"],
        vec!["allow", "add"],
    ] {
        let (code, out, err) = s.dirs.cli(&args);
        assert_eq!(code, 1, "{args:?} should fail: {out}{err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one-line error: {err}"
        );
    }
    let (_, _, err) = s.dirs.cli(&["block", "add", SOURCE, "--ttl", "5x"]);
    assert!(err.contains("invalid TTL `5x`"), "{err}");
    let (_, _, err) = s.dirs.cli(&["block", "add", "198.18.0.300"]);
    assert!(err.contains("invalid CIDR `198.18.0.300`"), "{err}");
    assert_eq!(
        s.dirs.cli_ok(&["block", "list", "--json"]),
        before,
        "nothing changed"
    );
    assert_eq!(s.delivered(SOURCE, 10), 10);

    // A request the CLI would never send: the daemon refuses it too.
    let (code, _, err) = raw_request(
        &s.dirs,
        r#"{"op":"add","list":"block","cidr":"1.2.3.4/40"}"#,
    );
    assert_eq!(code, 0);
    assert!(
        err.contains(r#""ok":false"#) && err.contains("invalid CIDR"),
        "{err}"
    );
    let (_, _, err) = raw_request(
        &s.dirs,
        r#"{"op":"add","list":"block","cidr":"1.2.3.4","ttl_secs":0}"#,
    );
    assert!(err.contains("invalid TTL"), "{err}");
    let (_, _, err) = raw_request(&s.dirs, r#"{"op":"drop_all"}"#);
    assert!(err.contains("bad request"), "{err}");
    assert_eq!(
        s.dirs.cli_ok(&["block", "list", "--json"]),
        before,
        "nothing changed"
    );
}

/// Sends one raw line to the socket with socat-free Rust: returns (0, "", reply).
fn raw_request(dirs: &DaemonDirs, line: &str) -> (i32, String, String) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(dirs.socket()).unwrap();
    stream.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    (0, String::new(), reply)
}

#[test]
fn ttl_entries_expire_on_time_and_leave_the_list() {
    let s = Setup::new();
    let added = Instant::now();
    let out = s.dirs.cli_ok(&[
        "block", "add", SOURCE, "--ttl", "2s", "--reason", "cool off",
    ]);
    assert!(out.contains("expires in"), "{out}");
    assert_eq!(s.delivered(SOURCE, 5), 0, "blocked while the TTL runs");
    let entry = s
        .listed("block", "198.18.0.50/32")
        .expect("listed with its expiry");
    // The registry's own record: a TTL of 2 s, rounded up to whole seconds of the wall
    // clock so that it never ends early.
    let expires_at = entry["claims"][0]["expires_at"]
        .as_u64()
        .expect("an expiry");
    let now = api_shield_tests::registry_now();
    assert!(
        (now + 2..=now + 3).contains(&expires_at),
        "expires at {expires_at}, now {now}"
    );
    // It leaves once the wall clock reaches its expiry, never before; how late (the daemon
    // checks just after each whole second) is reported, not raced.
    let gone_at = loop {
        // The clock read before the look: if the look finds it gone, it was gone by then.
        let now = api_shield_tests::registry_now();
        if s.listed("block", "198.18.0.50/32").is_none() {
            break now;
        }
        assert!(
            now < expires_at + 30,
            "still listed 30 s past its expiry ({expires_at})"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        gone_at + 1 >= expires_at,
        "expired early: gone by {gone_at}, expiry {expires_at}"
    );
    println!(
        "a 2 s TTL left the list {:?} after the add, {} s from its expiry",
        added.elapsed(),
        gone_at as i64 - expires_at as i64
    );
    assert_eq!(
        s.delivered(SOURCE, 10),
        10,
        "enforcement ended with the TTL"
    );
    assert!(
        s.daemon
            .as_ref()
            .unwrap()
            .log()
            .contains("198.18.0.50/32 by cli expired")
    );
}

#[test]
fn cli_entries_persist_across_a_restart() {
    let mut s = Setup::new();
    s.dirs
        .cli_ok(&["block", "add", SOURCE, "--reason", "persist me"]);
    s.dirs.cli_ok(&["block", "add", OTHER, "--ttl", "1h"]);
    s.daemon.take().unwrap().stop().unwrap();
    let state = s.dirs.state_dir().join("entries.json");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(s.dirs.state_dir())
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    // Removing the pins makes the new daemon start from the state directory alone.
    s.dirs.cli_ok(&[
        "detach",
        "--pin-dir",
        &s.dirs.pin_dir().display().to_string(),
    ]);
    assert_eq!(s.delivered(SOURCE, 5), 5, "detached: nothing enforces");
    let log = s.restart();
    assert!(log.contains("2 restored from"), "{log}");
    let entry = s.listed("block", "198.18.0.50/32").expect("restored");
    assert_eq!(entry["claims"][0]["reason"], "persist me");
    assert!(
        s.listed("block", "198.18.0.60/32").unwrap()["claims"][0]["expires_at"]
            .as_u64()
            .is_some()
    );
    assert_eq!(s.delivered(SOURCE, 10), 0, "enforced again");
}

/// `admin.group` is taken from the socket itself (SO_PEERGROUPS), not from /proc/<pid>:
/// a non-root peer in the group (as a supplementary group, or its primary one) is served,
/// one outside it refused, by the daemon's own check (the socket's permissions opened up).
#[test]
fn the_admin_group_is_read_from_the_socket() {
    require_root();
    // `users` (gid 100) is in every Debian system's /etc/group.
    let users = 100;
    let sb = Sandbox::new("veth-server").expect("sandbox");
    let dirs = DaemonDirs::new().unwrap();
    let yaml = format!("{}admin: {{group: users}}\n", config(&sb.server_if));
    let daemon = Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).expect("daemon");
    let as_peer = |ids: &[&str], args: &[&str]| {
        let out = Command::new("setpriv")
            .args(ids)
            .arg(binary())
            .arg("--socket")
            .arg(dirs.socket())
            .args(args)
            .output()
            .expect("setpriv (util-linux)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let supplementary = format!("--groups={users}");
    let in_group = ["--reuid=65534", "--regid=65534", supplementary.as_str()];
    let (code, err) = as_peer(&in_group, &["status"]);
    assert_eq!(code, Some(0), "a member of admin.group: {err}");
    let (code, err) = as_peer(&in_group, &["block", "add", SOURCE]);
    assert_eq!(code, Some(0), "{err}");
    let primary = format!("--regid={users}");
    let (code, err) = as_peer(&["--reuid=65534", &primary, "--clear-groups"], &["status"]);
    assert_eq!(code, Some(0), "admin.group as the primary group: {err}");
    // Outside the group: refused by the socket's permissions, and by the daemon once
    // those are opened up.
    let outside = ["--reuid=65534", "--regid=65534", "--groups=27"];
    let (code, err) = as_peer(&outside, &["status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Permission denied"), "{err}");
    let run_dir = dirs.socket().parent().unwrap().to_path_buf();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dirs.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let (code, err) = as_peer(&outside, &["block", "del", SOURCE]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("permission denied: uid 65534 is neither root nor in group users"),
        "{err}"
    );
    let listed = dirs.cli_ok(&["block", "list", "--json"]);
    assert!(listed.contains("198.18.0.50/32"), "unchanged: {listed}");
    daemon.stop().unwrap();
}

#[test]
fn an_unprivileged_cli_is_refused_and_changes_nothing() {
    let s = Setup::new();
    let before = s.dirs.cli_ok(&["block", "list", "--json"]);
    let as_nobody = |args: &[&str]| {
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary())
            .arg("--socket")
            .arg(s.dirs.socket())
            .args(args)
            .output()
            .expect("setpriv (util-linux)");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The socket's directory (0750) and the socket (0600) keep nobody out...
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.dirs.socket()), 0o600);
    assert_eq!(mode(s.dirs.socket().parent().unwrap()), 0o750);
    let (code, err) = as_nobody(&["block", "add", SOURCE]);
    assert_eq!(code, Some(1));
    assert!(err.contains("Permission denied"), "{err}");
    // ...and were they opened up by mistake, the daemon checks SO_PEERCRED itself.
    let run_dir = s.dirs.socket().parent().unwrap().to_path_buf();
    std::fs::set_permissions(&run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(s.dirs.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    for args in [
        vec!["block", "add", SOURCE],
        vec!["block", "del", "192.0.2.0/24"],
        vec!["reload"],
        vec!["stats"],
    ] {
        let (code, err) = as_nobody(&args);
        assert_eq!(code, Some(1), "{args:?}");
        assert!(
            err.contains("permission denied: uid 65534 is not root"),
            "{args:?}: {err}"
        );
    }
    assert_eq!(
        s.dirs.cli_ok(&["block", "list", "--json"]),
        before,
        "nothing changed"
    );
    assert_eq!(s.delivered(SOURCE, 10), 10);
    assert!(
        s.daemon
            .as_ref()
            .unwrap()
            .log()
            .contains("refused uid 65534")
    );
}

#[test]
fn stats_and_status_report_counters_rates_and_maps() {
    let s = Setup::new();
    s.dirs.cli_ok(&["stats"]);
    s.dirs.cli_ok(&["block", "add", SOURCE]);
    assert_eq!(s.delivered(SOURCE, 200), 0);
    assert_eq!(s.delivered(OTHER, 100), 100);
    let stats: Value = serde_json::from_str(&s.dirs.cli_ok(&["stats", "--json"])).unwrap();
    let reason = |name: &str| {
        stats["reasons"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["reason"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(reason("blocklisted")["packets"], 200);
    assert!(reason("passed")["packets"].as_u64().unwrap() >= 100);
    assert!(
        reason("blocklisted")["pps"].as_f64().unwrap() > 0.0,
        "a rate since the last call"
    );
    let text = s.dirs.cli_ok(&["stats"]);
    assert!(
        text.contains("blocklisted") && text.contains("rate_limited") && text.contains("PKT/S"),
        "{text}"
    );
    let again: Value = serde_json::from_str(&s.dirs.cli_ok(&["stats", "--json"])).unwrap();
    let blocked_again = again["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["reason"] == "blocklisted")
        .unwrap()
        .clone();
    assert_eq!(
        blocked_again["pps"], 0.0,
        "no blocked traffic since the previous call"
    );

    let status: Value = serde_json::from_str(&s.dirs.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["interfaces"][0]["name"], "veth-server");
    assert_eq!(status["interfaces"][0]["xdp_mode"], "native");
    assert!(status["interfaces"][0]["program_id"].as_u64().unwrap() > 0);
    let map = |name: &str| {
        status["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(
        map("LIST_V4")["entries"],
        2,
        "192.0.2.0/24 and 198.18.0.50/32"
    );
    assert!(map("LIMITER")["entries"].as_u64().unwrap() >= 1);
    assert_eq!(map("LIMITER")["capacity"], 1_000_000);
    let text = s.dirs.cli_ok(&["status"]);
    assert!(
        text.contains("interface veth-server: native XDP, program id") && text.contains("LIST_V4"),
        "{text}"
    );
}

#[test]
fn reload_from_the_cli_refuses_bad_configs_and_keeps_cli_entries() {
    let s = Setup::new();
    s.dirs.cli_ok(&["block", "add", SOURCE]);
    let daemon = s.daemon.as_ref().unwrap();
    daemon
        .write_config(&format!(
            "{}blocklist: [192.0.2.0/33]\n",
            config(&s.sb.server_if).replace("blocklist: [192.0.2.0/24]\n", "")
        ))
        .unwrap();
    let (code, _, err) = s.dirs.cli(&["reload"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("blocklist") && err.contains("192.0.2.0/33") && err.contains("line"),
        "{err}"
    );
    // A valid config without 192.0.2.0/24: the config entry goes, the CLI's stays.
    daemon
        .write_config(
            &config(&s.sb.server_if)
                .replace("blocklist: [192.0.2.0/24]", "blocklist: [203.0.113.0/24]"),
        )
        .unwrap();
    assert_eq!(s.dirs.cli_ok(&["reload"]).trim(), "reloaded");
    assert!(s.listed("block", "192.0.2.0/24").is_none());
    assert_eq!(
        s.listed("block", "203.0.113.0/24").unwrap()["claims"][0]["origin"],
        "config"
    );
    assert_eq!(
        s.listed("block", "198.18.0.50/32").unwrap()["claims"][0]["origin"],
        "cli"
    );
    assert_eq!(s.delivered(SOURCE, 10), 0);
}

#[test]
fn sigkill_keeps_enforcing_and_a_restart_continues_state_and_counters() {
    let mut s = Setup::new();
    s.dirs
        .cli_ok(&["block", "add", SOURCE, "--reason", "before the crash"]);
    assert_eq!(s.delivered(SOURCE, 100), 0);
    let blocked_before = last_counters_now(&s)["blocklisted"];
    assert!(blocked_before >= 100);

    let rx = Receiver::start(&s.sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let dest = format!("{SERVER_V4}:{SERVER_PORT}");
    let old = s.daemon.take().unwrap();
    let (sent, new) = std::thread::scope(|scope| {
        // The blocked source sends throughout: before, during and after the crash.
        let sender = scope.spawn(|| send_udp(&s.sb.client, SOURCE, &dest, 3000, 1000, 32));
        std::thread::sleep(Duration::from_millis(300));
        let log = old.kill().unwrap();
        assert!(
            !log.contains("exiting"),
            "SIGKILL leaves no chance to clean up"
        );
        // No daemon at all for a second: the pinned program keeps enforcing.
        std::thread::sleep(Duration::from_secs(1));
        let new = s.start_again();
        (sender.join().unwrap().unwrap(), new)
    });
    let log = new.log();
    assert!(
        log.contains("took over the pinned link from the previous daemon without a gap"),
        "{log}"
    );
    s.daemon = Some(new);
    let got = rx.finish();
    assert_eq!(
        got.get(&SOURCE.parse::<IpAddr>().unwrap())
            .copied()
            .unwrap_or(0),
        0,
        "a packet got through while no daemon ran or while it restarted"
    );
    let entry = s
        .listed("block", "198.18.0.50/32")
        .expect("the CLI block is still listed");
    assert_eq!(entry["claims"][0]["reason"], "before the crash");
    assert_eq!(s.delivered(SOURCE, 20), 0, "and enforced");
    let blocked_after = last_counters_now(&s)["blocklisted"];
    assert!(
        blocked_after >= blocked_before + sent.packets + 20,
        "counters continued: {blocked_before} before, {blocked_after} after {} more",
        sent.packets + 20
    );
}

fn last_counters_now(s: &Setup) -> std::collections::BTreeMap<String, u64> {
    let stats: Value = serde_json::from_str(&s.dirs.cli_ok(&["stats", "--json"])).unwrap();
    stats["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["reason"].as_str().unwrap().to_owned(),
                r["packets"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn detach_refuses_while_the_daemon_runs_then_removes_program_and_pins() {
    let mut s = Setup::new();
    let pin_dir = s.dirs.pin_dir().display().to_string();
    let (code, _, err) = s.dirs.cli(&["detach", "--pin-dir", &pin_dir]);
    assert_eq!(code, 1);
    assert!(err.contains("stop it first"), "{err}");
    let log = s.daemon.take().unwrap().stop().unwrap();
    assert!(log.contains("stays attached"), "{log}");
    let counters = last_counters(&log).unwrap();
    assert_eq!(counters["blocklisted"].0, 0);
    let blocked_config_source = "192.0.2.77";
    s.sb.add_client_address(blocked_config_source).unwrap();
    assert_eq!(
        s.delivered(blocked_config_source, 10),
        0,
        "still enforcing with no daemon"
    );
    let out = s.dirs.cli_ok(&["detach", "--pin-dir", &pin_dir]);
    assert!(
        out.contains("XDP link (native mode)") && out.contains("removed"),
        "{out}"
    );
    assert!(!s.dirs.pin_dir().exists());
    assert_eq!(
        s.delivered(blocked_config_source, 10),
        10,
        "detached: nothing enforces"
    );
    let ip =
        s.sb.server
            .exec(&["ip", "link", "show", "veth-server"])
            .unwrap();
    assert!(
        !ip.contains("xdp"),
        "no XDP program left on the interface: {ip}"
    );
}

#[test]
fn an_unwritable_state_directory_is_reported_and_enforcement_goes_on() {
    let s = Setup::new();
    // Root ignores permission bits; a directory where the state file's temporary copy goes
    // makes every save fail, as a full or read-only disk would.
    let blocker = s.dirs.state_dir().join(".entries.json.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    let out = s
        .dirs
        .cli_ok(&["block", "add", SOURCE, "--reason", "disk trouble"]);
    assert!(
        out.contains("warning: enforced, but not saved to the state directory"),
        "{out}"
    );
    assert_eq!(s.delivered(SOURCE, 10), 0, "enforced all the same");
    assert!(
        s.daemon
            .as_ref()
            .unwrap()
            .log()
            .contains("state directory:"),
        "the error is logged"
    );
    // Once the disk is back, the next change saves everything.
    std::fs::remove_dir(&blocker).unwrap();
    s.dirs.cli_ok(&["block", "add", OTHER]);
    let saved = std::fs::read_to_string(s.dirs.state_dir().join("entries.json")).unwrap();
    assert!(
        saved.contains("198.18.0.50/32") && saved.contains("198.18.0.60/32"),
        "{saved}"
    );
}

#[test]
fn the_daemon_keeps_only_cap_bpf_once_attached_and_still_operates() {
    let s = Setup::new();
    let daemon = s.daemon.as_ref().unwrap();
    let (keep, name) = api_shield::privileges::kept_capability().unwrap();
    assert!(
        daemon
            .log()
            .contains(&format!("dropped every capability but {name}"))
    );
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", daemon.pid()))
        .unwrap()
        .map(|t| t.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!tasks.is_empty());
    for task in &tasks {
        let status =
            std::fs::read_to_string(format!("/proc/{}/task/{task}/status", daemon.pid())).unwrap();
        for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
            let hex = status
                .lines()
                .find_map(|l| l.strip_prefix(set))
                .unwrap()
                .trim();
            assert_eq!(
                u64::from_str_radix(hex, 16).unwrap(),
                1 << keep,
                "thread {task}: {set} {hex}"
            );
        }
        assert!(status.contains("NoNewPrivs:\t1"), "thread {task}");
    }
    // What it still has to do works: map updates, map walks, state files, reloads.
    s.dirs.cli_ok(&["block", "add", SOURCE]);
    assert_eq!(s.delivered(SOURCE, 10), 0);
    let status: Value = serde_json::from_str(&s.dirs.cli_ok(&["status", "--json"])).unwrap();
    assert!(
        status["maps"].as_array().is_some_and(|m| !m.is_empty()),
        "{status}"
    );
    s.dirs.cli_ok(&["reload"]);
    s.dirs.cli_ok(&["block", "del", SOURCE]);
    assert_eq!(s.delivered(SOURCE, 10), 10);
    assert!(s.dirs.state_dir().join("entries.json").exists());
}
