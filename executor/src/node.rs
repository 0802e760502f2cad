//! An executor on the call fabric: takes plans from schedulers, runs its steps, and hands each
//! output straight to the executor of the next step.
//!
//! A step runs once its plan has arrived and every predecessor's output has (in any order:
//! outputs that arrive before their plan wait for it, for a bounded time). A step with one
//! predecessor takes its output as input; a step with several takes their outputs as one
//! MessagePack array of binaries, in the DAG's edge order. A source takes the call's input.
//!
//! The sink reports to the scheduler: its output for a synchronous call, or, for an
//! asynchronous one, after it has written the output to the call's result key. A failing step
//! reports its failure, named by its function, so the call fails at once rather than at its
//! deadline; the scheduler then cancels the call on its other executors, which drop the steps
//! still waiting for inputs (and the call's late outputs) and abort those running.
//!
//! The calls a step starts as children (`squall:compose/futures`) go to a scheduler like any
//! invocation ([`Message::Invoke`], answered to this node's mailbox); a child whose parent
//! ended or cancelled it is abandoned ([`Message::Abandon`]), and the scheduler cancels it
//! wherever it runs.
//!
//! Plans come from the network: one naming steps it does not have is refused before any of it
//! runs, and an output is taken only from a step the plan lists as an input.
//!
//! In repeatable read, each output carries the run's versions so far ([`PinRef`]s: the pins
//! here, and the versions handed on from earlier steps that no pin here includes; a fan-in
//! step takes every distinct one of its inputs'), the node answers other executors' requests
//! for the pins it holds ([`Message::FetchPins`], bounded in keys and bytes), fetches only
//! from the run's own executors, and releases a run's pins when the scheduler says the run
//! has ended ([`Message::Release`], or [`Message::Cancel`]) or when its deadline is long past.
//!
//! Several times a second the node tells every scheduler it knows how it is
//! ([`ExecutorStatus`]): its load, the functions it serves and has warm, and the keys its
//! cache holds, which is what placement decides by.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use squall_lattices::Dependencies;
use squall_proto::call::{
    Artifact, CallId, CallResult, Consistency, ExecutorStatus, Failure, FailureCode,
    FunctionVersion, Invocation, InvokeOptions, LimitsRequest, Message, Outcome, PinRef, Plan,
    StepIndex, Target, MAX_STEPS,
};
use squall_proto::fabric::{Fabric, Mailbox};
use squall_proto::report::{merge_reports, StepReport};
use tokio::task::JoinHandle;

use squall_state::pins::{PinFuture, PinSource, PinnedValues, RunContext};
use squall_state::results::store_result;
use squall_state::{ClientPool, FunctionRecord};

use crate::children::{ChildFuture, Inherited, Spawner};
use crate::report::{now_us, StepTrace};
use crate::{CallOptions, Error, Executor};
use squall_lattices::causal::{raise, raise_all};

/// Keys of the cache reported in each heartbeat, at most.
const MAX_REPORTED_KEYS: usize = 1024;

/// Steps waiting for inputs, at most; outputs beyond it are dropped (their calls time out).
const MAX_PENDING: usize = 100_000;

/// Keys one [`Message::FetchPins`] may ask for (executors ask for one at a time).
const MAX_FETCHED_KEYS: usize = 1024;

/// The largest answer to a [`Message::FetchPins`] (a fabric frame holds up to 256 MiB).
const MAX_PINS_REPLY_BYTES: usize = 64 << 20;

/// How long a step waits for pinned values from another executor before the read fails.
const PIN_FETCH_WAIT: Duration = Duration::from_secs(2);

/// How long an output waits for the plan it belongs to.
const ORPHAN_WAIT: Duration = Duration::from_secs(30);

/// How an executor node takes part in the fabric.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Its id, for logs and placement reports.
    pub id: String,
    /// The schedulers it reports to.
    pub schedulers: Vec<String>,
    /// The functions it serves; empty: all.
    pub serves: Vec<String>,
    /// Steps it runs at once before schedulers count it as busy.
    pub capacity: u32,
    /// How often it reports to the schedulers.
    pub heartbeat: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: format!("executor-{:08x}", rand::random::<u32>()),
            schedulers: Vec::new(),
            serves: Vec::new(),
            capacity: 64,
            heartbeat: Duration::from_millis(100),
        }
    }
}

/// Heartbeats in a row an executor must be idle before a drain counts as done: the schedulers
/// hear of the drain within one, and steps placed before that arrive within another.
const DRAIN_QUIET_BEATS: u32 = 3;

