//! The scheduler: takes invocations, places their steps, sends the plans, and answers the
//! caller when the sink (or a failing step) reports.
//!
//! It keeps no state that must survive it: DAGs are read from the store (through a cache the
//! store keeps fresh by push), executors announce themselves by heartbeat, and the calls in
//! flight are only needed to answer their callers. Any number of schedulers can run; a gateway
//! may use any of them.
//!
//! Every wait has a deadline. A call whose deadline passes fails with `timeout`; a call
//! holding steps on an executor that stops sending heartbeats fails with `executor_lost` as
//! soon as the executor is declared gone (well before the call's own deadline), and the
//! executor is no longer placed on. An executor that comes back on the same address under a
//! new id has lost its steps too, and its calls fail the same way. Steps finishing are not
//! reported to the scheduler (that would add a message per step to the fast path), so a lost
//! executor fails its calls even when its own steps of them had already run.
//!
//! When a call fails, its executors are told ([`Message::Cancel`]) so steps waiting for an
//! input that will never come are dropped at once; when a repeatable-read call ends, they
//! release the versions it pinned ([`Message::Release`]). Every registered function is kept
//! warm on at least one executor.
//!
//! Causal calls of one client session (`InvokeOptions::session`) start from the cut of the
//! session's earlier calls: the scheduler keeps, per session, the clocks its runs read and
//! wrote (reported with each sink's [`Message::Done`]) and sends them as the plan's floors.
//! Gateways send a session's calls to one scheduler (rendezvous hashing of its id, see
//! [`crate::client::session_scheduler`]), so a session lives in that scheduler's memory: the
//! [`SESSIONS`] most recently used are kept, and a session forgotten (evicted, or its
//! scheduler restarted) starts again from no floors. An asynchronous call's sink stores the
//! result before it reports the cut, so a client that reads the result and calls again at
//! once can start before its session's cut is raised.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::{HashMap, HashSet};
use squall_lattices::causal::raise_all;
use squall_lattices::Dependencies;
use squall_proto::call::{
    Artifact, CallId, CallResult, Consistency, ExecutorStatus, Failure, FailureCode, Invocation,
    InvokeOptions, LimitsRequest, Message, Outcome, Plan, Target,
};
use squall_proto::fabric::{Fabric, Mailbox};
use squall_proto::keys;
use squall_proto::report::StepReport;
use squall_state::dag::{DagRegistry, Shape};
use squall_state::namespaces::Namespaces;
use squall_state::results::store_result;
use squall_state::{ClientPool, Registry};
use tokio::task::JoinHandle;

use crate::placement::{choose, least_loaded, Candidate};

/// How a scheduler behaves.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// An executor without a heartbeat for this long is gone.
    pub heartbeat_timeout: Duration,
    /// A call's deadline unless the caller sets one.
    pub default_timeout: Duration,
    /// The longest deadline a caller may set.
    pub max_timeout: Duration,
    /// How often it checks that every function is warm somewhere.
    pub warm_interval: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_secs(1),
            default_timeout: Duration::from_secs(30),
            max_timeout: Duration::from_secs(300),
            warm_interval: Duration::from_secs(1),
        }
    }
}

/// Extra time after a call's deadline before the scheduler fails it itself (the executor
/// running it reports its own timeout first).
const DEADLINE_GRACE: Duration = Duration::from_millis(250);

/// How long before asking again to warm a function that is still not warm anywhere.
const WARM_RETRY: Duration = Duration::from_secs(5);

/// A running scheduler. Dropping it stops it.
#[derive(Debug)]
pub struct Scheduler {
    addr: String,
    task: JoinHandle<()>,
}

impl Scheduler {
    /// Starts serving `mailbox`. `kvs` reads functions and writes failed asynchronous
    /// results; `dags` resolves DAG names. Must be called inside a tokio runtime.
    pub fn start(
        mailbox: Mailbox,
        kvs: ClientPool,
        dags: DagRegistry,
        config: SchedulerConfig,
    ) -> Self {
        let addr = mailbox.addr().to_string();
        let shared = Arc::new(Shared {
            fabric: mailbox.fabric().clone(),
            addr: addr.clone(),
            functions: Registry::direct(kvs.clone()),
            namespaces: Namespaces::new(kvs.clone()),
            kvs,
            dags,
            config,
            state: Mutex::new(State::default()),
            warming: AtomicBool::new(false),
        });
        tracing::info!(addr = %addr, "scheduler serving");
        let task = tokio::spawn(serve(shared, mailbox));
        Self { addr, task }
    }

