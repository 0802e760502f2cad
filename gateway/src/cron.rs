//! Firing cron triggers (see [`squall_state::triggers`] for the design): every gateway
//! looks at the triggers every [`CHECK_EVERY`], and fires the ticks it sees due as durable
//! asynchronous calls through its [`Runner`]: at once while it holds the lease on firing
//! first, else after a fallback (two seconds and a spread) and only if the tick is still not
//! taken.
//!
//! # Cost
//! The triggers and where each stands are read from the store every [`REFRESH_EVERY`] (two
//! listings and two batched reads), and while a trigger is armed the lease is taken or
//! renewed every three seconds (two reads and a write); working out due ticks is in memory.
//! A firing costs a read of the tick's result key (and of its call if the result says
//! running), the call's acceptance (one batched write) and a max merge.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use squall_lattices::entry::now_ms;
use squall_proto::call::{InvokeOptions, Target};
use squall_proto::keys;
use squall_state::calls::{Calls, PendingCall};
use squall_state::namespaces::Namespaces;
use squall_state::triggers::{due, input_of, tick_id, Due, Firing, Trigger, Triggers};

use crate::runner::Runner;

/// How often due ticks are looked for.
pub const CHECK_EVERY: Duration = Duration::from_millis(250);

/// How often the triggers are read from the store.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The widest spread of gateways' looks at one tick, past [`FALLBACK_MS`].
const SPREAD_MS: u64 = 500;

/// How long a gateway that does not hold the lease on firing waits before it fires a tick
/// the holder did not take.
const FALLBACK_MS: u64 = 2_000;

/// How long the lease on firing lasts without renewal.
const LEASE_MS: u64 = 10_000;

/// How often the lease on firing is taken or renewed.
const LEASE_RENEW: Duration = Duration::from_secs(3);

/// How long before its lease ends a holder stops believing it holds it.
const LEASE_MARGIN_MS: u64 = 1_000;

/// Where each trigger stands, by qualified name ([`keys::qualify`]): the latest tick fired
/// or being fired.
type Through = Arc<Mutex<HashMap<String, u64>>>;

/// A trigger this gateway fires, as last read.
struct Armed {
    /// The triggers of its namespace.
    triggers: Triggers,
    /// Its name qualified with its namespace.
    qualified: String,
    trigger: Trigger,
    target: Target,
    schedule: cron::Schedule,
}

/// Fires cron triggers, of every namespace. Cheap to clone.
#[derive(Clone)]
pub struct CronFirer {
    triggers: Triggers,
    namespaces: Namespaces,
    calls: Calls,
    runner: Runner,
    timeout: Duration,
    /// Until when (ms since the Unix epoch) this gateway holds the lease on firing first, as
    /// last taken or renewed: a second before the lease itself ends, counted from before the
    /// take, so a take that the store answered late cannot leave a belief the lease outlived.
    leading_until: Arc<AtomicU64>,
}

impl CronFirer {
    /// Fires through `runner`; calls get `timeout` as their deadline.
    pub fn new(triggers: Triggers, calls: Calls, runner: Runner, timeout: Duration) -> Self {
        Self {
            namespaces: Namespaces::new(calls.store().clone()),
            triggers,
            calls,
            runner,
            timeout,
            leading_until: Arc::default(),
        }
    }

    /// Fires due ticks until the runtime stops.
    pub fn start(self) {
        tokio::spawn(async move { self.run().await });
    }

    async fn run(self) {
        let mut armed: Vec<Armed> = Vec::new();
        // Where each trigger stands: the store's max register, or what this gateway fired
        // (a firing that finally fails puts its trigger back, so the tick is looked at again).
        let through: Through = Arc::default();
        let mut refreshed: Option<Instant> = None;
        let wanted = Arc::new(AtomicBool::new(false));
        tokio::spawn(self.clone().hold_lease(wanted.clone()));
        loop {
            if refreshed.is_none_or(|at| at.elapsed() >= REFRESH_EVERY) {
                match self.refresh(&through).await {
                    Ok(fresh) => armed = fresh,
                    Err(e) => tracing::warn!(cause = %e, "reading triggers"),
                }
                refreshed = Some(Instant::now());
            }
            // The lease is held only while there is something to fire: an idle gateway
            // writes nothing.
            wanted.store(!armed.is_empty(), Ordering::Relaxed);
            let now = now_ms();
            for one in &armed {
                let name = &one.qualified;
                let tick = {
                    let mut known = through.lock().unwrap_or_else(|p| p.into_inner());
                    // Ticks before the trigger was created, changed or resumed never fire.
                    let from = known
                        .get(name)
                        .copied()
                        .unwrap_or(0)
                        .max(one.trigger.updated_ms);
                    let tick = due(&one.schedule, from, now);
                    if let Some(tick) = tick {
                        known.insert(name.clone(), tick.tick_ms);
                    }
                    tick
                };
                if let Some(tick) = tick {
                    let (firer, triggers, trigger, target, through, name) = (
                        self.clone(),
                        one.triggers.clone(),
                        one.trigger.clone(),
                        one.target.clone(),
                        through.clone(),
                        name.clone(),
                    );
                    tokio::spawn(async move {
                        if !firer.fire(&triggers, &trigger, target, tick).await {
                            let mut known = through.lock().unwrap_or_else(|p| p.into_inner());
                            if known.get(&name) == Some(&tick.tick_ms) {
                                known.insert(name, tick.tick_ms - 1);
                            }
                        }
                    });
                }
            }
            tokio::time::sleep(CHECK_EVERY).await;
        }
    }

