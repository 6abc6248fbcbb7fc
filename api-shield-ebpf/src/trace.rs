//! `api-shield trace`: while a trace runs, every packet from a traced source is reported
//! through aya-log, at most at the filter's rate, until its deadline. With none running,
//! the cost is the check of one word of an array the verifier inlines.

use api_shield_common::{
    events::EVENT_SOURCE_V6,
    trace::{TRACE_NETS, TraceFilter},
};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_log_ebpf::info;

use crate::{limiter::take, maps::TRACE};

/// What a trace record says about one packet.
pub(crate) struct Traced {
    pub(crate) source: [u8; 16],
    pub(crate) ifindex: u32,
    pub(crate) protocol: u8,
    pub(crate) src_port: u16,
    pub(crate) dst_port: u16,
    pub(crate) dropped: bool,
    /// The counter slot (reason, or would-drop reason).
    pub(crate) reason: u32,
    pub(crate) rule: u32,
    pub(crate) tokens: u64,
}

/// The running trace's filter, if any: the hot path's only cost.
#[inline(always)]
pub(crate) fn active() -> Option<*mut TraceFilter> {
    let filter = TRACE.get_ptr_mut(0)?;
    // SAFETY: a live map value; one aligned u32 load.
    (unsafe { (*filter).active } != 0).then_some(filter)
}

/// The index of the traced net holding `source`, if one does.
#[inline(always)]
pub(crate) fn matching_net(
    filter: *const TraceFilter,
    source: &[u8; 16],
    flags: u8,
) -> Option<u32> {
    let family = if flags & EVENT_SOURCE_V6 != 0 { 6 } else { 4 };
    // SAFETY: a live map value, read a word at a time.
    let active = unsafe { (*filter).active };
    let src = source.as_ptr().cast::<u32>();
    for i in 0..TRACE_NETS {
        if active & (1 << i) == 0 {
            continue;
        }
        // SAFETY: i < TRACE_NETS; the nets are 4-aligned inside the 8-aligned value, and
        // the source is the 4-aligned LimiterKey's address.
        let matches = unsafe {
            let net = &raw const (*filter).nets[i];
            let addr = (&raw const (*net).addr).cast::<u32>();
            let mask = (&raw const (*net).mask).cast::<u32>();
            (*net).family == family
                && (0..4)
                    .all(|w| src.add(w).read_unaligned() & mask.add(w).read() == addr.add(w).read())
        };
        if matches {
            return Some(i as u32);
        }
    }
    None
}

/// Reports the packet if it comes from a traced source, the trace has not outlived its
/// deadline, and the trace's rate allows (else it is counted as missed).
#[inline(always)]
pub(crate) fn report(filter: *mut TraceFilter, net: u32, t: &Traced) {
    // SAFETY: a helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY (both blocks): a live map value; aligned u64 fields.
    if now > unsafe { (*filter).until_ns } {
        return;
    }
    let (cost, capacity) = unsafe { ((*filter).cost_ns, (*filter).capacity_ns) };
    if !take(unsafe { &raw mut (*filter).tat_ns }, cost, capacity, now) {
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                &raw mut (*filter).missed,
                1,
            )
        };
        return;
    }
    let source = core::net::Ipv6Addr::from(t.source);
    info!(
        &(),
        target: "api_shield_trace",
        "net={} time={} if={} src={} proto={} sport={} dport={} drop={} reason={} rule={} tokens={}",
        net,
        now,
        t.ifindex,
        source,
        t.protocol,
        t.src_port,
        t.dst_port,
        u8::from(t.dropped),
        t.reason,
        t.rule,
        t.tokens
    );
}
