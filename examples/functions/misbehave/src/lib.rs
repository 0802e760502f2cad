//! `misbehave`: does what its input asks, most of it bad, so Squall's tests can check that an
//! executor survives each case. Inputs:
//! - `ok`: answers `ok`; `echo:TEXT` answers TEXT.
//! - `trap`: panics (a trap).
//! - `loop`: never returns.
//! - `oom`: allocates memory until none is left.
//! - `huge:N`: answers N bytes.
//! - `stack`: recurses until the stack overflows.
//! - `recurse:NAME`: calls the function NAME with the same input, forever.
//! - `print`: writes to stdout and stderr, then answers `printed`.
//! - `state:KEY=VALUE`: writes VALUE to KEY, reads it back, answers it.
//! - `read:KEY`: answers KEY's bytes, `absent` if it has none, or the error (`error: ...`).
//! - `fail`: logs a warning, then returns an error.
//! - `chatty:N`: logs N lines (`log line I`) and prints N lines to stdout (`out line I`),
//!   answers N.
//! - `spin:MS`: computes for MS milliseconds of wall-clock time, answers `spun`.
//! - `upto:N`: fails while its call's attempt is below N, then answers the attempt.
//! - a `kv-change` trigger's event (JSON): adds 1 to the counter `seen/KEY` and the value
//!   written (a last-writer-wins register's text) to the set `seen-values/KEY`, so a test
//!   counts the writes delivered; answers `seen`. For a key under `lat/`, first writes the
//!   wall-clock time it started (µs since the Unix epoch) to `started/KEY`, and nothing else
//!   (the trigger-latency benchmark). For a key under `ord/`, reads the register
//!   `order/KEY`, waits 3 ms, and writes it back with `,VALUE` appended, and nothing else: a
//!   read-modify-write that keeps every value, in order, only if the key's deliveries run
//!   one at a time in order.
//! - `sleep:MS`: sleeps MS milliseconds (a slow function that uses no CPU), answers `slept`.
//! - `flaky:KEY:N`: adds 1 to the counter KEY and fails while the counter is below N (so
//!   under retries, attempt N is the first to succeed), then answers the counter.
//! - `tally:KEY:MS`: adds 1 to the counter KEY, sleeps MS milliseconds, answers the counter
//!   (so a call that ran twice answers 2).
//! - `late:KEY:MS`: writes `1` to `started/KEY`, sleeps MS milliseconds, then writes `late`
//!   to KEY, answers `late`.
//!
//! Children (`squall_sdk::futures`), each of the function `misbehave` of its namespace:
//! - `fanout:N`: starts N children `echo:I` (at most 64 running: past that it awaits the
//!   oldest first), awaits them all, answers their outputs joined by `,` in the order
//!   started. `sequential:N` makes the same N calls one after another (`squall_sdk::call`,
//!   on its own executor), for comparison.
//! - `race`: starts `sleep:20000` and `echo:fast`, answers the first to finish (`fast`); the
//!   other is cancelled when dropped.
//! - `orphan:KEY`: starts `late:KEY:3000`, waits until it has started (`started/KEY`), then
//!   fails without awaiting it (the child must be cancelled: KEY is never written).
//!   `abandon:KEY` does the same but answers `left`.
//! - `child-of:NAME`: starts function NAME on `ok` and answers its output, or `error: ...`.
//! - `descend`: starts a child `descend` and answers what it answers: children without end,
//!   until the call depth refuses one (`error: ...`).
//! - `twice`: awaits one child twice (through the raw bindings), answers the second error.

