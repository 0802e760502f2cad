//! Proptest strategies for every lattice type (behind the `testing` feature), and, in this
//! crate's own tests, the lattice laws and a convergence test checked with them.
//!
//! The strategies draw from deliberately small domains (few writers, short payloads, small
//! numbers) so that ties, equal clocks and overlapping sets, where merge bugs hide, are common.

use bytes::Bytes;
use ordered_float::OrderedFloat;
use proptest::collection::{btree_map, btree_set, hash_map, hash_set, vec};
use proptest::prelude::*;

use crate::{
    BoolLattice, CausalVersion, Counter, Dependencies, LatticeValue, Lww, MapLattice, Max, Min,
    MultiKeyCausal, OrderedSetLattice, Priority, SetLattice, SingleKeyCausal, Timestamp,
    VectorClock, WriterId,
};

/// Short payloads over a 3-letter alphabet.
pub fn payload() -> impl Strategy<Value = Bytes> {
    vec(0u8..3, 0..3).prop_map(Bytes::from)
}

/// One of four writers.
pub fn writer() -> impl Strategy<Value = WriterId> {
    0u64..4
}

/// Timestamps with frequent ties.
pub fn timestamp() -> impl Strategy<Value = Timestamp> {
    (0u64..4, writer()).prop_map(|(time, writer)| Timestamp::new(time, writer))
}

/// LWW registers.
pub fn lww() -> impl Strategy<Value = Lww<Bytes>> {
    (timestamp(), payload()).prop_map(|(t, v)| Lww::new(t, v))
}

/// Hashed sets.
pub fn set() -> impl Strategy<Value = SetLattice<Bytes>> {
    hash_set(payload(), 0..5).prop_map(|s| s.into_iter().collect())
}

/// Ordered sets.
pub fn ordered_set() -> impl Strategy<Value = OrderedSetLattice<Bytes>> {
    btree_set(payload(), 0..5).prop_map(OrderedSetLattice)
}

/// Vector clocks over four writers.
pub fn clock() -> impl Strategy<Value = VectorClock> {
    btree_map(writer(), 1u64..4, 0..4).prop_map(|m| m.into_iter().collect())
}

/// Counters built from increments and decrements by a few writers.
pub fn counter() -> impl Strategy<Value = Counter> {
    vec((writer(), -5i64..6), 0..5).prop_map(|ops| {
        let mut counter = Counter::new();
        for (w, delta) in ops {
            counter.add(w, delta);
        }
        counter
    })
}

/// Priorities with frequent ties.
pub fn priority() -> impl Strategy<Value = Priority<OrderedFloat<f64>, Bytes>> {
    (prop_oneof![Just(0.5), Just(1.0), Just(-2.0)], payload())
        .prop_map(|(p, v)| Priority::new(OrderedFloat(p), v))
}

/// Single-key causal registers of up to four versions.
pub fn single_causal() -> impl Strategy<Value = SingleKeyCausal<Bytes>> {
    vec((clock(), payload()), 0..4).prop_map(|versions| {
        SingleKeyCausal::from_versions(versions.into_iter().map(|(clock, value)| CausalVersion {
            clock,
            dependencies: (),
            value,
        }))
    })
}

/// Dependency maps over two keys.
pub fn dependencies() -> impl Strategy<Value = Dependencies> {
    btree_map(
        prop_oneof![Just("a".to_string()), Just("b".to_string())],
        clock(),
        0..2,
    )
}

/// Multi-key causal registers of up to three versions.
pub fn multi_causal() -> impl Strategy<Value = MultiKeyCausal<Bytes>> {
    vec((clock(), dependencies(), payload()), 0..3).prop_map(|versions| {
        MultiKeyCausal::from_versions(versions.into_iter().map(|(clock, dependencies, value)| {
            CausalVersion {
                clock,
                dependencies,
                value,
            }
        }))
    })
}

/// Dynamically typed values of every type, with nested maps two levels deep.
pub fn lattice_value() -> impl Strategy<Value = LatticeValue> {
    let leaf = prop_oneof![
        lww().prop_map(LatticeValue::Lww),
        set().prop_map(LatticeValue::Set),
        ordered_set().prop_map(LatticeValue::OrderedSet),
        (-3i64..3).prop_map(|v| LatticeValue::Max(Max(v))),
        (-3i64..3).prop_map(|v| LatticeValue::Min(Min(v))),
        any::<bool>().prop_map(|v| LatticeValue::Bool(BoolLattice(v))),
        counter().prop_map(LatticeValue::Counter),
        priority().prop_map(LatticeValue::Priority),
        single_causal().prop_map(LatticeValue::SingleCausal),
        multi_causal().prop_map(LatticeValue::MultiCausal),
    ];
    leaf.prop_recursive(2, 12, 3, |inner| {
        hash_map(payload(), inner, 0..3)
            .prop_map(|m| LatticeValue::Map(MapLattice(m.into_iter().collect())))
    })
}

