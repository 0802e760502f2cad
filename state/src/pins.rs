//! Repeatable read across the steps of a run: the versions a run has pinned on this executor.
//!
//! In [`Consistency::RepeatableRead`](squall_proto::call::Consistency) the first read of a key by any step
//! of a run pins the version read, here, on the executor that read it, and every later read of
//! that key by the run returns it. The run's later steps learn what was pinned from the
//! [`PinRef`]s that travel with the step outputs (key, digest of the version, holder): a step
//! whose cache holds the same version reads it locally; otherwise it fetches the pinned value
//! from the holder ([`PinSource`], implemented by the executor node over the call fabric).
//! The scheduler releases a run's pins when the run ends; pins also expire with the run's
//! deadline, so a lost release costs memory for a bounded time only.
//!
//! Writes by the run are merged into its pinned version (a run reads its own writes), and go
//! through to the store as in every mode. A step that gets a version of a key that differs
//! from its executor's pin (a later step's write on another executor, or parallel branches
//! that each pinned the key first) reads the join of the two: both are views of the run.
//!
//! Causal mode reads through the same pins and adds the causal cut: every [`PinRef`] of a
//! causal value carries its clock and dependencies, and [`causal_meta`], [`RunPins::cut`] and
//! [`RunPins::read_clock`] are what the cache's `Session` checks a new read against.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hashbrown::{HashMap, HashSet};
use squall_lattices::causal::{raise, raise_all};
use squall_lattices::{Dependencies, Lattice, LatticeValue, VectorClock};
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
    /// The run's versions handed on by earlier steps, by key: usually one per key; more when
    /// parallel branches or steps on several executors hold different versions of it, which
    /// a reader joins.
    pub upstream: Arc<HashMap<String, Vec<PinRef>>>,
    /// Fetches upstream pins this executor's cache does not hold.
    pub source: Option<Arc<dyn PinSource>>,
    /// When the run's deadline passes.
    pub deadline: Instant,
    /// This executor's mailbox (a pin held here is read here, never fetched).
    pub here: String,
    /// Causal: what the run's reads must reach, key by key (the session's floors, and the
    /// clocks and dependencies of the versions handed on).
    pub floors: Arc<Dependencies>,
    /// Causal: the keys to pin together as one causal cut before the step runs (the run's
    /// declared read set, at its first steps).
    pub declared: Vec<String>,
    /// Whether the step joins several inputs (after parallel branches), whose versions a
    /// causal read checks against each other's dependencies; along one path they always fit.
    pub fan_in: bool,
}

impl RunContext {
    /// The clock of the run's version of `key` handed on by earlier steps (the join, if they
    /// hand on several), or `None` if they hand on none.
    pub fn read_clock(&self, key: &str) -> Option<VectorClock> {
        let refs = self.upstream.get(key)?;
        Some(refs.iter().fold(VectorClock::new(), |clock, pin| {
            clock.join(pin.clock.clone())
        }))
    }
}

/// A causal value's clock and dependencies; `None` for a missing key or another type.
pub fn causal_meta(value: Option<&LatticeValue>) -> Option<(VectorClock, Dependencies)> {
    match value? {
        LatticeValue::MultiCausal(v) => Some((v.clock(), v.dependencies())),
        LatticeValue::SingleCausal(v) => Some((v.clock(), Dependencies::new())),
        _ => None,
    }
}

/// Whether `value` is at least as new as `floor` (a missing or non-causal value reaches only
/// the empty floor).
pub fn reaches(value: Option<&LatticeValue>, floor: &VectorClock) -> bool {
    match causal_meta(value) {
        Some((clock, _)) => clock.dominates(floor),
        None => floor.is_empty(),
    }
}

/// One run's pinned versions on this executor.
#[derive(Debug, Default)]
pub struct RunPins {
    values: Mutex<HashMap<String, Option<LatticeValue>>>,
    /// Counts changes of `values` (bumped under its lock), so a causal read that checked a
    /// version against the pins can tell whether they changed before it pins it.
    changes: std::sync::atomic::AtomicU64,
    /// Versions handed on by earlier steps that a pin here has joined, as (key, digest): the
    /// next steps need not fetch them again.
    absorbed: Mutex<HashSet<(String, u64)>>,
}

