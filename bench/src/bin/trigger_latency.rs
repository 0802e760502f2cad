//! From a writer's acknowledged write to its `kv-change` trigger's function starting, against
//! Redis keyspace notifications from an acknowledged `SET` to a subscribed client, both
//! durable the same way (every write synced before it is acknowledged: `squall up --fsync
//! always` on a data directory, Redis `appendonly yes` + `appendfsync always`); and sustained
//! trigger throughput with no write undelivered.
//!
//! Latency: one writer writes a fresh key every few milliseconds (so writes are measured one
//! at a time, not queued behind each other) and notes the wall-clock time its write was
//! acknowledged. For Squall, the trigger's function (`misbehave`) writes the time it started
//! to `started/KEY`; for Redis, a client subscribed to `__keyspace@0__:lat/*` notes the time
//! each notification arrives. Both clocks are this machine's. Rounds alternate the two systems;
//! each round's p50 and p99 are printed, then the medians across rounds with their spread.
//!
//! Throughput: 8 writers write `--burst` values to 100 keys as fast as the store takes them;
//! the figure is writes over the time from the first write to the last delivery (every
//! value checked delivered).

use std::path::PathBuf;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use squall_bench::redis::{self, Redis};
use squall_bench::{field, median, spawn, SQUALL_UP};
use squall_kvs::{Client, ClientConfig};
use squall_proto::poll::Poll;

