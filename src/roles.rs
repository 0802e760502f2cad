//! The long-running roles: `squall up` (everything in one process), and `squall executor`,
//! `squall scheduler` and `squall gateway` as processes of their own, talking over the call
//! fabric (ZeroMQ). Each prints one `READY key=value ...` line on standard output once it
//! serves, and runs until SIGINT or SIGTERM.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use squall_executor::{Executor, ExecutorNode, NodeConfig};
use squall_gateway::{Gateway, GatewayConfig};
use squall_kvs::{FsyncPolicy, Node};
use squall_proto::fabric::Fabric;
use squall_proto::ready;
use squall_scheduler::{Scheduler, SchedulerClient, SchedulerConfig};
use squall_state::{Cache, CacheConfig, ClientPool, DagRegistry};

use crate::signals::Stop;

use crate::kv::DEFAULT_PORT as DEFAULT_KVS_PORT;

/// The scheduler's port unless told otherwise.
pub const DEFAULT_SCHEDULER_PORT: u16 = 7300;
/// The gateway's HTTP port unless told otherwise.
pub const DEFAULT_HTTP_PORT: u16 = 8080;

/// How long a store request may take before it is retried or fails.
const KVS_TIMEOUT: Duration = Duration::from_secs(2);

/// The host sockets bind to.
#[derive(Debug, Args)]
struct Host {
    /// Host every socket binds to.
    #[arg(long, env = "SQUALL_HOST", default_value = "127.0.0.1")]
    host: String,
}

/// The storage node a role reads and writes.
#[derive(Debug, Args)]
struct Store {
    /// The storage node.
    #[arg(long, env = "SQUALL_KVS_ADDR", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_KVS_PORT}"))]
    kvs: String,
}

impl Store {
    fn connect(&self) -> anyhow::Result<ClientPool> {
        ClientPool::connect(&self.kvs, KVS_TIMEOUT)
            .with_context(|| format!("connecting to the store at {}", self.kvs))
    }
}

/// The schedulers a role talks to.
#[derive(Debug, Args)]
struct Schedulers {
    /// Schedulers to join or send calls to, in turn (repeat or separate with commas).
    #[arg(
        long = "scheduler",
        env = "SQUALL_SCHEDULERS",
        value_delimiter = ',',
        default_value = "tcp://127.0.0.1:7300"
    )]
    schedulers: Vec<String>,
}

/// The gateway's bearer token.
#[derive(Debug, Args)]
struct Token {
    /// Bearer token required on every HTTP request but `/healthz` (at least 16 characters).
    #[arg(
        long,
        env = "SQUALL_TOKEN",
        hide_env_values = true,
        conflicts_with = "token_file"
    )]
    token: Option<String>,
    /// A file holding the token (its first line; a mounted Kubernetes Secret, say), instead
    /// of `--token`.
    #[arg(long, env = "SQUALL_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl Token {
    /// The token, if one is given and it is long enough (checked at start, and never
    /// printed: a refused secret may still be one in use elsewhere).
    fn checked(&self) -> anyhow::Result<Option<String>> {
        if let Some(path) = &self.token_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--token-file: reading {}", path.display()))?;
            let token = text
                .lines()
                .next()
                .unwrap_or_default()
                .trim_end_matches('\r');
            return Ok(Some(secret(token).map_err(|e| {
                anyhow::anyhow!("--token-file {}: {e}", path.display())
            })?));
        }
        match &self.token {
            Some(token) => Ok(Some(
                secret(token).map_err(|e| anyhow::anyhow!("--token: {e}"))?,
            )),
            None => Ok(None),
        }
    }
}

/// The fewest characters a secret given to a server may have.
const MIN_SECRET: usize = 16;

/// A secret a server is given: refused when empty, blank or shorter than [`MIN_SECRET`]
/// (an empty `SQUALL_TOKEN` would otherwise lock every request, and a short one is
/// guessed).
pub(crate) fn secret(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        return Err(
            "an empty secret guards nothing: give one of at least 16 characters \
                    (for example `openssl rand -hex 24`), or none at all"
                .into(),
        );
    }
    if value.chars().count() < MIN_SECRET {
        return Err(format!(
            "the secret is too short to guard the gateway: give one of at least {MIN_SECRET} \
             characters (for example `openssl rand -hex 24`)"
        ));
    }
    Ok(value.to_string())
}

