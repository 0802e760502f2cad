//! The SqueezeNet pipeline over HTTP: the `classify` DAG (preprocess -> squeezenet -> top5) on
//! `squall up`, fed the sample photo `chelsea.png`: latency at concurrency 1 (p50/p99) and
//! throughput at concurrency 1, 2 and 8; against, in the same run and the same process as the
//! load generator, native tract inference of the same photo's preprocessed tensor (the code
//! the executor's `wasi:nn` host runs, called directly), and, if `--python` names an
//! interpreter with onnxruntime, onnxruntime on that tensor with one thread
//! (`bench/ort_squeezenet.py`). For the breakdown it also times the pipeline's two heavy steps
//! alone: `preprocess` (decode, resize, crop in WebAssembly) and `squeezenet` (the tensor in,
//! inference through `wasi:nn`). Setups alternate over rounds; the tables report medians over
//! rounds and ratios.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use squall_bench::{closed_loop, field, median, spawn, LoadResult, RunArgs, SQUALL_UP};
use squall_executor::nn::{ElementType, Model, Tensor};
use squall_executor::testing::{guest, npy_f32, squeezenet_dir};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// A Python interpreter that can import onnxruntime and numpy (the second anchor).
    #[arg(long)]
    python: Option<PathBuf>,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .max_idle_connections_per_host(16)
        .build()
}

/// Starts `squall up` and registers the model, the functions and the `classify` DAG.
fn start(squall: &Path) -> anyhow::Result<(squall_bench::Spawned, String)> {
    let (up, fields) = spawn(squall, &SQUALL_UP)?;
    let base = field(&fields, "http")?;
    let agent = agent();
    let model = std::fs::read(squeezenet_dir().join("squeezenet1.1-fp32.onnx"))?;
    agent
        .put(&format!("{base}/v1/models/squeezenet"))
        .send_bytes(&model)
        .context("registering the model")?;
    for name in ["preprocess", "squeezenet", "top5"] {
        agent
            .put(&format!("{base}/v1/functions/{name}"))
            .send_bytes(&guest(name))
            .with_context(|| format!("registering {name}"))?;
    }
    agent
        .put(&format!("{base}/v1/dags/classify"))
        .send_string(
            r#"{"functions":["preprocess","squeezenet","top5"],
                "edges":[["preprocess","squeezenet"],["squeezenet","top5"]]}"#,
        )
        .context("creating the DAG")?;
    Ok((up, base))
}

/// A closed loop of `clients` posting `body` to `url`; every answer must be non-empty and
/// contain `expect`.
fn post_loop(
    url: &str,
    body: &[u8],
    expect: &str,
    clients: usize,
    seconds: f64,
) -> anyhow::Result<LoadResult> {
    let load = closed_loop(
        clients,
        Duration::from_millis(500),
        Duration::from_secs_f64(seconds),
        |_| Ok(agent()),
        |agent, _| {
            let response = agent.post(url).send_bytes(body)?;
            let mut out = Vec::new();
            response.into_reader().read_to_end(&mut out)?;
            if out.is_empty()
                || !(expect.is_empty() || out.windows(expect.len()).any(|w| w == expect.as_bytes()))
            {
                bail!("unexpected answer from {url} ({} bytes)", out.len());
            }
            Ok(())
        },
    )?;
    if load.errors > 0 {
        bail!(
            "{} failed requests to {url} at concurrency {clients}",
            load.errors
        );
    }
    Ok(load)
}

/// Native tract inference of `input`, one thread, for `seconds`: per-run latencies (µs).
fn native(model: &Model, input: &Tensor, seconds: f64) -> anyhow::Result<Vec<f64>> {
    let mut runs = Vec::new();
    let until = Instant::now() + Duration::from_secs_f64(seconds);
    while Instant::now() < until {
        let started = Instant::now();
        let outputs = model
            .run(vec![(String::new(), input.clone())])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        runs.push(started.elapsed().as_secs_f64() * 1e6);
        anyhow::ensure!(outputs.len() == 1, "one output expected");
    }
    Ok(runs)
}

