//! Squall's executor: runs WebAssembly functions in wasmtime, next to a cache of the state
//! they use.
//!
//! A function is a component of the `squall:function/handler` world (`sdk/wit/world.wit`). An
//! [`Executor`] registers functions into the key-value store (so any executor can load them,
//! and nothing is lost on restart), compiles each distinct code once (and, with a code cache
//! directory, once per machine), keeps warm instances, and runs each call under its limits:
//! a wall-clock deadline enforced by epoch interruption, a memory and table cap, input and
//! output size caps, and a bound on how deeply functions call functions. Whatever a guest
//! does, the caller gets a typed [`Error`] before the deadline and the executor keeps serving.
//!
//! Functions read and write state through the colocated [`Cache`]: reads are served locally
//! once a key is held, writes go through to the store, and the store pushes changes of held
//! keys to the cache.
//!
//! # Layout
//! - [`config`]: [`Config`] and the per-function [`Limits`].
//! - [`executor`]: [`Executor`]: the engine, loading, warm instances, the call path.
//! - [`node`]: [`ExecutorNode`]: the executor on the call fabric (plans, steps, outputs
//!   handed to the next step's executor, heartbeats to schedulers).
//! - `host`: what the guest's imports do (state, nested calls, logging, captured stdio).
//! - [`registry`]: functions and their versions in the store.
//! - [`cache`]: the colocated cache and the per-call [`cache::Session`].
//! - [`pins`]: repeatable read across a run's steps: versions pinned per run, released when
//!   the run ends, fetched by later steps from the executor that pinned them.
//! - [`clients`]: blocking store clients lent to async code.
//! - `testing` (feature `testing`): builds the example guests for tests and benchmarks.
//!
//! # Why these dependencies
//! - `wasmtime` (pinned to 48, the newest that builds with the project's toolchain) with only
//!   the features used: Cranelift, the component model, async calls, the pooling allocator
//!   and the on-disk code cache. `wasmtime-wasi` gives guests WASI 0.2 without handing them
//!   the host (no preopened directories, sockets or environment).
//! - `tokio`: wasmtime's async calls (each call on its own fiber, so nested calls cannot
//!   exhaust a thread's stack) and the blocking pool for store round trips.
//! - `lru`: the cache's recency order; `sha2`: content addresses of code.
//! - `zmq`: the socket storage nodes push cache updates to, as the store's own transport.

pub mod cache;
pub mod clients;
pub mod config;
mod error;
pub mod executor;
mod host;
pub mod nn;
pub mod node;
pub mod pins;
pub mod registry;
#[cfg(feature = "testing")]
pub mod testing;

pub use cache::{Cache, CacheStats, Consistency};
pub use config::{CacheConfig, Config, Limits};
pub use error::{Error, Result};
pub use executor::{CallOptions, Executor, ExecutorStats};
pub use node::{ExecutorNode, NodeConfig};
pub use pins::{PinSource, PinTable, RunContext};
pub use registry::{FunctionRecord, Registry};
