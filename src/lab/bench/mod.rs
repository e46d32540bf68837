//! `carousel bench`: runs each scenario once per balancer over carousel's real data path
//! (the proxy in bind mode, in process) with in-process pods and many client addresses.
//!
//! Every run gets its own addresses inside one 127.N.0.0/16: run `r` puts its Service at
//! 127.N.(B+r).1 and its pods at 127.N.(B+r).10.., and clients connect from
//! 127.N.200-255.x, so that runs never meet each other's lingering sockets.

pub mod findings;
pub mod load;
pub(crate) mod measure;
pub mod own;
pub mod page;
pub(crate) mod relay;
pub mod report;
pub mod scenarios;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::addr::PodAddr;
use crate::algorithm::Algorithm;
use crate::balance::BuildOptions;
use crate::model::{
    Balancing, Endpoint, Protocol, ProxyProtocol, Service, ServiceKey, ServicePort, ServiceTable,
};
use crate::proxy::{self, ProxyConfig};
use crate::shutdown::Shutdown;
use crate::telemetry::Telemetry;
use hyper::header::HeaderValue;
use load::{BenchPod, Client, PodSpec};
use measure::{Observed, Phase, Record};
use own::OwnPods;
use relay::Seen;
use report::{Report, RunResult};
use scenarios::{Change, Scenario};

const PORT: u16 = 8000;
/// No single connect or request waits longer: a run always ends.
const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// First third octet of the client addresses.
const CLIENT_BLOCK: u8 = 200;

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("unknown scenario {0:?} (known: {known})", known = scenarios::names().collect::<Vec<_>>().join(", "))]
    UnknownScenario(String),
    #[error(
        "scenario {0:?} needs the lab's own pods (it slows, replaces or adds them); \
         with --pods: {known}",
        known = own::SCENARIOS.join(", ")
    )]
    NeedsLabPods(String),
    #[error("{runs} runs do not fit in the address blocks from {first} to {CLIENT_BLOCK}")]
    TooManyRuns { runs: usize, first: u8 },
    #[error("cannot start pod {pod} on {addr}: {source}")]
    Pod {
        pod: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy did not start on {0}")]
    ProxyStart(SocketAddr),
    #[error("the proxy failed: {0}")]
    Proxy(#[from] proxy::ProxyError),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Scenario names; empty: all.
    pub scenarios: Vec<String>,
    /// The algorithms to compare; empty: all.
    pub algorithms: Vec<Algorithm>,
    pub seed: u64,
    pub quick: bool,
    /// The second octet of the 127.x.0.0/16 the bench uses.
    pub net: u8,
    /// The third octet of the first run's block.
    pub first_block: u8,
    /// Real pods to run against instead of the lab's (`--pods`).
    pub own: Option<OwnPods>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            scenarios: Vec::new(),
            algorithms: Vec::new(),
            seed: 42,
            quick: false,
            net: 56,
            first_block: 0,
            own: None,
        }
    }
}

/// The scenarios to run, checked against the registry.
pub(crate) fn plan(options: &BenchOptions) -> Result<Vec<(Scenario, Algorithm)>, BenchError> {
    let names: Vec<String> = if options.scenarios.is_empty() || options.scenarios == ["all"] {
        match options.own {
            Some(_) => own::SCENARIOS.map(String::from).to_vec(),
            None => scenarios::names().map(String::from).collect(),
        }
    } else {
        options.scenarios.clone()
    };
    let algorithms: &[Algorithm] = if options.algorithms.is_empty() {
        &Algorithm::ALL
    } else {
        &options.algorithms
    };
    let mut runs = Vec::new();
    for name in names {
        let built = match &options.own {
            Some(own) => own.scenarios(&name, options.quick),
            None => scenarios::build(&name, options.quick),
        };
        if built.is_empty() {
            return Err(match scenarios::about(&name) {
                Some(_) => BenchError::NeedsLabPods(name),
                None => BenchError::UnknownScenario(name),
            });
        }
        for scenario in built {
            for algorithm in algorithms {
                if scenario.only.is_none_or(|only| only.contains(algorithm)) {
                    runs.push((scenario.clone(), *algorithm));
                }
            }
        }
    }
    if options.first_block as usize + runs.len() > CLIENT_BLOCK as usize {
        return Err(BenchError::TooManyRuns {
            runs: runs.len(),
            first: options.first_block,
        });
    }
    Ok(runs)
}

