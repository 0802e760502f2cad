//! One call's view of the colocated cache: where a consistency mode keeps what it must
//! remember across the call's reads. [`Consistency::Lww`] needs nothing;
//! [`Consistency::RepeatableRead`] reads and writes through its run's pins
//! ([`crate::pins`]); [`Consistency::Causal`] does too, and also keeps the run's reads a
//! causal cut:
//! - a first read of a key takes a version at least as new as the run's cut requires (the
//!   session's floors, and what the versions already read depend on), re-reading it from the
//!   store when the cache is behind;
//! - it refuses a version that depends on a newer version of a key the run already read
//!   ([`Error::CausalCut`]): the run cannot go back, and the cache holds no older version.
//!   Keys a call declares (`keys`) are pinned together, as one cut, before its first step
//!   ([`Session::prepare`]), which is how a DAG avoids this;
//! - writes are multi-key causal versions carrying the run's cut as their dependencies.
//!
//! A session is made per call (cheap: a clone of the cache handle and, for a run, of its
//! pins) and lives as long as the call; the cache itself ([`crate::cache`]) is mode-free.

use std::sync::Arc;

use bytes::Bytes;
use squall_lattices::causal::raise_all;
use squall_lattices::{
    Dependencies, Lattice, LatticeValue, Lww, MultiKeyCausal, Timestamp, VectorClock,
};
use squall_proto::call::{digest, UNKNOWN_DIGEST};

pub use squall_proto::call::Consistency;

use crate::cache::Cache;
use crate::pins::{causal_meta, reaches, RunContext, RunPins};
use crate::{Error, Result};

impl Cache {
    /// A view of the cache for one call in `mode`. A repeatable-read or causal call that is
    /// not part of a run (see [`Cache::run_session`]) pins versions for itself and its nested
    /// calls.
    pub fn session(&self, mode: Consistency) -> Session {
        let run = mode.pins().then(|| RunView {
            pins: Arc::default(),
            upstream: None,
        });
        Session {
            cache: self.clone(),
            mode,
            run,
            chain: 0,
        }
    }

    /// A repeatable-read or causal (`mode`) view of the cache for one step of run `context`,
    /// reading through `pins` (the run's pins on this executor).
    pub fn run_session(
        &self,
        mode: Consistency,
        pins: Arc<RunPins>,
        context: RunContext,
    ) -> Session {
        Session {
            cache: self.clone(),
            mode,
            run: Some(RunView {
                pins,
                upstream: Some(context),
            }),
            chain: 0,
        }
    }
}

/// How many rounds a causal run re-reads declared keys from the store, looking for a causal
/// cut, before it gives up (each round re-reads only keys that another version read depends
/// on a newer version of; without writes racing, one round suffices).
const CUT_ROUNDS: usize = 8;

/// One call's view of the cache (see the module docs). Clones share the run's pins (a
/// nested call reads what its caller pinned).
#[derive(Debug, Clone)]
pub struct Session {
    cache: Cache,
    mode: Consistency,
    run: Option<RunView>,
    /// How many `kv-change` deliveries led to the call ([`Session::in_chain`]).
    chain: u32,
}

#[derive(Debug, Clone)]
struct RunView {
    pins: Arc<RunPins>,
    upstream: Option<RunContext>,
}

impl Session {
    /// The session of a call `chain` `kv-change` deliveries deep: its writes are journaled
    /// with that depth ([`Cache::merge_in_chain`]).
    pub fn in_chain(mut self, chain: u32) -> Self {
        self.chain = chain;
        self
    }

    /// How many `kv-change` deliveries led to the call this session serves.
    pub fn chain(&self) -> u32 {
        self.chain
    }

    /// The mode this session reads in.
    pub fn mode(&self) -> Consistency {
        self.mode
    }

