//! API keys: who may do what through the gateway.
//!
//! A key is `sqk_{id}_{secret}`: a public id (16 hex digits, what listings and revocations
//! name) and a secret (64 hex digits: 256 bits from `rand`'s thread generator, a ChaCha
//! stream cipher seeded and reseeded from the operating system).
//! The store keeps a record per id under [`squall_proto::keys::api_key`]: its name, its
//! [`Role`], its namespace, when it was made, when it expires and whether it was revoked, and
//! the SHA-256 of its secret, never the secret itself: the key is shown once, when made. A
//! presented key is checked by hashing its secret and comparing the hash with the record's in
//! time independent of where they differ ([`ApiKeyRecord::admits`]).
//!
//! Roles are ordered, each allowing what the ones before it allow: [`Role::Read`] (list, get,
//! results, activations, logs, metrics), [`Role::Invoke`] (call, fire a trigger, cancel a
//! call, write and delete keys of `/v1/kv`), [`Role::Deploy`] (register and delete functions, models, DAGs,
//! triggers and their policies, redrive dead letters), [`Role::Admin`] (make, list and revoke
//! keys). Every key belongs to a namespace (`default` until namespaces can be made).
//!
//! # Cost
//! Making a key is one record write, revoking one a read and two writes' worth (the write and
//! its read back); each gateway keeps a copy of every record, read again every half second
//! (see `squall_gateway::auth`), so checking a key costs a hash of 64 bytes and a map lookup.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use squall_lattices::Timestamp;
use squall_proto::keys;

use crate::pool::ClientPool;
use crate::registry::sha256_hex;
use crate::{Error, Result};

/// What a key may do; each role allows what the roles before it allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read: list, get, results, activations, logs, metrics.
    Read,
    /// Also call functions and DAGs, fire triggers, cancel calls, write `/v1/kv`.
    Invoke,
    /// Also register and delete functions, models, DAGs and triggers, set policies, redrive.
    Deploy,
    /// Also make, list and revoke keys.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 4] = [Role::Read, Role::Invoke, Role::Deploy, Role::Admin];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Invoke => "invoke",
            Role::Deploy => "deploy",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| format!("no role {text:?}: read, invoke, deploy or admin"))
    }
}

/// What the store keeps of a key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Its public id.
    pub id: String,
    /// What it is for, as its maker named it.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// The namespace it acts in.
    pub namespace: String,
    /// When it was made (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it stops working, if ever (ms since the Unix epoch).
    pub expires_ms: Option<u64>,
    /// When it was revoked, if it was (ms since the Unix epoch).
    pub revoked_ms: Option<u64>,
    /// The SHA-256 of its secret, hex.
    pub secret_sha256: String,
}

/// Why a presented key is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a key of this form, no such id, or the wrong secret.
    Unknown,
    /// Past its expiry.
    Expired,
    /// Revoked.
    Revoked,
}

impl ApiKeyRecord {
    /// The role `secret` (the part after the id) is let in with at `now_ms`, or why not.
    pub fn admits(&self, secret: &str, now_ms: u64) -> std::result::Result<Role, Refusal> {
        let given = sha256_hex(secret.as_bytes());
        if !equal_in_constant_time(given.as_bytes(), self.secret_sha256.as_bytes()) {
            return Err(Refusal::Unknown);
        }
        if self.revoked_ms.is_some() {
            return Err(Refusal::Revoked);
        }
        if self.expires_ms.is_some_and(|at| at <= now_ms) {
            return Err(Refusal::Expired);
        }
        Ok(self.role)
    }
}

/// A key just made: its record and the key itself, which is shown this once.
#[derive(Debug, Clone)]
pub struct IssuedKey {
    /// What the store keeps.
    pub record: ApiKeyRecord,
    /// `sqk_{id}_{secret}`.
    pub key: String,
}

/// The prefix of every key.
pub const KEY_PREFIX: &str = "sqk_";

/// The id and secret of `key`, if it has the form of one (lowercase hex, as made).
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (is_id(id) && is_hex(secret, 64)).then_some((id, secret))
}

/// Whether `id` has the form of a key's id: 16 lowercase hex digits.
pub fn is_id(id: &str) -> bool {
    is_hex(id, 16)
}

fn is_hex(text: &str, len: usize) -> bool {
    text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Whether `a` and `b` are equal, in time independent of where they differ (their lengths
/// may show: compare digests, whose length is public).
pub fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The SHA-256 digest of `secret`: what secrets are compared by, so that neither where they
/// differ nor their lengths show.
pub fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::fill(&mut buffer[..]);
    buffer.iter().map(|b| format!("{b:02x}")).collect()
}

/// The API keys in the store. Cheap to clone.
#[derive(Clone)]
pub struct ApiKeys {
    kvs: ClientPool,
    writer: u64,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeys").finish_non_exhaustive()
    }
}

impl ApiKeys {
    /// The keys in the store behind `kvs`.
    pub fn new(kvs: ClientPool) -> Self {
        Self {
            kvs,
            writer: rand::random(),
        }
    }

