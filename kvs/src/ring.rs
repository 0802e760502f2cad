//! The consistent-hash ring that assigns keys to shards.
//!
//! Each shard owns `virtual_nodes` points on a 64-bit ring; a key belongs to the shard of the
//! first point at or after the key's hash. Clients and nodes build the ring from the same
//! parameters and the same hash (xxh3, stable across processes and releases), so both agree on
//! every key's owner without asking. Anna uses the same scheme, for nodes (global ring) and for
//! threads within a node (local ring): [`Ring`] is the local one, [`GlobalRing`] the global one.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Seed of the global ring's hashes, so that a key's place among nodes is independent of its
/// place among a node's shards.
const GLOBAL_SEED: u64 = 0x5371_7561_6c6c_0001;

/// A ring of shards. Built once per layout; lookups are a binary search. Cheap to share
/// behind an `Arc`, immutable.
#[derive(Debug, Clone)]
pub struct Ring {
    points: Vec<(u64, u32)>,
    shards: usize,
}

impl Ring {
    /// A ring of `shards` shards with `virtual_nodes` points each.
    pub fn new(shards: usize, virtual_nodes: u32) -> Self {
        let mut points = Vec::with_capacity(shards * virtual_nodes as usize);
        for shard in 0..shards as u32 {
            for vnode in 0..virtual_nodes {
                let mut label = [0u8; 8];
                label[..4].copy_from_slice(&shard.to_le_bytes());
                label[4..].copy_from_slice(&vnode.to_le_bytes());
                points.push((xxh3_64(&label), shard));
            }
        }
        points.sort_unstable();
        Self { points, shards }
    }

    /// How many shards the ring spans.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The shard that owns `key`.
    pub fn owner(&self, key: &str) -> u32 {
        let hash = xxh3_64(key.as_bytes());
        let index = self.points.partition_point(|(point, _)| *point < hash);
        self.points
            .get(index)
            .or_else(|| self.points.first())
            .map(|(_, shard)| *shard)
            .unwrap_or(0)
    }
}

/// The ring of a cluster's nodes. A key's replicas are the first `n` distinct nodes at or
/// after the key's hash: adding or removing one node changes at most one replica of a key.
#[derive(Debug, Clone)]
pub struct GlobalRing {
    points: Vec<(u64, u32)>,
    members: usize,
}

impl GlobalRing {
    /// A ring of the nodes named `ids`, with `virtual_nodes` points each. Member `i` of the
    /// result is `ids[i]`.
    pub fn new<S: AsRef<str>>(ids: &[S], virtual_nodes: u32) -> Self {
        let mut points = Vec::with_capacity(ids.len() * virtual_nodes as usize);
        for (member, id) in ids.iter().enumerate() {
            let id = id.as_ref().as_bytes();
            let mut label = Vec::with_capacity(id.len() + 4);
            for vnode in 0..virtual_nodes {
                label.clear();
                label.extend_from_slice(id);
                label.extend_from_slice(&vnode.to_le_bytes());
                points.push((xxh3_64_with_seed(&label, GLOBAL_SEED), member as u32));
            }
        }
        points.sort_unstable();
        Self {
            points,
            members: ids.len(),
        }
    }

    /// How many nodes the ring spans.
    pub fn members(&self) -> usize {
        self.members
    }

    /// Fills `out` with the indices of `key`'s first `n` replicas (fewer if the ring has fewer
    /// nodes), the primary first.
    pub fn replicas(&self, key: &str, n: usize, out: &mut Vec<usize>) {
        out.clear();
        let n = n.min(self.members);
        if n == 0 || self.points.is_empty() {
            return;
        }
        let hash = xxh3_64_with_seed(key.as_bytes(), GLOBAL_SEED);
        let start = self.points.partition_point(|(point, _)| *point < hash);
        for step in 0..self.points.len() {
            let (_, member) = self.points[(start + step) % self.points.len()];
            let member = member as usize;
            if !out.contains(&member) {
                out.push(member);
                if out.len() == n {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replicas(ring: &GlobalRing, ids: &[&str], key: &str, n: usize) -> Vec<String> {
        let mut out = Vec::new();
        ring.replicas(key, n, &mut out);
        out.into_iter().map(|i| ids[i].to_string()).collect()
    }

    #[test]
    fn replicas_are_distinct_and_spread() {
        let ids = ["a", "b", "c"];
        let ring = GlobalRing::new(&ids, 64);
        let mut primaries = [0usize; 3];
        for i in 0..30_000 {
            let key = format!("key-{i}");
            let found = replicas(&ring, &ids, &key, 2);
            assert_eq!(found.len(), 2);
            assert_ne!(found[0], found[1]);
            primaries[ids.iter().position(|id| *id == found[0]).unwrap()] += 1;
        }
        for count in primaries {
            assert!((7_000..13_000).contains(&count), "{primaries:?}");
        }
        assert_eq!(replicas(&ring, &ids, "k", 5).len(), 3);
    }

    #[test]
    fn a_joining_node_changes_at_most_one_replica_of_a_key() {
        let before_ids = ["a", "b", "c"];
        let after_ids = ["a", "b", "c", "d"];
        let before = GlobalRing::new(&before_ids, 64);
        let after = GlobalRing::new(&after_ids, 64);
        let mut moved = 0;
        for i in 0..10_000 {
            let key = format!("k{i}");
            let old = replicas(&before, &before_ids, &key, 2);
            let new = replicas(&after, &after_ids, &key, 2);
            let kept = new.iter().filter(|id| old.contains(id)).count();
            assert!(kept >= 1, "{key}: {old:?} -> {new:?}");
            if kept == 1 {
                assert!(new.contains(&"d".to_string()));
                moved += 1;
            }
        }
        // About half the keys (2 of 4 replica places) gain the new node.
        assert!((3_000..7_000).contains(&moved), "{moved}");
    }

    #[test]
    fn spreads_keys_evenly_enough() {
        let ring = Ring::new(4, 512);
        let mut counts = [0usize; 4];
        for i in 0..40_000 {
            counts[ring.owner(&format!("key-{i}")) as usize] += 1;
        }
        for count in counts {
            assert!((8_000..12_000).contains(&count), "{counts:?}");
        }
    }

    #[test]
    fn adding_a_shard_moves_only_a_fraction_of_keys() {
        let before = Ring::new(4, 512);
        let after = Ring::new(5, 512);
        let moved = (0..10_000)
            .filter(|i| {
                let key = format!("k{i}");
                before.owner(&key) != after.owner(&key)
            })
            .count();
        // Ideally 1/5 of the keys move; all of them would with modulo hashing.
        assert!(moved < 3_000, "{moved} keys moved");
    }

    #[test]
    fn one_shard_owns_everything() {
        let ring = Ring::new(1, 1);
        assert_eq!(ring.owner(""), 0);
        assert_eq!(ring.owner("anything"), 0);
    }
}
