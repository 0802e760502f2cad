//! Squall's own records in the store: MessagePack (with field names, so fields can be added
//! and skipped) in a last-writer-wins register. Retry policies, pending calls, dead letters,
//! concurrency limits and triggers are kept this way.

use serde::{Deserialize, Serialize};
use squall_lattices::{LatticeValue, Lww, Timestamp};

use crate::{Error, Result};

/// `value` as the register stored under `key`, stamped `at`.
pub fn encode<T: Serialize>(key: &str, value: &T, at: Timestamp) -> Result<LatticeValue> {
    let bytes = rmp_serde::to_vec_named(value).map_err(|e| Error::BadValue {
        key: key.to_string(),
        reason: e.to_string(),
    })?;
    Ok(LatticeValue::Lww(Lww::new(at, bytes.into())))
}

/// Writes `record` under `key` in one round trip, stamped `at`.
pub async fn put<T: Serialize>(
    kvs: &crate::pool::ClientPool,
    key: String,
    record: &T,
    at: Timestamp,
) -> Result<()> {
    put_expiring(kvs, key, record, at, None).await
}

/// Writes `record` under `key` in one round trip, stamped `at`, expiring `after` that long
/// (`None`: never).
pub async fn put_expiring<T: Serialize>(
    kvs: &crate::pool::ClientPool,
    key: String,
    record: &T,
    at: Timestamp,
    after: Option<std::time::Duration>,
) -> Result<()> {
    let value = encode(&key, record, at)?;
    let write = match after {
        Some(after) => squall_lattices::Write::expiring(value, at, Some(after)),
        None => squall_lattices::Write {
            value: Some(value),
            expiry: None,
        },
    };
    let name = key.clone();
    let results = kvs
        .with(move |client| client.write_many(vec![(key, write)]))
        .await?;
    match results.into_iter().next() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(Error::BadValue {
            key: name,
            reason: e.to_string(),
        }),
        None => Err(Error::Internal(format!(
            "no answer for the write of {name}"
        ))),
    }
}

/// The record under `key`, if there is one that decodes.
pub async fn get<T: for<'de> Deserialize<'de>>(
    kvs: &crate::pool::ClientPool,
    key: String,
) -> Result<Option<T>> {
    let read = key.clone();
    let value = kvs.with(move |client| client.get(&read)).await?;
    Ok(value.and_then(|v| decode(&key, v)))
}

/// Every record under keys starting with `prefix` that decodes.
pub async fn list<T: for<'de> Deserialize<'de>>(
    kvs: &crate::pool::ClientPool,
    prefix: &str,
) -> Result<Vec<T>> {
    Ok(kvs
        .entries_with_prefix(prefix)
        .await?
        .into_iter()
        .filter_map(|(key, value)| decode(&key, value))
        .collect())
}

/// The record in the register stored under `key`, or `None` (with a warning) if the value is
/// not a register or does not decode: a bad record is skipped, never fatal.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &str, value: LatticeValue) -> Option<T> {
    let LatticeValue::Lww(register) = value else {
        tracing::warn!(%key, "a record is not a register");
        return None;
    };
    rmp_serde::from_slice(&register.value)
        .map_err(|e| tracing::warn!(%key, cause = %e, "a record does not decode"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_values_are_skipped() {
        let value = encode("k", &vec![1u32, 2], Timestamp::new(1, 2)).expect("encodes");
        assert_eq!(decode::<Vec<u32>>("k", value), Some(vec![1, 2]));
        let garbage = LatticeValue::Lww(Lww::new(Timestamp::new(1, 2), vec![0xc1u8].into()));
        assert_eq!(decode::<Vec<u32>>("k", garbage), None);
        assert_eq!(
            decode::<Vec<u32>>("k", LatticeValue::Max(squall_lattices::Max(3))),
            None
        );
    }
}
