//! The KVS client: routes keys to shards, batches, and never waits without a deadline.
//!
//! A [`Client`] asks the node it is given for its shard layout, builds the same ring, and sends
//! each key straight to its shard over one ZeroMQ connection per shard.
//!
//! Given a cluster's router (or any member), the client fetches the cluster's view and finds
//! every key's replicas itself (see [`crate::placement`]): a write goes to every replica at once
//! and succeeds once [`ClientConfig::acks`] of them applied it (a majority by default); a read
//! needs answers from `replicas − acks + 1` of them, so that it overlaps every acknowledged
//! write, and merges them (a lattice join). In a settled view it asks just that many, in turn;
//! otherwise it asks every replica, so that one that has not received a key yet (a node that
//! just joined) cannot hide it. Reads and writes carry the view's generation: a node with a
//! newer view, or that is not a key's replica, answers `WrongNode`, and the client fetches the
//! view again and retries, as it does when a replica does not answer, until the call's time
//! budget (`attempts × timeout`) runs out. A
//! multi-key call sends one request per shard at once and then collects the answers. Every wait
//! is bounded by [`ClientConfig::timeout`]; an unanswered request is retried, on a fresh
//! connection (so a reply that arrives late can never be mistaken for the next one's), up to
//! [`ClientConfig::attempts`] times. Retrying is always safe: every write is a lattice merge,
//! and [`Client::increment`] sends totals, not deltas.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use squall_lattices::entry::expires_at;
use squall_lattices::{Counter, Entry, Lattice, LatticeValue, Lww, Timestamp, Write, WriterId};
use squall_proto::secret::ClusterSecret;
use squall_proto::{Key, KeyError, Request, RequestError, RequestId, Response, Topology};

use crate::exchange::{exchange, round_trip, Exchanged, Retry, MAX_TIMEOUT, RETRY_PAUSE};
use crate::placement::Placement;
use crate::ring::Ring;
use crate::zmtp::Connection;
use crate::{Error, Result};

/// How often a client using an unsettled cluster view fetches it again.
const UNSETTLED_REFRESH: Duration = Duration::from_millis(500);
/// Shards and virtual nodes accepted in a node's layout: a bound on the ring a client builds.
const MAX_SHARDS: usize = 4096;
const MAX_VIRTUAL_NODES: u32 = 65_536;
/// A page of a listing: keys, each with an item, in key order, and the key to ask from next
/// (`None`: no more).
pub type Page<T> = (Vec<(Key, T)>, Option<Key>);

/// Keys asked per page by [`Client::stored_bytes`].
const STORED_BYTES_PAGE: u32 = 5_000;

/// How a client waits and retries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// How long to wait for one attempt's answer (default 2 s; at most a day).
    pub timeout: Duration,
    /// How many times a request is sent before giving up (default 3). One round trip fails
    /// after at most `attempts × timeout`; a call whose layout turns out stale refreshes it
    /// and tries again once, so it can take up to four times that.
    pub attempts: u32,
    /// The writer id stamped on this client's writes (default: random).
    pub writer: WriterId,
    /// In a cluster, how many of a key's replicas must apply a write before it succeeds
    /// (default: a majority).
    pub acks: Acks,
    /// The cluster secret presented to the nodes (default: the process's, if one was
    /// installed; see [`squall_proto::secret`]).
    pub secret: Option<ClusterSecret>,
}

impl ClientConfig {
    /// How an exchange of this client connects, waits and retries.
    pub(crate) fn retry(&self) -> Retry {
        Retry {
            timeout: self.timeout,
            attempts: self.attempts,
            secret: self.secret.clone(),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            attempts: 3,
            writer: rand::random(),
            acks: Acks::Majority,
            secret: ClusterSecret::installed(),
        }
    }
}

/// How many replicas must acknowledge a write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Acks {
    /// More than half of the key's replicas (2 of 2, 2 of 3): with reads merging every
    /// replica, a read after an acknowledged write sees it while any one node is down.
    #[default]
    Majority,
    /// Every replica.
    All,
    /// This many (at least 1, at most the key's replicas): 1 is Anna's default.
    Count(u32),
}

impl Acks {
    /// Acknowledgements needed of `replicas` replicas.
    pub fn needed(self, replicas: usize) -> usize {
        let needed = match self {
            Acks::Majority => replicas / 2 + 1,
            Acks::All => replicas,
            Acks::Count(n) => n as usize,
        };
        needed.clamp(1, replicas.max(1))
    }
}

impl std::str::FromStr for Acks {
    type Err = Error;

    /// `majority`, `all`, or a number.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "majority" => Ok(Acks::Majority),
            "all" => Ok(Acks::All),
            n => n
                .parse::<u32>()
                .ok()
                .filter(|&n| n > 0)
                .map(Acks::Count)
                .ok_or_else(|| {
                    Error::Config(format!(
                        "acks must be majority, all or a positive number, not {n:?}"
                    ))
                }),
        }
    }
}

/// One member's shards among the layout's endpoints.
struct MemberRoute {
    first: usize,
    ring: Ring,
}

struct Layout {
    topology: Topology,
    /// When the layout was fetched.
    fetched: Instant,
    /// The cluster's placement; `None` for a node that runs alone.
    placement: Option<Placement>,
    members: Vec<MemberRoute>,
    endpoints: Vec<String>,
    connections: Vec<Option<Connection>>,
}

impl Layout {
    fn generation(&self) -> u64 {
        self.placement.as_ref().map_or(0, Placement::generation)
    }

