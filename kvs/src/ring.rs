//! The consistent-hash ring that assigns keys to shards.
//!
//! Each shard owns `virtual_nodes` points on a 64-bit ring; a key belongs to the shard of the
//! first point at or after the key's hash. Clients and nodes build the ring from the same
//! parameters and the same hash (xxh3, stable across processes and releases), so both agree on
//! every key's owner without asking. Anna uses the same scheme, for nodes (global ring) and for
//! threads within a node (local ring); this is the local one.

use xxhash_rust::xxh3::xxh3_64;

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

#[cfg(test)]
mod tests {
    use super::*;

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
