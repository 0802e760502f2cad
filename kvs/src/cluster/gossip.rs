//! Gossip: every `gossip_ms` the agent sends the keys changed since the last round to their
//! other replicas, which repairs writes that reached only some of them.
//!
//! Changes that could not reach a replica are kept, per shard, for the next round, up to
//! [`MAX_RETRY`] entries each; one [`Gossip`] per agent holds them for the agent's lifetime.

use squall_lattices::Entry;
use squall_proto::{Key, Member, Request, Response};

use super::handoff::{distribute, PAGE};
use super::peers::Peers;
use super::shared::Shared;

/// Entries kept (per shard) for a later gossip round when their replicas could not be
/// reached. Beyond this, the oldest are dropped with a warning: the next membership change
/// hands every key off, but until then those replicas may miss these writes.
const MAX_RETRY: usize = 100_000;

/// About the most bytes of entries in one gossip page.
const PAGE_BYTES: usize = 4 << 20;

/// The changes waiting for their replicas, per local shard.
pub(super) struct Gossip {
    retry: Vec<Vec<(Key, Entry)>>,
}

impl Gossip {
    pub(super) fn new(shards: usize) -> Self {
        Self {
            retry: vec![Vec::new(); shards],
        }
    }

    /// No change waits for a replica.
    pub(super) fn drained(&self) -> bool {
        self.retry.iter().all(Vec::is_empty)
    }

    /// Sends the keys changed since the last round (and those a failed round kept) to their
    /// other replicas.
    pub(super) fn round(&mut self, shared: &Shared, member: &Member, peers: &mut Peers) {
        let Some(placement) = shared.placement() else {
            return;
        };
        for (shard, endpoint) in member.shards.iter().enumerate() {
            let mut entries = std::mem::take(&mut self.retry[shard]);
            loop {
                let (taken, more) = match peers.call_one(endpoint, Request::Changed { limit: PAGE })
                {
                    Ok(Response::Entries { entries, more }) => (entries, more),
                    Ok(other) => {
                        tracing::warn!(answer = other.kind(), "unexpected answer to Changed");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, "could not read the changed keys");
                        break;
                    }
                };
                entries.extend(taken);
                if !more || entries.len() >= MAX_RETRY {
                    break;
                }
            }
            for page in pages(entries) {
                match distribute(&member.id, peers, &placement, endpoint, page.clone()) {
                    Ok(done) if done.complete => {}
                    Ok(_) => self.retry[shard].extend(page),
                    Err(e) => {
                        tracing::debug!(cause = %e, "gossip failed; kept for the next round");
                        self.retry[shard].extend(page);
                    }
                }
            }
            if self.retry[shard].len() > MAX_RETRY {
                let excess = self.retry[shard].len() - MAX_RETRY;
                tracing::warn!(dropped = excess, "too many changes wait for unreachable replicas; the next membership change hands them off");
                self.retry[shard].drain(..excess);
            }
        }
    }
}

/// `entries` in pages of at most `PAGE` entries and about `PAGE_BYTES` (a larger value
/// alone), so that no page nears a node's request size limit.
fn pages(entries: Vec<(Key, Entry)>) -> Vec<Vec<(Key, Entry)>> {
    let mut pages: Vec<Vec<(Key, Entry)>> = Vec::new();
    let mut bytes = 0;
    for (key, value) in entries {
        let size = key.len() + rmp_serde::encode::to_vec(&value).map_or(0, |v| v.len());
        match pages.last_mut() {
            Some(page) if page.len() < PAGE as usize && bytes + size <= PAGE_BYTES => {
                bytes += size;
                page.push((key, value));
            }
            _ => {
                bytes = size;
                pages.push(vec![(key, value)]);
            }
        }
    }
    pages
}
