//! Drop events under a spoofed flood: sampled in the kernel to the configured rate per
//! reason; suppressed events are counted; the daemon writes the delivered ones out.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use api_shield_tests::{
    daemon::Daemon,
    frames::udp4,
    http::{get, metric},
    netns::Sandbox,
    require_root,
    traffic::send_raw_rounds,
};

const RATE: u64 = 100;

#[test]
fn a_flood_from_a_thousand_sources_yields_events_at_the_configured_rate() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nblocklist: [198.18.128.0/20]\nevents:\n  rate: {RATE}\n  format: text\nstats_interval: 0\n",
        sb.server_if
    );
    let daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    // 1,000 spoofed sources inside the blocked /20, 100 rounds: 100,000 frames.
    let frames: Vec<Vec<u8>> = (0..1000u32)
        .map(|i| {
            udp4(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i),
                18,
            )
        })
        .collect();
    let began = Instant::now();
    let (sent, elapsed) = send_raw_rounds(&sb.client, &sb.client_if, frames, 100).unwrap();
    assert_eq!(sent, 100_000);
    let labels = "{interface=\"veth-server\",reason=\"blocklisted\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    let (delivered, suppressed, dropped) = loop {
        let (_, body) = get(&sb.server, "127.0.0.1:9477", "/metrics").unwrap();
        let delivered = metric(&body, "api_shield_events_total", labels).unwrap();
        let suppressed = metric(&body, "api_shield_events_suppressed_total", labels).unwrap();
        let dropped = metric(
            &body,
            "api_shield_packets_total",
            "{interface=\"veth-server\",action=\"drop\",reason=\"blocklisted\"}",
        )
        .unwrap();
        if (dropped as u64 >= sent && delivered + suppressed >= dropped)
            || Instant::now() > deadline
        {
            break (delivered as u64, suppressed as u64, dropped as u64);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "flood of {sent} frames in {elapsed:?}: {dropped} dropped, {delivered} events delivered, {suppressed} suppressed"
    );
    assert_eq!(
        dropped, sent,
        "every spoofed frame was dropped as blocklisted"
    );
    assert_eq!(
        delivered + suppressed,
        dropped,
        "the suppressed counter accounts for every event not delivered"
    );
    // Every frame was judged between `began` and now: a burst of one second's worth,
    // then the rate, over that window at most.
    let window = began.elapsed();
    let allowed = RATE + (RATE as f64 * window.as_secs_f64()).ceil() as u64 + 1;
    assert!(
        delivered >= RATE,
        "at least the burst is delivered: {delivered}"
    );
    assert!(
        delivered <= allowed,
        "{delivered} events delivered, at most {allowed} allowed at {RATE}/s over {window:?}"
    );
    let log = daemon.stop().unwrap();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("drop time="))
        .collect();
    assert_eq!(
        lines.len() as u64,
        delivered,
        "one line per delivered event"
    );
    assert!(
        lines[0].contains("interface=veth-server source=198.18.1")
            && lines[0].contains("dst_port=9000 protocol=udp reason=blocklisted rule=default"),
        "{}",
        lines[0]
    );
}

/// Polls the metrics until `count` frames were dropped as blocklisted: every event those
/// frames could raise has been raised by then.
fn wait_for_drops(sb: &Sandbox, count: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get(&sb.server, "127.0.0.1:9477", "/metrics").unwrap();
        let dropped = metric(
            &body,
            "api_shield_packets_total",
            "{interface=\"veth-server\",action=\"drop\",reason=\"blocklisted\"}",
        )
        .unwrap_or(0.0);
        if dropped >= count {
            assert_eq!(dropped, count, "only the frames sent");
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{dropped} of {count} frames dropped after 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn events_can_be_json_or_off() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    let frames = vec![udp4(Ipv4Addr::new(192, 0, 2, 9), 18)];
    let yaml = |events: &str| {
        format!(
            "interfaces:\n  - name: {}\n    mode: native\nblocklist: [192.0.2.0/24]\nstats_interval: 0\n{events}",
            sb.server_if
        )
    };
    let mut daemon =
        Daemon::start(&sb.server, &yaml("events: {rate: 1000, format: json}\n"), 1).unwrap();
    send_raw_rounds(&sb.client, &sb.client_if, frames.clone(), 5).unwrap();
    wait_for_drops(&sb, 5.0);
    // Written out by the daemon's reader as they come: waited for, not slept on.
    daemon
        .wait_for_log("\"reason\":\"blocklisted\"", 5, Duration::from_secs(10))
        .unwrap();
    let log = daemon.stop().unwrap();
    let events: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 5, "{log}");
    assert_eq!(events[0]["source"], "192.0.2.9");
    assert_eq!(events[0]["reason"], "blocklisted");
    assert_eq!(events[0]["interface"], "veth-server");
    // Off: the frames are dropped (the control) and no event is raised for them.
    let daemon = Daemon::start(&sb.server, &yaml("events: {rate: 0}\n"), 1).unwrap();
    send_raw_rounds(&sb.client, &sb.client_if, frames, 5).unwrap();
    let body = wait_for_drops(&sb, 5.0);
    let log = daemon.stop().unwrap();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("drop ") || l.starts_with('{')),
        "{log}"
    );
    for family in [
        "api_shield_events_total",
        "api_shield_events_suppressed_total",
    ] {
        assert_eq!(
            metric(
                &body,
                family,
                "{interface=\"veth-server\",reason=\"blocklisted\"}"
            ),
            Some(0.0),
            "{family}"
        );
    }
}
