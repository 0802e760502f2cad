//! Durable asynchronous calls end to end: retries by policy with every attempt recorded,
//! dead letters and their redrive, cancels, idempotency keys, accepted calls that survive a
//! SIGKILL of `squall up`, and concurrency limits.

use std::time::Duration;

use serde_json::Value;
use squall_executor::testing::guest;
use squall_proto::poll::Poll;

use crate::support::{self, http, http_with, Answer, NodeProcess};

pub(crate) const TOKEN: &str = "a-test-token-of-32-characters-ok";
const WAIT: Duration = Duration::from_secs(90);

pub(crate) fn register_misbehave(base: &str) {
    let registered = http(
        "PUT",
        &format!("{base}/v1/functions/misbehave"),
        Some(TOKEN),
        &guest("misbehave"),
    );
    assert_eq!(registered.status, 201, "{}", registered.text());
}

fn set_retries(base: &str, policy: &str) -> Answer {
    http(
        "PUT",
        &format!("{base}/v1/functions/misbehave/retries"),
        Some(TOKEN),
        policy.as_bytes(),
    )
}

fn call_async(base: &str, input: &str) -> String {
    let accepted = http(
        "POST",
        &format!("{base}/v1/functions/misbehave/invoke?async=true"),
        Some(TOKEN),
        input.as_bytes(),
    );
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    accepted.json()["id"].as_str().expect("an id").to_string()
}

/// The call's result once it has one (not 202).
fn finished(base: &str, id: &str) -> Answer {
    Poll::within(WAIT)
        .every(Duration::from_millis(20))
        .until(|| {
            let result = http("GET", &format!("{base}/v1/results/{id}"), Some(TOKEN), b"");
            (result.status != 202).then_some(result)
        })
        .expect("the call never finished")
}

/// The activation record `id` once `done` holds of it.
fn record_when(base: &str, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let last = std::cell::RefCell::new(Value::Null);
    Poll::within(WAIT)
        .until(|| {
            let answer = http(
                "GET",
                &format!("{base}/v1/activations/{id}"),
                Some(TOKEN),
                b"",
            );
            let record = (answer.status == 200).then(|| answer.json())?;
            last.replace(record.clone());
            done(&record).then_some(record)
        })
        .unwrap_or_else(|e| panic!("the record never got there ({e:?}): {}", last.borrow()))
}

pub(crate) fn dead_letters(base: &str) -> Vec<Value> {
    support::listed(
        base,
        "/v1/dead-letters/function/misbehave",
        "dead_letters",
        TOKEN,
    )
}

