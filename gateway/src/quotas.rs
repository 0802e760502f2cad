//! Quotas per namespace ([`squall_state::namespaces::Quotas`]), enforced by each gateway for
//! the calls it runs and the registrations it takes.
//!
//! - Calls in flight (`max_in_flight`): a synchronous call over the quota is refused with
//!   429 and `Retry-After`; an asynchronous attempt waits for a slot, as it does under a
//!   function's concurrency limit ([`crate::limits`]). This is what keeps one tenant's burst
//!   from starving another's calls on shared executors: a namespace holds at most its quota of
//!   each gateway's executor slots, whatever it sends.
//! - Call rate (`max_calls_per_s`): a token bucket per namespace, refilled at the rate and
//!   holding up to one second of it (at least one call); a call that finds it empty, synchronous
//!   or asynchronous (at acceptance), is refused with 429.
//! - Functions (`max_functions`), memory and deadline (`max_memory_mb`, `max_timeout_ms`):
//!   checked at registration (and the deadline at each call), refused with 403; a function
//!   that asks for nothing gets the executor's default capped to the quota.
//!
//! Like concurrency limits, the rate and in-flight quotas hold per gateway, not across a
//! cluster: with several gateways, up to their number times the quota. So does the count of
//! functions: a gateway registers one name of a namespace at a time under `max_functions`,
//! but two gateways registering new names at the same instant can both pass it. Bounding them
//! cluster-wide would need the gateways to agree on every call, which the coordination-free
//! store cannot give without leases on every call's path.
//!
//! # Cost
//! Each gateway reads a namespace's quotas from the store at most once per
//! [`NamespaceQuotas::FRESH_FOR`], one reading at a time (quotas set through it apply at
//! once); a call then costs one uncontended lock and a map lookup.
//!
//! `max_in_flight` counts calls, not their steps: a DAG's call is one, whatever its width,
//! and nested calls made by functions do not pass through the gateway. A synchronous call
//! holds its slot until it ends, even if its client hangs up (the API runs it in a task of
//! its own).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use squall_state::namespaces::{Namespaces, Quotas};

/// Why a call or registration is over a quota: the quota's name and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Exceeded {
    /// The quota (`max_in_flight`, `max_calls_per_s`, ...).
    pub quota: &'static str,
    /// Its value, as set.
    pub limit: String,
}

impl Exceeded {
    fn new(quota: &'static str, limit: impl ToString) -> Self {
        Self {
            quota,
            limit: limit.to_string(),
        }
    }
}

/// What a gateway holds of one namespace.
#[derive(Debug)]
struct Held {
    quotas: Quotas,
    /// When the quotas were read (or set here).
    read_at: Instant,
    /// Its calls in flight through this gateway.
    running: u32,
    /// The rate's bucket.
    bucket: Bucket,
}

impl Held {
    /// Admits a call at `now`: whether it takes a slot under `max_in_flight` (asked with
    /// `in_flight`, when the namespace has the quota), after a token of the rate (with
    /// `rate`); or the quota it is over.
    fn admit(&mut self, in_flight: bool, rate: bool, now: Instant) -> Result<bool, Exceeded> {
        let max = self.quotas.max_in_flight.filter(|_| in_flight);
        if let Some(max) = max {
            if self.running >= max {
                return Err(Exceeded::new("max_in_flight", max));
            }
        }
        if let (true, Some(per_s)) = (rate, self.quotas.max_calls_per_s) {
            if !self.bucket.take(per_s, now) {
                return Err(Exceeded::new("max_calls_per_s", per_s));
            }
        }
        if max.is_none() {
            return Ok(false);
        }
        self.running += 1;
        Ok(true)
    }
}