    /// Its mailbox's address (executors send heartbeats here, gateways send invocations).
    pub fn addr(&self) -> &str {
        &self.addr
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    fabric: Arc<Fabric>,
    addr: String,
    kvs: ClientPool,
    functions: Registry,
    namespaces: Namespaces,
    dags: DagRegistry,
    config: SchedulerConfig,
    state: Mutex<State>,
    /// A keep-warm round is running.
    warming: AtomicBool,
}

struct State {
    executors: HashMap<String, Known>,
    calls: HashMap<CallId, Tracked>,
    /// Invocations abandoned before they were tracked (an `Abandon` that overtook its
    /// `Invoke`'s placement), by (reply_to, request), until when they are remembered.
    abandoned: HashMap<(String, u64), Instant>,
    warm_asked: HashMap<String, Instant>,
    /// Causal sessions: the cut of each session's calls so far.
    sessions: lru::LruCache<String, Dependencies>,
}

/// How many causal sessions a scheduler remembers (the least recently used are forgotten).
pub const SESSIONS: usize = 100_000;

impl Default for State {
    fn default() -> Self {
        Self {
            executors: HashMap::new(),
            calls: HashMap::new(),
            abandoned: HashMap::new(),
            warm_asked: HashMap::new(),
            sessions: lru::LruCache::new(
                std::num::NonZeroUsize::new(SESSIONS).unwrap_or(std::num::NonZeroUsize::MIN),
            ),
        }
    }
}

/// An executor, as its heartbeats describe it.
struct Known {
    status: ExecutorStatus,
    keys: HashSet<String>,
    seen: Instant,
    dispatched: u32,
}

/// A call in flight.
struct Tracked {
    call: CallId,
    name: String,
    request: u64,
    reply_to: Option<String>,
    result_key: Option<String>,
    deadline: Instant,
    /// The executor of each step (addresses, one entry per step).
    executors: Vec<String>,
    placement: Vec<(String, String)>,
    /// The call's mode: a repeatable-read or causal call's executors release its pins when
    /// it ends.
    consistency: Consistency,
    /// Causal: the call's client session.
    session: Option<String>,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn serve(shared: Arc<Shared>, mut mailbox: Mailbox) {
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warm = tokio::time::interval(shared.config.warm_interval);
    warm.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = mailbox.recv() => {
                let Some(message) = message else { return };
                handle(&shared, message);
            }
            _ = tick.tick() => expire(&shared),
            // One round at a time: a slow store must not pile rounds up.
            _ = warm.tick() => {
                if shared.warming.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let shared = shared.clone();
                tokio::spawn(async move {
                    keep_warm(&shared).await;
                    shared.warming.store(false, Ordering::Release);
                });
            }
        }
    }
}

fn handle(shared: &Arc<Shared>, message: Message) {
    match message {
        Message::Heartbeat(status) => heartbeat(shared, status),
        Message::Invoke {
            request,
            reply_to,
            target,
            input,
            options,
        } => invoke_message(shared, request, reply_to, target, input, options),
        Message::Done {
            call,
            outcome,
            cut,
            reports,
        } => done(shared, call, outcome, cut, reports),
        Message::Register {
            request,
            reply_to,
            kind,
            name,
            code,
            limits,
        } => register(shared, request, reply_to, kind, name, code, limits),
        Message::Refresh { keys } => refresh(shared, keys),
        Message::Status { request, reply_to } => status(shared, request, reply_to),
        Message::Abandon { request, reply_to } => abandon(shared, request, &reply_to),
        other => {
            tracing::warn!(
                message = other.kind(),
                "message not meant for a scheduler dropped"
            )
        }
    }
}

