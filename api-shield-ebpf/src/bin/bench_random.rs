//! The benchmarks' spoofed-source variant: the whole data plane (the library, with its
//! hooks and maps), plus programs that overwrite the frame's source address with a random one
//! (`bpf_get_prandom_u32() & mask`) first: `bench_random` then judges the frame as
//! api-shield does, `bench_prandom` only returns XDP_PASS. Their difference is api-shield's
//! cost with cold caches, as under a spoofed flood. `bench_handoff` instead tail-calls
//! another program whole (the floor, api-shield's own, xdp-filter's), measured against
//! `bench_pass` in its place. Never loaded by the daemon.
#![no_std]
#![no_main]

use api_shield_ebpf::{
    parse::Frame,
    verdict::{Action, judge, judge_untraced},
};
use aya_ebpf::{
    bindings::xdp_action::{XDP_ABORTED, XDP_DROP, XDP_PASS},
    helpers::bpf_get_prandom_u32,
    macros::{map, xdp},
    maps::{Array, ProgramArray},
    programs::XdpContext,
};

/// The random part of the source: index 0 holds the mask (0xffff: 64k sources); index 1
/// which 32 bits of an IPv6 source it applies to, counted from the end (0: the last 32).
#[map(name = "BENCH_MASK")]
static BENCH_MASK: Array<u32> = Array::with_max_entries(2, 0);

/// Replaces the masked bits of an untagged IPv4 source, or of one 32-bit word of an IPv6
/// source, with random ones.
#[inline(always)]
fn randomize_source(ctx: &XdpContext) {
    let (start, end) = (ctx.data(), ctx.data_end());
    let mask = BENCH_MASK.get(0).copied().unwrap_or(0);
    if start + 14 > end {
        return;
    }
    // SAFETY: bounds-checked above and below before each access.
    let ether_type = u16::from_be(unsafe { core::ptr::read_unaligned((start + 12) as *const u16) });
    let at = match ether_type {
        0x0800 => 14 + 12,
        // Masked to 0..=3, so the verifier sees the offset bounded.
        0x86dd => 14 + 8 + 4 * (3 - (BENCH_MASK.get(1).copied().unwrap_or(0) & 3) as usize),
        _ => return,
    };
    if start + at + 4 > end {
        return;
    }
    let p = (start + at) as *mut u32;
    // SAFETY: a helper without preconditions; the 4 bytes at `p` lie inside the frame.
    unsafe {
        let random = bpf_get_prandom_u32() & mask;
        let old = u32::from_be(core::ptr::read_unaligned(p));
        core::ptr::write_unaligned(p, ((old & !mask) | random).to_be());
    }
}

#[xdp]
pub(crate) fn bench_random(ctx: XdpContext) -> u32 {
    randomize_source(&ctx);
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
        wire_len: ctx.data_end() - ctx.data(),
        ifindex: 0,
    };
    match judge(&frame).0 {
        Action::Pass => XDP_PASS,
        Action::Drop => XDP_DROP,
    }
}

#[xdp]
pub(crate) fn bench_prandom(ctx: XdpContext) -> u32 {
    randomize_source(&ctx);
    XDP_PASS
}

/// The program `bench_handoff` hands each frame to: set by the bench to the floor, to
/// api-shield's own program, to a peer's, or to `bench_pass` for the harness alone.
#[map(name = "BENCH_NEXT")]
static BENCH_NEXT: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Randomises the source as `bench_prandom` does, then tail-calls the program in
/// `BENCH_NEXT`: so any XDP program, a peer's too, is measured on random sources whole,
/// unchanged. XDP_ABORTED if the slot is empty, so a run that measured nothing says so.
#[xdp]
pub(crate) fn bench_handoff(ctx: XdpContext) -> u32 {
    randomize_source(&ctx);
    // SAFETY: a tail call does not return on success; the context is the one we got.
    unsafe { BENCH_NEXT.tail_call(&ctx, 0) };
    XDP_ABORTED
}

/// Passes: `bench_handoff`'s target when the harness alone is measured.
#[xdp]
pub(crate) fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// api-shield's program without the trace check (`judge_untraced`): measured against the
/// real one on the same frames, the check's cost when no trace runs.
#[xdp]
pub(crate) fn bench_untraced(ctx: XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
        wire_len: ctx.data_end() - ctx.data(),
        // SAFETY: ctx.ctx is the xdp_md the kernel passed us.
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
    };
    match judge_untraced(&frame) {
        Action::Pass => XDP_PASS,
        Action::Drop => XDP_DROP,
    }
}
