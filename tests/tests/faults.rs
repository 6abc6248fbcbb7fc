//! Faults: the daemon SIGKILLed at random points during feed syncs and during reloads, 20
//! times each (100 each with API_SHIELD_SOAK), some of the kills inside the sync (asserted).
//! Throughout, blocked sources keep sending and not one packet gets through, while an
//! allowlisted and an unlisted source, sending beside them, get every packet through. After
//! every restart the attached program itself is probed (BPF_PROG_TEST_RUN) with sources
//! inside every entry of the config, the CLI, the penalty box and the feed's last good
//! version, and inside every entry of the other versions: its verdicts must be the
//! independent oracle's for exactly that union.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use api_shield_tests::{
    daemon::{Daemon, DaemonDirs, pinned_xdp_program, tempdir::TempDir},
    frames,
    netns::{SERVER_V4, Sandbox},
    oracle::{Action, Key, Oracle, Policy, PolicyRule},
    require_root,
    rng::Rng,
    traffic::{Receiver, SERVER_PORT, send_udp},
};
use aya::programs::{TestRun as _, TestRunOptions};
use ipnet::{IpNet, Ipv4Net};
use serde_json::Value;

const CONFIG_BLOCKED: &str = "198.18.0.50";
const FEED_BLOCKED: &str = "198.18.0.70";
const BOXED: &str = "198.18.0.80";
const CLI_BLOCKED: [&str; 3] = ["198.18.0.90/32", "203.0.113.0/24", "2001:db8:cc::/48"];
/// Positive controls: inside a /24 the feed blocks in even versions, but allowlisted; and
/// in no list, sending to a port under the default limit only.
const ALLOWED_CLIENT: &str = "100.64.1.7";
const UNLISTED_CLIENT: &str = "198.18.0.60";
const CONTROL_PORT: u16 = SERVER_PORT + 1;
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

/// The policy in force with config version `config_v`, feed version `feed_v` and `penalty`,
/// written from the test's own data: every origin's entries, the allowlist and the rule.
fn policy(config_v: usize, feed_v: usize, penalty: &[IpNet]) -> Policy {
    let mut block: BTreeSet<IpNet> = config_block(config_v).into_iter().collect();
    block.extend(feed_version(feed_v));
    block.extend(CLI_BLOCKED.iter().map(|c| c.parse::<IpNet>().unwrap()));
    block.extend(penalty.iter().copied());
    Policy {
        allow: vec![ALLOW.parse().unwrap()],
        block: block.into_iter().collect(),
        rules: vec![PolicyRule {
            name: "flood",
            protocols: Some(vec![17]),
            ports: vec![(SERVER_PORT, SERVER_PORT)],
            syn: false,
            limit: Some((20, 20)),
            key: Key::SOURCE,
            yaml_match: "",
        }],
        default_limit: (100_000, 100_000),
        drop_malformed: true,
        dry_run: false,
        list_capacity: 100_000,
    }
}

/// A random address inside `net`, and its first and last for one net in ten.
fn inside(net: &IpNet, rng: &mut Rng, out: &mut Vec<IpAddr>) {
    let random = match net {
        IpNet::V4(n) => {
            let span = 1u64 << (32 - n.prefix_len());
            IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()) + rng.below(span as usize) as u32,
            ))
        }
        IpNet::V6(n) => {
            let host = ((u128::from(rng.next_u64()) << 64) | u128::from(rng.next_u64()))
                & (u128::MAX
                    .checked_shr(u32::from(n.prefix_len()))
                    .unwrap_or(0));
            IpAddr::V6((u128::from(n.network()) | host).into())
        }
    };
    out.push(random);
    if rng.below(10) == 0 {
        out.extend([net.network(), net.broadcast()]);
    }
}

