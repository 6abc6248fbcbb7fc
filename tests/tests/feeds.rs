//! Reputation feeds end to end: a loopback HTTP server (inside the daemon's namespace) or a
//! file serves every format and every failure; traffic through the veth shows what is
//! enforced after each refresh.

use std::{net::IpAddr, sync::Arc};

use api_shield_tests::{
    daemon::{Daemon, DaemonDirs, tempdir::TempDir},
    http::{HttpServer, Reply},
    netns::{SERVER_V4, SERVER_V6, Sandbox},
    require_root,
    traffic::{Receiver, SERVER_PORT, send_udp},
};
use serde_json::Value;

/// Client addresses that feeds list.
const A: &str = "198.18.1.1";
const B: &str = "198.18.1.2";
const C: &str = "198.18.1.3";
const D: &str = "198.18.1.4";
const E6: &str = "2001:db8:ffff::e";

struct FeedSetup {
    daemon: Option<Daemon>,
    dirs: Arc<DaemonDirs>,
    http: HttpServer,
    files: TempDir,
    sb: Sandbox,
}

impl FeedSetup {
    fn new() -> FeedSetup {
        require_root();
        let sb = Sandbox::new("veth-server").expect("sandbox");
        for addr in [A, B, C, D, E6] {
            sb.add_client_address(addr).unwrap();
        }
        let http = HttpServer::start(&sb.server).unwrap();
        FeedSetup {
            daemon: None,
            dirs: DaemonDirs::new().unwrap(),
            http,
            files: TempDir::new().unwrap(),
            sb,
        }
    }

    /// Starts the daemon with these `feeds:` items (YAML list items) and other keys.
    fn start(&mut self, feeds: &str, extra: &str) {
        let yaml = format!(
            "interfaces:\n  - name: {}\n    mode: native\nlimits:\n  default: {{pps: 100000}}\nstats_interval: 1s\n{extra}feeds:\n{feeds}",
            self.sb.server_if
        );
        self.daemon = Some(
            Daemon::start_with(&self.sb.server, Some(&yaml), 1, self.dirs.clone()).expect("daemon"),
        );
    }

    fn feed_item(&self, name: &str, source: &str, extra: &str) -> String {
        format!("  - name: {name}\n    {source}\n    refresh: 1h\n{extra}")
    }

    fn url_item(&self, name: &str, path: &str, extra: &str) -> String {
        self.feed_item(name, &format!("url: {}", self.http.url(path)), extra)
    }

    /// `feeds refresh NAME`: (exit code, output or error).
    fn refresh(&self, name: &str) -> (i32, String) {
        let (code, out, err) = self.dirs.cli(&["feeds", "refresh", name]);
        (code, if code == 0 { out } else { err })
    }

    fn refresh_ok(&self, name: &str) -> String {
        let (code, text) = self.refresh(name);
        assert_eq!(code, 0, "feeds refresh {name}: {text}");
        text
    }

    fn status(&self, name: &str) -> Value {
        let all: Value = serde_json::from_str(&self.dirs.cli_ok(&["feeds", "--json"])).unwrap();
        all.as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .cloned()
            .expect("feed listed")
    }

    /// Whether `source`'s datagrams reach the server (5 sent; all or nothing expected).
    fn passes(&self, source: &str) -> bool {
        let rx = Receiver::start(&self.sb.server, &format!("[::]:{SERVER_PORT}")).unwrap();
        let dest = if source.contains(':') {
            format!("[{SERVER_V6}]:{SERVER_PORT}")
        } else {
            format!("{SERVER_V4}:{SERVER_PORT}")
        };
        send_udp(&self.sb.client, source, &dest, 5, 1000, 16).unwrap();
        let got = rx
            .finish()
            .get(&source.parse::<IpAddr>().unwrap())
            .copied()
            .unwrap_or(0);
        assert!(got == 0 || got == 5, "{source}: {got} of 5 arrived");
        got == 5
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }
}

