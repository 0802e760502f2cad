//! Cron triggers end to end: bad triggers refused, and a trigger firing every second with two
//! gateways running each tick once.

use std::time::Duration;

use serde_json::Value;
use squall_proto::poll::Poll;

use crate::durable::{register_misbehave, TOKEN};
use crate::support::{self, http};

const WAIT: Duration = Duration::from_secs(90);

pub(crate) fn put_trigger(base: &str, name: &str, spec: &str) -> crate::support::Answer {
    http(
        "PUT",
        &format!("{base}/v1/triggers/{name}"),
        Some(TOKEN),
        spec.as_bytes(),
    )
}

/// The records of `misbehave`'s calls made by a trigger whose cause starts with `cause`.
pub(crate) fn trigger_records(base: &str, cause: &str) -> Vec<Value> {
    support::listed(
        base,
        "/v1/activations?function=misbehave&limit=200",
        "activations",
        TOKEN,
    )
    .into_iter()
    .filter(|r| r["cause"].as_str().is_some_and(|c| c.starts_with(cause)))
    .collect()
}

/// The records of `misbehave`'s calls made by a cron trigger.
fn cron_records(base: &str) -> Vec<Value> {
    trigger_records(base, "cron")
}

#[test]
fn a_cron_trigger_with_two_gateways_runs_each_tick_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    let second = support::second_gateway(dir.path(), &up, TOKEN);
    let other = second.field("http");
    register_misbehave(&base);

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
    let mut last = String::new();
    let (counts, runs) = Poll::within(WAIT)
        .until(|| {
            let records = cron_records(&base);
            let runs = http("GET", &format!("{base}/v1/kv/cron/runs"), Some(TOKEN), b"").text();
            last = format!(
                "runs {runs}; records (id, status, attempt): {:?}",
                records
                    .iter()
                    .map(|r| (
                        r["id"].to_string(),
                        r["status"].to_string(),
                        r["attempt"].to_string()
                    ))
                    .collect::<Vec<_>>()
            );
            if records.iter().any(|r| r["status"] != "succeeded") {
                return None;
            }
            let runs: u64 = runs.parse().ok()?;
            if runs != records.len() as u64 {
                return None;
            }
            let mut counts: Vec<u64> = records
                .iter()
                .map(|r| {
                    let id = r["id"].as_str().expect("an id");
                    let result = http("GET", &format!("{base}/v1/results/{id}"), Some(TOKEN), b"");
                    result.text().parse().expect("a count")
                })
                .collect();
            counts.sort_unstable();
            Some((counts, runs))
        })
        .unwrap_or_else(|_| panic!("every tick ran once: runs and records never agreed: {last}"));
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

