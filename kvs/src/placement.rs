//! Where keys live in a cluster: [`Placement`] turns a [`ClusterView`] into key -> replicas.
//!
//! The global ring of nodes ([`GlobalRing`]) gives each key its first `replication` nodes
//! (per-key overrides for hot keys), and each node's local ring gives the shard within the
//! node. Clients compute replicas with it, shards check every key against it (a node asked for
//! a key it is not a replica of answers `WrongNode`), and the router checks views with it.
//!
//! A placement is built once per view (rings for every member: a few kilobytes per node) and
//! shared behind an `Arc` until the next view replaces it.

use hashbrown::HashMap;
use squall_proto::keys::MAX_KEY_BYTES;
use squall_proto::{ClusterView, Key, Member};

use crate::ring::{GlobalRing, Ring};
use crate::{Error, Result};

/// Points per node on the global ring. Anna uses 3000 per thread; 128 per node spreads keys
/// within a few percent for the clusters one machine or a small fleet runs, and keeps the
/// ring a client builds for every view small.
pub const GLOBAL_VIRTUAL_NODES: u32 = 128;

/// The most replicas a key may have.
pub const MAX_REPLICATION: u32 = 64;
/// The most keys with their own replication: the view travels with every heartbeat.
pub const MAX_OVERRIDES: usize = 10_000;
/// The most storage nodes in a cluster.
pub const MAX_MEMBERS: usize = 4096;

/// Key -> replicas under one view.
#[derive(Debug)]
pub struct Placement {
    view: ClusterView,
    ring: GlobalRing,
    overrides: HashMap<Key, u32>,
    rings: Vec<Ring>,
}

impl Placement {
    /// The placement of `view`.
    pub fn new(view: ClusterView) -> Self {
        let ids: Vec<&str> = view.members.iter().map(|m| m.id.as_str()).collect();
        let ring = GlobalRing::new(&ids, GLOBAL_VIRTUAL_NODES);
        let overrides = view.overrides.iter().cloned().collect();
        let rings = view
            .members
            .iter()
            .map(|m| Ring::new(m.shards.len().max(1), m.virtual_nodes.max(1)))
            .collect();
        Self {
            view,
            ring,
            overrides,
            rings,
        }
    }

    /// The view this placement was built from.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }

    /// The view's generation.
    pub fn generation(&self) -> u64 {
        self.view.generation
    }

    /// The members, in the view's order.
    pub fn members(&self) -> &[Member] {
        &self.view.members
    }

    /// The index of member `id`, if it is in the view.
    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.view.members.iter().position(|m| m.id == id)
    }

    /// Whether `key` has a replication of its own (a hot key).
    pub fn has_override(&self, key: &str) -> bool {
        self.overrides.contains_key(key)
    }

    /// Whether every member finished handing off under this view.
    pub fn settled(&self) -> bool {
        self.view.settled
    }

    /// How many replicas `key` has.
    pub fn replication(&self, key: &str) -> usize {
        self.overrides
            .get(key)
            .copied()
            .unwrap_or(self.view.replication)
            .max(1) as usize
    }

    /// Fills `out` with the member indices of `key`'s replicas, the primary first.
    pub fn replicas(&self, key: &str, out: &mut Vec<usize>) {
        self.ring.replicas(key, self.replication(key), out);
    }

    /// The endpoint of the shard of member `member` that holds `key`.
    pub fn shard_endpoint(&self, member: usize, key: &str) -> &str {
        let shard = self.rings[member].owner(key) as usize;
        &self.view.members[member].shards[shard]
    }

    /// Checks that a view from the network is usable: members with shards, and sane numbers.
    pub fn check(view: &ClusterView) -> Result<()> {
        let bad = |what: String| Err(Error::UnexpectedResponse(format!("bad view: {what}")));
        if view.members.len() > MAX_MEMBERS {
            return bad(format!("{} members", view.members.len()));
        }
        if view.overrides.len() > MAX_OVERRIDES {
            return bad(format!(
                "{} keys with their own replication",
                view.overrides.len()
            ));
        }
        if let Some((key, replicas)) = view
            .overrides
            .iter()
            .find(|(k, r)| k.len() > MAX_KEY_BYTES || *r == 0 || *r > MAX_REPLICATION)
        {
            return bad(format!(
                "{replicas} replicas for a key of {} bytes",
                key.len()
            ));
        }
        if view.replication == 0 || view.replication > 64 {
            return bad(format!("replication {}", view.replication));
        }
        for member in &view.members {
            if member.shards.is_empty() || member.shards.len() > 4096 {
                return bad(format!("{} has {} shards", member.id, member.shards.len()));
            }
            if member.virtual_nodes == 0 || member.virtual_nodes > 65_536 {
                return bad(format!(
                    "{} has {} virtual nodes",
                    member.id, member.virtual_nodes
                ));
            }
        }
        Ok(())
    }
}