    /// Fills `out` with the endpoint indices `key` is sent to for a call of `kind`, and returns
    /// how many of them must answer. Writes go to every replica. Reads go to every replica
    /// while the view is unsettled (or `all` is set, after a failed round), and otherwise to
    /// as many as overlap every write's acknowledgements (`replicas − acks + 1`), chosen by
    /// `spin` so that load spreads over the replicas.
    #[allow(clippy::too_many_arguments)]
    fn targets(
        &self,
        key: &str,
        kind: Kind,
        acks: Acks,
        all: bool,
        spin: usize,
        scratch: &mut Vec<usize>,
        out: &mut Vec<usize>,
    ) -> usize {
        out.clear();
        let (writes, settled) = match &self.placement {
            Some(placement) => {
                placement.replicas(key, scratch);
                // A hot key's extra replicas spread its reads: writes reach all of them, so
                // one read suffices.
                let writes = if placement.has_override(key) && acks == Acks::Majority {
                    scratch.len()
                } else {
                    acks.needed(scratch.len())
                };
                (writes, placement.settled())
            }
            None => {
                scratch.clear();
                scratch.push(0);
                (1, true)
            }
        };
        let replicas = scratch.len();
        // Enough answers to overlap every acknowledged write, however many are asked.
        let reads = replicas + 1 - writes.min(replicas);
        let (first, count, needed) = match kind {
            Kind::Write => (0, replicas, writes),
            Kind::Read if settled && !all => (spin % replicas.max(1), reads, reads),
            Kind::Read => (0, replicas, reads),
            Kind::Subscribe | Kind::Release => (0, replicas, 1),
        };
        for i in 0..count {
            let route = &self.members[scratch[(first + i) % replicas]];
            out.push(route.first + route.ring.owner(key) as usize);
        }
        needed
    }
}

/// What one call is, for deciding when it succeeded.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Merge the answers of enough replicas to overlap every acknowledged write.
    Read,
    /// Watch every replica (each pushes its own changes); one answer suffices.
    Subscribe,
    /// Count acknowledgements against [`ClientConfig::acks`].
    Write,
    /// One acknowledgement suffices.
    Release,
}

/// A connection to one storage node: one TCP connection per shard, opened on first use, and
/// no background thread. `Send` but not `Sync`: give each thread its own.
pub struct Client {
    seed: String,
    /// The cluster's members as last seen: asked for the view when the seed does not answer.
    fallback_seeds: Vec<String>,
    config: ClientConfig,
    layout: Option<Layout>,
    next_id: RequestId,
    last_time: u64,
    /// This writer's own contribution to each counter it has incremented.
    counters: HashMap<Key, Counter>,
    /// Sessions reported by the shards in the last routed call (subscriptions only).
    sessions: Vec<ShardSession>,
    /// Turns the replica a read starts at, so reads spread over replicas.
    spin: usize,
}

/// A shard's session for a subscriber (see [`Response::Subscribed`]): when it changes, the
/// shard forgot the subscriber and pushes may have been missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardSession {
    /// The shard's endpoint.
    pub shard: String,
    /// The session number.
    pub session: u64,
}

