//! The audit trail: who did what, when, to the platform itself (keys made and revoked,
//! functions, models, DAGs and triggers registered, changed or deleted, retry policies and
//! limits set, dead letters redriven or dropped).
//!
//! One entry per administrative request a gateway let in ([`audited`]), written to the store
//! before the request's answer leaves, so an action that was answered has its entry (a
//! gateway killed between the action and its entry loses that entry, which it never
//! answered). Calls, reads and writes of `/v1/kv` are not administrative: activation records
//! cover calls. Entries live under [`keys::audit`], with ids that sort newest first (as
//! activation ids do), and expire after the gateway's retention ([`DEFAULT_RETENTION`]: 90
//! days).
//!
//! An entry names the key that acted by its id (`token` for the gateway's bootstrap token,
//! `open` on a gateway without one), never by its secret.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use squall_lattices::Timestamp;
use squall_proto::keys;

use crate::activations::ActivationId;
use crate::pool::ClientPool;
use crate::Result;

/// How long entries are kept unless the gateway is told otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(90 * 24 * 3600);

/// The most entries one listing answers.
pub const MAX_PAGE: u32 = 500;

/// Whether a request with `method` is administrative given the role it needs (`deploy` or
/// `admin` to change something): those get an entry.
pub fn audited(method: &str, needs: crate::api_keys::Role) -> bool {
    !matches!(method, "GET" | "HEAD" | "OPTIONS") && needs >= crate::api_keys::Role::Deploy
}

/// The longest path an entry keeps (longer ones are cut, and say so).
pub const MAX_PATH: usize = 1024;

/// `path` as an entry keeps it: at most [`MAX_PATH`] bytes, and a segment that is a whole API
/// key (a secret sent where an id belongs, as in `DELETE /v1/keys/sqk_..._...`) cut to its id,
/// so no entry ever holds a secret.
pub fn recorded_path(path: &str) -> String {
    let mut kept: String = path
        .split('/')
        .map(|segment| match crate::api_keys::parse_key(segment) {
            Some((id, _)) => format!("sqk_{id}_…"),
            None if segment.starts_with("sqk_") && segment.len() > 20 => {
                format!("{}…", segment.chars().take(20).collect::<String>())
            }
            None => segment.to_string(),
        })
        .collect::<Vec<_>>()
        .join("/");
    if kept.len() > MAX_PATH {
        let mut end = MAX_PATH;
        while !kept.is_char_boundary(end) {
            end -= 1;
        }
        kept.truncate(end);
        kept.push('…');
    }
    kept
}

/// One administrative request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Its id: newest sorts first.
    pub id: String,
    /// When it was answered, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Who: the API key's id, `token` (the gateway's bootstrap token) or `open` (a gateway
    /// without a token).
    pub by: String,
    /// The role it acted with.
    pub role: String,
    /// The HTTP method.
    pub method: String,
    /// The path, without its query.
    pub path: String,
    /// The answer's status code.
    pub status: u16,
    /// What the path does not say (the id and role of a key made).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The gateway that answered.
    pub gateway: String,
}

/// The audit trail of one namespace. Cheap to clone.
#[derive(Clone)]
pub struct AuditTrail {
    kvs: ClientPool,
    namespace: String,
    retention: Duration,
}

impl std::fmt::Debug for AuditTrail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditTrail")
            .field("namespace", &self.namespace)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl AuditTrail {
    /// The trail of the default namespace, whose entries expire after `retention`.
    pub fn new(kvs: ClientPool, retention: Duration) -> Self {
        Self {
            kvs,
            namespace: keys::DEFAULT_NAMESPACE.to_string(),
            retention,
        }
    }

    /// A new entry's id, for a request answered at `at_us` (µs since the Unix epoch).
    pub fn new_id(at_us: u64) -> String {
        ActivationId::new(at_us).to_string()
    }

    /// Writes `entry`, expiring after the retention.
    pub async fn record(&self, entry: &AuditEntry) -> Result<()> {
        let key = keys::audit(&self.namespace, &entry.id);
        let at = Timestamp::new(entry.at_ms.saturating_mul(1000), rand::random());
        crate::register::put_expiring(&self.kvs, key, entry, at, Some(self.retention)).await
    }

    /// Up to `limit` entries, newest first, after the id `after`; and the id to resume after
    /// if more remain.
    pub async fn list(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<AuditEntry>, Option<String>)> {
        let prefix = keys::audit(&self.namespace, "");
        let after_key = after.map(|id| keys::audit(&self.namespace, id));
        let limit = limit.clamp(1, MAX_PAGE);
        let list_prefix = prefix.clone();
        let (page, next) = self
            .kvs
            .with(move |client| client.list(&list_prefix, after_key.as_deref(), limit))
            .await?;
        let reads = page.clone();
        let values = self.kvs.with(move |client| client.get_many(&reads)).await?;
        let entries: Vec<AuditEntry> = page
            .iter()
            .zip(values)
            .filter_map(|(key, value)| {
                let id = key.strip_prefix(&prefix).unwrap_or(key);
                crate::register::decode(id, value?)
            })
            .collect();
        let resume = next.and_then(|key| key.strip_prefix(&prefix).map(str::to_string));
        Ok((entries, resume))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_keys::Role;

    #[test]
    fn changes_to_the_platform_are_audited_and_calls_and_reads_are_not() {
        assert!(audited("PUT", Role::Deploy));
        assert!(audited("DELETE", Role::Deploy));
        assert!(audited("POST", Role::Admin));
        assert!(!audited("GET", Role::Admin));
        assert!(!audited("POST", Role::Invoke));
        assert!(!audited("GET", Role::Read));
    }

    #[test]
    fn paths_keep_no_secret_and_stay_short() {
        let key = format!("sqk_0123456789abcdef_{}", "a".repeat(64));
        assert_eq!(
            recorded_path(&format!("/v1/keys/{key}")),
            "/v1/keys/sqk_0123456789abcdef_…"
        );
        let odd = format!("/v1/keys/sqk_{}", "b".repeat(80));
        assert_eq!(
            recorded_path(&odd),
            format!("/v1/keys/sqk_{}…", "b".repeat(16))
        );
        assert_eq!(recorded_path("/v1/functions/incr"), "/v1/functions/incr");
        let long = format!("/v1/functions/{}", "é".repeat(2000));
        let kept = recorded_path(&long);
        assert!(kept.len() <= MAX_PATH + '…'.len_utf8() && kept.ends_with('…'));
    }

    #[test]
    fn later_entries_sort_first() {
        let older = AuditTrail::new_id(1_000);
        let newer = AuditTrail::new_id(2_000);
        assert!(newer < older);
    }
}
