//! `api-shield run`: load, fill, attach, log counters, detach on SIGINT/SIGTERM.

use std::{collections::HashMap, time::Instant};

use anyhow::{Context as _, Result};
use api_shield_common::counters::{Counter, Reason};
use tokio::signal::unix::{SignalKind, signal};

use crate::{config::Config, shield::Shield};

pub async fn run(config: Config) -> Result<()> {
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
