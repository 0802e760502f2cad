//! The colocated cache: the state functions read, kept beside them.
//!
//! Reads go through the cache; a miss fetches the key from the store *and* subscribes to it
//! in the same round trip ([`squall_kvs::Client::subscribe`]), so from then on the storage
//! node pushes every change of the key to this cache, as in Cloudburst where each executor
//! publishes the set of keys it holds. Writes go through to the store (a lattice merge there)
//! and are merged into the cached value too. Pushes, writes and fills are all lattice merges,
//! so their order does not matter and none can take a value back.
//!
//! The cache is bounded by bytes (LRU). An evicted key is unsubscribed in the background.
//! If a storage shard forgets this cache (restart, lease lost, pushes dropped), its session
//! number changes; the cache then drops everything, since it cannot know which changes it
//! missed, and refills on demand.
//!
//! Calls see the cache through a [`Session`], which is where a consistency mode keeps what it
//! must remember across one call's reads: [`Consistency::Lww`] needs nothing;
//! [`Consistency::RepeatableRead`] reads and writes through its run's pins
//! ([`crate::pins`]); [`Consistency::Causal`] does too, and also keeps the run's reads a
//! causal cut:
//! - a first read of a key takes a version at least as new as the run's cut requires (the
//!   session's floors, and what the versions already read depend on), re-reading it from the
//!   store when the cache is behind;
//! - it refuses a version that depends on a newer version of a key the run already read
//!   ([`Error::CausalCut`]): the run cannot go back, and the cache holds no older version.
//!   Keys a call declares (`keys`) are pinned together, as one cut, before its first step
//!   ([`Session::prepare`]), which is how a DAG avoids this;
//! - writes are multi-key causal versions carrying the run's cut as their dependencies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::{HashMap, HashSet};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use squall_kvs::ShardSession;
use squall_lattices::{
    Dependencies, Lattice, LatticeValue, Lww, MultiKeyCausal, Timestamp, VectorClock,
};
use squall_proto::call::{digest, UNKNOWN_DIGEST};
use squall_proto::{decode_response, Key, Response};

pub use squall_proto::call::Consistency;

use crate::pins::{causal_meta, reaches, RunContext, RunPins};
use crate::pool::ClientPool;
use crate::{Error, Result};
use squall_lattices::causal::raise_all;

/// Settings of the colocated cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of values held (default 64 MiB); the least recently used go first.
    pub capacity_bytes: usize,
    /// Host the cache binds its update socket on, which storage nodes connect to (default
    /// `127.0.0.1`; use an address the storage nodes can reach).
    pub bind_host: String,
    /// How often the cache renews its subscriptions (default 5 s; storage nodes forget a
    /// subscriber after 30 s of silence).
    pub renew_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 64 << 20,
            bind_host: "127.0.0.1".into(),
            renew_interval: Duration::from_secs(5),
        }
    }
}

/// How long the update thread waits for a push before doing its periodic work.
const POLL: Duration = Duration::from_millis(100);

/// Bytes counted per entry besides its key and value, so that many tiny keys are bounded too.
const ENTRY_OVERHEAD: usize = 64;

/// Keys unsubscribed per request (a storage node takes at most 10 000 keys per request).
const UNSUBSCRIBE_BATCH: usize = 1000;

/// Pushes applied per pass of the update thread before it checks its periodic work.
const DRAIN_BATCH: usize = 1024;

/// Largest push message accepted on the update socket.
const MAX_PUSH_BYTES: i64 = 64 << 20;

/// Counters of the cache's work since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub hits: u64,
    /// Reads that went to the store.
    pub misses: u64,
    /// Values pushed by storage nodes and merged.
    pub pushes: u64,
    /// Keys evicted to stay within the capacity.
    pub evictions: u64,
    /// Times the whole cache was dropped because a shard forgot it.
    pub resyncs: u64,
}

struct Entry {
    /// `None`: the key does not exist in the store (also cached, and also subscribed).
    value: Option<LatticeValue>,
    size: usize,
    generation: u64,
    /// False while the first fetch is in flight: pushes are merged, reads still miss.
    filled: bool,
}

struct Entries {
    lru: LruCache<Key, Entry>,
    bytes: usize,
    next_generation: u64,
    /// The last session each shard reported.
    sessions: HashMap<String, u64>,
    /// Evicted keys still to unsubscribe.
    evicted: HashSet<Key>,
}

