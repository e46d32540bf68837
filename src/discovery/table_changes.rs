//! What changed from one table to the next, said in one line: the log of a state-file
//! reload, and the change counts kube-proxy's metrics report.

use std::fmt;
use std::sync::Arc;

use crate::model::{Service, ServiceKey, ServiceTable};

/// Services named in the line, per kind of change; the rest are counted.
const NAMED: usize = 3;

/// The Services added, changed and removed, and the endpoints before and after.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableChanges {
    pub added: Vec<ServiceKey>,
    pub changed: Vec<ServiceKey>,
    pub removed: Vec<ServiceKey>,
    pub endpoints_before: usize,
    pub endpoints_after: usize,
}

impl TableChanges {
    /// From `before` to `after`. Linear in the two tables; shared Services (the same
    /// `Arc`) compare in O(1).
    pub fn between(before: &ServiceTable, after: &ServiceTable) -> Self {
        let mut changes = TableChanges {
            endpoints_before: endpoints(before),
            endpoints_after: endpoints(after),
            ..Self::default()
        };
        for (key, old) in &before.services {
            match after.services.get(key) {
                None => changes.removed.push(key.clone()),
                Some(new) if !Arc::ptr_eq(old, new) && old != new => {
                    changes.changed.push(key.clone())
                }
                Some(_) => {}
            }
        }
        for key in after.services.keys() {
            if !before.services.contains_key(key) {
                changes.added.push(key.clone());
            }
        }
        changes
    }

    /// Services touched, all kinds.
    pub fn services(&self) -> usize {
        self.added.len() + self.changed.len() + self.removed.len()
    }

    /// Whether the Services (or the node's part of the table) differ at all.
    pub fn is_empty(&self) -> bool {
        self.services() == 0
    }
}

fn endpoints(table: &ServiceTable) -> usize {
    let count = |s: &Arc<Service>| s.ports.iter().map(|p| p.endpoints.len()).sum::<usize>();
    table.services.values().map(count).sum()
}

/// `1 Service added (default/web), 2 changed (a/x, a/y), 0 removed; endpoints 4 -> 6`.
impl fmt::Display for TableChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let noun = if self.added.len() == 1 {
            "Service"
        } else {
            "Services"
        };
        write!(f, "{} {noun} added", self.added.len())?;
        names(f, &self.added)?;
        write!(f, ", {} changed", self.changed.len())?;
        names(f, &self.changed)?;
        write!(f, ", {} removed", self.removed.len())?;
        names(f, &self.removed)?;
        write!(
            f,
            "; endpoints {} -> {}",
            self.endpoints_before, self.endpoints_after
        )
    }
}

fn names(f: &mut fmt::Formatter<'_>, keys: &[ServiceKey]) -> fmt::Result {
    if keys.is_empty() {
        return Ok(());
    }
    f.write_str(" (")?;
    for (i, key) in keys.iter().take(NAMED).enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        write!(f, "{key}")?;
    }
    if keys.len() > NAMED {
        write!(f, " and {} more", keys.len() - NAMED)?;
    }
    f.write_str(")")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::convert::Scope;
    use crate::discovery::file;

    fn table(yaml: &str) -> ServiceTable {
        file::parse(yaml, &Scope::default()).unwrap().table
    }

    fn service(name: &str, ip: &str, endpoints: &[&str]) -> String {
        let mut yaml = format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{clusterIP: {ip}, ports: [{{port: 80, targetPort: 8080}}]}}\n"
        );
        if !endpoints.is_empty() {
            let list: Vec<String> = endpoints
                .iter()
                .map(|a| format!("{{addresses: [{a}]}}"))
                .collect();
            yaml += &format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: {name}-1, namespace: default, labels: {{kubernetes.io/service-name: {name}}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
                list.join(", ")
            );
        }
        yaml
    }

    #[test]
    fn says_what_was_added_changed_and_removed() {
        let before = table(
            &(service("web", "10.96.0.1", &["10.244.0.1"])
                + &service("api", "10.96.0.2", &["10.244.0.2"])
                + &service("old", "10.96.0.3", &[])),
        );
        let after = table(
            &(service("web", "10.96.0.1", &["10.244.0.1"])
                + &service("api", "10.96.0.2", &["10.244.0.2", "10.244.0.3"])
                + &service("new", "10.96.0.4", &["10.244.0.4"])),
        );
        let changes = TableChanges::between(&before, &after);
        assert_eq!(
            changes.to_string(),
            "1 Service added (default/new), 1 changed (default/api), 1 removed (default/old); \
             endpoints 2 -> 4"
        );
        assert_eq!(changes.services(), 3);
        assert!(TableChanges::between(&after, &after).is_empty());
    }

    #[test]
    fn names_a_few_and_counts_the_rest() {
        let yaml: String = (0..10)
            .map(|i| service(&format!("s{i}"), &format!("10.96.1.{i}"), &[]))
            .collect();
        let changes = TableChanges::between(&ServiceTable::default(), &table(&yaml));
        assert_eq!(
            changes.to_string(),
            "10 Services added (default/s0, default/s1, default/s2 and 7 more), 0 changed, \
             0 removed; endpoints 0 -> 0"
        );
    }
}