/// An executor's heartbeat: it joins, or its status and held keys are refreshed; a new executor on a known address fails the old one's calls.
fn heartbeat(shared: &Arc<Shared>, status: ExecutorStatus) {
    let mut state = shared.state();
    let keys = status.keys.iter().cloned().collect();
    let restarted = state
        .executors
        .get(&status.addr)
        .filter(|known| known.status.id != status.id)
        .map(|known| known.status.id.clone());
    if let Some(old) = restarted {
        // A new executor on a gone one's address: the old one's steps are lost.
        tracing::warn!(old = %old, new = %status.id, addr = %status.addr, "executor restarted");
        state.executors.remove(&status.addr);
        let lost = [(status.addr.clone(), old)];
        let mut failed = fail_calls_on(&mut state, &lost, "restarted");
        failed.extend(orphans_of(&mut state, &lost));
        drop(state);
        for (tracked, failure) in failed {
            finish(shared, tracked, Err(failure), Vec::new());
        }
        state = shared.state();
    }
    match state.executors.get_mut(&status.addr) {
        Some(known) => {
            known.status = status;
            known.keys = keys;
            known.seen = Instant::now();
        }
        None => {
            tracing::info!(id = %status.id, addr = %status.addr, serves = ?status.serves, "executor joined");
            state.executors.insert(
                status.addr.clone(),
                Known {
                    status,
                    keys,
                    seen: Instant::now(),
                    dispatched: 0,
                },
            );
        }
    }
}

/// A call to place and run; a call that cannot be placed is answered at once.
fn invoke_message(
    shared: &Arc<Shared>,
    request: u64,
    reply_to: Option<String>,
    target: Target,
    input: Bytes,
    options: InvokeOptions,
) {
    let shared = shared.clone();
    tokio::spawn(async move {
        if let Err(mut failure) =
            invoke(&shared, request, reply_to.clone(), &target, input, &options).await
        {
            // No executor serves a function that is not registered at all: say so.
            if let (FailureCode::NoCapacity, Some(function)) = (failure.code, &failure.step) {
                if let Ok(None) = shared.functions.newest(function).await {
                    failure = Failure {
                        code: FailureCode::NotFound,
                        message: format!("function {function:?} is not registered"),
                        step: failure.step.clone(),
                    };
                }
            }
            // Never placed: no executor to cancel on.
            let tracked = Tracked {
                call: 0,
                name: target.name().to_string(),
                request,
                reply_to,
                result_key: options.result_key,
                deadline: Instant::now(),
                executors: Vec::new(),
                placement: Vec::new(),
                consistency: options.consistency,
                session: None,
            };
            finish(&shared, tracked, Err(failure), Vec::new());
        }
    });
}

/// A call's outcome from its sink (or a failing step): answer the caller, and raise a causal session's floors.
fn done(
    shared: &Arc<Shared>,
    call: CallId,
    outcome: Result<Outcome, Failure>,
    cut: Dependencies,
    reports: Vec<StepReport>,
) {
    let tracked = untrack(shared, call);
    match tracked {
        Some(tracked) => {
            if let (Some(session), Ok(_)) = (&tracked.session, &outcome) {
                let mut state = shared.state();
                match state.sessions.get_mut(session) {
                    Some(floors) => raise_all(floors, &cut),
                    None => {
                        state.sessions.put(session.clone(), cut);
                    }
                }
            }
            finish(shared, tracked, outcome, reports)
        }
        // A second failure of a call that already failed, or a call given up on.
        None => tracing::debug!(call, "outcome of a call no longer tracked"),
    }
}