/// Store entries: values, tombstones and expiries over a few epochs.
pub fn entry() -> impl Strategy<Value = crate::Entry> {
    (
        prop_oneof![Just(Timestamp::default()), timestamp()],
        proptest::option::of(lattice_value()),
        proptest::option::of((timestamp(), 0u64..3).prop_map(|(t, at)| Lww::new(t, at))),
    )
        .prop_map(|(epoch, value, expiry)| crate::Entry {
            epoch,
            value,
            expiry,
        })
}

/// Maps of counters (a typical nested lattice).
pub fn map_of_counters() -> impl Strategy<Value = MapLattice<Bytes, Counter>> {
    hash_map(payload(), counter(), 0..3).prop_map(|m| MapLattice(m.into_iter().collect()))
}

#[cfg(test)]
mod laws {
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;
    use crate::Lattice;

    /// Checks the laws for one type: associativity, commutativity, idempotence, that the change
    /// flag is exact, that `a ≤ a ⊔ b` (absorption), and that the encoding round-trips.
    macro_rules! laws {
        ($name:ident, $strategy:expr) => {
            mod $name {
                use super::*;

                proptest! {
                    #![proptest_config(ProptestConfig::with_cases(256))]

                    #[test]
                    fn associative(a in $strategy, b in $strategy, c in $strategy) {
                        let left = a.clone().join(b.clone()).join(c.clone());
                        let right = a.join(b.join(c));
                        prop_assert_eq!(left, right);
                    }

                    #[test]
                    fn commutative(a in $strategy, b in $strategy) {
                        prop_assert_eq!(a.clone().join(b.clone()), b.join(a));
                    }

                    #[test]
                    fn idempotent(a in $strategy) {
                        let mut merged = a.clone();
                        prop_assert!(!merged.merge(a.clone()));
                        prop_assert_eq!(merged, a);
                    }

                    #[test]
                    fn change_flag_is_exact_and_join_absorbs(a in $strategy, b in $strategy) {
                        let mut merged = a.clone();
                        let changed = merged.merge(b.clone());
                        prop_assert_eq!(changed, merged != a);
                        // a ≤ a ⊔ b and b ≤ a ⊔ b
                        prop_assert_eq!(merged.clone().join(a), merged.clone());
                        prop_assert_eq!(merged.clone().join(b), merged);
                    }

                    #[test]
                    fn encoding_round_trips(a in $strategy) {
                        let bytes = rmp_serde::to_vec(&a).expect("encode");
                        let decoded = rmp_serde::from_slice(&bytes).expect("decode");
                        prop_assert_eq!(a, decoded);
                    }
                }
            }
        };
    }

    laws!(lww_register, lww());
    laws!(hashed_set, set());
    laws!(ordered_set_lattice, ordered_set());
    laws!(max, (-5i64..5).prop_map(Max));
    laws!(min, (-5i64..5).prop_map(Min));
    laws!(boolean, any::<bool>().prop_map(BoolLattice));
    laws!(pn_counter, counter());
    laws!(priority_lattice, priority());
    laws!(vector_clock, clock());
    laws!(single_key_causal, single_causal());
    laws!(multi_key_causal, multi_causal());
    laws!(map_lattice, map_of_counters());
    laws!(dynamic_value, lattice_value());
    laws!(store_entry, entry());

    /// The bottom element is the identity of merge, for the types that have one.
    macro_rules! bottom_is_identity {
        ($name:ident, $ty:ty, $strategy:expr) => {
            proptest! {
                #[test]
                fn $name(a in $strategy) {
                    prop_assert_eq!(<$ty>::default().join(a.clone()), a.clone());
                    prop_assert_eq!(a.clone().join(<$ty>::default()), a);
                }
            }
        };
    }

    bottom_is_identity!(bottom_set, SetLattice<Bytes>, set());
    bottom_is_identity!(bottom_ordered_set, OrderedSetLattice<Bytes>, ordered_set());
    bottom_is_identity!(
        bottom_bool,
        BoolLattice,
        any::<bool>().prop_map(BoolLattice)
    );
    bottom_is_identity!(bottom_counter, Counter, counter());
    bottom_is_identity!(bottom_clock, VectorClock, clock());
    bottom_is_identity!(
        bottom_single_causal,
        SingleKeyCausal<Bytes>,
        single_causal()
    );
    bottom_is_identity!(bottom_multi_causal, MultiKeyCausal<Bytes>, multi_causal());
    bottom_is_identity!(bottom_map, MapLattice<Bytes, Counter>, map_of_counters());

