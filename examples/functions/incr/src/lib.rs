//! `incr`: adds one to a number written in text ("3" -> "4").

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let n: i64 = squall_sdk::text(input)?;
    let out = n.checked_add(1).ok_or("overflow")?;
    Ok(out.to_string().into_bytes())
}

squall_sdk::handler!(handle);
