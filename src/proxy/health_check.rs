//! `spec.healthCheckNodePort`, served as kube-proxy serves it: cloud load balancers of an
//! `externalTrafficPolicy: Local` Service ask each node there, and stop sending to the
//! nodes that answer 503 because they have no ready endpoint of it.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::model::{Locality, ServiceKey, ServiceTable};
use crate::telemetry::{self, Telemetry};

/// What one health check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Check {
    pub(crate) service: ServiceKey,
    /// Ready endpoints of the Service on this node.
    pub(crate) local_endpoints: usize,
}

impl Check {
    /// kube-proxy's answer: 200 with local endpoints (and a healthy proxy), else 503.
    pub(crate) fn answer(&self, proxy_healthy: bool) -> (StatusCode, String) {
        let status = if self.local_endpoints > 0 && proxy_healthy {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        let body = serde_json::json!({
            "service": {"namespace": &*self.service.namespace, "name": &*self.service.name},
            "localEndpoints": self.local_endpoints,
            "serviceProxyHealthy": proxy_healthy,
        });
        (status, format!("{body}\n"))
    }
}

/// The health check ports of `table` and what each answers. A pure function of the table
/// and this node. A port claimed by two Services goes to the first (the API server
/// allocates each once).
pub(crate) fn checks(table: &ServiceTable, here: &Locality) -> HashMap<u16, Check> {
    let mut checks = HashMap::new();
    for service in table.services.values() {
        let Some(port) = service.health_check_node_port else {
            continue;
        };
        let mut local = HashSet::new();
        for endpoint in service.ports.iter().flat_map(|p| &p.endpoints) {
            if endpoint.ready
                && endpoint.placement.node.is_some()
                && endpoint.placement.node == here.node
            {
                local.insert(endpoint.addr.0.ip());
            }
        }
        checks.entry(port).or_insert_with(|| Check {
            service: service.key.clone(),
            local_endpoints: local.len(),
        });
    }
    checks
}

/// The open health check listeners, kept in step with the table.
#[derive(Debug)]
pub(crate) struct HealthChecks {
    /// Where the ports are served: the node port addresses (bind mode), or every address.
    addrs: Vec<IpAddr>,
    answers: Arc<ArcSwap<HashMap<u16, Check>>>,
    open: HashMap<u16, Vec<JoinHandle<()>>>,
    /// Ports that could not be listened on, reported once each.
    failed: HashSet<u16>,
    /// The table and locality the answers were computed for.
    last: Option<(Arc<ServiceTable>, Locality)>,
}

impl HealthChecks {
    pub(crate) fn new(nodeport_addresses: Option<&[IpAddr]>) -> Self {
        let addrs = match nodeport_addresses {
            Some(addrs) => addrs.to_vec(),
            None => vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
        };
        Self {
            addrs,
            answers: Arc::default(),
            open: HashMap::new(),
            failed: HashSet::new(),
            last: None,
        }
    }

    /// Opens and closes listeners for `table`'s health check ports; the answers change
    /// at once. Returns how many ports could not be listened on (retried next time).
    /// A table whose changes touch no Service with a health check costs a walk of
    /// those changes only.
    pub(crate) fn reconcile(
        &mut self,
        table: &Arc<ServiceTable>,
        here: &Locality,
        telemetry: &Arc<Telemetry>,
    ) -> usize {
        let unchanged = self.failed.is_empty() && self.unchanged(table, here);
        // Held until the next table: only the changes since are walked then.
        self.last = Some((table.clone(), here.clone()));
        if unchanged {
            return 0;
        }
        let wanted = checks(table, here);
        self.open.retain(|port, tasks| {
            let keep = wanted.contains_key(port);
            if !keep {
                tasks.iter().for_each(JoinHandle::abort);
            }
            keep
        });
        self.failed.retain(|port| wanted.contains_key(port));
        for (port, check) in &wanted {
            if self.open.contains_key(port) {
                continue;
            }
            let mut tasks = Vec::new();
            for ip in &self.addrs {
                let addr = SocketAddr::new(*ip, *port);
                match super::listener::bind(addr, None) {
                    Ok(listener) => tasks.push(tokio::spawn(serve(
                        listener,
                        *port,
                        self.answers.clone(),
                        telemetry.clone(),
                    ))),
                    // A node without IPv6 still serves IPv4.
                    Err(_) if ip.is_ipv6() && ip.is_unspecified() => {}
                    Err(e) => {
                        if self.failed.insert(*port) {
                            tracing::error!(%addr, service = %check.service, error = %e, "cannot serve the health check node port; retrying");
                        }
                    }
                }
            }
            if !tasks.is_empty() {
                self.failed.remove(port);
                self.open.insert(*port, tasks);
            }
        }
        self.answers.store(Arc::new(wanted));
        self.failed.len()
    }

    /// Whether `table` and `here` give the answers of the last reconcile.
    fn unchanged(&self, table: &ServiceTable, here: &Locality) -> bool {
        use imbl::ordmap::DiffItem;
        let Some((last, last_here)) = &self.last else {
            return false;
        };
        let checked = |s: &Arc<crate::model::Service>| s.health_check_node_port.is_some();
        last_here == here
            && last.services.diff(&table.services).all(|item| match item {
                DiffItem::Add(_, s) | DiffItem::Remove(_, s) => !checked(s),
                DiffItem::Update { old, new } => !checked(old.1) && !checked(new.1),
            })
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        self.open.values().flatten().for_each(JoinHandle::abort);
    }
}

async fn serve(
    listener: TcpListener,
    port: u16,
    answers: Arc<ArcSwap<HashMap<u16, Check>>>,
    telemetry: Arc<Telemetry>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (answers, telemetry) = (answers.clone(), telemetry.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |_req| {
                let check = answers.load().get(&port).cloned();
                let healthy = telemetry
                    .health()
                    .report(std::time::SystemTime::now())
                    .healthy;
                async move {
                    let (status, body) = match check {
                        Some(check) => check.answer(healthy),
                        None => (StatusCode::NOT_FOUND, "no such Service\n".to_string()),
                    };
                    Ok::<_, Infallible>(telemetry::response(status, "application/json", body))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(n: usize) -> Check {
        Check {
            service: ServiceKey::new("shop", "web"),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_as_kube_proxy_does() {
        let (status, body) = check(2).answer(true);
        assert_eq!(status, StatusCode::OK);
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );
        assert_eq!(check(0).answer(true).0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(check(2).answer(false).0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
