//! The HTTP API end to end: `squall up` in one process, and the roles as separate processes
//! (store, scheduler, gateway, two executors), driven over real loopback HTTP with the example
//! guests.

use std::time::{Duration, Instant};

use squall_executor::testing::guest;
use squall_proto::poll::Poll;

use crate::support::{self, http, Answer};

const TOKEN: &str = "a-test-token-of-32-characters-ok";
const WAIT: Duration = Duration::from_secs(60);

fn register(base: &str, name: &str, query: &str) {
    let answer = http(
        "PUT",
        &format!("{base}/v1/functions/{name}{query}"),
        Some(TOKEN),
        &guest(name),
    );
    assert_eq!(answer.status, 201, "register {name}: {}", answer.text());
    assert_eq!(answer.json()["name"], name);
}

fn put_dag(base: &str, name: &str, spec: &str) -> Answer {
    http(
        "PUT",
        &format!("{base}/v1/dags/{name}"),
        Some(TOKEN),
        spec.as_bytes(),
    )
}

/// The activation record `id`, once written (sync calls write it after answering).
fn activation(base: &str, id: &str) -> serde_json::Value {
    assert_eq!(id.len(), 32, "an activation id: {id:?}");
    Poll::within(WAIT)
        .until(|| {
            let answer = http(
                "GET",
                &format!("{base}/v1/activations/{id}"),
                Some(TOKEN),
                b"",
            );
            (answer.status == 200).then(|| answer.json())
        })
        .expect("the activation record")
}

fn invoke(base: &str, path: &str, input: &str) -> Answer {
    http(
        "POST",
        &format!("{base}{path}"),
        Some(TOKEN),
        input.as_bytes(),
    )
}

