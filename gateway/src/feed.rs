//! The change feed: delivers the store's journaled writes (see `squall_kvs::journal`) to
//! `kv-change` triggers, each change as a durable asynchronous call.
//!
//! # One deliverer, positions in the store
//! One gateway at a time delivers: the holder of a lease in the store (renewed
//! every 3 s, taken over by another gateway once [`LEASE_MS`] passed without a renewal).
//! For each shard of the store it asks for the changes after its position, accepts one call
//! per change and matching trigger (through the [`Runner`], so the call is in the store before
//! the position moves), then stores the new position (a max register per shard) and asks
//! again, which lets the shard forget what was delivered. An idle feed holds a wait on each
//! shard ([`squall_proto::Request::AwaitChange`]), which the shard answers right after the
//! commit that made a change durable; it then reads the shards that woke it, and every shard
//! after a busy pass or 50 ms without a wake-up (in case a wait failed).
//!
//! # A delivery starts before its call is in the store
//! A change's call starts its first attempt while the write that accepts it is on its way
//! ([`Runner::accept_started`]): the change itself is the promise, kept in its shard's
//! journal until a position past it is stored, which happens only once the call is in the
//! store. The attempt writes nothing (result, retry, record) before that write landed; if it
//! fails, the attempt's outcome is dropped and the change is delivered again, so its
//! function may run twice (at least once, as always).
//!
//! # What can be delivered twice, and what never is lost
//! A change's call id is computed from the trigger, the shard and the change's sequence
//! number ([`change_id`]), the same in every gateway. A deliverer that dies after accepting
//! calls and before storing its position leaves those changes to the next one, which finds
//! their calls already taken and skips them; it checks each change it delivers until it has
//! stored a position of its own. Two gateways deliver at once only when a lease is taken over
//! within one store round trip of its renewal; then a change may run twice (the record shows
//! it). The copies of one write on its replicas, and a last-writer-wins write, delete or
//! expiry its client sent again, are delivered once by the deliverer that reads them (it
//! counts them by digest; a counter's or a set's write sent again looks like a second write
//! and is delivered twice); one that takes over knows
//! only the calls its predecessor accepted, so a copy on another replica than the one
//! delivered, still unread at the take-over, runs again.
//! A change is forgotten by its shard only once a position past it is in the store, and
//! a position moves only past changes whose calls are in the store: a SIGKILL at any point
//! loses nothing. A shard whose journal filled up (no deliverer for a long while) drops its
//! oldest changes and says how many: they are logged as an error and counted under
//! [`keys::changes_lost`] (shown with each `kv-change` trigger).
//!
//! # The event
//! A call's input is the change as JSON: `{"trigger","key","op":"write"|"delete","seq","ms",
//! "written","after"}`, values as `{"type":...,"value":...}` (text for last-writer-wins
//! registers, numbers for counters and max/min, arrays of text for sets; other types carry
//! only their type), and `"chain"`, how many trigger calls led to the write (0: none).
//!
//! # Order per key
//! A trigger's deliveries of one key are accepted one after another, in the order the shard
//! journaled them, each with its place ([`CallOrder`]: the trigger and key, the change's
//! sequence number), and the runner holding them starts each only once the earlier ones it
//! holds ended (succeeded or became dead letters after their retries); different keys run
//! concurrently. The order is lost when a gateway dies with calls pending (see
//! [`crate::runner`]), and in a cluster it is that of the replicas' sequence numbers, which
//! follow each shard's clock.
//!
//! # Trigger chains stop
//! A trigger's call runs with `chain` one more than the change it delivers
//! ([`InvokeOptions::chain`]); its writes, and its nested calls' writes, reach the store as
//! [`squall_proto::Request::PutChained`], so the shard journals them with that depth. A
//! change whose delivery would go deeper than the gateway's limit (`--max-trigger-chain`,
//! 16 by default) is not run: it becomes a dead letter of the target with a `chain_too_deep`
//! error and a failed record, so a function whose writes fire its own trigger runs the limit's
//! number of times and stops, visibly. Redriving the dead letter runs that one call.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use squall_lattices::{Counter, LatticeValue, Max, Min};
use squall_proto::call::{Failure, FailureCode, InvokeOptions, Target};
use squall_proto::{keys, Change};
use squall_state::calls::{CallOrder, Calls, PendingCall};
use squall_state::namespaces::Namespaces;
use squall_state::triggers::{change_id, Firing, Trigger, Triggers};
use squall_state::ClientPool;

