//! The host side of the function interface: what a guest's imports do.
//!
//! Each store holds a [`CallState`]: the WASI context (no files, no sockets, no environment;
//! stdout and stderr go to [`GuestOutput`] buffers that the executor writes to its log after
//! each call), the resource limiter, and the [`CallContext`] of the call being served (the
//! function, its deadline, its depth in a chain of calls, and its session of the cache).
//!
//! Host functions that wait (state reads that miss, writes, nested calls) never wait past the
//! call's deadline. A nested call that times out or goes too deep ends the calling guest with
//! a trap whose cause is kept in [`CallContext::fatal`], so the error the caller finally sees
//! is the original one, not "the caller trapped".

use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use squall_lattices::{CausalVersion, Counter, LatticeType, LatticeValue, MultiKeyCausal};
use wasmtime::component::ResourceTable;
use wasmtime::{ResourceLimiter, Result as WasmResult};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use crate::children::{Children, Spawner};
use crate::report::StepTrace;
use crate::runtime::{CallScope, Runtime};
use crate::Error;
use squall_proto::keys::{self, MAX_KEY_BYTES, RESERVED_PREFIX};
use squall_state::session::Session;

use crate::bindings::{self, squall};
pub use bindings::squall::function::invoke::CallError;
pub use bindings::squall::function::log::Level;
pub use bindings::squall::function::state::{Lattice, LatticeType as WitLatticeType, StateError};

/// The data of one store: one instance's host state.
pub struct CallState {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    /// Bytes of `wasi:nn` tensors the guest holds on the host (bounded by its memory limit).
    pub(crate) tensor_bytes: usize,
    /// Enforces the function's memory and table limits.
    pub limiter: Limiter,
    /// The call being served.
    pub call: CallContext,
    /// The guest's stdout.
    pub stdout: GuestOutput,
    /// The guest's stderr.
    pub stderr: GuestOutput,
}

/// What the host knows of the call an instance is serving.
pub struct CallContext {
    /// The executor, through the narrow handle the imports need (weak: a warm instance must
    /// not keep its executor alive).
    pub executor: Weak<dyn Runtime>,
    /// The function's name.
    pub function: Arc<str>,
    /// When the call must be over.
    pub deadline: Instant,
    /// 0 for a call from outside, one more for each nested call.
    pub depth: u32,
    /// The call's view of the cache.
    pub session: Session,
    /// Set when a host function ends the guest because of an error that must reach the
    /// caller as it is (a nested timeout, a too-deep chain).
    pub fatal: Option<Error>,
    /// The step's trace, when its record asks for a report: log lines go there too, and
    /// nested calls share it.
    pub trace: Option<StepTrace>,
    /// Which attempt of its call this is (1: the first).
    pub attempt: u32,
    /// Where the call's children run (`None`: on this executor).
    pub spawner: Option<Arc<dyn Spawner>>,
    /// The children the call started; dropped with the call, which cancels those running.
    pub children: Children,
}

impl CallState {
    /// Fresh host state for a new store.
    pub fn new(call: CallContext, limiter: Limiter, output_capacity: usize) -> Self {
        let stdout = GuestOutput::new(output_capacity);
        let stderr = GuestOutput::new(output_capacity);
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            tensor_bytes: 0,
            limiter,
            call,
            stdout,
            stderr,
        }
    }

    pub(crate) fn remaining(&self) -> std::time::Duration {
        self.call.deadline.saturating_duration_since(Instant::now())
    }
}

/// Runs a store operation within what is left of the call's deadline; its error names keys
/// as a guest of `namespace` names them.
async fn bounded<T>(
    remaining: std::time::Duration,
    namespace: &str,
    op: impl std::future::Future<Output = squall_state::Result<T>>,
) -> Result<T, StateError> {
    {
        match tokio::time::timeout(remaining, op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(in_guest_terms(state_error(e), namespace)),
            Err(_) => Err(StateError::Unavailable(
                "the call's deadline passed while waiting for the store".into(),
            )),
        }
    }
}