fn errors(record: &Value) -> Vec<Option<String>> {
    record["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| a["error"]["code"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn failed_calls_retry_by_policy_then_go_to_dead_letters_that_redrive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    register_misbehave(&base);

    // Policies: checked, and only for registered functions.
    let default = http(
        "GET",
        &format!("{base}/v1/functions/misbehave/retries"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(default.json()["max_retries"], 0, "{}", default.text());
    for bad in [
        r#"{"max_retries":-1}"#,
        r#"{"max_retries":1000}"#,
        r#"{"backoff_ms":0}"#,
        r#"{"retries":2}"#,
        "not json",
    ] {
        assert_eq!(set_retries(&base, bad).status, 400, "{bad}");
    }
    let unknown = http(
        "PUT",
        &format!("{base}/v1/functions/nobody/retries"),
        Some(TOKEN),
        br#"{"max_retries":1}"#,
    );
    assert_eq!(unknown.status, 404, "{}", unknown.text());
    let set = set_retries(&base, r#"{"max_retries":2,"backoff_ms":20}"#);
    assert_eq!(set.status, 200, "{}", set.text());
    assert_eq!(set.json()["max_retries"], 2);

    // Failing its first two attempts, it succeeds on the third; the record has all three.
    let id = call_async(&base, "flaky:retry/a:3");
    let result = finished(&base, &id);
    assert_eq!((result.status, result.text()), (200, "3".to_string()));
    let record = record_when(&base, &id, |r| r["status"] == "succeeded");
    assert_eq!(record["attempt"], 3, "{record}");
    assert_eq!(
        errors(&record),
        vec![
            Some("function_failed".to_string()),
            Some("function_failed".to_string()),
            None
        ]
    );

    // Failing every attempt, it ends in the dead letters, failed, after three attempts.
    let doomed = call_async(&base, "flaky:retry/b:5");
    let result = finished(&base, &doomed);
    assert_eq!(result.status, 500, "{}", result.text());
    assert_eq!(result.error_code(), "function_failed");
    let letters = dead_letters(&base);
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["id"], doomed.as_str());
    assert_eq!(letters[0]["attempts"].as_array().map(Vec::len), Some(3));
    let record = record_when(&base, &doomed, |r| r["status"] == "failed");
    assert_eq!(errors(&record).len(), 3, "{record}");

    // Redriven, it gets its retries again: attempt 4 fails, attempt 5 succeeds.
    let redriven = http(
        "POST",
        &format!("{base}/v1/dead-letters/function/misbehave/{doomed}/redrive"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(redriven.status, 202, "{}", redriven.text());
    let record = record_when(&base, &doomed, |r| r["status"] == "succeeded");
    assert_eq!(record["attempt"], 5, "{record}");
    assert_eq!(record["cause"], "redrive");
    assert_eq!(finished(&base, &doomed).text(), "5");
    assert!(dead_letters(&base).is_empty());

    // A permanent failure (no such function) is not retried: one attempt, then its own
    // dead letters.
    let nobody = http(
        "POST",
        &format!("{base}/v1/functions/nobody/invoke?async=true"),
        Some(TOKEN),
        b"x",
    );
    assert_eq!(nobody.status, 202, "{}", nobody.text());
    let nobody = nobody.json()["id"].as_str().expect("an id").to_string();
    assert_eq!(finished(&base, &nobody).status, 404);
    let letters = http(
        "GET",
        &format!("{base}/v1/dead-letters/function/nobody"),
        Some(TOKEN),
        b"",
    )
    .json();
    assert_eq!(
        letters["dead_letters"][0]["attempts"]
            .as_array()
            .map(Vec::len),
        Some(1),
        "{letters}"
    );

    // The function's own errors are retried; dead letters are deleted one by one or all.
    let unknown_request = call_async(&base, "no-such-verb");
    assert_eq!(finished(&base, &unknown_request).status, 500);
    let second = call_async(&base, "fail");
    assert_eq!(finished(&base, &second).status, 500);
    let letters = dead_letters(&base);
    assert_eq!(letters.len(), 2);
    assert!(letters
        .iter()
        .all(|l| l["attempts"].as_array().map(Vec::len) == Some(3)));
    let one = http(
        "DELETE",
        &format!("{base}/v1/dead-letters/function/misbehave/{second}"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(one.status, 204, "{}", one.text());
    let all = http(
        "DELETE",
        &format!("{base}/v1/dead-letters/function/misbehave"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(all.json()["count"], 1, "{}", all.text());
    assert!(dead_letters(&base).is_empty());
    assert_eq!(
        http(
            "GET",
            &format!("{base}/v1/dead-letters/function/misbehave"),
            None,
            b""
        )
        .status,
        401,
        "dead letters name calls: reading them needs the token"
    );

    // A call waiting for its retry is cancelled: no attempt follows, the result says so.
    assert_eq!(
        set_retries(
            &base,
            r#"{"max_retries":5,"backoff_ms":600000,"max_backoff_ms":600000}"#
        )
        .status,
        200
    );
    let waiting = call_async(&base, "fail");
    record_when(&base, &waiting, |r| {
        r["attempts"].as_array().is_some_and(|a| a.len() == 1)
    });
    let cancel = http(
        "DELETE",
        &format!("{base}/v1/calls/{waiting}"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(cancel.status, 204, "{}", cancel.text());
    let result = finished(&base, &waiting);
    assert_eq!(
        (result.status, result.error_code()),
        (410, "cancelled".to_string())
    );
    assert_eq!(
        http(
            "DELETE",
            &format!("{base}/v1/calls/{waiting}"),
            Some(TOKEN),
            b""
        )
        .status,
        404
    );
    assert!(dead_letters(&base).is_empty());

    // A call waiting for its first attempt (here, for a slot under a concurrency limit of
    // one) is cancelled: it never runs.
    assert_eq!(
        http(
            "PUT",
            &format!("{base}/v1/functions/misbehave/concurrency"),
            Some(TOKEN),
            br#"{"max_concurrency":1}"#,
        )
        .status,
        200
    );
    let busy = call_async(&base, "sleep:1500");
    let queued = call_async(&base, "flaky:cancel/queued:1");
    let cancel = http(
        "DELETE",
        &format!("{base}/v1/calls/{queued}"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(cancel.status, 204, "{}", cancel.text());
    assert_eq!(finished(&base, &busy).status, 200);
    assert_eq!(finished(&base, &queued).status, 410);
    let ran = http(
        "POST",
        &format!("{base}/v1/functions/misbehave/invoke"),
        Some(TOKEN),
        b"flaky:cancel/queued:1",
    );
    assert_eq!(ran.text(), "1", "the cancelled call never ran");
}

#[test]
fn an_idempotency_key_runs_a_call_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    register_misbehave(&base);
    let invoke = |query: &str, key: &str| {
        http_with(
            "POST",
            &format!("{base}/v1/functions/misbehave/invoke{query}"),
            Some(TOKEN),
            &[("Idempotency-Key", key)],
            b"flaky:idem/runs:1",
        )
    };

    // Synchronous: the repeat answers the first call's output and id, without running.
    let first = invoke("", "order-1");
    assert_eq!((first.status, first.text()), (200, "1".to_string()));
    assert!(!first.replay);
    let again = invoke("", "order-1");
    assert_eq!((again.status, again.text()), (200, "1".to_string()));
    assert!(again.replay);
    assert_eq!(again.activation, first.activation);
    // Another key runs it again.
    assert_eq!(invoke("", "order-2").text(), "2");

    // Asynchronous: the repeat answers the first call's id.
    let accepted = invoke("?async=true", "order-3");
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let repeat = invoke("?async=true", "order-3");
    assert_eq!((repeat.status, repeat.replay), (202, true));
    assert_eq!(repeat.json()["id"], accepted.json()["id"]);
    let id = accepted.json()["id"].as_str().expect("an id").to_string();
    assert_eq!(finished(&base, &id).text(), "3");
    let record = record_when(&base, &id, |r| r["status"] == "succeeded");
    assert_eq!(record["idempotency_key"], "order-3");
    // The function ran three times in all (order-1, order-2, order-3).
    assert_eq!(invoke("", "order-4").text(), "4");

    for bad in ["has space", &"k".repeat(300)] {
        let refused = invoke("", bad);
        assert_eq!(refused.status, 400, "{bad}: {}", refused.text());
    }
}

#[test]
fn a_concurrency_limit_refuses_synchronous_calls_over_it_and_queues_asynchronous_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    register_misbehave(&base);
    let limit = |name: &str, body: &str| {
        http(
            "PUT",
            &format!("{base}/v1/functions/{name}/concurrency"),
            Some(TOKEN),
            body.as_bytes(),
        )
    };
    for bad in [
        r#"{"max_concurrency":0}"#,
        r#"{"max_concurrency":-1}"#,
        r#"{"max_concurrency":1000000}"#,
        r#"{}"#,
    ] {
        assert_eq!(limit("misbehave", bad).status, 400, "{bad}");
    }
    assert_eq!(limit("nobody", r#"{"max_concurrency":1}"#).status, 404);
    let set = limit("misbehave", r#"{"max_concurrency":2}"#);
    assert_eq!(set.status, 200, "{}", set.text());

    // Five at once, each sleeping 1.5 s: two run, three are refused with Retry-After.
    let start = std::sync::Arc::new(std::sync::Barrier::new(5));
    let callers: Vec<_> = (0..5)
        .map(|_| {
            let (base, start) = (base.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                http(
                    "POST",
                    &format!("{base}/v1/functions/misbehave/invoke"),
                    Some(TOKEN),
                    b"sleep:1500",
                )
            })
        })
        .collect();
    let mut answers: Vec<Answer> = callers
        .into_iter()
        .map(|c| c.join().expect("a caller"))
        .collect();
    answers.sort_by_key(|a| a.status);
    let statuses: Vec<u16> = answers.iter().map(|a| a.status).collect();
    assert_eq!(statuses, vec![200, 200, 429, 429, 429]);
    assert_eq!(answers[4].error_code(), "too_many_requests");
    assert_eq!(answers[4].retry_after.as_deref(), Some("1"));
    // A refused call has an id and a record too, as has one refused for a bad header.
    let refused = record_when(&base, &answers[4].activation, |r| r["status"] == "failed");
    assert_eq!(refused["error"]["code"], "too_many_requests", "{refused}");
    let bad = support::http_with(
        "POST",
        &format!("{base}/v1/functions/misbehave/invoke"),
        Some(TOKEN),
        &[("squall-consistency", "eventually")],
        b"ok",
    );
    assert_eq!(bad.status, 400, "{}", bad.text());
    let refused = record_when(&base, &bad.activation, |r| r["status"] == "failed");
    assert_eq!(refused["error"]["code"], "bad_request", "{refused}");
    assert_eq!(refused["name"], "misbehave", "{refused}");

    // Asynchronous calls wait for a slot, without counting attempts: one at a time, four
    // calls all succeed, and no two run at once.
    assert_eq!(limit("misbehave", r#"{"max_concurrency":1}"#).status, 200);
    let ids: Vec<String> = (0..4).map(|_| call_async(&base, "sleep:200")).collect();
    let mut runs: Vec<(u64, u64)> = ids
        .iter()
        .map(|id| {
            assert_eq!(finished(&base, id).status, 200);
            let record = record_when(&base, id, |r| r["status"] == "succeeded");
            let attempts = record["attempts"].as_array().expect("attempts").clone();
            assert_eq!(attempts.len(), 1, "{record}");
            let start = attempts[0]["start_ms"].as_u64().expect("a start");
            let took = attempts[0]["duration_us"].as_u64().expect("a duration") / 1000;
            (start, start + took)
        })
        .collect();
    runs.sort();
    for pair in runs.windows(2) {
        // Milliseconds are rounded down: one of slack.
        assert!(pair[1].0 + 1 >= pair[0].1, "two calls overlapped: {runs:?}");
    }
    let lifted = http(
        "DELETE",
        &format!("{base}/v1/functions/misbehave/concurrency"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(lifted.status, 204);
    assert_eq!(
        http(
            "GET",
            &format!("{base}/v1/functions/misbehave/concurrency"),
            Some(TOKEN),
            b""
        )
        .status,
        404
    );
}

/// `squall up` on a data directory, with this gateway id, executors running `capacity`
/// steps at once.
fn up_on(data: &std::path::Path, log_dir: &std::path::Path, capacity: &str) -> NodeProcess {
    up_on_data(data, log_dir, "0", capacity)
}

/// `squall up` on a data directory, its store on `kvs_port` (0: any), with a fixed gateway
/// id, executors running `capacity` steps at once.
pub(crate) fn up_on_data(
    data: &std::path::Path,
    log_dir: &std::path::Path,
    kvs_port: &str,
    capacity: &str,
) -> NodeProcess {
    let data = data.to_str().expect("a UTF-8 path");
    NodeProcess::spawn(
        log_dir,
        &[
            "up",
            "--data-dir",
            data,
            "--http-port",
            "0",
            "--kvs-port",
            kvs_port,
            "--scheduler-port",
            "0",
            "--gateway-id",
            "gateway-under-test",
            "--capacity",
            capacity,
            "--token",
            TOKEN,
        ],
    )
}

#[test]
fn accepted_async_calls_survive_a_sigkill_and_all_complete() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut up = up_on(&data, dir.path(), "2");
    let base = up.field("http");
    register_misbehave(&base);
    // 100 ms each on an executor that takes two at a time before it counts as busy: most of
    // the thousand are still waiting at the kill. Each counts its runs under a key of its own.
    let ids: Vec<String> = (0..1000)
        .map(|i| call_async(&base, &format!("tally:sigkill/{i}:100")))
        .collect();
    let last = ids.last().expect("calls");
    assert_eq!(
        http(
            "GET",
            &format!("{base}/v1/results/{last}"),
            Some(TOKEN),
            b""
        )
        .status,
        202,
        "calls are still waiting when the node is killed"
    );
    up.kill_hard();

    let up = up_on(&data, dir.path(), "64");
    let base = up.field("http");
    // Every call ran, at least once and at most twice: a call runs again only if the kill
    // came while it ran (its outcome unwritten), and a runner runs at most MAX_RUNNING at once.
    let mut twice = 0;
    for id in &ids {
        let result = finished(&base, id);
        assert_eq!(result.status, 200, "call {id}: {}", result.text());
        match result.text().as_str() {
            "1" => {}
            "2" => twice += 1,
            other => panic!("call {id} ran {other} times"),
        }
    }
    assert!(
        twice <= squall_gateway::runner::MAX_RUNNING,
        "{twice} calls ran twice"
    );
    eprintln!(
        "{twice} of the {} calls were running at the kill and ran again",
        ids.len()
    );
}

#[test]
fn a_stopping_gateway_writes_its_last_calls_records_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let mut up = up_on(&data, dir.path(), "4");
    let base = up.field("http");
    register_misbehave(&base);
    let ids: Vec<String> = (0..20)
        .map(|_| {
            let answer = http(
                "POST",
                &format!("{base}/v1/functions/misbehave/invoke"),
                Some(TOKEN),
                b"ok",
            );
            assert_eq!(answer.status, 200, "{}", answer.text());
            answer.activation
        })
        .collect();
    // Stopped at once after the last answer, before the record writer's linger is over.
    up.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        up.wait_exit(Duration::from_secs(30)).is_some(),
        "squall up did not stop"
    );
    let up = up_on(&data, dir.path(), "4");
    let base = up.field("http");
    for id in &ids {
        let record = http(
            "GET",
            &format!("{base}/v1/activations/{id}"),
            Some(TOKEN),
            b"",
        );
        assert_eq!(record.status, 200, "record {id}: {}", record.text());
    }
}

#[test]
fn a_function_learns_which_attempt_it_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    register_misbehave(&base);
    // Synchronous calls are attempt 1.
    let sync = http(
        "POST",
        &format!("{base}/v1/functions/misbehave/invoke"),
        Some(TOKEN),
        b"upto:1",
    );
    assert_eq!(sync.text(), "1");
    let set = set_retries(&base, r#"{"max_retries":3,"backoff_ms":50}"#);
    assert_eq!(set.status, 200, "{}", set.text());
    // Fails on attempts 1 and 2, answers on the third: the guest saw each attempt's number.
    let id = call_async(&base, "upto:3");
    let result = finished(&base, &id);
    assert_eq!((result.status, result.text().as_str()), (200, "3"));
}

/// The bytes the store at `kvs` holds, over its shards.
fn store_bytes(kvs: &str) -> u64 {
    squall_kvs::Client::connect(kvs, squall_kvs::ClientConfig::default())
        .expect("a store client")
        .stats()
        .expect("the shards' reports")
        .iter()
        .map(|report| report.bytes)
        .sum()
}

/// Ids of `misbehave`'s records, newest first (one page).
fn record_ids(base: &str) -> Vec<String> {
    support::listed(
        base,
        "/v1/activations?function=misbehave&limit=200",
        "activations",
        TOKEN,
    )
    .iter()
    .map(|r| r["id"].as_str().expect("an id").to_string())
    .collect()
}

/// A synchronous call of `misbehave` that logs and prints 20 lines each (a record of over
/// 1 KiB); its activation id.
fn chatty_call(base: &str) -> String {
    let answer = http(
        "POST",
        &format!("{base}/v1/functions/misbehave/invoke"),
        Some(TOKEN),
        b"chatty:20",
    );
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.activation
}

#[test]
fn records_and_results_leave_the_store_after_their_retention_and_their_space_comes_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Kept 1.8 s.
    let up = support::up(
        dir.path(),
        &["--token", TOKEN, "--activation-retention-h", "0.0005"],
    );
    let (base, kvs) = (up.field("http"), up.field("kvs"));
    register_misbehave(&base);
    let before = store_bytes(&kvs);
    for _ in 0..40 {
        chatty_call(&base);
    }
    let async_id = call_async(&base, "chatty:20");
    assert_eq!(finished(&base, &async_id).status, 200);
    let peak = Poll::within(WAIT)
        .until(|| {
            let bytes = store_bytes(&kvs);
            (record_ids(&base).len() == 41).then_some(bytes)
        })
        .expect("the records were written");
    assert!(peak > before + 40 * 1000, "{before} -> {peak}");
    // Records and the result expire, and the store gives their space back.
    Poll::within(WAIT)
        .until(|| {
            let result = http(
                "GET",
                &format!("{base}/v1/results/{async_id}"),
                Some(TOKEN),
                b"",
            );
            let gone = record_ids(&base).is_empty() && result.status == 404;
            let bytes = store_bytes(&kvs);
            (gone && bytes.saturating_sub(before) < (peak - before) / 10).then_some(())
        })
        .unwrap_or_else(|_| {
            panic!(
                "still {} records, {} bytes (from {before} to {peak})",
                record_ids(&base).len(),
                store_bytes(&kvs)
            )
        });
}

#[test]
fn records_past_the_byte_cap_go_oldest_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 64 KiB of records.
    let up = support::up(
        dir.path(),
        &["--token", TOKEN, "--activation-retention-mb", "0.0625"],
    );
    let base = up.field("http");
    register_misbehave(&base);
    let mut ids = Vec::new();
    for _ in 0..150 {
        ids.push(chatty_call(&base));
    }
    let record_bytes = |id: &str| {
        let record = http(
            "GET",
            &format!("{base}/v1/activations/{id}"),
            Some(TOKEN),
            b"",
        );
        (record.status == 200).then_some(record.body.len())
    };
    // Each record is over 1 KiB of log lines: 150 of them are well past 64 KiB.
    let newest = ids.last().expect("an id");
    assert!(
        Poll::within(WAIT)
            .until(|| record_bytes(newest))
            .expect("the newest record")
            > 1024
    );
    let kept = Poll::within(WAIT)
        .until(|| {
            let kept = record_ids(&base);
            (kept.len() < 100).then_some(kept)
        })
        .unwrap_or_else(|_| panic!("still {} records", record_ids(&base).len()));
    assert!(!kept.is_empty(), "the newest records stay");
    assert_eq!(&kept[0], newest, "the newest record is kept");
    assert_eq!(record_bytes(&ids[0]), None, "the oldest record is gone");
    // What is kept is about the cap (records as listed are JSON, a little larger than stored).
    let listed: usize = kept.iter().filter_map(|id| record_bytes(id)).sum();
    assert!(listed < 2 * 64 * 1024, "{listed} bytes of records kept");
}
