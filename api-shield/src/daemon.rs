//! `api-shield run`: the controller. Loads one program instance per interface with its maps
//! and link pinned (so protection outlives the daemon and a restart has no gap), keeps the
//! lists in step with the config and the CLI, expires TTLs, serves the admin socket,
//! reloads on SIGHUP, and exits on SIGINT/SIGTERM leaving the program enforcing.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use api_shield_common::limiter::{LimiterKey, LimiterState};
use api_shield_common::rules::PenaltyEvent;
use api_shield_common::{
    counters::{Counter, Reason},
    names,
};
use ipnet::IpNet;
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::{mpsc, oneshot},
};

use crate::{
    api::{self, Access, Call, Request, Response},
    config::Config,
    events::{self, Delivered, SlotNames, new_delivered},
    feeds::{
        Feed, FeedStatus,
        fetch::{self, Outcome},
    },
    lists::{
        Claim, Folded, ListKind, Origin, Registry, StateDir, unix_now, until_next_whole_second,
    },
    metrics::{self, Exposition, Scrape},
    penalty::{self, Offences},
    prefix::parse_prefix,
    shield::{AttachedMode, Shield, kernel},
};

/// The longest TTL accepted: ten years.
const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// The longest reason accepted.
const MAX_REASON_CHARS: usize = 256;

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
struct Instance {
    interface: String,
    mode: AttachedMode,
    program_id: u32,
    shield: Shield,
    /// Drop events read from this instance's ring, per reason.
    delivered: Delivered,
}

struct Controller {
    config: Config,
    config_path: Option<PathBuf>,
    overrides: Overrides,
    instances: Vec<Instance>,
    registry: Registry,
    state: StateDir,
    started: Instant,
    /// Counter totals at the last `stats` call, for rates since then.
    last_stats: (Instant, BTreeMap<Reason, Counter>),
    feeds: BTreeMap<String, Feed>,
    http: reqwest::Client,
    feed_results: mpsc::Sender<(String, Outcome)>,
    /// `feeds refresh` calls waiting for their fetches to finish.
    pending_refreshes: Vec<PendingRefresh>,
    /// List entries the full maps refused at the last update (retried on every update).
    refused: Vec<IpNet>,
    /// Map updates that failed, per map (a refused entry counts at every retry).
    update_failures: BTreeMap<&'static str, u64>,
    /// Map fill is costly to count (a walk of each map): reused for a few seconds.
    map_fill_cache: Option<(Instant, Vec<MapStatus>)>,
    /// Rule names by limit slot, shared with the event readers.
    slot_names: SlotNames,
    /// Earlier penalty boxes per prefix, for escalation.
    offences: Offences,
    /// Prefixes boxed by this daemon, per limit slot name.
    penalties: BTreeMap<String, u64>,
    /// The highest eviction count reported, so the counter never goes back.
    limiter_evictions: u64,
}

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

struct PendingRefresh {
    waiting_for: BTreeSet<String>,
    results: BTreeMap<String, String>,
    reply: oneshot::Sender<Response>,
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
    };
    *ctl.slot_names.write().expect("slot names lock") = ctl.config.limits.slot_names();
    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let (top_tx, mut top_ready) = mpsc::channel::<PendingTop>(8);
    let server = tokio::spawn(api::serve(listener, access, calls_tx));
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

fn interface_exists(name: &str) -> bool {
    std::ffi::CString::new(name)
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        .is_ok_and(|c| unsafe { libc::if_nametoindex(c.as_ptr()) } != 0)
}

/// Writes the whole verifier log of a refused program to the state directory, so the
/// error can name it; other errors pass through.
fn save_verifier_log(mut e: anyhow::Error, dir: &std::path::Path) -> anyhow::Error {
    if let Some(refused) = e.downcast_mut::<kernel::ProgramRefused>()
        && let Err(io) = refused.save(dir)
    {
        log::warn!("could not save the verifier log in {}: {io}", dir.display());
    }
    e
}

/// Undoes a start that fails: removes the admin socket and the pin directories (maps,
/// links, TC filter) this start created. Pins found from an earlier daemon stay: their
/// program goes on enforcing.
struct StartGuard {
    root: PathBuf,
    root_existed: bool,
    socket: PathBuf,
    created: Vec<PathBuf>,
    done: bool,
}

impl StartGuard {
    fn new(root: &std::path::Path, socket: &std::path::Path) -> StartGuard {
        StartGuard {
            root: root.to_owned(),
            root_existed: root.exists(),
            socket: socket.to_owned(),
            created: Vec::new(),
            done: false,
        }
    }

