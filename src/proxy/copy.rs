//! Copies one connection's bytes both ways until both sides are done, carrying each
//! side's half-close to the other. A connection owns no buffer: every chunk is read into
//! its thread's one scratch buffer and written on at once, and only the part a slow peer
//! cannot take yet is kept, until it is written. An idle connection, even one that has
//! carried traffic, costs its sockets and its task and nothing more.

use std::cell::RefCell;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use metrics::Counter;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use crate::proxy::clock::now_ms;

#[cfg(target_os = "linux")]
mod splice;

/// The most one read takes in.
pub(crate) const BUFFER_SIZE: usize = 16 * 1024;

thread_local! {
    /// What every connection on this thread reads into. Borrowed only between a read
    /// and the write that follows it, never across an await.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; BUFFER_SIZE].into_boxed_slice());
}

/// What ended a connection early, and on whose side.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CopyError {
    #[error("client side: {0}")]
    Client(#[source] io::Error),
    #[error("endpoint side: {0}")]
    Endpoint(#[source] io::Error),
    #[error("no byte either way for the idle timeout")]
    Idle,
    /// The drain after a shutdown ran out (`--drain-timeout`, or a second signal).
    #[error("cut at the end of the drain")]
    Cut,
}

/// Which socket an I/O error came from.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    Client,
    Endpoint,
}

impl Side {
    pub(crate) fn error(self, e: io::Error) -> CopyError {
        match self {
            Side::Client => CopyError::Client(e),
            Side::Endpoint => CopyError::Endpoint(e),
        }
    }
}

/// Copies `client` ⇄ `upstream`. The first error ends both directions (the other one
/// may be waiting on a peer that will never speak again), and so does `idle_timeout`
/// without a byte either way. A side that has half-closed is still watched: its reset
/// ends the connection at once, even while the other side stays silent.
pub(crate) async fn copy_both_ways(
    client: &TcpStream,
    upstream: &TcpStream,
    to_endpoint: &Counter,
    to_client: &Counter,
    idle_timeout: Option<Duration>,
) -> Result<(), CopyError> {
    let activity = Activity::new(idle_timeout.is_some());
    let copy = async {
        let up = copy_one_way(
            (client, Side::Client),
            (upstream, Side::Endpoint),
            to_endpoint,
            &activity,
        );
        let down = copy_one_way(
            (upstream, Side::Endpoint),
            (client, Side::Client),
            to_client,
            &activity,
        );
        tokio::pin!(up, down);
        let (mut up_ended, mut down_ended) = (false, false);
        while !(up_ended && down_ended) {
            tokio::select! {
                ended = &mut up, if !up_ended => {
                    ended?;
                    up_ended = true;
                }
                ended = &mut down, if !down_ended => {
                    ended?;
                    down_ended = true;
                }
                e = reset(client), if up_ended => return Err(CopyError::Client(e)),
                e = reset(upstream), if down_ended => return Err(CopyError::Endpoint(e)),
            }
        }
        Ok(())
    };
    match idle_timeout {
        None => copy.await,
        Some(limit) => tokio::select! {
            result = copy => result,
            () = idle(&activity, limit) => Err(CopyError::Idle),
        },
    }
}

