//! `api-shield run`: the controller. Loads one program instance per interface with its maps
//! and link pinned (so protection outlives the daemon and a restart has no gap), keeps the
//! lists in step with the config and the CLI, expires TTLs, serves the admin socket,
//! reloads on SIGHUP, and exits on SIGINT/SIGTERM leaving the program enforcing.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use api_shield_common::counters::{Counter, Reason};
use serde::Serialize;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};

use crate::{
    api::{self, Access, Call, Request, Response},
    config::Config,
    lists::{Folded, fold},
    prefix::parse_prefix,
    registry::{Claim, ListKind, Origin, Registry, StateDir, unix_now},
    shield::{AttachedMode, Shield},
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
}

pub async fn run(config: Config, config_path: Option<PathBuf>, overrides: Overrides) -> Result<()> {
    let mut config = config;
    overrides.apply(&mut config);
    ensure_bpffs(&config.pin_dir)?;
    // The socket first: a second daemon on the same paths stops here, before touching maps.
    let access = Access::new(config.admin.group.as_deref())?;
    let listener = api::bind(&config.admin.socket, &access)?;
    let state = StateDir::open(&config.state_dir)?;
    let mut registry = Registry::default();
    registry.set_config(&config.allowlist, &config.blocklist);
    let restored = state
        .load_entries(&mut registry, unix_now())
        .context("restoring CLI entries from the state directory")?;
    let folded = fold_registry(&registry);

    let mut instances = Vec::new();
    for iface in &config.interfaces {
        let dir = config.pin_dir.join(&iface.name.0);
        let mut shield = Shield::load_pinned(&config.capacity, &dir)
            .with_context(|| format!("loading the program for {}", iface.name))?;
        // Maps are in step before the program sees a packet (or, on a restart, before the
        // new program takes over the link from the old one).
        shield.apply_settings(&config)?;
        shield.apply_lists(&folded.table)?;
        let (mode, reused) = shield
            .attach_pinned(&iface.name.0, iface.mode)
            .with_context(|| format!("attaching to interface {}", iface.name))?;
        let program_id = shield.program_id()?;
        log::info!(
            "attached to {} in {} XDP mode (program id {program_id}{})",
            iface.name,
            mode.name(),
            if reused {
                "; took over the pinned link from the previous daemon without a gap"
            } else {
                ""
            }
        );
        instances.push(Instance {
            interface: iface.name.0.clone(),
            mode,
            program_id,
            shield,
        });
    }
    let (v4, v6) = folded.table.counts();
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
    let mut ctl = Controller {
        config,
        config_path,
        overrides,
        instances,
        registry,
        state,
        started: Instant::now(),
        last_stats: (Instant::now(), first_totals.clone()),
    };
    let (calls_tx, mut calls) = mpsc::channel::<Call>(64);
    let server = tokio::spawn(api::serve(listener, access, calls_tx));
    log::info!("admin socket {}", ctl.config.admin.socket.display());

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
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
    // TTLs are checked every second.
    let mut expiry_tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM"); break; }
            _ = sighup.recv() => { let _ = ctl.reload(); }
            Some((request, reply)) = calls.recv() => {
                let response = ctl.handle(request);
                let _ = reply.send(response);
            }
            _ = expiry_tick.tick() => ctl.expire(),
            _ = stats_tick.tick(), if !ctl.config.stats_interval.is_zero() => {
                match stats_log.line(&ctl.instances) {
                    Ok(line) => log::info!("{line}"),
                    Err(e) => log::warn!("reading counters: {e:#}"),
                }
            }
        }
    }
    server.abort();
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

fn fold_registry(registry: &Registry) -> Folded {
    fold(
        &registry.prefixes(ListKind::Allow),
        &registry.prefixes(ListKind::Block),
    )
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

#[derive(Serialize)]
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
        let folded = fold_registry(&self.registry);
        for inst in &mut self.instances {
            inst.shield
                .apply_lists(&folded.table)
                .with_context(|| format!("updating the lists of {}", inst.interface))?;
        }
        Ok(folded)
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
        let left = self.registry.remove(list, net, &Origin::Cli)?;
        if let Err(e) = self.sync() {
            self.registry = before;
            let _ = self.sync();
            return Err(e);
        }
        log::info!("{} del {net} by cli", list.name());
        let mut reply = serde_json::json!({"list": list, "cidr": net, "still_listed_by": left.iter().map(ToString::to_string).collect::<Vec<_>>()});
        if let Some(w) = self.persist() {
            reply["warning"] = w.into();
        }
        Ok(reply)
    }

    fn expire(&mut self) {
        let gone = self.registry.expire(unix_now());
        if gone.is_empty() {
            return;
        }
        for (list, net, origin) in &gone {
            log::info!("{} entry {net} by {origin} expired", list.name());
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
        for net in fold_registry(&self.registry).shadowed {
            log::warn!(
                "blocklist entry {net} lies inside an allowlisted prefix: the allowlist wins"
            );
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