    /// Makes a key named `name` with `role` in `namespace`, expiring at `expires_ms` if
    /// given.
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        namespace: &str,
        expires_ms: Option<u64>,
    ) -> Result<IssuedKey> {
        let id = random_hex(8);
        let secret = random_hex(32);
        let record = ApiKeyRecord {
            id: id.clone(),
            name: name.to_string(),
            role,
            namespace: namespace.to_string(),
            created_ms: squall_lattices::entry::now_ms(),
            expires_ms,
            revoked_ms: None,
            secret_sha256: sha256_hex(secret.as_bytes()),
        };
        self.put(&record).await?;
        Ok(IssuedKey {
            record,
            key: format!("{KEY_PREFIX}{id}_{secret}"),
        })
    }

    /// The record of key `id`.
    pub async fn get(&self, id: &str) -> Result<Option<ApiKeyRecord>> {
        crate::register::get(&self.kvs, keys::api_key(id)).await
    }

    /// Every key's record (revoked and expired ones included).
    pub async fn list(&self) -> Result<Vec<ApiKeyRecord>> {
        crate::register::list(&self.kvs, &keys::api_key("")).await
    }

    /// Revokes key `id`: its record, revoked, or `None` if there is no such key.
    ///
    /// The revoked record is stamped later than the record it replaces, whatever this
    /// gateway's clock says (a clock behind the one that made the key would otherwise stamp
    /// it earlier, and the store would keep the key working), then read back: an error if
    /// the store does not hold it revoked.
    pub async fn revoke(&self, id: &str) -> Result<Option<ApiKeyRecord>> {
        let key = keys::api_key(id);
        let read = key.clone();
        let Some(value) = self.kvs.with(move |client| client.get(&read)).await? else {
            return Ok(None);
        };
        let stored = match &value {
            squall_lattices::LatticeValue::Lww(register) => register.timestamp,
            _ => Timestamp::new(0, 0),
        };
        let Some(mut record) = crate::register::decode::<ApiKeyRecord>(&key, value) else {
            return Ok(None);
        };
        if record.revoked_ms.is_some() {
            return Ok(Some(record));
        }
        record.revoked_ms = Some(squall_lattices::entry::now_ms());
        let now = Timestamp::now(self.writer);
        let at = Timestamp::new(now.time.max(stored.time.saturating_add(1)), self.writer);
        crate::register::put(&self.kvs, key, &record, at).await?;
        match self.get(id).await? {
            Some(held) if held.revoked_ms.is_some() => Ok(Some(held)),
            _ => Err(Error::Internal(format!(
                "key {id}'s revocation did not take in the store"
            ))),
        }
    }

    async fn put(&self, record: &ApiKeyRecord) -> Result<()> {
        let at = Timestamp::now(self.writer);
        crate::register::put(&self.kvs, keys::api_key(&record.id), record, at).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(secret: &str) -> ApiKeyRecord {
        ApiKeyRecord {
            id: "0123456789abcdef".into(),
            name: "ci".into(),
            role: Role::Deploy,
            namespace: "default".into(),
            created_ms: 1,
            expires_ms: Some(1_000),
            revoked_ms: None,
            secret_sha256: sha256_hex(secret.as_bytes()),
        }
    }

    #[test]
    fn a_key_admits_its_own_secret_until_it_expires_or_is_revoked() {
        let secret = "ab".repeat(32);
        let key = record(&secret);
        assert_eq!(key.admits(&secret, 999), Ok(Role::Deploy));
        assert_eq!(key.admits(&"cd".repeat(32), 999), Err(Refusal::Unknown));
        assert_eq!(key.admits("", 999), Err(Refusal::Unknown));
        assert_eq!(key.admits(&secret, 1_000), Err(Refusal::Expired));
        let revoked = ApiKeyRecord {
            revoked_ms: Some(5),
            ..key.clone()
        };
        assert_eq!(revoked.admits(&secret, 10), Err(Refusal::Revoked));
        // A wrong secret is told apart from nothing else, revoked or not.
        assert_eq!(revoked.admits("x", 10), Err(Refusal::Unknown));
    }

    #[test]
    fn keys_parse_only_in_their_own_form() {
        let (id, secret) = ("0123456789abcdef", "f".repeat(64));
        let key = format!("sqk_{id}_{secret}");
        assert_eq!(parse_key(&key), Some((id, secret.as_str())));
        for bad in [
            "",
            "sqk_",
            "sqk__",
            &format!("sqk_{id}"),
            &format!("sqk_{id}_{}", "f".repeat(63)),
            &format!("sqk_{id}_{}g", "f".repeat(63)),
            &format!("sqk_{id}x_{secret}"),
            &format!("SQK_{id}_{secret}"),
            &format!("sqk_{}_{secret}", id.to_uppercase()),
            &format!("sqk_{id}_{secret}_"),
        ] {
            assert_eq!(parse_key(bad), None, "{bad}");
        }
        // Made keys parse, and differ.
        let (a, b) = (random_hex(32), random_hex(32));
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn roles_are_ordered_and_read_back_from_their_names() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
        assert!(Role::Read < Role::Invoke && Role::Invoke < Role::Deploy);
        assert!(Role::Deploy < Role::Admin);
        assert!("root".parse::<Role>().is_err());
    }
}
