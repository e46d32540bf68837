//! Load, on real processes: the carousel binary (bind mode, from a state file) between
//! this test's clients and a Python echo backend in a third process, all on loopback.
//!
//! - 8 000 connections held open at once, each echoing a token of its own;
//! - 50 000 short connections in a row, none failing, after which carousel's descriptor
//!   count and resident memory are back to where a warm-up left them;
//! - 1 GiB each way through one connection, arriving with the checksum it left with.
//!
//! Three processes because the descriptor limit is 20 000 a process and cannot be
//! raised: 8 000 held connections are 8 000 sockets here, 16 000 in carousel and 8 000
//! in the backend. Every loop is bounded in count and every wait in time.

mod common;

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{http_get, Ep, Svc};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const BIN: &str = env!("CARGO_BIN_EXE_carousel");

/// How long one connection may take to open, echo and close before it counts as failed.
const PER_CONNECTION: Duration = Duration::from_secs(30);

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/load")
        .join(name)
}

// ---- the processes ----

/// The echo backend (tests/load/echo_server.py). It exits when `_stdin` closes, that is
/// when this value is dropped or the test process dies.
struct Echo {
    addrs: Vec<SocketAddr>,
    _stdin: ChildStdin,
    _child: Child,
}

impl Echo {
    async fn start(listen: &[&str]) -> Echo {
        let mut child = Command::new("python3")
            .arg(script("echo_server.py"))
            .args(listen)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the echo backend");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(30),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("the echo backend starts")
        .unwrap();
        let addrs: Vec<SocketAddr> = line
            .strip_prefix("ready ")
            .unwrap_or_else(|| panic!("the echo backend said {line:?}"))
            .split_whitespace()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(addrs.len(), listen.len());
        Echo {
            addrs,
            _stdin: child.stdin.take().unwrap(),
            _child: child,
        }
    }
}

/// The carousel binary, serving one Service `load` at `127.96.{net}.1:8080` in front
/// of `endpoints`, its telemetry on `127.96.{net}.2`.
struct Carousel {
    child: Child,
    pid: u32,
    service: SocketAddr,
    metrics: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Carousel {
    async fn start(net: u8, endpoints: &[SocketAddr]) -> Carousel {
        let eps = endpoints
            .iter()
            .enumerate()
            .map(|(i, a)| Ep::ready(*a, &format!("echo-{i}")))
            .collect();
        let svc = Svc::new("load", &format!("127.96.{net}.1"), 8080, eps);
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.yaml");
        std::fs::write(&state, svc.state()).unwrap();
        let log = dir.path().join("carousel.log");
        let (health, metrics) = (
            format!("127.96.{net}.2:10256"),
            format!("127.96.{net}.2:10249"),
        );
        // Through dies_with_parent.py, which then becomes carousel (same pid).
        let child = Command::new("python3")
            .arg(script("dies_with_parent.py"))
            .arg(BIN)
            .args(["run", "--from-file"])
            .arg(&state)
            .args(["--healthz-bind-address", &health])
            .args(["--metrics-bind-address", &metrics])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let pid = child.id().unwrap();
        let health: SocketAddr = health.parse().unwrap();
        wait_until("carousel is ready", Duration::from_secs(30), || async {
            matches!(http_get(health, "/readyz").await, Ok((200, _)))
        })
        .await;
        Carousel {
            child,
            pid,
            service: svc.addr(),
            metrics: metrics.parse().unwrap(),
            log,
            _dir: dir,
        }
    }

    async fn metrics_text(&self) -> String {
        http_get(self.metrics, "/metrics")
            .await
            .expect("GET /metrics")
            .1
    }

    /// The sum of every series of `name` whose labels include `labels`.
    async fn metric_sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let text = self.metrics_text().await;
        text.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
            .filter(|l| {
                labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
            })
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .sum()
    }

    /// Open descriptors of the carousel process.
    fn descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid))
            .expect("carousel is running")
            .count()
    }

    /// Resident memory of the carousel process, in KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .expect("carousel is running");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// The end of carousel's log, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Panics, with carousel's log, if carousel is no longer running.
    fn assert_alive(&mut self) {
        if let Some(status) = self.child.try_wait().unwrap() {
            panic!("carousel exited ({status}):\n{}", self.log_tail());
        }
    }
}

