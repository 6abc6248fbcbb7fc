//! Input fuzzing (proptest), two-sided: inputs built valid from the documented grammar must
//! parse, to what they say; the same inputs with one value made invalid must be refused,
//! the message naming the key (config), the argument (CLI) or the field (admin API); feed
//! lines of known kinds are each accounted for. Arbitrary and mutated input must never
//! panic and every rejection is explained. (That a rejected input changes nothing in a
//! running daemon is shown end to end in tests/tests/admin.rs and reload.rs.)

use std::{collections::HashSet, time::Duration};

use api_shield::{
    api::{Request, parse_request},
    cli::{AddArgs, Cli, Command, FeedsAction, ListCommand, argument_error},
    config::{AttachMode, Config, FeedFormat, Protocol},
    explain::ProbeProtocol,
    feeds::parse::{MAX_EXAMPLES, parse},
    lists::ListKind,
};
use clap::Parser as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use proptest::prelude::*;

const EXAMPLE: &str = include_str!("../../config/api-shield.example.yaml");

fn cases() -> u32 {
    if std::env::var_os("API_SHIELD_SOAK").is_some() {
        20_000
    } else {
        2_000
    }
}

// ---------------------------------------------------------------- config

/// A rule as the example config documents its keys.
#[derive(Debug, Clone)]
struct RuleSpec {
    name: String,
    protocol: Option<(&'static str, Protocol)>,
    ports: Vec<(u16, u16)>,
    syn: bool,
    pps: u64,
    burst: Option<u64>,
    bps: u64,
    burst_bytes: Option<u64>,
    /// `source/N/M`.
    key: (u8, u8),
}

/// A config as data, written to YAML by [`ConfigSpec::yaml`].
#[derive(Debug, Clone)]
struct ConfigSpec {
    interfaces: Vec<(String, &'static str)>,
    default_pps: Option<u64>,
    default_burst: Option<u64>,
    rules: Vec<RuleSpec>,
    allow: Vec<IpNet>,
    block: Vec<IpNet>,
    dry_run: bool,
}

fn net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0..=32u8)
            .prop_map(|(a, l)| IpNet::V4(Ipv4Net::new(a.into(), l).unwrap().trunc())),
        (any::<u128>(), 0..=128u8)
            .prop_map(|(a, l)| IpNet::V6(Ipv6Net::new(a.into(), l).unwrap().trunc())),
    ]
}

fn rule_spec() -> impl Strategy<Value = RuleSpec> {
    let protocol = prop::sample::select(vec![
        None,
        Some(("tcp", Protocol::Tcp)),
        Some(("udp", Protocol::Udp)),
        Some(("icmp", Protocol::Icmp)),
        Some(("icmpv6", Protocol::Icmpv6)),
        Some(("47", Protocol::Number(47))),
    ]);
    let ports = prop::collection::vec((any::<u16>(), 0..100u16), 0..4).prop_map(|v| {
        v.into_iter()
            .map(|(a, span)| (a, a.saturating_add(span)))
            .collect::<Vec<_>>()
    });
    (
        protocol,
        ports,
        any::<bool>(),
        0..=1_000_000u64,
        prop::option::of(1..=1_000_000_000u64),
        prop::sample::select(vec![0, 64, 1_000_000, 1_000_000_000_000]),
        prop::option::of(1522..=1_000_000_000_000u64),
        (0..=32u8, 0..=128u8),
    )
        .prop_map(
            |(protocol, ports, syn, pps, burst, bps, burst_bytes, key)| {
                // Ports need TCP or UDP (or no protocol); a SYN match needs TCP.
                let tcp_or_udp =
                    matches!(protocol, None | Some((_, Protocol::Tcp | Protocol::Udp)));
                RuleSpec {
                    name: String::new(),
                    syn: syn && matches!(protocol, Some((_, Protocol::Tcp))),
                    ports: if tcp_or_udp { ports } else { Vec::new() },
                    protocol,
                    pps,
                    burst: burst.filter(|_| pps > 0),
                    bps,
                    burst_bytes: burst_bytes.filter(|_| bps > 0),
                    key,
                }
            },
        )
}

