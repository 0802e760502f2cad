//! Squall's wire protocol between KVS clients and storage nodes.
//!
//! Every message is one ZeroMQ frame: a fixed 12-byte header followed by a MessagePack body.
//!
//! ```text
//!  0      2          4                      12
//!  +------+----------+----------------------+------------------------------+
//!  | "SQ" | version  | request id (u64, BE) | MessagePack body (rmp-serde) |
//!  +------+----------+----------------------+------------------------------+
//! ```
//!
//! The header is binary and fixed so that a node can answer a message it cannot decode (wrong
//! version, garbage body) with an error that carries the request's id, and so that a future
//! version can change the body freely. Bodies are MessagePack through `serde` + `rmp-serde`:
//! compact, schema-light, and fast to decode; payload bytes travel as MessagePack binary.
//!
//! Decoding never trusts its input: lengths are bounded by the frame, nesting depth is capped
//! ([`MAX_DEPTH`]), and every failure is a typed [`Error`].
//!
//! # Layout
//! - [`call`]: the call fabric's messages (gateway, scheduler, executor), same framing.
//! - [`fabric`]: the mailboxes and sockets those messages travel on (ZeroMQ PUSH/PULL).
//! - [`keys`]: the key layout: which store key holds which of Squall's records.
//! - [`ready`]: the READY line every process prints once it serves, and its reader.
//! - [`report`]: what each step of a call reports for its activation record (timings, CPU,
//!   memory, log lines).
//! - [`poll`]: waiting for a condition within a bound (tests, benchmarks, process starters).
//! - [`Request`], [`Response`] and their parts: what travels.
//! - [`encode_request`], [`decode_request`], [`encode_response`], [`decode_response`]: the codec.
//!
//! # Example
//! ```
//! use squall_proto::{decode_request, encode_request, peek_id, Request};
//!
//! let request = Request::Get { keys: vec!["user:42".to_string()] };
//! let frame = encode_request(7, &request).unwrap();
//! assert_eq!(peek_id(&frame), Some(7));
//! assert_eq!(decode_request(&frame).unwrap(), (7, request));
//! assert!(decode_request(&frame[..5]).is_err()); // truncated: an error, never a panic
//! ```

pub mod call;
pub mod fabric;
pub mod keys;
pub mod poll;
pub mod ready;
pub mod report;
pub mod secret;

use serde::{Deserialize, Serialize};
use squall_lattices::{Entry, LatticeValue, TypeMismatch, Write};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"SQ";
/// The protocol version this build speaks.
pub const VERSION: u16 = 2;
/// Bytes before the body: magic, version, request id.
pub const HEADER_LEN: usize = 12;
/// The longest a shard holds a [`Request::AwaitChange`] (well under a client's timeout).
pub const MAX_AWAIT_MS: u32 = 1000;
/// The deepest nesting a body may have (nested maps, clocks); deeper bodies are rejected
/// rather than risking the decoder's stack.
pub const MAX_DEPTH: usize = 64;

/// A key of the store.
pub type Key = String;
/// Chosen by the client, echoed in the response; unique among a client's outstanding requests.
pub type RequestId = u64;