/// What [`Client::subscribe`] returns.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The keys' entries, in order (merged over the replicas read): what a cache keeps, so
    /// that it can merge later pushes, deletes among them. [`Entry::live`] is the value.
    pub values: Vec<Option<Entry>>,
    /// The session of every shard that answered.
    pub sessions: Vec<ShardSession>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("seed", &self.seed)
            .field("writer", &self.config.writer)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the node at `address` (a ZeroMQ endpoint such as `tcp://127.0.0.1:7100`)
    /// and fetches its layout.
    pub fn connect(address: &str, config: ClientConfig) -> Result<Self> {
        let mut client = Self {
            seed: address.to_string(),
            fallback_seeds: Vec::new(),
            config,
            layout: None,
            next_id: rand::random::<u32>() as u64,
            last_time: 0,
            counters: HashMap::new(),
            sessions: Vec::new(),
            spin: rand::random::<u32>() as usize,
        };
        client.refresh()?;
        Ok(client)
    }

    /// The writer id stamped on this client's writes.
    pub fn writer(&self) -> WriterId {
        self.config.writer
    }

    /// The node's layout, as last fetched.
    pub fn topology(&self) -> Option<&Topology> {
        self.layout.as_ref().map(|l| &l.topology)
    }

    /// Reads a key: `None` if it was never written, was deleted or has expired.
    pub fn get(&mut self, key: &str) -> Result<Option<LatticeValue>> {
        let mut values = self.get_many(&[key.to_string()])?;
        Ok(values.pop().flatten())
    }

    /// Reads several keys at once (one request per shard, in parallel), in order.
    pub fn get_many(&mut self, keys: &[Key]) -> Result<Vec<Option<LatticeValue>>> {
        Ok(self
            .read_entries(keys)?
            .into_iter()
            .map(|entry| entry.and_then(Entry::into_live_now))
            .collect())
    }

    /// The entries the replicas hold for `keys` (one request per shard, in parallel), in
    /// order, dead ones included.
    fn read_entries(&mut self, keys: &[Key]) -> Result<Vec<Option<Entry>>> {
        let results = self.routed(
            keys.len(),
            |i| keys[i].as_str(),
            |indices| Request::Get {
                keys: indices.iter().map(|&i| keys[i].clone()).collect(),
            },
            Kind::Read,
        )?;
        entries_of(results, keys)
    }

    /// Reads several keys' entries at once, in order: each live key's value with its expiry
    /// (`None`: absent, deleted or expired now), for moving keys as they are, expiry included
    /// (merge them elsewhere with [`Client::merge_many`]).
    pub fn get_entries(&mut self, keys: &[Key]) -> Result<Vec<Option<Entry>>> {
        let now = squall_lattices::entry::now_ms();
        Ok(self
            .read_entries(keys)?
            .into_iter()
            .map(|entry| entry.filter(|e| e.live(now).is_some()))
            .collect())
    }

    /// Merges `value` into `key`. Fails with [`Error::Key`] if the key holds another lattice
    /// type (the stored value is then unchanged).
    pub fn put(&mut self, key: &str, value: LatticeValue) -> Result<()> {
        let results = self.put_many(vec![(key.to_string(), value)])?;
        one_result(key, results)
    }

    /// Merges several values at once; returns one result per entry, in order.
    pub fn put_many(
        &mut self,
        entries: Vec<(Key, LatticeValue)>,
    ) -> Result<Vec<Result<(), KeyError>>> {
        self.write_routed(entries, |entries| Request::Put { entries })
    }

    /// Merges `value` into `key` for a call `chain` `kv-change` deliveries deep (0: a write
    /// from outside any trigger's call, an ordinary [`Client::put`]): the store journals the
    /// write with that depth, so the triggers it fires can stop a loop.
    pub fn put_in_chain(&mut self, key: &str, value: LatticeValue, chain: u32) -> Result<()> {
        let entries = vec![(key.to_string(), value)];
        let results = if chain == 0 {
            self.put_many(entries)?
        } else {
            self.write_routed(entries, |entries| Request::PutChained { chain, entries })?
        };
        one_result(key, results)
    }

    /// Several writes with expiries (or expiries alone) at once; one result per entry.
    pub fn write_many(&mut self, entries: Vec<(Key, Write)>) -> Result<Vec<Result<(), KeyError>>> {
        self.write_routed(entries, |entries| Request::Write { entries })
    }

    /// Merges entries exactly as given (tombstones, copies between stores); one result per
    /// entry.
    pub fn merge_many(&mut self, entries: Vec<(Key, Entry)>) -> Result<Vec<Result<(), KeyError>>> {
        self.write_routed(entries, |entries| Request::Merge { entries })
    }

    /// Merges entries as a replica's copies are merged: like [`Client::merge_many`], but no
    /// shard journals them, so nothing fires a `kv-change` trigger. For moving keys, never for
    /// clients' writes.
    pub fn copy_many(&mut self, entries: Vec<(Key, Entry)>) -> Result<Vec<Result<(), KeyError>>> {
        self.write_routed(entries, |entries| Request::Copy { entries })
    }

    /// A tombstone stamped now by this client's clock (see [`Client::delete`]).
    pub fn tombstone(&mut self) -> Entry {
        Entry::tombstone(self.next_timestamp())
    }

    /// Deletes `key` as of now (a tombstone at this client's clock): a write stamped later
    /// survives it, see [`squall_lattices::entry`]. Deleting an absent key stores a tombstone
    /// all the same (until it is reclaimed), so that a copy on its way cannot bring it back.
    pub fn delete(&mut self, key: &str) -> Result<()> {
        // This writer's counter contributions belong to the deleted epoch: later increments
        // count from nothing.
        self.counters.remove(key);
        let at = self.next_timestamp();
        let results = self.merge_many(vec![(key.to_string(), Entry::tombstone(at))])?;
        one_result(key, results)
    }

    /// Writes `value` as a last-writer-wins register that expires after `ttl` (`None`: never,
    /// which also clears an earlier expiry).
    pub fn put_lww_expiring(
        &mut self,
        key: &str,
        value: impl Into<Bytes>,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let at = self.next_timestamp();
        self.put_expiring(key, LatticeValue::Lww(Lww::new(at, value.into())), ttl)
    }

    /// Merges `value` into `key` and sets the key to expire after `ttl` (`None`: never).
    pub fn put_expiring(
        &mut self,
        key: &str,
        value: LatticeValue,
        ttl: Option<Duration>,
    ) -> Result<()> {
        let at = self.next_timestamp();
        let write = Write::expiring(value, at, ttl);
        let results = self.write_many(vec![(key.to_string(), write)])?;
        one_result(key, results)
    }

    /// Sets when `key` expires: after `ttl`, or never (`None`). A key that is absent, deleted
    /// or expired is left alone.
    pub fn expire(&mut self, key: &str, ttl: Option<Duration>) -> Result<()> {
        let at = self.next_timestamp();
        let write = Write {
            value: None,
            expiry: Some(Lww::new(at, expires_at(ttl))),
        };
        let results = self.write_many(vec![(key.to_string(), write)])?;
        one_result(key, results)
    }

    /// Up to `limit` live keys starting with `prefix`, after `after`, in key order, over every
    /// shard (of every member, in a cluster); and, if more may follow, the key to list after
    /// next (the last key looked at, which a cluster's listing may have left out as dead).
    pub fn list(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<Key>, Option<Key>)> {
        if limit == 0 {
            return Ok((Vec::new(), None));
        }
        let request = Request::List {
            prefix: prefix.to_string(),
            after: after.map(str::to_string),
            limit,
        };
        let (listed, next) =
            self.page_of_every_shard(&request, limit, |response| match response {
                Response::Keys { keys, more } => {
                    Ok((keys.into_iter().map(|k| (k, ())).collect(), more))
                }
                other => Err(other),
            })?;
        Ok((listed.into_iter().map(|(key, ())| key).collect(), next))
    }

    /// Up to `limit` live keys that start with `prefix`, after `after`, in key order, each
    /// with the bytes it takes in the store (its length and its entry's encoded size; in a
    /// cluster, the largest of its replicas' copies), and the key to ask from next, as
    /// [`Client::list`] pages.
    pub fn sizes(&mut self, prefix: &str, after: Option<&str>, limit: u32) -> Result<Page<u64>> {
        if limit == 0 {
            return Ok((Vec::new(), None));
        }
        let request = Request::Sizes {
            prefix: prefix.to_string(),
            after: after.map(str::to_string),
            limit,
        };
        self.page_of_every_shard(&request, limit, |response| match response {
            Response::Sizes { sizes, more } => Ok((sizes, more)),
            other => Err(other),
        })
    }

    /// The keys that start with `prefix` and the bytes they take, all pages of
    /// [`Client::sizes`] summed: what a namespace stores. Costs a read of every such key's
    /// size on every shard (and a read of each key in a cluster, see [`Client::list`]).
    pub fn stored_bytes(&mut self, prefix: &str) -> Result<(u64, u64)> {
        let (mut keys, mut bytes) = (0u64, 0u64);
        let mut after: Option<Key> = None;
        loop {
            let (page, next) = self.sizes(prefix, after.as_deref(), STORED_BYTES_PAGE)?;
            keys += page.len() as u64;
            bytes = page
                .iter()
                .fold(bytes, |sum, (_, size)| sum.saturating_add(*size));
            match next {
                Some(next) => after = Some(next),
                None => return Ok((keys, bytes)),
            }
        }
    }

    /// Sends a paged request (LIST or SIZES) to every shard and merges the pages: items in
    /// key order, one per key (of replicas' copies, the greatest item), at most `limit`, and
    /// the key to ask from next (`None`: no more). In a cluster, keys that a read finds
    /// deleted are left out.
    fn page_of_every_shard<T: Ord>(
        &mut self,
        request: &Request,
        limit: u32,
        page: impl Fn(Response) -> std::result::Result<(Vec<(Key, T)>, bool), Response>,
    ) -> Result<Page<T>> {
        let (exchanged, clustered) = self.send_to_every_shard(request)?;
        // In a cluster every key is on several nodes: a member that does not answer (it may
        // have just died) leaves its keys to the others.
        let responses: Vec<Response> = if clustered {
            exchanged.responses.into_iter().flatten().collect()
        } else {
            exchanged.into_all()?
        };
        let mut items = Vec::new();
        // A shard with more stopped at its last key: nothing past the first such stop is
        // complete (a shard may stop short of `limit`, as a SIZES page does at its byte cap).
        let mut cut: Option<Key> = None;
        for response in responses {
            match page(response) {
                Ok((some, more)) => {
                    if let (true, Some((last, _))) = (more, some.last()) {
                        if cut.as_ref().is_none_or(|cut| last < cut) {
                            cut = Some(last.clone());
                        }
                    }
                    items.extend(some);
                }
                Err(Response::Error(e)) => return Err(Error::Request(e)),
                Err(other) => {
                    return Err(Error::UnexpectedResponse(format!(
                        "a {} answered {}",
                        request.kind(),
                        other.kind()
                    )))
                }
            }
        }
        // Greatest first within a key, so the dedup keeps it.
        items.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(&a.1)));
        items.dedup_by(|later, kept| later.0 == kept.0);
        let mut more = cut.is_some();
        if let Some(cut) = &cut {
            items.retain(|(key, _)| key <= cut);
        }
        if items.len() > limit as usize {
            items.truncate(limit as usize);
            more = true;
        }
        let next = if more {
            items.last().map(|(key, _)| key.clone())
        } else {
            None
        };
        if clustered && !items.is_empty() {
            // A replica that missed a delete, or a copy left on a node that is no longer a
            // replica, lists a key its replicas have deleted: keep the keys a read finds.
            let keys: Vec<Key> = items.iter().map(|(key, _)| key.clone()).collect();
            let values = self.get_many(&keys)?;
            let mut live = values.iter().map(Option::is_some);
            items.retain(|_| live.next().unwrap_or(false));
        }
        Ok((items, next))
    }

    /// Every shard's endpoint (every member's, in a cluster), in the layout's order: what
    /// [`Client::changes`] reads from.
    pub fn shard_endpoints(&mut self) -> Result<Vec<String>> {
        if self.layout.is_none() {
            self.refresh()?;
        }
        Ok(self
            .layout
            .as_ref()
            .map(|layout| layout.endpoints.clone())
            .unwrap_or_default())
    }

    /// Every shard's load report (keys and bytes held, accesses), in the layout's order.
    /// Fails unless every shard answered.
    pub fn stats(&mut self) -> Result<Vec<squall_proto::LoadReport>> {
        let (exchanged, _) = self.send_to_every_shard(&Request::Stats { top: 0 })?;
        exchanged
            .into_all()?
            .into_iter()
            .map(|response| match response {
                Response::Stats(report) => Ok(report),
                Response::Error(e) => Err(Error::Request(e)),
                other => Err(Error::UnexpectedResponse(format!(
                    "a {} to a stats request",
                    other.kind()
                ))),
            })
            .collect()
    }

    /// Switches every shard's change journal on or off, durably (see
    /// [`crate::journal`]). Fails unless every shard answered.
    pub fn journal(&mut self, on: bool) -> Result<()> {
        let (exchanged, _) = self.send_to_every_shard(&Request::Journal { on })?;
        for response in exchanged.into_all()? {
            match response {
                Response::Changes { on: now, .. } if now == on => {}
                Response::Error(e) => return Err(Error::Request(e)),
                other => {
                    return Err(Error::UnexpectedResponse(format!(
                        "a journal switch answered {}",
                        other.kind()
                    )))
                }
            }
        }
        Ok(())
    }

    /// The changes the shard at `endpoint` journaled after sequence number `after` (at most
    /// `limit`, oldest first), which also forgets those up to `after`; how many it had to
    /// drop since it last answered; and whether it journals.
    pub fn changes(
        &mut self,
        endpoint: &str,
        after: u64,
        limit: u32,
    ) -> Result<(Vec<squall_proto::Change>, u64, bool)> {
        match self.ask_shard(endpoint, Request::Changes { after, limit })? {
            Response::Changes { changes, lost, on } => Ok((changes, lost, on)),
            Response::Error(e) => Err(Error::Request(e)),
            other => Err(Error::UnexpectedResponse(format!(
                "a changes request answered {}",
                other.kind()
            ))),
        }
    }

    /// Waits until the shard at `endpoint` has journaled a change with a sequence number
    /// above `after`, or `wait` passed (at most [`squall_proto::MAX_AWAIT_MS`] and half this
    /// client's timeout); the newest sequence number the shard gave, and whether it
    /// journals. Forgets nothing.
    pub fn await_change(
        &mut self,
        endpoint: &str,
        after: u64,
        wait: Duration,
    ) -> Result<(u64, bool)> {
        let wait = wait.min(self.config.timeout / 2);
        let request = Request::AwaitChange {
            after,
            wait_ms: u32::try_from(wait.as_millis()).unwrap_or(u32::MAX),
        };
        match self.ask_shard(endpoint, request)? {
            Response::Journaled { newest, on } => Ok((newest, on)),
            Response::Error(e) => Err(Error::Request(e)),
            other => Err(Error::UnexpectedResponse(format!(
                "an await-change request answered {}",
                other.kind()
            ))),
        }
    }

    /// Sends `request` to the shard at `endpoint` of this store; its answer.
    fn ask_shard(&mut self, endpoint: &str, request: Request) -> Result<Response> {
        if self.layout.is_none() {
            self.refresh()?;
        }
        let Some(layout) = self.layout.as_mut() else {
            return Err(Error::UnexpectedResponse("no layout".into()));
        };
        let Some(index) = layout.endpoints.iter().position(|e| e == endpoint) else {
            return Err(Error::Config(format!(
                "{endpoint} is not a shard of this store"
            )));
        };
        let exchanged = exchange(
            &self.config.retry(),
            &mut self.next_id,
            &layout.endpoints,
            &mut layout.connections,
            &[(index, request)],
        )?;
        exchanged
            .into_all()?
            .pop()
            .ok_or_else(|| Error::UnexpectedResponse("no answer from the shard".into()))
    }

    /// A timestamp of this client's clock, later than every one it gave before.
    fn next_timestamp(&mut self) -> Timestamp {
        let now = Timestamp::now(self.config.writer);
        let time = now.time.max(self.last_time + 1);
        self.last_time = time;
        Timestamp::new(time, self.config.writer)
    }

    /// Sends writes of any kind (each key to its replicas) and collects one result per entry.
    fn write_routed<T: Clone>(
        &mut self,
        entries: Vec<(Key, T)>,
        request: impl Fn(Vec<(Key, T)>) -> Request,
    ) -> Result<Vec<Result<(), KeyError>>> {
        let results = self.routed(
            entries.len(),
            |i| entries[i].0.as_str(),
            |indices| request(indices.iter().map(|&i| entries[i].clone()).collect()),
            Kind::Write,
        )?;
        results
            .into_iter()
            .map(|slot| match slot {
                Slot::Written => Ok(Ok(())),
                Slot::Failed(e) => Ok(Err(e)),
                Slot::Value(_) => Err(Error::UnexpectedResponse("a GET answer to a PUT".into())),
            })
            .collect()
    }

    /// Reads `keys` and asks their shards to push every later change of them to `subscriber`,
    /// a ZeroMQ endpoint on which the caller has bound a PULL socket (see
    /// [`crate::subscription`]). Also renews the subscriber's lease on those shards.
    pub fn subscribe(&mut self, subscriber: &str, keys: &[Key]) -> Result<Subscription> {
        let results = self.routed(
            keys.len(),
            |i| keys[i].as_str(),
            |indices| Request::Subscribe {
                subscriber: subscriber.to_string(),
                keys: indices.iter().map(|&i| keys[i].clone()).collect(),
            },
            Kind::Subscribe,
        )?;
        self.note_generation();
        Ok(Subscription {
            values: entries_of(results, keys)?,
            sessions: std::mem::take(&mut self.sessions),
        })
    }

    /// Renews `subscriber`'s lease on every shard of the node (of every member, in a cluster)
    /// and returns their sessions. In a cluster, the sessions include one for the view
    /// (shard [`VIEW_SESSION`], the view's generation): when it changes, keys may have moved
    /// to replicas that do not know the subscriber, so what it holds must be treated as stale.
    pub fn renew(&mut self, subscriber: &str) -> Result<Vec<ShardSession>> {
        let (exchanged, clustered) = self.send_to_every_shard(&Request::Subscribe {
            subscriber: subscriber.to_string(),
            keys: Vec::new(),
        })?;
        let Some(layout) = self.layout.as_ref() else {
            return Err(Error::UnexpectedResponse("no layout".into()));
        };
        let exchanged = if clustered {
            exchanged
        } else {
            exchanged.complete()?
        };
        let mut sessions = Vec::new();
        let mut missing = false;
        for (response, shard) in exchanged.responses.into_iter().zip(&layout.endpoints) {
            match response {
                Some(Response::Subscribed { session, .. }) => sessions.push(ShardSession {
                    shard: shard.clone(),
                    session,
                }),
                Some(Response::Error(e)) if !clustered => return Err(Error::Request(e)),
                Some(Response::Error(_)) | None => missing = true,
                Some(other) => {
                    return Err(Error::UnexpectedResponse(format!(
                        "expected a subscription, got {other:?}"
                    )))
                }
            }
        }
        if missing {
            // A member that does not answer may have left the view: look again.
            if let Err(e) = self.refresh() {
                tracing::debug!(cause = %e, "refreshing the cluster view failed");
            }
        }
        self.sessions = sessions;
        self.note_generation();
        Ok(std::mem::take(&mut self.sessions))
    }

    /// Sends `request` to every shard (of every member, in a cluster) at once; what came back,
    /// and whether the layout is a cluster's.
    fn send_to_every_shard(&mut self, request: &Request) -> Result<(Exchanged, bool)> {
        if self.layout.is_none() {
            self.refresh()?;
        }
        let Some(layout) = self.layout.as_mut() else {
            return Err(Error::UnexpectedResponse("no layout".into()));
        };
        let requests: Vec<(usize, Request)> = (0..layout.endpoints.len())
            .map(|shard| (shard, request.clone()))
            .collect();
        let exchanged = exchange(
            &self.config.retry(),
            &mut self.next_id,
            &layout.endpoints,
            &mut layout.connections,
            &requests,
        )?;
        Ok((exchanged, layout.placement.is_some()))
    }

    /// In a cluster, adds the view's pseudo-session to `self.sessions`.
    fn note_generation(&mut self) {
        if let Some(generation) = self
            .layout
            .as_ref()
            .filter(|l| l.placement.is_some())
            .map(Layout::generation)
        {
            self.sessions.push(ShardSession {
                shard: VIEW_SESSION.to_string(),
                session: generation,
            });
        }
    }

    /// The generation of the cluster view in use (0 for a node that runs alone).
    pub fn generation(&self) -> u64 {
        self.layout.as_ref().map_or(0, Layout::generation)
    }

    /// The cluster view in use, if the client talks to a cluster.
    pub fn view(&self) -> Option<&squall_proto::ClusterView> {
        self.layout
            .as_ref()
            .and_then(|l| l.placement.as_ref())
            .map(Placement::view)
    }

    /// Reads `key` from each of its replicas separately (no merge): the member id and what it
    /// holds, or why it did not answer. For operators and tests of replication.
    pub fn get_replicas(
        &mut self,
        key: &str,
    ) -> Result<Vec<(String, Result<Option<LatticeValue>>)>> {
        if self.layout.is_none() {
            self.refresh()?;
        }
        let Some(layout) = self.layout.as_mut() else {
            return Err(Error::UnexpectedResponse("no layout".into()));
        };
        let (mut scratch, mut targets) = (Vec::new(), Vec::new());
        layout.targets(
            key,
            Kind::Subscribe,
            self.config.acks,
            true,
            0,
            &mut scratch,
            &mut targets,
        );
        let ids: Vec<String> = match &layout.placement {
            Some(placement) => scratch
                .iter()
                .map(|&m| placement.members()[m].id.clone())
                .collect(),
            None => vec![self.seed.clone()],
        };
        let requests: Vec<(usize, Request)> = targets
            .iter()
            .map(|&t| {
                (
                    t,
                    Request::Get {
                        keys: vec![key.to_string()],
                    },
                )
            })
            .collect();
        let exchanged = exchange(
            &self.config.retry(),
            &mut self.next_id,
            &layout.endpoints,
            &mut layout.connections,
            &requests,
        )?;
        Ok(ids
            .into_iter()
            .zip(exchanged.responses)
            .map(|(id, response)| {
                let value = match response {
                    Some(Response::Get(mut values)) if values.len() == 1 => {
                        values.pop().map_or(Ok(None), |v| {
                            v.map(|entry| entry.and_then(Entry::into_live_now))
                                .map_err(|error| Error::Key {
                                    key: key.to_string(),
                                    error,
                                })
                        })
                    }
                    Some(Response::Error(e)) => Err(Error::Request(e)),
                    Some(other) => Err(Error::UnexpectedResponse(other.kind().into())),
                    None => Err(Error::UnexpectedResponse(format!(
                        "no answer: {}",
                        exchanged.last_error
                    ))),
                };
                (id, value)
            })
            .collect())
    }

    /// Stops the pushes of `keys` to `subscriber`.
    pub fn unsubscribe(&mut self, subscriber: &str, keys: &[Key]) -> Result<()> {
        let results = self.routed(
            keys.len(),
            |i| keys[i].as_str(),
            |indices| Request::Unsubscribe {
                subscriber: subscriber.to_string(),
                keys: indices.iter().map(|&i| keys[i].clone()).collect(),
            },
            Kind::Release,
        )?;
        for (slot, key) in results.into_iter().zip(keys) {
            if let Slot::Failed(error) = slot {
                return Err(Error::Key {
                    key: key.clone(),
                    error,
                });
            }
        }
        Ok(())
    }

    /// Writes `value` as a last-writer-wins register stamped with this client's clock, which
    /// never goes backwards even if the system clock does.
    pub fn put_lww(&mut self, key: &str, value: impl Into<Bytes>) -> Result<()> {
        let at = self.next_timestamp();
        self.put(key, LatticeValue::Lww(Lww::new(at, value.into())))
    }

    /// Adds `delta` to a counter. Sends this writer's running totals for the key, so a retry
    /// or a duplicate delivery counts once. The delta is recorded before it is sent: if the
    /// call fails, do not add it again; it is carried by this client's next write of the key
    /// (or by calling `increment(key, 0)`).
    pub fn increment(&mut self, key: &str, delta: i64) -> Result<()> {
        let writer = self.config.writer;
        let contribution = self.counters.entry(key.to_string()).or_default();
        contribution.add(writer, delta);
        let value = LatticeValue::Counter(contribution.clone());
        self.put(key, value)
    }

    /// Fetches the node's layout (or the cluster's view) again. In a cluster, if the seed does
    /// not answer, asks the members last seen.
    pub fn refresh(&mut self) -> Result<()> {
        let mut seeds = vec![self.seed.clone()];
        seeds.extend(self.fallback_seeds.iter().cloned());
        let mut first_error = None;
        for seed in seeds {
            match self.fetch_topology(&seed) {
                Ok(topology) => return self.install(topology),
                Err(e) => {
                    tracing::debug!(%seed, cause = %e, "no layout from this seed");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| Error::UnexpectedResponse("no seed to ask".into())))
    }

    fn fetch_topology(&mut self, seed: &str) -> Result<Topology> {
        let endpoints = [seed.to_string()];
        let mut connections = [None];
        let mut responses = round_trip(
            &self.config.retry(),
            &mut self.next_id,
            &endpoints,
            &mut connections,
            &[(0, Request::Topology)],
        )?;
        match responses.pop() {
            Some(Response::Topology(topology)) => Ok(topology),
            Some(Response::Error(e)) => Err(Error::Request(e)),
            other => Err(Error::UnexpectedResponse(format!(
                "expected the topology, got {other:?}"
            ))),
        }
    }

    /// Builds the routes of `topology`, keeping the open connections to endpoints that stay.
    fn install(&mut self, topology: Topology) -> Result<()> {
        let plausible = |shards: usize, vnodes: u32| {
            (1..=MAX_SHARDS).contains(&shards) && (1..=MAX_VIRTUAL_NODES).contains(&vnodes)
        };
        let (placement, nodes) = match &topology.cluster {
            Some(view) if !view.members.is_empty() => {
                Placement::check(view)?;
                let nodes: Vec<(Vec<String>, u32)> = view
                    .members
                    .iter()
                    .map(|m| (m.shards.clone(), m.virtual_nodes))
                    .collect();
                (Some(Placement::new(view.clone())), nodes)
            }
            Some(_) if topology.shards.is_empty() => {
                return Err(Error::UnexpectedResponse(
                    "the cluster has no storage nodes yet".into(),
                ))
            }
            _ => (
                None,
                vec![(topology.shards.clone(), topology.virtual_nodes)],
            ),
        };
        if let Some((shards, vnodes)) = nodes.iter().find(|(s, v)| !plausible(s.len(), *v)) {
            return Err(Error::UnexpectedResponse(format!(
                "implausible layout: {} shards of {vnodes} virtual nodes",
                shards.len()
            )));
        }
        let mut old: HashMap<String, Connection> = HashMap::new();
        if let Some(layout) = self.layout.take() {
            for (endpoint, connection) in layout.endpoints.into_iter().zip(layout.connections) {
                if let Some(connection) = connection {
                    old.insert(endpoint, connection);
                }
            }
        }
        let mut members = Vec::with_capacity(nodes.len());
        let mut endpoints = Vec::new();
        for (shards, vnodes) in nodes {
            members.push(MemberRoute {
                first: endpoints.len(),
                ring: Ring::new(shards.len(), vnodes),
            });
            endpoints.extend(shards);
        }
        let connections = endpoints.iter().map(|e| old.remove(e)).collect();
        if let Some(placement) = &placement {
            self.fallback_seeds = placement.members().iter().map(|m| m.id.clone()).collect();
        }
        self.layout = Some(Layout {
            topology,
            fetched: Instant::now(),
            placement,
            members,
            endpoints,
            connections,
        });
        Ok(())
    }

    /// Sends each key to its replicas' shards (one request per shard, built by `build` from
    /// the keys' indices, all at once) and returns one slot per key, in order: reads merge the
    /// replicas' answers, writes count their acknowledgements. Refreshes the layout and
    /// retries when a shard or node says a key is not its own, and, in a cluster, when too few
    /// replicas answered, until the time budget runs out.
    fn routed<'k>(
        &mut self,
        count: usize,
        key_of: impl Fn(usize) -> &'k str,
        build: impl Fn(&[usize]) -> Request,
        kind: Kind,
    ) -> Result<Vec<Slot>> {
        let budget = self.config.timeout.min(MAX_TIMEOUT) * self.config.attempts.max(1);
        let started = Instant::now();
        let mut refreshes = 0u32;
        loop {
            if self.layout.is_none() {
                self.refresh()?;
            }
            // An unsettled view settles within moments: look again now and then, so reads
            // go back to one replica once it has.
            let unsettled = self.layout.as_ref().is_some_and(|l| {
                l.placement.as_ref().is_some_and(|p| !p.settled())
                    && l.fetched.elapsed() >= UNSETTLED_REFRESH
            });
            if unsettled {
                if let Err(e) = self.refresh() {
                    tracing::debug!(cause = %e, "refreshing an unsettled view failed");
                }
            }
            let Some(layout) = self.layout.as_mut() else {
                return Err(Error::UnexpectedResponse("no layout".into()));
            };
            let clustered = layout.placement.is_some();
            let mut by_endpoint: Vec<Vec<usize>> = vec![Vec::new(); layout.endpoints.len()];
            let mut needed = vec![0usize; count];
            let (mut scratch, mut targets) = (Vec::new(), Vec::new());
            self.spin = self.spin.wrapping_add(1);
            for (i, need) in needed.iter_mut().enumerate() {
                *need = layout.targets(
                    key_of(i),
                    kind,
                    self.config.acks,
                    refreshes > 0,
                    self.spin.wrapping_add(i),
                    &mut scratch,
                    &mut targets,
                );
                for &target in &targets {
                    by_endpoint[target].push(i);
                }
            }
            let requests: Vec<(usize, Request)> = by_endpoint
                .iter()
                .enumerate()
                .filter(|(_, indices)| !indices.is_empty())
                .map(|(endpoint, indices)| {
                    let request = build(indices);
                    // Reads and writes carry the view they were routed with: a node with a
                    // newer one refuses them, so a stale view is never counted as a quorum.
                    let request = match (&layout.placement, kind) {
                        (Some(placement), Kind::Read | Kind::Write) => Request::Routed {
                            generation: placement.generation(),
                            request: Box::new(request),
                        },
                        _ => request,
                    };
                    (endpoint, request)
                })
                .collect();
            // In a cluster an unanswered replica is retried here, after a fresh look at the
            // view, rather than in `exchange` where it would hold up the others.
            let config = ClientConfig {
                attempts: if clustered { 1 } else { self.config.attempts },
                ..self.config.clone()
            };
            let exchanged = exchange(
                &config.retry(),
                &mut self.next_id,
                &layout.endpoints,
                &mut layout.connections,
                &requests,
            )?;
            let timeout = Error::Timeout {
                endpoint: exchanged.missing.clone().unwrap_or_default(),
                attempts: config.attempts,
                waited: started.elapsed(),
                last_error: exchanged.last_error.clone(),
            };
            let mut tally: Vec<Tally> = (0..count).map(|_| Tally::default()).collect();
            let mut stale = false;
            let mut newer_elsewhere = false;
            let mut unanswered = false;
            self.sessions.clear();
            for ((endpoint, _), response) in requests.iter().zip(exchanged.responses) {
                let indices = &by_endpoint[*endpoint];
                let results: Vec<Result<Option<Option<Entry>>, KeyError>> = match response {
                    None => {
                        unanswered = true;
                        continue;
                    }
                    Some(Response::Get(values)) => {
                        values.into_iter().map(|v| v.map(Some)).collect()
                    }
                    Some(Response::Put(results)) | Some(Response::Unsubscribed(results)) => {
                        results.into_iter().map(|r| r.map(|()| None)).collect()
                    }
                    Some(Response::Subscribed { values, session }) => {
                        self.sessions.push(ShardSession {
                            shard: layout.endpoints[*endpoint].clone(),
                            session,
                        });
                        values.into_iter().map(|v| v.map(Some)).collect()
                    }
                    Some(Response::Error(RequestError::Unavailable { reason })) if clustered => {
                        tracing::debug!(%reason, "a replica is unavailable");
                        unanswered = true;
                        continue;
                    }
                    Some(Response::Error(e)) => return Err(Error::Request(e)),
                    Some(other) => {
                        return Err(Error::UnexpectedResponse(format!(
                            "an unexpected answer: {other:?}"
                        )))
                    }
                };
                if results.len() != indices.len() {
                    return Err(Error::UnexpectedResponse(format!(
                        "{} results for {} keys",
                        results.len(),
                        indices.len()
                    )));
                }
                for (&i, result) in indices.iter().zip(results) {
                    match result {
                        Ok(value) => tally[i].answer(value),
                        Err(KeyError::WrongShard { .. }) => stale = true,
                        Err(KeyError::WrongNode { generation }) => {
                            stale = true;
                            newer_elsewhere |= generation > layout.generation();
                        }
                        Err(error) => tally[i].error = Some(error),
                    }
                }
            }
            let done = tally
                .iter()
                .zip(&needed)
                .all(|(t, &need)| t.error.is_some() || t.answers >= need);
            if done {
                return Ok(tally
                    .into_iter()
                    .zip(&needed)
                    .map(|(t, &need)| t.into_slot(kind, need))
                    .collect());
            }
            let seen = layout.generation();
            let round = Round {
                clustered,
                unanswered,
                stale,
                newer_elsewhere,
                refreshes,
                out_of_time: started.elapsed() >= budget,
                view_unchanged: self.generation() <= seen,
            };
            match next_step(&round) {
                Next::TimedOut => return Err(timeout),
                Next::LayoutKeepsChanging => {
                    return Err(Error::UnexpectedResponse(
                        "the layout keeps changing".into(),
                    ))
                }
                Next::TooFewAcks => {
                    return Err(Error::UnexpectedResponse(format!(
                        "too few replicas acknowledged within {budget:?} (cluster view {seen})"
                    )))
                }
                Next::Retry { pause } => {
                    if pause {
                        std::thread::sleep(RETRY_PAUSE);
                    }
                }
            }
            tracing::debug!(stale, unanswered, "layout may be stale; refreshing");
            refreshes += 1;
            if let Err(e) = self.refresh() {
                if !clustered {
                    return Err(e);
                }
                tracing::debug!(cause = %e, "refreshing the cluster view failed");
            }
        }
    }
}

