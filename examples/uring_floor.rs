//! A measuring stick, not part of carousel: the least a user-space TCP relay can do per
//! request on this machine. One thread, one io_uring, no balancer beyond round-robin,
//! no metrics, no timeouts, no retries: every client connection is joined to the next
//! backend and bytes are copied both ways through two fixed buffers. Reads and writes
//! go through the ring, so a whole batch of them costs one system call.
//!
//! If this relay's CPU per request matches HAProxy's, the cost is the kernel's (the TCP
//! stack on loopback and waking the peers on the other core), and no user-space design
//! gets below it. Run it as a peerbench contestant (see the README, Performance):
//!
//! ```text
//! cargo build --release --example uring_floor
//! peerbench --contestant 'floor=target/release/examples/uring_floor {listen} {backends}'
//! ```

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("uring_floor measures Linux's io_uring; there is nothing to run here");
}

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    floor::main()
}

#[cfg(target_os = "linux")]
mod floor {
    use std::net::{SocketAddr, TcpListener};
    use std::os::fd::{AsRawFd, OwnedFd};

    use io_uring::{opcode, squeue, types, IoUring};
    use socket2::{Domain, SockAddr, Socket, Type};

    const BUFFER: usize = 16 * 1024;

    /// What a completion is for: the low byte of its user data (the direction is the
    /// next byte, the connection's slot the bits above).
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum Op {
        Accept = 0,
        Connect = 1,
        Recv = 2,
        Send = 3,
    }

    /// One direction of a connection: `from` → `to` through `buf`.
    struct Direction {
        buf: Box<[u8]>,
        len: usize,
        sent: usize,
        done: bool,
    }

    struct Connection {
        client: OwnedFd,
        backend: OwnedFd,
        backend_addr: SockAddr,
        /// [client → backend, backend → client]
        ways: [Direction; 2],
        in_flight: u32,
    }

    impl Connection {
        /// The socket direction `way` reads from.
        fn from(&self, way: usize) -> &OwnedFd {
            if way == 0 {
                &self.client
            } else {
                &self.backend
            }
        }

        /// The socket direction `way` writes to.
        fn to(&self, way: usize) -> &OwnedFd {
            self.from(1 - way)
        }
    }

    fn user_data(slot: usize, way: usize, op: Op) -> u64 {
        ((slot as u64) << 16) | ((way as u64) << 8) | op as u64
    }

    fn decode(data: u64) -> (usize, usize, Op) {
        let op = match data & 0xff {
            0 => Op::Accept,
            1 => Op::Connect,
            2 => Op::Recv,
            _ => Op::Send,
        };
        ((data >> 16) as usize, ((data >> 8) & 0xff) as usize, op)
    }

    struct Relay {
        backends: Vec<SocketAddr>,
        next_backend: usize,
        slots: Vec<Option<Box<Connection>>>,
        free: Vec<usize>,
        queued: Vec<squeue::Entry>,
    }

    impl Relay {
        fn recv(&mut self, slot: usize, way: usize) {
            let conn = self.slots[slot].as_mut().expect("live slot");
            let from = conn.from(way).as_raw_fd();
            let buf = &mut conn.ways[way].buf;
            conn.in_flight += 1;
            self.queued.push(
                opcode::Recv::new(types::Fd(from), buf.as_mut_ptr(), buf.len() as u32)
                    .build()
                    .user_data(user_data(slot, way, Op::Recv)),
            );
        }

        fn send(&mut self, slot: usize, way: usize) {
            let conn = self.slots[slot].as_mut().expect("live slot");
            let to = conn.to(way).as_raw_fd();
            let dir = &conn.ways[way];
            let pending = &dir.buf[dir.sent..dir.len];
            conn.in_flight += 1;
            self.queued.push(
                opcode::Send::new(types::Fd(to), pending.as_ptr(), pending.len() as u32)
                    .build()
                    .user_data(user_data(slot, way, Op::Send)),
            );
        }

        fn accepted(&mut self, client: OwnedFd) -> std::io::Result<()> {
            let addr = self.backends[self.next_backend % self.backends.len()];
            self.next_backend += 1;
            let backend = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
            backend.set_tcp_nodelay(true)?;
            socket2::SockRef::from(&client).set_tcp_nodelay(true)?;
            let way = || Direction {
                buf: vec![0u8; BUFFER].into_boxed_slice(),
                len: 0,
                sent: 0,
                done: false,
            };
            let conn = Box::new(Connection {
                client,
                backend: backend.into(),
                backend_addr: addr.into(),
                ways: [way(), way()],
                in_flight: 1,
            });
            let slot = self.free.pop().unwrap_or_else(|| {
                self.slots.push(None);
                self.slots.len() - 1
            });
            let entry = opcode::Connect::new(
                types::Fd(conn.backend.as_raw_fd()),
                conn.backend_addr.as_ptr().cast(),
                conn.backend_addr.len(),
            )
            .build()
            .user_data(user_data(slot, 0, Op::Connect));
            self.slots[slot] = Some(conn);
            self.queued.push(entry);
            Ok(())
        }