/// TLS on the gateway's HTTP port.
#[derive(Debug, Args)]
struct Tls {
    /// PEM file with the gateway's certificate chain, its own certificate first: the HTTP
    /// port then speaks HTTPS only (with --tls-key).
    #[arg(long, env = "SQUALL_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "SQUALL_TLS_KEY")]
    tls_key: Option<PathBuf>,
}

impl Tls {
    /// The server configuration, read and checked now so that a bad file fails the start.
    fn config(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Ok(Some(squall_gateway::tls::server_config(cert, key)?)),
            (None, None) => Ok(None),
            // Set apart in `squall.toml` (whose settings clap takes as defaults, which its
            // `requires` does not look at): never a silent fall-back to plain HTTP.
            _ => anyhow::bail!("--tls-cert and --tls-key go together: give both or neither"),
        }
    }
}

/// The records the gateway keeps of calls.
#[derive(Debug, Args)]
struct Records {
    /// Hours an activation record is kept (fractions allowed).
    #[arg(long, env = "SQUALL_ACTIVATION_RETENTION_H", default_value_t = 24.0, value_parser = hours)]
    activation_retention_h: f64,
    /// Mebibytes of activation records kept (fractions allowed): past it, the oldest go.
    #[arg(long, env = "SQUALL_ACTIVATION_RETENTION_MB", default_value_t = 1024.0, value_parser = mebibytes)]
    activation_retention_mb: f64,
    /// Hours an audit entry (an administrative request: see `squall audit`) is kept.
    #[arg(long, env = "SQUALL_AUDIT_RETENTION_H", default_value_t = 2160.0, value_parser = hours)]
    audit_retention_h: f64,
    /// Write no activation records (to measure what they cost).
    #[arg(long, env = "SQUALL_NO_ACTIVATION_RECORDS")]
    no_activation_records: bool,
    /// The id this gateway leases asynchronous calls under: unique among the gateways
    /// running at once, the same across restarts of one gateway, which then takes back its
    /// calls at once (default: the host's name and the HTTP port; a random id with
    /// --http-port 0).
    #[arg(long, env = "SQUALL_GATEWAY_ID")]
    gateway_id: Option<String>,
    /// The deepest chain of `kv-change` trigger calls (a call fired by a write that a
    /// trigger's call made, and so on): a delivery deeper than this is not made, but kept as
    /// a dead letter with a `chain_too_deep` error, so a function whose writes fire its own
    /// trigger stops.
    #[arg(long, env = "SQUALL_MAX_TRIGGER_CHAIN", default_value_t = squall_gateway::feed::DEFAULT_MAX_CHAIN,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_trigger_chain: u32,
}

impl Records {
    /// The gateway's settings with these, for a gateway serving HTTP on `host:port`.
    fn config(&self, token: Option<String>, host: &str, port: u16) -> GatewayConfig {
        let defaults = GatewayConfig::default();
        let runner_id = match (&self.gateway_id, port) {
            (Some(id), _) => id.clone(),
            (None, 0) => defaults.runner_id.clone(),
            // The host's name, not the address it listens on (0.0.0.0 on every host).
            (None, port) => {
                let machine = nix::unistd::gethostname()
                    .ok()
                    .and_then(|name| name.into_string().ok())
                    .unwrap_or_else(|| host.to_string());
                format!("{machine}:{port}")
            }
        };
        GatewayConfig {
            token,
            record_activations: !self.no_activation_records,
            activation_retention: Duration::from_secs_f64(self.activation_retention_h * 3600.0),
            activation_retention_bytes: (self.activation_retention_mb * 1048576.0) as u64,
            runner_id,
            max_trigger_chain: self.max_trigger_chain,
            audit_retention: Duration::from_secs_f64(self.audit_retention_h * 3600.0),
            ..defaults
        }
    }
}

