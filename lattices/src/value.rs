//! The dynamically typed value the KVS stores, logs and ships: one enum over the lattice types.
//!
//! The store keeps one [`LatticeValue`] per key and refuses a write of another type with a
//! [`TypeMismatch`] (Anna silently drops it). Payloads are [`Bytes`]: cheap to clone, and
//! MessagePack encodes them as binary, not as arrays of integers.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use ordered_float::OrderedFloat;
use serde::{Deserialize, Serialize};

use crate::causal::MAX_VERSIONS;
use crate::{
    BoolLattice, Counter, Lattice, Lww, MapLattice, Max, Min, MultiKeyCausal, OrderedSetLattice,
    Priority, SetLattice, SingleKeyCausal,
};

/// A lattice value of any of the types the store supports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LatticeValue {
    /// Last writer wins.
    Lww(Lww<Bytes>),
    /// Grow-only set.
    Set(SetLattice<Bytes>),
    /// Grow-only set, kept sorted.
    OrderedSet(OrderedSetLattice<Bytes>),
    /// Largest integer wins.
    Max(Max<i64>),
    /// Smallest integer wins.
    Min(Min<i64>),
    /// Once true, stays true.
    Bool(BoolLattice),
    /// Retry-safe PN-counter.
    Counter(Counter),
    /// Lowest priority wins.
    Priority(Priority<OrderedFloat<f64>, Bytes>),
    /// A map from field names to nested lattice values, merged field by field.
    Map(MapLattice<Bytes, LatticeValue>),
    /// Causal register of one key.
    SingleCausal(SingleKeyCausal<Bytes>),
    /// Causal register carrying the clocks of the keys it depends on.
    MultiCausal(MultiKeyCausal<Bytes>),
}

/// The type of a [`LatticeValue`], as named on the command line and in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LatticeType {
    /// [`LatticeValue::Lww`]
    Lww,
    /// [`LatticeValue::Set`]
    Set,
    /// [`LatticeValue::OrderedSet`]
    OrderedSet,
    /// [`LatticeValue::Max`]
    Max,
    /// [`LatticeValue::Min`]
    Min,
    /// [`LatticeValue::Bool`]
    Bool,
    /// [`LatticeValue::Counter`]
    Counter,
    /// [`LatticeValue::Priority`]
    Priority,
    /// [`LatticeValue::Map`]
    Map,
    /// [`LatticeValue::SingleCausal`]
    SingleCausal,
    /// [`LatticeValue::MultiCausal`]
    MultiCausal,
}

impl LatticeType {
    /// Every type, in the order of their names in [`LatticeType::name`].
    pub const ALL: [LatticeType; 11] = [
        LatticeType::Lww,
        LatticeType::Set,
        LatticeType::OrderedSet,
        LatticeType::Max,
        LatticeType::Min,
        LatticeType::Bool,
        LatticeType::Counter,
        LatticeType::Priority,
        LatticeType::Map,
        LatticeType::SingleCausal,
        LatticeType::MultiCausal,
    ];

    /// The type's name: `lww`, `set`, `ordered-set`, `max`, `min`, `bool`, `counter`,
    /// `priority`, `map`, `single-causal` or `multi-causal`.
    pub fn name(self) -> &'static str {
        match self {
            LatticeType::Lww => "lww",
            LatticeType::Set => "set",
            LatticeType::OrderedSet => "ordered-set",
            LatticeType::Max => "max",
            LatticeType::Min => "min",
            LatticeType::Bool => "bool",
            LatticeType::Counter => "counter",
            LatticeType::Priority => "priority",
            LatticeType::Map => "map",
            LatticeType::SingleCausal => "single-causal",
            LatticeType::MultiCausal => "multi-causal",
        }
    }
}

impl fmt::Display for LatticeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not a lattice type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown lattice type {0:?} (expected one of lww, set, ordered-set, max, min, bool, counter, priority, map, single-causal, multi-causal)")]
pub struct UnknownLatticeType(pub String);

impl FromStr for LatticeType {
    type Err = UnknownLatticeType;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        LatticeType::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| UnknownLatticeType(s.to_string()))
    }
}

/// A value over a size limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LimitExceeded {
    /// A causal value would carry this many concurrent versions.
    #[error("a causal value would carry {0} concurrent versions (at most {MAX_VERSIONS})")]
    Versions(usize),
}

/// A write whose lattice type differs from the stored one (possibly inside a map field).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("lattice type mismatch: stored {stored}, written {written}")]
pub struct TypeMismatch {
    /// The type already stored.
    pub stored: LatticeType,
    /// The type of the rejected write.
    pub written: LatticeType,
}

impl LatticeValue {
    /// The value's type.
    pub fn lattice_type(&self) -> LatticeType {
        match self {
            LatticeValue::Lww(_) => LatticeType::Lww,
            LatticeValue::Set(_) => LatticeType::Set,
            LatticeValue::OrderedSet(_) => LatticeType::OrderedSet,
            LatticeValue::Max(_) => LatticeType::Max,
            LatticeValue::Min(_) => LatticeType::Min,
            LatticeValue::Bool(_) => LatticeType::Bool,
            LatticeValue::Counter(_) => LatticeType::Counter,
            LatticeValue::Priority(_) => LatticeType::Priority,
            LatticeValue::Map(_) => LatticeType::Map,
            LatticeValue::SingleCausal(_) => LatticeType::SingleCausal,
            LatticeValue::MultiCausal(_) => LatticeType::MultiCausal,
        }
    }