/// Runs every planned scenario × algorithm, one after the other, ticking `progress`.
pub async fn run(options: &BenchOptions, progress: &ProgressBar) -> Result<Report, BenchError> {
    let runs = plan(options)?;
    progress.set_length(runs.len() as u64);
    let mut results = Vec::with_capacity(runs.len());
    for (i, (scenario, algorithm)) in runs.iter().enumerate() {
        progress.set_message(format!("{} / {algorithm}", scenario.name));
        let block = options.first_block + i as u8;
        results.push(run_one(scenario, *algorithm, options, block).await?);
        progress.inc(1);
    }
    Ok(Report {
        version: report::VERSION,
        seed: options.seed,
        quick: options.quick,
        carousel_version: env!("CARGO_PKG_VERSION").to_string(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        findings: findings::all(&results),
        results,
        own_pods: options.own.clone(),
    })
}

fn v4(net: u8, block: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, block, host))
}

/// Client `i`'s address: 127.net.200.1, .2, … .250, then 127.net.201.1, …
pub(crate) fn client_addr(net: u8, i: usize) -> IpAddr {
    v4(net, CLIENT_BLOCK + (i / 250) as u8, (i % 250) as u8 + 1)
}

/// A pod in the Service's table.
#[derive(Clone, Debug)]
struct Member {
    index: usize,
    addr: SocketAddr,
    weight: u32,
    terminating: bool,
}

/// The Service as the proxy sees it: one port, the members as endpoints.
fn table(
    service: SocketAddr,
    balancing: Balancing,
    protocol: Protocol,
    members: &[Member],
    names: &[String],
    source: crate::model::ClientSource,
) -> ServiceTable {
    let key = ServiceKey::new("bench", "svc");
    let endpoints = members
        .iter()
        .map(|m| Endpoint {
            addr: PodAddr(m.addr),
            pod: names[m.index].as_str().into(),
            placement: Arc::default(),
            ready: !m.terminating,
            serving: true,
            terminating: m.terminating,
            weight: m.weight,
        })
        .collect();
    let svc = Service {
        key: key.clone(),
        cluster_ips: vec![service.ip()],
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        ports: vec![ServicePort {
            protocol,
            name: protocol.name().to_lowercase(),
            port: service.port(),
            node_port: None,
            endpoints,
        }],
        balancing,
        external_traffic_local: false,
        internal_traffic_local: false,
        prefer_close: false,
        health_check_node_port: None,
        load_balancer_source_ranges: Vec::new(),
        source,
    };
    ServiceTable {
        services: imbl::OrdMap::unit(key, Arc::new(svc)),
        ..ServiceTable::default()
    }
}

/// Target shares of every pod of the run under `members` (terminating ones get none).
fn targets(members: &[Member], pods: usize) -> Vec<f64> {
    let mut t = vec![0.0; pods];
    let total: u32 = members
        .iter()
        .filter(|m| !m.terminating)
        .map(|m| m.weight)
        .sum();
    for m in members.iter().filter(|m| !m.terminating) {
        t[m.index] = f64::from(m.weight) / f64::from(total.max(1));
    }
    t
}

