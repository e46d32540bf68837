//! Pods for the lab: tiny HTTP servers that answer every request with their own name,
//! and the client that asks them through carousel.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// A pod: answers `HTTP/1.1 200` with its name, one request per connection.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Pod {
    /// Starts a pod listening on `addr`.
    pub async fn start(name: &str, addr: SocketAddr) -> io::Result<Pod> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let reply: Arc<[u8]> = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{name}\n",
            name.len() + 1
        )
        .into_bytes()
        .into();
        let task = tokio::spawn(serve(listener, reply, served.clone()));
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

async fn serve(listener: TcpListener, reply: Arc<[u8]>, served: Arc<AtomicU64>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let reply = reply.clone();
        let served = served.clone();
        tokio::spawn(async move {
            if read_request(&mut stream).await.is_ok() && stream.write_all(&reply).await.is_ok() {
                served.fetch_add(1, Ordering::Relaxed);
                let _ = stream.shutdown().await;
            }
        });
    }
}

/// Reads until the end of the request head, the end of the stream, or 8 KiB.
async fn read_request(stream: &mut TcpStream) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    let mut len = 0;
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 || buf[..len + n].windows(4).any(|w| w == b"\r\n\r\n") {
            return Ok(());
        }
        len += n;
    }
    Ok(())
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
