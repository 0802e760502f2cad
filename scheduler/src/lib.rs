//! Squall's scheduler: placement of steps on executors, and execution of functions and DAGs
//! over the call fabric (the DAGs themselves are registered in `squall-state`).
//!
//! A call is resolved (a function, or a DAG read from the store), every step is placed on an
//! executor ([`placement`]), and each executor involved gets the plan; from there the steps
//! hand their outputs straight to the next step's executor (the fast path: no storage node in
//! between), and the sink reports back. See [`scheduler`] for deadlines and failures, and
//! [`squall_state::dag`] for what a valid DAG is.
//!
//! # Layout
//! - [`placement`]: which executor runs a step.
//! - [`scheduler`]: [`Scheduler`]: the node that takes invocations and tracks calls.
//! - [`client`]: [`SchedulerClient`]: how a gateway (or any other caller) talks to schedulers.
//!
//! # Why these dependencies
//! - `squall-state`: the registries of functions and DAGs and the store client pool, read the
//!   same way by every role, without linking wasmtime or tract.
//! - `tokio`: the scheduler is async (one task per invocation being placed); `hashbrown` for
//!   its tables; `lru` for causal sessions; `xxhash-rust` to route sessions to schedulers.

pub mod client;
pub mod placement;
pub mod scheduler;

pub use client::SchedulerClient;
pub use scheduler::{Scheduler, SchedulerConfig};

use squall_proto::call::{Failure, FailureCode};

/// What can go wrong in the scheduler's own work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading functions or DAGs, or the store, failed (a DAG refused among them).
    #[error(transparent)]
    State(#[from] squall_state::Error),
    /// A bug or a corrupt record.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The error as a caller sees it.
    pub fn failure(&self) -> Failure {
        let code = match self {
            Error::State(e) => e.code(),
            Error::Internal(_) => FailureCode::Internal,
        };
        Failure::new(code, self.to_string())
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
