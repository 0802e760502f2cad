//! The one home of Squall's key layout: which store key holds what.
//!
//! Squall keeps its own records in the same store as the functions' state, under
//! [`RESERVED_PREFIX`], which functions and the HTTP API's `/v1/kv` can never reach. Every
//! crate builds those keys here, so the layout is read in one place and changed in one place.
//!
//! Records that belong to a tenant are laid out by namespace from the start, `(namespace,
//! kind, name) -> key`, so that namespaces, triggers, activation records and dead letters land
//! in this one layout without moving data.
//!
//! ```text
//! squall/ns/{namespace}/names/{kind}     the set of names of one kind ([`names`])
//! squall/ns/{namespace}/{kind}/{name}    one record: a function's, model's or DAG's versions ([`record`])
//! squall/ns/{namespace}/result/{id}      an asynchronous call's result ([`result`])
//! squall/ns/{namespace}/activation/{id}  a call's activation record ([`activation`])
//! squall/ns/{namespace}/activation-bytes/{second}  bytes of records started in a span ([`activation_bytes`])
//! squall/ns/{namespace}/lease/{what}     which gateway does a piece of upkeep ([`lease`])
//! squall/ns/{namespace}/call/{id}        an accepted asynchronous call not yet finished ([`call`])
//! squall/ns/{namespace}/retry/{kind}/{name}        a function's or DAG's retry policy ([`retry_policy`])
//! squall/ns/{namespace}/dead/{kind}/{name}/{id}    a call that failed every attempt ([`dead_letter`])
//! squall/ns/{namespace}/idem/{kind}/{name}/{hash}  the call an idempotency key names ([`idempotency`])
//! squall/ns/{namespace}/limit/{kind}/{name}        a function's or DAG's concurrency limit ([`concurrency_limit`])
//! squall/ns/{namespace}/trigger/{name}   a trigger ([`trigger`])
//! squall/ns/{namespace}/trigger-fired/{name}       the latest tick it fired ([`trigger_fired`])
//! squall/ns/{namespace}/audit/{id}       an administrative request's audit entry ([`audit`])
//! squall/ns/{namespace}/kv/{key}         a key a function or client of the namespace names ([`user`])
//! squall/ns/{namespace}/quotas           the namespace's quotas ([`quotas`])
//! squall/namespaces                      the set of namespaces ever created ([`namespaces`])
//! squall/namespace/{namespace}           whether it exists now, since when ([`namespace`])
//! squall/migrated/tenant-keys            keys from before namespaces were moved ([`tenant_keys_moved`])
//! squall/api-key/{id}                    an API key: its role, namespace and secret's hash ([`api_key`])
//! squall/code/{sha256}                   content-addressed code, shared by every namespace ([`code`])
//! squall/code/{sha256}/{index}           its chunks ([`code_chunk`])
//! squall/load/{node}                     a storage node's load report ([`load_report`])
//! ```
//!
//! Code is content-addressed and immutable, so sharing it across namespaces hands nobody
//! anything they could not compute; load reports describe the cluster, not a tenant.
//!
//! Namespace and record names are checked by [`validate_name`] before they are laid out, so
//! no name can contain a `/` and reach into another record's keys.
//!
//! # Tenants' keys
//!
//! Every key a function's `state` calls or a client's `/v1/kv` names is mapped by [`user`]
//! into its namespace, `default` included: `counter` in namespace `a` is stored as
//! `squall/ns/a/kv/counter`. The mapping is done by the host (the executor, the gateway), never
//! by the guest, and it is one-to-one and prefix-preserving: a namespace's keys are exactly the
//! store keys that start with [`user_prefix`], so no name (`../b/kv/x`, `squall/ns/b/...`, a
//! percent-encoded one) lands outside, listing a prefix lists only the namespace's keys, and
//! deleting a namespace deletes everything under [`namespace_root`]. Functions and models are
//! named inside the fabric by [`qualify`]: a name alone in `default`, `ns/name` elsewhere,
//! which no guest can forge, since names given by guests and clients never contain a `/`.

use crate::Key;

/// Keys under this prefix are Squall's own: functions and `/v1/kv` cannot read or write them.
pub const RESERVED_PREFIX: &str = "squall/";

/// The longest key the store takes from a function, the HTTP API or a replication override.
pub const MAX_KEY_BYTES: usize = 1024;