/// onnxruntime's p50 and p99 (µs) on the same tensor, from `bench/ort_squeezenet.py`.
fn onnxruntime(python: &Path, seconds: f64) -> anyhow::Result<(f64, f64)> {
    let dir = squeezenet_dir();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("ort_squeezenet.py");
    let output = Command::new(python)
        .arg(script)
        .arg(dir.join("squeezenet1.1-fp32.onnx"))
        .arg(dir.join("chelsea_input_1x3x224x224_f32.npy"))
        .arg(seconds.to_string())
        .output()
        .context("running onnxruntime")?;
    if !output.status.success() {
        bail!(
            "onnxruntime failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut fields = text.split_whitespace().map(str::parse::<f64>);
    match (fields.next(), fields.next()) {
        (Some(Ok(p50)), Some(Ok(p99))) => Ok((p50, p99)),
        _ => bail!("unexpected onnxruntime output {text:?}"),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = squeezenet_dir();
    let photo = std::fs::read(dir.join("chelsea.png"))?;
    let tensor = Tensor::new(
        vec![1, 3, 224, 224],
        ElementType::Fp32,
        npy_f32(&dir.join("chelsea_input_1x3x224x224_f32.npy")),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let onnx = std::fs::read(dir.join("squeezenet1.1-fp32.onnx"))?;
    let model = Model::load("squeezenet", "", &onnx)?;
    let (_up, base) = start(&args.run.squall)?;
    let url = format!("{base}/v1/dags/classify/invoke");
    // The pipeline's two heavy steps alone, for the breakdown: the photo to the tensor, and
    // the tensor to the probabilities (4000 bytes).
    let steps = [
        (
            format!("{base}/v1/functions/preprocess/invoke"),
            photo.clone(),
            "",
        ),
        (
            format!("{base}/v1/functions/squeezenet/invoke"),
            tensor.data.clone(),
            "",
        ),
    ];
    // The cat's reference top-1 class.
    const CAT: &str = "\"index\":285";

    let mut rows: Vec<(&str, Vec<f64>, Vec<f64>)> = vec![
        ("native tract inference (anchor)", vec![], vec![]),
        ("onnxruntime, 1 thread (second anchor)", vec![], vec![]),
        ("`classify` over HTTP, concurrency 1", vec![], vec![]),
        ("step `preprocess` alone over HTTP", vec![], vec![]),
        ("step `squeezenet` alone over HTTP", vec![], vec![]),
    ];
    let mut throughput: Vec<(usize, Vec<f64>)> = vec![(1, vec![]), (2, vec![]), (8, vec![])];
    for round in 0..args.run.rounds {
        let runs = native(&model, &tensor, args.run.seconds)?;
        let mut sorted = runs.clone();
        sorted.sort_by(f64::total_cmp);
        let p99 = sorted[((sorted.len() as f64 * 0.99) as usize).min(sorted.len() - 1)];
        rows[0].1.push(median(&runs));
        rows[0].2.push(p99);
        if let Some(python) = &args.python {
            let (p50, p99) = onnxruntime(python, args.run.seconds)?;
            rows[1].1.push(p50);
            rows[1].2.push(p99);
        }
        for (row, (step, body, expect)) in rows[3..].iter_mut().zip(&steps) {
            let load = post_loop(step, body, expect, 1, args.run.seconds)?;
            row.1.push(load.latency_us.value_at_quantile(0.5) as f64);
            row.2.push(load.latency_us.value_at_quantile(0.99) as f64);
        }
        for (clients, samples) in throughput.iter_mut() {
            let load = post_loop(&url, &photo, CAT, *clients, args.run.seconds)?;
            if *clients == 1 {
                rows[2]
                    .1
                    .push(load.latency_us.value_at_quantile(0.5) as f64);
                rows[2]
                    .2
                    .push(load.latency_us.value_at_quantile(0.99) as f64);
            }
            samples.push(load.throughput());
        }
        eprintln!(
            "round {round}: native p50 {:.0} µs; classify p50 {:.0} µs p99 {:.0} µs; preprocess p50 {:.0} µs; squeezenet p50 {:.0} µs; req/s at 1/2/8: {:.1} {:.1} {:.1}",
            rows[0].1[round],
            rows[2].1[round],
            rows[2].2[round],
            rows[3].1[round],
            rows[4].1[round],
            throughput[0].1[round],
            throughput[1].1[round],
            throughput[2].1[round],
        );
    }
    println!(
        "SqueezeNet 1.1 on chelsea.png; medians of {} rounds, {} s each",
        args.run.rounds, args.run.seconds
    );
    println!();
    println!("| measure | p50 (ms) | p99 (ms) | p50 vs native tract |");
    println!("|---|---:|---:|---:|");
    let anchor = median(&rows[0].1);
    for (name, p50, p99) in &rows {
        if p50.is_empty() {
            println!("| {name} | not measured (no --python) | | |");
            continue;
        }
        println!(
            "| {name} | {:.2} | {:.2} | {:.2}x |",
            median(p50) / 1000.0,
            median(p99) / 1000.0,
            median(p50) / anchor
        );
    }
    println!();
    println!("| `classify` concurrency | req/s | vs concurrency 1 |");
    println!("|---:|---:|---:|");
    let single = median(&throughput[0].1);
    for (clients, samples) in &throughput {
        println!(
            "| {clients} | {:.1} | {:.2}x |",
            median(samples),
            median(samples) / single
        );
    }
    Ok(())
}
