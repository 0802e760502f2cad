//! A shard: one thread, one socket, one map, one log.
//!
//! The loop takes up to `max_batch` requests from its socket, applies them to its map (reads
//! and lattice merges), appends every write that changed something to its log, commits the log
//! once for the whole batch (group commit), and only then sends the batch's replies, reads
//! included, so no client ever sees a value that a crash could take back. If the commit fails
//! (disk full, I/O error), no reply of the batch reports success, reads included: the map may
//! hold merges that are not yet durable. The records stay pending and every later batch retries
//! them; while they exceed [`MAX_PENDING_BYTES`], new writes are refused before they are merged.
//!
//! Bad frames never stop the loop: each gets an error reply (ZeroMQ's ROUTER socket always
//! knows the sender), and a frame that is not even addressed sensibly is dropped with a warning.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use squall_lattices::entry::now_ms;
use squall_lattices::{Entry, Lattice, LatticeValue, Write};
use squall_proto::{
    decode_request, encode_response, peek_id, Key, KeyError, Request, RequestError, RequestId,
    Response, Topology, MAX_AWAIT_MS,
};

use crate::cluster::{ReplicaCheck, Shared};
use crate::journal::{self, Journal};
use crate::log::{remove_files, ShardLog, Snapshot, Store};
use crate::ring::Ring;
use crate::subscription::Subscriptions;
use crate::Config;

/// How long the loop sleeps in `poll` when idle: the bound on shutdown and fsync-interval lag.
const IDLE_POLL: Duration = Duration::from_millis(20);

/// Uncommitted log bytes beyond which new writes are refused (only reached while commits fail).
pub const MAX_PENDING_BYTES: usize = 64 << 20;

/// Request bytes one batch may take in, whatever `max_batch` says, to bound a shard's memory.
const MAX_BATCH_BYTES: usize = 64 << 20;

/// Snapshot bytes written between two batches: bounds the pause a compaction adds to a batch
/// (about a millisecond), however large the shard.
const SNAPSHOT_SLICE_BYTES: usize = 1 << 20;

/// How long a shard waits before trying again after a snapshot failed (a full disk, say).
const SNAPSHOT_RETRY: Duration = Duration::from_secs(10);

/// A reply waiting for the batch's commit.
enum Outgoing {
    /// Independent of the commit (errors, topology): fully encoded.
    Ready(Vec<u8>),
    /// A GET's values: sent only if the commit succeeds.
    Get {
        id: RequestId,
        values: Vec<Result<Option<Entry>, KeyError>>,
    },
    /// A PUT's results: each `Ok` becomes `NotDurable` if the commit fails.
    Put {
        id: RequestId,
        results: Vec<Result<(), KeyError>>,
    },
    /// A LIST's keys: sent only if the commit succeeds, like a GET's values.
    Keys {
        id: RequestId,
        keys: Vec<Key>,
        more: bool,
    },
    /// A JOURNAL switch: answered only if the commit succeeds (the switch is in the log).
    Changes { id: RequestId, on: bool },
    /// An encoded answer sent only if the commit succeeds (a CHANGES answer may hold the
    /// batch's own writes).
    Committed { id: RequestId, frame: Vec<u8> },
    /// An AWAIT-CHANGE: answered once the batch committed if a newer change is durable by
    /// then, else held until the shard commits one or `until` passes.
    Await {
        id: RequestId,
        after: u64,
        until: Instant,
    },
    /// A SUBSCRIBE's values: sent only if the commit succeeds, like a GET's.
    Subscribed {
        id: RequestId,
        values: Vec<Result<Option<Entry>, KeyError>>,
        session: u64,
    },
}

struct Envelope {
    identity: zmq::Message,
    /// Whether the sender is a REQ socket, whose replies need an empty delimiter frame.
    delimited: bool,
    reply: Outgoing,
}

/// A consumer's [`Request::AwaitChange`] held until the shard journals a newer change.
pub(crate) struct Awaiting {
    identity: zmq::Message,
    delimited: bool,
    id: RequestId,
    after: u64,
    until: Instant,
}

/// Held AWAIT-CHANGE requests per shard; more are refused (one deliverer waits on each
/// shard, so this is far more than needed).
const MAX_AWAITING: usize = 64;

/// A running shard's state. Owned by its thread.
pub(crate) struct Shard {
    pub(crate) index: u32,
    pub(crate) socket: zmq::Socket,
    /// Admits only peers with the cluster secret while the shard runs (if one is set).
    pub(crate) _gatekeeper: Option<squall_proto::secret::Gatekeeper>,
    pub(crate) store: Store,
    pub(crate) log: Option<ShardLog>,
    pub(crate) ring: Arc<Ring>,
    pub(crate) topology: Arc<Topology>,
    pub(crate) config: Arc<Config>,
    pub(crate) shutdown: Arc<AtomicBool>,
    /// A snapshot being written between batches, if one is under way.
    pub(crate) snapshot: Option<Snapshot>,
    /// No new snapshot is started before this (set after a failure).
    pub(crate) snapshot_not_before: Option<Instant>,
    /// Caches watching this shard's keys.
    pub(crate) subscriptions: Subscriptions,
    /// The node's cluster state, if it is in a cluster.
    pub(crate) cluster: Option<Arc<Shared>>,
    /// Whether keys are this node's under its view.
    pub(crate) replicas: ReplicaCheck,
    /// Keys changed since the agent last took them for gossip (cluster only).
    pub(crate) changed: hashbrown::HashSet<Key>,
    /// Load in the current window (cluster only).
    pub(crate) load: Load,
    /// When keys expire and tombstones may be forgotten.
    pub(crate) deadlines: Deadlines,
    /// Clients' writes kept for `kv-change` triggers, once switched on.
    pub(crate) journal: Journal,
    /// Consumers waiting for the journal's next change.
    pub(crate) awaiting: Vec<Awaiting>,
    /// The newest sequence number of a change known durable (committed).
    pub(crate) durable_seq: u64,
}

