//! Repeatable read across the steps of a run: the versions a run has pinned on this executor.
//!
//! In [`Consistency::RepeatableRead`](crate::Consistency) the first read of a key by any step
//! of a run pins the version read, here, on the executor that read it, and every later read of
//! that key by the run returns it. The run's later steps learn what was pinned from the
//! [`PinRef`]s that travel with the step outputs (key, digest of the version, holder): a step
//! whose cache holds the same version reads it locally; otherwise it fetches the pinned value
//! from the holder ([`PinSource`], implemented by the executor node over the call fabric).
//! The scheduler releases a run's pins when the run ends; pins also expire with the run's
//! deadline, so a lost release costs memory for a bounded time only.
//!
//! Writes by the run are merged into its pinned version (a run reads its own writes), and go
//! through to the store as in every mode.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use squall_lattices::LatticeValue;
use squall_proto::call::{digest, CallId, PinRef};

/// How long a run's pins outlive its deadline when no release comes.
const GRACE: Duration = Duration::from_secs(5);

/// The values a [`PinSource`] answers with: each key asked, with its pinned value (`None`: the
/// key did not exist when it was pinned).
pub type PinnedValues = Vec<(String, Option<LatticeValue>)>;

/// A future of fetched pins.
pub type PinFuture = Pin<Box<dyn Future<Output = Result<PinnedValues, String>> + Send>>;

/// Fetches the values a run pinned on another executor.
pub trait PinSource: Send + Sync + std::fmt::Debug {
    /// Asks `holder` (an executor's mailbox) for the versions of `keys` that run `call` pinned.
    fn fetch(&self, holder: &str, call: CallId, keys: Vec<String>) -> PinFuture;
}

/// What a call in repeatable-read mode knows of its run: which run it belongs to, what the
/// steps before it pinned, and how to fetch those pins.
#[derive(Debug, Clone)]
pub struct RunContext {
    /// The run (the scheduler's call id).
    pub call: CallId,
    /// Versions pinned by earlier steps, by key.
    pub upstream: Arc<HashMap<String, PinRef>>,
    /// Fetches upstream pins this executor's cache does not hold.
    pub source: Option<Arc<dyn PinSource>>,
    /// When the run's deadline passes.
    pub deadline: Instant,
}

/// One run's pinned versions on this executor.
#[derive(Debug, Default)]
pub struct RunPins {
    values: Mutex<HashMap<String, Option<LatticeValue>>>,
}

impl RunPins {
    fn values(&self) -> MutexGuard<'_, HashMap<String, Option<LatticeValue>>> {
        // Every update replaces an entry whole, so a poisoned lock is still consistent.
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pinned version of `key`, if the run has pinned it here.
    pub fn get(&self, key: &str) -> Option<Option<LatticeValue>> {
        self.values().get(key).cloned()
    }

    /// Pins `value` unless another step of the run pinned `key` first; returns the pin.
    pub fn pin(&self, key: &str, value: Option<LatticeValue>) -> Option<LatticeValue> {
        self.values()
            .entry(key.to_string())
            .or_insert(value)
            .clone()
    }

    /// Merges the run's own write into its pinned version (a key read as missing becomes the
    /// write; one the run had not read pins `merged`, the store's view after the write);
    /// returns the run's view.
    pub fn write(&self, key: &str, written: LatticeValue, merged: LatticeValue) -> LatticeValue {
        let mut values = self.values();
        let view = match values.get(key) {
            Some(Some(pinned)) => {
                let mut view = pinned.clone();
                if view.try_merge(written).is_err() {
                    // The store refused a mismatched type before this point; keep the store's.
                    view = merged;
                }
                view
            }
            // Read as missing: the run's view is its write alone.
            Some(None) => written,
            None => merged,
        };
        values.insert(key.to_string(), Some(view.clone()));
        view
    }

    /// What the run has pinned here, as references for the next steps.
    pub fn refs(&self, holder: &str) -> Vec<PinRef> {
        self.values()
            .iter()
            .map(|(key, value)| PinRef {
                key: key.clone(),
                digest: digest(value.as_ref()),
                holder: holder.to_string(),
            })
            .collect()
    }

