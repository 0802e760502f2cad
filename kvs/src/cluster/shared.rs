//! What a node's shards and its cluster agent share: the installed placement, and each
//! shard's cached check of keys against it.
//!
//! [`Shared`] lives as long as the node (one per node, behind an `Arc`); the agent writes a
//! new placement at most once per view change, and shards read it through a
//! [`ReplicaCheck`] that costs one atomic load per batch until the generation moves.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use squall_proto::KeyError;

use crate::placement::Placement;

/// What a node's shards and its agent share: the node's id, its current placement, counters.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The node's id (its shard 0 endpoint).
    pub(crate) id: String,
    placement: RwLock<Option<Arc<Placement>>>,
    generation: AtomicU64,
    /// Keys held, per shard, as of each shard's last batch.
    pub(crate) keys: Vec<AtomicU64>,
    /// Requests served, over all shards.
    pub(crate) requests: AtomicU64,
}

impl Shared {
    pub(crate) fn new(id: String, shards: usize) -> Self {
        Self {
            id,
            placement: RwLock::new(None),
            generation: AtomicU64::new(0),
            keys: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            requests: AtomicU64::new(0),
        }
    }

    /// The generation of the installed view (0: none yet).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The installed placement.
    pub(crate) fn placement(&self) -> Option<Arc<Placement>> {
        self.placement
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Installs `placement`; shards pick it up at their next batch.
    pub(super) fn install(&self, placement: Arc<Placement>) {
        let generation = placement.generation();
        *self
            .placement
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(placement);
        self.generation.store(generation, Ordering::Release);
    }

    /// Keys held over all shards, as of their last batches.
    pub(super) fn held(&self) -> u64 {
        self.keys.iter().map(|k| k.load(Ordering::Acquire)).sum()
    }
}

/// A shard's check of keys against the node's placement. Cached per shard and refreshed when
/// the generation moves, so the check costs an atomic load and a ring lookup.
#[derive(Debug, Default)]
pub(crate) struct ReplicaCheck {
    placement: Option<Arc<Placement>>,
    generation: u64,
    me: Option<usize>,
    scratch: Vec<usize>,
}

impl ReplicaCheck {
    /// Picks up a newer view, if the agent installed one.
    pub(crate) fn refresh(&mut self, shared: &Shared) {
        let generation = shared.generation();
        if generation != self.generation {
            self.placement = shared.placement();
            self.generation = generation;
            self.me = self.placement.as_ref().and_then(|p| p.index_of(&shared.id));
        }
    }

    /// The generation of the view in use (0: none).
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// The error for a key asked of this node under another view.
    pub(crate) fn wrong(&self) -> KeyError {
        KeyError::WrongNode {
            generation: self.generation,
        }
    }

    /// `Ok` if this node is one of `key`'s replicas, or has no view yet (it is in no view, so
    /// no client routes to it but those given its address).
    pub(crate) fn check(&mut self, key: &str) -> Result<(), KeyError> {
        let Some(placement) = &self.placement else {
            return Ok(());
        };
        let wrong = KeyError::WrongNode {
            generation: self.generation,
        };
        let Some(me) = self.me else {
            return Err(wrong);
        };
        placement.replicas(key, &mut self.scratch);
        if self.scratch.contains(&me) {
            Ok(())
        } else {
            Err(wrong)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::view;

    #[test]
    fn a_shard_refuses_keys_it_is_not_a_replica_of() {
        let shared = Shared::new("a".into(), 2);
        let mut check = ReplicaCheck::default();
        check.refresh(&shared);
        assert!(check.check("anything").is_ok(), "no view yet: serve");
        let placement = Arc::new(Placement::new(view(&["a", "b", "c"], 1)));
        shared.install(placement.clone());
        check.refresh(&shared);
        let mut out = Vec::new();
        let (mut mine, mut theirs) = (0, 0);
        for i in 0..300 {
            let key = format!("k{i}");
            placement.replicas(&key, &mut out);
            match check.check(&key) {
                Ok(()) => {
                    assert_eq!(out, [0]);
                    mine += 1;
                }
                Err(KeyError::WrongNode { generation: 1 }) => {
                    assert_ne!(out, [0]);
                    theirs += 1;
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert!(mine > 50 && theirs > 100, "{mine} {theirs}");
    }

    #[test]
    fn overrides_change_a_keys_replication() {
        let placement = Placement::new(view(&["a", "b", "c"], 2));
        let mut out = Vec::new();
        placement.replicas("cold", &mut out);
        assert_eq!(out.len(), 2);
        placement.replicas("hot", &mut out);
        assert_eq!(out.len(), 3);
    }

    #[test]
    fn views_from_the_network_are_checked() {
        let mut bad = view(&["a"], 2);
        bad.replication = 0;
        assert!(Placement::check(&bad).is_err());
        let mut bad = view(&["a"], 2);
        bad.members[0].shards.clear();
        assert!(Placement::check(&bad).is_err());
        assert!(Placement::check(&view(&["a", "b"], 2)).is_ok());
    }
}
