//! `squall`: the command-line entry point of Squall.
//!
//! - `squall kvs`: run a storage node (prints `READY addr=...` once it accepts requests).
//! - `squall kv get|put`: read and write keys of a running node.
//!
//! Every flag can also be set through a `SQUALL_*` environment variable.

mod kv;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use squall_kvs::{Config, FsyncPolicy, Node};

/// Squall: a stateful Function-as-a-Service runtime over a lattice key-value store.
#[derive(Debug, Parser)]
#[command(name = "squall", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a storage node until SIGINT or SIGTERM.
    Kvs(KvsArgs),
    /// Read or write keys of a running storage node.
    Kv(kv::KvArgs),
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
}

fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
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
        ..defaults
    };
    let (stop_tx, stop_rx) = std::sync::mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the SIGINT/SIGTERM handler")?;
    let node = Node::start(config).context("starting the storage node")?;
    println!(
        "READY addr={} shards={} keys={}",
        node.address(),
        node.topology().shards.len(),
        node.recovered_keys()
    );
    loop {
        match stop_rx.recv_timeout(Duration::from_millis(500)) {
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                if !node.is_running() {
                    anyhow::bail!("a shard thread stopped unexpectedly");
                }
            }
        }
    }
    tracing::info!("shutting down");
    node.shutdown();
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Kvs(args) => {
            init_tracing("info");
            run_kvs(args).map(|()| ExitCode::SUCCESS)
        }
        Command::Kv(args) => {
            init_tracing("warn");
            kv::run(args)
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
