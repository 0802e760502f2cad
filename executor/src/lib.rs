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
//! Functions read and write state through the colocated [`squall_state::Cache`] (from `squall-state`,
//! which also holds the registries this crate loads functions and models from): reads are
//! served locally once a key is held, writes go through to the store, and the store pushes
//! changes of held keys to the cache.
//!
//! # Layout
//! - [`config`]: [`Config`], with the per-function [`squall_state::Limits`].
//! - [`executor`]: [`Executor`]: the engine, loading, warm instances, the call path.
//! - [`node`]: [`ExecutorNode`]: the executor on the call fabric (plans, steps, outputs
//!   handed to the next step's executor, heartbeats to schedulers).
//! - `bindings`: the host bindings of the WIT world (generated).
//! - `runtime`: the narrow handle through which imports reach the executor.
//! - `host`: a store's host state and the `squall:function` imports (state, nested calls,
//!   logging, captured stdio); `futures_host`: the `squall:compose/futures` imports.
//! - [`children`]: the calls a running call starts and awaits later, and where they run
//!   ([`children::Spawner`]: on the fabric, a scheduler places them).
//! - [`nn`]: models loaded once per executor, inference with tract; `nn_host`: the `wasi:nn`
//!   imports over them.
//! - [`error`]: [`Error`]: how a registration or call fails, and its code on the wire.
//! - [`report`]: what a step collects for its call's activation record (log lines, CPU time,
//!   memory).
//! - `testing` (feature `testing`): builds the example guests for tests and benchmarks.
//!
//! Modules depend downward only: `executor` -> `host`, `nn_host` -> `host`, `futures_host`
//! -> `host`, `children`; `runtime` -> `nn`, `children`; `host` and `nn_host` -> `bindings`
//! -> `nn`. Nothing imports `executor` back.
//!
//! # Why these dependencies
//! - `wasmtime` (pinned to 48, the newest that builds with the project's toolchain) with only
//!   the features used: Cranelift, the component model, async calls, the pooling allocator
//!   and the on-disk code cache. `wasmtime-wasi` gives guests WASI 0.2 without handing them
//!   the host (no preopened directories, sockets or environment).
//! - `tokio`: wasmtime's async calls (each call on its own fiber, so nested calls cannot
//!   exhaust a thread's stack) and the blocking pool for store round trips.
//! - `squall-state`: the store client pool, the colocated cache and the registries, shared
//!   with the roles that must not link wasmtime.
//! - `tract-onnx`: `wasi:nn`'s backend, pure-Rust ONNX inference (no native library).
//! - `nix`: the thread CPU clock (`clock_gettime`) for the CPU time a call's record reports,
//!   without an `unsafe` call into libc here.

mod bindings;
pub mod children;
pub mod config;
pub mod error;
pub mod executor;
mod futures_host;
mod host;
pub mod nn;
mod nn_host;
pub mod node;
pub mod report;
mod runtime;
#[cfg(feature = "testing")]
pub mod testing;

pub use config::Config;
pub use error::{Error, Result};
pub use executor::{CallOptions, Executor, ExecutorStats};
pub use node::{ExecutorNode, NodeConfig};
