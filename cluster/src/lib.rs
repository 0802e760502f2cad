//! Running Squall on many nodes: the policy engine, the monitor that applies it, and the
//! provisioners that add and remove nodes.
//!
//! - [`policy`]: the rules (hot keys, storage nodes, executors), as pure functions of what
//!   the monitor observed.
//! - [`monitor`]: every period, reads the nodes' load reports from the store itself, the
//!   executors' status from a scheduler and the view from the router; applies the policy's
//!   actions through the router (a key's replication) and a [`Provisioner`] (nodes).
//! - [`local`]: the provisioner for one machine: child processes (`squall cluster up`).
//! - [`k8s`]: the provisioner for Kubernetes: scales the StatefulSet and Deployment of
//!   `cluster/k8s/` through the API server (`kube`), with the feature `kubernetes`.
//!
//! # Dependencies
//! - `nix` to send SIGTERM to children (a graceful hand-off or drain; std only kills).
//! - `rmp-serde` to read the load reports the nodes write in MessagePack.
//! - `squall-scheduler` for its client, which asks a scheduler for its executors' status.

#[cfg(feature = "kubernetes")]
pub mod k8s;
pub mod local;
pub mod monitor;
pub mod policy;

#[cfg(feature = "kubernetes")]
pub use k8s::{KubeConfig, KubeProvisioner};
pub use local::{LocalConfig, LocalProvisioner};
pub use monitor::{Monitor, MonitorConfig};
pub use policy::{Action, Policy, PolicyConfig};

/// A role a provisioner starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The cluster's router (membership).
    Router,
    /// A storage node.
    Storage,
    /// A scheduler.
    Scheduler,
    /// An executor.
    Executor,
    /// An HTTP gateway.
    Gateway,
}

impl Role {
    /// Its name, as the `squall` subcommand and in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Router => "router",
            Role::Storage => "kvs",
            Role::Scheduler => "scheduler",
            Role::Executor => "executor",
            Role::Gateway => "gateway",
        }
    }
}

/// Adds and removes storage nodes and executors when the policy engine asks.
pub trait Provisioner: Send {
    /// Starts `count` more of `role`.
    fn add(&mut self, role: Role, count: u32) -> Result<(), Error>;
    /// Stops the one of `role` with this id (a storage node's address, an executor's id);
    /// it hands off or drains first.
    fn remove(&mut self, role: Role, id: &str) -> Result<(), Error>;
    /// Called every period: restart what died, reap what stopped.
    fn supervise(&mut self) {}
}

/// What can go wrong in cluster management.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A node or executor could not be started or stopped.
    #[error("provisioning: {0}")]
    Provision(String),
    /// The store or the router failed.
    #[error(transparent)]
    Kvs(#[from] squall_kvs::Error),
    /// The Kubernetes API server refused or failed a request.
    #[error("kubernetes: {0}")]
    Kubernetes(String),
}