/// A running executor node. Dropping it stops it.
pub struct ExecutorNode {
    addr: String,
    id: String,
    task: JoinHandle<()>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ExecutorNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecutorNode")
            .field("addr", &self.addr)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl ExecutorNode {
    /// Starts serving `mailbox` with `executor`; `results` writes asynchronous calls' results.
    /// Must be called inside a tokio runtime.
    pub fn start(
        executor: Executor,
        mailbox: Mailbox,
        results: ClientPool,
        config: NodeConfig,
    ) -> Self {
        let addr = mailbox.addr().to_string();
        let id = config.id.clone();
        let shared = Arc::new(Shared {
            executor,
            fabric: mailbox.fabric().clone(),
            addr: addr.clone(),
            pins: Arc::new(FabricPins {
                fabric: mailbox.fabric().clone(),
                addr: addr.clone(),
                // Random, as the children's: a restarted node must not take an answer meant
                // for its previous life.
                next: AtomicU64::new(rand::random::<u64>() >> 1),
                waiting: Arc::default(),
            }),
            children: Arc::new(FabricChildren {
                fabric: mailbox.fabric().clone(),
                addr: addr.clone(),
                schedulers: config.schedulers.clone(),
                next_scheduler: AtomicU64::new(0),
                // Random, so a restarted node on the same address never takes the answer
                // to a request of its previous life as one of its own.
                next: AtomicU64::new(rand::random::<u64>() >> 1),
                waiting: Arc::default(),
            }),
            steps_running: Mutex::new(HashMap::new()),
            results,
            config,
            running: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            steps: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            draining: AtomicBool::new(false),
        });
        tracing::info!(id = %id, addr = %addr, schedulers = ?shared.config.schedulers, "executor node serving");
        let task = tokio::spawn(serve(shared.clone(), mailbox));
        Self {
            addr,
            id,
            task,
            shared,
        }
    }

    /// Starts draining: heartbeats tell the schedulers to place nothing new here (unless no
    /// other executor can run it), while what was placed runs to the end.
    pub fn drain(&self) {
        if !self.shared.draining.swap(true, Ordering::Relaxed) {
            tracing::info!(id = %self.id, "draining: no new steps are placed here");
            heartbeat(
                &self.shared,
                self.shared.waiting.load(Ordering::Relaxed) as usize,
            );
        }
    }

    /// Whether no step runs or waits here.
    pub fn idle(&self) -> bool {
        self.shared.running.load(Ordering::Relaxed) == 0
            && self.shared.waiting.load(Ordering::Relaxed) == 0
    }

    /// Drains (see [`ExecutorNode::drain`]) and waits until the node has been idle for a few
    /// heartbeats in a row, so that steps placed before the schedulers heard of the drain
    /// have arrived and finished; gives up after `timeout`. Returns whether it drained.
    pub async fn drained(&self, timeout: Duration) -> bool {
        self.drain();
        let deadline = Instant::now() + timeout;
        let beat = self.shared.config.heartbeat;
        let mut quiet = 0;
        while Instant::now() < deadline {
            tokio::time::sleep(beat).await;
            quiet = if self.idle() { quiet + 1 } else { 0 };
            if quiet >= DRAIN_QUIET_BEATS {
                return true;
            }
        }
        false
    }

    /// Its mailbox's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for ExecutorNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Shared {
    executor: Executor,
    fabric: Arc<Fabric>,
    addr: String,
    pins: Arc<FabricPins>,
    /// Starts the children of calls run here through the schedulers.
    children: Arc<FabricChildren>,
    /// The steps running here, by call: a cancelled call's are aborted.
    steps_running: Mutex<HashMap<(CallId, StepIndex), tokio::task::AbortHandle>>,
    results: ClientPool,
    config: NodeConfig,
    running: AtomicU32,
    /// Steps waiting for their plan or inputs, as of the last heartbeat.
    waiting: AtomicU32,
    steps: AtomicU64,
    failures: AtomicU64,
    draining: AtomicBool,
}

/// An output that has arrived for a step.
struct Arrived {
    /// The step that produced it.
    from: StepIndex,
    data: Bytes,
    /// The run's pins along its path.
    pins: Vec<PinRef>,
    /// The reports of the steps along its path (when the plan asks for them).
    reports: Vec<StepReport>,
}

/// A step waiting for its plan or its inputs.
struct Pending {
    plan: Option<Arc<Plan>>,
    deadline: Instant,
    arrived: Vec<Arrived>,
}

/// Steps waiting for their plan or inputs, and calls that have ended (their late outputs are
/// dropped rather than kept waiting).
#[derive(Default)]
struct Waiting {
    steps: HashMap<(CallId, StepIndex), Pending>,
    ended: HashMap<CallId, Instant>,
}

async fn serve(shared: Arc<Shared>, mut mailbox: Mailbox) {
    let mut waiting = Waiting::default();
    let mut beat = tokio::time::interval(shared.config.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            message = mailbox.recv() => {
                let Some(message) = message else { return };
                handle(&shared, &mut waiting, message);
            }
            _ = beat.tick() => {
                heartbeat(&shared, waiting.steps.len());
                let now = Instant::now();
                shared.executor.pins().expire(now);
                waiting.steps.retain(|(call, step), p| {
                    let keep = p.deadline > now;
                    if !keep {
                        tracing::debug!(call, step, "step expired waiting for its inputs");
                    }
                    keep
                });
                waiting.ended.retain(|_, until| *until > now);
            }
        }
    }
}