fn config_spec() -> impl Strategy<Value = ConfigSpec> {
    let modes = prop::sample::select(vec!["auto", "native", "generic", "tc"]);
    (
        prop::collection::btree_set("[a-z][a-z0-9]{0,14}", 1..4),
        prop::collection::vec(modes, 3),
        prop::option::of(0..=1_000_000_000u64),
        prop::option::of(1..=1_000_000_000u64),
        prop::collection::vec(rule_spec(), 0..8),
        prop::collection::vec(net(), 0..6),
        prop::collection::vec(net(), 0..6),
        any::<bool>(),
    )
        .prop_map(
            |(names, modes, default_pps, default_burst, mut rules, allow, block, dry_run)| {
                for (i, r) in rules.iter_mut().enumerate() {
                    r.name = format!("rule-{i}");
                }
                ConfigSpec {
                    interfaces: names.into_iter().zip(modes).collect(),
                    // A burst beside a rate of 0 is no limit and takes no burst.
                    default_burst: default_burst.filter(|_| default_pps != Some(0)),
                    default_pps,
                    rules,
                    allow,
                    block,
                    dry_run,
                }
            },
        )
}

/// One value made invalid: the key it sits at, as the error must name it, and the value.
#[derive(Debug, Clone)]
struct Invalid {
    key: String,
    value: &'static str,
}

impl ConfigSpec {
    /// The YAML, every key the spec sets written out; `invalid` replaces one value (or
    /// adds an unknown key).
    fn yaml(&self, invalid: Option<&Invalid>) -> String {
        let bad = |key: &str, good: String| match invalid {
            Some(i) if i.key == key => i.value.to_owned(),
            _ => good,
        };
        let mut y = String::from("interfaces:\n");
        for (i, (name, mode)) in self.interfaces.iter().enumerate() {
            y += &format!(
                "  - name: {name}\n    mode: {}\n",
                bad(&format!("interfaces[{i}].mode"), mode.to_string())
            );
        }
        y += "limits:\n  default:\n";
        if let Some(pps) = self.default_pps {
            y += &format!("    pps: {}\n", bad("limits.default.pps", pps.to_string()));
        }
        if let Some(b) = self.default_burst {
            y += &format!(
                "    burst_packets: {}\n",
                bad("limits.default.burst_packets", b.to_string())
            );
        }
        y += "  rules:\n";
        for (i, r) in self.rules.iter().enumerate() {
            let at = |k: &str| format!("limits.rules[{i}].{k}");
            y += &format!("    - name: {}\n      match:\n", r.name);
            if let Some((p, _)) = r.protocol {
                y += &format!(
                    "        protocol: {}\n",
                    bad(&at("match.protocol"), p.to_owned())
                );
            }
            if !r.ports.is_empty() {
                let ports: Vec<String> = r
                    .ports
                    .iter()
                    .enumerate()
                    .map(|(j, &(a, b))| {
                        let good = if a == b {
                            a.to_string()
                        } else {
                            format!("\"{a}-{b}\"")
                        };
                        bad(&at(&format!("match.dst_ports[{j}]")), good)
                    })
                    .collect();
                y += &format!("        dst_ports: [{}]\n", ports.join(", "));
            }
            if r.syn {
                y += "        tcp_flags: syn\n";
            }
            y += &format!("      pps: {}\n", bad(&at("pps"), r.pps.to_string()));
            if let Some(b) = r.burst {
                y += &format!(
                    "      burst_packets: {}\n",
                    bad(&at("burst_packets"), b.to_string())
                );
            }
            if r.bps > 0 {
                y += &format!("      bps: {}\n", r.bps);
            }
            if let Some(b) = r.burst_bytes {
                y += &format!(
                    "      burst_bytes: {}\n",
                    bad(&at("burst_bytes"), b.to_string())
                );
            }
            y += &format!(
                "      key: {}\n",
                bad(&at("key"), format!("source/{}/{}", r.key.0, r.key.1))
            );
        }
        for (list, nets) in [("allowlist", &self.allow), ("blocklist", &self.block)] {
            y += &format!("{list}:\n");
            for (i, n) in nets.iter().enumerate() {
                y += &format!("  - {}\n", bad(&format!("{list}[{i}]"), format!("\"{n}\"")));
            }
            if nets.is_empty() {
                y.truncate(y.len() - 1);
                y += " []\n";
            }
        }
        y += &format!("dry_run: {}\n", self.dry_run);
        if let Some(i) = invalid
            && i.key == "bogus"
        {
            y += "bogus: 1\n";
        }
        y
    }