/// A number of hours between a second and ten years.
fn hours(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|h| (1.0 / 3600.0..=87_600.0).contains(h))
        .ok_or_else(|| format!("{text:?} is not a number of hours between 1/3600 and 87600"))
}

/// A number of mebibytes between 1/1024 (one KiB) and a million.
fn mebibytes(text: &str) -> Result<f64, String> {
    text.parse::<f64>()
        .ok()
        .filter(|mb| (1.0 / 1024.0..=1_000_000.0).contains(mb))
        .ok_or_else(|| format!("{text:?} is not a number of MiB between 1/1024 and 1000000"))
}

/// Steps an executor runs at once.
#[derive(Debug, Args)]
struct Capacity {
    /// Steps each executor runs at once before schedulers count it as busy.
    #[arg(long, env = "SQUALL_EXECUTOR_CAPACITY", default_value_t = 64)]
    capacity: u32,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    host: Host,
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
    #[command(flatten)]
    token: Token,
    #[command(flatten)]
    tls: Tls,
    #[command(flatten)]
    records: Records,
    #[command(flatten)]
    capacity: Capacity,
}

#[derive(Debug, Args)]
pub struct ExecutorArgs {
    #[command(flatten)]
    host: Host,
    /// Seconds a stopping executor (SIGINT or SIGTERM) waits for its steps to finish.
    #[arg(long, env = "SQUALL_DRAIN_TIMEOUT", default_value_t = 60)]
    drain_timeout: u64,
    /// Its mailbox's port (0: the OS picks).
    #[arg(long, env = "SQUALL_EXECUTOR_PORT", default_value_t = 0)]
    port: u16,
    #[command(flatten)]
    store: Store,
    #[command(flatten)]
    schedulers: Schedulers,
    /// Serve only these functions (repeat or separate with commas; default: all).
    #[arg(long = "serves", env = "SQUALL_EXECUTOR_SERVES", value_delimiter = ',')]
    serves: Vec<String>,
    #[command(flatten)]
    capacity: Capacity,
    /// Its id (default: random).
    #[arg(long, env = "SQUALL_EXECUTOR_ID")]
    id: Option<String>,
    /// Where compiled code is kept between runs.
    #[arg(long, env = "SQUALL_CODE_CACHE_DIR")]
    code_cache_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct SchedulerArgs {
    #[command(flatten)]
    host: Host,
    /// Its mailbox's port (0: the OS picks).
    #[arg(long, env = "SQUALL_SCHEDULER_PORT", default_value_t = DEFAULT_SCHEDULER_PORT)]
    port: u16,
    #[command(flatten)]
    store: Store,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    host: Host,
    /// HTTP port (0: the OS picks).
    #[arg(long, env = "SQUALL_HTTP_PORT", default_value_t = DEFAULT_HTTP_PORT)]
    http_port: u16,
    #[command(flatten)]
    store: Store,
    #[command(flatten)]
    schedulers: Schedulers,
    #[command(flatten)]
    token: Token,
    #[command(flatten)]
    tls: Tls,
    #[command(flatten)]
    records: Records,
}

/// A tokio runtime and the stop that SIGINT or SIGTERM asks for.
fn runtime() -> anyhow::Result<(tokio::runtime::Runtime, Stop)> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("squall-worker")
        .build()
        .context("starting the async runtime")?;
    let stop = crate::signals::install()?;
    Ok((runtime, stop))
}

/// How long the HTTP server may take, once stopped, to finish the requests it has.
const HTTP_DRAIN: Duration = Duration::from_secs(10);

/// Serves the gateway until `stop`, over TLS when `tls` is given: then it takes no new
/// connection and finishes the requests under way (axum's graceful shutdown).
async fn serve_http(
    host: &str,
    port: u16,
    tls: Option<Arc<rustls::ServerConfig>>,
    gateway: Arc<Gateway>,
    stop: &Stop,
) -> anyhow::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind((host, port))
        .await
        .with_context(|| format!("binding the gateway to {host}:{port}"))?;
    let address = listener.local_addr()?;
    let router = gateway.router();
    let stop = stop.clone();
    let stopped = async move { stop.requested().await };
    let (url, server) = match tls {
        Some(config) => {
            let listener = squall_gateway::tls::TlsListener::new(listener, config)?;
            let server = tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await
            });
            (format!("https://{address}"), server)
        }
        None => {
            let server = tokio::spawn(async move {
                axum::serve(listener, router)
                    .with_graceful_shutdown(stopped)
                    .await
            });
            (format!("http://{address}"), server)
        }
    };
    Ok((url, server))
}