/// What a client asks of a storage node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Read keys. Every key must be owned by the shard the request is sent to.
    Get {
        /// The keys, answered in the same order.
        keys: Vec<Key>,
    },
    /// Merge values into keys. Every key must be owned by the shard the request is sent to.
    Put {
        /// Keys and the values to merge into them, answered in the same order.
        entries: Vec<(Key, LatticeValue)>,
    },
    /// Ask for the node's shard layout, so a client can route keys itself.
    Topology,
    /// Read keys, as [`Request::Get`], and from now on push every change of them to
    /// `subscriber` (a ZeroMQ endpoint the subscriber has bound a PULL socket on) as
    /// [`Response::Notify`]. Also renews the subscriber's lease on this shard (keys may be empty
    /// for a plain renewal); a subscriber not renewed within the lease is forgotten.
    Subscribe {
        /// Where changes are pushed.
        subscriber: String,
        /// The keys to read and watch. Every key must be owned by the shard.
        keys: Vec<Key>,
    },
    /// Stop pushing changes of these keys to `subscriber` (it evicted them from its cache).
    Unsubscribe {
        /// The endpoint given in [`Request::Subscribe`].
        subscriber: String,
        /// The keys no longer watched.
        keys: Vec<Key>,
    },
    /// A GET or PUT routed by a client (or a node) using cluster view `generation`. A node whose
    /// view is newer answers every key with [`KeyError::WrongNode`] (a written value is still
    /// kept), so a client never counts a replica set that has changed since its view.
    Routed {
        /// The generation of the sender's view.
        generation: u64,
        /// The GET or PUT.
        request: Box<Request>,
    },
    /// To a router: `member` is alive (a join the first time, a heartbeat after). Answered
    /// with the cluster's current [`Response::View`].
    Join {
        /// The node.
        member: Member,
        /// Its load, for `squall cluster status` and the policy engine.
        stats: MemberStats,
    },
    /// To a router: the node `id` leaves; it hands its keys off under the view answered.
    Leave {
        /// The leaving node's id.
        id: String,
    },
    /// To a router: every member's last report and the current view.
    Status,
    /// To a router: give `key` this many replicas (`None`: back to the default). Answered
    /// with the new [`Response::View`]. The policy engine sends it for hot and cooled keys.
    Replicate {
        /// The key.
        key: Key,
        /// Its replicas.
        replicas: Option<u32>,
    },
    /// To a shard: up to `limit` of its keys and values after `after`, in key order (used to
    /// hand keys to their replicas after the membership changed).
    Scan {
        /// Start after this key (`None`: from the first).
        after: Option<Key>,
        /// The most entries answered.
        limit: u32,
        /// If not empty: exactly these keys (those held), whatever `after` says.
        #[serde(default)]
        only: Vec<Key>,
    },
    /// To a shard: take (and forget) up to `limit` keys changed since the last such request,
    /// with their values, for gossip to the other replicas.
    Changed {
        /// The most entries answered.
        limit: u32,
    },
    /// To a shard: its load since the last such request (which starts a new window), with
    /// its `top` most accessed keys.
    Stats {
        /// How many of the most accessed keys to name.
        top: u32,
    },
    /// To a shard: forget keys that were handed off, each only if the value handed off
    /// includes everything the shard holds (merging the stored value into it changes nothing)
    /// and the node is not one of the key's replicas.
    Drop {
        /// Keys and the entries their replicas acknowledged.
        entries: Vec<(Key, Entry)>,
    },
    /// Writes with an expiry (or an expiry alone), each given its epoch by the replica that
    /// takes it, as a [`Request::Put`]'s values are ([`Write::lift`]). Answered as a PUT.
    Write {
        /// Keys and their writes, answered in the same order.
        entries: Vec<(Key, Write)>,
    },
    /// Entries merged exactly as given, epoch and all: deletes (tombstones), and the
    /// hand-off and gossip between replicas. Answered as a PUT.
    Merge {
        /// Keys and the entries to merge into them, answered in the same order.
        entries: Vec<(Key, Entry)>,
    },
    /// To a shard: up to `limit` of its live keys (not deleted, not expired) that start with
    /// `prefix`, after `after`, in key order. Answered with [`Response::Keys`].
    List {
        /// The keys' common start (may be empty).
        prefix: Key,
        /// Start after this key (`None`: from the first).
        after: Option<Key>,
        /// The most keys answered.
        limit: u32,
    },
    /// Entries copied between replicas (hand-off and gossip): merged exactly as a
    /// [`Request::Merge`]'s, but not a client's write, so they enter no change journal.
    /// Answered as a PUT.
    Copy {
        /// Keys and the entries to merge into them, answered in the same order.
        entries: Vec<(Key, Entry)>,
    },
    /// To a shard: the clients' writes it journaled after sequence number `after`, up to
    /// `limit` of them, oldest first; the changes up to `after` are forgotten (the caller
    /// keeps its position durably). Answered with [`Response::Changes`].
    Changes {
        /// The last sequence number the caller has handled (0: none).
        after: u64,
        /// The most changes answered.
        limit: u32,
    },
    /// To a shard: answer once it has journaled a change with a sequence number above
    /// `after`, or after `wait_ms` (at most [`MAX_AWAIT_MS`]) if none came, with
    /// [`Response::Journaled`]. Forgets nothing: a consumer waits with it instead of asking
    /// for changes again and again, so a change reaches it as soon as it is durable.
    AwaitChange {
        /// The newest sequence number the caller knows of.
        after: u64,
        /// How long the shard may hold the request, in milliseconds.
        wait_ms: u32,
    },
    /// To a shard: journal every client's write from now on (`on`), durably, or stop.
    /// Answered with [`Response::Changes`] (no changes).
    Journal {
        /// Whether to journal.
        on: bool,
    },
    /// A [`Request::Put`] made by a call that a `kv-change` trigger started, `chain`
    /// deliveries deep: its changes are journaled with that depth ([`Change::chain`]), so the
    /// triggers they fire in turn can stop a loop. Answered as a PUT.
    PutChained {
        /// How many `kv-change` deliveries led to the writing call (1: a trigger's call).
        chain: u32,
        /// Keys and the values to merge into them, answered in the same order.
        entries: Vec<(Key, LatticeValue)>,
    },
    /// To a shard: up to `limit` of its live keys that start with `prefix`, after `after`, in
    /// key order, each with the bytes it takes in the store's encoding (the key's length and
    /// its entry's MessagePack size). Answered with [`Response::Sizes`]; what a namespace's
    /// stored bytes are measured with.
    Sizes {
        /// The keys' common start (may be empty).
        prefix: Key,
        /// Start after this key (`None`: from the first).
        after: Option<Key>,
        /// The most keys answered.
        limit: u32,
    },
}

