//! `carousel bench --pods STATE.yaml`: the scenarios that need no pod the lab controls
//! (uniform, canary, keepalive, sticky) run against the ready endpoints of one Service
//! port of a state file, each behind a loopback relay (`relay`), with HTTP/1.1 clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::discovery::convert::Scope;
use crate::discovery::file::{self, StateFileError};
use crate::lab::bench::load::PodSpec;
use crate::lab::bench::scenarios::{self, Scenario};
use crate::model::{Protocol, Service, ServicePort};

/// The scenarios that run on real pods, in the order they run.
pub const SCENARIOS: [&str; 4] = ["uniform", "canary", "keepalive", "sticky"];

/// The most pods a run can address (127.N.B.10 and up).
pub const MAX_PODS: usize = 200;

/// What the report says of real pods' latencies.
const LATENCY: &str = "real: each request's time as its client measured it, through carousel and \
one loopback relay per pod (the first request of a connection includes the connect)";

#[derive(Debug, thiserror::Error)]
pub enum OwnPodsError {
    #[error(transparent)]
    File(#[from] StateFileError),
    #[error("{file} has no Service with a TCP port")]
    NoService { file: String },
    #[error("{file} has {count} Services with a TCP port; choose one with --service NAMESPACE/NAME: {list}")]
    WhichService {
        file: String,
        count: usize,
        list: String,
    },
    #[error("{file} has no Service {wanted} with a TCP port (it has: {list})")]
    NoSuchService {
        file: String,
        wanted: String,
        list: String,
    },
    #[error("{service} has TCP ports {list}; choose one with --port NAME|NUMBER")]
    WhichPort { service: String, list: String },
    #[error("{service} has no TCP port {wanted} (it has: {list})")]
    NoSuchPort {
        service: String,
        wanted: String,
        list: String,
    },
    #[error("{service} port {port} has no ready endpoint in {file}")]
    NoEndpoint {
        service: String,
        port: String,
        file: String,
    },
    #[error(
        "{service} port {port} has {count} ready endpoints; the bench takes at most {MAX_PODS}"
    )]
    TooMany {
        service: String,
        port: String,
        count: usize,
    },
}

/// The real pods a bench runs against, as the report records them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OwnPods {
    pub state_file: PathBuf,
    /// `NAMESPACE/NAME`.
    pub service: String,
    /// The port's name, or its number when unnamed.
    pub port: String,
    pub pods: Vec<OwnPod>,
    /// What the latencies are.
    pub latency: String,
    /// The `Host` of every request: `NAME.NAMESPACE.svc`.
    pub host: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OwnPod {
    /// Its `targetRef` name, or its address when the slice names none.
    pub pod: String,
    pub address: SocketAddr,
    /// Its `carousel.dev/weights` weight (1 unless set).
    pub weight: u32,
}

impl OwnPods {
    /// The ready endpoints of `service` (`NAMESPACE/NAME`; may be left out when the file
    /// has one Service with a TCP port) and `port` (name or number; may be left out when
    /// the Service has one TCP port) in the state file at `path`.
    pub fn load(
        path: &Path,
        service: Option<&str>,
        port: Option<&str>,
    ) -> Result<OwnPods, OwnPodsError> {
        let loaded = file::load(path, &Scope::default())?;
        let file = path.display().to_string();
        let tcp = |s: &Service| s.ports.iter().any(|p| p.protocol == Protocol::Tcp);
        let candidates: Vec<&Service> = loaded
            .table
            .services
            .values()
            .map(|s| s.as_ref())
            .filter(|s| tcp(s))
            .collect();
        let list = || {
            let names: Vec<String> = candidates.iter().map(|s| s.key.to_string()).collect();
            names.join(", ")
        };
        let chosen = match service {
            Some(wanted) => candidates
                .iter()
                .find(|s| s.key.to_string() == wanted)
                .ok_or_else(|| OwnPodsError::NoSuchService {
                    file: file.clone(),
                    wanted: wanted.to_string(),
                    list: list(),
                })?,
            None => match candidates.as_slice() {
                [] => return Err(OwnPodsError::NoService { file }),
                [one] => one,
                more => {
                    return Err(OwnPodsError::WhichService {
                        file,
                        count: more.len(),
                        list: list(),
                    })
                }
            },
        };
        let name = chosen.key.to_string();
        let service_port = choose_port(chosen, port)?;
        let pods: Vec<OwnPod> = service_port
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .map(|e| OwnPod {
                pod: match e.pod.is_empty() {
                    true => e.addr.to_string(),
                    false => e.pod.to_string(),
                },
                address: e.addr.0,
                weight: e.weight,
            })
            .collect();
        if pods.is_empty() {
            return Err(OwnPodsError::NoEndpoint {
                service: name,
                port: service_port.label(),
                file,
            });
        }
        if pods.len() > MAX_PODS {
            return Err(OwnPodsError::TooMany {
                service: name,
                port: service_port.label(),
                count: pods.len(),
            });
        }
        Ok(OwnPods {
            state_file: path.to_owned(),
            host: format!("{}.{}.svc", chosen.key.name, chosen.key.namespace),
            service: name,
            port: service_port.label(),
            pods,
            latency: LATENCY.to_string(),
        })
    }

    /// Scenario `name` (sticky yields two) with these pods in place of the lab's; empty
    /// for a scenario that is not one of `SCENARIOS`.
    pub(crate) fn scenarios(&self, name: &str, quick: bool) -> Vec<Scenario> {
        if !SCENARIOS.contains(&name) {
            return Vec::new();
        }
        let mut built = scenarios::build(name, quick);
        for scenario in &mut built {
            scenario.pods = self.specs(name == "canary");
        }
        built
    }