/// The namespace of the URLs and commands that name none, and of everything from before
/// namespaces.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The longest name of a function, model, DAG or namespace.
pub const MAX_NAME_LEN: usize = 128;

/// What a named record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A function: its versions.
    Function,
    /// A model for `wasi:nn`: its versions.
    Model,
    /// A DAG of functions: its newest definition.
    Dag,
}

impl Kind {
    /// The key segment of this kind.
    pub fn segment(self) -> &'static str {
        match self {
            Kind::Function => "fn",
            Kind::Model => "model",
            Kind::Dag => "dag",
        }
    }

    /// What it is called in messages.
    pub fn noun(self) -> &'static str {
        match self {
            Kind::Function => "function",
            Kind::Model => "model",
            Kind::Dag => "DAG",
        }
    }
}

impl From<crate::call::Artifact> for Kind {
    fn from(artifact: crate::call::Artifact) -> Self {
        match artifact {
            crate::call::Artifact::Function => Kind::Function,
            crate::call::Artifact::Model => Kind::Model,
        }
    }
}

impl From<&crate::call::Target> for Kind {
    fn from(target: &crate::call::Target) -> Self {
        match target {
            crate::call::Target::Function(_) => Kind::Function,
            crate::call::Target::Dag(_) => Kind::Dag,
        }
    }
}

/// Whether `key` is in Squall's reserved space.
pub fn is_reserved(key: &str) -> bool {
    key.starts_with(RESERVED_PREFIX)
}

/// The key of the set of `kind` names registered in `namespace`.
pub fn names(namespace: &str, kind: Kind) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/names/{}", kind.segment())
}

/// The key of the record `name` of `kind` in `namespace`.
pub fn record(namespace: &str, kind: Kind, name: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/{}/{name}", kind.segment())
}

/// The key of an asynchronous call's result in `namespace`.
pub fn result(namespace: &str, id: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/result/{id}")
}

/// The key of activation record `id` in `namespace` (`id` empty: the records' prefix).
pub fn activation(namespace: &str, id: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/activation/{id}")
}

/// The counter of the bytes of activation records in `namespace` that started in the span
/// beginning at second `bucket` (its text: twelve digits, so spans sort oldest first; empty:
/// the counters' prefix).
pub fn activation_bytes(namespace: &str, bucket: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/activation-bytes/{bucket}")
}

/// The key of accepted asynchronous call `id` in `namespace`, until it finishes (`id` empty:
/// the pending calls' prefix).
pub fn call(namespace: &str, id: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/call/{id}")
}

/// The key of the retry policy of the function or DAG `name` in `namespace`.
pub fn retry_policy(namespace: &str, kind: Kind, name: &str) -> Key {
    format!(
        "{RESERVED_PREFIX}ns/{namespace}/retry/{}/{name}",
        kind.segment()
    )
}

/// The key of dead letter `id` of the function or DAG `name` (`id` empty: their prefix).
pub fn dead_letter(namespace: &str, kind: Kind, name: &str, id: &str) -> Key {
    format!(
        "{RESERVED_PREFIX}ns/{namespace}/dead/{}/{name}/{id}",
        kind.segment()
    )
}

/// The key of the concurrency limit of the function or DAG `name` in `namespace` (`None`:
/// the limits' prefix).
pub fn concurrency_limit(namespace: &str, target: Option<(Kind, &str)>) -> Key {
    match target {
        Some((kind, name)) => format!(
            "{RESERVED_PREFIX}ns/{namespace}/limit/{}/{name}",
            kind.segment()
        ),
        None => format!("{RESERVED_PREFIX}ns/{namespace}/limit/"),
    }
}

/// The key of trigger `name` in `namespace` (`name` empty: the triggers' prefix).
pub fn trigger(namespace: &str, name: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/trigger/{name}")
}

/// The key of audit entry `id` in `namespace` (`id` empty: the entries' prefix).
pub fn audit(namespace: &str, id: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/audit/{id}")
}

/// The key of the latest tick trigger `name` fired.
pub fn trigger_fired(namespace: &str, name: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/trigger-fired/{name}")
}

/// The key of the change feed's position in the journal of the shard at `endpoint`: the last
/// sequence number whose changes have been delivered (a max register).
pub fn journal_position(namespace: &str, endpoint: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/journal-position/{endpoint}")
}

