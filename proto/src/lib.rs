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

use serde::{Deserialize, Serialize};
use squall_lattices::{LatticeValue, TypeMismatch};

/// The first two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"SQ";
/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Bytes before the body: magic, version, request id.
pub const HEADER_LEN: usize = 12;
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
}

/// A storage node's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// One result per requested key: the value, `None` if the key is absent, or an error.
    Get(Vec<Result<Option<LatticeValue>, KeyError>>),
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
        values: Vec<Result<Option<LatticeValue>, KeyError>>,
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
        /// Changed keys and their values after the merge.
        updates: Vec<(Key, LatticeValue)>,
    },
    /// The whole request failed.
    Error(RequestError),
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
    /// The write could not be made durable (the log failed); it may or may not survive a
    /// restart, and retrying it is safe.
    #[error("write not durable: {reason}")]
    NotDurable {
        /// What the log reported.
        reason: String,
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
    use squall_lattices::testing::lattice_value;

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