/// A client's write as a shard's change journal keeps it (see [`Request::Changes`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Its sequence number in the shard's journal: increasing, not contiguous.
    pub seq: u64,
    /// When the shard applied it (ms since the Unix epoch).
    pub ms: u64,
    /// The key written.
    pub key: Key,
    /// The value written (`None` for a delete or an expiry alone).
    pub written: Option<LatticeValue>,
    /// Whether it was a delete.
    pub deleted: bool,
    /// The key's live value after the write (`None`: deleted or expired).
    pub after: Option<LatticeValue>,
    /// Identifies the write as its client sent it (a hash of the key and the write): equal
    /// at every replica that took it, and for a write sent again after a timeout, so a
    /// consumer delivers each write once whatever the number of its copies.
    #[serde(default)]
    pub digest: u64,
    /// How many `kv-change` deliveries led to the call that wrote it (0: a write from outside
    /// any trigger's call, see [`Request::PutChained`]).
    #[serde(default)]
    pub chain: u32,
}

/// A storage node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// One result per requested key: its entry (a tombstone for a deleted key; an expired
    /// value is answered as the tombstone it reaps to), `None` if the key is absent, or an
    /// error. Clients merge replicas' entries and read the live value
    /// ([`Entry::into_live`]).
    Get(Vec<Result<Option<Entry>, KeyError>>),
    /// One result per written key. `Ok` means merged and durable per the node's fsync policy.
    Put(Vec<Result<(), KeyError>>),
    /// The node's shard layout.
    Topology(Topology),
    /// The answer to [`Request::Subscribe`]: the keys' values as for a GET, and the shard's
    /// session for this subscriber. The session changes whenever the shard forgot the
    /// subscriber (a restart, an expired lease, or pushes it had to drop): changes may then
    /// have been missed, and the subscriber must treat what it holds from this shard as stale.
    Subscribed {
        /// One result per requested key, as in [`Response::Get`].
        values: Vec<Result<Option<Entry>, KeyError>>,
        /// The shard's session for this subscriber.
        session: u64,
    },
    /// The answer to [`Request::Unsubscribe`]: one result per key.
    Unsubscribed(Vec<Result<(), KeyError>>),
    /// Pushed by a shard to a subscriber (request id 0), never a reply: the current merged
    /// values of watched keys that changed, and the session they belong to.
    Notify {
        /// The shard's session for this subscriber (as in [`Response::Subscribed`]).
        session: u64,
        /// Changed keys and their entries after the merge (a tombstone for a delete).
        updates: Vec<(Key, Entry)>,
    },
    /// A router's answer to [`Request::Join`] and [`Request::Leave`]: the current view.
    View(ClusterView),
    /// A router's answer to [`Request::Status`].
    Status(ClusterStatus),
    /// A shard's answer to [`Request::Scan`] and [`Request::Changed`].
    Entries {
        /// Keys and entries (tombstones included), in key order for a scan.
        entries: Vec<(Key, Entry)>,
        /// Whether more entries follow (scan from the last key answered).
        more: bool,
    },
    /// A shard's answer to [`Request::Drop`]: how many keys it forgot.
    Dropped(u32),
    /// A shard's answer to [`Request::Stats`].
    Stats(LoadReport),
    /// The whole request failed.
    Error(RequestError),
    /// A shard's answer to [`Request::List`].
    Keys {
        /// The keys, in order.
        keys: Vec<Key>,
        /// Whether more follow (list from the last key answered).
        more: bool,
    },
    /// A shard's answer to [`Request::AwaitChange`].
    Journaled {
        /// The newest sequence number of a change the shard has made durable (0: none yet).
        newest: u64,
        /// Whether the shard journals.
        on: bool,
    },
    /// A shard's answer to [`Request::Changes`] and [`Request::Journal`].
    Changes {
        /// The changes, oldest first.
        changes: Vec<Change>,
        /// Changes the shard had to drop (its journal was full) since it last answered.
        lost: u64,
        /// Whether the shard journals.
        on: bool,
    },
    /// A shard's answer to [`Request::Sizes`].
    Sizes {
        /// Keys and their sizes in bytes, in key order.
        sizes: Vec<(Key, u64)>,
        /// Whether more follow (ask again from the last key answered).
        more: bool,
    },
}

