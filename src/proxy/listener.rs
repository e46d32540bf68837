//! Bind mode: one listening socket per Service address, opened and closed as Services
//! come and go. Closing a listener stops new connections only; open ones run on in
//! their own tasks.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use socket2::{Domain, Socket, Type};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::addr::{ClientAddr, ServiceAddr};
use crate::proxy::forward::{self, ForwardConfig, ForwardError};
use crate::proxy::original_dst::original_dst;
use crate::proxy::routes::RouteTable;

/// Opens a listening TCP socket with the options a proxy wants.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// The addresses bind mode listens on for a route table: every Service address, and
/// every `--nodeport-addresses` address at every node port. The value names the
/// Service port, for messages.
pub fn wanted(routes: &RouteTable, nodeport_addresses: &[IpAddr]) -> BTreeMap<ServiceAddr, String> {
    let mut wanted = BTreeMap::new();
    for (addr, route) in routes.service_addrs() {
        wanted.insert(*addr, format!("{} port {}", route.service, route.port));
    }
    for (port, route) in routes.node_ports() {
        for ip in nodeport_addresses {
            let addr = ServiceAddr(SocketAddr::new(*ip, port));
            wanted
                .entry(addr)
                .or_insert_with(|| format!("{} port {} (node port)", route.service, route.port));
        }
    }
    wanted
}

/// The open listeners of bind mode.
#[derive(Debug, Default)]
pub struct Listeners {
    open: HashMap<ServiceAddr, JoinHandle<()>>,
    /// Addresses that failed to bind, so each failure is reported once.
    failed: HashSet<ServiceAddr>,
}

impl Listeners {
    /// Opens the listeners that are wanted and not open, closes those no longer wanted.
    pub fn reconcile(
        &mut self,
        wanted: &BTreeMap<ServiceAddr, String>,
        routes: &Arc<ArcSwap<RouteTable>>,
        config: ForwardConfig,
    ) {
        self.open.retain(|addr, task| {
            let keep = wanted.contains_key(addr);
            if !keep {
                tracing::info!(%addr, "closing listener");
                task.abort();
            }
            keep
        });
        self.failed.retain(|addr| wanted.contains_key(addr));
        for (addr, owner) in wanted {
            if self.open.contains_key(addr) {
                continue;
            }
            match bind(addr.0) {
                Ok(listener) => {
                    tracing::info!(%addr, service = %owner, "listening");
                    self.failed.remove(addr);
                    let task = tokio::spawn(accept_loop(
                        listener,
                        Dialed::Listener(*addr),
                        routes.clone(),
                        config,
                    ));
                    self.open.insert(*addr, task);
                }
                Err(e) => {
                    if self.failed.insert(*addr) {
                        let hint = if e.raw_os_error() == Some(99) {
                            " (the address is not local to this host; bind mode needs it assigned to an interface)"
                        } else {
                            ""
                        };
                        tracing::error!(%addr, service = %owner, error = %e, "cannot listen{hint}; skipping this address");
                    }
                }
            }
        }
    }

    /// The addresses listened on now.
    pub fn addrs(&self) -> impl Iterator<Item = &ServiceAddr> {
        self.open.keys()
    }

    /// Stops accepting everywhere. Open connections are not touched.
    pub fn close_all(&mut self) {
        for (_, task) in self.open.drain() {
            task.abort();
        }
    }
}

impl Drop for Listeners {
    fn drop(&mut self) {
        self.close_all();
    }
}

/// How a listener learns which Service address a client dialed.
#[derive(Clone, Copy, Debug)]
pub enum Dialed {
    /// Bind mode: the listener's own address is the Service address.
    Listener(ServiceAddr),
    /// nftables mode: the connection was redirected; conntrack knows where it was going.
    OriginalDst,
}

/// Accepts connections and hands each to its own task.
pub async fn accept_loop(
    listener: TcpListener,
    dialed: Dialed,
    routes: Arc<ArcSwap<RouteTable>>,
    config: ForwardConfig,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(?dialed, error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let peer = ClientAddr(peer);
        let target = match dialed {
            Dialed::Listener(addr) => addr,
            Dialed::OriginalDst => match original_dst(&stream) {
                Ok(addr) => addr,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "no original destination; not a redirected connection");
                    continue;
                }
            },
        };
        // The route is looked up per connection, so that a table change applies to the
        // very next connection without touching the listener.
        let route = routes.load().lookup(target).cloned();
        tokio::spawn(async move {
            let Some(route) = route else {
                tracing::debug!(%peer, %target, "no service at this address");
                return;
            };
            match forward::forward(stream, peer, &route, config).await {
                Ok(()) => {}
                Err(ForwardError::NoEndpoint) => {
                    tracing::debug!(%peer, service = %route.service, "no endpoint; connection refused")
                }
                Err(e) => {
                    tracing::warn!(%peer, service = %route.service, error = %e, "no endpoint accepted the connection")
                }
            }
        });
    }
}
