//! The penalty box as the daemon keeps it: boxing the prefixes the data plane reports,
//! releasing them when they expire or are deleted, and expiring TTLs.

use std::time::Duration;

use api_shield_common::rules::PenaltyEvent;
use ipnet::IpNet;

use super::Controller;
use crate::{
    lists::{Claim, ListKind, Origin, unix_now},
    penalty,
};

impl Controller {
    /// Boxes the prefixes the data plane reported, in one list update.
    pub(crate) fn penalize(&mut self, reports: Vec<(String, PenaltyEvent)>) {
        let Some(p) = self.config.limits.penalty else {
            return;
        };
        let now = unix_now();
        let mut boxes = Vec::new();
        for (interface, report) in reports {
            let Some(net) = penalty::reported_prefix(&report) else {
                log::warn!("{interface}: ignoring a malformed penalty report {report:?}");
                continue;
            };
            // A report raced with the box it asks for: the prefix is already boxed.
            if self
                .registry
                .has_claim(ListKind::Block, net, &Origin::Penalty)
                || boxes.iter().any(|(boxed, _)| *boxed == net)
            {
                continue;
            }
            let rule = self.config.limits.slot_name(report.limit);
            let (duration, offence) = self.offences.record(net, now, &p);
            let secs = duration.as_secs().max(1);
            boxes.push((
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
            ));
            *self.penalties.entry(rule.clone()).or_insert(0) += 1;
            log::warn!(
                "penalty: {net} blocked for {} on {interface} (rule {rule}: over {} drops within {}; offence {offence})",
                humantime::format_duration(Duration::from_secs(secs)),
                p.after_violations.0,
                humantime::format_duration(p.window.0),
            );
        }
        if boxes.is_empty() {
            return;
        }
        let boxed = self.change_lists(|registry| {
            for (net, claim) in boxes {
                registry.add(ListKind::Block, net, claim);
            }
            Ok(())
        });
        match boxed {
            Ok(((), folded)) => {
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
    pub(crate) fn release_penalty(&self, net: IpNet) {
        let buckets: usize = self
            .instances
            .iter()
            .map(|i| i.shield.reset_penalty_windows(&net))
            .sum();
        log::info!(
            "penalty: {net} released; its next violations open a new window ({buckets} buckets)"
        );
    }

    pub(crate) fn expire(&mut self) {
        let now = unix_now();
        if !self.registry.has_expired(now) {
            return;
        }
        let gone = match self.change_lists(|registry| Ok(registry.expire(now))) {
            Ok((gone, _)) => gone,
            Err(e) => {
                log::error!("applying expiries (retried in a second): {e:#}");
                return;
            }
        };
        for (list, net, origin) in &gone {
            log::info!("{} entry {net} by {origin} expired", list.name());
            if *origin == Origin::Penalty {
                self.release_penalty(*net);
            }
        }
        self.persist();
    }
}