/// A registration: forwarded to an executor that serves the function (any executor checks a model).
fn register(
    shared: &Arc<Shared>,
    request: u64,
    reply_to: String,
    kind: Artifact,
    name: String,
    code: Bytes,
    limits: LimitsRequest,
) {
    let to = {
        let state = shared.state();
        let candidates = candidates(&state);
        // A function goes to an executor that serves it (and warms it there); any
        // executor can check a model.
        let chosen = match kind {
            Artifact::Function => choose(&candidates, &name, &[], &[]),
            Artifact::Model => least_loaded(&candidates),
        };
        chosen
            .map(|i| candidates[i].status.addr.clone())
            .ok_or_else(|| no_executor(&state, &name))
    };
    let forwarded = match to {
        Ok(to) => shared
            .fabric
            .send(
                &to,
                Message::Register {
                    request,
                    reply_to: reply_to.clone(),
                    kind,
                    name,
                    code,
                    limits,
                },
            )
            .map_err(|e| Failure::new(FailureCode::Unavailable, e.to_string())),
        Err(reason) => Err(Failure::new(FailureCode::NoCapacity, reason)),
    };
    if let Err(failure) = forwarded {
        reply(
            shared,
            &reply_to,
            Message::Registered {
                request,
                result: Err(failure),
            },
        );
    }
}

/// Records changed: read them from the store next time, here and on every executor.
fn refresh(shared: &Arc<Shared>, keys: Vec<String>) {
    for key in &keys {
        shared.dags.refresh(key);
    }
    // To every executor, ahead of any plan this scheduler sends it later.
    let executors: Vec<String> = shared.state().executors.keys().cloned().collect();
    for addr in executors {
        let message = Message::Refresh { keys: keys.clone() };
        if let Err(e) = shared.fabric.send(&addr, message) {
            tracing::debug!(executor = %addr, cause = %e, "refresh not sent");
        }
    }
}

/// The executors' statuses, for the gateway and the monitor.
fn status(shared: &Arc<Shared>, request: u64, reply_to: String) {
    let executors = shared
        .state()
        .executors
        .values()
        .map(|k| k.status.clone())
        .collect();
    reply(
        shared,
        &reply_to,
        Message::StatusReport { request, executors },
    );
}

/// The executors to place on: those not draining, or, if all are, every one (a draining
/// executor still runs what it is given).
fn candidates(state: &State) -> Vec<Candidate<'_>> {
    let all_draining = state.executors.values().all(|k| k.status.draining);
    state
        .executors
        .values()
        .filter(|k| all_draining || !k.status.draining)
        .map(|k| Candidate {
            status: &k.status,
            keys: &k.keys,
            dispatched: k.dispatched,
        })
        .collect()
}

/// Why no executor can run `function`.
fn no_executor(state: &State, function: &str) -> String {
    if state.executors.is_empty() {
        "no executor has joined this scheduler".to_string()
    } else {
        format!("no executor serves function {function:?}")
    }
}

/// Stops tracking a call; `None` if it was not tracked (already answered).
fn untrack(shared: &Shared, call: CallId) -> Option<Tracked> {
    let mut state = shared.state();
    let tracked = state.calls.remove(&call)?;
    undispatch(&mut state, &tracked.executors);
    Some(tracked)
}

fn undispatch(state: &mut State, executors: &[String]) {
    for addr in executors {
        if let Some(known) = state.executors.get_mut(addr) {
            known.dispatched = known.dispatched.saturating_sub(1);
        }
    }
}

