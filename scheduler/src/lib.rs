//! Squall's scheduler: the registry of DAGs, placement of steps on executors, and execution
//! of functions and DAGs over the call fabric.
//!
//! A call is resolved (a function, or a DAG read from the store), every step is placed on an
//! executor ([`placement`]), and each executor involved gets the plan; from there the steps
//! hand their outputs straight to the next step's executor (the fast path: no storage node in
//! between), and the sink reports back. See [`scheduler`] for deadlines and failures, and
//! [`dag`] for what a valid DAG is.
//!
//! # Layout
//! - [`dag`]: [`DagSpec`], its checks and layout ([`dag::Shape`]), and [`DagRegistry`].
//! - [`placement`]: which executor runs a step.
//! - [`scheduler`]: [`Scheduler`]: the node that takes invocations and tracks calls.
//! - [`client`]: [`SchedulerClient`]: how a gateway talks to schedulers.
//! - [`gateway`]: the HTTP API (axum), its errors, token check and OpenAPI document.
//! - `metrics`: the gateway's Prometheus metrics.
//!
//! # Why these dependencies
//! - `squall-executor`: the function registry and the store client pool it already has, so
//!   functions and DAGs are read the same way.
//! - `tokio`: the scheduler is async (one task per invocation being placed); `hashbrown` for
//!   its tables; `rmp-serde` for DAG records in the store, like every other record.
//! - `axum` (on tokio and hyper): the gateway's HTTP server, the most used Rust web framework,
//!   with typed extractors and body limits; `serde_json` for its JSON.
//! - `utoipa`: the OpenAPI document generated from the handlers' annotations, so it cannot
//!   drift from the code.
//! - `prometheus-client`: the Prometheus project's own Rust client, for `/metrics`.
//! - `uuid`: ids of asynchronous results (random, not guessable).

pub mod client;
pub mod dag;
pub mod gateway;
mod metrics;
pub mod placement;
pub mod scheduler;

pub use client::SchedulerClient;
pub use dag::{DagRecord, DagRegistry, DagSpec};
pub use scheduler::{Scheduler, SchedulerConfig};

use squall_proto::call::{Failure, FailureCode};

/// What can go wrong in the scheduler's own work.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A DAG definition was refused.
    #[error("invalid DAG: {0}")]
    InvalidDag(String),
    /// Reading functions or the store failed.
    #[error(transparent)]
    Executor(#[from] squall_executor::Error),
    /// A bug or a corrupt record.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// The error as a caller sees it.
    pub fn failure(&self) -> Failure {
        let code = match self {
            Error::InvalidDag(_) => FailureCode::BadRequest,
            Error::Executor(e) => squall_executor::node::failure_code(e),
            Error::Internal(_) => FailureCode::Internal,
        };
        Failure::new(code, self.to_string())
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
