//! Squall's state model: join-semilattices.
//!
//! Every value Squall stores is a lattice: [`Lattice::merge`] is associative, commutative and
//! idempotent, so replicas, caches and retried writes converge to the same value whatever order,
//! grouping or duplication the network gives them. This is what lets the KVS accept a write at any
//! replica without coordination, and what makes its write-ahead log trivially replayable.
//!
//! The crate is pure (serde only, no I/O), so it also builds for `wasm32-wasip2` guests.
//!
//! # Layout
//! - [`order`]: lattices of a total order: [`Max`], [`Min`], [`BoolLattice`], [`Priority`].
//! - [`lww`]: last-writer-wins registers, [`Lww`], with deterministic tie-breaking.
//! - [`set`]: grow-only sets, [`SetLattice`] (hashed) and [`OrderedSetLattice`].
//! - [`map`]: [`MapLattice`], a map whose values are lattices, merged key by key.
//! - [`counter`]: [`Counter`], a PN-counter whose increments are safe to retry.
//! - [`clock`]: vector clocks, [`VectorClock`].
//! - [`causal`]: [`SingleKeyCausal`] and [`MultiKeyCausal`], multi-value registers ordered
//!   by vector clocks; the second also carries the clocks of the keys a version depends on.
//! - [`value`]: [`LatticeValue`], the dynamically typed value the KVS stores and ships.
//! - [`entry`]: [`Entry`], what the KVS keeps under a key: a value with its epoch (deletes)
//!   and expiry, and [`Write`], a client's write before a replica gives it an epoch.
//!
//! # Why `crdts` only in part
//! The `crdts` crate supplies the representation of [`VectorClock`] (`crdts::VClock`), on
//! which [`Counter`] also builds. Four of its types are not used, each for a reason:
//! `PNCounter` hides its per-writer totals, so it cannot be guarded against overflow or merged
//! without a clone (see [`counter`]); `LWWReg` treats two writes with the same marker and
//! different values as a validation error instead of ordering them deterministically, which
//! breaks commutativity for us; `GSet` exposes its elements only by cloning the whole set,
//! which a store serving reads cannot afford; `MVReg` keeps a causal context shaped for its
//! own ops, not the clock-plus-dependencies versions that Cloudburst's causal modes ship. Their
//! replacements here are a few lines each, checked by the same property tests.
//!
//! # Example
//! ```
//! use squall_lattices::{Lattice, Lww, Timestamp};
//!
//! let mut a = Lww::new(Timestamp::new(10, 1), "alice".to_string());
//! let b = Lww::new(Timestamp::new(12, 2), "bob".to_string());
//! assert!(a.merge(b.clone()));    // the later write wins
//! assert!(!a.merge(b));           // merging again changes nothing
//! assert_eq!(a.value, "bob");
//! ```

pub mod causal;
pub mod clock;
pub mod counter;
pub mod entry;
pub mod lww;
pub mod map;
pub mod order;
pub mod set;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod value;

pub use causal::{CausalVersion, Dependencies, MultiKeyCausal, SingleKeyCausal};
pub use clock::VectorClock;
pub use counter::Counter;
pub use entry::{Entry, Write};
pub use lww::{Lww, Timestamp};
pub use map::MapLattice;
pub use order::{BoolLattice, Max, Min, Priority};
pub use set::{OrderedSetLattice, SetLattice};
pub use value::{LatticeType, LatticeValue, LimitExceeded, TypeMismatch};

/// Identifies a writer (a client, an executor, a session) in timestamps, vector clocks and
/// counters. Writers pick a random one; 64 bits make collisions negligible.
pub type WriterId = u64;

/// A join-semilattice: a value with a merge that is associative, commutative and idempotent.
///
/// For all `a`, `b`, `c` of the type:
/// - `a ⊔ (b ⊔ c) == (a ⊔ b) ⊔ c` (associative),
/// - `a ⊔ b == b ⊔ a` (commutative),
/// - `a ⊔ a == a` (idempotent),
///
/// so any set of updates, delivered in any order, grouped in any way, any number of times,
/// merges to one value. Every implementation in this crate is checked against these laws by
/// property tests.
pub trait Lattice: Sized {
    /// Merges `other` into `self` (`self := self ⊔ other`) and reports whether `self` changed.
    ///
    /// The flag lets a store skip logging and propagating writes that carry nothing new.
    fn merge(&mut self, other: Self) -> bool;

    /// Returns `self ⊔ other`.
    fn join(mut self, other: Self) -> Self {
        self.merge(other);
        self
    }
}
