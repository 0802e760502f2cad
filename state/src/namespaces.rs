//! Namespaces: which exist, and deleting one with everything it owns.
//!
//! A namespace owns every key under [`keys::namespace_root`]: its functions', models' and
//! DAGs' records, triggers, results, activation records, dead letters, audit entries and its
//! tenants' keys ([`keys::user`]). Code is content-addressed and shared, so it is not a
//! namespace's to delete.
//!
//! Keys: [`keys::namespaces`], the grow-only set of names ever created, and
//! [`keys::namespace`], one [`NamespaceRecord`] per name in a last-writer-wins register:
//! creating writes `deleted: false`, deleting writes `deleted: true` later, and creating again
//! later still brings the name back (with nothing of what it had). [`keys::DEFAULT_NAMESPACE`]
//! always exists and cannot be deleted: it is the namespace of every URL and command that names
//! none.
//!
//! Deleting first marks the namespace deleted (from then on gateways refuse its requests, once
//! their cache of it has expired, within a second), then deletes its keys page by page. A
//! write that was already under way when the mark landed can outlive the sweep; it is
//! unreachable (no request of a deleted namespace is served) and a later delete of the same
//! name, or its creation again, sweeps once more first.

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

    /// Creates `name`; `false` if it exists already. A name deleted before is swept again
    /// first, so it starts empty.
    pub async fn create(&self, name: &str) -> Result<bool> {
        Self::check(name)?;
        if self.exists(name).await? {
            return Ok(false);
        }
        self.sweep(name).await?;
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
        Ok(true)
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

    /// Deletes every key under `name`'s root, page by page; how many.
    async fn sweep(&self, name: &str) -> Result<u64> {
        let root = keys::namespace_root(name);
        let mut swept = 0;
        loop {
            let prefix = root.clone();
            let (page, _) = self
                .kvs
                .with(move |client| client.list(&prefix, None, SWEEP_PAGE))
                .await?;
            if page.is_empty() {
                return Ok(swept);
            }
            swept += page.len() as u64;
            self.kvs
                .with(move |client| {
                    for key in &page {
                        client.delete(key)?;
                    }
                    Ok(())
                })
                .await?;
        }
    }
}
