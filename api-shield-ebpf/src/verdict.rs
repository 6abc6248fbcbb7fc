//! The verdict, shared by every hook: lists, then the token bucket, then counters.

// The bpf target declares no compare-and-swap, so `core::sync::atomic` offers none; the
// intrinsics still emit LLVM atomics, which BPF CPU v3 (build.rs) lowers to BPF_ATOMIC ops.
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xsub};

use api_shield_common::{
    counters::{COUNTER_SLOTS, Counter, Reason},
    events::{DropEvent, EVENT_SOURCE_KNOWN, EVENT_SOURCE_V6, EVENTS_RING_BYTES},
    limiter::{
        BYTE_COST_FRAC_BITS, DEFAULT_LIMIT, LIMIT_SLOTS, LimiterKey, LimiterState, RateLimit,
        TIME_SHIFT,
    },
    lists::{LIST_ALLOW, LIST_BLOCK, ListVerdict},
    settings::Settings,
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, RingBuf, lpm_trie::Key},
};

use crate::parse::{Frame, Ipv4Info, L3, parse_l3, parse_l4_v4, parse_l4_v6};

// Capacities here are placeholders: the controller sets each from the config at load.
#[map(name = "LIST_V4")]
static LIST_V4: LpmTrie<[u8; 4], ListVerdict> = LpmTrie::with_max_entries(1024, 0);
#[map(name = "LIST_V6")]
static LIST_V6: LpmTrie<[u8; 16], ListVerdict> = LpmTrie::with_max_entries(1024, 0);
#[map(name = "LIMITER")]
static LIMITER: LruHashMap<LimiterKey, LimiterState> = LruHashMap::with_max_entries(1024, 0);
#[map(name = "LIMITS")]
static LIMITS: Array<RateLimit> = Array::with_max_entries(LIMIT_SLOTS, 0);
#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_RING_BYTES, 0);
#[map(name = "EVENT_LIMIT")]
static EVENT_LIMIT: Array<u64> = Array::with_max_entries(COUNTER_SLOTS, 0);
#[map(name = "EVENTS_SUPPRESSED")]
static EVENTS_SUPPRESSED: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// What to do with the frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Pass,
    Drop,
}

/// A verdict and what a drop event says about the frame.
struct Verdict {
    action: Action,
    reason: Reason,
    /// The source (IPv4 as ::ffff:a.b.c.d); all zero if the frame had none we could read.
    source: [u8; 16],
    flags: u8,
    protocol: u8,
    dst_port: u16,
    /// For verdicts given before the transport header was read (the lists): where to read
    /// it, should an event need it. Parsing it only then keeps the blocked path short.
    unparsed: Unparsed,
}

#[derive(Clone, Copy)]
enum Unparsed {
    Nothing,
    V4(Ipv4Info),
    V6(usize),
}

impl Verdict {
    #[inline(always)]
    fn without_source(action: Action, reason: Reason) -> Verdict {
        Verdict {
            action,
            reason,
            source: [0; 16],
            flags: 0,
            protocol: 0,
            dst_port: 0,
            unparsed: Unparsed::Nothing,
        }
    }
}

/// Decides, counts, and reports drops. Never fails: every path ends in a counted verdict.
#[inline(always)]
pub(crate) fn judge(frame: &Frame) -> Action {
    let v = decide(frame);
    count(v.reason, frame.len());
    if v.action == Action::Drop {
        report(frame, &v);
    }
    v.action
}

