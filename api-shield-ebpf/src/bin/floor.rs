//! The benchmarks' floor: parses Ethernet and the IPv4/IPv6 source address, returns
//! XDP_PASS. What any XDP filter pays at least; api-shield's costs are reported against it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action::XDP_PASS,
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};

#[xdp]
pub(crate) fn bench_floor(ctx: XdpContext) -> u32 {
    read_source(&ctx);
    XDP_PASS
}

/// Parses Ethernet and reads the IPv4/IPv6 source address's first word, as any filter
/// must (volatile: not optimised away).
#[inline(always)]
fn read_source(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + 14 > end {
        return 0;
    }
    // SAFETY: every read below is bounds-checked against the frame's end first.
    let ether_type = unsafe { core::ptr::read_unaligned((start + 12) as *const u16) };
    let (offset, len) = match u16::from_be(ether_type) {
        0x0800 => (14 + 12, 4),
        0x86dd => (14 + 8, 16),
        _ => return 0,
    };
    if start + offset + len > end {
        return 0;
    }
    unsafe { core::ptr::read_volatile((start + offset) as *const u32) }
}

/// Frames `bench_drop` dropped, per CPU: its count is checked like every receiver's.
#[map(name = "FLOOR_DROPS")]
static FLOOR_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// The end-to-end flood's floor: counts and drops every frame, the least a receiver that
/// reports what it did can do.
#[xdp]
pub(crate) fn bench_drop(_ctx: XdpContext) -> u32 {
    count_drop()
}

#[inline(always)]
fn count_drop() -> u32 {
    if let Some(n) = FLOOR_DROPS.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot; nothing else writes it on this CPU meanwhile.
        unsafe { *n += 1 };
    }
    aya_ebpf::bindings::xdp_action::XDP_DROP
}

/// `bench_drop` after reading the frame's source address, as any filter must, where
/// `bench_drop` never touches the frame: beside it, what fetching the frame's bytes costs
/// (with the generator on another CPU, they were last written there).
#[xdp]
pub(crate) fn bench_read_drop(ctx: XdpContext) -> u32 {
    read_source(&ctx);
    count_drop()
}

/// Rounds of busy work `bench_busy_drop` does per frame (index 0), set by the bench.
#[map(name = "BUSY_ROUNDS")]
static BUSY_ROUNDS: Array<u32> = Array::with_max_entries(1, 0);

/// The most rounds `bench_busy_drop` does, whatever BUSY_ROUNDS says (a bound the
/// verifier can walk).
const MAX_BUSY_ROUNDS: u32 = 256;

/// `bench_read_drop` after a chain of dependent arithmetic as long as the bench sets: a
/// receiver that costs what a filter costs by BPF_PROG_TEST_RUN but reads no map but its
/// own and no more of the frame than the floor. Beside a filter of the same cost, it
/// tells what the receive path around the program does to any program of that length.
#[xdp]
pub(crate) fn bench_busy_drop(ctx: XdpContext) -> u32 {
    let word = read_source(&ctx);
    let rounds = BUSY_ROUNDS.get(0).copied().unwrap_or(0);
    let mut x = word;
    for i in 0..MAX_BUSY_ROUNDS {
        if i >= rounds {
            break;
        }
        // Each round needs the last one's result: no unrolling or vectorising shortens it.
        x = (x ^ (x >> 15)).wrapping_mul(0x9e37_79b1) ^ i;
    }
    // Kept: the result is used, so the chain is not optimised away.
    core::hint::black_box(x);
    count_drop()
}

/// Passes every frame on to the stack, so netfilter peers see the same receive path.
#[xdp]
pub(crate) fn bench_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
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
