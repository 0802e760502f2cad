//! The KVS client: routes keys to shards, batches, and never waits without a deadline.
//!
//! A [`Client`] asks the node it is given for its shard layout, builds the same ring, and sends
//! each key straight to its shard over one ZeroMQ connection per shard. A
//! multi-key call sends one request per shard at once and then collects the answers. Every wait
//! is bounded by [`ClientConfig::timeout`]; an unanswered request is retried, on a fresh
//! connection (so a reply that arrives late can never be mistaken for the next one's), up to
//! [`ClientConfig::attempts`] times. Retrying is always safe: every write is a lattice merge,
//! and [`Client::increment`] sends totals, not deltas.

use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use squall_lattices::{Counter, LatticeValue, Lww, Timestamp, WriterId};
use squall_proto::{
    decode_response, encode_request, Key, KeyError, Request, RequestId, Response, Topology,
};

use crate::ring::Ring;
use crate::zmtp::Connection;
use crate::{Error, Result};

/// Pause between attempts when a node refused or dropped the connection.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// The longest timeout honoured (longer ones are cut to this).
const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Shards and virtual nodes accepted in a node's layout: a bound on the ring a client builds.
const MAX_SHARDS: usize = 4096;
const MAX_VIRTUAL_NODES: u32 = 65_536;

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
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            attempts: 3,
            writer: rand::random(),
        }
    }
}

struct Layout {
    topology: Topology,
    ring: Ring,
    connections: Vec<Option<Connection>>,
}

/// A connection to one storage node: one TCP connection per shard, opened on first use, and
/// no background thread. `Send` but not `Sync`: give each thread its own.
pub struct Client {
    seed: String,
    config: ClientConfig,
    layout: Option<Layout>,
    next_id: RequestId,
    last_time: u64,
    /// This writer's own contribution to each counter it has incremented.
    counters: HashMap<Key, Counter>,
    /// Sessions reported by the shards in the last routed call (subscriptions only).
    sessions: Vec<ShardSession>,
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
    /// The keys' values, in order, as [`Client::get_many`] returns them.
    pub values: Vec<Option<LatticeValue>>,
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
            config,
            layout: None,
            next_id: rand::random::<u32>() as u64,
            last_time: 0,
            counters: HashMap::new(),
            sessions: Vec::new(),
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

    /// Reads a key: `None` if it was never written.
    pub fn get(&mut self, key: &str) -> Result<Option<LatticeValue>> {
        let mut values = self.get_many(&[key.to_string()])?;
        Ok(values.pop().flatten())
    }

    /// Reads several keys at once (one request per shard, in parallel), in order.
    pub fn get_many(&mut self, keys: &[Key]) -> Result<Vec<Option<LatticeValue>>> {
        let results = self.routed(
            keys.len(),
            |i| keys[i].as_str(),
            |indices| Request::Get {
                keys: indices.iter().map(|&i| keys[i].clone()).collect(),
            },
        )?;
        values_of(results, keys)
    }

    /// Merges `value` into `key`. Fails with [`Error::Key`] if the key holds another lattice
    /// type (the stored value is then unchanged).
    pub fn put(&mut self, key: &str, value: LatticeValue) -> Result<()> {
        let key = key.to_string();
        let mut results = self.put_many(vec![(key.clone(), value)])?;
        match results.pop() {
            Some(Ok(())) => Ok(()),
            Some(Err(error)) => Err(Error::Key { key, error }),
            None => Err(Error::UnexpectedResponse("no result for the key".into())),
        }
    }

    /// Merges several values at once; returns one result per entry, in order.
    pub fn put_many(
        &mut self,
        entries: Vec<(Key, LatticeValue)>,
    ) -> Result<Vec<Result<(), KeyError>>> {
        let results = self.routed(
            entries.len(),
            |i| entries[i].0.as_str(),
            |indices| Request::Put {
                entries: indices.iter().map(|&i| entries[i].clone()).collect(),
            },
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
        )?;
        Ok(Subscription {
            values: values_of(results, keys)?,
            sessions: std::mem::take(&mut self.sessions),
        })
    }

