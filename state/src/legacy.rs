//! Records written before keys were laid out by namespace, moved into the layout.
//!
//! Until the key layout of [`squall_proto::keys`], Squall kept its registries at
//! `squall/functions`, `squall/fn/{name}`, `squall/models`, `squall/model/{name}`,
//! `squall/dags` and `squall/dag/{name}`. A store written then still holds them there; the
//! roles that start against a store ([`migrate`], called by the scheduler and `squall up`)
//! merge each into its key in the `default` namespace, so every function, model and DAG
//! registered before an upgrade is still found after it. Every value is a lattice, so the
//! merge is idempotent: running it on every start, from several schedulers at once, or after
//! new registrations under the same names, loses and duplicates nothing. The old keys are left
//! as they are (a grow-only store cannot forget them), and asynchronous results, which live
//! minutes, are not moved.
//!
//! Functions' and clients' keys were stored as they were named, outside `squall/`; they now
//! live in their namespace ([`keys::user`]). [`move_tenant_keys`] moves every key outside
//! `squall/` into the default namespace, value and expiry as they are (a merge, so running it
//! twice, or from two processes at once, moves each once), deletes the old key (both written
//! as replicas' copies are, unjournaled: moving a key fires no trigger), and marks the
//! store done ([`keys::tenant_keys_moved`]) so later starts read one key. A write by a process
//! of the old version, made to an old key after the move passed it, stays where it is.

use squall_lattices::LatticeValue;
use squall_proto::keys::{self, Kind, DEFAULT_NAMESPACE, RESERVED_PREFIX};

use crate::pool::ClientPool;
use crate::Result;

/// Where each kind's names and records were kept before the layout.
const LEGACY: [(Kind, &str, &str); 3] = [
    (Kind::Function, "functions", "fn"),
    (Kind::Model, "models", "model"),
    (Kind::Dag, "dags", "dag"),
];

/// Merges the registries found under the old keys into the layout; how many records it
/// merged (0 on a store that never held the old keys).
pub async fn migrate(kvs: &ClientPool) -> Result<usize> {
    let mut moved = 0;
    for (kind, names, records) in LEGACY {
        let names_key = format!("{RESERVED_PREFIX}{names}");
        let Some(LatticeValue::Set(set)) = kvs.with(move |c| c.get(&names_key)).await? else {
            continue;
        };
        let names: Vec<String> = set
            .0
            .iter()
            .filter_map(|n| std::str::from_utf8(n).ok())
            .filter(|n| keys::validate_name(n).is_ok())
            .map(str::to_string)
            .collect();
        let old: Vec<String> = names
            .iter()
            .map(|n| format!("{RESERVED_PREFIX}{records}/{n}"))
            .collect();
        let values = kvs.with(move |c| c.get_many(&old)).await?;
        let mut entries: Vec<(String, LatticeValue)> = names
            .iter()
            .zip(values)
            .filter_map(|(name, value)| Some((keys::record(DEFAULT_NAMESPACE, kind, name), value?)))
            .collect();
        moved += entries.len();
        // The names last, so that a name that can be listed has its record.
        entries.push((keys::names(DEFAULT_NAMESPACE, kind), LatticeValue::Set(set)));
        kvs.with(move |c| {
            for (key, value) in entries {
                c.put(&key, value)?;
            }
            Ok(())
        })
        .await?;
    }
    if moved > 0 {
        tracing::info!(
            records = moved,
            "registries of the old key layout merged into the new"
        );
    }
    Ok(moved)
}

/// How many keys one page of [`move_tenant_keys`] lists.
const MOVE_PAGE: u32 = 500;

/// Moves the keys written before namespaces (every key outside `squall/`) into the default
/// namespace, once per store; how many it moved (0 on a store already done, or new).
pub async fn move_tenant_keys(kvs: &ClientPool) -> Result<u64> {
    if kvs
        .with(|client| client.get(&keys::tenant_keys_moved()))
        .await?
        .is_some()
    {
        return Ok(0);
    }
    let mut moved = 0u64;
    let mut after: Option<String> = None;
    loop {
        let from = after.clone();
        let (page, next) = kvs
            .with(move |client| client.list("", from.as_deref(), MOVE_PAGE))
            .await?;
        let old: Vec<String> = page.into_iter().filter(|k| !keys::is_reserved(k)).collect();
        if !old.is_empty() {
            moved += kvs
                .with(move |client| {
                    let entries = client.get_entries(&old)?;
                    let copies: Vec<_> = old
                        .iter()
                        .zip(entries)
                        .filter_map(|(key, entry)| {
                            Some((keys::user(DEFAULT_NAMESPACE, key), entry?))
                        })
                        .collect();
                    let copied = copies.len() as u64;
                    // As copies, moves and deletes alike: journaled, they would fire every
                    // kv-change trigger on its keys again, and fill the journals.
                    let results = client.copy_many(copies)?;
                    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
                        return Err(squall_kvs::Error::Config(format!(
                            "moving a key into the default namespace: {e}"
                        )));
                    }
                    let tombstones = old
                        .iter()
                        .map(|key| (key.clone(), client.tombstone()))
                        .collect();
                    let results = client.copy_many(tombstones)?;
                    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
                        return Err(squall_kvs::Error::Config(format!(
                            "deleting a key moved into the default namespace: {e}"
                        )));
                    }
                    Ok(copied)
                })
                .await?;
        }
        // Squall's own keys sort together: the listing jumps over them.
        match next {
            Some(next) if keys::is_reserved(&next) => {
                after = Some(format!("{RESERVED_PREFIX}{}", char::MAX));
            }
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let done = LatticeValue::Max(squall_lattices::Max(1));
    kvs.with(move |client| client.put(&keys::tenant_keys_moved(), done))
        .await?;
    if moved > 0 {
        tracing::info!(
            keys = moved,
            "keys from before namespaces moved into the default namespace"
        );
    }
    Ok(moved)
}
