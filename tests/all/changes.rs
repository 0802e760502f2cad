//! `kv-change` triggers end to end: a trigger fires once per acknowledged write, from the
//! HTTP API and from functions, deletes included, and no write is lost across a SIGKILL of
//! `squall up` between its acknowledgement and its delivery.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use squall_kvs::{Client, ClientConfig};
use squall_proto::poll::Poll;

use crate::durable::{register_misbehave, up_on_data, TOKEN};
use crate::support::{self, http, NodeProcess};
use crate::triggers::{put_trigger, trigger_records};

const WAIT: Duration = Duration::from_secs(120);

/// The counter `seen/KEY` (deliveries of KEY's writes to `misbehave`), 0 if absent.
fn seen(base: &str, key: &str) -> i64 {
    let answer = http("GET", &format!("{base}/v1/kv/seen/{key}"), Some(TOKEN), b"");
    match answer.status {
        404 => 0,
        200 => answer.text().parse().expect("a counter"),
        other => panic!("reading seen/{key}: {other} {}", answer.text()),
    }
}

/// The values delivered for KEY.
fn seen_values(base: &str, key: &str) -> HashSet<String> {
    let answer = http(
        "GET",
        &format!("{base}/v1/kv/seen-values/{key}"),
        Some(TOKEN),
        b"",
    );
    match answer.status {
        404 => HashSet::new(),
        200 => serde_json::from_slice::<Vec<String>>(&answer.body)
            .expect("a set")
            .into_iter()
            .collect(),
        other => panic!("reading seen-values/{key}: {other} {}", answer.text()),
    }
}

