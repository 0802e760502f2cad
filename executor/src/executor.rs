//! The executor: compiles, keeps warm, and calls functions.
//!
//! Costs and lifetimes, from long to short:
//! - one wasmtime [`Engine`] per executor, with the pooling allocator (instance slots,
//!   memories and tables reserved up front, so instantiating is a few microseconds) and epoch
//!   interruption (a ticker thread advances the epoch; a store past its deadline traps);
//! - one compiled component and `HandlerPre` (imports resolved, exports type-checked) per
//!   distinct code, shared by every version and name that has that code;
//! - per function version, a small pool of warm instances (a store plus an instance that
//!   already served a call), used when the function allows reuse;
//! - per call without a warm instance, a fresh `Store` instantiated from the `HandlerPre`.
//!
//! A call finds its function's newest version through the colocated cache, which the store
//! keeps fresh by push: registering a new version anywhere reaches every executor that holds
//! the name, without polling.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use squall_lattices::{Counter, Timestamp, WriterId};
use squall_proto::Key;
use wasmtime::component::{Component, Linker};
use wasmtime::{
    Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store, Trap, UpdateDeadline,
};

use squall_state::cache::{Cache, CacheStats};
use squall_state::pins::{PinTable, RunContext};
use squall_state::registry::{function_key, FunctionRecord, Registry};
use squall_state::session::{Consistency, Session};
use squall_state::stored_bytes::StoredBytesGuard;
use squall_state::{ClientPool, Error as StateError, Limits};

use crate::bindings::{Handler, HandlerPre};
use crate::children::{Children, Spawner};
use crate::config::Config;
use crate::host::{log_output, CallContext, CallState, Limiter};
use crate::nn::Models;
use crate::report::{CpuTimed, StepTrace};
use crate::runtime::{CallScope, NestedCall, Runtime};
use crate::{Error, Result};

/// Options of one call.
#[derive(Debug, Clone, Default)]
pub struct CallOptions {
    /// How the call sees the store (default [`Consistency::Lww`]).
    pub consistency: Consistency,
    /// A deadline shorter than the function's own, if the caller has one.
    pub timeout: Option<Duration>,
    /// Repeatable read: the run this call is a step of (its pins here are shared by the run's
    /// steps on this executor, and its earlier steps' pins are read through it). Without it,
    /// a repeatable-read call pins versions for itself and its nested calls only. The run's
    /// pins stay in [`Executor::pins`] until released there (`release`, or `expire` after the
    /// deadline), which [`crate::ExecutorNode`] does for the runs it serves.
    pub run: Option<RunContext>,
    /// Collects the call's log lines, CPU time and memory for its activation record.
    pub trace: Option<StepTrace>,
    /// Which attempt of its call this is (0 or 1: the first), as the guest's
    /// `context.attempt` answers it.
    pub attempt: u32,
    /// How many `kv-change` deliveries led to this call: its writes (and its nested calls')
    /// carry it to the store's journal.
    pub chain: u32,
    /// Where the children it starts run (`squall:compose/futures`); `None`: on this
    /// executor, as nested calls. An [`crate::ExecutorNode`] gives its scheduler-placing one.
    pub spawner: Option<Arc<dyn Spawner>>,
    /// How deep in a chain of calls it starts (0 from outside; a child one more than its
    /// parent): past the executor's call depth, the call is refused.
    pub depth: u32,
}

/// Counters of an executor's calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecutorStats {
    /// Calls served by a warm instance.
    pub warm_starts: u64,
    /// Calls that instantiated a fresh instance.
    pub cold_starts: u64,
    /// Components compiled (or loaded from the code cache).
    pub compilations: u64,
    /// Components whose machine code came from the on-disk code cache.
    pub code_cache_hits: u64,
    /// Components compiled because the code cache did not have them.
    pub code_cache_misses: u64,
    /// The colocated cache's counters.
    pub cache: CacheStats,
}

