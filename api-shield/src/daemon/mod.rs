//! `api-shield run`: the controller. Loads one program instance per interface with its maps
//! and link pinned (so protection outlives the daemon and a restart has no gap), keeps the
//! lists in step with the config and the CLI, expires TTLs, serves the admin socket,
//! reloads on SIGHUP, and exits on SIGINT/SIGTERM leaving the program enforcing.
//!
//! This module is the event loop and the state it owns ([`Controller`]); each kind of event
//! is handled in a module of its own: admin requests, feeds, penalties, reload, and list
//! changes (one route for all of them). Metrics are rendered in `crate::metrics`.

mod admin;
mod explain;

pub(crate) use self::admin::MapStatus;
mod feeds;
mod lists;
mod penalties;
mod reload;
mod start;
mod trace;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use api_shield_common::counters::{Counter, Reason};
use api_shield_common::rules::PenaltyEvent;
use ipnet::IpNet;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use self::{
    admin::PendingTop,
    feeds::PendingRefresh,
    start::{StartGuard, ensure_bpffs, interface_exists, save_verifier_log},
};
use crate::{
    api::{self, Access, Call, Request},
    config::Config,
    events::{self, Delivered, SlotNames, new_delivered},
    feeds::{Feed, fetch::Outcome},
    lists::{Registry, StateDir, unix_now, until_next_whole_second},
    metrics::{self, Scrape},
    penalty::{self, Offences},
    shield::{AttachedMode, Shield, kernel},
};

/// Paths the command line may override (the demo and tests use their own).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub socket: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pin_dir: Option<PathBuf>,
}

impl Overrides {
    pub fn apply(&self, config: &mut Config) {
        if let Some(s) = &self.socket {
            config.admin.socket.clone_from(s);
        }
        if let Some(s) = &self.state_dir {
            config.state_dir.clone_from(s);
        }
        if let Some(p) = &self.pin_dir {
            config.pin_dir.clone_from(p);
        }
    }
}

/// One interface's program instance.
pub(crate) struct Instance {
    pub(crate) interface: String,
    pub(crate) mode: AttachedMode,
    pub(crate) program_id: u32,
    pub(crate) shield: Shield,
    /// Drop events read from this instance's ring, per reason.
    pub(crate) delivered: Delivered,
}

pub(crate) struct Controller {
    pub(crate) config: Config,
    pub(crate) config_path: Option<PathBuf>,
    pub(crate) overrides: Overrides,
    pub(crate) instances: Vec<Instance>,
    pub(crate) registry: Registry,
    pub(crate) state: StateDir,
    pub(crate) started: Instant,
    /// Counter totals at the last `stats` call, for rates since then.
    pub(crate) last_stats: (Instant, BTreeMap<Reason, Counter>),
    pub(crate) feeds: BTreeMap<String, Feed>,
    pub(crate) http: reqwest::Client,
    pub(crate) feed_results: mpsc::Sender<(String, Outcome)>,
    /// `feeds refresh` calls waiting for their fetches to finish.
    pub(crate) pending_refreshes: Vec<PendingRefresh>,
    /// List entries the full maps refused at the last update (retried on every update).
    pub(crate) refused: Vec<IpNet>,
    /// Map updates that failed, per map (a refused entry counts at every retry).
    pub(crate) update_failures: BTreeMap<&'static str, u64>,
    /// Map fill is costly to count (a walk of each map): reused for a few seconds.
    pub(crate) map_fill_cache: Option<(Instant, Vec<MapStatus>)>,
    /// Rule names by limit slot, shared with the event readers.
    pub(crate) slot_names: SlotNames,
    /// Earlier penalty boxes per prefix, for escalation.
    pub(crate) offences: Offences,
    /// Prefixes boxed by this daemon, per limit slot name.
    pub(crate) penalties: BTreeMap<String, u64>,
    /// The highest eviction count reported, so the counter never goes back.
    pub(crate) limiter_evictions: u64,
    /// Running `trace` sessions, by their slot in the data plane's trace filter.
    pub(crate) traces: self::trace::TraceSessions,
}

