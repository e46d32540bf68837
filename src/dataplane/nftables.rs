//! carousel's own nftables table, `inet carousel`: rendered by pure functions from the
//! set of Service addresses, applied by `nft -f` as one atomic transaction per change.
//!
//! The rules never change after start-up; what changes is the content of three sets
//! (IPv4 and IPv6 Service addresses with their ports, and node ports), so a table change
//! is a transaction of element additions and removals, never a rewrite of the world.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::addr::ServiceAddr;

/// The table carousel owns; it touches nothing else.
pub const TABLE: &str = "carousel";
/// The socket mark of carousel's own connections to pods: they skip the redirect, so a
/// pod whose address happens to equal a Service address is still reached, never looped.
pub const MARK: u32 = 0x4341;

/// What the rules redirect: every Service address and node port carousel proxies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redirects {
    pub v4: BTreeSet<(Ipv4Addr, u16)>,
    pub v6: BTreeSet<(Ipv6Addr, u16)>,
    pub node_ports: BTreeSet<u16>,
}

impl Redirects {
    pub fn new(
        service_addrs: impl IntoIterator<Item = ServiceAddr>,
        node_ports: impl IntoIterator<Item = u16>,
    ) -> Self {
        let mut r = Redirects::default();
        for addr in service_addrs {
            match addr.ip() {
                IpAddr::V4(ip) => r.v4.insert((ip, addr.port())),
                IpAddr::V6(ip) => r.v6.insert((ip, addr.port())),
            };
        }
        r.node_ports.extend(node_ports);
        r
    }
}

/// The whole table, replacing whatever carousel's table held (after a crash, too): one
/// transaction, so there is no moment without rules.
pub fn render_full(redirects: &Redirects, listen_port: u16) -> String {
    let mut s = String::new();
    // `add` then `delete` makes the delete succeed whether or not the table exists.
    writeln!(s, "add table inet {TABLE}").unwrap();
    writeln!(s, "delete table inet {TABLE}").unwrap();
    writeln!(s, "table inet {TABLE} {{").unwrap();
    writeln!(s, "  set services4 {{\n    type ipv4_addr . inet_service").unwrap();
    elements(
        &mut s,
        redirects
            .v4
            .iter()
            .map(|(ip, port)| format!("{ip} . {port}")),
    );
    writeln!(
        s,
        "  }}\n  set services6 {{\n    type ipv6_addr . inet_service"
    )
    .unwrap();
    elements(
        &mut s,
        redirects
            .v6
            .iter()
            .map(|(ip, port)| format!("{ip} . {port}")),
    );
    writeln!(s, "  }}\n  set nodeports {{\n    type inet_service").unwrap();
    elements(&mut s, redirects.node_ports.iter().map(u16::to_string));
    writeln!(s, "  }}").unwrap();
    for (chain, hook, priority, skip_own) in [
        ("prerouting", "prerouting", "dstnat", false),
        ("output", "output", "-100", true),
    ] {
        writeln!(s, "  chain {chain} {{").unwrap();
        writeln!(
            s,
            "    type nat hook {hook} priority {priority}; policy accept;"
        )
        .unwrap();
        if skip_own {
            writeln!(s, "    meta mark {MARK:#010x} return").unwrap();
        }
        writeln!(
            s,
            "    ip daddr . tcp dport @services4 redirect to :{listen_port}"
        )
        .unwrap();
        writeln!(
            s,
            "    ip6 daddr . tcp dport @services6 redirect to :{listen_port}"
        )
        .unwrap();
        writeln!(
            s,
            "    fib daddr type local tcp dport @nodeports redirect to :{listen_port}"
        )
        .unwrap();
        writeln!(s, "  }}").unwrap();
    }
    writeln!(s, "}}").unwrap();
    s
}

fn elements(s: &mut String, items: impl Iterator<Item = String>) {
    let items: Vec<String> = items.collect();
    if !items.is_empty() {
        writeln!(s, "    elements = {{ {} }}", items.join(", ")).unwrap();
    }
}