/// The key of API key `id`'s record (its namespace is in the record: a key may be made for
/// any namespace, by an admin).
pub fn api_key(id: &str) -> Key {
    format!("{RESERVED_PREFIX}api-key/{id}")
}

/// The key of the change feed's lease: which gateway delivers the journals' changes, until
/// when.
pub fn change_feed_lease(namespace: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/change-feed-lease")
}

/// The lease on a piece of upkeep one gateway at a time does in `namespace` (`what`: e.g.
/// `activation-trim`), see `squall_state::lease`.
pub fn lease(namespace: &str, what: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/lease/{what}")
}

/// The key counting the changes shards dropped before the feed took them (a counter).
pub fn changes_lost(namespace: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/changes-lost")
}

/// The key naming the call an idempotency key started, by the key's hash (hex).
pub fn idempotency(namespace: &str, kind: Kind, name: &str, hash: &str) -> Key {
    format!(
        "{RESERVED_PREFIX}ns/{namespace}/idem/{}/{name}/{hash}",
        kind.segment()
    )
}

/// The store key of the key `key` a function or client of `namespace` names (see the module
/// docs). `key` is taken as it is: any bytes, any `/`, nothing outside the namespace.
pub fn user(namespace: &str, key: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/kv/{key}")
}

/// The prefix of every store key [`user`] maps `namespace`'s keys to.
pub fn user_prefix(namespace: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/kv/")
}

/// The namespace and the key as its functions name it, if `stored` is a tenant's key.
pub fn tenant_key(stored: &str) -> Option<(&str, &str)> {
    let rest = stored.strip_prefix(RESERVED_PREFIX)?.strip_prefix("ns/")?;
    let (namespace, rest) = rest.split_once('/')?;
    let key = rest.strip_prefix("kv/")?;
    Some((namespace, key))
}

/// Whether `stored` is a key some namespace's functions or clients name: the keys the store
/// journals for `kv-change` triggers, with every key outside Squall's reserved space.
pub fn is_tenant_key(stored: &str) -> bool {
    !is_reserved(stored) || tenant_key(stored).is_some()
}

/// The prefix of every key `namespace` owns: its records and its tenants' keys.
pub fn namespace_root(namespace: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/")
}

/// The key of the set of namespaces ever created (a grow-only set; [`namespace`] says which
/// exist now).
pub fn namespaces() -> Key {
    format!("{RESERVED_PREFIX}namespaces")
}

/// The key of namespace `namespace`'s record: whether it exists, since when.
pub fn namespace(namespace: &str) -> Key {
    format!("{RESERVED_PREFIX}namespace/{namespace}")
}

/// The key of namespace `namespace`'s quotas.
pub fn quotas(namespace: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/quotas")
}

/// The key of namespace `namespace`'s last measured stored bytes.
pub fn usage(namespace: &str) -> Key {
    format!("{RESERVED_PREFIX}ns/{namespace}/usage")
}

/// The name the fabric knows function (or model, or DAG) `name` of `namespace` by: `name`
/// alone in [`DEFAULT_NAMESPACE`], so everything from before namespaces keeps its name, and
/// `namespace/name` elsewhere. Both parts are checked names (no `/`), so [`split`] undoes it.
pub fn qualify(namespace: &str, name: &str) -> String {
    if namespace == DEFAULT_NAMESPACE {
        name.to_string()
    } else {
        format!("{namespace}/{name}")
    }
}

/// The namespace and the name of a name made by [`qualify`].
pub fn split(qualified: &str) -> (&str, &str) {
    match qualified.split_once('/') {
        Some((namespace, name)) => (namespace, name),
        None => (DEFAULT_NAMESPACE, qualified),
    }
}

/// Checks a namespace's name: a name ([`validate_name`]) that is not `.` or `..` (which URLs
/// would resolve away).
pub fn validate_namespace(name: &str) -> Result<(), InvalidName> {
    validate_name(name)?;
    if name.bytes().all(|b| b == b'.') {
        return Err(InvalidName {
            name: name.to_string(),
            reason: "a namespace is not named with dots alone",
        });
    }
    Ok(())
}

/// The key marking that the keys of the layout before namespaces were moved into the default
/// namespace (see `squall_state::legacy`).
pub fn tenant_keys_moved() -> Key {
    format!("{RESERVED_PREFIX}migrated/tenant-keys")
}