    /// Applies `updates` to a replica in the order given by `order` (indices into `updates`,
    /// repeats allowed: duplicates model retries and gossip).
    fn replay(updates: &[LatticeValue], order: &[Index]) -> Option<LatticeValue> {
        let mut replica: Option<LatticeValue> = None;
        for i in order {
            let update = updates[i.index(updates.len())].clone();
            match &mut replica {
                Some(value) => {
                    value.merge(update);
                }
                None => replica = Some(update),
            }
        }
        // Every update must be seen at least once: finish with a full pass.
        for update in updates {
            match &mut replica {
                Some(value) => {
                    value.merge(update.clone());
                }
                None => replica = Some(update.clone()),
            }
        }
        replica
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Random updates delivered to three replicas in random orders, with duplicates, then
        /// exchanged pairwise: all three end equal, and equal to the join of all updates.
        #[test]
        fn replicas_converge(
            updates in vec(lattice_value(), 1..8),
            orders in [vec(any::<Index>(), 0..16), vec(any::<Index>(), 0..16), vec(any::<Index>(), 0..16)],
        ) {
            let mut replicas: Vec<LatticeValue> = orders
                .iter()
                .map(|order| replay(&updates, order).expect("at least one update"))
                .collect();
            let expected = updates.iter().cloned().reduce(|a, b| a.join(b)).expect("non-empty");
            // Anti-entropy: each replica merges the others' states.
            let snapshot = replicas.clone();
            for replica in &mut replicas {
                for other in &snapshot {
                    replica.merge(other.clone());
                }
            }
            for replica in &replicas {
                prop_assert_eq!(replica, &expected);
            }
        }
    }
}

/// One edit of a byte string, for [`mutated`].
#[derive(Debug, Clone)]
pub enum Edit {
    /// Flips bit `bit` of the byte at an index.
    Flip(prop::sample::Index, u8),
    /// Writes a byte over the byte at an index.
    Set(prop::sample::Index, u8),
    /// Inserts a byte before an index.
    Insert(prop::sample::Index, u8),
    /// Removes the byte at an index.
    Remove(prop::sample::Index),
    /// Cuts the string at an index.
    Truncate(prop::sample::Index),
    /// Repeats a run of bytes (a length or a count read twice).
    Repeat(prop::sample::Index, u8),
}

/// Up to `max_edits` edits (at least one), for mutating valid encodings: a decoder fed a
/// near-miss of a valid input goes deeper than one fed random bytes.
pub fn edits(max_edits: usize) -> impl Strategy<Value = Vec<Edit>> {
    let index = any::<prop::sample::Index>;
    let edit = prop_oneof![
        (index(), 0u8..8).prop_map(|(at, bit)| Edit::Flip(at, bit)),
        (
            index(),
            prop_oneof![
                Just(0u8),
                Just(0x7f),
                Just(0x80),
                Just(0xc0),
                Just(0xff),
                any::<u8>()
            ]
        )
            .prop_map(|(at, byte)| Edit::Set(at, byte)),
        (index(), any::<u8>()).prop_map(|(at, byte)| Edit::Insert(at, byte)),
        index().prop_map(Edit::Remove),
        index().prop_map(Edit::Truncate),
        (index(), 1u8..16).prop_map(|(at, len)| Edit::Repeat(at, len)),
    ];
    vec(edit, 1..=max_edits.max(1))
}

/// `bytes` with `edits` applied, in order (an edit of an empty string inserts or does
/// nothing).
pub fn mutated(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for edit in edits {
        let len = out.len();
        match edit {
            Edit::Insert(at, byte) => out.insert(at.index(len + 1), *byte),
            _ if len == 0 => {}
            Edit::Flip(at, bit) => out[at.index(len)] ^= 1 << bit,
            Edit::Set(at, byte) => out[at.index(len)] = *byte,
            Edit::Remove(at) => {
                out.remove(at.index(len));
            }
            Edit::Truncate(at) => out.truncate(at.index(len)),
            Edit::Repeat(at, run) => {
                let start = at.index(len);
                let end = (start + usize::from(*run)).min(len);
                let copy = out[start..end].to_vec();
                out.splice(end..end, copy);
            }
        }
    }
    out
}
