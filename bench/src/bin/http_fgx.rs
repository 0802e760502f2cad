//! f(g(x)) = square(incr(x)) over HTTP with keep-alive, end to end: latency (one client,
//! p50/p99) and throughput (several clients), for
//! (a) `squall up` (everything in one process), and
//! (b) `squall up --executors 0` plus two `squall executor` processes, one serving `incr` and
//!     one `square`, so every call crosses executor processes;
//! (c) (a) with `--token`, every call carrying an `invoke` API key (what the key check costs:
//!     compare with (a));
//! (d) (c)'s gateway, the functions and the DAG in a namespace of their own, called at
//!     `/v1/ns/bench/...` with a key of that namespace (what the namespace's admission and the
//!     mapping of names and keys cost on top of (c): compare with (a) and (c));
//! against, in the same run, an HTTP echo server on the same stack (axum on tokio, a process of
//! its own) as the floor. Setups alternate over rounds, each round starting with the next
//! one; the table reports medians over rounds and ratios to the floor.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use squall_bench::{
    closed_loop, field, median, spawn, up_with_executors, LoadResult, RunArgs, Spawned, SQUALL_UP,
};

#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Clients of the throughput runs.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Serve HTTP echo and nothing else (how the harness starts its floor).
    #[arg(long, hide = true)]
    echo_server: bool,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(30))
        .max_idle_connections_per_host(4)
        .build()
}

fn post(agent: &ureq::Agent, url: &str, key: Option<&str>, body: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut request = agent.post(url);
    if let Some(key) = key {
        request = request.set("Authorization", &format!("Bearer {key}"));
    }
    let response = request.send_bytes(body)?;
    let mut out = Vec::new();
    response.into_reader().read_to_end(&mut out)?;
    Ok(out)
}

/// One system under test: its processes and the URL to POST `3` to.
struct Setup {
    name: &'static str,
    url: String,
    /// The API key every call carries, if the gateway requires one.
    key: Option<String>,
    expect: &'static [u8],
    _processes: Vec<Spawned>,
}

