//! The KVS as a cluster: throughput of the same closed-loop load generator against 1, 2 and 3
//! storage nodes (replication 2, majority writes), anchored on a lone node in the same run;
//! and how long the policy engine takes to react to a load burst.
//!
//! Every server is a separate process on this machine, so the nodes share its cores with each
//! other and with the load generator: on a 2-core machine this is a curve of what replication
//! and routing cost, not of scale-out. The table says so, and gives the server CPU time per
//! operation summed over every node ("per-node cost": what one more node must bring).
//!
//! Part two starts `squall cluster up` with a 1 s policy period, then (a) reads one key in a
//! loop among reads of 200 others, and times until the router's view gives it more replicas;
//! (b) sends a burst of calls to a function that sleeps, and times until the executor pool
//! grows. Medians over rounds, each round a fresh cluster.
//!
//! Run it with `bench/kvs-cluster.sh`, which builds the release binaries once.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use hdrhistogram::Histogram;
use squall_bench::{closed_loop, field, median, process_cpu_time, spawn, Spawned};
use squall_kvs::{Client, ClientConfig};
use squall_proto::poll::Poll;

#[derive(Debug, Parser)]
#[command(about = "Squall's KVS on 1, 2 and 3 nodes, and the policy engine's reaction time")]
struct Args {
    /// The `squall` binary (built with `--release`).
    #[arg(long, default_value = "target/release/squall")]
    squall: std::path::PathBuf,
    /// Rounds (setups alternate within each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds measured per setup and round.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Concurrent clients of the load generator.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Keys preloaded and accessed.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
    /// Rounds of the policy reaction measurements.
    #[arg(long, default_value_t = 3)]
    reaction_rounds: usize,
}

/// One store under load: its address for clients and its server processes.
struct Setup {
    label: String,
    nodes: usize,
    address: String,
    servers: Vec<Spawned>,
}

impl Setup {
    fn cpu(&self) -> anyhow::Result<Duration> {
        self.servers
            .iter()
            .map(|s| process_cpu_time(s.0.id()))
            .sum::<anyhow::Result<Duration>>()
    }
}

fn lone_node(squall: &Path) -> anyhow::Result<Setup> {
    let (node, fields) = spawn(squall, &["kvs", "--port", "0", "--shards", "1"])?;
    Ok(Setup {
        label: "lone node (anchor)".into(),
        nodes: 1,
        address: field(&fields, "addr")?,
        servers: vec![node],
    })
}

fn cluster(squall: &Path, nodes: usize) -> anyhow::Result<Setup> {
    let (router, fields) = spawn(
        squall,
        &[
            "router",
            "--port",
            "0",
            "--replication",
            "2",
            "--dead-after-ms",
            "2000",
        ],
    )?;
    let address = field(&fields, "addr")?;
    let mut servers = vec![router];
    for _ in 0..nodes {
        let (node, _) = spawn(
            squall,
            &["kvs", "--port", "0", "--shards", "1", "--join", &address],
        )?;
        servers.push(node);
    }
    // Settled: every node handed off under the last view.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(status) = squall_kvs::router::status(&address) {
            if status.view.members.len() == nodes && status.view.settled {
                break;
            }
        }
        if Instant::now() > until {
            bail!("the {nodes}-node cluster did not settle");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Setup {
        label: format!("cluster of {nodes}"),
        nodes,
        address,
        servers,
    })
}

fn key(i: u64, keys: usize) -> String {
    format!("k{:07}", i % keys as u64)
}

struct Cell {
    throughput: Vec<f64>,
    cpu_us_per_op: Vec<f64>,
    latency: Histogram<u64>,
    errors: u64,
}

fn measure(args: &Args, setup: &Setup, write: bool, cell: &mut Cell) -> anyhow::Result<()> {
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    let keys = args.keys;
    let cpu_before = setup.cpu()?;
    let result = closed_loop(
        args.clients,
        Duration::from_millis(300),
        Duration::from_secs_f64(args.seconds),
        |_| Client::connect(&setup.address, ClientConfig::default()).context("connect"),
        |client, i| {
            let key = key(i.wrapping_mul(2_654_435_761), keys);
            if write {
                client.put_lww(&key, value.clone())?;
            } else {
                client.get(&key)?;
            }
            Ok(())
        },
    )?;
    let cpu = setup.cpu()?.saturating_sub(cpu_before);
    cell.throughput.push(result.throughput());
    // The CPU time covers the warm-up too: count its operations at the measured rate.
    let ops = result.throughput() * (args.seconds + 0.3);
    cell.cpu_us_per_op
        .push(cpu.as_secs_f64() * 1e6 / ops.max(1.0));
    cell.latency.add(&result.latency_us)?;
    cell.errors += result.errors;
    Ok(())
}