impl Request {
    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Get { .. } => "get",
            Request::Put { .. } => "put",
            Request::Routed { .. } => "routed",
            Request::Topology => "topology",
            Request::Subscribe { .. } => "subscribe",
            Request::Unsubscribe { .. } => "unsubscribe",
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::Status => "status",
            Request::Replicate { .. } => "replicate",
            Request::Scan { .. } => "scan",
            Request::Changed { .. } => "changed",
            Request::Drop { .. } => "drop",
            Request::Stats { .. } => "stats",
            Request::Write { .. } => "write",
            Request::Merge { .. } => "merge",
            Request::List { .. } => "list",
            Request::Copy { .. } => "copy",
            Request::Changes { .. } => "changes",
            Request::AwaitChange { .. } => "await-change",
            Request::Journal { .. } => "journal",
            Request::PutChained { .. } => "put-chained",
            Request::Sizes { .. } => "sizes",
        }
    }
}

impl Response {
    /// The variant's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Response::Get(_) => "get",
            Response::Put(_) => "put",
            Response::Topology(_) => "topology",
            Response::Subscribed { .. } => "subscribed",
            Response::Unsubscribed(_) => "unsubscribed",
            Response::Notify { .. } => "notify",
            Response::View(_) => "view",
            Response::Status(_) => "status",
            Response::Entries { .. } => "entries",
            Response::Dropped(_) => "dropped",
            Response::Stats(_) => "stats",
            Response::Error(_) => "error",
            Response::Keys { .. } => "keys",
            Response::Changes { .. } => "changes",
            Response::Journaled { .. } => "journaled",
            Response::Sizes { .. } => "sizes",
        }
    }
}

