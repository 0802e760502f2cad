//! The registries of functions and of models, kept in the KVS so any executor can load any
//! function or model and nothing is lost when one restarts. Both work the same way ([`Artifact`]
//! picks the keys); a model's record is a [`FunctionRecord`] whose limits are unused.
//!
//! Keys (all lattices, so concurrent writers merge rather than overwrite; laid out by
//! [`squall_proto::keys`]):
//! - [`keys::names`]: the set of registered names.
//! - [`keys::record`]: a map from version number (zero-padded, so it sorts) to the version's
//!   [`FunctionRecord`] as an LWW register.
//! - [`keys::code`]: the code's manifest (size and chunk count) and [`keys::code_chunk`]: its
//!   bytes in chunks of [`CHUNK_BYTES`], content-addressed, so
//!   registering the same code twice stores it once. Chunks are written before the manifest
//!   and the manifest before the version entry, so a version that can be seen can be loaded.
//!
//! Registering a name again adds the next version; calls go to the newest. Deleting a name adds
//! a version that is a tombstone (a grow-only lattice cannot forget an entry): while the newest
//! version is a tombstone the name is not found, and registering it again starts a new version
//! after the tombstone. Two registrations of one name at the same instant may pick the same
//! number; the later timestamp wins it.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use squall_lattices::{LatticeValue, Lww, MapLattice, SetLattice, Timestamp};

use crate::cache::Cache;
use squall_proto::call::Artifact;
use squall_proto::keys;

use crate::limits::Limits;
use crate::pool::ClientPool;
use crate::{Error, Result};

/// The key of the set of names of `kind` in `namespace`.
pub fn names_key(kind: Artifact, namespace: &str) -> String {
    keys::names(namespace, kind.into())
}

/// The key of a name's versions; `name` is qualified ([`keys::qualify`]): its namespace's.
pub fn record_key(kind: Artifact, name: &str) -> String {
    let (namespace, name) = keys::split(name);
    keys::record(namespace, kind.into(), name)
}

/// Code is stored in chunks of this size, well under a storage node's request limit.
pub const CHUNK_BYTES: usize = 4 << 20;

/// One registered version of a function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRecord {
    /// The function's name.
    pub name: String,
    /// 1 for the first registration, then one more each time.
    pub version: u64,
    /// SHA-256 of the component, in hex: the code's address in the store.
    pub sha256: String,
    /// The component's size in bytes.
    pub size: u64,
    /// The limits its calls run under.
    pub limits: Limits,
    /// When it was registered (milliseconds since the Unix epoch).
    pub registered_ms: u64,
    /// A tombstone: the function was deleted at this version (no code).
    #[serde(default)]
    pub deleted: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    size: u64,
    chunks: u32,
}

