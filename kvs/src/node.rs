//! Starting and stopping a storage node.
//!
//! [`Node::start`] binds one ROUTER socket per shard, recovers the data directory, and spawns
//! the shard threads. Recovery reads every shard directory and re-homes keys by the current
//! ring, so a node restarted with another shard count keeps all its data: each shard then
//! writes a fresh snapshot, and only once all of them are durable are the old files removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use squall_lattices::Lattice;
use squall_proto::secret;
use squall_proto::Topology;

use squall_proto::Member;

use crate::cluster::{Agent, ReplicaCheck, Shared};
use crate::journal::{self, Journal};
use crate::log::{recover, remove_files, Recovered, ShardLog, Store};
use crate::ring::Ring;
use crate::shard::Shard;
use crate::subscription::Subscriptions;
use crate::{io_err, zmq_err, Config, Error, Result};

/// A running storage node: its shard threads and their sockets. One per process in
/// production, several in tests. Dropping it stops the shards and waits for them.
#[derive(Debug)]
pub struct Node {
    topology: Arc<Topology>,
    shutdown: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    keys: usize,
    agent: Option<AgentHandle>,
}

#[derive(Debug)]
struct AgentHandle {
    stop: Arc<AtomicBool>,
    leave: Arc<AtomicBool>,
    left: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Messages ZeroMQ queues per connection before it stops reading from it (back-pressure). A
/// client of this crate has one request in flight per connection; 16 leaves room for
/// pipelining clients. The bound is per connection: the number of connections is not limited.
const PEER_QUEUE: i32 = 16;

fn shard_dir(data_dir: &Path, index: usize) -> PathBuf {
    data_dir.join(format!("shard-{index}"))
}

/// Shard directories present in `data_dir`, by index.
fn existing_shard_dirs(data_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut dirs = Vec::new();
    if !data_dir.exists() {
        return Ok(dirs);
    }
    for entry in std::fs::read_dir(data_dir).map_err(io_err(data_dir))? {
        let entry = entry.map_err(io_err(data_dir))?;
        let index = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("shard-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(index) = index {
            dirs.push((index, entry.path()));
        }
    }
    Ok(dirs)
}

impl Node {
    /// Binds, recovers and starts a node. Returns once every shard is accepting requests.
    pub fn start(config: Config) -> Result<Node> {
        config.validate()?;
        let config = Arc::new(config);
        secret::warn_if_open("storage node", &config.host, config.secret.as_ref());
        let mut sockets = Vec::with_capacity(config.shards);
        let mut endpoints = Vec::with_capacity(config.shards);
        for index in 0..config.shards {
            // A context per shard gives each shard its own ZeroMQ I/O thread: shared nothing
            // down to the network, and no single I/O thread for the whole node to queue on.
            let context = zmq::Context::new();
            let socket = context.socket(zmq::ROUTER).map_err(zmq_err("socket"))?;
            socket.set_linger(0).map_err(zmq_err("set linger"))?;
            let gatekeeper = secret::guard(config.secret.as_ref(), &context, &socket)
                .map_err(|e| Error::Config(format!("shard {index}: {e}")))?;
            // Frames a little over the limit still get a `TooLarge` reply; ZeroMQ drops larger
            // ones (closing the sender's connection) before they are read. With at most
            // `PEER_QUEUE` messages queued per connection, one peer can hold at most about
            // `PEER_QUEUE × (max_request_bytes + 1 MiB)` of the node's memory.
            let hard_limit =
                i64::try_from(config.max_request_bytes.saturating_add(1 << 20)).unwrap_or(i64::MAX);
            socket
                .set_maxmsgsize(hard_limit)
                .map_err(zmq_err("set maxmsgsize"))?;
            socket
                .set_rcvhwm(PEER_QUEUE)
                .map_err(zmq_err("set rcvhwm"))?;
            let endpoint = if config.port == 0 {
                format!("tcp://{}:*", config.host)
            } else {
                format!("tcp://{}:{}", config.host, usize::from(config.port) + index)
            };
            socket.bind(&endpoint).map_err(|cause| Error::Bind {
                endpoint: endpoint.clone(),
                cause,
            })?;
            let bound = socket
                .get_last_endpoint()
                .map_err(zmq_err("get endpoint"))?
                .map_err(|_| Error::Config("bound endpoint is not UTF-8".into()))?;
            sockets.push((context, socket, gatekeeper));
            endpoints.push(bound);
        }
        let ring = Arc::new(Ring::new(config.shards, config.virtual_nodes));
        let topology = Arc::new(Topology {
            incarnation: rand::random(),
            shards: endpoints,
            virtual_nodes: config.virtual_nodes,
            cluster: None,
        });
        let shared = config
            .cluster
            .as_ref()
            .map(|_| Arc::new(Shared::new(topology.shards[0].clone(), config.shards)));

        let (stores, logs) = match &config.data_dir {
            Some(dir) => Self::recover(dir, &config, &ring)?,
            None => (
                (0..config.shards).map(|_| Store::new()).collect(),
                (0..config.shards).map(|_| None).collect(),
            ),
        };
        let keys = stores.iter().map(Store::len).sum();

        let shutdown = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(config.shards);
        for (index, (((context, socket, gatekeeper), store), log)) in
            sockets.into_iter().zip(stores).zip(logs).enumerate()
        {
            let journal = Journal::recover(&store);
            // What was recovered is in the log.
            let durable_seq = journal.last_seq();
            let shard = Shard {
                index: index as u32,
                socket,
                journal,
                store,
                log,
                ring: ring.clone(),
                topology: topology.clone(),
                config: config.clone(),
                shutdown: shutdown.clone(),
                snapshot: None,
                snapshot_not_before: None,
                subscriptions: Subscriptions::new(context, config.secret.clone()),
                _gatekeeper: gatekeeper,
                cluster: shared.clone(),
                replicas: ReplicaCheck::default(),
                changed: hashbrown::HashSet::new(),
                load: Default::default(),
                deadlines: Default::default(),
                awaiting: Vec::new(),
                durable_seq,
            };
            let thread = std::thread::Builder::new()
                .name(format!("squall-shard-{index}"))
                .spawn(move || shard.run())
                .map_err(io_err("spawning a shard thread"))?;
            threads.push(thread);
        }
        let agent = match (&config.cluster, shared) {
            (Some(cluster), Some(shared)) => {
                let stop = Arc::new(AtomicBool::new(false));
                let leave = Arc::new(AtomicBool::new(false));
                let left = Arc::new(AtomicBool::new(false));
                let agent = Agent {
                    config: cluster.clone(),
                    shared,
                    member: Member {
                        id: topology.shards[0].clone(),
                        incarnation: topology.incarnation,
                        shards: topology.shards.clone(),
                        virtual_nodes: topology.virtual_nodes,
                    },
                    stop: stop.clone(),
                    leave: leave.clone(),
                    left: left.clone(),
                    writer: rand::random(),
                    secret: config.secret.clone(),
                };
                let thread = std::thread::Builder::new()
                    .name("squall-cluster-agent".into())
                    .spawn(move || agent.run())
                    .map_err(io_err("spawning the cluster agent"))?;
                Some(AgentHandle {
                    stop,
                    leave,
                    left,
                    thread,
                })
            }
            _ => None,
        };
        tracing::info!(
            shards = config.shards,
            keys,
            address = %topology.shards[0],
            data_dir = ?config.data_dir,
            fsync = ?config.fsync,
            "storage node started"
        );
        Ok(Node {
            topology,
            shutdown,
            threads,
            keys,
            agent,
        })
    }