/// Registers `misbehave` and a `kv-change` trigger `name` calling it on writes under `prefix`.
fn misbehave_on_writes(base: &str, name: &str, prefix: &str) {
    register_misbehave(base);
    let spec = format!(r#"{{"kind":"kv-change","prefix":"{prefix}","function":"misbehave"}}"#);
    let created = put_trigger(base, name, &spec);
    assert_eq!(created.status, 200, "{}", created.text());
}

#[test]
fn a_kv_change_trigger_fires_once_per_write_from_http_and_from_functions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    register_misbehave(&base);
    // Bad triggers: 400, nothing stored.
    for bad in [
        r#"{"kind":"kv-change","prefix":"squall/ns/","function":"misbehave"}"#,
        r#"{"kind":"kv-change","prefix":"a/","schedule":"* * * * *","function":"misbehave"}"#,
        r#"{"kind":"kv-change","prefix":"a/","input":"x","function":"misbehave"}"#,
        r#"{"kind":"kv-change","prefix":"a/","function":"nope"}"#,
        r#"{"kind":"kv-delta","prefix":"a/","function":"misbehave"}"#,
    ] {
        let refused = put_trigger(&base, "bad", bad);
        assert_eq!(refused.status, 400, "{bad}: {}", refused.text());
    }
    assert_eq!(
        http("GET", &format!("{base}/v1/triggers/bad"), Some(TOKEN), b"").status,
        404
    );
    let created = put_trigger(
        &base,
        "orders",
        r#"{"kind":"kv-change","prefix":"orders/","function":"misbehave"}"#,
    );
    assert_eq!(created.status, 200, "{}", created.text());
    assert_eq!(created.json()["spec"]["prefix"], "orders/");
    // A shard's journal is its own: no client writes it, no listing shows it.
    let mut client = Client::connect(&up.field("kvs"), ClientConfig::default()).expect("client");
    for key in [
        "squall/journal/00000000000000000001",
        "squall/journal-switch",
    ] {
        assert!(client.put_lww(key, "x").is_err(), "{key} was written");
    }
    let (listed, _) = client.list("squall/journal", None, 100).expect("a listing");
    assert!(listed.is_empty(), "{listed:?}");

    // Three writes of one key over HTTP, one write by a function, a key outside the
    // prefix, and a delete.
    for value in ["1", "2", "3"] {
        let put = http(
            "PUT",
            &format!("{base}/v1/kv/orders/a"),
            Some(TOKEN),
            value.as_bytes(),
        );
        assert_eq!(put.status, 204, "{}", put.text());
    }
    let by_function = http(
        "POST",
        &format!("{base}/v1/functions/misbehave/invoke"),
        Some(TOKEN),
        b"state:orders/b=4",
    );
    assert_eq!(by_function.text(), "4");
    let other = http("PUT", &format!("{base}/v1/kv/other/a"), Some(TOKEN), b"5");
    assert_eq!(other.status, 204);
    let deleted = http(
        "DELETE",
        &format!("{base}/v1/kv/orders/a"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(deleted.status, 204, "{}", deleted.text());

    Poll::within(WAIT)
        .until(|| (seen(&base, "orders/a") == 4 && seen(&base, "orders/b") == 1).then_some(()))
        .unwrap_or_else(|_| {
            panic!(
                "deliveries: orders/a {}, orders/b {}",
                seen(&base, "orders/a"),
                seen(&base, "orders/b")
            )
        });
    assert_eq!(
        seen_values(&base, "orders/a"),
        ["1", "2", "3"].map(String::from).into_iter().collect()
    );
    // Every delivery has its record; the delete is one of them; nothing else fired.
    let records = Poll::within(WAIT)
        .until(|| {
            let records = trigger_records(&base, "kv-change");
            let done = records.iter().all(|r| r["status"] == "succeeded");
            (records.len() == 5 && done).then_some(records)
        })
        .unwrap_or_else(|_| panic!("records: {:?}", trigger_records(&base, "kv-change")));
    assert!(
        records.iter().all(|r| r["status"] == "succeeded"),
        "{records:?}"
    );
    assert_eq!(seen(&base, "other/a"), 0);
    assert_eq!(seen(&base, "orders/a"), 4, "no write was delivered twice");

    // Paused, it fires nothing (writes meanwhile are not delivered later); resumed, it fires
    // again.
    let paused = http(
        "POST",
        &format!("{base}/v1/triggers/orders/pause"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(paused.status, 200, "{}", paused.text());
    http("PUT", &format!("{base}/v1/kv/orders/c"), Some(TOKEN), b"6");
    let resumed = http(
        "POST",
        &format!("{base}/v1/triggers/orders/resume"),
        Some(TOKEN),
        b"",
    );
    assert_eq!(resumed.status, 200, "{}", resumed.text());
    http("PUT", &format!("{base}/v1/kv/orders/d"), Some(TOKEN), b"7");
    Poll::within(WAIT)
        .until(|| (seen(&base, "orders/d") == 1).then_some(()))
        .expect("the write after the resume is delivered");
    assert_eq!(seen(&base, "orders/c"), 0, "a write while paused fired");
}

#[test]
fn a_keys_deliveries_run_one_after_another_in_the_order_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN]);
    let base = up.field("http");
    // For keys under `ord/`, `misbehave` reads `order/KEY`, waits 3 ms and writes it back
    // with the value appended: concurrent or reordered runs lose or swap values.
    misbehave_on_writes(&base, "ordered", "ord/");
    for i in 1..=30 {
        for key in ["a", "b"] {
            let put = http(
                "PUT",
                &format!("{base}/v1/kv/ord/{key}"),
                Some(TOKEN),
                format!("{key}{i}").as_bytes(),
            );
            assert_eq!(put.status, 204, "{}", put.text());
        }
    }
    let order = |key: &str| {
        let answer = http(
            "GET",
            &format!("{base}/v1/kv/order/ord/{key}"),
            Some(TOKEN),
            b"",
        );
        (answer.status == 200).then(|| answer.text())
    };
    for key in ["a", "b"] {
        let expected: String = (1..=30).map(|i| format!(",{key}{i}")).collect();
        Poll::within(WAIT)
            .until(|| (order(key).as_deref() == Some(expected.as_str())).then_some(()))
            .unwrap_or_else(|_| panic!("ord/{key} delivered as {:?}", order(key)));
    }
}

#[test]
fn a_trigger_whose_function_writes_what_fires_it_stops_at_the_chain_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = support::up(dir.path(), &["--token", TOKEN, "--max-trigger-chain", "3"]);
    let base = up.field("http");
    // `misbehave` counts each event under `seen/KEY`: under this prefix, each of its writes
    // fires the trigger again, one key deeper.
    misbehave_on_writes(&base, "loop", "seen/");
    let put = http("PUT", &format!("{base}/v1/kv/seen/a"), Some(TOKEN), b"x");
    assert_eq!(put.status, 204, "{}", put.text());

    // Calls 1, 2 and 3 deep run; the fourth delivery is a dead letter with its reason.
    let letters = Poll::within(WAIT)
        .until(|| {
            let letters = crate::durable::dead_letters(&base);
            (!letters.is_empty()).then_some(letters)
        })
        .unwrap_or_else(|_| {
            panic!(
                "no dead letter; records: {:?}",
                trigger_records(&base, "kv-change")
            )
        });
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0]["error"]["code"], "chain_too_deep", "{letters:?}");
    let records = Poll::within(WAIT)
        .until(|| {
            let records = trigger_records(&base, "kv-change");
            let done = records.iter().all(|r| r["status"] != "running");
            (records.len() == 4 && done).then_some(records)
        })
        .unwrap_or_else(|_| panic!("records: {:?}", trigger_records(&base, "kv-change")));
    let mut chains: Vec<(u64, String)> = records
        .iter()
        .map(|r| {
            (
                r["chain"].as_u64().expect("a chain depth"),
                r["status"].as_str().expect("a status").to_string(),
            )
        })
        .collect();
    chains.sort();
    assert_eq!(
        chains,
        [
            (1, "succeeded"),
            (2, "succeeded"),
            (3, "succeeded"),
            (4, "failed")
        ]
        .map(|(chain, status)| (chain, status.to_string()))
    );
    let failed = records
        .iter()
        .find(|r| r["status"] == "failed")
        .expect("failed");
    assert_eq!(failed["error"]["code"], "chain_too_deep", "{failed}");
    // What the three calls wrote, and nothing deeper.
    assert_eq!(seen(&base, "seen/a"), 1);
    assert_eq!(seen(&base, "seen/seen/a"), 1);
    assert_eq!(seen(&base, "seen/seen/seen/a"), 1);
    assert_eq!(seen(&base, "seen/seen/seen/seen/a"), 0);
    // Writes from outside any trigger's call start a chain anew.
    let again = http("PUT", &format!("{base}/v1/kv/seen/b"), Some(TOKEN), b"y");
    assert_eq!(again.status, 204, "{}", again.text());
    Poll::within(WAIT)
        .until(|| (crate::durable::dead_letters(&base).len() == 2).then_some(()))
        .unwrap_or_else(|_| panic!("the second chain did not stop"));
    assert_eq!(seen(&base, "seen/seen/seen/b"), 1);
    assert_eq!(seen(&base, "seen/seen/seen/seen/b"), 0);
}

