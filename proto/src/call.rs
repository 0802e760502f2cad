//! Messages of the call fabric: what gateways, schedulers and executors send each other to
//! register functions and run calls and DAGs.
//!
//! A call runs as a [`Plan`]: the scheduler places every step on an executor, sends each
//! executor involved the plan ([`Message::Schedule`], carrying the call's input for the steps
//! without predecessors), and steps hand their outputs straight to the executor of each next
//! step ([`Message::Output`]: the fast path, no storage node in between). The executor that runs
//! the sink reports to the scheduler ([`Message::Done`]), with the output for a synchronous call,
//! or after writing it to the call's result key for an asynchronous one. A step that fails
//! reports its failure the same way, so the caller learns which step failed and why.
//!
//! Budgets travel as remaining milliseconds, not wall-clock instants, so nodes need not agree
//! on the time.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use squall_lattices::{Dependencies, VectorClock};

use crate::report::StepReport;

/// Identifies one call among a scheduler's calls (random, so schedulers need not coordinate).
pub type CallId = u64;
/// A step's index in its plan.
pub type StepIndex = u16;

/// The most steps a plan (and so a DAG) has.
pub const MAX_STEPS: usize = 256;

/// The most keys a call declares it reads (a causal run pins them all before its first step).
pub const MAX_DECLARED_KEYS: usize = 1024;

/// How the functions of one call see the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// Lattice merge only: every read returns the executor cache's current merge of what it
    /// knows.
    #[default]
    Lww,
    /// Within one run of a call (every step, on any executor, and their nested calls), every
    /// read of a key returns the same version: the first read pins it, and the run's own
    /// writes are merged into the pinned version.
    RepeatableRead,
    /// Distributed session causal consistency: repeatable read, and the versions a run reads
    /// form a causal cut (no version is read without the versions it depends on, nor older
    /// than what the run, or earlier runs of its session, already read or wrote). Writes are
    /// [`MultiKeyCausal`](squall_lattices::MultiKeyCausal) versions carrying their vector
    /// clock and the clocks of what the run had seen.
    Causal,
}

impl Consistency {
    /// Every mode, as named in the HTTP header and on the command line.
    pub const ALL: [Consistency; 3] = [
        Consistency::Lww,
        Consistency::RepeatableRead,
        Consistency::Causal,
    ];

    /// The mode's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Lww => "lww",
            Consistency::RepeatableRead => "repeatable-read",
            Consistency::Causal => "causal",
        }
    }

    /// Whether a run pins the versions it reads (repeatable read, and causal on top of it).
    pub fn pins(self) -> bool {
        matches!(self, Consistency::RepeatableRead | Consistency::Causal)
    }
}

impl std::fmt::Display for Consistency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Consistency {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Consistency::ALL
            .into_iter()
            .find(|mode| mode.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Consistency::ALL.iter().map(|m| m.as_str()).collect();
                format!(
                    "unknown consistency mode {name:?} (supported: {})",
                    names.join(", ")
                )
            })
    }
}

/// A version a run has pinned (repeatable read and causal), as it travels with the run's step
/// outputs: which key, which version (a digest of the value), and the executor that holds it
/// for the run, so a later step whose cache holds another version fetches this one from there.
/// For a causal value it also carries the version's clock and dependencies, so later steps
/// check their reads against the run's cut without fetching it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PinRef {
    /// The store key.
    pub key: String,
    /// The pinned version: [`digest`] of the value (0: the key did not exist).
    pub digest: u64,
    /// The mailbox of the executor that holds the pinned value until the run ends.
    pub holder: String,
    /// A causal value's clock (empty for other types).
    #[serde(default)]
    pub clock: VectorClock,
    /// A causal value's dependencies (empty for other types).
    #[serde(default)]
    pub dependencies: Dependencies,
}

/// What [`digest`] answers for a value it cannot encode: equal to nothing, not even itself
/// (compare with [`digest`] and check for it).
pub const UNKNOWN_DIGEST: u64 = u64::MAX;