#[derive(Debug, Parser)]
struct Args {
    /// The `squall` binary.
    #[arg(long, default_value = "target/release/squall")]
    squall: PathBuf,
    /// The `redis-server` binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,
    /// Rounds (each measures both systems).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Writes measured per system and round.
    #[arg(long, default_value_t = 200)]
    writes: usize,
    /// Pause between two measured writes, in milliseconds.
    #[arg(long, default_value_t = 5)]
    gap_ms: u64,
    /// Writes of the throughput run.
    #[arg(long, default_value_t = 20_000)]
    burst: usize,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

/// p50 and p99 of latencies in µs.
fn summary(mut latencies: Vec<f64>) -> (f64, f64) {
    latencies.sort_by(f64::total_cmp);
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

struct Squall {
    _up: squall_bench::Spawned,
    base: String,
    kvs: String,
    _data: tempfile::TempDir,
}

fn start_squall(args: &Args) -> anyhow::Result<Squall> {
    let data = tempfile::tempdir()?;
    let dir = data.path().to_str().context("a UTF-8 path")?.to_string();
    // `squall up` as every harness starts it, on a data directory that syncs every write.
    let durable = ["up", "--data-dir", &dir, "--fsync", "always"];
    let (up, fields) = spawn(&args.squall, &[&durable[..], &SQUALL_UP[2..]].concat())?;
    let base = field(&fields, "http")?;
    let kvs = field(&fields, "kvs")?;
    let agent = ureq::agent();
    agent
        .put(&format!("{base}/v1/functions/misbehave"))
        .send_bytes(&squall_executor::testing::guest("misbehave"))
        .context("registering misbehave")?;
    agent
        .put(&format!("{base}/v1/triggers/lat"))
        .send_string(r#"{"kind":"kv-change","prefix":"lat/","function":"misbehave"}"#)
        .context("creating the trigger")?;
    agent
        .put(&format!("{base}/v1/triggers/load"))
        .send_string(r#"{"kind":"kv-change","prefix":"load/","function":"misbehave"}"#)
        .context("creating the trigger")?;
    Ok(Squall {
        _up: up,
        base,
        kvs,
        _data: data,
    })
}

/// One Squall round: µs from each acknowledged write to its function's start.
fn squall_round(args: &Args, squall: &Squall, round: usize) -> anyhow::Result<Vec<f64>> {
    let mut client = Client::connect(&squall.kvs, ClientConfig::default())?;
    let mut acked = Vec::with_capacity(args.writes);
    for i in 0..args.writes {
        let key = format!("lat/{round}/{i}");
        client.put_lww(&key, "x")?;
        acked.push((key, now_us()));
        std::thread::sleep(Duration::from_millis(args.gap_ms));
    }
    let agent = ureq::agent();
    let mut latencies = Vec::with_capacity(acked.len());
    for (key, acked_us) in acked {
        let url = format!("{}/v1/kv/started/{key}", squall.base);
        let started: u64 = Poll::within(Duration::from_secs(60))
            .every(Duration::from_millis(20))
            .until(|| {
                agent
                    .get(&url)
                    .call()
                    .ok()?
                    .into_string()
                    .ok()?
                    .parse()
                    .ok()
            })
            .with_context(|| format!("{key} was never delivered"))?;
        latencies.push(started as f64 - acked_us as f64);
    }
    Ok(latencies)
}

/// One Redis round: µs from each acknowledged SET to its keyspace notification's arrival.
fn redis_round(args: &Args, port: u16, round: usize) -> anyhow::Result<Vec<f64>> {
    let mut subscriber = Redis::connect(port)?;
    subscriber.send(&[b"PSUBSCRIBE", b"__keyspace@0__:lat/*"])?;
    subscriber.read_message()?; // the subscription's confirmation
    let (arrivals, arrived) = mpsc::channel::<(String, u64)>();
    let writes = args.writes;
    let listener = std::thread::spawn(move || -> anyhow::Result<()> {
        for _ in 0..writes {
            let message = subscriber.read_message()?;
            let channel = message.get(2).cloned().unwrap_or_default();
            let key = channel.trim_start_matches("__keyspace@0__:").to_string();
            if arrivals.send((key, now_us())).is_err() {
                break;
            }
        }
        Ok(())
    });
    let mut writer = Redis::connect(port)?;
    let mut acked = std::collections::HashMap::new();
    for i in 0..args.writes {
        let key = format!("lat/{round}/{i}");
        writer.command(&[b"SET", key.as_bytes(), b"x"])?;
        acked.insert(key, now_us());
        std::thread::sleep(Duration::from_millis(args.gap_ms));
    }
    let mut latencies = Vec::with_capacity(args.writes);
    for _ in 0..args.writes {
        let (key, at) = arrived
            .recv_timeout(Duration::from_secs(30))
            .context("a notification never came")?;
        match acked.get(&key) {
            Some(acked_us) => latencies.push(at as f64 - *acked_us as f64),
            None => bail!("a notification for {key}, never written"),
        }
    }
    match listener.join() {
        Ok(result) => result?,
        Err(_) => bail!("the subscriber panicked"),
    }
    Ok(latencies)
}

/// Writes `burst` values to 100 keys with 8 writers; writes per second until every value was
/// delivered.
fn throughput(args: &Args, squall: &Squall) -> anyhow::Result<f64> {
    let started = Instant::now();
    let writers = 8;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..writers)
            .map(|w| {
                scope.spawn(move || -> anyhow::Result<()> {
                    let mut client = Client::connect(&squall.kvs, ClientConfig::default())?;
                    for i in (w..args.burst).step_by(writers) {
                        client.put_lww(&format!("load/{}", i % 100), i.to_string())?;
                    }
                    Ok(())
                })
            })
            .collect();
        for handle in handles {
            match handle.join() {
                Ok(result) => result?,
                Err(_) => bail!("a writer panicked"),
            }
        }
        Ok(())
    })?;
    let agent = ureq::agent();
    for key in 0..100 {
        let expected = (0..args.burst).filter(|i| i % 100 == key).count();
        let url = format!("{}/v1/kv/seen-values/load/{key}", squall.base);
        Poll::within(Duration::from_secs(600))
            .every(Duration::from_millis(50))
            .until(|| {
                let text = agent.get(&url).call().ok()?.into_string().ok()?;
                let values: Vec<String> = serde_json::from_str(&text).ok()?;
                (values.len() >= expected).then_some(())
            })
            .with_context(|| format!("load/{key}: writes undelivered"))?;
    }
    Ok(args.burst as f64 / started.elapsed().as_secs_f64())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    let squall = start_squall(&args)?;
    let (_redis, port) = redis::start(
        &args.redis_server,
        &work.path().join("redis"),
        "always",
        &["--notify-keyspace-events", "K$"],
    )?;
    // Warm both up (the function's first instances, the connections).
    squall_round(
        &Args {
            writes: 20,
            ..clone(&args)
        },
        &squall,
        1000,
    )?;
    redis_round(
        &Args {
            writes: 20,
            ..clone(&args)
        },
        port,
        1000,
    )?;
    let mut rows: Vec<[(f64, f64); 2]> = Vec::new();
    for round in 0..args.rounds {
        let squall_latency = summary(squall_round(&args, &squall, round)?);
        let redis_latency = summary(redis_round(&args, port, round)?);
        println!(
            "round {round}: squall p50 {:.0} µs p99 {:.0} µs | redis p50 {:.0} µs p99 {:.0} µs",
            squall_latency.0, squall_latency.1, redis_latency.0, redis_latency.1
        );
        rows.push([squall_latency, redis_latency]);
    }
    let spread = |values: Vec<f64>| {
        let low = values.iter().copied().fold(f64::INFINITY, f64::min);
        let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.0} ({low:.0}–{high:.0})", median(&values))
    };
    let column = |system: usize, p: usize| -> Vec<f64> {
        rows.iter()
            .map(|row| if p == 0 { row[system].0 } else { row[system].1 })
            .collect()
    };
    println!();
    println!("| write acknowledged -> delivered, µs | p50 | p99 |");
    println!("|---|---|---|");
    println!(
        "| Squall kv-change trigger -> function starts | {} | {} |",
        spread(column(0, 0)),
        spread(column(0, 1))
    );
    println!(
        "| Redis keyspace notification -> subscriber | {} | {} |",
        spread(column(1, 0)),
        spread(column(1, 1))
    );
    println!(
        "| ratio (medians) | {:.1}x | {:.1}x |",
        median(&column(0, 0)) / median(&column(1, 0)),
        median(&column(0, 1)) / median(&column(1, 1))
    );
    let rate = throughput(&args, &squall)?;
    println!();
    println!(
        "sustained: {} writes to 100 keys by 8 writers, every one delivered: {rate:.0} writes/s",
        args.burst
    );
    Ok(())
}

fn clone(args: &Args) -> Args {
    Args {
        squall: args.squall.clone(),
        redis_server: args.redis_server.clone(),
        ..*args
    }
}
