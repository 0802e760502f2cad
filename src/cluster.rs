//! `squall router` and `squall cluster ...`: running a multi-node store.
//!
//! A cluster is one router (the membership and the seed nodes join through) and any number of
//! `squall kvs --join ROUTER` nodes. Executors, schedulers, gateways and `squall kv` are given
//! the router's address as their `--kvs`, and find every key's replicas from its view.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use squall_kvs::{Router, RouterConfig};

/// The router's port unless told otherwise.
pub const DEFAULT_ROUTER_PORT: u16 = 7000;

#[derive(Debug, Args)]
pub struct RouterArgs {
    /// Host to bind.
    #[arg(long, env = "SQUALL_ROUTER_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port (0: the OS picks).
    #[arg(long, env = "SQUALL_ROUTER_PORT", default_value_t = DEFAULT_ROUTER_PORT)]
    port: u16,
    /// Replicas of every key (2: one node's death loses nothing).
    #[arg(long, env = "SQUALL_REPLICATION", default_value_t = 2)]
    replication: u32,
    /// Milliseconds without a heartbeat after which a node is dropped from the view.
    #[arg(long, env = "SQUALL_DEAD_AFTER_MS", default_value_t = 2000)]
    dead_after_ms: u64,
}

/// Runs a router until SIGINT or SIGTERM.
pub fn run_router(args: RouterArgs) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the SIGINT/SIGTERM handler")?;
    let router = Router::start(RouterConfig {
        host: args.host,
        port: args.port,
        replication: args.replication,
        dead_after_ms: args.dead_after_ms,
        ..RouterConfig::default()
    })
    .context("starting the router")?;
    println!("READY addr={}", router.address());
    loop {
        match stop_rx.recv_timeout(Duration::from_millis(500)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if !router.is_running() {
                    anyhow::bail!("the router thread stopped unexpectedly");
                }
            }
        }
    }
    tracing::info!("router shutting down");
    Ok(())
}

#[derive(Debug, Args)]
pub struct ClusterArgs {
    #[command(subcommand)]
    command: ClusterCommand,
}

#[derive(Debug, Subcommand)]
enum ClusterCommand {
    /// Start a cluster on this machine (router, scheduler, storage nodes, executors, gateway),
    /// supervised and scaled by the policy engine.
    Up(Box<UpArgs>),
    /// Show the members, their keys and load, and the keys with extra replicas.
    Status {
        /// The cluster's router.
        #[arg(long, env = "SQUALL_ROUTER", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_ROUTER_PORT}"))]
        router: String,
    },
}

impl ClusterArgs {
    /// Whether this runs a cluster (and should log as a long-running role does).
    pub fn is_up(&self) -> bool {
        matches!(self.command, ClusterCommand::Up(_))
    }
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    match args.command {
        ClusterCommand::Up(args) => up(*args),
        ClusterCommand::Status { router } => {
            let status = squall_kvs::router::status(&router)
                .with_context(|| format!("asking the router at {router}"))?;
            let view = &status.view;
            println!(
                "view {} · {} members · replication {}",
                view.generation,
                view.members.len(),
                view.replication
            );
            println!(
                "{:<28} {:>6} {:>10} {:>12} {:>8} {:>10}",
                "member", "shards", "keys", "requests", "synced", "silent"
            );
            for member in &status.members {
                let shards = view
                    .members
                    .iter()
                    .find(|m| m.id == member.id)
                    .map_or(0, |m| m.shards.len());
                let synced = if member.stats.synced == view.generation {
                    "yes"
                } else {
                    "no"
                };
                println!(
                    "{:<28} {:>6} {:>10} {:>12} {:>8} {:>8}ms",
                    member.id,
                    shards,
                    member.stats.keys,
                    member.stats.requests,
                    synced,
                    member.silent_ms
                );
            }
            if !view.overrides.is_empty() {
                println!("keys with their own replication:");
                for (key, replicas) in &view.overrides {
                    println!("  {key:?}: {replicas} replicas");
                }
            }
            Ok(())
        }
    }
}

/// The policy engine's settings that have flags; the rest come from `--policy FILE`.
#[derive(Debug, Args)]
pub struct PolicyArgs {
    /// A TOML file of policy settings (every field of the policy engine's configuration).
    #[arg(long, env = "SQUALL_POLICY")]
    policy: Option<std::path::PathBuf>,
    /// Milliseconds between policy rounds.
    #[arg(long, env = "SQUALL_POLICY_PERIOD_MS")]
    period_ms: Option<u64>,
    /// Accesses in a report window below which no key counts as hot.
    #[arg(long)]
    hot_min_accesses: Option<u64>,
    /// Fewest executors.
    #[arg(long)]
    min_executors: Option<u32>,
    /// Most executors.
    #[arg(long)]
    max_executors: Option<u32>,
    /// Fewest storage nodes.
    #[arg(long)]
    min_nodes: Option<u32>,
    /// Most storage nodes.
    #[arg(long)]
    max_nodes: Option<u32>,
    /// Milliseconds without another executor change after one.
    #[arg(long)]
    executor_grace_ms: Option<u64>,
    /// Milliseconds without another storage node change after one.
    #[arg(long)]
    node_grace_ms: Option<u64>,
    /// Quiet periods in a row before a pool shrinks.
    #[arg(long)]
    low_periods: Option<u32>,
}

