//! The token buckets: GCRA on a set-associative table of buckets in an array map, which
//! the program searches itself (no kernel call), with compare-and-swap takes.

// The bpf target declares no compare-and-swap, so `core::sync::atomic` offers none; the
// intrinsics still emit LLVM atomics, which BPF CPU v3 (build.rs) lowers to BPF_ATOMIC ops.
use core::{
    intrinsics::{AtomicOrdering::Relaxed, atomic_cxchg, atomic_xsub},
    mem::MaybeUninit,
};

use api_shield_common::{
    counters::LIMITER_CREATED_SLOT,
    events::EVENT_SOURCE_V6,
    limiter::{
        BYTE_COST_FRAC_BITS, INITIAL_JIFFIES_SECS, LIMIT_TICK_CLOCK, LIMITER_WAYS, LimiterKey,
        LimiterSlot, LimiterState, RateLimit, TIME_SHIFT, set_of,
    },
    rules::{PENALTY_V6, PenaltyEvent},
};
use aya_ebpf::helpers::{bpf_ktime_get_ns, generated::bpf_jiffies64};

use crate::{
    counters::count,
    maps::{LIMITER, PENALTIES},
};

/// A limiter key written as five word stores: a `[0; 16]` initialiser compiles to a call
/// of a memset subprogram, a cost per packet the stores do not have.
#[inline(always)]
pub(crate) fn limiter_key(addr: [u32; 4], limit: u32) -> LimiterKey {
    let mut key = MaybeUninit::<LimiterKey>::uninit();
    let words = key.as_mut_ptr().cast::<u32>();
    // SAFETY: LimiterKey is #[repr(C)], 16 bytes then a u32, 4-aligned: five u32 slots,
    // all written before the key is read. Volatile: kept as stores, not merged into memset.
    unsafe {
        words.write_volatile(addr[0]);
        words.add(1).write_volatile(addr[1]);
        words.add(2).write_volatile(addr[2]);
        words.add(3).write_volatile(addr[3]);
        words.add(4).write_volatile(limit);
        key.assume_init()
    }
}

/// Takes one packet and `len` bytes from the bucket of `key`; false if either is empty.
/// With `penalize`, a drop also counts toward the bucket's penalty window.
#[inline(always)]
pub(crate) fn take_tokens(
    key: &LimiterKey,
    limit: &RateLimit,
    len: usize,
    penalize: bool,
    flags: u8,
    limiter_seed: u64,
    limiter_sets: u32,
) -> bool {
    let now = bucket_time(limit.flags & LIMIT_TICK_CLOCK != 0, limit.tick_ns);
    let byte_cost = (len as u64 * limit.byte_cost_fp) >> BYTE_COST_FRAC_BITS;
    // Read as the five words it was written as, one load each, rather than rebuilt from
    // its bytes as `LimiterKey::words` does for the controller.
    // SAFETY: LimiterKey is five u32 slots, 4-aligned (see `limiter_key`).
    let words = unsafe {
        let w = (key as *const LimiterKey).cast::<u32>();
        [
            w.read(),
            w.add(1).read(),
            w.add(2).read(),
            w.add(3).read(),
            w.add(4).read(),
        ]
    };
    let set_index = set_of(words, limiter_seed, limiter_sets);
    let Some(set) = LIMITER.get_ptr_mut(set_index) else {
        // No table yet (the controller writes its size before attaching): no bucket.
        return true;
    };
    let slots = set.cast::<LimiterSlot>();
    // A hit is the bucket; on a miss, the least busy way is replaced (an empty one first).
    let mut victim = slots;
    let mut victim_busy = u64::MAX;
    for way in 0..LIMITER_WAYS {
        // SAFETY: `way` < LIMITER_WAYS: a slot inside the live map value.
        let slot = unsafe { slots.add(way) };
        if unsafe { (*slot).occupied } == 0 {
            if victim_busy != 0 {
                victim = slot;
                victim_busy = 0;
            }
            continue;
        }
        if same_key(slot, &words) {
            let state = unsafe { &raw mut (*slot).state };
            return take_and_count(state, key, limit, now, byte_cost, len, penalize, flags);
        }
        // Busy until its later TAT: a bucket whose TATs are past is full again, so
        // replacing it loses no limiting, only its counts.
        let busy = unsafe {
            let s = &raw const (*slot).state;
            let (p, b) = ((*s).packet_tat, (*s).byte_tat);
            if p > b { p } else { b }
        };
        if busy < victim_busy {
            victim = slot;
            victim_busy = busy;
        }
    }
    new_bucket(victim, &words, limit, now, byte_cost, len)
}

