//! A counter that stays correct when an increment is retried.
//!
//! A PN-counter: per writer, the total of its increments and the total of its decrements, each
//! kept in a [`VectorClock`] (so merged by pointwise max). A write carries the writer's
//! *totals*, not a delta, so delivering the same write twice (a client retry, a replayed log
//! record, a gossip duplicate) counts once. A writer therefore remembers its own totals (see
//! [`Counter::add`]); a stateless writer uses a fresh [`WriterId`] per increment.
//!
//! `crdts::PNCounter` has this shape but keeps its per-writer totals private, so a writer's
//! total cannot be read to guard against overflow (its `inc_many` overflows a `u64`), decoded
//! values cannot be normalised, and a merge cannot tell whether it changed anything without
//! cloning the whole counter. Two vector clocks (`crdts::VClock` underneath) give all three.

use serde::{Deserialize, Serialize};

use crate::{Lattice, VectorClock, WriterId};

/// A PN-counter keyed by writer. The empty counter (value 0) is the bottom element.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Counter {
    increments: VectorClock,
    decrements: VectorClock,
}

impl Counter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` on behalf of `writer`, raising that writer's increment or decrement total
    /// (saturating at `u64::MAX`). The result, sent as a write, merges idempotently.
    pub fn add(&mut self, writer: WriterId, delta: i64) {
        let totals = if delta >= 0 {
            &mut self.increments
        } else {
            &mut self.decrements
        };
        let total = totals.get(writer).saturating_add(delta.unsigned_abs());
        totals.observe(writer, total);
    }

    /// A counter holding only `writer`'s contribution of `delta`: what a stateless writer sends.
    pub fn of(writer: WriterId, delta: i64) -> Self {
        let mut counter = Self::new();
        counter.add(writer, delta);
        counter
    }

    /// The counter's value: the sum of all increments minus all decrements.
    pub fn value(&self) -> i128 {
        let sum = |totals: &VectorClock| totals.iter().map(|(_, n)| i128::from(n)).sum::<i128>();
        // At most 2^64 writers of at most 2^64 each cannot overflow i128 in practice; saturate
        // anyway rather than wrap.
        sum(&self.increments).saturating_sub(sum(&self.decrements))
    }
}

impl Lattice for Counter {
    fn merge(&mut self, other: Self) -> bool {
        let up = self.increments.merge(other.increments);
        let down = self.decrements.merge(other.decrements);
        up || down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retried_writes_count_once() {
        let mut stored = Counter::new();
        let write = Counter::of(1, 5);
        stored.merge(write.clone());
        stored.merge(write);
        assert_eq!(stored.value(), 5);
    }

    #[test]
    fn totals_saturate_instead_of_wrapping() {
        let mut counter = Counter::new();
        counter.add(1, i64::MAX);
        counter.add(1, i64::MAX);
        counter.add(1, i64::MAX);
        assert_eq!(counter.value(), i128::from(u64::MAX));
        counter.add(1, -3);
        assert_eq!(counter.value(), i128::from(u64::MAX) - 3);
    }
}