    /// Keys of this spec that can be made invalid, each with values the config's
    /// documentation rules out.
    fn invalid_choices(&self) -> Vec<(String, Vec<&'static str>)> {
        let mut out: Vec<(String, Vec<&'static str>)> = vec![
            ("bogus".into(), vec!["1"]),
            ("interfaces[0].mode".into(), vec!["turbo", "XDP", "1"]),
        ];
        if self.default_pps.is_some() {
            out.push((
                "limits.default.pps".into(),
                vec!["-1", "1000000001", "ten", "[]"],
            ));
        }
        if self.default_burst.is_some() {
            out.push((
                "limits.default.burst_packets".into(),
                vec!["0", "-3", "1000000001"],
            ));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let at = |k: &str| format!("limits.rules[{i}].{k}");
            out.push((at("pps"), vec!["-1", "1000000001", "1e3x"]));
            out.push((
                at("key"),
                vec!["source/129", "source/33/64", "src", "source/-1"],
            ));
            if r.protocol.is_some() {
                out.push((at("match.protocol"), vec!["sctpx", "256", "-1"]));
            }
            if !r.ports.is_empty() {
                out.push((
                    at("match.dst_ports[0]"),
                    vec!["\"9-1\"", "70000", "\"a\"", "-1"],
                ));
            }
            if r.burst.is_some() {
                out.push((at("burst_packets"), vec!["0", "1000000001"]));
            }
            if r.burst_bytes.is_some() {
                out.push((at("burst_bytes"), vec!["100", "1000000000001"]));
            }
        }
        for (list, nets) in [("allowlist", &self.allow), ("blocklist", &self.block)] {
            if !nets.is_empty() {
                out.push((
                    format!("{list}[0]"),
                    vec![
                        "\"300.1.1.1/8\"",
                        "\"10.0.0.0/33\"",
                        "\"2001:db8::/129\"",
                        "\"1.2.3\"",
                    ],
                ));
            }
        }
        out
    }
}

/// A valid spec and one of its values made invalid.
fn spec_with_one_invalid() -> impl Strategy<Value = (ConfigSpec, Invalid)> {
    config_spec().prop_flat_map(|spec| {
        let choices = spec.invalid_choices();
        (Just(spec), prop::sample::select(choices)).prop_flat_map(|(spec, (key, values))| {
            prop::sample::select(values).prop_map(move |value| {
                (
                    spec.clone(),
                    Invalid {
                        key: key.clone(),
                        value,
                    },
                )
            })
        })
    })
}

fn check_config(text: &str) {
    if let Err(e) = Config::parse(text) {
        assert!(
            !e.problems.is_empty(),
            "an error with no problem for {text:?}"
        );
        for p in &e.problems {
            assert!(p.contains("line "), "`{p}` names no line, for {text:?}");
        }
    }
}

/// The example config with one line changed: deleted, duplicated, cut, or a character in
/// it replaced, so most inputs get deep into the parser before failing. Returns the text
/// and whether the change left the meaning alone (a comment or blank line deleted or
/// duplicated).
fn mutated_example() -> impl Strategy<Value = (String, bool)> {
    let lines = EXAMPLE.lines().count();
    (0..lines, 0..4u8, any::<usize>(), any::<char>()).prop_map(|(at, how, pos, c)| {
        let mut out: Vec<String> = EXAMPLE.lines().map(str::to_owned).collect();
        let line = out[at].clone();
        let comment = line.trim().is_empty() || line.trim_start().starts_with('#');
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
        (out.join("\n"), comment && how < 2)
    })
}

#[test]
fn the_example_config_parses() {
    Config::parse(EXAMPLE).expect("the example config is valid");
}

// ---------------------------------------------------------------- feeds

/// A feed line of a known kind.
#[derive(Debug, Clone)]
enum FeedLine {
    /// A prefix, written with host bits set or not, with or without a trailing comment.
    Entry {
        text: String,
        net: IpNet,
        host_bits: bool,
    },
    Comment(String),
    Blank(String),
    /// A line the documented grammar rules out.
    Bad(String),
}

fn feed_line() -> impl Strategy<Value = FeedLine> {
    let entry = (net(), any::<u128>(), 0..4u8).prop_map(|(net, host, trailer)| {
        // Host bits inside the prefix's host part (none for a full-length prefix).
        let written = match net {
            IpNet::V4(n) => {
                let mask = u32::MAX.checked_shr(u32::from(n.prefix_len())).unwrap_or(0);
                let a = u32::from(n.network()) | (host as u32 & mask);
                IpNet::V4(Ipv4Net::new(a.into(), n.prefix_len()).unwrap())
            }
            IpNet::V6(n) => {
                let mask = u128::MAX
                    .checked_shr(u32::from(n.prefix_len()))
                    .unwrap_or(0);
                let a = u128::from(n.network()) | (host & mask);
                IpNet::V6(Ipv6Net::new(a.into(), n.prefix_len()).unwrap())
            }
        };
        let bare_host = net.prefix_len() == net.max_prefix_len() && host % 2 == 0;
        let mut text = if bare_host {
            written.addr().to_string()
        } else {
            written.to_string()
        };
        text += match trailer {
            0 => "",
            1 => " ; SBL123",
            2 => "  # note",
            _ => "\r",
        };
        FeedLine::Entry {
            text,
            net,
            host_bits: written != net,
        }
    });
    prop_oneof![
        6 => entry,
        1 => prop::sample::select(vec!["# header", "; Spamhaus", "#", "   # indented"])
            .prop_map(|s| FeedLine::Comment(s.to_owned())),
        1 => prop::sample::select(vec!["", "   ", "\t", "\r"])
            .prop_map(|s| FeedLine::Blank(s.to_owned())),
        2 => prop::sample::select(vec![
            "300.1.2.3", "10.0.0.0/33", "2001:db8::/129", "hello", "1.2.3.4 5.6.7.8",
            "1.2.3.0/24/8", "1.2.3", "::g", "10.0.0.0/-1", "192.0.2.0 /24",
        ])
        .prop_map(|s| FeedLine::Bad(s.to_owned())),
    ]
}

