//! Vector clocks: a counter per writer, merged by pointwise max.
//!
//! The representation is `crdts::VClock`; this wrapper adds what a store needs on top: a merge
//! that reports change, a canonical total order (so versions can be sorted and deduplicated),
//! and normalisation of decoded clocks (an explicit zero entry means the same as a missing one,
//! so it is dropped to keep equality exact).

use std::cmp::Ordering;

use crdts::{CmRDT, CvRDT, Dot, VClock};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Lattice, WriterId};

/// A vector clock over [`WriterId`]s. The empty clock is the bottom element.
///
/// `Ord` is a canonical *lexicographic* order used for sorting; the causal (partial) order is
/// [`VectorClock::causal_cmp`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct VectorClock(VClock<WriterId>);

impl VectorClock {
    /// The empty clock.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `writer` (0 when absent).
    pub fn get(&self, writer: WriterId) -> u64 {
        self.0.get(&writer)
    }

    /// Advances `writer`'s counter by one and returns its new value.
    pub fn increment(&mut self, writer: WriterId) -> u64 {
        let dot = self.0.inc(writer);
        let counter = dot.counter;
        self.0.apply(dot);
        counter
    }

    /// Raises `writer`'s counter to at least `counter`.
    pub fn observe(&mut self, writer: WriterId, counter: u64) {
        self.0.apply(Dot::new(writer, counter));
    }

    /// The (writer, counter) pairs, in writer order; never a zero counter.
    pub fn iter(&self) -> impl Iterator<Item = (WriterId, u64)> + '_ {
        self.0.dots.iter().map(|(w, c)| (*w, *c))
    }

    /// Whether no writer has a counter.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The causal order: `Some(Less)` when `self` happened before `other`, `Some(Equal)` when
    /// they are the same, `Some(Greater)` when after, `None` when concurrent.
    pub fn causal_cmp(&self, other: &Self) -> Option<Ordering> {
        self.0.partial_cmp(&other.0)
    }

    /// Whether every counter of `other` is at most the same counter of `self` (`other ≤ self`).
    pub fn dominates(&self, other: &Self) -> bool {
        other.iter().all(|(w, c)| self.get(w) >= c)
    }

    /// Whether `other < self` in the causal order: dominated and different.
    pub fn strictly_dominates(&self, other: &Self) -> bool {
        self != other && self.dominates(other)
    }
}

impl FromIterator<(WriterId, u64)> for VectorClock {
    fn from_iter<I: IntoIterator<Item = (WriterId, u64)>>(iter: I) -> Self {
        let mut clock = Self::new();
        for (writer, counter) in iter {
            clock.observe(writer, counter);
        }
        clock
    }
}

impl Lattice for VectorClock {
    fn merge(&mut self, other: Self) -> bool {
        let changed = other.iter().any(|(w, c)| self.get(w) < c);
        if changed {
            self.0.merge(other.0);
        }
        changed
    }
}

impl PartialOrd for VectorClock {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for VectorClock {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.dots.cmp(&other.0.dots)
    }
}

impl Serialize for VectorClock {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.dots.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for VectorClock {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let dots = std::collections::BTreeMap::<WriterId, u64>::deserialize(deserializer)?;
        Ok(dots.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_order() {
        let a: VectorClock = [(1, 1)].into_iter().collect();
        let b: VectorClock = [(1, 2)].into_iter().collect();
        let c: VectorClock = [(2, 1)].into_iter().collect();
        assert_eq!(a.causal_cmp(&b), Some(Ordering::Less));
        assert_eq!(b.causal_cmp(&a), Some(Ordering::Greater));
        assert_eq!(a.causal_cmp(&c), None);
        assert!(b.strictly_dominates(&a));
        assert!(!a.strictly_dominates(&a));
    }

    #[test]
    fn zero_counters_are_dropped_when_decoding() {
        let encoded =
            rmp_serde::to_vec(&std::collections::BTreeMap::from([(7u64, 0u64)])).expect("encode");
        let clock: VectorClock = rmp_serde::from_slice(&encoded).expect("decode");
        assert_eq!(clock, VectorClock::new());
    }
}
