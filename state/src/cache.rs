//! The colocated cache: the state functions read, kept beside them.
//!
//! Reads go through the cache; a miss fetches the key from the store *and* subscribes to it
//! in the same round trip ([`squall_kvs::Client::subscribe`]), so from then on the storage
//! node pushes every change of the key to this cache, as in Cloudburst where each executor
//! publishes the set of keys it holds. Writes go through to the store (a lattice merge there)
//! and are merged into the cached value too. The cache keeps what the store keeps, the key's
//! [`squall_lattices::Entry`] (value, deletes, expiry), so pushes, writes and fills are all
//! lattice merges: their order does not matter, none can take a value back, and a delete
//! pushed by the store removes the value here too. Reads see the live value by this
//! machine's clock (an expired value reads as absent).
//!
//! The cache is bounded by bytes (LRU). An evicted key is unsubscribed in the background.
//! If a storage shard forgets this cache (restart, lease lost, pushes dropped), its session
//! number changes; the cache then drops everything, since it cannot know which changes it
//! missed, and refills on demand.
//!
//! Calls see the cache through a session (the `session` module), which is where a consistency
//! mode keeps what it must remember across one call's reads; this module knows nothing of
//! modes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use squall_kvs::ShardSession;
use squall_lattices::entry::now_ms;
use squall_lattices::{Entry as Stored, Lattice, LatticeValue, Write};
use squall_proto::secret::{self, ClusterSecret};
use squall_proto::{decode_response, Key, Response};

use crate::pool::ClientPool;
use crate::{Error, Result};

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
    /// The cluster secret storage nodes must present to push updates (default: the
    /// process's, if one was installed; see [`squall_proto::secret`]). Never serialized.
    #[serde(skip, default = "ClusterSecret::installed")]
    pub secret: Option<ClusterSecret>,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 64 << 20,
            bind_host: "127.0.0.1".into(),
            renew_interval: Duration::from_secs(5),
            secret: ClusterSecret::installed(),
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
    stored: Option<Stored>,
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
        secret::warn_if_open("cache", &config.bind_host, config.secret.as_ref());
        let gatekeeper = secret::guard(config.secret.as_ref(), &context, &socket)
            .map_err(|e| Error::Setup(format!("cache socket: {e}")))?;
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
            .spawn(move || {
                let _gatekeeper = gatekeeper;
                updates(socket, weak, stop)
            })
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

    /// Reads a key: from the cache if held, else from the store (subscribing to it).
    pub async fn get(&self, key: &str) -> Result<Option<LatticeValue>> {
        Ok(self.get_versioned(key).await?.0)
    }

    /// Reads a key as [`Cache::get`] does, with the entry's generation read under the same
    /// lock (see [`Cache::generation`]).
    pub async fn get_versioned(&self, key: &str) -> Result<(Option<LatticeValue>, u64)> {
        let (stored, generation) = self.get_stored(key).await?;
        Ok((stored.and_then(Stored::into_live_now), generation))
    }

    /// The entry of `key` as held (from the store on a miss), with its generation.
    async fn get_stored(&self, key: &str) -> Result<(Option<Stored>, u64)> {
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
        self.merge_in_chain(key, value, 0).await
    }

    /// [`Cache::merge`] for a call `chain` `kv-change` deliveries deep, which the store
    /// journals with the write ([`squall_kvs::Client::put_in_chain`]).
    pub async fn merge_in_chain(
        &self,
        key: &str,
        value: LatticeValue,
        chain: u32,
    ) -> Result<LatticeValue> {
        let owned_key = key.to_string();
        let written = value.clone();
        self.inner
            .kvs
            .with(move |client| client.put_in_chain(&owned_key, written, chain))
            .await?;
        let held = {
            let mut entries = self.entries();
            match entries.lru.peek(key) {
                Some(entry) if entry.filled => {
                    // Given its epoch as the store gives it (the store's own lifting may
                    // differ only if a delete raced this write; its push settles that).
                    // The store forgets dead entries after its grace (an hour by default); the
                    // cache keeps none (see `absorb`), so no grace applies here.
                    let lifted =
                        Write::value(value.clone()).lift(entry.stored.as_ref(), now_ms(), u64::MAX);
                    Some(self.absorb(&mut entries, key, lifted, false))
                }
                _ => None,
            }
        };
        let merged = match held {
            Some(merged) => merged.and_then(Stored::into_live_now),
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

    fn lookup(&self, key: &str) -> Option<(Option<Stored>, u64)> {
        let mut entries = self.entries();
        match entries.lru.get(key) {
            Some(entry) if entry.filled => Some((entry.stored.clone(), entry.generation)),
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
                    stored: None,
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
        value: Option<Stored>,
        fill: bool,
    ) -> Option<Stored> {
        let generation = entries.next_generation;
        entries.next_generation += 1;
        let (old_size, new_size, merged) = match entries.lru.get_mut(key) {
            Some(entry) => {
                let old = entry.size;
                let changed = match (&mut entry.stored, value) {
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
                // A deleted (or reaped) key is held as absent, not as its tombstone: the store
                // forgets tombstones after a grace, and a cached one would then hide the
                // key's next writes, which start again from the first epoch.
                if entry.stored.as_ref().is_some_and(|s| s.value.is_none()) {
                    entry.stored = None;
                }
                if changed || (fill && !entry.filled) {
                    entry.generation = generation;
                    entry.size = key.len() + size_of(entry.stored.as_ref());
                }
                entry.filled |= fill;
                (old, entry.size, entry.stored.clone())
            }
            None => {
                let value = value.filter(|s| s.value.is_some());
                let size = key.len() + size_of(value.as_ref());
                entries.lru.push(
                    key.to_string(),
                    Entry {
                        stored: value.clone(),
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

    fn apply_push(&self, updates: Vec<(Key, Stored)>) {
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

fn size_of(value: Option<&Stored>) -> usize {
    ENTRY_OVERHEAD
        + value
            .and_then(|v| rmp_serde::encode::to_vec(v).ok())
            .map_or(0, |b| b.len())
}
