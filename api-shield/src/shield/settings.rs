//! Limits, rules and settings: what the config says turned into what the data plane
//! reads (precomputed bucket parameters per limit slot, the table that maps a packet to its
//! first matching rule, the settings word), and written into the maps.

use anyhow::{Context as _, Result};
use api_shield_common::{
    limiter::{
        BYTE_COST_FRAC_BITS, DEFAULT_LIMIT, LIMIT_DRY_RUN, LIMIT_TICK_CLOCK, RateLimit,
        TICK_CLOCK_MIN_TICKS, TIME_SHIFT, UNITS_PER_SEC,
    },
    names,
    rules::{
        CLASS_OTHER, CLASS_TCP, CLASS_TCP_SYN, CLASS_UDP, RuleCounter, TABLE_SLOTS, table_index,
    },
    settings::{SETTINGS_DRY_RUN, SETTINGS_RULES, Settings},
};
use aya::maps::{Array, PerCpuArray};

use super::Shield;
use crate::config::{Config, Limit, OnMalformed, Penalty, Policy, Rule, RuleMatch, TcpFlags};

/// Caps costs and capacities so that `now + capacity + cost` never overflows a u64
/// of bucket time (now itself stays below 2^60 for 36 years of uptime).
const MAX_SPAN: u128 = 1 << 61;

/// Bucket parameters of `limit`, one bucket per source address.
pub fn rate_limit(limit: &Limit) -> RateLimit {
    limit_slot(limit, &Policy::default(), None)
}

/// Bucket parameters of `limit` applied as `policy` says, with the penalty box if set.
pub fn limit_slot(limit: &Limit, policy: &Policy, penalty: Option<&Penalty>) -> RateLimit {
    let mut out = RateLimit {
        mask_v4: mask(96 + u32::from(policy.key.v4)),
        mask_v6: mask(u32::from(policy.key.v6)),
        prefix_v4: policy.key.v4,
        prefix_v6: policy.key.v6,
        flags: if policy.dry_run { LIMIT_DRY_RUN } else { 0 },
        ..RateLimit::default()
    };
    if let Some(p) = penalty
        && policy.penalty
    {
        out.penalty_after = u32::try_from(p.after_violations.0).unwrap_or(u32::MAX);
        out.penalty_window = (p.window.0.as_nanos() * (u128::from(UNITS_PER_SEC) / 1_000_000_000))
            .min(MAX_SPAN) as u64;
    }
    if limit.pps > 0 {
        let cost = (u128::from(UNITS_PER_SEC) / u128::from(limit.pps)).max(1);
        out.packet_cost = cost.min(MAX_SPAN) as u64;
        out.packet_capacity = (cost * u128::from(limit.burst_packets)).min(MAX_SPAN) as u64;
    }
    if limit.bps > 0 {
        let cost_fp =
            ((u128::from(UNITS_PER_SEC) << BYTE_COST_FRAC_BITS) / u128::from(limit.bps)).max(1);
        out.byte_cost_fp = cost_fp.min(MAX_SPAN) as u64;
        out.byte_capacity =
            ((cost_fp * u128::from(limit.burst_bytes)) >> BYTE_COST_FRAC_BITS).min(MAX_SPAN) as u64;
    }
    if let Some(tick) = kernel_tick_ns() {
        choose_clock(&mut out, tick);
    }
    out
}

/// Puts the limit on the kernel tick clock ([`LIMIT_TICK_CLOCK`]) when each limited
/// dimension's burst spans at least [`TICK_CLOCK_MIN_TICKS`] ticks: a tick's refill then
/// fits in the bucket, so reading the time a tick late never loses tokens and the rate
/// stays exact. A high rate with a burst shorter than that keeps the nanosecond clock.
pub fn choose_clock(limit: &mut RateLimit, tick_ns: u32) {
    let span = (u64::from(tick_ns) * TICK_CLOCK_MIN_TICKS) << TIME_SHIFT;
    let spans = |cost: u64, capacity: u64| cost == 0 || capacity >= span;
    limit.tick_ns = tick_ns;
    if tick_ns > 0
        && spans(limit.packet_cost, limit.packet_capacity)
        && spans(limit.byte_cost_fp, limit.byte_capacity)
    {
        limit.flags |= LIMIT_TICK_CLOCK;
    } else {
        limit.flags &= !LIMIT_TICK_CLOCK;
    }
}

