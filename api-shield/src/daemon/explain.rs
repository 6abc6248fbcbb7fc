//! The admin socket's `explain`: what a packet from one address would meet now, on each
//! interface, read from the live maps (list tries, settings, rule table, limits, buckets)
//! and from the registry (who listed the address, why, until when).

use std::net::IpAddr;

use anyhow::{Context as _, Result, bail};
use api_shield_common::{limiter::LIMIT_DRY_RUN, settings::SETTINGS_DRY_RUN};
use serde::Serialize;

use super::Controller;
use crate::{
    explain::{
        BucketReading, PROBE_FRAME_BYTES, Probe, ProbeProtocol, bucket_key, bucket_name,
        bucket_now, limited_outcome, listed_outcome, read_bucket, window_drops,
    },
    lists::{ListKind, Origin, registry::Listed},
};

#[derive(Serialize)]
struct Explanation {
    address: IpAddr,
    packet: Probe,
    /// Allowlist and blocklist entries holding the address, longest prefix first.
    allowlist: Vec<Listed>,
    blocklist: Vec<Listed>,
    interfaces: Vec<InterfaceExplanation>,
}

#[derive(Serialize)]
struct InterfaceExplanation {
    interface: String,
    /// `pass` or `drop`: what the program would do with the packet now.
    verdict: &'static str,
    /// The counter it would land in (`api_shield_packets_total{reason}`).
    reason: &'static str,
    /// The list the live tries find the address in: `allow`, `block` or none.
    listed: Option<ListKind>,
    dry_run: bool,
    /// The rule whose limit applies (`default`: no rule matched); none for listed sources.
    rule: Option<RuleExplanation>,
}

#[derive(Serialize)]
struct RuleExplanation {
    name: String,
    slot: u32,
    dry_run: bool,
    unlimited: bool,
    /// The bucket the source draws from: itself, or its prefix under a prefix key.
    bucket: String,
    #[serde(flatten)]
    reading: BucketReading,
    /// The frame size the byte limit is read for.
    frame_bytes: u64,
    penalty: Option<PenaltyExplanation>,
}

#[derive(Serialize)]
struct PenaltyExplanation {
    /// Drops within the window that box the bucket's prefix.
    after: u32,
    window_drops: u64,
    /// Whether the penalty box holds a prefix covering the address now.
    boxed: bool,
}

impl Controller {
    pub(crate) fn explain(&self, address: &str, packet: Probe) -> Result<serde_json::Value> {
        let address: IpAddr = address.trim().parse().map_err(|_| {
            anyhow::anyhow!("invalid address `{address}`: expected an IPv4 or IPv6 address")
        })?;
        packet.check().map_err(anyhow::Error::msg)?;
        let allowlist = self.registry.covering(ListKind::Allow, address);
        let blocklist = self.registry.covering(ListKind::Block, address);
        let boxed = blocklist
            .iter()
            .any(|l| l.claims.iter().any(|c| c.origin == Origin::Penalty));
        let v6 = address.is_ipv6();
        let mut interfaces = Vec::new();
        for inst in &self.instances {
            let shield = &inst.shield;
            let port = match (packet.protocol, packet.port) {
                (ProbeProtocol::Icmp, _) => 0,
                (_, Some(port)) => port,
                // Without a port, any port will do if the rules treat them all alike.
                (_, None) => {
                    let slots = shield.slots_of_class(packet.class());
                    if slots.len() == 1 {
                        0
                    } else {
                        let names: Vec<String> = slots
                            .iter()
                            .map(|s| self.config.limits.slot_name(*s))
                            .collect();
                        let view = shield.live_view(address, packet.table_index(v6, 0))?;
                        if listed_outcome(view.list_verdict, false).is_none() {
                            bail!(
                                "the verdict for {address} depends on the destination port \
                                 (rules {} apply to different {} ports): give --port",
                                names.join(", "),
                                packet.protocol
                            );
                        }
                        0
                    }
                }
            };
            let view = shield
                .live_view(address, packet.table_index(v6, port))
                .with_context(|| format!("reading the maps of {}", inst.interface))?;
            let dry_run = view.settings.flags & SETTINGS_DRY_RUN != 0;
            let listed = match view.list_verdict {
                api_shield_common::lists::LIST_ALLOW => Some(ListKind::Allow),
                api_shield_common::lists::LIST_BLOCK => Some(ListKind::Block),
                _ => None,
            };
            let (outcome, rule) = match listed_outcome(view.list_verdict, dry_run) {
                Some(outcome) => (outcome, None),
                None => {
                    let limit = &view.limit;
                    let now = bucket_now();
                    let key = bucket_key(address, view.slot, limit);
                    let state = shield.limiter_state(&key)?;
                    let reading = read_bucket(state.as_ref(), limit, now);
                    let unlimited = limit.is_unlimited();
                    let conforms = unlimited || reading.conforms;
                    let penalty = (limit.penalty_after != 0).then(|| PenaltyExplanation {
                        after: limit.penalty_after,
                        window_drops: window_drops(state.as_ref(), limit, now),
                        boxed,
                    });
                    (
                        limited_outcome(conforms, dry_run, limit),
                        Some(RuleExplanation {
                            name: self.config.limits.slot_name(view.slot),
                            slot: view.slot,
                            dry_run: limit.flags & LIMIT_DRY_RUN != 0,
                            unlimited,
                            bucket: bucket_name(address, limit),
                            reading,
                            frame_bytes: PROBE_FRAME_BYTES,
                            penalty,
                        }),
                    )
                }
            };
            interfaces.push(InterfaceExplanation {
                interface: inst.interface.clone(),
                verdict: outcome.verdict(),
                reason: outcome.reason.name(),
                listed,
                dry_run,
                rule,
            });
        }
        Ok(serde_json::to_value(Explanation {
            address,
            packet,
            allowlist,
            blocklist,
            interfaces,
        })?)
    }
}