    /// Renews `subscriber`'s lease on every shard of the node and returns their sessions.
    pub fn renew(&mut self, subscriber: &str) -> Result<Vec<ShardSession>> {
        if self.layout.is_none() {
            self.refresh()?;
        }
        let Some(layout) = self.layout.as_mut() else {
            return Err(Error::UnexpectedResponse("no layout".into()));
        };
        let requests: Vec<(usize, Request)> = (0..layout.topology.shards.len())
            .map(|shard| {
                (
                    shard,
                    Request::Subscribe {
                        subscriber: subscriber.to_string(),
                        keys: Vec::new(),
                    },
                )
            })
            .collect();
        let responses = round_trip(
            &self.config,
            &mut self.next_id,
            &layout.topology.shards,
            &mut layout.connections,
            &requests,
        )?;
        responses
            .into_iter()
            .zip(&layout.topology.shards)
            .map(|(response, shard)| match response {
                Response::Subscribed { session, .. } => Ok(ShardSession {
                    shard: shard.clone(),
                    session,
                }),
                Response::Error(e) => Err(Error::Request(e)),
                other => Err(Error::UnexpectedResponse(format!(
                    "expected a subscription, got {other:?}"
                ))),
            })
            .collect()
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
        let now = Timestamp::now(self.config.writer);
        let time = now.time.max(self.last_time + 1);
        self.last_time = time;
        let value = LatticeValue::Lww(Lww::new(
            Timestamp::new(time, self.config.writer),
            value.into(),
        ));
        self.put(key, value)
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

    /// Fetches the node's layout again (after it restarted with another shard count, say).
    pub fn refresh(&mut self) -> Result<()> {
        let endpoints = [self.seed.clone()];
        let mut connections = [None];
        let mut responses = round_trip(
            &self.config,
            &mut self.next_id,
            &endpoints,
            &mut connections,
            &[(0, Request::Topology)],
        )?;
        let topology = match responses.pop() {
            Some(Response::Topology(topology)) => topology,
            Some(Response::Error(e)) => return Err(Error::Request(e)),
            other => {
                return Err(Error::UnexpectedResponse(format!(
                    "expected the topology, got {other:?}"
                )))
            }
        };
        if topology.shards.is_empty()
            || topology.shards.len() > MAX_SHARDS
            || topology.virtual_nodes == 0
            || topology.virtual_nodes > MAX_VIRTUAL_NODES
        {
            return Err(Error::UnexpectedResponse(format!(
                "implausible layout: {} shards of {} virtual nodes",
                topology.shards.len(),
                topology.virtual_nodes
            )));
        }
        let ring = Ring::new(topology.shards.len(), topology.virtual_nodes);
        let connections = topology.shards.iter().map(|_| None).collect();
        self.layout = Some(Layout {
            topology,
            ring,
            connections,
        });
        Ok(())
    }

    /// Splits `count` keys by shard, sends one request per shard (built by `build` from the
    /// keys' indices) all at once, and returns one slot per key, in order. Refreshes the
    /// layout and retries once if a shard says a key is not its own.
    fn routed<'k>(
        &mut self,
        count: usize,
        key_of: impl Fn(usize) -> &'k str,
        build: impl Fn(&[usize]) -> Request,
    ) -> Result<Vec<Slot>> {
        for round in 0..2 {
            if self.layout.is_none() {
                self.refresh()?;
            }
            let Some(layout) = self.layout.as_mut() else {
                return Err(Error::UnexpectedResponse("no layout".into()));
            };
            let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); layout.ring.shards()];
            for i in 0..count {
                by_shard[layout.ring.owner(key_of(i)) as usize].push(i);
            }
            let requests: Vec<(usize, Request)> = by_shard
                .iter()
                .enumerate()
                .filter(|(_, indices)| !indices.is_empty())
                .map(|(shard, indices)| (shard, build(indices)))
                .collect();
            let responses = round_trip(
                &self.config,
                &mut self.next_id,
                &layout.topology.shards,
                &mut layout.connections,
                &requests,
            )?;
            let mut slots: Vec<Option<Slot>> = (0..count).map(|_| None).collect();
            let mut stale = false;
            self.sessions.clear();
            for ((shard, _), response) in requests.iter().zip(responses) {
                let indices = &by_shard[*shard];
                let results: Vec<Slot> = match response {
                    Response::Get(values) => values
                        .into_iter()
                        .map(|v| v.map_or_else(Slot::Failed, Slot::Value))
                        .collect(),
                    Response::Put(results) | Response::Unsubscribed(results) => results
                        .into_iter()
                        .map(|r| r.map_or_else(Slot::Failed, |()| Slot::Written))
                        .collect(),
                    Response::Subscribed { values, session } => {
                        self.sessions.push(ShardSession {
                            shard: layout.topology.shards[*shard].clone(),
                            session,
                        });
                        values
                            .into_iter()
                            .map(|v| v.map_or_else(Slot::Failed, Slot::Value))
                            .collect()
                    }
                    Response::Error(e) => return Err(Error::Request(e)),
                    Response::Topology(_) | Response::Notify { .. } => {
                        return Err(Error::UnexpectedResponse(format!(
                            "an unexpected answer: {response:?}"
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
                for (&i, slot) in indices.iter().zip(results) {
                    stale |= matches!(slot, Slot::Failed(KeyError::WrongShard { .. }));
                    slots[i] = Some(slot);
                }
            }
            if stale && round == 0 {
                tracing::debug!("layout is stale; refreshing");
                self.refresh()?;
                continue;
            }
            return slots
                .into_iter()
                .map(|s| s.ok_or_else(|| Error::UnexpectedResponse("a key got no answer".into())))
                .collect();
        }
        Err(Error::UnexpectedResponse(
            "the layout keeps changing".into(),
        ))
    }
}

/// Sends `requests` (each on the connection of its target index, opened on demand) all at
/// once and waits for every answer. Unanswered requests are resent on fresh connections, up to
/// `config.attempts` times, each attempt bounded by `config.timeout`.
fn round_trip(
    config: &ClientConfig,
    next_id: &mut RequestId,
    endpoints: &[String],
    connections: &mut [Option<Connection>],
    requests: &[(usize, Request)],
) -> Result<Vec<Response>> {
    let started = Instant::now();
    let mut responses: Vec<Option<Response>> = requests.iter().map(|_| None).collect();
    let attempts = config.attempts.max(1);
    let mut last_error = String::new();
    let timeout = config.timeout.min(MAX_TIMEOUT);
    for attempt in 1..=attempts {
        let deadline = Instant::now() + timeout;
        // Encode everything first, so that no error can interrupt the exchange once a request
        // is on the wire.
        let mut frames = Vec::with_capacity(requests.len());
        for (slot, (_, request)) in requests.iter().enumerate() {
            if responses[slot].is_none() {
                *next_id = next_id.wrapping_add(1);
                frames.push((slot, *next_id, encode_request(*next_id, request)?));
            }
        }
        let mut sent: Vec<(usize, RequestId)> = Vec::with_capacity(frames.len());
        for (slot, id, frame) in frames {
            let target = &requests[slot].0;
            let endpoint = &endpoints[*target];
            let outcome = match connections[*target].take() {
                Some(connection) => Ok(connection),
                None => Connection::connect(endpoint, deadline),
            }
            .and_then(|mut connection| connection.send(&frame, deadline).map(|()| connection));
            match outcome {
                Ok(connection) => {
                    connections[*target] = Some(connection);
                    sent.push((slot, id));
                }
                Err(e) => last_error = format!("{endpoint}: {e}"),
            }
        }
        // One request is outstanding per connection, so the next message is its answer. After
        // any error the connection is dropped (lazy pirate), so a late answer to a lost attempt
        // can never be read as the answer to another request; every sent request is read (or
        // its connection dropped) before an error is returned.
        let mut fatal = None;
        for (slot, id) in sent {
            let target = requests[slot].0;
            let Some(connection) = connections[target].as_mut() else {
                continue;
            };
            let decoded = match connection.recv(deadline) {
                Ok(reply) => decode_response(&reply).map_err(Error::from),
                Err(e) => {
                    last_error = format!("{}: {e}", endpoints[target]);
                    connections[target] = None;
                    continue;
                }
            };
            match decoded {
                Ok((reply_id, response)) if reply_id == id => responses[slot] = Some(response),
                Ok((reply_id, _)) => {
                    connections[target] = None;
                    fatal = Some(Error::UnexpectedResponse(format!(
                        "answer to request {reply_id} while waiting for {id}"
                    )));
                }
                Err(e) => {
                    connections[target] = None;
                    fatal = Some(e);
                }
            }
        }
        if let Some(error) = fatal {
            return Err(error);
        }
        if responses.iter().all(Option::is_some) {
            return Ok(responses.into_iter().flatten().collect());
        }
        tracing::debug!(attempt, error = %last_error, "request attempt failed");
        if attempt < attempts {
            // A node that refuses connections is likely restarting: give it a moment, within
            // the attempt's own budget.
            if let Some(rest) = deadline.checked_duration_since(Instant::now()) {
                std::thread::sleep(rest.min(RETRY_PAUSE));
            }
        }
    }
    let endpoint = requests
        .iter()
        .zip(&responses)
        .find(|(_, r)| r.is_none())
        .map(|((t, _), _)| endpoints[*t].clone())
        .unwrap_or_default();
    Err(Error::Timeout {
        endpoint,
        attempts,
        waited: started.elapsed(),
        last_error,
    })
}

/// The values of a read (GET or SUBSCRIBE), in key order; the first failed key is the error.
fn values_of(results: Vec<Slot>, keys: &[Key]) -> Result<Vec<Option<LatticeValue>>> {
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
    Value(Option<LatticeValue>),
    Written,
    Failed(KeyError),
}