/// Polls `check` every 100 ms until it holds; panics naming `what` after `limit`.
async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Raises this process's soft descriptor limit to the hard one if it is below `needed`
/// (with prlimit(1): std has no setrlimit), and fails plainly if that is not enough.
fn ensure_descriptors(needed: u64) {
    let limits = || -> (u64, u64) {
        let text = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files in /proc/self/limits");
        let mut numbers = line.split_whitespace().filter_map(|w| {
            w.parse::<u64>()
                .ok()
                .or((w == "unlimited").then_some(u64::MAX))
        });
        (numbers.next().unwrap(), numbers.next().unwrap())
    };
    let (soft, hard) = limits();
    if soft < needed && hard > soft {
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={hard}:{hard}"))
            .status();
        assert!(
            matches!(status, Ok(s) if s.success()),
            "cannot raise the soft descriptor limit with prlimit: {status:?}"
        );
    }
    let (soft, _) = limits();
    assert!(
        soft >= needed,
        "this test needs {needed} descriptors; the limit is {soft}"
    );
}

// ---- the clients ----

/// Client source addresses: spreading connections over several gives each its own
/// range of ephemeral ports (TIME_WAIT keeps a closed connection's port for a minute).
fn sources(net: u8, count: u8) -> Vec<IpAddr> {
    (1..=count)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 95, net, i)))
        .collect()
}

async fn connect_from(source: IpAddr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}

/// Writes `token` and reads the same bytes back.
async fn echo(stream: &mut TcpStream, token: &[u8]) -> io::Result<()> {
    stream.write_all(token).await?;
    let mut back = vec![0u8; token.len()];
    stream.read_exact(&mut back).await?;
    if back != token {
        return Err(io::Error::other(format!(
            "sent {:?}, got back {:?}",
            String::from_utf8_lossy(token),
            String::from_utf8_lossy(&back)
        )));
    }
    Ok(())
}

/// One short connection: connect, send a token, half-close, read to the end. Exactly
/// the token must come back, then the end of stream.
async fn short_connection(source: IpAddr, to: SocketAddr, i: usize) -> io::Result<()> {
    let mut s = connect_from(source, to).await?;
    let token = format!("short connection {i}\n");
    s.write_all(token.as_bytes()).await?;
    s.shutdown().await?;
    let mut back = Vec::with_capacity(token.len());
    s.read_to_end(&mut back).await?;
    if back != token.as_bytes() {
        return Err(io::Error::other(format!(
            "connection {i} got back {:?}",
            String::from_utf8_lossy(&back)
        )));
    }
    Ok(())
}

