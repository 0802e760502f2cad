//! Namespaces: which exist, and deleting one with everything it owns.
//!
//! A namespace owns every key under [`keys::namespace_root`]: its functions', models' and
//! DAGs' records, triggers, retry policies and limits, pending calls, results, activation
//! records, dead letters and its tenants' keys ([`keys::user`]).
//!
//! Keys: [`keys::namespaces`], the grow-only set of names ever created, and
//! [`keys::namespace`], one [`NamespaceRecord`] per name in a last-writer-wins register:
//! creating writes `deleted: false`, deleting writes `deleted: true` later. [`keys::DEFAULT_NAMESPACE`]
//! always exists and cannot be deleted: it is the namespace of every URL and command that names
//! none.
//!
//! Deleting first marks the namespace deleted (from then on gateways refuse its requests, once
//! their cache of it has expired, within a second), then deletes its keys page by page. A
//! write that was already under way when the mark landed (a call still running, a batch of
//! activation records on its way) can outlive the sweep; it is unreachable, since no request
//! of a deleted namespace is served, and expires with its retention where it has one. That is
//! why a deleted namespace's name is never used again: a namespace created under it would
//! find those late writes, and the counters executors keep adding to in memory, as its own.
//!
//! What a namespace does not own: content-addressed code (shared), and the audit trail,
//! which is the cluster's (in the default namespace), so that a namespace's deletion is
//! itself audited and kept.

use serde::{Deserialize, Serialize};
use squall_lattices::{LatticeValue, SetLattice, Timestamp};
use squall_proto::keys::{self, DEFAULT_NAMESPACE};

use crate::pool::ClientPool;
use crate::{register, Error, Result};

/// How many keys one page of a namespace's deletion lists and deletes.
const SWEEP_PAGE: u32 = 500;

/// A namespace as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NamespaceRecord {
    /// Its name.
    pub name: String,
    /// When it was created (milliseconds since the Unix epoch; 0 for `default`).
    pub created_ms: u64,
    /// Whether it has been deleted since.
    #[serde(default)]
    pub deleted: bool,
}

/// A namespace's quotas; an absent one does not bound. Set by an admin, enforced by each
/// gateway (see `squall_gateway::quotas`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Calls of the namespace running at once through one gateway (synchronous calls and
    /// asynchronous attempts): past it, a synchronous call is refused (429) and an attempt
    /// waits for a slot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Calls started per second through one gateway, sustained (bursts up to the rate, at
    /// least one): past it, a call is refused (429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls_per_s: Option<f64>,
    /// Functions registered in the namespace: past it, a registration of a new name is
    /// refused (403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_functions: Option<u32>,
    /// The largest memory a function may ask for, in MiB (its default is capped to it): a
    /// registration asking for more is refused (403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_memory_mb: Option<u64>,
    /// The longest deadline a function or a call may ask for, in milliseconds (the defaults
    /// are capped to it): a registration or call asking for more is refused (403).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout_ms: Option<u64>,
    /// The bytes the namespace's keys may take in the store (as measured, see
    /// the `stored_bytes` module): at or past it, writes of its functions and of `/v1/kv` are
    /// refused (403) until deletes or expiries bring it under; deletes always pass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_stored_bytes: Option<u64>,
}

impl Quotas {
    /// Checks that each bound can hold something: counts and sizes at least 1, a rate above 0.
    pub fn check(&self) -> std::result::Result<(), String> {
        let positive = [
            ("max_in_flight", self.max_in_flight.map(u64::from)),
            ("max_functions", self.max_functions.map(u64::from)),
            ("max_memory_mb", self.max_memory_mb),
            ("max_timeout_ms", self.max_timeout_ms),
            ("max_stored_bytes", self.max_stored_bytes),
        ];
        for (name, value) in positive {
            if value == Some(0) {
                return Err(format!("{name} is at least 1"));
            }
        }
        if let Some(rate) = self.max_calls_per_s {
            if !(rate.is_finite() && rate > 0.0) {
                return Err("max_calls_per_s is a number above 0".into());
            }
        }
        Ok(())
    }
}

/// What [`Namespaces::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// Created.
    New,
    /// It exists already.
    Exists,
    /// The name was a namespace's that was deleted: not used again.
    Deleted,
}

/// The namespaces in the store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Namespaces {
    kvs: ClientPool,
}

impl Namespaces {
    /// The namespaces of the store behind `kvs`.
    pub fn new(kvs: ClientPool) -> Self {
        Self { kvs }
    }

    fn check(name: &str) -> Result<()> {
        keys::validate_namespace(name)?;
        Ok(())
    }

