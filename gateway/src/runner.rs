//! The runner of durable asynchronous calls (see [`squall_state::calls`]).
//!
//! The gateway that accepts an asynchronous call writes it to the store already leased to
//! its runner, and hands it to the runner here, which runs its attempts: one at a time,
//! each awaited through the scheduler, the outcome written to the store before the call is
//! let go. Between attempts the call waits in the store with its next attempt and its time,
//! so a runner's death loses nothing: a scan of the pending calls every [`SCAN_EVERY`]
//! (and at start) takes calls whose lease ran out, and calls leased to this runner's id that
//! it is not running, which is how a restarted gateway takes back its own calls at once.
//!
//! Every runner has an id (`--gateway-id`, by default the gateway's HTTP address); two
//! gateways running at once must not share one.
//!
//! # Cost
//! An accepted call costs one batched store write (call, running result, record), one
//! awaited invocation, then a result write and the call's delete; a retry costs a re-read
//! (to see a cancel) and a write of the call. [`MAX_RUNNING`] attempts run at once per
//! runner; the others wait their turn in memory, already safe in the store. A scan reads
//! every pending call, inputs included: its cost grows with the calls waiting.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use squall_lattices::entry::now_ms;
use squall_proto::call::{CallResult, Failure, FailureCode, Target};
use squall_proto::poll::Poll;
use squall_scheduler::SchedulerClient;
use squall_state::activations::{Attempt, RecordedError, Recorder, Status};
use squall_state::calls::{after_failure, claimable, AfterFailure, Calls, PendingCall};
use squall_state::{Activation, ActivationId};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

/// How often a runner looks for calls nobody runs.
pub const SCAN_EVERY: Duration = Duration::from_secs(1);

/// Attempts one runner runs at once.
pub const MAX_RUNNING: usize = 256;

/// Calls one runner holds (running or waiting for their turn or their time) before its scans
/// stop taking more.
const MAX_HELD: usize = 100_000;

/// Pending calls read per store listing during a scan.
const SCAN_PAGE: u32 = 500;

/// How long a runner keeps trying to write an outcome before it leaves the call to a scan.
const OUTCOME_PATIENCE: Duration = Duration::from_secs(60);

/// Runs durable calls. Cheap to clone; must be used inside a tokio runtime.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    id: String,
    calls: Calls,
    client: Arc<SchedulerClient>,
    recorder: Option<Recorder>,
    metrics: Arc<Metrics>,
    held: Mutex<HashSet<String>>,
    running: Semaphore,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

