//! The YAML config: parsing, defaults, validation. Every error names its key and line.
//!
//! Scalar errors (bad CIDR, negative rate, unknown key) are located by serde_yaml itself
//! (`values`); the checks that span several entries (`validate`) locate their key with
//! `locate`. Limits and their defaults are in `limit`, every other type in `types`.

mod limit;
mod locate;
mod types;
mod validate;
mod values;

use std::{
    fmt, fs,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

use self::{
    limit::RawLimits,
    locate::{Seg, describe_yaml_error, locate},
    values::{AbsolutePath, Prefix},
};
pub use self::{
    limit::{DEFAULT_PPS, Limit},
    types::*,
    values::{
        Bounded, HumanDuration, InterfaceName, MAX_BPS, MAX_PENALTY_SECS, MAX_PPS, MIN_BURST_BYTES,
    },
};

pub const DEFAULT_SOCKET: &str = "/run/api-shield/api.sock";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/api-shield";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/api-shield";

/// The config the daemon runs without `--config`; documented in the README.
pub const DEFAULT_CONFIG: &str = include_str!("../../../config/default.yaml");

/// A config file that cannot be used, with every problem found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("; "))
    }
}

/// A validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub interfaces: Vec<Interface>,
    pub limits: Limits,
    /// Count only: nothing is dropped (lists, limits, malformed frames); would-be drops
    /// are counted and reported as such.
    pub dry_run: bool,
    pub allowlist: Vec<IpNet>,
    pub blocklist: Vec<IpNet>,
    pub on_malformed: OnMalformed,
    pub capacity: Capacity,
    /// How often the daemon logs its counters; zero: never.
    pub stats_interval: Duration,
    pub admin: Admin,
    /// Where CLI-added entries (and later feed lists and penalties) persist.
    pub state_dir: PathBuf,
    /// Where maps and XDP links are pinned, one folder per interface.
    pub pin_dir: PathBuf,
    /// Reputation feeds: lists of networks to block, refreshed on a schedule.
    pub feeds: Vec<FeedConfig>,
    pub metrics: MetricsConfig,
    pub events: EventsConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    interfaces: Vec<Interface>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    allowlist: Vec<Prefix>,
    #[serde(default)]
    blocklist: Vec<Prefix>,
    #[serde(default)]
    on_malformed: OnMalformed,
    #[serde(default)]
    capacity: Capacity,
    stats_interval: Option<HumanDuration>,
    #[serde(default)]
    admin: Admin,
    state_dir: Option<AbsolutePath>,
    pin_dir: Option<AbsolutePath>,
    #[serde(default)]
    feeds: Vec<FeedConfig>,
    #[serde(default)]
    metrics: MetricsConfig,
    #[serde(default)]
    events: EventsConfig,
}

