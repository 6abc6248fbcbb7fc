//! `explain`: the verdict a packet from one source would get now, worked out as the data
//! plane works it out (`api-shield-ebpf/src/verdict.rs`) from what the live maps hold.
//! The daemon reads the maps; this module holds the arithmetic, so tests can check it
//! against the token bucket's definition without a kernel.

use std::{fmt, net::IpAddr, str::FromStr};

use api_shield_common::{
    counters::Reason,
    limiter::{
        BYTE_COST_FRAC_BITS, LIMIT_DRY_RUN, LimiterKey, LimiterState, RateLimit, TIME_SHIFT,
        UNITS_PER_SEC,
    },
    lists::{LIST_ALLOW, LIST_BLOCK, ListVerdict},
    rules::{CLASS_OTHER, CLASS_TCP, CLASS_TCP_SYN, CLASS_UDP, table_index},
};
use serde::{Deserialize, Serialize};

/// The frame length `explain` assumes where the byte limit needs one: the smallest
/// Ethernet frame, which a SYN or a small request is.
pub const PROBE_FRAME_BYTES: u64 = 64;

/// The transport protocol of the packet `explain` considers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeProtocol {
    #[default]
    Tcp,
    Udp,
    /// ICMP for an IPv4 source, ICMPv6 for an IPv6 one.
    Icmp,
}

impl FromStr for ProbeProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(ProbeProtocol::Tcp),
            "udp" => Ok(ProbeProtocol::Udp),
            "icmp" => Ok(ProbeProtocol::Icmp),
            _ => Err(format!("unknown protocol `{s}`: expected tcp, udp or icmp")),
        }
    }
}

impl fmt::Display for ProbeProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeProtocol::Tcp => "tcp",
            ProbeProtocol::Udp => "udp",
            ProbeProtocol::Icmp => "icmp",
        })
    }
}

/// The packet `explain` considers: protocol, destination port, and whether it is a SYN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub protocol: ProbeProtocol,
    /// Destination port (TCP and UDP); None: not given.
    pub port: Option<u16>,
    /// A TCP SYN (connection attempt) rather than another TCP segment.
    pub syn: bool,
}

impl Probe {
    /// Checks the combination: a port only for TCP and UDP, a SYN only for TCP.
    pub fn check(&self) -> Result<(), String> {
        if self.protocol == ProbeProtocol::Icmp && self.port.is_some() {
            return Err("--port applies to tcp and udp, not icmp".to_owned());
        }
        if self.syn && self.protocol != ProbeProtocol::Tcp {
            return Err(format!("--syn applies to tcp, not {}", self.protocol));
        }
        Ok(())
    }

    /// The rule table's class of this packet (see `api_shield_common::rules`).
    pub fn class(&self) -> u32 {
        match self.protocol {
            ProbeProtocol::Tcp if self.syn => CLASS_TCP_SYN,
            ProbeProtocol::Tcp => CLASS_TCP,
            ProbeProtocol::Udp => CLASS_UDP,
            ProbeProtocol::Icmp => CLASS_OTHER,
        }
    }

    /// The rule table index of this packet from a source of the given family; for TCP
    /// and UDP, of destination port `port`.
    pub fn table_index(&self, v6: bool, port: u16) -> u32 {
        match self.protocol {
            ProbeProtocol::Icmp => table_index(CLASS_OTHER, if v6 { 58 } else { 1 }),
            _ => table_index(self.class(), port),
        }
    }
}

/// What a packet would meet: the data plane's action and the reason it counts it under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub dropped: bool,
    /// The counter the packet lands in (a would-drop reason under a dry run).
    pub reason: Reason,
}

impl Outcome {
    pub fn verdict(&self) -> &'static str {
        if self.dropped { "drop" } else { "pass" }
    }
}

/// The outcome for a source listed as `list_verdict`; None for one listed nowhere (the
/// limiter decides).
pub fn listed_outcome(list_verdict: ListVerdict, dry_run: bool) -> Option<Outcome> {
    match list_verdict {
        LIST_ALLOW => Some(Outcome {
            dropped: false,
            reason: Reason::Allowlisted,
        }),
        LIST_BLOCK if dry_run => Some(Outcome {
            dropped: false,
            reason: Reason::WouldDropBlocklisted,
        }),
        LIST_BLOCK => Some(Outcome {
            dropped: true,
            reason: Reason::Blocklisted,
        }),
        _ => None,
    }
}