impl RunPins {
    fn values(&self) -> MutexGuard<'_, HashMap<String, Option<LatticeValue>>> {
        // Every update replaces an entry whole, so a poisoned lock is still consistent.
        self.values.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.changes
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The pins' generation: it changes whenever a pin is added or changed.
    pub fn generation(&self) -> u64 {
        self.changes.load(std::sync::atomic::Ordering::Acquire)
    }

    fn absorbed(&self) -> MutexGuard<'_, HashSet<(String, u64)>> {
        self.absorbed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that the pin of `key` here includes the version of digest `digest`.
    pub fn absorb(&self, key: &str, digest: u64) {
        self.absorbed().insert((key.to_string(), digest));
    }

    /// What the next steps get: the pins here (held here) and the `upstream` versions no pin
    /// here includes, one reference per (key, digest).
    pub fn hand_on(&self, here: &str, upstream: Vec<PinRef>) -> Vec<PinRef> {
        let mut refs = self.refs(here);
        let absorbed = self.absorbed();
        for pin in upstream {
            let known = absorbed.contains(&(pin.key.clone(), pin.digest))
                || refs
                    .iter()
                    .any(|r| r.key == pin.key && r.digest == pin.digest);
            if !known {
                refs.push(pin);
            }
        }
        refs
    }

    /// The pinned version of `key`, if the run has pinned it here.
    pub fn get(&self, key: &str) -> Option<Option<LatticeValue>> {
        self.values().get(key).cloned()
    }

    /// Pins `value` unless another step of the run pinned `key` first; returns the pin.
    pub fn pin(&self, key: &str, value: Option<LatticeValue>) -> Option<LatticeValue> {
        let mut values = self.values();
        if let Some(pinned) = values.get(key) {
            return pinned.clone();
        }
        values.insert(key.to_string(), value.clone());
        self.bump();
        value
    }

    /// Pins `value` as [`RunPins::pin`] does, unless the pins changed since `generation`
    /// (then `None`: what `value` was checked against is stale). A key pinned meanwhile
    /// returns that pin.
    pub fn pin_if(
        &self,
        key: &str,
        value: Option<LatticeValue>,
        generation: u64,
    ) -> Option<Option<LatticeValue>> {
        let mut values = self.values();
        if let Some(pinned) = values.get(key) {
            return Some(pinned.clone());
        }
        if self.generation() != generation {
            return None;
        }
        values.insert(key.to_string(), value.clone());
        self.bump();
        Some(value)
    }

    /// Pins `versions` (a cut prepared by the cache's `Session::prepare`) all under one
    /// lock, unless the pins changed since `generation`; returns whether it did.
    pub fn pin_all<'a>(
        &self,
        versions: impl IntoIterator<Item = (&'a str, Option<LatticeValue>)>,
        generation: u64,
    ) -> bool {
        let mut values = self.values();
        if self.generation() != generation {
            return false;
        }
        for (key, value) in versions {
            values.entry(key.to_string()).or_insert(value);
        }
        self.bump();
        true
    }

    /// Joins `value` (the run's version handed on by an earlier step) into the pin of `key`;
    /// returns the pin. Both are views of this run, so their join is too.
    pub fn join(&self, key: &str, value: Option<LatticeValue>) -> Option<LatticeValue> {
        let mut values = self.values();
        let joined = match (values.remove(key).flatten(), value) {
            (Some(mut pinned), Some(value)) => {
                if pinned.try_merge(value.clone()).is_err() {
                    // Versions of one key have one type; if not, the later one stands.
                    pinned = value;
                }
                Some(pinned)
            }
            (pinned, value) => pinned.or(value),
        };
        values.insert(key.to_string(), joined.clone());
        self.bump();
        joined
    }

