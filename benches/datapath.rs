//! Whole data path on loopback, beside a direct connection to the same backend: new
//! connections per second (connect, one request, the answer, close) and bytes per
//! second through one connection. Metrics stay on, as users run carousel.
//!
//! cargo bench --bench datapath

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use carousel::discovery::convert::Scope;
use carousel::discovery::file;
use carousel::proxy::{self, ProxyConfig};
use carousel::shutdown::Shutdown;
use carousel::telemetry::Telemetry;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::watch;

const SERVICE: &str = "127.95.0.1:8080";
const BULK: usize = 64 * 1024 * 1024;

/// A backend that answers each connection's first read with a short reply, or, on a
/// connection that starts with `B`, swallows everything and answers `ok` at the end.
async fn backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                if n > 0 && buf[0] == b'B' {
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            });
        }
    });
    addr
}

fn state(backend: SocketAddr) -> String {
    let (ip, port) = SERVICE.split_once(':').unwrap();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bench, namespace: default}}\n\
         spec: {{clusterIP: {ip}, ports: [{{name: tcp, port: {port}}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: bench-1, namespace: default, labels: {{kubernetes.io/service-name: bench}}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: {}}}]\n\
         endpoints: [{{addresses: [\"{}\"], targetRef: {{kind: Pod, name: backend}}}}]\n",
        backend.port(),
        backend.ip()
    )
}

async fn request(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: bench\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::with_capacity(64);
    s.read_to_end(&mut answer).await.unwrap();
    assert!(answer.ends_with(b"ok"));
}

async fn bulk(addr: SocketAddr, chunk: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"B").await.unwrap();
    let mut sent = 0;
    while sent < BULK {
        s.write_all(chunk).await.unwrap();
        sent += chunk.len();
    }
    s.shutdown().await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    assert!(answer.ends_with(b"ok"));
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let backend = rt.block_on(backend());
    let telemetry = Telemetry::new();
    let table = file::parse(&state(backend), &Scope::default())
        .unwrap()
        .table;
    let (_tables, updates) = watch::channel(Arc::new(table));
    let _proxy = rt.spawn(proxy::run(
        ProxyConfig::default(),
        None,
        updates,
        telemetry.clone(),
        Shutdown::new(std::future::pending(), std::future::pending()),
    ));
    let service: SocketAddr = SERVICE.parse().unwrap();
    rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(service).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "carousel did not start listening"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    let targets = [("direct", backend), ("carousel", service)];

    let mut group = c.benchmark_group("new_connection");
    group.throughput(Throughput::Elements(1));
    for (name, addr) in targets {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&rt).iter(|| request(addr));
        });
    }
    group.finish();

    let chunk = vec![0x5au8; 256 * 1024];
    let mut group = c.benchmark_group("bulk_64MiB");
    group.throughput(Throughput::Bytes(BULK as u64));
    group.sample_size(10);
    for (name, addr) in targets {
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.to_async(&rt).iter(|| bulk(addr, &chunk));
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