    /// Checks that `other` can be merged into `self` without a type conflict, at the top level
    /// and in every map field the two share.
    pub fn check_mergeable(&self, other: &Self) -> Result<(), TypeMismatch> {
        match (self, other) {
            (LatticeValue::Map(mine), LatticeValue::Map(theirs)) => {
                for (field, value) in &theirs.0 {
                    if let Some(stored) = mine.0.get(field) {
                        stored.check_mergeable(value)?;
                    }
                }
                Ok(())
            }
            _ if self.lattice_type() == other.lattice_type() => Ok(()),
            _ => Err(TypeMismatch {
                stored: self.lattice_type(),
                written: other.lattice_type(),
            }),
        }
    }

    /// Checks that the value respects the limits every decoder enforces (at most
    /// [`crate::causal::MAX_VERSIONS`] versions per causal value, nested maps included), so a
    /// store never keeps a value it could not read back.
    pub fn check_limits(&self) -> Result<(), LimitExceeded> {
        match self {
            LatticeValue::SingleCausal(v) if v.versions().len() > MAX_VERSIONS => {
                Err(LimitExceeded::Versions(v.versions().len()))
            }
            LatticeValue::MultiCausal(v) if v.versions().len() > MAX_VERSIONS => {
                Err(LimitExceeded::Versions(v.versions().len()))
            }
            LatticeValue::Map(map) => map.0.values().try_for_each(LatticeValue::check_limits),
            _ => Ok(()),
        }
    }

    /// Whether merging into this value could break [`LatticeValue::check_limits`] (it holds
    /// causal values, whose siblings accumulate).
    pub fn may_exceed_limits(&self) -> bool {
        match self {
            LatticeValue::SingleCausal(_) | LatticeValue::MultiCausal(_) => true,
            LatticeValue::Map(map) => map.0.values().any(LatticeValue::may_exceed_limits),
            _ => false,
        }
    }

    /// Merges `other` into `self` if the types agree; otherwise leaves `self` untouched.
    pub fn try_merge(&mut self, other: Self) -> Result<bool, TypeMismatch> {
        self.check_mergeable(&other)?;
        Ok(self.merge(other))
    }
}

/// Values of the same type merge as that type. Values of different types (which the store
/// never merges: it checks with [`LatticeValue::check_mergeable`] first) are ordered by their
/// [`LatticeType`], the greater type winning, so that the dynamic value is still a lattice.
impl Lattice for LatticeValue {
    fn merge(&mut self, other: Self) -> bool {
        match (self, other) {
            (LatticeValue::Lww(a), LatticeValue::Lww(b)) => a.merge(b),
            (LatticeValue::Set(a), LatticeValue::Set(b)) => a.merge(b),
            (LatticeValue::OrderedSet(a), LatticeValue::OrderedSet(b)) => a.merge(b),
            (LatticeValue::Max(a), LatticeValue::Max(b)) => a.merge(b),
            (LatticeValue::Min(a), LatticeValue::Min(b)) => a.merge(b),
            (LatticeValue::Bool(a), LatticeValue::Bool(b)) => a.merge(b),
            (LatticeValue::Counter(a), LatticeValue::Counter(b)) => a.merge(b),
            (LatticeValue::Priority(a), LatticeValue::Priority(b)) => a.merge(b),
            (LatticeValue::Map(a), LatticeValue::Map(b)) => a.merge(b),
            (LatticeValue::SingleCausal(a), LatticeValue::SingleCausal(b)) => a.merge(b),
            (LatticeValue::MultiCausal(a), LatticeValue::MultiCausal(b)) => a.merge(b),
            (this, other) => {
                if other.lattice_type() > this.lattice_type() {
                    *this = other;
                    true
                } else {
                    false
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Timestamp;

    #[test]
    fn type_names_round_trip() {
        for t in LatticeType::ALL {
            assert_eq!(t.name().parse::<LatticeType>(), Ok(t));
        }
        assert!("nope".parse::<LatticeType>().is_err());
    }

    #[test]
    fn mismatch_leaves_the_value_untouched() {
        let mut stored = LatticeValue::Max(Max(3));
        let before = stored.clone();
        let err = stored
            .try_merge(LatticeValue::Lww(Lww::new(
                Timestamp::new(1, 1),
                Bytes::from_static(b"x"),
            )))
            .unwrap_err();
        assert_eq!(
            err,
            TypeMismatch {
                stored: LatticeType::Max,
                written: LatticeType::Lww
            }
        );
        assert_eq!(stored, before);
    }

    #[test]
    fn nested_map_mismatch_is_detected() {
        let field = Bytes::from_static(b"f");
        let mut stored = LatticeValue::Map(MapLattice::from_iter([(
            field.clone(),
            LatticeValue::Max(Max(1)),
        )]));
        let write = LatticeValue::Map(MapLattice::from_iter([(
            field,
            LatticeValue::Bool(BoolLattice(true)),
        )]));
        assert!(stored.try_merge(write).is_err());
    }
}
