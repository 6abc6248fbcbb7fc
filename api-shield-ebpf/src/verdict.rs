//! The verdict, shared by every hook: lists, then the token bucket, then counters.

// The bpf target declares no compare-and-swap, so `core::sync::atomic` offers none; the
// intrinsics still emit LLVM atomics, which BPF CPU v3 (build.rs) lowers to BPF_ATOMIC ops.
use core::intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xsub};

use api_shield_common::{
    counters::{COUNTER_SLOTS, Counter, Reason},
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
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};

use crate::parse::{Frame, L3, parse_l3, parse_l4_v4, parse_l4_v6};

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

/// What to do with the frame.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    Pass,
    Drop,
}

/// Decides and counts. Never fails: every path ends in a counted verdict.
#[inline(always)]
pub(crate) fn judge(frame: &Frame) -> Action {
    let (action, reason) = decide(frame);
    count(reason, frame.len());
    action
}

#[inline(always)]
fn decide(frame: &Frame) -> (Action, Reason) {
    let mut key = LimiterKey {
        addr: [0; 16],
        limit: DEFAULT_LIMIT,
    };
    // Lists first: a listed source gets its verdict whatever follows the IP header.
    let l4 = match parse_l3(frame) {
        L3::NonIp => return (Action::Pass, Reason::NonIp),
        L3::Malformed => return malformed(),
        L3::V4 { src, info } => {
            match LIST_V4.get(Key::new(32, src)) {
                Some(&LIST_ALLOW) => return (Action::Pass, Reason::Allowlisted),
                Some(&LIST_BLOCK) => return (Action::Drop, Reason::Blocklisted),
                _ => {}
            }
            key.addr[10] = 0xff;
            key.addr[11] = 0xff;
            key.addr[12..].copy_from_slice(&src);
            parse_l4_v4(frame, &info)
        }
        L3::V6 { src, offset } => {
            match LIST_V6.get(Key::new(128, src)) {
                Some(&LIST_ALLOW) => return (Action::Pass, Reason::Allowlisted),
                Some(&LIST_BLOCK) => return (Action::Drop, Reason::Blocklisted),
                _ => {}
            }
            key.addr = src;
            parse_l4_v6(frame, offset)
        }
    };
    // The limiter applies even to frames malformed past the IP header, so that
    // mangling the transport header is no way around a source's limit.
    if !take_tokens(&key, frame.len()) {
        return (Action::Drop, Reason::RateLimited);
    }
    match l4 {
        Some(_) => (Action::Pass, Reason::Passed),
        None => malformed(),
    }
}

#[inline(always)]
fn malformed() -> (Action, Reason) {
    let drop = SETTINGS.get(0).is_some_and(|s| s.drop_malformed != 0);
    let action = if drop { Action::Drop } else { Action::Pass };
    (action, Reason::Malformed)
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
        };
        if LIMITER.insert(key, &fresh, u64::from(BPF_NOEXIST)).is_ok() {
            return fits;
        }
        // Another CPU created it first: take from the bucket it made.
        return match LIMITER.get_ptr_mut(key) {
            Some(state) => take_both(state, limit, now, byte_cost),
            None => fits,
        };
    };
    take_both(state, limit, now, byte_cost)
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
