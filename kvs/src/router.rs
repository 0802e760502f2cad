//! The routing role: a cluster's membership, and the answer to "where does this key live".
//!
//! Storage nodes join through the router (the cluster's seed, as in Anna) and keep sending it
//! heartbeats; it answers each with the current [`ClusterView`]. Clients ask it for the view
//! ([`Request::Topology`] answers with no shards of its own and the view) and compute every
//! key's replicas themselves, caching the view; a node that is asked for a key under an older
//! view answers [`squall_proto::KeyError::WrongNode`], and the client asks the router again.
//!
//! A node silent for [`RouterConfig::dead_after_ms`] is dropped from the view; the survivors
//! then copy its keys to their new replicas. A restarted router knows nobody: it waits one
//! `dead_after` for the nodes' heartbeats before it answers with a view, so it never announces
//! a cluster missing live nodes. Generations are drawn from the wall clock (in milliseconds,
//! and always above the last one), so a restarted router's views are newer than its
//! predecessor's.
//!
//! The router holds no data: losing it stops membership changes, never reads or writes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use squall_proto::{
    decode_request, encode_response, peek_id, ClusterStatus, ClusterView, Key, Member, MemberStats,
    MemberStatus, Request, RequestError, RequestId, Response, Topology,
};

use squall_proto::keys::MAX_KEY_BYTES;
use squall_proto::secret::{self, ClusterSecret};

use crate::exchange::{exchange, Exchanged, Retry};
use crate::placement::{Placement, MAX_MEMBERS, MAX_OVERRIDES, MAX_REPLICATION};

use crate::{io_err, zmq_err, Error, Result};

/// A router's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RouterConfig {
    /// Host to bind (default `127.0.0.1`).
    pub host: String,
    /// Port (0: the OS picks).
    pub port: u16,
    /// Replicas per key (default 2: one node's death loses nothing).
    pub replication: u32,
    /// A node silent this long is dropped from the view (default 2000 ms: eight heartbeats).
    pub dead_after_ms: u64,
    /// Largest request accepted (default 1 MiB: joins and heartbeats are small).
    pub max_request_bytes: usize,
    /// The cluster secret it requires of every connection (default: the process's, if one
    /// was installed; see [`squall_proto::secret`]). Never read from a settings file.
    #[serde(skip, default = "ClusterSecret::installed")]
    pub secret: Option<ClusterSecret>,
}

impl Default for RouterConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 0,
            replication: 2,
            dead_after_ms: 2000,
            max_request_bytes: 1 << 20,
            secret: ClusterSecret::installed(),
        }
    }
}

struct Known {
    member: Member,
    stats: MemberStats,
    seen: Instant,
}

struct State {
    config: RouterConfig,
    members: BTreeMap<String, Known>,
    /// Nodes that left the view and are handing their keys off (they keep reporting).
    departing: BTreeMap<String, Known>,
    view: ClusterView,
    started: Instant,
}

impl State {
    /// A router that has just started: no member, and a grace of one `dead_after` before it
    /// announces a view.
    fn new(config: RouterConfig) -> Self {
        Self {
            view: ClusterView {
                generation: 0,
                previous: 0,
                members: Vec::new(),
                replication: config.replication,
                overrides: Vec::new(),
                settled: false,
            },
            config,
            members: BTreeMap::new(),
            departing: BTreeMap::new(),
            started: Instant::now(),
        }
    }

