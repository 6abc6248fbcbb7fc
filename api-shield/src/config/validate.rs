//! Checks that span several entries or keys (duplicates, capacities, bursts beside
//! rates, feed sources), each located by its key's line.

use std::time::Duration;

use api_shield_common::limiter::MAX_RULES;
use ipnet::IpNet;

use super::{
    Config, Limit, Protocol,
    locate::{Seg, display_path, locate},
    values::{MAX_BPS, MAX_PENALTY_SECS, MAX_PPS, MIN_BURST_BYTES},
};

impl Config {
    /// Checks that span several entries.
    pub(super) fn problems(&self, text: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut at = |path: &[Seg<'_>], message: String| {
            problems.push(format!(
                "{}: {message} at line {}",
                display_path(path),
                locate(text, path)
            ));
        };
        if self.interfaces.is_empty() {
            at(
                &[Seg::Key("interfaces")],
                "at least one interface is required".into(),
            );
        }
        for (i, iface) in self.interfaces.iter().enumerate() {
            if let Some(first) = self.interfaces[..i]
                .iter()
                .position(|o| o.name == iface.name)
            {
                at(
                    &[Seg::Key("interfaces"), Seg::Index(i), Seg::Key("name")],
                    format!(
                        "duplicate interface `{}` (already listed as interfaces[{first}])",
                        iface.name
                    ),
                );
            }
        }
        for (list, entries, capacity) in [
            ("blocklist", &self.blocklist, self.capacity.blocklist.0),
            ("allowlist", &self.allowlist, self.capacity.allowlist.0),
        ] {
            for family_is_v4 in [true, false] {
                let n = entries
                    .iter()
                    .filter(|p| matches!(p, IpNet::V4(_)) == family_is_v4)
                    .count();
                if n as u64 > capacity {
                    at(
                        &[Seg::Key(list)],
                        format!(
                            "{n} {} entries do not fit capacity.{list} ({capacity})",
                            if family_is_v4 { "IPv4" } else { "IPv6" }
                        ),
                    );
                }
            }
        }
        let rules = &self.limits.rules;
        if rules.len() > MAX_RULES as usize {
            at(
                &[Seg::Key("limits"), Seg::Key("rules")],
                format!("{} rules: at most {MAX_RULES} are supported", rules.len()),
            );
        }
        let default_path = |key| [Seg::Key("limits"), Seg::Key("default"), Seg::Key(key)];
        for (key, message) in burst_problems(&self.limits.default) {
            at(&default_path(key), message);
        }
        for (i, rule) in rules.iter().enumerate() {
            let path = |key| {
                [
                    Seg::Key("limits"),
                    Seg::Key("rules"),
                    Seg::Index(i),
                    Seg::Key(key),
                ]
            };
            if rule.name.0.is_empty() {
                at(
                    &[Seg::Key("limits"), Seg::Key("rules"), Seg::Index(i)],
                    "a rule needs a `name`".into(),
                );
            }
            for (key, message) in burst_problems(&rule.limit) {
                at(&path(key), message);
            }
            if let Some(first) = rules[..i].iter().position(|o| o.name == rule.name) {
                at(
                    &path("name"),
                    format!(
                        "duplicate rule `{}` (already listed as limits.rules[{first}])",
                        rule.name
                    ),
                );
            }
            let m = &rule.matcher;
            let transport = matches!(m.protocol, None | Some(Protocol::Tcp | Protocol::Udp));
            if !m.dst_ports.is_empty() && !transport {
                at(
                    &path("match"),
                    "dst_ports needs protocol tcp or udp (or no protocol: both)".into(),
                );
            }
            if m.tcp_flags.is_some() && m.protocol != Some(Protocol::Tcp) {
                at(&path("match"), "tcp_flags needs protocol: tcp".into());
            }
        }
        if let Some(p) = &self.limits.penalty {
            let path = |key| [Seg::Key("limits"), Seg::Key("penalty"), Seg::Key(key)];
            for (key, d) in [
                ("window", p.window.0),
                ("block_for", p.block_for.0),
                ("max_block", p.max_block.0),
            ] {
                if d < Duration::from_secs(1) {
                    at(&path(key), "must be at least 1s".into());
                }
            }
            if p.max_block.0 < p.block_for.0 {
                at(&path("max_block"), "must be at least block_for".into());
            }
            if p.max_block.0 > Duration::from_secs(MAX_PENALTY_SECS) {
                at(&path("max_block"), "must be at most 365d".into());
            }
        }
        for (i, feed) in self.feeds.iter().enumerate() {
            let path = |key| [Seg::Key("feeds"), Seg::Index(i), Seg::Key(key)];
            if let Some(first) = self.feeds[..i].iter().position(|o| o.name == feed.name) {
                at(
                    &path("name"),
                    format!(
                        "duplicate feed `{}` (already listed as feeds[{first}])",
                        feed.name.0
                    ),
                );
            }
            match (&feed.url, &feed.path) {
                (Some(_), Some(_)) => at(
                    &path("path"),
                    "a feed has either `url` or `path`, not both".into(),
                ),
                (None, None) => at(
                    &[Seg::Key("feeds"), Seg::Index(i)],
                    "a feed needs `url` or `path`".into(),
                ),
                (None, Some(p)) if !p.is_absolute() => at(
                    &path("path"),
                    format!("`{}` is not an absolute path", p.display()),
                ),
                _ => {}
            }
            if feed.refresh.0 < Duration::from_secs(1) {
                at(&path("refresh"), "must be at least 1s".into());
            }
            if feed.timeout.0 < Duration::from_secs(1) {
                at(&path("timeout"), "must be at least 1s".into());
            }
            if feed.min_entries.0 > feed.max_entries.0 {
                at(
                    &path("min_entries"),
                    format!(
                        "{} is more than max_entries ({})",
                        feed.min_entries.0, feed.max_entries.0
                    ),
                );
            }
        }
        problems
    }
}

/// A burst of 0 beside a rate: no packet (or no frame) could ever pass.
fn burst_problems(limit: &Limit) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if limit.pps > 0 && limit.burst_packets == 0 {
        out.push((
            "burst_packets",
            format!(
                "0 is out of range while pps is {}: expected 1 to {MAX_PPS} (no packet could pass)",
                limit.pps
            ),
        ));
    }
    if limit.bps > 0 && limit.burst_bytes < MIN_BURST_BYTES {
        out.push((
            "burst_bytes",
            format!(
                "{} is out of range while bps is {}: expected {MIN_BURST_BYTES} to {MAX_BPS} (a full-size frame)",
                limit.burst_bytes, limit.bps
            ),
        ));
    }
    out
}