/// A compiled component, ready to instantiate.
struct Compiled {
    pre: HandlerPre<CallState>,
}

/// A function version this executor has loaded.
struct Loaded {
    /// The function's registry key, built once (checked on every call).
    key: String,
    record: FunctionRecord,
    limits: Limits,
    compiled: Arc<Compiled>,
    /// The cache generation of the function's registry key when this was resolved.
    generation: u64,
    warm: Mutex<Vec<Warm>>,
}

/// An instance that served a call and may serve another.
struct Warm {
    store: Store<CallState>,
    handler: Handler,
    uses: u64,
    _slot: WarmSlot,
}

/// Counts a warm instance in [`Inner::warm_total`] for as long as it is kept.
struct WarmSlot(Arc<AtomicUsize>);

impl WarmSlot {
    fn new(total: &Arc<AtomicUsize>) -> Self {
        total.fetch_add(1, Ordering::Relaxed);
        Self(total.clone())
    }
}

impl Drop for WarmSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The shared state behind an [`Executor`].
pub(crate) struct Inner {
    engine: Engine,
    code_cache: Option<wasmtime::Cache>,
    linker: Linker<CallState>,
    config: Config,
    cache: Cache,
    registry: Registry,
    pub(crate) models: Models,
    pins: PinTable,
    loaded: Mutex<HashMap<String, Arc<Loaded>>>,
    compiled: Mutex<HashMap<String, Arc<Compiled>>>,
    writer: WriterId,
    last_time: AtomicU64,
    counters: Mutex<HashMap<Key, Counter>>,
    /// Refuses functions' writes in a namespace measured at its `max_stored_bytes`.
    stored_bytes: StoredBytesGuard,
    warm_starts: AtomicU64,
    /// Warm instances kept, over all functions.
    warm_total: Arc<AtomicUsize>,
    cold_starts: AtomicU64,
    compilations: AtomicU64,
    stop: Arc<AtomicBool>,
    ticker: Mutex<Option<JoinHandle<()>>>,
}

/// Runs functions. One per node; cheap to clone; thread-safe. Calls are `async` and must run
/// inside a tokio runtime (store reads that miss use its blocking pool).
#[derive(Clone)]
pub struct Executor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Executor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("cache", &self.inner.cache)
            .finish_non_exhaustive()
    }
}