fn handle(shared: &Arc<Shared>, waiting: &mut Waiting, message: Message) {
    match message {
        Message::Schedule { plan, input } => schedule(shared, waiting, plan, input),
        Message::Output {
            call,
            step,
            from,
            data,
            pins,
            reports,
        } => {
            let arrived = Arrived {
                from,
                data,
                pins,
                reports,
            };
            output(shared, waiting, call, step, arrived)
        }
        Message::Refresh { keys } => refresh(shared, keys),
        Message::Cancel { call } => cancel(shared, waiting, call),
        Message::Release { call } => shared.executor.pins().release(call),
        Message::FetchPins {
            request,
            call,
            keys,
            reply_to,
        } => fetch_pins(shared, request, call, keys, reply_to),
        Message::Pins { request, result } => shared.pins.answered(request, result),
        Message::Invoked {
            request, result, ..
        } => shared.children.answered(request, result),
        Message::Register {
            request,
            reply_to,
            kind,
            name,
            code,
            limits,
        } => register_message(shared, request, reply_to, kind, name, code, limits),
        Message::Warm { function } => warm(shared, function),
        other => tracing::warn!(
            message = other.kind(),
            "message not meant for an executor dropped"
        ),
    }
}

/// A plan: start this executor's source steps, and wait for the inputs of the others.
fn schedule(shared: &Arc<Shared>, waiting: &mut Waiting, plan: Arc<Plan>, input: Bytes) {
    if let Err(problem) = plan.check() {
        tracing::warn!(call = plan.call, %problem, "malformed plan refused");
        report(
            shared,
            &plan,
            Err(Failure::new(FailureCode::BadRequest, problem)),
            Vec::new(),
        );
        return;
    }
    if waiting.ended.contains_key(&plan.call) {
        return;
    }
    let deadline = Instant::now() + Duration::from_millis(plan.timeout_ms);
    for step in plan.steps_on(&shared.addr).collect::<Vec<_>>() {
        let spec = &plan.steps[step as usize];
        if spec.inputs.is_empty() {
            spawn_step(
                shared,
                plan.clone(),
                step,
                input.clone(),
                (Vec::new(), Vec::new()),
                deadline,
            );
            continue;
        }
        let entry = waiting
            .steps
            .entry((plan.call, step))
            .or_insert_with(|| Pending {
                plan: None,
                deadline,
                arrived: Vec::new(),
            });
        // Outputs that came first, from steps that are not this step's inputs, go.
        entry
            .arrived
            .retain(|arrived| spec.inputs.contains(&arrived.from));
        entry.plan = Some(plan.clone());
        entry.deadline = deadline;
        try_start(shared, &mut waiting.steps, (plan.call, step));
    }
}