/// How a node splits its keys among shards, each with its own socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// Changes whenever the node restarts; lets clients notice a new layout.
    pub incarnation: u64,
    /// One ZeroMQ endpoint per shard, indexed by shard number.
    pub shards: Vec<String>,
    /// Virtual nodes per shard on the node's consistent-hash ring.
    pub virtual_nodes: u32,
    /// The cluster this node belongs to, as the node last heard it (`None` for a node that
    /// runs alone). A router answers with no shards of its own and the cluster's view.
    #[serde(default)]
    pub cluster: Option<ClusterView>,
}

/// One storage node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// The node's id: its shard 0 endpoint, which also answers [`Request::Topology`].
    pub id: String,
    /// Drawn at random when the node starts: a node restarted on the same address is another
    /// member, which must receive its keys again.
    #[serde(default)]
    pub incarnation: u64,
    /// One ZeroMQ endpoint per shard, as in [`Topology::shards`].
    pub shards: Vec<String>,
    /// Virtual nodes per shard on the node's own ring.
    pub virtual_nodes: u32,
}

/// Who is in a cluster and how many copies each key has: everything a client needs to find a
/// key's replicas itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterView {
    /// Grows with every change of the view; of two views, the one with the larger generation
    /// is the newer.
    pub generation: u64,
    /// The live members, sorted by id.
    pub members: Vec<Member>,
    /// Replicas of every key without an override.
    pub replication: u32,
    /// Keys with another replication factor (hot keys), sorted by key.
    pub overrides: Vec<(Key, u32)>,
    /// The generation of the view this one replaced (0: none). A node that holds that view
    /// knows it missed nothing in between.
    #[serde(default)]
    pub previous: u64,
    /// Whether every member finished handing off under this membership: then every replica
    /// holds every key it should, and a read needs only as many replicas as overlap a write's
    /// acknowledgements (one, at replication 2 with majority writes). Until then clients read
    /// every replica and merge.
    #[serde(default)]
    pub settled: bool,
}

/// What a node reports with every heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStats {
    /// Keys held, over all shards.
    pub keys: u64,
    /// The newest view generation whose hand-off this node has finished (0: none yet).
    pub synced: u64,
    /// Requests served since the node started, over all shards.
    pub requests: u64,
    /// Estimated bytes held (as of the last load report).
    #[serde(default)]
    pub bytes: u64,
    /// Busy share of the last load window, in thousandths (the busiest shard's).
    #[serde(default)]
    pub occupancy_permille: u32,
    /// The node has left the view and is handing its keys off; the view is not settled until
    /// it has finished (`synced`).
    #[serde(default)]
    pub leaving: bool,
}

/// Load over one window: of a shard (answer to [`Request::Stats`]), or of a whole node (the
/// shards' reports combined), which nodes store in the store itself under
/// [`keys::load_report`] for the policy engine.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Who reports (a node's id; empty for a shard).
    pub id: String,
    /// When the window ended, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// How long the window was, in milliseconds.
    pub window_ms: u64,
    /// Busy share of the window, 0 to 1 (for a node: its busiest shard's).
    pub occupancy: f64,
    /// Keys held.
    pub keys: u64,
    /// Estimated bytes held (MessagePack sizes, from a sample of keys).
    pub bytes: u64,
    /// Key accesses (reads, writes, subscriptions) in the window.
    pub accesses: u64,
    /// Distinct keys accessed in the window (counted up to a bound).
    pub distinct: u64,
    /// Sum of the squared per-key access counts: with `accesses` and `distinct`, the mean and
    /// spread of per-key access counts.
    pub sum_squares: f64,
    /// The most accessed keys and their counts, most first.
    pub top: Vec<(Key, u64)>,
}

/// A router's view of the cluster, for operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The current view.
    pub view: ClusterView,
    /// Every member's last report, in the view's order.
    pub members: Vec<MemberStatus>,
}

impl ClusterStatus {
    /// Whether the view is settled with exactly `members` members, each of which reported
    /// it finished handing off under it: what a test or an operator waits for after a
    /// membership change.
    pub fn settled_with(&self, members: usize) -> bool {
        let generation = self.view.generation;
        self.view.settled
            && self.view.members.len() == members
            && self.members.len() == members
            && self.members.iter().all(|m| m.stats.synced == generation)
    }
}

