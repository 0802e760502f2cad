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
use std::sync::atomic::{AtomicBool, Ordering};
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

    /// Replaces every limit with `limits` (as the store has them).
    pub fn replace(&self, limits: HashMap<Target, u32>) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|p| p.into_inner());
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
    /// between tries.
    pub async fn acquire(&self, target: &Target) -> Option<Slot> {
        let mut pause = Duration::from_millis(10);
        loop {
            match self.try_acquire(target) {
                Ok(slot) => return slot,
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
        limits.replace(HashMap::from([(g.clone(), 1)]));
        let only = limits.try_acquire(&g).expect("a slot");
        assert!(only.is_some());
        assert!(limits.try_acquire(&g).is_err());
        assert!(limits.try_acquire(&f).expect("replaced").is_none());
    }
}
