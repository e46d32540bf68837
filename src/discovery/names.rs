//! Shared strings for the names that many endpoints repeat: node names, zones and
//! namespaces. 250 000 endpoints on a few hundred nodes then hold a few hundred strings,
//! each endpoint a pointer to its node's.

use std::collections::HashSet;
use std::sync::Arc;

/// A set of shared strings, each handed out as many times as asked for.
#[derive(Debug, Default)]
pub struct Names {
    set: HashSet<Arc<str>>,
    /// The set's size after the last purge: the next one waits until it has doubled.
    kept: usize,
}

/// Entries below this count are never purged: a purge would cost more than it frees.
const PURGE_FLOOR: usize = 256;

impl Names {
    /// The shared copy of `name`.
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.set.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.set.insert(shared.clone());
        shared
    }

    /// Forgets the names nothing else holds any more (nodes gone, namespaces deleted),
    /// once the set has doubled since the last purge: amortised O(1) a name, and the set
    /// stays within twice the names in use.
    pub fn purge(&mut self) {
        if self.set.len() < PURGE_FLOOR.max(2 * self.kept) {
            return;
        }
        self.set.retain(|name| Arc::strong_count(name) > 1);
        self.kept = self.set.len();
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_stored_once_and_forgotten_when_unused() {
        let mut names = Names::default();
        let a = names.get("node-a");
        let b = names.get("node-a");
        assert!(Arc::ptr_eq(&a, &b));
        let held: Vec<Arc<str>> = (0..PURGE_FLOOR)
            .map(|i| names.get(&format!("n{i}")))
            .collect();
        drop((a, b));
        names.purge();
        assert_eq!(
            names.len(),
            PURGE_FLOOR,
            "node-a went, the held names stayed"
        );
        assert!(Arc::ptr_eq(&names.get("n0"), &held[0]));
    }
}
