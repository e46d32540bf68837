//! The `carousel` command: parses flags, sets up logging, and hands over to the library.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use carousel::config::{BenchArgs, Cli, Command, ProxyMode, RunArgs, StatusArgs};
use carousel::dataplane::nftables;
use carousel::discovery::convert::Scope;
use carousel::discovery::kube::SourceConfig;
use carousel::model::Locality;
use carousel::proxy::{ForwardConfig, Mode, ProxyConfig};
use carousel::run::{self, ClusterRun, FileRun};
use carousel::shutdown::Shutdown;
use carousel::telemetry::Telemetry;
use carousel::{balance, lab};
use clap::Parser;
use ipnet::IpNet;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing_subscriber::EnvFilter;

/// jemalloc with its background threads, rather than glibc's malloc: freed memory goes
/// back to the system within seconds, so that resident memory follows the cluster after
/// a relist or a burst of churn instead of staying at its peak (issue 15, 5 000
/// Services × 50 endpoints: 175 MB settled and 273 MB after churn on glibc, 144 MB and
/// 148 MB on jemalloc).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo(_) | Command::Bench(_) | Command::Status(_) => "warn",
        _ => "info",
    };
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // kube's client logs every failed request at error; carousel logs an outage once
    // (discovery::backoff). Unless RUST_LOG asks for kube_client itself.
    if !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("kube_client")) {
        filter = filter.add_directive("kube_client::client::builder=off".parse()?);
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
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
        Command::Bench(args) => bench(args).await,
        Command::Status(args) => status(args).await,
        Command::Cleanup => {
            nftables::cleanup()
                .await
                .context("cannot remove carousel's rules")?;
            println!(
                "carousel's nftables table (inet {}) and policy routes (table {}) are gone",
                nftables::TABLE,
                carousel::dataplane::policy_route::TABLE
            );
            Ok(())
        }
    }
}

async fn bench(args: BenchArgs) -> anyhow::Result<()> {
    let options = lab::bench::BenchOptions {
        scenarios: vec![args.scenario.clone()],
        algorithms: args.algorithms.clone(),
        seed: args.seed,
        quick: args.quick,
        ..Default::default()
    };
    let progress = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{bar:40.cyan/blue} {pos}/{len} {elapsed} {msg}")
            .expect("the template is valid"),
    );
    let started = std::time::Instant::now();
    // Every run is bounded; this is the backstop should one not be.
    let report = tokio::time::timeout(
        Duration::from_secs(300),
        lab::bench::run(&options, &progress),
    )
    .await
    .context("the bench did not finish in 300 s")?
    .context("the bench failed")?;
    progress.finish_and_clear();
    print!("{}", report.table());
    println!(
        "{} runs in {:.1} s (seed {})",
        report.results.len(),
        started.elapsed().as_secs_f64(),
        report.seed
    );
    if let Some(path) = &args.json {
        std::fs::write(path, report.to_json())
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("JSON: {}", path.display());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report.html())
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("HTML: {}", path.display());
    }
    Ok(())
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let text = carousel::status::fetch(&args.metrics_url).await?;
    print!(
        "{}",
        carousel::status::render(&carousel::status::parse(&text))
    );
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let descriptor_limit = carousel::proxy::listener::raise_descriptor_limit();
    tracing::debug!(descriptor_limit, "descriptor limit");
    let in_cluster = args.from_file.is_none();
    let cidrs = if !args.nodeport_addresses.is_empty() {
        args.nodeport_addresses.clone()
    } else if in_cluster {
        // kube-proxy's default: node ports on every address of the node.
        vec![
            "0.0.0.0/0".parse().expect("valid CIDR"),
            "::/0".parse().expect("valid CIDR"),
        ]
    } else {
        vec![IpNet::from(std::net::IpAddr::from(
            std::net::Ipv4Addr::LOCALHOST,
        ))]
    };
    let default_mode = if in_cluster {
        ProxyMode::Nftables
    } else {
        ProxyMode::Bind
    };
    let mode = match args.proxy_mode.unwrap_or(default_mode) {
        ProxyMode::Bind => Mode::Bind {
            nodeport_addresses: run::nodeport_ips(&cidrs)
                .context("cannot list this host's addresses")?,
        },
        ProxyMode::Nftables => Mode::Nftables {
            redirect_port: args.redirect_port,
            // Unset: every address of the node but loopback, as kube-proxy's nftables mode.
            nodeport_nets: args.nodeport_addresses.clone(),
        },
    };
    let proxy_name = args.service_proxy_name().map(str::to_owned);
    let scope = Scope {
        proxy_name: proxy_name.clone(),
    };
    let mut proxy = ProxyConfig {
        forward: ForwardConfig {
            connect_timeout: args.connect_timeout,
            connect_attempts: args.connect_attempts.into(),
            mark: None,
            idle_timeout: args.tcp_idle_timeout,
            keepalive: (!args.tcp_keepalive.is_zero()).then_some(args.tcp_keepalive),
        },
        max_connections: args.max_connections,
        shadow: args.shadow.clone(),
        sync_period: args.sync_period,
        handover: None,
        cluster_cidrs: args.cluster_cidr.clone(),
        mode,
        balance: balance::BuildOptions {
            seed: args.seed,
            ..Default::default()
        },
        // In a cluster without --zone, the zone comes from this node's Node object.
        locality: Locality {
            node: args.node_name.as_deref().map(Into::into),
            zone: args.zone.as_deref().map(Into::into),
        },
    };
    // Shared with a second carousel of the node (SO_REUSEPORT), as the data path is.
    let metrics = carousel::proxy::listener::bind(args.metrics_bind_address, None)
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_bind_address))?;
    let health = carousel::proxy::listener::bind(args.healthz_bind_address, None)
        .with_context(|| format!("cannot serve health on {}", args.healthz_bind_address))?;
    tracing::info!(metrics = %args.metrics_bind_address, health = %args.healthz_bind_address, "serving telemetry");
    // Per health address, as bound: carousels that share it are one node's proxy.
    proxy.handover = Some(format!("carousel/{}", health.local_addr()?));
    let shutdown = signals(args.drain_timeout);
    let telemetry = Telemetry::new();
    telemetry.set_endpoint_histograms(args.endpoint_histograms);
    match args.from_file {
        Some(path) => {
            let config = FileRun { path, scope, proxy };
            run::run_from_file(config, telemetry, metrics, health, shutdown).await?;
        }
        None => {
            let config = ClusterRun {
                master: args.master().map(str::to_owned),
                kubeconfig: args.kubeconfig,
                scope,
                source: SourceConfig {
                    proxy_name,
                    service_selector: args.service_selector,
                    node_name: args.node_name,
                    zone: args.zone,
                },
                proxy,
            };
            run::run_from_cluster(config, telemetry, metrics, health, shutdown).await?;
        }
    }
    Ok(())
}