/// Resolves with the error of a socket whose peer has already half-closed, once the
/// peer resets it. A read would not tell (the stream has ended, a read returns 0 at
/// once); the kernel's error event does.
async fn reset(socket: &TcpStream) -> io::Error {
    loop {
        if let Err(e) = socket.ready(Interest::ERROR).await {
            return e;
        }
        match socket.take_error() {
            // A reset in CLOSE_WAIT (after the peer's FIN) is reported as EPIPE.
            Ok(Some(e)) if e.kind() == io::ErrorKind::BrokenPipe => {
                return io::ErrorKind::ConnectionReset.into()
            }
            Ok(Some(e)) | Err(e) => return e,
            // An error event whose error is gone: wait for the next one.
            Ok(None) => {
                let _ = socket.try_io(Interest::ERROR, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
            }
        }
    }
}

/// What the two directions of a connection share: when bytes last moved, on the
/// proxy's millisecond clock (kept only when an idle timeout asks for it: otherwise a
/// chunk costs no clock reading), and whether one direction has ended.
pub(crate) struct Activity {
    last_ms: AtomicU64,
    tracked: bool,
    one_ended: AtomicBool,
}

impl Activity {
    fn new(tracked: bool) -> Self {
        Self {
            last_ms: AtomicU64::new(if tracked { now_ms() } else { 0 }),
            tracked,
            one_ended: AtomicBool::new(false),
        }
    }

    /// Passes a direction's end of stream on to `to` as a half-close. The direction
    /// that ends second skips it: the connection closes at once, and the close tells
    /// `to` the same, one system call fewer per connection.
    pub(crate) fn pass_on_end(&self, to: &TcpStream) {
        if !self.one_ended.swap(true, Ordering::Relaxed) {
            // The peer may be gone already; then there is nobody left to tell.
            let _ = SockRef::from(to).shutdown(Shutdown::Write);
        }
    }

    /// Records that bytes moved just now.
    pub(crate) fn touch(&self) {
        if self.tracked {
            self.last_ms.store(now_ms(), Ordering::Relaxed);
        }
    }
}

/// Resolves once `limit` has passed since the last recorded activity.
async fn idle(activity: &Activity, limit: Duration) {
    let limit_ms = limit.as_millis() as u64;
    loop {
        let quiet_until = activity.last_ms.load(Ordering::Relaxed) + limit_ms;
        let now = now_ms();
        if now >= quiet_until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(quiet_until - now)).await;
    }
}

/// Reads in a row that fill the whole buffer before a direction switches to splice(2).
/// A full read means the sender outpaces the copy: a bulk transfer, where copying
/// through user space is what the CPU spends its time on. Request/response traffic,
/// however long the connection lives, reads short messages and stays at one read and
/// one write a message, fewer system calls than splice's two plus a pipe.
#[cfg(target_os = "linux")]
const SPLICE_AFTER_FULL_READS: u32 = 4;

/// Copies until end of stream, then passes the end on (`Activity::pass_on_end`).
async fn copy_one_way(
    from: (&TcpStream, Side),
    to: (&TcpStream, Side),
    bytes: &Counter,
    activity: &Activity,
) -> Result<(), CopyError> {
    #[cfg(target_os = "linux")]
    {
        if copy_buffered(from, to, bytes, activity, Some(SPLICE_AFTER_FULL_READS)).await?
            == Ended::Eof
        {
            return Ok(());
        }
        match splice::Pipe::new() {
            Ok(pipe) => return splice::copy(from, to, &pipe, bytes, activity).await,
            // Out of descriptors for a pipe: the buffer still works.
            Err(e) => tracing::debug!(error = %e, "no pipe for splice; copying through a buffer"),
        }
    }
    copy_buffered(from, to, bytes, activity, None)
        .await
        .map(|_| ())
}

#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The stream ended, and the end was passed on.
    Eof,
    /// `switch_after` full reads came in a row: a bulk transfer; the caller takes over.
    Bulk,
}

async fn copy_buffered(
    (from, from_side): (&TcpStream, Side),
    (to, to_side): (&TcpStream, Side),
    bytes: &Counter,
    activity: &Activity,
    switch_after: Option<u32>,
) -> Result<Ended, CopyError> {
    // What `to` could not take yet: empty, and unallocated, while the peer keeps up.
    let mut rest = Vec::new();
    let mut full_reads = 0u32;
    loop {
        let ready = from
            .ready(Interest::READABLE)
            .await
            .map_err(|e| from_side.error(e))?;
        // The sender's end came with its last bytes: what is read now is all there is.
        let last = ready.is_read_closed();
        let relayed = SCRATCH.with_borrow_mut(|buf| {
            relay_chunk((from, from_side), (to, to_side), buf, &mut rest, last)
        });
        let n = match relayed {
            Ok(n) => n,
            Err(Relay::Empty) => continue,
            Err(Relay::Failed(e)) => return Err(e),
        };
        if n == 0 {
            activity.pass_on_end(to);
            return Ok(Ended::Eof);
        }
        if !rest.is_empty() {
            write_all(to, &rest).await.map_err(|e| to_side.error(e))?;
            // A peer that was slow once keeps no memory for it.
            rest = Vec::new();
        }
        bytes.increment(n as u64);
        activity.touch();
        full_reads = if n == BUFFER_SIZE { full_reads + 1 } else { 0 };
        if switch_after.is_some_and(|limit| full_reads >= limit) {
            return Ok(Ended::Bulk);
        }
    }
}