// ---------------------------------------------------------------- CLI

/// An argument vector built valid, and the command it must parse to (as a predicate).
#[derive(Debug, Clone)]
enum CliCase {
    Add {
        list: ListKind,
        cidr: String,
        ttl: Option<(String, Duration)>,
        reason: Option<String>,
    },
    Del {
        list: ListKind,
        cidr: String,
    },
    List {
        list: ListKind,
        json: bool,
    },
    Stats {
        json: bool,
        watch: Option<Option<u64>>,
    },
    Top {
        n: Option<usize>,
        json: bool,
    },
    Status {
        json: bool,
    },
    Refresh(Option<String>),
    Reload,
}

/// How the CLI and the admin API spell a list.
fn list_word(list: &ListKind) -> &'static str {
    match list {
        ListKind::Block => "block",
        ListKind::Allow => "allow",
    }
}

fn list_kind() -> impl Strategy<Value = ListKind> {
    prop::sample::select(vec![ListKind::Block, ListKind::Allow])
}

fn cli_case() -> impl Strategy<Value = CliCase> {
    let ttl = prop::sample::select(vec![
        ("1s", 1),
        ("90s", 90),
        ("10m", 600),
        ("2h", 7200),
        ("7d", 604_800),
        ("1h 30m", 5400),
    ])
    .prop_map(|(t, s)| (t.to_owned(), Duration::from_secs(s)));
    prop_oneof![
        (
            list_kind(),
            net(),
            prop::option::of(ttl),
            prop::option::of("[a-z ]{1,20}")
        )
            .prop_map(|(list, net, ttl, reason)| CliCase::Add {
                list,
                cidr: net.to_string(),
                ttl,
                reason
            }),
        (list_kind(), net()).prop_map(|(list, net)| CliCase::Del {
            list,
            cidr: net.to_string()
        }),
        (list_kind(), any::<bool>()).prop_map(|(list, json)| CliCase::List { list, json }),
        prop_oneof![
            any::<bool>().prop_map(|json| CliCase::Stats { json, watch: None }),
            prop::option::of(1..1000u64).prop_map(|c| CliCase::Stats {
                json: false,
                watch: Some(c)
            }),
        ],
        (prop::option::of(0..10_000usize), any::<bool>())
            .prop_map(|(n, json)| CliCase::Top { n, json }),
        any::<bool>().prop_map(|json| CliCase::Status { json }),
        prop::option::of("[a-z][a-z0-9-]{0,10}").prop_map(CliCase::Refresh),
        Just(CliCase::Reload),
    ]
}

impl CliCase {
    fn argv(&self) -> Vec<String> {
        let mut a: Vec<String> = vec!["api-shield".into()];
        let mut push = |words: &[&str]| a.extend(words.iter().map(|w| w.to_string()));
        match self {
            CliCase::Add {
                list,
                cidr,
                ttl,
                reason,
            } => {
                push(&[list_word(list), "add", cidr]);
                if let Some((t, _)) = ttl {
                    push(&["--ttl", t]);
                }
                if let Some(r) = reason {
                    push(&["--reason", r]);
                }
            }
            CliCase::Del { list, cidr } => push(&[list_word(list), "del", cidr]),
            CliCase::List { list, json } => {
                push(&[list_word(list), "list"]);
                if *json {
                    push(&["--json"]);
                }
            }
            CliCase::Stats { json, watch } => {
                push(&["stats"]);
                if *json {
                    push(&["--json"]);
                }
                if let Some(count) = watch {
                    push(&["--watch"]);
                    if let Some(c) = count {
                        push(&["--count", &c.to_string()]);
                    }
                }
            }
            CliCase::Top { n, json } => {
                push(&["top"]);
                if let Some(n) = n {
                    push(&["-n", &n.to_string()]);
                }
                if *json {
                    push(&["--json"]);
                }
            }
            CliCase::Status { json } => {
                push(&["status"]);
                if *json {
                    push(&["--json"]);
                }
            }
            CliCase::Refresh(name) => {
                push(&["feeds", "refresh"]);
                if let Some(n) = name {
                    push(&[n]);
                }
            }
            CliCase::Reload => push(&["reload"]),
        }
        a
    }

