//! Results of asynchronous calls, kept in the store under [`squall_proto::keys::result`] so that
//! any gateway can answer for any call and a restarted scheduler loses none.
//!
//! A result key is an LWW register whose timestamp is the outcome's rank
//! ([`CallResult::rank`]): a finished outcome always beats `Running`, whatever order the writes
//! arrive in.

use squall_lattices::{LatticeValue, Lww, Timestamp};
use squall_proto::call::CallResult;

use crate::pool::ClientPool;

/// Writes an asynchronous call's outcome to its result key (see [`CallResult::rank`]).
pub async fn store_result(kvs: &ClientPool, key: &str, result: CallResult) -> Result<(), String> {
    let encoded = result.encode().map_err(|e| e.to_string())?;
    let value = LatticeValue::Lww(Lww::new(
        Timestamp::new(result.rank(), rand::random()),
        encoded.into(),
    ));
    let key = key.to_string();
    kvs.with(move |client| client.put(&key, value))
        .await
        .map_err(|e| format!("writing the result: {e}"))
}