/// A step's output for one of this executor's steps: kept until the step's plan and other inputs are here (bounded, and dropped if unexpected).
fn output(
    shared: &Arc<Shared>,
    waiting: &mut Waiting,
    call: CallId,
    step: StepIndex,
    arrived: Arrived,
) {
    let from = arrived.from;
    if waiting.ended.contains_key(&call) {
        return;
    }
    let steps = &mut waiting.steps;
    if steps.len() >= MAX_PENDING && !steps.contains_key(&(call, step)) {
        tracing::warn!(call, step, "too many steps waiting; an output was dropped");
        return;
    }
    let entry = steps.entry((call, step)).or_insert_with(|| Pending {
        plan: None,
        deadline: Instant::now() + ORPHAN_WAIT,
        arrived: Vec::new(),
    });
    let expected = match &entry.plan {
        Some(plan) => plan
            .steps
            .get(usize::from(step))
            .is_some_and(|spec| spec.inputs.contains(&from)),
        None => entry.arrived.len() < MAX_STEPS,
    };
    if !expected {
        tracing::debug!(
            call,
            step,
            from,
            "output from a step that is not an input dropped"
        );
    } else if !entry.arrived.iter().any(|a| a.from == from) {
        entry.arrived.push(arrived);
    }
    try_start(shared, steps, (call, step));
}

/// Records changed: read them from the store next time.
fn refresh(shared: &Shared, keys: Vec<String>) {
    for key in &keys {
        shared.executor.cache().refresh(key);
    }
}

/// A call failed or was given up: drop its waiting steps and its pins, and ignore its late outputs.
fn cancel(shared: &Shared, waiting: &mut Waiting, call: CallId) {
    waiting.steps.retain(|(c, _), _| *c != call);
    // Its steps running here stop (a child whose parent ended, a DAG whose other step
    // failed): their calls' futures are dropped, instances and all.
    lock_steps(&shared.steps_running).retain(|(c, _), task| {
        if *c == call {
            task.abort();
        }
        *c != call
    });
    waiting.ended.insert(call, Instant::now() + ORPHAN_WAIT);
    shared.executor.pins().release(call);
}

/// Another executor asks for versions a run pinned here (bounded in keys and reply size).
fn fetch_pins(shared: &Shared, request: u64, call: CallId, keys: Vec<String>, reply_to: String) {
    let mut keys = keys;
    keys.sort_unstable();
    keys.dedup();
    let result = if keys.len() > MAX_FETCHED_KEYS {
        Err(format!("at most {MAX_FETCHED_KEYS} keys per request"))
    } else {
        match shared.executor.pins().get(call) {
            Some(pins) => pins.lookup(&keys).and_then(|values| {
                let size = rmp_serde::to_vec(&values).map_or(usize::MAX, |b| b.len());
                if size > MAX_PINS_REPLY_BYTES {
                    Err(format!(
                        "the pinned values take {size} bytes, over the reply limit"
                    ))
                } else {
                    Ok(values)
                }
            }),
            None => Err(format!(
                "run {call} holds no pins here (it ended, or this executor restarted)"
            )),
        }
    };
    if let Err(e) = shared
        .fabric
        .send(&reply_to, Message::Pins { request, result })
    {
        tracing::debug!(to = %reply_to, cause = %e, "pins not sent");
    }
}

/// A registration: compile and check the function (or load the model), store it, answer.
fn register_message(
    shared: &Arc<Shared>,
    request: u64,
    reply_to: String,
    kind: Artifact,
    name: String,
    code: Bytes,
    limits: LimitsRequest,
) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let result = match kind {
            Artifact::Function => register(&shared.executor, &name, code, limits).await,
            Artifact::Model => shared
                .executor
                .register_model(&name, code.to_vec())
                .await
                .map(version_of)
                .map_err(|e| Failure::new(e.code(), e.to_string())),
        };
        if let Err(e) = shared
            .fabric
            .send(&reply_to, Message::Registered { request, result })
        {
            tracing::warn!(to = %reply_to, cause = %e, "registration answer not sent");
        }
    });
}

/// Keep a function warm here (the scheduler keeps every function warm somewhere).
fn warm(shared: &Shared, function: String) {
    let executor = shared.executor.clone();
    tokio::spawn(async move {
        if let Err(e) = executor.warm(&function).await {
            tracing::debug!(function = %function, cause = %e, "could not warm");
        }
    });
}

