//! Concurrency limits per function and DAG, held by each gateway for the calls it runs.
//!
//! A limit (`max_concurrency`, [`squall_state::calls::ConcurrencyLimit`]) bounds the calls
//! of one function or DAG that one gateway runs at once: synchronous calls over it are
//! refused with 429 and `Retry-After`, asynchronous attempts wait for a slot (without
//! counting as attempts). The limit holds per gateway, not across a cluster: with several
//! gateways, up to their number times the limit run at once. A cluster-wide bound would need
//! the gateways to agree on who holds which slot, which the coordination-free store cannot
//! give without leases on every call's path; per gateway costs a call one uncontended lock.
//!
//! The limits live in the store ([`squall_proto::keys::concurrency_limit`]); each gateway
//! keeps a copy, updated at once for limits set through it and every [`REFRESH_EVERY`] from
//! the store for those set elsewhere. With no limit set, a call costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use squall_proto::call::Target;

/// How often a gateway reads every limit from the store.
pub const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// The limits one gateway holds, and its calls running under them. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ConcurrencyLimits {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Whether any limit is set: the fast path for calls when none is.
    any: AtomicBool,
    /// Counts limits set or lifted here, so that a refresh read before one does not undo it.
    generation: AtomicU64,
    slots: Mutex<Slots>,
}

#[derive(Debug, Default)]
struct Slots {
    max: HashMap<Target, u32>,
    running: HashMap<Target, u32>,
}

/// A call's slot under its target's limit, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    inner: Arc<Inner>,
    target: Target,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = slots.running.get_mut(&self.target) {
            *running = running.saturating_sub(1);
            if *running == 0 {
                slots.running.remove(&self.target);
            }
        }
    }
}

impl ConcurrencyLimits {
    /// Sets (`Some`) or lifts (`None`) the limit of `target`.
    pub fn set(&self, target: Target, max: Option<u32>) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        match max {
            Some(max) => {
                slots.max.insert(target, max);
            }
            None => {
                slots.max.remove(&target);
            }
        }
        self.inner
            .any
            .store(!slots.max.is_empty(), Ordering::Release);
    }

    /// How many limits were set or lifted here so far: take it before reading the store
    /// for [`ConcurrencyLimits::replace`].
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Replaces every limit with `limits` (as the store had them when read), unless a limit
    /// was set or lifted here since `generation`: then the read may predate it, and the
    /// next refresh brings the rest.
    pub fn replace(&self, limits: HashMap<Target, u32>, generation: u64) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        if self.inner.generation.load(Ordering::Acquire) != generation {
            return;
        }
        slots.max = limits;
        self.inner
            .any
            .store(!slots.max.is_empty(), Ordering::Release);
    }

    /// A slot for a call of `target`: `Ok(None)` if it has no limit, `Err(limit)` if the
    /// limit's slots are all taken.
    pub fn try_acquire(&self, target: &Target) -> Result<Option<Slot>, u32> {
        if !self.inner.any.load(Ordering::Acquire) {
            return Ok(None);
        }
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&max) = slots.max.get(target) else {
            return Ok(None);
        };
        let running = slots.running.entry(target.clone()).or_insert(0);
        if *running >= max {
            return Err(max);
        }
        *running += 1;
        Ok(Some(Slot {
            inner: self.inner.clone(),
            target: target.clone(),
        }))
    }

    /// [`ConcurrencyLimits::try_acquire`], waiting for a slot: 10 ms, doubling up to 500 ms
    /// between tries; `Err(())` once `give_up` says so (asked before every try).
    pub async fn acquire(
        &self,
        target: &Target,
        give_up: impl Fn() -> bool,
    ) -> Result<Option<Slot>, ()> {
        let mut pause = Duration::from_millis(10);
        loop {
            if give_up() {
                return Err(());
            }
            match self.try_acquire(target) {
                Ok(slot) => return Ok(slot),
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_bounds_the_slots_taken_and_dropped_slots_come_back() {
        let limits = ConcurrencyLimits::default();
        let f = Target::Function("f".into());
        let g = Target::Function("g".into());
        assert!(limits.try_acquire(&f).expect("no limit").is_none());
        limits.set(f.clone(), Some(2));
        let first = limits.try_acquire(&f).expect("a slot");
        let second = limits.try_acquire(&f).expect("a slot");
        assert!(first.is_some() && second.is_some());
        assert_eq!(limits.try_acquire(&f).err(), Some(2));
        // Other targets are not limited.
        assert!(limits.try_acquire(&g).expect("no limit").is_none());
        drop(first);
        let third = limits.try_acquire(&f).expect("a slot back");
        assert!(third.is_some());
        // Lifting the limit frees every call.
        limits.set(f.clone(), None);
        assert!(limits.try_acquire(&f).expect("no limit").is_none());
        drop((second, third));
        // A refresh read before a limit was set here does not undo it.
        let before = limits.generation();
        limits.set(f.clone(), Some(5));
        limits.replace(HashMap::new(), before);
        assert!(limits.try_acquire(&f).expect("a slot").is_some());
        limits.replace(HashMap::from([(g.clone(), 1)]), limits.generation());
        let only = limits.try_acquire(&g).expect("a slot");
        assert!(only.is_some());
        assert!(limits.try_acquire(&g).is_err());
        assert!(limits.try_acquire(&f).expect("replaced").is_none());
    }
}