/// `error` with the store keys of `namespace` it names shown as its guests name them.
fn in_guest_terms(error: StateError, namespace: &str) -> StateError {
    let prefix = keys::user_prefix(namespace);
    let shown = |message: String| message.replace(&prefix, "");
    match error {
        StateError::TypeMismatch(m) => StateError::TypeMismatch(shown(m)),
        StateError::Invalid(m) => StateError::Invalid(shown(m)),
        StateError::Unavailable(m) => StateError::Unavailable(shown(m)),
    }
}

impl CallState {
    pub(crate) fn executor(&self) -> WasmResult<Arc<dyn Runtime>> {
        self.call
            .executor
            .upgrade()
            .ok_or_else(|| wasmtime::Error::msg("the executor is shutting down"))
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn state_error(e: squall_state::Error) -> StateError {
    use squall_state::Error as E;
    match e {
        E::Kvs(squall_kvs::Error::Key {
            error: squall_kvs::KeyError::TypeMismatch(m),
            ..
        }) => StateError::TypeMismatch(m.to_string()),
        E::Kvs(squall_kvs::Error::Key { error, .. }) => StateError::Invalid(error.to_string()),
        E::Kvs(other) => StateError::Unavailable(other.to_string()),
        E::BadValue { reason, .. } => StateError::Invalid(reason),
        e @ E::ModeMismatch { .. } => StateError::TypeMismatch(e.to_string()),
        other => StateError::Unavailable(other.to_string()),
    }
}

fn decode_lattice(value: &Lattice) -> Result<LatticeValue, StateError> {
    let decoded: LatticeValue = rmp_serde::from_slice(&value.encoded)
        .map_err(|e| StateError::Invalid(format!("undecodable lattice value: {e}")))?;
    if to_wit_type(decoded.lattice_type()) != value.kind {
        return Err(StateError::Invalid(format!(
            "the value is a {}, not the declared type",
            decoded.lattice_type().name()
        )));
    }
    decoded
        .check_limits()
        .map_err(|e| StateError::Invalid(e.to_string()))?;
    Ok(decoded)
}

/// `value` with the keys its causal versions depend on renamed by `rename` (dropped where it
/// answers `None`); other types as they are.
fn rename_dependencies(
    value: LatticeValue,
    rename: impl Fn(&str) -> Option<String>,
) -> LatticeValue {
    let LatticeValue::MultiCausal(register) = value else {
        return value;
    };
    let versions = register.versions().iter().map(|version| CausalVersion {
        clock: version.clock.clone(),
        dependencies: version
            .dependencies
            .iter()
            .filter_map(|(key, clock)| Some((rename(key)?, clock.clone())))
            .collect(),
        value: version.value.clone(),
    });
    LatticeValue::MultiCausal(MultiKeyCausal::from_versions(versions))
}

/// A value from a guest of `namespace`: the keys it says it depends on are that namespace's
/// ([`keys::user`]), like every key a guest names.
fn stored_dependencies(value: LatticeValue, namespace: &str) -> LatticeValue {
    rename_dependencies(value, |key| Some(keys::user(namespace, key)))
}

/// A value for a guest of `namespace`: its dependencies named as the guest names keys (none
/// of another namespace's, which no write of this namespace can hold anyway).
fn shown_dependencies(value: LatticeValue, namespace: &str) -> LatticeValue {
    rename_dependencies(value, |key| {
        keys::tenant_key(key)
            .filter(|(owner, _)| *owner == namespace)
            .map(|(_, key)| key.to_string())
    })
}

fn encode_lattice(value: &LatticeValue) -> Result<Lattice, StateError> {
    Ok(Lattice {
        kind: to_wit_type(value.lattice_type()),
        encoded: rmp_serde::to_vec(value)
            .map_err(|e| StateError::Invalid(format!("cannot encode the value: {e}")))?,
    })
}

fn to_wit_type(t: LatticeType) -> WitLatticeType {
    use WitLatticeType as W;
    match t {
        LatticeType::Lww => W::Lww,
        LatticeType::Set => W::Set,
        LatticeType::OrderedSet => W::OrderedSet,
        LatticeType::Max => W::Max,
        LatticeType::Min => W::Min,
        LatticeType::Bool => W::Bool,
        LatticeType::Counter => W::Counter,
        LatticeType::Priority => W::Priority,
        LatticeType::Map => W::Map,
        LatticeType::SingleCausal => W::SingleCausal,
        LatticeType::MultiCausal => W::MultiCausal,
    }
}

fn mismatch(key: &str, found: &LatticeValue, wanted: LatticeType) -> StateError {
    StateError::TypeMismatch(format!(
        "key {key:?} holds a {}, not a {}",
        found.lattice_type().name(),
        wanted.name()
    ))
}

impl squall::function::state::Host for CallState {
    async fn get(&mut self, key: String) -> WasmResult<Result<Option<Lattice>, StateError>> {
        let read = self.read_named(&key).await;
        let namespace = self.namespace();
        Ok(read.and_then(|value| {
            value
                .map(|v| encode_lattice(&shown_dependencies(v, namespace)))
                .transpose()
        }))
    }

    async fn merge(&mut self, key: String, value: Lattice) -> WasmResult<Result<(), StateError>> {
        let stored = match self.writable_key(&key).await? {
            Ok(stored) => stored,
            Err(e) => return Ok(Err(e)),
        };
        let value = match decode_lattice(&value) {
            Ok(v) => stored_dependencies(v, self.namespace()),
            Err(e) => return Ok(Err(e)),
        };
        let written = bounded(
            self.remaining(),
            keys::split(&self.call.function).0,
            self.call.session.merge(&stored, value),
        )
        .await;
        Ok(written.map(|_| ()))
    }

    async fn get_bytes(&mut self, key: String) -> WasmResult<Result<Option<Vec<u8>>, StateError>> {
        let read = self.read_named(&key).await;
        Ok(read.and_then(|value| match value {
            None => Ok(None),
            Some(LatticeValue::Lww(register)) => Ok(Some(register.value.to_vec())),
            // Concurrent causal writes are siblings; the bytes are the first in the register's
            // canonical order, as Cloudburst's readers take (`get` returns them all).
            Some(LatticeValue::MultiCausal(register)) => {
                Ok(register.values().next().map(|v| v.to_vec()))
            }
            Some(LatticeValue::SingleCausal(register)) => {
                Ok(register.values().next().map(|v| v.to_vec()))
            }
            Some(other) => Err(mismatch(&key, &other, LatticeType::Lww)),
        }))
    }

    async fn put_bytes(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> WasmResult<Result<(), StateError>> {
        let stored = match self.writable_key(&key).await? {
            Ok(stored) => stored,
            Err(e) => return Ok(Err(e)),
        };
        let stamp = self.executor()?.timestamp();
        let written = bounded(
            self.remaining(),
            keys::split(&self.call.function).0,
            self.call.session.put_bytes(&stored, value.into(), stamp),
        )
        .await;
        Ok(written.map(|_| ()))
    }

    async fn add(&mut self, key: String, delta: i64) -> WasmResult<Result<i64, StateError>> {
        let stored = match self.writable_key(&key).await? {
            Ok(stored) => stored,
            Err(e) => return Ok(Err(e)),
        };
        let executor = self.executor()?;
        let contribution = executor.contribute(&stored, delta);
        let remaining = self.remaining();
        let written = bounded(
            remaining,
            keys::split(&self.call.function).0,
            self.call
                .session
                .merge(&stored, LatticeValue::Counter(contribution)),
        )
        .await;
        Ok(written.and_then(|merged| match merged {
            LatticeValue::Counter(counter) => Ok(saturate(&counter)),
            other => Err(mismatch(&key, &other, LatticeType::Counter)),
        }))
    }
}

impl CallState {
    /// The store key of a key the function names: checked ([`check_key`]) and mapped into the
    /// function's namespace ([`keys::user`]) by the host, whatever the guest wrote.
    fn stored_key(&self, key: &str) -> Result<String, StateError> {
        check_key(key)?;
        Ok(keys::user(self.namespace(), key))
    }

    /// The store key of a key the function writes ([`Self::stored_key`]), if its namespace
    /// may store more now (its `max_stored_bytes` quota, checked by the host).
    async fn writable_key(&mut self, key: &str) -> WasmResult<Result<String, StateError>> {
        let stored = match self.stored_key(key) {
            Ok(stored) => stored,
            Err(e) => return Ok(Err(e)),
        };
        let guard = self.executor()?.stored_bytes().clone();
        let remaining = self.remaining();
        Ok(
            match tokio::time::timeout(remaining, guard.check(self.namespace())).await {
                Ok(Ok(())) => Ok(stored),
                Ok(Err(over)) => Err(StateError::Invalid(over.to_string())),
                Err(_) => Err(StateError::Unavailable(
                    "the call's deadline passed while reading its namespace's quota".into(),
                )),
            },
        )
    }

    /// The namespace of the function being served.
    fn namespace(&self) -> &str {
        keys::split(&self.call.function).0
    }

    /// Reads the key the function names, within the call's deadline.
    async fn read_named(&mut self, key: &str) -> Result<Option<LatticeValue>, StateError> {
        let stored = self.stored_key(key)?;
        bounded(
            self.remaining(),
            keys::split(&self.call.function).0,
            self.call.session.get(&stored),
        )
        .await
    }
}

/// Checks a key a function names: 1 to [`MAX_KEY_BYTES`] bytes (keys are held in caches and
/// shard maps, so a guest must not make them arbitrarily large), and outside Squall's reserved
/// prefix (a function's keys are mapped into its namespace anyway; a key that looks like
/// Squall's own is refused so that nobody believes it reached them).
fn check_key(key: &str) -> Result<(), StateError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(StateError::Invalid(format!(
            "keys must be 1 to {MAX_KEY_BYTES} bytes long, not {}",
            key.len()
        )));
    }
    if keys::is_reserved(key) {
        return Err(StateError::Invalid(format!(
            "keys under {RESERVED_PREFIX:?} are reserved for Squall itself"
        )));
    }
    Ok(())
}

fn saturate(counter: &Counter) -> i64 {
    let value = counter.value();
    i64::try_from(value).unwrap_or(if value < 0 { i64::MIN } else { i64::MAX })
}

impl squall::function::invoke::Host for CallState {
    async fn call(
        &mut self,
        name: String,
        input: Vec<u8>,
    ) -> WasmResult<Result<Vec<u8>, CallError>> {
        // A guest names functions of its own namespace: a plain name, qualified by the host.
        if let Err(e) = keys::validate_name(&name) {
            return Ok(Err(CallError::NotFound(e.to_string())));
        }
        let qualified = keys::qualify(keys::split(&self.call.function).0, &name);
        let executor = self.executor()?;
        let depth = self.call.depth + 1;
        let deadline = self.call.deadline;
        // The nested call shares the caller's session: in repeatable read, the run's pins.
        let session = self.call.session.clone();
        let trace = self.call.trace.clone();
        let scope = CallScope {
            trace: trace.clone(),
            attempt: self.call.attempt,
            spawner: self.call.spawner.clone(),
            outermost: false,
        };
        // What the step's record keeps of the call (when it asks for a report).
        let noted = trace.as_ref().map(|_| {
            (
                name.clone(),
                input.len() as u64,
                crate::report::now_us(),
                Instant::now(),
            )
        });
        let nested = executor
            .call(qualified, input, depth, deadline, session, scope)
            .await;
        if let (Some(trace), Some((function, input_bytes, start_us, started))) = (trace, noted) {
            let (output_bytes, error) = match &nested {
                Ok(output) => (Some(output.len() as u64), None),
                Err(e) => {
                    let mut error = e.to_string();
                    squall_proto::report::truncate_line(
                        &mut error,
                        squall_proto::report::MAX_LINE_BYTES,
                    );
                    (None, Some(error))
                }
            };
            trace.nested(squall_proto::report::NestedCall {
                function,
                caller: self.call.function.to_string(),
                depth,
                start_us,
                duration_us: started.elapsed().as_micros().try_into().unwrap_or(u64::MAX),
                input_bytes,
                output_bytes,
                error,
            });
        }
        match nested {
            Ok(output) => Ok(Ok(output)),
            Err(Error::State(squall_state::Error::NotFound { name })) => {
                Ok(Err(CallError::NotFound(name)))
            }
            Err(Error::Failed { function, message }) => {
                Ok(Err(CallError::Failed(format!("{function}: {message}"))))
            }
            Err(Error::State(squall_state::Error::InvalidName { name, reason })) => {
                Ok(Err(CallError::NotFound(format!("{name} ({reason})"))))
            }
            Err(fatal) => {
                let message = fatal.to_string();
                self.call.fatal = Some(fatal);
                Err(wasmtime::Error::msg(message))
            }
        }
    }
}

impl squall::function::context::Host for CallState {
    async fn attempt(&mut self) -> WasmResult<u32> {
        Ok(self.call.attempt.max(1))
    }
}

impl squall::function::log::Host for CallState {
    async fn log(&mut self, level: Level, message: String) -> WasmResult<()> {
        let function = &*self.call.function;
        let message: String = message.chars().take(4096).collect();
        if let Some(trace) = &self.call.trace {
            let stream = match level {
                Level::Trace => "trace",
                Level::Debug => "debug",
                Level::Info => "info",
                Level::Warn => "warn",
                Level::Error => "error",
            };
            trace.log(stream, function, message.clone());
        }
        match level {
            Level::Trace => tracing::trace!(target: "squall::guest", function, "{message}"),
            Level::Debug => tracing::debug!(target: "squall::guest", function, "{message}"),
            Level::Info => tracing::info!(target: "squall::guest", function, "{message}"),
            Level::Warn => tracing::warn!(target: "squall::guest", function, "{message}"),
            Level::Error => tracing::error!(target: "squall::guest", function, "{message}"),
        }
        Ok(())
    }
}

/// Limits memories and tables of one store, and remembers whether a limit was hit (so a trap
/// that follows can be reported as running out of memory).
#[derive(Debug, Clone)]
pub struct Limiter {
    /// Bytes each linear memory may grow to.
    pub memory_bytes: usize,
    /// Elements each table may grow to.
    pub table_elements: usize,
    /// Set when a growth was refused.
    pub hit: bool,
    /// Bytes of linear memory the store's memories hold now.
    pub memory_in_use: usize,
}

/// Instances, tables and memories one store may hold: a component of the handler world built
/// by Rust has a handful of each.
const MAX_INSTANCES: usize = 32;
const MAX_TABLES: usize = 32;
const MAX_MEMORIES: usize = 8;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WasmResult<bool> {
        if desired > self.memory_bytes {
            self.hit = true;
            return Ok(false);
        }
        self.memory_in_use = self
            .memory_in_use
            .saturating_add(desired.saturating_sub(current));
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> WasmResult<bool> {
        if desired > self.table_elements {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// A guest's stdout or stderr: a bounded buffer the executor drains into its log after each
/// call. Writes beyond the capacity are dropped (and counted), never an error, so a chatty
/// guest cannot fail because of its logging.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    inner: Arc<Mutex<OutputBuffer>>,
}

#[derive(Debug)]
struct OutputBuffer {
    bytes: Vec<u8>,
    capacity: usize,
    dropped: usize,
}

impl GuestOutput {
    fn new(capacity: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(OutputBuffer {
                bytes: Vec::new(),
                capacity,
                dropped: 0,
            })),
        }
    }

    fn append(&self, data: &[u8]) {
        let mut buffer = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let room = buffer.capacity.saturating_sub(buffer.bytes.len());
        let kept = data.len().min(room);
        buffer.bytes.extend_from_slice(&data[..kept]);
        buffer.dropped += data.len() - kept;
    }

    /// Takes what was written since the last call, and how many bytes were dropped.
    pub fn take(&self) -> (Vec<u8>, usize) {
        let mut buffer = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = std::mem::take(&mut buffer.dropped);
        (std::mem::take(&mut buffer.bytes), dropped)
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 << 10)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.append(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// Writes a guest's captured output to the log, one event per line, and to the step's trace
/// if it has one.
pub fn log_output(
    function: &str,
    stream: &'static str,
    output: &GuestOutput,
    trace: Option<&StepTrace>,
) {
    let (bytes, dropped) = output.take();
    if let Some(trace) = trace {
        trace.output(stream, function, &bytes, dropped);
    }
    if !bytes.is_empty() {
        for line in String::from_utf8_lossy(&bytes).lines() {
            tracing::info!(target: "squall::guest", function, stream, "{line}");
        }
    }
    if dropped > 0 {
        tracing::warn!(target: "squall::guest", function, stream, dropped, "guest output beyond the buffer was dropped");
    }
}
