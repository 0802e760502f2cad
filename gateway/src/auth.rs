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
//! # Cost and revocation
//! Key records are cached per gateway for [`CACHE_FOR`] (unknown ids too, so that garbage keys
//! do not each cost a store read), so a check costs a SHA-256 of the secret and a map lookup,
//! and a key revoked through any gateway stops working on every gateway within that time
//! after the revocation's write. The cache holds at most [`CACHE_MAX`] records; past it, it
//! is emptied.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::http::Method;
use squall_state::api_keys::{parse_key, ApiKeyRecord, ApiKeys, Refusal, Role};

/// How long a key record read from the store is trusted.
pub const CACHE_FOR: Duration = Duration::from_millis(500);

/// The most key records cached at once.
pub const CACHE_MAX: usize = 10_000;

/// The role a request with `method` on `path` needs; `None`: none (the liveness probe).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    if path == "/healthz" {
        return None;
    }
    if path == "/v1/keys" || path.starts_with("/v1/keys/") {
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
    /// Let in with this role; `key` names the API key (`None`: the bootstrap token).
    Admitted {
        /// What it may do.
        role: Role,
        /// The API key's id.
        key: Option<String>,
    },
    /// Refused, and why (said to the client in general terms only).
    Refused(Refusal),
}

/// Checks bearer keys against the bootstrap token and the store's API keys. One per gateway.
pub struct KeyCheck {
    keys: ApiKeys,
    cached: Mutex<HashMap<String, (Instant, Option<ApiKeyRecord>)>>,
}

impl std::fmt::Debug for KeyCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyCheck").finish_non_exhaustive()
    }
}

impl KeyCheck {
    /// Checks keys kept by `keys`.
    pub fn new(keys: ApiKeys) -> Self {
        Self {
            keys,
            cached: Mutex::default(),
        }
    }

    /// The verdict on `presented` (the bearer credential), `token` being the bootstrap token.
    pub async fn check(
        &self,
        presented: &str,
        token: &str,
    ) -> Result<Verdict, squall_state::Error> {
        if same(presented.as_bytes(), token.as_bytes()) {
            return Ok(Verdict::Admitted {
                role: Role::Admin,
                key: None,
            });
        }
        let Some((id, secret)) = parse_key(presented) else {
            return Ok(Verdict::Refused(Refusal::Unknown));
        };
        let record = self.record(id).await?;
        let now = squall_lattices::entry::now_ms();
        Ok(
            match record
                .map(|r| r.admits(secret, now))
                .unwrap_or(Err(Refusal::Unknown))
            {
                Ok(role) => Verdict::Admitted {
                    role,
                    key: Some(id.to_string()),
                },
                Err(refusal) => Verdict::Refused(refusal),
            },
        )
    }

    /// Key `id`'s record, from the cache while fresh, else from the store.
    async fn record(&self, id: &str) -> Result<Option<ApiKeyRecord>, squall_state::Error> {
        {
            let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((at, record)) = cached.get(id) {
                if at.elapsed() < CACHE_FOR {
                    return Ok(record.clone());
                }
            }
        }
        let asked = Instant::now();
        let record = self.keys.get(id).await?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.len() >= CACHE_MAX {
            cached.clear();
        }
        cached.insert(id.to_string(), (asked, record.clone()));
        Ok(record)
    }

    /// Forgets key `id`'s record here (a revocation through this gateway holds at once).
    pub fn forget(&self, id: &str) {
        self.cached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }
}

/// Compares in time independent of where the inputs differ.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
        ];
        for (method, path, role) in cases {
            assert_eq!(required_role(&method, path), role, "{method} {path}");
        }
    }
}
