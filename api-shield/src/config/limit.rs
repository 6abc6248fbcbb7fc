//! Token-bucket limits: one raw form for `limits.default` and for each rule, and the
//! defaults that complete it, each written here once (and shown in
//! `config/api-shield.example.yaml`):
//!
//! | key | absent |
//! |---|---|
//! | `limits.default` (or `{}`) | `pps: 1000`, one second's burst, no byte limit |
//! | `limits.default.pps` | 1000 ([`DEFAULT_PPS`]) |
//! | `limits.rules[].pps` | no packet limit: a rule limits only what it names |
//! | `bps` | no byte limit |
//! | `burst_packets` | one second's worth: `pps` |
//! | `burst_bytes` | one second's worth: `bps`, at least 1522 (a full VLAN-tagged frame) |
//! | `key`, `dry_run`, `penalty` | `source`, false, true |
//!
//! A dimension switched off (rate 0 or absent) needs no burst.

use serde::Deserialize;

use super::{
    Policy, Rule, RuleMatch, RuleName, SourceKey,
    values::{Burst, MAX_BPS, MAX_PPS, MIN_BURST_BYTES, Rate},
};

/// `limits.default.pps` when absent.
pub const DEFAULT_PPS: u64 = 1000;

/// One token-bucket limit per source. Zero rates mean "no limit" in that dimension (and
/// then its burst is 0 too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub pps: u64,
    pub burst_packets: u64,
    pub bps: u64,
    pub burst_bytes: u64,
}

impl Default for Limit {
    /// The default limit of a config that gives none: what `limits.default: {}` means.
    fn default() -> Self {
        RawLimit::default().limit(DEFAULT_PPS)
    }
}

/// `limits`, as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) default: Option<RawLimit>,
    #[serde(default)]
    pub(super) rules: Vec<RawLimit>,
    pub(super) penalty: Option<super::Penalty>,
}

/// A limit as written: `limits.default`, or a rule (which adds `name` and `match`).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimit {
    pub(super) name: Option<RuleName>,
    #[serde(rename = "match")]
    pub(super) matcher: Option<RuleMatch>,
    pps: Option<Rate<1, MAX_PPS>>,
    burst_packets: Option<Burst<1, MAX_PPS>>,
    bps: Option<Rate<64, MAX_BPS>>,
    burst_bytes: Option<Burst<MIN_BURST_BYTES, MAX_BPS>>,
    key: Option<SourceKey>,
    dry_run: Option<bool>,
    penalty: Option<bool>,
}

impl RawLimit {
    /// The limit, `pps` being `absent_pps` where not written: [`DEFAULT_PPS`] for the
    /// default limit, 0 for a rule.
    pub(super) fn limit(&self, absent_pps: u64) -> Limit {
        let pps = self.pps.map_or(absent_pps, |r| r.0);
        let bps = self.bps.map_or(0, |r| r.0);
        let one_second = |rate: u64, floor: u64| if rate == 0 { 0 } else { rate.max(floor) };
        Limit {
            pps,
            burst_packets: self.burst_packets.map_or(one_second(pps, 1), |b| b.0),
            bps,
            burst_bytes: self
                .burst_bytes
                .map_or(one_second(bps, MIN_BURST_BYTES), |b| b.0),
        }
    }

    pub(super) fn policy(&self) -> Policy {
        Policy {
            key: self.key.unwrap_or_default(),
            dry_run: self.dry_run.unwrap_or(false),
            penalty: self.penalty.unwrap_or(true),
        }
    }

    /// The rule it is (a missing name is reported by validation, as an empty one).
    pub(super) fn rule(self) -> Rule {
        Rule {
            limit: self.limit(0),
            policy: self.policy(),
            name: self.name.unwrap_or(RuleName(String::new())),
            matcher: self.matcher.unwrap_or_default(),
        }
    }
}