/// A token bucket: up to `rate` tokens (at least one), refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Self {
            tokens: f64::MAX,
            refilled: now,
        }
    }

    /// Takes a token at `now` under `rate`; whether there was one.
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let capacity = rate.max(1.0);
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens.min(capacity) + elapsed * rate).min(capacity);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The quotas of every namespace, as one gateway holds them. One per gateway.
#[derive(Debug)]
pub struct NamespaceQuotas {
    namespaces: Namespaces,
    held: Mutex<HashMap<String, Held>>,
    /// One reading of the store at a time, however many calls find a copy stale.
    reading: tokio::sync::Mutex<()>,
    /// Per namespace: one registration at a time under `max_functions`, so two new names
    /// registered at once through this gateway cannot both pass the count.
    registering: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A call's slot under its namespace's `max_in_flight`, given back when dropped.
#[derive(Debug)]
pub struct InFlight {
    quotas: Arc<NamespaceQuotas>,
    namespace: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(held) = self.quotas.lock().get_mut(&self.namespace) {
            held.running = held.running.saturating_sub(1);
        }
    }
}

impl NamespaceQuotas {
    /// How old a namespace's quotas may be.
    pub const FRESH_FOR: Duration = Duration::from_secs(1);

    /// The quotas kept with `namespaces`.
    pub fn new(namespaces: Namespaces) -> Arc<Self> {
        Arc::new(Self {
            namespaces,
            held: Mutex::default(),
            reading: tokio::sync::Mutex::default(),
            registering: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, namespace: &str) -> bool {
        self.lock()
            .get(namespace)
            .is_some_and(|held| held.read_at.elapsed() < Self::FRESH_FOR)
    }

    /// Reads `namespace`'s quotas again if the copy is older than [`Self::FRESH_FOR`], one
    /// reading at a time. A store that does not answer leaves the copy held (none: no
    /// quotas) for another [`Self::FRESH_FOR`]: quotas bound resources, and a call that
    /// finds the store down fails on its own.
    async fn refresh(&self, namespace: &str) -> Result<(), squall_state::Error> {
        if self.fresh(namespace) {
            return Ok(());
        }
        let _reading = self.reading.lock().await;
        if self.fresh(namespace) {
            return Ok(());
        }
        let read_at = Instant::now();
        match self.namespaces.quotas(namespace).await {
            Ok(quotas) => self.learn_at(namespace, Some(quotas), read_at),
            Err(e) => {
                tracing::warn!(namespace, cause = %e, "reading a namespace's quotas; the copy held stays");
                self.learn_at(namespace, None, read_at);
            }
        }
        Ok(())
    }

    /// Takes `quotas` (`None`: keeps the copy) as of `read_at`, unless the copy is newer (a
    /// reading that started before quotas were set here must not undo them).
    fn learn_at(&self, namespace: &str, quotas: Option<Quotas>, read_at: Instant) {
        let mut held = self.lock();
        let entry = held.entry(namespace.to_string()).or_insert_with(|| Held {
            quotas: Quotas::default(),
            read_at,
            running: 0,
            bucket: Bucket::full(read_at),
        });
        if read_at < entry.read_at {
            return;
        }
        if let Some(quotas) = quotas {
            entry.quotas = quotas;
        }
        entry.read_at = read_at;
    }

    /// Waits for `namespace`'s turn to register (held until the guard drops): between
    /// counting its functions and registering one, no other registration of it through this
    /// gateway runs.
    pub async fn registration_turn(&self, namespace: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let turn = self
            .registering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(namespace.to_string())
            .or_default()
            .clone();
        turn.lock_owned().await
    }

    /// Takes quotas just set through this gateway at once.
    pub fn learn(&self, namespace: &str, quotas: Quotas) {
        self.learn_at(namespace, Some(quotas), Instant::now());
    }

    /// `namespace`'s quotas, at most [`Self::FRESH_FOR`] old.
    pub async fn of(&self, namespace: &str) -> Result<Quotas, squall_state::Error> {
        self.refresh(namespace).await?;
        Ok(self
            .lock()
            .get(namespace)
            .map(|held| held.quotas.clone())
            .unwrap_or_default())
    }

    /// Admits a call of `namespace` now: a token of its rate and, with `in_flight`, a slot
    /// under its `max_in_flight` (`None` when it has none); or the quota it is over.
    pub async fn admit(
        self: &Arc<Self>,
        namespace: &str,
        in_flight: bool,
    ) -> Result<Result<Option<InFlight>, Exceeded>, squall_state::Error> {
        self.refresh(namespace).await?;
        Ok(self.try_admit(namespace, in_flight, true))
    }

    /// The decision of [`Self::admit`] on the copy held, taking a rate token if `rate`.
    fn try_admit(
        self: &Arc<Self>,
        namespace: &str,
        in_flight: bool,
        rate: bool,
    ) -> Result<Option<InFlight>, Exceeded> {
        let mut held = self.lock();
        let Some(entry) = held.get_mut(namespace) else {
            return Ok(None);
        };
        let slot = entry.admit(in_flight, rate, Instant::now())?;
        Ok(slot.then(|| InFlight {
            quotas: self.clone(),
            namespace: namespace.to_string(),
        }))
    }

    /// Takes a token of `namespace`'s rate (`max_calls_per_s`) if there is one; else how long
    /// until the next (10 ms to 1 s). For calls that wait for the rate rather than be
    /// refused (see [`pays_rate_when_run`]); the store unreadable, the copy held decides.
    pub async fn take_rate(self: &Arc<Self>, namespace: &str) -> Result<(), Duration> {
        if let Err(e) = self.refresh(namespace).await {
            tracing::debug!(namespace, cause = %e, "reading quotas");
        }
        if self.try_admit(namespace, false, true).is_ok() {
            return Ok(());
        }
        let rate = self
            .lock()
            .get(namespace)
            .and_then(|held| held.quotas.max_calls_per_s)
            .unwrap_or(1.0);
        Err(Duration::try_from_secs_f64(1.0 / rate)
            .unwrap_or(Duration::from_secs(1))
            .clamp(Duration::from_millis(10), Duration::from_secs(1)))
    }

    /// A slot under `namespace`'s `max_in_flight` (`None` when it has none), waiting for one:
    /// 10 ms, doubling up to 500 ms between tries; `Err(())` once `give_up` says so.
    pub async fn acquire(
        self: &Arc<Self>,
        namespace: &str,
        give_up: impl Fn() -> bool,
    ) -> Result<Option<InFlight>, ()> {
        let mut pause = Duration::from_millis(10);
        loop {
            if give_up() {
                return Err(());
            }
            // The store unreadable: the copy held (or none) decides.
            if let Err(e) = self.refresh(namespace).await {
                tracing::debug!(namespace, cause = %e, "reading quotas");
            }
            match self.try_admit(namespace, true, false) {
                Ok(slot) => return Ok(slot),
                Err(_) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
            }
        }
    }
}

/// Whether an asynchronous call made for `cause` takes a token of its namespace's rate when
/// it first runs: calls a trigger delivers (`cron`, `cron-late`, `kv-change`) and redriven
/// dead letters do; calls accepted over HTTP (`http-async`, `trigger-fire`) paid at
/// acceptance, where a call over the rate is refused instead.
pub fn pays_rate_when_run(cause: &str) -> bool {
    matches!(cause, "cron" | "cron-late" | "kv-change" | "redrive")
}

/// Checks a registration in a namespace with `quotas` that has `registered` functions (the
/// new name among them or not: `new_name`), asking for `memory_mb` and `timeout_ms`.
pub fn check_registration(
    quotas: &Quotas,
    registered: usize,
    new_name: bool,
    memory_mb: Option<u64>,
    timeout_ms: Option<u64>,
) -> Result<(), Exceeded> {
    if let Some(max) = quotas.max_functions {
        if new_name && registered >= max as usize {
            return Err(Exceeded::new("max_functions", max));
        }
    }
    if let (Some(max), Some(asked)) = (quotas.max_memory_mb, memory_mb) {
        if asked > max {
            return Err(Exceeded::new("max_memory_mb", max));
        }
    }
    check_timeout(quotas, timeout_ms)
}

/// Checks a deadline asked for against `quotas`' `max_timeout_ms`.
pub fn check_timeout(quotas: &Quotas, timeout_ms: Option<u64>) -> Result<(), Exceeded> {
    match (quotas.max_timeout_ms, timeout_ms) {
        (Some(max), Some(asked)) if asked > max => Err(Exceeded::new("max_timeout_ms", max)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(quotas: Quotas) -> Held {
        let now = Instant::now();
        Held {
            quotas,
            read_at: now,
            running: 0,
            bucket: Bucket::full(now),
        }
    }

    #[test]
    fn in_flight_slots_are_bounded_and_the_rate_is_taken_first() {
        let now = Instant::now();
        let mut quotas = held(Quotas {
            max_in_flight: Some(2),
            ..Quotas::default()
        });
        assert_eq!(quotas.admit(true, true, now), Ok(true));
        assert_eq!(quotas.admit(true, true, now), Ok(true));
        assert_eq!(
            quotas.admit(true, true, now),
            Err(Exceeded::new("max_in_flight", 2))
        );
        // Asynchronous acceptance takes no slot.
        assert_eq!(quotas.admit(false, true, now), Ok(false));
        quotas.running -= 1;
        assert_eq!(quotas.admit(true, true, now), Ok(true));
        // No quota: nothing taken, nothing refused.
        let mut free = held(Quotas::default());
        for _ in 0..1000 {
            assert_eq!(free.admit(true, true, now), Ok(false));
        }
        // A call refused by the rate takes no slot.
        let mut both = held(Quotas {
            max_in_flight: Some(5),
            max_calls_per_s: Some(1.0),
            ..Quotas::default()
        });
        assert_eq!(both.admit(true, true, now), Ok(true));
        assert_eq!(
            both.admit(true, true, now),
            Err(Exceeded::new("max_calls_per_s", 1.0))
        );
        assert_eq!(both.running, 1);
        // An attempt waiting for a slot takes no token.
        assert_eq!(both.admit(true, false, now), Ok(true));
    }

    #[test]
    fn deliveries_and_redrives_pay_the_rate_when_run_and_http_calls_at_acceptance() {
        for cause in ["cron", "cron-late", "kv-change", "redrive"] {
            assert!(pays_rate_when_run(cause), "{cause}");
        }
        for cause in ["http-async", "trigger-fire"] {
            assert!(!pays_rate_when_run(cause), "{cause}");
        }
    }

    #[test]
    fn the_rate_refills_and_bursts_up_to_a_second_of_it() {
        let start = Instant::now();
        let mut bucket = Bucket::full(start);
        // Two per second: two at once, then one more each half second.
        assert!(bucket.take(2.0, start));
        assert!(bucket.take(2.0, start));
        assert!(!bucket.take(2.0, start));
        assert!(bucket.take(2.0, start + Duration::from_millis(500)));
        assert!(!bucket.take(2.0, start + Duration::from_millis(600)));
        // A long pause fills it to its capacity, no more.
        let later = start + Duration::from_secs(60);
        assert!(bucket.take(2.0, later) && bucket.take(2.0, later));
        assert!(!bucket.take(2.0, later));
        // Under one per second, one call at a time.
        let mut slow = Bucket::full(start);
        assert!(slow.take(0.1, start));
        assert!(!slow.take(0.1, start + Duration::from_secs(9)));
        assert!(slow.take(0.1, start + Duration::from_secs(11)));
    }

    #[test]
    fn registrations_are_checked_against_sizes_and_counts() {
        let quotas = Quotas {
            max_functions: Some(2),
            max_memory_mb: Some(32),
            max_timeout_ms: Some(1000),
            ..Quotas::default()
        };
        assert!(check_registration(&quotas, 1, true, Some(32), Some(1000)).is_ok());
        assert_eq!(
            check_registration(&quotas, 2, true, None, None),
            Err(Exceeded::new("max_functions", 2))
        );
        // A new version of a registered name is no new function.
        assert!(check_registration(&quotas, 2, false, None, None).is_ok());
        assert_eq!(
            check_registration(&quotas, 0, true, Some(64), None),
            Err(Exceeded::new("max_memory_mb", 32))
        );
        assert_eq!(
            check_registration(&quotas, 0, true, None, Some(1001)),
            Err(Exceeded::new("max_timeout_ms", 1000))
        );
        assert!(check_timeout(&Quotas::default(), Some(u64::MAX)).is_ok());
    }
}