/// The kernel tick (1/HZ): the resolution of CLOCK_MONOTONIC_COARSE, which jiffies drive.
pub fn kernel_tick_ns() -> Option<u32> {
    static TICK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *TICK.get_or_init(|| {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_getres writes one timespec, which we own.
        let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) };
        // A tick of a second or more (or none) is no kernel we know: keep the ns clock.
        (rc == 0 && res.tv_sec == 0 && res.tv_nsec > 0)
            .then(|| u32::try_from(res.tv_nsec).ok())
            .flatten()
    })
}

/// A 16-byte mask of the first `bits` bits.
fn mask(bits: u32) -> [u8; 16] {
    let bits = bits.min(128);
    let m = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    m.to_be_bytes()
}

/// The rule table: for each (class, port or protocol) slot, the limit slot of the first
/// rule that matches it (rule `i` is slot `i + 1`), or 0 (the default limit).
pub fn rule_table(rules: &[Rule]) -> Vec<u32> {
    let mut table = vec![0u32; TABLE_SLOTS as usize];
    for (i, rule) in rules.iter().enumerate() {
        let slot = i as u32 + 1;
        for_each_index(&rule.matcher, |index| {
            let entry = &mut table[index as usize];
            if *entry == 0 {
                *entry = slot;
            }
        });
    }
    table
}

/// Calls `f` with every table index `m` matches.
fn for_each_index(m: &RuleMatch, mut f: impl FnMut(u32)) {
    let ports: Vec<(u16, u16)> = if m.dst_ports.is_empty() {
        vec![(0, u16::MAX)]
    } else {
        m.dst_ports.iter().map(|r| (r.first, r.last)).collect()
    };
    let protocols: Vec<u8> = match m.protocol {
        Some(p) => p.numbers(),
        None if m.dst_ports.is_empty() => (0..=255).collect(),
        // Ports without a protocol: TCP and UDP.
        None => vec![6, 17],
    };
    for protocol in protocols {
        let classes: &[u32] = match (protocol, m.tcp_flags) {
            (6, Some(TcpFlags::Syn)) => &[CLASS_TCP_SYN],
            (6, None) => &[CLASS_TCP_SYN, CLASS_TCP],
            (17, _) => &[CLASS_UDP],
            (p, _) => {
                f(table_index(CLASS_OTHER, u16::from(p)));
                continue;
            }
        };
        for &class in classes {
            for &(first, last) in &ports {
                for port in first..=last {
                    f(table_index(class, port));
                }
            }
        }
    }
}

/// Bucket parameters for at most `rate` drop events per second per reason, in bursts of
/// up to one second's worth: (cost, capacity); (0, 0) switches events off.
pub fn event_limit(rate: u64) -> (u64, u64) {
    if rate == 0 {
        return (0, 0);
    }
    let cost = (UNITS_PER_SEC / rate).max(1);
    (cost, cost * rate)
}

