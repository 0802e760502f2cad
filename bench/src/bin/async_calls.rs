//! Asynchronous calls of `incr` over HTTP through `squall up`: how long a 202 takes (one
//! client, p50/p99), how many calls are accepted per second, and how many complete per second
//! (several clients submit for the measured time, then every result is read until all are
//! there: completed calls over the time from the first submission to the last result);
//! against, in the same run and the same process, synchronous calls of the same function
//! (one client's p50, several clients' calls per second) as the anchor.
//!
//! `--baseline OTHER_SQUALL` measures a second binary (an earlier commit's) the same way,
//! alternating with the first round by round.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use squall_bench::{closed_loop, field, median, spawn, LoadResult, RunArgs, Spawned, SQUALL_UP};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Clients of the throughput runs.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Another `squall` binary to measure the same way (an earlier commit's).
    #[arg(long)]
    baseline: Option<PathBuf>,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .max_idle_connections_per_host(4)
        .build()
}

fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    body: &[u8],
) -> anyhow::Result<(u16, Vec<u8>)> {
    let response = match agent.request(method, url).send_bytes(body) {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => return Err(e.into()),
    };
    let status = response.status();
    let mut out = Vec::new();
    response.into_reader().read_to_end(&mut out)?;
    Ok((status, out))
}

/// The id in a 202's body.
fn id_of(body: &[u8]) -> anyhow::Result<String> {
    let json: serde_json::Value = serde_json::from_slice(body)?;
    json["id"]
        .as_str()
        .map(str::to_string)
        .context("no id in the 202")
}

/// One binary under test, running.
struct Setup {
    name: String,
    base: String,
    _up: Spawned,
}

fn start(name: String, squall: &Path) -> anyhow::Result<Setup> {
    let (up, fields) = spawn(squall, &SQUALL_UP)?;
    let base = field(&fields, "http")?;
    agent()
        .put(&format!("{base}/v1/functions/incr"))
        .send_bytes(&squall_executor::testing::guest("incr"))
        .context("registering incr")?;
    Ok(Setup {
        name,
        base,
        _up: up,
    })
}

fn sync_run(setup: &Setup, clients: usize, seconds: f64) -> anyhow::Result<LoadResult> {
    let url = format!("{}/v1/functions/incr/invoke", setup.base);
    closed_loop(
        clients,
        Duration::from_millis(300),
        Duration::from_secs_f64(seconds),
        |_| Ok(agent()),
        |agent, _| match call(agent, "POST", &url, b"41")? {
            (200, out) if out == b"42" => Ok(()),
            (status, out) => bail!("{status}: {}", String::from_utf8_lossy(&out)),
        },
    )
}

/// Reads every result until each is there; fails on a failed call.
fn drain(setup: &Setup, ids: &[String]) -> anyhow::Result<()> {
    let agent = agent();
    for id in ids {
        let url = format!("{}/v1/results/{id}", setup.base);
        let started = Instant::now();
        loop {
            match call(&agent, "GET", &url, b"")? {
                (200, out) if out == b"42" => break,
                (202, _) if started.elapsed() < Duration::from_secs(120) => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                (status, out) => bail!("call {id}: {status}: {}", String::from_utf8_lossy(&out)),
            }
        }
    }
    Ok(())
}

/// One client's 202 latency (its calls drained before returning).
fn accept_latency(setup: &Setup, seconds: f64) -> anyhow::Result<LoadResult> {
    let url = format!("{}/v1/functions/incr/invoke?async=true", setup.base);
    let ids = Mutex::new(Vec::new());
    let result = closed_loop(
        1,
        Duration::from_millis(300),
        Duration::from_secs_f64(seconds),
        |_| Ok(agent()),
        |agent, _| match call(agent, "POST", &url, b"41")? {
            (202, body) => {
                let id = id_of(&body)?;
                ids.lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(id);
                Ok(())
            }
            (status, out) => bail!("{status}: {}", String::from_utf8_lossy(&out)),
        },
    )?;
    let ids = ids.into_inner().map_err(|_| anyhow::anyhow!("poisoned"))?;
    drain(setup, &ids)?;
    Ok(result)
}

