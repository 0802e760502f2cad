//! A multi-node store as separate processes: `squall router` and three `squall kvs --join`,
//! replication 2, on loopback. A node SIGKILLed during a write load loses no acknowledged
//! write; a joining node receives its keys and a leaving one (SIGTERM) hands them off, while
//! every key stays readable.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use squall_kvs::{Client, ClientConfig};
use squall_lattices::LatticeValue;
use squall_proto::poll::Poll;

use crate::support::NodeProcess;

fn router(dir: &Path) -> NodeProcess {
    let mut router = NodeProcess::spawn(
        dir,
        &[
            "router",
            "--port",
            "0",
            "--replication",
            "2",
            "--dead-after-ms",
            "1000",
        ],
    );
    router.addr = router.field("addr");
    router
}

fn storage_node(dir: &Path, router: &NodeProcess) -> NodeProcess {
    NodeProcess::start(
        dir,
        &[
            "--shards",
            "1",
            "--join",
            &router.addr,
            "--heartbeat-ms",
            "100",
            "--gossip-ms",
            "300",
            // No load reports during these tests: they are keys of the store's own, and the
            // tests count keys.
            "--stats-ms",
            "600000",
        ],
    )
}

/// Waits until the view has `members` members that all finished handing off under it.
fn settle(router: &NodeProcess, members: usize) -> squall_proto::ClusterStatus {
    let mut last = None;
    Poll::within(Duration::from_secs(30))
        .every(Duration::from_millis(50))
        .until(|| {
            let status = squall_kvs::router::status(&router.addr).ok()?;
            if status.settled_with(members) {
                return Some(status);
            }
            last = Some(status);
            None
        })
        .unwrap_or_else(|_| panic!("the cluster did not settle with {members} members: {last:?}"))
}

fn client(router: &NodeProcess) -> Client {
    let mut last = None;
    Poll::within(Duration::from_secs(10))
        .every(Duration::from_millis(50))
        .until(
            || match Client::connect(&router.addr, ClientConfig::default()) {
                Ok(client) => Some(client),
                Err(e) => {
                    last = Some(e);
                    None
                }
            },
        )
        .unwrap_or_else(|_| panic!("no cluster at {}: {last:?}", router.addr))
}

fn lww_bytes(value: Option<LatticeValue>) -> Option<Bytes> {
    match value {
        Some(LatticeValue::Lww(lww)) => Some(lww.value),
        None => None,
        Some(other) => panic!("not an lww value: {other:?}"),
    }
}