/// Starts the step if its plan and all its inputs are there.
fn try_start(
    shared: &Arc<Shared>,
    pending: &mut HashMap<(CallId, StepIndex), Pending>,
    key: (CallId, StepIndex),
) {
    let Some(entry) = pending.get(&key) else {
        return;
    };
    let Some(plan) = &entry.plan else { return };
    let Some(spec) = plan.steps.get(key.1 as usize) else {
        pending.remove(&key);
        return;
    };
    if !spec
        .inputs
        .iter()
        .all(|i| entry.arrived.iter().any(|a| a.from == *i))
    {
        return;
    }
    let Some(entry) = pending.remove(&key) else {
        return;
    };
    let Some(plan) = entry.plan else { return };
    let spec = &plan.steps[key.1 as usize];
    // The inputs in edge order, with the run's pins along each.
    let mut arrived = entry.arrived;
    let ordered: Vec<Arrived> = spec
        .inputs
        .iter()
        .filter_map(|i| {
            let at = arrived.iter().position(|a| a.from == *i)?;
            Some(arrived.swap_remove(at))
        })
        .collect();
    // Every distinct version handed on (parallel branches may hold different ones of a key:
    // the step reads their join), and every earlier step's report once.
    let mut pins: Vec<PinRef> = Vec::new();
    let mut reports: Vec<StepReport> = Vec::new();
    for path in &ordered {
        merge_reports(&mut reports, &path.reports);
        for pin in &path.pins {
            if !pins
                .iter()
                .any(|p| p.key == pin.key && p.digest == pin.digest)
            {
                pins.push(pin.clone());
            }
        }
    }
    let input = if let [only] = &ordered[..] {
        only.data.clone()
    } else {
        let ordered: Vec<Bytes> = ordered.into_iter().map(|a| a.data).collect();
        match rmp_serde::to_vec(&ordered) {
            Ok(encoded) => Bytes::from(encoded),
            Err(e) => {
                report(
                    shared,
                    &plan,
                    Err(Failure {
                        code: FailureCode::Internal,
                        message: format!("encoding the inputs: {e}"),
                        step: Some(spec.function.clone()),
                    }),
                    reports,
                );
                return;
            }
        }
    };
    let deadline = entry.deadline;
    spawn_step(shared, plan, key.1, input, (pins, reports), deadline);
}

fn spawn_step(
    shared: &Arc<Shared>,
    plan: Arc<Plan>,
    step: StepIndex,
    input: Bytes,
    upstream: (Vec<PinRef>, Vec<StepReport>),
    deadline: Instant,
) {
    let key = (plan.call, step);
    // Registered under the lock the step's end takes too, so a step that ends at once
    // cannot leave its entry behind.
    let mut running = lock_steps(&shared.steps_running);
    let task = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ended = StepEnded {
                shared: shared.clone(),
                key,
            };
            run_step(shared, plan, step, input, upstream, deadline).await
        })
    };
    running.insert(key, task.abort_handle());
}

/// Takes a step out of [`Shared::steps_running`] when its task ends, however it ends.
struct StepEnded {
    shared: Arc<Shared>,
    key: (CallId, StepIndex),
}

impl Drop for StepEnded {
    fn drop(&mut self) {
        lock_steps(&self.shared.steps_running).remove(&self.key);
    }
}

fn lock_steps(
    steps: &Mutex<HashMap<(CallId, StepIndex), tokio::task::AbortHandle>>,
) -> std::sync::MutexGuard<'_, HashMap<(CallId, StepIndex), tokio::task::AbortHandle>> {
    steps.lock().unwrap_or_else(|p| p.into_inner())
}

