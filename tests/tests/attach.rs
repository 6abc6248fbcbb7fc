//! How the daemon attaches, falls back and fails: generic XDP, `mode: auto` falling back
//! from native to generic where the driver refuses, and starts that fail, which must say
//! why in a few lines and leave nothing behind.

use std::{net::IpAddr, time::Duration};

use api_shield::{
    REFUSED_OBJECT,
    config::Config,
    shield::{Shield, kernel::ProgramRefused},
};
use api_shield_tests::{
    daemon::{Daemon, DaemonDirs},
    netns::Sandbox,
    require_root,
    traffic::{Receiver, SERVER_PORT, send_udp},
};

const NORMAL: &str = "198.18.0.20";
const BLOCKED: &str = "192.0.2.40";

fn config(server_if: &str, mode: &str) -> String {
    format!(
        "interfaces:\n  - name: {server_if}\n    mode: {mode}\nlimits:\n  default: {{pps: 100000}}\nblocklist: [192.0.2.0/24]\n"
    )
}

/// How the kernel says the interface's XDP program is attached: "xdp" (native),
/// "xdpgeneric", or "" (none), from `ip -d link`, not from the daemon.
fn kernel_xdp_attachment(sb: &Sandbox) -> &'static str {
    let out = sb
        .server
        .exec(&["ip", "-d", "link", "show", "dev", &sb.server_if])
        .unwrap();
    if out.contains("xdpgeneric") {
        "xdpgeneric"
    } else if out.contains(" xdp ") || out.contains("prog/xdp") {
        "xdp"
    } else {
        ""
    }
}

/// Sends 20 datagrams from `src` and returns how many the server's socket received.
fn delivered(sb: &Sandbox, src: &str) -> u64 {
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let dest = format!("{}:{SERVER_PORT}", api_shield_tests::netns::SERVER_V4);
    send_udp(&sb.client, src, &dest, 20, 1000, 32).unwrap();
    rx.finish()
        .get(&src.parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0)
}

/// Jumbo frames: a veth refuses a native XDP program without multi-buffer support when
/// its peer's MTU exceeds a page's payload, as many drivers do; generic XDP still works.
fn set_jumbo_mtu(sb: &Sandbox) {
    sb.client
        .exec(&["ip", "link", "set", "dev", &sb.client_if, "mtu", "9000"])
        .unwrap();
    sb.server
        .exec(&["ip", "link", "set", "dev", &sb.server_if, "mtu", "9000"])
        .unwrap();
}

fn status_mode(dirs: &DaemonDirs) -> String {
    let status: serde_json::Value =
        serde_json::from_str(&dirs.cli_ok(&["status", "--json"])).unwrap();
    status["interfaces"][0]["xdp_mode"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn mode_generic_attaches_generic_xdp_and_enforces() {
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    for addr in [NORMAL, BLOCKED] {
        sb.add_client_address(addr).unwrap();
    }
    let dirs = DaemonDirs::new().unwrap();
    let daemon = Daemon::start_with(
        &sb.server,
        Some(&config(&sb.server_if, "generic")),
        1,
        dirs.clone(),
    )
    .expect("daemon");
    assert!(
        daemon
            .log()
            .contains("attached to veth-server in generic XDP mode"),
        "{}",
        daemon.log()
    );
    assert_eq!(kernel_xdp_attachment(&sb), "xdpgeneric");
    assert_eq!(status_mode(&dirs), "generic");
    assert_eq!(delivered(&sb, NORMAL), 20, "an unlisted source passes");
    assert_eq!(
        delivered(&sb, BLOCKED),
        0,
        "a blocklisted source is dropped"
    );
    daemon.stop().unwrap();
}

#[test]
fn mode_auto_takes_native_xdp_and_falls_back_to_generic_where_native_is_refused() {
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    for addr in [NORMAL, BLOCKED] {
        sb.add_client_address(addr).unwrap();
    }
    let yaml = config(&sb.server_if, "auto");
    // Where the driver takes native XDP, auto takes it.
    let dirs = DaemonDirs::new().unwrap();
    let daemon = Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).expect("daemon");
    assert!(
        daemon
            .log()
            .contains("attached to veth-server in native XDP mode"),
        "{}",
        daemon.log()
    );
    assert_eq!(kernel_xdp_attachment(&sb), "xdp");
    daemon.stop().unwrap();
    drop(dirs);
    assert_eq!(kernel_xdp_attachment(&sb), "", "detached");

    set_jumbo_mtu(&sb);
    let dirs = DaemonDirs::new().unwrap();
    let daemon = Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).expect("daemon");
    let log = daemon.log();
    assert!(log.contains("native XDP refused"), "{log}");
    assert!(
        log.contains("attached to veth-server in generic XDP mode"),
        "{log}"
    );
    assert_eq!(kernel_xdp_attachment(&sb), "xdpgeneric");
    assert_eq!(status_mode(&dirs), "generic");
    assert_eq!(delivered(&sb, NORMAL), 20, "an unlisted source passes");
    assert_eq!(
        delivered(&sb, BLOCKED),
        0,
        "a blocklisted source is dropped"
    );
    daemon.stop().unwrap();
}

