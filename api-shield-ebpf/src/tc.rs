//! The TC ingress (clsact) hook: the same verdict as XDP, for interfaces or kernels where
//! XDP is not wanted.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};

use crate::{
    maps::TRACE_TC,
    parse::Frame,
    trace::follow,
    verdict::{Action, judge},
};

/// Headers we may read, pulled into the skb's linear part first (a GRO'd or paged skb may
/// hold less there; bytes past the packet's end are simply absent).
const PULL_BYTES: u32 = 256;

#[classifier]
pub(crate) fn api_shield_tc(ctx: TcContext) -> i32 {
    let wire_len = ctx.len();
    // A failed pull leaves less to read: parsing then finds the frame short, never reads
    // out of bounds.
    let _ = ctx.pull_data(wire_len.min(PULL_BYTES));
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
        wire_len: wire_len as usize,
        // SAFETY: ctx.skb wraps the __sk_buff the kernel passed us.
        ifindex: unsafe { (*ctx.skb.skb).ingress_ifindex },
    };
    let (action, traced) = judge(&frame);
    if traced {
        // SAFETY: as in the XDP hook.
        unsafe { TRACE_TC.tail_call(&ctx, 0) };
    }
    match action {
        Action::Pass => TC_ACT_OK,
        Action::Drop => TC_ACT_SHOT,
    }
}

/// Follows a frame the TC hook judged while a trace runs; returns the hook's verdict.
#[classifier]
pub(crate) fn api_shield_tc_trace(ctx: TcContext) -> i32 {
    let wire_len = ctx.len();
    let _ = ctx.pull_data(wire_len.min(PULL_BYTES));
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
        wire_len: wire_len as usize,
        // SAFETY: ctx.skb wraps the __sk_buff the kernel passed us.
        ifindex: unsafe { (*ctx.skb.skb).ingress_ifindex },
    };
    if follow(&frame) {
        TC_ACT_SHOT
    } else {
        TC_ACT_OK
    }
}