/// The key of the manifest of the code whose SHA-256 (hex) is `sha256`.
pub fn code(sha256: &str) -> Key {
    format!("{RESERVED_PREFIX}code/{sha256}")
}

/// The key of chunk `index` of that code.
pub fn code_chunk(sha256: &str, index: u32) -> Key {
    format!("{RESERVED_PREFIX}code/{sha256}/{index}")
}

/// The key a storage node's load report is written to.
pub fn load_report(node: &str) -> Key {
    format!("{RESERVED_PREFIX}load/{node}")
}

/// Why a name was refused by [`validate_name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid name {name:?}: {reason}")]
pub struct InvalidName {
    /// The name given (cut to a printable length).
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Checks that a name can be a key segment and a URL path segment: 1 to [`MAX_NAME_LEN`]
/// characters of ASCII letters, digits, `-`, `_` and `.`.
pub fn validate_name(name: &str) -> Result<(), InvalidName> {
    let invalid = |reason| {
        Err(InvalidName {
            name: name.chars().take(MAX_NAME_LEN + 8).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("empty");
    }
    if name.len() > MAX_NAME_LEN {
        return invalid("longer than 128 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return invalid("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_laid_out_by_namespace_and_kind() {
        assert_eq!(
            record(DEFAULT_NAMESPACE, Kind::Function, "incr"),
            "squall/ns/default/fn/incr"
        );
        assert_eq!(
            names(DEFAULT_NAMESPACE, Kind::Dag),
            "squall/ns/default/names/dag"
        );
        assert_eq!(result("t1", "abc"), "squall/ns/t1/result/abc");
        assert_eq!(code_chunk("ff", 3), "squall/code/ff/3");
        for key in [
            names("a", Kind::Model),
            record("a", Kind::Model, "m"),
            result("a", "x"),
            code("ff"),
            load_report("tcp://n"),
        ] {
            assert!(is_reserved(&key), "{key}");
        }
    }

    #[test]
    fn kinds_never_share_keys() {
        let kinds = [Kind::Function, Kind::Model, Kind::Dag];
        for a in kinds {
            for b in kinds {
                if a != b {
                    assert_ne!(record("n", a, "x"), record("n", b, "x"));
                    assert_ne!(names("n", a), names("n", b));
                }
            }
        }
    }

    #[test]
    fn tenants_keys_stay_in_their_namespace() {
        assert_eq!(user("a", "counter"), "squall/ns/a/kv/counter");
        assert_eq!(user(DEFAULT_NAMESPACE, "x"), "squall/ns/default/kv/x");
        for key in ["../b/kv/x", "squall/ns/b/kv/x", "%2e%2e/b", "", "/", "kv/"] {
            let stored = user("a", key);
            assert!(stored.starts_with(&user_prefix("a")), "{key:?}");
            assert!(!stored.starts_with(&user_prefix("b")), "{key:?}");
            assert_eq!(tenant_key(&stored), Some(("a", key)));
            assert!(is_tenant_key(&stored));
        }
        assert_eq!(tenant_key("plain"), None);
        assert!(is_tenant_key("plain"));
        for own in [
            record("a", Kind::Function, "f"),
            result("a", "x"),
            code("ff"),
        ] {
            assert_eq!(tenant_key(&own), None, "{own}");
            assert!(!is_tenant_key(&own), "{own}");
        }
        assert!(user("a", "x").starts_with(&namespace_root("a")));
        assert!(record("a", Kind::Dag, "d").starts_with(&namespace_root("a")));
        assert!(!record("ab", Kind::Dag, "d").starts_with(&namespace_root("a")));
    }

    #[test]
    fn qualified_names_split_back() {
        assert_eq!(qualify(DEFAULT_NAMESPACE, "incr"), "incr");
        assert_eq!(qualify("a", "incr"), "a/incr");
        assert_eq!(split("incr"), (DEFAULT_NAMESPACE, "incr"));
        assert_eq!(split("a/incr"), ("a", "incr"));
        assert!(validate_namespace("team-a").is_ok());
        for bad in [".", "..", "a/b", ""] {
            assert!(validate_namespace(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn names_cannot_reach_other_keys() {
        assert!(validate_name("incr").is_ok());
        assert!(validate_name("a.b-c_d9").is_ok());
        for bad in ["", "a/b", "a b", "é", "x\n"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN)).is_ok());
        assert!(validate_name(&"a".repeat(MAX_NAME_LEN + 1)).is_err());
    }
}