/// The outcome for a source listed nowhere, whose bucket does or does not conform.
pub fn limited_outcome(conforms: bool, dry_run: bool, limit: &RateLimit) -> Outcome {
    let dry_run = dry_run || limit.flags & LIMIT_DRY_RUN != 0;
    match (conforms, dry_run) {
        (true, _) => Outcome {
            dropped: false,
            reason: Reason::Passed,
        },
        (false, true) => Outcome {
            dropped: false,
            reason: Reason::WouldDropRateLimited,
        },
        (false, false) => Outcome {
            dropped: true,
            reason: Reason::RateLimited,
        },
    }
}

/// The bucket key of `source` under limit slot `slot`: the source (IPv4 as
/// ::ffff:a.b.c.d) masked to the limit's prefix.
pub fn bucket_key(source: IpAddr, slot: u32, limit: &RateLimit) -> LimiterKey {
    let (addr, mask) = match source {
        IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), limit.mask_v4),
        IpAddr::V6(a) => (a.octets(), limit.mask_v6),
    };
    let mut masked = [0u8; 16];
    for (i, byte) in masked.iter_mut().enumerate() {
        *byte = addr[i] & mask[i];
    }
    LimiterKey {
        addr: masked,
        limit: slot,
    }
}

/// The bucket key as an operator writes it: an address, or a prefix where the limit
/// groups sources.
pub fn bucket_name(source: IpAddr, limit: &RateLimit) -> String {
    match source {
        IpAddr::V4(a) if limit.prefix_v4 < 32 => {
            let net = ipnet::Ipv4Net::new(a, limit.prefix_v4).map(|n| n.trunc());
            net.map_or_else(|_| a.to_string(), |n| n.to_string())
        }
        IpAddr::V6(a) if limit.prefix_v6 < 128 => {
            let net = ipnet::Ipv6Net::new(a, limit.prefix_v6).map(|n| n.trunc());
            net.map_or_else(|_| a.to_string(), |n| n.to_string())
        }
        other => other.to_string(),
    }
}

/// A bucket at one instant, in packets and bytes rather than bucket time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BucketReading {
    /// Whether the limiter tracks the source now; an untracked source starts full.
    pub tracked: bool,
    /// Whole packets the bucket would pass now; None: no packet limit.
    pub packets_left: Option<u64>,
    pub packets_burst: Option<u64>,
    pub packets_per_sec: Option<f64>,
    /// Seconds until the bucket holds one more whole packet; None: full, or no packet
    /// limit.
    pub next_packet_in_secs: Option<f64>,
    /// Bytes the bucket would pass now; None: no byte limit.
    pub bytes_left: Option<u64>,
    pub bytes_burst: Option<u64>,
    pub bytes_per_sec: Option<f64>,
    /// Whether a [`PROBE_FRAME_BYTES`]-byte frame conforms now.
    pub conforms: bool,
}

/// How far ahead of `now` a TAT runs: the part of the capacity in use.
fn in_use(tat: u64, now: u64) -> u64 {
    tat.saturating_sub(now)
}