impl Executor {
    /// Starts an executor over the storage node at `kvs` (a ZeroMQ endpoint): builds the
    /// engine, connects to the store, binds the cache's update socket and starts the epoch
    /// ticker.
    pub fn start(config: Config, kvs: &str) -> Result<Self> {
        let (engine, code_cache) = build_engine(&config)?;
        let mut linker = Linker::<CallState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(|e| Error::Setup(format!("linking WASI: {e}")))?;
        Handler::add_to_linker::<_, wasmtime::component::HasSelf<_>>(&mut linker, |state| state)
            .map_err(|e| Error::Setup(format!("linking the handler world: {e}")))?;
        let kvs = ClientPool::connect(kvs, config.kvs_timeout)?;
        let cache = Cache::start(kvs.clone(), config.cache.clone())?;
        let stored_bytes = StoredBytesGuard::new(kvs.clone());
        let registry = Registry::new(kvs, cache.clone());
        let models = Models::new(registry.models(), cache.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let ticker = {
            let engine = engine.clone();
            let stop = stop.clone();
            let tick = config.epoch_tick.max(Duration::from_millis(1));
            std::thread::Builder::new()
                .name("squall-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| Error::Setup(format!("epoch thread: {e}")))?
        };
        tracing::info!(
            max_instances = config.max_instances,
            cache_bytes = config.cache.capacity_bytes,
            code_cache = ?config.code_cache_dir,
            "executor started"
        );
        Ok(Self {
            inner: Arc::new(Inner {
                engine,
                code_cache,
                linker,
                config,
                cache,
                registry,
                models,
                pins: PinTable::default(),
                loaded: Mutex::new(HashMap::new()),
                compiled: Mutex::new(HashMap::new()),
                writer: rand::random(),
                last_time: AtomicU64::new(0),
                counters: Mutex::new(HashMap::new()),
                stored_bytes,
                warm_starts: AtomicU64::new(0),
                warm_total: Arc::new(AtomicUsize::new(0)),
                cold_starts: AtomicU64::new(0),
                compilations: AtomicU64::new(0),
                stop,
                ticker: Mutex::new(Some(ticker)),
            }),
        })
    }

    /// Checks that `code` is a component of the handler world, then stores it as the next
    /// version of `name`. `limits` default to the executor's and are capped by its maximum.
    pub async fn register(
        &self,
        name: &str,
        code: Vec<u8>,
        limits: Option<Limits>,
    ) -> Result<FunctionRecord> {
        squall_state::registry::validate_name(name)?;
        let limits = limits
            .unwrap_or(self.inner.config.default_limits)
            .capped(&self.inner.config.max_limits);
        let sha256 = squall_state::registry::sha256_hex(&code);
        if let Err(e) = self.inner.compile(&sha256, &code).await {
            tracing::warn!(function = name, size = code.len(), cause = %e, "registration refused");
            return Err(e);
        }
        Ok(self.inner.registry.store(name, code, limits).await?)
    }

    /// Checks that `onnx` is a model this executor can run, stores it as the next version of
    /// model `name`, and keeps it loaded for the functions that use it (`wasi:nn`).
    pub async fn register_model(&self, name: &str, onnx: Vec<u8>) -> Result<FunctionRecord> {
        self.inner.models.register(name, onnx).await
    }

    /// The models this executor serves to `wasi:nn`.
    pub fn models(&self) -> &Models {
        &self.inner.models
    }

    /// Calls the newest version of `name` with `input`.
    pub async fn call(&self, name: &str, input: &[u8], options: CallOptions) -> Result<Vec<u8>> {
        let max = self.inner.config.max_limits.timeout();
        let timeout = options.timeout.unwrap_or(max).min(max);
        let deadline = Instant::now() + timeout;
        let session = match (options.consistency, options.run) {
            (mode, Some(context)) if mode.pins() => {
                let pins = self.inner.pins.open(context.call, context.deadline);
                let declared = context.declared.clone();
                let session = self.inner.cache.run_session(mode, pins, context);
                // Causal: the run's declared keys become one cut before its first step runs.
                if !declared.is_empty() {
                    tokio::time::timeout(timeout, session.prepare(&declared))
                        .await
                        .map_err(|_| Error::Timeout {
                            function: name.to_string(),
                            deadline: timeout,
                        })??;
                }
                session
            }
            (mode, _) => self.inner.cache.session(mode),
        }
        .in_chain(options.chain);
        run(
            self.inner.clone(),
            name.to_string(),
            input.to_vec(),
            options.depth,
            deadline,
            session,
            CallScope {
                trace: options.trace,
                attempt: options.attempt.max(1),
                spawner: options.spawner,
                outermost: true,
            },
        )
        .await
    }

    /// The versions runs have pinned here (repeatable read and causal).
    pub fn pins(&self) -> &PinTable {
        &self.inner.pins
    }

    /// Makes sure `name` has an instance ready, compiling and instantiating it if needed, so
    /// its next call starts warm. A function that does not reuse instances is only compiled.
    pub async fn warm(&self, name: &str) -> Result<()> {
        let inner = &self.inner;
        let loaded = inner.resolve(name).await?;
        let ready = !loaded
            .warm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        if ready
            || !loaded.limits.reuse_instances
            || inner.warm_total.load(Ordering::Relaxed) >= inner.warm_cap()
        {
            return Ok(());
        }
        let call = CallContext {
            executor: Arc::downgrade(inner) as Weak<dyn Runtime>,
            function: Arc::from(name),
            deadline: Instant::now() + loaded.limits.timeout(),
            depth: 0,
            session: inner.cache.session(Consistency::Lww),
            fatal: None,
            trace: None,
            attempt: 1,
            spawner: None,
            children: Children::default(),
        };
        let (store, handler, uses) = inner.instance(&loaded, call, false).await?;
        let mut warm = loaded.warm.lock().unwrap_or_else(|p| p.into_inner());
        if warm.len() < inner.config.warm_per_function {
            warm.push(Warm {
                store,
                handler,
                uses,
                _slot: WarmSlot::new(&inner.warm_total),
            });
        }
        Ok(())
    }

    /// The functions whose next call starts warm: an instance is ready, or (for functions
    /// that never reuse instances) the code is compiled. A function whose record changed
    /// since it was loaded (a new version, or deleted) is not counted until it is loaded again.
    pub fn warm_functions(&self) -> Vec<String> {
        let cache = &self.inner.cache;
        self.inner
            .lock_loaded()
            .iter()
            .filter(|(_, loaded)| cache.generation(&loaded.key) == Some(loaded.generation))
            .filter(|(_, loaded)| {
                !loaded.limits.reuse_instances
                    || !loaded
                        .warm
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_empty()
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The registry this executor reads.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The colocated cache.
    pub fn cache(&self) -> &Cache {
        &self.inner.cache
    }

    /// Counters of the executor's work.
    pub fn stats(&self) -> ExecutorStats {
        ExecutorStats {
            warm_starts: self.inner.warm_starts.load(Ordering::Relaxed),
            cold_starts: self.inner.cold_starts.load(Ordering::Relaxed),
            compilations: self.inner.compilations.load(Ordering::Relaxed),
            code_cache_hits: self
                .inner
                .code_cache
                .as_ref()
                .map_or(0, |c| c.cache_hits() as u64),
            code_cache_misses: self
                .inner
                .code_cache
                .as_ref()
                .map_or(0, |c| c.cache_misses() as u64),
            cache: self.inner.cache.stats(),
        }
    }

    /// The engine (for embedding and benchmarks).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Ok(mut slot) = self.ticker.lock() {
            if let Some(thread) = slot.take() {
                let _ = thread.join();
            }
        }
    }
}

/// Builds the engine: Cranelift, component model, async, epoch interruption, pooling
/// allocator sized by the config, and the on-disk code cache if configured.
fn build_engine(config: &Config) -> Result<(Engine, Option<wasmtime::Cache>)> {
    let mut wasm = wasmtime::Config::new();
    wasm.wasm_component_model(true)
        .epoch_interruption(true)
        .parallel_compilation(true);
    let instances = config.max_instances.max(1);
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(instances)
        .total_core_instances(instances.saturating_mul(8))
        .total_memories(instances.saturating_mul(2))
        .total_tables(instances.saturating_mul(8))
        .total_stacks(instances)
        .max_core_instances_per_component(32)
        .max_memories_per_component(8)
        .max_tables_per_component(32)
        .max_memory_size(usize::try_from(config.max_limits.memory_bytes).unwrap_or(usize::MAX))
        .table_elements(usize::try_from(config.max_limits.table_elements).unwrap_or(usize::MAX))
        // Reset memory slots with madvise, not memset: a Rust guest's first megabyte is its
        // stack, mostly untouched, and zeroing it cost more than the page faults it saves
        // (fresh instance + call: 47 µs with 1 MiB kept resident, 23 µs with none, by
        // bench/executor-calls.sh).
        .linear_memory_keep_resident(0)
        .table_keep_resident(64 << 10);
    wasm.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let mut code_cache = None;
    if let Some(dir) = &config.code_cache_dir {
        // wasmtime's cache wants an absolute path; a relative one is taken from the working
        // directory, as everywhere else.
        let dir = std::path::absolute(dir)
            .map_err(|e| Error::Setup(format!("code cache {}: {e}", dir.display())))?;
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Setup(format!("code cache {}: {e}", dir.display())))?;
        let mut cache = wasmtime::CacheConfig::new();
        cache.with_directory(dir.clone());
        let cache = wasmtime::Cache::new(cache)
            .map_err(|e| Error::Setup(format!("code cache {}: {e}", dir.display())))?;
        code_cache = Some(cache.clone());
        wasm.cache(Some(cache));
    }
    let engine = Engine::new(&wasm).map_err(|e| Error::Setup(format!("wasmtime engine: {e}")))?;
    Ok((engine, code_cache))
}

impl Inner {
    /// Compiles `code` (or loads it from the code cache) and checks it against the handler
    /// world; shared by all functions with the same code.
    async fn compile(self: &Arc<Self>, sha256: &str, code: &[u8]) -> Result<Arc<Compiled>> {
        if let Some(compiled) = self.lock_compiled().get(sha256) {
            return Ok(compiled.clone());
        }
        let inner = self.clone();
        let code = code.to_vec();
        // Compilation is CPU-heavy (tens of milliseconds or more): off the async workers.
        let compiled = tokio::task::spawn_blocking(move || {
            let component =
                Component::new(&inner.engine, &code).map_err(|e| Error::InvalidComponent {
                    reason: format!("{e:#}"),
                })?;
            inner.compilations.fetch_add(1, Ordering::Relaxed);
            let pre = inner
                .linker
                .instantiate_pre(&component)
                .map_err(|e| Error::WrongWorld {
                    reason: format!("{e:#}"),
                })?;
            let pre = HandlerPre::new(pre).map_err(|e| Error::WrongWorld {
                reason: format!("{e:#}"),
            })?;
            Ok::<_, Error>(Arc::new(Compiled { pre }))
        })
        .await
        .map_err(|e| Error::Internal(format!("compilation panicked: {e}")))??;
        self.lock_compiled()
            .insert(sha256.to_string(), compiled.clone());
        Ok(compiled)
    }

    fn lock_compiled(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Compiled>>> {
        self.compiled.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_loaded(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Loaded>>> {
        self.loaded.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest version of `name`, loaded. Cheap when nothing changed: the registry key's
    /// cache generation still matches.
    async fn resolve(self: &Arc<Self>, name: &str) -> Result<Arc<Loaded>> {
        let current = self.lock_loaded().get(name).cloned();
        if let Some(loaded) = &current {
            if self.cache.generation(&loaded.key) == Some(loaded.generation) {
                return Ok(loaded.clone());
            }
        }
        // The record and the generation it was read at come from one look at the cache, so a
        // push that lands later changes the generation and the next call resolves again.
        let (record, generation) = self.registry.newest_versioned(name).await?;
        let Some(record) = record else {
            // Deleted (or never registered): forget what was loaded, warm instances included.
            if current.is_some() {
                self.lock_loaded().remove(name);
            }
            return Err(StateError::NotFound {
                name: name.to_string(),
            }
            .into());
        };
        if let Some(loaded) = current {
            if loaded.record == record {
                let refreshed = Arc::new(Loaded {
                    key: loaded.key.clone(),
                    record,
                    limits: loaded.limits,
                    compiled: loaded.compiled.clone(),
                    generation,
                    warm: Mutex::new(std::mem::take(
                        &mut *loaded.warm.lock().unwrap_or_else(|p| p.into_inner()),
                    )),
                });
                self.install(name, refreshed.clone());
                return Ok(refreshed);
            }
        }
        let held = self.lock_compiled().get(&record.sha256).cloned();
        let compiled = match held {
            Some(compiled) => compiled,
            None => {
                let code = self.registry.code(&record).await?;
                self.compile(&record.sha256, &code)
                    .await
                    .map_err(|e| StateError::CorruptCode {
                        name: record.name.clone(),
                        version: record.version,
                        reason: e.to_string(),
                    })?
            }
        };
        tracing::debug!(function = name, version = record.version, "function loaded");
        let loaded = Arc::new(Loaded {
            key: function_key(name),
            limits: record.limits.capped(&self.config.max_limits),
            record,
            compiled,
            generation,
            warm: Mutex::new(Vec::new()),
        });
        self.install(name, loaded.clone());
        Ok(loaded)
    }

    /// Records a resolved version, unless a concurrent resolution already recorded a newer
    /// one (a later cache generation).
    fn install(&self, name: &str, loaded: Arc<Loaded>) {
        let mut table = self.lock_loaded();
        match table.get(name) {
            Some(held) if held.generation > loaded.generation => {}
            _ => {
                table.insert(name.to_string(), loaded);
            }
        }
    }

    /// A warm instance of `loaded`, or a fresh one. With `evict`, a full pool gives back the
    /// warm instances' slots to make room (a call must run); without, a full pool is an error
    /// (warming must not throw away other functions' warm instances).
    async fn instance(
        self: &Arc<Self>,
        loaded: &Loaded,
        call: CallContext,
        evict: bool,
    ) -> Result<(Store<CallState>, Handler, u64)> {
        let mut limiter = Limiter {
            memory_bytes: usize::try_from(loaded.limits.memory_bytes).unwrap_or(usize::MAX),
            table_elements: usize::try_from(loaded.limits.table_elements).unwrap_or(usize::MAX),
            hit: false,
            memory_in_use: 0,
        };
        let warm = if loaded.limits.reuse_instances {
            loaded.warm.lock().unwrap_or_else(|p| p.into_inner()).pop()
        } else {
            None
        };
        if let Some(mut warm) = warm {
            self.warm_starts.fetch_add(1, Ordering::Relaxed);
            let state = warm.store.data_mut();
            state.call = call;
            // The instance's memories are as its last call left them.
            limiter.memory_in_use = state.limiter.memory_in_use;
            state.limiter = limiter;
            warm.store.set_epoch_deadline(1);
            return Ok((warm.store, warm.handler, warm.uses));
        }
        self.cold_starts.fetch_add(1, Ordering::Relaxed);
        let state = CallState::new(call, limiter, self.config.max_guest_output_bytes);
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        // At every epoch tick a running guest yields to the runtime (so a computing guest
        // cannot hold a worker thread) and, once past its deadline, is interrupted.
        store.epoch_deadline_callback(|ctx| {
            if Instant::now() >= ctx.data().call.deadline {
                Ok(UpdateDeadline::Interrupt)
            } else {
                Ok(UpdateDeadline::Yield(1))
            }
        });
        store.set_epoch_deadline(1);
        let handler = match loaded.compiled.pre.instantiate_async(&mut store).await {
            Ok(handler) => handler,
            Err(e) if evict && e.is::<wasmtime::PoolConcurrencyLimitError>() => {
                // Warm instances hold pool slots: give them back and try once more.
                let freed = self.drop_warm();
                tracing::debug!(freed, "instance pool full; dropped warm instances");
                loaded
                    .compiled
                    .pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| Error::NoCapacity {
                        reason: format!("{e:#}"),
                    })?
            }
            Err(e) => {
                return Err(Error::Trap {
                    function: loaded.record.name.clone(),
                    trap: format!("instantiation failed: {e:#}"),
                })
            }
        };
        Ok((store, handler, 0))
    }

    /// Warm instances kept at most, over all functions: half the pool, so fresh instances
    /// (functions that do not reuse, nested calls) always find room.
    fn warm_cap(&self) -> usize {
        (self.config.max_instances as usize / 2).max(1)
    }

    /// Drops every warm instance (freeing their pool slots); returns how many.
    fn drop_warm(&self) -> usize {
        let loaded: Vec<Arc<Loaded>> = self.lock_loaded().values().cloned().collect();
        let mut freed = 0;
        for function in loaded {
            let dropped =
                std::mem::take(&mut *function.warm.lock().unwrap_or_else(|p| p.into_inner()));
            freed += dropped.len();
        }
        freed
    }
}

/// Calls the newest version of `name`: the body of [`Executor::call`] and of a guest's
/// nested calls.
pub(crate) async fn run(
    inner: Arc<Inner>,
    name: String,
    input: Vec<u8>,
    depth: u32,
    deadline: Instant,
    session: Session,
    scope: CallScope,
) -> Result<Vec<u8>> {
    let CallScope {
        trace,
        attempt,
        spawner,
        outermost,
    } = scope;
    if depth > inner.config.max_call_depth {
        return Err(Error::CallDepthExceeded {
            function: name,
            limit: inner.config.max_call_depth,
        });
    }
    let started = Instant::now();
    let loaded = match tokio::time::timeout(
        deadline.saturating_duration_since(started),
        inner.resolve(&name),
    )
    .await
    {
        Ok(resolved) => resolved?,
        Err(_) => {
            return Err(Error::Timeout {
                function: name,
                deadline: deadline.saturating_duration_since(started),
            })
        }
    };
    let limits = loaded.limits;
    if input.len() as u64 > limits.max_input_bytes {
        return Err(Error::InputTooLarge {
            size: input.len() as u64,
            limit: limits.max_input_bytes,
        });
    }
    let deadline = deadline.min(started + limits.timeout());
    let budget = deadline.saturating_duration_since(started);
    let function: Arc<str> = Arc::from(name.as_str());
    let call = CallContext {
        executor: Arc::downgrade(&inner) as Weak<dyn Runtime>,
        function: function.clone(),
        deadline,
        depth,
        session,
        fatal: None,
        trace: trace.clone(),
        attempt,
        spawner,
        children: Children::default(),
    };
    let tick = inner.config.epoch_tick.max(Duration::from_millis(1));
    let (mut store, handler, uses) = inner.instance(&loaded, call, true).await?;
    let memory_before = store.data().limiter.memory_in_use;
    // The epoch stops a guest that computes; this outer bound also covers host waits (and is
    // a little later, so a spinning guest is reported by its trap).
    let bound = deadline.saturating_duration_since(Instant::now()) + tick * 4;
    let outcome = match &trace {
        // The step's own call measures its CPU time (its nested calls run within its polls).
        Some(trace) if outermost => {
            let timed = CpuTimed::new(handler.call_handle(&mut store, &input), trace.clone());
            tokio::time::timeout(bound, timed).await
        }
        _ => tokio::time::timeout(bound, handler.call_handle(&mut store, &input)).await,
    };
    let state = store.data_mut();
    log_output(&function, "stdout", &state.stdout, trace.as_ref());
    log_output(&function, "stderr", &state.stderr, trace.as_ref());
    if let (Some(trace), true) = (&trace, outermost) {
        let memory = state.limiter.memory_in_use;
        trace.ran(
            loaded.record.version,
            memory as u64,
            memory.saturating_sub(memory_before) as u64,
        );
    }
    let fatal = state.call.fatal.take();
    // Children the call did not await stop now (a warm instance keeps its state).
    drop(std::mem::take(&mut state.call.children));
    let memory_hit = state.limiter.hit;
    let result = match outcome {
        Err(_) => Err(Error::Timeout {
            function: name.clone(),
            deadline: budget,
        }),
        Ok(Err(error)) => Err(classify(error, fatal, memory_hit, &name, &limits, budget)),
        Ok(Ok(Err(message))) => Err(Error::Failed {
            function: name.clone(),
            message,
        }),
        Ok(Ok(Ok(output))) if output.len() as u64 > limits.max_output_bytes => {
            Err(Error::OutputTooLarge {
                function: name.clone(),
                size: output.len() as u64,
                limit: limits.max_output_bytes,
            })
        }
        Ok(Ok(Ok(output))) => Ok(output),
    };
    // An instance that trapped, timed out or hit a limit is dropped; one that returned
    // (an output or an error of its own) may serve again.
    let reusable = match &result {
        Ok(_) | Err(Error::Failed { .. }) | Err(Error::OutputTooLarge { .. }) => {
            limits.reuse_instances && uses + 1 < inner.config.max_reuses && !memory_hit
        }
        _ => false,
    };
    // Warm instances hold pool slots: at most `warm_cap` are kept.
    if reusable && inner.warm_total.load(Ordering::Relaxed) < inner.warm_cap() {
        let mut warm = loaded.warm.lock().unwrap_or_else(|p| p.into_inner());
        if warm.len() < inner.config.warm_per_function {
            warm.push(Warm {
                store,
                handler,
                uses: uses + 1,
                _slot: WarmSlot::new(&inner.warm_total),
            });
        }
    }
    match &result {
        // A guest's own error is an answer, not an incident; everything else is logged once,
        // by the outermost call (nested ones return it to their caller).
        Err(e @ (Error::Failed { .. } | Error::State(StateError::NotFound { .. }))) => {
            tracing::debug!(function = %name, depth, cause = %e, "call failed")
        }
        Err(e) if outermost => tracing::warn!(function = %name, cause = %e, "call failed"),
        Err(e) => tracing::debug!(function = %name, depth, cause = %e, "nested call failed"),
        Ok(output) => tracing::trace!(function = %name, depth, bytes = output.len(), "call done"),
    }
    result
}

/// Turns a wasmtime error from a call into the executor's error.
fn classify(
    error: wasmtime::Error,
    fatal: Option<Error>,
    memory_hit: bool,
    name: &str,
    limits: &Limits,
    budget: Duration,
) -> Error {
    if let Some(fatal) = fatal {
        return fatal;
    }
    match error.downcast_ref::<Trap>() {
        Some(Trap::Interrupt) => Error::Timeout {
            function: name.to_string(),
            deadline: budget,
        },
        _ if memory_hit => Error::OutOfMemory {
            function: name.to_string(),
            limit: limits.memory_bytes,
        },
        Some(trap) => {
            tracing::debug!(function = name, backtrace = %format!("{error:#}"), "guest trapped");
            Error::Trap {
                function: name.to_string(),
                trap: trap.to_string(),
            }
        }
        None => Error::Trap {
            function: name.to_string(),
            trap: error.to_string(),
        },
    }
}

impl Inner {
    /// A timestamp for an LWW write by this executor, never behind the previous one.
    pub(crate) fn timestamp(&self) -> Timestamp {
        let now = Timestamp::now(self.writer).time;
        let mut last = self.last_time.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_time.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Timestamp::new(next, self.writer),
                Err(actual) => last = actual,
            }
        }
    }

    /// Adds `delta` to this executor's contribution to a counter and returns the whole
    /// contribution (what is merged: retry-safe, since it carries totals, not deltas).
    pub(crate) fn contribute(&self, key: &str, delta: i64) -> Counter {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let contribution = counters.entry(key.to_string()).or_default();
        contribution.add(self.writer, delta);
        contribution.clone()
    }
}

impl Runtime for Inner {
    fn timestamp(&self) -> Timestamp {
        Inner::timestamp(self)
    }

    fn contribute(&self, key: &str, delta: i64) -> Counter {
        Inner::contribute(self, key, delta)
    }

    fn models(&self) -> &Models {
        &self.models
    }

    fn stored_bytes(&self) -> &StoredBytesGuard {
        &self.stored_bytes
    }

    fn call(
        self: Arc<Self>,
        name: String,
        input: Vec<u8>,
        depth: u32,
        deadline: Instant,
        session: Session,
        scope: CallScope,
    ) -> NestedCall {
        Box::pin(run(self, name, input, depth, deadline, session, scope))
    }
}
