//! `squall`: the command-line entry point of Squall.
//!
//! - `squall up`: everything in one process (store, scheduler, executors, HTTP gateway).
//! - `squall kvs`, `squall scheduler`, `squall executor`, `squall gateway`: one role per
//!   process, over the call fabric (each prints `READY ...` once it serves).
//! - `squall fn`, `squall dag`, `squall call`: register and call functions through a gateway.
//! - `squall kv get|put`: read and write keys of a running storage node.
//! - `squall router`, `squall kvs --join ROUTER`: a multi-node store; `squall cluster up`: a
//!   whole cluster on one machine, scaled by the policy engine; `squall cluster status`;
//!   `squall cluster manifests`: Kubernetes manifests; `squall monitor`: the policy engine
//!   for a cluster Kubernetes runs.
//!
//! Every flag can also be set through a `SQUALL_*` environment variable, or in `squall.toml`
//! (see `config`).
//!
//! Why these dependencies: `clap` (flags, `SQUALL_*` variables), `toml` (`squall.toml`),
//! `ureq` (a small blocking HTTP client for the commands that talk to a gateway; no TLS, the
//! gateway serves plain HTTP), `serde_json` (the gateway's JSON), `axum` (serving the gateway),
//! `tokio` (the roles' runtime, and SIGINT and SIGTERM: see `signals`).

mod access;
mod cluster;
mod config;
mod events;
mod http;
mod kv;
mod namespace;
mod roles;
mod signals;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use squall_kvs::{ClusterConfig, Config, FsyncPolicy, Node};
use squall_proto::ready;

/// Squall: a stateful Function-as-a-Service runtime over a lattice key-value store.
#[derive(Debug, Parser)]
#[command(name = "squall", version, about)]
struct Cli {
    /// Settings file (default: ./squall.toml if it exists).
    #[arg(long, global = true, env = "SQUALL_CONFIG")]
    config: Option<PathBuf>,
    /// The cluster's secret (16 to 255 bytes): internal ports (store, router, mailboxes,
    /// caches) take only peers that present it, and this process presents it to them.
    #[arg(
        long,
        global = true,
        env = "SQUALL_CLUSTER_SECRET",
        hide_env_values = true
    )]
    cluster_secret: Option<String>,
    /// The namespace the command acts in (default: `default`): `squall fn`, `dag`, `model`,
    /// `call`, `trigger`, `activation`, `logs`, `dead-letters` and `kv` address its
    /// functions, DAGs, calls and keys; `squall key create` makes keys for it.
    #[arg(long = "ns", global = true, env = "SQUALL_NS")]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start store, scheduler, executors and HTTP gateway in one process.
    Up(roles::UpArgs),
    /// Register, list and delete functions (through a gateway).
    Fn(http::FnArgs),
    /// Create, list, delete and call DAGs (through a gateway).
    Dag(http::DagArgs),
    /// Register, list and delete models that functions run with wasi:nn (through a gateway).
    Model(http::ModelArgs),
    /// Call a function and print its output (through a gateway).
    Call(http::CallCommand),
    /// List and show the records of calls, and what they logged (through a gateway).
    Activation(events::ActivationArgs),
    /// Print what a function's or DAG's calls logged; --follow keeps printing.
    Logs(events::LogsArgs),
    /// Create, list, pause, resume, fire and delete triggers (through a gateway).
    Trigger(events::TriggerArgs),
    /// List, redrive and delete the calls that failed every attempt (through a gateway).
    DeadLetters(events::DeadLetterArgs),
    /// Make, list and revoke API keys (through a gateway, as admin).
    Key(access::KeyArgs),
    /// Show the audit trail: who registered, changed or deleted what, and made or revoked
    /// keys (through a gateway, as admin).
    Audit(access::AuditArgs),
    /// Create, list and delete namespaces (through a gateway, as admin).
    Namespace(access::NamespaceArgs),
    /// Run an executor that joins schedulers.
    Executor(roles::ExecutorArgs),
    /// Run a scheduler.
    Scheduler(roles::SchedulerArgs),
    /// Run an HTTP gateway in front of schedulers.
    Gateway(roles::GatewayArgs),
    /// Run a storage node until SIGINT or SIGTERM.
    Kvs(KvsArgs),
    /// Read or write keys of a running storage node.
    Kv(kv::KvArgs),
    /// Run a cluster's router: storage nodes join through it, clients find keys with it.
    Router(cluster::RouterArgs),
    /// Start a cluster on this machine, look at one, or render Kubernetes manifests.
    Cluster(cluster::ClusterArgs),
    /// Run the policy engine for a cluster that Kubernetes runs.
    Monitor(cluster::MonitorArgs),
}

