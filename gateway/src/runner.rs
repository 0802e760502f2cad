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
//! Every runner has an id (`--gateway-id`, by default the host's name and the gateway's HTTP
//! port); two gateways running at once must not share one.
//!
//! # Calls in order
//! A call with a place in a group ([`PendingCall::order`]: a `kv-change` trigger's
//! deliveries of one key) starts its first attempt only once this runner holds no call of
//! its group with a lower place and no other call of its group has started here (a
//! redriven call with an old place waits for the one running); a call taken by a scan also
//! waits for scans to end, so that it sees the earlier calls the same scan takes. A call
//! that keeps failing holds its group through its retries, and the group goes on once it
//! succeeds or becomes a dead letter. A waiting call renews its lease (read back, as a
//! scan's take is), so other runners do not take it while it waits. What this does not
//! promise: calls of one group held by two runners do not wait for each other, which
//! happens when a runner dies (the others take its calls as their leases run out, not in
//! their order, while the change feed's new holder goes on with newer changes).
//!
//! # Cost
//! An accepted call costs one batched store write (call, running result, record; a change
//! feed's call starts its attempt while that write is on its way, see
//! [`Runner::accept_started`]), one awaited invocation, then a result write and the call's delete; a retry costs two re-reads
//! (to see a cancel) and a write of the call. [`MAX_RUNNING`] attempts run at once per
//! runner; the others wait their turn in memory, already safe in the store. A scan lists
//! every pending call and reads those this runner does not hold, inputs included: its cost
//! grows with the calls other runners hold.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use squall_lattices::entry::now_ms;
use squall_lattices::Write;
use squall_proto::call::{CallResult, Failure, FailureCode, Target};
use squall_proto::poll::Poll;
use squall_proto::report::StepReport;
use squall_proto::{keys, Key};
use squall_scheduler::SchedulerClient;
use squall_state::activations::{Attempt, RecordedError, Recorder, Status};
use squall_state::calls::{
    after_failure, claimable, AfterFailure, CallOrder, Calls, PendingCall, RetryPolicy,
    LEASE_MARGIN,
};
use squall_state::namespaces::Namespaces;
use squall_state::{Activation, ActivationId, Activations};
use tokio::sync::Semaphore;

use crate::limits::ConcurrencyLimits;
use crate::metrics::Metrics;
use crate::quotas::NamespaceQuotas;

/// How often a runner looks for calls nobody runs (and once at its start): other runners'
/// leases outlive their calls' deadlines by [`LEASE_MARGIN`], so looking more often finds
/// nothing sooner.
pub const SCAN_EVERY: Duration = Duration::from_secs(5);

/// Attempts one runner runs at once.
pub const MAX_RUNNING: usize = 256;

/// Calls one runner holds (running or waiting for their turn or their time) before its scans
/// stop taking more.
const MAX_HELD: usize = 100_000;

/// Pending calls listed per store listing during a scan.
const SCAN_PAGE: u32 = 500;

/// How long a runner tries to read a retry policy before it falls back to the default.
const POLICY_PATIENCE: Duration = Duration::from_secs(60);

/// Whether the writes that accept a call are in the store: a call started with
/// [`Runner::accept_started`] runs its first attempt while they are on their way, and waits
/// for them before it writes or reads anything of its own.
enum Landing {
    /// In the store.
    Landed,
    /// On their way: the acceptor says whether they landed.
    Pending(tokio::sync::oneshot::Receiver<bool>),
    /// Refused: the call is not the runner's to finish.
    Refused,
}

impl Landing {
    /// Waits for the writes; whether they landed.
    async fn landed(&mut self) -> bool {
        if let Landing::Pending(landing) = self {
            *self = if landing.await.unwrap_or(false) {
                Landing::Landed
            } else {
                Landing::Refused
            };
        }
        matches!(self, Landing::Landed)
    }
}

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
    activations: Option<Activations>,
    metrics: Arc<Metrics>,
    limits: ConcurrencyLimits,
    /// Its namespaces' quotas (calls in flight).
    quotas: Arc<NamespaceQuotas>,
    /// The calls this runner runs now.
    held: Mutex<HashSet<String>>,
    /// Calls cancelled through this gateway while it held them: nothing more is written for
    /// them, and no attempt starts.
    cancelled: Mutex<HashSet<String>>,
    running: Semaphore,
    /// The calls held here that run in order, by group.
    ordered: Mutex<HashMap<String, Group>>,
    /// Woken when an ordered call is let go or a scan ends.
    turns: tokio::sync::Notify,
    /// Scans under way.
    scanning: AtomicUsize,
    /// Scans started, to start each with another namespace.
    scans: AtomicUsize,
}