/// Keys due for work at a time: an expiry to reap, a tombstone to forget. Kept in step with
/// the map on every change (one entry per key), so the shard finds what is due without a
/// scan; costs a set entry and a map entry per expiring key or tombstone.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    due: std::collections::BTreeSet<(u64, Key)>,
    of: hashbrown::HashMap<Key, u64>,
}

impl Deadlines {
    /// When `entry` next needs work: its expiry while it holds a value (to reap it), or the
    /// end of its grace once dead (to forget it).
    fn of_entry(entry: &Entry, grace_ms: u64) -> Option<u64> {
        match (&entry.value, entry.expires_at_ms()) {
            (Some(_), Some(at)) => Some(at),
            (Some(_), None) => None,
            (None, _) => entry
                .died_at_ms(u64::MAX)
                .map(|died| died.saturating_add(grace_ms)),
        }
    }

    /// Notes `key`'s deadline after a change (`None`: it needs none).
    fn set(&mut self, key: &Key, deadline: Option<u64>) {
        if deadline.is_none() && self.of.is_empty() {
            return;
        }
        let old = self.of.get(key).copied();
        if old == deadline {
            return;
        }
        if let Some(old) = old {
            self.due.remove(&(old, key.clone()));
            self.of.remove(key);
        }
        if let Some(deadline) = deadline {
            self.due.insert((deadline, key.clone()));
            self.of.insert(key.clone(), deadline);
        }
    }

    /// Takes the next key due at `now_ms`.
    fn pop_due(&mut self, now_ms: u64) -> Option<Key> {
        let first = self.due.first()?;
        if first.0 > now_ms {
            return None;
        }
        let (_, key) = self.due.pop_first()?;
        self.of.remove(&key);
        Some(key)
    }
}

/// The most keys one LIST answers, whatever it asks.
const MAX_LIST: u32 = 10_000;

/// Keys reaped or forgotten per pass between batches: bounds the pause (Redis's active
/// expiry has the same kind of budget).
const EXPIRY_BUDGET: usize = 1_000;

/// Keys whose accesses are counted per window; beyond it, new keys count in the totals only.
const MAX_COUNTED_KEYS: usize = 100_000;

/// About the most bytes of entries one scan or `Changed` answers: hand-off pages stay well
/// under any node's request size limit when they are sent on.
const SCAN_BYTES: usize = 4 << 20;

/// An entry's MessagePack size.
fn encoded_len(value: &Entry) -> usize {
    rmp_serde::encode::to_vec(value).map_or(0, |v| v.len())
}

/// Keys whose encoded size is measured per load report, to estimate the bytes held.
const SIZE_SAMPLE: usize = 1_000;

/// A shard's load in the current window: busy time and per-key access counts.
#[derive(Debug)]
pub(crate) struct Load {
    started: Instant,
    busy: Duration,
    accesses: hashbrown::HashMap<Key, u32>,
    total: u64,
    /// Where the next size sample starts.
    sample_from: Option<Key>,
    /// Mean encoded bytes per key, from the samples so far.
    mean_size: f64,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            busy: Duration::ZERO,
            accesses: hashbrown::HashMap::new(),
            total: 0,
            sample_from: None,
            mean_size: 0.0,
        }
    }
}

impl Load {
    fn count(&mut self, key: &str) {
        self.total += 1;
        if let Some(count) = self.accesses.get_mut(key) {
            *count = count.saturating_add(1);
        } else if self.accesses.len() < MAX_COUNTED_KEYS {
            self.accesses.insert(key.to_string(), 1);
        }
    }

    /// The window's report (with the `top` most accessed keys); starts a new window.
    fn report(&mut self, store: &Store, top: usize) -> squall_proto::LoadReport {
        use std::ops::Bound;
        let window = self.started.elapsed();
        // Sizes: a rolling sample of keys, so a report costs the same however large the
        // shard is.
        let start = match &self.sample_from {
            Some(key) => Bound::Excluded(key.as_str()),
            None => Bound::Unbounded,
        };
        let (mut sampled, mut bytes) = (0usize, 0usize);
        let mut last = None;
        for (key, value) in store
            .range::<str, _>((start, Bound::Unbounded))
            .take(SIZE_SAMPLE)
        {
            bytes += key.len() + encoded_len(value);
            sampled += 1;
            last = Some(key);
        }
        self.sample_from = if sampled == SIZE_SAMPLE {
            last.cloned()
        } else {
            None
        };
        if sampled > 0 {
            let mean = bytes as f64 / sampled as f64;
            self.mean_size = if self.mean_size == 0.0 {
                mean
            } else {
                0.5 * self.mean_size + 0.5 * mean
            };
        }
        let mut counted: Vec<(Key, u64)> = self
            .accesses
            .drain()
            .map(|(k, c)| (k, u64::from(c)))
            .collect();
        let sum_squares = counted.iter().map(|(_, c)| (*c as f64).powi(2)).sum();
        let distinct = counted.len() as u64;
        counted.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        counted.truncate(top);
        let report = squall_proto::LoadReport {
            id: String::new(),
            at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            window_ms: window.as_millis() as u64,
            occupancy: if window.is_zero() {
                0.0
            } else {
                (self.busy.as_secs_f64() / window.as_secs_f64()).min(1.0)
            },
            keys: store.len() as u64,
            bytes: (self.mean_size * store.len() as f64) as u64,
            accesses: self.total,
            distinct,
            sum_squares,
            top: counted,
        };
        self.started = Instant::now();
        self.busy = Duration::ZERO;
        self.total = 0;
        report
    }
}

/// Most changed keys remembered for gossip; beyond it, further changes are left to the next
/// membership change's hand-off (an acknowledged write reached a majority of its replicas
/// directly in any case).
const MAX_CHANGED: usize = 1 << 20;