/// Identifies a version of a value: the first 8 bytes of the SHA-256 of its MessagePack
/// encoding; 0 for "no value". Equal values of the ordered lattice types (LWW, max/min,
/// counters, causal registers) have equal digests on every node. Sets and maps encode their
/// elements in each process's hash order, so equal ones may differ in digest; a reader then
/// fetches the pinned value rather than use its own equal copy, which costs a round trip and
/// never a wrong answer.
pub fn digest(value: Option<&squall_lattices::LatticeValue>) -> u64 {
    use sha2::Digest;
    let Some(value) = value else { return 0 };
    let Ok(encoded) = rmp_serde::to_vec(value) else {
        return UNKNOWN_DIGEST;
    };
    let hash = sha2::Sha256::digest(&encoded);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    u64::from_le_bytes(first).clamp(1, UNKNOWN_DIGEST - 1)
}

/// How a running call is laid out over executors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The call.
    pub call: CallId,
    /// What was invoked (a function's or a DAG's name), for errors and logs.
    pub name: String,
    /// The steps; a function call is a plan of one step.
    pub steps: Vec<PlanStep>,
    /// Milliseconds the call had left when the plan was sent.
    pub timeout_ms: u64,
    /// The consistency mode the call's functions run under.
    pub consistency: Consistency,
    /// Causal: the keys the run declared it reads, pinned together as one causal cut before
    /// its first steps run (Cloudburst's read set).
    #[serde(default)]
    pub read_set: Vec<String>,
    /// Causal: the clocks the run's reads must reach, key by key: what earlier runs of its
    /// session read and wrote, with their dependencies.
    #[serde(default)]
    pub floors: Dependencies,
    /// The mailbox that learns the outcome (the scheduler's).
    pub report_to: String,
    /// For an asynchronous call, the store key the sink writes a [`CallResult`] to.
    pub result_key: Option<String>,
    /// Whether each step reports its run ([`InvokeOptions::report`]).
    #[serde(default)]
    pub report: bool,
    /// Which attempt of its call this run is ([`InvokeOptions::attempt`]).
    #[serde(default)]
    pub attempt: u32,
    /// How many `kv-change` deliveries led to this run ([`InvokeOptions::chain`]).
    #[serde(default)]
    pub chain: u32,
    /// How deep in a chain of calls its steps start ([`InvokeOptions::depth`]).
    #[serde(default)]
    pub depth: u32,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanStep {
    /// The function it runs.
    pub function: String,
    /// The mailbox of the executor that runs it.
    pub executor: String,
    /// The steps whose outputs it takes, in the DAG's edge order. Empty: it takes the call's
    /// input. Several: it takes their outputs as one MessagePack array of binaries.
    pub inputs: Vec<StepIndex>,
    /// The steps its output goes to. Empty: it is the sink.
    pub outputs: Vec<StepIndex>,
}

impl Plan {
    /// The indices of the steps placed on `executor`.
    pub fn steps_on<'a>(&'a self, executor: &'a str) -> impl Iterator<Item = StepIndex> + 'a {
        self.steps
            .iter()
            .enumerate()
            .filter(move |(_, s)| s.executor == executor)
            .map(|(i, _)| i as StepIndex)
    }

    /// Checks what an executor relies on before running any of the plan: at most
    /// [`MAX_STEPS`] steps, every input and output naming a step of the plan, and at most
    /// [`MAX_DECLARED_KEYS`] declared keys.
    pub fn check(&self) -> Result<(), String> {
        if self.steps.len() > MAX_STEPS {
            return Err(format!(
                "a plan has at most {MAX_STEPS} steps, this one has {}",
                self.steps.len()
            ));
        }
        if self.read_set.len() > MAX_DECLARED_KEYS {
            return Err(format!(
                "a plan declares at most {MAX_DECLARED_KEYS} keys, this one {}",
                self.read_set.len()
            ));
        }
        let in_range = |i: &StepIndex| usize::from(*i) < self.steps.len();
        for (index, step) in self.steps.iter().enumerate() {
            if !step.inputs.iter().all(in_range) || !step.outputs.iter().all(in_range) {
                return Err(format!(
                    "step {index} ({}) names a step the plan does not have",
                    step.function
                ));
            }
        }
        Ok(())
    }
}

/// What a caller invokes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Target {
    /// A function, by name (its newest version).
    Function(String),
    /// A registered DAG, by name.
    Dag(String),
}

impl Target {
    /// The function's or DAG's name.
    pub fn name(&self) -> &str {
        match self {
            Target::Function(name) | Target::Dag(name) => name,
        }
    }
}