/// The signals whose default action ends the process, and that carousel handles as
/// SIGTERM instead: a stray `kill -HUP` or `kill -USR1` drains like a rollout does,
/// rather than dropping every connection with no log line.
const STOPPING_SIGNALS: [(&str, SignalKind); 6] = [
    ("SIGTERM", SignalKind::terminate()),
    ("SIGINT", SignalKind::interrupt()),
    ("SIGHUP", SignalKind::hangup()),
    ("SIGQUIT", SignalKind::quit()),
    ("SIGUSR1", SignalKind::user_defined1()),
    ("SIGUSR2", SignalKind::user_defined2()),
];

/// The first stopping signal (SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) starts
/// the shutdown; the drain ends when `drain_timeout` has passed since, or at a second
/// signal.
fn signals(
    drain_timeout: Duration,
) -> Shutdown<impl Future<Output = ()>, impl Future<Output = ()>> {
    let (first_tx, first_rx) = oneshot::channel::<&'static str>();
    let (second_tx, second_rx) = oneshot::channel::<&'static str>();
    // Installed now, not in the task, so that no early signal meets the default action.
    let mut streams: Vec<(&'static str, _)> = STOPPING_SIGNALS
        .iter()
        .map(|(name, kind)| {
            let stream = signal(*kind).unwrap_or_else(|e| panic!("{name} handler: {e}"));
            (*name, stream)
        })
        .collect();
    tokio::spawn(async move {
        for tx in [first_tx, second_tx] {
            let received = futures::future::select_all(streams.iter_mut().map(|(name, stream)| {
                Box::pin(async move { stream.recv().await.map(|()| *name) })
            }))
            .await
            .0;
            let _ = tx.send(received.unwrap_or("a signal"));
        }
    });
    let shutdown = async move {
        let signal = first_rx.await.unwrap_or("a signal");
        tracing::info!(
            signal,
            "shutting down: no new connections; draining the open ones"
        );
    };
    // Polled only once the shutdown has begun, so the deadline counts from there.
    let abandon = async move {
        tokio::select! {
            signal = second_rx => tracing::warn!(signal = signal.unwrap_or("a signal"), "second signal: exiting now"),
            () = tokio::time::sleep(drain_timeout) => tracing::warn!(?drain_timeout, "drain timeout reached"),
        }
    };
    Shutdown::new(shutdown, abandon)
}