    /// Notes an interface's pin directory before anything is pinned there.
    fn pins_of(&mut self, dir: &std::path::Path) {
        if !dir.exists() {
            self.created.push(dir.to_owned());
        }
    }

    fn succeeded(&mut self) {
        self.done = true;
    }
}

impl Drop for StartGuard {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let _ = std::fs::remove_file(&self.socket);
        for dir in &self.created {
            match crate::shield::detach_pinned(dir) {
                Ok(removed) if !removed.is_empty() => log::info!(
                    "start failed: removed what it made in {} ({})",
                    dir.display(),
                    removed.join(", ")
                ),
                Ok(_) => {}
                Err(e) => log::error!(
                    "start failed, and removing {} failed too: {e:#}",
                    dir.display()
                ),
            }
        }
        if !self.root_existed {
            // Only if empty: another interface's pins may be there.
            let _ = std::fs::remove_dir(&self.root);
        }
    }
}

/// When to look for expired entries next: just after the wall clock's next whole second
/// (a few ms after, so the second has surely begun).
fn next_expiry_check() -> tokio::time::Instant {
    tokio::time::Instant::now() + until_next_whole_second() + Duration::from_millis(5)
}

/// Pins need a BPF filesystem; mount one at /sys/fs/bpf if the pin directory is below it.
fn ensure_bpffs(pin_dir: &std::path::Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let bpffs = std::path::Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(bpffs) {
        return Ok(());
    }
    let c = std::ffi::CString::new("/sys/fs/bpf")?;
    // SAFETY: statfs into a zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 && st.f_type == BPF_FS_MAGIC {
        return Ok(());
    }
    log::info!("mounting a BPF filesystem at /sys/fs/bpf");
    let (src, fstype) = (
        std::ffi::CString::new("bpf")?,
        std::ffi::CString::new("bpf")?,
    );
    // SAFETY: mount(2) with valid C strings and no data.
    if unsafe {
        libc::mount(
            src.as_ptr(),
            c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    } != 0
    {
        bail!(
            "mounting bpffs at /sys/fs/bpf: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
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

#[derive(Serialize)]
struct ReasonStats {
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
struct MapStatus {
    interface: String,
    map: &'static str,
    entries: usize,
    capacity: u32,
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
}

impl Controller {
    fn handle(&mut self, request: Request) -> Response {
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

    /// Makes every instance's lists match the registry (adds before removes).
    fn sync(&mut self) -> Result<Folded> {
        let folded = self.registry.fold();
        let mut refused = BTreeSet::new();
        for inst in &mut self.instances {
            let refused_here = inst
                .shield
                .apply_lists(&folded.table)
                .with_context(|| format!("updating the lists of {}", inst.interface))?;
            refused.extend(refused_here);
        }
        if refused.len() != self.refused.len() && !refused.is_empty() {
            log::error!(
                "{} list entries refused: the list maps are full (raise capacity); retried on every update",
                refused.len()
            );
        }
        self.refused = refused.into_iter().collect();
        for net in &self.refused {
            let map = if matches!(net, IpNet::V4(_)) {
                names::MAP_LIST_V4
            } else {
                names::MAP_LIST_V6
            };
            *self.update_failures.entry(map).or_insert(0) += 1;
        }
        // What each feed lost to the allowlist and to full maps, for `feeds` and metrics.
        for (name, feed) in &mut self.feeds {
            let set = self.registry.feed(name);
            let count =
                |nets: &[IpNet]| set.map_or(0, |s| nets.iter().filter(|n| s.contains(n)).count());
            feed.status.allowlisted = count(&folded.shadowed);
            feed.status.refused_map_full = count(&self.refused);
        }
        Ok(folded)
    }

    /// Starts a fetch for every feed whose refresh is due and that has none running.
    fn start_due_feeds(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .feeds
            .iter()
            .filter(|(_, f)| !f.in_flight && f.next_refresh <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            self.start_fetch(&name);
        }
    }

    fn start_fetch(&mut self, name: &str) {
        let Some(feed) = self.feeds.get_mut(name) else {
            return;
        };
        if feed.in_flight {
            return;
        }
        feed.in_flight = true;
        let job = feed.job();
        let (client, results, name) = (
            self.http.clone(),
            self.feed_results.clone(),
            name.to_owned(),
        );
        tokio::spawn(async move {
            let outcome = fetch::run(&client, &job).await;
            let _ = results.send((name, outcome)).await;
        });
    }

    /// `feeds refresh [NAME]`: fetch now, answer when done.
    fn refresh_feeds(&mut self, name: Option<String>, reply: oneshot::Sender<Response>) {
        let targets: BTreeSet<String> = match name {
            Some(n) if !self.feeds.contains_key(&n) => {
                let _ = reply.send(Response::err(format!(
                    "no feed named `{n}` (see `api-shield feeds`)"
                )));
                return;
            }
            Some(n) => [n].into(),
            None => self.feeds.keys().cloned().collect(),
        };
        if targets.is_empty() {
            let _ = reply.send(Response::err("no feeds are configured"));
            return;
        }
        for t in &targets {
            self.start_fetch(t);
        }
        self.pending_refreshes.push(PendingRefresh {
            waiting_for: targets,
            results: BTreeMap::new(),
            reply,
        });
    }

    /// Applies a fetch's outcome: a good version replaces the one in force as a diff
    /// (adds before removes); anything else changes nothing.
    fn feed_outcome(&mut self, name: &str, outcome: Outcome) {
        let Some(feed) = self.feeds.get_mut(name) else {
            return;
        };
        let summary = match outcome {
            Outcome::NotModified => {
                feed.not_modified();
                log::info!(
                    "feed {name}: not modified; {} entries stay in force",
                    feed.status.entries
                );
                format!("not modified, {} entries in force", feed.status.entries)
            }
            Outcome::Failed(error) => {
                let kept = feed.status.entries;
                feed.failed(error.clone());
                log::warn!(
                    "feed {name}: fetch failed, the last good version ({kept} entries) stays in force: {error}"
                );
                format!("failed: {error}; the last good version ({kept} entries) stays in force")
            }
            Outcome::Good(good) => {
                feed.succeeded(&good);
                let entries = good.entries.clone();
                let before = self.registry.clone();
                let change = self.registry.set_feed(name, good.entries);
                match self.sync() {
                    Ok(_) => {
                        let feed = &self.feeds[name];
                        if let Err(e) = feed.save_good(&self.state, &entries) {
                            log::error!("feed {name}: saving the last good version: {e:#}");
                        }
                        let s = &feed.status;
                        let line = format!(
                            "{} entries in force (+{} -{}), {} lines rejected, {} host bits cleared, {} allowlisted (not blocked), {} refused (map full)",
                            s.entries,
                            change.added,
                            change.removed,
                            s.rejected_lines,
                            s.host_bits_cleared,
                            s.allowlisted,
                            s.refused_map_full
                        );
                        log::info!("feed {name}: {line}");
                        if !s.rejected_examples.is_empty() {
                            log::warn!(
                                "feed {name}: rejected lines, e.g. {}",
                                s.rejected_examples.join(" | ")
                            );
                        }
                        line
                    }
                    Err(e) => {
                        self.registry = before;
                        let _ = self.sync();
                        let feed = self.feeds.get_mut(name).expect("feed exists");
                        feed.failed(format!("applying: {e:#}"));
                        log::error!(
                            "feed {name}: applying the new version failed, the previous one stays: {e:#}"
                        );
                        format!("failed to apply: {e:#}")
                    }
                }
            }
        };
        let mut still_pending = Vec::new();
        for mut p in self.pending_refreshes.drain(..) {
            if p.waiting_for.remove(name) {
                p.results.insert(name.to_owned(), summary.clone());
            }
            if p.waiting_for.is_empty() {
                let failed = p.results.values().any(|r| r.starts_with("failed"));
                let text: Vec<String> =
                    p.results.iter().map(|(n, r)| format!("{n}: {r}")).collect();
                let _ = p.reply.send(if failed {
                    Response::err(text.join("; "))
                } else {
                    Response::ok(text)
                });
            } else {
                still_pending.push(p);
            }
        }
        self.pending_refreshes = still_pending;
    }

    /// Map fill for metrics: counted at most every MAP_FILL_MAX_AGE (a walk of each map).
    fn map_fill(&mut self) -> Result<Vec<MapStatus>> {
        if let Some((at, fill)) = &self.map_fill_cache
            && at.elapsed() < MAP_FILL_MAX_AGE
        {
            return Ok(fill.clone());
        }
        self.count_map_fill()
    }

    /// Counts every map's entries now (and refreshes the metrics' copy).
    fn count_map_fill(&mut self) -> Result<Vec<MapStatus>> {
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

    fn render_metrics(&mut self) -> String {
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

    fn limiter_snapshot(
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
    fn start_top(
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

    fn finish_top(&mut self, pending: PendingTop) {
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

    fn feeds_status(&self) -> Vec<FeedStatus> {
        self.feeds.values().map(Feed::status).collect()
    }

    /// Persists CLI entries; a failure is reported but enforcement goes on.
    fn persist(&self) -> Option<String> {
        self.state.save_entries(&self.registry).err().map(|e| {
            log::error!("state directory: {e:#}");
            format!("enforced, but not saved to the state directory: {e:#}")
        })
    }

    fn add(
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
        let before = self.registry.clone();
        let new = self.registry.add(
            list,
            net,
            Claim {
                origin: Origin::Cli,
                reason: reason.clone(),
                expires_at,
            },
        );
        let folded = match self.sync() {
            Ok(f) => f,
            Err(e) => {
                // Nothing changes on failure: back to the previous lists.
                self.registry = before;
                let _ = self.sync();
                return Err(e);
            }
        };
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

    fn del(&mut self, list: ListKind, cidr: &str) -> Result<serde_json::Value> {
        let net = parse_prefix(cidr)?.net;
        let before = self.registry.clone();
        // An operator may release a penalty box early; config and feed entries stay.
        let boxed = self.registry.has_claim(list, net, &Origin::Penalty);
        let left = match self.registry.remove(list, net, &Origin::Cli) {
            Ok(_) if boxed => self.registry.remove(list, net, &Origin::Penalty)?,
            Ok(left) => left,
            Err(_) if boxed => self.registry.remove(list, net, &Origin::Penalty)?,
            Err(e) => return Err(e.into()),
        };
        if let Err(e) = self.sync() {
            self.registry = before;
            let _ = self.sync();
            return Err(e);
        }
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

    /// Boxes the prefixes the data plane reported, in one list update.
    fn penalize(&mut self, reports: Vec<(String, PenaltyEvent)>) {
        let Some(p) = self.config.limits.penalty else {
            return;
        };
        let now = unix_now();
        let mut boxed = 0;
        for (interface, report) in reports {
            let Some(net) = penalty::reported_prefix(&report) else {
                log::warn!("{interface}: ignoring a malformed penalty report {report:?}");
                continue;
            };
            // A report raced with the box it asks for: the prefix is already boxed.
            if self
                .registry
                .has_claim(ListKind::Block, net, &Origin::Penalty)
            {
                continue;
            }
            let rule = self.config.limits.slot_name(report.limit);
            let (duration, offence) = self.offences.record(net, now, &p);
            let secs = duration.as_secs().max(1);
            self.registry.add(
                ListKind::Block,
                net,
                Claim {
                    origin: Origin::Penalty,
                    reason: Some(format!(
                        "rule {rule}: over {} drops within {}; offence {offence}",
                        p.after_violations.0,
                        humantime::format_duration(p.window.0)
                    )),
                    // Rounded up, as for CLI TTLs.
                    expires_at: Some(now + secs + 1),
                },
            );
            *self.penalties.entry(rule.clone()).or_insert(0) += 1;
            boxed += 1;
            log::warn!(
                "penalty: {net} blocked for {} on {interface} (rule {rule}: over {} drops within {}; offence {offence})",
                humantime::format_duration(Duration::from_secs(secs)),
                p.after_violations.0,
                humantime::format_duration(p.window.0),
            );
        }
        if boxed == 0 {
            return;
        }
        match self.sync() {
            Ok(folded) => {
                for net in folded.shadowed.iter().filter(|n| {
                    self.registry
                        .has_claim(ListKind::Block, **n, &Origin::Penalty)
                }) {
                    log::info!("penalty for {net} not enforced: it lies inside the allowlist");
                }
            }
            Err(e) => log::error!("applying penalty boxes: {e:#}"),
        }
        self.persist();
        self.offences.forget(now, p.forget_after.0);
        if let Err(e) = self.offences.save(&self.state) {
            log::error!("state directory: saving the penalty history: {e:#}");
        }
    }

    /// A penalty box of `net` is gone (expired or deleted): its buckets' next violations
    /// open a new window, so a repeat is boxed again as soon as it passes the threshold
    /// (the data plane reports once per window, and the window that boxed it may run on).
    fn release_penalty(&self, net: IpNet) {
        let buckets: usize = self
            .instances
            .iter()
            .map(|i| i.shield.reset_penalty_windows(&net))
            .sum();
        log::info!(
            "penalty: {net} released; its next violations open a new window ({buckets} buckets)"
        );
    }

    fn expire(&mut self) {
        let gone = self.registry.expire(unix_now());
        if gone.is_empty() {
            return;
        }
        for (list, net, origin) in &gone {
            log::info!("{} entry {net} by {origin} expired", list.name());
            if *origin == Origin::Penalty {
                self.release_penalty(*net);
            }
        }
        if let Err(e) = self.sync() {
            log::error!("applying expiries: {e:#}");
        }
        self.persist();
    }

    fn stats(&mut self) -> Result<serde_json::Value> {
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

    fn status(&mut self) -> Result<serde_json::Value> {
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
        };
        Ok(serde_json::to_value(reply)?)
    }

    /// Reads the config file again; applies it as a diff or changes nothing.
    fn reload(&mut self) -> Result<()> {
        let result = self.try_reload();
        match &result {
            Ok(()) => log::info!("reloaded config"),
            Err(e) => log::error!("reload refused, the previous config stays in force: {e:#}"),
        }
        result
    }

    fn try_reload(&mut self) -> Result<()> {
        let Some(path) = self.config_path.clone() else {
            bail!("running the built-in default config (no --config): nothing to reload");
        };
        let mut next = Config::from_file(&path)
            .with_context(|| format!("invalid config {}", path.display()))?;
        self.overrides.apply(&mut next);
        for (what, changed) in [
            ("capacity", next.capacity != self.config.capacity),
            ("interfaces", next.interfaces != self.config.interfaces),
            ("admin", next.admin != self.config.admin),
            ("state_dir", next.state_dir != self.config.state_dir),
            ("pin_dir", next.pin_dir != self.config.pin_dir),
        ] {
            if changed {
                bail!(
                    "{what} changed: that takes a restart of api-shield (which keeps enforcing meanwhile)"
                );
            }
        }
        let before = self.registry.clone();
        self.registry.set_config(&next.allowlist, &next.blocklist);
        // Feeds no longer configured let go of their entries; new ones start from their
        // last good version (if an earlier run saved one) and are fetched soon.
        self.registry
            .retain_feeds(|name| next.feeds.iter().any(|f| f.name.0 == name));
        let mut new_feeds = Vec::new();
        for fc in &next.feeds {
            if !self.feeds.contains_key(&fc.name.0) {
                let mut feed = Feed::new(fc.clone());
                if let Ok(Some(entries)) = feed.load_good(&self.state) {
                    self.registry.set_feed(&fc.name.0, entries);
                }
                new_feeds.push(feed);
            }
        }
        let applied = self
            .instances
            .iter_mut()
            .try_for_each(|i| i.shield.apply_settings(&next));
        if let Err(e) = applied.and_then(|()| self.sync().map(drop)) {
            self.registry = before;
            let old = self.config.clone();
            let _ = self
                .instances
                .iter_mut()
                .try_for_each(|i| i.shield.apply_settings(&old));
            let _ = self.sync();
            return Err(e);
        }
        for net in self.registry.fold().shadowed {
            log::warn!(
                "blocklist entry {net} lies inside an allowlisted prefix: the allowlist wins"
            );
        }
        self.feeds
            .retain(|name, _| next.feeds.iter().any(|f| &f.name.0 == name));
        for feed in new_feeds {
            self.feeds.insert(feed.config.name.0.clone(), feed);
        }
        // A limit slot that now belongs to another rule starts its counters from zero.
        let (old_names, new_names) = (self.config.limits.slot_names(), next.limits.slot_names());
        for (slot, name) in new_names.iter().enumerate() {
            if old_names.get(slot) != Some(name) {
                for inst in &mut self.instances {
                    if let Err(e) = inst.shield.reset_rule_counter(slot as u32) {
                        log::warn!(
                            "{}: resetting counters of rule {name}: {e:#}",
                            inst.interface
                        );
                    }
                }
            }
        }
        *self.slot_names.write().expect("slot names lock") = new_names;
        for fc in &next.feeds {
            if let Some(feed) = self.feeds.get_mut(&fc.name.0)
                && feed.config != *fc
            {
                // A changed source or format: fetch it anew, unconditionally.
                let source_changed = feed.config.url != fc.url
                    || feed.config.path != fc.path
                    || feed.config.format != fc.format;
                feed.config = fc.clone();
                if source_changed {
                    feed.etag = None;
                    feed.last_modified = None;
                    feed.next_refresh = Instant::now();
                }
            }
        }
        self.config = next;
        Ok(())
    }
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