impl Shard {
    /// Serves until the shutdown flag is set, then commits what is pending.
    pub(crate) fn run(mut self) {
        self.index_deadlines();
        let mut outbox: Vec<Envelope> = Vec::with_capacity(self.config.max_batch);
        while !self.shutdown.load(Ordering::Relaxed) {
            // While a snapshot is under way, an idle shard keeps writing it instead of sleeping.
            let wait = if self.snapshot.is_some() {
                0
            } else {
                IDLE_POLL.as_millis() as i64
            };
            match self.socket.poll(zmq::POLLIN, wait) {
                Ok(0) => {}
                Ok(_) => {
                    let started = Instant::now();
                    self.take_batch(&mut outbox);
                    self.commit_and_reply(&mut outbox);
                    self.load.busy += started.elapsed();
                }
                Err(zmq::Error::EINTR) => {}
                Err(e) => {
                    tracing::error!(shard = self.index, cause = %e, "polling the shard socket failed");
                    std::thread::sleep(IDLE_POLL);
                }
            }
            self.commit_and_reply(&mut outbox);
            self.maintain();
        }
        if let Some(log) = &mut self.log {
            if let Err(e) = log.commit() {
                tracing::error!(shard = self.index, cause = %e, "final log commit failed");
            }
        }
        tracing::debug!(shard = self.index, "shard stopped");
    }

    fn take_batch(&mut self, outbox: &mut Vec<Envelope>) {
        let mut bytes = 0;
        for _ in 0..self.config.max_batch {
            if bytes > MAX_BATCH_BYTES {
                break;
            }
            let identity = match self.socket.recv_msg(zmq::DONTWAIT) {
                Ok(identity) => identity,
                Err(zmq::Error::EAGAIN) => break,
                Err(e) => {
                    tracing::warn!(shard = self.index, cause = %e, "receive failed");
                    break;
                }
            };
            let mut frames = Vec::with_capacity(2);
            while self.socket.get_rcvmore().unwrap_or(false) {
                match self.socket.recv_msg(0) {
                    Ok(frame) => {
                        bytes += frame.len();
                        frames.push(frame);
                    }
                    Err(e) => {
                        tracing::warn!(shard = self.index, cause = %e, "receive failed mid-message");
                        break;
                    }
                }
            }
            if let Some(envelope) = self.handle(identity, frames) {
                outbox.push(envelope);
            }
        }
    }

    /// Turns one message into the reply to send after the commit.
    fn handle(&mut self, identity: zmq::Message, frames: Vec<zmq::Message>) -> Option<Envelope> {
        let (delimited, payload) = match frames.as_slice() {
            [payload] => (false, &payload[..]),
            [delimiter, payload] if delimiter.is_empty() => (true, &payload[..]),
            [] => {
                tracing::warn!(shard = self.index, "dropped a message with no body");
                return None;
            }
            _ => {
                tracing::warn!(
                    shard = self.index,
                    frames = frames.len(),
                    "malformed envelope"
                );
                let reply = error_reply(
                    0,
                    RequestError::Malformed {
                        reason: format!("expected one frame, got {}", frames.len()),
                    },
                );
                return Some(Envelope {
                    identity,
                    delimited: false,
                    reply,
                });
            }
        };
        let reply = self.handle_payload(payload);
        Some(Envelope {
            identity,
            delimited,
            reply,
        })
    }

    /// Decodes and checks one request, then answers it (or refuses it, with its id).
    fn handle_payload(&mut self, payload: &[u8]) -> Outgoing {
        match self.admit(payload) {
            Ok((id, request, stale)) => self.answer(id, request, stale),
            Err(refused) => refused,
        }
    }

    /// A request this shard will answer: its id, the request (a routed one unwrapped), and
    /// whether it was routed under an older view than this node's. Refusals are replies.
    fn admit(&mut self, payload: &[u8]) -> Result<(RequestId, Request, bool), Outgoing> {
        let id = peek_id(payload).unwrap_or(0);
        if payload.len() > self.config.max_request_bytes {
            tracing::warn!(
                shard = self.index,
                size = payload.len(),
                "request too large"
            );
            return Err(error_reply(
                id,
                RequestError::TooLarge {
                    size: payload.len(),
                    limit: self.config.max_request_bytes,
                },
            ));
        }
        let (id, request) = match decode_request(payload) {
            Ok(decoded) => decoded,
            Err(squall_proto::Error::UnsupportedVersion { got }) => {
                tracing::warn!(
                    shard = self.index,
                    version = got,
                    "unsupported protocol version"
                );
                return Err(error_reply(
                    id,
                    RequestError::UnsupportedVersion {
                        got,
                        supported: squall_proto::VERSION,
                    },
                ));
            }
            Err(e) => {
                tracing::warn!(shard = self.index, cause = %e, "malformed request");
                return Err(error_reply(
                    id,
                    RequestError::Malformed {
                        reason: e.to_string(),
                    },
                ));
            }
        };
        if let Some(shared) = &self.cluster {
            shared.requests.fetch_add(1, Ordering::Relaxed);
            self.replicas.refresh(shared);
        }
        // A GET or PUT routed under an older view than this node's: every key is answered
        // `WrongNode` (written values are still kept), so the sender looks at the view again.
        let (request, stale) = match request {
            Request::Routed {
                generation,
                request,
            } => match *request {
                inner @ (Request::Get { .. }
                | Request::Put { .. }
                | Request::PutChained { .. }
                | Request::Write { .. }
                | Request::Merge { .. }
                | Request::Copy { .. }) => {
                    let mine = self.replicas.generation();
                    (inner, self.cluster.is_some() && generation < mine)
                }
                other => {
                    return Err(error_reply(
                        id,
                        RequestError::Malformed {
                            reason: format!(
                                "only a get or a put is routed, not a {}",
                                other.kind()
                            ),
                        },
                    ))
                }
            },
            other => (other, false),
        };
        let keys = key_count(&request);
        if keys > self.config.max_keys_per_request {
            return Err(error_reply(
                id,
                RequestError::TooManyKeys {
                    count: keys,
                    limit: self.config.max_keys_per_request,
                },
            ));
        }
        Ok((id, request, stale))
    }