#[test]
fn up_serves_functions_dags_async_calls_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    for name in ["incr", "square", "join", "misbehave"] {
        register(&base, name, "");
    }
    // The token guards every mutating request. The gateway answers 401 before it reads the
    // body and closes the connection: a large body could meet a closed socket (EPIPE) before
    // the answer is read, so this one is small.
    let refused = http(
        "PUT",
        &format!("{base}/v1/functions/incr"),
        None,
        b"not read",
    );
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error_code(), "unauthorized");
    let wrong = http(
        "POST",
        &format!("{base}/v1/functions/incr/invoke"),
        Some("nope"),
        b"1",
    );
    assert_eq!(wrong.status, 401);

    let created = put_dag(
        &base,
        "sq_incr",
        r#"{"functions":["incr","square"],"edges":[["incr","square"]]}"#,
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let answer = invoke(&base, "/v1/dags/sq_incr/invoke", "3");
    assert_eq!((answer.status, answer.text().as_str()), (200, "16"));
    assert_eq!(answer.placement, "incr@executor-0,square@executor-0");
    assert_eq!(
        invoke(&base, "/v1/functions/incr/invoke", "41").text(),
        "42"
    );

    // Fan-out and fan-in, inputs in edge order.
    let fan = r#"{"functions":["misbehave","incr","square","join"],
        "edges":[["misbehave","incr"],["misbehave","square"],["square","join"],["incr","join"]]}"#;
    assert_eq!(put_dag(&base, "fan", fan).status, 201);
    assert_eq!(invoke(&base, "/v1/dags/fan/invoke", "echo:3").text(), "9,4");

    // Asynchronous: 202 with an id, then the result.
    let accepted = invoke(&base, "/v1/dags/sq_incr/invoke?async=true", "4");
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let id = accepted.json()["id"].as_str().expect("an id").to_string();
    assert_eq!(
        accepted.activation, id,
        "an asynchronous call's id is its activation's"
    );
    let result = Poll::within(WAIT)
        .until(|| {
            let result = http("GET", &format!("{base}/v1/results/{id}"), Some(TOKEN), b"");
            assert!(matches!(result.status, 200 | 202), "{}", result.text());
            (result.status == 200).then_some(result)
        })
        .expect("the asynchronous call never finished");
    assert_eq!(result.text(), "25");
    // The runner writes the record after the result, in its next batch.
    let finished = Poll::within(WAIT)
        .until(|| {
            let record = activation(&base, &id);
            (record["status"] != "running").then_some(record)
        })
        .expect("the record of a finished call");
    assert_eq!(
        (
            finished["status"].as_str(),
            finished["cause"].as_str(),
            finished["kind"].as_str()
        ),
        (Some("succeeded"), Some("http-async"), Some("dag"))
    );
    assert_eq!(
        http(
            "GET",
            &format!("{base}/v1/results/0123abcd"),
            Some(TOKEN),
            b""
        )
        .status,
        404
    );

    // Failures, with fitting codes.
    let missing = invoke(&base, "/v1/functions/nope/invoke", "1");
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "not_found")
    );
    let trap = invoke(&base, "/v1/dags/fan/invoke", "trap");
    assert_eq!((trap.status, trap.error_code().as_str()), (500, "trap"));
    assert_eq!(trap.json()["error"]["step"], "misbehave");

    // Every call has a record, named by its answer's header.
    let ok = invoke(&base, "/v1/functions/incr/invoke", "41");
    let record = activation(&base, &ok.activation);
    assert_eq!(
        (
            record["kind"].as_str(),
            record["name"].as_str(),
            record["status"].as_str(),
            record["cause"].as_str()
        ),
        (
            Some("function"),
            Some("incr"),
            Some("succeeded"),
            Some("http")
        )
    );
    assert_eq!(
        (
            record["input_bytes"].as_u64(),
            record["output_bytes"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert!(record["duration_us"].as_u64().is_some(), "{record}");
    assert_eq!(record["placement"][0][0], "incr");
    let failed = activation(&base, &trap.activation);
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"]["code"], "trap");
    assert_eq!(failed["error"]["step"], "misbehave");
    assert_eq!(
        activation(&base, &missing.activation)["error"]["code"],
        "not_found"
    );
    // Listings are newest first, filtered, paged.
    let listed = Poll::within(WAIT)
        .until(|| {
            let page = http(
                "GET",
                &format!("{base}/v1/activations?function=incr&limit=1"),
                Some(TOKEN),
                b"",
            );
            assert_eq!(page.status, 200, "{}", page.text());
            let page = page.json();
            (page["activations"][0]["id"] == ok.activation.as_str()).then_some(page)
        })
        .expect("the newest incr call is listed first");
    assert!(listed["next"].is_string(), "{listed}");
    let failures = http(
        "GET",
        &format!("{base}/v1/activations?status=failed"),
        Some(TOKEN),
        b"",
    )
    .json();
    assert!(failures["activations"]
        .as_array()
        .expect("a list")
        .iter()
        .all(|r| r["status"] == "failed"));
    for bad in [
        "status=done",
        "limit=0",
        "after=xyz",
        "function=../x",
        "function=incr&dag=sq_incr",
    ] {
        let refused = http(
            "GET",
            &format!("{base}/v1/activations?{bad}"),
            Some(TOKEN),
            b"",
        );
        assert_eq!(refused.status, 400, "{bad}: {}", refused.text());
    }
    // With a token, every request but /healthz needs it, reads included.
    for path in [
        "/v1/activations",
        "/v1/kv/users/1",
        "/v1/functions",
        "/v1/results/0123abcd",
        "/metrics",
        "/v1/openapi.json",
    ] {
        let anonymous = http("GET", &format!("{base}{path}"), None, b"");
        assert_eq!(anonymous.status, 401, "{path}");
        let wrong = http("GET", &format!("{base}{path}"), Some("not-the-token"), b"");
        assert_eq!(wrong.status, 401, "{path}");
    }
    assert_eq!(
        http("GET", &format!("{base}/healthz"), None, b"").status,
        200
    );
    let reserved = http(
        "GET",
        &format!("{base}/v1/kv/squall/ns/default/result/x"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(reserved.status, 400);
    assert_eq!(
        http(
            "GET",
            &format!("{base}/v1/activations/{}", "0".repeat(32)),
            Some(TOKEN),
            b""
        )
        .status,
        404
    );
    for bad in [
        r#"{"functions":["incr","square"],"edges":[["incr","square"],["square","incr"]]}"#,
        r#"{"functions":["incr","nope"],"edges":[["incr","nope"]]}"#,
        r#"{"functions":["incr"],"edges":[["incr","square"]]}"#,
        r#"{"functions":"incr"}"#,
        "not json",
    ] {
        let answer = put_dag(&base, "bad", bad);
        assert_eq!(
            (answer.status, answer.error_code().as_str()),
            (400, "bad_request"),
            "{bad}"
        );
    }
    assert_eq!(
        http("GET", &format!("{base}/v1/dags/bad"), Some(TOKEN), b"").status,
        404
    );
    let huge = vec![b'x'; 65 << 20];
    let too_large = http(
        "POST",
        &format!("{base}/v1/functions/incr/invoke"),
        Some(TOKEN),
        &huge,
    );
    assert_eq!(
        (too_large.status, too_large.error_code().as_str()),
        (413, "too_large")
    );
    let not_wasm = http(
        "PUT",
        &format!("{base}/v1/functions/junk"),
        Some(TOKEN),
        b"junk",
    );
    assert_eq!(
        (not_wasm.status, not_wasm.error_code().as_str()),
        (422, "invalid_component")
    );

    // Listing and deleting.
    let listed = http("GET", &format!("{base}/v1/functions"), Some(TOKEN), b"").json();
    assert_eq!(listed.as_array().map(Vec::len), Some(4), "{listed}");
    assert_eq!(
        http(
            "DELETE",
            &format!("{base}/v1/functions/join"),
            Some(TOKEN),
            b""
        )
        .status,
        204
    );
    assert_eq!(
        http(
            "GET",
            &format!("{base}/v1/functions/join"),
            Some(TOKEN),
            b""
        )
        .status,
        404
    );
    assert_eq!(invoke(&base, "/v1/functions/join/invoke", "").status, 404);
    assert_eq!(
        http("DELETE", &format!("{base}/v1/dags/fan"), Some(TOKEN), b"").status,
        204
    );
    let gone = invoke(&base, "/v1/dags/fan/invoke", "1");
    assert_eq!(gone.status, 404, "{}", gone.text());

    // Keys, health, metrics, the API's own description.
    assert_eq!(
        http("PUT", &format!("{base}/v1/kv/users/1"), Some(TOKEN), b"ada").status,
        204
    );
    assert_eq!(
        http("GET", &format!("{base}/v1/kv/users/1"), Some(TOKEN), b"").text(),
        "ada"
    );
    assert_eq!(
        http("PUT", &format!("{base}/v1/kv/squall/x"), Some(TOKEN), b"1").status,
        400
    );
    assert_eq!(
        http("GET", &format!("{base}/healthz"), None, b"").json()["executors"],
        1
    );
    let metrics = http("GET", &format!("{base}/metrics"), Some(TOKEN), b"").text();
    assert!(
        metrics.contains(
            r#"squall_calls_total{kind="dag",namespace="default",name="sq_incr",outcome="ok"} 1"#
        ),
        "{metrics}"
    );
    let openapi = http("GET", &format!("{base}/v1/openapi.json"), Some(TOKEN), b"").json();
    assert!(openapi["paths"]["/v1/dags/{name}/invoke"]["post"].is_object());
}

#[test]
fn dags_cross_executor_processes_and_a_killed_executor_fails_its_call_early() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut roles = support::roles(
        dir.path(),
        &["--token", TOKEN],
        &[("e1", "incr,misbehave"), ("e2", "square,misbehave")],
    );
    let base = roles.base.clone();
    register(&base, "incr", "");
    register(&base, "square", "");
    register(&base, "misbehave", "?timeout_ms=60000");
    let created = put_dag(
        &base,
        "sq_incr",
        r#"{"functions":["incr","square"],"edges":[["incr","square"]]}"#,
    );
    assert_eq!(created.status, 201, "{}", created.text());
    let answer = invoke(&base, "/v1/dags/sq_incr/invoke", "3");
    assert_eq!((answer.status, answer.text().as_str()), (200, "16"));
    assert_eq!(answer.placement, "incr@e1,square@e2");

    // A call that would run for a minute; kill the executor running it.
    let looping = {
        let base = base.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let answer = invoke(
                &base,
                "/v1/functions/misbehave/invoke?timeout_ms=60000",
                "loop",
            );
            (answer, started.elapsed())
        })
    };
    // The executor running it: the only busy one, seen busy over several heartbeats (100 ms
    // apart), so that a heartbeat sent during the earlier call cannot pass for it.
    let mut seen: Option<(String, Instant)> = None;
    let busy = Poll::within(WAIT).until(|| {
        let listed = http("GET", &format!("{base}/v1/executors"), Some(TOKEN), b"").json();
        let busy: Vec<String> = listed
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["running"].as_u64() > Some(0))
            .map(|e| e["id"].as_str().unwrap_or_default().to_string())
            .collect();
        seen = match (busy.as_slice(), seen.take()) {
            ([one], Some((id, since))) if *one == id => {
                if since.elapsed() >= Duration::from_millis(400) {
                    return Some(id);
                }
                Some((id, since))
            }
            ([one], _) => Some((one.clone(), Instant::now())),
            _ => None,
        };
        None
    });
    let busy = busy.expect("the looping call never started");
    let victim = if busy == "e1" { 0 } else { 1 };
    roles.executors[victim].kill_hard();
    let (answer, took) = looping.join().expect("the caller");
    assert_eq!(
        (answer.status, answer.error_code().as_str()),
        (503, "executor_lost"),
        "{}",
        answer.text()
    );
    assert!(took < Duration::from_secs(30), "failed only after {took:?}");
    let survivor = if victim == 0 { "e2" } else { "e1" };
    let next = invoke(&base, "/v1/functions/misbehave/invoke", "ok");
    assert_eq!((next.status, next.text().as_str()), (200, "ok"));
    assert_eq!(next.placement, format!("misbehave@{survivor}"));
}

