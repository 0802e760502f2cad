//! Consistency modes end to end: a three-step DAG of `observe` probes over shared keys
//! (`causal/a`, `causal/b`, `causal/c`), its steps on two executor processes (steps 1 and 3 on
//! one, step 2 on the other, each with its own cache), run over HTTP by one client in each
//! mode while a writer changes the keys at a steady rate. The writer runs the same DAG in
//! causal mode, each step writing one key, so each version depends on the one before. Every
//! step of a reader reads the three keys. A causal reader is one session and declares its
//! keys. For each mode: latency p50/p99 (medians over rounds; modes alternate within each
//! round) and the runs the anomaly checker (`squall_executor::testing`) flags: a key read in
//! two versions, a read outside a causal cut, or a read older than the session had seen.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use squall_bench::{closed_loop, median, up_with_executors, RunArgs};
use squall_executor::testing::{
    causal_cut_violations, guest, observations, repeatable_read_violations, SessionHistory,
};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Writes per second to the shared keys while the DAG runs (a causal writer run writes
    /// all three keys, so it runs a third as often).
    #[arg(long, default_value_t = 300)]
    writes_per_second: u64,
}

const KEYS: [&str; 3] = ["causal/a", "causal/b", "causal/c"];
const MODES: [&str; 3] = ["lww", "repeatable-read", "causal"];

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .build()
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (_processes, base) = up_with_executors(
        &args.run.squall,
        &[("e1", "observe,observe-3"), ("e2", "observe-2")],
    )?;
    let setup = agent();
    let code = guest("observe");
    for name in ["observe", "observe-2", "observe-3"] {
        setup
            .put(&format!("{base}/v1/functions/{name}"))
            .send_bytes(&code)
            .with_context(|| format!("registering {name}"))?;
    }
    setup
        .put(&format!("{base}/v1/dags/audit"))
        .send_string(
            r#"{"functions":["observe","observe-2","observe-3"],
                "edges":[["observe","observe-2"],["observe-2","observe-3"]]}"#,
        )
        .context("creating the DAG")?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base, stop) = (base.clone(), stop.clone());
        let period = Duration::from_secs_f64(3.0 / args.writes_per_second.max(1) as f64);
        std::thread::spawn(move || -> anyhow::Result<u64> {
            let agent = agent();
            let started = Instant::now();
            let mut runs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let writes: Vec<String> = KEYS
                    .iter()
                    .enumerate()
                    .map(|(step, key)| format!("{key}@{step}=w{runs}"))
                    .collect();
                agent
                    .post(&format!("{base}/v1/dags/audit/invoke"))
                    .set("squall-consistency", "causal")
                    .set("squall-keys", &KEYS.join(","))
                    .set("squall-session", "writer")
                    .send_bytes(format!("{} {}\n", KEYS.join(" "), writes.join(" ")).as_bytes())
                    .context("a causal writer run")?;
                runs += 1;
                let next = started + period.mul_f64(runs as f64);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            Ok(3 * runs)
        })
    };

    let url = format!("{base}/v1/dags/audit/invoke");
    let input = format!("{}\n", KEYS.join(" "));
    // Per mode: p50s and p99s of the rounds, runs, runs with an anomaly.
    let mut results: Vec<(Vec<f64>, Vec<f64>, u64, u64)> =
        vec![(vec![], vec![], 0, 0); MODES.len()];
    // The readers' sessions (one per mode: lww and repeatable read promise nothing across
    // runs, and the checker counts it).
    let histories: Vec<std::sync::Mutex<SessionHistory>> = MODES
        .iter()
        .map(|_| std::sync::Mutex::new(SessionHistory::default()))
        .collect();
    for round in 0..args.run.rounds {
        for ((mode, result), history) in MODES.iter().zip(results.iter_mut()).zip(&histories) {
            let (checked, anomalies) = (AtomicU64::new(0), AtomicU64::new(0));
            let load = closed_loop(
                1,
                Duration::from_millis(300),
                Duration::from_secs_f64(args.run.seconds),
                |_| Ok(agent()),
                |agent, _| {
                    let mut request = agent.post(&url).set("squall-consistency", mode);
                    if *mode == "causal" {
                        request = request
                            .set("squall-keys", &KEYS.join(","))
                            .set("squall-session", "reader");
                    }
                    let response = request.send_bytes(input.as_bytes())?;
                    let mut output = Vec::new();
                    response.into_reader().read_to_end(&mut output)?;
                    let reads = observations(&output);
                    if reads.len() != 3 * KEYS.len() {
                        bail!("unexpected output {:?}", String::from_utf8_lossy(&output));
                    }
                    checked.fetch_add(1, Ordering::Relaxed);
                    let went_back = history
                        .lock()
                        .map_err(|_| anyhow::anyhow!("a checker panicked"))?
                        .run(&reads);
                    if !repeatable_read_violations(&reads).is_empty()
                        || !causal_cut_violations(&reads).is_empty()
                        || !went_back.is_empty()
                    {
                        anomalies.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(())
                },
            )?;
            if load.errors > 0 {
                bail!("{} failed runs in mode {mode}", load.errors);
            }
            result.0.push(load.latency_us.value_at_quantile(0.5) as f64);
            result
                .1
                .push(load.latency_us.value_at_quantile(0.99) as f64);
            // Every run is checked, the warm-up's too.
            let (checked, anomalies) = (checked.into_inner(), anomalies.into_inner());
            result.2 += checked;
            result.3 += anomalies;
            eprintln!(
                "round {round} {mode}: p50 {} µs p99 {} µs, {checked} runs, {anomalies} with an anomaly",
                load.latency_us.value_at_quantile(0.5),
                load.latency_us.value_at_quantile(0.99),
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let written = writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;

    println!(
        "3-step DAG over 3 shared keys, steps on 2 executor processes, {} causal writes/s ({written} in all); medians of {} rounds, {} s each",
        args.writes_per_second, args.run.rounds, args.run.seconds
    );
    println!();
    println!("| mode | p50 (µs) | p99 (µs) | p50 vs lww | p99 vs lww | runs checked | runs with an anomaly |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let (lww_p50, lww_p99) = (median(&results[0].0), median(&results[0].1));
    for (mode, (p50s, p99s, runs, anomalies)) in MODES.iter().zip(&results) {
        println!(
            "| {mode} | {:.0} | {:.0} | {:.2}x | {:.2}x | {runs} | {anomalies} |",
            median(p50s),
            median(p99s),
            median(p50s) / lww_p50,
            median(p99s) / lww_p99,
        );
    }
    Ok(())
}
