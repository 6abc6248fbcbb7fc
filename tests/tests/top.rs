//! `top` during a flood ranks the flooding source first, from the limiter's own state;
//! `stats --watch` shows a live view.

use std::time::Duration;

use api_shield_tests::{
    daemon::Daemon,
    netns::{SERVER_V4, Sandbox},
    require_root,
    traffic::{SERVER_PORT, send_udp},
};
use serde_json::Value;

const FLOODER: &str = "198.18.0.30";
const NORMAL: &str = "198.18.0.20";

#[test]
fn top_lists_the_flooding_source_first_and_watch_shows_live_rates() {
    require_root();
    let sb = Sandbox::new("veth-server").unwrap();
    for a in [FLOODER, NORMAL] {
        sb.add_client_address(a).unwrap();
    }
    let yaml = format!(
        "interfaces:\n  - name: {}\n    mode: native\nlimits:\n  default: {{pps: 500, burst_packets: 100}}\n",
        sb.server_if
    );
    let daemon = Daemon::start(&sb.server, &yaml, 1).unwrap();
    let dest = format!("{SERVER_V4}:{SERVER_PORT}");
    let (top, top_text, watch, offered) = std::thread::scope(|s| {
        let flood = s.spawn(|| send_udp(&sb.client, FLOODER, &dest, 3000 * 4, 3000, 64));
        let normal = s.spawn(|| send_udp(&sb.client, NORMAL, &dest, 100 * 4, 100, 64));
        // Both are sending (the senders start at once; top measures a second of it).
        std::thread::sleep(Duration::from_millis(700));
        let top: Value =
            serde_json::from_str(&daemon.dirs.cli_ok(&["top", "-n", "5", "--json"])).unwrap();
        let top_text = daemon.dirs.cli_ok(&["top", "-n", "5"]);
        let watch = daemon.dirs.cli_ok(&["stats", "--watch", "--count", "2"]);
        let flood = flood.join().unwrap().unwrap();
        normal.join().unwrap().unwrap();
        // The rate the flooder achieved, which a loaded host may hold under its 3000/s.
        let offered = flood.packets as f64 / flood.elapsed.as_secs_f64();
        (top, top_text, watch, offered)
    });
    let entries = top.as_array().unwrap();
    assert!(entries.len() >= 2, "{top}");
    assert_eq!(entries[0]["source"], FLOODER, "{top}");
    let pps = entries[0]["pps"].as_f64().unwrap();
    assert!(
        (0.5 * offered..1.5 * offered).contains(&pps),
        "the flooder's rate as top sees it, {pps}, against the {offered:.0}/s it sent"
    );
    let drops = entries[0]["drops_per_sec"].as_f64().unwrap();
    assert!(
        drops > 0.5 * (offered - 500.0),
        "drops {drops}/s of the {offered:.0}/s over a 500/s limit: {top}"
    );
    assert_eq!(entries[0]["rule"], "default");
    assert_eq!(entries[0]["interface"], "veth-server");
    let normal = entries
        .iter()
        .find(|e| e["source"] == NORMAL)
        .expect("the normal source is listed");
    assert_eq!(
        normal["drops"], 0,
        "a compliant source is never dropped: {top}"
    );
    assert!(
        top_text.lines().nth(1).unwrap().starts_with(FLOODER),
        "{top_text}"
    );
    assert_eq!(watch.matches("live view").count(), 2, "{watch}");
    assert!(
        watch.contains("rate_limited") && watch.contains("dropping"),
        "{watch}"
    );
    let (code, _, err) = daemon.dirs.cli(&["top", "-n", "0"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid count 0"), "{err}");
    daemon.stop().unwrap();
}
