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
//! must remember across one call's reads: [`Consistency::Lww`] needs nothing; the
//! repeatable-read and causal modes will pin versions there.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use lru::LruCache;
use squall_kvs::ShardSession;
use squall_lattices::{Lattice, LatticeValue};
use squall_proto::{decode_response, Key, Response};

use crate::clients::ClientPool;
use crate::config::CacheConfig;
use crate::{Error, Result};

/// How long the update thread waits for a push before doing its periodic work.
const POLL: Duration = Duration::from_millis(100);

/// Bytes counted per entry besides its value, so that many tiny keys are bounded too.
const ENTRY_OVERHEAD: usize = 64;

/// The consistency a call asks for.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Consistency {
    /// Every read returns the cache's current merge of what it knows; writes are merged.
    #[default]
    Lww,
}

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
    evicted: Vec<Key>,
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
                evicted: Vec::new(),
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

    /// A view of the cache for one call.
    pub fn session(&self, mode: Consistency) -> Session {
        Session {
            cache: self.clone(),
            mode,
        }
    }

    /// Reads a key: from the cache if held, else from the store (subscribing to it).
    pub async fn get(&self, key: &str) -> Result<Option<LatticeValue>> {
        if let Some(value) = self.lookup(key) {
            self.inner.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(value);
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
        Ok(self.absorb(&mut entries, key, value, true))
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

    fn lookup(&self, key: &str) -> Option<Option<LatticeValue>> {
        let mut entries = self.entries();
        match entries.lru.get(key) {
            Some(entry) if entry.filled => Some(entry.value.clone()),
            _ => None,
        }
    }

    /// Inserts an unfilled entry, so pushes that race with the first fetch are kept.
    fn reserve(&self, key: &str) {
        let mut entries = self.entries();
        if !entries.lru.contains(key) {
            entries.lru.push(
                key.to_string(),
                Entry {
                    value: None,
                    size: ENTRY_OVERHEAD,
                    generation: 0,
                    filled: false,
                },
            );
            entries.bytes += ENTRY_OVERHEAD;
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
                    entry.size = size_of(entry.value.as_ref());
                }
                entry.filled |= fill;
                (old, entry.size, entry.value.clone())
            }
            None => {
                let size = size_of(value.as_ref());
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

    fn evict(&self, entries: &mut Entries) {
        while entries.bytes > self.inner.config.capacity_bytes && entries.lru.len() > 1 {
            let Some((key, entry)) = entries.lru.pop_lru() else {
                break;
            };
            entries.bytes = entries.bytes.saturating_sub(entry.size);
            entries.evicted.push(key);
            self.inner.evictions.fetch_add(1, Ordering::Relaxed);
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
            entries.lru.clear();
            entries.bytes = 0;
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
        let evicted = std::mem::take(&mut self.entries().evicted);
        let endpoint = self.inner.endpoint.clone();
        let renewed = self.inner.kvs.with_blocking(|client| {
            if !evicted.is_empty() {
                client.unsubscribe(&endpoint, &evicted)?;
            }
            client.renew(&endpoint)
        });
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
                while let Ok(frame) = socket.recv_bytes(zmq::DONTWAIT) {
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

/// One call's view of the cache (see the module docs).
#[derive(Debug)]
pub struct Session {
    cache: Cache,
    mode: Consistency,
}

impl Session {
    /// The mode this session reads in.
    pub fn mode(&self) -> Consistency {
        self.mode
    }

    /// Reads a key as the session's mode allows.
    pub async fn get(&mut self, key: &str) -> Result<Option<LatticeValue>> {
        match self.mode {
            Consistency::Lww => self.cache.get(key).await,
        }
    }

    /// Merges a value into a key (through to the store); returns the merged value.
    pub async fn merge(&mut self, key: &str, value: LatticeValue) -> Result<LatticeValue> {
        match self.mode {
            Consistency::Lww => self.cache.merge(key, value).await,
        }
    }
}
