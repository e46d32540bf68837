//! The load of the bench: pods that take a service time per request (optionally with
//! limited concurrency) and answer their name, over TCP or UDP, and clients that
//! connect from a chosen 127.x source address and send requests over one connection
//! (for UDP, one socket: one flow).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::HeaderValue;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::lab::bench::relay::{self, Relay, Seen};
use crate::model::Protocol;

/// One request: a single byte, so that a request never straddles two reads.
const REQUEST: u8 = b'?';

/// How a pod serves.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub(crate) name: String,
    /// Relative share the Service gives it (`carousel.dev/weights`).
    pub(crate) weight: u32,
    /// Time spent on each request.
    pub(crate) service_time: Duration,
    /// Requests served at once; the others wait their turn (None: no limit).
    pub(crate) concurrency: Option<usize>,
    /// A real pod (`--pods`): the bench relays to it instead of serving itself, and the
    /// clients speak HTTP.
    pub(crate) upstream: Option<SocketAddr>,
}

impl PodSpec {
    pub fn new(name: &str, service_time: Duration) -> Self {
        Self {
            name: name.to_string(),
            weight: 1,
            service_time,
            concurrency: None,
            upstream: None,
        }
    }
}

/// A running pod: answers each request byte with its name and a newline.
#[derive(Debug)]
pub struct BenchPod {
    pub name: String,
    pub addr: SocketAddr,
    open: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl BenchPod {
    pub async fn start(
        spec: &PodSpec,
        addr: SocketAddr,
        protocol: Protocol,
    ) -> io::Result<BenchPod> {
        let open = Arc::new(AtomicU64::new(0));
        let pod = Arc::new(Served {
            reply: format!("{}\n", spec.name).into_bytes().into(),
            service_time: spec.service_time,
            limit: spec.concurrency.map(|n| Arc::new(Semaphore::new(n))),
            open: open.clone(),
        });
        let (addr, task) = match protocol {
            Protocol::Tcp => {
                let listener = TcpListener::bind(addr).await?;
                (listener.local_addr()?, tokio::spawn(accept(listener, pod)))
            }
            Protocol::Udp => {
                let socket = Arc::new(UdpSocket::bind(addr).await?);
                (socket.local_addr()?, tokio::spawn(answer(socket, pod)))
            }
        };
        Ok(BenchPod {
            name: spec.name.clone(),
            addr,
            open,
            task,
        })
    }

    /// The relay in front of the real pod `spec.upstream` (TCP only), noting in `seen`
    /// which client's connection reached it.
    pub(crate) async fn relay(
        spec: &PodSpec,
        upstream: SocketAddr,
        addr: SocketAddr,
        seen: Arc<Seen>,
    ) -> io::Result<BenchPod> {
        let open = Arc::new(AtomicU64::new(0));
        let listener = TcpListener::bind(addr).await?;
        let relay = Arc::new(Relay {
            pod: spec.name.as_str().into(),
            upstream,
            seen,
            open: open.clone(),
        });
        Ok(BenchPod {
            name: spec.name.clone(),
            addr: listener.local_addr()?,
            open,
            task: tokio::spawn(relay::accept(listener, relay)),
        })
    }

    /// Connections open to this pod right now (none for UDP, which has no connection).
    pub(crate) fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }
}

impl Drop for BenchPod {
    fn drop(&mut self) {
        // Stops accepting; connections already taken finish on their own.
        self.task.abort();
    }
}

#[derive(Debug)]
struct Served {
    reply: Arc<[u8]>,
    service_time: Duration,
    limit: Option<Arc<Semaphore>>,
    open: Arc<AtomicU64>,
}

async fn accept(listener: TcpListener, pod: Arc<Served>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        };
        let pod = pod.clone();
        pod.open.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let _ = serve(stream, &pod).await;
            pod.open.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn serve(mut stream: TcpStream, pod: &Served) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).await? == 1 {
        pod.take_the_time().await;
        stream.write_all(&pod.reply).await?;
    }
    Ok(())
}

/// A UDP pod: each request datagram is answered, after the service time, to whoever
/// sent it (for a proxied one, the proxy's socket of that flow).
async fn answer(socket: Arc<UdpSocket>, pod: Arc<Served>) {
    let mut request = [0u8; 16];
    loop {
        let Ok((_, from)) = socket.recv_from(&mut request).await else {
            continue; // an ICMP error from an earlier answer's flow
        };
        let (socket, pod) = (socket.clone(), pod.clone());
        tokio::spawn(async move {
            pod.take_the_time().await;
            let _ = socket.send_to(&pod.reply, from).await;
        });
    }
}

impl Served {
    /// One request's service time. The permit is held for the service time only: a
    /// queued request waits here, which is what a busy single-threaded pod does to its
    /// callers.
    async fn take_the_time(&self) {
        let _permit = match &self.limit {
            Some(limit) => Some(
                limit
                    .acquire()
                    .await
                    .expect("the semaphore is never closed"),
            ),
            None => None,
        };
        tokio::time::sleep(self.service_time).await;
    }
}

/// A client connection through the Service; for UDP, a connected socket: one flow.
#[derive(Debug)]
pub struct Client {
    transport: Transport,
    line: String,
}

