//! Pushing changes of watched keys to the caches that hold them.
//!
//! An executor's cache tells the shards which keys it holds ([`Request::Subscribe`], which
//! also reads them, so nothing can change between the read and the watch), and each shard
//! pushes the merged value of every watched key that a committed batch changed. This is how
//! Cloudburst keeps its caches fresh without the caches polling.
//!
//! Pushes are fire-and-forget over one ZeroMQ PUSH socket per subscriber, bounded by
//! [`PUSH_QUEUE`] messages. A subscriber that cannot keep up (or is gone) is forgotten rather
//! than allowed to pin the shard's memory, and so is one whose lease ([`LEASE`]) ran out. A
//! forgotten subscriber gets a new session number the next time it talks to the shard, which
//! tells it that it may have missed changes and must drop what it cached from this shard.
//! Values are lattices, so a push that arrives late, twice, or out of order is still merged
//! correctly by the subscriber.
//!
//! [`Request::Subscribe`]: squall_proto::Request::Subscribe

use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use squall_lattices::Entry;
use squall_proto::{encode_response, Key, Response};

use crate::log::Store;

/// A subscriber not heard from for this long is forgotten. Subscribers renew well within it.
pub const LEASE: Duration = Duration::from_secs(30);

/// Push messages queued per subscriber before it counts as unable to keep up.
pub const PUSH_QUEUE: i32 = 1024;

/// Most subscribers one shard remembers; new ones are refused beyond it until leases expire.
const MAX_SUBSCRIBERS: usize = 1024;

/// Most keys one subscriber may watch on one shard.
pub const MAX_KEYS_PER_SUBSCRIBER: usize = 1_000_000;

