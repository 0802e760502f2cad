//! Causal lattices: multi-value registers ordered by vector clocks.
//!
//! A causal value is a set of *versions*, each a vector clock, optional dependency clocks and a
//! payload. The merge keeps every version that no other version strictly dominates: a write
//! that saw another one replaces it, concurrent writes are all kept (the reader sees siblings).
//!
//! Anna stores one clock plus a set of values and unions the values when clocks are concurrent.
//! That shape is not associative (merging `{x:1}/a` with `{y:1}/b` and then `{x:2}/c` keeps `a`,
//! `b` and `c`; merging the last two first drops `a`), so replicas could diverge. Keeping a
//! clock per version, as here, makes the merge the join of maximal elements, which is a true
//! lattice; the value's overall clock is derived ([`Causal::clock`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Lattice, VectorClock};

/// The clocks of the keys a version causally depends on (Cloudburst's multi-key causality).
pub type Dependencies = BTreeMap<String, VectorClock>;

/// One version of a causal value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CausalVersion<T, D> {
    /// The version's vector clock.
    pub clock: VectorClock,
    /// What the version depends on: `()` for single-key causality, [`Dependencies`] otherwise.
    pub dependencies: D,
    /// The payload.
    pub value: T,
}

/// A causal multi-value register. The empty register is the bottom element.
///
/// Versions are kept sorted and mutually concurrent (an antichain), so equal values compare
/// equal; decoding normalises whatever it is given the same way, so a value from the wire is
/// always canonical. Cloning costs one copy of every version.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Causal<T, D> {
    versions: Vec<CausalVersion<T, D>>,
}

/// The most versions a causal value may carry. Concurrent siblings beyond this many mean
/// writers are misbehaving (Riak warns at 25); refusing them on decoding bounds the quadratic
/// normalisation, and stores refuse writes whose merge would exceed it (see
/// [`crate::LatticeValue::check_limits`]), so every stored value can be decoded again.
pub const MAX_VERSIONS: usize = 256;

impl<'de, T, D> Deserialize<'de> for Causal<T, D>
where
    T: Deserialize<'de> + Ord,
    D: Deserialize<'de> + Ord,
{
    fn deserialize<De: serde::Deserializer<'de>>(deserializer: De) -> Result<Self, De::Error> {
        let versions = Vec::<CausalVersion<T, D>>::deserialize(deserializer)?;
        if versions.len() > MAX_VERSIONS {
            return Err(serde::de::Error::custom(format!(
                "causal value with {} versions (at most {MAX_VERSIONS})",
                versions.len()
            )));
        }
        Ok(Self::from_versions(versions))
    }
}

/// A vector clock plus the set of concurrent values (Anna's `SINGLE_CAUSAL`).
pub type SingleKeyCausal<T> = Causal<T, ()>;

/// [`SingleKeyCausal`] plus, per version, the clocks of the keys it depends on (Anna's
/// `MULTI_CAUSAL`).
pub type MultiKeyCausal<T> = Causal<T, Dependencies>;

impl<T, D> Default for Causal<T, D> {
    fn default() -> Self {
        Self {
            versions: Vec::new(),
        }
    }
}

impl<T: Ord, D: Ord> Causal<T, D> {
    /// A register holding one version.
    pub fn with_version(clock: VectorClock, dependencies: D, value: T) -> Self {
        Self {
            versions: vec![CausalVersion {
                clock,
                dependencies,
                value,
            }],
        }
    }

    /// Builds a register from any versions, keeping only the maximal ones.
    pub fn from_versions(versions: impl IntoIterator<Item = CausalVersion<T, D>>) -> Self {
        let mut register = Self {
            versions: versions.into_iter().collect(),
        };
        register.normalize();
        register
    }

    /// The versions, concurrent with each other, in canonical order.
    pub fn versions(&self) -> &[CausalVersion<T, D>] {
        &self.versions
    }

    /// The concurrent values (siblings), in canonical order.
    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.versions.iter().map(|v| &v.value)
    }

    /// The value's clock: the join of its versions' clocks.
    pub fn clock(&self) -> VectorClock {
        self.versions
            .iter()
            .fold(VectorClock::new(), |acc, v| acc.join(v.clock.clone()))
    }

    /// Sorts, deduplicates and drops every version strictly dominated by another.
    fn normalize(&mut self) {
        self.versions.sort();
        self.versions.dedup();
        if self.versions.len() > 1 {
            let clocks: Vec<VectorClock> = self.versions.iter().map(|v| v.clock.clone()).collect();
            self.versions
                .retain(|v| !clocks.iter().any(|c| c.strictly_dominates(&v.clock)));
        }
    }
}

