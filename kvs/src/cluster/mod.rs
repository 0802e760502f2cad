//! A storage node's part in a cluster: where keys live, and the agent that keeps them there.
//!
//! A cluster is a [`crate::router::Router`] and storage nodes that join it. The router
//! holds the membership: every node sends it a heartbeat (a
//! [`squall_proto::Request::Join`]) every [`ClusterConfig::heartbeat_ms`] and gets the
//! current [`squall_proto::ClusterView`] back; a node silent for longer than the router's
//! `dead_after` is dropped from the view. Every view has a larger generation than the one
//! before it, so nodes and clients always know which of two is newer.
//!
//! [`crate::placement::Placement`] turns a view into key -> replicas. Shards check every key
//! against it: a node asked for a key it is not a replica of answers
//! [`squall_proto::KeyError::WrongNode`], so a client with an old view refreshes it instead
//! of reading from the wrong place.
//!
//! The agent (`Agent`) is one thread per node, with a heartbeat thread beside it (so that a
//! slow hand-off never delays a heartbeat). Its parts, each a module that depends only on
//! the ones listed before it:
//! - `shared`: what the node's shards and the agent share (the installed placement, and each
//!   shard's cached check of keys against it);
//! - `peers`: the agent's connections to other nodes and the router;
//! - `heartbeat`: the heartbeat thread, which brings back the router's newest view;
//! - `load`: the load reports, every [`ClusterConfig::stats_ms`];
//! - `handoff`: after every view change, every key to the replicas the new view gives it;
//! - `gossip`: every [`ClusterConfig::gossip_ms`], the keys changed since the last round to
//!   their other replicas, which repairs writes that reached only some replicas.
//!
//! This module holds the agent's loop, which only decides when each part runs.
//!
//! Dropping a handed-off key writes nothing to the node's log: after a restart the key may come
//! back from the log, and is handed off again. Merges make that harmless.

mod gossip;
mod handoff;
mod heartbeat;
mod load;
mod peers;
mod shared;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;
use squall_proto::Member;

use gossip::Gossip;
use handoff::Handoffs;
use heartbeat::{beat_until_stopped, final_beat, Beat};
use load::report_load;
use peers::Peers;
pub(crate) use shared::{ReplicaCheck, Shared};

/// How a node takes part in a cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// The router's endpoint, such as `tcp://127.0.0.1:7000`.
    pub router: String,
    /// Milliseconds between heartbeats (default 250). The router's `dead_after` should be
    /// several of these.
    pub heartbeat_ms: u64,
    /// Milliseconds between gossip rounds (default 1000; Anna's is 10 s). Writes reach every
    /// replica directly; gossip repairs the ones that did not.
    pub gossip_ms: u64,
    /// Milliseconds between load reports (default 5000; Anna's is 15 s), written to the store
    /// under `squall/load/<node>` for the policy engine.
    pub stats_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            router: String::new(),
            heartbeat_ms: 250,
            gossip_ms: 1000,
            stats_ms: 5000,
        }
    }
}

/// The node's cluster thread (see the module docs).
pub(crate) struct Agent {
    pub(crate) config: ClusterConfig,
    pub(crate) shared: Arc<Shared>,
    pub(crate) member: Member,
    pub(crate) stop: Arc<AtomicBool>,
    /// Set by [`crate::Node::leave`]: leave the view, hand everything off, then set `left`.
    pub(crate) leave: Arc<AtomicBool>,
    pub(crate) left: Arc<AtomicBool>,
    /// The writer id of the load reports.
    pub(crate) writer: squall_lattices::WriterId,
    /// What its connections to the router and the other nodes present.
    pub(crate) secret: Option<squall_proto::secret::ClusterSecret>,
}

impl Agent {
    pub(crate) fn run(self) {
        let heartbeat = Duration::from_millis(self.config.heartbeat_ms.max(10));
        let gossip_every = Duration::from_millis(self.config.gossip_ms.max(10));
        let stats = Duration::from_millis(self.config.stats_ms.max(10));
        let beat = Arc::new(Beat::default());
        let heart = {
            let (beat, shared, member, stop) = (
                beat.clone(),
                self.shared.clone(),
                self.member.clone(),
                self.stop.clone(),
            );
            let router = self.config.router.clone();
            let peers = Peers::new(self.secret.clone());
            std::thread::Builder::new()
                .name("squall-heartbeat".into())
                .spawn(move || {
                    beat_until_stopped(&router, heartbeat, &beat, &shared, &member, &stop, peers)
                })
        };
        let heart = match heart {
            Ok(heart) => heart,
            Err(e) => {
                tracing::error!(cause = %e, "could not start the heartbeat thread");
                return;
            }
        };
        let mut peers = Peers::new(self.secret.clone());
        let mut handoffs = Handoffs::default();
        let mut gossip = Gossip::new(self.member.shards.len());
        let (shared, member) = (&*self.shared, &self.member);
        let mut next_gossip = Instant::now() + gossip_every;
        let mut next_stats = Instant::now() + stats;
        let mut next_leave_try = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if self.leave.load(Ordering::Relaxed) && !handoffs.leaving {
                handoffs.leaving = true;
                beat.leaving.store(true, Ordering::Relaxed);
            }
            if handoffs.leaving && !handoffs.left_view && Instant::now() >= next_leave_try {
                next_leave_try = Instant::now() + heartbeat;
                handoffs.leave_view(shared, member, &self.config.router, &mut peers, &beat);
            }
            if let Some(view) = beat.take_view() {
                handoffs.adopt(shared, member, &beat, view);
            }
            if Instant::now() >= next_stats && !handoffs.leaving {
                next_stats = Instant::now() + stats;
                report_load(shared, member, self.writer, &mut peers, &beat);
            }
            if handoffs.busy() {
                if let Err(e) = handoffs.page(shared, member, &mut peers, &beat) {
                    tracing::warn!(cause = %e, "hand-off page failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if Instant::now() >= next_gossip || handoffs.leaving {
                next_gossip = Instant::now() + gossip_every;
                gossip.round(shared, member, &mut peers);
                // Out of the view, and every key handed off (or none held at all, with no
                // view to have been routed to).
                let handed_off = handoffs.left_view && gossip.drained();
                let never_placed = shared.placement().is_none() && shared.held() == 0;
                if handoffs.leaving && (handed_off || never_placed) {
                    // One last report, so the router counts this hand-off as finished at
                    // once rather than after the node's silence.
                    final_beat(&self.config.router, &mut peers, &beat, shared, member);
                    self.left.store(true, Ordering::Release);
                    break;
                }
            }
            let pause = next_gossip.saturating_duration_since(Instant::now());
            std::thread::sleep(pause.min(Duration::from_millis(20)));
        }
        self.stop.store(true, Ordering::Relaxed);
        if heart.join().is_err() {
            tracing::error!("the heartbeat thread panicked");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use squall_proto::{ClusterView, Member};

    /// A view of `members`, each with two shards, one key (`hot`) replicated three times.
    pub(in crate::cluster) fn view(members: &[&str], replication: u32) -> ClusterView {
        ClusterView {
            generation: 1,
            previous: 0,
            members: members
                .iter()
                .map(|id| Member {
                    id: id.to_string(),
                    incarnation: 1,
                    shards: vec![format!("{id}/0"), format!("{id}/1")],
                    virtual_nodes: 16,
                })
                .collect(),
            replication,
            overrides: vec![("hot".to_string(), 3)],
            settled: false,
        }
    }
}
