//! The bytes a namespace stores, measured, and the `max_stored_bytes` quota on them.
//!
//! Why measured and not counted on every write: the store is coordination-free. A key lives
//! on several replicas, a write merges into what each holds (a set grows by what is new to
//! it, a register may lose to a later write), and expiries and compaction free bytes on
//! their own; an exact running count per namespace would need every replica to know what
//! each write replaced and to agree on which copy counts. So the upkeep measures instead:
//! one gateway at a time (a lease) reads the size of every key of each namespace that has
//! the quota ([`squall_kvs::Client::stored_bytes`]: a key's length plus its entry's encoded
//! size, each key once whatever its replicas) every [`MEASURE_EVERY`], and writes the
//! [`Usage`] record. Writers check it: executors before a function's write, gateways before
//! a write to `/v1/kv`, each reading the quota and the record at most once per
//! [`StoredBytesGuard::FRESH_FOR`] per namespace.
//!
//! What that allows, precisely: a namespace goes over its quota by what it writes between a
//! measurement and the moment writers read it (at most [`MEASURE_EVERY`] plus
//! [`StoredBytesGuard::FRESH_FOR`], plus the measurement's own duration); from then on every
//! write is refused (a typed `invalid` error to a function, 403 `quota_exceeded` over HTTP)
//! until deletes or expiries bring a later measurement under the quota. Deletes are always
//! accepted. A store that cannot be read leaves writers with what they last read (none at
//! first: writes pass), and a measurement older than [`TRUSTED_FOR`] refuses nothing, so
//! the quota never stops a namespace because the upkeep is down.
//!
//! What counts: the namespace's own keys ([`keys::user_prefix`]), what its functions and
//! clients write. Its activation records and results are bounded by their retention, its
//! registrations by `max_functions`.
//!
//! # Cost
//! A measurement reads every key of the namespace on every shard, in pages of 5 000 keys
//! (each key's entry is encoded once to size it): for a million keys, a few hundred round
//! trips every [`MEASURE_EVERY`]. Only namespaces with the quota are measured by the upkeep
//! (`GET /v1/usage` measures any namespace, at most once per [`MEASURE_EVERY`]). A write
//! checked against the quota costs one uncontended lock and a map lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use squall_lattices::Timestamp;
use squall_proto::keys::{self, DEFAULT_NAMESPACE};

use crate::namespaces::{Namespaces, Quotas};
use crate::pool::ClientPool;
use crate::{register, Result};

/// How often the upkeep measures each namespace that has a `max_stored_bytes` quota.
pub const MEASURE_EVERY: Duration = Duration::from_secs(5);

/// A measurement older than this no longer refuses writes: the upkeep has stopped measuring
/// the namespace (no gateway runs it, or its measurements fail), and a namespace is not
/// held to what it stored long ago.
pub const TRUSTED_FOR: Duration = Duration::from_secs(30);

/// A namespace's stored keys and bytes, as last measured.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    /// Its live keys.
    pub keys: u64,
    /// The bytes they take: each key's length plus its entry's encoded size.
    pub bytes: u64,
    /// When it was measured (milliseconds since the Unix epoch).
    pub measured_ms: u64,
}

/// Measures what `namespace` stores now and records it ([`keys::usage`]).
pub async fn measure(kvs: &ClientPool, namespace: &str) -> Result<Usage> {
    keys::validate_namespace(namespace)?;
    let prefix = keys::user_prefix(namespace);
    let (keys, bytes) = kvs.with(move |client| client.stored_bytes(&prefix)).await?;
    let usage = Usage {
        keys,
        bytes,
        measured_ms: squall_lattices::entry::now_ms(),
    };
    register::put(kvs, keys::usage(namespace), &usage, Timestamp::now(0)).await?;
    Ok(usage)
}

/// What `namespace` stored when last measured (`None`: never measured).
pub async fn last(kvs: &ClientPool, namespace: &str) -> Result<Option<Usage>> {
    keys::validate_namespace(namespace)?;
    register::get(kvs, keys::usage(namespace)).await
}

/// What `namespace` stores, measured at most [`MEASURE_EVERY`] ago: the last measurement if
/// it is that recent, else a new one.
pub async fn recent(kvs: &ClientPool, namespace: &str) -> Result<Usage> {
    let now = squall_lattices::entry::now_ms();
    match last(kvs, namespace).await? {
        Some(usage) if now.saturating_sub(usage.measured_ms) < MEASURE_EVERY.as_millis() as u64 => {
            Ok(usage)
        }
        _ => measure(kvs, namespace).await,
    }
}

