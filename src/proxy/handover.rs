//! Who serves the node, told between carousels of one node (a rollout runs two at once)
//! through abstract UNIX socket names, which live in the network namespace the
//! carousels share (hostNetwork): no file, no volume.
//!
//! A carousel holds `starting` until its first route table is in place, then `up`, or,
//! while another holds `up`, `successor` until it can take `up`. A carousel told to stop
//! hands over at once when a `successor` is there, waits for one while a carousel is
//! `starting`, and otherwise stops at once: an uninstall or a plain restart does not
//! wait. The listeners are shared (SO_REUSEPORT), so stopping only after a successor
//! is ready means no moment in which new connections find nobody to route them.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tokio::task::JoinHandle;

/// How often a waiting carousel looks again.
const POLL: Duration = Duration::from_millis(50);

fn name(key: &str, role: &str) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(format!("{key}/{role}"))
}

/// Holds `role` if no other process does. Datagram sockets: a look (`held`) leaves
/// nothing queued on the holder, however often it comes.
fn hold(key: &str, role: &str) -> Option<UnixDatagram> {
    UnixDatagram::bind_addr(&name(key, role).ok()?).ok()
}

/// Whether some process holds `role`.
fn held(key: &str, role: &str) -> bool {
    name(key, role)
        .and_then(|addr| UnixDatagram::unbound()?.connect_addr(&addr))
        .is_ok()
}

/// This carousel's place among the carousels of its node that share `key`.
#[derive(Debug)]
pub struct Presence {
    key: String,
    starting: Option<UnixDatagram>,
    /// Takes `up` (holding `successor` meanwhile), once ready.
    ready: Option<JoinHandle<()>>,
}

impl Presence {
    /// A carousel that has not routed anything yet.
    pub(crate) fn starting(key: impl Into<String>) -> Self {
        let key = key.into();
        let starting = hold(&key, "starting");
        Self {
            key,
            starting,
            ready: None,
        }
    }

    /// Its first route table is in place and its listeners are open: it can take over.
    pub(crate) fn ready(&mut self) {
        if self.ready.is_some() {
            return;
        }
        self.starting = None;
        let key = self.key.clone();
        self.ready = Some(tokio::spawn(async move {
            let mut successor = None;
            loop {
                if let Some(up) = hold(&key, "up") {
                    drop(successor);
                    // Held until the process ends; the task is never woken again.
                    std::future::pending::<()>().await;
                    drop(up);
                    return;
                }
                if successor.is_none() {
                    successor = hold(&key, "successor");
                    if successor.is_some() {
                        tracing::info!("another carousel serves this node; ready to take over");
                    }
                }
                tokio::time::sleep(POLL).await;
            }
        }));
    }

    /// Told to stop: returns once a successor is ready, or at once when none is coming.
    pub(crate) async fn hand_over(&self) {
        loop {
            let successor_ready = held(&self.key, "successor");
            if successor_ready {
                tracing::info!("a successor is ready: handing over");
                return;
            }
            // Another carousel is starting (not this one: it let `starting` go when it
            // became ready, and a carousel stopped before that has nothing to hand).
            if self.ready.is_none() || !held(&self.key, "starting") {
                return;
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        if let Some(task) = self.ready.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(test: &str) -> String {
        format!("carousel-test/{}/{test}", std::process::id())
    }

    #[tokio::test]
    async fn alone_a_carousel_stops_at_once() {
        let mut only = Presence::starting(key("alone"));
        only.ready();
        tokio::time::timeout(Duration::from_secs(1), only.hand_over())
            .await
            .expect("nothing to wait for");
    }

    #[tokio::test]
    async fn a_serving_carousel_waits_for_a_starting_one_to_be_ready() {
        let k = key("rollout");
        let mut old = Presence::starting(&k);
        old.ready();
        tokio::time::sleep(POLL * 3).await;
        assert!(held(&k, "up"));

        let mut new = Presence::starting(&k);
        let waiting = tokio::spawn(async move {
            old.hand_over().await;
            old
        });
        tokio::time::sleep(POLL * 4).await;
        assert!(
            !waiting.is_finished(),
            "handed over to a carousel that cannot route yet"
        );
        new.ready();
        let old = tokio::time::timeout(Duration::from_secs(2), waiting)
            .await
            .expect("handed over once the new one was ready")
            .unwrap();
        drop(old);
        // The successor takes `up` for the next rollout.
        tokio::time::sleep(POLL * 4).await;
        assert!(held(&k, "up") && !held(&k, "successor"));
        drop(new);
    }

    #[tokio::test]
    async fn a_starting_carousel_that_is_stopped_does_not_wait() {
        let k = key("early");
        let mut serving = Presence::starting(&k);
        serving.ready();
        let early = Presence::starting(&k);
        tokio::time::timeout(Duration::from_secs(1), early.hand_over())
            .await
            .expect("nothing to hand over");
        drop(serving);
    }
}