/// How an invocation should run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvokeOptions {
    /// Consistency mode.
    pub consistency: Consistency,
    /// Deadline of the whole call, in milliseconds (the scheduler's default if `None`).
    pub timeout_ms: Option<u64>,
    /// Store keys the call will read: the scheduler prefers executors whose caches hold them,
    /// and a causal call pins them together, as one causal cut, before its first step.
    pub keys: Vec<String>,
    /// For an asynchronous call, where the result goes.
    pub result_key: Option<String>,
    /// Causal: the client session the call belongs to. Its calls read versions no older than
    /// what its earlier calls read and wrote.
    #[serde(default)]
    pub session: Option<String>,
    /// Whether each step reports its run ([`StepReport`]: timings, CPU, memory, log lines)
    /// for the call's activation record.
    #[serde(default)]
    pub report: bool,
    /// Which attempt of an asynchronous call this run is (0 or 1: the first), told to the
    /// functions (`context.attempt`).
    #[serde(default)]
    pub attempt: u32,
    /// How many `kv-change` deliveries led to this call (0: none; 1: a trigger fired on a
    /// write from outside any trigger's call). Its writes carry it, so a trigger whose
    /// function writes what fires it stops at the gateway's limit instead of looping.
    #[serde(default)]
    pub chain: u32,
    /// How deep in a chain of calls it starts: 0 from outside, one more than its parent's
    /// for a child a function started. Executors refuse calls past their call depth, so
    /// children that start children cannot recurse without bound.
    #[serde(default)]
    pub depth: u32,
}

/// What a registration stores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Artifact {
    /// A function: a WebAssembly component.
    #[default]
    Function,
    /// A model for `wasi:nn`: an ONNX file.
    Model,
}

/// Limits asked for at registration; unset ones take the executor's defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitsRequest {
    /// Deadline of one call, in milliseconds.
    pub timeout_ms: Option<u64>,
    /// Linear memory, in bytes.
    pub memory_bytes: Option<u64>,
    /// Whether instances may serve more than one call.
    pub reuse_instances: Option<bool>,
}

/// A registered function version, as the fabric reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionVersion {
    /// The function's name.
    pub name: String,
    /// Its version number.
    pub version: u64,
    /// SHA-256 of the component, in hex.
    pub sha256: String,
    /// The component's size in bytes.
    pub size: u64,
}

/// Why a call or a registration failed; [`FailureCode`] says what kind of failure it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{}{message}", step.as_ref().map(|s| format!("step {s}: ")).unwrap_or_default())]
pub struct Failure {
    /// The kind of failure.
    pub code: FailureCode,
    /// What happened, for people.
    pub message: String,
    /// The step (function) that failed, when one did.
    pub step: Option<String>,
}

impl Failure {
    /// A failure not tied to a step.
    pub fn new(code: FailureCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            step: None,
        }
    }
}

/// The kinds of failure a caller can tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureCode {
    /// No such function, DAG or result.
    NotFound,
    /// The request itself is wrong (a bad name, a malformed DAG, an unknown mode).
    BadRequest,
    /// The code is not a component of the handler world.
    InvalidComponent,
    /// An input, output or body is over its limit.
    TooLarge,
    /// The function returned an error of its own.
    FunctionFailed,
    /// The function trapped (or nested too deeply).
    Trap,
    /// The call ran out of time.
    Timeout,
    /// The function ran out of memory.
    OutOfMemory,
    /// No executor can take the call now.
    NoCapacity,
    /// An executor stopped answering while it held the call.
    ExecutorLost,
    /// A component the call needs (the store, the scheduler) did not answer.
    Unavailable,
    /// A bug or an unexpected state.
    Internal,
    /// The caller cancelled the call before it finished.
    Cancelled,
    /// A `kv-change` delivery was not made: the writes that fired it came from a chain of
    /// trigger calls as deep as the limit (a function whose writes fire its own trigger).
    ChainTooDeep,
}