/// How long a stopping gateway waits for its last calls' activation records to be written.
const RECORDS_FLUSH: Duration = Duration::from_secs(5);

/// Writes the activation records still queued (at most [`RECORDS_FLUSH`]), saying so if
/// some could not be.
async fn flush_records(gateway: &Gateway) {
    if !gateway.flush_records(RECORDS_FLUSH).await {
        tracing::warn!("some activation records were not written before the gateway stopped");
    }
}

/// Waits for a stop, then for the HTTP server to finish its requests (at most [`HTTP_DRAIN`]);
/// fails if the server stops first.
async fn finish_http(
    stop: &Stop,
    mut server: tokio::task::JoinHandle<std::io::Result<()>>,
) -> anyhow::Result<()> {
    // The server ends on its own once a stop is asked for, maybe before this task looks:
    // the stop is looked at first, and a server that ended after one is no failure.
    tokio::select! {
        biased;
        _ = stop.requested() => tracing::info!("shutting down"),
        result = &mut server => {
            anyhow::ensure!(stop.is_requested(), "the HTTP server stopped: {result:?}");
            tracing::info!("shutting down");
            return Ok(());
        }
    }
    if tokio::time::timeout(HTTP_DRAIN, server).await.is_err() {
        tracing::warn!("requests still under way after {HTTP_DRAIN:?}: dropped");
    }
    Ok(())
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

/// Waits until the scheduler `client` talks to knows `n` executors.
async fn joined(client: &SchedulerClient, n: usize) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let known = client.status(Duration::from_secs(1)).await.map(|e| e.len());
        if known.as_ref().is_ok_and(|k| *k >= n) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the scheduler did not see this process's {n} executors join: {known:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let token = args.token.checked()?;
    let tls = args.tls.config()?;
    let defaults = squall_kvs::Config::default();
    // Absolute, so the summary says exactly where the data is.
    let data_dir = if args.in_memory {
        None
    } else {
        Some(absolute(&args.data_dir)?)
    };
    let kvs_config = squall_kvs::Config {
        host: args.host.host.clone(),
        port: args.kvs_port,
        shards: args.kvs_shards.unwrap_or(defaults.shards),
        data_dir: data_dir.as_ref().map(|d| d.join("kvs")),
        fsync: args.fsync,
        ..defaults
    };
    // Signals first: a Ctrl-C during the store's recovery stops it like any other.
    let (runtime, stop) = runtime()?;
    let node = Node::start(kvs_config).context("starting the storage node")?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = ClientPool::connect(node.address(), KVS_TIMEOUT)?;
        squall_state::legacy::migrate(&pool)
            .await
            .context("moving registries into the namespaced key layout")?;
        squall_state::legacy::move_tenant_keys(&pool)
            .await
            .context("moving keys into the default namespace")?;
        let cache = Cache::start(pool.clone(), CacheConfig::default())?;
        let scheduler = Scheduler::start(
            fabric
                .bind(&args.host.host, args.scheduler_port)
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
                capacity: args.capacity.capacity,
                ..NodeConfig::default()
            };
            executors.push(start_executor(
                &fabric,
                node.address(),
                &pool,
                &args.host.host,
                0,
                config,
                node_config,
            )?);
        }
        let client = SchedulerClient::start(
            fabric
                .bind(&args.host.host, 0)
                .context("binding the gateway's mailbox")?,
            vec![scheduler.addr().to_string()],
        );
        // Serve once the scheduler knows this process's executors: a registration or call
        // right after READY must find them.
        joined(&client, executors.len()).await?;
        let config = args
            .records
            .config(token.clone(), &args.host.host, args.http_port);
        let gateway = Gateway::new(client, pool, config);
        gateway.start();
        let (url, server) =
            serve_http(&args.host.host, args.http_port, tls, gateway.clone(), &stop).await?;
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
            if token.is_some() {
                "required on every request but /healthz"
            } else {
                "none"
            }
        );
        println!(
            "{}",
            ready::format(&[
                ("http", &url),
                ("kvs", node.address()),
                ("scheduler", scheduler.addr()),
                ("executors", &executors.len().to_string()),
            ])
        );
        finish_http(&stop, server).await?;
        flush_records(&gateway).await;
        drop(executors);
        drop(scheduler);
        anyhow::Ok(())
    })?;
    node.shutdown();
    Ok(())
}