use crate::runner::Runner;

/// How long a lease lasts without renewal.
pub const LEASE_MS: u64 = 10_000;
/// How often the holder renews its lease.
const LEASE_RENEW: Duration = Duration::from_secs(3);
/// How often the triggers are read from the store.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// How long the feed waits when no shard had a change and none woke it (the bound on a
/// change's wait when the shards' wake-ups fail).
const IDLE_WAIT: Duration = Duration::from_millis(50);
/// How long a shard holds a wake-up request (see [`Wakers`]).
const AWAIT_CHANGE: Duration = Duration::from_millis(900);
/// How often the journals are drained while no `kv-change` trigger exists (their changes
/// are then dropped, so that a deleted trigger leaves nothing to grow).
const DRAIN_EVERY: Duration = Duration::from_secs(1);
/// Changes asked of a shard at once.
const BATCH: u32 = 512;
/// Calls accepted at once.
const DELIVERING: usize = 16;
/// How deep a chain of `kv-change` trigger calls may go by default: a function whose writes
/// fire its own trigger runs this many times, then its next delivery is a dead letter.
pub const DEFAULT_MAX_CHAIN: u32 = 16;

/// A `kv-change` trigger as last read.
struct Armed {
    trigger: Trigger,
    /// Its name qualified with its namespace ([`keys::qualify`]): trigger names are a
    /// namespace's own.
    qualified: String,
    target: Target,
    /// The store keys it fires on: its prefix mapped into its namespace ([`keys::user`]).
    prefix: String,
}

/// Delivers journaled changes to `kv-change` triggers. See the module docs.
pub struct ChangeFeed {
    kvs: ClientPool,
    triggers: Triggers,
    calls: Calls,
    runner: Runner,
    id: String,
    namespace: String,
    timeout: Duration,
    /// Where each shard stands, once read from the store.
    positions: HashMap<String, u64>,
    /// Shards whose changes after the stored position were delivered by this gateway (the
    /// others' may have been by an earlier deliverer: each is checked).
    trusted: HashSet<String>,
    /// Whether some shard journals (as its last answer said; assumed at the start).
    journals_on: bool,
    /// The writes delivered lately, by trigger and digest: the copies of one write that
    /// other replicas journaled, and a stamped write its client sent again, are delivered once.
    recent: Recent,
    /// The deepest trigger chain delivered (see the module docs).
    max_chain: u32,
    /// Wake the feed when a shard journals a change.
    wakers: Wakers,
}

/// Wakes an idle feed the moment a shard journals a change: one task per shard holds a
/// [`squall_proto::Request::AwaitChange`] on it, which the shard answers right after the
/// commit that made a change durable, and sends it again. They run while this gateway
/// holds the feed's lease. A waker that fails leaves the feed to look every [`IDLE_WAIT`].
#[derive(Default)]
struct Wakers {
    wake: Arc<Wake>,
    /// The shards watched, each with its task's stop flag.
    watching: HashMap<String, Arc<AtomicBool>>,
}

/// What the wakers share with the feed: the shards that woke it since it last looked.
#[derive(Default)]
struct Wake {
    notify: tokio::sync::Notify,
    woken: std::sync::Mutex<HashSet<String>>,
}