pub async fn run(config: Config, config_path: Option<PathBuf>, overrides: Overrides) -> Result<()> {
    // Handlers first: a signal during start-up waits for the loop instead of killing us
    // (SIGHUP's default action) half-way through attaching.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut config = config;
    overrides.apply(&mut config);
    ensure_bpffs(&config.pin_dir)?;
    kernel::check_features()?;
    for iface in &config.interfaces {
        if !interface_exists(&iface.name.0) {
            bail!("interface {} does not exist", iface.name);
        }
    }
    // The socket first: a second daemon on the same paths stops here, before touching maps.
    let access = Access::new(config.admin.group.as_deref())?;
    let listener = api::bind(&config.admin.socket, &access)?;
    // From here a failed start removes what it made: the socket, and the pins of every
    // interface that had none (an earlier daemon's go on enforcing).
    let mut start = StartGuard::new(&config.pin_dir, &config.admin.socket);
    let state = StateDir::open(&config.state_dir)?;
    let mut registry = Registry::default();
    registry.set_config(&config.allowlist, &config.blocklist);
    let restored = state
        .load_entries(&mut registry, unix_now())
        .context("restoring CLI entries from the state directory")?;
    // Each feed's last good version is in force from the start, whether or not its
    // source is reachable now.
    let mut feeds = BTreeMap::new();
    for feed_config in &config.feeds {
        let mut feed = Feed::new(feed_config.clone());
        match feed.load_good(&state) {
            Ok(Some(entries)) => {
                log::info!(
                    "feed {}: {} entries from its last good version",
                    feed_config.name.0,
                    entries.len()
                );
                registry.set_feed(&feed_config.name.0, entries);
            }
            Ok(None) => {}
            Err(e) => log::error!(
                "feed {}: its saved version is unusable, ignoring it: {e:#}",
                feed_config.name.0
            ),
        }
        feeds.insert(feed_config.name.0.clone(), feed);
    }
    let folded = registry.fold();

    let mut instances = Vec::new();
    for iface in &config.interfaces {
        let dir = config.pin_dir.join(&iface.name.0);
        start.pins_of(&dir);
        let mut shield = Shield::load_pinned(&config.capacity, &dir)
            .map_err(|e| save_verifier_log(e, state.path()))
            .with_context(|| format!("loading the program for {}", iface.name))?;
        // Maps are in step before the program sees a packet (or, on a restart, before the
        // new program takes over the link from the old one).
        shield.apply_settings(&config)?;
        let refused = shield.apply_lists(&folded.table)?;
        if !refused.is_empty() {
            log::error!(
                "{}: {} list entries refused, the list maps are full (raise capacity)",
                iface.name,
                refused.len()
            );
        }
        let (mode, reused) = shield
            .attach_pinned(&iface.name.0, iface.mode)
            .with_context(|| format!("attaching to interface {}", iface.name))?;
        let program_id = shield.program_id()?;
        log::info!(
            "attached to {} in {} (program id {program_id}{})",
            iface.name,
            mode.describe(),
            match (reused, mode) {
                (false, _) => "",
                (true, AttachedMode::TcNetlink) =>
                    "; replaced the previous daemon's cls_bpf filter in place, without a gap",
                (true, _) => "; took over the pinned link from the previous daemon without a gap",
            }
        );
        instances.push(Instance {
            interface: iface.name.0.clone(),
            mode,
            program_id,
            shield,
            delivered: new_delivered(),
        });
    }
    let (v4, v6) = folded.table.counts();
    if config.dry_run {
        log::warn!(
            "dry run: nothing is dropped; would-be drops are counted and logged as would_drop"
        );
    }
    for rule in &config.limits.rules {
        log::info!(
            "rule {}: {} pps / burst {}, {} B/s / burst {}, key {}{}",
            rule.name,
            rule.limit.pps,
            rule.limit.burst_packets,
            rule.limit.bps,
            rule.limit.burst_bytes,
            rule.policy.key,
            if rule.policy.dry_run { ", dry run" } else { "" }
        );
    }
    log::info!(
        "enforcing {} list prefixes ({v4} IPv4, {v6} IPv6; {restored} restored from {}), default limit {} pps / burst {}, {} B/s / burst {}",
        v4 + v6,
        state.path().display(),
        config.limits.default.pps,
        config.limits.default.burst_packets,
        config.limits.default.bps,
        config.limits.default.burst_bytes,
    );

    let first_totals = totals(&instances)?;
    let offences = Offences::load(&state).unwrap_or_else(|e| {
        log::error!("penalty history unusable, starting a new one: {e:#}");
        Offences::default()
    });
    let (feed_results, mut feed_outcomes) = mpsc::channel::<(String, Outcome)>(16);
    let http = reqwest::Client::builder()
        .user_agent(concat!("api-shield/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .build()
        .context("creating the HTTP client for feeds")?;
    let mut ctl = Controller {
        config,
        config_path,
        overrides,
        instances,
        registry,
        state,
        started: Instant::now(),
        last_stats: (Instant::now(), first_totals.clone()),
        feeds,
        http,
        feed_results,
        pending_refreshes: Vec::new(),
        refused: Vec::new(),
        update_failures: BTreeMap::new(),
        map_fill_cache: None,
        slot_names: SlotNames::default(),
        offences,
        penalties: BTreeMap::new(),
        limiter_evictions: 0,
        traces: [None; api_shield_common::trace::TRACE_NETS],
    };
    *ctl.slot_names.write().expect("slot names lock") = ctl.config.limits.slot_names();
    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let (top_tx, mut top_ready) = mpsc::channel::<PendingTop>(8);
    // Trace records, parsed from every interface's log ring, for the sessions to pick from.
    let (trace_hub, _) = tokio::sync::broadcast::channel(4096);
    let server = tokio::spawn(api::serve(
        listener,
        access,
        calls_tx,
        api::Streams {
            trace_hub: trace_hub.clone(),
            slot_names: ctl.slot_names.clone(),
        },
    ));
    let (scrape_tx, mut scrapes) = mpsc::channel::<Scrape>(8);
    let metrics_server = match ctl.config.metrics.listen.0 {
        Some(addr) => {
            let listener = metrics::bind(addr).await?;
            log::info!("metrics at http://{addr}/metrics");
            Some(tokio::spawn(metrics::serve(listener, scrape_tx)))
        }
        None => None,
    };
    let mut event_readers = Vec::new();
    let (penalty_tx, mut penalty_reports) = mpsc::channel::<(String, PenaltyEvent)>(4096);
    for inst in &mut ctl.instances {
        let ring = inst.shield.take_events()?;
        event_readers.push(tokio::spawn(events::read(
            inst.interface.clone(),
            ring,
            ctl.config.events.format,
            inst.delivered.clone(),
            ctl.slot_names.clone(),
        )));
        let ring = inst.shield.take_penalties()?;
        event_readers.push(tokio::spawn(penalty::read(
            inst.interface.clone(),
            ring,
            penalty_tx.clone(),
        )));
        event_readers.push(self::trace::spawn_log_reader(
            &inst.interface,
            &mut inst.shield,
            trace_hub.clone(),
        )?);
    }
    start.succeeded();
    // Everything that needed more than CAP_BPF is done: programs loaded and attached, pins
    // made, sockets bound, ring buffers mapped.
    match crate::privileges::drop_to_bpf_only() {
        Ok(kept) => log::info!("dropped every capability but {kept}"),
        Err(e) => log::warn!("could not drop capabilities, running with all of them: {e:#}"),
    }
    log::info!("ready: admin socket {}", ctl.config.admin.socket.display());

    let mut stats_log = StatsLog {
        last: first_totals,
        at: Instant::now(),
    };
    let stats_period = if ctl.config.stats_interval.is_zero() {
        Duration::from_secs(3600)
    } else {
        ctl.config.stats_interval
    };
    let mut stats_tick = tokio::time::interval(stats_period);
    stats_tick.tick().await;
    // TTLs end at whole seconds of the wall clock: checked just after each one, an entry
    // leaves on time, not up to a second late as on a tick of its own phase. The deadline
    // outlives each pass of the loop, so busy branches cannot postpone it.
    let mut expiry_due = next_expiry_check();
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM"); break; }
            _ = sighup.recv() => { let _ = ctl.reload(); }
            Some((request, reply)) = calls.recv() => match request {
                // Answered once the fetches are done.
                                Request::FeedsRefresh { name } => ctl.refresh_feeds(name, reply),
                Request::Top { n } => ctl.start_top(n, reply, top_tx.clone()),
                request => {
                    let response = ctl.handle(request);
                    let _ = reply.send(response);
                }
            },
            Some((name, outcome)) = feed_outcomes.recv() => ctl.feed_outcome(&name, outcome),
                        Some(reply) = scrapes.recv() => { let _ = reply.send(ctl.render_metrics()); }
                        Some(pending) = top_ready.recv() => ctl.finish_top(pending),
            Some(first) = penalty_reports.recv() => {
                // Whatever else is queued goes in the same list update.
                let mut batch = vec![first];
                while batch.len() < 10_000 && let Ok(more) = penalty_reports.try_recv() {
                    batch.push(more);
                }
                ctl.penalize(batch);
            }
            _ = tokio::time::sleep_until(expiry_due) => {
                expiry_due = next_expiry_check();
                ctl.expire();
                ctl.expire_traces();
                ctl.start_due_feeds();
            }
            _ = stats_tick.tick(), if !ctl.config.stats_interval.is_zero() => {
                match stats_log.line(&ctl.instances) {
                    Ok(line) => log::info!("{line}"),
                    Err(e) => log::warn!("reading counters: {e:#}"),
                }
            }
        }
    }
    server.abort();
    ctl.end_traces();
    for reader in event_readers {
        reader.abort();
    }
    if let Some(m) = metrics_server {
        m.abort();
    }
    let _ = std::fs::remove_file(&ctl.config.admin.socket);
    log::info!("{}", stats_log.line(&ctl.instances).unwrap_or_default());
    if let Err(e) = ctl.state.save_entries(&ctl.registry) {
        log::error!("saving state: {e:#}");
    }
    log::info!(
        "exiting; the program stays attached and enforcing (pinned under {}); `api-shield detach` removes it",
        ctl.config.pin_dir.display()
    );
    Ok(())
}