#[test]
fn a_node_killed_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path());
    let mut nodes: Vec<NodeProcess> = (0..3).map(|_| storage_node(dir.path(), &router)).collect();
    settle(&router, 3);

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<BTreeMap<String, Bytes>>> = Arc::default();
    let failed = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let (stop, acked, failed, slowest) =
                (stop.clone(), acked.clone(), failed.clone(), slowest.clone());
            let mut client = client(&router);
            std::thread::spawn(move || {
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let key = format!("w{writer}-k{i}");
                    let value = Bytes::from(format!("value {writer} {i}"));
                    let started = Instant::now();
                    match client.put_lww(&key, value.clone()) {
                        Ok(()) => {
                            acked.lock().expect("lock").insert(key, value);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let before_kill = acked.lock().expect("lock").len();
    let mut victim = nodes.remove(1);
    victim.kill_hard();
    // Writes go on through the failure detector's second and the re-replication that
    // follows, until the two survivors settled a view without the victim.
    settle(&router, 2);
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer");
    }
    let acked = std::mem::take(&mut *acked.lock().expect("lock"));
    let status = settle(&router, 2);
    assert!(
        status.view.members.iter().all(|m| m.id != victim.addr),
        "the killed node left the view"
    );

    let mut client = client(&router);
    let mut lost = Vec::new();
    let mut single_copy = 0;
    for (key, value) in &acked {
        match lww_bytes(client.get(key).expect("get")) {
            Some(read) if read == *value => {}
            other => lost.push((key.clone(), other)),
        }
        let copies = client
            .get_replicas(key)
            .expect("replicas")
            .into_iter()
            .filter(|(_, v)| matches!(v, Ok(Some(_))))
            .count();
        single_copy += usize::from(copies < 2);
    }
    println!(
        "cluster kill: {} writes acknowledged ({before_kill} before the kill), {} failed, \
         slowest write {} ms, {} lost, {single_copy} with fewer than 2 copies after re-replication",
        acked.len(),
        failed.load(Ordering::Relaxed),
        slowest.load(Ordering::Relaxed),
        lost.len()
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {:?}",
        &lost[..lost.len().min(5)]
    );
    assert_eq!(single_copy, 0, "every key has two copies again");
    assert!(
        acked.len() > before_kill,
        "writes went on after the kill ({before_kill} before, {} in all)",
        acked.len()
    );
}

#[test]
fn keys_stay_readable_while_a_node_joins_and_another_leaves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let router = router(dir.path());
    let mut first = storage_node(dir.path(), &router);
    let _second = storage_node(dir.path(), &router);
    settle(&router, 2);
    let keys: Vec<String> = (0..2000).map(|i| format!("key-{i}")).collect();
    let mut writer = client(&router);
    for key in &keys {
        writer.put_lww(key, key.clone()).expect("put");
    }

    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, keys) = (stop.clone(), keys.clone());
        let mut client = client(&router);
        std::thread::spawn(move || {
            let (mut rounds, mut misses, mut errors) = (0u64, 0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                for batch in keys.chunks(200) {
                    match client.get_many(batch) {
                        Ok(values) => {
                            for (key, value) in batch.iter().zip(values) {
                                if lww_bytes(value).as_deref() != Some(key.as_bytes()) {
                                    misses += 1;
                                }
                            }
                        }
                        Err(_) => errors += 1,
                    }
                }
                rounds += 1;
            }
            (rounds, misses, errors)
        })
    };

    let third = storage_node(dir.path(), &router);
    let joined = settle(&router, 3);
    let third_keys = joined
        .members
        .iter()
        .find(|m| m.id == third.addr)
        .map(|m| m.stats.keys);
    // SIGTERM: the node leaves the view and hands its keys off before it exits.
    assert!(first.stop(), "the leaving node exited cleanly");
    let left = settle(&router, 2);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (rounds, misses, errors) = reader.join().expect("reader");
    println!(
        "cluster join and leave: {rounds} read rounds of {} keys, {misses} misses, {errors} failed batches; \
         the new node received {third_keys:?} keys",
        keys.len()
    );
    assert!(rounds >= 2, "the reader read throughout ({rounds} rounds)");
    assert_eq!(
        (misses, errors),
        (0, 0),
        "every key was readable throughout"
    );
    assert!(
        third_keys.unwrap_or(0) > 500,
        "the new node received its keys: {joined:?}"
    );
    let held: u64 = left.members.iter().map(|m| m.stats.keys).sum();
    assert_eq!(
        held,
        2 * keys.len() as u64,
        "two copies of every key: {left:?}"
    );
}

/// `squall cluster up` with fast policy periods, in-memory storage.
pub(crate) fn cluster_up(dir: &Path, extra: &[&str]) -> NodeProcess {
    let mut args = vec![
        "cluster",
        "up",
        "--in-memory",
        "--http-port",
        "0",
        "--kvs-shards",
        "1",
        "--period-ms",
        "500",
        "--stats-ms",
        "250",
    ];
    let log_dir = dir.display().to_string();
    args.extend(["--dir", log_dir.as_str()]);
    args.extend_from_slice(extra);
    let mut up = NodeProcess::spawn(dir, &args);
    up.addr = up.field("router");
    up
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `limit`.
fn within<T>(limit: Duration, mut check: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let started = Instant::now();
    Poll::within(limit)
        .every(Duration::from_millis(100))
        .until(|| check().map(|found| (found, started.elapsed())))
        .ok()
}

#[test]
fn a_hot_key_gets_more_replicas_and_gives_them_back_when_cold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = cluster_up(
        dir.path(),
        &["--kvs", "3", "--executors", "1", "--hot-min-accesses", "20"],
    );
    let mut writer = client(&up);
    let others: Vec<String> = (0..200).map(|i| format!("cold-{i}")).collect();
    for key in others.iter().chain([&"hot".to_string()]) {
        writer.put_lww(key, "v").expect("put");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let hammer = {
        let (stop, others) = (stop.clone(), others.clone());
        let mut reader = client(&up);
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !stop.load(Ordering::Relaxed) {
                reader.get("hot").expect("get hot");
                reader
                    .get(&others[reads as usize % others.len()])
                    .expect("get");
                reads += 1;
            }
            reads
        })
    };
    let replicas_of_hot = |up: &NodeProcess| {
        squall_kvs::router::status(&up.addr).ok().and_then(|s| {
            s.view
                .overrides
                .iter()
                .find(|(k, _)| k == "hot")
                .map(|(_, r)| *r)
        })
    };
    let raised = within(Duration::from_secs(30), || {
        replicas_of_hot(&up).filter(|r| *r >= 3)
    });
    stop.store(true, Ordering::Relaxed);
    let reads = hammer.join().expect("hammer");
    let (replicas, took) = raised.expect("the hot key got more replicas");
    // Its copies are where the view says: on all three nodes.
    let copies = within(Duration::from_secs(10), || {
        writer.refresh().ok()?;
        let held = writer
            .get_replicas("hot")
            .ok()?
            .into_iter()
            .filter(|(_, v)| matches!(v, Ok(Some(_))))
            .count();
        (held == 3).then_some(held)
    });
    assert!(copies.is_some(), "the hot key was copied to every node");
    let (_, cooled) = within(Duration::from_secs(30), || {
        replicas_of_hot(&up).is_none().then_some(())
    })
    .expect("the key went back to the default replication once cold");
    println!(
        "hot key: {replicas} replicas {:.1} s after the reads began ({reads} read pairs); \
         back to the default {:.1} s after they stopped (policy period 0.5 s)",
        took.as_secs_f64(),
        cooled.as_secs_f64()
    );
}