impl PolicyArgs {
    fn config(&self) -> anyhow::Result<squall_cluster::PolicyConfig> {
        let mut config: squall_cluster::PolicyConfig = match &self.policy {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => squall_cluster::PolicyConfig::default(),
        };
        let set = |field: &mut u64, value: Option<u64>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set(&mut config.period_ms, self.period_ms);
        set(&mut config.hot_min_accesses, self.hot_min_accesses);
        set(&mut config.executor_grace_ms, self.executor_grace_ms);
        set(&mut config.node_grace_ms, self.node_grace_ms);
        let set32 = |field: &mut u32, value: Option<u32>| {
            if let Some(v) = value {
                *field = v;
            }
        };
        set32(&mut config.min_executors, self.min_executors);
        set32(&mut config.max_executors, self.max_executors);
        set32(&mut config.min_nodes, self.min_nodes);
        set32(&mut config.max_nodes, self.max_nodes);
        set32(&mut config.low_periods, self.low_periods);
        Ok(config)
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Storage nodes to start with.
    #[arg(long = "kvs", default_value_t = 3)]
    nodes: u32,
    /// Executors to start with.
    #[arg(long, default_value_t = 2)]
    executors: u32,
    /// Host every process binds.
    #[arg(long, env = "SQUALL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// The gateway's HTTP port (0: the OS picks).
    #[arg(long, env = "SQUALL_HTTP_PORT", default_value_t = 8080)]
    http_port: u16,
    /// Replicas per key.
    #[arg(long, default_value_t = 2)]
    replication: u32,
    /// Shard threads per storage node.
    #[arg(long, default_value_t = 1)]
    kvs_shards: usize,
    /// Milliseconds between the storage nodes' load reports.
    #[arg(long, default_value_t = 5000)]
    stats_ms: u64,
    /// Steps each executor runs at once.
    #[arg(long, default_value_t = 64)]
    executor_capacity: u32,
    /// Where the processes' logs (`logs/`) and the storage nodes' data (`kvs-N/`) go.
    #[arg(long, default_value = "squall-cluster")]
    dir: std::path::PathBuf,
    /// Keep the storage nodes' data in memory only (replication still survives one node's
    /// death; stopping the cluster loses everything).
    #[arg(long)]
    in_memory: bool,
    /// Bearer token the gateway requires on every mutating request.
    #[arg(long, env = "SQUALL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// `squall cluster up`: a router, a scheduler, storage nodes, executors and a gateway as
/// child processes, supervised and scaled by the policy engine, until SIGINT or SIGTERM.
pub fn up(args: UpArgs) -> anyhow::Result<()> {
    use squall_cluster::{
        LocalConfig, LocalProvisioner, Monitor, MonitorConfig, Provisioner, Role,
    };

    let mut policy = args.policy.config()?;
    // Unless told otherwise, the pools scale down no further than they started.
    if args.policy.min_nodes.is_none() {
        policy.min_nodes = args.nodes.max(1);
    }
    if args.policy.min_executors.is_none() {
        policy.min_executors = args.executors.max(1);
    }
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the SIGINT/SIGTERM handler")?;
    let log_dir = args.dir.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let mut extra = std::collections::HashMap::new();
    extra.insert(
        Role::Router,
        vec!["--replication".to_string(), args.replication.to_string()],
    );
    extra.insert(
        Role::Storage,
        vec![
            "--shards".to_string(),
            args.kvs_shards.to_string(),
            "--stats-ms".to_string(),
            args.stats_ms.to_string(),
        ],
    );
    extra.insert(
        Role::Executor,
        vec!["--capacity".to_string(), args.executor_capacity.to_string()],
    );
    let mut gateway = vec!["--http-port".to_string(), args.http_port.to_string()];
    if let Some(token) = &args.token {
        gateway.extend(["--token".to_string(), token.clone()]);
    }
    extra.insert(Role::Gateway, gateway);
    let mut provisioner = LocalProvisioner::new(LocalConfig {
        binary: std::env::current_exe().context("finding the squall binary")?,
        log_dir: log_dir.clone(),
        host: args.host.clone(),
        extra,
        data_dir: (!args.in_memory).then(|| args.dir.clone()),
    });
    let router = provisioner.start(Role::Router)?.id.clone();
    provisioner.add(Role::Storage, args.nodes)?;
    wait_for_members(&router, args.nodes as usize)?;
    let scheduler = provisioner.start(Role::Scheduler)?.id.clone();
    provisioner.add(Role::Executor, args.executors)?;
    let http = provisioner.start(Role::Gateway)?.id.clone();
    let monitor = Monitor::start(
        MonitorConfig {
            router: router.clone(),
            schedulers: vec![scheduler.clone()],
            host: args.host.clone(),
            policy,
        },
        provisioner,
    )?;
    println!(
        "READY http={http} router={router} scheduler={scheduler} logs={}",
        log_dir.display()
    );
    loop {
        match stop_rx.recv_timeout(Duration::from_millis(500)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if !monitor.is_running() {
                    anyhow::bail!("the monitor stopped unexpectedly");
                }
            }
        }
    }
    tracing::info!("stopping the cluster: executors drain, storage nodes hand off");
    drop(monitor);
    Ok(())
}

/// Waits until the router's view holds `members` storage nodes.
fn wait_for_members(router: &str, members: usize) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = squall_kvs::router::status(router);
        if let Ok(status) = &status {
            if status.view.members.len() >= members {
                return Ok(());
            }
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the storage nodes did not join the router in time: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