/// The pins a failed start may have left: none, if it cleaned up.
fn leftovers(dirs: &DaemonDirs) -> Vec<String> {
    let mut found = Vec::new();
    if dirs.pin_dir().exists() {
        for entry in walk(dirs.pin_dir()) {
            found.push(entry);
        }
        found.push(dirs.pin_dir().display().to_string());
    }
    if dirs.socket().exists() {
        found.push(dirs.socket().display().to_string());
    }
    found
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        }
        out.push(path.display().to_string());
    }
    out
}

#[test]
fn a_start_refused_by_the_driver_says_why_and_leaves_nothing_behind() {
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    set_jumbo_mtu(&sb);
    let dirs = DaemonDirs::new().unwrap();
    let daemon = Daemon::spawn_with(
        &sb.server,
        Some(&config(&sb.server_if, "native")),
        dirs.clone(),
    )
    .unwrap();
    let (status, log) = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    let error = log
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line:\n{log}"));
    assert!(
        error.contains("attaching to interface veth-server"),
        "{error}"
    );
    // The maps were made and pinned before the attach failed: the start removed them.
    assert!(log.contains("start failed: removed what it made"), "{log}");
    assert_eq!(leftovers(&dirs), Vec::<String>::new());
    assert_eq!(kernel_xdp_attachment(&sb), "");
}

#[test]
fn a_start_on_a_missing_interface_says_so_and_leaves_nothing_behind() {
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    let dirs = DaemonDirs::new().unwrap();
    let daemon =
        Daemon::spawn_with(&sb.server, Some(&config("nosuch0", "auto")), dirs.clone()).unwrap();
    let (status, log) = daemon.wait_exit(Duration::from_secs(60)).unwrap();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("error: interface nosuch0 does not exist"),
        "{log}"
    );
    assert_eq!(leftovers(&dirs), Vec::<String>::new());
    // Positive control: the same dirs serve a daemon on an interface that exists.
    let daemon = Daemon::start_with(
        &sb.server,
        Some(&config(&sb.server_if, "auto")),
        1,
        dirs.clone(),
    )
    .expect("daemon");
    daemon.stop().unwrap();
    assert!(
        !leftovers(&dirs).is_empty(),
        "a started daemon leaves its pins"
    );
}

#[test]
fn a_program_the_verifier_refuses_is_reported_in_a_few_lines() {
    require_root();
    let config = Config::parse("interfaces: [{name: unused0}]\n").unwrap();
    let err = match Shield::from_config_object(&config, REFUSED_OBJECT) {
        Ok(_) => panic!("the verifier took a program that reads the frame unchecked"),
        Err(e) => e,
    };
    let refused = err
        .downcast_ref::<ProgramRefused>()
        .unwrap_or_else(|| panic!("not a ProgramRefused: {err:#}"));
    // The kernel's own words for an unchecked read of packet data.
    assert!(
        refused.log.contains("invalid access to packet"),
        "{}",
        refused.log
    );
    let text = refused.to_string();
    assert!(text.contains("invalid access to packet"), "{text}");
    assert!(refused.stopped_at().is_some(), "{text}");
    assert!(text.lines().count() <= 10, "{text}");
}