    /// Reads a key as the session's mode allows.
    pub async fn get(&mut self, key: &str) -> Result<Option<LatticeValue>> {
        let Some(run) = &self.run else {
            return self.cache.get(key).await;
        };
        if let Some(view) = self.run_view(run, key).await? {
            let fan_in = run.upstream.as_ref().is_some_and(|c| c.fan_in);
            if self.mode == Consistency::Causal && fan_in {
                self.check_view(run, key, view.as_ref())?;
            }
            return Ok(view);
        }
        // The run's first read of the key: pin what the cache holds (or what another step of
        // the run on this executor pinned a moment earlier).
        if self.mode != Consistency::Causal {
            let held = self.cache.get(key).await?;
            return Ok(run.pins.pin(key, held));
        }
        // Causal: a version that fits the run's cut, pinned only if no other step of the run
        // here pinned something meanwhile that it was not checked against.
        for _ in 0..CUT_ROUNDS {
            let generation = run.pins.generation();
            let held = self.cache.get(key).await?;
            let version = self.fit_cut(run, key, held).await?;
            if let Some(pinned) = run.pins.pin_if(key, version, generation) {
                return Ok(pinned);
            }
        }
        Err(Error::CausalCut {
            key: key.to_string(),
            reason: format!(
                "other steps of the run on this executor kept pinning keys while it was checked \
                 ({CUT_ROUNDS} tries)"
            ),
        })
    }

    /// Merges a value into a key (through to the store); returns the merged value as the
    /// session sees it.
    pub async fn merge(&mut self, key: &str, value: LatticeValue) -> Result<LatticeValue> {
        if self.mode == Consistency::Causal && self.run.is_some() {
            // The write extends a version of the key that fits the run's cut: read it first.
            self.get(key).await?;
        }
        let Some(run) = &self.run else {
            return self.cache.merge_in_chain(key, value, self.chain).await;
        };
        // The run's view before the write, so the write extends what the run has seen.
        let before = self.run_view(run, key).await?;
        let merged = self
            .cache
            .merge_in_chain(key, value.clone(), self.chain)
            .await?;
        Ok(run.pins.write(key, before, value, merged))
    }

    /// Writes `bytes` to `key`. In lww and repeatable-read mode: a last-writer-wins register
    /// stamped `stamp`. In causal mode: a multi-key causal version whose clock is the run's
    /// version of the key advanced at `stamp.writer` (to `stamp.time`, which grows with every
    /// write of the writer), and whose dependencies are the run's cut (what it read, and
    /// what those versions depend on). A causal write of a key that holds another type is
    /// refused ([`Error::ModeMismatch`]).
    pub async fn put_bytes(
        &mut self,
        key: &str,
        bytes: Bytes,
        stamp: Timestamp,
    ) -> Result<LatticeValue> {
        let value = match (&self.run, self.mode) {
            (Some(_), Consistency::Causal) => {
                // The run's version of the key, checked against its cut, is the base.
                let base = self.get(key).await?;
                self.causal_version(key, base, bytes, stamp)?
            }
            _ => LatticeValue::Lww(Lww::new(stamp, bytes)),
        };
        self.merge(key, value).await
    }

    /// Causal: pins `keys` (those the run has no version of yet) as one causal cut before a
    /// step runs, so that its reads, and its run's later reads of them, never meet a version
    /// that depends on a newer version of another one. Reads each from the cache, then re-reads
    /// from the store any that another one depends on a newer version of, until none does.
    pub async fn prepare(&self, keys: &[String]) -> Result<()> {
        let Some(run) = &self.run else {
            return Ok(());
        };
        if self.mode != Consistency::Causal {
            return Ok(());
        }
        // Another step of the run here may pin keys meanwhile (a second source step): then
        // the cut is looked for again, against its pins.
        for _ in 0..CUT_ROUNDS {
            let generation = run.pins.generation();
            let versions = self.find_cut(run, keys).await?;
            if run
                .pins
                .pin_all(versions.iter().map(|(k, v)| (*k, v.clone())), generation)
            {
                return Ok(());
            }
        }
        Err(Error::CausalCut {
            key: keys.first().cloned().unwrap_or_default(),
            reason: format!(
                "other steps of the run on this executor kept pinning keys while its declared \
                 keys were read ({CUT_ROUNDS} tries)"
            ),
        })
    }

