//! `api-shield run`: load, fill, attach, log counters, reload on SIGHUP, detach on
//! SIGINT/SIGTERM.

use std::{collections::HashMap, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use api_shield_common::counters::{Counter, Reason};
use tokio::signal::unix::{SignalKind, signal};

use crate::{config::Config, shield::Shield};

/// Runs until SIGINT/SIGTERM. `config_path` is re-read on SIGHUP (None: the built-in
/// default, which has nothing to reload).
pub async fn run(mut config: Config, config_path: Option<PathBuf>) -> Result<()> {
    // Maps are full before the first attach, so the first packet already meets the config.
    let mut shield = Shield::from_config(&config)?;
    let (v4, v6) = shield.lists().counts();
    log::info!(
        "loaded: {} list prefixes ({v4} IPv4, {v6} IPv6), default limit {} pps / burst {}, {} B/s / burst {}",
        v4 + v6,
        config.limits.default.pps,
        config.limits.default.burst_packets,
        config.limits.default.bps,
        config.limits.default.burst_bytes,
    );
    for iface in &config.interfaces {
        let mode = shield
            .attach(&iface.name.0, iface.mode)
            .with_context(|| format!("attaching to interface {}", iface.name))?;
        log::info!("attached to {} in {} XDP mode", iface.name, mode.name());
    }

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let mut stats = StatsLog::new(&shield)?;
    let period = if config.stats_interval.is_zero() {
        std::time::Duration::from_secs(24 * 3600)
    } else {
        config.stats_interval
    };
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = sigint.recv() => { log::info!("SIGINT: detaching"); break; }
            _ = sigterm.recv() => { log::info!("SIGTERM: detaching"); break; }
            _ = sighup.recv() => match reload(&mut shield, &config, config_path.as_deref()) {
                Ok(next) => {
                    log::info!("reloaded config");
                    config = next;
                }
                Err(e) => log::error!("reload refused, the previous config stays in force: {e:#}"),
            },
            _ = tick.tick(), if !config.stats_interval.is_zero() => {
                match stats.line(&shield) {
                    Ok(line) => log::info!("{line}"),
                    Err(e) => log::warn!("reading counters: {e:#}"),
                }
            }
        }
    }
    log::info!("{}", stats.line(&shield).unwrap_or_default());
    shield.detach_all()?;
    log::info!("detached; exiting");
    Ok(())
}

/// Validates the config file again and applies it as a diff; on any error nothing changes.
fn reload(shield: &mut Shield, current: &Config, path: Option<&std::path::Path>) -> Result<Config> {
    let Some(path) = path else {
        anyhow::bail!("running the built-in default config (no --config): nothing to reload");
    };
    let next =
        Config::from_file(path).with_context(|| format!("invalid config {}", path.display()))?;
    if next.capacity != current.capacity {
        anyhow::bail!(
            "capacity changed: map sizes are fixed at load, restart api-shield to apply it"
        );
    }
    if next.interfaces != current.interfaces {
        anyhow::bail!("interfaces changed: restart api-shield to attach to a different set");
    }
    // Lists change adds-before-removes, limits and settings in place: no gap, no bucket reset.
    shield.apply_config(&next)?;
    Ok(next)
}

/// Formats counter totals and rates since the previous line.
struct StatsLog {
    last: HashMap<Reason, Counter>,
    at: Instant,
}

impl StatsLog {
    fn new(shield: &Shield) -> Result<StatsLog> {
        Ok(StatsLog {
            last: shield.counters()?.into_iter().collect(),
            at: Instant::now(),
        })
    }

    fn line(&mut self, shield: &Shield) -> Result<String> {
        let now = Instant::now();
        let secs = now.duration_since(self.at).as_secs_f64().max(1e-3);
        let mut parts = Vec::new();
        for (reason, c) in shield.counters()? {
            let prev = self.last.insert(reason, c).unwrap_or_default();
            parts.push(format!(
                "{} {} pkts {} B ({:.0} pps)",
                reason.name(),
                c.packets,
                c.bytes,
                (c.packets - prev.packets) as f64 / secs
            ));
        }
        self.at = now;
        Ok(format!("counters: {}", parts.join(", ")))
    }
}