/// `clients` submit for `seconds`; then every result is read. Accepted per second, and
/// completed per second (all calls over the time from the first submission to the last
/// result).
fn completion(setup: &Setup, clients: usize, seconds: f64) -> anyhow::Result<(f64, f64)> {
    let url = format!("{}/v1/functions/incr/invoke?async=true", setup.base);
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let ids: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let url = &url;
                scope.spawn(move || -> anyhow::Result<Vec<String>> {
                    let agent = agent();
                    let mut ids = Vec::new();
                    while Instant::now() < until {
                        match call(&agent, "POST", url, b"41")? {
                            (202, body) => ids.push(id_of(&body)?),
                            (status, out) => {
                                bail!("{status}: {}", String::from_utf8_lossy(&out))
                            }
                        }
                    }
                    Ok(ids)
                })
            })
            .collect();
        let mut all = Vec::new();
        for worker in workers {
            all.extend(
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a client panicked"))??,
            );
        }
        Ok::<_, anyhow::Error>(all)
    })?;
    let submitted = started.elapsed();
    drain(setup, &ids)?;
    let done = started.elapsed();
    Ok((
        ids.len() as f64 / submitted.as_secs_f64(),
        ids.len() as f64 / done.as_secs_f64(),
    ))
}

#[derive(Default)]
struct Figures {
    sync_p50: Vec<f64>,
    sync_ops: Vec<f64>,
    accept_p50: Vec<f64>,
    accept_p99: Vec<f64>,
    accepted: Vec<f64>,
    completed: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut setups = vec![start(
        format!("{}", args.run.squall.display()),
        &args.run.squall,
    )?];
    if let Some(baseline) = &args.baseline {
        setups.push(start(format!("{}", baseline.display()), baseline)?);
    }
    let mut figures: Vec<Figures> = setups.iter().map(|_| Figures::default()).collect();
    for round in 0..args.run.rounds {
        for (setup, figures) in setups.iter().zip(&mut figures) {
            let sync_one = sync_run(setup, 1, args.run.seconds)?;
            let sync_many = sync_run(setup, args.clients, args.run.seconds)?;
            let accept = accept_latency(setup, args.run.seconds)?;
            let (accepted, completed) = completion(setup, args.clients, args.run.seconds)?;
            if sync_one.errors + sync_many.errors + accept.errors > 0 {
                bail!("{}: failed requests", setup.name);
            }
            figures
                .sync_p50
                .push(sync_one.latency_us.value_at_quantile(0.5) as f64);
            figures.sync_ops.push(sync_many.throughput());
            figures
                .accept_p50
                .push(accept.latency_us.value_at_quantile(0.5) as f64);
            figures
                .accept_p99
                .push(accept.latency_us.value_at_quantile(0.99) as f64);
            figures.accepted.push(accepted);
            figures.completed.push(completed);
            eprintln!(
                "round {round} {}: sync p50 {} µs, {:.0} calls/s; 202 p50 {} µs, p99 {} µs; {accepted:.0} accepted/s, {completed:.0} completed/s",
                setup.name,
                sync_one.latency_us.value_at_quantile(0.5),
                sync_many.throughput(),
                accept.latency_us.value_at_quantile(0.5),
                accept.latency_us.value_at_quantile(0.99),
            );
        }
    }
    println!(
        "incr over HTTP through squall up (in memory): synchronous calls (the anchor) against asynchronous ones; medians of {} rounds, {} s each, {} clients for rates",
        args.run.rounds, args.run.seconds, args.clients
    );
    println!();
    println!("| binary | sync p50 (µs) | sync calls/s | 202 p50 (µs) | 202 p99 (µs) | accepted/s | completed/s | completed vs sync |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (setup, f) in setups.iter().zip(&figures) {
        let spread = |v: &[f64]| {
            let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            format!("{:.0} ({lo:.0}–{hi:.0})", median(v))
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2}x |",
            setup.name,
            spread(&f.sync_p50),
            spread(&f.sync_ops),
            spread(&f.accept_p50),
            spread(&f.accept_p99),
            spread(&f.accepted),
            spread(&f.completed),
            median(&f.completed) / median(&f.sync_ops),
        );
    }
    Ok(())
}