async fn run_step(
    shared: Arc<Shared>,
    plan: Arc<Plan>,
    step: StepIndex,
    input: Bytes,
    (upstream, mut reports): (Vec<PinRef>, Vec<StepReport>),
    deadline: Instant,
) {
    let spec = &plan.steps[step as usize];
    let failed = |code, message: String| Failure {
        code,
        message,
        step: Some(spec.function.clone()),
    };
    let repeatable = plan.consistency.pins();
    let causal = plan.consistency == Consistency::Causal;
    // Versions are only fetched from the run's own executors.
    let mut upstream = upstream;
    upstream.retain(|pin| plan.steps.iter().any(|s| s.executor == pin.holder));
    // Causal: what the run's reads must reach, from its session and from the versions
    // handed on (their clocks and what they depend on).
    let floors = Arc::new(if causal {
        let mut floors = plan.floors.clone();
        for pin in &upstream {
            raise(&mut floors, &pin.key, &pin.clock);
            raise_all(&mut floors, &pin.dependencies);
        }
        floors
    } else {
        Dependencies::new()
    });
    let run = repeatable.then(|| {
        let mut by_key: HashMap<String, Vec<PinRef>> = HashMap::new();
        for pin in &upstream {
            by_key.entry(pin.key.clone()).or_default().push(pin.clone());
        }
        RunContext {
            call: plan.call,
            upstream: Arc::new(by_key),
            source: Some(shared.pins.clone() as Arc<dyn PinSource>),
            deadline,
            here: shared.addr.clone(),
            floors: floors.clone(),
            // The run's first steps pin its declared keys as one cut.
            fan_in: spec.inputs.len() > 1,
            declared: if causal && spec.inputs.is_empty() {
                plan.read_set.clone()
            } else {
                Vec::new()
            },
        }
    });
    let running = RunningStep::new(&shared);
    let trace = plan.report.then(StepTrace::new);
    let options = CallOptions {
        consistency: plan.consistency,
        timeout: Some(deadline.saturating_duration_since(Instant::now())),
        run,
        trace: trace.clone(),
        attempt: plan.attempt,
        chain: plan.chain,
        spawner: Some(shared.children.clone() as Arc<dyn Spawner>),
        depth: plan.depth,
    };
    let started = trace.as_ref().map(|_| (now_us(), Instant::now()));
    let result = shared.executor.call(&spec.function, &input, options).await;
    if let (Some(trace), Some((start_us, started))) = (trace, started) {
        let id = &shared.config.id;
        let report = trace.report(step, &spec.function, id, start_us, started.elapsed());
        reports.push(report);
    }
    drop(running);
    shared.steps.fetch_add(1, Ordering::Relaxed);
    let output = match result {
        Ok(output) => Bytes::from(output),
        Err(e) => {
            shared.failures.fetch_add(1, Ordering::Relaxed);
            let message = match &e {
                Error::Failed { message, .. } => message.clone(),
                other => other.to_string(),
            };
            report(&shared, &plan, Err(failed(e.code(), message)), reports);
            return;
        }
    };
    if spec.outputs.is_empty() {
        let outcome = match &plan.result_key {
            None => Ok(Outcome::Output(output)),
            Some(key) => store_result(&shared.results, key, CallResult::Succeeded(output))
                .await
                .map(|()| Outcome::Stored)
                .map_err(|e| failed(FailureCode::Unavailable, e)),
        };
        // Causal: the run's cut, which its session's next calls start from.
        let mut cut = Dependencies::new();
        if causal {
            cut = (*floors).clone();
            if let Some(held) = shared.executor.pins().get(plan.call) {
                raise_all(&mut cut, &held.cut());
            }
        }
        report_cut(&shared, &plan, outcome, cut, reports);
        return;
    }
    // What the run has pinned, for the next steps: here (this step and the run's other
    // steps on this executor), and before (pins this executor does not hold).
    let pins = match shared.executor.pins().get(plan.call) {
        Some(held) if repeatable => held.hand_on(&shared.addr, upstream),
        _ => upstream,
    };
    for &next in &spec.outputs {
        let Some(to) = plan.steps.get(next as usize) else {
            continue;
        };
        let message = Message::Output {
            call: plan.call,
            step: next,
            from: step,
            data: output.clone(),
            pins: pins.clone(),
            reports: reports.clone(),
        };
        if let Err(e) = shared.fabric.send(&to.executor, message) {
            let message = format!(
                "handing the output to {} ({}): {e}",
                to.function, to.executor
            );
            report(
                &shared,
                &plan,
                Err(failed(FailureCode::Unavailable, message)),
                reports,
            );
            return;
        }
    }
}

/// Counts a step in [`Shared::running`] while it runs, also when its task is aborted.
struct RunningStep<'a>(&'a Shared);

impl<'a> RunningStep<'a> {
    fn new(shared: &'a Shared) -> Self {
        shared.running.fetch_add(1, Ordering::Relaxed);
        Self(shared)
    }
}

impl Drop for RunningStep<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts children ([`Spawner`]) through the schedulers: a [`Message::Invoke`] answered by a
/// [`Message::Invoked`] to this node's mailbox. A child whose future is dropped before its
/// answer (its parent ended, or cancelled it) is abandoned: the scheduler is told
/// ([`Message::Abandon`]) and cancels it on its executors.
#[derive(Debug)]
struct FabricChildren {
    fabric: Arc<Fabric>,
    addr: String,
    schedulers: Vec<String>,
    next_scheduler: AtomicU64,
    next: AtomicU64,
    waiting: Arc<Mutex<HashMap<u64, ChildWaiter>>>,
}

type ChildWaiter = tokio::sync::oneshot::Sender<Result<Invocation, Failure>>;

/// How long past a child's deadline its answer is awaited (the scheduler answers a call
/// that ran out of time itself, at its deadline).
const CHILD_ANSWER_SLACK: Duration = Duration::from_secs(2);