impl Shield {
    /// Limits, rules and settings from `config`; buckets keep their state.
    ///
    /// Order matters for a running program: the rules' limits are written before the
    /// table points at them, and the table before the settings switch it on.
    pub fn apply_settings(&mut self, config: &Config) -> Result<()> {
        let limits = &config.limits;
        let penalty = limits.penalty.as_ref();
        self.set_limit(
            DEFAULT_LIMIT,
            limit_slot(&limits.default, &limits.default_policy, penalty),
        )?;
        for (i, rule) in limits.rules.iter().enumerate() {
            self.set_limit(i as u32 + 1, limit_slot(&rule.limit, &rule.policy, penalty))?;
        }
        let rules = !limits.rules.is_empty();
        if rules || self.rule_table.is_some() {
            self.write_rule_table(rule_table(&limits.rules))?;
        }
        let (event_cost, event_capacity) = event_limit(config.events.rate.0);
        let mut flags = 0;
        if config.dry_run {
            flags |= SETTINGS_DRY_RUN;
        }
        if rules {
            flags |= SETTINGS_RULES;
        }
        self.set_settings(Settings {
            drop_malformed: u32::from(config.on_malformed == OnMalformed::Drop),
            flags,
            event_cost,
            event_capacity,
            ..Settings::default()
        })
    }

    /// Writes the entries of `table` that differ from what the map holds (all of them
    /// the first time).
    fn write_rule_table(&mut self, table: Vec<u32>) -> Result<()> {
        let old = self.rule_table.take();
        let mut map: Array<_, u32> = Array::try_from(self.map_mut(names::MAP_RULE_TABLE)?)?;
        for (i, slot) in table.iter().enumerate() {
            if old.as_ref().is_none_or(|o| o[i] != *slot) {
                map.set(i as u32, slot, 0)
                    .context("writing the rule table")?;
            }
        }
        self.rule_table = Some(table);
        Ok(())
    }

    /// Sets limit `index`. Buckets keep their state: a new rate applies from the next packet.
    pub fn set_limit(&mut self, index: u32, limit: RateLimit) -> Result<()> {
        let mut limits: Array<_, RateLimit> = Array::try_from(self.map_mut(names::MAP_LIMITS)?)?;
        limits.set(index, limit, 0).context("writing a limit")?;
        Ok(())
    }

    /// Writes the settings; the limiter's seed and size are the table's, whatever
    /// `settings` says of them.
    pub fn set_settings(&mut self, mut settings: Settings) -> Result<()> {
        settings.limiter_seed = self.limiter_seed;
        settings.limiter_sets = self.limiter.sets();
        let mut map: Array<_, Settings> = Array::try_from(self.map_mut(names::MAP_SETTINGS)?)?;
        map.set(0, settings, 0).context("writing settings")?;
        Ok(())
    }

