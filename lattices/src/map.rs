//! A map of lattices: keys are unioned and the values of a shared key are merged.

use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::Lattice;

/// A map whose values are lattices, merged key by key (`hashbrown` underneath). The empty map is
/// the bottom element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "K: Serialize + Eq + Hash, V: Serialize",
    deserialize = "K: Deserialize<'de> + Eq + Hash, V: Deserialize<'de>"
))]
pub struct MapLattice<K: Eq + Hash, V>(pub hashbrown::HashMap<K, V>);

impl<K: Eq + Hash, V> Default for MapLattice<K, V> {
    fn default() -> Self {
        Self(hashbrown::HashMap::new())
    }
}

impl<K: Eq + Hash, V> FromIterator<(K, V)> for MapLattice<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<K: Eq + Hash, V: Lattice> Lattice for MapLattice<K, V> {
    fn merge(&mut self, other: Self) -> bool {
        let mut changed = false;
        for (key, value) in other.0 {
            match self.0.entry(key) {
                hashbrown::hash_map::Entry::Occupied(mut slot) => {
                    changed |= slot.get_mut().merge(value);
                }
                hashbrown::hash_map::Entry::Vacant(slot) => {
                    slot.insert(value);
                    changed = true;
                }
            }
        }
        changed
    }
}