    /// Above the wall clock, the last view, and every view a node reports having held (a
    /// router restarted with its clock behind its predecessor's still issues newer views).
    fn next_generation(&self) -> u64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let reported = self
            .members
            .values()
            .chain(self.departing.values())
            .map(|k| k.stats.synced)
            .max()
            .unwrap_or(0);
        now.max(self.view.generation + 1).max(reported + 1)
    }

    fn rebuild(&mut self, why: &str) {
        self.view = ClusterView {
            generation: self.next_generation(),
            previous: self.view.generation,
            members: self.members.values().map(|k| k.member.clone()).collect(),
            replication: self.config.replication,
            overrides: std::mem::take(&mut self.view.overrides),
            settled: false,
        };
        tracing::info!(
            generation = self.view.generation,
            members = self.view.members.len(),
            why,
            "cluster view changed"
        );
    }

    /// Announces the view as settled once every member, and every node still leaving, finished
    /// handing off under it.
    fn settle(&mut self) {
        let generation = self.view.generation;
        let all_synced = !self.members.is_empty()
            && self.view.members.len() == self.members.len()
            && self
                .members
                .values()
                .chain(self.departing.values())
                .all(|k| k.stats.synced == generation);
        if !self.view.settled && all_synced {
            self.view.previous = generation;
            self.view.generation = self.next_generation();
            self.view.settled = true;
            tracing::info!(
                generation = self.view.generation,
                "every member handed off; the view is settled"
            );
        }
    }

    /// Whether the router has waited out its start-up grace (one `dead_after`).
    fn settled(&self) -> bool {
        self.started.elapsed() >= Duration::from_millis(self.config.dead_after_ms)
    }

    fn expire(&mut self) {
        let dead_after = Duration::from_millis(self.config.dead_after_ms);
        let dead: Vec<String> = self
            .members
            .iter()
            .filter(|(_, k)| k.seen.elapsed() > dead_after)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &dead {
            tracing::warn!(node = %id, "no heartbeat; dropping the node from the view");
            self.members.remove(id);
        }
        // A departing node that stopped reporting has exited (or died): stop waiting for it.
        self.departing.retain(|_, k| k.seen.elapsed() <= dead_after);
        if !dead.is_empty() && self.settled() {
            self.rebuild("a node stopped answering");
        }
    }

    /// One request, one answer: a table from request to the rule that answers it.
    fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::Join { member, stats } => self.join(member, stats),
            Request::Leave { id } => self.leave(id),
            Request::Replicate { key, replicas } => self.replicate(key, replicas),
            Request::Status => self.status(),
            Request::Topology => self.topology(),
            other => Response::Error(RequestError::Malformed {
                reason: format!(
                    "a router answers joins, leaves, status and topology, not {}",
                    other.kind()
                ),
            }),
        }
    }

    /// A heartbeat: a node joins, stays, or (leaving) reports its hand-off's progress.
    fn join(&mut self, member: Member, stats: MemberStats) -> Response {
        if stats.leaving {
            // A node handing off after its leave: its progress counts toward settling.
            self.departing.insert(
                member.id.clone(),
                Known {
                    member,
                    stats,
                    seen: Instant::now(),
                },
            );
            self.settle();
            return Response::View(self.view.clone());
        }
        let departing = self
            .departing
            .get(&member.id)
            .is_some_and(|k| k.member.incarnation == member.incarnation);
        if departing {
            // A heartbeat sent before its node's leave, arriving after it: the node is
            // leaving, not back.
            return Response::View(self.view.clone());
        }
        if !self.members.contains_key(&member.id) && self.members.len() >= MAX_MEMBERS {
            return Response::Error(RequestError::Unavailable {
                reason: format!("the cluster has {MAX_MEMBERS} members already"),
            });
        }
        let probe = ClusterView {
            generation: 1,
            previous: 0,
            members: vec![member.clone()],
            replication: 1,
            overrides: Vec::new(),
            settled: false,
        };
        if let Err(e) = Placement::check(&probe) {
            return Response::Error(RequestError::Malformed {
                reason: e.to_string(),
            });
        }
        let changed = self
            .members
            .get(&member.id)
            .is_none_or(|k| k.member != member);
        if changed {
            tracing::info!(node = %member.id, shards = member.shards.len(), "a node joined");
        }
        self.departing.remove(&member.id);
        self.members.insert(
            member.id.clone(),
            Known {
                member,
                stats,
                seen: Instant::now(),
            },
        );
        if !self.settled() {
            return self.unsettled();
        }
        if changed || self.view.members.len() != self.members.len() {
            self.rebuild("a node joined");
        } else {
            self.settle();
        }
        Response::View(self.view.clone())
    }

    /// A node leaves: out of the view at once, and departing until its hand-off is done.
    fn leave(&mut self, id: String) -> Response {
        if !self.settled() {
            return self.unsettled();
        }
        if let Some(known) = self.members.remove(&id) {
            tracing::info!(node = %id, "a node leaves");
            self.departing.insert(id, known);
            self.rebuild("a node left");
        }
        Response::View(self.view.clone())
    }

    /// A key gets its own replication (`Some`), or goes back to the default (`None`).
    fn replicate(&mut self, key: Key, replicas: Option<u32>) -> Response {
        if key.len() > MAX_KEY_BYTES {
            return Response::Error(RequestError::Malformed {
                reason: format!("a key with its own replication has at most {MAX_KEY_BYTES} bytes"),
            });
        }
        let position = self.view.overrides.binary_search_by(|(k, _)| k.cmp(&key));
        let replicas = replicas.filter(|&r| r != self.config.replication);
        match (position, replicas) {
            (_, Some(r)) if r == 0 || r > MAX_REPLICATION => {
                return Response::Error(RequestError::Malformed {
                    reason: format!("replicas must be between 1 and {MAX_REPLICATION}"),
                })
            }
            (Ok(i), Some(r)) if self.view.overrides[i].1 == r => {}
            (Ok(i), Some(r)) => {
                self.view.overrides[i].1 = r;
                self.rebuild("a key's replication changed");
            }
            (Err(_), Some(_)) if self.view.overrides.len() >= MAX_OVERRIDES => {
                return Response::Error(RequestError::Unavailable {
                    reason: format!("{MAX_OVERRIDES} keys have their own replication already"),
                })
            }
            (Err(i), Some(r)) => {
                self.view.overrides.insert(i, (key, r));
                self.rebuild("a key's replication changed");
            }
            (Ok(i), None) => {
                self.view.overrides.remove(i);
                self.rebuild("a key's replication went back to the default");
            }
            (Err(_), None) => {}
        }
        Response::View(self.view.clone())
    }

    /// The view and every member's last report, for operators.
    fn status(&self) -> Response {
        Response::Status(ClusterStatus {
            view: self.view.clone(),
            members: self
                .members
                .values()
                .map(|k| MemberStatus {
                    id: k.member.id.clone(),
                    stats: k.stats.clone(),
                    silent_ms: k.seen.elapsed().as_millis() as u64,
                })
                .collect(),
        })
    }

    /// The view, as clients fetch it.
    fn topology(&self) -> Response {
        if !self.settled() {
            return self.unsettled();
        }
        Response::Topology(Topology {
            incarnation: self.view.generation,
            shards: Vec::new(),
            virtual_nodes: 0,
            cluster: Some(self.view.clone()),
        })
    }

    fn unsettled(&self) -> Response {
        Response::Error(RequestError::Unavailable {
            reason: "the router started moments ago and is waiting for the nodes' heartbeats"
                .into(),
        })
    }
}