/// Runs `count` short connections, `concurrency` at a time, numbered from `first`;
/// returns how many failed and the first error seen.
async fn short_connections(
    to: SocketAddr,
    sources: &[IpAddr],
    first: usize,
    count: usize,
    concurrency: usize,
) -> (usize, Option<String>) {
    let next = Arc::new(AtomicUsize::new(first));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let (next, sources) = (next.clone(), sources.to_vec());
        workers.spawn(async move {
            let (mut failed, mut first_error) = (0, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= first + count {
                    return (failed, first_error);
                }
                let source = sources[i % sources.len()];
                let outcome =
                    tokio::time::timeout(PER_CONNECTION, short_connection(source, to, i)).await;
                let error = match outcome {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => format!("connection {i} from {source}: {e}"),
                    Err(_) => format!("connection {i} from {source}: no answer in time"),
                };
                failed += 1;
                first_error.get_or_insert(error);
            }
        });
    }
    let (mut failed, mut first_error) = (0, None);
    while let Some(result) = workers.join_next().await {
        let (f, e) = result.expect("a client worker panicked");
        failed += f;
        first_error = first_error.or(e);
    }
    (failed, first_error)
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_thousand_connections_held_open_at_once_each_still_echoing() {
    const HELD: usize = 8_000;
    ensure_descriptors(HELD as u64 + 500);
    let echo_backend = Echo::start(&["127.96.1.10:0"]).await;
    let mut carousel = Carousel::start(1, &echo_backend.addrs).await;
    let service = carousel.service;
    let sources = sources(1, 4);

    // Open them a few hundred at a time (a burst of 8 000 SYNs would overflow accept
    // queues and cost retransmission delays, not failures). Each proves it reaches the
    // backend with a first token before it is kept.
    let opening = Arc::new(Semaphore::new(200));
    let mut tasks = JoinSet::new();
    for i in 0..HELD {
        let permit = opening.clone().acquire_owned().await.unwrap();
        let source = sources[i % sources.len()];
        tasks.spawn(async move {
            let opened = tokio::time::timeout(PER_CONNECTION, async {
                let mut s = connect_from(source, service).await?;
                echo(&mut s, format!("open {i}\n").as_bytes()).await?;
                Ok::<_, io::Error>(s)
            })
            .await;
            drop(permit);
            (i, opened)
        });
    }
    let mut held: Vec<Option<TcpStream>> = (0..HELD).map(|_| None).collect();
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        match joined.unwrap() {
            (i, Ok(Ok(s))) => held[i] = Some(s),
            (i, Ok(Err(e))) => failures.push(format!("{i}: {e}")),
            (i, Err(_)) => failures.push(format!("{i}: not open in time")),
        }
    }
    carousel.assert_alive();
    assert!(
        failures.is_empty(),
        "{} of {HELD} connections failed to open, e.g. {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        carousel.log_tail()
    );

    // All of them open at once, through carousel: it counts them, and holds a socket
    // on each side of each.
    let active = carousel
        .metric_sum("carousel_connections_active", &[])
        .await;
    let descriptors = carousel.descriptors();
    println!(
        "{HELD} held: carousel_connections_active {active}, descriptors {descriptors}, RSS {} KiB",
        carousel.rss_kib()
    );
    assert_eq!(active, HELD as f64);
    assert!(
        descriptors >= 2 * HELD,
        "carousel has {descriptors} descriptors"
    );

    // Each still echoes its own token, with every one of them in flight together.
    let mut tasks = JoinSet::new();
    for (i, s) in held.iter_mut().enumerate() {
        let mut s = s.take().unwrap();
        tasks.spawn(async move {
            let token = format!("still here {i} {}\n", "x".repeat(i % 97));
            let outcome =
                tokio::time::timeout(PER_CONNECTION, echo(&mut s, token.as_bytes())).await;
            (i, s, outcome)
        });
    }
    let mut failures = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        let (i, s, outcome) = joined.unwrap();
        match outcome {
            Ok(Ok(())) => held[i] = Some(s),
            Ok(Err(e)) => failures.push(format!("{i}: {e}")),
            Err(_) => failures.push(format!("{i}: no echo in time")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {HELD} held connections no longer echo, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );

    // Closing them all leaves carousel with no open connection.
    drop(held);
    wait_until(
        "carousel has closed every connection",
        Duration::from_secs(60),
        || async {
            carousel
                .metric_sum("carousel_connections_active", &[])
                .await
                == 0.0
        },
    )
    .await;
    carousel.assert_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_short_connections_leave_descriptors_and_memory_as_they_were() {
    const WARM_UP: usize = 4_000;
    const CONNECTIONS: usize = 50_000;
    const CONCURRENCY: usize = 64;
    ensure_descriptors(1_000);
    // Four backend addresses and sixteen client addresses: 50 000 connections in TIME_WAIT
    // would otherwise exhaust the ephemeral ports of one address pair.
    let echo_backend = Echo::start(&[
        "127.96.2.10:0",
        "127.96.2.11:0",
        "127.96.2.12:0",
        "127.96.2.13:0",
    ])
    .await;
    let mut carousel = Carousel::start(2, &echo_backend.addrs).await;
    let sources = sources(2, 16);

    let (failed, error) =
        short_connections(carousel.service, &sources, 0, WARM_UP, CONCURRENCY).await;
    assert_eq!(failed, 0, "warm-up: {error:?}\n{}", carousel.log_tail());
    // The baseline, once the warm-up's connections have all been closed and the
    // descriptor count holds still.
    let settled = || async {
        carousel
            .metric_sum("carousel_connections_active", &[])
            .await
            == 0.0
    };
    wait_until(
        "the warm-up's connections are closed",
        Duration::from_secs(30),
        settled,
    )
    .await;
    let mut last = carousel.descriptors();
    wait_until(
        "the descriptor count settles",
        Duration::from_secs(30),
        || {
            let now = carousel.descriptors();
            let still = now == last;
            last = now;
            async move { still }
        },
    )
    .await;
    let (fds_before, rss_before) = (carousel.descriptors(), carousel.rss_kib());

    let (failed, error) = short_connections(
        carousel.service,
        &sources,
        WARM_UP,
        CONNECTIONS,
        CONCURRENCY,
    )
    .await;
    carousel.assert_alive();
    assert_eq!(
        failed,
        0,
        "{failed} of {CONNECTIONS} connections failed, first: {error:?}\n{}",
        carousel.log_tail()
    );
    let ok = carousel
        .metric_sum("carousel_connections_total", &[("outcome", "ok")])
        .await;
    assert_eq!(
        ok,
        (WARM_UP + CONNECTIONS) as f64,
        "carousel counted every connection"
    );
    let connect_errors = carousel
        .metric_sum(
            "carousel_connections_total",
            &[("outcome", "connect_error")],
        )
        .await;
    assert_eq!(connect_errors, 0.0);

    // Back within 10 % of the baseline, given a few seconds for the last closes.
    let within = |now: u64, before: u64| now * 10 <= before * 11 && now * 10 >= before * 9;
    let mut seen = (0, 0);
    let back = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            seen = (carousel.descriptors(), carousel.rss_kib());
            if within(seen.0 as u64, fds_before as u64) && within(seen.1, rss_before) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    println!(
        "after {WARM_UP} warm-up connections: {fds_before} descriptors, RSS {rss_before} KiB; \
         after {CONNECTIONS} more: {} descriptors, RSS {} KiB",
        seen.0, seen.1
    );
    assert!(
        back.is_ok(),
        "not back within 10 %: descriptors {fds_before} -> {}, RSS {rss_before} KiB -> {} KiB",
        seen.0,
        seen.1
    );
}

/// A word of the test stream: splitmix64 of its index, so any word can be regenerated.
fn word(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A running 64-bit FNV-1a over 8-byte words. Each step is a bijection of the running
/// value, so any changed, lost or reordered word changes the result.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Checksum(u64);

impl Checksum {
    const START: Checksum = Checksum(0xCBF2_9CE4_8422_2325);

    fn add(&mut self, bytes: &[u8]) {
        assert_eq!(bytes.len() % 8, 0, "whole words only");
        for w in bytes.chunks_exact(8) {
            let w = u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]);
            self.0 = (self.0 ^ w).wrapping_mul(0x0000_0100_0000_01B3);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gibibyte_through_one_connection_arrives_with_its_checksum() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 * 1024;
    let echo_backend = Echo::start(&["127.96.3.10:0"]).await;
    let mut carousel = Carousel::start(3, &echo_backend.addrs).await;
    let stream = TcpStream::connect(carousel.service).await.unwrap();
    let (mut from, mut to) = stream.into_split();

    // Writes TOTAL bytes of the test stream, then half-closes; returns their checksum.
    let sender = tokio::spawn(async move {
        let mut sum = Checksum::START;
        let mut buf = vec![0u8; CHUNK];
        for chunk in 0..TOTAL / CHUNK as u64 {
            let first = chunk * (CHUNK as u64 / 8);
            for (k, w) in buf.chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&word(first + k as u64).to_le_bytes());
            }
            sum.add(&buf);
            to.write_all(&buf).await?;
        }
        to.shutdown().await?;
        Ok::<_, io::Error>(sum)
    });

    // Reads back everything the echo returns, up to the end of stream.
    let receiving = tokio::time::timeout(Duration::from_secs(150), async {
        let mut sum = Checksum::START;
        let mut buf = vec![0u8; CHUNK];
        let mut received = 0u64;
        loop {
            let n = from.read(&mut buf[..]).await?;
            if n == 0 {
                return Ok::<_, io::Error>((received, sum));
            }
            // Hash whole words: keep a partial word's bytes for the next read.
            let whole = n - n % 8;
            sum.add(&buf[..whole]);
            received += n as u64;
            if whole < n {
                let mut rest = [0u8; 8];
                let tail = n - whole;
                rest[..tail].copy_from_slice(&buf[whole..n]);
                from.read_exact(&mut rest[tail..]).await?;
                sum.add(&rest);
                received += (8 - tail) as u64;
            }
        }
    })
    .await;
    let (received, got) = receiving
        .expect("the whole stream came back in time")
        .expect("reading the echo");
    let sent = sender.await.unwrap().expect("sending the stream");
    carousel.assert_alive();
    assert_eq!(received, TOTAL, "bytes back");
    assert_eq!(got, sent, "checksum of what came back");
    assert_ne!(sent, Checksum::START);

    // carousel saw every byte both ways.
    wait_until(
        "carousel has counted the bytes",
        Duration::from_secs(10),
        || async {
            carousel
                .metric_sum("carousel_bytes_total", &[("direction", "to_client")])
                .await
                == TOTAL as f64
        },
    )
    .await;
    assert_eq!(
        carousel
            .metric_sum("carousel_bytes_total", &[("direction", "to_endpoint")])
            .await,
        TOTAL as f64
    );
}
