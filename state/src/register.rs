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