#[inline(always)]
fn decide(frame: &Frame) -> Verdict {
    let mut key = LimiterKey {
        addr: [0; 16],
        limit: DEFAULT_LIMIT,
    };
    // Lists first: a listed source gets its verdict whatever follows the IP header.
    let (l4, flags) = match parse_l3(frame) {
        L3::NonIp => return Verdict::without_source(Action::Pass, Reason::NonIp),
        L3::Malformed => return Verdict::without_source(malformed(), Reason::Malformed),
        L3::V4 { src, info } => {
            key.addr[10] = 0xff;
            key.addr[11] = 0xff;
            key.addr[12..].copy_from_slice(&src);
            match LIST_V4.get(Key::new(32, src)) {
                Some(&LIST_ALLOW) => {
                    return listed(
                        Action::Pass,
                        Reason::Allowlisted,
                        &key,
                        EVENT_SOURCE_KNOWN,
                        Unparsed::V4(info),
                    );
                }
                Some(&LIST_BLOCK) => {
                    return listed(
                        Action::Drop,
                        Reason::Blocklisted,
                        &key,
                        EVENT_SOURCE_KNOWN,
                        Unparsed::V4(info),
                    );
                }
                _ => {}
            }
            (parse_l4_v4(frame, &info), EVENT_SOURCE_KNOWN)
        }
        L3::V6 { src, offset } => {
            key.addr = src;
            let flags = EVENT_SOURCE_KNOWN | EVENT_SOURCE_V6;
            match LIST_V6.get(Key::new(128, src)) {
                Some(&LIST_ALLOW) => {
                    return listed(
                        Action::Pass,
                        Reason::Allowlisted,
                        &key,
                        flags,
                        Unparsed::V6(offset),
                    );
                }
                Some(&LIST_BLOCK) => {
                    return listed(
                        Action::Drop,
                        Reason::Blocklisted,
                        &key,
                        flags,
                        Unparsed::V6(offset),
                    );
                }
                _ => {}
            }
            (parse_l4_v6(frame, offset), flags)
        }
    };
    let (protocol, dst_port) = l4.map_or((0, 0), |l| (l.protocol, l.dst_port));
    let verdict = |action, reason| Verdict {
        action,
        reason,
        source: key.addr,
        flags,
        protocol,
        dst_port,
        unparsed: Unparsed::Nothing,
    };
    // The limiter applies even to frames malformed past the IP header, so that
    // mangling the transport header is no way around a source's limit.
    if !take_tokens(&key, frame.len()) {
        return verdict(Action::Drop, Reason::RateLimited);
    }
    match l4 {
        Some(_) => verdict(Action::Pass, Reason::Passed),
        None => verdict(malformed(), Reason::Malformed),
    }
}

#[inline(always)]
fn listed(
    action: Action,
    reason: Reason,
    key: &LimiterKey,
    flags: u8,
    unparsed: Unparsed,
) -> Verdict {
    Verdict {
        action,
        reason,
        source: key.addr,
        flags,
        protocol: 0,
        dst_port: 0,
        unparsed,
    }
}

#[inline(always)]
fn malformed() -> Action {
    let drop = SETTINGS.get(0).is_some_and(|s| s.drop_malformed != 0);
    if drop { Action::Drop } else { Action::Pass }
}

/// Sends a drop event, at most at the configured rate per reason (a GCRA bucket shared by
/// all CPUs); events over that rate, or that find the ring full, are counted instead.
#[inline(always)]
fn report(frame: &Frame, v: &Verdict) {
    let Some(settings) = SETTINGS.get(0) else {
        return;
    };
    if settings.event_cost == 0 {
        return;
    }
    let Some(tat) = EVENT_LIMIT.get_ptr_mut(v.reason as u32) else {
        return;
    };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (protocol, dst_port) = match v.unparsed {
        Unparsed::Nothing => (v.protocol, v.dst_port),
        Unparsed::V4(info) => {
            parse_l4_v4(frame, &info).map_or((info.protocol, 0), |l| (l.protocol, l.dst_port))
        }
        Unparsed::V6(offset) => {
            parse_l4_v6(frame, offset).map_or((0, 0), |l| (l.protocol, l.dst_port))
        }
    };
    let sent = take(
        tat,
        settings.event_cost,
        settings.event_capacity,
        now << TIME_SHIFT,
    ) && EVENTS
        .output::<DropEvent>(
            &DropEvent {
                timestamp_ns: now,
                source: v.source,
                ifindex: frame.ifindex,
                reason: v.reason as u32,
                rule: DEFAULT_LIMIT,
                dst_port,
                protocol,
                flags: v.flags,
            },
            0,
        )
        .is_ok();
    if !sent && let Some(n) = EVENTS_SUPPRESSED.get_ptr_mut(v.reason as u32) {
        // SAFETY: per-CPU slot.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn count(reason: Reason, len: usize) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot: no other CPU writes it, and we cannot be preempted here.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += len as u64;
        }
    }
}

