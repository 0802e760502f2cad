//! Squall's benchmark support: closed-loop load generation, latency histograms, process CPU
//! accounting, and tables that put each figure next to an anchor measured in the same run.
//!
//! Machines are shared and noisy, so every harness alternates the system under test and its
//! anchor over several rounds and reports medians across rounds and ratios between them, never
//! a lone number.
//!
//! # Dependencies
//! `hdrhistogram` records latencies (microsecond resolution, constant memory, mergeable across
//! threads and rounds); `criterion` drives the micro-benchmarks in `benches/`.

pub mod redis;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use squall_proto::poll::Poll;

/// The outcome of one closed-loop run: every client issues its next operation as soon as the
/// previous one is answered.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Operations completed in the measured window.
    pub ops: u64,
    /// Failed operations in the measured window.
    pub errors: u64,
    /// The measured window.
    pub elapsed: Duration,
    /// Latency of every successful operation, in microseconds.
    pub latency_us: Histogram<u64>,
}

impl LoadResult {
    /// Operations per second.
    pub fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `clients` threads, each with a connection made by `connect(client_index)` and an
/// operation run by `op(connection, iteration)`, for `warmup` (not measured) then `duration`.
pub fn closed_loop<C, Connect, Op>(
    clients: usize,
    warmup: Duration,
    duration: Duration,
    connect: Connect,
    op: Op,
) -> anyhow::Result<LoadResult>
where
    Connect: Fn(usize) -> anyhow::Result<C> + Sync,
    Op: Fn(&mut C, u64) -> anyhow::Result<()> + Sync,
{
    let measuring = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let ready = Barrier::new(clients + 1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|index| {
                let (connect, op, measuring, stop, ready) =
                    (&connect, &op, &measuring, &stop, &ready);
                scope.spawn(move || -> anyhow::Result<(u64, u64, Histogram<u64>)> {
                    let connection = connect(index);
                    ready.wait();
                    let mut connection = connection?;
                    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
                    let (mut ops, mut errors) = (0u64, 0u64);
                    let mut iteration = (index as u64) << 40;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let outcome = op(&mut connection, iteration);
                        iteration += 1;
                        if measuring.load(Ordering::Relaxed) {
                            match outcome {
                                Ok(()) => {
                                    ops += 1;
                                    histogram
                                        .saturating_record(started.elapsed().as_micros() as u64);
                                }
                                Err(_) => errors += 1,
                            }
                        }
                    }
                    Ok((ops, errors, histogram))
                })
            })
            .collect();
        ready.wait();
        std::thread::sleep(warmup);
        measuring.store(true, Ordering::Relaxed);
        let started = Instant::now();
        std::thread::sleep(duration);
        measuring.store(false, Ordering::Relaxed);
        let elapsed = started.elapsed();
        stop.store(true, Ordering::Relaxed);
        let mut result = LoadResult {
            ops: 0,
            errors: 0,
            elapsed,
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
        };
        for worker in workers {
            let (ops, errors, histogram) = worker
                .join()
                .map_err(|_| anyhow::anyhow!("a load thread panicked"))??;
            result.ops += ops;
            result.errors += errors;
            result.latency_us.add(histogram)?;
        }
        Ok(result)
    })
}

/// What every end-to-end harness takes: the `squall` binary, and how long it measures.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The `squall` binary (built with `--release`).
    #[arg(long, default_value = "target/release/squall")]
    pub squall: std::path::PathBuf,
    /// Rounds; each measures every setup once.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Seconds measured per setup per round.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
}

/// `squall up` on OS-assigned ports, in memory: the arguments every harness starts it with.
pub const SQUALL_UP: [&str; 8] = [
    "up",
    "--in-memory",
    "--http-port",
    "0",
    "--kvs-port",
    "0",
    "--scheduler-port",
    "0",
];

/// `squall up` without executors of its own, plus one `squall executor` process per
/// `(id, serves)`: the processes (killed on drop) and the gateway's base URL, once every
/// executor has joined.
pub fn up_with_executors(
    squall: &Path,
    executors: &[(&str, &str)],
) -> anyhow::Result<(Vec<Spawned>, String)> {
    let (up, fields) = spawn(squall, &[&SQUALL_UP[..], &["--executors", "0"]].concat())?;
    let base = field(&fields, "http")?;
    let (kvs, scheduler) = (field(&fields, "kvs")?, field(&fields, "scheduler")?);
    let mut processes = vec![up];
    for (id, serves) in executors {
        let (executor, _) = spawn(
            squall,
            &[
                "executor",
                "--kvs",
                &kvs,
                "--scheduler",
                &scheduler,
                "--id",
                id,
                "--serves",
                serves,
            ],
        )?;
        processes.push(executor);
    }
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let joined = || -> anyhow::Result<bool> {
        let listed = agent
            .get(&format!("{base}/v1/executors"))
            .call()?
            .into_string()?;
        Ok(listed.matches("\"id\"").count() >= executors.len())
    };
    Poll::within(Duration::from_secs(30))
        .every(Duration::from_millis(10))
        .until(|| match joined() {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e)),
        })
        .map_err(|_| anyhow::anyhow!("the executors did not join"))??;
    Ok((processes, base))
}

/// A spawned process, killed on drop.
#[derive(Debug)]
pub struct Spawned(pub Child);

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `program args` and returns it with the `key=value` fields of the `READY` line it
/// prints once it serves (as every Squall role does).
pub fn spawn(program: &Path, args: &[&str]) -> anyhow::Result<(Spawned, Vec<(String, String)>)> {
    let mut child = Command::new(program)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let child = Spawned(child);
    let mut lines = BufReader::new(stdout).lines();
    loop {
        let Some(line) = lines.next() else {
            bail!("{} {args:?} exited before READY", program.display());
        };
        if let Some(fields) = squall_proto::ready::parse(&line?) {
            // Keep draining stdout so the process never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return Ok((child, fields));
        }
    }
}

/// The value of `key` among a READY line's fields.
pub fn field(fields: &[(String, String)], key: &str) -> anyhow::Result<String> {
    squall_proto::ready::field(fields, key)
        .map(str::to_string)
        .with_context(|| format!("READY line without {key}"))
}

/// The median of `values` (the mean of the middle two for an even count); 0 when empty.
///
/// ```
/// assert_eq!(squall_bench::median(&[9.0, 1.0, 5.0]), 5.0);
/// ```
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow::anyhow!("unexpected /proc stat format"))?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow::anyhow!("short /proc stat"))?
            .parse()?)
    };
    // `after_name` starts at field 3 (state), so field 14 is index 11.
    let total = ticks(11)? + ticks(12)?;
    let hz = clock_ticks_per_second();
    Ok(Duration::from_secs_f64(total as f64 / hz))
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn closed_loop_counts_operations_and_errors() {
        let result = closed_loop(
            2,
            Duration::from_millis(10),
            Duration::from_millis(50),
            |_| Ok(()),
            |_, i| {
                if i % 2 == 0 {
                    Ok(())
                } else {
                    anyhow::bail!("odd")
                }
            },
        )
        .expect("run");
        assert!(result.ops > 0 && result.errors > 0);
        assert_eq!(result.latency_us.len(), result.ops);
    }

    #[test]
    fn reads_this_process_cpu_time() {
        let spent = process_cpu_time(std::process::id()).expect("cpu time");
        assert!(spent < Duration::from_secs(3600));
    }
}