    /// Whether `command` is what this case says (clap's documented defaults: `-n` 20).
    fn parsed_as(&self, command: &Command) -> bool {
        fn list_of(c: &Command) -> Option<(ListKind, &ListCommand)> {
            match c {
                Command::Block(l) => Some((ListKind::Block, l)),
                Command::Allow(l) => Some((ListKind::Allow, l)),
                _ => None,
            }
        }
        match (self, command) {
            (
                CliCase::Add {
                    list,
                    cidr,
                    ttl,
                    reason,
                },
                c,
            ) => {
                matches!(list_of(c), Some((l, ListCommand::Add(AddArgs { cidr: c2, ttl: t2, reason: r2 })))
                if l == *list && c2 == cidr && *t2 == ttl.as_ref().map(|t| t.1) && r2 == reason)
            }
            (CliCase::Del { list, cidr }, c) => {
                matches!(list_of(c), Some((l, ListCommand::Del { cidr: c2 })) if l == *list && c2 == cidr)
            }
            (CliCase::List { list, json }, c) => {
                matches!(list_of(c), Some((l, ListCommand::List { json: j })) if l == *list && j == json)
            }
            (
                CliCase::Stats { json, watch },
                Command::Stats {
                    json: j,
                    watch: w,
                    count,
                },
            ) => j == json && *w == watch.is_some() && *count == watch.flatten(),
            (CliCase::Top { n, json }, Command::Top { n: n2, json: j }) => {
                *n2 == n.unwrap_or(20) && j == json
            }
            (CliCase::Status { json }, Command::Status { json: j }) => j == json,
            (
                CliCase::Refresh(name),
                Command::Feeds {
                    action: Some(FeedsAction::Refresh { name: n2 }),
                    ..
                },
            ) => n2 == name,
            (CliCase::Reload, Command::Reload) => true,
            _ => false,
        }
    }
}

/// Argument vectors the CLI's documentation rules out, each with what the error must name.
const BAD_ARGV: &[(&[&str], &str)] = &[
    (&["block", "add", "192.0.2.1", "--ttl", "5x"], "--ttl"),
    (&["block", "add", "192.0.2.1", "--ttl", "0s"], "--ttl"),
    (&["allow", "add", "192.0.2.1", "--ttl"], "--ttl"),
    (&["block", "add"], "<CIDR>"),
    (&["allow", "del"], "<CIDR>"),
    (&["blok", "add", "192.0.2.1"], "blok"),
    (&["block", "purge"], "purge"),
    (&["top", "-n", "x"], "-n"),
    (&["top", "-n", "-1"], "-1"),
    (&["stats", "--count", "3"], "--watch"),
    (&["stats", "--json", "--watch"], "--watch"),
    (&["stats", "--watch", "--count", "many"], "--count"),
    (&["reload", "now"], "now"),
    (&["feeds", "refresh", "a", "b"], "'b'"),
    (&["status", "--verbose"], "--verbose"),
    (&["explain"], "<ADDRESS>"),
    (&["trace"], "<TARGET>"),
    (&["trace", "192.0.2.0/24", "--for", "2h"], "--for"),
    (&["trace", "192.0.2.0/24", "--max", "0"], "--max"),
    (&["explain", "192.0.2.1", "--proto", "sctp"], "sctp"),
    (&["explain", "192.0.2.1", "--port", "65536"], "65536"),
    (&["explain", "192.0.2.1", "--syn", "yes"], "yes"),
];

// ---------------------------------------------------------------- admin API

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        (
            list_kind(),
            net(),
            prop::option::of(1..1_000_000u64),
            prop::option::of("[a-z ]{0,20}")
        )
            .prop_map(|(list, net, ttl_secs, reason)| Request::Add {
                list,
                cidr: net.to_string(),
                ttl_secs,
                reason
            }),
        (list_kind(), net()).prop_map(|(list, net)| Request::Del {
            list,
            cidr: net.to_string()
        }),
        list_kind().prop_map(|list| Request::List { list }),
        Just(Request::Stats {}),
        Just(Request::Status {}),
        Just(Request::Reload {}),
        Just(Request::Feeds {}),
        (0..100_000usize).prop_map(|n| Request::Top { n }),
        prop::option::of("[a-z][a-z0-9-]{0,10}").prop_map(|name| Request::FeedsRefresh { name }),
        (
            net(),
            prop::sample::select(vec![
                ProbeProtocol::Tcp,
                ProbeProtocol::Udp,
                ProbeProtocol::Icmp
            ]),
            prop::option::of(any::<u16>()),
            any::<bool>()
        )
            .prop_map(|(net, protocol, port, syn)| Request::Explain {
                address: net.addr().to_string(),
                protocol,
                port,
                syn
            }),
        (net(), 1..3600u64, 1..100_000u64).prop_map(|(net, secs, max)| Request::Trace {
            cidr: net.to_string(),
            secs,
            max
        }),
    ]
}