impl Config {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        use std::os::unix::fs::PermissionsExt as _;
        let refuse = |problem: String| ConfigError {
            problems: vec![problem],
        };
        let meta = fs::metadata(path)
            .map_err(|e| refuse(format!("cannot read {}: {e}", path.display())))?;
        // Anyone who can write the config can rewrite the firewall.
        let mode = meta.permissions().mode();
        if mode & 0o002 != 0 {
            return Err(refuse(format!(
                "{} is writable by others (mode {:o}): refusing it; `chmod o-w {}`",
                path.display(),
                mode & 0o777,
                path.display()
            )));
        }
        let text = fs::read_to_string(path)
            .map_err(|e| refuse(format!("cannot read {}: {e}", path.display())))?;
        Config::parse(&text)
    }

    /// Parses and validates config text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError {
            problems: vec![describe_yaml_error(&e)],
        })?;
        // What only the raw form shows: a default limit written as a rule.
        let mut problems = Vec::new();
        if let Some(default) = &raw.limits.default {
            for (key, given) in [
                ("name", default.name.is_some()),
                ("match", default.matcher.is_some()),
            ] {
                if given {
                    let path = [Seg::Key("limits"), Seg::Key("default"), Seg::Key(key)];
                    problems.push(format!(
                        "limits.default.{key}: only rules have `{key}` at line {}",
                        locate(text, &path)
                    ));
                }
            }
        }
        let default = raw.limits.default.unwrap_or_default();
        let config = Config {
            interfaces: raw.interfaces,
            limits: Limits {
                default: default.limit(DEFAULT_PPS),
                default_policy: default.policy(),
                rules: raw.limits.rules.into_iter().map(|r| r.rule()).collect(),
                penalty: raw.limits.penalty,
            },
            dry_run: raw.dry_run,
            allowlist: raw.allowlist.into_iter().map(|p| p.0).collect(),
            blocklist: raw.blocklist.into_iter().map(|p| p.0).collect(),
            on_malformed: raw.on_malformed,
            capacity: raw.capacity,
            stats_interval: raw.stats_interval.map_or(Duration::from_secs(10), |d| d.0),
            admin: raw.admin,
            state_dir: raw
                .state_dir
                .map_or_else(|| PathBuf::from(DEFAULT_STATE_DIR), |p| p.0),
            pin_dir: raw
                .pin_dir
                .map_or_else(|| PathBuf::from(DEFAULT_PIN_DIR), |p| p.0),
            feeds: raw.feeds,
            metrics: raw.metrics,
            events: raw.events,
        };
        problems.extend(config.problems(text));
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError { problems })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../../config/api-shield.example.yaml");

    fn errors(text: &str) -> String {
        Config::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn the_example_and_default_configs_are_valid() {
        let c = Config::parse(EXAMPLE).unwrap();
        assert_eq!(c.interfaces[0].name.0, "eth0");
        assert_eq!(c.limits.default.pps, 1000);
        assert_eq!(c.limits.default.burst_bytes, 25_000_000);
        assert_eq!(c.allowlist, vec!["10.0.0.0/8".parse::<IpNet>().unwrap()]);
        assert_eq!(c.blocklist.len(), 2);
        let rules = &c.limits.rules;
        assert_eq!(rules.len(), 3);
        assert_eq!(rules[0].name.0, "https");
        assert_eq!(
            rules[0].matcher.dst_ports,
            vec![
                PortRange {
                    first: 443,
                    last: 443
                },
                PortRange {
                    first: 8000,
                    last: 8443
                }
            ]
        );
        assert_eq!(rules[0].policy.key, SourceKey { v4: 24, v6: 64 });
        assert_eq!(rules[1].matcher.tcp_flags, Some(TcpFlags::Syn));
        assert!(rules[1].policy.dry_run);
        assert_eq!((rules[2].limit.pps, rules[2].limit.bps), (0, 0));
        let p = c.limits.penalty.unwrap();
        assert_eq!(p.after_violations.0, 50);
        assert_eq!(p.max_block.0, Duration::from_secs(3600));
        assert!(!c.dry_run);
        let d = Config::parse(DEFAULT_CONFIG).unwrap();
        assert_eq!(d.interfaces[0].mode, AttachMode::Auto);
        assert_eq!(d.on_malformed, OnMalformed::Pass);
    }

    #[test]
    fn rule_keys_and_shapes_parse() {
        let c = Config::parse(
            "interfaces: [{name: a}]\ndry_run: true\nlimits:\n  rules:\n    - name: v4only\n      key: source/24\n      pps: 5\n    - name: v6only\n      match: {protocol: icmp}\n      key: source/48\n      bps: 1000\n    - name: both\n      match: {dst_ports: [\"1-1024\"]}\n      key: {ipv4: 16, ipv6: 56}\n      pps: 1\n    - name: n\n      match: {protocol: 132}\n      pps: 1\n",
        )
        .unwrap();
        assert!(c.dry_run);
        let r = &c.limits.rules;
        assert_eq!(r[0].policy.key, SourceKey { v4: 24, v6: 128 });
        assert_eq!(
            (r[0].limit.pps, r[0].limit.burst_packets, r[0].limit.bps),
            (5, 5, 0)
        );
        assert_eq!(r[1].policy.key, SourceKey { v4: 32, v6: 48 });
        assert_eq!(
            (r[1].limit.pps, r[1].limit.bps, r[1].limit.burst_bytes),
            (0, 1000, 1522)
        );
        assert_eq!(r[1].matcher.protocol, Some(Protocol::Icmp));
        assert_eq!(r[2].policy.key, SourceKey { v4: 16, v6: 56 });
        assert_eq!(r[3].matcher.protocol, Some(Protocol::Number(132)));
        assert_eq!(
            c.limits.slot_names(),
            ["default", "v4only", "v6only", "both", "n"]
        );
        assert!(c.limits.penalty.is_none());
    }

    #[test]
    fn bad_rules_are_refused_with_their_key_and_line() {
        let base = "interfaces: [{name: a}]\nlimits:\n  rules:\n    - name: r\n";
        for (extra, wants) in [
            ("      match: {protocol: tcpp}\n", "unknown protocol `tcpp`"),
            (
                "      match: {protocol: 256}\n",
                "protocol 256 is out of range",
            ),
            (
                "      match: {dst_ports: [70000]}\n",
                "port 70000 is out of range",
            ),
            ("      match: {dst_ports: [\"90-80\"]}\n", "90 is above 80"),
            (
                "      match: {dst_ports: [\"http\"]}\n",
                "invalid port `http`",
            ),
            (
                "      match: {protocol: icmp, dst_ports: [1]}\n",
                "dst_ports needs protocol tcp or udp",
            ),
            (
                "      match: {protocol: udp, tcp_flags: syn}\n",
                "tcp_flags needs protocol: tcp",
            ),
            (
                "      match: {protocol: tcp, tcp_flags: fin}\n",
                "unknown variant `fin`",
            ),
            ("      match: {port: 1}\n", "unknown field `port`"),
            ("      key: source/33/64\n", "invalid key `source/33/64`"),
            ("      key: src/24\n", "invalid key `src/24`"),
            ("      key: {ipv4: 40}\n", "40 is out of range"),
            ("      pps: -1\n", "integer `-1`"),
        ] {
            let e = errors(&format!("{base}{extra}"));
            assert!(e.contains(wants), "{extra}: {e}");
            assert!(e.contains("limits.rules[0]"), "{extra}: no key in {e}");
            assert!(e.contains("line "), "{extra}: no line in {e}");
        }
        let e =
            errors("interfaces: [{name: a}]\nlimits:\n  rules:\n    - name: r\n    - name: r\n");
        assert!(
            e.contains("duplicate rule `r`") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces: [{name: a}]\nlimits:\n  rules:\n    - name: default\n");
        assert!(e.contains("invalid rule name `default`"), "{e}");
        let many: String = (0..65).map(|i| format!("    - name: r{i}\n")).collect();
        let e = errors(&format!(
            "interfaces: [{{name: a}}]\nlimits:\n  rules:\n{many}"
        ));
        assert!(e.contains("65 rules: at most 64"), "{e}");
        for (penalty, wants) in [
            ("{after_violations: 0}", "0 is out of range"),
            ("{window: 10s}", "missing field `after_violations`"),
            (
                "{after_violations: 5, block_for: 2h}",
                "max_block: must be at least block_for",
            ),
            (
                "{after_violations: 5, window: 0}",
                "window: must be at least 1s",
            ),
            ("{after_violations: 5, escalate: 0}", "0 is out of range"),
        ] {
            let e = errors(&format!(
                "interfaces: [{{name: a}}]\nlimits:\n  penalty: {penalty}\n"
            ));
            assert!(
                e.contains(wants) && e.contains("limits.penalty"),
                "{penalty}: {e}"
            );
        }
    }

    #[test]
    fn the_contract_keys_parse() {
        let c = Config::parse(
            "interfaces:\n  - name: eth0\n    mode: generic\nlimits:\n  default:\n    pps: 10\n    burst_packets: 20\n    bps: 0\n    burst_bytes: 2000\nallowlist: [10.0.0.0/8]\nblocklist: [192.0.2.0/24, \"2001:db8:bad::/48\"]\non_malformed: drop\n",
        )
        .unwrap();
        assert_eq!(c.interfaces[0].mode, AttachMode::Generic);
        assert_eq!(
            c.limits.default,
            Limit {
                pps: 10,
                burst_packets: 20,
                bps: 0,
                burst_bytes: 2000
            }
        );
        assert_eq!(c.on_malformed, OnMalformed::Drop);
        assert_eq!(c.blocklist[1].to_string(), "2001:db8:bad::/48");
    }

    #[test]
    fn missing_bursts_default_to_one_second_of_rate() {
        let c = Config::parse(
            "interfaces: [{name: a}]\nlimits: { default: { pps: 50, bps: 100000 } }\n",
        )
        .unwrap();
        assert_eq!(c.limits.default.burst_packets, 50);
        assert_eq!(c.limits.default.burst_bytes, 100_000);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e =
            errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    pps: 5\n    burst: 3\n");
        assert!(
            e.contains("limits.default")
                && e.contains("unknown field `burst`")
                && e.contains("line 6"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nblocklst: []\n");
        assert!(
            e.contains("unknown field `blocklst`") && e.contains("line 3"),
            "{e}"
        );
    }

    #[test]
    fn bad_cidr_is_named_with_its_line() {
        let e =
            errors("interfaces:\n  - name: eth0\nblocklist:\n  - 192.0.2.0/24\n  - 192.0.2.0/33\n");
        assert!(
            e.contains("blocklist") && e.contains("192.0.2.0/33") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nallowlist: [not-an-ip]\n");
        assert!(
            e.contains("allowlist") && e.contains("not-an-ip") && e.contains("line 3"),
            "{e}"
        );
    }

    /// The values config/api-shield.example.yaml documents for a default limit left out.
    const DOCUMENTED_DEFAULT: Limit = Limit {
        pps: 1000,
        burst_packets: 1000,
        bps: 0,
        burst_bytes: 0,
    };

    fn default_limit(limits: &str) -> Limit {
        Config::parse(&format!("interfaces: [{{name: eth0}}]\n{limits}"))
            .unwrap()
            .limits
            .default
    }

    #[test]
    fn a_default_limit_absent_empty_or_partial_takes_the_documented_defaults() {
        assert_eq!(default_limit(""), DOCUMENTED_DEFAULT, "absent");
        assert_eq!(
            default_limit("limits: {}\n"),
            DOCUMENTED_DEFAULT,
            "limits: {{}}"
        );
        assert_eq!(
            default_limit("limits: {default: {}}\n"),
            DOCUMENTED_DEFAULT,
            "default: {{}}"
        );
        assert_eq!(Limit::default(), DOCUMENTED_DEFAULT);
        // A burst left out is one second's worth of its rate; the byte burst is at least
        // one full-size frame.
        assert_eq!(
            default_limit("limits: {default: {pps: 50}}\n"),
            Limit {
                pps: 50,
                burst_packets: 50,
                ..DOCUMENTED_DEFAULT
            }
        );
        assert_eq!(
            default_limit("limits: {default: {bps: 100000}}\n"),
            Limit {
                bps: 100_000,
                burst_bytes: 100_000,
                ..DOCUMENTED_DEFAULT
            }
        );
        assert_eq!(
            default_limit("limits: {default: {bps: 64}}\n").burst_bytes,
            1522
        );
        assert_eq!(
            default_limit("limits: {default: {burst_packets: 7}}\n"),
            Limit {
                burst_packets: 7,
                ..DOCUMENTED_DEFAULT
            }
        );
    }

    #[test]
    fn a_rule_limits_only_what_it_names() {
        let c = Config::parse(
            "interfaces: [{name: eth0}]\nlimits:\n  rules:\n    - name: r\n      bps: 2000\n",
        )
        .unwrap();
        assert_eq!(
            c.limits.rules[0].limit,
            Limit {
                pps: 0,
                burst_packets: 0,
                bps: 2000,
                burst_bytes: 2000
            }
        );
    }

    #[test]
    fn a_switched_off_limit_needs_no_burst() {
        for limits in [
            "limits: {default: {bps: 0, burst_bytes: 0}}\n",
            "limits: {default: {pps: 0, burst_packets: 0}}\n",
            "limits: {rules: [{name: r, pps: 0, burst_packets: 0, bps: 0, burst_bytes: 0}]}\n",
        ] {
            Config::parse(&format!("interfaces: [{{name: eth0}}]\n{limits}"))
                .unwrap_or_else(|e| panic!("{limits}: {e}"));
        }
        // Beside a rate, a burst of 0 is refused, naming its key and line.
        let e = errors(
            "interfaces: [{name: eth0}]\nlimits:\n  default:\n    bps: 1000\n    burst_bytes: 0\n",
        );
        assert!(
            e.contains("limits.default.burst_bytes") && e.contains("line 5"),
            "{e}"
        );
        let e = errors(
            "interfaces: [{name: eth0}]\nlimits:\n  rules:\n    - name: r\n      pps: 5\n      burst_packets: 0\n",
        );
        assert!(
            e.contains("limits.rules[0].burst_packets") && e.contains("line 6"),
            "{e}"
        );
    }

    #[test]
    fn a_default_limit_written_as_a_rule_and_a_rule_without_a_name_are_refused() {
        let e =
            errors("interfaces: [{name: eth0}]\nlimits:\n  default:\n    name: x\n    pps: 5\n");
        assert!(
            e.contains("limits.default.name") && e.contains("only rules") && e.contains("line 4"),
            "{e}"
        );
        let e = errors("interfaces: [{name: eth0}]\nlimits:\n  rules:\n    - pps: 5\n");
        assert!(
            e.contains("limits.rules[0]") && e.contains("needs a `name`") && e.contains("line 4"),
            "{e}"
        );
    }

    #[test]
    fn negative_or_absurd_rates_are_refused() {
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    pps: -5\n");
        assert!(
            e.contains("limits.default.pps") && e.contains("-5") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    bps: -1\n");
        assert!(
            e.contains("limits.default.bps") && e.contains("line 5"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    burst_packets: 0\n");
        assert!(
            e.contains("burst_packets") && e.contains("out of range") && e.contains("line 5"),
            "{e}"
        );
        let e = errors(
            "interfaces:\n  - name: eth0\nlimits:\n  default:\n    bps: 1000\n    burst_bytes: 100\n",
        );
        assert!(e.contains("burst_bytes") && e.contains("line 6"), "{e}");
        let e = errors("interfaces:\n  - name: eth0\nlimits:\n  default:\n    pps: ten\n");
        assert!(
            e.contains("limits.default.pps") && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_interface_is_named_with_its_line() {
        let e = errors(
            "interfaces:\n  - name: eth0\n    mode: native\n  - name: eth1\n  - name: eth0\n",
        );
        assert!(
            e.contains("interfaces[2].name")
                && e.contains("duplicate interface `eth0`")
                && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn other_bad_values_are_refused_with_their_line() {
        let e = errors("interfaces:\n  - name: eth0\n    mode: turbo\n");
        assert!(
            e.contains("interfaces[0].mode") && e.contains("turbo") && e.contains("line 3"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\non_malformed: maybe\n");
        assert!(e.contains("on_malformed") && e.contains("line 3"), "{e}");
        let e = errors("interfaces:\n  - name: this-name-is-too-long\n");
        assert!(
            e.contains("interfaces[0].name") && e.contains("line 2"),
            "{e}"
        );
        let e = errors("interfaces: []\n");
        assert!(
            e.contains("interfaces") && e.contains("at least one") && e.contains("line 1"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\nstats_interval: 5x\n");
        assert!(
            e.contains("stats_interval") && e.contains("5x") && e.contains("line 3"),
            "{e}"
        );
        let e = errors("interfaces:\n  - name: eth0\ncapacity:\n  sources: 0\n");
        assert!(
            e.contains("capacity.sources") && e.contains("line 4"),
            "{e}"
        );
        let e = errors(
            "interfaces:\n  - name: eth0\ncapacity:\n  blocklist: 1\nblocklist: [192.0.2.0/24, 198.51.100.0/24]\n",
        );
        assert!(
            e.contains("blocklist")
                && e.contains("do not fit capacity.blocklist")
                && e.contains("line 5"),
            "{e}"
        );
    }

    #[test]
    fn feeds_parse_with_defaults_and_bad_ones_are_located() {
        let c = Config::parse("interfaces: [{name: a}]\nfeeds:\n  - name: drop\n    url: https://www.spamhaus.org/drop/drop.txt\n  - name: local\n    path: /etc/x.txt\n    format: firehol-netset\n    refresh: 5m\n").unwrap();
        assert_eq!(c.feeds[0].refresh.0, Duration::from_secs(3600));
        assert_eq!(
            (c.feeds[0].max_entries.0, c.feeds[0].min_entries.0),
            (1_000_000, 1)
        );
        assert_eq!(c.feeds[1].format, FeedFormat::FireholNetset);
        let base = "interfaces: [{name: a}]\nfeeds:\n";
        for (feed, key, line) in [
            (
                "  - name: a\n    url: https://x/a\n  - name: a\n    path: /b\n",
                "feeds[1].name",
                "line 5",
            ),
            (
                "  - name: a\n    url: https://x/a\n    path: /b\n",
                "feeds[0].path",
                "line 5",
            ),
            ("  - name: a\n    refresh: 1h\n", "feeds[0]", "line 3"),
            (
                "  - name: a\n    url: ftp://x/a\n",
                "feeds[0].url",
                "line 4",
            ),
            (
                "  - name: a\n    path: relative.txt\n",
                "feeds[0].path",
                "line 4",
            ),
            (
                "  - name: a\n    url: https://x/a\n    format: csv\n",
                "feeds[0].format",
                "line 5",
            ),
            (
                "  - name: A B\n    url: https://x/a\n",
                "feeds[0].name",
                "line 3",
            ),
            (
                "  - name: a\n    url: https://x/a\n    min_entries: 10\n    max_entries: 5\n",
                "feeds[0].min_entries",
                "line 5",
            ),
            (
                "  - name: a\n    url: https://x/a\n    refresh: soon\n",
                "feeds[0].refresh",
                "line 5",
            ),
        ] {
            let e = errors(&format!("{base}{feed}"));
            assert!(e.contains(key) && e.contains(line), "{feed}: {e}");
        }
    }

    #[test]
    fn metrics_listen_defaults_to_loopback_and_can_be_off() {
        let c = Config::parse("interfaces: [{name: a}]\n").unwrap();
        assert_eq!(c.metrics.listen.0, Some("127.0.0.1:9477".parse().unwrap()));
        for off in ["off", "\"off\""] {
            let c = Config::parse(&format!(
                "interfaces: [{{name: a}}]\nmetrics: {{listen: {off}}}\n"
            ))
            .unwrap();
            assert_eq!(c.metrics.listen.0, None);
        }
        let c =
            Config::parse("interfaces: [{name: a}]\nmetrics: {listen: \"[::1]:9100\"}\n").unwrap();
        assert_eq!(c.metrics.listen.0, Some("[::1]:9100".parse().unwrap()));
        let e = errors("interfaces: [{name: a}]\nmetrics:\n  listen: localhost\n");
        assert!(e.contains("metrics.listen") && e.contains("line 3"), "{e}");
    }

    #[test]
    fn a_config_writable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let path =
            std::env::temp_dir().join(format!("api-shield-config-{}.yaml", std::process::id()));
        fs::write(&path, "interfaces: [{name: a}]\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o646)).unwrap();
        let e = Config::from_file(&path).unwrap_err().to_string();
        assert!(
            e.contains("writable by others (mode 646)") && e.contains("chmod o-w"),
            "{e}"
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Config::from_file(&path).is_ok());
        fs::remove_file(&path).unwrap();
    }

    #[test]
    fn broken_yaml_is_refused_with_its_line() {
        let e = errors("interfaces: [\n");
        assert!(e.contains("line"), "{e}");
        let e = errors("- just\n- a list\n");
        assert!(e.contains("line 1"), "{e}");
    }

    #[test]
    fn locate_walks_keys_and_sequence_items() {
        let text = "# c\na:\n  b: 1\n  c:\n    - x: 1\n      y: 2\n    - x: 3\n      y: 4\nd: 5\n";
        assert_eq!(
            locate(
                text,
                &[Seg::Key("a"), Seg::Key("c"), Seg::Index(1), Seg::Key("y")]
            ),
            8
        );
        assert_eq!(
            locate(
                text,
                &[Seg::Key("a"), Seg::Key("c"), Seg::Index(0), Seg::Key("x")]
            ),
            5
        );
        assert_eq!(locate(text, &[Seg::Key("d")]), 9);
        assert_eq!(locate(text, &[Seg::Key("a"), Seg::Key("zz")]), 2);
    }

    #[test]
    fn durations_parse_and_refuse_garbage() {
        assert_eq!(
            "10m".parse::<HumanDuration>().unwrap().0,
            Duration::from_secs(600)
        );
        assert_eq!(
            "500ms".parse::<HumanDuration>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!("off".parse::<HumanDuration>().unwrap().0, Duration::ZERO);
        assert!("5x".parse::<HumanDuration>().unwrap_err().contains("5x"));
        assert!("".parse::<HumanDuration>().is_err());
    }
}