    /// One request, one answer: a table from request to the method that answers it.
    fn answer(&mut self, id: RequestId, request: Request, stale: bool) -> Outgoing {
        match request {
            Request::Get { keys } => self.get_all(id, &keys, stale),
            Request::Put { entries } => self.put_all(id, entries, stale, |shard, key, value| {
                shard.put_journaled(key, value, 0)
            }),
            Request::PutChained { chain, entries } => {
                self.put_all(id, entries, stale, |shard, key, value| {
                    shard.put_journaled(key, value, chain)
                })
            }
            Request::Write { entries } => self.put_all(id, entries, stale, Self::write_journaled),
            Request::Merge { entries } => self.put_all(id, entries, stale, Self::merge_journaled),
            Request::Copy { entries } => self.put_all(id, entries, stale, Self::copy_entry),
            Request::Changes { after, limit } => {
                let (changes, lost) = self.journal.take(&mut self.store, after, limit);
                let on = self.journal.is_on();
                // Changes of this batch are durable only once it commits.
                Outgoing::Committed {
                    id,
                    frame: encode(id, &Response::Changes { changes, lost, on }),
                }
            }
            Request::AwaitChange { after, wait_ms } => {
                let wait = Duration::from_millis(u64::from(wait_ms.min(MAX_AWAIT_MS)));
                Outgoing::Await {
                    id,
                    after,
                    until: Instant::now() + wait,
                }
            }
            Request::Journal { on } => {
                match self.journal.switch(&mut self.store, self.log.as_mut(), on) {
                    // Answered after the batch's commit, like a write.
                    Ok(()) => Outgoing::Changes { id, on },
                    Err(e) => error_reply(
                        id,
                        RequestError::Unavailable {
                            reason: e.to_string(),
                        },
                    ),
                }
            }
            Request::List {
                prefix,
                after,
                limit,
            } => self.list(id, &prefix, after.as_deref(), limit),
            Request::Sizes {
                prefix,
                after,
                limit,
            } => self.sizes(id, &prefix, after.as_deref(), limit),
            Request::Routed { .. } => error_reply(
                id,
                RequestError::Malformed {
                    reason: "a routed request inside a routed request".into(),
                },
            ),
            Request::Topology => self.topology_reply(id),
            Request::Scan { after, limit, only } if only.is_empty() => {
                let (entries, more) = self.scan(after.as_deref(), limit as usize);
                Outgoing::Ready(encode(id, &Response::Entries { entries, more }))
            }
            Request::Scan { only, .. } => self.scan_named(id, only),
            Request::Stats { top } => {
                let report = self.load.report(&self.store, top.min(1024) as usize);
                Outgoing::Ready(encode(id, &Response::Stats(report)))
            }
            Request::Changed { limit } => self.changed_entries(id, limit),
            Request::Drop { entries } => {
                let dropped = entries
                    .into_iter()
                    .filter(|(key, handed)| self.drop_handed_off(key, handed))
                    .count();
                Outgoing::Ready(encode(id, &Response::Dropped(dropped as u32)))
            }
            Request::Join { .. }
            | Request::Leave { .. }
            | Request::Status
            | Request::Replicate { .. } => error_reply(
                id,
                RequestError::Malformed {
                    reason: format!(
                        "a storage node does not answer {}; send it to the cluster's router",
                        request.kind()
                    ),
                },
            ),
            Request::Subscribe { subscriber, keys } => self.subscribe(id, &subscriber, keys),
            Request::Unsubscribe { subscriber, keys } => {
                let results = keys
                    .iter()
                    .map(|key| {
                        self.owns(key)?;
                        self.subscriptions.unsubscribe(&subscriber, key);
                        Ok(())
                    })
                    .collect();
                Outgoing::Ready(encode(id, &Response::Unsubscribed(results)))
            }
        }
    }

    /// GET: each key's value, or `WrongNode` for every key of a stale routed request.
    fn get_all(&mut self, id: RequestId, keys: &[Key], stale: bool) -> Outgoing {
        let values = if stale {
            keys.iter().map(|_| Err(self.replicas.wrong())).collect()
        } else {
            keys.iter().map(|key| self.get(key)).collect()
        };
        Outgoing::Get { id, values }
    }

    /// PUT: each entry merged (kept even when the request was stale, then refused with
    /// `WrongNode` so that the sender writes the replicas of its newer view too).
    fn put_all<T>(
        &mut self,
        id: RequestId,
        entries: Vec<(Key, T)>,
        stale: bool,
        mut apply: impl FnMut(&mut Self, Key, T) -> Result<(), KeyError>,
    ) -> Outgoing {
        let results = entries
            .into_iter()
            .map(|(key, value)| {
                let result = apply(self, key, value);
                if stale && result.is_ok() {
                    Err(self.replicas.wrong())
                } else {
                    result
                }
            })
            .collect();
        Outgoing::Put { id, results }
    }

    /// The node's layout, with the cluster view it holds.
    fn topology_reply(&self, id: RequestId) -> Outgoing {
        let mut topology = (*self.topology).clone();
        topology.cluster = self
            .cluster
            .as_ref()
            .and_then(|shared| shared.placement())
            .map(|placement| placement.view().clone());
        Outgoing::Ready(encode(id, &Response::Topology(topology)))
    }

    /// The named keys that are held, in the order named, up to the byte cap: the last entry
    /// tells the caller where to go on.
    fn scan_named(&self, id: RequestId, only: Vec<Key>) -> Outgoing {
        let mut entries = Vec::new();
        let (mut bytes, mut more) = (0, false);
        for key in only {
            let Some(value) = self.store.get(&key) else {
                continue;
            };
            let size = key.len() + encoded_len(value);
            if !entries.is_empty() && bytes + size > SCAN_BYTES {
                more = true;
                break;
            }
            bytes += size;
            entries.push((key, value.clone()));
        }
        Outgoing::Ready(encode(id, &Response::Entries { entries, more }))
    }