/// Reads a bucket (`state` None: untracked, as full as a new one) at bucket time `now`,
/// under `limit`. GCRA: a packet of cost c conforms while the TAT, moved up to now and
/// advanced by c, stays within the capacity of now; so the packets left are the unused
/// capacity over the cost.
pub fn read_bucket(state: Option<&LimiterState>, limit: &RateLimit, now: u64) -> BucketReading {
    let (packet_tat, byte_tat) = state.map_or((0, 0), |s| (s.packet_tat, s.byte_tat));
    let packet_room = limit
        .packet_capacity
        .saturating_sub(in_use(packet_tat, now));
    let byte_room = limit.byte_capacity.saturating_sub(in_use(byte_tat, now));
    let packet_limited = limit.packet_cost != 0;
    let byte_limited = limit.byte_cost_fp != 0;
    let per_byte = |units: u64| {
        (u128::from(units) << BYTE_COST_FRAC_BITS) / u128::from(limit.byte_cost_fp.max(1))
    };
    let frame_cost = (PROBE_FRAME_BYTES * limit.byte_cost_fp) >> BYTE_COST_FRAC_BITS;
    let conforms = (!packet_limited || limit.packet_cost <= packet_room)
        && (!byte_limited || frame_cost <= byte_room);
    BucketReading {
        tracked: state.is_some(),
        packets_left: packet_limited.then(|| packet_room / limit.packet_cost),
        packets_burst: packet_limited.then(|| limit.packet_capacity / limit.packet_cost),
        packets_per_sec: packet_limited.then(|| UNITS_PER_SEC as f64 / limit.packet_cost as f64),
        next_packet_in_secs: (packet_limited && packet_room < limit.packet_capacity).then(|| {
            let next = (packet_room / limit.packet_cost + 1) * limit.packet_cost;
            next.saturating_sub(packet_room) as f64 / UNITS_PER_SEC as f64
        }),
        bytes_left: byte_limited.then(|| per_byte(byte_room) as u64),
        bytes_burst: byte_limited.then(|| per_byte(limit.byte_capacity) as u64),
        bytes_per_sec: byte_limited.then(|| {
            UNITS_PER_SEC as f64 * (1u64 << BYTE_COST_FRAC_BITS) as f64 / limit.byte_cost_fp as f64
        }),
        conforms,
    }
}

/// The bucket's penalty window at `now`: drops counted in it, if it is still open.
pub fn window_drops(state: Option<&LimiterState>, limit: &RateLimit, now: u64) -> u64 {
    match state {
        Some(s)
            if s.window_drops > 0 && now.wrapping_sub(s.window_start) <= limit.penalty_window =>
        {
            s.window_drops
        }
        _ => 0,
    }
}

