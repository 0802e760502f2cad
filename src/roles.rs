//! The long-running roles: `squall up` (everything in one process), and `squall executor`,
//! `squall scheduler` and `squall gateway` as processes of their own, talking over the call
//! fabric (ZeroMQ). Each prints one `READY key=value ...` line on standard output once it
//! serves, and runs until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use squall_executor::clients::ClientPool;
use squall_executor::{Cache, CacheConfig, Executor, ExecutorNode, NodeConfig};
use squall_kvs::{FsyncPolicy, Node};
use squall_proto::fabric::Fabric;
use squall_scheduler::gateway::{Gateway, GatewayConfig};
use squall_scheduler::{DagRegistry, Scheduler, SchedulerClient, SchedulerConfig};
use tokio::sync::Notify;

use crate::kv::DEFAULT_PORT as DEFAULT_KVS_PORT;

/// The scheduler's port unless told otherwise.
pub const DEFAULT_SCHEDULER_PORT: u16 = 7300;
/// The gateway's HTTP port unless told otherwise.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// How long a store request may take before it is retried or fails.
const KVS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Host every socket binds to.
    #[arg(long, env = "SQUALL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// The HTTP gateway's port (0: the OS picks).
    #[arg(long, env = "SQUALL_HTTP_PORT", default_value_t = DEFAULT_HTTP_PORT)]
    http_port: u16,
    /// The storage node's first port (shard i listens on port + i; 0: the OS picks).
    #[arg(long, env = "SQUALL_KVS_PORT", default_value_t = DEFAULT_KVS_PORT)]
    kvs_port: u16,
    /// The scheduler's port, where executors in other processes join (0: the OS picks).
    #[arg(long, env = "SQUALL_SCHEDULER_PORT", default_value_t = DEFAULT_SCHEDULER_PORT)]
    scheduler_port: u16,
    /// Storage shard threads (default: one per core).
    #[arg(long, env = "SQUALL_KVS_SHARDS")]
    kvs_shards: Option<usize>,
    /// Executors in this process (0: only executors started with `squall executor` run
    /// functions).
    #[arg(long, env = "SQUALL_EXECUTORS", default_value_t = 1)]
    executors: usize,
    /// Where the store's log and snapshots, and compiled code, live.
    #[arg(long, env = "SQUALL_DATA_DIR", default_value = "squall-data")]
    data_dir: PathBuf,
    /// Keep everything in memory (nothing survives a restart).
    #[arg(long, env = "SQUALL_IN_MEMORY")]
    in_memory: bool,
    /// When the store's log is synced: always, never, or an interval such as 1000ms.
    #[arg(long, env = "SQUALL_KVS_FSYNC", default_value = "always", value_parser = crate::parse_fsync)]
    fsync: FsyncPolicy,
    /// Bearer token required on every mutating HTTP request.
    #[arg(long, env = "SQUALL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Steps each executor runs at once before the scheduler counts it as busy.
    #[arg(long, env = "SQUALL_EXECUTOR_CAPACITY", default_value_t = 64)]
    capacity: u32,
}

