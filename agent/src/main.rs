//! `warren-agent`: arguments, tracing, config, signals; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_agent::config::{Config, Overrides};

/// The Warren agent: keeps this gateway reachable through the bus and serves the tunnels
/// the relay offers — to its own services or to lower devices on its LAN.
///
/// Examples:
///   warren-agent --config /etc/warren/agent.toml
///   warren-agent --config agent.toml --target ssh=127.0.0.1:22 --target plc=203.0.113.10:502
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Configuration file (as printed by `warren-relay device add`).
    #[arg(long, env = "WARREN_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// The broker, mqtt://HOST:PORT.
    #[arg(long)]
    broker: Option<String>,
    /// This device's id.
    #[arg(long)]
    device: Option<String>,
    /// A target operators may reach, NAME=HOST:PORT (repeatable; replaces the file's).
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Print the default configuration file and exit.
    #[arg(long)]
    generate_config: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("warren-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if cli.generate_config {
        print!("{}", warren_agent::config::DEFAULT_TOML);
        return Ok(ExitCode::SUCCESS);
    }
    let overrides = Overrides {
        broker: cli.broker,
        device: cli.device,
        key: None,
        targets: cli.targets,
    };
    let cfg = Config::load(cli.config.as_deref(), &overrides)?;
    let rt = tokio::runtime::Runtime::new().context("could not start the tokio runtime")?;
    rt.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(signal(shutdown.clone()));
        warren_agent::run(cfg, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}

async fn signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("could not install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    shutdown.cancel();
}
