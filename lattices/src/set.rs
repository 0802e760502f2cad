//! Grow-only sets: merge is union.

use std::collections::BTreeSet;
use std::hash::Hash;

use serde::{Deserialize, Serialize};

use crate::Lattice;

/// An unordered grow-only set backed by `hashbrown` (fast membership and union). The empty set
/// is the bottom element.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
#[serde(bound(
    serialize = "T: Serialize + Eq + Hash",
    deserialize = "T: Deserialize<'de> + Eq + Hash"
))]
pub struct SetLattice<T: Eq + Hash>(pub hashbrown::HashSet<T>);

impl<T: Eq + Hash> Default for SetLattice<T> {
    fn default() -> Self {
        Self(hashbrown::HashSet::new())
    }
}

impl<T: Eq + Hash> FromIterator<T> for SetLattice<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<T: Eq + Hash> Lattice for SetLattice<T> {
    fn merge(&mut self, other: Self) -> bool {
        let before = self.0.len();
        if self.0.is_empty() {
            self.0 = other.0;
        } else {
            self.0.extend(other.0);
        }
        self.0.len() != before
    }
}

/// A grow-only set kept in order (iteration is sorted). The empty set is the bottom element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OrderedSetLattice<T: Ord>(pub BTreeSet<T>);

impl<T: Ord> Default for OrderedSetLattice<T> {
    fn default() -> Self {
        Self(BTreeSet::new())
    }
}

impl<T: Ord> FromIterator<T> for OrderedSetLattice<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<T: Ord> Lattice for OrderedSetLattice<T> {
    fn merge(&mut self, mut other: Self) -> bool {
        let before = self.0.len();
        self.0.append(&mut other.0);
        self.0.len() != before
    }
}