impl FabricChildren {
    fn answered(&self, request: u64, result: Result<Invocation, Failure>) {
        let waiter = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&request);
        if let Some(waiter) = waiter {
            let _ = waiter.send(result);
        }
    }
}

/// Abandons a child whose answer nobody waits for any more (see [`FabricChildren`]).
struct Abandon {
    fabric: Arc<Fabric>,
    waiting: Arc<Mutex<HashMap<u64, ChildWaiter>>>,
    scheduler: String,
    addr: String,
    request: u64,
    answered: bool,
}

impl Abandon {
    /// Nothing to abandon: the child answered, or was never sent.
    fn settled(&mut self) {
        self.answered = true;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.request);
        let message = Message::Abandon {
            request: self.request,
            reply_to: self.addr.clone(),
        };
        if let Err(e) = self.fabric.send(&self.scheduler, message) {
            tracing::debug!(scheduler = %self.scheduler, cause = %e, "abandoning a child");
        }
    }
}

impl Spawner for FabricChildren {
    fn spawn(&self, target: Target, input: Bytes, inherited: Inherited) -> ChildFuture {
        let Inherited {
            deadline,
            consistency,
            depth,
            chain,
        } = inherited;
        if self.schedulers.is_empty() {
            return Box::pin(async {
                Err(Failure::new(
                    FailureCode::Unavailable,
                    "this executor knows no scheduler to start children through",
                ))
            });
        }
        let turn = self.next_scheduler.fetch_add(1, Ordering::Relaxed) as usize;
        let scheduler = self.schedulers[turn % self.schedulers.len()].clone();
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request, tx);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let options = InvokeOptions {
            consistency,
            depth,
            chain,
            timeout_ms: Some(
                u64::try_from(remaining.as_millis())
                    .unwrap_or(u64::MAX)
                    .max(1),
            ),
            ..InvokeOptions::default()
        };
        let sent = self.fabric.send(
            &scheduler,
            Message::Invoke {
                request,
                reply_to: Some(self.addr.clone()),
                target,
                input,
                options,
            },
        );
        let mut abandon = Abandon {
            fabric: self.fabric.clone(),
            waiting: self.waiting.clone(),
            scheduler: scheduler.clone(),
            addr: self.addr.clone(),
            request,
            answered: false,
        };
        Box::pin(async move {
            if let Err(e) = sent {
                abandon.settled();
                abandon
                    .waiting
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&request);
                return Err(Failure::new(
                    FailureCode::Unavailable,
                    format!("sending the child to scheduler {scheduler}: {e}"),
                ));
            }
            let answer = tokio::time::timeout(remaining + CHILD_ANSWER_SLACK, rx).await;
            let answer = match answer {
                Err(_) => {
                    return Err(Failure::new(
                        FailureCode::Timeout,
                        format!("scheduler {scheduler} did not answer by the child's deadline"),
                    ))
                }
                Ok(Err(_)) => {
                    abandon.settled();
                    return Err(Failure::new(
                        FailureCode::Unavailable,
                        "the executor stopped while the child ran",
                    ));
                }
                Ok(Ok(answer)) => answer,
            };
            abandon.settled();
            match answer {
                Ok(Invocation {
                    output: Some(output),
                    ..
                }) => Ok(output),
                Ok(Invocation { output: None, .. }) => Err(Failure::new(
                    FailureCode::Internal,
                    "the child's call answered no output",
                )),
                Err(failure) => Err(failure),
            }
        })
    }
}

/// Fetches pins from other executors over the fabric: a [`Message::FetchPins`] to the
/// holder, answered by a [`Message::Pins`] to this node's mailbox.
#[derive(Debug)]
struct FabricPins {
    fabric: Arc<Fabric>,
    addr: String,
    next: AtomicU64,
    waiting: Arc<Mutex<HashMap<u64, PinWaiter>>>,
}

type PinWaiter = tokio::sync::oneshot::Sender<Result<PinnedValues, String>>;

fn lock(
    waiting: &Mutex<HashMap<u64, PinWaiter>>,
) -> std::sync::MutexGuard<'_, HashMap<u64, PinWaiter>> {
    waiting.lock().unwrap_or_else(|p| p.into_inner())
}

impl FabricPins {
    fn answered(&self, request: u64, result: Result<PinnedValues, String>) {
        if let Some(waiter) = lock(&self.waiting).remove(&request) {
            let _ = waiter.send(result);
        }
    }
}

