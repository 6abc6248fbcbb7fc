//! The admin socket's requests: block and allow entries, stats, status and top.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use api_shield_common::{
    counters::Reason,
    limiter::{LimiterKey, LimiterState},
};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use super::{Controller, totals};
use crate::{
    api::{Request, Response},
    lists::{Claim, ListKind, Origin, unix_now},
    prefix::parse_prefix,
};

/// The longest TTL accepted: ten years.
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// The longest reason accepted.
const MAX_REASON_CHARS: usize = 256;

/// How long a map fill count is reused by metrics.
const MAP_FILL_MAX_AGE: Duration = Duration::from_secs(10);

/// A `top` call between its two snapshots of the limiter.
pub(crate) struct PendingTop {
    first: std::collections::HashMap<(usize, LimiterKey), LimiterState>,
    at: Instant,
    n: usize,
    reply: oneshot::Sender<Response>,
}

#[derive(Serialize)]
struct TopEntry {
    source: String,
    interface: String,
    rule: String,
    pps: f64,
    bytes_per_sec: f64,
    drops_per_sec: f64,
    /// Dropped by the limiter since the source was first tracked.
    drops: u64,
}

/// How long `top` measures rates over.
const TOP_WINDOW: Duration = Duration::from_secs(1);

#[derive(Serialize)]
pub(crate) struct ReasonStats {
    reason: &'static str,
    packets: u64,
    bytes: u64,
    pps: f64,
    bytes_per_sec: f64,
}

#[derive(Serialize)]
struct StatsReply {
    interval_secs: f64,
    reasons: Vec<ReasonStats>,
}

#[derive(Serialize)]
struct InterfaceStatus {
    name: String,
    xdp_mode: &'static str,
    program_id: u32,
}

#[derive(Serialize, Clone)]
pub(crate) struct MapStatus {
    pub(crate) interface: String,
    pub(crate) map: &'static str,
    pub(crate) entries: usize,
    pub(crate) capacity: u32,
}

#[derive(Serialize)]
struct StatusReply {
    version: &'static str,
    uptime_secs: u64,
    config: Option<PathBuf>,
    pin_dir: PathBuf,
    state_dir: PathBuf,
    interfaces: Vec<InterfaceStatus>,
    maps: Vec<MapStatus>,
    list_entries: BTreeMap<String, usize>,
    /// Running `trace` sessions: prefix and seconds left.
    traces: Vec<serde_json::Value>,
}

/// A limiter key's source as an address, or as a prefix where the rule aggregates sources
/// (IPv4 is kept as ::ffff:a.b.c.d).
fn limiter_source(key: &LimiterKey, by: crate::config::SourceKey) -> String {
    let v6 = std::net::Ipv6Addr::from(key.addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if by.v4 < 32 => format!("{v4}/{}", by.v4),
        Some(v4) => v4.to_string(),
        None if by.v6 < 128 => format!("{v6}/{}", by.v6),
        None => v6.to_string(),
    }
}

impl Controller {
    pub(crate) fn handle(&mut self, request: Request) -> Response {
        let result = match request {
            Request::Add {
                list,
                cidr,
                ttl_secs,
                reason,
            } => self.add(list, &cidr, ttl_secs, reason),
            Request::Del { list, cidr } => self.del(list, &cidr),
            Request::List { list } => {
                Ok(serde_json::to_value(self.registry.list(list)).unwrap_or_default())
            }
            Request::Feeds {} => Ok(serde_json::to_value(self.feeds_status()).unwrap_or_default()),
            Request::FeedsRefresh { .. } | Request::Top { .. } => {
                Err(anyhow::anyhow!("answered asynchronously"))
            }
            Request::Explain {
                address,
                protocol,
                port,
                syn,
            } => self.explain(
                &address,
                crate::explain::Probe {
                    protocol,
                    port,
                    syn,
                },
            ),
            Request::Trace { cidr, secs, max } => self.start_trace(&cidr, secs, max),
            Request::TraceStop { session } => self.stop_trace(session),
            Request::Stats {} => self.stats(),
            Request::Status {} => self.status(),
            Request::Reload {} => self
                .reload()
                .map(|()| serde_json::json!({"reloaded": true})),
        };
        match result {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(format!("{e:#}")),
        }
    }

