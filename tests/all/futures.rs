//! Children started from inside functions (`squall:compose/futures`), with real processes: a
//! parent on one executor process whose children can only run on another, fan-out and
//! fan-in, a competitive wait whose loser is cancelled, children cancelled when their parent
//! fails or returns without them, and typed errors.

use std::time::Duration;

use squall_executor::testing::guest;
use squall_proto::poll::Poll;

use crate::support::{self, http};

const TOKEN: &str = "a-token-for-the-children-tests-32";

/// Steps running on executor `id`, as the gateway last heard.
fn running_on(base: &str, id: &str) -> Option<u64> {
    executor(base, id, "running")
}

/// Field `field` of executor `id`'s last heartbeat, as the gateway last heard.
fn executor(base: &str, id: &str, field: &str) -> Option<u64> {
    let listed = http("GET", &format!("{base}/v1/executors"), Some(TOKEN), b"").json();
    listed
        .as_array()?
        .iter()
        .find(|e| e["id"] == id)
        .and_then(|e| e[field].as_u64())
}

fn call(base: &str, function: &str, input: &str) -> support::Answer {
    http(
        "POST",
        &format!("{base}/v1/functions/{function}/invoke"),
        Some(TOKEN),
        input.as_bytes(),
    )
}

fn key(base: &str, key: &str) -> support::Answer {
    http("GET", &format!("{base}/v1/kv/{key}"), Some(TOKEN), b"")
}

#[test]
fn children_run_on_another_executor_and_never_outlive_their_parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = support::roles(
        dir.path(),
        &["--token", TOKEN],
        &[("parents", "parent"), ("children", "misbehave")],
    );
    let base = &roles.base;
    let code = guest("misbehave");
    for name in ["parent", "misbehave"] {
        let url = format!("{base}/v1/functions/{name}");
        let registered = http("PUT", &url, Some(TOKEN), &code);
        assert_eq!(registered.status, 201, "{}", registered.text());
    }
    // Fan-out and fan-in: the executor of `parent` does not serve `misbehave`, so every
    // child ran on the other process.
    let fanned = call(base, "parent", "fanout:20");
    assert_eq!(fanned.status, 200, "{}", fanned.text());
    let expected: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    assert_eq!(fanned.text(), expected.join(","));

    // Competitive: the first to finish answers; the 20 s sleeper (whose deadline, its
    // parent's, is 10 s away) is cancelled where it runs. A heartbeat counting the winner's
    // step is recent enough to count the loser if it still ran.
    let steps = Poll::within(Duration::from_secs(10))
        .until(|| executor(base, "children", "steps").filter(|s| *s >= 20))
        .expect("the fan-out's steps heard of");
    let raced = call(base, "parent", "race");
    assert_eq!((raced.status, raced.text()), (200, "fast".to_string()));
    Poll::within(Duration::from_secs(5))
        .until(|| {
            let heard = executor(base, "children", "steps")? > steps;
            (heard && running_on(base, "children") == Some(0)).then_some(())
        })
        .expect("the race's loser stopped");

    // A parent that fails, and one that returns without awaiting: the child had started
    // (it wrote started/KEY) and is stopped before it writes KEY.
    for (input, status) in [("orphan:orphaned", 500), ("abandon:abandoned", 200)] {
        let ended = call(base, "parent", input);
        assert_eq!(ended.status, status, "{input}: {}", ended.text());
        let key_name = input.split_once(':').map_or("", |(_, k)| k);
        assert_eq!(
            key(base, &format!("started/{key_name}")).status,
            200,
            "{input}: the child had started"
        );
        // An absence: the child would write KEY 3 s after it started, so look after that.
        std::thread::sleep(Duration::from_millis(3500));
        assert_eq!(
            running_on(base, "children"),
            Some(0),
            "{input}: the child runs on"
        );
        assert_eq!(
            key(base, key_name).status,
            404,
            "{input}: the child ran on after its parent ended"
        );
    }

    // Typed errors.
    let unknown = call(base, "parent", "child-of:nobody");
    assert!(
        unknown.text().contains("not found") && unknown.text().contains("\"nobody\""),
        "{}",
        unknown.text()
    );
    // Children that start children forever stop at the executors' call depth.
    let deep = call(base, "parent", "descend");
    assert_eq!(deep.status, 200, "{}", deep.text());
    assert!(deep.text().contains("deeper than"), "{}", deep.text());
    let twice = call(base, "parent", "twice");
    assert!(
        twice.text().contains("Invalid") && twice.text().contains("awaited already"),
        "{}",
        twice.text()
    );
    drop(roles);
}