/// One scenario under one algorithm, on addresses block `block`.
pub async fn run_one(
    scenario: &Scenario,
    algorithm: Algorithm,
    options: &BenchOptions,
    block: u8,
) -> Result<RunResult, BenchError> {
    let specs = all_pods(scenario);
    let real = specs.iter().any(|s| s.upstream.is_some());
    let lab = Lab {
        service: SocketAddr::new(v4(options.net, block, 1), PORT),
        algorithm,
        affinity: scenario.affinity,
        protocol: scenario.protocol,
        names: specs.iter().map(|s| s.name.clone()).collect(),
        pods: (0..specs.len())
            .map(|i| SocketAddr::new(v4(options.net, block, 10 + i as u8), PORT))
            .collect(),
        specs,
        telemetry: Telemetry::new(),
        tables: watch::Sender::new(Arc::default()),
        seen: real.then(Arc::default),
    };
    let mut running = lab.start_pods().await?;
    let mut members: Vec<Member> = (0..scenario.pods.len()).map(|i| lab.member(i)).collect();
    lab.tables.send_replace(Arc::new(lab.table(&members)));
    let (proxy, stop) = lab.start_proxy(options.seed).await?;

    let begin = Instant::now();
    let load = Arc::new(Load {
        service: lab.service,
        protocol: lab.protocol,
        clients: (0..scenario.clients)
            .map(|i| client_addr(options.net, i))
            .collect(),
        issued: AtomicUsize::new(0),
        budget: scenario.connections,
        requests_per_connection: scenario.requests_per_connection,
        begin,
        deadline: begin + scenario.duration,
        names: lab.names.clone(),
        seed: options.seed,
        clients_in_turn: scenario.clients_in_turn,
        // The state file admits only DNS-label names, so the Host is always a valid value.
        http: (options.own.as_ref().zip(lab.seen.clone())).and_then(|(own, seen)| {
            HeaderValue::from_str(&own.host)
                .ok()
                .map(|host| (host, seen))
        }),
    });
    let workers: Vec<_> = (0..scenario.concurrency)
        .map(|_| tokio::spawn(worker(load.clone())))
        .collect();
    let phases = lab.play(scenario, begin, &mut members, &mut running).await;

    let mut records = Vec::new();
    let mut latencies_ms = Vec::new();
    for w in workers {
        let (their_records, their_latencies) = w.await.expect("a bench worker does not panic");
        records.extend(their_records);
        latencies_ms.extend(their_latencies);
    }
    let duration_ms = begin.elapsed().as_secs_f64() * 1000.0;
    stop.cancel();
    proxy.await.expect("the proxy task does not panic")?;
    drop(running);
    let mut result = measure::measure(
        scenario.name,
        algorithm,
        scenario.affinity,
        scenario.many_clients,
        Observed {
            pods: lab.names,
            records,
            latencies_ms,
            phases,
            duration_ms,
        },
    );
    result.protocol = scenario.protocol.to_string();
    Ok(result)
}

/// Every pod the run will see, initial ones first: indices are stable for the report.
fn all_pods(scenario: &Scenario) -> Vec<PodSpec> {
    let joining = scenario.events.iter().map(|event| match &event.change {
        Change::Add(spec) | Change::Replace(_, spec) => spec.clone(),
    });
    scenario.pods.iter().cloned().chain(joining).collect()
}

/// One run's Service, its pods and the proxy in front of them.
struct Lab {
    service: SocketAddr,
    algorithm: Algorithm,
    affinity: bool,
    protocol: Protocol,
    /// Every pod of the run, as `all_pods` orders them, with its name and address.
    specs: Vec<PodSpec>,
    names: Vec<String>,
    pods: Vec<SocketAddr>,
    telemetry: Arc<Telemetry>,
    /// What the proxy is told.
    tables: watch::Sender<Arc<ServiceTable>>,
    /// With real pods: which pod each client connection reached, as the relays saw it.
    seen: Option<Arc<Seen>>,
}