/// One member's last report to the router.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// The node's id.
    pub id: String,
    /// What it last reported.
    pub stats: MemberStats,
    /// Milliseconds since its last heartbeat.
    pub silent_ms: u64,
}

/// Why one key of a request failed; the other keys are unaffected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum KeyError {
    /// The written value's lattice type differs from the stored one; the stored value is
    /// unchanged.
    #[error(transparent)]
    TypeMismatch(#[from] TypeMismatch),
    /// The merged value would exceed a size limit; the stored value is unchanged.
    #[error(transparent)]
    LimitExceeded(#[from] squall_lattices::LimitExceeded),
    /// The key belongs to another shard; the client's layout is stale.
    #[error("key belongs to shard {owner}")]
    WrongShard {
        /// The shard that owns the key.
        owner: u32,
    },
    /// The node is not one of the key's replicas in its view of the cluster (a written value
    /// was kept, to be handed to the replicas, but does not count as a replica's copy).
    #[error("this node is not a replica of the key in cluster view {generation}")]
    WrongNode {
        /// The generation of the node's view.
        generation: u64,
    },
    /// The write could not be made durable (the log failed); it may or may not survive a
    /// restart, and retrying it is safe.
    #[error("write not durable: {reason}")]
    NotDurable {
        /// What the log reported.
        reason: String,
    },
    /// The key is one a storage node keeps for itself (a shard's change journal): nothing
    /// else writes it.
    #[error("{key:?} is kept by the storage node for itself")]
    Reserved {
        /// The key.
        key: String,
    },
}

/// Why a whole request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RequestError {
    /// The frame could not be decoded.
    #[error("malformed request: {reason}")]
    Malformed {
        /// What the decoder reported.
        reason: String,
    },
    /// The frame's protocol version is not this node's.
    #[error("unsupported protocol version {got} (this node speaks {supported})")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u16,
        /// The version the node speaks.
        supported: u16,
    },
    /// The frame exceeds the node's request size limit.
    #[error("request of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// The frame's size.
        size: usize,
        /// The node's limit.
        limit: usize,
    },
    /// The node cannot serve the request now (its log is failing); retrying later is safe.
    #[error("node unavailable: {reason}")]
    Unavailable {
        /// What went wrong.
        reason: String,
    },
    /// The request has more keys than the node accepts in one batch.
    #[error("request has {count} keys; the limit is {limit}")]
    TooManyKeys {
        /// The number of keys.
        count: usize,
        /// The node's limit.
        limit: usize,
    },
}

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shorter than the header.
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort {
        /// The frame's length.
        len: usize,
    },
    /// Does not start with [`MAGIC`].
    #[error("frame does not start with the Squall magic bytes")]
    BadMagic,
    /// Another protocol version.
    #[error("unsupported protocol version {got}")]
    UnsupportedVersion {
        /// The version in the frame.
        got: u16,
    },
    /// The body is not a valid message.
    #[error("undecodable body: {0}")]
    Body(String),
    /// A message could not be encoded (a value serde cannot represent).
    #[error("unencodable message: {0}")]
    Encode(String),
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The request id in a frame's header, if the header is intact (used to answer frames whose
/// body is bad).
pub fn peek_id(frame: &[u8]) -> Option<RequestId> {
    if frame.len() < HEADER_LEN || frame[0..2] != MAGIC {
        return None;
    }
    let mut id = [0u8; 8];
    id.copy_from_slice(&frame[4..12]);
    Some(u64::from_be_bytes(id))
}