/// Resolves, places and starts a call.
async fn invoke(
    shared: &Arc<Shared>,
    request: u64,
    reply_to: Option<String>,
    target: &Target,
    input: Bytes,
    options: &InvokeOptions,
) -> Result<(), Failure> {
    let timeout = options
        .timeout_ms
        .map_or(shared.config.default_timeout, Duration::from_millis)
        .min(shared.config.max_timeout);
    let started = Instant::now();
    let mut shape = match target {
        Target::Function(name) => {
            squall_state::registry::validate_name(name)
                .map_err(|e| Failure::new(FailureCode::BadRequest, e.to_string()))?;
            Shape::single(name)
        }
        Target::Dag(name) => {
            let record = shared.dags.get(name).await.map_err(|e| e.failure())?;
            let record = record.ok_or_else(|| {
                Failure::new(
                    FailureCode::NotFound,
                    format!("DAG {name:?} is not registered"),
                )
            })?;
            Shape::of(&record.spec)
                .map_err(|e| e.failure())?
                .in_namespace(keys::split(name).0)
        }
    };
    let call: CallId = rand::random();
    let causal = options.consistency == Consistency::Causal;
    let (executors, placement, floors) = {
        let mut state = shared.state();
        let mut chosen: Vec<String> = Vec::with_capacity(shape.steps.len());
        let mut placement = Vec::with_capacity(shape.steps.len());
        for step in &mut shape.steps {
            let candidates = candidates(&state);
            let near: Vec<&str> = step
                .inputs
                .iter()
                .filter_map(|&i| chosen.get(i as usize).map(String::as_str))
                .collect();
            let Some(index) = choose(&candidates, &step.function, &options.keys, &near) else {
                let message = no_executor(&state, &step.function);
                // Steps placed so far count no more.
                undispatch(&mut state, &chosen);
                return Err(Failure {
                    code: FailureCode::NoCapacity,
                    message,
                    step: Some(step.function.clone()),
                });
            };
            let addr = candidates[index].status.addr.clone();
            placement.push((step.function.clone(), candidates[index].status.id.clone()));
            // Counted at once, so the next step of this DAG sees the load it adds.
            if let Some(known) = state.executors.get_mut(&addr) {
                known.dispatched += 1;
            }
            step.executor = addr.clone();
            chosen.push(addr);
        }
        let deadline = started + timeout;
        let abandoned = reply_to
            .as_ref()
            .is_some_and(|to| state.abandoned.remove(&(to.clone(), request)).is_some());
        if abandoned {
            undispatch(&mut state, &chosen);
            return Err(Failure::new(
                FailureCode::Cancelled,
                "the call that started it ended or cancelled it",
            ));
        }
        state.calls.insert(
            call,
            Tracked {
                call,
                name: target.name().to_string(),
                request,
                reply_to,
                result_key: options.result_key.clone(),
                deadline,
                executors: chosen.clone(),
                placement: placement.clone(),
                consistency: options.consistency,
                session: causal.then(|| options.session.clone()).flatten(),
            },
        );
        let floors = match (&options.session, causal) {
            (Some(session), true) => state.sessions.get(session).cloned().unwrap_or_default(),
            _ => Dependencies::new(),
        };
        (chosen, placement, floors)
    };
    let plan = Arc::new(Plan {
        call,
        name: target.name().to_string(),
        steps: shape.steps,
        timeout_ms: timeout
            .saturating_sub(started.elapsed())
            .as_millis()
            .try_into()
            .unwrap_or(u64::MAX),
        consistency: options.consistency,
        read_set: if causal {
            options.keys.clone()
        } else {
            Vec::new()
        },
        floors,
        report_to: shared.addr.clone(),
        result_key: options.result_key.clone(),
        report: options.report,
        attempt: options.attempt,
        chain: options.chain,
        depth: options.depth,
    });
    tracing::trace!(call, name = %plan.name, ?placement, "call placed");
    let mut sent: HashSet<&str> = HashSet::new();
    for addr in &executors {
        if !sent.insert(addr.as_str()) {
            continue;
        }
        let message = Message::Schedule {
            plan: plan.clone(),
            input: input.clone(),
        };
        if let Err(e) = shared.fabric.send(addr, message) {
            let tracked = untrack(shared, call);
            if let Some(tracked) = tracked {
                let failure =
                    Failure::new(FailureCode::Unavailable, format!("sending the plan: {e}"));
                finish(shared, tracked, Err(failure), Vec::new());
            }
            return Ok(());
        }
    }
    Ok(())
}

/// Answers the caller of a finished call (and stores an asynchronous call's failure).
fn finish(
    shared: &Arc<Shared>,
    tracked: Tracked,
    outcome: Result<Outcome, Failure>,
    reports: Vec<StepReport>,
) {
    if outcome.is_ok() && tracked.consistency.pins() {
        tell(shared, &tracked, Message::Release { call: tracked.call });
    }
    if let Err(failure) = &outcome {
        tracing::debug!(name = %tracked.name, code = failure.code.as_str(), %failure, "call failed");
        // Cancelling also releases the call's pins.
        tell(shared, &tracked, Message::Cancel { call: tracked.call });
        if let Some(key) = tracked.result_key.clone() {
            let kvs = shared.kvs.clone();
            let failure = failure.clone();
            tokio::spawn(async move {
                if let Err(e) = store_result(&kvs, &key, CallResult::Failed(failure)).await {
                    tracing::warn!(key = %key, cause = %e, "failure of an asynchronous call not stored");
                }
            });
        }
    }
    let Some(reply_to) = tracked.reply_to else {
        return;
    };
    let result = outcome.map(|outcome| Invocation {
        output: match outcome {
            Outcome::Output(output) => Some(output),
            Outcome::Stored => None,
        },
        placement: tracked.placement,
    });
    reply(
        shared,
        &reply_to,
        Message::Invoked {
            request: tracked.request,
            result,
            reports,
        },
    );
}

