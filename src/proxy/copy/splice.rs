//! Zero-copy forwarding on Linux: bytes move socket → pipe → socket with splice(2) and
//! never enter user space. Used for bulk transfers, where the copies through a buffer
//! are what the CPU spends its time on.

use std::io;
use std::os::fd::OwnedFd;

use metrics::Counter;
use rustix::pipe::{fcntl_setpipe_size, pipe_with, splice, PipeFlags, SpliceFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::{Activity, CopyError, Side};

/// The pipe's capacity: one splice moves up to this much.
const PIPE_SIZE: usize = 256 * 1024;

/// A pipe that carries one direction of one connection.
pub(crate) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl Pipe {
    pub(crate) fn new() -> io::Result<Pipe> {
        let (read, write) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
        // A bigger pipe means fewer splices per megabyte; the default (64 KiB) is kept
        // when the system allows no more.
        let capacity = fcntl_setpipe_size(&write, PIPE_SIZE).unwrap_or(64 * 1024);
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }
}

/// Copies `from` → `to` through `pipe` until end of stream, then passes the end on.
pub(crate) async fn copy(
    (from, from_side): (&TcpStream, Side),
    (to, to_side): (&TcpStream, Side),
    pipe: &Pipe,
    bytes: &Counter,
    activity: &Activity,
) -> Result<(), CopyError> {
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    loop {
        let n = loop {
            from.readable().await.map_err(|e| from_side.error(e))?;
            // The pipe is empty here, so a splice short of its capacity drained the
            // socket: readiness is cleared at once, as for a short read (`copy.rs`).
            let mut got = 0;
            let filled = from.try_io(Interest::READABLE, || {
                got = splice(from, None, &pipe.write, None, pipe.capacity, flags)?;
                if got > 0 && got < pipe.capacity {
                    Err(io::ErrorKind::WouldBlock.into())
                } else {
                    Ok(got)
                }
            });
            match filled {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => break got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(from_side.error(e)),
            }
        };
        if n == 0 {
            activity.pass_on_end(to);
            return Ok(());
        }
        let mut pending = n;
        while pending > 0 {
            to.writable().await.map_err(|e| to_side.error(e))?;
            let drained = to.try_io(Interest::WRITABLE, || {
                splice(&pipe.read, None, to, None, pending, flags).map_err(io::Error::from)
            });
            match drained {
                Ok(m) => pending -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(to_side.error(e)),
            }
        }
        bytes.increment(n as u64);
        activity.touch();
    }
}