/// Registers `incr`, `square` and the DAG `sq_incr` under `v1` (`{base}/v1`, or a
/// namespace's `{base}/v1/ns/{ns}`).
fn register(v1: &str, token: Option<&str>) -> anyhow::Result<()> {
    let agent = agent();
    let auth = |request: ureq::Request| match token {
        Some(token) => request.set("Authorization", &format!("Bearer {token}")),
        None => request,
    };
    for name in ["incr", "square"] {
        auth(agent.put(&format!("{v1}/functions/{name}")))
            .send_bytes(&squall_executor::testing::guest(name))
            .with_context(|| format!("registering {name}"))?;
    }
    auth(agent.put(&format!("{v1}/dags/sq_incr")))
        .send_string(r#"{"functions":["incr","square"],"edges":[["incr","square"]]}"#)
        .context("creating the DAG")?;
    Ok(())
}

/// Makes an `invoke` API key of `namespace` through `base` with its bootstrap `token`.
fn invoke_key(base: &str, token: &str, namespace: &str) -> anyhow::Result<String> {
    let body = serde_json::json!({"name": "bench", "role": "invoke", "namespace": namespace});
    let answer = agent()
        .post(&format!("{base}/v1/keys"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_string(&body.to_string())
        .context("making an API key")?
        .into_string()?;
    let made: serde_json::Value = serde_json::from_str(&answer)?;
    made["key"]
        .as_str()
        .map(str::to_string)
        .context("no key in the answer")
}

fn embedded(
    squall: &Path,
    executors: &str,
    token: Option<&str>,
) -> anyhow::Result<(Spawned, String, String, String)> {
    let mut args = [&SQUALL_UP[..], &["--executors", executors]].concat();
    if let Some(token) = token {
        args.extend(["--token", token]);
    }
    let (up, fields) = spawn(squall, &args)?;
    Ok((
        up,
        field(&fields, "http")?,
        field(&fields, "kvs")?,
        field(&fields, "scheduler")?,
    ))
}

fn setups(args: &Args) -> anyhow::Result<Vec<Setup>> {
    let me = std::env::current_exe()?;
    let (echo, fields) = spawn(&me, &["--echo-server"])?;
    let echo = Setup {
        name: "HTTP echo (floor)",
        url: format!("{}/echo", field(&fields, "http")?),
        key: None,
        expect: b"3",
        _processes: vec![echo],
    };
    let (up, base, _, _) = embedded(&args.run.squall, "1", None)?;
    register(&format!("{base}/v1"), None)?;
    let one = Setup {
        name: "(a) squall up",
        url: format!("{base}/v1/dags/sq_incr/invoke"),
        key: None,
        expect: b"16",
        _processes: vec![up],
    };
    let (processes, base) =
        up_with_executors(&args.run.squall, &[("e1", "incr"), ("e2", "square")])?;
    register(&format!("{base}/v1"), None)?;
    let two = Setup {
        name: "(b) two executor processes",
        url: format!("{base}/v1/dags/sq_incr/invoke"),
        key: None,
        expect: b"16",
        _processes: processes,
    };
    // Any 16 characters or more: the harness's own gateway, on loopback, for one run.
    let token = format!("bench-token-{:08}", std::process::id());
    let (up, base, _, _) = embedded(&args.run.squall, "1", Some(&token))?;
    register(&format!("{base}/v1"), Some(&token))?;
    let keyed = Setup {
        name: "(c) squall up, an API key on every call",
        url: format!("{base}/v1/dags/sq_incr/invoke"),
        key: Some(invoke_key(&base, &token, "default")?),
        expect: b"16",
        _processes: vec![up],
    };
    agent()
        .post(&format!("{base}/v1/namespaces"))
        .set("Authorization", &format!("Bearer {token}"))
        .send_string(r#"{"name":"bench"}"#)
        .context("creating the namespace")?;
    register(&format!("{base}/v1/ns/bench"), Some(&token))?;
    let namespaced = Setup {
        name: "(d) (c) in a namespace of its own",
        url: format!("{base}/v1/ns/bench/dags/sq_incr/invoke"),
        key: Some(invoke_key(&base, &token, "bench")?),
        expect: b"16",
        // (c)'s process.
        _processes: Vec::new(),
    };
    Ok(vec![echo, one, two, keyed, namespaced])
}

fn run(setup: &Setup, clients: usize, seconds: f64) -> anyhow::Result<LoadResult> {
    closed_loop(
        clients,
        Duration::from_millis(300),
        Duration::from_secs_f64(seconds),
        |_| Ok(agent()),
        |agent, _| {
            let out = post(agent, &setup.url, setup.key.as_deref(), b"3")?;
            if out != setup.expect {
                bail!("unexpected answer {:?}", String::from_utf8_lossy(&out));
            }
            Ok(())
        },
    )
}

fn echo_server() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("READY http=http://{}", listener.local_addr()?);
        let app = axum::Router::new().route(
            "/echo",
            axum::routing::post(|body: axum::body::Bytes| async move { body }),
        );
        axum::serve(listener, app).await?;
        Ok(())
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.echo_server {
        return echo_server();
    }
    let setups = setups(&args)?;
    let n = setups.len();
    let (mut p50, mut p99, mut ops) = (vec![vec![]; n], vec![vec![]; n], vec![vec![]; n]);
    for round in 0..args.run.rounds {
        // Each round starts with another setup, so none always follows the same one.
        for k in 0..n {
            let i = (k + round) % n;
            let setup = &setups[i];
            let latency = run(setup, 1, args.run.seconds)?;
            let load = run(setup, args.clients, args.run.seconds)?;
            if latency.errors + load.errors > 0 {
                bail!(
                    "{}: {} failed requests",
                    setup.name,
                    latency.errors + load.errors
                );
            }
            p50[i].push(latency.latency_us.value_at_quantile(0.5) as f64);
            p99[i].push(latency.latency_us.value_at_quantile(0.99) as f64);
            ops[i].push(load.throughput());
            eprintln!(
                "round {round} {}: p50 {} µs, p99 {} µs, {:.0} req/s",
                setup.name,
                latency.latency_us.value_at_quantile(0.5),
                latency.latency_us.value_at_quantile(0.99),
                load.throughput()
            );
        }
    }
    println!(
        "f(g(x)) = square(incr(x)) over HTTP keep-alive; medians of {} rounds, {} s each; throughput with {} clients",
        args.run.rounds, args.run.seconds, args.clients
    );
    println!();
    println!("| setup | p50 (µs) | p99 (µs) | p50 vs floor | req/s | req/s vs floor |");
    println!("|---|---:|---:|---:|---:|---:|");
    let floor = (median(&p50[0]), median(&ops[0]));
    for (i, setup) in setups.iter().enumerate() {
        let (m50, m99, mops) = (median(&p50[i]), median(&p99[i]), median(&ops[i]));
        println!(
            "| {} | {:.0} | {:.0} | {:.2}x | {:.0} | {:.2}x |",
            setup.name,
            m50,
            m99,
            m50 / floor.0,
            mops,
            mops / floor.1
        );
    }
    Ok(())
}