/// The data plane's bucket time now for `limit`: the monotonic clock (which is the
/// kernel's `bpf_ktime_get_ns`) in 1/16 ns. A limit on the tick clock runs up to a tick
/// behind it: a bucket read here may hold a tick's refill more than the next packet finds.
pub fn bucket_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    let ns = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
    ns << TIME_SHIFT
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A limit of `pps` packets per second in bursts of `burst`, as the token bucket's
    /// definition has it: one packet costs 1/pps seconds, the bucket holds `burst` of them.
    fn packets(pps: u64, burst: u64) -> RateLimit {
        let cost = UNITS_PER_SEC / pps;
        RateLimit {
            packet_cost: cost,
            packet_capacity: cost * burst,
            mask_v4: [0xff; 16],
            mask_v6: [0xff; 16],
            prefix_v4: 32,
            prefix_v6: 128,
            ..RateLimit::default()
        }
    }

    const SEC: u64 = UNITS_PER_SEC;

    #[test]
    fn an_untracked_source_has_a_full_bucket() {
        let r = read_bucket(None, &packets(10, 5), 1000 * SEC);
        assert_eq!(r.packets_left, Some(5));
        assert_eq!(r.packets_burst, Some(5));
        assert_eq!(r.packets_per_sec, Some(10.0));
        assert!(r.conforms && !r.tracked);
        assert_eq!(r.bytes_left, None);
    }

    #[test]
    fn a_spent_bucket_refills_at_the_rate() {
        let limit = packets(10, 5);
        let now = 1000 * SEC;
        // Five packets taken at `now`: the TAT runs half a second ahead, nothing left.
        let spent = LimiterState {
            packet_tat: now + SEC / 2,
            ..LimiterState::default()
        };
        let r = read_bucket(Some(&spent), &limit, now);
        assert_eq!(r.packets_left, Some(0));
        assert_eq!(r.next_packet_in_secs, Some(0.1));
        assert!(!r.conforms);
        // 0.2 s later two packets' worth (10/s) came back.
        let r = read_bucket(Some(&spent), &limit, now + SEC / 5);
        assert_eq!(r.packets_left, Some(2));
        assert_eq!(r.next_packet_in_secs, Some(0.1));
        assert!(r.conforms);
        // After the TAT the bucket is full, never fuller.
        let r = read_bucket(Some(&spent), &limit, now + 10 * SEC);
        assert_eq!(r.packets_left, Some(5));
        assert_eq!(r.next_packet_in_secs, None, "a full bucket gains nothing");
    }

    #[test]
    fn the_byte_bucket_decides_for_a_frame_larger_than_its_room() {
        // 1,000 bytes/s, burst 100 bytes: one 64-byte frame fits, a second does not.
        let cost_fp = (SEC << BYTE_COST_FRAC_BITS) / 1000;
        let limit = RateLimit {
            byte_cost_fp: cost_fp,
            byte_capacity: (100 * cost_fp) >> BYTE_COST_FRAC_BITS,
            ..RateLimit::default()
        };
        let now = 50 * SEC;
        let r = read_bucket(None, &limit, now);
        assert_eq!(r.bytes_left, Some(100));
        assert_eq!(r.bytes_burst, Some(100));
        assert!(r.conforms);
        let after_one = LimiterState {
            byte_tat: now + ((64 * cost_fp) >> BYTE_COST_FRAC_BITS),
            ..LimiterState::default()
        };
        let r = read_bucket(Some(&after_one), &limit, now);
        assert_eq!(r.bytes_left, Some(36));
        assert!(!r.conforms);
        assert_eq!(r.packets_left, None);
    }

    #[test]
    fn lists_decide_before_the_bucket_and_dry_runs_pass() {
        let block = listed_outcome(LIST_BLOCK, false).unwrap();
        assert!(block.dropped);
        assert_eq!(block.reason, Reason::Blocklisted);
        let dry = listed_outcome(LIST_BLOCK, true).unwrap();
        assert!(!dry.dropped);
        assert_eq!(dry.reason, Reason::WouldDropBlocklisted);
        assert_eq!(
            listed_outcome(LIST_ALLOW, true).unwrap().reason,
            Reason::Allowlisted
        );
        assert_eq!(listed_outcome(0, false), None);
        let mut limit = packets(1, 1);
        assert_eq!(
            limited_outcome(false, false, &limit).reason,
            Reason::RateLimited
        );
        limit.flags = LIMIT_DRY_RUN;
        let rule_dry = limited_outcome(false, false, &limit);
        assert!(!rule_dry.dropped);
        assert_eq!(rule_dry.reason, Reason::WouldDropRateLimited);
        assert_eq!(limited_outcome(true, false, &limit).reason, Reason::Passed);
    }

    #[test]
    fn prefix_keys_mask_the_source() {
        let mut limit = packets(1, 1);
        limit.mask_v4 = [0xff; 16];
        limit.mask_v4[15] = 0;
        limit.prefix_v4 = 24;
        let key = bucket_key("198.51.100.77".parse().unwrap(), 3, &limit);
        assert_eq!(
            std::net::Ipv6Addr::from(key.addr),
            "::ffff:198.51.100.0".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(key.limit, 3);
        assert_eq!(
            bucket_name("198.51.100.77".parse().unwrap(), &limit),
            "198.51.100.0/24"
        );
        assert_eq!(
            bucket_name("2001:db8::1".parse().unwrap(), &limit),
            "2001:db8::1"
        );
    }

    #[test]
    fn probes_find_the_table_slot_the_data_plane_reads() {
        let syn = Probe {
            protocol: ProbeProtocol::Tcp,
            port: Some(443),
            syn: true,
        };
        assert_eq!(syn.table_index(false, 443), table_index(CLASS_TCP_SYN, 443));
        let icmp = Probe {
            protocol: ProbeProtocol::Icmp,
            port: None,
            syn: false,
        };
        // ICMP is protocol 1, ICMPv6 58 (IANA protocol numbers).
        assert_eq!(icmp.table_index(false, 0), table_index(CLASS_OTHER, 1));
        assert_eq!(icmp.table_index(true, 0), table_index(CLASS_OTHER, 58));
        assert!(
            Probe {
                port: Some(1),
                ..icmp
            }
            .check()
            .is_err()
        );
        assert!(
            Probe {
                protocol: ProbeProtocol::Udp,
                ..syn
            }
            .check()
            .is_err()
        );
        assert!("sctp".parse::<ProbeProtocol>().is_err());
    }
}
