//! Hand-off: after every view change, each key goes to the replicas the new view gives it.
//!
//! The agent scans its shards a page at a time, sends each key to its other replicas under
//! the new view (a lattice merge there, so sending a key a replica already has changes
//! nothing), and drops the keys the node is no longer a replica of once their replicas
//! acknowledged them. This is how a joining node receives its keys, a leaving one hands its
//! keys over, and a dead node's keys get their missing copies from the survivors. What moves
//! is decided by [`moves`], pure and tested without a socket.
//!
//! One [`Handoffs`] per agent, living as long as it; a job holds the new placement (an `Arc`
//! shared with the shards) and a scan position, so a page costs one scan and one request per
//! replica endpoint.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use hashbrown::HashMap;
use squall_lattices::Entry;
use squall_proto::{ClusterView, Key, KeyError, Member, Request, Response};

use super::heartbeat::Beat;
use super::peers::{routed, Peers};
use super::shared::Shared;
use crate::placement::Placement;
use crate::{Error, Result};

/// Entries per hand-off or gossip request: bounded so one page never nears a node's request
/// size limit for small values, and so heartbeats go out between pages.
pub(super) const PAGE: u32 = 256;

/// Keys named in one restricted scan (a shard refuses requests over its key limit).
const ONLY_PAGE: usize = 1000;

/// What a new view makes the node hand off.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Moves {
    /// Nothing: only the settled flag changed.
    Nothing,
    /// Only these keys: their replication changed, nothing else did.
    Only(Vec<Key>),
    /// Every key the node holds.
    All,
}

/// What `view` moves, given the placement held before it and whether a hand-off under that
/// one is unfinished. Only the view right after the one held, with the same members and
/// replication, moves less than everything; an unfinished hand-off always starts over.
pub(super) fn moves(previous: Option<&Placement>, unfinished: bool, view: &ClusterView) -> Moves {
    match previous {
        Some(previous)
            if !unfinished
                && view.previous == previous.generation()
                && previous.members() == view.members.as_slice()
                && previous.view().replication == view.replication =>
        {
            let keys = changed_overrides(&previous.view().overrides, &view.overrides);
            if keys.is_empty() {
                Moves::Nothing
            } else {
                Moves::Only(keys)
            }
        }
        _ => Moves::All,
    }
}

/// Hand-off under one view, one page at a time.
struct Handoff {
    placement: Arc<Placement>,
    /// Only these keys (the view changed only their replication); `None`: every key.
    only: Option<Vec<Key>>,
    shard: usize,
    after: Option<Key>,
    /// Where in `only` the next page starts.
    only_from: usize,
    moved: u64,
    dropped: u64,
    started: Instant,
}

/// The agent's hand-offs: the one under way, and where the node is in leaving.
#[derive(Default)]
pub(super) struct Handoffs {
    job: Option<Handoff>,
    /// The node leaves the cluster.
    pub(super) leaving: bool,
    /// A view without this node was adopted after the leave.
    pub(super) left_view: bool,
}

/// What one [`distribute`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Distributed {
    /// Copies sent to other replicas.
    pub(super) copies: u64,
    /// Keys dropped from the local shard.
    pub(super) dropped: u64,
    /// Every replica took its copy (`false`: one has not installed the view yet).
    pub(super) complete: bool,
}

impl Handoffs {
    /// A hand-off is under way.
    pub(super) fn busy(&self) -> bool {
        self.job.is_some()
    }

    /// Installs `view` if it is newer than the node's, and starts handing off under it.
    pub(super) fn adopt(
        &mut self,
        shared: &Shared,
        member: &Member,
        beat: &Beat,
        view: ClusterView,
    ) {
        if view.generation <= shared.generation() {
            return;
        }
        if let Err(e) = Placement::check(&view) {
            tracing::warn!(cause = %e, "ignored a view");
            return;
        }
        tracing::info!(
            generation = view.generation,
            members = view.members.len(),
            member = view.members.iter().position(|m| m.id == member.id),
            "new cluster view"
        );
        if self.leaving {
            self.left_view = !view.members.iter().any(|m| m.id == member.id);
        }
        let previous = shared.placement();
        let moves = moves(previous.as_deref(), self.job.is_some(), &view);
        let placement = Arc::new(Placement::new(view));
        shared.install(placement.clone());
        let only = match moves {
            Moves::Nothing => {
                beat.synced.store(placement.generation(), Ordering::Release);
                self.job = None;
                return;
            }
            Moves::Only(keys) => Some(keys),
            Moves::All => None,
        };
        self.job = Some(Handoff {
            placement,
            only,
            shard: 0,
            after: None,
            only_from: 0,
            moved: 0,
            dropped: 0,
            started: Instant::now(),
        });
    }

