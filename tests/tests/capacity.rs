//! Running out of room: two million distinct sources against a limiter of one million
//! (evictions counted, no compliant source wrongly dropped), and a full state directory
//! (reported, enforcement goes on, saved once there is room again).

use std::{net::Ipv4Addr, process::Command, time::Instant};

use api_shield::{config::Config, shield::Shield};
use api_shield_common::counters::Reason;
use api_shield_tests::{
    daemon::{Daemon, DaemonDirs},
    frames::udp4,
    http::{get, metric},
    netns::{SERVER_V4, Sandbox},
    require_root,
    traffic::{Receiver, SERVER_PORT, send_udp},
};
use aya::programs::{TestRun, TestRunOptions};

const XDP_PASS: u32 = 2;

fn sources() -> u32 {
    if std::env::var_os("API_SHIELD_SOAK").is_some() {
        8_000_000
    } else {
        2_000_000
    }
}

#[test]
fn two_million_sources_against_a_million_buckets_evict_but_never_drop_the_compliant() {
    require_root();
    let config = Config::parse(
        "interfaces: [{name: unused0}]\ncapacity: {sources: 1000000}\nlimits: {default: {pps: 1000, burst_packets: 100}}\n",
    )
    .unwrap();
    let mut shield = Shield::from_config(&config).unwrap();
    let spoofed = sources();
    let template = udp4(Ipv4Addr::new(10, 0, 0, 0), 18);
    // 10 compliant sources, paced by the clock to at most 500 pps each (a packet at
    // least 2 ms after the last), under their 1,000 pps however fast this machine runs.
    let compliant: Vec<Vec<u8>> = (1..=10)
        .map(|i| udp4(Ipv4Addr::new(198, 51, 100, i), 18))
        .collect();
    let pace = std::time::Duration::from_millis(2);
    let started = Instant::now();
    let mut compliant_last = started;
    let (mut compliant_sent, mut compliant_passed) = (0u64, 0u64);
    let mut frame = template.clone();
    let program = shield.program().unwrap();
    let run = |frame: &[u8]| {
        program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .unwrap()
            .return_value
    };
    for i in 0..spoofed {
        // 10.0.0.0/8 and beyond: every source distinct (the IPv4 checksum is not checked).
        let src = u32::from(Ipv4Addr::new(10, 0, 0, 0)) + i;
        frame[14 + 12..14 + 16].copy_from_slice(&src.to_be_bytes());
        assert_eq!(run(&frame), XDP_PASS, "a new source's first packet");
        if i % 256 == 255 && compliant_last.elapsed() >= pace {
            compliant_last = Instant::now();
            for c in &compliant {
                compliant_sent += 1;
                compliant_passed += u64::from(run(c) == XDP_PASS);
            }
        }
    }
    let elapsed = started.elapsed();
    let created = shield.limiter_buckets_created().unwrap();
    let tracked = shield.tracked_sources().unwrap() as u64;
    let rate_limited = shield
        .counters()
        .unwrap()
        .into_iter()
        .find(|(r, _)| *r == Reason::RateLimited)
        .unwrap()
        .1
        .packets;
    api_shield_tests::figure(&format!(
        "limiter capacity: {spoofed} spoofed sources + 10 compliant ones against 1,000,000 buckets in {elapsed:.1?}: {created} buckets created, {tracked} tracked, {} evicted; compliant packets {compliant_passed}/{compliant_sent} passed; {rate_limited} rate-limited drops",
        created - tracked
    ));
    assert!(
        compliant_sent >= 1_000,
        "the compliant sources sent: {compliant_sent}"
    );
    assert_eq!(
        compliant_passed, compliant_sent,
        "a compliant source was dropped"
    );
    assert_eq!(rate_limited, 0, "nobody went over the limit");
    // Every distinct source needs a bucket of its own, and the table holds a million: by
    // the pigeonhole, at least the rest were replaced.
    assert!(
        tracked <= 1_000_000,
        "{tracked} buckets in a table of 1,000,000"
    );
    assert!(
        created >= u64::from(spoofed) + 10,
        "every new source made a bucket: {created} for {spoofed} + 10 sources"
    );
}

