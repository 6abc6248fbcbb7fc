//! Developer and operator tasks: `cargo xtask <setup|demo|test>`.

mod setup;
mod util;

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
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::setup(),
    }
}
