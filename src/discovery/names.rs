//! Shared values for what many endpoints repeat: node names, zones and namespaces, and
//! whole placements (node, zone, hints). 250 000 endpoints on a few hundred nodes then
//! hold a few hundred of each, and every endpoint a pointer to its own.

use std::collections::HashSet;
use std::hash::Hash;
use std::sync::Arc;

use crate::model::Placement;

/// Sets of shared strings and placements, each handed out as many times as asked for.
#[derive(Debug, Default)]
pub struct Names {
    set: HashSet<Arc<str>>,
    placements: HashSet<Arc<Placement>>,
    /// The sets' size after the last purge: the next one waits until they have doubled.
    kept: usize,
}

/// Entries below this count are never purged: a purge would cost more than it frees.
const PURGE_FLOOR: usize = 256;

impl Names {
    /// The shared copy of `name`.
    pub(crate) fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.set.get(name) {
            return shared.clone();
        }
        let shared: Arc<str> = name.into();
        self.set.insert(shared.clone());
        shared
    }

    /// The shared placement on `node`, in `zone`, hinted for `hints`.
    pub(crate) fn placement<'a>(
        &mut self,
        node: Option<&str>,
        zone: Option<&str>,
        hints: impl Iterator<Item = &'a str>,
    ) -> Arc<Placement> {
        let placement = Placement {
            node: node.map(|n| self.get(n)),
            zone: zone.map(|z| self.get(z)),
            zone_hints: hints.map(|h| self.get(h)).collect(),
        };
        if let Some(shared) = self.placements.get(&placement) {
            return shared.clone();
        }
        let shared = Arc::new(placement);
        self.placements.insert(shared.clone());
        shared
    }

    /// Forgets what nothing else holds any more (nodes gone, namespaces deleted), once
    /// the sets have doubled since the last purge: amortised O(1) an entry, and the sets
    /// stay within twice what is in use.
    pub(crate) fn purge(&mut self) {
        if self.len() < PURGE_FLOOR.max(2 * self.kept) {
            return;
        }
        // Placements first: they hold names.
        retain_held(&mut self.placements);
        retain_held(&mut self.set);
        self.kept = self.len();
    }

    pub(crate) fn len(&self) -> usize {
        self.set.len() + self.placements.len()
    }
}

fn retain_held<T: ?Sized + Eq + Hash>(set: &mut HashSet<Arc<T>>) {
    set.retain(|shared| Arc::strong_count(shared) > 1);
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

    #[test]
    fn endpoints_placed_alike_share_one_placement() {
        let mut names = Names::default();
        let a = names.placement(Some("node-1"), Some("z"), ["z", "y"].into_iter());
        let b = names.placement(Some("node-1"), Some("z"), ["z", "y"].into_iter());
        let c = names.placement(Some("node-2"), Some("z"), std::iter::empty());
        assert!(Arc::ptr_eq(&a, &b) && !Arc::ptr_eq(&a, &c));
        assert!(Arc::ptr_eq(
            a.zone.as_ref().unwrap(),
            c.zone.as_ref().unwrap()
        ));
        assert_eq!(&*a.zone_hints[1], "y");
    }
}