/// The key holding a function's versions.
pub fn function_key(name: &str) -> String {
    record_key(Artifact::Function, name)
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks a qualified name ([`keys::qualify`]): a name of 1 to 128 characters of ASCII
/// letters, digits, `-`, `_` and `.` ([`keys::validate_name`]), after a namespace and a `/`
/// outside the default namespace. Names from guests and clients are checked with
/// [`keys::validate_name`] before they are qualified, so they never name another namespace.
pub fn validate_name(name: &str) -> Result<()> {
    if let Some((namespace, _)) = name.split_once('/') {
        keys::validate_namespace(namespace)?;
    }
    Ok(keys::validate_name(keys::split(name).1)?)
}

/// Reads and writes the registry. Cheap to clone; thread-safe.
#[derive(Debug, Clone)]
pub struct Registry {
    kvs: ClientPool,
    cache: Option<Cache>,
    kind: Artifact,
}

impl Registry {
    /// A registry over the store behind `kvs`, reading versions through `cache` (so an
    /// executor learns of a new version by push, without asking).
    pub fn new(kvs: ClientPool, cache: Cache) -> Self {
        Self {
            kvs,
            cache: Some(cache),
            kind: Artifact::Function,
        }
    }

    /// A registry that reads the store directly (for control-plane readers such as the
    /// gateway, which list and describe functions but do not call them).
    pub fn direct(kvs: ClientPool) -> Self {
        Self {
            kvs,
            cache: None,
            kind: Artifact::Function,
        }
    }

    /// The same registry's reader and writer, for models instead of functions.
    pub fn models(&self) -> Self {
        Self {
            kind: Artifact::Model,
            ..self.clone()
        }
    }

    /// What it holds.
    pub fn kind(&self) -> Artifact {
        self.kind
    }

    async fn read(&self, key: &str) -> Result<(Option<LatticeValue>, u64)> {
        match &self.cache {
            Some(cache) => cache.get_versioned(key).await,
            None => {
                let owned = key.to_string();
                Ok((self.kvs.with(move |c| c.get(&owned)).await?, 0))
            }
        }
    }

    /// Stores `code` as the next version of `name`. The caller has validated the code.
    pub async fn store(&self, name: &str, code: Vec<u8>, limits: Limits) -> Result<FunctionRecord> {
        validate_name(name)?;
        let sha256 = sha256_hex(&code);
        let size = code.len() as u64;
        let key = record_key(self.kind, name);
        let (namespace, name) = keys::split(name);
        let names_key = names_key(self.kind, namespace);
        let record = {
            let sha256 = sha256.clone();
            let name = name.to_string();
            self.kvs
                .with(move |client| {
                    // Content-addressed chunks and manifest: every writer writes the same
                    // value with the same timestamp, so storing twice changes nothing.
                    let fixed = Timestamp { time: 0, writer: 0 };
                    let chunks: Vec<(String, LatticeValue)> = code
                        .chunks(CHUNK_BYTES)
                        .enumerate()
                        .map(|(i, chunk)| {
                            (
                                keys::code_chunk(&sha256, i as u32),
                                LatticeValue::Lww(Lww::new(
                                    fixed,
                                    bytes::Bytes::copy_from_slice(chunk),
                                )),
                            )
                        })
                        .collect();
                    let count = chunks.len() as u32;
                    for (chunk_key, value) in chunks {
                        client.put(&chunk_key, value)?;
                    }
                    let manifest = rmp_serde::to_vec(&Manifest {
                        size,
                        chunks: count,
                    })
                    .map_err(|e| squall_kvs::Error::Config(format!("encoding a manifest: {e}")))?;
                    client.put(
                        &keys::code(&sha256),
                        LatticeValue::Lww(Lww::new(fixed, manifest.into())),
                    )?;
                    let record = put_version(client, &key, |version| FunctionRecord {
                        name: name.clone(),
                        version,
                        sha256: sha256.clone(),
                        size,
                        limits,
                        registered_ms: Timestamp::now(0).time / 1000,
                        deleted: false,
                    })?;
                    let names = SetLattice::from_iter([bytes::Bytes::from(name.clone())]);
                    client.put(&names_key, LatticeValue::Set(names))?;
                    Ok(record)
                })
                .await?
        };
        tracing::info!(
            kind = keys::Kind::from(self.kind).noun(),
            name = %record.name,
            version = record.version,
            sha256 = %record.sha256,
            size = record.size,
            "registered"
        );
        Ok(record)
    }

    /// The newest version of `name`, read through the cache; `None` if never registered.
    pub async fn newest(&self, name: &str) -> Result<Option<FunctionRecord>> {
        Ok(self.newest_versioned(name).await?.0)
    }

    /// The newest version of `name` and the cache generation of the registry key it was
    /// read from (0 if the name was never registered).
    pub async fn newest_versioned(&self, name: &str) -> Result<(Option<FunctionRecord>, u64)> {
        validate_name(name)?;
        let key = record_key(self.kind, name);
        match self.read(&key).await? {
            (None, generation) => Ok((None, generation)),
            (Some(value), generation) => Ok((
                versions_of(&key, &value)?.pop().filter(|r| !r.deleted),
                generation,
            )),
        }
    }

    /// The versions of `name` since it was last deleted, oldest first; empty if it is deleted
    /// or was never registered.
    pub async fn versions(&self, name: &str) -> Result<Vec<FunctionRecord>> {
        validate_name(name)?;
        let key = record_key(self.kind, name);
        match self.read(&key).await?.0 {
            None => Ok(Vec::new()),
            Some(value) => Ok(live_versions(versions_of(&key, &value)?)),
        }
    }

    /// The newest version of every function of `namespace` that is not deleted, by name.
    pub async fn list(&self, namespace: &str) -> Result<Vec<FunctionRecord>> {
        let names = self.names(namespace).await?;
        let kind = self.kind.into();
        let keys: Vec<String> = names
            .iter()
            .map(|n| keys::record(namespace, kind, n))
            .collect();
        let values = self.kvs.with(move |c| c.get_many(&keys)).await?;
        let mut newest = Vec::new();
        for (name, value) in names.iter().zip(values) {
            if let Some(value) = value {
                let key = keys::record(namespace, kind, name);
                if let Some(record) = versions_of(&key, &value)?.pop().filter(|r| !r.deleted) {
                    newest.push(record);
                }
            }
        }
        Ok(newest)
    }

    /// Deletes `name` by adding a tombstone version; `false` if it was not registered (or
    /// already deleted). Executors stop calling it as soon as the store pushes the change.
    pub async fn delete(&self, name: &str) -> Result<bool> {
        validate_name(name)?;
        let key = record_key(self.kind, name);
        let name = keys::split(name).1.to_string();
        let deleted = self
            .kvs
            .with(move |client| {
                let live = match client.get(&key)? {
                    Some(value) => versions_of(&key, &value)
                        .map_err(|e| squall_kvs::Error::Config(e.to_string()))?
                        .last()
                        .is_some_and(|r| !r.deleted),
                    None => false,
                };
                if !live {
                    return Ok(false);
                }
                put_version(client, &key, |version| FunctionRecord {
                    name: name.clone(),
                    version,
                    sha256: String::new(),
                    size: 0,
                    limits: Limits::default(),
                    registered_ms: Timestamp::now(0).time / 1000,
                    deleted: true,
                })?;
                Ok(true)
            })
            .await?;
        Ok(deleted)
    }

    /// The names registered in `namespace` (not qualified), sorted.
    pub async fn names(&self, namespace: &str) -> Result<Vec<String>> {
        let names_key = names_key(self.kind, namespace);
        let key = names_key.clone();
        let value = self.kvs.with(move |client| client.get(&key)).await?;
        let mut names: Vec<String> = match value {
            None => Vec::new(),
            Some(LatticeValue::Set(set)) => set
                .0
                .iter()
                .filter_map(|n| std::str::from_utf8(n).ok().map(str::to_string))
                .collect(),
            Some(other) => {
                return Err(Error::BadValue {
                    key: names_key,
                    reason: format!("expected a set, found {}", other.lattice_type().name()),
                })
            }
        };
        names.sort();
        Ok(names)
    }

    /// The code of a version, checked against its hash.
    pub async fn code(&self, record: &FunctionRecord) -> Result<Vec<u8>> {
        let corrupt = |reason: String| Error::CorruptCode {
            name: record.name.clone(),
            version: record.version,
            reason,
        };
        let sha256 = record.sha256.clone();
        let fetched = self
            .kvs
            .with(move |client| {
                let manifest = client.get(&keys::code(&sha256))?;
                let Some(LatticeValue::Lww(manifest)) = manifest else {
                    return Ok(Err("manifest missing or not an LWW value".to_string()));
                };
                let manifest: Manifest = match rmp_serde::from_slice(&manifest.value) {
                    Ok(m) => m,
                    Err(e) => return Ok(Err(format!("undecodable manifest: {e}"))),
                };
                let mut code = Vec::with_capacity(manifest.size.min(1 << 30) as usize);
                for i in 0..manifest.chunks {
                    match client.get(&keys::code_chunk(&sha256, i))? {
                        Some(LatticeValue::Lww(chunk)) => code.extend_from_slice(&chunk.value),
                        _ => return Ok(Err(format!("chunk {i} missing"))),
                    }
                }
                Ok(Ok(code))
            })
            .await?
            .map_err(corrupt)?;
        let actual = sha256_hex(&fetched);
        if actual != record.sha256 {
            return Err(corrupt(format!("content hash is {actual}")));
        }
        Ok(fetched)
    }
}

/// Adds the next version of the function at `key`, made by `make` from its number.
fn put_version(
    client: &mut squall_kvs::Client,
    key: &str,
    make: impl FnOnce(u64) -> FunctionRecord,
) -> squall_kvs::Result<FunctionRecord> {
    let next = match client.get(key)? {
        Some(value) => versions_of(key, &value)
            .map_err(|e| squall_kvs::Error::Config(e.to_string()))?
            .last()
            .map_or(1, |r| r.version + 1),
        None => 1,
    };
    let record = make(next);
    let encoded = rmp_serde::to_vec(&record)
        .map_err(|e| squall_kvs::Error::Config(format!("encoding a record: {e}")))?;
    let entry = MapLattice::from_iter([(
        bytes::Bytes::from(format!("{next:020}")),
        LatticeValue::Lww(Lww::new(Timestamp::now(client.writer()), encoded.into())),
    )]);
    client.put(key, LatticeValue::Map(entry))?;
    Ok(record)
}

/// The versions after the last tombstone (none if the newest is one).
fn live_versions(mut records: Vec<FunctionRecord>) -> Vec<FunctionRecord> {
    match records.iter().rposition(|r| r.deleted) {
        Some(last) => records.split_off(last + 1),
        None => records,
    }
}

/// Decodes the versions held in a function's key, oldest first.
fn versions_of(key: &str, value: &LatticeValue) -> Result<Vec<FunctionRecord>> {
    let bad = |reason: String| Error::BadValue {
        key: key.to_string(),
        reason,
    };
    let LatticeValue::Map(map) = value else {
        return Err(bad(format!(
            "expected a map, found {}",
            value.lattice_type().name()
        )));
    };
    let mut records = Vec::with_capacity(map.0.len());
    for entry in map.0.values() {
        let LatticeValue::Lww(register) = entry else {
            return Err(bad("a version entry is not an LWW register".into()));
        };
        let record: FunctionRecord = rmp_serde::from_slice(&register.value)
            .map_err(|e| bad(format!("undecodable version record: {e}")))?;
        records.push(record);
    }
    records.sort_by_key(|r| r.version);
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(validate_name("incr").is_ok());
        assert!(validate_name("a.b-c_9").is_ok());
        assert!(validate_name("").is_err());
        assert!(validate_name("with space").is_err());
        assert!(validate_name("team/incr").is_ok(), "qualified");
        assert!(validate_name("a/b/c").is_err());
        assert!(validate_name("../incr").is_err());
        assert!(validate_name("/incr").is_err());
        assert!(validate_name(&"x".repeat(129)).is_err());
    }

    #[test]
    fn sha256_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn versions_sort_and_bad_values_are_errors() {
        let record = |version| FunctionRecord {
            name: "f".into(),
            version,
            sha256: "00".into(),
            size: 1,
            limits: Limits::default(),
            registered_ms: 0,
            deleted: version == 2,
        };
        let map = MapLattice::from_iter([2u64, 1, 10].map(|v| {
            (
                bytes::Bytes::from(format!("{v:020}")),
                LatticeValue::Lww(Lww::new(
                    Timestamp { time: v, writer: 1 },
                    rmp_serde::to_vec(&record(v)).expect("encode").into(),
                )),
            )
        }));
        let versions = versions_of("k", &LatticeValue::Map(map)).expect("decode");
        assert_eq!(
            versions.iter().map(|r| r.version).collect::<Vec<_>>(),
            [1, 2, 10]
        );
        // Version 2 is a tombstone: only what came after it is live.
        let live = live_versions(versions.clone());
        assert_eq!(live.iter().map(|r| r.version).collect::<Vec<_>>(), [10]);
        assert!(live_versions(versions[..2].to_vec()).is_empty());
        let wrong = LatticeValue::Set(SetLattice::default());
        assert!(matches!(
            versions_of("k", &wrong),
            Err(Error::BadValue { .. })
        ));
    }
}
