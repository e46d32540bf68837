//! The `carousel` command: parses flags, sets up logging, and hands over to the library.

use std::time::Duration;

use anyhow::{bail, Context};
use carousel::config::{Cli, Command, ProxyMode, RunArgs};
use carousel::discovery::convert::Scope;
use carousel::proxy::{ForwardConfig, ProxyConfig};
use carousel::run::{self, FileRun};
use carousel::telemetry::Telemetry;
use carousel::{balance, lab};
use clap::Parser;
use ipnet::IpNet;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => run(*args).await,
        Command::Demo(args) => {
            tokio::time::timeout(Duration::from_secs(60), lab::demo::run(args.connections))
                .await
                .context("the demo did not finish in 60 s")?
                .context("the demo failed")
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let Some(path) = args.from_file.clone() else {
        bail!("the Kubernetes API source is not built yet: pass --from-file STATE.yaml");
    };
    if args.proxy_mode == Some(ProxyMode::Nftables) {
        bail!("--proxy-mode nftables is not built yet; --from-file runs in bind mode");
    }
    if args.service_selector.is_some() {
        bail!("--service-selector applies to the Kubernetes API source, which is not built yet");
    }
    let cidrs = if args.nodeport_addresses.is_empty() {
        vec![IpNet::from(std::net::IpAddr::from(
            std::net::Ipv4Addr::LOCALHOST,
        ))]
    } else {
        args.nodeport_addresses.clone()
    };
    let nodeport_addresses =
        run::nodeport_ips(&cidrs).context("cannot list this host's addresses")?;
    let config = FileRun {
        path,
        scope: Scope {
            proxy_name: args.service_proxy_name.clone(),
        },
        proxy: ProxyConfig {
            forward: ForwardConfig {
                connect_timeout: args.connect_timeout,
                connect_attempts: args.connect_attempts.into(),
            },
            nodeport_addresses,
            balance: balance::BuildOptions {
                seed: args.seed,
                ..Default::default()
            },
        },
    };
    let metrics = tokio::net::TcpListener::bind(args.metrics_bind_address)
        .await
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_bind_address))?;
    let health = tokio::net::TcpListener::bind(args.healthz_bind_address)
        .await
        .with_context(|| format!("cannot serve health on {}", args.healthz_bind_address))?;
    tracing::info!(metrics = %args.metrics_bind_address, health = %args.healthz_bind_address, "serving telemetry");
    run::run_from_file(config, Telemetry::new(), metrics, health, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler can be installed");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