impl Lab {
    /// Starts every pod, those that join later too: the proxy does not know them yet.
    /// A real pod is started as the relay in front of it.
    async fn start_pods(&self) -> Result<Vec<Option<BenchPod>>, BenchError> {
        let mut running = Vec::with_capacity(self.specs.len());
        for (spec, &addr) in self.specs.iter().zip(&self.pods) {
            let started = match (spec.upstream, &self.seen) {
                (Some(upstream), Some(seen)) => {
                    BenchPod::relay(spec, upstream, addr, seen.clone()).await
                }
                _ => BenchPod::start(spec, addr, self.protocol).await,
            };
            let pod = started.map_err(|source| BenchError::Pod {
                pod: spec.name.clone(),
                addr,
                source,
            })?;
            running.push(Some(pod));
        }
        Ok(running)
    }

    /// Pod `index`, serving.
    fn member(&self, index: usize) -> Member {
        Member {
            index,
            addr: self.pods[index],
            weight: self.specs[index].weight,
            terminating: false,
        }
    }

    /// Plays the scenario's events at their times, while the workers run; the target
    /// shares from each change on.
    async fn play(
        &self,
        scenario: &Scenario,
        begin: Instant,
        members: &mut Vec<Member>,
        running: &mut [Option<BenchPod>],
    ) -> Vec<Phase> {
        let pods = self.specs.len();
        let mut phases = vec![Phase {
            at_ms: 0.0,
            targets: targets(members, pods),
        }];
        // The pods of the events follow the initial ones, in event order.
        for (new_index, event) in (scenario.pods.len()..).zip(&scenario.events) {
            tokio::time::sleep_until((begin + scenario.duration.mul_f64(event.at)).into()).await;
            members.push(self.member(new_index));
            let old = match event.change {
                Change::Replace(old, _) => {
                    members
                        .iter_mut()
                        .filter(|m| m.index == old)
                        .for_each(|m| m.terminating = true);
                    Some(old)
                }
                Change::Add(_) => None,
            };
            // Taken before the push: a proxy that applies it at once must not look late.
            let pushed = std::time::SystemTime::now();
            self.tables.send_replace(Arc::new(self.table(members)));
            phases.push(Phase {
                at_ms: begin.elapsed().as_secs_f64() * 1000.0,
                targets: targets(members, pods),
            });
            if let Some(old) = old {
                self.retire(&mut running[old], pushed).await;
                members.retain(|m| m.index != old);
                self.tables.send_replace(Arc::new(self.table(members)));
            }
        }
        phases
    }

    fn table(&self, members: &[Member]) -> ServiceTable {
        let source = crate::model::ClientSource {
            // Real pods: the relays learn from it which client each connection is.
            proxy_protocol: self.seen.as_ref().map(|_| ProxyProtocol::V2),
            transparent: false,
        };
        table(
            self.service,
            Balancing {
                algorithm: self.algorithm,
                affinity: self
                    .affinity
                    .then_some(crate::model::DEFAULT_AFFINITY_TIMEOUT),
            },
            self.protocol,
            members,
            &self.names,
            source,
        )
    }