/// What one round of a routed call saw, when some key still lacks answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Round {
    /// Routed by a cluster view (else by one node's layout).
    clustered: bool,
    /// Some request got no answer (or a replica said it was unavailable).
    unanswered: bool,
    /// Some key was refused as not this node's or shard's.
    stale: bool,
    /// A refusing node holds a newer view than the client.
    newer_elsewhere: bool,
    /// Layout refreshes so far in this call.
    refreshes: u32,
    /// The call's time budget is spent.
    out_of_time: bool,
    /// The client's view has not moved since the round was routed.
    view_unchanged: bool,
}

/// What a routed call does after a round that left some key without enough answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Fail: a node did not answer.
    TimedOut,
    /// Fail: one node's layout changed again after a refresh.
    LayoutKeepsChanging,
    /// Fail: replicas answered, but too few acknowledged within the budget.
    TooFewAcks,
    /// Refresh the layout and try again, after a short pause if `pause`.
    Retry {
        /// Whether to wait [`RETRY_PAUSE`] first.
        pause: bool,
    },
}

/// The client's retry decision, apart from any socket: a lone node gets one refresh (its layout
/// changed) and no retry of silence (the exchange already retried it); a cluster retries until
/// the call's budget runs out, pausing where an immediate retry would meet the same state (a
/// node still catching up with the view, a replica down, a router behind a node).
fn next_step(round: &Round) -> Next {
    if !round.clustered {
        if round.unanswered {
            return Next::TimedOut;
        }
        if round.refreshes >= 1 {
            return Next::LayoutKeepsChanging;
        }
    } else if round.out_of_time {
        return if round.unanswered {
            Next::TimedOut
        } else {
            Next::TooFewAcks
        };
    }
    let node_behind = round.stale && !round.newer_elsewhere && round.clustered;
    let router_behind = round.newer_elsewhere && round.refreshes > 0 && round.view_unchanged;
    Next::Retry {
        pause: node_behind || round.unanswered || router_behind,
    }
}

