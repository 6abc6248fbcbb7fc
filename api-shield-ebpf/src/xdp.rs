//! The XDP hook.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    macros::xdp,
    programs::XdpContext,
};

use crate::{
    parse::Frame,
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
    match judge(&frame) {
        Action::Pass => XDP_PASS,
        Action::Drop => XDP_DROP,
    }
}
