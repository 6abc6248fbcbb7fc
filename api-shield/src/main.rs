//! The api-shield daemon and CLI.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result};
use api_shield::{config::Config, daemon};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    version,
    about = "Kernel-level (XDP) rate limiter and firewall for API hosts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it to the configured interfaces and enforce the config
    /// (SIGHUP reloads the config file; SIGINT/SIGTERM detach and exit).
    Run {
        /// YAML config file; without it, the built-in default config (see the README).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file without loading anything.
    CheckConfig {
        /// YAML config file.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match execute(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run { config } => {
            let config_path = config;
            let config = match &config_path {
                Some(path) => Config::from_file(path)
                    .with_context(|| format!("invalid config {}", path.display()))?,
                None => Config::parse(api_shield::config::DEFAULT_CONFIG)
                    .context("the built-in default config is invalid")?,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(config, config_path))
        }
        Command::CheckConfig { path } => {
            Config::from_file(&path)
                .with_context(|| format!("invalid config {}", path.display()))?;
            println!("{}: ok", path.display());
            Ok(())
        }
    }
}