    pub(crate) fn add(
        &mut self,
        list: ListKind,
        cidr: &str,
        ttl_secs: Option<u64>,
        reason: Option<String>,
    ) -> Result<serde_json::Value> {
        let parsed = parse_prefix(cidr)?;
        if let Some(ttl) = ttl_secs
            && !(1..=MAX_TTL_SECS).contains(&ttl)
        {
            bail!("invalid TTL {ttl} s: expected 1 s to 10 years");
        }
        if let Some(r) = &reason
            && (r.chars().count() > MAX_REASON_CHARS || r.chars().any(char::is_control))
        {
            bail!("invalid reason: at most {MAX_REASON_CHARS} characters, no control characters");
        }
        let net = parsed.net;
        // Rounded up: an entry may outlive its TTL by under a second, never fall short of it.
        let expires_at = ttl_secs.map(|t| unix_now() + t + 1);
        let claim = Claim {
            origin: Origin::Cli,
            reason: reason.clone(),
            expires_at,
        };
        let (new, folded) = self.change_lists(|registry| Ok(registry.add(list, net, claim)))?;
        log::info!(
            "{} add {net} by cli{}{}",
            list.name(),
            reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            ttl_secs.map(|t| format!(" for {t} s")).unwrap_or_default()
        );
        let mut reply =
            serde_json::json!({"list": list, "cidr": net, "new": new, "expires_at": expires_at});
        if parsed.had_host_bits {
            reply["note"] = format!("host bits cleared: {cidr} is {net}").into();
        }
        if list == ListKind::Block && folded.shadowed.contains(&net) {
            reply["note"] = "listed, but inside an allowlisted prefix: the allowlist wins".into();
        }
        if let Some(w) = self.persist() {
            reply["warning"] = w.into();
        }
        Ok(reply)
    }

    pub(crate) fn del(&mut self, list: ListKind, cidr: &str) -> Result<serde_json::Value> {
        let net = parse_prefix(cidr)?.net;
        // An operator may release a penalty box early; config and feed entries stay.
        let boxed = self.registry.has_claim(list, net, &Origin::Penalty);
        let (left, _) = self.change_lists(|registry| {
            Ok(match registry.remove(list, net, &Origin::Cli) {
                Ok(_) if boxed => registry.remove(list, net, &Origin::Penalty)?,
                Ok(left) => left,
                Err(_) if boxed => registry.remove(list, net, &Origin::Penalty)?,
                Err(e) => return Err(e.into()),
            })
        })?;
        log::info!("{} del {net} by cli", list.name());
        if boxed {
            self.release_penalty(net);
        }
        let mut reply = serde_json::json!({"list": list, "cidr": net, "still_listed_by": left.iter().map(ToString::to_string).collect::<Vec<_>>()});
        if let Some(w) = self.persist() {
            reply["warning"] = w.into();
        }
        Ok(reply)
    }

    pub(crate) fn stats(&mut self) -> Result<serde_json::Value> {
        let now_totals = totals(&self.instances)?;
        let secs = self.last_stats.0.elapsed().as_secs_f64().max(1e-3);
        let reasons = Reason::ALL
            .iter()
            .map(|r| {
                let (c, prev) = (
                    now_totals[r],
                    self.last_stats.1.get(r).copied().unwrap_or_default(),
                );
                ReasonStats {
                    reason: r.name(),
                    packets: c.packets,
                    bytes: c.bytes,
                    pps: c.packets.saturating_sub(prev.packets) as f64 / secs,
                    bytes_per_sec: c.bytes.saturating_sub(prev.bytes) as f64 / secs,
                }
            })
            .collect();
        self.last_stats = (Instant::now(), now_totals);
        Ok(serde_json::to_value(StatsReply {
            interval_secs: secs,
            reasons,
        })?)
    }