impl FailureCode {
    /// The code's name in the HTTP API's error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureCode::NotFound => "not_found",
            FailureCode::BadRequest => "bad_request",
            FailureCode::InvalidComponent => "invalid_component",
            FailureCode::TooLarge => "too_large",
            FailureCode::FunctionFailed => "function_failed",
            FailureCode::Trap => "trap",
            FailureCode::Timeout => "timeout",
            FailureCode::OutOfMemory => "out_of_memory",
            FailureCode::NoCapacity => "no_capacity",
            FailureCode::ExecutorLost => "executor_lost",
            FailureCode::Unavailable => "unavailable",
            FailureCode::Internal => "internal",
            FailureCode::Cancelled => "cancelled",
            FailureCode::ChainTooDeep => "chain_too_deep",
        }
    }

    /// The code named `name` in the HTTP API's error bodies ([`FailureCode::as_str`]).
    pub fn from_wire(name: &str) -> Option<Self> {
        const ALL: [FailureCode; 14] = [
            FailureCode::NotFound,
            FailureCode::BadRequest,
            FailureCode::InvalidComponent,
            FailureCode::TooLarge,
            FailureCode::FunctionFailed,
            FailureCode::Trap,
            FailureCode::Timeout,
            FailureCode::OutOfMemory,
            FailureCode::NoCapacity,
            FailureCode::ExecutorLost,
            FailureCode::Unavailable,
            FailureCode::Internal,
            FailureCode::Cancelled,
            FailureCode::ChainTooDeep,
        ];
        ALL.into_iter().find(|code| code.as_str() == name)
    }
}

/// What a finished step reports to the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The sink's output (synchronous calls).
    Output(Bytes),
    /// The sink wrote its output to the call's result key (asynchronous calls).
    Stored,
}

/// The outcome of a call, as stored under an asynchronous call's result key.
///
/// Stored as an LWW register whose timestamp is the record's [`CallResult::rank`], not a clock
/// reading: a finished record always supersedes `Running`, wherever and whenever it was
/// written, and a success supersedes a failure reported for the same call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallResult {
    /// Accepted and not finished.
    Running,
    /// Finished with this output.
    Succeeded(Bytes),
    /// Failed.
    Failed(Failure),
}

impl CallResult {
    /// The LWW timestamp this record is stored at.
    pub fn rank(&self) -> u64 {
        match self {
            CallResult::Running => 1,
            CallResult::Failed(_) => 2,
            CallResult::Succeeded(_) => 3,
        }
    }

    /// The record as stored (MessagePack).
    pub fn encode(&self) -> crate::Result<Vec<u8>> {
        rmp_serde::to_vec(self).map_err(|e| crate::Error::Encode(e.to_string()))
    }

    /// A stored record.
    pub fn decode(bytes: &[u8]) -> crate::Result<Self> {
        rmp_serde::from_slice(bytes).map_err(|e| crate::Error::Body(e.to_string()))
    }
}

/// What a finished invocation returns to its caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invocation {
    /// The sink's output (`None` for an asynchronous call, whose output is in the store).
    pub output: Option<Bytes>,
    /// Where each step ran: (function, executor id), in plan order.
    pub placement: Vec<(String, String)>,
}

/// What an executor tells schedulers about itself, several times a second.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorStatus {
    /// Its id (stable for the process's life).
    pub id: String,
    /// Its mailbox.
    pub addr: String,
    /// Steps it runs at once before it counts as busy.
    pub capacity: u32,
    /// Steps running now.
    pub running: u32,
    /// Steps placed on it that wait for their plan or their inputs.
    #[serde(default)]
    pub waiting: u32,
    /// The functions it serves; empty: all.
    pub serves: Vec<String>,
    /// Functions with an instance ready to run.
    pub warm: Vec<String>,
    /// Store keys its cache holds (up to a bound).
    pub keys: Vec<String>,
    /// Steps run since it started.
    pub steps: u64,
    /// Steps that failed.
    pub failures: u64,
    /// Calls served by a warm instance.
    pub warm_starts: u64,
    /// Calls that instantiated a fresh instance.
    pub cold_starts: u64,
    /// Cache reads served locally.
    pub cache_hits: u64,
    /// Cache reads that went to the store.
    pub cache_misses: u64,
    /// It is stopping: it finishes what it was given, and takes nothing new if any other
    /// executor can run it.
    #[serde(default)]
    pub draining: bool,
}