#[derive(Debug, Args)]
pub struct ExecutorArgs {
    /// Host its mailbox binds to.
    #[arg(long, env = "SQUALL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Its mailbox's port (0: the OS picks).
    #[arg(long, env = "SQUALL_EXECUTOR_PORT", default_value_t = 0)]
    port: u16,
    /// The storage node.
    #[arg(long, env = "SQUALL_KVS_ADDR", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_KVS_PORT}"))]
    kvs: String,
    /// Schedulers to join (repeat or separate with commas).
    #[arg(
        long = "scheduler",
        env = "SQUALL_SCHEDULERS",
        value_delimiter = ',',
        default_value = "tcp://127.0.0.1:7300"
    )]
    schedulers: Vec<String>,
    /// Serve only these functions (repeat or separate with commas; default: all).
    #[arg(long = "serves", env = "SQUALL_EXECUTOR_SERVES", value_delimiter = ',')]
    serves: Vec<String>,
    /// Steps it runs at once before schedulers count it as busy.
    #[arg(long, env = "SQUALL_EXECUTOR_CAPACITY", default_value_t = 64)]
    capacity: u32,
    /// Its id (default: random).
    #[arg(long, env = "SQUALL_EXECUTOR_ID")]
    id: Option<String>,
    /// Where compiled code is kept between runs.
    #[arg(long, env = "SQUALL_CODE_CACHE_DIR")]
    code_cache_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Host its mailbox binds to.
    #[arg(long, env = "SQUALL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Its mailbox's port (0: the OS picks).
    #[arg(long, env = "SQUALL_SCHEDULER_PORT", default_value_t = DEFAULT_SCHEDULER_PORT)]
    port: u16,
    /// The storage node.
    #[arg(long, env = "SQUALL_KVS_ADDR", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_KVS_PORT}"))]
    kvs: String,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Host to bind.
    #[arg(long, env = "SQUALL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// HTTP port (0: the OS picks).
    #[arg(long, env = "SQUALL_HTTP_PORT", default_value_t = DEFAULT_HTTP_PORT)]
    http_port: u16,
    /// The storage node.
    #[arg(long, env = "SQUALL_KVS_ADDR", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_KVS_PORT}"))]
    kvs: String,
    /// Schedulers to send calls to, in turn (repeat or separate with commas).
    #[arg(
        long = "scheduler",
        env = "SQUALL_SCHEDULERS",
        value_delimiter = ',',
        default_value = "tcp://127.0.0.1:7300"
    )]
    schedulers: Vec<String>,
    /// Bearer token required on every mutating request.
    #[arg(long, env = "SQUALL_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

/// A tokio runtime and a signal that fires on SIGINT or SIGTERM.
fn runtime() -> anyhow::Result<(tokio::runtime::Runtime, Arc<Notify>)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("squall-worker")
        .build()
        .context("starting the async runtime")?;
    let stop = Arc::new(Notify::new());
    let signal = stop.clone();
    ctrlc::set_handler(move || signal.notify_one())
        .context("installing the SIGINT/SIGTERM handler")?;
    Ok((runtime, stop))
}

async fn serve_http(
    host: &str,
    port: u16,
    gateway: Arc<Gateway>,
) -> anyhow::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding the gateway to {host}:{port}"))?;
    let url = format!("http://{}", listener.local_addr()?);
    let router = gateway.router();
    let server = tokio::spawn(async move { axum::serve(listener, router).await });
    Ok((url, server))
}

fn start_executor(
    fabric: &Arc<Fabric>,
    kvs: &str,
    pool: &ClientPool,
    host: &str,
    port: u16,
    config: squall_executor::Config,
    node: NodeConfig,
) -> anyhow::Result<ExecutorNode> {
    let executor = Executor::start(config, kvs).context("starting an executor")?;
    let mailbox = fabric
        .bind(host, port)
        .context("binding the executor's mailbox")?;
    Ok(ExecutorNode::start(executor, mailbox, pool.clone(), node))
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let defaults = squall_kvs::Config::default();
    let data_dir = (!args.in_memory).then(|| args.data_dir.clone());
    let kvs_config = squall_kvs::Config {
        host: args.host.clone(),
        port: args.kvs_port,
        shards: args.kvs_shards.unwrap_or(defaults.shards),
        data_dir: data_dir.as_ref().map(|d| d.join("kvs")),
        fsync: args.fsync,
        ..defaults
    };
    let node = Node::start(kvs_config).context("starting the storage node")?;
    let (runtime, stop) = runtime()?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = ClientPool::connect(node.address(), KVS_TIMEOUT)?;
        let cache = Cache::start(pool.clone(), CacheConfig::default())?;
        let scheduler = Scheduler::start(
            fabric
                .bind(&args.host, args.scheduler_port)
                .context("binding the scheduler's mailbox")?,
            pool.clone(),
            DagRegistry::new(pool.clone(), Some(cache)),
            SchedulerConfig::default(),
        );
        let mut executors = Vec::new();
        for i in 0..args.executors {
            let config = squall_executor::Config {
                code_cache_dir: data_dir.as_ref().map(|d| d.join("code-cache")),
                ..squall_executor::Config::default()
            };
            let node_config = NodeConfig {
                id: format!("executor-{i}"),
                schedulers: vec![scheduler.addr().to_string()],
                capacity: args.capacity,
                ..NodeConfig::default()
            };
            executors.push(start_executor(
                &fabric,
                node.address(),
                &pool,
                &args.host,
                0,
                config,
                node_config,
            )?);
        }
        let client = SchedulerClient::start(
            fabric
                .bind(&args.host, 0)
                .context("binding the gateway's mailbox")?,
            vec![scheduler.addr().to_string()],
        );
        let gateway = Gateway::new(
            client,
            pool,
            GatewayConfig {
                token: args.token.clone(),
                ..GatewayConfig::default()
            },
        );
        let (url, server) = serve_http(&args.host, args.http_port, gateway).await?;
        eprintln!("squall up");
        eprintln!("  gateway     {url}");
        eprintln!(
            "  store       {} ({} shards, data: {})",
            node.address(),
            node.topology().shards.len(),
            data_dir.as_ref().map_or("memory only".to_string(), |d| d
                .join("kvs")
                .display()
                .to_string())
        );
        eprintln!("  scheduler   {}", scheduler.addr());
        for executor in &executors {
            eprintln!("  executor    {} ({})", executor.id(), executor.addr());
        }
        eprintln!(
            "  token       {}",
            if args.token.is_some() {
                "required on mutating requests"
            } else {
                "none"
            }
        );
        println!(
            "READY http={url} kvs={} scheduler={} executors={}",
            node.address(),
            scheduler.addr(),
            executors.len()
        );
        tokio::select! {
            _ = stop.notified() => tracing::info!("shutting down"),
            result = server => anyhow::bail!("the HTTP server stopped: {result:?}"),
        }
        drop(executors);
        drop(scheduler);
        Ok(())
    })?;
    node.shutdown();
    Ok(())
}

