//! A storage node's part in a cluster: where keys live, and the agent that keeps them there.
//!
//! A cluster is a [`crate::router::Router`] and storage nodes that join it. The router holds
//! the membership: every node sends it a heartbeat (a [`Request::Join`]) every
//! [`ClusterConfig::heartbeat_ms`] and gets the current [`ClusterView`] back; a node silent for
//! longer than the router's `dead_after` is dropped from the view. Every view has a larger
//! generation than the one before it, so nodes and clients always know which of two is newer.
//!
//! [`Placement`] turns a view into key -> replicas ([`crate::placement`]). Shards check every
//! key against it: a node asked for a key it is not a replica of answers
//! [`KeyError::WrongNode`], so a client with an old view refreshes it instead of reading from
//! the wrong place.
//!
//! The agent (`Agent`) is one thread per node, with a heartbeat thread beside it (so that a
//! slow hand-off never delays a heartbeat). It
//! - installs the newer views the heartbeats bring back;
//! - after every view change, **hands off**: it scans the node's keys, sends each one to its
//!   other replicas under the new view (a lattice merge there, so sending a key a replica
//!   already has changes nothing), and drops the keys the node is no longer a replica of once
//!   their replicas acknowledged them. This is how a joining node receives its keys, a leaving
//!   one hands its keys over, and a dead node's keys get their missing copies from the
//!   survivors;
//! - every [`ClusterConfig::gossip_ms`], **gossips** the keys changed since the last round to
//!   their other replicas, which repairs writes that reached only some replicas.
//!
//! Dropping a handed-off key writes nothing to the node's log: after a restart the key may come
//! back from the log, and is handed off again. Merges make that harmless.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use serde::Deserialize;
use squall_lattices::{LatticeValue, Lww, Timestamp};
use squall_proto::{
    ClusterView, Key, KeyError, LoadReport, Member, MemberStats, Request, Response,
};

use crate::client::ClientConfig;
use crate::exchange::{exchange, Exchanged};
use crate::placement::Placement;
use crate::zmtp::Connection;
use crate::{Error, Result};

/// Entries per hand-off or gossip request: bounded so one page never nears a node's request
/// size limit for small values, and so heartbeats go out between pages.
const PAGE: u32 = 256;

