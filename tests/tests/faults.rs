//! Faults: the daemon SIGKILLed at random points during feed syncs and during reloads, 20
//! times each (100 each with API_SHIELD_SOAK). Throughout, blocked sources keep sending and
//! not one packet gets through; after every restart the list maps hold exactly the union of
//! the config, the CLI's entries, the penalty box and the feed's last good version, read
//! back from the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use api_shield::lists::fold;
use api_shield_tests::{
    daemon::{Daemon, DaemonDirs, pinned_lists, tempdir::TempDir},
    netns::{SERVER_V4, Sandbox},
    require_root,
    rng::Rng,
    traffic::{Receiver, SERVER_PORT, send_udp},
};
use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

const CONFIG_BLOCKED: &str = "198.18.0.50";
const FEED_BLOCKED: &str = "198.18.0.70";
const BOXED: &str = "198.18.0.80";
const CLI_BLOCKED: [&str; 3] = ["198.18.0.90/32", "203.0.113.0/24", "2001:db8:cc::/48"];
const IFACE: &str = "veth-server";

fn kills() -> usize {
    if std::env::var_os("API_SHIELD_SOAK").is_some() {
        100
    } else {
        20
    }
}

/// `count` /24s from 100.64.0.0 on, starting at the `first`-th.
fn slash24s(first: u32, count: u32) -> Vec<IpNet> {
    (first..first + count)
        .map(|i| {
            let base = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + (i << 8);
            IpNet::V4(Ipv4Net::new(Ipv4Addr::from(base), 24).unwrap())
        })
        .collect()
}

/// Feed version `v`: 10,000 /24s, half of them changing from one version to the next, and
/// the feed-blocked client address in every version.
fn feed_version(v: usize) -> Vec<IpNet> {
    let mut nets = slash24s((v as u32 % 2) * 5_000, 10_000);
    nets.push(format!("{FEED_BLOCKED}/32").parse().unwrap());
    nets
}

/// Config version `v`: the config-blocked address and 5,000 /24s that change every time.
fn config_block(v: usize) -> Vec<IpNet> {
    let mut nets = slash24s(100_000 + (v as u32 % 2) * 5_000, 5_000);
    nets.push(format!("{CONFIG_BLOCKED}/32").parse().unwrap());
    nets.push("192.0.2.0/24".parse().unwrap());
    nets
}

const ALLOW: &str = "100.64.1.0/24";

fn config(v: usize, feed_path: &std::path::Path) -> String {
    let block: Vec<String> = config_block(v).iter().map(|n| format!("\"{n}\"")).collect();
    format!(
        "interfaces:\n  - name: {IFACE}\n    mode: native\nallowlist: [{ALLOW}]\nblocklist: [{}]\nlimits:\n  default: {{pps: 100000}}\n  rules:\n    - {{name: flood, match: {{protocol: udp, dst_ports: [{SERVER_PORT}]}}, pps: 20, burst_packets: 20}}\n  penalty: {{after_violations: 5, block_for: 1h, max_block: 1h}}\nfeeds:\n  - name: local\n    path: {}\n    refresh: 1h\n    max_entries: 100000\nstats_interval: 0\nevents: {{rate: 0}}\n",
        block.join(", "),
        feed_path.display()
    )
}

fn write_feed(path: &std::path::Path, v: usize) {
    let text: String = feed_version(v).iter().map(|n| format!("{n}\n")).collect();
    std::fs::write(path, text).unwrap();
}

fn penalty_entries(dirs: &DaemonDirs) -> Vec<IpNet> {
    let out = dirs.cli_ok(&["block", "list", "--json"]);
    let list: Value = serde_json::from_str(&out).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["claims"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c["origin"] == "penalty"))
        })
        .map(|e| e["cidr"].as_str().unwrap().parse().unwrap())
        .collect()
}

/// What the list maps must hold: the fold of the allowlist and every origin's blocks.
fn expected(config_v: usize, feed_v: usize, penalty: &[IpNet]) -> BTreeMap<IpNet, u32> {
    let allow: Vec<IpNet> = vec![ALLOW.parse().unwrap()];
    let mut block: BTreeSet<IpNet> = config_block(config_v).into_iter().collect();
    block.extend(feed_version(feed_v));
    block.extend(CLI_BLOCKED.iter().map(|c| c.parse::<IpNet>().unwrap()));
    block.extend(penalty.iter().copied());
    fold(&allow, &block).table.entries
}

