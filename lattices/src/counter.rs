//! A counter that stays correct when an increment is retried.
//!
//! The representation is a PN-counter (`crdts::PNCounter`): per writer, the total of its
//! increments and the total of its decrements, merged by max. A write carries the writer's
//! *totals*, not a delta, so delivering the same write twice (a client retry, a replayed log
//! record, a gossip duplicate) counts once. A writer therefore remembers its own totals (see
//! [`Counter::add`]); a stateless writer uses a fresh [`WriterId`] per increment.

use crdts::{CmRDT, CvRDT, PNCounter};
use serde::{Deserialize, Serialize};

use crate::{Lattice, WriterId};

/// A PN-counter keyed by writer. The empty counter (value 0) is the bottom element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Counter(PNCounter<WriterId>);

impl Default for Counter {
    fn default() -> Self {
        Self(PNCounter::new())
    }
}

impl Counter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `delta` on behalf of `writer`, raising that writer's increment or decrement total.
    /// The result, sent as a write, merges idempotently.
    pub fn add(&mut self, writer: WriterId, delta: i64) {
        let steps = delta.unsigned_abs();
        if steps == 0 {
            return;
        }
        let op = if delta > 0 {
            self.0.inc_many(writer, steps)
        } else {
            self.0.dec_many(writer, steps)
        };
        self.0.apply(op);
    }

    /// A counter holding only `writer`'s contribution of `delta`: what a stateless writer sends.
    pub fn of(writer: WriterId, delta: i64) -> Self {
        let mut counter = Self::new();
        counter.add(writer, delta);
        counter
    }

    /// The counter's value: the sum of all increments minus all decrements, saturated to `i128`.
    pub fn value(&self) -> i128 {
        let value = self.0.read();
        i128::try_from(&value).unwrap_or(if value.sign() == num_bigint::Sign::Minus {
            i128::MIN
        } else {
            i128::MAX
        })
    }
}

impl Lattice for Counter {
    fn merge(&mut self, other: Self) -> bool {
        let before = self.clone();
        self.0.merge(other.0);
        *self != before
    }
}
