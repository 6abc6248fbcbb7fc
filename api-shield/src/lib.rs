//! api-shield: an XDP rate limiter and firewall. This library is the controller's core;
//! `main.rs` is the daemon and CLI on top of it.

pub mod api;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod events;
pub mod explain;
pub mod feeds;
pub mod lists;
pub mod metrics;
pub mod penalty;
pub mod prefix;
pub mod privileges;
pub mod shield;
pub mod trace;

/// The compiled data plane, built from `api-shield-ebpf` by build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/api-shield"));

/// The benchmarks' floor program (parse Ethernet + IP source, XDP_PASS), built with the
/// data plane; only `cargo xtask bench` loads it.
#[doc(hidden)]
pub static BENCH_FLOOR_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/floor"));

/// The benchmarks' spoofed-source variant: the data plane plus programs that randomise the
/// source first (`bench_random`, `bench_prandom`); only `cargo xtask bench` loads it.
#[doc(hidden)]
pub static BENCH_RANDOM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/bench_random"));

/// `cargo xtask flood`'s live-frames generator (redirects its frame out of an interface).
#[doc(hidden)]
pub static FLOOD_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flood"));

/// A program the verifier refuses (an unchecked read of the frame): the tests' way to
/// see how a refusal is reported.
#[doc(hidden)]
pub static REFUSED_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/refused"));
