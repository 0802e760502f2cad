//! Cron triggers end to end: bad triggers refused, and a trigger firing every second with two
//! gateways running each tick once.

use std::time::Duration;

use serde_json::Value;
use squall_executor::testing::guest;
use squall_proto::poll::Poll;

use crate::support::{self, http, NodeProcess};

const TOKEN: &str = "s3cret";
const WAIT: Duration = Duration::from_secs(90);

fn put_trigger(base: &str, name: &str, spec: &str) -> crate::support::Answer {
    http(
        "PUT",
        &format!("{base}/v1/triggers/{name}"),
        Some(TOKEN),
        spec.as_bytes(),
    )
}

/// The records of `misbehave`'s calls made by a cron trigger.
fn cron_records(base: &str) -> Vec<Value> {
    let page = http(
        "GET",
        &format!("{base}/v1/activations?function=misbehave&limit=200"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(page.status, 200, "{}", page.text());
    page.json()["activations"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["cause"].as_str().is_some_and(|c| c.starts_with("cron")))
        .cloned()
        .collect()
}

#[test]
fn a_cron_trigger_with_two_gateways_runs_each_tick_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let second = NodeProcess::spawn(
        dir.path(),
        &[
            "gateway",
            "--http-port",
            "0",
            "--kvs",
            &up.field("kvs"),
            "--scheduler",
            &up.field("scheduler"),
            "--token",
            TOKEN,
        ],
    );
    let other = second.field("http");
    let registered = http(
        "PUT",
        &format!("{base}/v1/functions/misbehave"),
        Some(TOKEN),
        &guest("misbehave"),
    );
    assert_eq!(registered.status, 201, "{}", registered.text());

    for bad in [
        r#"{"kind":"kv-change","schedule":"* * * * *","function":"misbehave"}"#,
        r#"{"kind":"cron","schedule":"61 * * * *","function":"misbehave"}"#,
        r#"{"kind":"cron","schedule":"every minute","function":"misbehave"}"#,
        r#"{"kind":"cron","schedule":"* * * * *","function":"nobody"}"#,
        r#"{"kind":"cron","schedule":"* * * * *","function":"misbehave","dag":"d"}"#,
        r#"{"kind":"cron","schedule":"* * * * *","function":"misbehave","when":"now"}"#,
    ] {
        let refused = put_trigger(&base, "bad", bad);
        assert_eq!(refused.status, 400, "{bad}: {}", refused.text());
    }
    assert_eq!(
        http("GET", &format!("{base}/v1/triggers/bad"), Some(TOKEN), b"").status,
        404,
        "a refused trigger is not stored"
    );
    assert_eq!(
        http("GET", &format!("{base}/v1/triggers"), None, b"").status,
        401,
        "triggers name calls: reading them needs the token"
    );

    // Every second, through the other gateway: each run counts itself and answers the count.
    let created = put_trigger(
        &other,
        "every-second",
        r#"{"kind":"cron","schedule":"* * * * * *","function":"misbehave","input":"flaky:cron/runs:1"}"#,
    );
    assert_eq!(created.status, 200, "{}", created.text());
    assert!(created.json()["next_ms"].is_u64());
    Poll::within(WAIT)
        .until(|| (cron_records(&base).len() >= 4).then_some(()))
        .expect("four ticks fired");
    let paused = http(
        "POST",
        &format!("{base}/v1/triggers/every-second/pause"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(paused.json()["paused"], true, "{}", paused.text());

    // Once the last ticks have run, every tick ran once: the function ran as many times as
    // there are ticks' records, and the counts its runs answered are 1, 2, ..., n.
    let (counts, runs) = Poll::within(WAIT)
        .until(|| {
            let records = cron_records(&base);
            if records.iter().any(|r| r["status"] != "succeeded") {
                return None;
            }
            let runs: u64 = http("GET", &format!("{base}/v1/kv/cron/runs"), None, b"")
                .text()
                .parse()
                .ok()?;
            if runs != records.len() as u64 {
                return None;
            }
            let mut counts: Vec<u64> = records
                .iter()
                .map(|r| {
                    let id = r["id"].as_str().expect("an id");
                    let result = http("GET", &format!("{base}/v1/results/{id}"), None, b"");
                    result.text().parse().expect("a count")
                })
                .collect();
            counts.sort_unstable();
            Some((counts, runs))
        })
        .expect("every tick ran once (runs and records never agreed)");
    let expected: Vec<u64> = (1..=runs).collect();
    assert_eq!(counts, expected);

    // Manual firing, and deleting the function pauses the trigger with the reason.
    let fired = http(
        "POST",
        &format!("{base}/v1/triggers/every-second/fire"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(fired.status, 202, "{}", fired.text());
    assert_eq!(
        http(
            "POST",
            &format!("{base}/v1/triggers/every-second/resume"),
            Some(TOKEN),
            b""
        )
        .json()["paused"],
        false
    );
    assert_eq!(
        http(
            "DELETE",
            &format!("{base}/v1/functions/misbehave"),
            Some(TOKEN),
            b""
        )
        .status,
        204
    );
    let after = http(
        "GET",
        &format!("{base}/v1/triggers/every-second"),
        Some(TOKEN),
        b"",
    )
    .json();
    assert_eq!(after["paused"], true, "{after}");
    assert!(after["paused_reason"]
        .as_str()
        .is_some_and(|r| r.contains("deleted")));
    let listed = http("GET", &format!("{other}/v1/triggers"), Some(TOKEN), b"").json();
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(
        http(
            "DELETE",
            &format!("{base}/v1/triggers/every-second"),
            Some(TOKEN),
            b""
        )
        .status,
        204
    );
}
