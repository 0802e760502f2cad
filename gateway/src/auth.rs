//! Who may do what: the role each request needs ([`required_role`]) and the check of the
//! bearer key it carries ([`KeyCheck`]).
//!
//! A gateway started without `--token` is open, as a development gateway on loopback is. With
//! one, every request but `GET /healthz` needs `Authorization: Bearer ...` with either the
//! token (the bootstrap key: [`Role::Admin`], from which the other keys are made) or an API
//! key (see [`squall_state::api_keys`]) whose role is at least the one the request needs; a
//! key too weak for the request is refused with 403, a missing, unknown, expired or revoked
//! one with 401.
//!
//! An `admin` key (and the token) acts in every namespace; any other key acts only in the
//! namespace it was made for: a request it makes to another is refused with 403 before any
//! handler runs, whatever it names.
//!
//! # Cost and revocation
//! Each gateway with a token keeps every key's record in memory, read again from the store
//! (one listing) every [`REFRESH_EVERY`] by a task of its own ([`KeyCheck::keep_fresh`]), so
//! a check costs a SHA-256 of the secret and a map lookup, and a key revoked through any
//! gateway stops working on every gateway within that time after its write. A key not in the
//! copy (made a moment ago elsewhere, or forged) makes the check read the keys again, one
//! reading at a time for the whole gateway, so forged keys cost the store at most one listing
//! in flight. A copy older than [`STALE_AFTER`] (the store did not answer) is not trusted: a
//! check then reads the store itself, and answers 503 if it cannot, rather than admit a key
//! that may have been revoked. Keys are cluster-wide: a gateway without a token
//! cannot make them (403), since one made there would work on every gateway.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use axum::http::Method;
use squall_state::api_keys::{
    digest, equal_in_constant_time, parse_key, ApiKeyRecord, ApiKeys, Refusal, Role,
};

/// How often the keys are read again.
pub const REFRESH_EVERY: Duration = Duration::from_millis(500);

/// How old a copy of the keys may be and still be trusted.
pub const STALE_AFTER: Duration = Duration::from_secs(2);

/// The role a request with `method` on `path` needs; `None`: none (the liveness probe).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" {
        return None;
    }
    if path == "/v1/keys"
        || path.starts_with("/v1/keys/")
        || path == "/v1/audit"
        || path == "/v1/namespaces"
        || path.starts_with("/v1/namespaces/")
    {
        return Some(Role::Admin);
    }
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Some(Role::Read);
    }
    let invoking = (*method == Method::POST && path.ends_with("/invoke"))
        || (*method == Method::POST
            && path.starts_with("/v1/triggers/")
            && path.ends_with("/fire"))
        || (*method == Method::DELETE && path.starts_with("/v1/calls/"))
        || path.starts_with("/v1/kv/");
    Some(if invoking { Role::Invoke } else { Role::Deploy })
}

/// What a presented bearer key is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let in with this role, as `by`: the key's id, or `token` for the bootstrap token.
    Admitted {
        /// What it may do.
        role: Role,
        /// Who it is, as the audit trail names it.
        by: String,
        /// The namespace it acts in; `None`: every namespace (the token and admin keys,
        /// which manage namespaces).
        namespace: Option<String>,
    },
    /// Refused, and why (said to the client in general terms only).
    Refused(Refusal),
}

/// The keys as last read: when, and every record by id.
type Snapshot = (Instant, HashMap<String, ApiKeyRecord>);

/// Checks bearer keys against the bootstrap token and the store's API keys. One per gateway.
pub struct KeyCheck {
    keys: ApiKeys,
    /// The bootstrap token's digest, taken once.
    token: Option<[u8; 32]>,
    snapshot: RwLock<Option<Snapshot>>,
    /// One reading of the store at a time, however many checks find the copy stale.
    reading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for KeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCheck").finish_non_exhaustive()
    }
}

impl KeyCheck {
    /// Checks keys kept by `keys`, and `token` (the bootstrap key) if given.
    pub fn new(keys: ApiKeys, token: Option<&str>) -> Self {
        Self {
            keys,
            token: token.map(|t| digest(t.as_bytes())),
            snapshot: RwLock::default(),
            reading: tokio::sync::Mutex::default(),
        }
    }