/// A running router. Dropping it stops it.
#[derive(Debug)]
pub struct Router {
    address: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Router {
    /// Binds and starts the router.
    pub fn start(config: RouterConfig) -> Result<Router> {
        if config.replication == 0 || config.replication > 64 {
            return Err(Error::Config(format!(
                "replication must be between 1 and 64, not {}",
                config.replication
            )));
        }
        if config.dead_after_ms == 0 {
            return Err(Error::Config("dead_after_ms must be positive".into()));
        }
        let context = zmq::Context::new();
        let socket = context.socket(zmq::ROUTER).map_err(zmq_err("socket"))?;
        socket.set_linger(0).map_err(zmq_err("set linger"))?;
        secret::warn_if_open("router", &config.host, config.secret.as_ref());
        let gatekeeper = secret::guard(config.secret.as_ref(), &context, &socket)
            .map_err(|e| Error::Config(e.to_string()))?;
        let hard_limit = i64::try_from(config.max_request_bytes).unwrap_or(i64::MAX);
        socket
            .set_maxmsgsize(hard_limit)
            .map_err(zmq_err("set maxmsgsize"))?;
        let endpoint = if config.port == 0 {
            format!("tcp://{}:*", config.host)
        } else {
            format!("tcp://{}:{}", config.host, config.port)
        };
        socket.bind(&endpoint).map_err(|cause| Error::Bind {
            endpoint: endpoint.clone(),
            cause,
        })?;
        let address = socket
            .get_last_endpoint()
            .map_err(zmq_err("get endpoint"))?
            .map_err(|_| Error::Config("bound endpoint is not UTF-8".into()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut state = State::new(config);
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("squall-router".into())
            .spawn(move || {
                let _context = context;
                let _gatekeeper = gatekeeper;
                serve(&socket, &mut state, &flag);
            })
            .map_err(io_err("spawning the router thread"))?;
        tracing::info!(%address, "router started");
        Ok(Router {
            address,
            stop,
            thread: Some(thread),
        })
    }

    /// The router's endpoint: what nodes join and clients connect to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Whether the router's thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the router thread panicked");
            }
        }
    }
}

