//! The metrics the daemon exports, read from the maps and its own state at each scrape.

use api_shield_common::{counters::Reason, names};

use super::Exposition;
use crate::{
    daemon::{Controller, MapStatus},
    feeds::FeedStatus,
};

impl Controller {
    pub(crate) fn render_metrics(&mut self) -> String {
        let mut e = Exposition::default();
        let drop_malformed = self.config.on_malformed == crate::config::OnMalformed::Drop;
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        for inst in &self.instances {
            let Ok(counters) = inst.shield.counters() else {
                continue;
            };
            for (reason, c) in counters {
                let action = match reason {
                    _ if reason.is_would_drop() => "would_drop",
                    Reason::Blocklisted | Reason::RateLimited => "drop",
                    Reason::Malformed if drop_malformed => "drop",
                    _ => "pass",
                };
                let labels = || {
                    vec![
                        ("interface", inst.interface.clone()),
                        ("action", action.to_owned()),
                        ("reason", reason.base().name().to_owned()),
                    ]
                };
                packets.push((labels(), c.packets as f64));
                bytes.push((labels(), c.bytes as f64));
            }
        }
        e.family(
            "api_shield_packets_total",
            "counter",
            "Packets judged by the data plane, by interface, action and reason.",
            packets,
        );
        e.family(
            "api_shield_bytes_total",
            "counter",
            "Bytes (whole frames) judged by the data plane, by interface, action and reason.",
            bytes,
        );
        let mut rule_packets = Vec::new();
        let mut rule_bytes = Vec::new();
        let names = self.config.limits.slot_names();
        for inst in &self.instances {
            let Ok(counters) = inst.shield.rule_counters() else {
                continue;
            };
            for (name, c) in names.iter().zip(counters) {
                for (action, packets, bytes) in [
                    ("passed", c.passed_packets, c.passed_bytes),
                    ("dropped", c.dropped_packets, c.dropped_bytes),
                    ("would_drop", c.would_drop_packets, c.would_drop_bytes),
                ] {
                    let labels = || {
                        vec![
                            ("interface", inst.interface.clone()),
                            ("rule", name.clone()),
                            ("action", action.to_owned()),
                        ]
                    };
                    rule_packets.push((labels(), packets as f64));
                    rule_bytes.push((labels(), bytes as f64));
                }
            }
        }
        e.family(
            "api_shield_rule_packets_total",
            "counter",
            "Packets under each limit (rule, or `default`), by what its buckets did: passed, dropped, or would_drop (dry run).",
            rule_packets,
        );
        e.family(
            "api_shield_rule_bytes_total",
            "counter",
            "Bytes under each limit (rule, or `default`), by what its buckets did.",
            rule_bytes,
        );
        e.family(
            "api_shield_penalties_total",
            "counter",
            "Prefixes put in the penalty box by this daemon, by the rule they went over.",
            names
                .iter()
                .map(|n| {
                    (
                        vec![("rule", n.clone())],
                        self.penalties.get(n).copied().unwrap_or(0) as f64,
                    )
                })
                .collect(),
        );
        let lists = self
            .registry
            .counts()
            .into_iter()
            .map(|((list, origin), n)| {
                (
                    vec![("list", list.name().to_owned()), ("origin", origin)],
                    n as f64,
                )
            })
            .collect();
        e.family(
            "api_shield_list_entries",
            "gauge",
            "List entries by list and origin (an entry listed by several origins counts for each).",
            lists,
        );
        let fill = self.map_fill().unwrap_or_default();
        let per_map = |f: fn(&MapStatus) -> f64| {
            fill.iter()
                .map(|m| {
                    (
                        vec![
                            ("interface", m.interface.clone()),
                            ("map", m.map.to_owned()),
                        ],
                        f(m),
                    )
                })
                .collect()
        };
        e.family(
            "api_shield_map_entries",
            "gauge",
            "Entries in each map (counted at most every 10 s).",
            per_map(|m| m.entries as f64),
        );
        e.family(
            "api_shield_map_capacity",
            "gauge",
            "Capacity of each map.",
            per_map(|m| f64::from(m.capacity)),
        );
        let failures = [names::MAP_LIST_V4, names::MAP_LIST_V6]
            .into_iter()
            .map(|map| {
                (
                    vec![("map", map.to_owned())],
                    self.update_failures.get(map).copied().unwrap_or(0) as f64,
                )
            })
            .collect();
        e.family(
            "api_shield_map_update_failures_total",
            "counter",
            "Map updates refused, e.g. because the map was full (retried entries count again).",
            failures,
        );
        let tracked: usize = fill
            .iter()
            .filter(|m| m.map == names::MAP_LIMITER)
            .map(|m| m.entries)
            .sum();
        e.family(
            "api_shield_tracked_sources",
            "gauge",
            "Sources the limiter tracks, over all interfaces.",
            vec![(vec![], tracked as f64)],
        );
        let created: u64 = self
            .instances
            .iter()
            .filter_map(|i| i.shield.limiter_buckets_created().ok())
            .sum();
        // Replacement is the only way a bucket leaves the table: what was created and is
        // gone was evicted. The fill count may be a few seconds old; the counter never goes back.
        self.limiter_evictions = self
            .limiter_evictions
            .max(created.saturating_sub(tracked as u64));
        e.family(
            "api_shield_limiter_buckets_created_total",
            "counter",
            "Token buckets the limiter created (a new source, or one seen again after eviction).",
            vec![(vec![], created as f64)],
        );
        e.family(
            "api_shield_limiter_evictions_total",
            "counter",
"Buckets the limiter replaced with a new source's (the least busy of a full set of 4); raise capacity.sources if this grows under normal traffic.",
            vec![(vec![], self.limiter_evictions as f64)],
        );
        let feeds = self.feeds_status();
        let per_feed = |f: fn(&FeedStatus) -> Option<f64>| {
            feeds
                .iter()
                .filter_map(|s| f(s).map(|v| (vec![("feed", s.name.clone())], v)))
                .collect()
        };
        e.family(
            "api_shield_feed_entries",
            "gauge",
            "Prefixes of the feed's version in force.",
            per_feed(|s| Some(s.entries as f64)),
        );
        e.family(
            "api_shield_feed_last_success_timestamp_seconds",
            "gauge",
            "When the feed was last fetched successfully (Unix time).",
            per_feed(|s| s.last_success.map(|t| t as f64)),
        );
        e.family(
            "api_shield_feed_fetch_failures_total",
            "counter",
            "Fetches of the feed that failed (the last good version stayed).",
            per_feed(|s| Some(s.fetch_failures as f64)),
        );
        e.family(
            "api_shield_feed_rejected_lines",
            "gauge",
            "Lines of the feed's version in force that were not prefixes.",
            per_feed(|s| Some(s.rejected_lines as f64)),
        );
        e.family(
            "api_shield_feed_allowlisted_entries",
            "gauge",
            "Feed entries inside allowlisted prefixes (listed, never blocked).",
            per_feed(|s| Some(s.allowlisted as f64)),
        );
        e.family(
            "api_shield_feed_refused_entries",
            "gauge",
            "Feed entries the full maps refused.",
            per_feed(|s| Some(s.refused_map_full as f64)),
        );
        let mut delivered = Vec::new();
        let mut suppressed = Vec::new();
        for inst in &self.instances {
            for (reason, n) in inst.shield.events_suppressed().unwrap_or_default() {
                let labels = || {
                    vec![
                        ("interface", inst.interface.clone()),
                        ("reason", reason.name().to_owned()),
                    ]
                };
                suppressed.push((labels(), n as f64));
                let d = inst
                    .delivered
                    .get(reason as usize)
                    .map_or(0, |d| d.load(std::sync::atomic::Ordering::Relaxed));
                delivered.push((labels(), d as f64));
            }
        }
        e.family(
            "api_shield_events_total",
            "counter",
            "Drop events delivered to userspace and written out.",
            delivered,
        );
        e.family(
            "api_shield_events_suppressed_total",
            "counter",
            "Drop events not delivered: over events.rate, or the ring was full.",
            suppressed,
        );
        e.family(
            "api_shield_uptime_seconds",
            "gauge",
            "Seconds since this daemon started.",
            vec![(vec![], self.started.elapsed().as_secs_f64().floor())],
        );
        e.family(
            "api_shield_build_info",
            "gauge",
            "Always 1; the version in a label.",
            vec![(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1.0)],
        );
        e.finish()
    }
}
