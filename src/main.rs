//! The `carousel` command: parses flags, sets up logging, and hands over to the library.

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use carousel::config::{BenchArgs, Cli, Command, LogFormat, RunArgs, StatusArgs};
use carousel::dataplane::{nftables, preflight};
use carousel::lab;
use carousel::plan::{self, Plan};
use carousel::proxy::Mode;
use carousel::run::{self, Source};
use carousel::shutdown::Shutdown;
use carousel::telemetry::Telemetry;
use clap::Parser;
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
async fn main() -> std::process::ExitCode {
    match carousel().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("Error: {}", one_line(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: most messages already carry
/// their cause's text, so a cause is added only when its text is not in the line yet.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = error.to_string();
    for cause in error.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
    }
    line
}

async fn carousel() -> anyhow::Result<()> {
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
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // Colour only for a terminal: `kubectl logs` and files get plain text.
        LogFormat::Text => logs
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => logs.json().init(),
    }
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
            preflight::nftables_mode()?;
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
    let own = match &args.pods {
        Some(path) => Some(
            lab::bench::own::OwnPods::load(path, args.service.as_deref(), args.port.as_deref())
                .context("--pods")?,
        ),
        None => None,
    };
    let options = lab::bench::BenchOptions {
        own,
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
    carousel::status::show(&args.metrics_url, args.output, args.watch).await?;
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let descriptor_limit = carousel::proxy::listener::raise_descriptor_limit();
    tracing::debug!(descriptor_limit, "descriptor limit");
    let host = plan::host_addresses().context("cannot list this host's addresses")?;
    let Plan {
        mut source,
        metrics,
        health,
        drain_timeout,
        endpoint_histograms,
    } = Plan::new(args, &host);
    if matches!(source.proxy_mut().mode, Mode::Nftables { .. }) {
        preflight::nftables_mode()?;
    }
    // Shared with a second carousel of the node (SO_REUSEPORT), as the data path is.
    let metrics_listener = carousel::proxy::listener::bind(metrics, None).map_err(|e| {
        let hint = plan::bind_hint("--metrics-bind-address", metrics, &e);
        anyhow::anyhow!("cannot serve metrics on {metrics}: {e}: {hint}")
    })?;
    let health_listener = carousel::proxy::listener::bind(health, None).map_err(|e| {
        let hint = plan::bind_hint("--healthz-bind-address", health, &e);
        anyhow::anyhow!("cannot serve health on {health}: {e}: {hint}")
    })?;
    let (mode, listener) = match &source.proxy_mut().mode {
        Mode::Bind { .. } => ("bind", "a listener per Service address".to_string()),
        Mode::Nftables { redirect_port, .. } => {
            ("nftables", format!("redirected to port {redirect_port}"))
        }
    };
    let from = match &source {
        Source::File(run) => format!("state file {}", run.path.display()),
        Source::Cluster(_) => "the Kubernetes API".to_string(),
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        mode,
        listener,
        source = from,
        %metrics,
        %health,
        "carousel starting"
    );
    // Per health address, as bound: carousels that share it are one node's proxy.
    source.proxy_mut().handover = Some(format!("carousel/{}", health_listener.local_addr()?));
    let shutdown = signals(drain_timeout);
    let telemetry = Telemetry::new();
    telemetry.set_endpoint_histograms(endpoint_histograms);
    run::run(
        source,
        telemetry,
        metrics_listener,
        health_listener,
        shutdown,
    )
    .await?;
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
