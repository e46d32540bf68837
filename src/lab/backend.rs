//! Pods for the lab: tiny HTTP servers that answer every request with their own name,
//! and the clients that ask them through carousel: one request per connection, or many
//! on one kept connection.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A pod: answers `HTTP/1.1 200` with its name, to every request of a connection until
/// the client asks it to close (`connection: close`) or closes.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

/// A pod's two answers: to a request that keeps the connection, and to one that closes it.
#[derive(Debug)]
struct Replies {
    keep: Box<[u8]>,
    close: Box<[u8]>,
}

impl Pod {
    /// Starts a pod listening on `addr`.
    pub async fn start(name: &str, addr: SocketAddr) -> io::Result<Pod> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let reply = |connection: &str| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: {connection}\r\n\r\n{name}\n",
                name.len() + 1
            )
            .into_bytes()
            .into_boxed_slice()
        };
        let replies = Arc::new(Replies {
            keep: reply("keep-alive"),
            close: reply("close"),
        });
        let task = tokio::spawn(serve(listener, replies, served.clone()));
        Ok(Pod {
            name: name.to_string(),
            addr,
            served,
            task,
        })
    }

    /// Requests this pod has answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, replies: Arc<Replies>, served: Arc<AtomicU64>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let replies = replies.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Ok(Some(close)) = read_request(&mut stream, &mut pending).await {
                let reply = if close { &replies.close } else { &replies.keep };
                if stream.write_all(reply).await.is_err() {
                    return;
                }
                served.fetch_add(1, Ordering::Relaxed);
                if close {
                    let _ = stream.shutdown().await;
                    return;
                }
            }
        });
    }
}

/// The most a request head may take.
const MAX_HEAD: usize = 8192;

/// Reads one request head, keeping what follows it in `pending` for the next: whether
/// the client asked to close. `None`: the client closed first. A head past 8 KiB, or
/// cut by the end of the stream, is answered (and closes) as it stands.
async fn read_request(stream: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<Option<bool>> {
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            pending.drain(..end + 4);
            return Ok(Some(head.contains("connection: close")));
        }
        if pending.len() >= MAX_HEAD {
            return Ok(Some(true));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok((!pending.is_empty()).then_some(true));
        }
        pending.extend_from_slice(&buf[..n]);
    }
}

/// Connects from `source` (any port) to `service`, sends one request and returns the
/// name of the pod that answered.
pub async fn ask(source: IpAddr, service: SocketAddr, timeout: Duration) -> io::Result<String> {
    let exchange = async {
        let socket = match service {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(source, 0))?;
        let mut stream = socket.connect(service).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: carousel\r\nconnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::with_capacity(256);
        stream.read_to_end(&mut response).await?;
        let text = String::from_utf8_lossy(&response);
        match text.split_once("\r\n\r\n") {
            Some((_, body)) if !body.trim().is_empty() => Ok(body.trim().to_string()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed without an answer",
            )),
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "no answer in time")))
}

/// Connects from `source` to `service` and sends `requests` requests one after another
/// on that one connection (HTTP/1.1 keep-alive, as a browser does): the pod that
/// answered each. `timeout` bounds the connect and each answer.
pub async fn ask_keepalive(
    source: IpAddr,
    service: SocketAddr,
    requests: usize,
    timeout: Duration,
) -> io::Result<Vec<String>> {
    let late = || io::Error::new(io::ErrorKind::TimedOut, "no answer in time");
    let socket = match service {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    let mut stream = tokio::time::timeout(timeout, socket.connect(service))
        .await
        .map_err(|_| late())??;
    let mut pending = Vec::new();
    let mut answers = Vec::with_capacity(requests);
    for _ in 0..requests {
        let exchange = async {
            stream
                .write_all(b"GET / HTTP/1.1\r\nhost: carousel\r\n\r\n")
                .await?;
            read_response(&mut stream, &mut pending).await
        };
        answers.push(
            tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| late())??,
        );
    }
    Ok(answers)
}

/// One response with a `content-length` on a kept connection: its body, trimmed.
async fn read_response(stream: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<String> {
    let cut = || {
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the connection closed mid-answer",
        )
    };
    let mut buf = [0u8; 4096];
    let (head_end, length) = loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&pending[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no content-length"))?;
            break (end + 4, length);
        }
        if pending.len() > MAX_HEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "an answer head past 8 KiB",
            ));
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(cut());
        }
        pending.extend_from_slice(&buf[..n]);
    };
    while pending.len() < head_end + length {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(cut());
        }
        pending.extend_from_slice(&buf[..n]);
    }
    let body = String::from_utf8_lossy(&pending[head_end..head_end + length])
        .trim()
        .to_string();
    pending.drain(..head_end + length);
    Ok(body)
}