/// How long an `Abandon` that found no call is remembered, for the `Invoke` it overtook.
const ABANDONED_FOR: Duration = Duration::from_secs(30);

/// Abandons remembered at most (each a few dozen bytes).
const MAX_ABANDONED: usize = 100_000;

/// Cancels the call that `reply_to` started with `request`, whose caller no longer waits (a
/// child call whose parent ended or cancelled it): its executors drop it, running steps
/// included. A call already answered is not tracked any more, and nothing happens.
fn abandon(shared: &Arc<Shared>, request: u64, reply_to: &str) {
    let call = {
        let mut state = shared.state();
        let call = state
            .calls
            .values()
            .find(|t| t.request == request && t.reply_to.as_deref() == Some(reply_to))
            .map(|t| t.call);
        if call.is_none() && state.abandoned.len() < MAX_ABANDONED {
            // Not placed yet (or answered already): placement looks here first.
            state.abandoned.insert(
                (reply_to.to_string(), request),
                Instant::now() + ABANDONED_FOR,
            );
        }
        call
    };
    if let Some(tracked) = call.and_then(|call| untrack(shared, call)) {
        let failure = Failure::new(
            FailureCode::Cancelled,
            "the call that started it ended or cancelled it",
        );
        finish(shared, tracked, Err(failure), Vec::new());
    }
}

/// Tells each of an ended call's executors, once: [`Message::Cancel`] (a failed call: drop its
/// steps still waiting for inputs) or [`Message::Release`] (release its pins).
fn tell(shared: &Shared, tracked: &Tracked, message: Message) {
    let mut told: HashSet<&str> = HashSet::new();
    for addr in &tracked.executors {
        if told.insert(addr.as_str()) {
            if let Err(e) = shared.fabric.send(addr, message.clone()) {
                tracing::debug!(executor = %addr, cause = %e, message = message.kind(), "not sent");
            }
        }
    }
}

fn reply(shared: &Shared, to: &str, message: Message) {
    if let Err(e) = shared.fabric.send(to, message) {
        tracing::warn!(to, cause = %e, "answer not sent");
    }
}

/// Stops tracking the children that calls on the `lost` executors (address, id) started:
/// nobody waits for them, so they are cancelled (and not answered: their caller is gone).
fn orphans_of(state: &mut State, lost: &[(String, String)]) -> Vec<(Tracked, Failure)> {
    let orphans: Vec<CallId> = state
        .calls
        .iter()
        .filter(|(_, t)| {
            t.reply_to
                .as_ref()
                .is_some_and(|to| lost.iter().any(|(addr, _)| addr == to))
        })
        .map(|(call, _)| *call)
        .collect();
    let mut cancelled = Vec::with_capacity(orphans.len());
    for call in orphans {
        if let Some(mut tracked) = state.calls.remove(&call) {
            undispatch(state, &tracked.executors);
            tracked.reply_to = None;
            let failure = Failure::new(
                FailureCode::Cancelled,
                "the executor of the call that started it was lost",
            );
            cancelled.push((tracked, failure));
        }
    }
    cancelled
}

