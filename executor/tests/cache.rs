//! The colocated cache against a real storage node on loopback: fills, pushes, eviction,
//! and recovery when the node forgets the cache.

use std::time::{Duration, Instant};

use bytes::Bytes;
use squall_executor::{Config, Executor};
use squall_kvs::{Client, ClientConfig, Node};
use squall_lattices::{LatticeValue, Lww, Timestamp};
use squall_proto::poll::Poll;
use squall_state::CacheConfig;

fn lww(time: u64, value: &str) -> LatticeValue {
    LatticeValue::Lww(Lww::new(
        Timestamp::new(time, 1),
        Bytes::from(value.to_string()),
    ))
}

fn client(node: &Node) -> Client {
    Client::connect(node.address(), ClientConfig::default()).expect("client")
}

fn with_cache(node: &Node, cache: CacheConfig) -> Executor {
    Executor::start(
        Config {
            cache,
            ..Config::default()
        },
        node.address(),
    )
    .expect("executor")
}

/// Reads `key` through the cache until it holds `expected`, within a deadline.
async fn eventually(executor: &Executor, key: &str, expected: &LatticeValue) {
    let held = Poll::within(Duration::from_secs(10))
        .every(Duration::from_millis(10))
        .until_async(|| async {
            let held = executor.cache().get(key).await.expect("get");
            (held.as_ref() == Some(expected)).then_some(())
        })
        .await;
    if held.is_err() {
        let held = executor.cache().get(key).await.expect("get");
        panic!("{key} still {held:?}, expected {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_pushes_changes_of_held_keys_to_the_cache() {
    let node = Node::start(squall_kvs::Config {
        shards: 2,
        ..squall_kvs::Config::default()
    })
    .expect("node");
    let executor = with_cache(&node, CacheConfig::default());
    let mut writer = client(&node);
    writer.put("k", lww(1, "one")).expect("put");
    let cache = executor.cache();
    assert_eq!(cache.get("k").await.expect("get"), Some(lww(1, "one")));
    assert_eq!(cache.get("absent").await.expect("get"), None);
    assert_eq!(cache.stats().misses, 2);
    // Another writer changes both keys; the node pushes them; the cache never asks again.
    writer.put("k", lww(2, "two")).expect("put");
    writer.put("absent", lww(1, "now here")).expect("put");
    eventually(&executor, "k", &lww(2, "two")).await;
    eventually(&executor, "absent", &lww(1, "now here")).await;
    let stats = cache.stats();
    assert_eq!(stats.misses, 2, "{stats:?}");
    assert!(stats.pushes >= 2, "{stats:?}");
    // An older write merges away: the cache never goes back.
    writer.put("k", lww(1, "stale")).expect("put");
    assert_eq!(cache.get("k").await.expect("get"), Some(lww(2, "two")));
    // Writes through the cache reach the store and merge there.
    let merged = cache.merge("k", lww(3, "three")).await.expect("merge");
    assert_eq!(merged, lww(3, "three"));
    assert_eq!(writer.get("k").expect("get"), Some(lww(3, "three")));
    // A mismatched type is refused by the store, and the cached value stays.
    let counter = LatticeValue::Counter(squall_lattices::Counter::default());
    assert!(cache.merge("k", counter).await.is_err());
    assert_eq!(cache.get("k").await.expect("get"), Some(lww(3, "three")));
    // A delete elsewhere reaches the cache as a push: the held value goes.
    writer.delete("k").expect("delete");
    let gone = Poll::within(Duration::from_secs(10))
        .until_async(|| async { cache.get("k").await.expect("get").is_none().then_some(()) })
        .await;
    assert!(gone.is_ok(), "the cache still holds k after its delete");
    assert_eq!(cache.stats().misses, 2, "the delete came by push");
    // A later write is seen again, through the cache as from elsewhere.
    let rewritten = cache
        .merge("k", lww(u64::MAX / 2, "back"))
        .await
        .expect("merge");
    assert_eq!(rewritten, lww(u64::MAX / 2, "back"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_stays_within_its_capacity() {
    let node = Node::start(squall_kvs::Config::default()).expect("node");
    let executor = with_cache(
        &node,
        CacheConfig {
            capacity_bytes: 16 << 10,
            renew_interval: Duration::from_millis(100),
            ..CacheConfig::default()
        },
    );
    let mut writer = client(&node);
    let big = "x".repeat(1024);
    for i in 0..64 {
        writer.put(&format!("key/{i}"), lww(1, &big)).expect("put");
    }
    for i in 0..64 {
        let value = executor
            .cache()
            .get(&format!("key/{i}"))
            .await
            .expect("get");
        assert_eq!(value, Some(lww(1, &big)));
    }
    let (keys, bytes) = executor.cache().occupancy();
    assert!(bytes <= 16 << 10, "{keys} keys, {bytes} bytes");
    assert!(executor.cache().stats().evictions >= 48);
    // Evicted keys are read again from the store, correctly.
    assert_eq!(
        executor.cache().get("key/0").await.expect("get"),
        Some(lww(1, &big))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_that_forgot_the_cache_makes_it_refill() {
    let data = tempfile::tempdir().expect("tempdir");
    let config = squall_kvs::Config {
        shards: 1,
        data_dir: Some(data.path().to_path_buf()),
        ..squall_kvs::Config::default()
    };
    let node = Node::start(config.clone()).expect("node");
    let port: u16 = node
        .address()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let executor = with_cache(
        &node,
        CacheConfig {
            renew_interval: Duration::from_millis(100),
            ..CacheConfig::default()
        },
    );
    client(&node).put("k", lww(1, "before")).expect("put");
    assert_eq!(
        executor.cache().get("k").await.expect("get"),
        Some(lww(1, "before"))
    );
    node.shutdown();
    // The node comes back on the same port with its data but without its subscriptions; a
    // write made now is not pushed, so only the session check can bring it to the cache.
    let node = Node::start(squall_kvs::Config { port, ..config }).expect("restart");
    client(&node).put("k", lww(2, "after")).expect("put");
    eventually(&executor, "k", &lww(2, "after")).await;
    assert!(executor.cache().stats().resyncs >= 1);
}

fn causal(
    clock: &[(u64, u64)],
    dependencies: &[(&str, &[(u64, u64)])],
    value: &str,
) -> LatticeValue {
    LatticeValue::MultiCausal(squall_lattices::MultiKeyCausal::with_version(
        clock.iter().copied().collect(),
        dependencies
            .iter()
            .map(|(key, clock)| (key.to_string(), clock.iter().copied().collect()))
            .collect(),
        Bytes::from(value.to_string()),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn causal_sessions_read_causal_cuts_and_write_their_dependencies() {
    use squall_state::{Consistency, Error as StateError};
    let node = Node::start(squall_kvs::Config::default()).expect("node");
    let executor = with_cache(&node, CacheConfig::default());
    let cache = executor.cache();
    // a at {1:1}; b depends on a at {1:2}, a version the store does not have yet.
    cache
        .merge("a", causal(&[(1, 1)], &[], "a1"))
        .await
        .expect("a");
    cache
        .merge("b", causal(&[(2, 1)], &[("a", &[(1, 2)])], "b1"))
        .await
        .expect("b");

    // Having read a at {1:1}, a run cannot read this b: it depends on a newer a.
    let mut session = cache.session(Consistency::Causal);
    assert_eq!(
        session.get("a").await.expect("a"),
        Some(causal(&[(1, 1)], &[], "a1"))
    );
    let refused = session.get("b").await.expect_err("b is outside the cut");
    assert!(
        matches!(&refused, StateError::CausalCut { key, .. } if key == "b"),
        "{refused}"
    );

    // Having read b first, a run needs a at {1:2} or later: the store has none.
    let mut session = cache.session(Consistency::Causal);
    session.get("b").await.expect("b");
    let refused = session.get("a").await.expect_err("no a new enough");
    assert!(
        refused.to_string().contains("no version as new"),
        "{refused}"
    );
    // Once it is written (by another writer, straight to the store), a run that read b reads
    // it, whether the store's push reached the cache first or the read goes to the store.
    client(&node)
        .put("a", causal(&[(1, 2)], &[], "a2"))
        .expect("a2");
    let mut session = cache.session(Consistency::Causal);
    session.get("b").await.expect("b");
    assert_eq!(
        session.get("a").await.expect("a"),
        Some(causal(&[(1, 2)], &[], "a2"))
    );

    // A causal write is a multi-key causal version: the run's version of the key advanced at
    // the writer, depending on everything the run read.
    let stamp = Timestamp::new(50, 9);
    let written = session
        .put_bytes("c", Bytes::from_static(b"c1"), stamp)
        .await
        .expect("c");
    assert_eq!(
        written,
        causal(&[(9, 50)], &[("a", &[(1, 2)]), ("b", &[(2, 1)])], "c1")
    );
    // Writing it again advances the writer's entry past its own earlier write.
    let again = session
        .put_bytes("c", Bytes::from_static(b"c2"), Timestamp::new(10, 9))
        .await
        .expect("c again");
    let LatticeValue::MultiCausal(again) = again else {
        panic!("{again:?}")
    };
    assert_eq!(
        again.values().collect::<Vec<_>>(),
        [&Bytes::from_static(b"c2")]
    );
    assert_eq!(again.clock(), [(9, 51)].into_iter().collect());

    // A causal write of an lww key is refused, naming the mismatch; lww writes of causal
    // keys are refused by the store.
    cache.merge("plain", lww(1, "x")).await.expect("plain");
    let refused = session
        .put_bytes("plain", Bytes::from_static(b"y"), stamp)
        .await
        .expect_err("mode mismatch");
    assert!(
        matches!(refused, StateError::ModeMismatch { .. }),
        "{refused}"
    );
    let mut plain = cache.session(Consistency::Lww);
    assert!(plain
        .put_bytes("c", Bytes::from_static(b"z"), stamp)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_causal_step_refuses_versions_handed_on_that_do_not_form_a_cut() {
    use std::sync::Arc;

    use squall_proto::call::{digest, PinRef};
    use squall_state::{Consistency, Error as StateError, RunContext};
    let node = Node::start(squall_kvs::Config::default()).expect("node");
    let executor = with_cache(&node, CacheConfig::default());
    let cache = executor.cache();
    let x1 = causal(&[(1, 1)], &[], "x1");
    cache.merge("x", x1.clone()).await.expect("x");
    // After parallel branches: one read x at {1:1}, the other read a version that depends on
    // x at {1:2} (the step's floors say so).
    let context = |floor: &[(u64, u64)]| RunContext {
        call: 7,
        upstream: Arc::new(
            [(
                "x".to_string(),
                vec![PinRef {
                    key: "x".into(),
                    digest: digest(Some(&x1)),
                    holder: "tcp://127.0.0.1:9".into(),
                    clock: [(1, 1)].into_iter().collect(),
                    dependencies: Default::default(),
                }],
            )]
            .into_iter()
            .collect(),
        ),
        source: None,
        deadline: Instant::now() + Duration::from_secs(10),
        here: "tcp://127.0.0.1:8".into(),
        floors: Arc::new(
            [("x".to_string(), floor.iter().copied().collect())]
                .into_iter()
                .collect(),
        ),
        declared: Vec::new(),
        fan_in: true,
    };
    let mut session = cache.run_session(
        Consistency::Causal,
        executor.pins().open(7, Instant::now()),
        context(&[(1, 2)]),
    );
    let refused = session.get("x").await.expect_err("outside the cut");
    assert!(matches!(refused, StateError::CausalCut { .. }), "{refused}");
    // Handed on versions that fit are read as they are (here from the local cache).
    let mut session = cache.run_session(
        Consistency::Causal,
        executor.pins().open(8, Instant::now()),
        context(&[(1, 1)]),
    );
    assert_eq!(session.get("x").await.expect("x"), Some(x1));
}