use std::hint::black_box;

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let text = std::str::from_utf8(input).map_err(|e| e.to_string())?;
    if text.starts_with('{') {
        return seen(text);
    }
    let (verb, arg) = text.split_once(':').unwrap_or((text, ""));
    match verb {
        "ok" => Ok(b"ok".to_vec()),
        "echo" => Ok(arg.as_bytes().to_vec()),
        "trap" => panic!("asked to trap"),
        "loop" => {
            let mut i: u64 = 0;
            loop {
                i = black_box(i.wrapping_add(1));
            }
        }
        "oom" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                black_box(&hoard);
            }
        }
        "huge" => {
            let n: usize = arg.parse().map_err(|e| format!("bad size: {e}"))?;
            Ok(vec![b'x'; n])
        }
        "stack" => Ok(deep(black_box(0)).to_string().into_bytes()),
        "recurse" => squall_sdk::call(arg, input).map_err(|e| e.to_string()),
        "print" => {
            println!("hello from stdout");
            eprintln!("hello from stderr");
            Ok(b"printed".to_vec())
        }
        "state" => {
            let (key, value) = arg.split_once('=').ok_or("expected state:KEY=VALUE")?;
            squall_sdk::state::put_bytes(key, value.as_bytes()).map_err(|e| e.to_string())?;
            let read = squall_sdk::state::get_bytes(key).map_err(|e| e.to_string())?;
            read.ok_or_else(|| "written value not found".to_string())
        }
        "read" => Ok(match squall_sdk::state::get_bytes(arg) {
            Ok(Some(value)) => value,
            Ok(None) => b"absent".to_vec(),
            Err(e) => format!("error: {e}").into_bytes(),
        }),
        "fail" => {
            squall_sdk::log::warn("about to fail");
            Err("asked to fail".into())
        }
        "chatty" => {
            let n: u32 = arg.parse().map_err(|e| format!("bad count: {e}"))?;
            for i in 0..n {
                squall_sdk::log::info(&format!("log line {i}"));
                println!("out line {i}");
            }
            Ok(n.to_string().into_bytes())
        }
        "upto" => {
            let wanted: u32 = arg.parse().map_err(|e| format!("bad attempt: {e}"))?;
            let attempt = squall_sdk::attempt();
            if attempt < wanted {
                Err(format!("attempt {attempt} of {wanted}: failing as asked"))
            } else {
                Ok(attempt.to_string().into_bytes())
            }
        }
        "spin" => {
            let ms: u64 = arg.parse().map_err(|e| format!("bad duration: {e}"))?;
            let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            let mut x = 0u64;
            while std::time::Instant::now() < until {
                for i in 0..1000 {
                    x = black_box(x.wrapping_add(i));
                }
            }
            Ok(b"spun".to_vec())
        }
        "sleep" => {
            let ms: u64 = arg.parse().map_err(|e| format!("bad duration: {e}"))?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(b"slept".to_vec())
        }
        "flaky" => {
            let (key, wanted) = arg.rsplit_once(':').ok_or("expected flaky:KEY:N")?;
            let wanted: i64 = wanted.parse().map_err(|e| format!("bad count: {e}"))?;
            let runs = squall_sdk::state::add(key, 1).map_err(|e| e.to_string())?;
            if runs < wanted {
                Err(format!("run {runs} of {wanted}: failing as asked"))
            } else {
                Ok(runs.to_string().into_bytes())
            }
        }
        "tally" => {
            let (key, ms) = arg.rsplit_once(':').ok_or("expected tally:KEY:MS")?;
            let ms: u64 = ms.parse().map_err(|e| format!("bad duration: {e}"))?;
            let runs = squall_sdk::state::add(key, 1).map_err(|e| e.to_string())?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            Ok(runs.to_string().into_bytes())
        }
        "late" => {
            let (key, ms) = arg.rsplit_once(':').ok_or("expected late:KEY:MS")?;
            let ms: u64 = ms.parse().map_err(|e| format!("bad duration: {e}"))?;
            squall_sdk::state::put_bytes(&format!("started/{key}"), b"1")
                .map_err(|e| e.to_string())?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            squall_sdk::state::put_bytes(key, b"late").map_err(|e| e.to_string())?;
            Ok(b"late".to_vec())
        }
        "fanout" => {
            let n: usize = arg.parse().map_err(|e| format!("bad count: {e}"))?;
            // At most 64 children run at once: past that, the oldest is awaited first.
            let mut running = std::collections::VecDeque::new();
            let mut outputs = Vec::with_capacity(n);
            for i in 0..n {
                if running.len() == 64 {
                    if let Some(oldest) = running.pop_front() {
                        let oldest: squall_sdk::futures::Child = oldest;
                        outputs.push(oldest.wait().map_err(|e| e.to_string())?);
                    }
                }
                let input = format!("echo:{i}");
                running.push_back(
                    squall_sdk::futures::start("misbehave", input.as_bytes())
                        .map_err(|e| e.to_string())?,
                );
            }
            for child in running {
                outputs.push(child.wait().map_err(|e| e.to_string())?);
            }
            let outputs: Vec<String> = outputs
                .into_iter()
                .map(|o| String::from_utf8_lossy(&o).into_owned())
                .collect();
            Ok(outputs.join(",").into_bytes())
        }
        "sequential" => {
            let n: usize = arg.parse().map_err(|e| format!("bad count: {e}"))?;
            let mut outputs = Vec::with_capacity(n);
            for i in 0..n {
                let output = squall_sdk::call("misbehave", format!("echo:{i}").as_bytes())
                    .map_err(|e| e.to_string())?;
                outputs.push(String::from_utf8_lossy(&output).into_owned());
            }
            Ok(outputs.join(",").into_bytes())
        }
        "race" => {
            let mut children = vec![
                squall_sdk::futures::start("misbehave", b"sleep:20000")
                    .map_err(|e| e.to_string())?,
                squall_sdk::futures::start("misbehave", b"echo:fast").map_err(|e| e.to_string())?,
            ];
            squall_sdk::futures::wait_any(&mut children).map_err(|e| e.to_string())
        }
        "orphan" | "abandon" => {
            let child =
                squall_sdk::futures::start("misbehave", format!("late:{arg}:3000").as_bytes())
                    .map_err(|e| e.to_string())?;
            let started = format!("started/{arg}");
            for _ in 0..500 {
                if squall_sdk::state::get_bytes(&started)
                    .map_err(|e| e.to_string())?
                    .is_some()
                {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // Not awaited, not dropped here: the call's end is what must cancel it.
            std::mem::forget(child);
            if verb == "orphan" {
                Err("failing with a child still running".into())
            } else {
                Ok(b"left".to_vec())
            }
        }
        "descend" => Ok(
            match squall_sdk::futures::start("misbehave", b"descend").and_then(|c| c.wait()) {
                Ok(output) => output,
                Err(e) => format!("error: {e}").into_bytes(),
            },
        ),
        "child-of" => Ok(
            match squall_sdk::futures::start(arg, b"ok").and_then(|c| c.wait()) {
                Ok(output) => output,
                Err(e) => format!("error: {e}").into_bytes(),
            },
        ),
        "twice" => {
            use squall_sdk::bindings::squall::compose::futures as raw;
            let child = raw::start("misbehave", b"echo:once").map_err(|e| format!("{e:?}"))?;
            raw::wait(child).map_err(|e| format!("{e:?}"))?;
            match raw::wait(child) {
                Ok(_) => Err("a child was awaited twice".into()),
                Err(e) => Ok(format!("{e:?}").into_bytes()),
            }
        }
        other => Err(format!("unknown request {other:?}")),
    }
}

