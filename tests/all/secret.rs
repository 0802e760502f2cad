//! The cluster secret on internal ports: a store, scheduler and executor that share one work
//! together, and a peer without it (or with another) reads nothing from the store and
//! injects nothing into the scheduler.

use std::time::Duration;

use squall_executor::testing::guest;
use squall_proto::call::{ExecutorStatus, Message};
use squall_proto::fabric::Fabric;
use squall_proto::poll::Poll;
use squall_proto::secret::ClusterSecret;

use crate::support::{self, http, squall};

const SECRET: &str = "the-cluster-secret-of-32-bytes!!";
/// Another, for the cluster test (which looks for it in the processes' command lines).
const CLUSTER_SECRET: &str = "a-secret-for-the-cluster-test-32";
const WRONG: &str = "some-other-secret-of-32-bytes!!!";

/// `squall kv ... ` against `kvs`, presenting `secret` if given: (success, stdout, stderr).
fn kv(kvs: &str, secret: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut command = squall();
    command
        .env_remove("SQUALL_CLUSTER_SECRET")
        .args(["kv", "--addr", kvs, "--timeout", "1"]);
    if let Some(secret) = secret {
        command.args(["--cluster-secret", secret]);
    }
    let output = command.args(args).output().expect("squall kv runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Registers `counter` through `base` and calls it twice on `key`: 1, then 2.
fn count_twice(base: &str, key: &str) {
    let register = http(
        "PUT",
        &format!("{base}/v1/functions/counter"),
        None,
        &guest("counter"),
    );
    assert_eq!(register.status, 201, "{}", register.text());
    for expected in ["1", "2"] {
        let called = http(
            "POST",
            &format!("{base}/v1/functions/counter/invoke"),
            None,
            key.as_bytes(),
        );
        let answer = (called.status, called.text());
        assert_eq!(
            (answer.0, answer.1.as_str()),
            (200, expected),
            "{}",
            answer.1
        );
    }
}

#[test]
fn internal_ports_take_only_peers_with_the_cluster_secret() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--cluster-secret", SECRET]);
    let base = up.field("http");
    let kvs = up.field("kvs");

    // Functions run: their state goes through the guarded store and the executor's guarded
    // cache.
    count_twice(&base, "visits");

    // The store: with the secret, reads and writes; without it or with another, refused in
    // the handshake, saying why.
    let (ok, out, err) = kv(&kvs, Some(SECRET), &["get", "visits"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "2");
    let (ok, _, err) = kv(&kvs, Some(SECRET), &["put", "note", "kept"]);
    assert!(ok, "{err}");
    let (ok, _, err) = kv(&kvs, None, &["get", "visits"]);
    assert!(!ok);
    assert!(err.contains("may require the cluster secret"), "{err}");
    let (ok, _, err) = kv(&kvs, Some(WRONG), &["get", "visits"]);
    assert!(!ok);
    assert!(err.contains("cluster secret"), "{err}");
    let (ok, _, _) = kv(&kvs, None, &["put", "note", "overwritten"]);
    assert!(!ok);
    let (_, out, _) = kv(&kvs, Some(SECRET), &["get", "note"]);
    assert_eq!(out.trim(), "kept");

    // The scheduler's mailbox: an executor announcing itself without the secret (or with
    // another) is never heard; one with it is.
    let announce = |fabric: &Fabric, id: &str, port: u16| {
        let status = ExecutorStatus {
            id: id.into(),
            addr: format!("tcp://127.0.0.1:{port}"),
            capacity: 1,
            ..ExecutorStatus::default()
        };
        fabric
            .send(&up.field("scheduler"), Message::Heartbeat(status))
            .expect("queued");
    };
    let without = Fabric::with_secret(None);
    let wrong = Fabric::with_secret(Some(ClusterSecret::new(WRONG).expect("secret")));
    let with = Fabric::with_secret(Some(ClusterSecret::new(SECRET).expect("secret")));
    announce(&without, "intruder", 1);
    announce(&wrong, "impostor", 2);
    announce(&with, "insider", 3);
    let listed = Poll::within(Duration::from_secs(30))
        .until(|| {
            let listed = http("GET", &format!("{base}/v1/executors"), None, b"").text();
            listed.contains("insider").then_some(listed)
        })
        .expect("the executor with the secret joins");
    assert!(!listed.contains("intruder"), "{listed}");
    assert!(!listed.contains("impostor"), "{listed}");

    // A secret too short stops the start, and is not printed.
    let refused = squall()
        .args(support::UP)
        .args(["--cluster-secret", "too-short"])
        .output()
        .expect("squall up runs");
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("between 16 and 255 bytes"), "{err}");
    assert!(!err.contains("too-short"), "{err}");
}

/// `squall cluster up --cluster-secret`: every child (router, storage nodes, scheduler,
/// executor, gateway) gets the secret and they work together; the router refuses a status
/// request without it.
#[test]
fn a_cluster_with_a_secret_works_and_refuses_outsiders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = crate::cluster::cluster_up(
        dir.path(),
        &[
            "--kvs",
            "2",
            "--executors",
            "1",
            "--cluster-secret",
            CLUSTER_SECRET,
        ],
    );
    count_twice(&up.field("http"), "hits");
    let status = |secret: Option<&str>| {
        let mut command = squall();
        command
            .env_remove("SQUALL_CLUSTER_SECRET")
            .args(["cluster", "status", "--router", &up.addr]);
        if let Some(secret) = secret {
            command.args(["--cluster-secret", secret]);
        }
        command.output().expect("squall cluster status runs")
    };
    let seen = status(Some(CLUSTER_SECRET));
    assert!(
        seen.status.success(),
        "{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    assert!(String::from_utf8_lossy(&seen.stdout).contains("2 members"));
    let refused = status(None);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("may require the cluster secret"), "{err}");
    // The secret reached the children through their environment, not their command lines.
    let logs = std::fs::read_dir(dir.path().join("logs")).expect("logs");
    assert!(logs.count() >= 5);
    let ps = std::process::Command::new("ps")
        .args(["-ww", "-eo", "args"])
        .output()
        .expect("ps runs");
    let listed = String::from_utf8_lossy(&ps.stdout);
    assert!(
        !listed
            .lines()
            .any(|line| line.contains(CLUSTER_SECRET) && !line.contains("cluster up")),
        "a child shows the secret on its command line"
    );
}
