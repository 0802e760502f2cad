//! Leases in the store: which one of several gateways does a piece of upkeep (delivering
//! the change feed, trimming activation records) for a while.
//!
//! A lease is a last-writer-wins register holding its owner and until when it holds. A
//! gateway takes it if it is free, expired or its own, then reads it back: of two gateways
//! that wrote at once, the later write stands and both read it, so at most one believes it
//! holds the lease, except when a holder's renewal and another's take-over land within one
//! store round trip of the expiry (the work a lease guards must tolerate that rarely).

use bytes::Bytes;
use squall_lattices::{LatticeValue, Lww, Timestamp};

use crate::pool::ClientPool;
use crate::Result;

/// Takes or renews the lease under `key` for `owner` until `lease_ms` from now; whether
/// `owner` holds it.
pub async fn take(kvs: &ClientPool, key: &str, owner: &str, lease_ms: u64) -> Result<bool> {
    let read = key.to_string();
    let now = squall_lattices::entry::now_ms();
    let held = kvs.with(move |client| client.get(&read)).await?;
    if let Some(LatticeValue::Lww(lease)) = &held {
        let (holder, until) = parse(&lease.value);
        if holder != owner && until > now {
            return Ok(false);
        }
    }
    let value = LatticeValue::Lww(Lww::new(
        Timestamp::now(0),
        Bytes::from(format!("{owner}\n{}", now + lease_ms)),
    ));
    let write = key.to_string();
    kvs.with(move |client| client.put(&write, value)).await?;
    let confirm = key.to_string();
    let confirmed = kvs.with(move |client| client.get(&confirm)).await?;
    Ok(matches!(confirmed, Some(LatticeValue::Lww(lease)) if parse(&lease.value).0 == owner))
}

/// A lease's owner and expiry (ms since the Unix epoch); an unreadable one is expired.
fn parse(value: &[u8]) -> (String, u64) {
    let text = String::from_utf8_lossy(value);
    let (owner, until) = text.split_once('\n').unwrap_or(("", "0"));
    (owner.to_string(), until.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_reads_back_its_owner_and_expiry_and_garbage_is_expired() {
        assert_eq!(parse(b"gw-1\n1700"), ("gw-1".to_string(), 1700));
        assert_eq!(parse(b"gw-1\nsoon"), ("gw-1".to_string(), 0));
        assert_eq!(parse(b"\xff\xfe"), (String::new(), 0));
        assert_eq!(parse(b""), (String::new(), 0));
    }
}