/// The steps of record `id` once it is finished (sync records are written after the answer).
fn finished_steps(base: &str, id: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let record = Poll::within(WAIT)
        .until(|| {
            let record = activation(base, id);
            (record["status"] != "running").then_some(record)
        })
        .expect("a finished record");
    let steps = record["steps"].as_array().cloned().unwrap_or_default();
    (record, steps)
}

fn logs_of(base: &str, id: &str) -> serde_json::Value {
    let answer = http(
        "GET",
        &format!("{base}/v1/activations/{id}/logs"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(answer.status, 200, "{}", answer.text());
    answer.json()
}

fn texts(logs: &serde_json::Value) -> Vec<(String, String)> {
    logs["logs"]
        .as_array()
        .expect("lines")
        .iter()
        .map(|l| {
            (
                l["stream"].as_str().unwrap_or("?").to_string(),
                l["text"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

#[test]
fn records_keep_each_steps_logs_cpu_time_and_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    for name in ["incr", "square", "compose", "misbehave"] {
        register(&base, name, "");
    }
    let dag = r#"{"functions":["misbehave","incr"],"edges":[["misbehave","incr"]]}"#;
    assert_eq!(put_dag(&base, "chat", dag).status, 201);

    // Each step of a DAG reports its run; the first step's log lines and stdout are kept.
    let answer = invoke(&base, "/v1/dags/chat/invoke", "chatty:3");
    assert_eq!((answer.status, answer.text().as_str()), (200, "4"));
    let (record, steps) = finished_steps(&base, &answer.activation);
    assert_eq!(record["status"], "succeeded");
    assert_eq!(steps.len(), 2, "{record}");
    for (index, (step, function)) in steps.iter().zip(["misbehave", "incr"]).enumerate() {
        assert_eq!(step["step"], index, "{record}");
        assert_eq!(step["function"], function);
        assert_eq!(step["executor"], "executor-0");
        assert!(step["version"].as_u64() >= Some(1), "{record}");
        assert!(step["memory_bytes"].as_u64() > Some(0), "{record}");
        assert!(step["start_us"].as_u64() > Some(0), "{record}");
    }
    let logs = logs_of(&base, &answer.activation);
    assert_eq!(
        texts(&logs),
        [
            ("info", "log line 0"),
            ("info", "log line 1"),
            ("info", "log line 2"),
            ("stdout", "out line 0"),
            ("stdout", "out line 1"),
            ("stdout", "out line 2"),
        ]
        .map(|(s, t)| (s.to_string(), t.to_string()))
    );
    assert_eq!(logs["dropped"], 0);
    assert_eq!(logs["logs"][0]["function"], "misbehave");

    // Nested calls are in their caller's step, in the order they ended, failures included.
    let composed = invoke(&base, "/v1/functions/compose/invoke", "3");
    assert_eq!(composed.text(), "16");
    let (record, steps) = finished_steps(&base, &composed.activation);
    let calls = steps[0]["calls"].as_array().expect("nested calls");
    let summary: Vec<(&str, &str, u64, u64, u64)> = calls
        .iter()
        .map(|c| {
            (
                c["function"].as_str().expect("function"),
                c["caller"].as_str().expect("caller"),
                c["depth"].as_u64().expect("depth"),
                c["input_bytes"].as_u64().expect("input"),
                c["output_bytes"].as_u64().expect("output"),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [("incr", "compose", 1, 1, 1), ("square", "compose", 1, 1, 2)],
        "{record}"
    );
    assert!(calls
        .iter()
        .all(|c| c["error"].is_null() && c["start_us"].as_u64() > Some(0)));
    let deep = invoke(&base, "/v1/functions/misbehave/invoke", "recurse:misbehave");
    assert_eq!(deep.status, 500, "{}", deep.text());
    let (record, steps) = finished_steps(&base, &deep.activation);
    let calls = steps[0]["calls"].as_array().expect("nested calls");
    assert!(calls.len() >= 8, "{record}");
    assert!(
        calls
            .iter()
            .all(|c| c["function"] == "misbehave" && c["error"].is_string()),
        "{record}"
    );
    // The deepest ended first; the depths count down from there.
    assert!(
        calls[0]["depth"].as_u64() > calls[1]["depth"].as_u64(),
        "{record}"
    );
    assert_eq!(calls.last().expect("a call")["depth"], 1, "{record}");

    // CPU time is CPU, not wall-clock time: a spinning guest spends much of its duration
    // (the machine is shared with other tests: a fraction is asserted), a sleeping one next
    // to nothing.
    let cpu_of = |input: &str| {
        let answer = invoke(&base, "/v1/functions/misbehave/invoke", input);
        assert_eq!(answer.status, 200, "{}", answer.text());
        let (record, steps) = finished_steps(&base, &answer.activation);
        let cpu = steps[0]["cpu_us"].as_u64().expect("cpu_us");
        let duration = steps[0]["duration_us"].as_u64().expect("duration_us");
        (cpu, duration, record)
    };
    let (spun, _, record) = cpu_of("spin:300");
    assert!(spun >= 30_000, "{record}");
    let (slept, duration, record) = cpu_of("sleep:300");
    assert!(duration >= 300_000, "{record}");
    assert!(
        slept * 5 < spun,
        "slept {slept} µs of CPU, spun {spun}: {record}"
    );

    // The memory a call grows is reported.
    let huge = invoke(&base, "/v1/functions/misbehave/invoke", "huge:3000000");
    assert_eq!(huge.status, 200);
    let (record, steps) = finished_steps(&base, &huge.activation);
    assert!(
        steps[0]["memory_growth_bytes"].as_u64() >= Some(3_000_000),
        "{record}"
    );
    assert!(
        steps[0]["memory_bytes"].as_u64() >= Some(3_000_000),
        "{record}"
    );

    // A failing call keeps what it logged before failing.
    let failed = invoke(&base, "/v1/functions/misbehave/invoke", "fail");
    assert_eq!(failed.status, 500, "{}", failed.text());
    let (record, _) = finished_steps(&base, &failed.activation);
    assert_eq!(record["status"], "failed");
    assert_eq!(
        texts(&logs_of(&base, &failed.activation)),
        [("warn".to_string(), "about to fail".to_string())]
    );

    // Logs are bounded per step, and what is left out is counted.
    let chatty = invoke(&base, "/v1/functions/misbehave/invoke", "chatty:400");
    assert_eq!(chatty.text(), "400");
    let (_, _) = finished_steps(&base, &chatty.activation);
    let logs = logs_of(&base, &chatty.activation);
    let kept = logs["logs"].as_array().expect("lines").len();
    assert_eq!(kept, squall_proto::report::MAX_LOG_LINES);
    assert_eq!(logs["dropped"], 800 - kept);

    // An asynchronous call's record has its steps too.
    let accepted = invoke(
        &base,
        "/v1/functions/misbehave/invoke?async=true",
        "chatty:1",
    );
    assert_eq!(accepted.status, 202);
    let (record, _) = finished_steps(&base, &accepted.activation);
    assert_eq!(record["status"], "succeeded", "{record}");
    assert_eq!(
        texts(&logs_of(&base, &accepted.activation)),
        [("info", "log line 0"), ("stdout", "out line 0")]
            .map(|(s, t)| (s.to_string(), t.to_string()))
    );

    // Listings leave the lines out unless asked.
    let page = |query: &str| {
        http(
            "GET",
            &format!("{base}/v1/activations?function=misbehave&limit=1{query}"),
            Some(TOKEN),
            b"",
        )
        .json()
    };
    let bare = page("");
    assert_eq!(bare["activations"][0]["id"], accepted.activation.as_str());
    assert!(bare["activations"][0]["steps"][0]["logs"]
        .as_array()
        .is_some_and(|l| l.is_empty()));
    assert_eq!(
        page("&logs=true")["activations"][0]["steps"][0]["logs"][0]["text"],
        "log line 0"
    );
    assert_eq!(
        http(
            "GET",
            &format!("{base}/v1/activations/{}/logs", "0".repeat(32)),
            Some(TOKEN),
            b""
        )
        .status,
        404
    );

    // The CLI prints them.
    let cli = |args: &[&str]| {
        let output = support::squall()
            .args(args)
            .args(["--gateway", &base, "--token", TOKEN])
            .output()
            .expect("run squall");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let printed = cli(&["activation", "logs", &failed.activation]);
    assert!(
        printed
            .trim_end()
            .ends_with("misbehave  warn: about to fail"),
        "{printed}"
    );
    let printed = cli(&["logs", "misbehave", "--limit", "2"]);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 2 + kept + 1, "{printed}");
    assert!(lines[kept].contains("left out"), "{printed}");
    let expected = format!("{}  misbehave  info: log line 0", accepted.activation);
    assert!(lines[kept + 1].ends_with(&expected), "{printed}");
}