/// How long a call waiting for its turn sleeps before it looks again, whatever wakes it.
const TURN_POLL: Duration = Duration::from_millis(50);

/// The calls of one group held here.
#[derive(Default)]
struct Group {
    /// Their places and ids.
    held: BTreeSet<(u64, String)>,
    /// The one whose attempts have started, if one has.
    started: Option<String>,
}

impl Group {
    /// Takes the turn of call `id` at place `seq` if it is the first held and no other
    /// call has started; whether it did.
    fn take(&mut self, seq: u64, id: &str) -> bool {
        let first = self
            .held
            .first()
            .is_none_or(|(first_seq, first)| (*first_seq, first.as_str()) == (seq, id));
        if first && self.started.as_deref().is_none_or(|s| s == id) {
            self.started = Some(id.to_string());
            return true;
        }
        false
    }

    /// Forgets call `id` at place `seq`; whether the group is empty now.
    fn remove(&mut self, seq: u64, id: &str) -> bool {
        self.held.remove(&(seq, id.to_string()));
        if self.started.as_deref() == Some(id) {
            self.started = None;
        }
        self.held.is_empty()
    }
}

/// What waiting for a turn came to.
enum Turn {
    /// The call may start; whether it waited at all.
    Go { waited: bool },
    /// Another runner took the call, or it is gone from the store.
    Lost,
}

/// Lets a call go when its drive ends, however it ends (a panic included): its group's
/// next call may then start.
struct Driving<'a> {
    runner: &'a Runner,
    id: String,
    order: Option<CallOrder>,
}

impl Drop for Driving<'_> {
    fn drop(&mut self) {
        if let Some(order) = &self.order {
            self.runner.delist(order, &self.id);
        }
        self.runner.let_go(&self.id);
    }
}

/// Counts a scan under way while it lives, and wakes the calls waiting for their turn when
/// it ends.
struct Scanning<'a>(&'a Inner);

impl<'a> Scanning<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.scanning.fetch_add(1, Ordering::AcqRel);
        Self(inner)
    }
}

impl Drop for Scanning<'_> {
    fn drop(&mut self) {
        self.0.scanning.fetch_sub(1, Ordering::AcqRel);
        self.0.turns.notify_waiters();
    }
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("id", &self.inner.id)
            .finish_non_exhaustive()
    }
}

