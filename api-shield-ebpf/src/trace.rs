//! `api-shield trace`: while a trace runs, every packet from a traced source is reported
//! through aya-log, at most at the filter's rate, until its deadline. With none running,
//! the cost is the check of one word of an array the verifier inlines.
//!
//! While one runs, the hook hands every judged frame to a program of its own
//! (`api_shield_trace`, `api_shield_tc_trace`, by tail call), which matches the source,
//! reads the ports and the bucket, writes the record and returns the hook's verdict. Kept
//! apart, its paths are verified once, not once for each of the hook's.

use api_shield_common::{
    events::EVENT_SOURCE_V6,
    limiter::LimiterKey,
    settings::Settings,
    trace::{NO_TOKENS, TRACE_NETS, TraceFilter},
};
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::map, maps::PerCpuArray};
use aya_log_ebpf::info;

use crate::{
    limiter::{limiter_key, packets_left, take},
    maps::{LIMITS, SETTINGS, TRACE},
    parse::{Frame, L3, L4, parse_l3, parse_l4_v4, parse_l4_v6},
    verdict::mask_key,
};

/// What the hook knew of a frame it hands to the trace program, which reads the rest from
/// the frame itself.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Judged {
    /// The source (IPv4 as ::ffff:a.b.c.d).
    pub source: [u8; 16],
    /// `EVENT_SOURCE_*` flags.
    pub flags: u32,
    /// The counter slot (a reason, or a would-drop reason).
    pub reason: u32,
    /// The limit slot.
    pub rule: u32,
    /// Non-zero: the hook drops the frame.
    pub dropped: u32,
    /// Non-zero: the limiter decided (a bucket to read).
    pub limited: u32,
}

/// The frame the hook hands over, per CPU: a tail call carries nothing but the context.
#[map]
static TRACE_JUDGED: PerCpuArray<Judged> = PerCpuArray::with_max_entries(1, 0);

/// Whether a trace runs: the hook's only cost when none does.
#[inline(always)]
pub(crate) fn active() -> bool {
    TRACE.get(0).is_some_and(|f| f.active != 0)
}

/// Leaves what the hook knew for the trace program; false if it could not.
#[inline(always)]
pub(crate) fn hand_over(judged: &Judged) -> bool {
    match TRACE_JUDGED.get_ptr_mut(0) {
        Some(slot) => {
            // SAFETY: this CPU's slot, read by the program it tail-calls next.
            unsafe { *slot = *judged };
            true
        }
        None => false,
    }
}

/// The trace program's work: reports the frame the hook handed over if its source is
/// traced, within the trace's deadline and rate (else counts it as missed). Returns
/// whether the hook drops the frame.
#[inline(always)]
pub(crate) fn follow(frame: &Frame) -> bool {
    let Some(judged) = TRACE_JUDGED.get(0) else {
        return false;
    };
    let judged = *judged;
    let dropped = judged.dropped != 0;
    let Some(filter) = TRACE.get_ptr_mut(0) else {
        return dropped;
    };
    let Some(net) = matching_net(filter, &judged.source, judged.flags) else {
        return dropped;
    };
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY (both blocks): a live map value; aligned u64 fields.
    if now > unsafe { (*filter).until_ns } {
        return dropped;
    }
    let (cost, capacity) = unsafe { ((*filter).cost_ns, (*filter).capacity_ns) };
    if !take(unsafe { &raw mut (*filter).tat_ns }, cost, capacity, now) {
        // SAFETY: as above.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                &raw mut (*filter).missed,
                1,
            )
        };
        return dropped;
    }
    let l4 = match parse_l3(frame) {
        L3::V4 { info, .. } => parse_l4_v4(frame, &info),
        L3::V6 { offset, .. } => parse_l4_v6(frame, offset),
        _ => L4::INCOMPLETE,
    };
    let tokens = if judged.limited != 0 {
        tokens_left(&judged)
    } else {
        NO_TOKENS
    };
    let source = core::net::Ipv6Addr::from(judged.source);
    info!(
        &(),
        target: "api_shield_trace",
        "net={} time={} if={} src={} proto={} sport={} dport={} drop={} reason={} rule={} tokens={}",
        net,
        now,
        frame.ifindex,
        source,
        l4.protocol,
        l4.src_port,
        l4.dst_port,
        judged.dropped,
        judged.reason,
        judged.rule,
        tokens
    );
    dropped
}

/// The first of the filter's nets that holds `source`.
#[inline(always)]
fn matching_net(filter: *const TraceFilter, source: &[u8; 16], flags: u32) -> Option<u32> {
    let family = if flags & u32::from(EVENT_SOURCE_V6) != 0 {
        6
    } else {
        4
    };
    // SAFETY: a live map value, read a word at a time.
    let active = unsafe { (*filter).active };
    let src = source.as_ptr().cast::<u32>();
    for i in 0..TRACE_NETS {
        if active & (1 << i) == 0 {
            continue;
        }
        // SAFETY: i < TRACE_NETS; the nets are 4-aligned in the 8-aligned value; the
        // source is read unaligned.
        let hit = unsafe {
            let net = &raw const (*filter).nets[i];
            let addr = (&raw const (*net).addr).cast::<u32>();
            let mask = (&raw const (*net).mask).cast::<u32>();
            (*net).family == family
                && (0..4)
                    .all(|w| src.add(w).read_unaligned() & mask.add(w).read() == addr.add(w).read())
        };
        if hit {
            return Some(i as u32);
        }
    }
    None
}

/// The packets left in the bucket the frame met.
#[inline(always)]
fn tokens_left(judged: &Judged) -> u64 {
    let Some(limit) = LIMITS.get(judged.rule) else {
        return NO_TOKENS;
    };
    if limit.is_unlimited() {
        return NO_TOKENS;
    }
    let Some(settings) = SETTINGS.get(0) else {
        return NO_TOKENS;
    };
    let settings: &Settings = settings;
    let mut key: LimiterKey = limiter_key([0; 4], judged.rule);
    key.addr = judged.source;
    mask_key(&mut key, limit, judged.flags as u8);
    packets_left(&key, limit, settings.limiter_seed, settings.limiter_sets)
}
