//! `square`: squares a number written in text ("4" -> "16").

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let n: i64 = squall_sdk::text(input)?;
    let out = n.checked_mul(n).ok_or("overflow")?;
    Ok(out.to_string().into_bytes())
}

squall_sdk::handler!(handle);