    /// The pinned values of `keys`; an error names the first key not pinned here.
    pub fn lookup(&self, keys: &[String]) -> Result<PinnedValues, String> {
        let values = self.values();
        keys.iter()
            .map(|key| match values.get(key) {
                Some(value) => Ok((key.clone(), value.clone())),
                None => Err(format!("key {key:?} is not pinned here")),
            })
            .collect()
    }
}

/// Every run's pins on this executor.
#[derive(Debug, Default)]
pub struct PinTable {
    runs: Mutex<HashMap<CallId, (Arc<RunPins>, Instant)>>,
}

impl PinTable {
    fn runs(&self) -> MutexGuard<'_, HashMap<CallId, (Arc<RunPins>, Instant)>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pins of run `call`, created if it has none here yet; kept until released or until
    /// a little after `deadline`.
    pub fn open(&self, call: CallId, deadline: Instant) -> Arc<RunPins> {
        let mut runs = self.runs();
        let entry = runs
            .entry(call)
            .or_insert_with(|| (Arc::default(), deadline + GRACE));
        entry.1 = entry.1.max(deadline + GRACE);
        entry.0.clone()
    }

    /// The pins of run `call`, if it has any here.
    pub fn get(&self, call: CallId) -> Option<Arc<RunPins>> {
        self.runs().get(&call).map(|(pins, _)| pins.clone())
    }

    /// Forgets run `call`'s pins (the run has ended).
    pub fn release(&self, call: CallId) {
        self.runs().remove(&call);
    }

    /// Forgets the pins of runs whose deadline passed a while ago; returns how many.
    pub fn expire(&self, now: Instant) -> usize {
        let mut runs = self.runs();
        let before = runs.len();
        runs.retain(|_, (_, until)| *until > now);
        before - runs.len()
    }

    /// Runs with pins here.
    pub fn len(&self) -> usize {
        self.runs().len()
    }

    /// Whether no run has pins here.
    pub fn is_empty(&self) -> bool {
        self.runs().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use squall_lattices::{Lww, Timestamp};

    fn version(time: u64, value: &'static [u8]) -> LatticeValue {
        LatticeValue::Lww(Lww::new(
            Timestamp::new(time, 1),
            bytes::Bytes::from_static(value),
        ))
    }

    #[test]
    fn the_first_pin_wins_and_writes_merge_into_it() {
        let table = PinTable::default();
        let now = Instant::now();
        let pins = table.open(7, now);
        assert_eq!(
            pins.pin("k", Some(version(1, b"a"))),
            Some(version(1, b"a"))
        );
        // A later read by another step of the run gets the first pin, not its own version.
        assert_eq!(
            pins.pin("k", Some(version(2, b"b"))),
            Some(version(1, b"a"))
        );
        assert!(Arc::ptr_eq(&pins, &table.open(7, now)));
        // The run's own write is merged into what it pinned.
        let view = pins.write("k", version(3, b"c"), version(4, b"d"));
        assert_eq!(view, version(3, b"c"));
        // A key it had not read pins the store's view after the write.
        assert_eq!(
            pins.write("j", version(3, b"c"), version(4, b"d")),
            version(4, b"d")
        );
        let refs = pins.refs("tcp://127.0.0.1:1");
        assert_eq!(refs.len(), 2);
        assert!(refs
            .iter()
            .all(|r| r.holder == "tcp://127.0.0.1:1" && r.digest != 0));
        assert_eq!(
            pins.lookup(&["k".into()]),
            Ok(vec![("k".into(), Some(version(3, b"c")))])
        );
        assert!(pins.lookup(&["x".into()]).is_err());
    }

    #[test]
    fn runs_are_released_or_expire() {
        let table = PinTable::default();
        let now = Instant::now();
        table.open(1, now);
        table.open(2, now);
        table.release(1);
        assert!(table.get(1).is_none());
        assert_eq!(table.expire(now), 0);
        assert_eq!(table.expire(now + GRACE + Duration::from_millis(1)), 1);
        assert!(table.is_empty());
    }
}