#[derive(Debug, Args)]
struct KvsArgs {
    /// Host to bind.
    #[arg(long, env = "SQUALL_KVS_HOST", default_value = "127.0.0.1")]
    host: String,
    /// First port: shard i listens on port + i; 0 lets the OS pick.
    #[arg(long, env = "SQUALL_KVS_PORT", default_value_t = kv::DEFAULT_PORT)]
    port: u16,
    /// Shard threads (default: one per core).
    #[arg(long, env = "SQUALL_KVS_SHARDS")]
    shards: Option<usize>,
    /// Directory for the write-ahead log and snapshots; without it, data lives in memory only.
    #[arg(long, env = "SQUALL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// When the log is synced: always (before every acknowledgement), never, or an interval
    /// such as 1000ms.
    #[arg(long, env = "SQUALL_KVS_FSYNC", default_value = "always", value_parser = parse_fsync)]
    fsync: FsyncPolicy,
    /// Log bytes after which a shard compacts its log into a snapshot.
    #[arg(long, env = "SQUALL_KVS_COMPACT_AFTER_BYTES")]
    compact_after_bytes: Option<u64>,
    /// Largest request accepted, in bytes.
    #[arg(long, env = "SQUALL_KVS_MAX_REQUEST_BYTES")]
    max_request_bytes: Option<usize>,
    /// Milliseconds a delete's tombstone (or an expired key's) is kept before it is forgotten;
    /// a replica away longer than this may bring a deleted value back.
    #[arg(
        long,
        env = "SQUALL_KVS_TOMBSTONE_GRACE_MS",
        default_value_t = 3_600_000
    )]
    tombstone_grace_ms: u64,
    /// Join the cluster whose router is at this address (default: run alone).
    #[arg(long, env = "SQUALL_JOIN")]
    join: Option<String>,
    /// Milliseconds between heartbeats to the router.
    #[arg(long, env = "SQUALL_HEARTBEAT_MS", default_value_t = 250)]
    heartbeat_ms: u64,
    /// Milliseconds between gossip rounds of changed keys to their other replicas.
    #[arg(long, env = "SQUALL_GOSSIP_MS", default_value_t = 1000)]
    gossip_ms: u64,
    /// Milliseconds between load reports (per-key access counts, occupancy, size), written to
    /// the store for the policy engine.
    #[arg(long, env = "SQUALL_STATS_MS", default_value_t = 5000)]
    stats_ms: u64,
    /// Seconds a stopping cluster member may take to hand its keys off (SIGINT or SIGTERM).
    #[arg(long, env = "SQUALL_LEAVE_TIMEOUT", default_value_t = 60)]
    leave_timeout: u64,
}

pub(crate) fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    s.parse().map_err(|e: squall_kvs::Error| e.to_string())
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run_kvs(args: KvsArgs) -> anyhow::Result<()> {
    let defaults = Config::default();
    let config = Config {
        host: args.host,
        port: args.port,
        shards: args.shards.unwrap_or(defaults.shards),
        data_dir: args.data_dir,
        fsync: args.fsync,
        compact_after_bytes: args
            .compact_after_bytes
            .unwrap_or(defaults.compact_after_bytes),
        max_request_bytes: args.max_request_bytes.unwrap_or(defaults.max_request_bytes),
        tombstone_grace_ms: args.tombstone_grace_ms,
        cluster: args.join.map(|router| ClusterConfig {
            router,
            heartbeat_ms: args.heartbeat_ms,
            gossip_ms: args.gossip_ms,
            stats_ms: args.stats_ms,
        }),
        ..defaults
    };
    let joined = config.cluster.is_some();
    let stop = signals::install()?;
    let node = Node::start(config).context("starting the storage node")?;
    println!(
        "{}",
        ready::format(&[
            ("addr", node.address()),
            ("shards", &node.topology().shards.len().to_string()),
            ("keys", &node.recovered_keys().to_string()),
        ])
    );
    stop.until(|| node.is_running(), "a shard thread stopped unexpectedly")?;
    if joined {
        tracing::info!("leaving the cluster");
        if !node.leave(Duration::from_secs(args.leave_timeout)) {
            // A failure exit: whoever supervises this node must keep its data directory.
            anyhow::bail!("the hand-off did not finish; the data directory holds keys still");
        }
    } else {
        tracing::info!("shutting down");
        node.shutdown();
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match config::parse(&args) {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(secret) = &cli.cluster_secret {
        // Never printed: a refused secret may still be one in use elsewhere.
        let installed = squall_proto::secret::ClusterSecret::new(secret)
            .and_then(squall_proto::secret::ClusterSecret::install);
        if let Err(e) = installed {
            eprintln!("error: --cluster-secret: {e}");
            return ExitCode::FAILURE;
        }
    }
    if let Some(namespace) = &cli.namespace {
        if let Err(e) = squall_proto::keys::validate_namespace(namespace) {
            eprintln!("error: --ns: {e}");
            return ExitCode::FAILURE;
        }
        namespace::address(namespace);
    }
    let result = match cli.command {
        Command::Up(args) => {
            init_tracing("info");
            roles::up(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Executor(args) => {
            init_tracing("info");
            roles::executor(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Scheduler(args) => {
            init_tracing("info");
            roles::scheduler(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Gateway(args) => {
            init_tracing("info");
            roles::gateway(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Fn(args) => {
            init_tracing("warn");
            http::run_fn(args)
        }
        Command::Dag(args) => {
            init_tracing("warn");
            http::run_dag(args)
        }
        Command::Model(args) => {
            init_tracing("warn");
            http::run_model(args)
        }
        Command::Call(args) => {
            init_tracing("warn");
            http::run_call(args)
        }
        Command::Activation(args) => {
            init_tracing("warn");
            events::run_activation(args)
        }
        Command::Logs(args) => {
            init_tracing("warn");
            events::run_logs(args)
        }
        Command::Trigger(args) => {
            init_tracing("warn");
            events::run_trigger(args)
        }
        Command::Key(args) => {
            init_tracing("warn");
            access::run(args)
        }
        Command::Audit(args) => {
            init_tracing("warn");
            access::audit(args)
        }
        Command::Namespace(args) => {
            init_tracing("warn");
            access::namespaces(args)
        }
        Command::DeadLetters(args) => {
            init_tracing("warn");
            events::run_dead_letters(args)
        }
        Command::Kvs(args) => {
            init_tracing("info");
            run_kvs(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Kv(args) => {
            init_tracing("warn");
            kv::run(args)
        }
        Command::Router(args) => {
            init_tracing("info");
            cluster::run_router(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Monitor(args) => {
            init_tracing("info");
            cluster::monitor(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Cluster(args) => {
            init_tracing(if args.is_up() { "info" } else { "warn" });
            cluster::run(args).map(|()| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