/// One key's answers from its replicas.
#[derive(Default)]
struct Tally {
    /// Replicas that answered (read) or applied the write.
    answers: usize,
    /// The merge of the entries read.
    value: Option<Entry>,
    /// A replica's refusal (another lattice type, a size limit, a failing log).
    error: Option<KeyError>,
}

impl Tally {
    fn answer(&mut self, value: Option<Option<Entry>>) {
        self.answers += 1;
        let Some(Some(value)) = value else { return };
        match &mut self.value {
            None => self.value = Some(value),
            Some(held) => {
                if held.check_mergeable(&value).is_ok() {
                    held.merge(value);
                }
            }
        }
    }

    fn into_slot(self, kind: Kind, need: usize) -> Slot {
        match (self.error, kind) {
            (Some(error), _) if self.answers < need => Slot::Failed(error),
            (_, Kind::Read | Kind::Subscribe) => Slot::Value(self.value),
            (_, Kind::Write | Kind::Release) => Slot::Written,
        }
    }
}

/// The pseudo-shard under which [`Client::renew`] and [`Client::subscribe`] report the cluster
/// view's generation.
pub const VIEW_SESSION: &str = "cluster-view";

/// The result of a one-key write.
fn one_result(key: &str, mut results: Vec<std::result::Result<(), KeyError>>) -> Result<()> {
    match results.pop() {
        Some(Ok(())) => Ok(()),
        Some(Err(error)) => Err(Error::Key {
            key: key.to_string(),
            error,
        }),
        None => Err(Error::UnexpectedResponse("no result for the key".into())),
    }
}