/// Waits for the daemon to be ready and its feed to be applied, then compares the maps.
fn check_maps(
    daemon: &mut Daemon,
    dirs: &DaemonDirs,
    config_v: usize,
    feed_v: usize,
    penalty: &[IpNet],
    what: &str,
) -> usize {
    daemon
        .wait_for_log("ready: admin socket", 1, Duration::from_secs(30))
        .unwrap();
    // Returns once the feed's fetch is done: no change is under way after it.
    dirs.cli_ok(&["feeds", "refresh"]);
    let want = expected(config_v, feed_v, penalty);
    let got = pinned_lists(dirs.pin_dir(), IFACE).unwrap();
    if got != want {
        let missing: Vec<_> = want
            .keys()
            .filter(|k| !got.contains_key(k))
            .take(5)
            .collect();
        let stale: Vec<_> = got
            .keys()
            .filter(|k| !want.contains_key(k))
            .take(5)
            .collect();
        panic!(
            "{what}: maps hold {} entries, want {}; missing e.g. {missing:?}, stale e.g. {stale:?}",
            got.len(),
            want.len()
        );
    }
    got.len()
}

/// Runs `faults` while blocked sources send all along; returns (packets they sent, packets
/// of theirs the server received), which must be zero.
fn with_blocked_senders(sb: &Sandbox, faults: impl FnOnce()) -> (u64, u64) {
    let receiver = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let stop = AtomicBool::new(false);
    let sent = std::thread::scope(|scope| {
        let threads: Vec<_> = [CONFIG_BLOCKED, FEED_BLOCKED, BOXED]
            .into_iter()
            .map(|source| {
                let (stop, client) = (&stop, &sb.client);
                scope.spawn(move || {
                    let started = Instant::now();
                    let mut sent = 0;
                    // Bounded: until told to stop, at most 10 minutes.
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(600)
                    {
                        sent += send_udp(
                            client,
                            source,
                            &format!("{SERVER_V4}:{SERVER_PORT}"),
                            50,
                            500,
                            32,
                        )
                        .unwrap()
                        .packets;
                    }
                    sent
                })
            })
            .collect();
        faults();
        stop.store(true, Ordering::Relaxed);
        threads.into_iter().map(|t| t.join().unwrap()).sum()
    });
    std::thread::sleep(Duration::from_millis(200));
    let got = receiver.finish();
    let leaked = [CONFIG_BLOCKED, FEED_BLOCKED, BOXED]
        .iter()
        .map(|s| got.get(&s.parse::<IpAddr>().unwrap()).copied().unwrap_or(0))
        .sum();
    (sent, leaked)
}

/// A daemon with config, CLI, penalty and feed entries in place; returns it and the penalty
/// entries.
fn prepare(sb: &Sandbox, dirs: &Arc<DaemonDirs>, feed: &std::path::Path) -> (Daemon, Vec<IpNet>) {
    for a in [CONFIG_BLOCKED, FEED_BLOCKED, BOXED] {
        sb.add_client_address(a).unwrap();
    }
    write_feed(feed, 0);
    let mut daemon =
        Daemon::start_with(&sb.server, Some(&config(0, feed)), 1, dirs.clone()).unwrap();
    for cidr in CLI_BLOCKED {
        dirs.cli_ok(&["block", "add", cidr]);
    }
    // A flood gets BOXED into the penalty box for an hour.
    send_udp(
        &sb.client,
        BOXED,
        &format!("{SERVER_V4}:{SERVER_PORT}"),
        200,
        2000,
        32,
    )
    .unwrap();
    daemon
        .wait_for_log(
            &format!("penalty: {BOXED}/32 blocked"),
            1,
            Duration::from_secs(5),
        )
        .unwrap();
    let penalty = penalty_entries(dirs);
    assert_eq!(
        penalty,
        vec![format!("{BOXED}/32").parse::<IpNet>().unwrap()]
    );
    check_maps(&mut daemon, dirs, 0, 0, &penalty, "before any fault");
    (daemon, penalty)
}