/// Counts a `kv-change` event (its fields in serde_json's sorted order, values without quotes
/// inside: what Squall's tests write).
fn seen(event: &str) -> Result<Vec<u8>, String> {
    let field = |start: &str| -> Option<&str> {
        let from = event.find(start)? + start.len();
        let len = event[from..].find('"')?;
        Some(&event[from..from + len])
    };
    let key = field("\"key\":\"").ok_or("an event without a key")?;
    if key.starts_with("lat/") {
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_micros();
        squall_sdk::state::put_bytes(&format!("started/{key}"), started.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        return Ok(b"started".to_vec());
    }
    if key.starts_with("ord/") {
        let written = field("\"written\":{\"type\":\"lww\",\"value\":\"").unwrap_or("?");
        let order = format!("order/{key}");
        let mut so_far = squall_sdk::state::get_bytes(&order)
            .map_err(|e| e.to_string())?
            .unwrap_or_default();
        std::thread::sleep(std::time::Duration::from_millis(3));
        so_far.extend_from_slice(format!(",{written}").as_bytes());
        squall_sdk::state::put_bytes(&order, &so_far).map_err(|e| e.to_string())?;
        return Ok(b"ordered".to_vec());
    }
    squall_sdk::state::add(&format!("seen/{key}"), 1).map_err(|e| e.to_string())?;
    if let Some(written) = field("\"written\":{\"type\":\"lww\",\"value\":\"") {
        let value = squall_sdk::lattices::LatticeValue::Set(
            std::iter::once(written.as_bytes().to_vec().into()).collect(),
        );
        squall_sdk::state::merge(&format!("seen-values/{key}"), &value)
            .map_err(|e| e.to_string())?;
    }
    Ok(b"seen".to_vec())
}

#[allow(unconditional_recursion)] // on purpose: it recurses until the stack overflows
fn deep(n: u64) -> u64 {
    let frame = black_box([n; 64]);
    deep(frame[3] + 1) + frame[7]
}

squall_sdk::handler!(handle);
