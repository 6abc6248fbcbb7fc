//! Developer and operator tasks: `cargo xtask <setup|demo|test|stress|flood|bench>`.

mod mutants;
mod setup;
mod stress;
mod tasks;
mod util;
mod vm;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "api-shield development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install rust-src, bpf-linker and the Debian packages the tests use (idempotent).
    Setup,
    /// Setup if needed, build, and show the shield working in a throwaway network sandbox.
    Demo,
    /// Setup if needed, then run every test: lints, unit, kernel and network tests (root),
    /// then the kernel-level tests on the oldest kernel claimed (6.1), in a VM.
    Test {
        /// Longer runs of the fuzzing and fault tests (10x the frames, 5x the kills).
        #[arg(long)]
        soak: bool,
        /// Only the kernel-level tests, in a VM booted with this kernel: a Debian series
        /// (6.1, 6.12) or the path of a kernel image. Repeatable.
        #[arg(long = "kernel", value_name = "VERSION|IMAGE")]
        kernels: Vec<String>,
        /// Only this machine's kernel: skip the VM run.
        #[arg(long, conflicts_with = "kernels")]
        host_only: bool,
    },
    /// The timing-sensitive tests (rates, TTLs, windows, kills timed into a sync) ROUNDS
    /// times beside a CPU hog on every CPU, then the whole host suite SUITE times so (root).
    Stress {
        #[arg(long, default_value_t = 20)]
        rounds: u32,
        #[arg(long, default_value_t = 0)]
        suite: u32,
    },
    /// The end-to-end flood through a veth (live-frames generator) against the floor,
    /// nftables and iptables; prints a table (root). Also a section of `bench`.
    Flood {
        /// Fewer, shorter runs.
        #[arg(long)]
        quick: bool,
    },
    /// Run the benchmarks (release builds) and write docs/benchmarks.md (root).
    Bench {
        /// A small, fast run (a smoke test of the benchmarks themselves).
        #[arg(long)]
        quick: bool,
        /// Only these sections (comma-separated: per-packet, trace, random, scale, flood,
        /// accuracy, latency, feeds); written to target/benchmarks-partial.md, leaving
        /// docs/benchmarks.md as the last full run wrote it.
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
        Task::Demo => tasks::demo(),
        Task::Test {
            soak,
            kernels,
            host_only,
        } => tasks::test(soak, &kernels, host_only),
        Task::Stress { rounds, suite } => stress::stress(rounds, suite),
        Task::Flood { quick } => tasks::flood(quick),
        Task::Bench { quick, only } => tasks::bench(quick, only.as_deref()),
    }
}
