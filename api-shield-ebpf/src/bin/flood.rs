//! `cargo xtask flood`'s generator: run with BPF_PROG_TEST_RUN in live-frames mode, it
//! sends its frame out of an interface (`bpf_redirect`) as an xdp_frame, with no skb, the
//! way a NIC hands frames to XDP. Optionally it draws each frame's IPv4 source at random
//! (`bpf_get_prandom_u32() & mask`) and fixes the header checksum. Never loaded by the daemon.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::XDP_ABORTED,
    helpers::{bpf_get_prandom_u32, bpf_redirect},
    macros::{map, xdp},
    maps::Array,
    programs::XdpContext,
};

/// Index 0: the interface to send out of; index 1: the random part of the source (0: none).
#[map(name = "FLOOD_SETTINGS")]
static FLOOD_SETTINGS: Array<u32> = Array::with_max_entries(2, 0);

const SOURCE_AT: usize = 14 + 12;
const CHECKSUM_AT: usize = 14 + 10;

/// One's-complement sum folded to 16 bits.
#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[xdp]
pub(crate) fn flood_generator(ctx: XdpContext) -> u32 {
    let ifindex = FLOOD_SETTINGS.get(0).copied().unwrap_or(0);
    let mask = FLOOD_SETTINGS.get(1).copied().unwrap_or(0);
    let (start, end) = (ctx.data(), ctx.data_end());
    if mask != 0 && start + SOURCE_AT + 4 <= end {
        let src = (start + SOURCE_AT) as *mut u32;
        let csum = (start + CHECKSUM_AT) as *mut u16;
        // SAFETY: both fields lie inside the frame (checked above); a helper without
        // preconditions.
        unsafe {
            let old = u32::from_be(core::ptr::read_unaligned(src));
            let new = (old & !mask) | (bpf_get_prandom_u32() & mask);
            core::ptr::write_unaligned(src, new.to_be());
            // RFC 1624: HC' = ~(~HC + ~m + m'), over the two 16-bit halves.
            let hc = u16::from_be(core::ptr::read_unaligned(csum));
            let sum = u32::from(!hc)
                + u32::from(!(old >> 16) as u16)
                + u32::from(!(old as u16))
                + (new >> 16)
                + (new & 0xffff);
            core::ptr::write_unaligned(csum, (!fold(sum)).to_be());
        }
    }
    if ifindex == 0 {
        return XDP_ABORTED;
    }
    // SAFETY: a helper without preconditions; returns XDP_REDIRECT.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}

// Its own panic handler and licence: this object must not link the data plane library,
// whose programs and maps would come with it.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
