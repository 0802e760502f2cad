//! `squall router` and `squall cluster ...`: running a multi-node store.
//!
//! A cluster is one router (the membership and the seed nodes join through) and any number of
//! `squall kvs --join ROUTER` nodes. Executors, schedulers, gateways and `squall kv` are given
//! the router's address as their `--kvs`, and find every key's replicas from its view.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use squall_kvs::{Router, RouterConfig};
use squall_proto::poll::Poll;
use squall_proto::ready;

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
    let stop = crate::signals::install()?;
    let router = Router::start(RouterConfig {
        host: args.host,
        port: args.port,
        replication: args.replication,
        dead_after_ms: args.dead_after_ms,
        ..RouterConfig::default()
    })
    .context("starting the router")?;
    println!("{}", ready::format(&[("addr", router.address())]));
    stop.until(
        || router.is_running(),
        "the router thread stopped unexpectedly",
    )?;
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
    /// Print the Kubernetes manifests of cluster/k8s for a namespace, an image and sizes
    /// (pipe them to `kubectl apply -f -`).
    Manifests(ManifestArgs),
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
        ClusterCommand::Manifests(args) => {
            // The cluster's secret: the one given, else a fresh one.
            let secret = match squall_proto::secret::ClusterSecret::installed() {
                Some(secret) => secret.expose().to_string(),
                None => {
                    eprintln!(
                        "squall cluster manifests: a fresh cluster secret is in the Secret \
                         squall-cluster-secret; render again with the same --cluster-secret, or \
                         pods restarted after the next apply will not reach the others"
                    );
                    let bytes: [u8; 24] = rand::random();
                    bytes.iter().map(|b| format!("{b:02x}")).collect()
                }
            };
            print!("{}", render(&args, &secret)?);
            Ok(())
        }
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
    /// Bearer token the gateway requires on every request but `/healthz` (at least 16
    /// characters).
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

    if let Some(token) = &args.token {
        crate::roles::secret(token).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    }
    let mut policy = args.policy.config()?;
    // Unless told otherwise, the pools scale down no further than they started.
    if args.policy.min_nodes.is_none() {
        policy.min_nodes = args.nodes.max(1);
    }
    if args.policy.min_executors.is_none() {
        policy.min_executors = args.executors.max(1);
    }
    let stop = crate::signals::install()?;
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
    extra.insert(
        Role::Gateway,
        vec!["--http-port".to_string(), args.http_port.to_string()],
    );
    // Secrets reach the children through their environment, not their command lines: the
    // cluster secret every role, the token the gateway alone.
    let mut env: std::collections::HashMap<Role, Vec<(String, String)>> =
        std::collections::HashMap::new();
    if let Some(secret) = squall_proto::secret::ClusterSecret::installed() {
        for role in [
            Role::Router,
            Role::Storage,
            Role::Scheduler,
            Role::Executor,
            Role::Gateway,
        ] {
            env.entry(role).or_default().push((
                "SQUALL_CLUSTER_SECRET".to_string(),
                secret.expose().to_string(),
            ));
        }
    }
    if let Some(token) = &args.token {
        env.entry(Role::Gateway)
            .or_default()
            .push(("SQUALL_TOKEN".to_string(), token.clone()));
    }
    let mut provisioner = LocalProvisioner::new(LocalConfig {
        binary: std::env::current_exe().context("finding the squall binary")?,
        log_dir: log_dir.clone(),
        host: args.host.clone(),
        extra,
        data_dir: (!args.in_memory).then(|| args.dir.clone()),
        env,
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
    let logs = log_dir.display().to_string();
    println!(
        "{}",
        ready::format(&[
            ("http", &http),
            ("router", &router),
            ("scheduler", &scheduler),
            ("logs", &logs),
        ])
    );
    stop.until(|| monitor.is_running(), "the monitor stopped unexpectedly")?;
    tracing::info!("stopping the cluster: executors drain, storage nodes hand off");
    drop(monitor);
    Ok(())
}

/// Waits until the router's view holds `members` storage nodes.
fn wait_for_members(router: &str, members: usize) -> anyhow::Result<()> {
    let mut last = None;
    Poll::within(Duration::from_secs(30))
        .every(Duration::from_millis(50))
        .until(|| {
            let status = squall_kvs::router::status(router);
            let joined = matches!(&status, Ok(s) if s.view.members.len() >= members);
            last = Some(status);
            joined.then_some(())
        })
        .map_err(|_| anyhow::anyhow!("the storage nodes did not join the router in time: {last:?}"))
}

#[derive(Debug, Args)]
pub struct MonitorArgs {
    /// The cluster's router.
    #[arg(long, env = "SQUALL_ROUTER", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_ROUTER_PORT}"))]
    router: String,
    /// Schedulers to ask for the executors' status (repeat or separate with commas).
    #[arg(long = "scheduler", env = "SQUALL_SCHEDULERS", value_delimiter = ',')]
    schedulers: Vec<String>,
    /// Host the monitor's mailbox binds (schedulers answer there).
    #[arg(long, env = "SQUALL_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Who adds and removes nodes: `kubernetes` (scales the StatefulSet and Deployment of
    /// cluster/k8s), or `none` (only keys' replication changes).
    #[arg(long, env = "SQUALL_PROVISIONER", default_value = "kubernetes")]
    provisioner: String,
    /// The namespace of Squall's Kubernetes objects.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    #[arg(long, env = "SQUALL_NAMESPACE", default_value = "squall")]
    namespace: String,
    /// The storage nodes' StatefulSet.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    #[arg(long, default_value = "squall-kvs")]
    kvs_statefulset: String,
    /// The executors' Deployment.
    #[cfg_attr(not(feature = "kubernetes"), allow(dead_code))]
    #[arg(long, default_value = "squall-executor")]
    executor_deployment: String,
    #[command(flatten)]
    policy: PolicyArgs,
}

/// A provisioner that adds and removes nothing: the monitor only changes keys' replication.
struct NoProvisioner;

impl squall_cluster::Provisioner for NoProvisioner {
    fn add(&mut self, role: squall_cluster::Role, count: u32) -> Result<(), squall_cluster::Error> {
        Err(squall_cluster::Error::Provision(format!(
            "the policy asks for {count} more {}, but this monitor has no provisioner",
            role.as_str()
        )))
    }

    fn remove(
        &mut self,
        role: squall_cluster::Role,
        id: &str,
    ) -> Result<(), squall_cluster::Error> {
        Err(squall_cluster::Error::Provision(format!(
            "the policy asks to remove {} {id}, but this monitor has no provisioner",
            role.as_str()
        )))
    }
}

/// `squall monitor`: the policy engine for a cluster another system runs (Kubernetes).
pub fn monitor(args: MonitorArgs) -> anyhow::Result<()> {
    use squall_cluster::{Monitor, MonitorConfig};

    let stop = crate::signals::install()?;
    let config = MonitorConfig {
        router: args.router.clone(),
        schedulers: args.schedulers.clone(),
        host: args.host.clone(),
        policy: args.policy.config()?,
    };
    let monitor = match args.provisioner.as_str() {
        #[cfg(feature = "kubernetes")]
        "kubernetes" => {
            let provisioner =
                squall_cluster::KubeProvisioner::connect(squall_cluster::KubeConfig {
                    namespace: args.namespace.clone(),
                    storage: args.kvs_statefulset.clone(),
                    executors: args.executor_deployment.clone(),
                })?;
            Monitor::start(config, provisioner)?
        }
        #[cfg(not(feature = "kubernetes"))]
        "kubernetes" => anyhow::bail!(
            "this squall was built without Kubernetes support: build it with \
             `cargo build --release --features kubernetes` (the image build does)"
        ),
        "none" => Monitor::start(config, NoProvisioner)?,
        other => anyhow::bail!("unknown provisioner {other:?} (expected kubernetes or none)"),
    };
    println!(
        "{}",
        ready::format(&[("router", &args.router), ("provisioner", &args.provisioner)])
    );
    stop.until(|| monitor.is_running(), "the monitor stopped unexpectedly")?;
    Ok(())
}

#[derive(Debug, Args)]
pub struct ManifestArgs {
    /// The namespace of every object.
    #[arg(long, default_value = "squall")]
    namespace: String,
    /// The image every pod runs (built from cluster/k8s/Dockerfile).
    #[arg(long, default_value = "squall:latest")]
    image: String,
    /// Storage nodes (the StatefulSet's replicas, and the policy's minimum).
    #[arg(long = "kvs", default_value_t = 3)]
    nodes: u32,
    /// Executors (the Deployment's replicas, and the policy's minimum).
    #[arg(long, default_value_t = 2)]
    executors: u32,
    /// Replicas per key.
    #[arg(long, default_value_t = 2)]
    replication: u32,
    /// Each storage node's volume.
    #[arg(long, default_value = "10Gi")]
    volume: String,
}

/// The manifests of cluster/k8s, in the order `kustomization.yaml` lists them (with the
/// Secret, which only the rendered manifests carry, after the settings).
const MANIFESTS: [(&str, &str); 9] = [
    (
        "namespace.yaml",
        include_str!("../cluster/k8s/namespace.yaml"),
    ),
    ("config.yaml", include_str!("../cluster/k8s/config.yaml")),
    ("secret.yaml", include_str!("../cluster/k8s/secret.yaml")),
    ("router.yaml", include_str!("../cluster/k8s/router.yaml")),
    ("kvs.yaml", include_str!("../cluster/k8s/kvs.yaml")),
    (
        "scheduler.yaml",
        include_str!("../cluster/k8s/scheduler.yaml"),
    ),
    (
        "executor.yaml",
        include_str!("../cluster/k8s/executor.yaml"),
    ),
    ("gateway.yaml", include_str!("../cluster/k8s/gateway.yaml")),
    ("monitor.yaml", include_str!("../cluster/k8s/monitor.yaml")),
];

/// Replaces `from` in `text`, which must hold it: a manifest edited without updating the
/// renderer fails loudly rather than rendering the default.
fn swap(text: &str, file: &str, from: &str, to: &str) -> anyhow::Result<String> {
    anyhow::ensure!(text.contains(from), "{file} no longer contains {from:?}");
    Ok(text.replace(from, to))
}

/// cluster/k8s with `args` applied and `secret` as the cluster secret.
fn render(args: &ManifestArgs, secret: &str) -> anyhow::Result<String> {
    let label = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    anyhow::ensure!(
        label(&args.namespace),
        "--namespace must be a DNS label (lowercase letters, digits, '-'), not {:?}",
        args.namespace
    );
    anyhow::ensure!(
        !args.image.is_empty() && !args.image.contains(|c: char| c.is_whitespace() || c == '"'),
        "--image must be an image reference, not {:?}",
        args.image
    );
    anyhow::ensure!(
        args.nodes >= 1 && args.executors >= 1 && args.replication >= 1,
        "--kvs, --executors and --replication must be at least 1"
    );
    anyhow::ensure!(
        args.volume
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.'),
        "--volume must be a quantity such as 10Gi, not {:?}",
        args.volume
    );
    anyhow::ensure!(
        secret
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\'),
        "a cluster secret for the manifests must be printable ASCII without quotes, \
         backslashes or spaces"
    );
    // Which files, the default as it stands in them, and what replaces it.
    type Files = fn(&str) -> bool;
    let workloads: Files = |f| !matches!(f, "namespace.yaml" | "config.yaml" | "secret.yaml");
    let namespaced: Files = |f| f != "namespace.yaml";
    let ns = &args.namespace;
    let edits: [(Files, &str, String); 10] = [
        (
            |f| f == "secret.yaml",
            "secret: \"replace-me\"",
            format!("secret: \"{secret}\""),
        ),
        (
            workloads,
            "image: squall:latest",
            format!("image: {}", args.image),
        ),
        (
            namespaced,
            "namespace: squall\n",
            format!("namespace: {ns}\n"),
        ),
        (
            |f| f == "namespace.yaml",
            "  name: squall\n",
            format!("  name: {ns}\n"),
        ),
        (
            |f| f == "config.yaml",
            "SQUALL_REPLICATION: \"2\"",
            format!("SQUALL_REPLICATION: \"{}\"", args.replication),
        ),
        (
            |f| f == "kvs.yaml",
            "replicas: 3",
            format!("replicas: {}", args.nodes),
        ),
        (
            |f| f == "kvs.yaml",
            "storage: 10Gi",
            format!("storage: {}", args.volume),
        ),
        (
            |f| f == "executor.yaml",
            "replicas: 2",
            format!("replicas: {}", args.executors),
        ),
        (
            |f| f == "monitor.yaml",
            "- --min-nodes\n            - \"3\"",
            format!("- --min-nodes\n            - \"{}\"", args.nodes),
        ),
        (
            |f| f == "monitor.yaml",
            "- --min-executors\n            - \"2\"",
            format!("- --min-executors\n            - \"{}\"", args.executors),
        ),
    ];
    let mut out = String::new();
    for (file, text) in MANIFESTS {
        let mut text = text.to_string();
        for (applies, from, to) in &edits {
            if applies(file) {
                text = swap(&text, file, from, to)?;
            }
        }
        out.push_str(&format!("---\n# {file}\n"));
        out.push_str(&text);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ManifestArgs {
        ManifestArgs {
            namespace: "prod".into(),
            image: "registry.example/squall:1.2".into(),
            nodes: 5,
            executors: 4,
            replication: 3,
            volume: "50Gi".into(),
        }
    }

    #[test]
    fn manifests_render_with_every_setting_applied() {
        let out = render(&args(), "a-fresh-secret-of-30-bytes-now").expect("renders");
        assert!(out.contains("secret: \"a-fresh-secret-of-30-bytes-now\""));
        assert!(!out.contains("replace-me"));
        // Every workload presents it.
        assert_eq!(out.matches("name: SQUALL_CLUSTER_SECRET").count(), 6);
        assert!(!out.contains("namespace: squall\n"), "{out}");
        assert!(!out.contains("image: squall:latest"));
        assert!(out.contains("  name: prod\n"));
        assert!(out.contains("SQUALL_REPLICATION: \"3\""));
        assert!(out.contains("replicas: 5"));
        assert!(out.contains("replicas: 4"));
        assert!(out.contains("storage: 50Gi"));
        assert!(out.contains("- --min-nodes\n            - \"5\""));
        assert_eq!(out.matches("image: registry.example/squall:1.2").count(), 6);
        assert_eq!(out.matches("---\n# ").count(), MANIFESTS.len());
    }

    #[test]
    fn bad_settings_are_refused() {
        for bad in [
            ManifestArgs {
                namespace: "Prod".into(),
                ..args()
            },
            ManifestArgs {
                image: "a b".into(),
                ..args()
            },
            ManifestArgs { nodes: 0, ..args() },
            ManifestArgs {
                volume: "10Gi\nkind: Secret".into(),
                ..args()
            },
        ] {
            assert!(
                render(&bad, "a-fresh-secret-of-30-bytes-now").is_err(),
                "{bad:?}"
            );
        }
        for bad in ["with \"quotes\" in it", "a\nnew: line", "back\\slash"] {
            assert!(render(&args(), bad).is_err(), "{bad:?}");
        }
    }
}