#[derive(Debug)]
enum Transport {
    Tcp(BufReader<TcpStream>),
    Udp(UdpSocket),
    /// HTTP/1.1 requests kept alive on one connection, to a real pod behind a relay.
    Http(Http),
}

#[derive(Debug)]
struct Http {
    sender: SendRequest<Empty<Bytes>>,
    host: HeaderValue,
    /// This end of the connection: what the PROXY header tells the relay.
    local: SocketAddr,
    seen: Arc<Seen>,
    /// The pod, once the relay has said which.
    pod: Option<Arc<str>>,
}

/// A real pod's answer is read to its end but kept no longer than this.
const MAX_BODY: usize = 1 << 20;

impl Client {
    /// Connects from `source` (any port) to `service`: binding first is what makes the
    /// proxy, its affinity and its hashing see `source` as the client.
    pub async fn connect(
        source: IpAddr,
        service: SocketAddr,
        protocol: Protocol,
    ) -> io::Result<Client> {
        let transport = match protocol {
            Protocol::Tcp => Transport::Tcp(BufReader::new(tcp(source, service).await?)),
            Protocol::Udp => {
                let socket = UdpSocket::bind(SocketAddr::new(source, 0)).await?;
                socket.connect(service).await?;
                Transport::Udp(socket)
            }
        };
        Ok(Client {
            transport,
            line: String::new(),
        })
    }

    /// An HTTP/1.1 connection from `source` to `service`, asking for `host`'s `/`,
    /// whose pod the relays note in `seen`.
    pub(crate) async fn connect_http(
        source: IpAddr,
        service: SocketAddr,
        host: HeaderValue,
        seen: Arc<Seen>,
    ) -> io::Result<Client> {
        let stream = tcp(source, service).await?;
        let local = stream.local_addr()?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        // Ends when `sender` is dropped, with the client.
        tokio::spawn(connection);
        Ok(Client {
            transport: Transport::Http(Http {
                sender,
                host,
                local,
                seen,
                pod: None,
            }),
            line: String::new(),
        })
    }

    /// Sends one request and returns the name of the pod that answered it.
    pub async fn request(&mut self) -> io::Result<&str> {
        self.line.clear();
        match &mut self.transport {
            Transport::Tcp(stream) => {
                stream.get_mut().write_all(&[REQUEST]).await?;
                if stream.read_line(&mut self.line).await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the connection closed without an answer",
                    ));
                }
            }
            Transport::Udp(socket) => {
                socket.send(&[REQUEST]).await?;
                let mut answer = [0u8; 256];
                let len = socket.recv(&mut answer).await?;
                self.line.push_str(&String::from_utf8_lossy(&answer[..len]));
            }
            Transport::Http(http) => {
                let pod = http.request().await?;
                self.line.push_str(&pod);
            }
        }
        Ok(self.line.trim_end())
    }
}

/// A TCP connection from `source` (any port) to `service`.
async fn tcp(source: IpAddr, service: SocketAddr) -> io::Result<TcpStream> {
    let socket = match service {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(service).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

impl Http {
    /// `GET /`, its answer read whatever its status (any answer is the pod's), and the
    /// pod that gave it.
    async fn request(&mut self) -> io::Result<Arc<str>> {
        let request = hyper::Request::get("/")
            .header(hyper::header::HOST, self.host.clone())
            .body(Empty::new())
            .map_err(io::Error::other)?;
        std::future::poll_fn(|cx| self.sender.poll_ready(cx))
            .await
            .map_err(io::Error::other)?;
        let answer = self
            .sender
            .send_request(request)
            .await
            .map_err(io::Error::other)?;
        Limited::new(answer.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(io::Error::other)?;
        if self.pod.is_none() {
            self.pod = self.seen.take(self.local);
        }
        self.pod.clone().ok_or_else(|| {
            io::Error::other(format!("no relay saw the connection from {}", self.local))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[tokio::test]
    async fn a_pod_answers_every_request_with_its_name() {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 55, 199, 10));
        let spec = PodSpec::new("pod-a", Duration::from_millis(1));
        let pod = BenchPod::start(&spec, SocketAddr::new(ip, 0), Protocol::Tcp)
            .await
            .unwrap();
        let source = IpAddr::V4(Ipv4Addr::new(127, 55, 199, 20));
        let mut client = Client::connect(source, pod.addr, Protocol::Tcp)
            .await
            .unwrap();
        for _ in 0..3 {
            assert_eq!(client.request().await.unwrap(), "pod-a");
        }
        assert_eq!(pod.open(), 1);
    }

    #[tokio::test]
    async fn a_udp_pod_answers_every_datagram_with_its_name() {
        let ip = IpAddr::V4(Ipv4Addr::new(127, 55, 199, 11));
        let spec = PodSpec::new("pod-u", Duration::from_millis(1));
        let pod = BenchPod::start(&spec, SocketAddr::new(ip, 0), Protocol::Udp)
            .await
            .unwrap();
        let source = IpAddr::V4(Ipv4Addr::new(127, 55, 199, 21));
        let mut client = Client::connect(source, pod.addr, Protocol::Udp)
            .await
            .unwrap();
        for _ in 0..3 {
            assert_eq!(client.request().await.unwrap(), "pod-u");
        }
        assert_eq!(pod.open(), 0, "UDP has no connection");
    }
}