/// Waits for the daemon to be ready and its feed to be applied, then probes the attached
/// program with a TCP segment (port 80: the default limit, whose burst no probe comes
/// near) from each sample source, and compares its verdicts with the oracle's for the
/// policy that must be in force: a missing entry lets a blocked source pass, a stale one
/// drops a source the policy passes. Returns the sources probed.
fn check_verdicts(
    daemon: &mut Daemon,
    dirs: &DaemonDirs,
    config_v: usize,
    feed_v: usize,
    penalty: &[IpNet],
    what: &str,
    rng: &mut Rng,
) -> usize {
    daemon
        .wait_for_log("ready: admin socket", 1, Duration::from_secs(30))
        .unwrap();
    // Returns once the feed's fetch is done: no change is under way after it.
    dirs.cli_ok(&["feeds", "refresh"]);
    let oracle = Oracle::new(policy(config_v, feed_v, penalty));
    // Sources inside every entry any origin has in this version or the next, and the
    // senders' own addresses: drawn without the policy, so an entry it lacks is probed too.
    let mut nets: Vec<IpNet> = [config_v, config_v + 1]
        .iter()
        .flat_map(|&v| config_block(v))
        .chain([feed_v, feed_v + 1].iter().flat_map(|&v| feed_version(v)))
        .chain(CLI_BLOCKED.iter().map(|c| c.parse().unwrap()))
        .chain(penalty.iter().copied())
        .chain([ALLOW, "2001:db8:cd::/48"].map(|c| c.parse().unwrap()))
        .collect();
    nets.extend(
        [
            CONFIG_BLOCKED,
            FEED_BLOCKED,
            BOXED,
            ALLOWED_CLIENT,
            UNLISTED_CLIENT,
        ]
        .map(|a| IpNet::from(a.parse::<IpAddr>().unwrap())),
    );
    let mut sources = Vec::new();
    for net in &nets {
        inside(net, rng, &mut sources);
    }
    let program = pinned_xdp_program(dirs.pin_dir(), IFACE).unwrap();
    let tcp = frames::tcp(40000, 80, 0x10);
    let mut wrong = Vec::new();
    for &source in &sources {
        let frame = match source {
            IpAddr::V4(a) => frames::ip4(a, frames::IPPROTO_TCP, &tcp),
            IpAddr::V6(a) => frames::ip6(a, frames::IPPROTO_TCP, &tcp),
        };
        let got = match program
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .unwrap()
            .return_value
        {
            XDP_DROP => Action::Drop,
            XDP_PASS => Action::Pass,
            other => panic!("{what}: the program returned {other} for {source}"),
        };
        let want = oracle.judge(&frame).expected.action;
        if got != want {
            wrong.push(format!("{source}: {got:?}, want {want:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} sources judged wrongly, e.g. {:?}",
        wrong.len(),
        sources.len(),
        &wrong[..wrong.len().min(5)]
    );
    sources.len()
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// What the senders saw while the faults ran.
struct Traffic {
    blocked_sent: u64,
    /// Packets of the blocked sources the server received: must be 0.
    leaked: u64,
    /// Per control source: (sent, received): must be equal.
    controls: Vec<(&'static str, u64, u64)>,
}

/// Runs `faults` while blocked sources send all along, and the control sources beside them.
fn with_senders(sb: &Sandbox, faults: impl FnOnce()) -> Traffic {
    let receiver = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
    let control_receiver = Receiver::start(&sb.server, &format!("[::]:{CONTROL_PORT}")).unwrap();
    let stop = AtomicBool::new(false);
    let senders = [CONFIG_BLOCKED, FEED_BLOCKED, BOXED]
        .map(|s| (s, SERVER_PORT))
        .into_iter()
        .chain([
            (ALLOWED_CLIENT, SERVER_PORT),
            (UNLISTED_CLIENT, CONTROL_PORT),
        ]);
    let sent: BTreeMap<&str, u64> = std::thread::scope(|scope| {
        let threads: Vec<_> = senders
            .map(|(source, port)| {
                let (stop, client) = (&stop, &sb.client);
                let thread = scope.spawn(move || {
                    let started = Instant::now();
                    let mut sent = 0;
                    // Bounded: until told to stop, at most 10 minutes.
                    while !stop.load(Ordering::Relaxed)
                        && started.elapsed() < Duration::from_secs(600)
                    {
                        sent +=
                            send_udp(client, source, &format!("{SERVER_V4}:{port}"), 50, 500, 32)
                                .unwrap()
                                .packets;
                    }
                    sent
                });
                (source, thread)
            })
            .collect();
        faults();
        stop.store(true, Ordering::Relaxed);
        threads
            .into_iter()
            .map(|(source, t)| (source, t.join().unwrap()))
            .collect()
    });
    let mut got = receiver.finish();
    got.extend(control_receiver.finish());
    let received = |s: &str| got.get(&s.parse::<IpAddr>().unwrap()).copied().unwrap_or(0);
    let blocked = [CONFIG_BLOCKED, FEED_BLOCKED, BOXED];
    Traffic {
        blocked_sent: blocked.iter().map(|s| sent[s]).sum(),
        leaked: blocked.iter().map(|s| received(s)).sum(),
        controls: [ALLOWED_CLIENT, UNLISTED_CLIENT]
            .map(|s| (s, sent[s], received(s)))
            .to_vec(),
    }
}

/// The assertions both fault tests share, after their figure is printed.
fn assert_traffic(t: &Traffic) {
    assert!(t.blocked_sent > 0, "the blocked sources sent nothing");
    assert_eq!(t.leaked, 0, "blocked packets got through during the faults");
    for &(source, sent, received) in &t.controls {
        assert!(sent > 0, "control {source} sent nothing");
        assert_eq!(
            received, sent,
            "control {source}: {received} of its {sent} packets got through"
        );
    }
}

/// A daemon with config, CLI, penalty and feed entries in place; returns it and the penalty
/// entries.
fn prepare(
    sb: &Sandbox,
    dirs: &Arc<DaemonDirs>,
    feed: &std::path::Path,
    rng: &mut Rng,
) -> (Daemon, Vec<IpNet>) {
    for a in [
        CONFIG_BLOCKED,
        FEED_BLOCKED,
        BOXED,
        ALLOWED_CLIENT,
        UNLISTED_CLIENT,
    ] {
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
    check_verdicts(&mut daemon, dirs, 0, 0, &penalty, "before any fault", rng);
    (daemon, penalty)
}

/// A random share, 0 to 130%, of `d`: mostly inside a sync of that length, some past it.
fn share_of(d: Duration, rng: &mut Rng) -> Duration {
    d * rng.below(130) as u32 / 100
}

#[test]
fn sigkill_during_feed_syncs_loses_nothing_and_leaves_nothing_stale() {
    require_root();
    let sb = Sandbox::new(IFACE).unwrap();
    let files = TempDir::new().unwrap();
    let feed = files.path().join("feed.txt");
    let dirs = DaemonDirs::new().unwrap();
    let mut rng = Rng::new(0xfa17);
    let (daemon, penalty) = prepare(&sb, &dirs, &feed, &mut rng);
    // How long a daemon takes to be ready, and then to have a changed feed in force.
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
    let sync = started.elapsed() - ready_at;
    println!("daemon ready after {ready_at:?}, the new feed version in force {sync:?} later");
    let mut daemon = Some(timed);
    let (mut probed, mut in_sync) = (0, 0);
    let n = kills();
    let traffic = with_senders(&sb, || {
        for v in 1..=n {
            drop(daemon.take().map(Daemon::kill));
            // A new version of the feed, and a daemon that fetches it at start: killed during
            // its start-up one time in four, else at a random point of the sync that
            // follows (or just after it).
            write_feed(&feed, v);
            let mut victim =
                Daemon::spawn_with(&sb.server, Some(&config(0, &feed)), dirs.clone()).unwrap();
            if rng.below(4) == 0 {
                std::thread::sleep(share_of(ready_at, &mut rng));
            } else {
                victim
                    .wait_for_log("ready: admin socket", 1, Duration::from_secs(30))
                    .unwrap();
                std::thread::sleep(share_of(sync, &mut rng));
            }
            let log = victim.kill().unwrap();
            if log.contains("ready: admin socket")
                && !log.contains("feed local: 10001 entries in force")
            {
                in_sync += 1;
            }
            let mut next =
                Daemon::spawn_with(&sb.server, Some(&config(0, &feed)), dirs.clone()).unwrap();
            probed += check_verdicts(
                &mut next,
                &dirs,
                0,
                v,
                &penalty,
                &format!("feed kill {v}"),
                &mut rng,
            );
            daemon = Some(next);
        }
    });
    drop(daemon.map(Daemon::kill));
    api_shield_tests::figure(&format!(
        "SIGKILL during feed sync: {n} kills, {in_sync} of them after start-up and before the new version was in force; {probed} sources probed after restarts; {} packets from blocked sources sent, {} got through; controls (sent, received): {:?}",
        traffic.blocked_sent, traffic.leaked, traffic.controls
    ));
    assert_traffic(&traffic);
    assert!(in_sync > 0, "no kill landed inside a feed sync");
}

#[test]
fn sigkill_during_reloads_loses_nothing_and_leaves_nothing_stale() {
    require_root();
    let sb = Sandbox::new(IFACE).unwrap();
    let files = TempDir::new().unwrap();
    let feed = files.path().join("feed.txt");
    let dirs = DaemonDirs::new().unwrap();
    let mut rng = Rng::new(0x4e10ad);
    let (mut daemon, penalty) = prepare(&sb, &dirs, &feed, &mut rng);
    // How long a reload to a changed config takes.
    daemon.write_config(&config(1, &feed)).unwrap();
    daemon.signal(libc::SIGHUP).unwrap();
    daemon
        .wait_for_log("reloading config", 1, Duration::from_secs(10))
        .unwrap();
    let started = Instant::now();
    daemon
        .wait_for_log("reloaded config", 1, Duration::from_secs(30))
        .unwrap();
    let reload = started.elapsed();
    println!("a reload takes {reload:?}");
    let mut daemon = Some(daemon);
    let (mut probed, mut in_sync) = (0, 0);
    let n = kills();
    let traffic = with_senders(&sb, || {
        for v in 2..n + 2 {
            let mut current = daemon.take().unwrap();
            // Reload to config version v, and die somewhere in it: one time in four as soon
            // as the signal is sent, else at a random point of the reload (or just after).
            current.write_config(&config(v, &feed)).unwrap();
            current.signal(libc::SIGHUP).unwrap();
            if rng.below(4) == 0 {
                std::thread::sleep(Duration::from_millis(rng.below(20) as u64));
            } else {
                current
                    .wait_for_log("reloading config", 1, Duration::from_secs(10))
                    .unwrap();
                std::thread::sleep(share_of(reload, &mut rng));
            }
            let log = current.kill().unwrap();
            if log.contains("reloading config") && !log.contains("reloaded config") {
                in_sync += 1;
            }
            let mut next =
                Daemon::spawn_with(&sb.server, Some(&config(v, &feed)), dirs.clone()).unwrap();
            probed += check_verdicts(
                &mut next,
                &dirs,
                v,
                0,
                &penalty,
                &format!("reload kill {v}"),
                &mut rng,
            );
            daemon = Some(next);
        }
    });
    drop(daemon.map(Daemon::kill));
    api_shield_tests::figure(&format!(
        "SIGKILL during reload: {n} kills, {in_sync} of them inside the reload; {probed} sources probed after restarts; {} packets from blocked sources sent, {} got through; controls (sent, received): {:?}",
        traffic.blocked_sent, traffic.leaked, traffic.controls
    ));
    assert_traffic(&traffic);
    assert!(in_sync > 0, "no kill landed inside a reload");
}
