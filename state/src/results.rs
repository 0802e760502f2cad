//! Results of asynchronous calls, kept in the store under [`squall_proto::keys::result`] so that
//! any gateway can answer for any call and a restarted scheduler loses none.
//!
//! A result key is an LWW register whose timestamp is the attempt's number and the outcome's
//! rank ([`CallResult::rank`]): within an attempt a finished outcome always beats `Running`,
//! whatever order the writes arrive in, and a later attempt's outcome (a retry's, a redriven
//! call's) beats an earlier one's.
//!
//! Results expire after their last write, [`RESULT_RETENTION`] unless the writer is given
//! another (the gateway keeps them as long as activation records), and the store reaps them
//! and reclaims their space, as Lambda's and OpenWhisk's results of asynchronous calls do.

use std::time::Duration;

use squall_lattices::{LatticeValue, Lww, Timestamp, Write};
use squall_proto::call::CallResult;

use crate::pool::ClientPool;

/// How long an asynchronous call's result is kept after its last write.
pub const RESULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The write of attempt `attempt`'s outcome of an asynchronous call (see the module docs),
/// expiring after `retention`.
pub fn result_write(
    key: &str,
    result: &CallResult,
    attempt: u32,
    retention: Duration,
) -> Result<Write, String> {
    let encoded = result
        .encode()
        .map_err(|e| format!("encoding the result of {key}: {e}"))?;
    let at = Timestamp::new(u64::from(attempt) * 4 + result.rank(), rand::random());
    Ok(Write::expiring(
        LatticeValue::Lww(Lww::new(at, encoded.into())),
        at,
        Some(retention),
    ))
}

/// Writes an asynchronous call's outcome to its result key (see [`CallResult::rank`]).
pub async fn store_result(kvs: &ClientPool, key: &str, result: CallResult) -> Result<(), String> {
    let write = result_write(key, &result, 1, RESULT_RETENTION)?;
    let key = key.to_string();
    let results = kvs
        .with(move |client| client.write_many(vec![(key, write)]))
        .await
        .map_err(|e| format!("writing the result: {e}"))?;
    match results.into_iter().next() {
        Some(Ok(())) => Ok(()),
        Some(Err(e)) => Err(format!("writing the result: {e}")),
        None => Err("writing the result: no answer for the key".into()),
    }
}
