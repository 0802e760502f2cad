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
    /// Show the members, their keys and load, and the keys with extra replicas.
    Status {
        /// The cluster's router.
        #[arg(long, env = "SQUALL_ROUTER", default_value_t = format!("tcp://127.0.0.1:{DEFAULT_ROUTER_PORT}"))]
        router: String,
    },
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    match args.command {
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