    /// Creates `name`: [`Created::Exists`] if it exists already, [`Created::Deleted`] if it
    /// was deleted (a deleted namespace's name is not used again, see the module docs).
    pub async fn create(&self, name: &str) -> Result<Created> {
        Self::check(name)?;
        if name == DEFAULT_NAMESPACE {
            return Ok(Created::Exists);
        }
        let record: Option<NamespaceRecord> =
            register::get(&self.kvs, keys::namespace(name)).await?;
        match record {
            Some(record) if record.deleted => return Ok(Created::Deleted),
            Some(_) => return Ok(Created::Exists),
            None => {}
        }
        let record = NamespaceRecord {
            name: name.to_string(),
            created_ms: squall_lattices::entry::now_ms(),
            deleted: false,
        };
        register::put(&self.kvs, keys::namespace(name), &record, Timestamp::now(0)).await?;
        let set = LatticeValue::Set(SetLattice::from_iter([bytes::Bytes::from(
            name.to_string(),
        )]));
        self.kvs
            .with(move |client| client.put(&keys::namespaces(), set))
            .await?;
        tracing::info!(namespace = name, "namespace created");
        Ok(Created::New)
    }

    /// Whether `name` exists now (`default` always does).
    pub async fn exists(&self, name: &str) -> Result<bool> {
        if name == DEFAULT_NAMESPACE {
            return Ok(true);
        }
        Self::check(name)?;
        let record: Option<NamespaceRecord> =
            register::get(&self.kvs, keys::namespace(name)).await?;
        Ok(record.is_some_and(|r| !r.deleted))
    }

    /// Every namespace that exists, `default` first, then by name.
    pub async fn list(&self) -> Result<Vec<NamespaceRecord>> {
        let names = self
            .kvs
            .with(move |client| client.get(&keys::namespaces()))
            .await?;
        let mut names: Vec<String> = match names {
            Some(LatticeValue::Set(set)) => set
                .0
                .iter()
                .filter_map(|n| std::str::from_utf8(n).ok())
                .filter(|n| keys::validate_namespace(n).is_ok() && *n != DEFAULT_NAMESPACE)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        names.sort();
        let record_keys: Vec<String> = names.iter().map(|n| keys::namespace(n)).collect();
        let values = self.kvs.with(move |c| c.get_many(&record_keys)).await?;
        let mut live = vec![NamespaceRecord {
            name: DEFAULT_NAMESPACE.to_string(),
            created_ms: 0,
            deleted: false,
        }];
        for (name, value) in names.iter().zip(values) {
            let record: Option<NamespaceRecord> =
                value.and_then(|v| register::decode(&keys::namespace(name), v));
            live.extend(record.filter(|r| !r.deleted));
        }
        Ok(live)
    }

    /// The names of every namespace that exists, `default` first.
    pub async fn names(&self) -> Result<Vec<String>> {
        Ok(self.list().await?.into_iter().map(|r| r.name).collect())
    }

    /// Deletes `name` and every key it owns; how many keys were deleted, or `None` if it did
    /// not exist. `default` cannot be deleted.
    pub async fn delete(&self, name: &str) -> Result<Option<u64>> {
        Self::check(name)?;
        if name == DEFAULT_NAMESPACE {
            return Err(Error::InvalidName {
                name: name.to_string(),
                reason: "the default namespace cannot be deleted",
            });
        }
        if !self.exists(name).await? {
            return Ok(None);
        }
        let record = NamespaceRecord {
            name: name.to_string(),
            created_ms: squall_lattices::entry::now_ms(),
            deleted: true,
        };
        register::put(&self.kvs, keys::namespace(name), &record, Timestamp::now(0)).await?;
        let swept = self.sweep(name).await?;
        tracing::info!(namespace = name, keys = swept, "namespace deleted");
        Ok(Some(swept))
    }

    /// The quotas of `name` (none set: every bound absent).
    pub async fn quotas(&self, name: &str) -> Result<Quotas> {
        Self::check(name)?;
        Ok(register::get(&self.kvs, keys::quotas(name))
            .await?
            .unwrap_or_default())
    }

    /// Sets the quotas of `name` (checked: [`Quotas::check`]).
    pub async fn set_quotas(&self, name: &str, quotas: &Quotas) -> Result<()> {
        Self::check(name)?;
        quotas.check().map_err(|reason| Error::BadValue {
            key: keys::quotas(name),
            reason,
        })?;
        register::put(&self.kvs, keys::quotas(name), quotas, Timestamp::now(0)).await
    }

    /// Deletes every key under `name`'s root, a page at a time, each page listed after the
    /// last (a page may come back empty while more follow: a cluster's listing drops keys its
    /// replicas deleted); how many.
    async fn sweep(&self, name: &str) -> Result<u64> {
        let root = keys::namespace_root(name);
        let mut swept = 0;
        let mut after: Option<String> = None;
        loop {
            let (prefix, from) = (root.clone(), after.take());
            let (page, next) = self
                .kvs
                .with(move |client| client.list(&prefix, from.as_deref(), SWEEP_PAGE))
                .await?;
            swept += page.len() as u64;
            self.kvs
                .with(move |client| {
                    for key in &page {
                        client.delete(key)?;
                    }
                    Ok(())
                })
                .await?;
            match next {
                Some(next) => after = Some(next),
                None => return Ok(swept),
            }
        }
    }
}
