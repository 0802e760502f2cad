//! The one home of Squall's key layout: which store key holds what.
//!
//! Squall keeps its own records in the same store as the functions' state, under
//! [`RESERVED_PREFIX`], which functions and the HTTP API's `/v1/kv` can never reach. Every
//! crate builds those keys here, so the layout is read in one place and changed in one place.
//!
//! Records that belong to a tenant are laid out by namespace from the start, `(namespace,
//! kind, name) -> key`, so that namespaces, triggers, activation records and dead letters land
//! in this one layout without moving data. Everything lives in [`DEFAULT_NAMESPACE`] today.
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

use crate::Key;

/// Keys under this prefix are Squall's own: functions and `/v1/kv` cannot read or write them.
pub const RESERVED_PREFIX: &str = "squall/";

/// The longest key the store takes from a function, the HTTP API or a replication override.
pub const MAX_KEY_BYTES: usize = 1024;

/// The namespace everything belongs to until namespaces can be created.
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