/// Whether `slot` holds the bucket of the key `words`.
#[inline(always)]
fn same_key(slot: *const LimiterSlot, words: &[u32; 5]) -> bool {
    // SAFETY: the key starts the 8-aligned slot: five u32.
    let stored = slot.cast::<u32>();
    unsafe {
        stored.read_volatile() == words[0]
            && stored.add(1).read_volatile() == words[1]
            && stored.add(2).read_volatile() == words[2]
            && stored.add(3).read_volatile() == words[3]
            && stored.add(4).read_volatile() == words[4]
    }
}

/// Starts the bucket of a source seen first (or again after its bucket was replaced) in
/// `slot`, with this packet taken. Two CPUs starting buckets in one slot at once may leave
/// it to either, or to neither (a torn key, found by no one, replaced in its turn): a
/// source then starts again with a full bucket, as after an LRU eviction.
#[inline(always)]
fn new_bucket(
    slot: *mut LimiterSlot,
    words: &[u32; 5],
    limit: &RateLimit,
    now: u64,
    byte_cost: u64,
    len: usize,
) -> bool {
    let packet_cost = limit.packet_cost;
    let fits = packet_cost <= limit.packet_capacity && byte_cost <= limit.byte_capacity;
    let (packet_tat, byte_tat) = if fits {
        (now + packet_cost, now + byte_cost)
    } else {
        (now, now)
    };
    // SAFETY: `slot` is one of the live map value's slots; word stores, as in
    // [`limiter_key`], so no memset or memcpy call is emitted.
    unsafe {
        let key = slot.cast::<u32>();
        for (i, w) in words.iter().enumerate() {
            key.add(i).write_volatile(*w);
        }
        (*slot).occupied = 1;
        let s = &raw mut (*slot).state;
        (*s).packet_tat = packet_tat;
        (*s).byte_tat = byte_tat;
        (*s).packets = 1;
        (*s).bytes = len as u64;
        (*s).drops = u64::from(!fits);
        (*s).window_start = now;
        (*s).window_drops = u64::from(!fits);
    }
    count(LIMITER_CREATED_SLOT, 0);
    fits
}

/// Now, in bucket time: from the kernel tick (`tick_ns` apart) or the nanosecond clock
/// (see [`LIMIT_TICK_CLOCK`]).
#[inline(always)]
pub(crate) fn bucket_time(tick_clock: bool, tick_ns: u32) -> u64 {
    let ns = if tick_clock {
        // Ticks since boot (jiffies start 300 s of ticks short of 2^32) times the tick:
        // the nanosecond clock's scale and origin, behind it by a constant under a second,
        // so a reload that moves a limit between the clocks barely disturbs its buckets.
        // SAFETY: a helper without preconditions (the verifier inlines it as one load).
        let jiffies = unsafe { bpf_jiffies64() };
        jiffies
            .wrapping_sub(1 << 32)
            .wrapping_mul(u64::from(tick_ns))
            .wrapping_add(INITIAL_JIFFIES_SECS * 1_000_000_000)
    } else {
        // SAFETY: a helper without preconditions.
        unsafe { bpf_ktime_get_ns() }
    };
    ns << TIME_SHIFT
}

