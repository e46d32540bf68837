//! The policy route that delivers intercepted packets to carousel: packets carrying
//! `INTERCEPT_MARK` look up a table of carousel's own, which holds one route, `local
//! default dev lo`, for IPv4 and for IPv6. Applied with ip(8), checked before it is
//! changed, so that a sync that finds it in place touches nothing; removed by `carousel
//! cleanup`, and nothing of anyone else's is touched.

use std::fmt;

use serde::Deserialize;
use tokio::process::Command;

/// carousel's routing table (its number, as `ip route show table N` takes it).
pub const TABLE: u32 = INTERCEPT_MARK;
/// The packet mark of intercepted traffic (nftables sets it), which this route delivers
/// locally.
pub(crate) const INTERCEPT_MARK: u32 = 0x4342;
/// The rule's priority: before `main` (32766), after `local` (0).
pub(crate) const PRIORITY: u32 = 17218;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::V4 => "-4",
            Family::V6 => "-6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PolicyRouteError {
    #[error("cannot run ip (is iproute2 installed?): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("ip {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("ip {args} printed what is not its JSON: {source}")]
    Output {
        args: String,
        #[source]
        source: serde_json::Error,
    },
}

/// One rule as `ip -j rule show` prints it (the fields carousel reads).
#[derive(Debug, Deserialize)]
struct Rule {
    priority: Option<u32>,
    fwmark: Option<String>,
    table: Option<String>,
}

impl Rule {
    /// carousel's rule: its mark and its table. Another rule that happens to share one
    /// of them is someone else's.
    fn is_carousels(&self) -> bool {
        let mark = self
            .fwmark
            .as_deref()
            .and_then(|m| u32::from_str_radix(m.trim_start_matches("0x"), 16).ok());
        mark == Some(INTERCEPT_MARK) && self.table.as_deref() == Some(&TABLE.to_string())
    }
}

/// The priorities of carousel's rules, from `ip -j rule show`'s output.
fn ours(rules_json: &str) -> Result<Vec<u32>, serde_json::Error> {
    let rules: Vec<Rule> = serde_json::from_str(rules_json)?;
    Ok(rules
        .iter()
        .filter(|r| r.is_carousels())
        .filter_map(|r| r.priority)
        .collect())
}

/// What must change so that exactly one rule of carousel's is in place, at `PRIORITY`:
/// the priorities of carousel's rules to delete first, and whether to add one.
fn rule_changes(ours: &[u32]) -> (Vec<u32>, bool) {
    if ours == [PRIORITY] {
        (Vec::new(), false)
    } else {
        (ours.to_vec(), true)
    }
}

/// carousel's rules of `family`, listed.
async fn list_ours(f: &str) -> Result<Vec<u32>, PolicyRouteError> {
    let listed = ip(&[f, "-j", "rule", "show"]).await?;
    ours(&listed).map_err(|source| PolicyRouteError::Output {
        args: format!("{f} -j rule show"),
        source,
    })
}

async fn delete_rule(f: &str, priority: u32) -> Result<(), PolicyRouteError> {
    let (table, mark) = (TABLE.to_string(), format!("{INTERCEPT_MARK:#x}"));
    let priority = priority.to_string();
    ip(&[
        f, "rule", "del", "priority", &priority, "fwmark", &mark, "table", &table,
    ])
    .await?;
    Ok(())
}

async fn ip(args: &[&str]) -> Result<String, PolicyRouteError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .await
        .map_err(PolicyRouteError::Spawn)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(PolicyRouteError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Puts the rule and the route of `family` in place; changes nothing that is there.
pub(crate) async fn ensure(family: Family) -> Result<(), PolicyRouteError> {
    let f = family.flag();
    let (stale, add) = rule_changes(&list_ours(f).await?);
    for priority in stale {
        delete_rule(f, priority).await?;
    }
    let table = TABLE.to_string();
    if add {
        let (mark, priority) = (format!("{INTERCEPT_MARK:#x}"), PRIORITY.to_string());
        ip(&[
            f, "rule", "add", "priority", &priority, "fwmark", &mark, "table", &table,
        ])
        .await?;
    }
    // `replace` is a no-op when the route is there as it should be.
    ip(&[
        f, "route", "replace", "local", "default", "dev", "lo", "table", &table,
    ])
    .await?;
    Ok(())
}

/// Removes carousel's rules and table of `family`; succeeds when there are none.
pub(crate) async fn remove(family: Family) -> Result<(), PolicyRouteError> {
    let f = family.flag();
    for priority in list_ours(f).await? {
        delete_rule(f, priority).await?;
    }
    // Flushing a table that does not exist is an error: look first.
    let routes = ip(&[f, "-j", "route", "show", "table", "all"]).await?;
    let exists = in_table(&routes).map_err(|source| PolicyRouteError::Output {
        args: format!("{f} -j route show table all"),
        source,
    })?;
    if exists {
        ip(&[f, "route", "flush", "table", &TABLE.to_string()]).await?;
    }
    Ok(())
}

/// Whether `ip -j route show table all` lists a route of carousel's table.
fn in_table(routes_json: &str) -> Result<bool, serde_json::Error> {
    #[derive(Deserialize)]
    struct Route {
        table: Option<String>,
    }
    let routes: Vec<Route> = serde_json::from_str(routes_json)?;
    let table = TABLE.to_string();
    Ok(routes.iter().any(|r| r.table.as_deref() == Some(&table)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAIN: &str = r#"{"priority":0,"src":"all","table":"local"},{"priority":32766,"src":"all","table":"main"},{"priority":32767,"src":"all","table":"default"}"#;

    #[test]
    fn carousels_rules_are_told_by_mark_and_table() {
        let json = format!(
            r#"[{MAIN},{{"priority":100,"src":"all","fwmark":"0x4342","table":"17218"}},{{"priority":200,"src":"all","fwmark":"0x4342","table":"main"}},{{"priority":300,"src":"all","fwmark":"0x1","table":"17218"}}]"#
        );
        assert_eq!(ours(&json).unwrap(), [100]);
        assert_eq!(ours(&format!("[{MAIN}]")).unwrap(), [] as [u32; 0]);
    }

    #[test]
    fn carousels_table_is_found_among_all_routes() {
        let theirs = r#"[{"type":"local","dst":"default","dev":"lo","table":"99"},{"dst":"10.0.0.0/24","dev":"n0"}]"#;
        assert!(!in_table(theirs).unwrap());
        let ours = r#"[{"type":"local","dst":"default","dev":"lo","table":"17218"}]"#;
        assert!(in_table(ours).unwrap());
    }

    #[test]
    fn one_rule_at_its_priority_is_left_alone_and_anything_else_replaced() {
        assert_eq!(rule_changes(&[]), (vec![], true));
        assert_eq!(rule_changes(&[PRIORITY]), (vec![], false));
        assert_eq!(rule_changes(&[100]), (vec![100], true));
        assert_eq!(rule_changes(&[100, PRIORITY]), (vec![100, PRIORITY], true));
    }
}