    /// The proxy, in bind mode in this process, once it has applied its first table.
    async fn start_proxy(
        &self,
        seed: u64,
    ) -> Result<(JoinHandle<Result<(), proxy::ProxyError>>, CancellationToken), BenchError> {
        let stop = CancellationToken::new();
        let config = ProxyConfig {
            balance: BuildOptions {
                seed: Some(seed),
                ..Default::default()
            },
            ..Default::default()
        };
        let proxy = tokio::spawn(proxy::run(
            config,
            None,
            self.tables.subscribe(),
            self.telemetry.clone(),
            Shutdown::new(
                stop.clone().cancelled_owned(),
                // The clients have finished when the proxy stops; a straggler is not waited for long.
                async { tokio::time::sleep(Duration::from_secs(1)).await },
            ),
        ));
        for _ in 0..2000 {
            if self.telemetry.health().last_sync().is_some() {
                return Ok((proxy, stop));
            }
            if proxy.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.cancel();
        proxy.await.expect("the proxy task does not panic")?;
        Err(BenchError::ProxyStart(self.service))
    }

    /// Stops a replaced pod as a kubelet would: once the proxy has taken it out and its
    /// connections are done; the caller then takes it out of the slice. A pod stopped
    /// before the proxy's table changed would reset what sits in its accept queue: a
    /// failure of the lab, not of the balancer.
    async fn retire(&self, pod: &mut Option<BenchPod>, pushed: std::time::SystemTime) {
        for _ in 0..200 {
            let synced = self.telemetry.health().last_sync();
            if synced.is_some_and(|at| at >= pushed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Connections picked just before the change still land in its queue.
        tokio::time::sleep(Duration::from_millis(10)).await;
        for _ in 0..100 {
            if pod.as_ref().is_none_or(|p| p.open() == 0) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        *pod = None;
    }
}

/// The client of connection `n`: drawn from a hash of `n` and the seed, because taking
/// clients in turn would march in step with round-robin and make every client look
/// sticky.
fn client_of(n: usize, seed: u64, clients: usize) -> usize {
    // SplitMix64's finalizer: consecutive inputs give unrelated outputs.
    let mut z = (n as u64) ^ seed.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    ((z ^ (z >> 31)) % clients.max(1) as u64) as usize
}

/// What the workers of one run share.
struct Load {
    service: SocketAddr,
    protocol: Protocol,
    clients: Arc<[IpAddr]>,
    /// Connections begun so far, by every worker.
    issued: AtomicUsize,
    budget: usize,
    requests_per_connection: u32,
    begin: Instant,
    deadline: Instant,
    names: Vec<String>,
    seed: u64,
    clients_in_turn: bool,
    /// Real pods: HTTP requests for this `Host`, their pods as the relays saw them.
    http: Option<(HeaderValue, Arc<Seen>)>,
}

/// One client worker: connection after connection until the budget or the deadline;
/// what each connection did, and the latency of every answered request.
async fn worker(load: Arc<Load>) -> (Vec<Record>, Vec<f64>) {
    let mut records = Vec::new();
    let mut latencies = Vec::new();
    loop {
        let n = load.issued.fetch_add(1, Ordering::Relaxed);
        if n >= load.budget || Instant::now() >= load.deadline {
            break;
        }
        records.push(load.connection(n, &mut latencies).await);
    }
    (records, latencies)
}

impl Load {
    /// Connection `n`, from its client, with its requests.
    async fn connection(&self, n: usize, latencies: &mut Vec<f64>) -> Record {
        let client = match self.clients_in_turn {
            true => n % self.clients.len().max(1),
            false => client_of(n, self.seed, self.clients.len()),
        };
        let started = Instant::now();
        let mut record = Record {
            client: client as u32,
            start_ms: started.duration_since(self.begin).as_secs_f64() * 1000.0,
            pod: None,
            requests: 0,
            failed: false,
        };
        let source = self.clients[client];
        let connect = async {
            match &self.http {
                Some((host, seen)) => {
                    Client::connect_http(source, self.service, host.clone(), seen.clone()).await
                }
                None => Client::connect(source, self.service, self.protocol).await,
            }
        };
        let Ok(Ok(mut conn)) = tokio::time::timeout(STEP_TIMEOUT, connect).await else {
            record.failed = true;
            return record;
        };
        // The first request's latency includes the connect, as a client sees it.
        let mut sent = started;
        for r in 0..self.requests_per_connection {
            if r > 0 && Instant::now() >= self.deadline {
                break;
            }
            let Ok(Ok(pod)) = tokio::time::timeout(STEP_TIMEOUT, conn.request()).await else {
                record.failed = true;
                break;
            };
            latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
            if record.pod.is_none() {
                record.pod = self.names.iter().position(|n| n == pod);
            }
            record.requests += 1;
            sent = Instant::now();
        }
        record
    }
}