#[test]
fn the_executor_pool_grows_under_a_burst_and_shrinks_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = cluster_up(
        dir.path(),
        &[
            "--kvs",
            "2",
            "--executors",
            "1",
            "--executor-capacity",
            "2",
            "--max-executors",
            "3",
            "--executor-grace-ms",
            "1000",
            "--low-periods",
            "2",
        ],
    );
    let base = up.field("http");
    let registered = crate::support::http(
        "PUT",
        &format!("{base}/v1/functions/misbehave"),
        None,
        &squall_executor::testing::guest("misbehave"),
    );
    assert_eq!(registered.status, 201, "{}", registered.text());
    let pool = |base: &str| -> Option<usize> {
        let answer = crate::support::http("GET", &format!("{base}/v1/executors"), None, b"");
        let list = answer.json();
        let list = list.as_array()?;
        Some(list.iter().filter(|e| e["draining"] != true).count())
    };
    // A burst: 12 clients, each calling a 1 s function back to back for 6 s.
    let started = Instant::now();
    let burst: Vec<_> = (0..12)
        .map(|_| {
            let base = base.clone();
            std::thread::spawn(move || {
                let mut failures = Vec::new();
                while started.elapsed() < Duration::from_secs(6) {
                    let answer = crate::support::http(
                        "POST",
                        &format!("{base}/v1/functions/misbehave/invoke"),
                        None,
                        b"sleep:1000",
                    );
                    if answer.status != 200 {
                        failures.push(answer.text());
                    }
                }
                failures
            })
        })
        .collect();
    let grew = within(Duration::from_secs(6), || pool(&base).filter(|n| *n > 1));
    let failures: Vec<String> = burst
        .into_iter()
        .flat_map(|t| t.join().expect("burst client"))
        .collect();
    let (grown, grew_after) = grew.expect("the pool grew under the burst");
    let shrank = within(Duration::from_secs(40), || pool(&base).filter(|n| *n == 1));
    let (_, shrank_after) = shrank.expect("the pool shrank back to one executor after the burst");
    println!(
        "executor pool: 1 -> {grown} executors {:.1} s into the burst; back to 1 {:.1} s after it \
         (policy period 0.5 s, 2 quiet periods per removal); {} failed calls",
        grew_after.as_secs_f64(),
        shrank_after.as_secs_f64(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "calls failed: {:?}",
        &failures[..failures.len().min(3)]
    );
}

/// A second SIGTERM ends a node at once, even while it hands off: here to a router that is
/// gone, so the graceful leave would wait out its whole timeout (60 s) and then fail.
#[test]
fn a_second_signal_ends_a_leaving_node_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut router = router(dir.path());
    let mut node = storage_node(dir.path(), &router);
    settle(&router, 1);
    router.kill_hard();
    node.signal(nix::sys::signal::Signal::SIGTERM);
    // Signals that arrive together may be delivered as one: send the second once the first
    // was seen.
    Poll::within(Duration::from_secs(10))
        .until(|| {
            node.log_text()
                .contains("send it again to exit at once")
                .then_some(())
        })
        .unwrap_or_else(|_| panic!("the node did not see the first signal: {}", node.log_text()));
    assert!(
        node.is_alive(),
        "the leave cannot finish without the router"
    );
    node.signal(nix::sys::signal::Signal::SIGTERM);
    let status = node
        .wait_exit(Duration::from_secs(20))
        .expect("the node exits after the second signal");
    assert_eq!(status.code(), Some(130), "{}", node.log_text());
}