/// Why a chunk moved nothing.
enum Relay {
    /// The socket had nothing after all (its readiness was stale).
    Empty,
    Failed(CopyError),
}

/// Reads one chunk from `from` into `buf` and writes it to `to` at once; what `to`
/// cannot take now goes to `rest`. Returns the chunk's length, 0 at end of stream.
/// `last`: the end of the stream is already in, so the chunk may wait for it (`write_some`).
fn relay_chunk(
    (from, from_side): (&TcpStream, Side),
    (to, to_side): (&TcpStream, Side),
    buf: &mut [u8],
    rest: &mut Vec<u8>,
    last: bool,
) -> Result<usize, Relay> {
    let n = match read_some(from, buf) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(Relay::Empty),
        Err(e) => return Err(Relay::Failed(from_side.error(e))),
    };
    if n == 0 {
        return Ok(0);
    }
    let written = match write_some(to, &buf[..n], last) {
        Ok(written) => written,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(Relay::Failed(to_side.error(e))),
    };
    rest.extend_from_slice(&buf[written..n]);
    Ok(n)
}

/// Reads what the socket holds. A read shorter than the buffer means the socket is
/// drained for now, so its readiness is cleared at once: the next read waits for the
/// next event instead of spending a system call to learn that nothing is there.
#[cfg(target_os = "linux")]
fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let result = from.try_io(Interest::READABLE, || {
        got = rustix::io::read(from, &mut *buf)?;
        if got > 0 && got < buf.len() {
            // tokio clears readiness on WouldBlock only, and only if no event came since.
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

#[cfg(not(target_os = "linux"))]
fn read_some(from: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    from.try_read(buf)
}

/// Writes what `to` takes now. With `last`, the end of the stream follows within
/// microseconds (a half-close, or the close), so the bytes are held back (MSG_MORE)
/// and leave in one segment with the FIN: a closing response costs the peer one
/// segment and one wake-up instead of two, and the data's ACK rides on the peer's FIN.
#[cfg(target_os = "linux")]
fn write_some(to: &TcpStream, data: &[u8], last: bool) -> io::Result<usize> {
    use rustix::net::{send, SendFlags};
    let flags = if last {
        SendFlags::NOSIGNAL | SendFlags::MORE
    } else {
        SendFlags::NOSIGNAL
    };
    to.try_io(Interest::WRITABLE, || Ok(send(to, data, flags)?))
}

#[cfg(not(target_os = "linux"))]
fn write_some(to: &TcpStream, data: &[u8], _last: bool) -> io::Result<usize> {
    to.try_write(data)
}

async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Both ends of a fresh loopback connection.
    async fn connected() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dialed = TcpStream::connect(listener.local_addr().unwrap());
        let (dialed, accepted) = tokio::join!(dialed, listener.accept());
        (dialed.unwrap(), accepted.unwrap().0)
    }

    /// The buffered copy `from` → `to`: as a direction starts out, or with `None`
    /// the portable path, which never hands over.
    async fn copy(from: &TcpStream, to: &TcpStream, switch_after: Option<u32>) -> Ended {
        copy_buffered(
            (from, Side::Client),
            (to, Side::Endpoint),
            &Counter::noop(),
            &Activity::new(false),
            switch_after,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_reset_after_a_half_close_ends_the_connection_while_the_other_side_is_silent() {
        for resetting in [Side::Client, Side::Endpoint] {
            let (client_far, client) = connected().await;
            let (upstream, pod) = connected().await;
            let copying = tokio::spawn(async move {
                let (none, also_none) = (Counter::noop(), Counter::noop());
                copy_both_ways(&client, &upstream, &none, &also_none, None).await
            });
            // One side half-closes, waits, then resets; the other never says a word.
            let (closer, _silent) = match resetting {
                Side::Client => (client_far, pod),
                Side::Endpoint => (pod, client_far),
            };
            SockRef::from(&closer).shutdown(Shutdown::Write).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            SockRef::from(&closer)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
            drop(closer);
            let ended = tokio::time::timeout(Duration::from_secs(5), copying)
                .await
                .expect("the reset ends the connection")
                .unwrap();
            let reset = |e: &io::Error| e.kind() == io::ErrorKind::ConnectionReset;
            match (resetting, ended) {
                (Side::Client, Err(CopyError::Client(e))) if reset(&e) => {}
                (Side::Endpoint, Err(CopyError::Endpoint(e))) if reset(&e) => {}
                (_, other) => panic!("{other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn request_response_traffic_stays_buffered_however_long_it_lasts() {
        let (mut client, from) = connected().await;
        let (to, mut server) = connected().await;
        // 400 messages of 1 KiB, each sent once the previous one arrived: 400 KiB in
        // all, and never a read that fills the buffer.
        let (arrived, mut next) = tokio::sync::mpsc::channel::<()>(1);
        let sender = async move {
            for _ in 0..400 {
                client.write_all(&[7u8; 1024]).await.unwrap();
                next.recv().await.unwrap();
            }
            client.shutdown().await.unwrap();
        };
        let receiver = async move {
            let mut message = [0u8; 1024];
            for _ in 0..400 {
                server.read_exact(&mut message).await.unwrap();
                arrived.send(()).await.unwrap();
            }
        };
        let (ended, (), ()) = tokio::join!(
            copy(&from, &to, Some(SPLICE_AFTER_FULL_READS)),
            sender,
            receiver
        );
        assert_eq!(ended, Ended::Eof);
    }

    #[tokio::test]
    async fn a_slow_reader_gets_every_byte_in_order() {
        let (mut client, from) = connected().await;
        let (to, mut server) = connected().await;
        let sent: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let expected = sent.clone();
        let sender = async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
        };
        // Small reads with a yield between them: the copy meets a full socket, keeps
        // the part of a chunk it could not write, and writes it before reading on.
        let receiver = async move {
            let mut got = Vec::new();
            let mut piece = [0u8; 1024];
            loop {
                let n = server.read(&mut piece).await.unwrap();
                if n == 0 {
                    break got;
                }
                got.extend_from_slice(&piece[..n]);
                tokio::task::yield_now().await;
            }
        };
        let (ended, (), got) = tokio::join!(copy(&from, &to, None), sender, receiver);
        assert_eq!(ended, Ended::Eof);
        assert!(
            got == expected,
            "{} bytes arrived of {}",
            got.len(),
            expected.len()
        );
    }

    /// Segments `socket` has received so far, from TCP_INFO.
    fn segments_in(socket: &TcpStream) -> u32 {
        use std::os::fd::AsRawFd;
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: getsockopt(TCP_INFO) has no safe wrapper in the crates at hand.
        // `tcp_info` holds integers only, so all zeroes is a valid value, and the call
        // writes at most `len` bytes into it.
        let (rc, info) = unsafe {
            let mut info: libc::tcp_info = std::mem::zeroed();
            let rc = libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            );
            (rc, info)
        };
        assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
        info.tcpi_segs_in
    }

    #[tokio::test]
    async fn a_closing_answer_reaches_the_client_in_one_segment_with_its_end() {
        let (mut client, client_side) = connected().await;
        let (endpoint_side, mut endpoint) = connected().await;
        // The endpoint answers and closes before the proxy looks, as a server does
        // with `Connection: close`.
        endpoint
            .write_all(b"HTTP/1.1 200 OK\r\n\r\n")
            .await
            .unwrap();
        endpoint.shutdown().await.unwrap();
        while !endpoint_side
            .ready(Interest::READABLE)
            .await
            .unwrap()
            .is_read_closed()
        {
            // Let the reactor record the end, should it come in an event of its own.
            tokio::task::yield_now().await;
        }
        let before = segments_in(&client);
        assert_eq!(copy(&endpoint_side, &client_side, None).await, Ended::Eof);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert_eq!(answer, b"HTTP/1.1 200 OK\r\n\r\n");
        // Sent at once, the answer and the FIN would be two segments.
        assert_eq!(segments_in(&client) - before, 1);
    }

    #[tokio::test]
    async fn a_bulk_transfer_hands_over_to_splice() {
        let (mut client, from) = connected().await;
        let (to, mut server) = connected().await;
        // As fast as the sockets take it; both tasks end when the sockets close.
        let sender = tokio::spawn(async move {
            let _ = client.write_all(&vec![7u8; 8 << 20]).await;
        });
        let receiver = tokio::spawn(async move {
            let mut sink = vec![0u8; 64 * 1024];
            while server.read(&mut sink).await.is_ok_and(|n| n > 0) {}
        });
        assert_eq!(
            copy(&from, &to, Some(SPLICE_AFTER_FULL_READS)).await,
            Ended::Bulk
        );
        drop((from, to));
        sender.abort();
        receiver.abort();
    }
}