#[test]
fn every_format_is_parsed_and_enforced() {
    let mut s = FeedSetup::new();
    s.http.body(
        "/plain.txt",
        &format!("# plain\n{A}\n\n10.0.0.1/8\r\n"),
        None,
    );
    s.http.body(
        "/drop.txt",
        &format!("; Spamhaus DROP List\n{B}/32 ; SBL1\n192.0.2.0/24 ; SBL2\n"),
        None,
    );
    s.http.body(
        "/drop.json",
        &format!("{{\"cidr\":\"{C}/32\",\"sblid\":\"SBL3\",\"rir\":\"arin\"}}\n{{\"cidr\":\"{E6}/128\",\"sblid\":\"SBL4\",\"rir\":\"ripencc\"}}\n{{\"type\":\"metadata\",\"timestamp\":1,\"size\":2,\"records\":2,\"copyright\":\"x\"}}\n"),
        None,
    );
    s.http.body(
        "/level1.netset",
        &format!("#\n# firehol_level1\n#\n{D}\n0.0.0.0/8\n"),
        None,
    );
    let feeds = [
        s.url_item("plain", "/plain.txt", "    format: plain\n"),
        s.url_item("sh-drop", "/drop.txt", "    format: spamhaus-drop\n"),
        s.url_item("sh-json", "/drop.json", "    format: spamhaus-drop-json\n"),
        s.url_item("firehol", "/level1.netset", "    format: auto\n"),
    ]
    .concat();
    s.start(&feeds, "");
    for name in ["plain", "sh-drop", "sh-json", "firehol"] {
        s.refresh_ok(name);
    }
    for blocked in [A, B, C, D, E6] {
        assert!(!s.passes(blocked), "{blocked} should be blocked by a feed");
    }
    assert_eq!(s.status("plain")["entries"], 2);
    assert_eq!(
        s.status("plain")["host_bits_cleared"],
        1,
        "10.0.0.1/8 normalised"
    );
    assert_eq!(s.status("sh-json")["entries"], 2);
    let listed = s.dirs.cli_ok(&["block", "list"]);
    assert!(
        listed.contains("feed:sh-drop") && listed.contains("192.0.2.0/24"),
        "{listed}"
    );
    let table = s.dirs.cli_ok(&["feeds"]);
    assert!(
        table.contains("plain") && table.contains("firehol") && table.contains("LAST SUCCESS"),
        "{table}"
    );
}

#[test]
fn a_changed_feed_is_applied_as_a_diff_and_conditional_requests_are_used() {
    let mut s = FeedSetup::new();
    s.http.body("/f", &format!("{A}\n{B}\n"), Some("\"v1\""));
    let item = s.url_item("f", "/f", "");
    s.start(&item, "");
    s.refresh_ok("f");
    assert!(!s.passes(A) && !s.passes(B) && s.passes(C));
    s.http.body("/f", &format!("{B}\n{C}\n"), Some("\"v2\""));
    let out = s.refresh_ok("f");
    assert!(out.contains("+1 -1"), "{out}");
    assert!(s.passes(A), "dropped from the feed: no longer blocked");
    assert!(!s.passes(B) && !s.passes(C));
    // Unchanged: the server answers 304 to our If-None-Match and nothing changes.
    let out = s.refresh_ok("f");
    assert!(out.contains("not modified"), "{out}");
    let requests = s.http.seen("/f");
    assert_eq!(
        requests
            .last()
            .unwrap()
            .headers
            .get("if-none-match")
            .map(String::as_str),
        Some("\"v2\"")
    );
    assert!(!s.passes(B) && !s.passes(C));
    assert_eq!(s.status("f")["entries"], 2);
}

