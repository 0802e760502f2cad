//! The executor's one error type: every way a registration or a call can fail, typed so a
//! caller (the scheduler, the HTTP gateway) can map it to its own answer.

use std::time::Duration;

use squall_proto::call::FailureCode;

/// Why a registration or a call failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    /// The store, a registry or the cache failed: a function or model that is not
    /// registered, a bad name, a store that cannot be reached, a run's consistency refused.
    #[error(transparent)]
    State(#[from] squall_state::Error),
    /// The executor could not start (engine settings, sockets, threads).
    #[error("executor setup failed: {0}")]
    Setup(String),
    /// A host-side failure not caused by the guest (a worker thread panicked, say).
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The code a caller sees for this error.
    pub fn code(&self) -> FailureCode {
        match self {
            Error::State(e) => e.code(),
            Error::InvalidModel { .. } => FailureCode::BadRequest,
            Error::InvalidComponent { .. } | Error::WrongWorld { .. } => {
                FailureCode::InvalidComponent
            }
            Error::Trap { .. } | Error::CallDepthExceeded { .. } => FailureCode::Trap,
            Error::Timeout { .. } => FailureCode::Timeout,
            Error::OutOfMemory { .. } => FailureCode::OutOfMemory,
            Error::InputTooLarge { .. } | Error::OutputTooLarge { .. } => FailureCode::TooLarge,
            Error::NoCapacity { .. } => FailureCode::NoCapacity,
            Error::Failed { .. } => FailureCode::FunctionFailed,
            Error::Setup(_) | Error::Internal(_) => FailureCode::Internal,
        }
    }
}

impl From<squall_kvs::Error> for Error {
    fn from(e: squall_kvs::Error) -> Self {
        Error::State(e.into())
    }
}

/// The executor's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
