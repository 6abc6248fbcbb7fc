//! api-shield's data plane: the maps, the frame parser, the list lookups, the limiter and
//! the verdict, with one source file per hook (XDP, TC). Each program object links this
//! library: the daemon's (`main.rs`) and the benchmarks' (`bin/`).
#![no_std]
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "atomic intrinsics: the bpf target has no AtomicU64 CAS"
)]

pub mod counters;
pub mod limiter;
pub mod lists;
pub mod maps;
pub mod parse;
pub mod tc;
pub mod trace;
pub mod verdict;
pub mod xdp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable: the verifier rejects programs that could panic.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