impl<T: Ord> MultiKeyCausal<T> {
    /// The join of the versions' dependency clocks, key by key.
    pub fn dependencies(&self) -> Dependencies {
        let mut all = Dependencies::new();
        for version in &self.versions {
            for (key, clock) in &version.dependencies {
                all.entry(key.clone()).or_default().merge(clock.clone());
            }
        }
        all
    }
}

/// Raises `into[key]` to at least `clock`.
pub fn raise(into: &mut Dependencies, key: &str, clock: &VectorClock) {
    if clock.is_empty() {
        return;
    }
    match into.get_mut(key) {
        Some(present) => {
            present.merge(clock.clone());
        }
        None => {
            into.insert(key.to_string(), clock.clone());
        }
    }
}

/// Raises `into` key by key (the join of two dependency maps) to at least `from`.
pub fn raise_all(into: &mut Dependencies, from: &Dependencies) {
    for (key, clock) in from {
        raise(into, key, clock);
    }
}

impl<T: Ord, D: Ord> Lattice for Causal<T, D> {
    fn merge(&mut self, other: Self) -> bool {
        // The result equals `self` exactly when every incoming version is already present or
        // strictly dominated by a present one (`self` being an antichain, such a version cannot
        // dominate any present one).
        let nothing_new = other.versions.iter().all(|incoming| {
            self.versions.iter().any(|present| {
                present == incoming || present.clock.strictly_dominates(&incoming.clock)
            })
        });
        if nothing_new {
            return false;
        }
        self.versions.extend(other.versions);
        self.normalize();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(entries: &[(u64, u64)]) -> VectorClock {
        entries.iter().copied().collect()
    }

    #[test]
    fn later_write_replaces_earlier_and_concurrent_writes_are_siblings() {
        let mut register = SingleKeyCausal::with_version(clock(&[(1, 1)]), (), "a");
        assert!(register.merge(SingleKeyCausal::with_version(clock(&[(2, 1)]), (), "b")));
        assert_eq!(register.values().copied().collect::<Vec<_>>(), ["a", "b"]);
        assert!(register.merge(SingleKeyCausal::with_version(
            clock(&[(1, 1), (2, 1), (3, 1)]),
            (),
            "c"
        )));
        assert_eq!(register.values().copied().collect::<Vec<_>>(), ["c"]);
        assert_eq!(register.clock(), clock(&[(1, 1), (2, 1), (3, 1)]));
    }

    #[test]
    fn the_case_that_breaks_annas_shape_is_associative_here() {
        let a = SingleKeyCausal::with_version(clock(&[(1, 1)]), (), "a");
        let b = SingleKeyCausal::with_version(clock(&[(2, 1)]), (), "b");
        let c = SingleKeyCausal::with_version(clock(&[(1, 2)]), (), "c");
        let left = a.clone().join(b.clone()).join(c.clone());
        let right = a.join(b.join(c));
        assert_eq!(left, right);
        assert_eq!(left.values().copied().collect::<Vec<_>>(), ["c", "b"]);
    }

    #[test]
    fn decoding_normalises_any_version_list() {
        let older = CausalVersion {
            clock: clock(&[(1, 1)]),
            dependencies: (),
            value: "old".to_string(),
        };
        let newer = CausalVersion {
            clock: clock(&[(1, 2)]),
            dependencies: (),
            value: "new".to_string(),
        };
        // Unsorted, duplicated and dominated: what a careless or hostile writer might send.
        let raw = vec![newer.clone(), older, newer.clone()];
        let bytes = rmp_serde::to_vec(&raw).expect("encode");
        let decoded: SingleKeyCausal<String> = rmp_serde::from_slice(&bytes).expect("decode");
        assert_eq!(decoded, SingleKeyCausal::from_versions([newer]));
        let too_many: Vec<_> = (0..=MAX_VERSIONS as u64)
            .map(|w| CausalVersion {
                clock: clock(&[(w, 1)]),
                dependencies: (),
                value: String::new(),
            })
            .collect();
        let bytes = rmp_serde::to_vec(&too_many).expect("encode");
        assert!(rmp_serde::from_slice::<SingleKeyCausal<String>>(&bytes).is_err());
    }

    #[test]
    fn dependencies_are_joined() {
        let deps_a = Dependencies::from([("x".to_string(), clock(&[(1, 2)]))]);
        let deps_b = Dependencies::from([("x".to_string(), clock(&[(2, 1)]))]);
        let mut register = MultiKeyCausal::with_version(clock(&[(1, 1)]), deps_a, 1u8);
        register.merge(MultiKeyCausal::with_version(clock(&[(2, 1)]), deps_b, 2u8));
        assert_eq!(register.dependencies()["x"], clock(&[(1, 2), (2, 1)]));
    }
}