fn scaling(args: &Args) -> anyhow::Result<()> {
    let mut setups = vec![lone_node(&args.squall)?];
    for nodes in 1..=3 {
        setups.push(cluster(&args.squall, nodes)?);
    }
    let value = Bytes::from(vec![b'v'; args.value_bytes]);
    for setup in &setups {
        let mut client = Client::connect(&setup.address, ClientConfig::default())?;
        let all: Vec<(String, squall_lattices::LatticeValue)> = (0..args.keys as u64)
            .map(|i| {
                (
                    key(i, args.keys),
                    squall_lattices::LatticeValue::Lww(squall_lattices::Lww::new(
                        squall_lattices::Timestamp::now(client.writer()),
                        value.clone(),
                    )),
                )
            })
            .collect();
        for chunk in all.chunks(500) {
            for result in client.put_many(chunk.to_vec())? {
                result?;
            }
        }
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "KVS scaling: {} clients, {} keys, values of {} B, {} rounds x {} s, {cores} cores shared by every node and the load generator",
        args.clients, args.keys, args.value_bytes, args.rounds, args.seconds
    );
    println!();
    println!("| op | setup | nodes | ops/s (median) | vs lone node | p50 / p99 (us) | server CPU per op (us, all nodes) | errors |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for write in [false, true] {
        let mut cells: Vec<Cell> = setups
            .iter()
            .map(|_| -> anyhow::Result<Cell> {
                Ok(Cell {
                    throughput: Vec::new(),
                    cpu_us_per_op: Vec::new(),
                    latency: Histogram::new_with_bounds(1, 60_000_000, 3)?,
                    errors: 0,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        for _ in 0..args.rounds {
            for (setup, cell) in setups.iter().zip(&mut cells) {
                measure(args, setup, write, cell)?;
            }
        }
        let anchor = median(&cells[0].throughput);
        for (setup, cell) in setups.iter().zip(&cells) {
            let throughput = median(&cell.throughput);
            println!(
                "| {} | {} | {} | {:.0} | {:.2}x | {} / {} | {:.1} | {} |",
                if write { "PUT" } else { "GET" },
                setup.label,
                setup.nodes,
                throughput,
                throughput / anchor.max(1e-9),
                cell.latency.value_at_quantile(0.5),
                cell.latency.value_at_quantile(0.99),
                median(&cell.cpu_us_per_op),
                cell.errors
            );
        }
    }
    Ok(())
}

/// `squall cluster up` with a 1 s policy period; its gateway and router.
fn cluster_up(squall: &Path, dir: &Path) -> anyhow::Result<(Spawned, String, String)> {
    let dir = dir.display().to_string();
    let (up, fields) = spawn(
        squall,
        &[
            "cluster",
            "up",
            "--in-memory",
            "--dir",
            &dir,
            "--http-port",
            "0",
            "--kvs",
            "3",
            "--executors",
            "1",
            "--executor-capacity",
            "2",
            "--max-executors",
            "3",
            "--period-ms",
            "1000",
            "--stats-ms",
            "500",
            "--hot-min-accesses",
            "20",
        ],
    )?;
    Ok((up, field(&fields, "http")?, field(&fields, "router")?))
}

/// How long `done` took to hold (looked at every 20 ms), if it did within `limit`.
fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> Option<Duration> {
    let started = Instant::now();
    Poll::within(limit)
        .until(|| done().then(|| started.elapsed()))
        .ok()
}

fn reaction(args: &Args) -> anyhow::Result<()> {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let wasm = squall_executor::testing::guest("misbehave");
    let (mut hot_key, mut executors) = (Vec::new(), Vec::new());
    for _ in 0..args.reaction_rounds {
        let dir = tempfile::tempdir()?;
        let (up, base, router) = cluster_up(&args.squall, dir.path())?;
        // (a) A hot key.
        let mut client = Client::connect(&router, ClientConfig::default())?;
        let others: Vec<String> = (0..200).map(|i| format!("cold-{i}")).collect();
        for key in others.iter().chain([&"hot".to_string()]) {
            client.put_lww(key, "v")?;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let reader = {
            let (stop, router, others) = (stop.clone(), router.clone(), others.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut client = Client::connect(&router, ClientConfig::default())?;
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    client.get("hot")?;
                    client.get(&others[i % others.len()])?;
                    i += 1;
                }
                Ok(())
            })
        };
        let took = wait_until(Duration::from_secs(30), || {
            squall_kvs::router::status(&router)
                .is_ok_and(|s| s.view.overrides.iter().any(|(k, _)| k == "hot"))
        });
        stop.store(true, Ordering::Relaxed);
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
        hot_key.push(
            took.context("the hot key never got more replicas")?
                .as_secs_f64(),
        );
        // (b) A burst of slow calls.
        let registered = agent
            .put(&format!("{base}/v1/functions/misbehave"))
            .send_bytes(&wasm)?;
        if registered.status() != 201 {
            bail!("registering misbehave: {}", registered.status());
        }
        let stop = Arc::new(AtomicBool::new(false));
        let burst: Vec<_> = (0..12)
            .map(|_| {
                let (stop, agent, base) = (stop.clone(), agent.clone(), base.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = agent
                            .post(&format!("{base}/v1/functions/misbehave/invoke"))
                            .send_bytes(b"sleep:500");
                    }
                })
            })
            .collect();
        let pool = || -> usize {
            agent
                .get(&format!("{base}/v1/executors"))
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .map_or(0, |text| text.matches("\"draining\":false").count())
        };
        let took = wait_until(Duration::from_secs(30), || pool() > 1);
        stop.store(true, Ordering::Relaxed);
        for thread in burst {
            let _ = thread.join();
        }
        executors.push(took.context("the executor pool never grew")?.as_secs_f64());
        drop(up);
    }
    println!();
    println!(
        "Policy reaction ({} rounds, a fresh `squall cluster up` each; policy period 1 s, load reports every 0.5 s):",
        args.reaction_rounds
    );
    println!();
    println!("| from | to | median (s) | all rounds (s) |");
    println!("|---|---|---:|---|");
    let show = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| reads of one key begin | the key has more replicas | {:.2} | {} |",
        median(&hot_key),
        show(&hot_key)
    );
    println!(
        "| a burst of calls begins (12 clients, 0.5 s calls, 2 slots) | a second executor joins | {:.2} | {} |",
        median(&executors),
        show(&executors)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    scaling(&args)?;
    reaction(&args)
}