    /// Loads every shard directory, assigns keys to shards by `ring`, and opens a log per
    /// shard. Rewrites the directories if keys are not where the ring puts them.
    #[allow(clippy::type_complexity)]
    fn recover(
        data_dir: &Path,
        config: &Config,
        ring: &Ring,
    ) -> Result<(Vec<Store>, Vec<Option<ShardLog>>)> {
        if !data_dir.exists() {
            std::fs::create_dir_all(data_dir).map_err(io_err(data_dir))?;
            if let Some(parent) = data_dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                crate::log::sync_dir(parent)?;
            }
        }
        let mut stores: Vec<Store> = (0..config.shards).map(|_| Store::new()).collect();
        let mut found: Vec<Recovered> = (0..config.shards).map(|_| Recovered::default()).collect();
        let mut misplaced = false;
        let mut stale_dirs = Vec::new();
        let (mut records, mut skipped) = (0u64, 0u64);
        for (index, dir) in existing_shard_dirs(data_dir)? {
            let mut recovered = recover(&dir)?;
            records += recovered.records;
            skipped += recovered.skipped_bytes;
            let entries = std::mem::take(&mut recovered.entries);
            if index < config.shards {
                found[index] = recovered;
            } else {
                stale_dirs.push(dir);
                misplaced |= !recovered.files.is_empty();
            }
            for (key, value) in entries {
                // A shard's journal stays its own (its sequence numbers are the shard's).
                let owner = if journal::is_journal_key(&key) {
                    index.min(config.shards.saturating_sub(1))
                } else {
                    ring.owner(&key) as usize
                };
                misplaced |= owner != index;
                match stores[owner].entry(key) {
                    std::collections::btree_map::Entry::Occupied(mut slot) => {
                        slot.get_mut().merge(value);
                    }
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        slot.insert(value);
                    }
                }
            }
        }
        let mut logs = Vec::with_capacity(config.shards);
        for (index, recovered) in found.iter().enumerate() {
            logs.push(ShardLog::open(
                &shard_dir(data_dir, index),
                recovered,
                config.fsync,
                config.compact_after_bytes,
            )?);
        }
        if misplaced {
            // Every shard writes its snapshot before any old file goes: until then a crash
            // leaves the old files, and the next start reads (and re-homes) everything again.
            tracing::info!("shard layout changed since the last run; rewriting shard directories");
            let mut obsolete = Vec::new();
            for (log, store) in logs.iter_mut().zip(&stores) {
                obsolete.extend(log.snapshot(store)?);
            }
            remove_files(&obsolete)?;
            for dir in stale_dirs {
                std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
            }
        }
        tracing::info!(
            records,
            skipped_bytes = skipped,
            "recovered the data directory"
        );
        Ok((stores, logs.into_iter().map(Some).collect()))
    }

    /// The address clients connect to (shard 0's endpoint; it answers topology requests).
    pub fn address(&self) -> &str {
        &self.topology.shards[0]
    }

    /// The node's shard layout.
    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// How many keys the node held when it started (recovered from its data directory).
    pub fn recovered_keys(&self) -> usize {
        self.keys
    }

    /// Whether every shard thread (and the cluster agent) is still running.
    pub fn is_running(&self) -> bool {
        self.threads.iter().all(|t| !t.is_finished())
            && self.agent.as_ref().is_none_or(|a| !a.thread.is_finished())
    }

    /// Stops the shards after their current batch and waits for them. A cluster member stops
    /// without handing its keys off: its replicas hold them (see [`Node::leave`]).
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Leaves the cluster gracefully: tells the router, hands every key to its replicas under
    /// the view without this node (while still serving), and then stops. Waits at most
    /// `timeout` for the hand-off; returns whether it finished. A node in no cluster just
    /// stops.
    pub fn leave(mut self, timeout: std::time::Duration) -> bool {
        let Some(agent) = &self.agent else {
            self.stop();
            return true;
        };
        agent.leave.store(true, Ordering::Relaxed);
        let deadline = std::time::Instant::now() + timeout;
        let mut finished = false;
        while std::time::Instant::now() < deadline {
            if agent.left.load(Ordering::Acquire) {
                finished = true;
                break;
            }
            if agent.thread.is_finished() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        if finished {
            tracing::info!("handed every key off; leaving");
        } else {
            tracing::warn!(
                "the hand-off did not finish in time; the replicas repair what is missing"
            );
        }
        self.stop();
        finished
    }

    fn stop(&mut self) {
        if let Some(agent) = self.agent.take() {
            agent.stop.store(true, Ordering::Relaxed);
            if agent.thread.join().is_err() {
                tracing::error!("the cluster agent panicked");
            }
        }
        self.shutdown.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            if thread.join().is_err() {
                tracing::error!("a shard thread panicked");
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop();
    }
}