#[test]
fn sigkill_during_feed_syncs_loses_nothing_and_leaves_nothing_stale() {
    require_root();
    let sb = Sandbox::new(IFACE).unwrap();
    let files = TempDir::new().unwrap();
    let feed = files.path().join("feed.txt");
    let dirs = DaemonDirs::new().unwrap();
    let (daemon, penalty) = prepare(&sb, &dirs, &feed);
    // How long a daemon takes to be ready, and to have a changed feed in force.
    drop(daemon.kill());
    write_feed(&feed, 1_000_001);
    let started = Instant::now();
    let mut timed = Daemon::spawn_with(&sb.server, Some(&config(0, &feed)), dirs.clone()).unwrap();
    timed
        .wait_for_log("ready: admin socket", 1, Duration::from_secs(30))
        .unwrap();
    let ready_at = started.elapsed();
    timed
        .wait_for_log(
            "feed local: 10001 entries in force",
            1,
            Duration::from_secs(30),
        )
        .unwrap();
    let applied_at = started.elapsed();
    println!("daemon ready after {ready_at:?}, the new feed version in force after {applied_at:?}");
    let daemon = timed;
    let mut rng = Rng::new(0xfa17);
    let mut daemon = Some(daemon);
    let (mut checked, mut in_sync) = (0, 0);
    let n = kills();
    let (sent, leaked) = with_blocked_senders(&sb, || {
        for v in 1..=n {
            drop(daemon.take().map(Daemon::kill));
            // A new version of the feed; a daemon that fetches it at start, killed at a random
            // point from start-up to well after the apply.
            write_feed(&feed, v);
            let victim =
                Daemon::spawn_with(&sb.server, Some(&config(0, &feed)), dirs.clone()).unwrap();
            // Mostly between start-up and the new version's apply, the rest on either side.
            let delay = ready_at + (applied_at - ready_at) * (rng.below(140) as u32) / 100;
            std::thread::sleep(delay.saturating_sub(ready_at / 2));
            let log = victim.kill().unwrap();
            if log.contains("ready: admin socket")
                && !log.contains("feed local: 10001 entries in force")
            {
                in_sync += 1;
            }
            let mut next =
                Daemon::spawn_with(&sb.server, Some(&config(0, &feed)), dirs.clone()).unwrap();
            checked += check_maps(&mut next, &dirs, 0, v, &penalty, &format!("feed kill {v}"));
            daemon = Some(next);
        }
    });
    drop(daemon.map(Daemon::kill));
    api_shield_tests::figure(&format!(
        "SIGKILL during feed sync: {n} kills ({in_sync} after start-up and before the new version was in force), {checked} map entries checked after restarts, {sent} packets from blocked sources sent, {leaked} got through"
    ));
    assert_eq!(leaked, 0, "blocked packets got through during the faults");
    assert!(sent > 0);
}

#[test]
fn sigkill_during_reloads_loses_nothing_and_leaves_nothing_stale() {
    require_root();
    let sb = Sandbox::new(IFACE).unwrap();
    let files = TempDir::new().unwrap();
    let feed = files.path().join("feed.txt");
    let dirs = DaemonDirs::new().unwrap();
    let (daemon, penalty) = prepare(&sb, &dirs, &feed);
    let mut rng = Rng::new(0x4e10ad);
    let mut daemon = Some(daemon);
    let mut checked = 0;
    let n = kills();
    let (sent, leaked) = with_blocked_senders(&sb, || {
        for v in 1..=n {
            let current = daemon.take().unwrap();
            // Reload to config version v, and die somewhere in it.
            current.write_config(&config(v, &feed)).unwrap();
            current.signal(libc::SIGHUP).unwrap();
            std::thread::sleep(Duration::from_millis(rng.below(150) as u64));
            current.kill().unwrap();
            let mut next =
                Daemon::spawn_with(&sb.server, Some(&config(v, &feed)), dirs.clone()).unwrap();
            checked += check_maps(
                &mut next,
                &dirs,
                v,
                0,
                &penalty,
                &format!("reload kill {v}"),
            );
            daemon = Some(next);
        }
    });
    drop(daemon.map(Daemon::kill));
    api_shield_tests::figure(&format!(
        "SIGKILL during reload: {n} kills, {checked} map entries checked after restarts, {sent} packets from blocked sources sent, {leaked} got through"
    ));
    assert_eq!(leaked, 0, "blocked packets got through during the faults");
    assert!(sent > 0);
}