impl Runner {
    /// A runner named `id`; `recorder` writes activation records (`None`: no records).
    pub fn new(
        id: String,
        calls: Calls,
        client: Arc<SchedulerClient>,
        recorder: Option<Recorder>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                id,
                calls,
                client,
                recorder,
                metrics,
                held: Mutex::new(HashSet::new()),
                running: Semaphore::new(MAX_RUNNING),
            }),
        }
    }

    /// The runner's id, which its leases name.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Calls held now.
    pub fn held(&self) -> usize {
        self.inner.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Marks call `id` as run here; `false` if it already is.
    pub fn hold(&self, id: &str) -> bool {
        self.inner
            .held
            .lock()
            .map(|mut held| held.insert(id.to_string()))
            .unwrap_or(false)
    }

    /// Runs `call`, which this runner [holds](Runner::hold) and the store holds leased to it.
    pub fn run_held(&self, call: PendingCall) {
        let runner = self.clone();
        tokio::spawn(async move { runner.drive(call).await });
    }

    /// Holds `call`, leases it to this runner in the store, reads it back to see the lease
    /// held, and runs it; `false` if it is already run here or another runner's lease won.
    pub async fn adopt(&self, mut call: PendingCall) -> squall_state::Result<bool> {
        if !self.hold(&call.id) {
            return Ok(false);
        }
        call.lease = Some(call.lease_for(&self.inner.id, now_ms()));
        let won = match self.inner.calls.put(&call).await {
            Ok(()) => self.inner.calls.get(&call.id).await,
            Err(e) => Err(e),
        };
        match won {
            Ok(Some(stored)) if stored.lease == call.lease => {
                self.run_held(call);
                Ok(true)
            }
            Ok(_) => {
                self.let_go(&call.id);
                Ok(false)
            }
            Err(e) => {
                self.let_go(&call.id);
                Err(e)
            }
        }
    }

    /// [`Runner::adopt`], once the call is no longer run here: a call given up a moment ago
    /// may still be held by its finishing task. If that takes over 5 s, a later scan takes
    /// the call.
    pub async fn adopt_when_free(&self, call: PendingCall) -> squall_state::Result<bool> {
        let free = Poll::within(Duration::from_secs(5))
            .every(Duration::from_millis(5))
            .until_async(|| async {
                let held = self
                    .inner
                    .held
                    .lock()
                    .map(|held| held.contains(&call.id))
                    .unwrap_or(true);
                (!held).then_some(())
            })
            .await;
        if free.is_err() {
            return Ok(false);
        }
        self.adopt(call).await
    }

    /// Scans for calls nobody runs now and every [`SCAN_EVERY`], until the runtime stops.
    pub fn start_scanning(&self) {
        let runner = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = runner.scan().await {
                    tracing::warn!(cause = %e, "scanning pending calls");
                }
                tokio::time::sleep(SCAN_EVERY).await;
            }
        });
    }

    /// One pass over the pending calls: takes those [`claimable`] here.
    pub async fn scan(&self) -> squall_state::Result<usize> {
        let mut after = None;
        let mut taken = 0;
        loop {
            let (page, next) = self.inner.calls.pending(after, SCAN_PAGE).await?;
            for call in page {
                if self.held() >= MAX_HELD {
                    return Ok(taken);
                }
                let here = self
                    .inner
                    .held
                    .lock()
                    .map(|held| held.contains(&call.id))
                    .unwrap_or(true);
                if claimable(&call, &self.inner.id, here, now_ms()) && self.adopt(call).await? {
                    taken += 1;
                }
            }
            match next {
                Some(next) => after = Some(next),
                None => return Ok(taken),
            }
        }
    }

    /// Marks call `id` as no longer run here.
    pub fn let_go(&self, id: &str) {
        if let Ok(mut held) = self.inner.held.lock() {
            held.remove(id);
        }
    }

    /// Runs `call`'s attempts until it finishes, is given up, is cancelled, or its outcome
    /// cannot be written (then a later scan takes it again).
    async fn drive(&self, mut call: PendingCall) {
        let mut first = true;
        // Attempts in a row that found no executor with room: each waits longer.
        let mut crowded = 0u32;
        loop {
            let wait = Duration::from_millis(call.not_before_ms.saturating_sub(now_ms()));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            if !first {
                // A cancel deletes the call: no attempt follows it.
                match self.inner.calls.get(&call.id).await {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(id = %call.id, cause = %e, "re-reading a pending call");
                        call.not_before_ms = now_ms() + 1000;
                        continue;
                    }
                }
            }
            first = false;
            let Ok(permit) = self.inner.running.acquire().await else {
                break;
            };
            let start_ms = now_ms();
            let started = Instant::now();
            let timeout = call.timeout();
            let outcome = self
                .inner
                .client
                .invoke(
                    call.target.clone(),
                    call.input.clone(),
                    call.options.clone(),
                    timeout + Duration::from_secs(2),
                )
                .await;
            drop(permit);
            let took = started.elapsed();
            let (kind, name) = kind_and_name(&call.target);
            match outcome {
                Ok(invocation) => {
                    self.inner.metrics.attempt(kind, name, None);
                    let output = invocation.output.unwrap_or_default();
                    call.attempts.push(Attempt {
                        attempt: call.attempt,
                        start_ms,
                        duration_us: took.as_micros() as u64,
                        placement: invocation.placement,
                        error: None,
                    });
                    let output_bytes = output.len() as u64;
                    if self.finish(&call, CallResult::Succeeded(output)).await {
                        self.record(&call, Status::Succeeded, None, Some(output_bytes));
                    }
                    break;
                }
                Err(failure) if failure.code == FailureCode::NoCapacity => {
                    crowded += 1;
                    if !self.crowded(&mut call, failure, crowded).await {
                        break;
                    }
                }
                Err(failure) => {
                    crowded = 0;
                    self.inner.metrics.attempt(kind, name, Some(failure.code));
                    if !self.failed(&mut call, failure, start_ms, took).await {
                        break;
                    }
                }
            }
        }
        self.let_go(&call.id);
    }

    /// Handles a failed attempt; whether another follows.
    async fn failed(
        &self,
        call: &mut PendingCall,
        failure: Failure,
        start_ms: u64,
        took: Duration,
    ) -> bool {
        let policy = match self.inner.calls.policy(&call.target).await {
            Ok(policy) => policy,
            Err(e) => {
                tracing::warn!(id = %call.id, cause = %e, "reading a retry policy");
                call.not_before_ms = now_ms() + 1000;
                return true;
            }
        };
        let now = now_ms();
        let error = RecordedError::from(&failure);
        let next = after_failure(&policy, call, failure.code, now);
        call.attempts.push(Attempt {
            attempt: call.attempt,
            start_ms,
            duration_us: took.as_micros() as u64,
            placement: Vec::new(),
            error: Some(error.clone()),
        });
        match next {
            AfterFailure::Retry { attempt, at_ms } => {
                call.attempt = attempt;
                call.not_before_ms = at_ms;
                call.lease = Some(call.lease_for(&self.inner.id, now));
                if let Err(e) = self.inner.calls.put(call).await {
                    // The lease stands: the retry runs here all the same, and a scan takes
                    // the call from the store after the lease if this runner dies.
                    tracing::warn!(id = %call.id, cause = %e, "writing a retry");
                }
                let (kind, name) = kind_and_name(&call.target);
                self.inner.metrics.retry(kind, name);
                self.record(call, Status::Running, Some(error), None);
                true
            }
            AfterFailure::DeadLetter | AfterFailure::Requeue { .. } => {
                let (kind, name) = kind_and_name(&call.target);
                let letter = call.clone();
                let calls = self.inner.calls.clone();
                let moved = self
                    .persist("moving a call to the dead letters", || {
                        let calls = calls.clone();
                        let letter = letter.clone();
                        let error = error.clone();
                        async move { calls.dead_letter(letter, error).await }
                    })
                    .await;
                if moved {
                    self.inner.metrics.dead_letter(kind, name);
                    self.record(call, Status::Failed, Some(error), None);
                }
                false
            }
        }
    }

    /// Handles an attempt that found no executor with room (it does not count): the same
    /// attempt waits 100 ms, doubled for each such attempt in a row up to 1.6 s, with up to
    /// half as much again at random, so that a crowd of waiting calls does not hammer the
    /// scheduler; the lease is renewed before it could run out. Whether it runs again (not
    /// past the call's maximum age).
    async fn crowded(&self, call: &mut PendingCall, failure: Failure, crowded: u32) -> bool {
        let policy = self
            .inner
            .calls
            .policy(&call.target)
            .await
            .unwrap_or_default();
        let now = now_ms();
        match after_failure(&policy, call, failure.code, now) {
            AfterFailure::Requeue { .. } => {
                let base = 100u64 << crowded.saturating_sub(1).min(4);
                let wait = base + rand::random::<u64>() % (base / 2 + 1);
                call.not_before_ms = now + wait;
                let renew = call.lease.as_ref().is_none_or(|lease| {
                    lease.until_ms < call.lease_for(&self.inner.id, now).until_ms - 5000
                });
                if renew {
                    call.lease = Some(call.lease_for(&self.inner.id, now));
                    if let Err(e) = self.inner.calls.put(call).await {
                        tracing::warn!(id = %call.id, cause = %e, "renewing a lease");
                    }
                }
                true
            }
            _ => {
                let (kind, name) = kind_and_name(&call.target);
                self.inner.metrics.attempt(kind, name, Some(failure.code));
                self.failed(call, failure, now, Duration::ZERO).await
            }
        }
    }

    /// Writes a finished call's result and deletes it; whether that was done.
    async fn finish(&self, call: &PendingCall, result: CallResult) -> bool {
        let calls = self.inner.calls.clone();
        let id = call.id.clone();
        self.persist("writing a call's result", || {
            let calls = calls.clone();
            let id = id.clone();
            let result = result.clone();
            async move { calls.finish(&id, &result).await }
        })
        .await
    }

    /// Retries a store write for up to [`OUTCOME_PATIENCE`]; whether it was done.
    async fn persist<F, Fut>(&self, what: &str, write: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = squall_state::Result<()>>,
    {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match write().await {
                Ok(()) => return true,
                Err(e) if started.elapsed() < OUTCOME_PATIENCE => {
                    tracing::warn!(cause = %e, "{what}; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(cause = %e, "{what}; left to a later scan");
                    return false;
                }
            }
        }
    }

    /// Queues the record of `call` as it now stands.
    fn record(
        &self,
        call: &PendingCall,
        status: Status,
        error: Option<RecordedError>,
        output_bytes: Option<u64>,
    ) {
        let Some(recorder) = &self.inner.recorder else {
            return;
        };
        recorder.record(record_of(call, status, error, output_bytes));
    }
}

