//! The daemon attached to a veth in a throwaway namespace pair, with real UDP traffic.
//! The test counts what a socket on the server receives and checks the shield agrees.

use std::net::IpAddr;

use api_shield_tests::{
    daemon::{Daemon, last_counters},
    frames::{ETH_P_LLDP, arp, eth},
    kernel_has_tcx,
    netns::{SERVER_V4, SERVER_V6, Sandbox},
    require_root,
    traffic::{Receiver, SERVER_PORT, send_raw, send_udp},
};

const ALLOWED: &str = "198.18.0.10";
const NORMAL: &str = "198.18.0.20";
const FLOODER: &str = "198.18.0.30";
const BLOCKED: &str = "192.0.2.40";
const BLOCKED_V6: &str = "2001:db8:bad::40";

fn config(server_if: &str, limits: &str) -> String {
    format!(
        "interfaces:\n  - name: {server_if}\n    mode: native\nlimits:\n  default: {limits}\nallowlist: [{ALLOWED}/32]\nblocklist: [192.0.2.0/24, \"2001:db8:bad::/48\"]\nstats_interval: 1s\n"
    )
}

#[test]
fn allowed_blocked_and_flooding_sources_through_a_veth() {
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    for addr in [ALLOWED, NORMAL, FLOODER, BLOCKED, BLOCKED_V6] {
        sb.add_client_address(addr).unwrap();
    }
    let daemon = Daemon::start(
        &sb.server,
        &config(&sb.server_if, "{pps: 100, burst_packets: 50}"),
        1,
    )
    .expect("daemon");
    assert!(
        daemon
            .log()
            .contains("attached to veth-server in native XDP mode"),
        "{}",
        daemon.log()
    );

    // One dual-stack socket receives both families.
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let dest4 = format!("{SERVER_V4}:{SERVER_PORT}");
    let dest6 = format!("[{SERVER_V6}]:{SERVER_PORT}");
    // The allowed source sends far above the limit, the normal one below it.
    let allowed = send_udp(&sb.client, ALLOWED, &dest4, 1000, 0, 64).unwrap();
    let normal = send_udp(&sb.client, NORMAL, &dest4, 40, 200, 64).unwrap();
    let blocked = send_udp(&sb.client, BLOCKED, &dest4, 300, 0, 64).unwrap();
    let blocked6 = send_udp(&sb.client, BLOCKED_V6, &dest6, 200, 0, 64).unwrap();
    let flood = send_udp(&sb.client, FLOODER, &dest4, 2000, 0, 64).unwrap();
    let arp_frames = send_raw(&sb.client, &sb.client_if, &arp(), 7).unwrap();
    let lldp_frames = send_raw(
        &sb.client,
        &sb.client_if,
        &eth(&[], ETH_P_LLDP, &[0u8; 46]),
        5,
    )
    .unwrap();
    let got = rx.finish();
    let log = daemon.stop().expect("clean shutdown");
    let counters = last_counters(&log).unwrap();
    let received = |a: &str| got.get(&a.parse::<IpAddr>().unwrap()).copied().unwrap_or(0);

    assert_eq!(
        received(ALLOWED),
        allowed.packets,
        "allowlisted source: everything arrives, no limit"
    );
    assert_eq!(
        received(NORMAL),
        normal.packets,
        "a source under its limit: everything arrives"
    );
    assert_eq!(
        received(BLOCKED),
        0,
        "blocklisted IPv4 source: nothing arrives"
    );
    assert_eq!(
        received(BLOCKED_V6),
        0,
        "blocklisted IPv6 source: nothing arrives"
    );
    let flood_in = received(FLOODER);
    assert!(
        flood_in >= 50,
        "the flooder gets at least its burst: {flood_in}"
    );
    assert!(
        flood_in < flood.packets / 2,
        "the flooder is throttled: {flood_in} of {}",
        flood.packets
    );

    // The shield's counters agree with what the sockets saw.
    assert_eq!(counters["allowlisted"].0, allowed.packets, "{counters:?}");
    assert_eq!(
        counters["blocklisted"].0,
        blocked.packets + blocked6.packets,
        "{counters:?}"
    );
    assert_eq!(
        counters["rate_limited"].0,
        flood.packets - flood_in,
        "{counters:?}"
    );
    // Passed: the normal source and the flooder's share, plus the kernel's own IPv6
    // neighbour discovery and MLD packets (which have no socket to arrive at).
    let passed_udp = normal.packets + flood_in;
    assert!(
        counters["passed"].0 >= passed_udp && counters["passed"].0 < passed_udp + 50,
        "passed {} vs {passed_udp} UDP datagrams: {counters:?}",
        counters["passed"].0
    );
    assert_eq!(
        counters["non_ip"].0,
        arp_frames + lldp_frames,
        "ARP and LLDP are non_ip: {counters:?}"
    );
    assert_eq!(counters["malformed"].0, 0, "{counters:?}");
    // Bytes: 64-byte payload + 8 UDP + 20 IPv4 + 14 Ethernet = 106 bytes per datagram.
    assert_eq!(
        counters["allowlisted"].1,
        allowed.packets * 106,
        "{counters:?}"
    );
    assert!(
        log.contains("the program stays attached and enforcing"),
        "{log}"
    );
}