    /// Zeroes a limit slot's counters (when the slot passes to another rule).
    pub fn reset_rule_counter(&mut self, slot: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut map: PerCpuArray<_, RuleCounter> =
            PerCpuArray::try_from(self.map_mut(names::MAP_RULE_COUNTERS)?)?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![RuleCounter::default(); cpus])?;
        map.set(slot, zeros, 0).context("resetting rule counters")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, SourceKey};

    fn rules(yaml: &str) -> Vec<Rule> {
        Config::parse(&format!(
            "interfaces: [{{name: a}}]\nlimits:\n  rules:\n{yaml}"
        ))
        .unwrap()
        .limits
        .rules
    }

    #[test]
    fn the_first_matching_rule_owns_each_slot() {
        let t = rule_table(&rules(
            "    - {name: web, match: {protocol: tcp, dst_ports: [443, \"8000-8443\"]}, pps: 1}\n    - {name: syn, match: {protocol: tcp, tcp_flags: syn}, pps: 1}\n    - {name: low, match: {dst_ports: [\"1-1023\"]}, pps: 1}\n    - {name: ping, match: {protocol: icmp}, pps: 1}\n    - {name: rest, pps: 1}\n",
        ));
        let at = |class, port| t[table_index(class, port) as usize];
        // 443: rule 1 for SYN and other TCP, before `syn` and `low`; not for UDP.
        assert_eq!((at(CLASS_TCP_SYN, 443), at(CLASS_TCP, 443)), (1, 1));
        assert_eq!(at(CLASS_UDP, 443), 3);
        assert_eq!(
            (
                at(CLASS_TCP, 8000),
                at(CLASS_TCP, 8443),
                at(CLASS_TCP, 8444)
            ),
            (1, 1, 5)
        );
        // SYN to any other port: `syn`; other TCP below 1024: `low`.
        assert_eq!((at(CLASS_TCP_SYN, 22), at(CLASS_TCP, 22)), (2, 3));
        assert_eq!((at(CLASS_TCP_SYN, 9999), at(CLASS_TCP, 9999)), (2, 5));
        assert_eq!((at(CLASS_UDP, 53), at(CLASS_UDP, 1024)), (3, 5));
        // ICMP and ICMPv6 by protocol number; anything else falls to the catch-all.
        assert_eq!(
            (at(CLASS_OTHER, 1), at(CLASS_OTHER, 58), at(CLASS_OTHER, 47)),
            (4, 4, 5)
        );
        // No rules: every slot is the default.
        assert!(rule_table(&[]).iter().all(|s| *s == 0));
        // Without a catch-all, unmatched slots stay on the default.
        let t = rule_table(&rules(
            "    - {name: dns, match: {protocol: udp, dst_ports: [53]}, pps: 1}\n",
        ));
        assert_eq!(t.iter().filter(|s| **s != 0).count(), 1);
    }

    #[test]
    fn keys_become_masks_and_policies_flags() {
        let policy = Policy {
            key: SourceKey { v4: 24, v6: 64 },
            dry_run: true,
            penalty: true,
        };
        let l = limit_slot(&Limit::default(), &policy, None);
        let mut v4 = [0xff; 16];
        v4[15] = 0;
        assert_eq!(l.mask_v4, v4);
        assert_eq!(l.mask_v6, [[0xff; 8], [0; 8]].concat()[..]);
        assert_eq!((l.prefix_v4, l.prefix_v6), (24, 64));
        assert_eq!(l.flags & LIMIT_DRY_RUN, LIMIT_DRY_RUN);
        assert_eq!(l.penalty_after, 0, "no penalty section: no reports");
        let whole = limit_slot(&Limit::default(), &Policy::default(), None);
        assert_eq!((whole.mask_v4, whole.mask_v6), ([0xff; 16], [0xff; 16]));
        let p = Config::parse(
            "interfaces: [{name: a}]\nlimits:\n  penalty: {after_violations: 7, window: 2s}\n",
        )
        .unwrap()
        .limits
        .penalty
        .unwrap();
        let l = limit_slot(&Limit::default(), &Policy::default(), Some(&p));
        assert_eq!((l.penalty_after, l.penalty_window), (7, 2 * UNITS_PER_SEC));
        let opted_out = Policy {
            penalty: false,
            ..Policy::default()
        };
        assert_eq!(
            limit_slot(&Limit::default(), &opted_out, Some(&p)).penalty_after,
            0
        );
        let everything = Policy {
            key: SourceKey { v4: 0, v6: 0 },
            ..Policy::default()
        };
        let l = limit_slot(&Limit::default(), &everything, None);
        let mut v4_all = [0xff; 16];
        v4_all[12..].fill(0);
        assert_eq!((l.mask_v4, l.mask_v6), (v4_all, [0; 16]));
    }

    /// How many `len`-byte frames sent at one instant conform, by the token bucket's
    /// definition: a bucket `capacity` deep, each frame taking `cost`, passes n back to
    /// back while n * cost <= capacity, in each dimension the limit has. (The data plane's
    /// own arithmetic is tested through the kernel in tests/tests/verdicts.rs.)
    fn back_to_back(limit: &RateLimit, len: u64) -> u64 {
        let fits = |cost: u64, capacity: u64| capacity.checked_div(cost).unwrap_or(u64::MAX);
        let byte_cost = (len * limit.byte_cost_fp) >> BYTE_COST_FRAC_BITS;
        fits(limit.packet_cost, limit.packet_capacity).min(fits(byte_cost, limit.byte_capacity))
    }

    #[test]
    fn the_tick_clock_only_where_a_tick_fits_in_the_burst() {
        let limit = |pps, burst_packets, bps, burst_bytes| {
            let mut l = rate_limit(&Limit {
                pps,
                burst_packets,
                bps,
                burst_bytes,
            });
            choose_clock(&mut l, 4_000_000);
            l.flags & LIMIT_TICK_CLOCK != 0
        };
        // 4 ms ticks: a burst of 100 at 1000/s spans 100 ms; at 1M/s only 0.1 ms.
        assert!(limit(1000, 100, 0, 0));
        assert!(!limit(1_000_000, 100, 0, 0));
        assert!(limit(1_000_000, 8000, 0, 0), "8 ms of burst: two ticks");
        assert!(!limit(1_000_000, 7999, 0, 0));
        // Both dimensions must span two ticks: 1500 bytes at 1 GB/s is 1.5 us.
        assert!(!limit(1000, 100, 1_000_000_000, 1500));
        assert!(limit(1000, 100, 1_000_000, 100_000));
        assert!(limit(0, 0, 0, 0), "unlimited: either clock");
        let mut l = rate_limit(&Limit {
            pps: 1000,
            burst_packets: 100,
            bps: 0,
            burst_bytes: 0,
        });
        choose_clock(&mut l, 0);
        assert_eq!(l.flags & LIMIT_TICK_CLOCK, 0, "no tick known: the ns clock");
        // The kernel reports one here (HZ 100 to 1000).
        assert!(kernel_tick_ns().is_some_and(|t| (1_000_000..=10_000_000).contains(&t)));
    }

    #[test]
    fn exactly_the_burst_conforms_back_to_back() {
        let l = rate_limit(&Limit {
            pps: 1000,
            burst_packets: 2000,
            bps: 0,
            burst_bytes: 0,
        });
        assert_eq!(back_to_back(&l, 64), 2000);
        let l = rate_limit(&Limit {
            pps: 3,
            burst_packets: 7,
            bps: 0,
            burst_bytes: 0,
        });
        assert_eq!(back_to_back(&l, 64), 7);
    }

    #[test]
    fn byte_burst_limits_large_frames() {
        let l = rate_limit(&Limit {
            pps: 0,
            burst_packets: 0,
            bps: 10_000,
            burst_bytes: 4500,
        });
        assert_eq!(back_to_back(&l, 1500), 3);
        assert_eq!(back_to_back(&l, 100), 45);
    }

    #[test]
    fn costs_match_rates() {
        let l = rate_limit(&Limit {
            pps: 1000,
            burst_packets: 1,
            bps: 12_500_000,
            burst_bytes: 25_000_000,
        });
        assert_eq!(l.packet_cost, UNITS_PER_SEC / 1000);
        // 80 ns per byte at 12.5 MB/s.
        assert_eq!(l.byte_cost_fp >> BYTE_COST_FRAC_BITS, 80 << 4);
        assert_eq!(l.byte_capacity, 2 * UNITS_PER_SEC);
        let unlimited = rate_limit(&Limit {
            pps: 0,
            burst_packets: 1,
            bps: 0,
            burst_bytes: 1522,
        });
        assert!(unlimited.is_unlimited());
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        let l = rate_limit(&Limit {
            pps: 1,
            burst_packets: 1_000_000_000,
            bps: 64,
            burst_bytes: 1_000_000_000_000,
        });
        assert!(
            u128::from(l.packet_capacity) <= MAX_SPAN && u128::from(l.byte_capacity) <= MAX_SPAN
        );
        // A 64 KiB frame's byte cost still fits a u64 at the lowest byte rate.
        assert!(u64::MAX / 65_536 >= l.byte_cost_fp);
        let l = rate_limit(&Limit {
            pps: 1_000_000_000,
            burst_packets: 1,
            bps: 1_000_000_000_000,
            burst_bytes: 1522,
        });
        assert!(l.packet_cost >= 1 && l.byte_cost_fp >= 1);
    }
}