pub fn executor(args: ExecutorArgs) -> anyhow::Result<()> {
    let (runtime, stop) = runtime()?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = args.store.connect()?;
        let config = squall_executor::Config {
            code_cache_dir: args.code_cache_dir.clone(),
            ..squall_executor::Config::default()
        };
        let node_config = NodeConfig {
            schedulers: args.schedulers.schedulers.clone(),
            serves: args.serves.clone(),
            capacity: args.capacity.capacity,
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
            &args.store.kvs,
            &pool,
            &args.host.host,
            args.port,
            config,
            node_config,
        )?;
        println!(
            "{}",
            ready::format(&[("addr", node.addr()), ("id", node.id())])
        );
        stop.requested().await;
        // Drain first, so that scaling down fails no call: the schedulers stop placing steps
        // here, and what was placed finishes.
        let timeout = Duration::from_secs(args.drain_timeout);
        if node.drained(timeout).await {
            tracing::info!("drained; shutting down");
        } else {
            tracing::warn!(
                ?timeout,
                "steps still ran when the drain timed out; shutting down"
            );
        }
        Ok(())
    })
}

pub fn scheduler(args: SchedulerArgs) -> anyhow::Result<()> {
    let (runtime, stop) = runtime()?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = args.store.connect()?;
        squall_state::legacy::migrate(&pool)
            .await
            .context("moving registries into the namespaced key layout")?;
        squall_state::legacy::move_tenant_keys(&pool)
            .await
            .context("moving keys into the default namespace")?;
        let cache = Cache::start(pool.clone(), CacheConfig::default())?;
        let scheduler = Scheduler::start(
            fabric
                .bind(&args.host.host, args.port)
                .context("binding the scheduler's mailbox")?,
            pool.clone(),
            DagRegistry::new(pool, Some(cache)),
            SchedulerConfig::default(),
        );
        println!("{}", ready::format(&[("addr", scheduler.addr())]));
        stop.requested().await;
        tracing::info!("shutting down");
        Ok(())
    })
}

pub fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let token = args.token.checked()?;
    let tls = args.tls.config()?;
    let (runtime, stop) = runtime()?;
    runtime.block_on(async {
        let fabric = Fabric::new();
        let pool = args.store.connect()?;
        let client = SchedulerClient::start(
            fabric
                .bind(&args.host.host, 0)
                .context("binding the gateway's mailbox")?,
            args.schedulers.schedulers.clone(),
        );
        let config = args
            .records
            .config(token.clone(), &args.host.host, args.http_port);
        let gateway = Gateway::new(client, pool, config);
        gateway.start();
        let (url, server) =
            serve_http(&args.host.host, args.http_port, tls, gateway.clone(), &stop).await?;
        println!("{}", ready::format(&[("http", &url)]));
        let finished = finish_http(&stop, server).await;
        flush_records(&gateway).await;
        finished
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_must_be_long_enough_and_is_never_echoed() {
        assert!(secret("0123456789abcdef").is_ok());
        assert!(secret("a-token-of-27-characters-ok").is_ok());
        for refused in ["", "   ", "\t\n", "s3cret", "0123456789abcde"] {
            let said = secret(refused).expect_err(refused);
            assert!(said.contains("16"), "{said}");
            assert!(
                refused.trim().is_empty() || !said.contains(refused),
                "{said}"
            );
        }
        // Characters, not bytes: sixteen of them in any script.
        assert!(secret(&"é".repeat(16)).is_ok());
        assert!(secret(&"é".repeat(8)).is_err());
    }
}
