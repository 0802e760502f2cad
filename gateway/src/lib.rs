//! Squall's HTTP gateway: the public API, versioned under `/v1`.
//!
//! Control endpoints speak JSON; function input and output are raw bytes. Every error is
//! `{"error":{"code":...,"message":...}}` (plus `"step"` when a DAG step failed) with a fitting
//! status. With a token configured, every request but `GET /healthz` must carry a key with a
//! role that allows it (see [`auth`]): the token itself, or an API key made with it. The OpenAPI document of this API is generated from these
//! handlers (`utoipa`) and served at `/v1/openapi.json`.
//!
//! The gateway keeps no call state of its own: invocations go to a scheduler over the fabric
//! ([`squall_scheduler::SchedulerClient`]), functions and DAGs are read from and written to the store, and
//! asynchronous calls are written to the store before they are answered, then run by the
//! gateway's [`runner`], which writes their outcomes to their result keys.
//!
//! A call sees every registration and deletion answered before it was made: after writing a
//! function's or DAG's record, and before answering, the gateway tells its schedulers to read
//! that record from the store next time, and they tell their executors
//! ([`squall_proto::call::Message::Refresh`]), ahead of any later call on the same connections.
//! Caches elsewhere learn of the change by the store's push.
//!
//! # Layout
//! - [`api`]: the routes and handlers, their errors and status mapping, and the OpenAPI
//!   document ([`api::ApiDoc`]).
//! - [`namespace`]: which namespace a request addresses (`/v1/ns/{ns}/...`), and the names
//!   it uses there.
//! - [`auth`]: the role each request needs and the check of its bearer key (the token or an
//!   API key).
//! - [`runner`]: runs durable asynchronous calls: attempts, retries, dead letters, and calls
//!   other runners left behind.
//! - [`cron`]: fires cron triggers' due ticks as durable calls.
//! - [`limits`]: concurrency limits per function and DAG, held per gateway.
//! - [`quotas`]: quotas per namespace (calls in flight, rate, functions, memory, deadline).
//! - `metrics`: the Prometheus metrics served at `/metrics`.
//! - [`tls`]: HTTPS on the gateway's port (`--tls-cert`, `--tls-key`).
//!
//! # Why a crate of its own
//! HTTP is one way in among others (the CLI and other roles speak the call fabric): the
//! scheduler stays free of a web framework, and the gateway links neither wasmtime nor tract.
//!
//! # Why these dependencies
//! - `axum` (on tokio and hyper): the most used Rust web framework, with typed extractors and
//!   body limits; `serde_json` for its JSON.
//! - `utoipa`: the OpenAPI document generated from the handlers' annotations, so it cannot
//!   drift from the code.
//! - `prometheus-client`: the Prometheus project's own Rust client, for `/metrics`.
//! - `rustls` and `tokio-rustls`: TLS without a system OpenSSL (see [`tls`] for why).
//! - `squall-scheduler` for its client, `squall-state` for the registries, results, records
//!   and durable calls.
//! - `tower`: its `map_request`, to give each request its namespace before routing (axum's
//!   own middleware runs after routing).
//! - `tokio`: the runner's tasks, timers and its bound on attempts running at once.

/// The routes and handlers.
pub mod api;
pub mod auth;
pub mod cron;
pub mod feed;
pub mod limits;
mod metrics;
pub mod namespace;
pub mod quotas;
pub mod runner;
pub mod tls;

pub use api::{
    Gateway, GatewayConfig, ACTIVATION_HEADER, CONSISTENCY_HEADER, IDEMPOTENCY_HEADER, KEYS_HEADER,
    PLACEMENT_HEADER, REPLAY_HEADER, SESSION_HEADER,
};