    /// Takes and renews the lease on firing first while `wanted`, in a task of its own so
    /// that a slow store delays no firing.
    async fn hold_lease(self, wanted: Arc<AtomicBool>) {
        loop {
            if !wanted.load(Ordering::Relaxed) {
                self.leading_until.store(0, Ordering::Relaxed);
                tokio::time::sleep(CHECK_EVERY).await;
                continue;
            }
            let asked = now_ms();
            let until = match self.triggers.lease_cron(self.runner.id(), LEASE_MS).await {
                Ok(true) => asked + LEASE_MS - LEASE_MARGIN_MS,
                Ok(false) => 0,
                Err(e) => {
                    tracing::warn!(cause = %e, "taking the lease on firing cron ticks");
                    0
                }
            };
            self.leading_until.store(until, Ordering::Relaxed);
            tokio::time::sleep(LEASE_RENEW).await;
        }
    }

    /// Whether this gateway holds the lease on firing first.
    fn leading(&self) -> bool {
        now_ms() < self.leading_until.load(Ordering::Relaxed)
    }

    /// The triggers to fire, of every namespace, and where each stands in the store.
    async fn refresh(&self, through: &Through) -> squall_state::Result<Vec<Armed>> {
        let mut armed = Vec::new();
        let mut fired = HashMap::new();
        for namespace in self.namespaces.names().await? {
            let triggers = self.triggers.in_namespace(&namespace);
            for (name, tick) in triggers.fired_through().await? {
                fired.insert(keys::qualify(&namespace, &name), tick);
            }
            self.arm(&triggers, &mut armed).await?;
        }
        let names: HashSet<String> = armed.iter().map(|a| a.qualified.clone()).collect();
        let mut known = through.lock().unwrap_or_else(|p| p.into_inner());
        known.retain(|name, _| names.contains(name));
        for name in names {
            let stored = fired.get(&name).copied().unwrap_or(0);
            let at = known.entry(name).or_insert(0);
            *at = (*at).max(stored);
        }
        Ok(armed)
    }

    /// Adds the cron triggers of `triggers`' namespace that are not paused to `armed`.
    async fn arm(&self, triggers: &Triggers, armed: &mut Vec<Armed>) -> squall_state::Result<()> {
        for trigger in triggers.list().await? {
            if trigger.paused {
                continue;
            }
            let (target, schedule) = match triggers.check(&trigger.spec) {
                Ok((target, Firing::Cron(schedule))) => (target, *schedule),
                // Fired by the change feed.
                Ok((_, Firing::KvChange(_))) => continue,
                Err(e) => {
                    tracing::warn!(trigger = %trigger.name, cause = %e, "a stored trigger is not valid");
                    continue;
                }
            };
            armed.push(Armed {
                triggers: triggers.clone(),
                qualified: keys::qualify(triggers.namespace(), &trigger.name),
                trigger,
                target,
                schedule,
            });
        }
        Ok(())
    }

    /// Fires `tick` of `trigger`, unless another gateway did (at once while this gateway
    /// holds the lease, else after a fallback); tries again for a while if the store does not
    /// answer. Whether the tick is fired.
    async fn fire(
        &self,
        triggers: &Triggers,
        trigger: &Trigger,
        target: Target,
        tick: Due,
    ) -> bool {
        if !self.leading() {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (self.runner.id(), &trigger.name, tick.tick_ms).hash(&mut hasher);
            let wait = FALLBACK_MS + hasher.finish() % SPREAD_MS;
            tokio::time::sleep(Duration::from_millis(wait)).await;
        }
        let mut pause = Duration::from_millis(100);
        for _ in 0..10 {
            match self.fire_once(triggers, trigger, &target, tick).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(trigger = %trigger.name, cause = %e, "firing a trigger; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
            }
        }
        tracing::error!(trigger = %trigger.name, tick = tick.tick_ms,
            "a tick could not be fired; the next look tries again");
        false
    }

    async fn fire_once(
        &self,
        triggers: &Triggers,
        trigger: &Trigger,
        target: &Target,
        tick: Due,
    ) -> squall_state::Result<()> {
        let id = tick_id(trigger, tick.tick_ms);
        if !self.calls.of(target).taken(id.as_str()).await? {
            if tick.missed > 0 {
                tracing::warn!(trigger = %trigger.name, missed = tick.missed,
                    "ticks were missed while no gateway ran; the latest fires, late");
            }
            let call = PendingCall::new(
                id.to_string(),
                target.clone(),
                input_of(trigger),
                InvokeOptions {
                    timeout_ms: Some(self.timeout.as_millis().try_into().unwrap_or(u64::MAX)),
                    ..InvokeOptions::default()
                },
                if tick.late { "cron-late" } else { "cron" },
                now_ms(),
            );
            self.runner.accept(call, Vec::new()).await?;
        }
        triggers.mark_fired(&trigger.name, tick.tick_ms).await
    }
}