        /// Ends both directions: the shutdowns make the operations still in flight complete.
        fn fail(&mut self, slot: usize) {
            let conn = self.slots[slot].as_mut().expect("live slot");
            for way in &mut conn.ways {
                way.done = true;
            }
            let _ = socket2::SockRef::from(&conn.client).shutdown(std::net::Shutdown::Both);
            let _ = socket2::SockRef::from(&conn.backend).shutdown(std::net::Shutdown::Both);
        }

        fn completed(&mut self, slot: usize, way: usize, op: Op, result: i32) {
            let Some(conn) = self.slots[slot].as_mut() else {
                return;
            };
            conn.in_flight -= 1;
            match op {
                Op::Accept => unreachable!("accepts are handled by the loop"),
                Op::Connect if result < 0 => self.fail(slot),
                Op::Connect => {
                    self.recv(slot, 0);
                    self.recv(slot, 1);
                }
                Op::Recv if conn.ways[way].done => {}
                Op::Recv if result < 0 => self.fail(slot),
                Op::Recv if result == 0 => {
                    conn.ways[way].done = true;
                    let _ =
                        socket2::SockRef::from(conn.to(way)).shutdown(std::net::Shutdown::Write);
                }
                Op::Recv => {
                    conn.ways[way].len = result as usize;
                    conn.ways[way].sent = 0;
                    self.send(slot, way);
                }
                // Failed meanwhile: the shutdowns finish what is left.
                Op::Send if result < 0 || conn.ways[way].done => self.fail(slot),
                Op::Send => {
                    let dir = &mut conn.ways[way];
                    dir.sent += result as usize;
                    if dir.sent < dir.len {
                        self.send(slot, way);
                    } else {
                        self.recv(slot, way);
                    }
                }
            }
            let conn = self.slots[slot].as_ref().expect("live slot");
            if conn.in_flight == 0 && conn.ways.iter().all(|w| w.done) {
                self.slots[slot] = None;
                self.free.push(slot);
            }
        }
    }

    pub fn main() -> std::io::Result<()> {
        let args: Vec<String> = std::env::args().collect();
        let [_, listen, backends] = &args[..] else {
            eprintln!("usage: uring_floor LISTEN BACKEND[,BACKEND...]");
            std::process::exit(2);
        };
        let listen: SocketAddr = listen.parse().expect("LISTEN is host:port");
        let backends = backends
            .split(',')
            .map(|b| b.parse().expect("BACKEND is host:port"))
            .collect();
        let listener = TcpListener::bind(listen)?;
        let mut ring: IoUring = IoUring::builder().setup_coop_taskrun().build(4096)?;
        let mut relay = Relay {
            backends,
            next_backend: 0,
            slots: Vec::new(),
            free: Vec::new(),
            queued: Vec::new(),
        };
        let accept = || {
            opcode::AcceptMulti::new(types::Fd(listener.as_raw_fd()))
                .build()
                .user_data(user_data(0, 0, Op::Accept))
        };
        relay.queued.push(accept());
        // Completions are copied out before handling them (handling pushes entries);
        // the one vector serves every turn.
        let mut done: Vec<(u64, i32, u32)> = Vec::new();
        loop {
            {
                let mut sq = ring.submission();
                for entry in relay.queued.drain(..) {
                    // SAFETY: pushing an entry hands the kernel raw pointers. Every buffer
                    // and address an entry points at lives in a boxed `Connection` that stays
                    // in its slot until no operation of it is in flight; the listener lives
                    // for the whole loop. The ring has room: at most two entries per
                    // connection wait, and 4096 is far above the benchmark's 64 connections.
                    unsafe { sq.push(&entry).expect("submission queue full") };
                }
            }
            ring.submit_and_wait(1)?;
            done.clear();
            done.extend(
                ring.completion()
                    .map(|c| (c.user_data(), c.result(), c.flags())),
            );
            for &(data, result, flags) in &done {
                let (slot, way, op) = decode(data);
                if op != Op::Accept {
                    relay.completed(slot, way, op, result);
                    continue;
                }
                if result >= 0 {
                    // The kernel made this descriptor for us: it is ours to own.
                    let client = owned(result);
                    if let Err(e) = relay.accepted(client) {
                        eprintln!("uring_floor: {e}");
                    }
                }
                if !io_uring::cqueue::more(flags) {
                    relay.queued.push(accept());
                }
            }
        }
    }

    /// Takes ownership of a descriptor an accept completion returned.
    fn owned(fd: i32) -> OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: `fd` is a new descriptor the kernel just created for this process (a
        // completed accept), and nothing else holds it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }
}