impl Wake {
    fn woken(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.woken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Wakers {
    /// Watches exactly the shards at `endpoints`.
    fn watch(&mut self, kvs: &ClientPool, endpoints: &[String]) {
        self.watching.retain(|endpoint, stop| {
            let kept = endpoints.contains(endpoint);
            if !kept {
                stop.store(true, Ordering::Relaxed);
            }
            kept
        });
        for endpoint in endpoints {
            if self.watching.contains_key(endpoint) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            self.watching.insert(endpoint.clone(), stop.clone());
            tokio::spawn(wake_on_changes(
                kvs.clone(),
                endpoint.clone(),
                self.wake.clone(),
                stop,
            ));
        }
    }

    /// Stops every waker.
    fn stop(&mut self) {
        for (_, stop) in self.watching.drain() {
            stop.store(true, Ordering::Relaxed);
        }
    }

    /// Waits until a shard journaled a change since the last wake-up, at most [`IDLE_WAIT`];
    /// the shards that woke the feed (`None`: none did, every shard is to be read).
    async fn idle(&self) -> Option<HashSet<String>> {
        let _ = tokio::time::timeout(IDLE_WAIT, self.wake.notify.notified()).await;
        let woken = std::mem::take(&mut *self.wake.woken());
        (!woken.is_empty()).then_some(woken)
    }
}

impl Drop for Wakers {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One shard's waker (see [`Wakers`]): wakes the feed, naming the shard, whenever the
/// shard's newest change is not the last it saw.
async fn wake_on_changes(
    kvs: ClientPool,
    endpoint: String,
    wake: Arc<Wake>,
    stop: Arc<AtomicBool>,
) {
    let mut newest = 0;
    while !stop.load(Ordering::Relaxed) {
        let asked = endpoint.clone();
        match kvs
            .with(move |client| client.await_change(&asked, newest, AWAIT_CHANGE))
            .await
        {
            Ok((seen, _)) => {
                // Lower: the shard's journal started again lower (a clock set back).
                if seen != newest {
                    newest = seen;
                    wake.woken().insert(endpoint.clone());
                    wake.notify.notify_one();
                }
            }
            Err(e) => {
                tracing::debug!(shard = %endpoint, cause = %e, "waiting for a shard's changes");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The writes delivered lately, by trigger and digest: which copies each shard journaled
/// (by sequence number) and how many were chosen for delivery. A write is delivered again
/// only when some shard has journaled it more often than it was delivered, so the copies of
/// one write on its replicas are delivered once, and two writes that look alike on one shard
/// (a counter's same total after a delete, a set's same element added again) are both
/// delivered.
///
/// A write stamped by its client (a last-writer-wins value, an expiry, a delete: the stamp is
/// in the digest) is one write however often a shard journaled it, so it is delivered once:
/// a client sends a write again, with the same stamp, when a replica did not answer or
/// answered from another view of the cluster, and the replicas that had applied it journal
/// it twice. Counting copies per shard alone delivered such a write twice (one replica with
/// two copies, the other with one).
///
/// Noting a copy again (its shard's changes read again after a failed delivery or a
/// delivery task that panicked) answers what was decided the first time, so a change chosen
/// for delivery is delivered again (its call, already accepted, is then found and skipped)
/// and a copy skipped stays skipped, however often its batch is read. Forgets the oldest
/// digests first.
#[derive(Default)]
struct Recent {
    counts: HashMap<(String, u64), Noted>,
    order: std::collections::VecDeque<(String, u64)>,
}

/// What [`Recent`] knows of one write.
#[derive(Default)]
struct Noted {
    /// Each copy journaled, by shard and sequence number: whether it was chosen.
    copies: HashMap<(String, u64), bool>,
    /// Copies chosen for delivery.
    delivered: u32,
}

/// Digests remembered by [`Recent`]: far more than a round delivers, so that the copies of a
/// write on several replicas meet within it.
const RECENT: usize = 1 << 18;

impl Recent {
    /// Notes that `shard` journaled a write with this digest as its change `seq`, `stamped`
    /// by its client or not; whether to deliver it.
    fn note(&mut self, trigger: &str, digest: u64, shard: &str, seq: u64, stamped: bool) -> bool {
        let entry = (trigger.to_string(), digest);
        let noted = match self.counts.get_mut(&entry) {
            Some(noted) => noted,
            None => {
                self.order.push_back(entry.clone());
                while self.order.len() > RECENT {
                    if let Some(old) = self.order.pop_front() {
                        self.counts.remove(&old);
                    }
                }
                self.counts.entry(entry).or_default()
            }
        };
        let copy = (shard.to_string(), seq);
        if let Some(&chosen) = noted.copies.get(&copy) {
            return chosen;
        }
        let mine = 1 + noted.copies.keys().filter(|(s, _)| s == shard).count() as u32;
        let wanted = if stamped { 1 } else { mine };
        let chosen = wanted > noted.delivered;
        if chosen {
            noted.delivered += 1;
        }
        noted.copies.insert(copy, chosen);
        chosen
    }
}

/// Whether a change's write carries its client's stamp, which its digest covers: a
/// last-writer-wins value, or no value (a delete's tombstone, an expiry), both stamped.
fn stamped(change: &Change) -> bool {
    matches!(change.written, None | Some(LatticeValue::Lww(_)))
}

impl ChangeFeed {
    /// A feed delivering through `runner`, as the gateway `id`; calls get `timeout`.
    pub fn new(
        kvs: ClientPool,
        triggers: Triggers,
        calls: Calls,
        runner: Runner,
        id: String,
        timeout: Duration,
    ) -> Self {
        Self {
            kvs,
            triggers,
            calls,
            runner,
            id,
            namespace: keys::DEFAULT_NAMESPACE.to_string(),
            timeout,
            positions: HashMap::new(),
            trusted: HashSet::new(),
            journals_on: true,
            recent: Recent::default(),
            max_chain: DEFAULT_MAX_CHAIN,
            wakers: Wakers::default(),
        }
    }

    /// The feed with another limit on trigger chains (at least 1).
    pub fn with_max_chain(mut self, max_chain: u32) -> Self {
        self.max_chain = max_chain.max(1);
        self
    }

    /// Delivers until the runtime stops.
    pub fn start(self) {
        tokio::spawn(async move { self.run().await });
    }

    async fn run(mut self) {
        let mut armed: Vec<Armed> = Vec::new();
        let mut refreshed: Option<Instant> = None;
        let mut leased: Option<Instant> = None;
        // The shards to read next, if a wake-up named them (else every shard).
        let mut only: Option<HashSet<String>> = None;
        loop {
            if refreshed.is_none_or(|at| at.elapsed() >= REFRESH_EVERY) {
                match self.kv_triggers().await {
                    Ok(fresh) => armed = fresh,
                    Err(e) => tracing::warn!(cause = %e, "reading kv-change triggers"),
                }
                refreshed = Some(Instant::now());
            }
            if armed.is_empty() && !self.journals_on {
                // Nothing to deliver and nothing journaled: look again later.
                self.wakers.stop();
                tokio::time::sleep(REFRESH_EVERY).await;
                continue;
            }
            if leased.is_none_or(|at| at.elapsed() >= LEASE_RENEW) {
                match self.lease().await {
                    Ok(true) => leased = Some(Instant::now()),
                    Ok(false) => {
                        // Another gateway delivers; what this one knew may be stale.
                        leased = None;
                        self.positions.clear();
                        self.trusted.clear();
                        self.wakers.stop();
                        tokio::time::sleep(LEASE_RENEW).await;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(cause = %e, "taking the change feed's lease");
                        leased = None;
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            match self.round(&mut armed, only.take()).await {
                Ok(true) => {}
                Ok(false) if armed.is_empty() => tokio::time::sleep(DRAIN_EVERY).await,
                // A wake-up names its shards: only they are read next.
                Ok(false) => only = self.wakers.idle().await,
                Err(e) => {
                    tracing::warn!(cause = %e, "delivering changes; trying again");
                    self.positions.clear();
                    self.trusted.clear();
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// The `kv-change` triggers of every namespace that are not paused.
    async fn kv_triggers(&self) -> squall_state::Result<Vec<Armed>> {
        let mut armed = Vec::new();
        for namespace in Namespaces::new(self.kvs.clone()).names().await? {
            let triggers = self.triggers.in_namespace(&namespace);
            for trigger in triggers.list().await? {
                if trigger.paused {
                    continue;
                }
                if let Ok((target, Firing::KvChange(prefix))) = triggers.check(&trigger.spec) {
                    armed.push(Armed {
                        qualified: keys::qualify(&namespace, &trigger.name),
                        trigger,
                        target,
                        prefix: keys::user(&namespace, &prefix),
                    });
                }
            }
        }
        Ok(armed)
    }

    /// Takes or renews the lease; whether this gateway holds it.
    async fn lease(&self) -> squall_state::Result<bool> {
        let key = keys::change_feed_lease(&self.namespace);
        squall_state::lease::take(&self.kvs, &key, &self.id, LEASE_MS).await
    }

    /// One pass over every shard (or over `only` those, which woke the feed); whether any
    /// had changes. A shard that cannot be read is logged and left for the next pass; the
    /// others go on.
    async fn round(
        &mut self,
        armed: &mut Vec<Armed>,
        only: Option<HashSet<String>>,
    ) -> squall_state::Result<bool> {
        let mut endpoints = self.kvs.with(|client| client.shard_endpoints()).await?;
        if !armed.is_empty() {
            self.wakers.watch(&self.kvs, &endpoints);
        }
        if let Some(only) = only {
            endpoints.retain(|endpoint| only.contains(endpoint));
        }
        let mut journals_on = false;
        // Every shard's changes first, then the triggers as they are now: a trigger read
        // after the changes knows of every pause, change, creation or deletion made before
        // those writes were acknowledged.
        let mut taken: Vec<(String, Vec<Change>)> = Vec::new();
        let mut switched_off = Vec::new();
        for endpoint in endpoints {
            match self.take(&endpoint).await {
                Ok((changes, on)) => {
                    journals_on |= on;
                    if !on {
                        switched_off.push(endpoint.clone());
                    }
                    if !changes.is_empty() {
                        taken.push((endpoint, changes));
                    }
                }
                Err(e) => {
                    tracing::warn!(shard = %endpoint, cause = %e, "reading a shard's changes");
                    self.positions.remove(&endpoint);
                    self.trusted.remove(&endpoint);
                }
            }
        }
        if taken.is_empty() && switched_off.is_empty() {
            self.journals_on = journals_on;
            return Ok(false);
        }
        *armed = self.kv_triggers().await?;
        if !armed.is_empty() && !switched_off.is_empty() {
            // A shard added since the triggers were created (more shards after a restart, a
            // new cluster member) journals nothing until told.
            tracing::info!(shards = ?switched_off, "switching on shards' change journals");
            if let Err(e) = self.kvs.with(|client| client.journal(true)).await {
                tracing::warn!(cause = %e, "switching journals on");
            }
            journals_on = true;
        }
        self.journals_on = journals_on;
        let busy = !taken.is_empty();
        for (endpoint, changes) in taken {
            if let Err(e) = self.deliver_all(armed, &endpoint, &changes).await {
                tracing::warn!(shard = %endpoint, cause = %e, "delivering changes; trying again");
                self.positions.remove(&endpoint);
                self.trusted.remove(&endpoint);
            }
        }
        Ok(busy)
    }

    /// The changes of the shard at `endpoint` after its position, and whether it journals.
    async fn take(&mut self, endpoint: &str) -> squall_state::Result<(Vec<Change>, bool)> {
        let after = self.position(endpoint).await?;
        let asked = endpoint.to_string();
        let (changes, lost, on) = self
            .kvs
            .with(move |client| client.changes(&asked, after, BATCH))
            .await?;
        if lost > 0 {
            tracing::error!(shard = %endpoint, lost, "a shard's journal was full: changes were dropped before a trigger saw them");
            let key = keys::changes_lost(&self.namespace);
            let delta = i64::try_from(lost).unwrap_or(i64::MAX);
            if let Err(e) = self
                .kvs
                .with(move |client| client.increment(&key, delta))
                .await
            {
                tracing::warn!(cause = %e, "counting lost changes");
            }
        }
        Ok((changes, on))
    }

    /// Delivers a shard's changes to the triggers they match, then moves its position past
    /// them (every one is a call in the store by then).
    async fn deliver_all(
        &mut self,
        armed: &[Armed],
        endpoint: &str,
        changes: &[Change],
    ) -> squall_state::Result<()> {
        let Some(last) = changes.last().map(|c| c.seq) else {
            return Ok(());
        };
        let check = !self.trusted.contains(endpoint);
        // Up to DELIVERING tasks at once, each answering its changes' outcomes. One task per
        // trigger and key, accepting that key's changes one after another in order, so the
        // runner holds (and runs) them in order; a failed acceptance leaves the key's later
        // changes to the next pass, where they are noted as they were (see `Recent`).
        let mut groups: Vec<(usize, Vec<Change>)> = Vec::new();
        let mut group_of: HashMap<(usize, &str), usize> = HashMap::new();
        for change in changes {
            for (trigger, one) in armed.iter().enumerate() {
                // Writes before the trigger was created, resumed or changed fire nothing.
                if !(change.key.starts_with(&one.prefix)
                    && change.seq >= one.trigger.fires_from_us())
                {
                    continue;
                }
                if change.digest != 0
                    && !self.recent.note(
                        &one.qualified,
                        change.digest,
                        endpoint,
                        change.seq,
                        stamped(change),
                    )
                {
                    // Another replica's copy of a write delivered already.
                    continue;
                }
                let group = *group_of
                    .entry((trigger, change.key.as_str()))
                    .or_insert_with(|| {
                        groups.push((trigger, Vec::new()));
                        groups.len() - 1
                    });
                groups[group].1.push(change.clone());
            }
        }
        let mut delivering = tokio::task::JoinSet::new();
        let mut failed: Option<squall_state::Error> = None;
        for (trigger, group) in groups {
            while delivering.len() >= DELIVERING {
                if let Some(joined) = delivering.join_next().await {
                    self.delivered(joined, &mut failed);
                }
            }
            let one = &armed[trigger];
            let delivery = Delivery {
                calls: self.calls.of(&one.target),
                runner: self.runner.clone(),
                trigger: one.trigger.clone(),
                target: one.target.clone(),
                endpoint: endpoint.to_string(),
                timeout: self.timeout,
                max_chain: self.max_chain,
            };
            delivering.spawn(async move {
                let mut outcomes = Vec::with_capacity(group.len());
                let mut stopped = false;
                for change in group {
                    let outcome = if stopped {
                        Err(squall_state::Error::Internal(
                            "an earlier change of the key was not accepted".into(),
                        ))
                    } else {
                        delivery.deliver(&change, check).await
                    };
                    stopped |= outcome.is_err();
                    outcomes.push(outcome);
                }
                (delivery.trigger.name, outcomes)
            });
        }
        while let Some(joined) = delivering.join_next().await {
            self.delivered(joined, &mut failed);
        }
        if let Some(e) = failed {
            // The position stays: the next pass reads these changes again, checking each.
            return Err(e);
        }
        let key = keys::journal_position(&self.namespace, endpoint);
        let value = LatticeValue::Max(Max(i64::try_from(last).unwrap_or(i64::MAX)));
        self.kvs.with(move |client| client.put(&key, value)).await?;
        self.positions.insert(endpoint.to_string(), last);
        self.trusted.insert(endpoint.to_string());
        Ok(())
    }

    /// Takes a delivery task's outcomes: the first failure is kept in `failed`; a task that
    /// panicked counts as failed. Either way its changes are read again, and checked.
    fn delivered(
        &mut self,
        joined: Result<Delivered, tokio::task::JoinError>,
        failed: &mut Option<squall_state::Error>,
    ) {
        match joined {
            Ok((_, outcomes)) => {
                for outcome in outcomes {
                    if let Err(e) = outcome {
                        failed.get_or_insert(e);
                    }
                }
            }
            Err(e) => {
                failed.get_or_insert(squall_state::Error::Internal(format!(
                    "a delivery task failed: {e}"
                )));
            }
        }
    }

    /// The stored position of the shard at `endpoint`.
    async fn position(&mut self, endpoint: &str) -> squall_state::Result<u64> {
        if let Some(&known) = self.positions.get(endpoint) {
            return Ok(known);
        }
        let key = keys::journal_position(&self.namespace, endpoint);
        let stored = match self.kvs.with(move |client| client.get(&key)).await? {
            Some(LatticeValue::Max(Max(n))) => u64::try_from(n).unwrap_or(0),
            _ => 0,
        };
        self.positions.insert(endpoint.to_string(), stored);
        Ok(stored)
    }
}

/// What a delivery task did: its trigger, and each change's outcome.
type Delivered = (String, Vec<squall_state::Result<()>>);

/// One trigger's delivery of a shard's changes: what accepting a call needs, owned, so that
/// deliveries run as tasks of their own.
struct Delivery {
    calls: Calls,
    runner: Runner,
    trigger: Trigger,
    target: Target,
    endpoint: String,
    timeout: Duration,
    max_chain: u32,
}

impl Delivery {
    /// Accepts the call delivering `change` to the trigger (unless, when `check`, an earlier
    /// deliverer already did).
    async fn deliver(&self, change: &Change, check: bool) -> squall_state::Result<()> {
        let id = change_id(&self.trigger, &self.endpoint, change.seq);
        if check && self.calls.taken(id.as_str()).await? {
            return Ok(());
        }
        let input = serde_json::to_vec(&event(&self.trigger.name, change))
            .map_err(|e| squall_state::Error::Internal(format!("encoding a change: {e}")))?;
        let chain = change.chain.saturating_add(1);
        let mut call = PendingCall::new(
            id.to_string(),
            self.target.clone(),
            Bytes::from(input),
            InvokeOptions {
                timeout_ms: Some(self.timeout.as_millis().try_into().unwrap_or(u64::MAX)),
                chain,
                ..InvokeOptions::default()
            },
            "kv-change",
            squall_lattices::entry::now_ms(),
        );
        // The key's deliveries run one after another, in the order written.
        call.order = Some(CallOrder {
            group: format!("{}\n{}", self.trigger.name, change.key),
            seq: change.seq,
        });
        match chain_too_deep(&self.trigger.name, change, self.max_chain) {
            Some(failure) => {
                tracing::warn!(trigger = %self.trigger.name, key = %change.key, chain,
                    "a trigger chain went too deep: the delivery is a dead letter");
                self.runner.refuse(call, failure).await
            }
            // Started while its acceptance is on its way: this change stays in its shard's
            // journal until the call is in the store, so a refusal loses nothing. Not while
            // the changes are checked (at the start, and after any failure, when the store
            // may be refusing writes): each pass would run the function again.
            None if check => self.runner.accept(call, Vec::new()).await,
            None => self.runner.accept_started(call, Vec::new()).await,
        }
    }
}

/// Why delivering `change` to `trigger` would make a trigger chain deeper than `max_chain`,
/// if it would.
fn chain_too_deep(trigger: &str, change: &Change, max_chain: u32) -> Option<Failure> {
    (change.chain >= max_chain).then(|| {
        Failure::new(
            FailureCode::ChainTooDeep,
            format!(
                "trigger {trigger:?}: the write of {:?} came from a chain of {} trigger calls, \
                 the limit (--max-trigger-chain); is a function writing what fires its own \
                 trigger?",
                shown_key(&change.key),
                change.chain
            ),
        )
    })
}

/// A store key as its namespace's functions name it (the key itself if it is no tenant's).
fn shown_key(stored: &str) -> &str {
    keys::tenant_key(stored).map_or(stored, |(_, key)| key)
}

/// A change as a `kv-change` call's input.
pub fn event(trigger: &str, change: &Change) -> Value {
    json!({
        "trigger": trigger,
        "key": shown_key(&change.key),
        "op": if change.deleted { "delete" } else { "write" },
        "seq": change.seq,
        "ms": change.ms,
        "written": change.written.as_ref().map(value_json),
        "after": change.after.as_ref().map(value_json),
        "chain": change.chain,
    })
}

/// The largest value an event carries; a larger one is given by its size alone.
pub const MAX_EVENT_VALUE: usize = 64 << 10;

/// A value in an event: its type and, for the types the HTTP API reads, its value (a
/// register's text up to [`MAX_EVENT_VALUE`] bytes, else its `bytes` alone).
fn value_json(value: &LatticeValue) -> Value {
    let kind = value.lattice_type().name();
    match value {
        LatticeValue::Lww(register) if register.value.len() > MAX_EVENT_VALUE => {
            json!({"type": kind, "bytes": register.value.len()})
        }
        LatticeValue::Lww(register) => {
            json!({"type": kind, "value": String::from_utf8_lossy(&register.value)})
        }
        LatticeValue::Set(set) if set.0.len() > 1024 => {
            json!({"type": kind, "elements": set.0.len()})
        }
        LatticeValue::Counter(counter) => json!({"type": kind, "value": Counter::value(counter)}),
        LatticeValue::Max(Max(n)) | LatticeValue::Min(Min(n)) => json!({"type": kind, "value": n}),
        LatticeValue::Set(set) => json!({
            "type": kind,
            "value": set.0.iter().map(|e| String::from_utf8_lossy(e).into_owned()).collect::<Vec<_>>(),
        }),
        _ => json!({ "type": kind }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use squall_lattices::{Lww, Timestamp};

    #[test]
    fn a_write_is_delivered_once_whatever_its_copies_and_alike_writes_each() {
        let mut recent = Recent::default();
        // One write, journaled by two replicas: delivered once.
        assert!(recent.note("t", 1, "a", 10, false));
        assert!(!recent.note("t", 1, "b", 20, false));
        // Another trigger delivers it too.
        assert!(recent.note("u", 1, "b", 20, false));
        // The same bytes written again (a second write that looks alike): on both replicas,
        // delivered once more.
        assert!(recent.note("t", 1, "b", 21, false));
        assert!(!recent.note("t", 1, "a", 11, false));
        // Bounded, the oldest forgotten.
        for digest in 100..(RECENT as u64 + 110) {
            recent.note("t", digest, "a", digest, false);
        }
        assert!(recent.counts.len() <= RECENT);
        assert!(recent.note("t", 1, "b", 22, false), "forgotten once old");
    }

    #[test]
    fn a_stamped_write_sent_again_is_delivered_once() {
        let mut recent = Recent::default();
        // Replica a applied the write, b refused it from a newer view; the client sent it
        // again to both: a journaled it twice, b once.
        assert!(recent.note("t", 3, "a", 10, true));
        assert!(!recent.note("t", 3, "a", 11, true));
        assert!(!recent.note("t", 3, "b", 20, true));
        // Unstamped, the same copies are two writes alike (the second delivered).
        assert!(recent.note("t", 4, "a", 10, false));
        assert!(recent.note("t", 4, "a", 11, false));
        assert!(!recent.note("t", 4, "b", 20, false));
    }

    #[test]
    fn a_copy_read_again_is_decided_as_it_was_the_first_time() {
        for stamped in [true, false] {
            let mut recent = Recent::default();
            assert!(recent.note("t", 5, "a", 10, stamped));
            // b's copy skipped (its shard's position moves past it) while a's delivery fails
            // (or its task panics): a's batch, read again, delivers it again.
            assert!(!recent.note("t", 5, "b", 20, stamped));
            assert!(recent.note("t", 5, "a", 10, stamped), "stamped: {stamped}");
            assert!(recent.note("t", 5, "a", 10, stamped), "stamped: {stamped}");
            // A batch read again many times does not make a later write that looks alike,
            // journaled on b alone, a copy of this one.
            assert!(!recent.note("t", 5, "b", 20, stamped));
            assert_eq!(recent.note("t", 5, "b", 21, stamped), !stamped);
        }
    }

    #[test]
    fn lww_values_deletes_and_expiries_are_stamped_and_other_lattices_not() {
        let change = |written: Option<LatticeValue>| Change {
            seq: 1,
            ms: 1,
            key: "k".into(),
            written,
            deleted: false,
            after: None,
            digest: 1,
            chain: 0,
        };
        let lww = LatticeValue::Lww(Lww::new(Timestamp::new(1, 1), Bytes::from_static(b"v")));
        assert!(stamped(&change(Some(lww))));
        assert!(stamped(&change(None)));
        assert!(!stamped(&change(Some(LatticeValue::Max(Max(1))))));
    }

    #[test]
    fn events_carry_the_key_the_values_and_the_order() {
        let change = Change {
            seq: 7,
            ms: 1,
            key: "orders/1".into(),
            written: Some(LatticeValue::Lww(Lww::new(
                Timestamp::new(1, 1),
                Bytes::from_static(b"paid"),
            ))),
            deleted: false,
            after: Some(LatticeValue::Max(Max(3))),
            digest: 9,
            chain: 2,
        };
        let event = event("t", &change);
        assert_eq!(event["chain"], 2);
        assert_eq!(event["key"], "orders/1");
        assert_eq!(event["op"], "write");
        assert_eq!(event["seq"], 7);
        assert_eq!(event["written"]["value"], "paid");
        assert_eq!(event["after"]["type"], "max");
        assert_eq!(event["after"]["value"], 3);
        let deleted = Change {
            deleted: true,
            written: None,
            after: None,
            ..change
        };
        let event = super::event("t", &deleted);
        assert_eq!(event["op"], "delete");
        assert!(event["after"].is_null());
    }

    #[test]
    fn a_chain_stops_at_the_limit_with_its_reason() {
        let change = |chain| Change {
            seq: 1,
            ms: 1,
            key: "loop/k".into(),
            written: None,
            deleted: true,
            after: None,
            digest: 0,
            chain,
        };
        // A write from outside any trigger's call, and one from a call 15 deep: delivered
        // (as calls 1 and 16 deep).
        assert!(chain_too_deep("t", &change(0), 16).is_none());
        assert!(chain_too_deep("t", &change(15), 16).is_none());
        // From a call 16 deep: the 17th would go past the limit.
        let failure = chain_too_deep("t", &change(16), 16).expect("too deep");
        assert_eq!(failure.code, FailureCode::ChainTooDeep);
        assert!(failure.message.contains("loop/k"), "{}", failure.message);
        assert!(chain_too_deep("t", &change(u32::MAX), 1).is_some());
    }
}