#[test]
fn evictions_reach_the_metrics() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\ncapacity: {{sources: 1000}}\nstats_interval: 0\n",
        sb.server_if
    );
    let _daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    let mac = sb.server_mac().unwrap();
    let frames: Vec<Vec<u8>> = (0..5_000u32)
        .map(|i| {
            let mut f = udp4(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i),
                18,
            );
            f[..6].copy_from_slice(&mac);
            f
        })
        .collect();
    let (sent, _) =
        api_shield_tests::traffic::send_raw_rounds(&sb.client, &sb.client_if, frames, 1).unwrap();
    assert_eq!(sent, 5_000);
    // Waited for: every frame judged, each a new source's first packet, so passed. (The
    // kernel's own IPv6 frames on the link, multicast listener reports, pass too.)
    let deadline = Instant::now() + std::time::Duration::from_secs(10);
    let body = loop {
        let (_, body) = get(&sb.server, "127.0.0.1:9477", "/metrics").unwrap();
        let counter = |action: &str, reason: &str| {
            metric(
                &body,
                "api_shield_packets_total",
                &format!("{{interface=\"veth-server\",action=\"{action}\",reason=\"{reason}\"}}"),
            )
            .unwrap_or(0.0)
        };
        let passed = counter("pass", "passed");
        if passed >= 5_000.0 || Instant::now() > deadline {
            assert!(
                passed >= 5_000.0,
                "every new source's first frame passes: {passed}"
            );
            assert_eq!(
                counter("drop", "rate_limited"),
                0.0,
                "no first frame is limited"
            );
            break body;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let created = metric(&body, "api_shield_limiter_buckets_created_total", "").unwrap();
    let evicted = metric(&body, "api_shield_limiter_evictions_total", "").unwrap();
    let tracked = metric(&body, "api_shield_tracked_sources", "").unwrap();
    // 5,000 distinct sources through a table of 1,000: each made a bucket, at most 1,000
    // are held, so at least 4,000 were replaced, and no more than were made.
    assert!(created >= 5_000.0, "{created}");
    assert!(tracked <= 1_000.0, "{tracked}");
    assert!(
        (4_000.0..=created).contains(&evicted),
        "{evicted} evictions of {created} buckets"
    );
}

/// A tmpfs of `kib` KiB mounted on `dir` for the test's lifetime.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, kib: u32) -> SmallFs {
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={kib}k,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs on {}", dir.display());
        SmallFs(dir.to_owned())
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_state_directory_is_reported_while_enforcement_goes_on() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    const SOURCE: &str = "198.18.0.50";
    sb.add_client_address(SOURCE).unwrap();
    let dirs = DaemonDirs::new().unwrap();
    // The daemon's state directory is a small filesystem of its own.
    let state = dirs.state_dir();
    std::fs::create_dir_all(&state).unwrap();
    let _fs = SmallFs::mount(&state, 64);
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nstats_interval: 0\n",
        sb.server_if
    );
    let daemon = Daemon::start_with(&sb.server, Some(&yaml), 1, dirs.clone()).unwrap();
    // Fill it up.
    let filler = state.join("filler");
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=4k", "count=64"])
        .arg(format!("of={}", filler.display()))
        .output()
        .unwrap();
    let delivered = |count| {
        let rx = Receiver::start(&sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
        send_udp(
            &sb.client,
            SOURCE,
            &format!("{SERVER_V4}:{SERVER_PORT}"),
            count,
            1000,
            32,
        )
        .unwrap();
        rx.finish()
            .get(&SOURCE.parse().unwrap())
            .copied()
            .unwrap_or(0)
    };
    let out = dirs.cli_ok(&["block", "add", SOURCE]);
    assert!(out.contains("not saved"), "the CLI is told: {out}");
    assert_eq!(delivered(10), 0, "enforced all the same");
    assert!(
        daemon.log().contains("No space left on device"),
        "{}",
        daemon.log()
    );
    // Room again: the next change saves everything.
    std::fs::remove_file(&filler).unwrap();
    dirs.cli_ok(&["block", "add", "198.18.0.51"]);
    let saved = std::fs::read_to_string(state.join("entries.json")).unwrap();
    assert!(
        saved.contains("198.18.0.50/32") && saved.contains("198.18.0.51/32"),
        "{saved}"
    );
    drop(daemon);
}
