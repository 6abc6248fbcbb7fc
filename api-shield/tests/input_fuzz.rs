//! Input fuzzing (proptest): the config parser, the feed parsers, the CLI's argument parser
//! and the admin API's request parser take arbitrary and mutated input without panicking,
//! and every rejection is a clear error. (That a rejected input changes nothing in a running
//! daemon is shown end to end in tests/tests/admin.rs and reload.rs.)

use api_shield::{
    api::parse_request,
    cli::Cli,
    config::{Config, FeedFormat},
    feeds::parse::parse,
};
use clap::Parser as _;
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../config/api-shield.example.yaml");

fn cases() -> u32 {
    if std::env::var_os("API_SHIELD_SOAK").is_some() {
        20_000
    } else {
        2_000
    }
}

/// The example config with one line changed: deleted, duplicated, cut, or a character in
/// it replaced, so most inputs get deep into the parser before failing.
fn mutated_example() -> impl Strategy<Value = String> {
    let lines = EXAMPLE.lines().count();
    (0..lines, 0..4u8, any::<usize>(), any::<char>()).prop_map(|(at, how, pos, c)| {
        let mut out: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
        let line = out[at].clone();
        match how {
            0 => {
                out.remove(at);
            }
            1 => out.insert(at, line),
            2 => out[at] = line.chars().take(pos % (line.len() + 1)).collect(),
            _ => {
                let mut chars: Vec<char> = line.chars().collect();
                if !chars.is_empty() {
                    let i = pos % chars.len();
                    chars[i] = c;
                }
                out[at] = chars.into_iter().collect();
            }
        }
        out.join("\n")
    })
}

fn config_yaml_fragments() -> impl Strategy<Value = String> {
    let key = prop::sample::select(vec![
        "interfaces",
        "limits",
        "default",
        "rules",
        "match",
        "protocol",
        "dst_ports",
        "key",
        "penalty",
        "dry_run",
        "pps",
        "burst_packets",
        "blocklist",
        "allowlist",
        "feeds",
        "name",
        "mode",
        "window",
        "tcp_flags",
        "capacity",
        "sources",
        "events",
        "metrics",
    ]);
    let value = prop::sample::select(vec![
        "tcp",
        "syn",
        "source/24",
        "source/99",
        "\"8000-8443\"",
        "-1",
        "0",
        "1e9",
        "[]",
        "{}",
        "~",
        "eth0",
        "\"2001:db8::/33\"",
        "10.0.0.0/8",
        "[443, \"1-2\"]",
        "yes",
        "1h",
        "1x",
        "99999999999999999999",
        "&a",
        "*a",
        "!!binary aGk=",
        "\"\\u0000\"",
    ]);
    prop::collection::vec((0..4usize, key, value), 0..12).prop_map(|items| {
        items
            .into_iter()
            .map(|(indent, k, v)| format!("{}{k}: {v}\n", "  ".repeat(indent)))
            .collect()
    })
}

fn check_config(text: &str) {
    match Config::parse(text) {
        Ok(_) => {}
        Err(e) => {
            assert!(
                !e.problems.is_empty(),
                "an error with no problem for {text:?}"
            );
            for p in &e.problems {
                assert!(p.contains("line "), "`{p}` names no line, for {text:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_config_parser_never_panics_and_locates_every_error(text in ".{0,400}") {
        check_config(&text);
    }

    #[test]
    fn mutated_example_configs_parse_or_fail_with_a_located_error(text in mutated_example()) {
        check_config(&text);
    }

    #[test]
    fn config_fragments_parse_or_fail_with_a_located_error(text in config_yaml_fragments()) {
        check_config(&format!("interfaces: [{{name: a}}]\n{text}"));
    }

    #[test]
    fn feed_parsers_take_any_bytes_and_account_for_every_line(
        body in prop::collection::vec(any::<u8>(), 0..600),
        format in prop::sample::select(vec![
            FeedFormat::Auto, FeedFormat::Plain, FeedFormat::SpamhausDrop,
            FeedFormat::SpamhausDropJson, FeedFormat::FireholNetset,
        ]),
    ) {
        let parsed = parse(&body, format);
        let lines = body.split(|b| *b == b'\n').count();
        prop_assert!(parsed.rejected <= lines);
        prop_assert!(parsed.entries.len() <= parsed.records);
        prop_assert!(parsed.examples.len() <= 5);
        for e in &parsed.examples {
            prop_assert!(e.starts_with("line "), "{}", e);
        }
    }

    #[test]
    fn feed_lines_that_look_like_prefixes_are_parsed_or_rejected(
        lines in prop::collection::vec("[0-9a-f:./ ;#-]{0,40}", 0..40),
    ) {
        let body = lines.join("\n");
        let parsed = parse(body.as_bytes(), FeedFormat::Plain);
        prop_assert!(parsed.entries.len() + parsed.rejected <= lines.len().max(1));
    }

    #[test]
    fn cli_arguments_never_panic(
        args in prop::collection::vec(prop::sample::select(vec![
            "block", "allow", "add", "del", "list", "--ttl", "5m", "0s", "5x", "--reason",
            "198.18.0.1", "2001:db8::/129", "--json", "stats", "--watch", "--count", "-1",
            "top", "-n", "feeds", "refresh", "reload", "status", "detach", "--pin-dir",
            "run", "--config", "check-config", "--socket", "", "\u{0}", "--", "-h",
        ]), 0..8),
    ) {
        let mut argv = vec!["api-shield"];
        argv.extend(args.iter().copied());
        if let Err(e) = Cli::try_parse_from(&argv) {
            prop_assert!(!e.to_string().trim().is_empty());
        }
    }

    #[test]
    fn admin_requests_never_panic_and_bad_ones_say_why(text in ".{0,200}") {
        if let Err(e) = parse_request(&text) {
            prop_assert!(e.starts_with("bad request: "), "{}", e);
        }
    }

    #[test]
    fn near_valid_admin_requests_are_parsed_or_refused(
        op in prop::sample::select(vec!["add", "del", "list", "stats", "status", "reload", "feeds", "feeds_refresh", "top", "nope", ""]),
        list in prop::sample::select(vec!["block", "allow", "grey", ""]),
        cidr in prop::sample::select(vec!["198.18.0.1", "10.0.0.0/8", "300.1.1.1", "", "::/0"]),
        extra in prop::sample::select(vec!["", ",\"ttl_secs\":-5", ",\"ttl_secs\":1e99", ",\"reason\":null", ",\"x\":1", ",\"n\":\"ten\""]),
    ) {
        let text = format!("{{\"op\":\"{op}\",\"list\":\"{list}\",\"cidr\":\"{cidr}\"{extra}}}");
        if let Err(e) = parse_request(&text) {
            prop_assert!(e.starts_with("bad request: "), "{}", e);
        }
    }
}

/// Records what this file fuzzes for `cargo xtask test`'s closing figures.
#[test]
fn report_the_input_fuzzing_figures() {
    use std::io::Write as _;
    let line = format!(
        "input fuzzing: 8 properties x {} cases (config: random, mutated example, fragments; feeds: random bytes, prefix-like lines; CLI arguments; admin requests: random, near-valid), no panic, every rejection explained",
        cases()
    );
    println!("reliability: {line}");
    if let Some(path) = std::env::var_os("API_SHIELD_FIGURES")
        && let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}