/// Runs `squall ARGS --gateway BASE --token TOKEN`; its stdout, after checking it succeeded.
fn cli(base: &str, args: &[&str]) -> String {
    let output = support::squall()
        .args(args)
        .args(["--gateway", base, "--token", TOKEN])
        .output()
        .expect("run squall");
    assert!(
        output.status.success(),
        "squall {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn the_cli_manages_triggers_dead_letters_and_idempotent_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    register_misbehave(&base);

    // Triggers: create, list, pause, resume, fire, delete.
    let created = cli(
        &base,
        &[
            "trigger",
            "create",
            "yearly",
            "--cron",
            "0 0 1 1 *",
            "--function",
            "misbehave",
            "--input",
            "echo:hi",
        ],
    );
    let created: Value = serde_json::from_str(&created).expect("JSON");
    assert_eq!(created["spec"]["schedule"], "0 0 1 1 *");
    let listed = cli(&base, &["trigger", "ls"]);
    assert!(
        listed.starts_with("yearly") && listed.contains("active  cron       function misbehave"),
        "{listed}"
    );
    cli(&base, &["trigger", "pause", "yearly"]);
    assert!(cli(&base, &["trigger", "ls"]).contains("paused"));
    cli(&base, &["trigger", "resume", "yearly"]);
    assert!(cli(&base, &["trigger", "ls"]).contains("active"));
    let id = cli(&base, &["trigger", "fire", "yearly"])
        .trim()
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    let result = Poll::within(WAIT)
        .until(|| {
            let result = http("GET", &format!("{base}/v1/results/{id}"), Some(TOKEN), b"");
            (result.status == 200).then(|| result.text())
        })
        .expect("the fired call's result");
    assert_eq!(result, "hi");
    cli(&base, &["trigger", "rm", "yearly"]);
    assert_eq!(cli(&base, &["trigger", "ls"]), "");
    let on_writes = cli(
        &base,
        &[
            "trigger",
            "create",
            "writes",
            "--prefix",
            "cli/",
            "--function",
            "misbehave",
        ],
    );
    let on_writes: Value = serde_json::from_str(&on_writes).expect("JSON");
    assert_eq!(on_writes["spec"]["kind"], "kv-change");
    let listed = cli(&base, &["trigger", "ls"]);
    assert!(
        listed.contains("active  kv-change  function misbehave") && listed.contains("cli/"),
        "{listed}"
    );
    cli(&base, &["trigger", "rm", "writes"]);

    // Dead letters: a call that fails (no retries by default) is listed, redriven, deleted.
    let id = cli(&base, &["call", "misbehave", "fail", "--async"])
        .trim()
        .to_string();
    assert_eq!(id.len(), 32, "{id}");
    let listed_once = || {
        Poll::within(WAIT)
            .until(|| {
                let listed = cli(&base, &["dead-letters", "ls", "misbehave"]);
                listed.starts_with(&id).then_some(listed)
            })
            .expect("the dead letter")
    };
    let listed = listed_once();
    assert!(
        listed.contains("1 attempts  function_failed: asked to fail"),
        "{listed}"
    );
    assert_eq!(
        cli(&base, &["dead-letters", "redrive", "misbehave", &id]).trim(),
        "1 redriven"
    );
    // It fails again: a dead letter once more, with both attempts.
    Poll::within(WAIT)
        .until(|| {
            cli(&base, &["dead-letters", "ls", "misbehave"])
                .contains("2 attempts")
                .then_some(())
        })
        .expect("the redriven call's dead letter");
    assert_eq!(
        cli(&base, &["dead-letters", "rm", "misbehave"]).trim(),
        "1 deleted"
    );
    assert_eq!(cli(&base, &["dead-letters", "ls", "misbehave"]), "");

    // An idempotency key runs the call once.
    for _ in 0..2 {
        let answer = cli(
            &base,
            &[
                "call",
                "misbehave",
                "tally:cli/runs:0",
                "--idempotency-key",
                "order-7",
            ],
        );
        assert_eq!(answer.trim(), "1");
    }
}

#[test]
fn a_namespace_rate_spaces_out_its_triggers_deliveries_without_dropping_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    register_misbehave(&base);
    // One call every four seconds in the default namespace, where a tick fires every second.
    let quotas = http(
        "PUT",
        &format!("{base}/v1/namespaces/default/quotas"),
        Some(TOKEN),
        br#"{"max_calls_per_s":0.25}"#,
    );
    assert_eq!(quotas.status, 200, "{}", quotas.text());
    let created = put_trigger(
        &base,
        "every-second",
        r#"{"kind":"cron","schedule":"* * * * * *","function":"misbehave","input":"ok"}"#,
    );
    assert_eq!(created.status, 200, "{}", created.text());
    // A record starts at its tick; it ends once its call ran.
    let ends = Poll::within(WAIT)
        .every(Duration::from_millis(250))
        .until(|| {
            let mut ends: Vec<u64> = cron_records(&base)
                .iter()
                .filter_map(|r| r["end_ms"].as_u64())
                .collect();
            ends.sort_unstable();
            (ends.len() >= 3).then_some(ends)
        })
        .expect("three deliveries ran");
    // The ticks' calls waited for the rate's tokens: no two ran a second apart, as they
    // would have without it (the bucket holds one token, refilled every four seconds).
    for pair in ends.windows(2) {
        assert!(pair[1] - pair[0] >= 3_000, "ends {ends:?}");
    }
    // They wait; none is refused or lost: pending calls queue up behind the rate.
    assert!(cron_records(&base)
        .iter()
        .all(|r| r["status"] == "succeeded" || r["status"] == "running"));
}