/// A request as a client writes it, by hand (not with the daemon's serializer).
fn request_json(r: &Request) -> serde_json::Value {
    use serde_json::json;
    let list = list_word;
    match r {
        Request::Add {
            list: l,
            cidr,
            ttl_secs,
            reason,
        } => {
            let mut v = json!({"op": "add", "list": list(l), "cidr": cidr});
            if let Some(t) = ttl_secs {
                v["ttl_secs"] = json!(t);
            }
            if let Some(reason) = reason {
                v["reason"] = json!(reason);
            }
            v
        }
        Request::Del { list: l, cidr } => json!({"op": "del", "list": list(l), "cidr": cidr}),
        Request::List { list: l } => json!({"op": "list", "list": list(l)}),
        Request::Stats {} => json!({"op": "stats"}),
        Request::Status {} => json!({"op": "status"}),
        Request::Reload {} => json!({"op": "reload"}),
        Request::Feeds {} => json!({"op": "feeds"}),
        Request::Top { n } => json!({"op": "top", "n": n}),
        Request::Explain {
            address,
            protocol,
            port,
            syn,
        } => {
            let mut v = json!({"op": "explain", "address": address, "protocol": protocol.to_string(), "syn": syn});
            if let Some(p) = port {
                v["port"] = json!(p);
            }
            v
        }
        Request::Trace { cidr, secs, max } => {
            json!({"op": "trace", "cidr": cidr, "secs": secs, "max": max})
        }
        // Never generated: the connection that holds a session sends it, not a client.
        Request::TraceStop { .. } => json!({"op": "trace_stop"}),
        Request::FeedsRefresh { name } => match name {
            Some(n) => json!({"op": "feeds_refresh", "name": n}),
            None => json!({"op": "feeds_refresh"}),
        },
    }
}