/// A set's lock, whatever a panicking holder left.
fn locked(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

impl Runner {
    /// A runner named `id`; `records` writes activation records, in batches and at
    /// acceptance (`None`: no records); attempts wait for a slot under `limits`.
    pub fn new(
        id: String,
        calls: Calls,
        client: Arc<SchedulerClient>,
        records: Option<(Recorder, Activations)>,
        metrics: Arc<Metrics>,
        limits: ConcurrencyLimits,
        quotas: Arc<NamespaceQuotas>,
    ) -> Self {
        let (recorder, activations) = records.unzip();
        Self {
            inner: Arc::new(Inner {
                id,
                calls,
                client,
                recorder,
                activations,
                metrics,
                limits,
                quotas,
                held: Mutex::new(HashSet::new()),
                cancelled: Mutex::new(HashSet::new()),
                running: Semaphore::new(MAX_RUNNING),
                ordered: Mutex::new(HashMap::new()),
                turns: tokio::sync::Notify::new(),
                scanning: AtomicUsize::new(0),
                scans: AtomicUsize::new(0),
            }),
        }
    }

    /// The runner's id, which its leases name.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// Calls held now.
    pub fn held(&self) -> usize {
        locked(&self.inner.held).len()
    }

    fn holds(&self, id: &str) -> bool {
        locked(&self.inner.held).contains(id)
    }

    /// Marks call `id` as run here; `false` if it already is.
    fn hold(&self, id: &str) -> bool {
        locked(&self.inner.held).insert(id.to_string())
    }

    /// Marks call `id` as no longer run here. Takes the locks in the order
    /// [`Runner::cancel`] does.
    fn let_go(&self, id: &str) {
        let mut held = locked(&self.inner.held);
        held.remove(id);
        locked(&self.inner.cancelled).remove(id);
    }

    /// The ordered calls' lock, whatever a panicking holder left.
    fn ordered(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.inner.ordered.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes an ordered call held here.
    fn enlist(&self, order: &CallOrder, id: &str) {
        self.ordered()
            .entry(order.group.clone())
            .or_default()
            .held
            .insert((order.seq, id.to_string()));
    }

    /// Forgets an ordered call let go, and wakes the calls waiting for their turn.
    fn delist(&self, order: &CallOrder, id: &str) {
        {
            let mut ordered = self.ordered();
            if let Some(group) = ordered.get_mut(&order.group) {
                if group.remove(order.seq, id) {
                    ordered.remove(&order.group);
                }
            }
        }
        self.inner.turns.notify_waiters();
    }

    /// Takes the turn of `call` in its group if it is its turn: it is the first of its
    /// group held here, no other call of the group has started, and (if a scan took it) no
    /// scan is under way.
    fn take_turn(&self, order: &CallOrder, id: &str, after_scan: bool) -> bool {
        if after_scan && self.inner.scanning.load(Ordering::Acquire) > 0 {
            return false;
        }
        let mut ordered = self.ordered();
        ordered
            .get_mut(&order.group)
            .is_none_or(|group| group.take(order.seq, id))
    }

    /// Waits for `call`'s turn in its group (see the module docs), renewing its lease every
    /// [`LEASE_MARGIN`] / 2 while it waits; a cancel ends the wait.
    async fn wait_turn(
        &self,
        call: &mut PendingCall,
        order: &CallOrder,
        after_scan: bool,
        landing: &mut Landing,
    ) -> Turn {
        let mut waited = false;
        let mut renewed = Instant::now();
        loop {
            let notified = self.inner.turns.notified();
            if self.take_turn(order, &call.id, after_scan) || self.is_cancelled(&call.id) {
                return Turn::Go { waited };
            }
            waited = true;
            // A waiting call reads and renews its lease in the store: only once it is there.
            if !landing.landed().await {
                return Turn::Lost;
            }
            let _ = tokio::time::timeout(TURN_POLL, notified).await;
            if renewed.elapsed() >= LEASE_MARGIN / 2 {
                renewed = Instant::now();
                if !self.renew_waiting(call).await {
                    return Turn::Lost;
                }
            }
        }
    }

    /// Waits for a token of `call`'s namespace's rate, renewing its lease in the store every
    /// `LEASE_MARGIN / 2` (so no other runner takes it meanwhile, and a cancel through
    /// another gateway is seen). A call cancelled here goes on, to end at its next check.
    async fn wait_rate(&self, call: &mut PendingCall, landing: &mut Landing) -> Turn {
        let namespace = keys::split(call.target.name()).0.to_string();
        let mut waited = false;
        let mut renewed = Instant::now();
        loop {
            let pause = match self.inner.quotas.take_rate(&namespace).await {
                Ok(()) => return Turn::Go { waited },
                Err(pause) => pause,
            };
            if self.is_cancelled(&call.id) {
                return Turn::Go { waited };
            }
            waited = true;
            if !landing.landed().await {
                return Turn::Lost;
            }
            tokio::time::sleep(pause).await;
            if renewed.elapsed() >= LEASE_MARGIN / 2 {
                renewed = Instant::now();
                if !self.renew_waiting(call).await {
                    return Turn::Lost;
                }
            }
        }
    }

    /// Whether this runner may go on running `stored` (the call as the store has it): its
    /// lease is this runner's, ran out, or there is none.
    fn may_run(&self, stored: &PendingCall) -> bool {
        stored
            .lease
            .as_ref()
            .is_none_or(|l| l.owner == self.inner.id || l.until_ms <= now_ms())
    }

    /// Renews the lease of a waiting call, read back as a scan's take is; whether this
    /// runner still holds it (a store that does not answer leaves the call waiting here).
    async fn renew_waiting(&self, call: &mut PendingCall) -> bool {
        match self.inner.calls.of(&call.target).get(&call.id).await {
            Ok(None) => return false,
            Ok(Some(stored)) => {
                if !self.may_run(&stored) {
                    return false;
                }
            }
            Err(e) => {
                tracing::warn!(id = %call.id, cause = %e, "re-reading a waiting call");
                return true;
            }
        }
        call.lease = Some(call.lease_for(&self.inner.id, now_ms()));
        if let Err(e) = self.inner.calls.put(call).await {
            tracing::warn!(id = %call.id, cause = %e, "renewing a waiting call's lease");
            return true;
        }
        match self.inner.calls.of(&call.target).get(&call.id).await {
            Ok(Some(stored)) => stored.lease == call.lease,
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// Whether call `id` was cancelled through this gateway while held here.
    fn is_cancelled(&self, id: &str) -> bool {
        locked(&self.inner.cancelled).contains(id)
    }

    /// Tells the runner that call `id` was cancelled (the store already says so): if it
    /// runs here, no attempt starts after this and nothing more is written for it but a
    /// success.
    pub fn cancel(&self, id: &str) {
        // Under the held set's lock, so that the call cannot be let go in between and leave
        // a marker nobody clears.
        let held = locked(&self.inner.held);
        if held.contains(id) {
            locked(&self.inner.cancelled).insert(id.to_string());
        }
    }

    /// Accepts `call` (leased to this runner from now): writes it, its running result, its
    /// record and `extra` in one round trip, then runs it. When this returns `Ok`, the call
    /// is in the store. The work is a task of its own, so that a caller that goes away
    /// midway (a client that disconnects) cannot leave the call held and never run.
    pub async fn accept(
        &self,
        call: PendingCall,
        extra: Vec<(Key, Write)>,
    ) -> squall_state::Result<()> {
        self.accept_as(call, extra, false).await
    }

    /// [`Runner::accept`], but the call's first attempt starts at once, while the writes that
    /// accept it are on their way to the store: the call starts one durable write sooner.
    /// What the attempt leaves (its result, the call's next attempt, its record) is written
    /// only once they landed; if they fail, the attempt's outcome is dropped and the error
    /// returned, so a caller that offers the call again may run it a second time. For
    /// callers whose promise is the change it delivers (the change feed keeps a change until
    /// its call is in the store), never for a call a client was told is refused.
    pub async fn accept_started(
        &self,
        call: PendingCall,
        extra: Vec<(Key, Write)>,
    ) -> squall_state::Result<()> {
        self.accept_as(call, extra, true).await
    }

    async fn accept_as(
        &self,
        mut call: PendingCall,
        extra: Vec<(Key, Write)>,
        started: bool,
    ) -> squall_state::Result<()> {
        call.lease = Some(call.lease_for(&self.inner.id, now_ms()));
        let mut writes = extra;
        let cleanup: Vec<Key> = writes.iter().map(|(key, _)| key.clone()).collect();
        let call_write = self.inner.calls.call_write(&call)?;
        let mut cleanup = cleanup;
        cleanup.push(call_write.0.clone());
        writes.push(call_write);
        let running = self.inner.calls.of(&call.target).result_write(
            &call.id,
            &CallResult::Running,
            call.attempt,
        )?;
        cleanup.push(running.0.clone());
        writes.push(running);
        if let Some(activations) = &self.inner.activations {
            writes.push(activations.write_of(&record_of(&call, Status::Running, None, None))?);
        }
        let runner = self.clone();
        let accepted = tokio::spawn(async move {
            // Held before it is in the store, so that no scan of this runner takes it too.
            // Already held: the same call (a cron tick) is being accepted or run here.
            if !runner.hold(&call.id) {
                return Ok(());
            }
            let id = call.id.clone();
            // Started at once, the attempt waits for the writes before it writes anything;
            // else it starts once they landed.
            let (started, pending) = if started {
                let (landed, landing) = tokio::sync::oneshot::channel();
                let attempt = runner.run_held(call, false, Landing::Pending(landing));
                (Some((landed, attempt)), None)
            } else {
                (None, Some(call))
            };
            let written = runner.inner.calls.write_all(writes).await;
            let attempt = started.map(|(landed, attempt)| {
                let _ = landed.send(written.is_ok());
                attempt
            });
            match written {
                Ok(()) => {
                    if let Some(call) = pending {
                        let _attempt = runner.run_held(call, false, Landing::Landed);
                    }
                    Ok(())
                }
                Err(e) => {
                    // Some writes may have landed: take back the call (and the key's claim),
                    // so that the refused call does not run. If the store cannot take even
                    // that, a scan may still run it.
                    if let Err(cleanup_error) = runner.inner.calls.delete(cleanup).await {
                        tracing::warn!(id = %id, cause = %cleanup_error,
                            "taking back a call the store half took");
                    }
                    match attempt {
                        // Nothing of the attempt is written before its call landed: stop it
                        // where it is. Its end lets the call go (until then an offer of the
                        // same call would find it held here and take it for accepted).
                        Some(attempt) => {
                            attempt.abort();
                            let _ = attempt.await;
                        }
                        None => runner.let_go(&id),
                    }
                    Err(e)
                }
            }
        });
        accepted
            .await
            .map_err(|e| squall_state::Error::Internal(format!("accepting a call panicked: {e}")))?
    }

    /// Runs `call`, which this runner holds and the store holds leased to it (`after_scan`:
    /// a scan took it).
    fn run_held(
        &self,
        call: PendingCall,
        after_scan: bool,
        landing: Landing,
    ) -> tokio::task::JoinHandle<()> {
        if let Some(order) = &call.order {
            self.enlist(order, &call.id);
        }
        let runner = self.clone();
        tokio::spawn(async move { runner.drive(call, after_scan, landing).await })
    }

    /// Takes `call` if it is still [`claimable`] here as the store has it now: holds it,
    /// leases it to this runner, reads the lease back, and runs it. `false` if it is already
    /// run here, gone, or another runner's lease won. A task of its own, like
    /// [`Runner::accept`].
    pub async fn adopt(&self, call: PendingCall) -> squall_state::Result<bool> {
        let runner = self.clone();
        let adopted = tokio::spawn(async move {
            let id = call.id.clone();
            if !runner.hold(&id) {
                return Ok(false);
            }
            let taken = runner.take(call).await;
            if !matches!(taken, Ok(true)) {
                runner.let_go(&id);
            }
            taken
        });
        adopted
            .await
            .map_err(|e| squall_state::Error::Internal(format!("adopting a call panicked: {e}")))?
    }

    /// The store side of [`Runner::adopt`], for a call held here.
    async fn take(&self, call: PendingCall) -> squall_state::Result<bool> {
        // What the page said may be stale: the call may have finished (and been let go) since.
        let Some(mut call) = self.inner.calls.of(&call.target).get(&call.id).await? else {
            return Ok(false);
        };
        if !claimable(&call, &self.inner.id, false, now_ms()) {
            return Ok(false);
        }
        call.lease = Some(call.lease_for(&self.inner.id, now_ms()));
        self.inner.calls.put(&call).await?;
        let won = self
            .inner
            .calls
            .get(&call.id)
            .await?
            .is_some_and(|stored| stored.lease == call.lease);
        if won {
            let _attempt = self.run_held(call, true, Landing::Landed);
        }
        Ok(won)
    }

    /// [`Runner::adopt`], once the call is no longer run here: a call given up a moment ago
    /// may still be held by its finishing task. If that takes over 5 s, a later scan takes
    /// the call.
    pub async fn adopt_when_free(&self, call: PendingCall) -> squall_state::Result<bool> {
        let free = Poll::within(Duration::from_secs(5))
            .every(Duration::from_millis(5))
            .until_async(|| async { (!self.holds(&call.id)).then_some(()) })
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

    /// One pass over the pending calls of every namespace: takes those [`claimable`] here. Calls held here are
    /// not read.
    pub async fn scan(&self) -> squall_state::Result<usize> {
        let _scanning = Scanning::new(&self.inner);
        let mut taken = 0;
        // A different namespace first each pass, so that one with more pending calls than
        // a runner holds cannot keep the others' waiting.
        let mut namespaces = Namespaces::new(self.inner.calls.store().clone())
            .names()
            .await?;
        if !namespaces.is_empty() {
            let first = self.inner.scans.fetch_add(1, Ordering::Relaxed) % namespaces.len();
            namespaces.rotate_left(first);
        }
        for namespace in namespaces {
            let calls = self.inner.calls.in_namespace(&namespace);
            let mut after = None;
            loop {
                let (page, next) = calls.pending(after, SCAN_PAGE, |id| self.holds(id)).await?;
                for call in page {
                    if self.held() >= MAX_HELD {
                        return Ok(taken);
                    }
                    let here = self.holds(&call.id);
                    if claimable(&call, &self.inner.id, here, now_ms()) && self.adopt(call).await? {
                        taken += 1;
                    }
                }
                match next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
        }
        Ok(taken)
    }

    /// Runs `call`'s attempts until it finishes, is given up, or is cancelled.
    async fn drive(&self, mut call: PendingCall, after_scan: bool, mut landing: Landing) {
        let order = call.order.clone();
        let _driving = Driving {
            runner: self,
            id: call.id.clone(),
            order: order.clone(),
        };
        // The first attempt of a call just taken needs no second look at the store, unless it
        // waited for its turn.
        let mut fresh = true;
        if let Some(order) = &order {
            match self
                .wait_turn(&mut call, order, after_scan, &mut landing)
                .await
            {
                Turn::Go { waited } => fresh = !waited,
                Turn::Lost => {
                    tracing::info!(id = %call.id, "the call was not accepted, or another runner took it while it waited for its turn");
                    return;
                }
            }
        }
        // A call no client made (a trigger's delivery, a redrive) is under its namespace's
        // rate as a runner takes it up: it waits for a token (see `crate::quotas`), renewing
        // its lease as a call waiting for its turn does; its retries here take none, as an
        // accepted call's do not.
        if crate::quotas::pays_rate_when_run(&call.cause) {
            match self.wait_rate(&mut call, &mut landing).await {
                Turn::Go { waited } => fresh &= !waited,
                Turn::Lost => {
                    tracing::info!(id = %call.id, "another runner took the call, or it was cancelled, while it waited for its namespace's rate");
                    return;
                }
            }
        }
        // Attempts in a row that found no executor with room: each waits longer.
        let mut crowded = 0u32;
        loop {
            let wait = Duration::from_millis(call.not_before_ms.saturating_sub(now_ms()));
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            // A slot under the namespace's calls in flight (see `crate::quotas`), then one
            // under the target's concurrency limit, first: waiting for them holds none of the
            // runner's own, and an attempt waiting on its namespace holds no slot of its
            // function, which synchronous calls of it would find taken. A cancel ends the wait.
            let waiting = Instant::now();
            let Ok(in_flight) = self
                .inner
                .quotas
                .acquire(keys::split(call.target.name()).0, || {
                    self.is_cancelled(&call.id)
                })
                .await
            else {
                break;
            };
            let Ok(slot) = self
                .inner
                .limits
                .acquire(&call.target, || self.is_cancelled(&call.id))
                .await
            else {
                break;
            };
            let Ok(permit) = self.inner.running.acquire().await else {
                break;
            };
            if self.is_cancelled(&call.id) {
                break;
            }
            // After a retry's wait, or a long wait for a slot or a permit, look at the store
            // again: a cancel through another gateway deletes the call, and a wait past the
            // lease may have let another runner take it.
            if !fresh || waiting.elapsed() > LEASE_MARGIN / 2 {
                if !landing.landed().await {
                    break;
                }
                match self.inner.calls.of(&call.target).get(&call.id).await {
                    Ok(Some(stored)) => {
                        if !self.may_run(&stored) {
                            tracing::info!(id = %call.id, "another runner took the call while it waited here");
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(id = %call.id, cause = %e, "re-reading a pending call");
                        call.not_before_ms = now_ms() + 1000;
                        continue;
                    }
                }
            }
            fresh = false;
            // A wait may have brought the lease near its end: renew it.
            let now = now_ms();
            if call.lease.as_ref().is_none_or(|l| {
                l.until_ms < now + (call.timeout() + LEASE_MARGIN / 2).as_millis() as u64
            }) {
                if !landing.landed().await {
                    break;
                }
                call.lease = Some(call.lease_for(&self.inner.id, now));
                if let Err(e) = self.inner.calls.put(&call).await {
                    tracing::warn!(id = %call.id, cause = %e, "renewing a lease");
                }
            }
            let start_ms = now_ms();
            let started = Instant::now();
            let mut options = call.options.clone();
            options.report = self.inner.recorder.is_some();
            options.attempt = call.attempt;
            let (outcome, steps) = self
                .inner
                .client
                .invoke_reported(
                    call.target.clone(),
                    call.input.clone(),
                    options,
                    call.timeout() + Duration::from_secs(2),
                )
                .await;
            drop((permit, slot, in_flight));
            let took = started.elapsed();
            // Nothing of the attempt is written before the call itself is in the store.
            if !landing.landed().await {
                break;
            }
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
                    // A success stands even if the call was cancelled while it ran.
                    self.finish(&call, CallResult::Succeeded(output)).await;
                    self.record(&call, Status::Succeeded, None, Some(output_bytes), steps);
                    break;
                }
                Err(_) if self.is_cancelled(&call.id) => break,
                Err(failure) if failure.code == FailureCode::NoCapacity => {
                    crowded += 1;
                    if !self.crowded(&mut call, failure, crowded).await {
                        break;
                    }
                }
                Err(failure) => {
                    crowded = 0;
                    self.inner.metrics.attempt(kind, name, Some(failure.code));
                    if !self.failed(&mut call, failure, start_ms, took, steps).await {
                        break;
                    }
                }
            }
        }
    }

    /// The retry policy of `call`'s target: read again until the store answers, the
    /// default after [`POLICY_PATIENCE`].
    async fn policy(&self, call: &PendingCall) -> RetryPolicy {
        let started = Instant::now();
        let mut pause = Duration::from_millis(50);
        loop {
            match self.inner.calls.policy(&call.target).await {
                Ok(policy) => return policy,
                Err(e) if started.elapsed() < POLICY_PATIENCE => {
                    tracing::warn!(id = %call.id, cause = %e, "reading a retry policy; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => {
                    tracing::error!(id = %call.id, cause = %e, "no retry policy could be read; no retry");
                    return RetryPolicy::default();
                }
            }
        }
    }

    /// Handles a failed attempt; whether another follows.
    async fn failed(
        &self,
        call: &mut PendingCall,
        failure: Failure,
        start_ms: u64,
        took: Duration,
        steps: Vec<StepReport>,
    ) -> bool {
        let policy = self.policy(call).await;
        let now = now_ms();
        let error = RecordedError::from(&failure);
        let next = after_failure(&policy, call, failure.code, now);
        call.attempts.push(Attempt {
            attempt: call.attempt,
            start_ms,
            duration_us: took.as_micros() as u64,
            placement: steps
                .iter()
                .map(|s| (s.function.clone(), s.executor.clone()))
                .collect(),
            error: Some(error.clone()),
        });
        match next {
            AfterFailure::Retry { attempt, at_ms } => {
                // Cancelled meanwhile (through another gateway): a write now would bring the
                // deleted call back.
                let gone = matches!(
                    self.inner.calls.of(&call.target).get(&call.id).await,
                    Ok(None)
                );
                if gone || self.is_cancelled(&call.id) {
                    return false;
                }
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
                self.record(call, Status::Running, Some(error), None, steps);
                true
            }
            AfterFailure::DeadLetter | AfterFailure::Requeue { .. } => {
                if self.is_cancelled(&call.id) {
                    return false;
                }
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
                if moved.is_err() {
                    // No dead letter can hold it: the failure is its outcome all the same.
                    self.finish(call, CallResult::Failed(failure)).await;
                }
                self.inner.metrics.dead_letter(kind, name);
                self.record(call, Status::Failed, Some(error), None, steps);
                false
            }
        }
    }

    /// Handles an attempt that found no executor with room (it does not count): the same
    /// attempt waits 100 ms, doubled for each such attempt in a row up to 1.6 s, with up to
    /// half as much again at random, so that a crowd of waiting calls does not hammer the
    /// scheduler. Whether it runs again (not past the call's maximum age).
    async fn crowded(&self, call: &mut PendingCall, failure: Failure, crowded: u32) -> bool {
        let policy = self.policy(call).await;
        let now = now_ms();
        match after_failure(&policy, call, failure.code, now) {
            AfterFailure::Requeue { .. } => {
                let base = 100u64 << crowded.saturating_sub(1).min(4);
                let wait = base + rand::random::<u64>() % (base / 2 + 1);
                call.not_before_ms = now + wait;
                true
            }
            _ => {
                let (kind, name) = kind_and_name(&call.target);
                self.inner.metrics.attempt(kind, name, Some(failure.code));
                self.failed(call, failure, now, Duration::ZERO, Vec::new())
                    .await
            }
        }
    }

    /// Writes a finished call's result and deletes it. A result the store refuses (an
    /// output over its limits) is written as a `too_large` failure instead.
    async fn finish(&self, call: &PendingCall, result: CallResult) {
        let calls = self.inner.calls.of(&call.target);
        let (id, attempt) = (call.id.clone(), call.attempt);
        let write = |result: CallResult| {
            let (calls, id) = (calls.clone(), id.clone());
            move || {
                let (calls, id, result) = (calls.clone(), id.clone(), result.clone());
                async move { calls.finish(&id, &result, attempt).await }
            }
        };
        if let Err(refused) = self.persist("writing a call's result", write(result)).await {
            let failure = Failure::new(
                FailureCode::TooLarge,
                format!("the output could not be stored: {refused}"),
            );
            if let Err(e) = self
                .persist(
                    "writing a call's failure",
                    write(CallResult::Failed(failure)),
                )
                .await
            {
                tracing::error!(id = %call.id, cause = %e, "no outcome could be written");
            }
        }
    }

    /// Retries a store write until it is done: the call stays held meanwhile, so no scan
    /// here runs it again, and its lease keeps other runners off it for a while. A value the
    /// store refuses is an error at once: trying again cannot change it.
    async fn persist<F, Fut>(&self, what: &str, write: F) -> squall_state::Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = squall_state::Result<()>>,
    {
        let mut pause = Duration::from_millis(50);
        loop {
            match write().await {
                Ok(()) => return Ok(()),
                Err(e @ squall_state::Error::BadValue { .. }) => {
                    tracing::warn!(cause = %e, "{what}: refused");
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(cause = %e, "{what}; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Refuses `call` without running it (a `kv-change` delivery too deep in a trigger
    /// chain): makes it a dead letter, with a failed result and record. When this returns
    /// `Ok`, the dead letter is in the store (its id taken, like an accepted call's); it can be
    /// redriven like any other.
    pub async fn refuse(&self, call: PendingCall, failure: Failure) -> squall_state::Result<()> {
        let error = RecordedError::from(&failure);
        self.inner
            .calls
            .dead_letter(call.clone(), error.clone())
            .await?;
        let (kind, name) = kind_and_name(&call.target);
        self.inner.metrics.dead_letter(kind, name);
        self.record(&call, Status::Failed, Some(error), None, Vec::new());
        Ok(())
    }

    /// Queues the record of `call` as it now stands.
    fn record(
        &self,
        call: &PendingCall,
        status: Status,
        error: Option<RecordedError>,
        output_bytes: Option<u64>,
        steps: Vec<StepReport>,
    ) {
        let Some(recorder) = &self.inner.recorder else {
            return;
        };
        let mut record = record_of(call, status, error, output_bytes);
        // The latest attempt's steps (earlier attempts keep their placement and error).
        record.steps = steps;
        recorder.record(record);
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
        steps: Vec::new(),
        chain: call.options.chain,
    }
}

/// A failure for a call that cannot be accepted.
pub fn unavailable(e: impl std::fmt::Display) -> Failure {
    Failure::new(FailureCode::Unavailable, e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_runs_its_calls_one_at_a_time_in_place_order() {
        let mut group = Group::default();
        for (seq, id) in [(2, "b"), (1, "a"), (3, "c")] {
            group.held.insert((seq, id.to_string()));
        }
        // Only the first place starts, and again when asked again.
        assert!(!group.take(2, "b"));
        assert!(group.take(1, "a"));
        assert!(group.take(1, "a"));
        // A redriven call with an older place waits for the one started.
        group.held.insert((0, "old".to_string()));
        assert!(!group.take(0, "old"));
        assert!(!group.remove(1, "a"));
        assert!(group.take(0, "old"));
        assert!(!group.take(2, "b"));
        assert!(!group.remove(0, "old"));
        assert!(group.take(2, "b"));
        assert!(!group.remove(2, "b"));
        assert!(group.take(3, "c"));
        assert!(group.remove(3, "c"), "empty once the last goes");
    }
}