/// One pass of the upkeep: measures every namespace with a `max_stored_bytes` quota, if
/// `owner` holds the lease on the work (one gateway of several does it); how many were
/// measured (`None`: another gateway holds the lease).
pub async fn measure_quota_holders(
    kvs: &ClientPool,
    namespaces: &Namespaces,
    owner: &str,
) -> Result<Option<usize>> {
    let lease = keys::lease(DEFAULT_NAMESPACE, "stored-bytes");
    let lease_ms = 3 * MEASURE_EVERY.as_millis() as u64;
    if !crate::lease::take(kvs, &lease, owner, lease_ms).await? {
        return Ok(None);
    }
    let mut measured = 0;
    // One namespace that cannot be measured leaves the others measured.
    for namespace in namespaces.names().await? {
        let quotas = match namespaces.quotas(&namespace).await {
            Ok(quotas) => quotas,
            Err(e) => {
                tracing::warn!(namespace, cause = %e, "reading quotas to measure stored bytes");
                continue;
            }
        };
        if quotas.max_stored_bytes.is_none() {
            continue;
        }
        match measure(kvs, &namespace).await {
            Ok(usage) => {
                tracing::debug!(
                    namespace,
                    keys = usage.keys,
                    bytes = usage.bytes,
                    "measured"
                );
                measured += 1;
            }
            Err(e) => tracing::warn!(namespace, cause = %e, "measuring stored bytes"),
        }
    }
    Ok(Some(measured))
}

/// A write refused because its namespace stores as much as its quota allows, or more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "quota exceeded: namespace {namespace} stores {stored} bytes (measured), and max_stored_bytes is {limit}; delete keys to write again"
)]
pub struct OverStoredBytes {
    /// The namespace.
    pub namespace: String,
    /// What it stored when last measured.
    pub stored: u64,
    /// Its quota.
    pub limit: u64,
}

/// Whether a namespace with quota `limit` that stored `usage` when last measured may write
/// at `now_ms`: the bytes over which it may not (`Some((stored, limit))`), or `None` (also
/// for a measurement older than [`TRUSTED_FOR`]).
pub fn over(limit: Option<u64>, usage: Option<&Usage>, now_ms: u64) -> Option<(u64, u64)> {
    let (limit, usage) = (limit?, usage?);
    let recent = now_ms.saturating_sub(usage.measured_ms) <= TRUSTED_FOR.as_millis() as u64;
    (recent && usage.bytes >= limit).then_some((usage.bytes, limit))
}

/// What a writer holds of one namespace.
#[derive(Debug)]
struct Held {
    limit: Option<u64>,
    usage: Option<Usage>,
    /// When it was last read (`None`: never).
    read_at: Option<Instant>,
    /// A reading is under way: others use what is held meanwhile.
    reading: bool,
    /// Counts [`StoredBytesGuard::forget`]s: a reading that started before one does not
    /// count as fresh.
    forgotten: u64,
}

impl Held {
    /// Whether the caller should read now (what is held is stale and nobody reads it); if
    /// so, marks it read.
    fn claim_reading(&mut self) -> bool {
        let stale = self
            .read_at
            .is_none_or(|at| at.elapsed() >= StoredBytesGuard::FRESH_FOR);
        let read = stale && !self.reading;
        self.reading |= read;
        read
    }
}

/// Checks writes against their namespace's `max_stored_bytes`, reading the quota and the
/// last measurement at most once per [`Self::FRESH_FOR`] per namespace, one reading at a
/// time. Cheap to clone (shared); one per executor and per gateway.
#[derive(Debug, Clone)]
pub struct StoredBytesGuard {
    kvs: ClientPool,
    held: Arc<Mutex<HashMap<String, Held>>>,
}

impl StoredBytesGuard {
    /// How long a reading is used before the next.
    pub const FRESH_FOR: Duration = Duration::from_secs(1);