    /// The pods as the lab runs them. For canary, when the file gives every pod the same
    /// weight: the first half (the "new version") weighted 3, the rest 1.
    fn specs(&self, canary: bool) -> Vec<PodSpec> {
        let equal = self.pods.iter().all(|p| p.weight == self.pods[0].weight);
        let half = self.pods.len() / 2;
        self.pods
            .iter()
            .enumerate()
            .map(|(i, p)| PodSpec {
                weight: match (canary && equal, i < half) {
                    (true, true) => 3,
                    (true, false) => 1,
                    (false, _) => p.weight,
                },
                upstream: Some(p.address),
                ..PodSpec::new(&p.pod, Duration::ZERO)
            })
            .collect()
    }
}

/// The TCP port `wanted` names, by name or number, or the only one.
fn choose_port<'a>(
    service: &'a Service,
    wanted: Option<&str>,
) -> Result<&'a ServicePort, OwnPodsError> {
    let tcp: Vec<&ServicePort> = service
        .ports
        .iter()
        .filter(|p| p.protocol == Protocol::Tcp)
        .collect();
    let list = || {
        let labels: Vec<String> = tcp.iter().map(|p| p.label()).collect();
        labels.join(", ")
    };
    match (wanted, tcp.as_slice()) {
        (None, [one]) => Ok(one),
        (None, _) => Err(OwnPodsError::WhichPort {
            service: service.key.to_string(),
            list: list(),
        }),
        (Some(wanted), _) => tcp
            .iter()
            .find(|p| p.name == wanted || p.port.to_string() == wanted)
            .copied()
            .ok_or_else(|| OwnPodsError::NoSuchPort {
                service: service.key.to_string(),
                wanted: wanted.to_string(),
                list: list(),
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9000}]
";

    fn slice(addresses: &[(&str, &str, bool)]) -> String {
        let endpoints: Vec<String> = addresses
            .iter()
            .map(|(ip, pod, ready)| {
                format!(
                    "  - addresses: [{ip}]\n    conditions: {{ready: {ready}}}\n    targetRef: {{kind: Pod, name: {pod}}}\n"
                )
            })
            .collect();
        format!(
            "---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {{kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{{name: http, port: 8080}}, {{name: admin, port: 9000}}]
endpoints:
{}",
            endpoints.concat()
        )
    }

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn takes_the_ready_endpoints_of_the_chosen_port() {
        let text = SERVICE.to_string()
            + &slice(&[
                ("10.244.1.5", "web-a", true),
                ("10.244.1.6", "web-b", false),
                ("10.244.1.7", "web-c", true),
            ]);
        let (_dir, path) = write(&text);
        let own = OwnPods::load(&path, None, Some("http")).unwrap();
        assert_eq!(own.service, "shop/web");
        assert_eq!(own.host, "web.shop.svc");
        let pods: Vec<(&str, String)> = own
            .pods
            .iter()
            .map(|p| (p.pod.as_str(), p.address.to_string()))
            .collect();
        assert_eq!(
            pods,
            [
                ("web-a", "10.244.1.5:8080".to_string()),
                ("web-c", "10.244.1.7:8080".to_string())
            ]
        );
        let by_number = OwnPods::load(&path, Some("shop/web"), Some("9000")).unwrap();
        assert_eq!(by_number.port, "admin");
    }

    #[test]
    fn says_what_to_choose_and_what_there_is() {
        let text = SERVICE.to_string() + &slice(&[("10.244.1.5", "web-a", true)]);
        let (_dir, path) = write(&text);
        let which = OwnPods::load(&path, None, None).unwrap_err().to_string();
        assert!(
            which.contains("--port") && which.contains("http, admin"),
            "{which}"
        );
        let none = OwnPods::load(&path, Some("shop/api"), None)
            .unwrap_err()
            .to_string();
        assert!(
            none.contains("no Service shop/api") && none.contains("shop/web"),
            "{none}"
        );
        let port = OwnPods::load(&path, None, Some("grpc"))
            .unwrap_err()
            .to_string();
        assert!(port.contains("no TCP port grpc"), "{port}");
        let (_dir, empty) = write(&(SERVICE.to_string() + &slice(&[("10.244.1.5", "a", false)])));
        let err = OwnPods::load(&empty, None, Some("http"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no ready endpoint"), "{err}");
    }

    #[test]
    fn only_the_scenarios_without_a_controlled_pod_and_canary_weighs_halves() {
        let text = SERVICE.to_string()
            + &slice(&[
                ("10.244.1.5", "web-a", true),
                ("10.244.1.6", "web-b", true),
                ("10.244.1.7", "web-c", true),
                ("10.244.1.8", "web-d", true),
            ]);
        let (_dir, path) = write(&text);
        let own = OwnPods::load(&path, None, Some("http")).unwrap();
        assert!(own.scenarios("slow-pod", true).is_empty());
        assert_eq!(own.scenarios("sticky", true).len(), 2);
        let canary = &own.scenarios("canary", true)[0];
        let weights: Vec<u32> = canary.pods.iter().map(|p| p.weight).collect();
        assert_eq!(weights, [3, 3, 1, 1]);
        let uniform = &own.scenarios("uniform", true)[0];
        assert!(uniform
            .pods
            .iter()
            .all(|p| p.weight == 1 && p.upstream.is_some()));
        assert_eq!(
            uniform.pods[0].upstream,
            Some("10.244.1.5:8080".parse().unwrap())
        );
    }
}