    /// Records the run's own write: `before` is the run's version before it (`None`: it had
    /// none), `written` what it wrote, `merged` the store's value after the write. A key the
    /// run had a version of becomes that version joined with the write (a key it read as
    /// missing, the write alone); a key it had neither read nor written pins `merged`, as a
    /// read right after the write would. Returns the run's view.
    pub fn write(
        &self,
        key: &str,
        before: Option<Option<LatticeValue>>,
        written: LatticeValue,
        merged: LatticeValue,
    ) -> LatticeValue {
        let view = match before {
            Some(Some(mut pinned)) => {
                if pinned.try_merge(written).is_err() {
                    // The store refused a mismatched type before this point; keep the store's.
                    pinned = merged;
                }
                pinned
            }
            Some(None) => written,
            None => merged,
        };
        let mut values = self.values();
        values.insert(key.to_string(), Some(view.clone()));
        self.bump();
        view
    }

    /// What the run has pinned here, as references for the next steps.
    pub fn refs(&self, holder: &str) -> Vec<PinRef> {
        self.values()
            .iter()
            .map(|(key, value)| {
                let (clock, dependencies) = causal_meta(value.as_ref()).unwrap_or_default();
                PinRef {
                    key: key.clone(),
                    digest: digest(value.as_ref()),
                    holder: holder.to_string(),
                    clock,
                    dependencies,
                }
            })
            .collect()
    }

    /// The clock of the run's version of `key` pinned here (empty for a key read as missing
    /// or of another type), or `None` if the run has not pinned it here.
    pub fn read_clock(&self, key: &str) -> Option<VectorClock> {
        let values = self.values();
        let value = values.get(key)?;
        Some(
            causal_meta(value.as_ref())
                .map(|(clock, _)| clock)
                .unwrap_or_default(),
        )
    }

    /// The causal cut of what the run pinned here: each causal version's clock, joined with
    /// every version's dependencies.
    pub fn cut(&self) -> Dependencies {
        let mut cut = Dependencies::new();
        for (key, value) in self.values().iter() {
            if let Some((clock, dependencies)) = causal_meta(value.as_ref()) {
                raise(&mut cut, key, &clock);
                raise_all(&mut cut, &dependencies);
            }
        }
        cut
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
        let before = pins.get("k");
        let view = pins.write("k", before, version(3, b"c"), version(4, b"d"));
        assert_eq!(view, version(3, b"c"));
        // A key it had not read pins the store's view after the write.
        assert_eq!(
            pins.write("j", None, version(3, b"c"), version(4, b"d")),
            version(4, b"d")
        );
        // A key it read as missing becomes the write alone.
        assert_eq!(
            pins.write("m", Some(None), version(3, b"c"), version(4, b"d")),
            version(3, b"c")
        );
        // A later version of the run handed on by another step joins the pin.
        assert_eq!(
            pins.join("k", Some(version(5, b"e"))),
            Some(version(5, b"e"))
        );
        assert_eq!(pins.join("n", None), None);
        let refs = pins.refs("tcp://127.0.0.1:1");
        assert_eq!(refs.len(), 4);
        assert!(refs.iter().all(|r| r.holder == "tcp://127.0.0.1:1"));
        assert!(refs.iter().any(|r| r.key == "n" && r.digest == 0));
        assert_eq!(
            pins.lookup(&["k".into()]),
            Ok(vec![("k".into(), Some(version(5, b"e")))])
        );
        assert!(pins.lookup(&["x".into()]).is_err());
        // Handing on: the pins here, and upstream versions not joined here.
        let elsewhere = |key: &str, digest| PinRef {
            key: key.into(),
            digest,
            holder: "tcp://127.0.0.1:2".into(),
            clock: VectorClock::new(),
            dependencies: Dependencies::new(),
        };
        pins.absorb("k", 77);
        let handed = pins.hand_on(
            "tcp://127.0.0.1:1",
            vec![elsewhere("k", 77), elsewhere("k", 78), elsewhere("z", 5)],
        );
        assert_eq!(handed.len(), 6);
        assert!(!handed.iter().any(|r| r.digest == 77));
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
