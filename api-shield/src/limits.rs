//! Turning configured rates into the precomputed bucket parameters the data plane uses.

use api_shield_common::limiter::{BYTE_COST_FRAC_BITS, RateLimit, UNITS_PER_SEC};

use crate::config::Limit;

/// Caps costs and capacities so that `now + capacity + cost` never overflows a u64
/// of bucket time (now itself stays below 2^60 for 36 years of uptime).
const MAX_SPAN: u128 = 1 << 61;

pub fn rate_limit(limit: &Limit) -> RateLimit {
    let mut out = RateLimit::default();
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
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The data plane's GCRA, replayed: how many of `packets` (each `len` bytes, all at
    /// time 0) conform.
    fn conforming_burst(limit: &RateLimit, packets: u64, len: u64) -> u64 {
        let (mut ptat, mut btat) = (0u64, 0u64);
        let mut passed = 0;
        for _ in 0..packets {
            let bcost = (len * limit.byte_cost_fp) >> BYTE_COST_FRAC_BITS;
            let pnext = ptat + limit.packet_cost;
            let bnext = btat + bcost;
            if (limit.packet_cost == 0 || pnext <= limit.packet_capacity)
                && (bcost == 0 || bnext <= limit.byte_capacity)
            {
                ptat = pnext;
                btat = bnext;
                passed += 1;
            }
        }
        passed
    }

    #[test]
    fn exactly_the_burst_conforms_back_to_back() {
        let l = rate_limit(&Limit {
            pps: 1000,
            burst_packets: 2000,
            bps: 0,
            burst_bytes: 0,
        });
        assert_eq!(conforming_burst(&l, 5000, 64), 2000);
        let l = rate_limit(&Limit {
            pps: 3,
            burst_packets: 7,
            bps: 0,
            burst_bytes: 0,
        });
        assert_eq!(conforming_burst(&l, 100, 64), 7);
    }

    #[test]
    fn byte_burst_limits_large_frames() {
        let l = rate_limit(&Limit {
            pps: 0,
            burst_packets: 0,
            bps: 10_000,
            burst_bytes: 4500,
        });
        assert_eq!(conforming_burst(&l, 100, 1500), 3);
        assert_eq!(conforming_burst(&l, 100, 100), 45);
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