/// One field of a valid request made invalid: which, the value, and what the error must
/// name (the field, or the offending value where the type is wrong).
fn invalid_field(r: &Request) -> Vec<(&'static str, serde_json::Value, &'static str)> {
    use serde_json::json;
    let mut out = vec![
        ("op", json!("nope"), "nope"),
        ("op", json!(7), "op"),
        ("extra", json!(1), "extra"),
    ];
    match r {
        Request::Add { .. } => {
            out.push(("ttl_secs", json!(-5), "-5"));
            out.push(("ttl_secs", json!("ten"), "ten"));
            out.push(("list", json!("grey"), "grey"));
            out.push(("cidr", json!(null), "cidr"));
            out.push(("reason", json!(5), "5"));
        }
        Request::Del { .. } | Request::List { .. } => {
            out.push(("list", json!("grey"), "grey"));
            out.push(("list", json!(null), "list"));
        }
        Request::Trace { .. } => {
            out.push(("secs", json!(-1), "-1"));
            out.push(("max", json!("all"), "all"));
            out.push(("cidr", json!(5), "5"));
        }
        Request::Explain { .. } => {
            out.push(("protocol", json!("sctp"), "sctp"));
            out.push(("port", json!(70000), "70000"));
            out.push(("port", json!("https"), "https"));
            out.push(("syn", json!("yes"), "yes"));
            out.push(("address", json!(null), "address"));
        }
        Request::Top { .. } => {
            out.push(("n", json!("ten"), "ten"));
            out.push(("n", json!(-1), "-1"));
            out.push(("n", json!(null), "n"));
        }
        _ => {}
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_configs_parse_to_what_they_say(spec in config_spec()) {
        let text = spec.yaml(None);
        let config = Config::parse(&text).map_err(|e| TestCaseError::fail(format!("{e} for\n{text}")))?;
        let names: Vec<&str> = config.interfaces.iter().map(|i| i.name.0.as_str()).collect();
        let want: Vec<&str> = spec.interfaces.iter().map(|i| i.0.as_str()).collect();
        prop_assert_eq!(names, want);
        for (got, (_, mode)) in config.interfaces.iter().zip(&spec.interfaces) {
            let want = match *mode {
                "auto" => AttachMode::Auto,
                "native" => AttachMode::Native,
                "generic" => AttachMode::Generic,
                _ => AttachMode::Tc,
            };
            prop_assert_eq!(got.mode, want);
        }
        // The documented defaults: pps 1000 when absent, a burst of one second's worth.
        let pps = spec.default_pps.unwrap_or(1000);
        prop_assert_eq!(config.limits.default.pps, pps);
        prop_assert_eq!(config.limits.default.burst_packets, spec.default_burst.unwrap_or(pps));
        prop_assert_eq!(config.limits.rules.len(), spec.rules.len());
        for (got, want) in config.limits.rules.iter().zip(&spec.rules) {
            prop_assert_eq!(&got.name.0, &want.name);
            prop_assert_eq!(got.matcher.protocol, want.protocol.map(|p| p.1));
            let ports: Vec<(u16, u16)> = got.matcher.dst_ports.iter().map(|p| (p.first, p.last)).collect();
            prop_assert_eq!(&ports, &want.ports);
            prop_assert_eq!(got.matcher.tcp_flags.is_some(), want.syn);
            prop_assert_eq!(got.limit.pps, want.pps);
            prop_assert_eq!(got.limit.burst_packets, want.burst.unwrap_or(want.pps));
            prop_assert_eq!(got.limit.bps, want.bps);
            let bytes = if want.bps == 0 { 0 } else { want.bps.max(1522) };
            prop_assert_eq!(got.limit.burst_bytes, want.burst_bytes.unwrap_or(bytes));
            prop_assert_eq!((got.policy.key.v4, got.policy.key.v6), want.key);
        }
        prop_assert_eq!(&config.allowlist, &spec.allow);
        prop_assert_eq!(&config.blocklist, &spec.block);
        prop_assert_eq!(config.dry_run, spec.dry_run);
    }

    #[test]
    fn one_invalid_value_is_refused_naming_its_key((spec, invalid) in spec_with_one_invalid()) {
        let text = spec.yaml(Some(&invalid));
        let Err(e) = Config::parse(&text) else {
            return Err(TestCaseError::fail(format!("{} = {} was accepted in\n{text}", invalid.key, invalid.value)));
        };
        prop_assert!(
            e.problems.iter().any(|p| p.contains(&invalid.key) && p.contains("line ")),
            "{} = {}: no problem names the key and its line: {:?}", invalid.key, invalid.value, e.problems
        );
    }

    #[test]
    fn the_config_parser_never_panics_and_locates_every_error(text in ".{0,400}") {
        check_config(&text);
    }

    #[test]
    fn mutated_example_configs_parse_or_fail_with_a_located_error((text, harmless) in mutated_example()) {
        check_config(&text);
        if harmless {
            prop_assert!(Config::parse(&text).is_ok(), "a comment or blank line changed, and the example no longer parses");
        }
    }

    #[test]
    fn feed_lines_of_known_kinds_are_each_accounted_for(
        lines in prop::collection::vec(feed_line(), 0..60),
        format in prop::sample::select(vec![
            FeedFormat::Auto, FeedFormat::Plain, FeedFormat::SpamhausDrop, FeedFormat::FireholNetset,
        ]),
    ) {
        let body: Vec<String> = lines.iter().map(|l| match l {
            FeedLine::Entry { text, .. } => text.clone(),
            FeedLine::Comment(t) | FeedLine::Blank(t) | FeedLine::Bad(t) => t.clone(),
        }).collect();
        let parsed = parse(body.join("\n").as_bytes(), format);
        let entries: HashSet<IpNet> = lines.iter().filter_map(|l| match l {
            FeedLine::Entry { net, .. } => Some(*net),
            _ => None,
        }).collect();
        let bad: Vec<usize> = lines.iter().enumerate()
            .filter(|(_, l)| matches!(l, FeedLine::Bad(_))).map(|(i, _)| i + 1).collect();
        let host_bits = lines.iter().filter(|l| matches!(l, FeedLine::Entry { host_bits: true, .. })).count();
        let records = lines.iter().filter(|l| matches!(l, FeedLine::Entry { .. } | FeedLine::Bad(_))).count();
        prop_assert_eq!(&parsed.entries, &entries);
        prop_assert_eq!(parsed.rejected, bad.len());
        prop_assert_eq!(parsed.host_bits_cleared, host_bits);
        prop_assert_eq!(parsed.records, records);
        let shown: Vec<String> = bad.iter().take(MAX_EXAMPLES).map(|n| format!("line {n}: ")).collect();
        prop_assert_eq!(parsed.examples.len(), shown.len());
        for (example, prefix) in parsed.examples.iter().zip(&shown) {
            prop_assert!(example.starts_with(prefix.as_str()), "{} is not {}", example, prefix);
        }
    }

    #[test]
    fn spamhaus_json_lines_are_each_accounted_for(
        nets in prop::collection::vec(net(), 0..40),
        bad in prop::collection::vec((0..40usize, prop::sample::select(vec![
            "{broken", "{\"sblid\":\"SBL1\"}", "{\"cidr\":\"1.2.3.0/33\"}", "[1,2]",
        ])), 0..5),
    ) {
        let mut lines: Vec<String> = nets.iter()
            .map(|n| format!("{{\"cidr\":\"{n}\",\"sblid\":\"SBL1\",\"rir\":\"arin\"}}"))
            .collect();
        for &(at, text) in &bad {
            lines.insert(at.min(lines.len()), text.to_owned());
        }
        lines.push(format!("{{\"type\":\"metadata\",\"records\":{}}}", nets.len() + bad.len()));
        let parsed = parse(lines.join("\n").as_bytes(), FeedFormat::SpamhausDropJson);
        prop_assert_eq!(&parsed.entries, &nets.iter().copied().collect::<HashSet<_>>());
        prop_assert_eq!(parsed.rejected, bad.len());
        prop_assert_eq!(parsed.records, nets.len() + bad.len());
        prop_assert_eq!(parsed.declared_records, Some(nets.len() + bad.len()));
    }

    #[test]
    fn feed_parsers_take_any_bytes_and_count_consistently(
        body in prop::collection::vec(any::<u8>(), 0..600),
        format in prop::sample::select(vec![
            FeedFormat::Auto, FeedFormat::Plain, FeedFormat::SpamhausDrop,
            FeedFormat::SpamhausDropJson, FeedFormat::FireholNetset,
        ]),
    ) {
        let parsed = parse(&body, format);
        let lines = body.split(|b| *b == b'\n').count();
        // Every record is a line, and an entry or a rejection (or a duplicate).
        prop_assert!(parsed.records <= lines);
        prop_assert!(parsed.rejected <= parsed.records);
        prop_assert!(parsed.entries.len() <= parsed.records - parsed.rejected);
        prop_assert_eq!(parsed.examples.len(), parsed.rejected.min(MAX_EXAMPLES));
        for e in &parsed.examples {
            prop_assert!(e.starts_with("line "), "{}", e);
        }
    }

    #[test]
    fn valid_cli_arguments_parse_to_what_they_say(case in cli_case()) {
        let argv = case.argv();
        let cli = Cli::try_parse_from(&argv)
            .map_err(|e| TestCaseError::fail(format!("{argv:?}: {}", argument_error(&e))))?;
        prop_assert!(case.parsed_as(&cli.command), "{:?} parsed as {:?}", argv, cli.command);
    }

    #[test]
    fn invalid_cli_arguments_are_refused_naming_the_argument(
        (argv, names) in prop::sample::select(BAD_ARGV),
        socket in prop::option::of("/[a-z]{1,8}"),
    ) {
        let mut full = vec!["api-shield".to_owned()];
        if let Some(s) = &socket {
            full.extend(["--socket".to_owned(), s.clone()]);
        }
        full.extend(argv.iter().map(|a| a.to_string()));
        match Cli::try_parse_from(&full) {
            Ok(cli) => prop_assert!(false, "{:?} was accepted as {:?}", full, cli.command),
            Err(e) => {
                let line = argument_error(&e);
                prop_assert!(line.contains(names), "{:?}: `{}` does not name {}", full, line, names);
                prop_assert!(!line.contains('\n'));
            }
        }
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
            prop_assert!(!argument_error(&e).trim().is_empty());
        }
    }

    #[test]
    fn valid_admin_requests_parse_to_what_they_say(r in request()) {
        let text = request_json(&r).to_string();
        prop_assert_eq!(parse_request(&text), Ok(r));
    }

    #[test]
    fn invalid_admin_requests_are_refused_naming_the_field(
        (r, pick) in request().prop_flat_map(|r| { let n = invalid_field(&r).len(); (Just(r), 0..n) }),
    ) {
        let (field, value, names) = invalid_field(&r).swap_remove(pick);
        let mut json = request_json(&r);
        json[field] = value;
        let text = json.to_string();
        match parse_request(&text) {
            Ok(parsed) => prop_assert!(false, "{} was accepted as {:?}", text, parsed),
            Err(e) => {
                prop_assert!(e.starts_with("bad request: "), "{}", e);
                prop_assert!(e.contains(names), "{}: `{}` does not name {}", text, e, names);
            }
        }
    }

    #[test]
    fn admin_requests_never_panic_and_bad_ones_say_why(text in ".{0,200}") {
        if let Err(e) = parse_request(&text) {
            prop_assert!(e.starts_with("bad request: "), "{}", e);
        }
    }
}