    pub(crate) fn status(&mut self) -> Result<serde_json::Value> {
        // Operators want the exact fill, not the metrics' cached one.
        let maps = self.count_map_fill()?;
        let reply = StatusReply {
            version: env!("CARGO_PKG_VERSION"),
            uptime_secs: self.started.elapsed().as_secs(),
            config: self.config_path.clone(),
            pin_dir: self.config.pin_dir.clone(),
            state_dir: self.config.state_dir.clone(),
            interfaces: self
                .instances
                .iter()
                .map(|i| InterfaceStatus {
                    name: i.interface.clone(),
                    xdp_mode: i.mode.name(),
                    program_id: i.program_id,
                })
                .collect(),
            maps,
            list_entries: self
                .registry
                .counts()
                .into_iter()
                .map(|((list, origin), n)| (format!("{}:{origin}", list.name()), n))
                .collect(),
            traces: self.trace_status(),
        };
        Ok(serde_json::to_value(reply)?)
    }

    /// Map fill for metrics: counted at most every MAP_FILL_MAX_AGE (a walk of each map).
    pub(crate) fn map_fill(&mut self) -> Result<Vec<MapStatus>> {
        if let Some((at, fill)) = &self.map_fill_cache
            && at.elapsed() < MAP_FILL_MAX_AGE
        {
            return Ok(fill.clone());
        }
        self.count_map_fill()
    }

    /// Counts every map's entries now (and refreshes the metrics' copy).
    pub(crate) fn count_map_fill(&mut self) -> Result<Vec<MapStatus>> {
        let mut maps = Vec::new();
        for inst in &self.instances {
            for (map, entries, capacity) in inst.shield.map_fill()? {
                maps.push(MapStatus {
                    interface: inst.interface.clone(),
                    map,
                    entries,
                    capacity,
                });
            }
        }
        self.map_fill_cache = Some((Instant::now(), maps.clone()));
        Ok(maps)
    }

    pub(crate) fn limiter_snapshot(
        &self,
    ) -> Result<std::collections::HashMap<(usize, LimiterKey), LimiterState>> {
        let mut out = std::collections::HashMap::new();
        for (i, inst) in self.instances.iter().enumerate() {
            for (key, state) in inst.shield.limiter_entries()? {
                out.insert((i, key), state);
            }
        }
        Ok(out)
    }

    /// `top`: a first snapshot now, the second after TOP_WINDOW (the controller keeps
    /// serving meanwhile), rates from the difference.
    pub(crate) fn start_top(
        &mut self,
        n: usize,
        reply: oneshot::Sender<Response>,
        ready: mpsc::Sender<PendingTop>,
    ) {
        if !(1..=10_000).contains(&n) {
            let _ = reply.send(Response::err(format!(
                "invalid count {n}: expected 1 to 10000"
            )));
            return;
        }
        let first = match self.limiter_snapshot() {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Response::err(format!("{e:#}")));
                return;
            }
        };
        let pending = PendingTop {
            first,
            at: Instant::now(),
            n,
            reply,
        };
        tokio::spawn(async move {
            tokio::time::sleep(TOP_WINDOW).await;
            let _ = ready.send(pending).await;
        });
    }

    pub(crate) fn finish_top(&mut self, pending: PendingTop) {
        let second = match self.limiter_snapshot() {
            Ok(s) => s,
            Err(e) => {
                let _ = pending.reply.send(Response::err(format!("{e:#}")));
                return;
            }
        };
        let secs = pending.at.elapsed().as_secs_f64().max(1e-3);
        let mut entries: Vec<TopEntry> = second
            .iter()
            .filter_map(|((i, key), now)| {
                let before = pending.first.get(&(*i, *key)).copied().unwrap_or_default();
                let packets = now.packets.saturating_sub(before.packets);
                (packets > 0).then(|| TopEntry {
                    source: limiter_source(key, self.config.limits.slot_key(key.limit)),
                    interface: self.instances[*i].interface.clone(),
                    rule: self.config.limits.slot_name(key.limit),
                    pps: packets as f64 / secs,
                    bytes_per_sec: now.bytes.saturating_sub(before.bytes) as f64 / secs,
                    drops_per_sec: now.drops.saturating_sub(before.drops) as f64 / secs,
                    drops: now.drops,
                })
            })
            .collect();
        entries.sort_by(|a, b| b.pps.total_cmp(&a.pps));
        entries.truncate(pending.n);
        let _ = pending.reply.send(Response::ok(entries));
    }
}