/// One message of the fabric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Scheduler to executor: run this plan's steps that are placed on you; `input` is the
    /// call's input, for the steps without predecessors.
    Schedule {
        /// The plan.
        plan: Arc<Plan>,
        /// The call's input.
        input: Bytes,
    },
    /// Executor to executor: a step's output, for one of the next steps.
    Output {
        /// The call.
        call: CallId,
        /// The step that takes it.
        step: StepIndex,
        /// The step that produced it.
        from: StepIndex,
        /// The output.
        data: Bytes,
        /// Repeatable read: the versions the run has pinned so far, along this path.
        pins: Vec<PinRef>,
        /// The reports of the steps along this path, when the plan asks for them.
        #[serde(default)]
        reports: Vec<StepReport>,
    },
    /// Executor to executor: send me these keys' versions pinned by this run.
    FetchPins {
        /// Echoed in the answer.
        request: u64,
        /// The run.
        call: CallId,
        /// The keys.
        keys: Vec<String>,
        /// Where the answer goes.
        reply_to: String,
    },
    /// Executor to executor: the pinned versions asked for (`None`: the key did not exist),
    /// or why they are not there (the run was released, or the executor restarted).
    Pins {
        /// The request answered.
        request: u64,
        /// The values, in the order asked.
        result: Result<Vec<(String, Option<squall_lattices::LatticeValue>)>, String>,
    },
    /// Scheduler to executor: the call has ended; release the versions it pinned.
    Release {
        /// The call.
        call: CallId,
    },
    /// Executor to scheduler: a call finished at its sink, or one of its steps failed.
    Done {
        /// The call.
        call: CallId,
        /// What happened.
        outcome: Result<Outcome, Failure>,
        /// Causal: the clocks of what the run read and wrote, with their dependencies (its
        /// session's next calls start from them).
        #[serde(default)]
        cut: Dependencies,
        /// The reports of the steps that led here (the failing step's included), when the
        /// plan asks for them.
        #[serde(default)]
        reports: Vec<StepReport>,
    },
    /// Scheduler to executor: the call has ended (one of its steps failed, its deadline
    /// passed, or its caller abandoned it); drop its steps still waiting for inputs, and
    /// stop those running.
    Cancel {
        /// The call.
        call: CallId,
    },
    /// Gateway to schedulers, and scheduler to its executors: these registry keys (a
    /// function's or a DAG's record) were just written; read them from the store next time
    /// rather than wait for the store's push. Sent before the write is acknowledged to the
    /// user, and ahead of any later call on the same connection, so a call made after a
    /// registration or deletion sees it.
    Refresh {
        /// The keys written.
        keys: Vec<String>,
    },
    /// Executor to schedulers: how it is.
    Heartbeat(ExecutorStatus),
    /// Scheduler to executor: keep an instance of this function ready.
    Warm {
        /// The function.
        function: String,
    },
    /// Gateway to scheduler, forwarded to an executor: check and store a function.
    Register {
        /// Echoed in the answer.
        request: u64,
        /// Where the answer goes.
        reply_to: String,
        /// What is registered.
        kind: Artifact,
        /// The function's (or model's) name.
        name: String,
        /// The component (or the model file).
        code: Bytes,
        /// Limits for its calls (functions only).
        limits: LimitsRequest,
    },
    /// Executor to gateway: the registration's outcome.
    Registered {
        /// The request answered.
        request: u64,
        /// The new version, or why there is none.
        result: Result<FunctionVersion, Failure>,
    },
    /// Gateway to scheduler: run a function or DAG.
    Invoke {
        /// Echoed in the answer.
        request: u64,
        /// Where the answer goes; `None` for an asynchronous call (nobody waits).
        reply_to: Option<String>,
        /// What to run.
        target: Target,
        /// The input.
        input: Bytes,
        /// How.
        options: InvokeOptions,
    },
    /// Scheduler to gateway: the invocation's outcome.
    Invoked {
        /// The request answered.
        request: u64,
        /// The output, or why there is none.
        result: Result<Invocation, Failure>,
        /// The steps' reports, when the call asked for them (also for a failed call).
        #[serde(default)]
        reports: Vec<StepReport>,
    },
    /// Gateway to scheduler: which executors are there?
    Status {
        /// Echoed in the answer.
        request: u64,
        /// Where the answer goes.
        reply_to: String,
    },
    /// Scheduler to gateway: the executors it knows, alive ones only.
    StatusReport {
        /// The request answered.
        request: u64,
        /// Their last heartbeats.
        executors: Vec<ExecutorStatus>,
    },
    /// Caller to scheduler: nobody waits for the answer to this [`Message::Invoke`] any more
    /// (an executor's call that started it as a child ended, or cancelled it): cancel the
    /// call on its executors.
    Abandon {
        /// The request, as sent.
        request: u64,
        /// Its `reply_to`, as sent: with the request, it names the call.
        reply_to: String,
    },
}