/// When to look for expired entries next: just after the wall clock's next whole second
/// (a few ms after, so the second has surely begun).
fn next_expiry_check() -> tokio::time::Instant {
    tokio::time::Instant::now() + until_next_whole_second() + Duration::from_millis(5)
}

fn totals(instances: &[Instance]) -> Result<BTreeMap<Reason, Counter>> {
    let mut out: BTreeMap<Reason, Counter> = Reason::ALL
        .iter()
        .map(|r| (*r, Counter::default()))
        .collect();
    for inst in instances {
        for (reason, c) in inst.shield.counters()? {
            let t = out.entry(reason).or_default();
            t.packets += c.packets;
            t.bytes += c.bytes;
        }
    }
    Ok(out)
}

/// Formats counter totals and rates since the previous line.
struct StatsLog {
    last: BTreeMap<Reason, Counter>,
    at: Instant,
}

impl StatsLog {
    fn line(&mut self, instances: &[Instance]) -> Result<String> {
        let now = Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let current = totals(instances)?;
        let parts: Vec<String> = current
            .iter()
            .map(|(reason, c)| {
                let prev = self.last.get(reason).copied().unwrap_or_default();
                format!(
                    "{} {} pkts {} B ({:.0} pps)",
                    reason.name(),
                    c.packets,
                    c.bytes,
                    c.packets.saturating_sub(prev.packets) as f64 / secs
                )
            })
            .collect();
        self.last = current;
        self.at = now;
        Ok(format!("counters: {}", parts.join(", ")))
    }
}
