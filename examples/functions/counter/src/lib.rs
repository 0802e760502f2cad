//! `counter`: input `KEY` or `KEY DELTA`; adds DELTA (default 1) to the counter KEY in the
//! store and answers with the counter's value after the write.

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(input).map_err(|e| format!("input is not UTF-8: {e}"))?;
    let mut words = text.split_whitespace();
    let key = words.next().ok_or("expected `KEY [DELTA]`")?;
    let delta: i64 = match words.next() {
        Some(d) => squall_sdk::text(d.as_bytes())?,
        None => 1,
    };
    let value = squall_sdk::state::add(key, delta).map_err(|e| e.to_string())?;
    squall_sdk::log::debug(&format!("{key} is now {value}"));
    Ok(value.to_string().into_bytes())
}

squall_sdk::handler!(handle);
