//! A program the verifier must refuse: it reads the frame without a bounds check. The
//! tests load it to check how a refusal is reported; nothing else does.
#![no_std]
#![no_main]

use aya_ebpf::{macros::xdp, programs::XdpContext};

/// Named as the data plane's XDP program, so the controller's loader takes it.
#[xdp]
pub(crate) fn api_shield(ctx: XdpContext) -> u32 {
    // SAFETY: none, on purpose: this unchecked read is what the verifier refuses.
    unsafe { core::ptr::read_volatile(ctx.data() as *const u32) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
