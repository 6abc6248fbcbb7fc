//! The XDP hook.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};

use crate::{
    maps::TRACE_XDP,
    parse::Frame,
    trace::follow,
    verdict::{Action, judge},
};

#[xdp]
pub(crate) fn api_shield(ctx: XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
        wire_len: ctx.data_end() - ctx.data(),
        // SAFETY: ctx.ctx is the xdp_md the kernel passed us.
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
    };
    let (action, traced) = judge(&frame);
    if traced {
        // SAFETY: a tail call does not return on success; the context is ours. On failure
        // (no trace program) the verdict stands untraced.
        unsafe { TRACE_XDP.tail_call(&ctx, 0) };
    }
    match action {
        Action::Pass => XDP_PASS,
        Action::Drop => XDP_DROP,
    }
}

/// Follows a frame the hook judged while a trace runs; returns the hook's verdict.
#[xdp]
pub(crate) fn api_shield_trace(ctx: XdpContext) -> u32 {
    let frame = Frame {
        start: ctx.data(),
        end: ctx.data_end(),
        wire_len: ctx.data_end() - ctx.data(),
        // SAFETY: ctx.ctx is the xdp_md the kernel passed us.
        ifindex: unsafe { (*ctx.ctx).ingress_ifindex },
    };
    if follow(&frame) { XDP_DROP } else { XDP_PASS }
}