/// The kind and name of a target, as records and metrics label them.
pub fn kind_and_name(target: &Target) -> (&'static str, &str) {
    match target {
        Target::Function(name) => ("function", name),
        Target::Dag(name) => ("dag", name),
    }
}

/// The activation record of `call` as it now stands.
pub fn record_of(
    call: &PendingCall,
    status: Status,
    error: Option<RecordedError>,
    output_bytes: Option<u64>,
) -> Activation {
    let (kind, name) = kind_and_name(&call.target);
    let start_ms = ActivationId::parse(&call.id)
        .and_then(|id| id.start_us())
        .map_or(call.accepted_ms, |us| us / 1000);
    let finished = status != Status::Running;
    let end_ms = finished.then(|| {
        call.attempts
            .last()
            .map_or(now_ms(), |a| a.start_ms + a.duration_us / 1000)
    });
    Activation {
        id: call.id.clone(),
        kind: kind.to_string(),
        name: name.to_string(),
        cause: call.cause.clone(),
        status,
        start_ms,
        end_ms,
        duration_us: end_ms.map(|end| end.saturating_sub(start_ms) * 1000),
        placement: call
            .attempts
            .last()
            .map(|a| a.placement.clone())
            .unwrap_or_default(),
        input_bytes: call.input.len() as u64,
        output_bytes,
        error,
        attempt: call.attempt,
        attempts: call.attempts.clone(),
        idempotency_key: call.idempotency_key.clone(),
    }
}

/// A failure for a call that cannot be accepted.
pub fn unavailable(e: impl std::fmt::Display) -> Failure {
    Failure::new(FailureCode::Unavailable, e.to_string())
}