/// Longest subscriber endpoint accepted.
const MAX_ENDPOINT_LEN: usize = 256;

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SubscribeError {
    /// The endpoint is not a `tcp://` address of sane length.
    #[error("invalid subscriber endpoint {0:?}")]
    Endpoint(String),
    /// The shard already serves as many subscribers, or this subscriber watches as many keys,
    /// as it allows.
    #[error("subscription limit reached: {0}")]
    Full(&'static str),
    /// ZeroMQ would not create or connect the push socket.
    #[error("cannot connect to subscriber {endpoint}: {cause}")]
    Connect { endpoint: String, cause: zmq::Error },
}

struct Subscriber {
    socket: zmq::Socket,
    session: u64,
    keys: HashSet<Key>,
    expires: Instant,
}

/// One shard's subscribers and the keys each watches. Owned by the shard's thread.
pub(crate) struct Subscriptions {
    context: zmq::Context,
    /// What the pushes present to subscribers (see [`squall_proto::secret`]).
    secret: Option<squall_proto::secret::ClusterSecret>,
    subscribers: HashMap<String, Subscriber>,
    /// Key -> endpoints watching it.
    watchers: HashMap<Key, Vec<String>>,
    /// Watched keys changed since the last successful commit.
    changed: HashSet<Key>,
    last_sweep: Instant,
}

impl Subscriptions {
    pub(crate) fn new(
        context: zmq::Context,
        secret: Option<squall_proto::secret::ClusterSecret>,
    ) -> Self {
        Self {
            context,
            secret,
            subscribers: HashMap::new(),
            watchers: HashMap::new(),
            changed: HashSet::new(),
            last_sweep: Instant::now(),
        }
    }

    /// Renews (or creates) `endpoint`'s subscription, adds `keys` to what it watches, and
    /// returns its session.
    pub(crate) fn subscribe(
        &mut self,
        endpoint: &str,
        keys: impl IntoIterator<Item = Key>,
    ) -> Result<u64, SubscribeError> {
        // TCP only: a client must not make the shard connect to local IPC sockets.
        if endpoint.len() > MAX_ENDPOINT_LEN || !endpoint.starts_with("tcp://") {
            return Err(SubscribeError::Endpoint(endpoint.to_string()));
        }
        if !self.subscribers.contains_key(endpoint) {
            // Refuse rather than evict: evicting would let anyone push real subscribers out.
            if self.subscribers.len() >= MAX_SUBSCRIBERS {
                return Err(SubscribeError::Full("too many subscribers"));
            }
            let connect = |cause| SubscribeError::Connect {
                endpoint: endpoint.to_string(),
                cause,
            };
            let socket = self.context.socket(zmq::PUSH).map_err(connect)?;
            socket.set_linger(0).map_err(connect)?;
            if let Some(secret) = &self.secret {
                secret.secure_client(&socket).map_err(connect)?;
            }
            socket.set_sndhwm(PUSH_QUEUE).map_err(connect)?;
            socket.connect(endpoint).map_err(connect)?;
            self.subscribers.insert(
                endpoint.to_string(),
                Subscriber {
                    socket,
                    session: rand::random(),
                    keys: HashSet::new(),
                    expires: Instant::now(),
                },
            );
        }
        let Some(subscriber) = self.subscribers.get_mut(endpoint) else {
            return Err(SubscribeError::Endpoint(endpoint.to_string()));
        };
        subscriber.expires = Instant::now() + LEASE;
        for key in keys {
            if subscriber.keys.len() >= MAX_KEYS_PER_SUBSCRIBER {
                return Err(SubscribeError::Full("too many keys for one subscriber"));
            }
            if subscriber.keys.insert(key.clone()) {
                self.watchers
                    .entry(key)
                    .or_default()
                    .push(endpoint.to_string());
            }
        }
        Ok(subscriber.session)
    }

    /// Stops watching `key` for `endpoint`.
    pub(crate) fn unsubscribe(&mut self, endpoint: &str, key: &str) {
        if let Some(subscriber) = self.subscribers.get_mut(endpoint) {
            if subscriber.keys.remove(key) {
                self.unwatch(key, endpoint);
            }
        }
    }

    /// Notes that a write changed `key`; pushed after the next successful commit.
    pub(crate) fn touched(&mut self, key: &str) {
        if !self.watchers.is_empty() && self.watchers.contains_key(key) {
            self.changed.insert(key.to_string());
        }
    }

    /// After a successful commit: pushes the current value of every changed watched key to
    /// each of its watchers, one message per subscriber. Subscribers that cannot take the
    /// message are forgotten.
    pub(crate) fn push(&mut self, store: &Store, shard: u32) {
        if self.changed.is_empty() {
            return;
        }
        let mut outgoing: HashMap<&str, Vec<(Key, Entry)>> = HashMap::new();
        for key in self.changed.drain() {
            let (Some(endpoints), Some(value)) = (self.watchers.get(&key), store.get(&key)) else {
                continue;
            };
            for endpoint in endpoints {
                outgoing
                    .entry(endpoint.as_str())
                    .or_default()
                    .push((key.clone(), value.clone()));
            }
        }
        let mut lost = Vec::new();
        for (endpoint, updates) in outgoing {
            let Some(subscriber) = self.subscribers.get(endpoint) else {
                continue;
            };
            let message = Response::Notify {
                session: subscriber.session,
                updates,
            };
            let sent = match encode_response(0, &message) {
                Ok(frame) => subscriber
                    .socket
                    .send(frame, zmq::DONTWAIT)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(cause) = sent {
                tracing::warn!(shard, subscriber = endpoint, %cause, "subscriber cannot keep up; forgetting it");
                lost.push(endpoint.to_string());
            }
        }
        for endpoint in lost {
            self.forget(&endpoint);
        }
    }

    /// Forgets subscribers whose lease ran out (at most once a second).
    pub(crate) fn expire(&mut self, shard: u32) {
        let now = Instant::now();
        if now.duration_since(self.last_sweep) < Duration::from_secs(1) {
            return;
        }
        self.last_sweep = now;
        let expired: Vec<String> = self
            .subscribers
            .iter()
            .filter(|(_, s)| s.expires < now)
            .map(|(e, _)| e.clone())
            .collect();
        for endpoint in expired {
            tracing::debug!(shard, subscriber = %endpoint, "subscription lease expired");
            self.forget(&endpoint);
        }
    }

    fn forget(&mut self, endpoint: &str) {
        if let Some(subscriber) = self.subscribers.remove(endpoint) {
            for key in &subscriber.keys {
                self.unwatch(key, endpoint);
            }
        }
    }

    fn unwatch(&mut self, key: &str, endpoint: &str) {
        if let Some(endpoints) = self.watchers.get_mut(key) {
            endpoints.retain(|e| e != endpoint);
            if endpoints.is_empty() {
                self.watchers.remove(key);
            }
        }
    }

    /// Subscribers currently remembered.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.subscribers.len()
    }
}

#[cfg(test)]
mod tests {
    use squall_lattices::{LatticeValue, Lww, Timestamp};

    use super::*;

    fn lww(v: &str) -> Entry {
        Entry::of(LatticeValue::Lww(Lww::new(
            Timestamp { time: 1, writer: 1 },
            bytes::Bytes::copy_from_slice(v.as_bytes()),
        )))
    }

    #[test]
    fn changed_watched_keys_are_pushed_once_per_commit() {
        let context = zmq::Context::new();
        let pull = context.socket(zmq::PULL).expect("socket");
        pull.bind("tcp://127.0.0.1:*").expect("bind");
        let endpoint = pull.get_last_endpoint().expect("endpoint").expect("utf-8");
        let mut subs = Subscriptions::new(context.clone(), None);
        let session = subs
            .subscribe(&endpoint, ["a".to_string()])
            .expect("subscribe");
        assert_eq!(subs.subscribe(&endpoint, []).expect("renew"), session);
        let mut store = Store::new();
        store.insert("a".into(), lww("1"));
        store.insert("b".into(), lww("2"));
        subs.touched("a");
        subs.touched("b");
        subs.touched("a");
        subs.push(&store, 0);
        pull.set_rcvtimeo(5000).expect("timeout");
        let frame = pull.recv_bytes(0).expect("push");
        let (id, message) = squall_proto::decode_response(&frame).expect("decode");
        assert_eq!(id, 0);
        assert_eq!(
            message,
            Response::Notify {
                session,
                updates: vec![("a".into(), lww("1"))]
            }
        );
        // Nothing more until another change.
        subs.push(&store, 0);
        assert!(pull.recv_bytes(zmq::DONTWAIT).is_err());
    }

    #[test]
    fn bad_endpoints_are_refused_and_unsubscribed_keys_are_not_pushed() {
        let mut subs = Subscriptions::new(zmq::Context::new(), None);
        assert!(subs.subscribe("http://example", []).is_err());
        assert!(subs.subscribe(&"tcp://".repeat(100), []).is_err());
        subs.subscribe("tcp://127.0.0.1:9", ["k".to_string()])
            .expect("subscribe");
        subs.unsubscribe("tcp://127.0.0.1:9", "k");
        subs.touched("k");
        assert!(subs.changed.is_empty());
        assert_eq!(subs.len(), 1);
    }
}