/// `squall up` on a data directory with a fixed store port (so its shards keep their
/// addresses across the restart).
fn up_on(data: &std::path::Path, log_dir: &std::path::Path, kvs_port: &str) -> NodeProcess {
    up_on_data(data, log_dir, kvs_port, "4")
}

/// A store port for a node that must come back where it was: below the range the OS hands
/// out for port 0 (so no other test's process takes it meanwhile), with the ports its shards
/// take after it (one per core) free now.
fn fixed_ports() -> u16 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u16;
    for _ in 0..1000 {
        let port = 20_000 + rand::random::<u16>() % 10_000;
        let free =
            (port..=port + cores).all(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok());
        if free {
            return port;
        }
    }
    panic!("no free ports between 20000 and 30000");
}

/// Writes `load/{i % 100}` = `i` for `i` from 0 to `count`, in order, each until it is
/// acknowledged (a write that fails, the store being down, is made again once it is back);
/// notes each acknowledged `i`.
fn write_all(kvs: String, count: u32, acked: Arc<Mutex<Vec<u32>>>) {
    let mut client: Option<Client> = None;
    let mut i = 0;
    while i < count {
        let connected = match client.as_mut() {
            Some(client) => client,
            None => match Client::connect(&kvs, ClientConfig::default()) {
                Ok(fresh) => client.insert(fresh),
                Err(_) => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            },
        };
        // The key as the default namespace's functions and triggers name it.
        let key = squall_proto::keys::user(
            squall_proto::keys::DEFAULT_NAMESPACE,
            &format!("load/{}", i % 100),
        );
        match connected.put_lww(&key, i.to_string()) {
            Ok(()) => {
                acked.lock().expect("acked").push(i);
                i += 1;
            }
            Err(_) => {
                client = None;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

#[test]
fn ten_thousand_writes_under_a_kv_change_trigger_survive_a_sigkill_each_delivered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = fixed_ports().to_string();
    let mut up = up_on(&data, dir.path(), &port);
    let base = up.field("http");
    misbehave_on_writes(&base, "load", "load/");
    let kvs = up.field("kvs");
    // Killed while writes are under way, most of the acknowledged ones still waiting for
    // their delivery.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let writer = {
        let (kvs, acked) = (kvs.clone(), acked.clone());
        std::thread::spawn(move || write_all(kvs, 10_000, acked))
    };
    Poll::within(WAIT)
        .until(|| (acked.lock().expect("acked").len() >= 5_000).then_some(()))
        .expect("5 000 writes acknowledged");
    up.kill_hard();
    let up = up_on(&data, dir.path(), &port);
    let base = up.field("http");
    assert_eq!(up.field("kvs"), kvs, "the store listens where it did");
    writer.join().expect("the writer");
    let acked = acked.lock().expect("acked").clone();
    assert_eq!(acked.len(), 10_000);
    // Every acknowledged write is delivered: its value is among its key's delivered values.
    for key in 0..100u32 {
        let expected: HashSet<String> = acked
            .iter()
            .filter(|i| *i % 100 == key)
            .map(|i| i.to_string())
            .collect();
        let delivered = Poll::within(WAIT)
            .every(Duration::from_millis(100))
            .until(|| {
                let got = seen_values(&base, &format!("load/{key}"));
                expected.is_subset(&got).then_some(got)
            })
            .unwrap_or_else(|_| {
                let got = seen_values(&base, &format!("load/{key}"));
                let missing: Vec<_> = expected.difference(&got).take(10).collect();
                panic!(
                    "load/{key}: {} of {} writes undelivered, e.g. {missing:?}",
                    expected.len() - expected.intersection(&got).count(),
                    expected.len()
                )
            });
        assert_eq!(delivered, expected, "load/{key}: nothing else delivered");
    }
}

#[test]
fn in_a_cluster_each_write_fires_once_whatever_its_replicas() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Two storage nodes, every key on both (replication 2): each write is journaled twice.
    let up = crate::cluster::cluster_up(dir.path(), &["--kvs", "2", "--executors", "1"]);
    let base = up.field("http");
    misbehave_on_writes(&base, "replicated", "c/");
    for i in 0..50 {
        let put = http(
            "PUT",
            &format!("{base}/v1/kv/c/{i}"),
            Some(TOKEN),
            i.to_string().as_bytes(),
        );
        assert_eq!(put.status, 204, "{}", put.text());
    }
    // A last write: once it is delivered, both replicas' copies of the earlier ones were read.
    http("PUT", &format!("{base}/v1/kv/c/last"), Some(TOKEN), b"x");
    Poll::within(WAIT)
        .until(|| (seen(&base, "c/last") >= 1).then_some(()))
        .expect("the last write delivered");
    for i in 0..50 {
        let key = format!("c/{i}");
        let delivered = Poll::within(WAIT)
            .until(|| {
                let n = seen(&base, &key);
                (n >= 1).then_some(n)
            })
            .expect("delivered");
        if delivered != 1 {
            // What ran: one record with two attempts (a retry) or two records (two deliveries).
            let records = http(
                "GET",
                &format!("{base}/v1/activations?function=misbehave&limit=200"),
                Some(TOKEN),
                b"",
            );
            panic!(
                "{key} was delivered {delivered} times; the records: {}",
                records.text()
            );
        }
    }
    assert_eq!(seen(&base, "c/last"), 1);
}