    /// Causal: versions of `keys` (those the run has no version of yet) that form a cut with
    /// each other and with the run's cut (see [`Session::prepare`]).
    async fn find_cut<'k>(
        &self,
        run: &RunView,
        keys: &'k [String],
    ) -> Result<Vec<(&'k str, Option<LatticeValue>)>> {
        let mut versions: Vec<(&str, Option<LatticeValue>)> = Vec::new();
        for key in keys {
            let handed_on = run
                .upstream
                .as_ref()
                .is_some_and(|c| c.upstream.contains_key(key.as_str()));
            if handed_on || run.pins.get(key).is_some() || versions.iter().any(|(k, _)| k == key) {
                continue;
            }
            versions.push((key, self.cache.get(key).await?));
        }
        let known = self.known(run);
        let mut last_stale = String::new();
        for _ in 0..CUT_ROUNDS {
            let mut needed = known.clone();
            for (_, version) in &versions {
                if let Some((_, dependencies)) = causal_meta(version.as_ref()) {
                    raise_all(&mut needed, &dependencies);
                }
            }
            let mut stale = None;
            for (key, version) in &mut versions {
                let Some(floor) = needed.get(*key) else {
                    continue;
                };
                if !reaches(version.as_ref(), floor) {
                    *version = self.cache.fetch(key).await?;
                    if !reaches(version.as_ref(), floor) {
                        return Err(Error::CausalCut {
                            key: key.to_string(),
                            reason: "the store holds no version as new as the run's cut \
                                     requires (versions its session saw were lost?)"
                                .into(),
                        });
                    }
                    stale = Some(key.to_string());
                }
            }
            let Some(stale) = stale else {
                // The cut must also fit what the run already read of other keys.
                for (key, version) in &versions {
                    if let Some(other) = Self::newer_dependency(run, key, version.as_ref()) {
                        return Err(Error::CausalCut {
                            key: key.to_string(),
                            reason: format!(
                                "the version held depends on a newer version of {other:?} than \
                                 this run read"
                            ),
                        });
                    }
                }
                return Ok(versions);
            };
            last_stale = stale;
        }
        Err(Error::CausalCut {
            key: last_stale,
            reason: format!(
                "writes kept outpacing {CUT_ROUNDS} rounds of re-reading the call's keys from \
                 the store"
            ),
        })
    }

    /// Causal: the run's cut, key by key: the clocks every later read must reach (the
    /// session's floors, the versions handed on and pinned here, and their dependencies).
    fn known(&self, run: &RunView) -> Dependencies {
        let mut known = run
            .upstream
            .as_ref()
            .map(|context| (*context.floors).clone())
            .unwrap_or_default();
        raise_all(&mut known, &run.pins.cut());
        known
    }

    /// Causal: the clock of the run's version of `key`, if the run has read or written it.
    fn read_clock(run: &RunView, key: &str) -> Option<VectorClock> {
        let here = run.pins.read_clock(key);
        let handed_on = run.upstream.as_ref().and_then(|c| c.read_clock(key));
        match (here, handed_on) {
            (Some(here), Some(handed_on)) => Some(here.join(handed_on)),
            (here, handed_on) => here.or(handed_on),
        }
    }

    /// Causal: the version of `key` (which the run has not read yet) to read, given `held`,
    /// the cache's: one at least as new as the run's cut says (else the store's), and that
    /// depends on no newer version of a key the run already read than the one it read.
    async fn fit_cut(
        &self,
        run: &RunView,
        key: &str,
        held: Option<LatticeValue>,
    ) -> Result<Option<LatticeValue>> {
        let mut version = held;
        if let Some(floor) = self.known(run).get(key) {
            if !reaches(version.as_ref(), floor) {
                version = self.cache.fetch(key).await?;
                if !reaches(version.as_ref(), floor) {
                    return Err(Error::CausalCut {
                        key: key.to_string(),
                        reason: "the store holds no version as new as this run or its session \
                                 has seen (were versions lost?)"
                            .into(),
                    });
                }
            }
        }
        if let Some(other) = Self::newer_dependency(run, key, version.as_ref()) {
            return Err(Error::CausalCut {
                key: key.to_string(),
                reason: format!(
                    "the version held depends on a newer version of {other:?} than this run \
                     read; list {key:?} among the call's keys (header squall-keys) so that the \
                     run pins it with {other:?} before its first step"
                ),
            });
        }
        Ok(version)
    }

    /// Causal: a key other than `key` that `version` depends on a newer version of than the
    /// one the run read, if any.
    fn newer_dependency(
        run: &RunView,
        key: &str,
        version: Option<&LatticeValue>,
    ) -> Option<String> {
        let (_, dependencies) = causal_meta(version)?;
        dependencies.into_iter().find_map(|(other, needed)| {
            let read = (other != key)
                .then(|| Self::read_clock(run, &other))
                .flatten()?;
            (!read.dominates(&needed)).then_some(other)
        })
    }

    /// Causal: the version a write of `bytes` to `key` makes over `base`, the run's version
    /// of the key (see [`Session::put_bytes`]).
    fn causal_version(
        &self,
        key: &str,
        base: Option<LatticeValue>,
        bytes: Bytes,
        stamp: Timestamp,
    ) -> Result<LatticeValue> {
        let (mut clock, base_dependencies) = match &base {
            None => Default::default(),
            Some(LatticeValue::MultiCausal(register)) => {
                (register.clock(), register.dependencies())
            }
            Some(other) => {
                return Err(Error::ModeMismatch {
                    key: key.to_string(),
                    stored: other.lattice_type(),
                })
            }
        };
        let tick = stamp.time.max(clock.get(stamp.writer) + 1);
        clock.observe(stamp.writer, tick);
        let mut dependencies = self
            .run
            .as_ref()
            .map(|run| self.known(run))
            .unwrap_or_default();
        raise_all(&mut dependencies, &base_dependencies);
        dependencies.remove(key);
        Ok(LatticeValue::MultiCausal(MultiKeyCausal::with_version(
            clock,
            dependencies,
            bytes,
        )))
    }

    /// Causal: checks the run's version of `key` handed on by earlier steps (or pinned here)
    /// against the run's cut, at a step that joins several inputs. Along one path of a DAG
    /// every version was checked where it was read, so it fits; after parallel branches it
    /// may not (one branch read a version another branch's read depends on a newer version
    /// of), and then the read fails rather than return it.
    fn check_view(&self, run: &RunView, key: &str, view: Option<&LatticeValue>) -> Result<()> {
        let outside = |reason: String| Error::CausalCut {
            key: key.to_string(),
            reason,
        };
        if let Some(floor) = self.known(run).get(key) {
            if !reaches(view, floor) {
                return Err(outside(
                    "the run's earlier steps (parallel branches) read a version older than \
                     other reads of the run depend on; declare the key in the call's keys"
                        .into(),
                ));
            }
        }
        if let Some(other) = Self::newer_dependency(run, key, view) {
            return Err(outside(format!(
                "the run's version depends on a newer version of {other:?} than the run read \
                 (parallel branches); declare both in the call's keys"
            )));
        }
        Ok(())
    }

    /// The run's version of `key`, if it has one: its pin here, joined with the versions the
    /// earlier steps hand on that differ from it (a write by a step on another executor, or
    /// parallel branches' reads), each read from this executor's cache when it holds the same
    /// version and fetched from its holder otherwise. `None`: the run has neither read nor
    /// written the key.
    async fn run_view(&self, run: &RunView, key: &str) -> Result<Option<Option<LatticeValue>>> {
        let mut view = run.pins.get(key);
        let Some((context, refs)) = run
            .upstream
            .as_ref()
            .and_then(|context| Some((context, context.upstream.get(key)?)))
        else {
            return Ok(view);
        };
        for pin in refs {
            let current = view.as_ref().map(|v| digest(v.as_ref()));
            if current.is_some() && (pin.holder == context.here || current == Some(pin.digest)) {
                continue;
            }
            let held = self.cache.get(key).await?;
            let digest_held = digest(held.as_ref());
            let version = if digest_held == pin.digest && digest_held != UNKNOWN_DIGEST {
                held
            } else {
                fetch_pinned(context, &pin.holder, key).await?
            };
            view = Some(run.pins.join(key, version));
            run.pins.absorb(key, pin.digest);
        }
        Ok(view)
    }
}

/// Fetches the version of `key` that run `context` pinned on `holder`.
async fn fetch_pinned(
    context: &RunContext,
    holder: &str,
    key: &str,
) -> Result<Option<LatticeValue>> {
    let unavailable = |reason: String| Error::PinUnavailable {
        key: key.to_string(),
        holder: holder.to_string(),
        reason,
    };
    let source = context
        .source
        .as_ref()
        .ok_or_else(|| unavailable("no way to reach other executors".into()))?;
    let values = source
        .fetch(holder, context.call, vec![key.to_string()])
        .await
        .map_err(unavailable)?;
    values
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, value)| value)
        .ok_or_else(|| unavailable("the holder did not answer for the key".into()))
}