/// Stops tracking the calls holding steps on the `lost` executors (address, id), and says
/// why each fails.
fn fail_calls_on(
    state: &mut State,
    lost: &[(String, String)],
    what: &str,
) -> Vec<(Tracked, Failure)> {
    if lost.is_empty() {
        return Vec::new();
    }
    let hit: Vec<(CallId, Failure)> = state
        .calls
        .iter()
        .filter_map(|(call, tracked)| {
            let (at, (addr, id)) = tracked
                .executors
                .iter()
                .enumerate()
                .find_map(|(i, a)| lost.iter().find(|(addr, _)| addr == a).map(|l| (i, l)))?;
            let failure = Failure {
                code: FailureCode::ExecutorLost,
                message: format!("executor {id} ({addr}) {what} while it held the call"),
                step: tracked.placement.get(at).map(|(f, _)| f.clone()),
            };
            Some((*call, failure))
        })
        .collect();
    let mut failed = Vec::with_capacity(hit.len());
    for (call, failure) in hit {
        if let Some(tracked) = state.calls.remove(&call) {
            undispatch(state, &tracked.executors);
            failed.push((tracked, failure));
        }
    }
    failed
}

/// Fails calls past their deadline and calls on executors that stopped sending heartbeats.
fn expire(shared: &Arc<Shared>) {
    let now = Instant::now();
    let failed = {
        let mut state = shared.state();
        let timeout = shared.config.heartbeat_timeout;
        let gone: Vec<(String, String)> = state
            .executors
            .iter()
            .filter(|(_, k)| now.duration_since(k.seen) > timeout)
            .map(|(addr, k)| (addr.clone(), k.status.id.clone()))
            .collect();
        for (addr, id) in &gone {
            tracing::warn!(id = %id, addr = %addr, "executor stopped sending heartbeats; it is no longer placed on");
            state.executors.remove(addr);
            shared.fabric.forget(addr);
        }
        let mut failed = fail_calls_on(&mut state, &gone, "stopped answering");
        state.abandoned.retain(|_, until| *until > now);
        failed.extend(orphans_of(&mut state, &gone));
        let late: Vec<CallId> = state
            .calls
            .iter()
            .filter(|(_, tracked)| now > tracked.deadline + DEADLINE_GRACE)
            .map(|(call, _)| *call)
            .collect();
        for call in late {
            if let Some(tracked) = state.calls.remove(&call) {
                undispatch(&mut state, &tracked.executors);
                let failure = Failure::new(
                    FailureCode::Timeout,
                    format!("{} did not finish before its deadline", tracked.name),
                );
                failed.push((tracked, failure));
            }
        }
        failed
    };
    for (tracked, failure) in failed {
        finish(shared, tracked, Err(failure), Vec::new());
    }
}

/// Asks an executor to warm every function that is warm nowhere.
async fn keep_warm(shared: &Arc<Shared>) {
    if shared.state().executors.is_empty() {
        return;
    }
    let mut functions = Vec::new();
    let namespaces = match shared.namespaces.names().await {
        Ok(namespaces) => namespaces,
        Err(e) => {
            tracing::debug!(cause = %e, "listing namespaces to keep their functions warm");
            return;
        }
    };
    for namespace in namespaces {
        match shared.functions.list(&namespace).await {
            Ok(listed) => functions.extend(
                listed
                    .into_iter()
                    .map(|f| keys::qualify(&namespace, &f.name)),
            ),
            Err(e) => {
                tracing::debug!(cause = %e, "listing functions to keep warm");
                return;
            }
        }
    }
    let now = Instant::now();
    let mut state = shared.state();
    let mut asks = Vec::new();
    for name in functions {
        let warm_somewhere = state
            .executors
            .values()
            .any(|k| k.status.warm.contains(&name));
        let asked_recently = state
            .warm_asked
            .get(&name)
            .is_some_and(|at| now.duration_since(*at) < WARM_RETRY);
        if warm_somewhere || asked_recently {
            continue;
        }
        let candidates = candidates(&state);
        if let Some(index) = choose(&candidates, &name, &[], &[]) {
            asks.push((candidates[index].status.addr.clone(), name.clone()));
            state.warm_asked.insert(name, now);
        }
    }
    state
        .warm_asked
        .retain(|_, at| now.duration_since(*at) < WARM_RETRY);
    drop(state);
    for (addr, function) in asks {
        tracing::debug!(function = %function, executor = %addr, "warming");
        if let Err(e) = shared.fabric.send(&addr, Message::Warm { function }) {
            tracing::debug!(executor = %addr, cause = %e, "warm request not sent");
        }
    }
}
