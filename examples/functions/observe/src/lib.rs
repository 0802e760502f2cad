//! `observe`: the probe of the consistency checker. Its input is text: a first line naming
//! store keys (separated by spaces), then the observations of earlier steps. It reads each
//! key (as bytes; a missing key reads as `-`) and answers with its input plus one line per
//! key, `key=value`. Chained into a DAG, the sink's output is every read of the run, in
//! order, so a checker can tell whether a run saw two versions of one key. A fan-in step gets
//! its inputs' texts and keeps the first one's key line.

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    // A fan-in step gets several texts (a MessagePack array); a chain step, one.
    let texts = match squall_sdk::inputs(input) {
        Ok(texts) if !texts.is_empty() => texts,
        _ => vec![input.to_vec()],
    };
    let mut output = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let text = std::str::from_utf8(text).map_err(|e| format!("input is not UTF-8: {e}"))?;
        // The key line once, then every earlier observation.
        let skip = usize::from(i > 0);
        for line in text.lines().skip(skip) {
            output.extend_from_slice(line.as_bytes());
            output.push(b'\n');
        }
    }
    let first = std::str::from_utf8(&texts[0]).map_err(|e| format!("input is not UTF-8: {e}"))?;
    let keys = first.lines().next().unwrap_or_default();
    for key in keys.split_whitespace() {
        let value = squall_sdk::state::get_bytes(key).map_err(|e| e.to_string())?;
        output.extend_from_slice(key.as_bytes());
        output.push(b'=');
        match value {
            Some(bytes) => output.extend_from_slice(&bytes),
            None => output.push(b'-'),
        }
        output.push(b'\n');
    }
    Ok(output)
}

squall_sdk::handler!(handle);