/// Forgets a fetch whose caller went away before the answer came.
struct Forget(Arc<Mutex<HashMap<u64, PinWaiter>>>, u64);

impl Drop for Forget {
    fn drop(&mut self) {
        lock(&self.0).remove(&self.1);
    }
}

impl PinSource for FabricPins {
    fn fetch(&self, holder: &str, call: CallId, keys: Vec<String>) -> PinFuture {
        let request = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        lock(&self.waiting).insert(request, tx);
        let forget = Forget(self.waiting.clone(), request);
        let message = Message::FetchPins {
            request,
            call,
            keys,
            reply_to: self.addr.clone(),
        };
        let sent = self.fabric.send(holder, message);
        let holder = holder.to_string();
        Box::pin(async move {
            let _forget = forget;
            sent.map_err(|e| format!("asking {holder}: {e}"))?;
            match tokio::time::timeout(PIN_FETCH_WAIT, rx).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(format!("{holder} did not answer")),
                Err(_) => Err(format!("{holder} did not answer within {PIN_FETCH_WAIT:?}")),
            }
        })
    }
}

fn report(
    shared: &Shared,
    plan: &Plan,
    outcome: Result<Outcome, Failure>,
    reports: Vec<StepReport>,
) {
    report_cut(shared, plan, outcome, Dependencies::new(), reports);
}

/// Reports a call's outcome with, in causal mode, the run's cut (for its session), and the
/// reports of the steps that led here.
fn report_cut(
    shared: &Shared,
    plan: &Plan,
    outcome: Result<Outcome, Failure>,
    cut: Dependencies,
    mut reports: Vec<StepReport>,
) {
    // In plan order (a fan-in step merges its paths' reports in edge order).
    reports.sort_by_key(|r| r.step);
    let message = Message::Done {
        call: plan.call,
        outcome,
        cut,
        reports,
    };
    if let Err(e) = shared.fabric.send(&plan.report_to, message) {
        tracing::warn!(call = plan.call, to = %plan.report_to, cause = %e, "outcome not reported");
    }
}

async fn register(
    executor: &Executor,
    name: &str,
    code: Bytes,
    asked: LimitsRequest,
) -> Result<FunctionVersion, Failure> {
    let limits = (asked != LimitsRequest::default()).then(|| {
        let mut limits = executor.config().default_limits;
        if let Some(ms) = asked.timeout_ms {
            limits.timeout_ms = ms;
        }
        if let Some(bytes) = asked.memory_bytes {
            limits.memory_bytes = bytes;
        }
        if let Some(reuse) = asked.reuse_instances {
            limits.reuse_instances = reuse;
        }
        limits
    });
    match executor.register(name, code.to_vec(), limits).await {
        Ok(record) => {
            // The registering executor has just compiled it: keep an instance ready too.
            if let Err(e) = executor.warm(name).await {
                tracing::debug!(function = name, cause = %e, "could not warm after registering");
            }
            Ok(version_of(record))
        }
        Err(e) => Err(Failure::new(e.code(), e.to_string())),
    }
}

fn version_of(record: FunctionRecord) -> FunctionVersion {
    FunctionVersion {
        name: record.name,
        version: record.version,
        sha256: record.sha256,
        size: record.size,
    }
}

fn heartbeat(shared: &Shared, waiting: usize) {
    shared.waiting.store(
        u32::try_from(waiting).unwrap_or(u32::MAX),
        Ordering::Relaxed,
    );
    let stats = shared.executor.stats();
    let status = ExecutorStatus {
        id: shared.config.id.clone(),
        addr: shared.addr.clone(),
        capacity: shared.config.capacity,
        running: shared.running.load(Ordering::Relaxed),
        waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
        serves: shared.config.serves.clone(),
        warm: shared.executor.warm_functions(),
        keys: shared.executor.cache().keys(MAX_REPORTED_KEYS),
        steps: shared.steps.load(Ordering::Relaxed),
        failures: shared.failures.load(Ordering::Relaxed),
        warm_starts: stats.warm_starts,
        cold_starts: stats.cold_starts,
        cache_hits: stats.cache.hits,
        cache_misses: stats.cache.misses,
        draining: shared.draining.load(Ordering::Relaxed),
    };
    for scheduler in &shared.config.schedulers {
        if let Err(e) = shared
            .fabric
            .send(scheduler, Message::Heartbeat(status.clone()))
        {
            tracing::debug!(to = %scheduler, cause = %e, "heartbeat not sent");
        }
    }
}
