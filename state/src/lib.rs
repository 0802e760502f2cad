//! Squall's state as every role reaches it, with no WebAssembly runtime and no inference
//! engine linked: the scheduler and the gateway use this crate, and so does the executor,
//! which adds wasmtime and tract on top.
//!
//! # Layout
//! - [`pool`]: [`ClientPool`]: blocking store clients lent to async code.
//! - [`cache`]: [`Cache`]: the colocated cache of store keys, which storage nodes keep
//!   current by pushing every change; it knows nothing of consistency modes.
//! - [`session`]: [`Session`]: one call's view of the cache, where the consistency modes
//!   (last-writer-wins, repeatable read, causal) keep what they must across its reads.
//! - [`pins`]: repeatable read and causal cuts across a run's steps: versions pinned per run,
//!   released when the run ends, fetched by later steps from the executor that pinned them.
//! - [`registry`]: functions and models and their versions in the store ([`Registry`]), with
//!   the [`Limits`] stored beside each version ([`limits`]).
//! - [`dag`]: DAG definitions, their checks, and their registry ([`DagRegistry`]).
//! - [`results`]: asynchronous calls' results.
//! - [`activations`]: the record of every call ([`Activations`]), kept for a retention.
//! - [`calls`]: durable asynchronous calls, their retry policies, dead letters and
//!   idempotency keys ([`calls::Calls`]).
//! - [`register`]: how those records are kept: MessagePack in a last-writer-wins register.
//! - [`triggers`]: cron triggers ([`triggers::Triggers`]), and which tick fires when.
//! - [`error`]: [`Error`], with the code each failure has on the wire.
//! - [`lease`]: leases in the store: which gateway does a piece of upkeep for a while.
//! - [`legacy`]: registries written before the namespaced key layout, merged into it.
//!
//! Where each of these keeps its keys is [`squall_proto::keys`]: one layout for every crate.
//!
//! # Why a crate of its own
//! The registries and the cache were the executor's, so every role that reads a function or
//! DAG record linked wasmtime, Cranelift and tract: minutes of build and megabytes of binary
//! for nothing. They depend only on the store, so they live one level above it.
//!
//! # Why these dependencies
//! - `squall-kvs`: the store's client; `zmq`: the socket storage nodes push cache updates to,
//!   the store's own transport.
//! - `tokio`: the pool runs store round trips on the blocking threads; `lru`: the cache's
//!   recency order; `sha2`: content addresses of code; `rmp-serde`: records in the store, like
//!   every other record.
//! - `cron` and `chrono`: cron schedules of triggers (see [`triggers`] for why).
//! - `utoipa` (feature `openapi`, which the gateway turns on): the schema of a DAG definition
//!   in the generated OpenAPI document.

pub mod activations;
pub mod api_keys;
pub mod audit;
pub mod cache;
pub mod calls;
pub mod dag;
pub mod error;
pub mod lease;
pub mod legacy;
pub mod limits;
pub mod namespaces;
pub mod pins;
pub mod pool;
pub mod register;
pub mod registry;
pub mod results;
pub mod session;
pub mod stored_bytes;
pub mod triggers;

pub use activations::{Activation, ActivationId, Activations};
pub use cache::{Cache, CacheConfig, CacheStats};
pub use dag::{DagRecord, DagRegistry, DagSpec};
pub use error::{Error, Result};
pub use limits::Limits;
pub use pins::{PinSource, PinTable, RunContext};
pub use pool::ClientPool;
pub use registry::{FunctionRecord, Registry};
pub use session::{Consistency, Session};