/// Takes one packet and `len` bytes from the source's buckets; false if either is empty.
#[inline(always)]
fn take_tokens(key: &LimiterKey, len: usize) -> bool {
    let Some(limit) = LIMITS.get(key.limit) else {
        return true;
    };
    if limit.is_unlimited() {
        return true;
    }
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() } << TIME_SHIFT;
    let packet_cost = limit.packet_cost;
    let byte_cost = (len as u64 * limit.byte_cost_fp) >> BYTE_COST_FRAC_BITS;

    let Some(state) = LIMITER.get_ptr_mut(key) else {
        // First packet of this source: start its buckets with this packet taken.
        let fits = packet_cost <= limit.packet_capacity && byte_cost <= limit.byte_capacity;
        let (packet_tat, byte_tat) = if fits {
            (now + packet_cost, now + byte_cost)
        } else {
            (now, now)
        };
        let fresh = LimiterState {
            packet_tat,
            byte_tat,
            packets: 1,
            bytes: len as u64,
            drops: u64::from(!fits),
        };
        if LIMITER.insert(key, fresh, u64::from(BPF_NOEXIST)).is_ok() {
            return fits;
        }
        // Another CPU created it first: take from the bucket it made.
        return match LIMITER.get_ptr_mut(key) {
            Some(state) => take_and_count(state, limit, now, byte_cost, len),
            None => fits,
        };
    };
    take_and_count(state, limit, now, byte_cost, len)
}

#[inline(always)]
fn take_and_count(
    state: *mut LimiterState,
    limit: &RateLimit,
    now: u64,
    byte_cost: u64,
    len: usize,
) -> bool {
    let passed = take_both(state, limit, now, byte_cost);
    // SAFETY: a live map value; plain adds (see LimiterState).
    unsafe {
        (*state).packets += 1;
        (*state).bytes += len as u64;
        if !passed {
            (*state).drops += 1;
        }
    }
    passed
}

#[inline(always)]
fn take_both(state: *mut LimiterState, limit: &RateLimit, now: u64, byte_cost: u64) -> bool {
    // `state` points into a map value that stays valid for this program run.
    let packet_tat = unsafe { &raw mut (*state).packet_tat };
    let byte_tat = unsafe { &raw mut (*state).byte_tat };
    if !take(packet_tat, limit.packet_cost, limit.packet_capacity, now) {
        return false;
    }
    if !take(byte_tat, byte_cost, limit.byte_capacity, now) {
        // Give the packet token back: the frame is dropped, it used nothing.
        // SAFETY: aligned u64 inside a live map value.
        unsafe { atomic_xsub::<u64, u64, { Relaxed }>(packet_tat, limit.packet_cost) };
        return false;
    }
    true
}

/// Compare-and-swap retries before a contended take counts as over the limit.
const TAKE_RETRIES: usize = 4;

/// GCRA: the bucket conforms if its TAT, moved up to now and advanced by `cost`, stays
/// within `capacity` of now. A lost race re-reads and retries, so concurrent CPUs never
/// overwrite each other's takes.
#[inline(always)]
fn take(tat: *mut u64, cost: u64, capacity: u64, now: u64) -> bool {
    if cost == 0 {
        return true;
    }
    for _ in 0..TAKE_RETRIES {
        // An aligned 64-bit load cannot tear; the BPF backend has no atomic-load pattern
        // before CPU v4, and the compare-and-swap below catches a stale value anyway.
        // SAFETY: aligned u64 inside a live map value.
        let old = unsafe { core::ptr::read_volatile(tat) };
        let next = if old > now { old } else { now } + cost;
        if next - now > capacity {
            return false;
        }
        // SAFETY: as above.
        let (_, swapped) = unsafe { atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(tat, old, next) };
        if swapped {
            return true;
        }
    }
    false
}
