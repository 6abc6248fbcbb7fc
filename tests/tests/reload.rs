//! Hot reload (SIGHUP): a valid config is applied as a diff with no gap; an invalid one is
//! refused and the previous config stays in force. Traffic through a veth proves both.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use api_shield_tests::{
    daemon::{Daemon, last_counters},
    netns::{SERVER_V4, Sandbox},
    require_root,
    traffic::{Receiver, SEND_CAP, SERVER_PORT, send_udp, send_udp_until},
};

const BLOCKED: &str = "192.0.2.40";
const NORMAL: &str = "198.18.0.20";

fn config(server_if: &str, body: &str) -> String {
    format!("interfaces:\n  - name: {server_if}\n    mode: native\nstats_interval: 1s\n{body}")
}

#[test]
fn fifty_reloads_that_keep_a_source_blocked_let_none_of_its_packets_through() {
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    for addr in [BLOCKED, NORMAL] {
        sb.add_client_address(addr).unwrap();
    }
    // Two configs that both block 192.0.2.0/24 but differ in everything else.
    let a = config(
        &sb.server_if,
        "blocklist: [192.0.2.0/24, \"2001:db8:bad::/48\"]\nlimits: {default: {pps: 100000}}\n",
    );
    let b = config(
        &sb.server_if,
        "blocklist: [203.0.113.0/24, 192.0.2.0/24, 198.51.100.0/24]\nallowlist: [198.18.0.99/32]\nlimits: {default: {pps: 50000, burst_packets: 60000}}\non_malformed: drop\n",
    );
    let mut daemon = Daemon::start(&sb.server, &a, 1).expect("daemon");
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let dest = format!("{SERVER_V4}:{SERVER_PORT}");
    let done = Arc::new(AtomicBool::new(false));
    let (blocked, normal) = std::thread::scope(|s| {
        // The blocked source sends at 3000 pps, a normal one beside it at 500, until the
        // reloads are done, however long they take.
        let blocked =
            s.spawn(|| send_udp_until(&sb.client, BLOCKED, &dest, 3_000, 64, done.clone()));
        let normal = s.spawn(|| send_udp_until(&sb.client, NORMAL, &dest, 500, 64, done.clone()));
        // Both are sending before the first reload.
        std::thread::sleep(Duration::from_millis(300));
        for i in 1..=50 {
            daemon
                .write_config(if i % 2 == 1 { &b } else { &a })
                .unwrap();
            daemon.signal(libc::SIGHUP).unwrap();
            daemon
                .wait_for_log("reloaded config", i, Duration::from_secs(10))
                .expect("reload applied");
        }
        // And still sending after the last one.
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, Ordering::Relaxed);
        (
            blocked.join().unwrap().unwrap(),
            normal.join().unwrap().unwrap(),
        )
    });
    let got = rx.finish();
    let log = daemon.stop().expect("clean shutdown");
    assert!(!log.contains("reload refused"), "{log}");
    assert!(
        blocked.elapsed < SEND_CAP - Duration::from_secs(1),
        "the sender hit its cap ({:?}) before the reloads were done: inconclusive",
        blocked.elapsed
    );
    let received = |a: &str| got.get(&a.parse::<IpAddr>().unwrap()).copied().unwrap_or(0);
    assert_eq!(
        received(BLOCKED),
        0,
        "a blocked source's packet got through during a reload"
    );
    assert_eq!(
        received(NORMAL),
        normal.packets,
        "a normal source lost packets during reloads"
    );
    let counters = last_counters(&log).unwrap();
    assert_eq!(counters["blocklisted"].0, blocked.packets, "{counters:?}");
}

#[test]
fn an_invalid_config_on_reload_is_refused_and_the_old_one_stays_in_force() {
    require_root();
    let sb = Sandbox::new("veth-server").expect("sandbox");
    for addr in [BLOCKED, NORMAL] {
        sb.add_client_address(addr).unwrap();
    }
    let good = config(
        &sb.server_if,
        "blocklist: [192.0.2.0/24]\nlimits: {default: {pps: 100, burst_packets: 10}}\n",
    );
    let mut daemon = Daemon::start(&sb.server, &good, 1).expect("daemon");
    // A bad CIDR and a negative rate, and a config that would unblock the source.
    daemon
        .write_config(&config(
            &sb.server_if,
            "blocklist: [192.0.2.0/33]\nlimits: {default: {pps: -1}}\n",
        ))
        .unwrap();
    daemon.signal(libc::SIGHUP).unwrap();
    daemon
        .wait_for_log("reload refused", 1, Duration::from_secs(10))
        .expect("refusal logged");
    assert!(
        daemon.log().contains("blocklist") && daemon.log().contains("line"),
        "{}",
        daemon.log()
    );

    let dest = format!("{SERVER_V4}:{SERVER_PORT}");
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let blocked = send_udp(&sb.client, BLOCKED, &dest, 200, 0, 64).unwrap();
    let flood = send_udp(&sb.client, NORMAL, &dest, 500, 0, 64).unwrap();
    let got = rx.finish();
    let received = |a: &str| got.get(&a.parse::<IpAddr>().unwrap()).copied().unwrap_or(0);
    assert_eq!(received(BLOCKED), 0, "the old blocklist is still enforced");
    assert!(
        received(NORMAL) < 60,
        "the old limit (100 pps, burst 10) is still enforced: {} of {}",
        received(NORMAL),
        flood.packets
    );

    // A valid reload that lifts the block does take effect.
    daemon
        .write_config(&config(
            &sb.server_if,
            "blocklist: []\nlimits: {default: {pps: 100000}}\n",
        ))
        .unwrap();
    daemon.signal(libc::SIGHUP).unwrap();
    daemon
        .wait_for_log("reloaded config", 1, Duration::from_secs(10))
        .expect("reload applied");
    let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let unblocked = send_udp(&sb.client, BLOCKED, &dest, 100, 1000, 64).unwrap();
    let got = rx.finish();
    assert_eq!(
        got.get(&BLOCKED.parse::<IpAddr>().unwrap())
            .copied()
            .unwrap_or(0),
        unblocked.packets
    );
    let log = daemon.stop().unwrap();
    assert_eq!(
        last_counters(&log).unwrap()["blocklisted"].0,
        blocked.packets
    );
}