#[test]
fn one_source_at_five_times_its_limit_gets_burst_plus_rate_times_time() {
    require_root();
    const PPS: u64 = 200;
    const BURST: u64 = 20;
    let sb = Sandbox::new("veth-server").expect("sandbox");
    sb.add_client_address(FLOODER).unwrap();
    let daemon = Daemon::start(
        &sb.server,
        &config(
            &sb.server_if,
            &format!("{{pps: {PPS}, burst_packets: {BURST}}}"),
        ),
        1,
    )
    .expect("daemon");
    let rx = Receiver::start(&sb.server, &format!("0.0.0.0:{SERVER_PORT}")).unwrap();
    // 5x the limit for 5 s, paced.
    let began = std::time::Instant::now();
    let sent = send_udp(
        &sb.client,
        FLOODER,
        &format!("{SERVER_V4}:{SERVER_PORT}"),
        5 * PPS * 5,
        5 * PPS,
        64,
    )
    .unwrap();
    let got = rx.finish();
    // Every frame reached the program between `began` and now.
    let window = began.elapsed();
    let log = daemon.stop().expect("clean shutdown");
    let received = got
        .get(&FLOODER.parse::<IpAddr>().unwrap())
        .copied()
        .unwrap_or(0);
    // GCRA's contract: never more than the burst plus the rate over the time the frames
    // arrived in, which lies inside `window`.
    let most = BURST as f64 + PPS as f64 * window.as_secs_f64() + 1.0;
    // And, at five times the rate, about that much: the frames arrived over at least
    // most of the send (a loaded host may hold some back and hand them over at once).
    let expected = BURST as f64 + PPS as f64 * sent.elapsed.as_secs_f64();
    println!(
        "rate accuracy: sent {} in {:.3} s, received {received}, expected {expected:.1}, at most {most:.1} (window {:.3} s)",
        sent.packets,
        sent.elapsed.as_secs_f64(),
        window.as_secs_f64()
    );
    assert!(
        received as f64 <= most,
        "received {received}, more than the burst plus the rate over {window:?} ({most:.1})"
    );
    assert!(
        received as f64 >= 0.8 * expected,
        "received {received}, under 80% of {expected:.1}"
    );
    let counters = last_counters(&log).unwrap();
    assert_eq!(
        counters["rate_limited"].0,
        sent.packets - received,
        "{counters:?}"
    );
}

#[test]
fn mode_tc_enforces_the_same_verdicts_and_restarts_without_a_gap() {
    use api_shield_tests::daemon::DaemonDirs;
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    for addr in [NORMAL, BLOCKED] {
        sb.add_client_address(addr).unwrap();
    }
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: tc\nlimits:\n  default: {{pps: 100000}}\nblocklist: [192.0.2.0/24]\n",
        sb.server_if
    );
    let dirs = DaemonDirs::new().unwrap();
    let daemon = Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).expect("daemon");
    assert!(
        daemon
            .log()
            .contains("attached to veth-server in TC ingress mode"),
        "{}",
        daemon.log()
    );
    let status: serde_json::Value =
        serde_json::from_str(&dirs.cli_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["interfaces"][0]["xdp_mode"], "tc");
    let dest = format!("{SERVER_V4}:{SERVER_PORT}");
    let delivered = |src: &str| {
        let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
        send_udp(&sb.client, src, &dest, 20, 1000, 32).unwrap();
        rx.finish()
            .get(&src.parse::<IpAddr>().unwrap())
            .copied()
            .unwrap_or(0)
    };
    assert_eq!(delivered(NORMAL), 20);
    assert_eq!(delivered(BLOCKED), 0);
    // A restart takes the pinned TCX link over, or, on a kernel without TCX (before 6.6),
    // replaces the cls_bpf filter in place.
    let tcx = kernel_has_tcx();
    assert_eq!(
        daemon.log().contains("no TCX"),
        !tcx,
        "the fallback is logged where TCX is missing, and only there:\n{}",
        daemon.log()
    );
    daemon.stop().unwrap();
    assert_eq!(delivered(BLOCKED), 0, "still enforcing with no daemon");
    let daemon =
        Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).expect("restarted daemon");
    let took_over = if tcx {
        "took over the pinned link"
    } else {
        "replaced the previous daemon's cls_bpf filter in place"
    };
    assert!(daemon.log().contains(took_over), "{}", daemon.log());
    assert_eq!(delivered(BLOCKED), 0);
    daemon.stop().unwrap();
    let out = dirs.cli_ok_in(
        &sb.server,
        &["detach", "--pin-dir", &dirs.pin_dir().display().to_string()],
    );
    let removed = if tcx {
        "TC link (tc mode)"
    } else {
        "TC filter (tc mode, cls_bpf)"
    };
    assert!(out.contains(removed), "{out}");
    assert_eq!(delivered(BLOCKED), 20, "detached");
}