pub fn executor(args: ExecutorArgs) -> anyhow::Result<()> {
    let (runtime, stop) = runtime()?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = ClientPool::connect(&args.kvs, KVS_TIMEOUT)
            .with_context(|| format!("connecting to the store at {}", args.kvs))?;
        let config = squall_executor::Config {
            code_cache_dir: args.code_cache_dir.clone(),
            ..squall_executor::Config::default()
        };
        let node_config = NodeConfig {
            schedulers: args.schedulers.clone(),
            serves: args.serves.clone(),
            capacity: args.capacity,
            ..NodeConfig::default()
        };
        let node_config = match &args.id {
            Some(id) => NodeConfig {
                id: id.clone(),
                ..node_config
            },
            None => node_config,
        };
        let node = start_executor(
            &fabric,
            &args.kvs,
            &pool,
            &args.host,
            args.port,
            config,
            node_config,
        )?;
        println!("READY addr={} id={}", node.addr(), node.id());
        stop.notified().await;
        tracing::info!("shutting down");
        Ok(())
    })
}

pub fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let (runtime, stop) = runtime()?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = ClientPool::connect(&args.kvs, KVS_TIMEOUT)
            .with_context(|| format!("connecting to the store at {}", args.kvs))?;
        let cache = Cache::start(pool.clone(), CacheConfig::default())?;
        let scheduler = Scheduler::start(
            fabric
                .bind(&args.host, args.port)
                .context("binding the scheduler's mailbox")?,
            pool.clone(),
            DagRegistry::new(pool, Some(cache)),
            SchedulerConfig::default(),
        );
        println!("READY addr={}", scheduler.addr());
        stop.notified().await;
        tracing::info!("shutting down");
        Ok(())
    })
}

pub fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let (runtime, stop) = runtime()?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = ClientPool::connect(&args.kvs, KVS_TIMEOUT)
            .with_context(|| format!("connecting to the store at {}", args.kvs))?;
        let client = SchedulerClient::start(
            fabric
                .bind(&args.host, 0)
                .context("binding the gateway's mailbox")?,
            args.schedulers.clone(),
        );
        let gateway = Gateway::new(
            client,
            pool,
            GatewayConfig {
                token: args.token.clone(),
                ..GatewayConfig::default()
            },
        );
        let (url, server) = serve_http(&args.host, args.http_port, gateway).await?;
        println!("READY http={url}");
        tokio::select! {
            _ = stop.notified() => tracing::info!("shutting down"),
            result = server => anyhow::bail!("the HTTP server stopped: {result:?}"),
        }
        Ok(())
    })
}
