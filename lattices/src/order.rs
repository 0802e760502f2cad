//! Lattices over a total order: the merge keeps the larger (or, for [`Min`] and [`Priority`], the
//! smaller) element. They are the building blocks of clocks, counters and flags.

use serde::{Deserialize, Serialize};

use crate::Lattice;

/// Keeps the largest value ever merged in. Cheap to clone when `T` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Max<T>(pub T);

impl<T: Ord> Lattice for Max<T> {
    fn merge(&mut self, other: Self) -> bool {
        if other.0 > self.0 {
            self.0 = other.0;
            true
        } else {
            false
        }
    }
}

/// Keeps the smallest value ever merged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Min<T>(pub T);

impl<T: Ord> Lattice for Min<T> {
    fn merge(&mut self, other: Self) -> bool {
        if other.0 < self.0 {
            self.0 = other.0;
            true
        } else {
            false
        }
    }
}

/// A flag that, once true, stays true (logical or). `false` is the bottom element.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct BoolLattice(pub bool);

impl Lattice for BoolLattice {
    fn merge(&mut self, other: Self) -> bool {
        let changed = other.0 && !self.0;
        self.0 |= other.0;
        changed
    }
}

/// A value tagged with a priority; the merge keeps the value with the **lowest** priority, as in
/// Anna (think "lowest latency wins"). Equal priorities are ordered by the value itself, so the
/// outcome never depends on arrival order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Priority<P, T> {
    /// Lower wins.
    pub priority: P,
    /// The payload that comes with the priority.
    pub value: T,
}

impl<P, T> Priority<P, T> {
    /// A value with its priority.
    pub fn new(priority: P, value: T) -> Self {
        Self { priority, value }
    }
}

impl<P: Ord, T: Ord> Lattice for Priority<P, T> {
    fn merge(&mut self, other: Self) -> bool {
        if (&other.priority, &other.value) < (&self.priority, &self.value) {
            *self = other;
            true
        } else {
            false
        }
    }
}