/// The entries of a read (GET or SUBSCRIBE), in key order; the first failed key is the error.
fn entries_of(results: Vec<Slot>, keys: &[Key]) -> Result<Vec<Option<Entry>>> {
    results
        .into_iter()
        .zip(keys)
        .map(|(result, key)| match result {
            Slot::Value(value) => Ok(value),
            Slot::Failed(source) => Err(Error::Key {
                key: key.clone(),
                error: source,
            }),
            Slot::Written => Err(Error::UnexpectedResponse(
                "a write's answer to a read".into(),
            )),
        })
        .collect()
}

/// One key's outcome.
enum Slot {
    Value(Option<Entry>),
    Written,
    Failed(KeyError),
}

#[cfg(test)]
mod tests {
    //! The retry decision, without sockets.

    use super::*;

    fn cluster() -> Round {
        Round {
            clustered: true,
            ..Round::default()
        }
    }

    #[test]
    fn a_lone_node_gets_one_refresh_and_no_retry_of_silence() {
        let lone = Round::default();
        assert_eq!(
            next_step(&Round {
                stale: true,
                ..lone
            }),
            Next::Retry { pause: false }
        );
        assert_eq!(
            next_step(&Round {
                stale: true,
                refreshes: 1,
                ..lone
            }),
            Next::LayoutKeepsChanging
        );
        assert_eq!(
            next_step(&Round {
                unanswered: true,
                ..lone
            }),
            Next::TimedOut
        );
    }

