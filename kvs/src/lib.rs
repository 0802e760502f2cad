//! Squall's key-value store, in the manner of Anna.
//!
//! A storage node runs one **shard per thread**. Each shard owns the keys that the node's
//! consistent-hash ring assigns to it, in a map no other thread touches, behind its own ZeroMQ
//! socket with its own ZeroMQ I/O thread: no lock and no queue is shared between shards.
//! Clients fetch the node's layout once and route every key straight to its shard.
//!
//! Every value is a lattice ([`squall_lattices::LatticeValue`]) and every PUT is merged into the
//! stored value, so retries, duplicates and reordering are harmless. A PUT of another lattice
//! type than the stored one is refused with a typed error and changes nothing.
//!
//! With a data directory, each shard keeps a write-ahead log (group commit: one write and, by
//! default, one `fdatasync` per batch of requests, before any reply of the batch is sent) and
//! compacts it into snapshots. Because records are lattice merges, recovery is simply "merge
//! every record found", in any order, any number of times; a torn tail is cut at the first bad
//! checksum. The log is written here rather than taken from a storage crate for that reason:
//! an embedded B-tree or LSM (redb, fjall, rocksdb) would add a read-modify-write or a
//! merge-operator layer to every put and its own page or compaction machinery, while the memory
//! tier already serves every read.
//!
//! # Layout
//! - [`config`]: [`Config`], the node's settings, and [`FsyncPolicy`].
//! - [`ring`]: the consistent-hash ring that maps keys to shards.
//! - [`log`]: the per-shard write-ahead log, snapshots and recovery.
//! - [`shard`]: a shard's request loop.
//! - [`subscription`]: pushing changes of watched keys to executors' caches.
//! - [`node`]: starting and stopping a node ([`Node`]).
//! - [`client`]: [`Client`], with deadlines, retries and shard routing.
//! - `exchange`: the request exchange every client of a node uses (the client, the cluster
//!   agent, the router): requests at once, answers by id, retries on fresh connections.
//! - `zmtp`: the client's ZeroMQ connections, which need no I/O thread.
//! - [`placement`]: a cluster view as key -> replicas (global ring, per-key overrides).
//! - [`cluster`]: a node's part in a cluster (heartbeats, hand-off, gossip, load reports).
//! - [`router`]: the cluster's membership ([`Router`]).
//!
//! Modules depend downward only: `zmtp` <- `exchange` <- `client`, `placement` <- `cluster`,
//! `router` (the agent uses the client's configuration, the router the exchange's `Retry`;
//! the client uses neither).
//!
//! # Example
//! ```
//! use squall_kvs::{Client, ClientConfig, Config, Node};
//! use squall_lattices::LatticeValue;
//!
//! // A two-shard node on an OS-assigned loopback port, memory only.
//! let node = Node::start(Config { shards: 2, ..Config::default() })?;
//! let mut client = Client::connect(node.address(), ClientConfig::default())?;
//! client.put_lww("greeting", "hello")?;
//! client.increment("visits", 3)?;
//! client.increment("visits", 2)?;
//! match client.get("visits")? {
//!     Some(LatticeValue::Counter(visits)) => assert_eq!(visits.value(), 5),
//!     other => panic!("unexpected {other:?}"),
//! }
//! # Ok::<(), squall_kvs::Error>(())
//! ```
//!
//! # Dependencies
//! - `zmq` 0.9 for the node's sockets. It links Debian's libzmq (`libzmq3-dev`, a 2.5 s
//!   build), where 0.10 compiles libzmq from source on every clean build (about 70 s).
//! - No ZeroMQ library in the client: it speaks the same wire protocol itself, without
//!   libzmq's I/O thread (see the `zmtp` module for why and what that saved).
//! - `rmp-serde`, through `squall-proto`, for messages.
//! - `xxhash-rust` (xxh3) for ring hashing: the ring must hash identically in every process
//!   and release, which std's randomly keyed hasher does not.
//! - `crc32fast` for log record checksums.
//! - `hashbrown` for the client's per-key counter totals.

pub mod client;
pub mod cluster;
pub mod config;
mod exchange;
pub mod journal;
pub mod log;
pub mod node;
pub mod placement;
pub mod ring;
pub mod router;
pub mod shard;
pub mod subscription;
pub(crate) mod zmtp;

pub use client::{Acks, Client, ClientConfig, ShardSession, Subscription, VIEW_SESSION};
pub use cluster::ClusterConfig;
pub use config::{Config, FsyncPolicy};
pub use node::Node;
pub use router::{Router, RouterConfig};
pub use squall_proto::{Key, KeyError, RequestError};

use std::path::PathBuf;
use std::time::Duration;

/// What can go wrong in the store and its client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ZeroMQ call failed.
    #[error("zeromq {op} failed: {cause}")]
    Zmq {
        /// What was being done.
        op: &'static str,
        /// ZeroMQ's error.
        cause: zmq::Error,
    },
    /// A shard could not listen on its address (in use, or not a local address).
    #[error("cannot listen on {endpoint}: {cause}")]
    Bind {
        /// The ZeroMQ endpoint.
        endpoint: String,
        /// ZeroMQ's error.
        cause: zmq::Error,
    },
    /// No answer arrived within the deadline, after every retry.
    #[error(
        "no answer from {endpoint} after {attempts} attempts in {waited:?} (last: {last_error})"
    )]
    Timeout {
        /// The shard endpoint asked.
        endpoint: String,
        /// How many times the request was tried.
        attempts: u32,
        /// How long the client waited in all.
        waited: Duration,
        /// What the last attempt ran into (timeout, connection refused, ...).
        last_error: String,
    },
    /// The node rejected the whole request.
    #[error("request rejected: {0}")]
    Request(#[from] RequestError),
    /// One key of a request failed.
    #[error("key {key:?}: {error}")]
    Key {
        /// The key.
        key: Key,
        /// Why.
        error: KeyError,
    },
    /// A message could not be encoded or decoded.
    #[error(transparent)]
    Protocol(#[from] squall_proto::Error),
    /// The node answered with something that does not fit the request.
    #[error("unexpected response: {0}")]
    UnexpectedResponse(String),
    /// A file of the data directory could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        cause: std::io::Error,
    },
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Something exceeds a size limit.
    #[error("{what} is too large ({size} bytes)")]
    TooLarge {
        /// What was too large.
        what: String,
        /// Its size.
        size: usize,
    },
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn zmq_err(op: &'static str) -> impl FnOnce(zmq::Error) -> Error {
    move |cause| Error::Zmq { op, cause }
}

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |cause| Error::Io { path, cause }
}