impl Message {
    /// The message's kind, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Schedule { .. } => "schedule",
            Message::Output { .. } => "output",
            Message::FetchPins { .. } => "fetch-pins",
            Message::Pins { .. } => "pins",
            Message::Release { .. } => "release",
            Message::Done { .. } => "done",
            Message::Cancel { .. } => "cancel",
            Message::Refresh { .. } => "refresh",
            Message::Heartbeat(_) => "heartbeat",
            Message::Warm { .. } => "warm",
            Message::Register { .. } => "register",
            Message::Registered { .. } => "registered",
            Message::Invoke { .. } => "invoke",
            Message::Invoked { .. } => "invoked",
            Message::Abandon { .. } => "abandon",
            Message::Status { .. } => "status",
            Message::StatusReport { .. } => "status-report",
        }
    }
}

/// Encodes a fabric message as one frame (the same header as storage requests, id 0).
pub fn encode_message(message: &Message) -> crate::Result<Vec<u8>> {
    crate::encode(0, message)
}

/// Decodes a fabric frame; never panics on bad input.
pub fn decode_message(frame: &[u8]) -> crate::Result<Message> {
    crate::decode(frame).map(|(_, message)| message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_codes_read_back_from_their_wire_names() {
        for code in [
            FailureCode::Trap,
            FailureCode::Cancelled,
            FailureCode::NotFound,
            FailureCode::ChainTooDeep,
        ] {
            assert_eq!(FailureCode::from_wire(code.as_str()), Some(code));
        }
        assert_eq!(FailureCode::from_wire("nonsense"), None);
    }

    /// A plan of two steps, and one message of each kind that carries data.
    fn sample_messages() -> (Arc<Plan>, Vec<Message>) {
        let plan = Arc::new(Plan {
            call: 7,
            name: "sq_incr".into(),
            steps: vec![
                PlanStep {
                    function: "incr".into(),
                    executor: "tcp://127.0.0.1:1".into(),
                    inputs: vec![],
                    outputs: vec![1],
                },
                PlanStep {
                    function: "square".into(),
                    executor: "tcp://127.0.0.1:2".into(),
                    inputs: vec![0],
                    outputs: vec![],
                },
            ],
            timeout_ms: 1000,
            consistency: Consistency::Causal,
            read_set: vec!["k".into()],
            floors: Dependencies::from([("k".into(), [(1, 2)].into_iter().collect())]),
            report_to: "tcp://127.0.0.1:3".into(),
            result_key: None,
            report: true,
            attempt: 2,
            chain: 3,
            depth: 2,
        });
        let messages = vec![
            Message::Schedule {
                plan: plan.clone(),
                input: Bytes::from_static(b"3"),
            },
            Message::Cancel { call: 7 },
            Message::Abandon {
                request: 9,
                reply_to: "tcp://127.0.0.1:4".into(),
            },
            Message::Output {
                call: 7,
                step: 1,
                from: 0,
                data: Bytes::from_static(b"4"),
                pins: vec![PinRef {
                    key: "k".into(),
                    digest: 42,
                    holder: "tcp://127.0.0.1:1".into(),
                    clock: [(1, 3)].into_iter().collect(),
                    dependencies: Dependencies::from([(
                        "j".into(),
                        [(2, 1)].into_iter().collect(),
                    )]),
                }],
                reports: Vec::new(),
            },
            Message::FetchPins {
                request: 9,
                call: 7,
                keys: vec!["k".into()],
                reply_to: "tcp://127.0.0.1:2".into(),
            },
            Message::Pins {
                request: 9,
                result: Ok(vec![
                    (
                        "k".into(),
                        Some(squall_lattices::LatticeValue::Lww(
                            squall_lattices::Lww::new(
                                squall_lattices::Timestamp::new(5, 1),
                                Bytes::from_static(b"v"),
                            ),
                        )),
                    ),
                    ("gone".into(), None),
                ]),
            },
            Message::Release { call: 7 },
            Message::Refresh {
                keys: vec!["squall/fn/incr".into()],
            },
            Message::Done {
                call: 7,
                outcome: Err(Failure {
                    code: FailureCode::Trap,
                    message: "unreachable".into(),
                    step: Some("incr".into()),
                }),
                cut: Dependencies::from([("k".into(), [(1, 3)].into_iter().collect())]),
                reports: vec![StepReport {
                    step: 1,
                    function: "incr".into(),
                    version: 3,
                    executor: "e1".into(),
                    cpu_us: 12,
                    logs: vec![crate::report::LogLine {
                        ms: 1,
                        stream: "stdout".into(),
                        function: "incr".into(),
                        text: "hello".into(),
                    }],
                    logs_dropped: 2,
                    ..StepReport::default()
                }],
            },
            Message::Heartbeat(ExecutorStatus {
                id: "e1".into(),
                keys: vec!["k".into()],
                ..ExecutorStatus::default()
            }),
        ];
        (plan, messages)
    }

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let (plan, messages) = sample_messages();
        assert_eq!(plan.steps_on("tcp://127.0.0.1:2").collect::<Vec<_>>(), [1]);
        assert_eq!(plan.check(), Ok(()));
        let mut dangling = (*plan).clone();
        dangling.steps[0].outputs = vec![2];
        assert!(dangling.check().is_err());
        let mut huge = (*plan).clone();
        huge.steps = vec![plan.steps[0].clone(); MAX_STEPS + 1];
        assert!(huge.check().is_err());
        let mut greedy = (*plan).clone();
        greedy.read_set = vec!["k".into(); MAX_DECLARED_KEYS + 1];
        assert!(greedy.check().is_err());
        for message in messages {
            let frame = encode_message(&message).expect("encodes");
            assert_eq!(decode_message(&frame).expect("decodes"), message);
            assert!(decode_message(&frame[..frame.len() - 1]).is_err());
        }
        assert!(decode_message(b"SQ\x00\x01garbage!garbage").is_err());
    }

    proptest::proptest! {
        /// Valid frames with a few bytes changed: an error or a message, never a panic; a
        /// plan that decodes is checked without a panic, and what decodes encodes again.
        #[test]
        fn mutated_messages_never_panic(
            which in proptest::prelude::any::<proptest::sample::Index>(),
            edits in squall_lattices::testing::edits(4),
        ) {
            let (_, messages) = sample_messages();
            let message = &messages[which.index(messages.len())];
            let frame = encode_message(message).expect("encodes");
            let frame = squall_lattices::testing::mutated(&frame, &edits);
            if let Ok(decoded) = decode_message(&frame) {
                if let Message::Schedule { plan, .. } = &decoded {
                    let _ = plan.check();
                }
                let again = encode_message(&decoded).expect("re-encodes");
                proptest::prop_assert_eq!(decode_message(&again).expect("decodes again"), decoded);
            }
        }

        #[test]
        fn arbitrary_bytes_are_an_error_or_a_message(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
        ) {
            let mut frame = encode_message(&Message::Cancel { call: 1 }).expect("encodes");
            frame.truncate(crate::HEADER_LEN);
            frame.extend_from_slice(&body);
            let _ = decode_message(&frame);
            let _ = CallResult::decode(&body);
        }
    }

    #[test]
    fn modes_parse_by_name_and_digests_tell_versions_apart() {
        for mode in Consistency::ALL {
            assert_eq!(mode.as_str().parse::<Consistency>(), Ok(mode));
        }
        let unknown = "serializable".parse::<Consistency>().expect_err("unknown");
        assert!(unknown.contains("repeatable-read"), "{unknown}");
        let version = |t: u64, v: &'static [u8]| {
            squall_lattices::LatticeValue::Lww(squall_lattices::Lww::new(
                squall_lattices::Timestamp::new(t, 1),
                Bytes::from_static(v),
            ))
        };
        assert_eq!(digest(None), 0);
        assert_eq!(
            digest(Some(&version(1, b"a"))),
            digest(Some(&version(1, b"a")))
        );
        assert_ne!(
            digest(Some(&version(1, b"a"))),
            digest(Some(&version(2, b"a")))
        );
        assert_ne!(digest(Some(&version(1, b"a"))), 0);
    }

    #[test]
    fn finished_results_outrank_running_and_success_outranks_failure() {
        let failed = CallResult::Failed(Failure::new(FailureCode::Timeout, "late"));
        let ok = CallResult::Succeeded(Bytes::from_static(b"16"));
        assert!(CallResult::Running.rank() < failed.rank());
        assert!(failed.rank() < ok.rank());
        let encoded = ok.encode().expect("encodes");
        assert_eq!(CallResult::decode(&encoded).expect("decodes"), ok);
        assert!(CallResult::decode(b"\xc1").is_err());
    }
}