pub(crate) fn encode<T: Serialize>(id: RequestId, body: &T) -> Result<Vec<u8>> {
    let mut frame = Vec::with_capacity(64);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&VERSION.to_be_bytes());
    frame.extend_from_slice(&id.to_be_bytes());
    rmp_serde::encode::write(&mut frame, body).map_err(|e| Error::Encode(e.to_string()))?;
    Ok(frame)
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<(RequestId, T)> {
    if frame.len() < HEADER_LEN {
        return Err(Error::TooShort { len: frame.len() });
    }
    if frame[0..2] != MAGIC {
        return Err(Error::BadMagic);
    }
    let version = u16::from_be_bytes([frame[2], frame[3]]);
    if version != VERSION {
        return Err(Error::UnsupportedVersion { got: version });
    }
    let id = u64::from_be_bytes([
        frame[4], frame[5], frame[6], frame[7], frame[8], frame[9], frame[10], frame[11],
    ]);
    let mut rest = &frame[HEADER_LEN..];
    let mut deserializer = rmp_serde::Deserializer::new(&mut rest);
    deserializer.set_max_depth(MAX_DEPTH);
    let message = T::deserialize(&mut deserializer).map_err(|e| Error::Body(e.to_string()))?;
    drop(deserializer);
    if !rest.is_empty() {
        return Err(Error::Body("trailing bytes after the message".into()));
    }
    Ok((id, message))
}

/// Encodes a request frame.
pub fn encode_request(id: RequestId, request: &Request) -> Result<Vec<u8>> {
    encode(id, request)
}

/// Decodes a request frame.
pub fn decode_request(frame: &[u8]) -> Result<(RequestId, Request)> {
    decode(frame)
}

/// Encodes a response frame.
pub fn encode_response(id: RequestId, response: &Response) -> Result<Vec<u8>> {
    encode(id, response)
}

