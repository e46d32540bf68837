//! Rule sync cost with real nftables, in a network namespace of its own, through
//! `Rules::sync` as the proxy calls it: the whole table for 10 000 Services in one
//! transaction (a first sync: `nft -f`), then one Service changed (an element change
//! over netlink). Needs root and nft(8). Prints medians of a few runs.
//!
//! cargo bench --bench nft_sync

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use carousel::addr::ServiceAddr;
use carousel::dataplane::nftables::{render_full, Redirects, Rules};
use carousel::model::{Dialed, Protocol};

const SERVICES: u32 = 10_000;
const RUNS: usize = 5;

fn service_addr(i: u32) -> Dialed {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    (Protocol::Tcp, ServiceAddr(SocketAddr::from((ip, 80))))
}

fn redirects(services: impl Iterator<Item = u32>) -> Redirects {
    Redirects::new(services.map(service_addr), [(Protocol::Tcp, 30080)])
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Runs this bench again inside a fresh namespace, so that the host's rules are never touched.
fn main() {
    if std::env::var_os("CAROUSEL_BENCH_IN_NETNS").is_none() {
        let ns = format!("cx-nftbench-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &ns])
            .status()
            .map(|s| s.success());
        if ok.ok() != Some(true) {
            eprintln!("nft_sync: needs root and ip(8); skipped");
            return;
        }
        let exe = std::env::current_exe().expect("own path");
        let status = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(exe)
            .env("CAROUSEL_BENCH_IN_NETNS", "1")
            .status();
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        assert!(status.expect("bench ran").success(), "nft_sync failed");
        return;
    }
    // A refused change would be rewritten whole, and say so here.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let all = redirects(0..SERVICES);
        let mut full = Vec::new();
        let mut one = Vec::new();
        for run in 0..RUNS {
            // A fresh `Rules` syncs the whole table first.
            let mut rules = Rules::new(10262, Vec::new());
            let started = Instant::now();
            rules.sync(all.clone()).await.expect("full table applies");
            full.push(started.elapsed());

            // One Service replaced by another: two element changes.
            let changed = redirects((0..SERVICES - 1).chain([SERVICES + run as u32]));
            let started = Instant::now();
            rules.sync(changed).await.expect("change applies");
            one.push(started.elapsed());
            rules.sync(all.clone()).await.expect("change reverts");
        }
        let render_started = Instant::now();
        let _ = render_full(&all, 10262, &[]);
        let render = render_started.elapsed();
        println!("nft_sync: {SERVICES} Services, median of {RUNS} runs");
        println!(
            "  whole table, one transaction (render + nft -f):       {:?}",
            median(full)
        );
        println!("  of which rendering the script:                       {render:?}");
        println!(
            "  one Service changed (diff + netlink batch, 2 changes): {:?}",
            median(one)
        );
    });
}
