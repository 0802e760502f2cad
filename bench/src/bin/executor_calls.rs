//! Per-call cost of Squall's executor against bare wasmtime, same component, same run.
//!
//! Cells, each measured in every round (rounds alternate the cells, so drift on a shared
//! machine hits all of them alike):
//! - `executor warm`: `Executor::call` of `incr` on a pooled (reused) instance;
//! - `executor fresh`: the same with instance reuse off, so each call instantiates from the
//!   `InstancePre` into a fresh store;
//! - `wasmtime warm` / `wasmtime fresh`: the anchors: the same component called through
//!   wasmtime directly (same engine settings, WASI linked, Squall's imports stubbed), on a
//!   live instance and on a fresh instance per call;
//! - `cache hit` / `cache miss`: reading a 1 KiB value through the colocated cache, held or
//!   not held (a miss fetches and subscribes in one round trip to the storage node), with a
//!   plain KVS GET of the same size as the anchor.
//!
//! Reports the median over rounds of each cell's p50 and p99, and the ratios.
//!
//! Run: `bench/executor-calls.sh` (builds release binaries and the guests, then runs this).

use std::time::Instant;

use clap::Parser;
use squall_bench::median;
use squall_executor::{CallOptions, Config, Executor};
use squall_kvs::{Client, ClientConfig, Node};
use squall_lattices::{LatticeValue, Lww, Timestamp};
use squall_state::Limits;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

#[derive(Debug, Parser)]
#[command(about = "Squall's executor against bare wasmtime, same component, same run")]
struct Args {
    /// Rounds; each measures every cell once.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Calls measured per cell and round.
    #[arg(long, default_value_t = 5_000)]
    calls: usize,
    /// Unmeasured calls before each cell.
    #[arg(long, default_value_t = 500)]
    warmup: usize,
}

struct Bare {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn bare_store(engine: &Engine) -> Store<Bare> {
    let mut store = Store::new(
        engine,
        Bare {
            wasi: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        },
    );
    store.set_epoch_deadline(u64::MAX / 2);
    store
}

/// wasmtime's error type is not a `std::error::Error`; carry its full message into anyhow.
trait Wasm<T> {
    fn w(self) -> anyhow::Result<T>;
}

impl<T> Wasm<T> for wasmtime::Result<T> {
    fn w(self) -> anyhow::Result<T> {
        self.map_err(|e| anyhow::anyhow!("{e:#}"))
    }
}

type HandleFn = wasmtime::component::TypedFunc<(Vec<u8>,), (Result<Vec<u8>, String>,)>;

/// Latencies of `calls` runs of `op`, in nanoseconds, after `warmup` unmeasured runs.
async fn sample<F, Fut>(warmup: usize, calls: usize, mut op: F) -> anyhow::Result<Vec<f64>>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    for i in 0..warmup {
        op(i).await?;
    }
    let mut samples = Vec::with_capacity(calls);
    for i in 0..calls {
        let started = Instant::now();
        op(warmup + i).await?;
        samples.push(started.elapsed().as_nanos() as f64);
    }
    Ok(samples)
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index.min(samples.len() - 1)]
}

#[derive(Default)]
struct Cell {
    p50: Vec<f64>,
    p99: Vec<f64>,
}

impl Cell {
    fn record(&mut self, mut samples: Vec<f64>) {
        self.p50.push(percentile(&mut samples, 0.5));
        self.p99.push(percentile(&mut samples, 0.99));
    }

    fn p50(&self) -> f64 {
        median(&self.p50) / 1000.0
    }

    fn p99(&self) -> f64 {
        median(&self.p99) / 1000.0
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let component_bytes = squall_executor::testing::guest("incr");
    let node = Node::start(squall_kvs::Config {
        shards: 1,
        ..squall_kvs::Config::default()
    })?;
    let executor = Executor::start(Config::default(), node.address())?;
    executor
        .register("incr", component_bytes.clone(), None)
        .await?;
    executor
        .register(
            "incr-fresh",
            component_bytes.clone(),
            Some(Limits {
                reuse_instances: false,
                ..Limits::default()
            }),
        )
        .await?;

    // The anchor: the same engine (so the same compiled code and allocator), no Squall.
    let engine = executor.engine().clone();
    let component = Component::new(&engine, &component_bytes).w()?;
    let mut linker = Linker::<Bare>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).w()?;
    linker.define_unknown_imports_as_traps(&component).w()?;
    let pre = linker.instantiate_pre(&component).w()?;
    let mut live = bare_store(&engine);
    let instance = pre.instantiate_async(&mut live).await.w()?;
    let live_handle: HandleFn = instance.get_typed_func(&mut live, "handle").w()?;

    // 1 KiB values for the cache cells, written up front.
    let value = vec![7u8; 1024];
    let mut client = Client::connect(node.address(), ClientConfig::default())?;
    let keys_per_round = args.calls + args.warmup;
    let total_keys = keys_per_round * args.rounds + 1;
    let entries: Vec<(String, LatticeValue)> = (0..total_keys)
        .map(|i| {
            (
                format!("bench/value/{i}"),
                LatticeValue::Lww(Lww::new(Timestamp::now(1), value.clone().into())),
            )
        })
        .collect();
    for chunk in entries.chunks(1000) {
        for result in client.put_many(chunk.to_vec())? {
            result?;
        }
    }