/// Decodes a response frame.
pub fn decode_response(frame: &[u8]) -> Result<(RequestId, Response)> {
    decode(frame)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use squall_lattices::testing::{entry, lattice_value, lww};

    use super::*;

    fn request() -> impl Strategy<Value = Request> {
        prop_oneof![
            proptest::collection::vec(".{0,8}", 0..4).prop_map(|keys| Request::Get { keys }),
            proptest::collection::vec((".{0,8}", lattice_value()), 0..4)
                .prop_map(|entries| Request::Put { entries }),
            Just(Request::Topology),
            (".{0,8}", proptest::collection::vec(".{0,8}", 0..4))
                .prop_map(|(subscriber, keys)| Request::Subscribe { subscriber, keys }),
            (".{0,8}", proptest::collection::vec(".{0,8}", 0..4))
                .prop_map(|(subscriber, keys)| Request::Unsubscribe { subscriber, keys }),
            (any::<u64>(), proptest::collection::vec(".{0,8}", 0..4)).prop_map(
                |(generation, keys)| Request::Routed {
                    generation,
                    request: Box::new(Request::Get { keys }),
                }
            ),
            (
                proptest::option::of(".{0,8}"),
                any::<u32>(),
                proptest::collection::vec(".{0,8}", 0..3)
            )
                .prop_map(|(after, limit, only)| Request::Scan { after, limit, only }),
            any::<u32>().prop_map(|limit| Request::Changed { limit }),
            any::<u32>().prop_map(|top| Request::Stats { top }),
            ".{0,8}".prop_map(|id| Request::Leave { id }),
            Just(Request::Status),
            (".{0,8}", proptest::option::of(any::<u32>()))
                .prop_map(|(key, replicas)| Request::Replicate { key, replicas }),
            proptest::collection::vec((".{0,8}", entry()), 0..3)
                .prop_map(|entries| Request::Merge { entries }),
            proptest::collection::vec((".{0,8}", entry()), 0..3)
                .prop_map(|entries| Request::Copy { entries }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(after, limit)| Request::Changes { after, limit }),
            any::<bool>().prop_map(|on| Request::Journal { on }),
            (
                any::<u32>(),
                proptest::collection::vec((".{0,8}", lattice_value()), 0..3)
            )
                .prop_map(|(chain, entries)| Request::PutChained { chain, entries }),
            proptest::collection::vec(
                (
                    ".{0,8}",
                    proptest::option::of(lattice_value()),
                    proptest::option::of(lww().prop_map(|l| squall_lattices::Lww::new(
                        l.timestamp,
                        l.value.len() as u64
                    )))
                ),
                0..3
            )
            .prop_map(|entries| Request::Write {
                entries: entries
                    .into_iter()
                    .map(|(key, value, expiry)| (key, Write { value, expiry }))
                    .collect()
            }),
            (".{0,8}", proptest::option::of(".{0,8}"), any::<u32>()).prop_map(
                |(prefix, after, limit)| Request::List {
                    prefix,
                    after,
                    limit
                }
            ),
            (".{0,8}", proptest::option::of(".{0,8}"), any::<u32>()).prop_map(
                |(prefix, after, limit)| Request::Sizes {
                    prefix,
                    after,
                    limit
                }
            ),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(id in any::<u64>(), request in request()) {
            let frame = encode_request(id, &request).expect("encode");
            prop_assert_eq!(peek_id(&frame), Some(id));
            prop_assert_eq!(decode_request(&frame).expect("decode"), (id, request));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        /// Random bodies behind a valid header, so the MessagePack decoder itself is exercised.
        #[test]
        fn garbage_bodies_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut frame = encode_request(3, &Request::Topology).expect("encode");
            frame.truncate(HEADER_LEN);
            frame.extend_from_slice(&body);
            let _ = decode_request(&frame);
            let _ = decode_response(&frame);
        }

        /// Valid frames with a few bytes changed: an error or a request, never a panic, and
        /// what decodes encodes again to a frame that decodes to the same.
        #[test]
        fn mutated_frames_never_panic(
            request in request(),
            edits in squall_lattices::testing::edits(4),
        ) {
            let frame = encode_request(11, &request).expect("encode");
            let frame = squall_lattices::testing::mutated(&frame, &edits);
            if let Ok((id, decoded)) = decode_request(&frame) {
                let again = encode_request(id, &decoded).expect("re-encode");
                prop_assert_eq!(decode_request(&again).expect("decode again"), (id, decoded));
            }
            let _ = decode_response(&frame);
        }

        #[test]
        fn truncated_frames_are_errors(request in request(), cut in any::<prop::sample::Index>()) {
            let frame = encode_request(7, &request).expect("encode");
            let cut = cut.index(frame.len());
            prop_assert!(decode_request(&frame[..cut]).is_err());
        }
    }

    #[test]
    fn wrong_version_is_reported_with_its_number() {
        let mut frame = encode_request(1, &Request::Topology).expect("encode");
        frame[2..4].copy_from_slice(&9u16.to_be_bytes());
        assert_eq!(
            decode_request(&frame),
            Err(Error::UnsupportedVersion { got: 9 })
        );
        assert_eq!(peek_id(&frame), Some(1));
    }

    #[test]
    fn deep_nesting_is_rejected_not_a_crash() {
        use squall_lattices::{LatticeValue, MapLattice, Max};
        // Maps nested 200 deep: legal to encode, refused by the depth limit when decoding.
        let mut value = LatticeValue::Max(Max(1));
        for _ in 0..200 {
            value = LatticeValue::Map(MapLattice::from_iter([(
                bytes::Bytes::from_static(b"f"),
                value,
            )]));
        }
        let request = Request::Put {
            entries: vec![("deep".to_string(), value)],
        };
        let frame = encode_request(5, &request).expect("encode");
        match decode_request(&frame) {
            Err(Error::Body(reason)) => assert!(reason.contains("depth"), "{reason}"),
            other => panic!("expected a depth error, got {other:?}"),
        }
        // Just under the limit still decodes.
        let mut shallow = LatticeValue::Max(Max(1));
        for _ in 0..10 {
            shallow = LatticeValue::Map(MapLattice::from_iter([(
                bytes::Bytes::from_static(b"f"),
                shallow,
            )]));
        }
        let frame = encode_request(
            6,
            &Request::Put {
                entries: vec![("ok".into(), shallow)],
            },
        )
        .expect("encode");
        assert!(decode_request(&frame).is_ok());
    }
}