/// The transaction that turns `old` into `new`: element removals and additions only.
/// Empty when nothing changed.
pub fn render_diff(old: &Redirects, new: &Redirects) -> String {
    let mut s = String::new();
    let mut set_diff = |set: &str, old: Vec<String>, new: Vec<String>| {
        let (old, new): (BTreeSet<String>, BTreeSet<String>) =
            (old.into_iter().collect(), new.into_iter().collect());
        let gone: Vec<&String> = old.difference(&new).collect();
        let came: Vec<&String> = new.difference(&old).collect();
        if !gone.is_empty() {
            writeln!(s, "delete element inet {TABLE} {set} {{ {} }}", join(&gone)).unwrap();
        }
        if !came.is_empty() {
            writeln!(s, "add element inet {TABLE} {set} {{ {} }}", join(&came)).unwrap();
        }
    };
    let v4 = |r: &Redirects| r.v4.iter().map(|(ip, p)| format!("{ip} . {p}")).collect();
    let v6 = |r: &Redirects| r.v6.iter().map(|(ip, p)| format!("{ip} . {p}")).collect();
    let np = |r: &Redirects| r.node_ports.iter().map(u16::to_string).collect();
    set_diff("services4", v4(old), v4(new));
    set_diff("services6", v6(old), v6(new));
    set_diff("nodeports", np(old), np(new));
    s
}

fn join(items: &[&String]) -> String {
    items
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Removes carousel's table, and nothing else. Succeeds when there is none.
pub fn render_cleanup() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Why nft refused a transaction.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (is nftables installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the transaction: {stderr}")]
    Refused { stderr: String },
}

/// Applies `script` with `nft -f -`: the only function here that touches the host.
pub async fn apply(script: &str) -> Result<(), NftError> {
    if script.is_empty() {
        return Ok(());
    }
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(script.as_bytes())
        .await
        .map_err(NftError::Spawn)?;
    let out = child.wait_with_output().await.map_err(NftError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Refused {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Keeps carousel's table in step with the Service addresses.
#[derive(Debug)]
pub struct Rules {
    listen_port: u16,
    applied: Option<Redirects>,
}

impl Rules {
    pub fn new(listen_port: u16) -> Self {
        Self {
            listen_port,
            applied: None,
        }
    }

    /// Brings the table to `wanted`: the whole table the first time (converging after a
    /// crash), element changes after that, and the whole table again if a change fails
    /// (someone else edited carousel's table).
    pub async fn sync(&mut self, wanted: Redirects) -> Result<(), NftError> {
        let result = match &self.applied {
            Some(old) => match apply(&render_diff(old, &wanted)).await {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(error = %e, "incremental rule change refused; rewriting carousel's table");
                    apply(&render_full(&wanted, self.listen_port)).await
                }
            },
            None => apply(&render_full(&wanted, self.listen_port)).await,
        };
        match result {
            Ok(()) => {
                self.applied = Some(wanted);
                Ok(())
            }
            Err(e) => {
                self.applied = None;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    fn sa(s: &str) -> ServiceAddr {
        ServiceAddr(s.parse::<SocketAddr>().unwrap())
    }

    #[test]
    fn full_table_matches_the_golden_file() {
        let r = Redirects::new(
            [
                sa("10.96.0.10:80"),
                sa("10.96.0.11:443"),
                sa("[fd00:10:96::a]:80"),
            ],
            [30080],
        );
        assert_eq!(render_full(&r, 15001), include_str!("testdata/full.nft"));
    }

    #[test]
    fn an_empty_table_still_has_its_rules() {
        let script = render_full(&Redirects::default(), 15001);
        assert!(!script.contains("elements"));
        assert_eq!(script.matches("redirect to :15001").count(), 6);
    }

    #[test]
    fn a_change_touches_only_the_elements_that_changed() {
        let old = Redirects::new([sa("10.96.0.10:80"), sa("10.96.0.11:443")], [30080]);
        let new = Redirects::new([sa("10.96.0.11:443"), sa("10.96.0.12:80")], [30080, 30081]);
        assert_eq!(
            render_diff(&old, &new),
            "delete element inet carousel services4 { 10.96.0.10 . 80 }\n\
             add element inet carousel services4 { 10.96.0.12 . 80 }\n\
             add element inet carousel nodeports { 30081 }\n"
        );
        assert_eq!(render_diff(&new, &new), "");
    }

    #[test]
    fn cleanup_removes_only_carousels_table() {
        assert_eq!(
            render_cleanup(),
            "add table inet carousel\ndelete table inet carousel\n"
        );
    }
}