    #[test]
    fn a_cluster_retries_until_its_budget_is_spent() {
        assert_eq!(
            next_step(&Round {
                unanswered: true,
                refreshes: 40,
                ..cluster()
            }),
            Next::Retry { pause: true }
        );
        assert_eq!(
            next_step(&Round {
                unanswered: true,
                out_of_time: true,
                ..cluster()
            }),
            Next::TimedOut
        );
        assert_eq!(
            next_step(&Round {
                stale: true,
                out_of_time: true,
                ..cluster()
            }),
            Next::TooFewAcks
        );
    }

    #[test]
    fn a_cluster_pauses_only_where_retrying_at_once_would_meet_the_same_state() {
        // The node is behind the client's view: it catches up within a heartbeat.
        assert_eq!(
            next_step(&Round {
                stale: true,
                ..cluster()
            }),
            Next::Retry { pause: true }
        );
        // The node is ahead: fetch the newer view at once...
        assert_eq!(
            next_step(&Round {
                stale: true,
                newer_elsewhere: true,
                ..cluster()
            }),
            Next::Retry { pause: false }
        );
        // ...but if the router gave the same view again, give it a moment.
        assert_eq!(
            next_step(&Round {
                stale: true,
                newer_elsewhere: true,
                refreshes: 1,
                view_unchanged: true,
                ..cluster()
            }),
            Next::Retry { pause: true }
        );
    }
}
