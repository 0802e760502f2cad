//! The monitor: observes the cluster every period and applies the policy engine's actions.
//!
//! It reads the view and members from the router, each member's [`LoadReport`] from the store
//! (nodes write them under [`keys::load_report`]), and the executors' status from a scheduler.
//! A report older than three periods counts as missing: that node's load is unknown, and
//! decisions rest on the others. Hot-key actions go to the router; node and executor actions
//! to the provisioner. Failures are logged and the next period tries again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use squall_kvs::{Client, ClientConfig};
use squall_lattices::LatticeValue;
use squall_proto::keys;
use squall_proto::LoadReport;
use squall_scheduler::SchedulerClient;

use crate::policy::{Action, ExecutorLoad, Observation, Policy, PolicyConfig};
use crate::{Error, Provisioner, Role};

/// How often the provisioner checks on its children.
const SUPERVISION: Duration = Duration::from_secs(1);

/// What the monitor watches.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// The cluster's router.
    pub router: String,
    /// Schedulers to ask for the executors' status (none: executors are not scaled).
    pub schedulers: Vec<String>,
    /// Host the monitor's own mailbox binds.
    pub host: String,
    /// The policies.
    pub policy: PolicyConfig,
}

/// A running monitor thread. Dropping it stops it.
#[derive(Debug)]
pub struct Monitor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    /// Starts the monitor on its own thread; it owns `provisioner`.
    pub fn start<P: Provisioner + 'static>(
        config: MonitorConfig,
        provisioner: P,
    ) -> Result<Monitor, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("squall-monitor".into())
            .spawn(move || run(config, provisioner, &flag))
            .map_err(|e| Error::Provision(format!("spawning the monitor: {e}")))?;
        Ok(Monitor {
            stop,
            thread: Some(thread),
        })
    }

    /// Whether the monitor thread still runs.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the monitor thread panicked");
            }
        }
    }
}

fn run<P: Provisioner>(config: MonitorConfig, mut provisioner: P, stop: &AtomicBool) {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(cause = %e, "the monitor could not start its runtime");
            return;
        }
    };
    let schedulers = if config.schedulers.is_empty() {
        None
    } else {
        let fabric = squall_proto::fabric::Fabric::new();
        match runtime.block_on(async {
            fabric
                .bind(&config.host, 0)
                .map(|mailbox| SchedulerClient::start(mailbox, config.schedulers.clone()))
        }) {
            Ok(client) => Some(client),
            Err(e) => {
                tracing::error!(cause = %e, "the monitor cannot reach schedulers; executors are not scaled");
                None
            }
        }
    };
    let mut policy = Policy::new(config.policy.clone());
    let period = config.policy.period();
    let mut kvs: Option<Client> = None;
    let mut next = Instant::now() + period;
    let mut next_supervision = Instant::now();
    tracing::info!(router = %config.router, ?period, "monitor started");
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_supervision {
            // More often than the period: a child that died is replaced within a second.
            next_supervision = Instant::now() + SUPERVISION;
            provisioner.supervise();
        }
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(20).min(next - Instant::now()));
            continue;
        }
        next = Instant::now() + period;
        let seen = match observe(&config, &mut kvs, schedulers.as_ref(), &runtime) {
            Ok(seen) => seen,
            Err(e) => {
                tracing::warn!(cause = %e, "the monitor could not observe the cluster");
                continue;
            }
        };
        for action in policy.decide(&seen) {
            apply(&config, &mut provisioner, action);
        }
    }
}

fn observe(
    config: &MonitorConfig,
    kvs: &mut Option<Client>,
    schedulers: Option<&SchedulerClient>,
    runtime: &tokio::runtime::Runtime,
) -> Result<Observation, Error> {
    let status = squall_kvs::router::status(&config.router)?;
    let client = match kvs {
        Some(client) => client,
        None => kvs.insert(Client::connect(&config.router, ClientConfig::default())?),
    };
    let keys: Vec<String> = status
        .view
        .members
        .iter()
        .map(|m| keys::load_report(&m.id))
        .collect();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let stale_ms = 3 * config.policy.period_ms.max(10);
    let mut loads = Vec::new();
    for (key, value) in keys.iter().zip(client.get_many(&keys)?) {
        let Some(bytes) = value.and_then(lww_bytes) else {
            continue;
        };
        match rmp_serde::from_slice::<LoadReport>(&bytes) {
            Ok(report) if report.at_ms + stale_ms >= now_ms => loads.push(report),
            Ok(_) => tracing::debug!(%key, "stale load report"),
            Err(e) => tracing::warn!(%key, cause = %e, "unreadable load report"),
        }
    }
    let executors = schedulers.and_then(|client| {
        match runtime.block_on(client.status(Duration::from_secs(2))) {
            Ok(executors) => Some(
                executors
                    .into_iter()
                    .map(|e| ExecutorLoad {
                        id: e.id,
                        running: e.running,
                        waiting: e.waiting,
                        capacity: e.capacity,
                        draining: e.draining,
                    })
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(cause = %e.message, "no executor status from the schedulers");
                None
            }
        }
    });
    Ok(Observation {
        at: Instant::now(),
        view: status.view,
        loads,
        executors,
    })
}

/// The bytes of a last-writer-wins value.
fn lww_bytes(value: LatticeValue) -> Option<Bytes> {
    match value {
        LatticeValue::Lww(lww) => Some(lww.value),
        _ => None,
    }
}

fn apply<P: Provisioner>(config: &MonitorConfig, provisioner: &mut P, action: Action) {
    let outcome = match &action {
        Action::Replicate { key, replicas, why } => {
            tracing::info!(%key, ?replicas, %why, "policy: key replication");
            squall_kvs::router::replicate(&config.router, key, *replicas)
                .map(|_| ())
                .map_err(Error::from)
        }
        Action::AddNodes { count, why } => {
            tracing::info!(count, %why, "policy: adding storage nodes");
            provisioner.add(Role::Storage, *count)
        }
        Action::RemoveNode { id, why } => {
            tracing::info!(%id, %why, "policy: removing a storage node");
            provisioner.remove(Role::Storage, id)
        }
        Action::AddExecutors { count, why } => {
            tracing::info!(count, %why, "policy: adding executors");
            provisioner.add(Role::Executor, *count)
        }
        Action::RemoveExecutor { id, why } => {
            tracing::info!(%id, %why, "policy: removing an executor");
            provisioner.remove(Role::Executor, id)
        }
    };
    if let Err(e) = outcome {
        tracing::warn!(?action, cause = %e, "a policy action failed");
    }
}