#[allow(
    clippy::too_many_arguments,
    reason = "the hot path passes scalars, not a struct"
)]
#[inline(always)]
fn take_and_count(
    state: *mut LimiterState,
    key: &LimiterKey,
    limit: &RateLimit,
    now: u64,
    byte_cost: u64,
    len: usize,
    penalize: bool,
    flags: u8,
) -> bool {
    let passed = take_both(state, limit, now, byte_cost);
    // SAFETY: a live map value; plain adds (see LimiterState).
    unsafe {
        (*state).packets += 1;
        (*state).bytes += len as u64;
        if !passed {
            (*state).drops += 1;
            if penalize {
                count_violation(state, key, limit, now, flags);
            }
        }
    }
    passed
}

/// Counts a drop in the bucket's penalty window; the drop that goes past
/// `penalty_after` reports the bucket's prefix, once per window.
#[inline(always)]
unsafe fn count_violation(
    state: *mut LimiterState,
    key: &LimiterKey,
    limit: &RateLimit,
    now: u64,
    flags: u8,
) {
    // SAFETY (whole body): `state` is a live map value; plain read-modify-writes, which
    // two CPUs may race on: at worst a report comes a drop early or late.
    let start = unsafe { (*state).window_start };
    let drops = if now.wrapping_sub(start) > limit.penalty_window {
        unsafe { (*state).window_start = now };
        1
    } else {
        (unsafe { (*state).window_drops }) + 1
    };
    unsafe { (*state).window_drops = drops };
    if drops != u64::from(limit.penalty_after) + 1 {
        return;
    }
    let v6 = flags & EVENT_SOURCE_V6 != 0;
    // A full ring loses this report; the next window reports again.
    let _ = PENALTIES.output::<PenaltyEvent>(
        &PenaltyEvent {
            timestamp_ns: now >> TIME_SHIFT,
            addr: key.addr,
            limit: key.limit,
            prefix_len: u32::from(if v6 { limit.prefix_v6 } else { limit.prefix_v4 }),
            drops,
            flags: if v6 { PENALTY_V6 } else { 0 },
            _pad: 0,
        },
        0,
    );
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
pub(crate) fn take(tat: *mut u64, cost: u64, capacity: u64, now: u64) -> bool {
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

/// The whole packets the bucket of `key` holds now (a trace reports it): a bucket the
/// table does not hold (new, or replaced) is full.
#[inline(always)]
pub(crate) fn packets_left(key: &LimiterKey, limit: &RateLimit, seed: u64, sets: u32) -> u64 {
    if limit.packet_cost == 0 {
        return api_shield_common::trace::NO_TOKENS;
    }
    let full = limit.packet_capacity / limit.packet_cost;
    // SAFETY: LimiterKey is five u32 slots, 4-aligned (see `limiter_key`).
    let words = unsafe {
        let w = (key as *const LimiterKey).cast::<u32>();
        [
            w.read(),
            w.add(1).read(),
            w.add(2).read(),
            w.add(3).read(),
            w.add(4).read(),
        ]
    };
    let Some(set) = LIMITER.get_ptr_mut(set_of(words, seed, sets)) else {
        return full;
    };
    let slots = set.cast::<LimiterSlot>();
    for way in 0..LIMITER_WAYS {
        // SAFETY: `way` < LIMITER_WAYS: a slot inside the live map value.
        let slot = unsafe { slots.add(way) };
        if unsafe { (*slot).occupied } != 0 && same_key(slot, &words) {
            let now = bucket_time(limit.flags & LIMIT_TICK_CLOCK != 0, limit.tick_ns);
            // SAFETY: as above; one aligned u64 load.
            let tat = unsafe { core::ptr::read_volatile(&raw const (*slot).state.packet_tat) };
            let used = tat.saturating_sub(now);
            return limit.packet_capacity.saturating_sub(used) / limit.packet_cost;
        }
    }
    full
}
