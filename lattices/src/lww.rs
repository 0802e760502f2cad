//! Last-writer-wins registers.
//!
//! Anna breaks timestamp ties in favour of the incoming write, so two replicas that receive the
//! same two writes in different orders can disagree forever. Here a tie on time is broken by the
//! writer id, and a tie on both (only possible when one writer reuses a timestamp) by the value,
//! so the merge is a true lattice: the result never depends on arrival order.

use serde::{Deserialize, Serialize};

use crate::{Lattice, WriterId};

/// When a write happened and who made it. Ordered by `time`, then `writer`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct Timestamp {
    /// Microseconds since the Unix epoch, by the writer's clock (or any monotone counter).
    pub time: u64,
    /// Breaks ties between writers that wrote in the same microsecond.
    pub writer: WriterId,
}

impl Timestamp {
    /// A timestamp from its parts.
    pub fn new(time: u64, writer: WriterId) -> Self {
        Self { time, writer }
    }

    /// The current wall-clock time, in microseconds, for `writer`.
    ///
    /// A clock set before 1970 reads as time 0.
    pub fn now(writer: WriterId) -> Self {
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Self { time, writer }
    }
}

/// A register whose merge keeps the write with the greatest [`Timestamp`] (then the greatest
/// value, for the degenerate case of one writer reusing a timestamp).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lww<T> {
    /// When the current value was written.
    pub timestamp: Timestamp,
    /// The current value.
    pub value: T,
}

impl<T> Lww<T> {
    /// A register holding `value`, written at `timestamp`.
    pub fn new(timestamp: Timestamp, value: T) -> Self {
        Self { timestamp, value }
    }
}

impl<T: Ord> Lattice for Lww<T> {
    fn merge(&mut self, other: Self) -> bool {
        if (other.timestamp, &other.value) > (self.timestamp, &self.value) {
            *self = other;
            true
        } else {
            false
        }
    }
}