#[test]
fn failed_fetches_keep_the_last_good_version() {
    let mut s = FeedSetup::new();
    s.http.body("/f", &format!("{A}\n{B}\n"), None);
    let item = s.url_item(
        "f",
        "/f",
        "    timeout: 2s\n    max_bytes: 2048\n    min_entries: 2\n",
    );
    s.start(&item, "");
    s.refresh_ok("f");
    let good = || (!s.passes(A), !s.passes(B), s.passes(C));
    assert_eq!(good(), (true, true, true));
    let failures: Vec<(&str, Reply, &str)> = vec![
        ("HTTP 500", Reply::Status(500), "HTTP 500"),
        ("a stalled server", Reply::Stall, "timed out"),
        (
            "a truncated body",
            Reply::Truncated {
                body: format!("{C}\n").into_bytes(),
                declared: 1000,
            },
            "download failed",
        ),
        (
            "a body over the size cap",
            Reply::Body {
                body: format!("{C}\n").repeat(1000).into_bytes(),
                etag: None,
            },
            "max_bytes",
        ),
        (
            "fewer than min_entries",
            Reply::Body {
                body: format!("{C}\n").into_bytes(),
                etag: None,
            },
            "fewer than min_entries",
        ),
        (
            "garbage only",
            Reply::Body {
                body: b"<html>maintenance</html>\n".to_vec(),
                etag: None,
            },
            "fewer than min_entries",
        ),
    ];
    for (i, (what, reply, expected)) in failures.into_iter().enumerate() {
        s.http.set("/f", reply);
        let (code, err) = s.refresh("f");
        assert_eq!(code, 1, "{what}: the refresh fails");
        assert!(
            err.contains(expected) && err.contains("last good version (2 entries) stays"),
            "{what}: {err}"
        );
        assert_eq!(
            good(),
            (true, true, true),
            "{what}: the last good version is still enforced, nothing else"
        );
        let st = s.status("f");
        assert_eq!(st["entries"], 2, "{what}");
        assert_eq!(st["fetch_failures"], i as u64 + 1, "{what}");
        assert!(
            st["last_error"].as_str().unwrap().contains(expected),
            "{what}: {st}"
        );
    }
    // The source recovers.
    s.http.body("/f", &format!("{C}\n{D}\n"), None);
    s.refresh_ok("f");
    assert!(s.passes(A) && !s.passes(C) && !s.passes(D));
    assert!(s.status("f")["last_error"].is_null());
}

#[test]
fn garbage_lines_are_counted_and_the_rest_applies() {
    let mut s = FeedSetup::new();
    s.http.body(
        "/f",
        &format!("{A}\nnot an address\n{B} trailing words\n300.1.2.3\n{C}/24x\n{D}\n"),
        None,
    );
    let item = s.url_item("f", "/f", "");
    s.start(&item, "");
    s.refresh_ok("f");
    assert!(!s.passes(A) && !s.passes(D));
    assert!(
        s.passes(B) && s.passes(C),
        "lines that are not one prefix are not guessed at"
    );
    let st = s.status("f");
    assert_eq!(st["rejected_lines"], 4);
    assert_eq!(st["rejected_examples"][0], "line 2: not an address");
    assert!(
        s.dirs
            .cli_ok(&["feeds"])
            .contains("rejected line 2: not an address")
    );
}

#[test]
fn a_file_feed_follows_its_file() {
    let mut s = FeedSetup::new();
    let path = s.files.path().join("blocked.txt");
    std::fs::write(&path, format!("{A}\n")).unwrap();
    let item = s.feed_item("local", &format!("path: {}", path.display()), "");
    s.start(&item, "");
    s.refresh_ok("local");
    assert!(!s.passes(A) && s.passes(B));
    std::fs::write(&path, format!("{B}\n")).unwrap();
    s.refresh_ok("local");
    assert!(s.passes(A) && !s.passes(B));
    std::fs::remove_file(&path).unwrap();
    let (code, err) = s.refresh("local");
    assert_eq!(code, 1);
    assert!(err.contains("cannot read"), "{err}");
    assert!(!s.passes(B), "the last good version stays");
}