    /// Tells the router this node leaves, and adopts the view without it (or, if the router
    /// does not answer, the node's own view without itself).
    pub(super) fn leave_view(
        &mut self,
        shared: &Shared,
        member: &Member,
        router: &str,
        peers: &mut Peers,
        beat: &Beat,
    ) {
        let request = Request::Leave {
            id: member.id.clone(),
        };
        let view = match peers.call_one(router, request) {
            Ok(Response::View(view)) => Some(view),
            Ok(Response::Error(e)) => {
                tracing::warn!(cause = %e, "the router refused the leave; trying again");
                return;
            }
            Ok(other) => {
                tracing::warn!(answer = other.kind(), "unexpected answer to a leave");
                None
            }
            Err(e) => {
                tracing::warn!(cause = %e, "the router did not hear the leave");
                None
            }
        };
        let view = view.or_else(|| {
            shared.placement().map(|p| {
                let mut view = p.view().clone();
                view.members.retain(|m| m.id != member.id);
                view.previous = view.generation;
                view.generation += 1;
                view.settled = false;
                view
            })
        });
        match view {
            Some(view) if !view.members.is_empty() => self.adopt(shared, member, beat, view),
            _ => tracing::warn!("no other member to hand keys to yet"),
        }
    }

    /// Scans one page of one shard and hands it off; finishes the hand-off after the last.
    pub(super) fn page(
        &mut self,
        shared: &Shared,
        member: &Member,
        peers: &mut Peers,
        beat: &Beat,
    ) -> Result<()> {
        let Some(job) = self.job.as_mut() else {
            return Ok(());
        };
        if job.placement.generation() != shared.generation() {
            // A newer view arrived; `adopt` replaced the job already.
            return Ok(());
        }
        let endpoint = member.shards[job.shard].clone();
        let only: Vec<Key> = job
            .only
            .as_ref()
            .map(|keys| {
                keys.iter()
                    .skip(job.only_from)
                    .take(ONLY_PAGE)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        let request = Request::Scan {
            after: job.after.clone(),
            limit: PAGE,
            only: only.clone(),
        };
        let (entries, more) = match peers.call_one(&endpoint, request)? {
            Response::Entries { entries, more } => (entries, more),
            other => {
                return Err(Error::UnexpectedResponse(format!(
                    "a scan answered {}",
                    other.kind()
                )))
            }
        };
        let last = entries.last().map(|(k, _)| k.clone());
        let done = distribute(&member.id, peers, &job.placement, &endpoint, entries)?;
        if !done.complete {
            return Err(Error::UnexpectedResponse(
                "a replica has not installed the view yet".into(),
            ));
        }
        job.moved += done.copies;
        job.dropped += done.dropped;
        match &job.only {
            Some(keys) => {
                // A scan cut short by its byte cap covered the named keys up to its last.
                job.only_from += match (more, &last) {
                    (true, Some(last)) => only.iter().position(|k| k == last).map_or(1, |i| i + 1),
                    _ => only.len(),
                };
                if job.only_from < keys.len() {
                    return Ok(());
                }
                job.only_from = 0;
            }
            None if more => {
                job.after = last;
                return Ok(());
            }
            None => {}
        }
        job.shard += 1;
        job.after = None;
        if job.shard < member.shards.len() {
            return Ok(());
        }
        tracing::info!(
            generation = job.placement.generation(),
            sent = job.moved,
            dropped = job.dropped,
            took = ?job.started.elapsed(),
            "hand-off finished"
        );
        beat.synced
            .store(job.placement.generation(), Ordering::Release);
        self.job = None;
        Ok(())
    }
}

/// Sends `entries` (all held by the local shard at `endpoint`) to their other replicas as
/// exact merges (tombstones and expiries included, so a delete moves like a write),
/// then drops from that shard the ones this node (`me`) is not a replica of. A replica that
/// has not yet installed this view answers `WrongNode`: its key is kept here, and the result
/// says the caller should try again.
pub(super) fn distribute(
    me: &str,
    peers: &mut Peers,
    placement: &Placement,
    endpoint: &str,
    entries: Vec<(Key, Entry)>,
) -> Result<Distributed> {
    let me = placement.index_of(me);
    let mut by_endpoint: HashMap<String, Vec<(Key, Entry)>> = HashMap::new();
    let mut drops = Vec::new();
    let mut replicas = Vec::new();
    let mut done = Distributed {
        complete: true,
        ..Distributed::default()
    };
    for (key, value) in entries {
        placement.replicas(&key, &mut replicas);
        for &replica in &replicas {
            if Some(replica) != me {
                by_endpoint
                    .entry(placement.shard_endpoint(replica, &key).to_string())
                    .or_default()
                    .push((key.clone(), value.clone()));
                done.copies += 1;
            }
        }
        if me.is_none_or(|me| !replicas.contains(&me)) && !replicas.is_empty() {
            drops.push((key, value));
        }
    }
    let mut kept: Vec<Key> = Vec::new();
    if !by_endpoint.is_empty() {
        let (sent, requests): (Vec<Vec<Key>>, Vec<(String, Request)>) = by_endpoint
            .into_iter()
            .map(|(endpoint, entries)| {
                let keys = entries.iter().map(|(k, _)| k.clone()).collect();
                let request = routed(placement.generation(), Request::Copy { entries });
                (keys, (endpoint, request))
            })
            .unzip();
        for (response, keys) in peers.call(requests)?.into_iter().zip(sent) {
            match response {
                Response::Put(results) => {
                    for (result, key) in results.into_iter().zip(keys) {
                        match result {
                            Ok(()) => {}
                            Err(KeyError::WrongNode { .. }) => {
                                done.complete = false;
                                kept.push(key);
                            }
                            Err(e) => {
                                // A replica that refuses the value (another lattice type)
                                // keeps its own; this node keeps its copy too.
                                tracing::warn!(key = %key, cause = %e, "a replica refused a handed-off key");
                                kept.push(key);
                            }
                        }
                    }
                }
                Response::Error(e) => return Err(Error::Request(e)),
                other => {
                    return Err(Error::UnexpectedResponse(format!(
                        "a hand-off answered {}",
                        other.kind()
                    )))
                }
            }
        }
    }
    drops.retain(|(key, _)| !kept.contains(key));
    if !drops.is_empty() {
        match peers.call_one(endpoint, Request::Drop { entries: drops })? {
            Response::Dropped(count) => done.dropped = u64::from(count),
            Response::Error(e) => return Err(Error::Request(e)),
            other => {
                return Err(Error::UnexpectedResponse(format!(
                    "a drop answered {}",
                    other.kind()
                )))
            }
        }
    }
    Ok(done)
}

/// Keys whose replication differs between two sorted override lists.
fn changed_overrides(before: &[(Key, u32)], after: &[(Key, u32)]) -> Vec<Key> {
    let before: HashMap<&Key, u32> = before.iter().map(|(k, r)| (k, *r)).collect();
    let after_map: HashMap<&Key, u32> = after.iter().map(|(k, r)| (k, *r)).collect();
    let mut keys: Vec<Key> = before
        .iter()
        .filter(|(k, r)| after_map.get(*k) != Some(*r))
        .map(|(k, _)| (*k).clone())
        .chain(
            after
                .iter()
                .filter(|(k, _)| !before.contains_key(k))
                .map(|(k, _)| k.clone()),
        )
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::tests::view;

    #[test]
    fn only_keys_whose_replication_changed_move() {
        let before = vec![("a".to_string(), 3), ("b".to_string(), 3)];
        let after = vec![("b".to_string(), 4), ("c".to_string(), 3)];
        assert_eq!(changed_overrides(&before, &after), ["a", "b", "c"]);
        assert!(changed_overrides(&after, &after).is_empty());
    }

    /// The view after `previous`, as the router would send it.
    fn next(previous: &ClusterView) -> ClusterView {
        let mut view = previous.clone();
        view.previous = previous.generation;
        view.generation = previous.generation + 1;
        view
    }

    #[test]
    fn a_first_view_moves_every_key() {
        assert_eq!(moves(None, false, &view(&["a", "b"], 2)), Moves::All);
    }

    #[test]
    fn a_settled_flag_alone_moves_nothing() {
        let held = view(&["a", "b"], 2);
        let mut settled = next(&held);
        settled.settled = true;
        let placement = Placement::new(held);
        assert_eq!(moves(Some(&placement), false, &settled), Moves::Nothing);
    }

    #[test]
    fn changed_overrides_move_only_their_keys() {
        let held = view(&["a", "b"], 2);
        let mut hotter = next(&held);
        hotter.overrides = vec![("hot".into(), 4), ("warm".into(), 3)];
        let placement = Placement::new(held);
        assert_eq!(
            moves(Some(&placement), false, &hotter),
            Moves::Only(vec!["hot".into(), "warm".into()])
        );
    }

    #[test]
    fn members_replication_gaps_and_unfinished_hand_offs_move_every_key() {
        let held = view(&["a", "b"], 2);
        let placement = Placement::new(held.clone());
        let mut joined = next(&held);
        joined.members = view(&["a", "b", "c"], 2).members;
        assert_eq!(moves(Some(&placement), false, &joined), Moves::All);
        let mut replicated = next(&held);
        replicated.replication = 3;
        assert_eq!(moves(Some(&placement), false, &replicated), Moves::All);
        let mut skipped = next(&next(&held));
        skipped.overrides.clear();
        assert_eq!(moves(Some(&placement), false, &skipped), Moves::All);
        let mut cooler = next(&held);
        cooler.overrides.clear();
        assert_eq!(
            moves(Some(&placement), false, &cooler),
            Moves::Only(vec!["hot".into()])
        );
        assert_eq!(moves(Some(&placement), true, &cooler), Moves::All);
    }
}