    /// Reads the keys again every [`REFRESH_EVERY`], for as long as the runtime runs. Call
    /// once, inside it.
    pub fn keep_fresh(self: &Arc<Self>) {
        let check = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = check.reload(None).await {
                    tracing::warn!(cause = %e, "reading API keys");
                }
                tokio::time::sleep(REFRESH_EVERY).await;
            }
        });
    }

    /// The keys it checks against.
    pub fn keys(&self) -> &ApiKeys {
        &self.keys
    }

    /// The verdict on `presented` (the bearer credential).
    pub async fn check(&self, presented: &str) -> Result<Verdict, squall_state::Error> {
        if let Some(token) = &self.token {
            if equal_in_constant_time(&digest(presented.as_bytes()), token) {
                return Ok(Verdict::Admitted {
                    role: Role::Admin,
                    by: "token".into(),
                    namespace: None,
                });
            }
        }
        let Some((id, secret)) = parse_key(presented) else {
            return Ok(Verdict::Refused(Refusal::Unknown));
        };
        let record = match self.fresh(id) {
            Some(Some(record)) => Some(record),
            // Not in the copy (a key made a moment ago through another gateway, or no key at
            // all), or no copy to trust: the keys are read again, one reading at a time.
            _ => {
                let asked = Instant::now();
                self.reload(Some(asked)).await?;
                self.fresh(id).flatten()
            }
        };
        let now = squall_lattices::entry::now_ms();
        let Some(record) = record else {
            return Ok(Verdict::Refused(Refusal::Unknown));
        };
        Ok(match record.admits(secret, now) {
            Ok(role) => Verdict::Admitted {
                role,
                by: id.to_string(),
                namespace: (role != Role::Admin).then_some(record.namespace),
            },
            Err(refusal) => Verdict::Refused(refusal),
        })
    }

    /// Key `id`'s record (`Some(None)`: no such key) from a copy young enough to trust;
    /// `None` if there is none.
    fn fresh(&self, id: &str) -> Option<Option<ApiKeyRecord>> {
        let snapshot = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
        let (at, records) = snapshot.as_ref()?;
        (at.elapsed() < STALE_AFTER).then(|| records.get(id).cloned())
    }

    /// Reads every key from the store, unless a reading that started at or after `unless_since`
    /// has already landed (a check that found the copy stale waits for one reading, not one
    /// each).
    async fn reload(&self, unless_since: Option<Instant>) -> Result<(), squall_state::Error> {
        let _reading = self.reading.lock().await;
        if let Some(since) = unless_since {
            let snapshot = self.snapshot.read().unwrap_or_else(|p| p.into_inner());
            if snapshot.as_ref().is_some_and(|(at, _)| *at >= since) {
                return Ok(());
            }
        }
        let started = Instant::now();
        let records = self.keys.list().await?;
        let records = records.into_iter().map(|r| (r.id.clone(), r)).collect();
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Some((started, records));
        Ok(())
    }

    /// Takes `record` (just made or revoked through this gateway) into the copy at once.
    pub fn learn(&self, record: ApiKeyRecord) {
        let mut snapshot = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        if let Some((_, records)) = snapshot.as_mut() {
            records.insert(record.id.clone(), record);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_needs_the_weakest_role_that_does_it() {
        let cases = [
            (Method::GET, "/healthz", None),
            (Method::GET, "/metrics", Some(Role::Read)),
            (Method::GET, "/v1/kv/users/1", Some(Role::Read)),
            (Method::GET, "/v1/activations", Some(Role::Read)),
            (Method::GET, "/v1/keys", Some(Role::Admin)),
            (Method::POST, "/v1/keys", Some(Role::Admin)),
            (Method::DELETE, "/v1/keys/0123", Some(Role::Admin)),
            (Method::POST, "/v1/functions/f/invoke", Some(Role::Invoke)),
            (Method::POST, "/v1/dags/d/invoke", Some(Role::Invoke)),
            (Method::POST, "/v1/triggers/t/fire", Some(Role::Invoke)),
            (Method::DELETE, "/v1/calls/abc", Some(Role::Invoke)),
            (Method::PUT, "/v1/kv/users/1", Some(Role::Invoke)),
            (Method::DELETE, "/v1/kv/users/1", Some(Role::Invoke)),
            (Method::PUT, "/v1/functions/f", Some(Role::Deploy)),
            (Method::DELETE, "/v1/functions/f", Some(Role::Deploy)),
            (Method::PUT, "/v1/dags/d", Some(Role::Deploy)),
            (Method::PUT, "/v1/triggers/t", Some(Role::Deploy)),
            (Method::POST, "/v1/triggers/t/pause", Some(Role::Deploy)),
            (Method::PUT, "/v1/functions/f/retries", Some(Role::Deploy)),
            (
                Method::POST,
                "/v1/dead-letters/function/f/redrive",
                Some(Role::Deploy),
            ),
            // A function named `invoke` is registered, not called.
            (Method::PUT, "/v1/functions/invoke", Some(Role::Deploy)),
            // Unknown paths need a key too (and then answer 404).
            (Method::POST, "/v1/nowhere", Some(Role::Deploy)),
            (Method::GET, "/v1/keysmith", Some(Role::Read)),
            // Namespaces are the admin's, listing them included.
            (Method::GET, "/v1/namespaces", Some(Role::Admin)),
            (Method::POST, "/v1/namespaces", Some(Role::Admin)),
            (Method::DELETE, "/v1/namespaces/a", Some(Role::Admin)),
        ];
        for (method, path, role) in cases {
            assert_eq!(required_role(&method, path), role, "{method} {path}");
        }
    }
}