    /// Keys changed since the last gossip round: one pass over the set for the candidates,
    /// then their values up to the byte cap.
    fn changed_entries(&mut self, id: RequestId, limit: u32) -> Outgoing {
        let candidates: Vec<Key> = self
            .changed
            .iter()
            .take((limit as usize).max(1))
            .cloned()
            .collect();
        let mut entries = Vec::new();
        let mut bytes = 0;
        for key in candidates {
            if bytes >= SCAN_BYTES {
                break;
            }
            self.changed.remove(&key);
            if let Some(value) = self.store.get(&key) {
                bytes += key.len() + encoded_len(value);
                entries.push((key, value.clone()));
            }
        }
        Outgoing::Ready(encode(
            id,
            &Response::Entries {
                entries,
                more: !self.changed.is_empty(),
            },
        ))
    }

    /// SUBSCRIBE: the keys' values now, and pushes of their changes from here on.
    fn subscribe(&mut self, id: RequestId, subscriber: &str, keys: Vec<Key>) -> Outgoing {
        let values: Vec<_> = keys.iter().map(|key| self.get(key)).collect();
        let owned = keys
            .into_iter()
            .zip(&values)
            .filter(|(_, v)| v.is_ok())
            .map(|(k, _)| k);
        match self.subscriptions.subscribe(subscriber, owned) {
            Ok(session) => Outgoing::Subscribed {
                id,
                values,
                session,
            },
            Err(e) => {
                tracing::warn!(shard = self.index, cause = %e, "subscription refused");
                error_reply(
                    id,
                    RequestError::Malformed {
                        reason: e.to_string(),
                    },
                )
            }
        }
    }

    fn owns(&self, key: &str) -> Result<(), KeyError> {
        let owner = self.ring.owner(key);
        if owner == self.index {
            Ok(())
        } else {
            Err(KeyError::WrongShard { owner })
        }
    }

    /// A key's entry, an expired one as the tombstone it reaps to (so a reader merging
    /// replicas' answers cannot bring the value back from one that has not reaped it).
    fn get(&mut self, key: &str) -> Result<Option<Entry>, KeyError> {
        self.owns(key)?;
        if self.cluster.is_some() {
            self.replicas.check(key)?;
            self.load.count(key);
        }
        Ok(self.store.get(key).map(|entry| {
            let mut entry = entry.clone();
            if entry.expires_at_ms().is_some() {
                entry.reap(now_ms());
            }
            entry
        }))
    }