struct Inner {
    entries: Mutex<Entries>,
    kvs: ClientPool,
    endpoint: String,
    config: CacheConfig,
    hits: AtomicU64,
    misses: AtomicU64,
    pushes: AtomicU64,
    evictions: AtomicU64,
    resyncs: AtomicU64,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// An executor's cache of store keys. One per executor; cheap to clone; thread-safe. The
/// background thread that applies pushes stops when the last clone is dropped.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// Binds the socket storage nodes push updates to and starts the thread that applies them.
    pub fn start(kvs: ClientPool, config: CacheConfig) -> Result<Self> {
        let context = zmq::Context::new();
        let setup = |what: &str, e: zmq::Error| Error::Setup(format!("cache socket {what}: {e}"));
        let socket = context.socket(zmq::PULL).map_err(|e| setup("create", e))?;
        socket.set_linger(0).map_err(|e| setup("linger", e))?;
        // Bounds what a peer of this socket can make the executor allocate.
        socket
            .set_maxmsgsize(MAX_PUSH_BYTES)
            .map_err(|e| setup("maxmsgsize", e))?;
        socket.set_rcvhwm(10_000).map_err(|e| setup("rcvhwm", e))?;
        socket
            .bind(&format!("tcp://{}:*", config.bind_host))
            .map_err(|e| setup("bind", e))?;
        let endpoint = socket
            .get_last_endpoint()
            .map_err(|e| setup("endpoint", e))?
            .map_err(|_| Error::Setup("cache endpoint is not UTF-8".into()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let inner = Arc::new(Inner {
            entries: Mutex::new(Entries {
                lru: LruCache::unbounded(),
                bytes: 0,
                next_generation: 1,
                sessions: HashMap::new(),
                evicted: HashSet::new(),
            }),
            kvs,
            endpoint,
            config,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            pushes: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            stop: stop.clone(),
            thread: Mutex::new(None),
        });
        let weak = Arc::downgrade(&inner);
        let thread = std::thread::Builder::new()
            .name("squall-cache".into())
            .spawn(move || updates(socket, weak, stop))
            .map_err(|e| Error::Setup(format!("cache thread: {e}")))?;
        if let Ok(mut slot) = inner.thread.lock() {
            *slot = Some(thread);
        }
        Ok(Self { inner })
    }

    /// The endpoint storage nodes push updates to.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// A view of the cache for one call in `mode`. A repeatable-read or causal call that is
    /// not part of a run (see [`Cache::run_session`]) pins versions for itself and its nested
    /// calls.
    pub fn session(&self, mode: Consistency) -> Session {
        let run = mode.pins().then(|| RunView {
            pins: Arc::default(),
            upstream: None,
        });
        Session {
            cache: self.clone(),
            mode,
            run,
        }
    }

    /// A repeatable-read or causal (`mode`) view of the cache for one step of run `context`,
    /// reading through `pins` (the run's pins on this executor).
    pub fn run_session(
        &self,
        mode: Consistency,
        pins: Arc<RunPins>,
        context: RunContext,
    ) -> Session {
        Session {
            cache: self.clone(),
            mode,
            run: Some(RunView {
                pins,
                upstream: Some(context),
            }),
        }
    }

    /// Reads a key: from the cache if held, else from the store (subscribing to it).
    pub async fn get(&self, key: &str) -> Result<Option<LatticeValue>> {
        Ok(self.get_versioned(key).await?.0)
    }

    /// Reads a key as [`Cache::get`] does, with the entry's generation read under the same
    /// lock (see [`Cache::generation`]).
    pub async fn get_versioned(&self, key: &str) -> Result<(Option<LatticeValue>, u64)> {
        if let Some(held) = self.lookup(key) {
            self.inner.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(held);
        }
        self.inner.misses.fetch_add(1, Ordering::Relaxed);
        self.reserve(key);
        let endpoint = self.inner.endpoint.clone();
        let keys = vec![key.to_string()];
        let subscription = self
            .inner
            .kvs
            .with(move |client| client.subscribe(&endpoint, &keys))
            .await?;
        let mut entries = self.entries();
        self.note_sessions(&mut entries, &subscription.sessions);
        let value = subscription.values.into_iter().next().flatten();
        let merged = self.absorb(&mut entries, key, value, true);
        let generation = entries.lru.peek(key).map_or(0, |e| e.generation);
        Ok((merged, generation))
    }

    /// Merges `value` into `key` in the store, then into the cache; returns the merged value
    /// as the cache now knows it.
    pub async fn merge(&self, key: &str, value: LatticeValue) -> Result<LatticeValue> {
        let owned_key = key.to_string();
        let written = value.clone();
        self.inner
            .kvs
            .with(move |client| client.put(&owned_key, written))
            .await?;
        let held = {
            let mut entries = self.entries();
            match entries.lru.peek(key) {
                Some(entry) if entry.filled => {
                    Some(self.absorb(&mut entries, key, Some(value.clone()), false))
                }
                _ => None,
            }
        };
        let merged = match held {
            Some(merged) => merged,
            // Not held: fetch (and subscribe), which includes the write just made.
            None => self.get(key).await?,
        };
        merged.ok_or_else(|| Error::BadValue {
            key: key.to_string(),
            reason: "written value not found".into(),
        })
    }

    /// Makes the next read of `key` go to the store (and keeps the subscription): for a key
    /// just written elsewhere, whose push may still be on its way, when the reader must see
    /// the write (the registry's records: a function deleted or replaced, a DAG changed).
    pub fn refresh(&self, key: &str) {
        if let Some(entry) = self.entries().lru.peek_mut(key) {
            entry.filled = false;
        }
    }

    /// Reads `key` from the store even if it is held, and merges what the store holds into
    /// the cache (causal mode: the cache is behind what a run has seen).
    pub async fn fetch(&self, key: &str) -> Result<Option<LatticeValue>> {
        self.refresh(key);
        self.get(key).await
    }

    /// The generation of a held key: it changes whenever the cached value changes. `None` if
    /// the key is not held.
    pub fn generation(&self, key: &str) -> Option<u64> {
        let entries = self.entries();
        entries
            .lru
            .peek(key)
            .filter(|e| e.filled)
            .map(|e| e.generation)
    }

    /// Counters of the cache's work.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.inner.hits.load(Ordering::Relaxed),
            misses: self.inner.misses.load(Ordering::Relaxed),
            pushes: self.inner.pushes.load(Ordering::Relaxed),
            evictions: self.inner.evictions.load(Ordering::Relaxed),
            resyncs: self.inner.resyncs.load(Ordering::Relaxed),
        }
    }