/// Entries kept (per shard) for a later gossip round when their replicas could not be
/// reached. Beyond this, the oldest are dropped with a warning: the next membership change
/// hands every key off, but until then those replicas may miss these writes.
const MAX_RETRY: usize = 100_000;

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

    fn install(&self, placement: Arc<Placement>) {
        let generation = placement.generation();
        *self
            .placement
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(placement);
        self.generation.store(generation, Ordering::Release);
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

/// Connections to other nodes' shards, by endpoint, for the agent's hand-offs.
struct Peers {
    config: ClientConfig,
    next_id: u64,
    connections: HashMap<String, Connection>,
}

impl Peers {
    fn new() -> Self {
        Self {
            // Well under the router's `dead_after`: an unreachable peer delays a page by this
            // much, and the router hears from the heartbeat thread meanwhile anyway.
            config: ClientConfig {
                timeout: PEER_TIMEOUT,
                attempts: 1,
                ..ClientConfig::default()
            },
            next_id: rand::random::<u32>() as u64,
            connections: HashMap::new(),
        }
    }

    /// Sends every request to its endpoint at once; fails unless every one was answered.
    fn call(&mut self, requests: Vec<(String, Request)>) -> Result<Vec<Response>> {
        let endpoints: Vec<String> = requests.iter().map(|(e, _)| e.clone()).collect();
        let mut connections: Vec<Option<Connection>> = endpoints
            .iter()
            .map(|e| self.connections.remove(e))
            .collect();
        let indexed: Vec<(usize, Request)> = requests
            .into_iter()
            .enumerate()
            .map(|(i, (_, r))| (i, r))
            .collect();
        let outcome = exchange(
            &self.config.retry(),
            &mut self.next_id,
            &endpoints,
            &mut connections,
            &indexed,
        )
        .and_then(Exchanged::into_all);
        for (endpoint, connection) in endpoints.into_iter().zip(connections) {
            if let Some(connection) = connection {
                self.connections.insert(endpoint, connection);
            }
        }
        outcome
    }

    fn call_one(&mut self, endpoint: &str, request: Request) -> Result<Response> {
        self.call(vec![(endpoint.to_string(), request)])?
            .pop()
            .ok_or_else(|| Error::UnexpectedResponse("no answer".into()))
    }
}

/// How long the agent waits for another node's answer.
const PEER_TIMEOUT: Duration = Duration::from_millis(1000);

/// Keys named in one restricted scan (a shard refuses requests over its key limit).
const ONLY_PAGE: usize = 1000;

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

/// What the agent and its heartbeat thread share.
#[derive(Debug, Default)]
pub(crate) struct Beat {
    /// The newest view the router answered, not yet taken by the agent.
    incoming: std::sync::Mutex<Option<ClusterView>>,
    /// The generation whose hand-off this node finished.
    synced: AtomicU64,
    /// Estimated bytes held, from the last load report.
    bytes: AtomicU64,
    /// The busiest shard's busy share in the last load window, in thousandths.
    occupancy_permille: AtomicU64,
    /// The node left the view and hands its keys off.
    leaving: AtomicBool,
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
}

struct AgentState {
    peers: Peers,
    handoff: Option<Handoff>,
    /// Changes that could not reach their replicas, per local shard, for the next round.
    retry: Vec<Vec<(Key, LatticeValue)>>,
    leaving: bool,
    /// Whether a view without this node was adopted after the leave.
    left_view: bool,
    beat: Arc<Beat>,
}

/// Most accessed keys a load report names.
const REPORTED_KEYS: u32 = 32;

impl Agent {
    pub(crate) fn run(self) {
        let heartbeat = Duration::from_millis(self.config.heartbeat_ms.max(10));
        let gossip = Duration::from_millis(self.config.gossip_ms.max(10));
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
            std::thread::Builder::new()
                .name("squall-heartbeat".into())
                .spawn(move || {
                    beat_until_stopped(&router, heartbeat, &beat, &shared, &member, &stop)
                })
        };
        let heart = match heart {
            Ok(heart) => heart,
            Err(e) => {
                tracing::error!(cause = %e, "could not start the heartbeat thread");
                return;
            }
        };
        let mut state = AgentState {
            peers: Peers::new(),
            handoff: None,
            retry: vec![Vec::new(); self.member.shards.len()],
            leaving: false,
            left_view: false,
            beat,
        };
        let mut next_gossip = Instant::now() + gossip;
        let mut next_stats = Instant::now() + stats;
        let mut next_leave_try = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if self.leave.load(Ordering::Relaxed) && !state.leaving {
                state.leaving = true;
                state.beat.leaving.store(true, Ordering::Relaxed);
            }
            if state.leaving && !state.left_view && Instant::now() >= next_leave_try {
                next_leave_try = Instant::now() + heartbeat;
                self.leave_view(&mut state);
            }
            let incoming = state
                .beat
                .incoming
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .take();
            if let Some(view) = incoming {
                self.adopt(&mut state, view);
            }
            if Instant::now() >= next_stats && !state.leaving {
                next_stats = Instant::now() + stats;
                self.report_load(&mut state);
            }
            if state.handoff.is_some() {
                if let Err(e) = self.handoff_page(&mut state) {
                    tracing::warn!(cause = %e, "hand-off page failed; retrying");
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            if Instant::now() >= next_gossip || state.leaving {
                next_gossip = Instant::now() + gossip;
                self.gossip(&mut state);
                // Out of the view, and every key handed off (or none held at all, with no
                // view to have been routed to).
                let handed_off = state.left_view && state.retry.iter().all(Vec::is_empty);
                let never_placed = self.shared.placement().is_none() && self.held() == 0;
                if state.leaving && (handed_off || never_placed) {
                    // One last report, so the router counts this hand-off as finished at
                    // once rather than after the node's silence.
                    self.final_beat(&mut state);
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

    /// Reports to the router that the hand-off under the installed view is finished.
    fn final_beat(&self, state: &mut AgentState) {
        let request = Request::Join {
            member: self.member.clone(),
            stats: member_stats(&state.beat, &self.shared),
        };
        if let Err(e) = state.peers.call_one(&self.config.router, request) {
            tracing::debug!(cause = %e, "the last report did not reach the router");
        }
    }

    fn held(&self) -> u64 {
        self.shared
            .keys
            .iter()
            .map(|k| k.load(Ordering::Relaxed))
            .sum()
    }

    /// Collects the shards' load of the last window into one report, keeps its summary for
    /// the heartbeats, and writes it to the store for the policy engine.
    fn report_load(&self, state: &mut AgentState) {
        let requests = self
            .member
            .shards
            .iter()
            .map(|e| (e.clone(), Request::Stats { top: REPORTED_KEYS }))
            .collect();
        let reports = match state.peers.call(requests) {
            Ok(responses) => responses,
            Err(e) => {
                tracing::warn!(cause = %e, "could not collect the shards' load");
                return;
            }
        };
        let mut load = LoadReport {
            id: self.member.id.clone(),
            ..LoadReport::default()
        };
        for response in reports {
            let Response::Stats(shard) = response else {
                tracing::warn!(answer = response.kind(), "unexpected answer to Stats");
                return;
            };
            load.at_ms = load.at_ms.max(shard.at_ms);
            load.window_ms = load.window_ms.max(shard.window_ms);
            load.occupancy = load.occupancy.max(shard.occupancy);
            load.keys += shard.keys;
            load.bytes += shard.bytes;
            load.accesses += shard.accesses;
            load.distinct += shard.distinct;
            load.sum_squares += shard.sum_squares;
            load.top.extend(shard.top);
        }
        load.top
            .sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        load.top.truncate(REPORTED_KEYS as usize);
        state.beat.bytes.store(load.bytes, Ordering::Relaxed);
        state
            .beat
            .occupancy_permille
            .store((load.occupancy * 1000.0).round() as u64, Ordering::Relaxed);
        let Some(placement) = self.shared.placement() else {
            return;
        };
        let key = squall_proto::keys::load_report(&self.member.id);
        let encoded = match rmp_serde::to_vec(&load) {
            Ok(encoded) => encoded,
            Err(e) => {
                tracing::warn!(cause = %e, "could not encode the load report");
                return;
            }
        };
        let value = LatticeValue::Lww(Lww::new(
            Timestamp::now(self.writer),
            bytes::Bytes::from(encoded),
        ));
        let mut replicas = Vec::new();
        placement.replicas(&key, &mut replicas);
        let requests = replicas
            .iter()
            .map(|&r| {
                (
                    placement.shard_endpoint(r, &key).to_string(),
                    routed(
                        placement.generation(),
                        Request::Put {
                            entries: vec![(key.clone(), value.clone())],
                        },
                    ),
                )
            })
            .collect();
        if let Err(e) = state.peers.call(requests) {
            tracing::debug!(cause = %e, "could not store the load report");
        }
    }

    /// Installs `view` if it is newer than the node's, and starts handing off under it.
    fn adopt(&self, state: &mut AgentState, view: ClusterView) {
        if view.generation <= self.shared.generation() {
            return;
        }
        if let Err(e) = Placement::check(&view) {
            tracing::warn!(cause = %e, "ignored a view");
            return;
        }
        tracing::info!(
            generation = view.generation,
            members = view.members.len(),
            member = view.members.iter().position(|m| m.id == self.member.id),
            "new cluster view"
        );
        if state.leaving {
            state.left_view = !view.members.iter().any(|m| m.id == self.member.id);
        }
        // The view right after the one held, with the same members and replication: only
        // keys whose replication changed move, and none if only the settled flag did. Unless
        // an earlier hand-off is unfinished: that one starts over.
        let previous = self.shared.placement();
        let only = match &previous {
            Some(previous)
                if state.handoff.is_none()
                    && view.previous == previous.generation()
                    && previous.members() == view.members.as_slice()
                    && previous.view().replication == view.replication =>
            {
                Some(changed_overrides(
                    &previous.view().overrides,
                    &view.overrides,
                ))
            }
            _ => None,
        };
        let placement = Arc::new(Placement::new(view));
        self.shared.install(placement.clone());
        if only.as_ref().is_some_and(Vec::is_empty) {
            state
                .beat
                .synced
                .store(placement.generation(), Ordering::Release);
            state.handoff = None;
            return;
        }
        state.handoff = Some(Handoff {
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
    fn leave_view(&self, state: &mut AgentState) {
        let request = Request::Leave {
            id: self.member.id.clone(),
        };
        let view = match state.peers.call_one(&self.config.router, request) {
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
            self.shared.placement().map(|p| {
                let mut view = p.view().clone();
                view.members.retain(|m| m.id != self.member.id);
                view.previous = view.generation;
                view.generation += 1;
                view.settled = false;
                view
            })
        });
        match view {
            Some(view) if !view.members.is_empty() => self.adopt(state, view),
            _ => tracing::warn!("no other member to hand keys to yet"),
        }
    }

    /// Scans one page of one shard and hands it off; finishes the hand-off after the last.
    fn handoff_page(&self, state: &mut AgentState) -> Result<()> {
        let Some(job) = state.handoff.as_ref() else {
            return Ok(());
        };
        if job.placement.generation() != self.shared.generation() {
            // A newer view arrived; `adopt` replaced the job already.
            return Ok(());
        }
        let endpoint = self.member.shards[job.shard].clone();
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
        let (entries, more) = match state.peers.call_one(&endpoint, request)? {
            Response::Entries { entries, more } => (entries, more),
            other => {
                return Err(Error::UnexpectedResponse(format!(
                    "a scan answered {}",
                    other.kind()
                )))
            }
        };
        let placement = job.placement.clone();
        let last = entries.last().map(|(k, _)| k.clone());
        let (moved, dropped, complete) = self.distribute(state, &placement, &endpoint, entries)?;
        if !complete {
            return Err(Error::UnexpectedResponse(
                "a replica has not installed the view yet".into(),
            ));
        }
        let Some(job) = state.handoff.as_mut() else {
            return Ok(());
        };
        job.moved += moved;
        job.dropped += dropped;
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
        if job.shard < self.member.shards.len() {
            return Ok(());
        }
        tracing::info!(
            generation = placement.generation(),
            sent = job.moved,
            dropped = job.dropped,
            took = ?job.started.elapsed(),
            "hand-off finished"
        );
        state
            .beat
            .synced
            .store(placement.generation(), Ordering::Release);
        state.handoff = None;
        Ok(())
    }

    /// Sends `entries` (all held by the local shard at `endpoint`) to their other replicas,
    /// then drops from that shard the ones this node is not a replica of. Returns the copies
    /// sent, the keys dropped, and whether every replica took its copy (a replica that has
    /// not yet installed this view answers `WrongNode`: its key is kept here and the caller
    /// tries again).
    fn distribute(
        &self,
        state: &mut AgentState,
        placement: &Placement,
        endpoint: &str,
        entries: Vec<(Key, LatticeValue)>,
    ) -> Result<(u64, u64, bool)> {
        let me = placement.index_of(&self.member.id);
        let mut by_endpoint: HashMap<String, Vec<(Key, LatticeValue)>> = HashMap::new();
        let mut drops = Vec::new();
        let mut replicas = Vec::new();
        let mut copies = 0u64;
        for (key, value) in entries {
            placement.replicas(&key, &mut replicas);
            for &replica in &replicas {
                if Some(replica) != me {
                    by_endpoint
                        .entry(placement.shard_endpoint(replica, &key).to_string())
                        .or_default()
                        .push((key.clone(), value.clone()));
                    copies += 1;
                }
            }
            if me.is_none_or(|me| !replicas.contains(&me)) && !replicas.is_empty() {
                drops.push((key, value));
            }
        }
        let mut kept: Vec<Key> = Vec::new();
        let mut complete = true;
        if !by_endpoint.is_empty() {
            let (sent, requests): (Vec<Vec<Key>>, Vec<(String, Request)>) = by_endpoint
                .into_iter()
                .map(|(endpoint, entries)| {
                    let keys = entries.iter().map(|(k, _)| k.clone()).collect();
                    let request = routed(placement.generation(), Request::Put { entries });
                    (keys, (endpoint, request))
                })
                .unzip();
            for (response, keys) in state.peers.call(requests)?.into_iter().zip(sent) {
                match response {
                    Response::Put(results) => {
                        for (result, key) in results.into_iter().zip(keys) {
                            match result {
                                Ok(()) => {}
                                Err(KeyError::WrongNode { .. }) => {
                                    complete = false;
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
        let mut dropped = 0;
        if !drops.is_empty() {
            match state
                .peers
                .call_one(endpoint, Request::Drop { entries: drops })?
            {
                Response::Dropped(count) => dropped = u64::from(count),
                Response::Error(e) => return Err(Error::Request(e)),
                other => {
                    return Err(Error::UnexpectedResponse(format!(
                        "a drop answered {}",
                        other.kind()
                    )))
                }
            }
        }
        Ok((copies, dropped, complete))
    }

    /// Sends the keys changed since the last round (and those a failed round kept) to their
    /// other replicas.
    fn gossip(&self, state: &mut AgentState) {
        let Some(placement) = self.shared.placement() else {
            return;
        };
        for (shard, endpoint) in self.member.shards.iter().enumerate() {
            let mut entries = std::mem::take(&mut state.retry[shard]);
            loop {
                let (taken, more) = match state
                    .peers
                    .call_one(endpoint, Request::Changed { limit: PAGE })
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
                match self.distribute(state, &placement, endpoint, page.clone()) {
                    Ok((_, _, true)) => {}
                    Ok((_, _, false)) => state.retry[shard].extend(page),
                    Err(e) => {
                        tracing::debug!(cause = %e, "gossip failed; kept for the next round");
                        state.retry[shard].extend(page);
                    }
                }
            }
            if state.retry[shard].len() > MAX_RETRY {
                let excess = state.retry[shard].len() - MAX_RETRY;
                tracing::warn!(dropped = excess, "too many changes wait for unreachable replicas; the next membership change hands them off");
                state.retry[shard].drain(..excess);
            }
        }
    }
}

/// `entries` in pages of at most `PAGE` entries and about `PAGE_BYTES` (a larger value
/// alone), so that no page nears a node's request size limit.
fn pages(entries: Vec<(Key, LatticeValue)>) -> Vec<Vec<(Key, LatticeValue)>> {
    let mut pages: Vec<Vec<(Key, LatticeValue)>> = Vec::new();
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

/// About the most bytes of entries in one gossip page.
const PAGE_BYTES: usize = 4 << 20;

/// `request` as sent under view `generation`.
fn routed(generation: u64, request: Request) -> Request {
    Request::Routed {
        generation,
        request: Box::new(request),
    }
}

/// What a heartbeat reports. `synced` is read before the key counts: a report never pairs a
/// finished hand-off with counts from before it.
fn member_stats(beat: &Beat, shared: &Shared) -> MemberStats {
    let synced = beat.synced.load(Ordering::Acquire);
    MemberStats {
        keys: shared.keys.iter().map(|k| k.load(Ordering::Acquire)).sum(),
        synced,
        requests: shared.requests.load(Ordering::Relaxed),
        bytes: beat.bytes.load(Ordering::Relaxed),
        occupancy_permille: u32::try_from(beat.occupancy_permille.load(Ordering::Relaxed))
            .unwrap_or(u32::MAX),
        leaving: beat.leaving.load(Ordering::Relaxed),
    }
}

/// The heartbeat thread: tells the router every `period` that the node lives (and how it is
/// loaded), and leaves the router's newest view for the agent. On its own thread, so that a
/// slow hand-off never looks like a dead node.
fn beat_until_stopped(
    router: &str,
    period: Duration,
    beat: &Beat,
    shared: &Shared,
    member: &Member,
    stop: &AtomicBool,
) {
    let mut peers = Peers::new();
    let mut down_since: Option<Instant> = None;
    let mut newest = 0;
    while !stop.load(Ordering::Relaxed) {
        let next = Instant::now() + period;
        let request = Request::Join {
            member: member.clone(),
            stats: member_stats(beat, shared),
        };
        match peers.call_one(router, request) {
            Ok(Response::View(view)) => {
                if let Some(since) = down_since.take() {
                    tracing::info!(after = ?since.elapsed(), "the router answers again");
                }
                if view.generation > newest {
                    newest = view.generation;
                    *beat
                        .incoming
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(view);
                }
            }
            Ok(Response::Error(e)) => tracing::debug!(cause = %e, "the router refused a heartbeat"),
            Ok(other) => tracing::warn!(answer = other.kind(), "unexpected answer to a heartbeat"),
            Err(e) => {
                if down_since.is_none() {
                    tracing::warn!(%router, cause = %e, "the router does not answer; keeping the last view");
                    down_since = Some(Instant::now());
                }
            }
        }
        while Instant::now() < next && !stop.load(Ordering::Relaxed) {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
        }
    }
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

    fn view(members: &[&str], replication: u32) -> ClusterView {
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

    #[test]
    fn only_keys_whose_replication_changed_move() {
        let before = vec![("a".to_string(), 3), ("b".to_string(), 3)];
        let after = vec![("b".to_string(), 4), ("c".to_string(), 3)];
        assert_eq!(changed_overrides(&before, &after), ["a", "b", "c"]);
        assert!(changed_overrides(&after, &after).is_empty());
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