    /// LIST: up to `limit` (at most [`MAX_LIST`]) live keys with `prefix` after `after`, in
    /// order; answered after the batch's commit, like a GET.
    fn list(&self, id: RequestId, prefix: &str, after: Option<&str>, limit: u32) -> Outgoing {
        let limit = limit.min(MAX_LIST);
        use std::ops::Bound;
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let now = now_ms();
        let mut keys = Vec::new();
        let mut more = false;
        for (key, entry) in self.store.range::<str, _>((start, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if entry.live(now).is_none() || journal::is_journal_key(key) {
                continue;
            }
            if keys.len() >= limit as usize {
                more = true;
                break;
            }
            keys.push(key.clone());
        }
        Outgoing::Keys { id, keys, more }
    }

    /// SIZES: up to `limit` (at most [`MAX_LIST`]) live keys with `prefix` after `after`,
    /// in order, each with its key's length plus its entry's encoded size; answered after
    /// the batch's commit, like a GET. Costs an encoding of each entry answered, so a page
    /// holds at most about `SCAN_BYTES` of entries (at least one key).
    fn sizes(&self, id: RequestId, prefix: &str, after: Option<&str>, limit: u32) -> Outgoing {
        let limit = limit.min(MAX_LIST);
        use std::ops::Bound;
        let start = match after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let now = now_ms();
        let (mut sizes, mut bytes, mut more) = (Vec::new(), 0usize, false);
        for (key, entry) in self.store.range::<str, _>((start, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if entry.live(now).is_none() || journal::is_journal_key(key) {
                continue;
            }
            if sizes.len() >= limit as usize || (bytes >= SCAN_BYTES && !sizes.is_empty()) {
                more = true;
                break;
            }
            let size = key.len() + encoded_len(entry);
            bytes += size;
            sizes.push((key.clone(), size as u64));
        }
        Outgoing::Committed {
            id,
            frame: encode(id, &Response::Sizes { sizes, more }),
        }
    }

    /// Up to `limit` entries after `after`, in key order, and at most about `SCAN_BYTES`
    /// (at least one entry); whether more follow.
    fn scan(&self, after: Option<&str>, limit: usize) -> (Vec<(Key, Entry)>, bool) {
        use std::ops::Bound;
        let start = match after {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let mut entries = Vec::new();
        let mut bytes = 0;
        let mut range = self.store.range::<str, _>((start, Bound::Unbounded));
        let mut more = false;
        for (key, value) in range.by_ref() {
            // The journal is this shard's own: never handed to other nodes.
            if journal::is_journal_key(key) {
                continue;
            }
            let size = key.len() + encoded_len(value);
            if entries.len() >= limit.max(1) || (!entries.is_empty() && bytes + size > SCAN_BYTES) {
                more = true;
                break;
            }
            bytes += size;
            entries.push((key.clone(), value.clone()));
        }
        (entries, more)
    }

    /// Forgets `key` if this node is not its replica and `handed` (what its replicas
    /// acknowledged) already includes everything stored.
    fn drop_handed_off(&mut self, key: &str, handed: &Entry) -> bool {
        if self.cluster.is_none() || self.replicas.check(key).is_ok() {
            return false;
        }
        let Some(stored) = self.store.get(key) else {
            return false;
        };
        if stored.check_mergeable(handed).is_err() || handed.clone().merge(stored.clone()) {
            return false;
        }
        self.store.remove(key);
        self.changed.remove(key);
        self.deadlines.set(&key.to_string(), None);
        true
    }

    /// A client's PUT, journaled when the journal is on, with the depth of the trigger chain
    /// that made it ([`squall_proto::Change::chain`]).
    fn put_journaled(&mut self, key: Key, value: LatticeValue, chain: u32) -> Result<(), KeyError> {
        if !self.journals(&key)? {
            return self.put(key, value);
        }
        let digest = journal::write_digest(&key, &value);
        let written = value.clone();
        self.put(key.clone(), value)?;
        self.journal_write(&key, Some(written), false, digest, chain)
    }

    /// A client's write with an expiry, journaled when the journal is on.
    fn write_journaled(&mut self, key: Key, write: Write) -> Result<(), KeyError> {
        if !self.journals(&key)? {
            return self.write(key, write);
        }
        let digest = journal::write_digest(&key, &write);
        let written = write.value.clone();
        self.write(key.clone(), write)?;
        self.journal_write(&key, written, false, digest, 0)
    }

    /// A client's exact merge (a delete, a causal or counter write), journaled when the
    /// journal is on.
    fn merge_journaled(&mut self, key: Key, entry: Entry) -> Result<(), KeyError> {
        if !self.journals(&key)? {
            return self.merge_entry(key, entry);
        }
        let digest = journal::write_digest(&key, &entry);
        let (written, deleted) = (entry.value.clone(), entry.value.is_none());
        self.merge_entry(key.clone(), entry)?;
        self.journal_write(&key, written, deleted, digest, 0)
    }

    /// A copy from another replica: merged, never journaled. The journal's own keys are
    /// refused (they are this shard's).
    fn copy_entry(&mut self, key: Key, entry: Entry) -> Result<(), KeyError> {
        refuse_journal_key(&key)?;
        self.merge_entry(key, entry)
    }

    /// Whether a client's write of `key` enters the journal: the journal is on and the key
    /// is a tenant's (`squall_proto::keys::is_tenant_key`), not one of Squall's own records.
    /// The journal's own keys are refused.
    fn journals(&self, key: &str) -> Result<bool, KeyError> {
        refuse_journal_key(key)?;
        Ok(self.journal.is_on() && squall_proto::keys::is_tenant_key(key))
    }

    /// Journals a write of `key` just merged, with the key's live value after it. Appended
    /// to the log with the batch, so it is as durable as the write when the batch's replies
    /// go.
    fn journal_write(
        &mut self,
        key: &str,
        written: Option<LatticeValue>,
        deleted: bool,
        digest: u64,
        chain: u32,
    ) -> Result<(), KeyError> {
        let after = self
            .store
            .get(key)
            .and_then(|entry| entry.live(now_ms()))
            .cloned();
        let change = squall_proto::Change {
            seq: 0,
            ms: 0,
            key: key.to_string(),
            written,
            deleted,
            after,
            digest,
            chain,
        };
        self.journal
            .record(&mut self.store, self.log.as_mut(), change)
            .map_err(|e| {
                tracing::error!(shard = self.index, key, cause = %e, "a write could not be journaled");
                // Merged but not journaled: the write is not acknowledged.
                KeyError::NotDurable {
                    reason: format!("journaling the write: {e}"),
                }
            })
    }

    /// A client's write of `value`: given its epoch here ([`Write::lift`]), then merged.
    fn put(&mut self, key: Key, value: LatticeValue) -> Result<(), KeyError> {
        self.write(key, Write::value(value))
    }

    /// A client's write (a value, an expiry, or both): given its epoch here, then merged. A
    /// value of another type than the live one is refused, as a plain merge would be.
    fn write(&mut self, key: Key, write: Write) -> Result<(), KeyError> {
        self.owns(&key)?;
        let now = now_ms();
        let stored = self.store.get(&key);
        if let (Some(live), Some(value)) = (stored.and_then(|s| s.live(now)), &write.value) {
            live.check_mergeable(value)?;
        }
        match write.lift(stored, now, self.config.tombstone_grace_ms) {
            Some(entry) => self.merge_entry(key, entry),
            None => self.placed(&key),
        }
    }

    /// Whether this node counts as a replica's copy of `key` (a node that is not the key's
    /// replica still keeps what it is sent, and its agent hands it to the replicas).
    fn placed(&mut self, key: &str) -> Result<(), KeyError> {
        if self.cluster.is_some() {
            self.load.count(key);
            self.replicas.check(key)
        } else {
            Ok(())
        }
    }

    /// Merges one entry exactly. The record is appended before the merge (the entry moves
    /// into the map) and taken back if the merge changed nothing.
    fn merge_entry(&mut self, key: Key, value: Entry) -> Result<(), KeyError> {
        self.owns(&key)?;
        let placed = self.placed(&key);
        let not_durable = |e: crate::Error| KeyError::NotDurable {
            reason: e.to_string(),
        };
        if let Some(log) = &self.log {
            if log.pending_bytes() > MAX_PENDING_BYTES {
                return Err(KeyError::NotDurable {
                    reason: "the log is failing; writes are refused until it recovers".into(),
                });
            }
        }
        match self.store.get_mut(&key) {
            Some(stored) => {
                stored.check_mergeable(&value)?;
                if value
                    .value
                    .as_ref()
                    .is_some_and(LatticeValue::may_exceed_limits)
                {
                    // Causal siblings accumulate: refuse a merge the store could not read back.
                    if let Some(merged) = stored.clone().join(value.clone()).value {
                        merged.check_limits()?;
                    }
                }
                match &mut self.log {
                    Some(log) => {
                        let mark = log.mark();
                        log.append(&key, &value).map_err(not_durable)?;
                        if stored.merge(value) {
                            self.touched(&key);
                        } else {
                            log.rewind(mark);
                        }
                    }
                    None => {
                        if stored.merge(value) {
                            self.touched(&key);
                        }
                    }
                }
            }
            None => {
                if let Some(log) = &mut self.log {
                    log.append(&key, &value).map_err(not_durable)?;
                }
                let deadline = Deadlines::of_entry(&value, self.config.tombstone_grace_ms);
                self.changed_with(&key, deadline);
                self.store.insert(key, value);
            }
        }
        placed
    }

    /// Notes that `key` changed: for subscribers, for gossip, and for its deadline.
    fn touched(&mut self, key: &Key) {
        let grace = self.config.tombstone_grace_ms;
        let deadline = self
            .store
            .get(key)
            .and_then(|entry| Deadlines::of_entry(entry, grace));
        self.changed_with(key, deadline);
    }

    /// Notes that `key` changed and now needs work at `deadline`.
    fn changed_with(&mut self, key: &Key, deadline: Option<u64>) {
        self.deadlines.set(key, deadline);
        self.subscriptions.touched(key);
        if self.cluster.is_some() && self.changed.len() < MAX_CHANGED {
            self.changed.insert(key.clone());
        }
    }

    /// Commits the batch's log records, then sends every reply of the batch.
    fn commit_and_reply(&mut self, outbox: &mut Vec<Envelope>) {
        if outbox.is_empty() {
            return;
        }
        let committed = match &mut self.log {
            Some(log) => log.commit().map_err(|e| {
                tracing::error!(shard = self.index, cause = %e, "log commit failed; writes not acknowledged");
                e.to_string()
            }),
            None => Ok(()),
        };
        if committed.is_ok() {
            self.subscriptions.push(&self.store, self.index);
        }
        if let Some(shared) = &self.cluster {
            // Before the replies, so whoever reads it after an answer sees the batch counted.
            if let Some(keys) = shared.keys.get(self.index as usize) {
                keys.store(self.store.len() as u64, Ordering::Release);
            }
        }
        if committed.is_ok() {
            self.durable_seq = self.journal.last_seq();
        }
        for envelope in outbox.drain(..) {
            let Envelope {
                identity,
                delimited,
                reply,
            } = envelope;
            let frame = match (reply, &committed) {
                (Outgoing::Ready(frame), _) => frame,
                (Outgoing::Get { id, values }, Ok(())) => encode(id, &Response::Get(values)),
                (Outgoing::Get { id, .. }, Err(reason)) => encode(
                    id,
                    &Response::Error(RequestError::Unavailable {
                        reason: reason.clone(),
                    }),
                ),
                (Outgoing::Put { id, results }, Ok(())) => encode(id, &Response::Put(results)),
                (Outgoing::Keys { id, keys, more }, Ok(())) => {
                    encode(id, &Response::Keys { keys, more })
                }
                (Outgoing::Changes { id, on }, Ok(())) => encode(
                    id,
                    &Response::Changes {
                        changes: Vec::new(),
                        lost: 0,
                        on,
                    },
                ),
                (Outgoing::Committed { frame, .. }, Ok(())) => frame,
                (Outgoing::Committed { id, .. }, Err(reason)) => encode(
                    id,
                    &Response::Error(RequestError::Unavailable {
                        reason: reason.clone(),
                    }),
                ),
                (Outgoing::Await { id, after, .. }, Ok(())) if after < self.durable_seq => {
                    self.journaled(id)
                }
                (Outgoing::Await { id, after, until }, Ok(())) => {
                    if self.awaiting.len() < MAX_AWAITING {
                        self.awaiting.push(Awaiting {
                            identity,
                            delimited,
                            id,
                            after,
                            until,
                        });
                        continue;
                    }
                    // Refused, not answered early: the waiter backs off instead of asking
                    // again at once.
                    encode(
                        id,
                        &Response::Error(RequestError::Unavailable {
                            reason: format!("{MAX_AWAITING} waits are held already"),
                        }),
                    )
                }
                (Outgoing::Changes { id, .. } | Outgoing::Await { id, .. }, Err(reason)) => encode(
                    id,
                    &Response::Error(RequestError::Unavailable {
                        reason: reason.clone(),
                    }),
                ),
                (Outgoing::Keys { id, .. }, Err(reason)) => encode(
                    id,
                    &Response::Error(RequestError::Unavailable {
                        reason: reason.clone(),
                    }),
                ),
                (
                    Outgoing::Subscribed {
                        id,
                        values,
                        session,
                    },
                    Ok(()),
                ) => encode(id, &Response::Subscribed { values, session }),
                (Outgoing::Subscribed { id, .. }, Err(reason)) => encode(
                    id,
                    &Response::Error(RequestError::Unavailable {
                        reason: reason.clone(),
                    }),
                ),
                (Outgoing::Put { id, results }, Err(reason)) => {
                    let failed = results
                        .into_iter()
                        .map(|r| {
                            r.and(Err(KeyError::NotDurable {
                                reason: reason.clone(),
                            }))
                        })
                        .collect();
                    encode(id, &Response::Put(failed))
                }
            };
            self.send(identity, delimited, frame);
        }
        if committed.is_ok() {
            self.answer_awaiting();
        }
    }

    /// Sends one reply.
    fn send(&self, identity: zmq::Message, delimited: bool, frame: Vec<u8>) {
        let sent = self
            .socket
            .send(identity, zmq::SNDMORE)
            .and_then(|()| {
                if delimited {
                    self.socket.send(&[][..], zmq::SNDMORE)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| self.socket.send(frame, 0));
        if let Err(e) = sent {
            tracing::debug!(shard = self.index, cause = %e, "reply not sent (client gone?)");
        }
    }

    /// The answer to an AWAIT-CHANGE: the newest sequence number known durable.
    fn journaled(&self, id: RequestId) -> Vec<u8> {
        encode(
            id,
            &Response::Journaled {
                newest: self.durable_seq,
                on: self.journal.is_on(),
            },
        )
    }

    /// Answers the held AWAIT-CHANGE requests that a newer durable change or their time is
    /// up for.
    fn answer_awaiting(&mut self) {
        if self.awaiting.is_empty() {
            return;
        }
        let newest = self.durable_seq;
        let now = Instant::now();
        let mut i = 0;
        while i < self.awaiting.len() {
            let waiter = &self.awaiting[i];
            if waiter.after < newest || waiter.until <= now {
                let waiter = self.awaiting.swap_remove(i);
                let frame = self.journaled(waiter.id);
                self.send(waiter.identity, waiter.delimited, frame);
            } else {
                i += 1;
            }
        }
    }

    /// Reaps the keys whose expiry passed into tombstones, and forgets the tombstones whose
    /// grace ended, up to [`EXPIRY_BUDGET`] keys. Neither writes the log: replaying it
    /// brings back the same expired entries, which are reaped again.
    fn expire_due(&mut self) {
        let now = now_ms();
        let grace = self.config.tombstone_grace_ms;
        for _ in 0..EXPIRY_BUDGET {
            let Some(key) = self.deadlines.pop_due(now) else {
                break;
            };
            let Some(entry) = self.store.get_mut(&key) else {
                continue;
            };
            entry.reap(now);
            if entry.reclaimable(now, grace) {
                self.store.remove(&key);
                self.changed.remove(&key);
            } else {
                let deadline = Deadlines::of_entry(entry, grace);
                self.deadlines.set(&key, deadline);
            }
        }
    }

    /// Notes the deadline of every key held (after recovery).
    pub(crate) fn index_deadlines(&mut self) {
        let grace = self.config.tombstone_grace_ms;
        for (key, entry) in &self.store {
            self.deadlines.set(key, Deadlines::of_entry(entry, grace));
        }
    }

    /// Periodic work between batches: expiry, interval fsync, and compaction one slice at a
    /// time.
    fn maintain(&mut self) {
        self.answer_awaiting();
        self.subscriptions.expire(self.index);
        self.expire_due();
        let Some(log) = &mut self.log else {
            return;
        };
        if let Err(e) = log.tick() {
            tracing::error!(shard = self.index, cause = %e, "periodic log sync failed");
        }
        let may_start = self.snapshot_not_before.is_none_or(|t| Instant::now() >= t);
        if self.snapshot.is_none() && may_start && log.needs_compaction() {
            match log.begin_snapshot() {
                Ok(snapshot) => self.snapshot = Some(snapshot),
                Err(e) => {
                    tracing::error!(shard = self.index, cause = %e, "could not start a snapshot");
                    self.snapshot_not_before = Some(Instant::now() + SNAPSHOT_RETRY);
                }
            }
        }
        let Some(snapshot) = &mut self.snapshot else {
            return;
        };
        match log.write_snapshot_slice(snapshot, &self.store, SNAPSHOT_SLICE_BYTES) {
            Ok(false) => {}
            Ok(true) => {
                let finished = self.snapshot.take().map(|s| log.finish_snapshot(s));
                match finished.map(|r| r.and_then(|old| remove_files(&old))) {
                    Some(Ok(())) => tracing::info!(
                        shard = self.index,
                        keys = self.store.len(),
                        "compacted the log into a snapshot"
                    ),
                    Some(Err(e)) => {
                        tracing::error!(shard = self.index, cause = %e, "compaction failed");
                        self.snapshot_not_before = Some(Instant::now() + SNAPSHOT_RETRY);
                    }
                    None => {}
                }
            }
            Err(e) => {
                // Dropping the snapshot deletes its temporary file; the log goes on.
                tracing::error!(shard = self.index, cause = %e, "snapshot failed");
                self.snapshot = None;
                self.snapshot_not_before = Some(Instant::now() + SNAPSHOT_RETRY);
            }
        }
    }
}

/// Refuses a client's or a peer's write of one of the journal's own keys.
fn refuse_journal_key(key: &str) -> Result<(), KeyError> {
    if journal::is_journal_key(key) {
        return Err(KeyError::Reserved {
            key: key.to_string(),
        });
    }
    Ok(())
}

fn encode(id: RequestId, response: &Response) -> Vec<u8> {
    encode_response(id, response).unwrap_or_else(|e| {
        tracing::error!(cause = %e, "could not encode a response");
        let fallback = Response::Error(RequestError::Malformed {
            reason: format!("response could not be encoded: {e}"),
        });
        encode_response(id, &fallback).unwrap_or_default()
    })
}

/// How many keys a request names, against the per-request limit. Scans answer at most
/// `SCAN_BYTES` whatever their limit, so only their named keys count.
fn key_count(request: &Request) -> usize {
    match request {
        Request::Get { keys } => keys.len(),
        Request::Put { entries } | Request::PutChained { entries, .. } => entries.len(),
        Request::Write { entries } => entries.len(),
        Request::Merge { entries } | Request::Copy { entries } => entries.len(),
        Request::Drop { entries } => entries.len(),
        Request::Subscribe { keys, .. } | Request::Unsubscribe { keys, .. } => keys.len(),
        Request::Scan { only, .. } => only.len(),
        Request::Routed { .. }
        | Request::Changed { .. }
        | Request::Topology
        | Request::Join { .. }
        | Request::Leave { .. }
        | Request::Status
        | Request::Stats { .. }
        | Request::Replicate { .. }
        | Request::Changes { .. }
        | Request::AwaitChange { .. }
        | Request::Journal { .. }
        | Request::List { .. }
        | Request::Sizes { .. } => 0,
    }
}

fn error_reply(id: RequestId, error: RequestError) -> Outgoing {
    Outgoing::Ready(encode(id, &Response::Error(error)))
}