#[test]
fn overlapping_feeds_allowlist_and_cli_keep_a_prefix_until_its_last_origin_lets_go() {
    let mut s = FeedSetup::new();
    s.http.body("/one", &format!("{A}\n{B}\n"), None);
    s.http.body("/two", &format!("{B}\n{C}\n"), None);
    let items = [s.url_item("one", "/one", ""), s.url_item("two", "/two", "")].concat();
    s.start(&items, &format!("allowlist: [{C}/32]\n"));
    s.refresh_ok("one");
    s.refresh_ok("two");
    assert!(!s.passes(A) && !s.passes(B));
    assert!(
        s.passes(C),
        "an allowlisted prefix is never blocked by a feed"
    );
    assert_eq!(s.status("two")["allowlisted"], 1);
    let listed = s.dirs.cli_ok(&["block", "list"]);
    let line_b = listed
        .lines()
        .find(|l| l.starts_with(&format!("{B}/32")))
        .unwrap();
    assert!(line_b.contains("feed:one,feed:two"), "{listed}");
    s.dirs.cli_ok(&["block", "add", A, "--reason", "manual"]);
    // Feed one drops A and B: A stays for the CLI, B for feed two.
    s.http.body("/one", &format!("{D}\n"), None);
    s.refresh_ok("one");
    assert!(!s.passes(A) && !s.passes(B) && !s.passes(D));
    let (code, _, err) = s.dirs.cli(&["block", "del", B]);
    assert_eq!(code, 1, "the CLI cannot remove a feed's entry");
    assert!(err.contains("feed:two"), "{err}");
    let out = s.dirs.cli_ok(&["block", "del", A]);
    assert!(out.contains("removed"), "{out}");
    assert!(s.passes(A), "its last origin let go");
    s.http.body("/two", &format!("{C}\n"), None);
    s.refresh_ok("two");
    assert!(s.passes(B));
}

#[test]
fn the_last_good_version_is_applied_at_start_when_the_source_is_unreachable() {
    let mut s = FeedSetup::new();
    s.http.body("/f", &format!("{A}\n{E6}\n"), None);
    let item = s.url_item("f", "/f", "    timeout: 2s\n");
    s.start(&item, "");
    s.refresh_ok("f");
    s.daemon.take().unwrap().stop().unwrap();
    // A new start with no pins at all and the source down: only the state directory.
    s.dirs.cli_ok(&[
        "detach",
        "--pin-dir",
        &s.dirs.pin_dir().display().to_string(),
    ]);
    assert!(s.passes(A));
    s.http.set("/f", Reply::Status(503));
    s.start(&item, "");
    assert!(
        s.log()
            .contains("feed f: 2 entries from its last good version"),
        "{}",
        s.log()
    );
    assert!(
        !s.passes(A) && !s.passes(E6),
        "enforced from the first packet"
    );
    let (code, _) = s.refresh("f");
    assert_eq!(code, 1);
    assert!(!s.passes(A));
    let saved = s.dirs.state_dir().join("feeds/f.list");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(saved).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn a_full_map_refuses_entries_counts_them_and_retries() {
    let mut s = FeedSetup::new();
    // Room for 6 prefixes per family (blocklist + allowlist capacity).
    let ten: String = (1..=10).map(|i| format!("198.18.2.{i}\n")).collect();
    s.http.body("/f", &format!("{A}\n{ten}"), None);
    let item = s.url_item("f", "/f", "");
    s.start(&item, "capacity:\n  blocklist: 5\n  allowlist: 1\n");
    s.refresh_ok("f");
    let st = s.status("f");
    assert_eq!(st["entries"], 11);
    assert_eq!(st["refused_map_full"], 5, "11 entries, room for 6: {st}");
    assert!(
        s.log()
            .contains("list entries refused: the list maps are full"),
        "{}",
        s.log()
    );
    let status: Value = serde_json::from_str(&s.dirs.cli_ok(&["status", "--json"])).unwrap();
    let v4 = status["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "LIST_V4")
        .unwrap()
        .clone();
    assert_eq!(
        (v4["entries"].as_u64(), v4["capacity"].as_u64()),
        (Some(6), Some(6))
    );
    // Room appears: the refused entries go in.
    s.http.body("/f", &format!("{A}\n198.18.2.1\n"), None);
    s.refresh_ok("f");
    assert_eq!(s.status("f")["refused_map_full"], 0);
    assert!(!s.passes(A));
}
