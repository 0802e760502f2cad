//! Squall's storage node against Redis, driven by the same closed-loop load generator at the
//! same concurrency, in the same run.
//!
//! Both servers run on loopback with the same durability: every write logged and synced
//! before it is acknowledged (Squall `--fsync always`, Redis `appendonly yes` +
//! `appendfsync always`; both group-commit), and, for PUT, also with a sync at most every
//! second (Squall `--fsync 1000ms`, Redis `appendfsync everysec`). Keys are 8 bytes, values
//! 256 bytes, spread uniformly over a preloaded key space. Every cell alternates the two
//! systems over several rounds; throughput is the median across rounds, latency percentiles
//! come from all rounds' samples, and "per server CPU-second" divides the operations by the CPU
//! time the server process used (a fair per-core figure when the load generator shares the
//! machine's cores).
//!
//! Run it with `bench/kvs-vs-redis.sh`, which builds it and installs Redis if needed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use squall_bench::redis::{self, Redis, Server};
use squall_bench::{closed_loop, median, process_cpu_time, LoadResult};
use squall_kvs::{Client, ClientConfig};

#[derive(Debug, Parser)]
#[command(about = "Squall's KVS against Redis, same load generator, same run")]
struct Args {
    /// The `squall` binary (default: next to this one).
    #[arg(long)]
    squall: Option<PathBuf>,
    /// The `redis-server` binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Measured seconds per cell and round.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Unmeasured warm-up seconds before each measurement.
    #[arg(long, default_value_t = 0.5)]
    warmup: f64,
    /// Rounds per cell (systems alternate within each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Concurrent clients, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 16, 64])]
    clients: Vec<usize>,
    /// Keys preloaded and accessed.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Squall shard threads (default: one per core).
    #[arg(long)]
    shards: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Get,
    Put,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Durability {
    /// Synced before every acknowledgement.
    Always,
    /// Synced at most every second.
    EverySecond,
}

impl Durability {
    fn label(self) -> &'static str {
        match self {
            Durability::Always => "fsync always",
            Durability::EverySecond => "fsync 1 s",
        }
    }
}