    /// A guard reading from the store behind `kvs`.
    pub fn new(kvs: ClientPool) -> Self {
        Self {
            kvs,
            held: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Whether `namespace` may write now; a store that cannot be read leaves the last
    /// reading in force (none: it may).
    pub async fn check(&self, namespace: &str) -> std::result::Result<(), OverStoredBytes> {
        let read = {
            let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
            match held.get_mut(namespace) {
                Some(entry) => entry.claim_reading(),
                None => {
                    // Others checking meanwhile find it being read, and pass.
                    held.insert(
                        namespace.to_string(),
                        Held {
                            limit: None,
                            usage: None,
                            read_at: None,
                            reading: true,
                            forgotten: 0,
                        },
                    );
                    true
                }
            }
        };
        if read {
            // In a task of its own, so a caller dropped meanwhile (a call past its deadline)
            // cannot leave the reading marked under way for good.
            let (guard, owned) = (self.clone(), namespace.to_string());
            let forgotten = self.forgotten(namespace);
            let reading = tokio::spawn(async move {
                let reading = guard.read(&owned).await;
                let mut held = guard.held.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(entry) = held.get_mut(&owned) {
                    entry.reading = false;
                    // Quotas set here while it read: read again at the next check.
                    entry.read_at = (entry.forgotten == forgotten).then(Instant::now);
                    match reading {
                        Ok((limit, usage)) => {
                            entry.limit = limit;
                            entry.usage = usage;
                        }
                        Err(e) => tracing::warn!(
                            namespace = owned,
                            cause = %e,
                            "reading the stored-bytes quota"
                        ),
                    }
                }
            });
            let _ = reading.await;
        }
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        let entry = held.get(namespace);
        let now = squall_lattices::entry::now_ms();
        match entry.and_then(|e| over(e.limit, e.usage.as_ref(), now)) {
            Some((stored, limit)) => Err(OverStoredBytes {
                namespace: namespace.to_string(),
                stored,
                limit,
            }),
            None => Ok(()),
        }
    }

    /// Forgets what is held of `namespace` (its quotas were just set here), so the next
    /// check reads them.
    pub fn forget(&self, namespace: &str) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(entry) = held.get_mut(namespace) {
            entry.read_at = None;
            entry.forgotten += 1;
        }
    }

    fn forgotten(&self, namespace: &str) -> u64 {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(namespace).map_or(0, |e| e.forgotten)
    }

    /// The quota and the last measurement of `namespace`, in one round trip.
    async fn read(&self, namespace: &str) -> Result<(Option<u64>, Option<Usage>)> {
        let (quotas_key, usage_key) = (keys::quotas(namespace), keys::usage(namespace));
        let wanted = vec![quotas_key.clone(), usage_key.clone()];
        let mut values = self
            .kvs
            .with(move |client| client.get_many(&wanted))
            .await?
            .into_iter();
        let quotas: Option<Quotas> = values
            .next()
            .flatten()
            .and_then(|v| register::decode(&quotas_key, v));
        let usage: Option<Usage> = values
            .next()
            .flatten()
            .and_then(|v| register::decode(&usage_key, v));
        Ok((quotas.and_then(|q| q.max_stored_bytes), usage))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(bytes: u64) -> Usage {
        Usage {
            keys: 1,
            bytes,
            measured_ms: 0,
        }
    }

    #[test]
    fn a_namespace_writes_until_a_measurement_reaches_its_quota() {
        let now = 1_000;
        assert_eq!(over(None, Some(&usage(1 << 40)), now), None, "no quota");
        assert_eq!(over(Some(100), None, now), None, "never measured");
        assert_eq!(over(Some(100), Some(&usage(99)), now), None);
        assert_eq!(over(Some(100), Some(&usage(100)), now), Some((100, 100)));
        assert_eq!(over(Some(100), Some(&usage(250)), now), Some((250, 100)));
        // A measurement the upkeep has not renewed for long refuses nothing.
        let trusted = TRUSTED_FOR.as_millis() as u64;
        assert_eq!(
            over(Some(100), Some(&usage(250)), trusted),
            Some((250, 100))
        );
        assert_eq!(over(Some(100), Some(&usage(250)), trusted + 1), None);
    }

    #[test]
    fn the_refusal_names_the_quota_and_what_to_do() {
        let refused = OverStoredBytes {
            namespace: "team-a".into(),
            stored: 5000,
            limit: 4096,
        }
        .to_string();
        for part in [
            "quota exceeded",
            "team-a",
            "5000",
            "max_stored_bytes is 4096",
            "delete",
        ] {
            assert!(refused.contains(part), "{refused}");
        }
    }
}