fn serve(socket: &zmq::Socket, state: &mut State, stop: &AtomicBool) {
    let mut last_settled = state.settled();
    while !stop.load(Ordering::Relaxed) {
        match socket.poll(zmq::POLLIN, 50) {
            Ok(0) | Err(zmq::Error::EINTR) => {}
            Ok(_) => {
                while let Some((identity, frames)) = receive(socket) {
                    reply(socket, state, identity, frames);
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, "polling the router socket failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        state.expire();
        if !last_settled && state.settled() {
            last_settled = true;
            state.rebuild("the router's start-up grace ended");
        }
    }
}

/// One message, if one is waiting: the sender's identity and its frames.
fn receive(socket: &zmq::Socket) -> Option<(zmq::Message, Vec<zmq::Message>)> {
    let identity = match socket.recv_msg(zmq::DONTWAIT) {
        Ok(identity) => identity,
        Err(zmq::Error::EAGAIN) => return None,
        Err(e) => {
            tracing::warn!(cause = %e, "router receive failed");
            return None;
        }
    };
    let mut frames = Vec::with_capacity(2);
    while socket.get_rcvmore().unwrap_or(false) {
        match socket.recv_msg(0) {
            Ok(frame) => frames.push(frame),
            Err(e) => {
                tracing::warn!(cause = %e, "router receive failed mid-message");
                break;
            }
        }
    }
    Some((identity, frames))
}

fn reply(
    socket: &zmq::Socket,
    state: &mut State,
    identity: zmq::Message,
    frames: Vec<zmq::Message>,
) {
    let (delimited, payload) = match frames.as_slice() {
        [payload] => (false, &payload[..]),
        [delimiter, payload] if delimiter.is_empty() => (true, &payload[..]),
        _ => {
            tracing::warn!(frames = frames.len(), "router dropped a malformed envelope");
            return;
        }
    };
    let id: RequestId = peek_id(payload).unwrap_or(0);
    let response = if payload.len() > state.config.max_request_bytes {
        Response::Error(RequestError::TooLarge {
            size: payload.len(),
            limit: state.config.max_request_bytes,
        })
    } else {
        match decode_request(payload) {
            Ok((_, request)) => state.handle(request),
            Err(e) => {
                tracing::warn!(cause = %e, "router got a malformed request");
                Response::Error(RequestError::Malformed {
                    reason: e.to_string(),
                })
            }
        }
    };
    let frame = match encode_response(id, &response) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::error!(cause = %e, "could not encode a router answer");
            return;
        }
    };
    let sent = socket
        .send(identity, zmq::SNDMORE)
        .and_then(|()| {
            if delimited {
                socket.send(&[][..], zmq::SNDMORE)
            } else {
                Ok(())
            }
        })
        .and_then(|()| socket.send(frame, 0));
    if let Err(e) = sent {
        tracing::debug!(cause = %e, "router answer not sent (client gone?)");
    }
}

/// Asks the router at `address` for the cluster's status (`squall cluster status`).
pub fn status(address: &str) -> Result<ClusterStatus> {
    match ask(address, Request::Status)? {
        Response::Status(status) => Ok(status),
        other => Err(Error::UnexpectedResponse(format!(
            "expected the cluster's status, got {}",
            other.kind()
        ))),
    }
}

/// Asks the router at `address` to give `key` `replicas` replicas (`None`: the default);
/// returns the new view.
pub fn replicate(address: &str, key: &str, replicas: Option<u32>) -> Result<ClusterView> {
    let request = Request::Replicate {
        key: key.to_string(),
        replicas,
    };
    match ask(address, request)? {
        Response::View(view) => Ok(view),
        other => Err(Error::UnexpectedResponse(format!(
            "expected a view, got {}",
            other.kind()
        ))),
    }
}

fn ask(address: &str, request: Request) -> Result<Response> {
    let retry = Retry {
        attempts: 2,
        ..Retry::default()
    };
    let endpoints = [address.to_string()];
    let mut connections = [None];
    let mut next_id = rand::random::<u32>() as u64;
    let mut responses = exchange(
        &retry,
        &mut next_id,
        &endpoints,
        &mut connections,
        &[(0, request)],
    )
    .and_then(Exchanged::into_all)?;
    match responses.pop() {
        Some(Response::Error(e)) => Err(Error::Request(e)),
        Some(response) => Ok(response),
        None => Err(Error::UnexpectedResponse("no answer".into())),
    }
}

#[cfg(test)]
mod tests {
    //! The membership rules, on the router's state alone: no socket.

    use super::*;

    fn router(dead_after_ms: u64) -> State {
        State::new(RouterConfig {
            dead_after_ms,
            ..RouterConfig::default()
        })
    }

    fn member(id: &str, incarnation: u64) -> Member {
        Member {
            id: id.into(),
            incarnation,
            shards: vec![id.into()],
            virtual_nodes: 16,
        }
    }

    fn heartbeat(state: &mut State, member: Member, synced: u64, leaving: bool) -> Response {
        state.handle(Request::Join {
            member,
            stats: MemberStats {
                synced,
                leaving,
                ..MemberStats::default()
            },
        })
    }

    fn view(response: Response) -> ClusterView {
        match response {
            Response::View(view) => view,
            other => panic!("not a view: {other:?}"),
        }
    }

    fn unavailable(response: &Response) -> bool {
        matches!(response, Response::Error(RequestError::Unavailable { .. }))
    }

    #[test]
    fn a_new_router_waits_out_its_grace_before_it_announces_a_view() {
        let mut state = router(60_000);
        assert!(unavailable(&heartbeat(
            &mut state,
            member("a", 1),
            0,
            false
        )));
        assert!(unavailable(&state.handle(Request::Topology)));
        assert!(unavailable(
            &state.handle(Request::Leave { id: "a".into() })
        ));
        // It still learned the member, for when the grace is over.
        assert!(state.members.contains_key("a"));
    }

    #[test]
    fn joins_change_the_view_and_it_settles_once_every_member_synced() {
        let mut state = router(0);
        let first = view(heartbeat(&mut state, member("a", 1), 0, false));
        assert_eq!(first.members.len(), 1);
        assert!(!first.settled);
        let second = view(heartbeat(&mut state, member("b", 1), 0, false));
        assert_eq!(second.members.len(), 2);
        assert!(second.generation > first.generation);
        // A heartbeat that changes nothing keeps the view.
        let same = view(heartbeat(&mut state, member("a", 1), 0, false));
        assert_eq!(same.generation, second.generation);
        // Settled only when both report the current generation.
        let g = second.generation;
        assert!(!view(heartbeat(&mut state, member("a", 1), g, false)).settled);
        let settled = view(heartbeat(&mut state, member("b", 1), g, false));
        assert!(settled.settled);
        assert!(settled.generation > g, "settling announces a newer view");
    }

    #[test]
    fn a_restarted_node_is_a_new_member() {
        let mut state = router(0);
        let before = view(heartbeat(&mut state, member("a", 1), 0, false));
        let after = view(heartbeat(&mut state, member("a", 2), 0, false));
        assert!(after.generation > before.generation);
        assert_eq!(after.members[0].incarnation, 2);
    }

    #[test]
    fn a_leaving_node_leaves_the_view_and_late_heartbeats_do_not_bring_it_back() {
        let mut state = router(0);
        heartbeat(&mut state, member("a", 1), 0, false);
        heartbeat(&mut state, member("b", 1), 0, false);
        let left = view(state.handle(Request::Leave { id: "b".into() }));
        assert_eq!(left.members.len(), 1);
        assert!(state.departing.contains_key("b"));
        // A heartbeat sent before the leave, arriving after it.
        let late = view(heartbeat(&mut state, member("b", 1), 0, false));
        assert_eq!(late.generation, left.generation);
        assert_eq!(late.members.len(), 1);
        // Its hand-off progress counts toward settling.
        let g = left.generation;
        heartbeat(&mut state, member("a", 1), g, false);
        assert!(!state.view.settled, "b has not finished handing off");
        let done = view(heartbeat(&mut state, member("b", 1), g, true));
        assert!(done.settled);
        // The same address restarted (another incarnation) joins again.
        let back = view(heartbeat(&mut state, member("b", 2), 0, false));
        assert_eq!(back.members.len(), 2);
    }

    #[test]
    fn silent_nodes_are_dropped() {
        let mut state = router(0);
        heartbeat(&mut state, member("a", 1), 0, false);
        let before = state.view.generation;
        state.members.get_mut("a").expect("a").seen -= Duration::from_millis(10);
        state.expire();
        assert!(state.members.is_empty());
        assert!(state.view.generation > before);
        assert!(state.view.members.is_empty());
    }

    #[test]
    fn replication_overrides_are_bounded_and_go_back_to_the_default() {
        let mut state = router(0);
        heartbeat(&mut state, member("a", 1), 0, false);
        let hot = view(state.handle(Request::Replicate {
            key: "hot".into(),
            replicas: Some(3),
        }));
        assert_eq!(hot.overrides, vec![("hot".to_string(), 3)]);
        let same = view(state.handle(Request::Replicate {
            key: "hot".into(),
            replicas: Some(3),
        }));
        assert_eq!(same.generation, hot.generation, "no change, no new view");
        for bad in [Some(0), Some(MAX_REPLICATION + 1)] {
            let refused = state.handle(Request::Replicate {
                key: "k".into(),
                replicas: bad,
            });
            assert!(
                matches!(refused, Response::Error(RequestError::Malformed { .. })),
                "{bad:?}"
            );
        }
        let long = state.handle(Request::Replicate {
            key: "k".repeat(MAX_KEY_BYTES + 1),
            replicas: Some(3),
        });
        assert!(matches!(
            long,
            Response::Error(RequestError::Malformed { .. })
        ));
        // The default replication is no override.
        let back = view(state.handle(Request::Replicate {
            key: "hot".into(),
            replicas: Some(state.config.replication),
        }));
        assert!(back.overrides.is_empty());
    }

    #[test]
    fn a_router_answers_only_membership_requests() {
        let mut state = router(0);
        let refused = state.handle(Request::Get {
            keys: vec!["k".into()],
        });
        assert!(matches!(
            refused,
            Response::Error(RequestError::Malformed { .. })
        ));
    }
}