    /// Up to `limit` of the keys held, most recently used first (schedulers place calls by
    /// them).
    pub fn keys(&self, limit: usize) -> Vec<Key> {
        let entries = self.entries();
        entries
            .lru
            .iter()
            .filter(|(_, e)| e.filled)
            .take(limit)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Keys held and the bytes they count for.
    pub fn occupancy(&self) -> (usize, usize) {
        let entries = self.entries();
        (entries.lru.len(), entries.bytes)
    }

    fn entries(&self) -> MutexGuard<'_, Entries> {
        // A panic while holding the lock leaves the map consistent (every update is a
        // complete merge), so a poisoned lock is still usable.
        self.inner
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lookup(&self, key: &str) -> Option<(Option<LatticeValue>, u64)> {
        let mut entries = self.entries();
        match entries.lru.get(key) {
            Some(entry) if entry.filled => Some((entry.value.clone(), entry.generation)),
            _ => None,
        }
    }

    /// Inserts an unfilled entry, so pushes that race with the first fetch are kept.
    fn reserve(&self, key: &str) {
        let mut entries = self.entries();
        // Held again: no longer to unsubscribe. (If its unsubscription is already on the
        // wire, the update thread subscribes it again once that is done.)
        entries.evicted.remove(key);
        if !entries.lru.contains(key) {
            let size = ENTRY_OVERHEAD + key.len();
            entries.lru.push(
                key.to_string(),
                Entry {
                    value: None,
                    size,
                    generation: 0,
                    filled: false,
                },
            );
            entries.bytes += size;
        }
    }

    /// Merges `value` into the entry of `key` (creating it), marks it filled if `fill`, and
    /// returns the merged value.
    fn absorb(
        &self,
        entries: &mut Entries,
        key: &str,
        value: Option<LatticeValue>,
        fill: bool,
    ) -> Option<LatticeValue> {
        let generation = entries.next_generation;
        entries.next_generation += 1;
        let (old_size, new_size, merged) = match entries.lru.get_mut(key) {
            Some(entry) => {
                let old = entry.size;
                let changed = match (&mut entry.value, value) {
                    (_, None) => false,
                    (slot @ None, Some(v)) => {
                        *slot = Some(v);
                        true
                    }
                    (Some(held), Some(v)) => {
                        if held.check_mergeable(&v).is_ok() {
                            held.merge(v)
                        } else {
                            // The store refuses mismatched merges, so this only happens if
                            // the key was re-typed behind the cache's back: trust the store.
                            *held = v;
                            true
                        }
                    }
                };
                if changed || (fill && !entry.filled) {
                    entry.generation = generation;
                    entry.size = key.len() + size_of(entry.value.as_ref());
                }
                entry.filled |= fill;
                (old, entry.size, entry.value.clone())
            }
            None => {
                let size = key.len() + size_of(value.as_ref());
                entries.lru.push(
                    key.to_string(),
                    Entry {
                        value: value.clone(),
                        size,
                        generation,
                        filled: fill,
                    },
                );
                (0, size, value)
            }
        };
        entries.bytes = (entries.bytes + new_size).saturating_sub(old_size);
        self.evict(entries);
        merged
    }

    /// Evicts least recently used entries until within capacity. Entries whose first fetch
    /// is in flight stay (pushes racing with the fetch must find them).
    fn evict(&self, entries: &mut Entries) {
        let mut pending = Vec::new();
        while entries.bytes > self.inner.config.capacity_bytes && entries.lru.len() > 1 {
            let Some((key, entry)) = entries.lru.pop_lru() else {
                break;
            };
            if !entry.filled {
                pending.push((key, entry));
                continue;
            }
            entries.bytes = entries.bytes.saturating_sub(entry.size);
            entries.evicted.insert(key);
            self.inner.evictions.fetch_add(1, Ordering::Relaxed);
        }
        for (key, entry) in pending {
            entries.lru.push(key, entry);
        }
    }

    /// Records shard sessions; if a known shard's session changed, it forgot this cache and
    /// pushes may have been missed, so everything cached is dropped.
    fn note_sessions(&self, entries: &mut Entries, sessions: &[ShardSession]) {
        let mut forgotten = false;
        for s in sessions {
            match entries.sessions.insert(s.shard.clone(), s.session) {
                Some(old) if old != s.session => forgotten = true,
                _ => {}
            }
        }
        if forgotten {
            tracing::warn!("a storage shard forgot this cache's subscriptions; dropping the cache");
            // Entries whose first fetch is in flight stay: that fetch is answered under the
            // new session, and pushes racing with it must find them.
            let mut pending = Vec::new();
            while let Some((key, entry)) = entries.lru.pop_lru() {
                if !entry.filled {
                    pending.push((key, entry));
                }
            }
            entries.bytes = pending.iter().map(|(_, e)| e.size).sum();
            for (key, entry) in pending {
                entries.lru.push(key, entry);
            }
            entries.evicted.clear();
            self.inner.resyncs.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn apply_push(&self, updates: Vec<(Key, LatticeValue)>) {
        let mut entries = self.entries();
        for (key, value) in updates {
            if entries.lru.contains(&key) {
                self.absorb(&mut entries, &key, Some(value), false);
                self.inner.pushes.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Renews the subscriptions and unsubscribes evicted keys (blocking; update thread only).
    fn maintain(&self) {
        let evicted: Vec<Key> = self.entries().evicted.drain().collect();
        let endpoint = self.inner.endpoint.clone();
        for batch in evicted.chunks(UNSUBSCRIBE_BATCH) {
            let unsubscribed = self
                .inner
                .kvs
                .with_blocking(|client| client.unsubscribe(&endpoint, batch));
            if let Err(e) = unsubscribed {
                // Harmless: the node keeps pushing keys that are no longer held (they are
                // ignored) until the next attempt.
                tracing::debug!(cause = %e, "unsubscribing evicted keys failed; will retry");
                self.entries().evicted.extend(batch.iter().cloned());
            }
        }
        // Keys read again while their unsubscription was on the wire were subscribed before it
        // reached the node and are no longer watched: subscribe them again, now that it is done.
        let again: Vec<Key> = {
            let entries = self.entries();
            evicted
                .into_iter()
                .filter(|k| entries.lru.contains(k) && !entries.evicted.contains(k))
                .collect()
        };
        for batch in again.chunks(UNSUBSCRIBE_BATCH) {
            match self
                .inner
                .kvs
                .with_blocking(|client| client.subscribe(&endpoint, batch))
            {
                Ok(subscription) => {
                    let mut entries = self.entries();
                    self.note_sessions(&mut entries, &subscription.sessions);
                    for (key, value) in batch.iter().zip(subscription.values) {
                        if entries.lru.contains(key) {
                            self.absorb(&mut entries, key, value, false);
                        }
                    }
                }
                Err(e) => {
                    // Not watched and cannot be: drop them, so the next read fetches afresh.
                    tracing::debug!(cause = %e, "resubscribing re-read keys failed; dropping them");
                    let mut entries = self.entries();
                    for key in batch {
                        if let Some(entry) = entries.lru.pop(key) {
                            entries.bytes = entries.bytes.saturating_sub(entry.size);
                        }
                    }
                }
            }
        }
        let renewed = self
            .inner
            .kvs
            .with_blocking(|client| client.renew(&endpoint));
        match renewed {
            Ok(sessions) => {
                let mut entries = self.entries();
                self.note_sessions(&mut entries, &sessions);
            }
            Err(e) => tracing::warn!(cause = %e, "renewing the cache's subscriptions failed"),
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut slot) = self.thread.lock() {
            if let Some(thread) = slot.take() {
                // The thread holds only a weak reference; it sees the flag within `POLL`.
                if thread.thread().id() != std::thread::current().id() {
                    let _ = thread.join();
                }
            }
        }
    }
}

/// The update thread: applies pushes as they arrive and renews subscriptions periodically.
fn updates(socket: zmq::Socket, cache: std::sync::Weak<Inner>, stop: Arc<AtomicBool>) {
    let mut last_renewal = Instant::now();

    while !stop.load(Ordering::Relaxed) {
        match socket.poll(zmq::POLLIN, POLL.as_millis() as i64) {
            Ok(0) | Err(zmq::Error::EINTR) => {}
            Ok(_) => {
                for _ in 0..DRAIN_BATCH {
                    let Ok(frame) = socket.recv_bytes(zmq::DONTWAIT) else {
                        break;
                    };
                    let Some(inner) = cache.upgrade() else { return };
                    match decode_response(&frame) {
                        Ok((_, Response::Notify { updates, .. })) => {
                            Cache { inner }.apply_push(updates);
                        }
                        Ok((_, other)) => {
                            tracing::warn!(message = ?other, "unexpected message on the cache socket")
                        }
                        Err(e) => {
                            tracing::warn!(cause = %e, "undecodable push on the cache socket")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(cause = %e, "cache socket failed; pushes stop");
                return;
            }
        }
        let Some(inner) = cache.upgrade() else { return };
        if last_renewal.elapsed() >= inner.config.renew_interval {
            last_renewal = Instant::now();
            Cache { inner }.maintain();
        }
    }
}

fn size_of(value: Option<&LatticeValue>) -> usize {
    ENTRY_OVERHEAD
        + value
            .and_then(|v| rmp_serde::encode::to_vec(v).ok())
            .map_or(0, |b| b.len())
}

/// How many rounds a causal run re-reads declared keys from the store, looking for a causal
/// cut, before it gives up (each round re-reads only keys that another version read depends
/// on a newer version of; without writes racing, one round suffices).
const CUT_ROUNDS: usize = 8;

/// One call's view of the cache (see the module docs). Clones share the run's pins (a
/// nested call reads what its caller pinned).
#[derive(Debug, Clone)]
pub struct Session {
    cache: Cache,
    mode: Consistency,
    run: Option<RunView>,
}

#[derive(Debug, Clone)]
struct RunView {
    pins: Arc<RunPins>,
    upstream: Option<RunContext>,
}

impl Session {
    /// The mode this session reads in.
    pub fn mode(&self) -> Consistency {
        self.mode
    }

    /// Reads a key as the session's mode allows.
    pub async fn get(&mut self, key: &str) -> Result<Option<LatticeValue>> {
        let Some(run) = &self.run else {
            return self.cache.get(key).await;
        };
        if let Some(view) = self.run_view(run, key).await? {
            let fan_in = run.upstream.as_ref().is_some_and(|c| c.fan_in);
            if self.mode == Consistency::Causal && fan_in {
                self.check_view(run, key, view.as_ref())?;
            }
            return Ok(view);
        }
        // The run's first read of the key: pin what the cache holds (or what another step of
        // the run on this executor pinned a moment earlier).
        if self.mode != Consistency::Causal {
            let held = self.cache.get(key).await?;
            return Ok(run.pins.pin(key, held));
        }
        // Causal: a version that fits the run's cut, pinned only if no other step of the run
        // here pinned something meanwhile that it was not checked against.
        for _ in 0..CUT_ROUNDS {
            let generation = run.pins.generation();
            let held = self.cache.get(key).await?;
            let version = self.fit_cut(run, key, held).await?;
            if let Some(pinned) = run.pins.pin_if(key, version, generation) {
                return Ok(pinned);
            }
        }
        Err(Error::CausalCut {
            key: key.to_string(),
            reason: format!(
                "other steps of the run on this executor kept pinning keys while it was checked \
                 ({CUT_ROUNDS} tries)"
            ),
        })
    }

    /// Merges a value into a key (through to the store); returns the merged value as the
    /// session sees it.
    pub async fn merge(&mut self, key: &str, value: LatticeValue) -> Result<LatticeValue> {
        if self.mode == Consistency::Causal && self.run.is_some() {
            // The write extends a version of the key that fits the run's cut: read it first.
            self.get(key).await?;
        }
        let Some(run) = &self.run else {
            return self.cache.merge(key, value).await;
        };
        // The run's view before the write, so the write extends what the run has seen.
        let before = self.run_view(run, key).await?;
        let merged = self.cache.merge(key, value.clone()).await?;
        Ok(run.pins.write(key, before, value, merged))
    }

    /// Writes `bytes` to `key`. In lww and repeatable-read mode: a last-writer-wins register
    /// stamped `stamp`. In causal mode: a multi-key causal version whose clock is the run's
    /// version of the key advanced at `stamp.writer` (to `stamp.time`, which grows with every
    /// write of the writer), and whose dependencies are the run's cut (what it read, and
    /// what those versions depend on). A causal write of a key that holds another type is
    /// refused ([`Error::ModeMismatch`]).
    pub async fn put_bytes(
        &mut self,
        key: &str,
        bytes: Bytes,
        stamp: Timestamp,
    ) -> Result<LatticeValue> {
        let value = match (&self.run, self.mode) {
            (Some(_), Consistency::Causal) => {
                // The run's version of the key, checked against its cut, is the base.
                let base = self.get(key).await?;
                self.causal_version(key, base, bytes, stamp)?
            }
            _ => LatticeValue::Lww(Lww::new(stamp, bytes)),
        };
        self.merge(key, value).await
    }

    /// Causal: pins `keys` (those the run has no version of yet) as one causal cut before a
    /// step runs, so that its reads, and its run's later reads of them, never meet a version
    /// that depends on a newer version of another one. Reads each from the cache, then re-reads
    /// from the store any that another one depends on a newer version of, until none does.
    pub async fn prepare(&self, keys: &[String]) -> Result<()> {
        let Some(run) = &self.run else {
            return Ok(());
        };
        if self.mode != Consistency::Causal {
            return Ok(());
        }
        // Another step of the run here may pin keys meanwhile (a second source step): then
        // the cut is looked for again, against its pins.
        for _ in 0..CUT_ROUNDS {
            let generation = run.pins.generation();
            let versions = self.find_cut(run, keys).await?;
            if run
                .pins
                .pin_all(versions.iter().map(|(k, v)| (*k, v.clone())), generation)
            {
                return Ok(());
            }
        }
        Err(Error::CausalCut {
            key: keys.first().cloned().unwrap_or_default(),
            reason: format!(
                "other steps of the run on this executor kept pinning keys while its declared \
                 keys were read ({CUT_ROUNDS} tries)"
            ),
        })
    }

    /// Causal: versions of `keys` (those the run has no version of yet) that form a cut with
    /// each other and with the run's cut (see [`Session::prepare`]).
    async fn find_cut<'k>(
        &self,
        run: &RunView,
        keys: &'k [String],
    ) -> Result<Vec<(&'k str, Option<LatticeValue>)>> {
        let mut versions: Vec<(&str, Option<LatticeValue>)> = Vec::new();
        for key in keys {
            let handed_on = run
                .upstream
                .as_ref()
                .is_some_and(|c| c.upstream.contains_key(key.as_str()));
            if handed_on || run.pins.get(key).is_some() || versions.iter().any(|(k, _)| k == key) {
                continue;
            }
            versions.push((key, self.cache.get(key).await?));
        }
        let known = self.known(run);
        let mut last_stale = String::new();
        for _ in 0..CUT_ROUNDS {
            let mut needed = known.clone();
            for (_, version) in &versions {
                if let Some((_, dependencies)) = causal_meta(version.as_ref()) {
                    raise_all(&mut needed, &dependencies);
                }
            }
            let mut stale = None;
            for (key, version) in &mut versions {
                let Some(floor) = needed.get(*key) else {
                    continue;
                };
                if !reaches(version.as_ref(), floor) {
                    *version = self.cache.fetch(key).await?;
                    if !reaches(version.as_ref(), floor) {
                        return Err(Error::CausalCut {
                            key: key.to_string(),
                            reason: "the store holds no version as new as the run's cut \
                                     requires (versions its session saw were lost?)"
                                .into(),
                        });
                    }
                    stale = Some(key.to_string());
                }
            }
            let Some(stale) = stale else {
                // The cut must also fit what the run already read of other keys.
                for (key, version) in &versions {
                    if let Some(other) = Self::newer_dependency(run, key, version.as_ref()) {
                        return Err(Error::CausalCut {
                            key: key.to_string(),
                            reason: format!(
                                "the version held depends on a newer version of {other:?} than \
                                 this run read"
                            ),
                        });
                    }
                }
                return Ok(versions);
            };
            last_stale = stale;
        }
        Err(Error::CausalCut {
            key: last_stale,
            reason: format!(
                "writes kept outpacing {CUT_ROUNDS} rounds of re-reading the call's keys from \
                 the store"
            ),
        })
    }

    /// Causal: the run's cut, key by key: the clocks every later read must reach (the
    /// session's floors, the versions handed on and pinned here, and their dependencies).
    fn known(&self, run: &RunView) -> Dependencies {
        let mut known = run
            .upstream
            .as_ref()
            .map(|context| (*context.floors).clone())
            .unwrap_or_default();
        raise_all(&mut known, &run.pins.cut());
        known
    }

    /// Causal: the clock of the run's version of `key`, if the run has read or written it.
    fn read_clock(run: &RunView, key: &str) -> Option<VectorClock> {
        let here = run.pins.read_clock(key);
        let handed_on = run.upstream.as_ref().and_then(|c| c.read_clock(key));
        match (here, handed_on) {
            (Some(here), Some(handed_on)) => Some(here.join(handed_on)),
            (here, handed_on) => here.or(handed_on),
        }
    }

    /// Causal: the version of `key` (which the run has not read yet) to read, given `held`,
    /// the cache's: one at least as new as the run's cut says (else the store's), and that
    /// depends on no newer version of a key the run already read than the one it read.
    async fn fit_cut(
        &self,
        run: &RunView,
        key: &str,
        held: Option<LatticeValue>,
    ) -> Result<Option<LatticeValue>> {
        let mut version = held;
        if let Some(floor) = self.known(run).get(key) {
            if !reaches(version.as_ref(), floor) {
                version = self.cache.fetch(key).await?;
                if !reaches(version.as_ref(), floor) {
                    return Err(Error::CausalCut {
                        key: key.to_string(),
                        reason: "the store holds no version as new as this run or its session \
                                 has seen (were versions lost?)"
                            .into(),
                    });
                }
            }
        }
        if let Some(other) = Self::newer_dependency(run, key, version.as_ref()) {
            return Err(Error::CausalCut {
                key: key.to_string(),
                reason: format!(
                    "the version held depends on a newer version of {other:?} than this run \
                     read; list {key:?} among the call's keys (header squall-keys) so that the \
                     run pins it with {other:?} before its first step"
                ),
            });
        }
        Ok(version)
    }

    /// Causal: a key other than `key` that `version` depends on a newer version of than the
    /// one the run read, if any.
    fn newer_dependency(
        run: &RunView,
        key: &str,
        version: Option<&LatticeValue>,
    ) -> Option<String> {
        let (_, dependencies) = causal_meta(version)?;
        dependencies.into_iter().find_map(|(other, needed)| {
            let read = (other != key)
                .then(|| Self::read_clock(run, &other))
                .flatten()?;
            (!read.dominates(&needed)).then_some(other)
        })
    }

    /// Causal: the version a write of `bytes` to `key` makes over `base`, the run's version
    /// of the key (see [`Session::put_bytes`]).
    fn causal_version(
        &self,
        key: &str,
        base: Option<LatticeValue>,
        bytes: Bytes,
        stamp: Timestamp,
    ) -> Result<LatticeValue> {
        let (mut clock, base_dependencies) = match &base {
            None => Default::default(),
            Some(LatticeValue::MultiCausal(register)) => {
                (register.clock(), register.dependencies())
            }
            Some(other) => {
                return Err(Error::ModeMismatch {
                    key: key.to_string(),
                    stored: other.lattice_type(),
                })
            }
        };
        let tick = stamp.time.max(clock.get(stamp.writer) + 1);
        clock.observe(stamp.writer, tick);
        let mut dependencies = self
            .run
            .as_ref()
            .map(|run| self.known(run))
            .unwrap_or_default();
        raise_all(&mut dependencies, &base_dependencies);
        dependencies.remove(key);
        Ok(LatticeValue::MultiCausal(MultiKeyCausal::with_version(
            clock,
            dependencies,
            bytes,
        )))
    }

    /// Causal: checks the run's version of `key` handed on by earlier steps (or pinned here)
    /// against the run's cut, at a step that joins several inputs. Along one path of a DAG
    /// every version was checked where it was read, so it fits; after parallel branches it
    /// may not (one branch read a version another branch's read depends on a newer version
    /// of), and then the read fails rather than return it.
    fn check_view(&self, run: &RunView, key: &str, view: Option<&LatticeValue>) -> Result<()> {
        let outside = |reason: String| Error::CausalCut {
            key: key.to_string(),
            reason,
        };
        if let Some(floor) = self.known(run).get(key) {
            if !reaches(view, floor) {
                return Err(outside(
                    "the run's earlier steps (parallel branches) read a version older than \
                     other reads of the run depend on; declare the key in the call's keys"
                        .into(),
                ));
            }
        }
        if let Some(other) = Self::newer_dependency(run, key, view) {
            return Err(outside(format!(
                "the run's version depends on a newer version of {other:?} than the run read \
                 (parallel branches); declare both in the call's keys"
            )));
        }
        Ok(())
    }

    /// The run's version of `key`, if it has one: its pin here, joined with the versions the
    /// earlier steps hand on that differ from it (a write by a step on another executor, or
    /// parallel branches' reads), each read from this executor's cache when it holds the same
    /// version and fetched from its holder otherwise. `None`: the run has neither read nor
    /// written the key.
    async fn run_view(&self, run: &RunView, key: &str) -> Result<Option<Option<LatticeValue>>> {
        let mut view = run.pins.get(key);
        let Some((context, refs)) = run
            .upstream
            .as_ref()
            .and_then(|context| Some((context, context.upstream.get(key)?)))
        else {
            return Ok(view);
        };
        for pin in refs {
            let current = view.as_ref().map(|v| digest(v.as_ref()));
            if current.is_some() && (pin.holder == context.here || current == Some(pin.digest)) {
                continue;
            }
            let held = self.cache.get(key).await?;
            let digest_held = digest(held.as_ref());
            let version = if digest_held == pin.digest && digest_held != UNKNOWN_DIGEST {
                held
            } else {
                fetch_pinned(context, &pin.holder, key).await?
            };
            view = Some(run.pins.join(key, version));
            run.pins.absorb(key, pin.digest);
        }
        Ok(view)
    }
}

/// Fetches the version of `key` that run `context` pinned on `holder`.
async fn fetch_pinned(
    context: &RunContext,
    holder: &str,
    key: &str,
) -> Result<Option<LatticeValue>> {
    let unavailable = |reason: String| Error::PinUnavailable {
        key: key.to_string(),
        holder: holder.to_string(),
        reason,
    };
    let source = context
        .source
        .as_ref()
        .ok_or_else(|| unavailable("no way to reach other executors".into()))?;
    let values = source
        .fetch(holder, context.call, vec![key.to_string()])
        .await
        .map_err(unavailable)?;
    values
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, value)| value)
        .ok_or_else(|| unavailable("the holder did not answer for the key".into()))
}
