//! `join`: a fan-in step. Takes the outputs of its predecessors in a DAG (in the order of the
//! DAG's edges) and joins them with commas: inputs "4" and "9" -> "4,9".

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let parts = squall_sdk::inputs(input)?;
    Ok(parts.join(&b","[..]))
}

squall_sdk::handler!(handle);
