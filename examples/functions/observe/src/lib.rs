//! `observe`: the probe of the consistency checker. Its input is text: a first line naming
//! store keys (separated by spaces), then the observations of earlier steps. It reads each
//! key (as bytes; a missing key reads as `-`) and answers with its input plus one line per
//! key, `key=value`. Chained into a DAG, the sink's output is every read of the run, in
//! order, so a checker can tell whether a run saw two versions of one key.
//!
//! A name of the form `key~N` is read only by the step that has N steps before it. A name of
//! the form `key@N=value` is a write, not a read: that step writes `value` to `key` (before
//! its reads) and reports `key:=value`. Each step ends its report with a `--` line. A fan-in step gets
//! its inputs' texts and keeps the first one's key line.
//!
//! A causal value (written by causal calls) is reported with its version:
//! `key=value|clock|dependencies`, the clock as `writer.counter` pairs joined by `+`, the
//! dependencies as `key:clock` joined by `;`. A write in a causal call is reported the same
//! way, with the version it made.

use squall_sdk::lattices::{Dependencies, LatticeValue, VectorClock};

fn clock_text(clock: &VectorClock) -> String {
    let pairs: Vec<String> = clock.iter().map(|(w, c)| format!("{w}.{c}")).collect();
    pairs.join("+")
}

/// The text of a value read: its bytes, plus the version of a causal value.
fn value_text(value: Option<LatticeValue>) -> Result<String, String> {
    match value {
        None => Ok("-".into()),
        Some(LatticeValue::Lww(register)) => Ok(String::from_utf8_lossy(&register.value).into()),
        Some(LatticeValue::MultiCausal(register)) => {
            let first = register
                .values()
                .next()
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_else(|| "-".into());
            let dependencies: Dependencies = register.dependencies();
            let dependencies: Vec<String> = dependencies
                .iter()
                .map(|(key, clock)| format!("{key}:{}", clock_text(clock)))
                .collect();
            Ok(format!(
                "{first}|{}|{}",
                clock_text(&register.clock()),
                dependencies.join(";")
            ))
        }
        Some(other) => Err(format!(
            "observe reads lww and multi-causal keys, not {}",
            other.lattice_type()
        )),
    }
}

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
    let mut lines = first.lines();
    let names: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // Steps before this one: each ends its report with a `--` line.
    let step = lines.filter(|l| *l == "--").count();
    // Plain names are read at every step; `key~N` only at step N.
    let reads: Vec<&str> = names
        .iter()
        .filter(|n| !n.contains('@'))
        .filter_map(|n| match n.split_once('~') {
            None => Some(*n),
            Some((key, at)) => (at.parse::<usize>() == Ok(step)).then_some(key),
        })
        .collect();
    for name in names.iter().filter(|n| n.contains('@')) {
        let (key, rest) = name.split_once('@').unwrap_or((name, ""));
        let (at, value) = rest
            .split_once('=')
            .ok_or_else(|| format!("a write is `key@STEP=value`, not {name:?}"))?;
        let at: usize = squall_sdk::text(at.as_bytes())?;
        if at == step {
            squall_sdk::state::put_bytes(key, value.as_bytes()).map_err(|e| e.to_string())?;
            // A causal write is reported with the version it made (what the run now reads).
            let version = match squall_sdk::state::get(key).map_err(|e| e.to_string())? {
                Some(causal @ LatticeValue::MultiCausal(_)) => value_text(Some(causal))?,
                _ => value.to_string(),
            };
            output.extend_from_slice(format!("{key}:={version}\n").as_bytes());
        }
    }
    for key in reads {
        let value = squall_sdk::state::get(key).map_err(|e| e.to_string())?;
        output.extend_from_slice(format!("{key}={}\n", value_text(value)?).as_bytes());
    }
    output.extend_from_slice(b"--\n");
    Ok(output)
}

squall_sdk::handler!(handle);