    let names = [
        "executor warm",
        "executor fresh",
        "wasmtime warm",
        "wasmtime fresh",
        "cache hit",
        "cache miss",
        "kvs get",
    ];
    let mut cells: Vec<Cell> = names.iter().map(|_| Cell::default()).collect();
    let input = b"41".to_vec();
    let options = CallOptions::default();
    for round in 0..args.rounds {
        let (warmup, calls) = (args.warmup, args.calls);
        let samples = sample(warmup, calls, |_| async {
            let out = executor.call("incr", &input, options.clone()).await?;
            anyhow::ensure!(out == b"42", "wrong output");
            Ok(())
        })
        .await?;
        cells[0].record(samples);
        let samples = sample(warmup, calls, |_| async {
            let out = executor.call("incr-fresh", &input, options.clone()).await?;
            anyhow::ensure!(out == b"42", "wrong output");
            Ok(())
        })
        .await?;
        cells[1].record(samples);
        let mut samples = Vec::with_capacity(calls);
        for i in 0..warmup + calls {
            let started = Instant::now();
            let (out,) = live_handle
                .call_async(&mut live, (input.clone(),))
                .await
                .w()?;
            anyhow::ensure!(out.as_deref() == Ok(&b"42"[..]), "wrong output");
            if i >= warmup {
                samples.push(started.elapsed().as_nanos() as f64);
            }
        }
        cells[2].record(samples);
        let mut samples = Vec::with_capacity(calls);
        for i in 0..warmup + calls {
            let started = Instant::now();
            let mut store = bare_store(&engine);
            let instance = pre.instantiate_async(&mut store).await.w()?;
            let handle: HandleFn = instance.get_typed_func(&mut store, "handle").w()?;
            let (out,) = handle.call_async(&mut store, (input.clone(),)).await.w()?;
            anyhow::ensure!(out.as_deref() == Ok(&b"42"[..]), "wrong output");
            drop(store);
            if i >= warmup {
                samples.push(started.elapsed().as_nanos() as f64);
            }
        }
        cells[3].record(samples);
        let cache = executor.cache();
        let hot = format!("bench/value/{}", total_keys - 1);
        let samples = sample(warmup, calls, |_| {
            let hot = hot.clone();
            async move {
                let v = cache.get(&hot).await?;
                anyhow::ensure!(v.is_some(), "missing value");
                Ok(())
            }
        })
        .await?;
        cells[4].record(samples);
        let base = round * keys_per_round;
        let samples = sample(warmup, calls, |i| async move {
            let v = cache.get(&format!("bench/value/{}", base + i)).await?;
            anyhow::ensure!(v.is_some(), "missing value");
            Ok(())
        })
        .await?;
        cells[5].record(samples);
        let mut samples = Vec::with_capacity(calls);
        for i in 0..warmup + calls {
            let key = format!("bench/value/{}", base + i);
            let started = Instant::now();
            let v = client.get(&key)?;
            anyhow::ensure!(v.is_some(), "missing value");
            if i >= warmup {
                samples.push(started.elapsed().as_nanos() as f64);
            }
        }
        cells[6].record(samples);
        eprintln!("round {} of {} done", round + 1, args.rounds);
    }

    let stats = executor.stats();
    println!(
        "executor-calls: {} rounds x {} calls (after {} warm-up calls), medians over rounds\n",
        args.rounds, args.calls, args.warmup
    );
    println!("| cell | p50 (µs) | p99 (µs) | p50 vs anchor |");
    println!("|---|---:|---:|---|");
    let ratio = |a: usize, b: usize| cells[a].p50() / cells[b].p50();
    let rows = [
        (0, format!("{:.2}x wasmtime warm", ratio(0, 2))),
        (1, format!("{:.2}x wasmtime fresh", ratio(1, 3))),
        (2, "anchor".to_string()),
        (3, "anchor".to_string()),
        (4, format!("{:.3}x kvs get", ratio(4, 6))),
        (5, format!("{:.2}x kvs get", ratio(5, 6))),
        (6, "anchor".to_string()),
    ];
    for (i, note) in rows {
        println!(
            "| {} | {:.2} | {:.2} | {} |",
            names[i],
            cells[i].p50(),
            cells[i].p99(),
            note
        );
    }
    println!(
        "\ntargets: executor warm p50 <= 10 µs ({}), executor fresh p50 <= 50 µs ({})",
        if cells[0].p50() <= 10.0 {
            "met"
        } else {
            "missed"
        },
        if cells[1].p50() <= 50.0 {
            "met"
        } else {
            "missed"
        },
    );
    println!(
        "executor counters: {} warm starts, {} fresh starts; cache {} hits, {} misses",
        stats.warm_starts, stats.cold_starts, stats.cache.hits, stats.cache.misses
    );
    Ok(())
}
