//! The executor's one error type: every way a registration or a call can fail, typed so a
//! caller (the scheduler, the HTTP gateway) can map it to its own answer.

use std::time::Duration;

/// Why a registration or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No function of that name is registered.
    #[error("function {name:?} is not registered")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// A function name that cannot be stored (empty, too long, or with control characters).
    #[error("invalid function name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The bytes are not a WebAssembly component wasmtime can compile.
    #[error("not a valid WebAssembly component: {reason}")]
    InvalidComponent {
        /// What wasmtime reported.
        reason: String,
    },
    /// The component is valid but does not target the `squall:function/handler` world: it
    /// imports something the executor does not offer, or does not export `handle` with the
    /// right signature.
    #[error("component does not implement squall:function/handler: {reason}")]
    WrongWorld {
        /// What did not match.
        reason: String,
    },
    /// The stored code of a function version is missing or corrupt.
    #[error("stored code of {name:?} version {version} is unusable: {reason}")]
    CorruptCode {
        /// The function.
        name: String,
        /// The version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// No model of that name is registered.
    #[error("model {name:?} is not registered")]
    ModelNotFound {
        /// The name asked for.
        name: String,
    },
    /// The bytes are not a model the inference backend can load.
    #[error("model {name:?} cannot be loaded: {reason}")]
    InvalidModel {
        /// The model's name.
        name: String,
        /// What the backend reported.
        reason: String,
    },
    /// The guest trapped (a panic, an out-of-bounds access, a stack overflow, ...).
    #[error("function {function:?} trapped: {trap}")]
    Trap {
        /// The function that trapped.
        function: String,
        /// wasmtime's description of the trap.
        trap: String,
    },
    /// The call did not finish within its deadline.
    #[error("function {function:?} exceeded its deadline of {deadline:?}")]
    Timeout {
        /// The function that was running.
        function: String,
        /// The deadline of the call.
        deadline: Duration,
    },
    /// The guest needed more memory than its limit, and failed for it.
    #[error("function {function:?} ran out of memory (limit {limit} bytes)")]
    OutOfMemory {
        /// The function.
        function: String,
        /// Its memory limit.
        limit: u64,
    },
    /// The input exceeds the function's limit.
    #[error("input of {size} bytes exceeds the limit of {limit}")]
    InputTooLarge {
        /// The input's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The output exceeds the function's limit.
    #[error("function {function:?} returned {size} bytes; the limit is {limit}")]
    OutputTooLarge {
        /// The function.
        function: String,
        /// The output's size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Functions called functions more deeply than the node allows (a function calling
    /// itself forever, say).
    #[error("call chain deeper than {limit} (at {function:?})")]
    CallDepthExceeded {
        /// The function whose call was refused.
        function: String,
        /// The node's limit.
        limit: u32,
    },
    /// The node has no free instance slot; retry later or elsewhere.
    #[error("no capacity for another instance: {reason}")]
    NoCapacity {
        /// What wasmtime reported.
        reason: String,
    },
    /// The function ran and returned an error.
    #[error("function {function:?} failed: {message}")]
    Failed {
        /// The function.
        function: String,
        /// Its error message.
        message: String,
    },
    /// The key-value store failed or could not be reached.
    #[error("key-value store: {0}")]
    Kvs(#[from] squall_kvs::Error),
    /// A value in the store has another type than expected, or is malformed.
    #[error("bad value in key {key:?}: {reason}")]
    BadValue {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// Repeatable read: the version of a key pinned by an earlier step of the run could not
    /// be fetched from the executor holding it (so the read fails rather than return another).
    #[error("the version of {key:?} pinned by this run on {holder} is unavailable: {reason}")]
    PinUnavailable {
        /// The key.
        key: String,
        /// The executor that pinned it.
        holder: String,
        /// Why.
        reason: String,
    },
    /// Causal: no version of the key can join the run's causal cut. Either the version held
    /// depends on a newer version of a key the run already read (declare the key in the
    /// call's keys, so the run pins it with the others before its first step), or writes kept
    /// outpacing the search for a cut of the declared keys.
    #[error("no version of {key:?} fits this run's causal cut: {reason}")]
    CausalCut {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
    /// Causal: a causal call wrote a key that holds values of another lattice type (causal
    /// writes are multi-key causal versions).
    #[error("key {key:?} holds {stored} values, but a causal call writes multi-causal versions: write it in lww or repeatable-read mode, or use another key")]
    ModeMismatch {
        /// The key.
        key: String,
        /// The type it holds.
        stored: squall_lattices::LatticeType,
    },
    /// The executor could not start (engine settings, sockets, threads).
    #[error("executor setup failed: {0}")]
    Setup(String),
    /// A host-side failure not caused by the guest (a worker thread panicked, say).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The executor's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