/// A server process under test.
fn start_squall(
    binary: &Path,
    data: &Path,
    durability: Durability,
    shards: Option<usize>,
) -> anyhow::Result<(Server, String)> {
    let mut command = Command::new(binary);
    command
        .args(["kvs", "--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(data)
        .args([
            "--fsync",
            match durability {
                Durability::Always => "always",
                Durability::EverySecond => "1000ms",
            },
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(shards) = shards {
        command.args(["--shards", &shards.to_string()]);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let server = Server { child };
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let addr = squall_proto::ready::parse(&line)
        .and_then(|fields| squall_proto::ready::field(&fields, "addr").map(str::to_string))
        .with_context(|| format!("squall kvs did not print READY: {line:?}"))?;
    Ok((server, addr))
}

fn key(i: usize) -> String {
    format!("k{i:07}")
}

/// A pseudo-random key index for iteration `i` (Fibonacci hashing: uniform, no shared state).
fn pick(i: u64, keys: usize) -> usize {
    ((i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % keys as u64) as usize
}

struct Cell {
    throughput: Vec<f64>,
    per_cpu_second: Vec<f64>,
    latency: Histogram<u64>,
    errors: u64,
}

impl Cell {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            throughput: Vec::new(),
            per_cpu_second: Vec::new(),
            latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            errors: 0,
        })
    }

    fn add(
        &mut self,
        result: LoadResult,
        server_cpu: Duration,
        wall: Duration,
    ) -> anyhow::Result<()> {
        let throughput = result.throughput();
        self.throughput.push(throughput);
        // Operations over the whole run (warm-up included) per CPU-second the server used.
        self.per_cpu_second
            .push(throughput * wall.as_secs_f64() / server_cpu.as_secs_f64().max(1e-9));
        self.errors += result.errors;
        self.latency.add(result.latency_us)?;
        Ok(())
    }
}

fn measure(
    args: &Args,
    op: Op,
    clients: usize,
    squall_addr: &str,
    squall_pid: u32,
    redis_port: u16,
    redis_pid: u32,
) -> anyhow::Result<(Cell, Cell)> {
    let (mut squall, mut redis) = (Cell::new()?, Cell::new()?);
    let warmup = Duration::from_secs_f64(args.warmup);
    let duration = Duration::from_secs_f64(args.duration);
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    let keys: Vec<String> = (0..args.keys).map(key).collect();
    for round in 0..args.rounds {
        for squall_turn in if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        } {
            let started = Instant::now();
            if squall_turn {
                let cpu_before = process_cpu_time(squall_pid)?;
                let result = closed_loop(
                    clients,
                    warmup,
                    duration,
                    |_| {
                        Ok(Client::connect(
                            squall_addr,
                            ClientConfig {
                                timeout: Duration::from_secs(5),
                                attempts: 1,
                                ..ClientConfig::default()
                            },
                        )?)
                    },
                    |client, i| {
                        let key = &keys[pick(i, keys.len())];
                        match op {
                            Op::Get => {
                                if client.get(key)?.is_none() {
                                    bail!("key not found");
                                }
                            }
                            Op::Put => client.put_lww(key, value.clone())?,
                        }
                        Ok(())
                    },
                )?;
                let cpu = process_cpu_time(squall_pid)? - cpu_before;
                squall.add(result, cpu, started.elapsed())?;
            } else {
                let cpu_before = process_cpu_time(redis_pid)?;
                let result = closed_loop(
                    clients,
                    warmup,
                    duration,
                    |_| Redis::connect(redis_port),
                    |redis, i| {
                        let key = keys[pick(i, keys.len())].as_bytes();
                        match op {
                            Op::Get => redis.command(&[b"GET", key]).map(drop),
                            Op::Put => redis.command(&[b"SET", key, &value]).map(drop),
                        }
                    },
                )?;
                let cpu = process_cpu_time(redis_pid)? - cpu_before;
                redis.add(result, cpu, started.elapsed())?;
            }
        }
    }
    Ok((squall, redis))
}

fn preload(args: &Args, squall_addr: &str, redis_port: u16) -> anyhow::Result<()> {
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    let mut client = Client::connect(squall_addr, ClientConfig::default())?;
    let keys: Vec<String> = (0..args.keys).map(key).collect();
    for chunk in keys.chunks(500) {
        let entries = chunk
            .iter()
            .map(|k| {
                let value = squall_lattices::LatticeValue::Lww(squall_lattices::Lww::new(
                    squall_lattices::Timestamp::new(1, 0),
                    value.clone(),
                ));
                (k.clone(), value)
            })
            .collect();
        for result in client.put_many(entries)? {
            result?;
        }
    }
    let mut redis = Redis::connect(redis_port)?;
    for key in &keys {
        redis.command(&[b"SET", key.as_bytes(), &value])?;
    }
    Ok(())
}

fn percentile(h: &Histogram<u64>, q: f64) -> u64 {
    h.value_at_quantile(q)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let squall_binary = match &args.squall {
        Some(path) => path.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("no parent directory")?
            .join("squall"),
    };
    let work = tempfile::tempdir()?;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    println!(
        "Squall KVS vs Redis: {} keys of 8 B, values of {} B, {} rounds x {} s per cell, {} cores, shards = {}",
        args.keys,
        args.value_bytes,
        args.rounds,
        args.duration,
        cores,
        args.shards.unwrap_or(cores)
    );
    println!();
    println!("| op | clients | durability | Squall ops/s | Redis ops/s | Squall/Redis | Squall p50 / p99 (us) | Redis p50 / p99 (us) | Squall ops per server CPU-s | Redis ops per server CPU-s |");
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for durability in [Durability::Always, Durability::EverySecond] {
        let tag = match durability {
            Durability::Always => "always",
            Durability::EverySecond => "everysec",
        };
        let (squall, squall_addr) = start_squall(
            &squall_binary,
            &work.path().join(format!("squall-{tag}")),
            durability,
            args.shards,
        )?;
        let appendfsync = match durability {
            Durability::Always => "always",
            Durability::EverySecond => "everysec",
        };
        let (redis, redis_port) = redis::start(
            &args.redis_server,
            &work.path().join(format!("redis-{tag}")),
            appendfsync,
            &[],
        )?;
        preload(&args, &squall_addr, redis_port)?;
        let ops: &[Op] = match durability {
            Durability::Always => &[Op::Get, Op::Put],
            Durability::EverySecond => &[Op::Put],
        };
        for &op in ops {
            for &clients in &args.clients {
                let (s, r) = measure(
                    &args,
                    op,
                    clients,
                    &squall_addr,
                    squall.pid(),
                    redis_port,
                    redis.pid(),
                )?;
                let (st, rt) = (median(&s.throughput), median(&r.throughput));
                println!(
                    "| {} | {} | {} | {:.0} | {:.0} | {:.2}x | {} / {} | {} / {} | {:.0} | {:.0} |{}",
                    if op == Op::Get { "GET" } else { "PUT" },
                    clients,
                    if op == Op::Get { "n/a (read)" } else { durability.label() },
                    st,
                    rt,
                    st / rt.max(1e-9),
                    percentile(&s.latency, 0.5),
                    percentile(&s.latency, 0.99),
                    percentile(&r.latency, 0.5),
                    percentile(&r.latency, 0.99),
                    median(&s.per_cpu_second),
                    median(&r.per_cpu_second),
                    if s.errors + r.errors > 0 {
                        format!(" errors: squall {} redis {}", s.errors, r.errors)
                    } else {
                        String::new()
                    }
                );
            }
        }
        drop(squall);
        drop(redis);
    }
    Ok(())
}
