//! `trace` sessions: each holds one of the data plane's trace filter slots for its
//! prefix, until it ends (its time, its count, or its client gone); the filter's deadline
//! ends it in the kernel too, should this daemon die first. The records come through
//! aya-log, one reader per interface.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use api_shield_common::trace::TRACE_NETS;
use ipnet::IpNet;
use serde_json::json;
use tokio::io::unix::AsyncFd;

use super::Controller;
use crate::{
    explain::bucket_now,
    prefix::parse_prefix,
    trace::{KERNEL_GRACE_SECS, MAX_TRACE_RECORDS, MAX_TRACE_SECS, TraceHub, TraceLog, filter},
};

/// A running `trace`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TraceSession {
    pub(crate) net: IpNet,
    pub(crate) until: Instant,
    /// The data plane's missed count when the session started.
    missed_at_start: u64,
}

pub(crate) type TraceSessions = [Option<TraceSession>; TRACE_NETS];

impl Controller {
    /// Starts a session tracing `cidr` for `secs`: answers its slot, the prefix and the
    /// limits, or why not.
    pub(crate) fn start_trace(
        &mut self,
        cidr: &str,
        secs: u64,
        max: u64,
    ) -> Result<serde_json::Value> {
        let net = parse_prefix(cidr)?.net;
        if !(1..=MAX_TRACE_SECS).contains(&secs) {
            bail!("invalid duration {secs}s: expected 1s to {MAX_TRACE_SECS}s");
        }
        if !(1..=MAX_TRACE_RECORDS).contains(&max) {
            bail!("invalid count {max}: expected 1 to {MAX_TRACE_RECORDS}");
        }
        let Some(slot) = self.traces.iter().position(Option::is_none) else {
            bail!("{TRACE_NETS} traces are running already; wait for one to end");
        };
        self.traces[slot] = Some(TraceSession {
            net,
            until: Instant::now() + Duration::from_secs(secs),
            missed_at_start: self.trace_missed(),
        });
        if let Err(e) = self.write_trace_filter() {
            self.traces[slot] = None;
            let _ = self.write_trace_filter();
            return Err(e);
        }
        log::info!("trace of {net} started for {secs}s");
        Ok(json!({"session": slot, "cidr": net.to_string(), "secs": secs, "max": max}))
    }

    /// Ends session `slot`: answers how many matching packets the data plane could not
    /// report meanwhile (over the trace rate, or its log ring full).
    pub(crate) fn stop_trace(&mut self, slot: usize) -> Result<serde_json::Value> {
        let Some(session) = self.traces.get_mut(slot).and_then(Option::take) else {
            bail!("no trace session {slot}");
        };
        self.write_trace_filter()?;
        let missed = self.trace_missed().saturating_sub(session.missed_at_start);
        log::info!("trace of {} ended", session.net);
        Ok(json!({"missed": missed}))
    }

    /// Ends sessions past their time whose client never said so (it hung).
    pub(crate) fn expire_traces(&mut self) {
        let now = Instant::now();
        let late = Duration::from_secs(KERNEL_GRACE_SECS);
        let mut changed = false;
        for s in &mut self.traces {
            if s.is_some_and(|t| now > t.until + late) {
                *s = None;
                changed = true;
            }
        }
        if changed && let Err(e) = self.write_trace_filter() {
            log::error!("clearing an ended trace: {e:#}");
        }
    }

    /// Missed trace records, summed over interfaces.
    fn trace_missed(&self) -> u64 {
        self.instances
            .iter()
            .filter_map(|i| i.shield.trace_filter().ok())
            .map(|f| f.missed)
            .sum()
    }

    /// Writes the sessions' prefixes to every interface's filter, with a deadline a little
    /// after the last session's end.
    fn write_trace_filter(&mut self) -> Result<()> {
        let nets = self.traces.map(|s| s.map(|t| t.net));
        let now = Instant::now();
        let last = self
            .traces
            .iter()
            .flatten()
            .map(|t| t.until.saturating_duration_since(now))
            .max()
            .unwrap_or_default();
        let until_ns = (bucket_now() >> api_shield_common::limiter::TIME_SHIFT)
            + (last + Duration::from_secs(KERNEL_GRACE_SECS)).as_nanos() as u64;
        let next = filter(&nets, until_ns);
        for inst in &mut self.instances {
            inst.shield.set_trace(&next)?;
        }
        Ok(())
    }

    /// Ends every session (the daemon is stopping): the program, which stays, traces no
    /// more.
    pub(crate) fn end_traces(&mut self) {
        if self.traces.iter().any(Option::is_some) {
            self.traces = [None; TRACE_NETS];
            if let Err(e) = self.write_trace_filter() {
                log::error!("clearing the trace filter: {e:#}");
            }
        }
    }

    /// The running sessions, for `status`.
    pub(crate) fn trace_status(&self) -> Vec<serde_json::Value> {
        let now = Instant::now();
        self.traces
            .iter()
            .flatten()
            .map(|t| {
                json!({
                    "cidr": t.net.to_string(),
                    "ends_in_secs": t.until.saturating_duration_since(now).as_secs(),
                })
            })
            .collect()
    }
}

/// Reads one interface's aya-log ring until the task is aborted, handing trace records
/// to the sessions through `hub`.
pub(crate) fn spawn_log_reader(
    interface: &str,
    shield: &mut crate::shield::Shield,
    hub: TraceHub,
) -> Result<tokio::task::JoinHandle<()>> {
    let logger = shield.take_trace_log(TraceLog {
        interface: Arc::from(interface),
        hub,
    })?;
    // SAFETY: the logger owns its ring's fd, which stays open and the same for as long as
    // the AsyncFd owns the logger.
    let mut fd = unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    }))
}
