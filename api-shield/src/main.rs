//! The api-shield daemon and CLI.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use api_shield::{
    cli::{Cli, Command, argument_error, execute_client},
    config::{Config, DEFAULT_CONFIG},
    daemon::{self, Overrides},
};
use clap::{Parser as _, error::ErrorKind};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {}", argument_error(&e));
            return ExitCode::FAILURE;
        }
    };
    match execute(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("{e:#}");
            // A refused program or kernel is told in a few lines; the rest in one.
            if api_shield::shield::kernel::is_kernel_error(&e) {
                eprintln!("error: {text}");
            } else {
                eprintln!("error: {}", text.replace('\n', " "));
            }
            ExitCode::FAILURE
        }
    }
}

fn execute(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            state_dir,
            pin_dir,
        } => {
            let config_path = config;
            let config = match &config_path {
                Some(path) => Config::from_file(path)
                    .with_context(|| format!("invalid config {}", path.display()))?,
                None => Config::parse(DEFAULT_CONFIG)
                    .context("the built-in default config is invalid")?,
            };
            let overrides = Overrides {
                socket: cli.socket,
                state_dir,
                pin_dir,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(daemon::run(config, config_path, overrides))
        }
        Command::CheckConfig { path } => {
            Config::from_file(&path)
                .with_context(|| format!("invalid config {}", path.display()))?;
            println!("{}: ok", path.display());
            Ok(())
        }
        command => execute_client(cli.socket, command),
    }
}
