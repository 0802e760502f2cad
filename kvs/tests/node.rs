//! A node and its client in one process, over real loopback sockets.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use squall_kvs::{Client, ClientConfig, Config, Error, FsyncPolicy, KeyError, Node};
use squall_lattices::{
    BoolLattice, Counter, LatticeType, LatticeValue, Lww, MapLattice, Max, Min, OrderedSetLattice,
    Priority, SetLattice, SingleKeyCausal, Timestamp, VectorClock,
};
use squall_proto::{decode_response, encode_request, Request, Response};

fn config(shards: usize, data_dir: Option<&Path>) -> Config {
    Config {
        shards,
        data_dir: data_dir.map(Path::to_path_buf),
        ..Config::default()
    }
}

fn client(node: &Node) -> Client {
    Client::connect(
        node.address(),
        ClientConfig {
            timeout: Duration::from_secs(5),
            ..ClientConfig::default()
        },
    )
    .expect("connect")
}

fn lww(time: u64, value: &str) -> LatticeValue {
    LatticeValue::Lww(Lww::new(
        Timestamp::new(time, 1),
        Bytes::from(value.to_string()),
    ))
}

fn one_of_each_type() -> Vec<(String, LatticeValue)> {
    let b = |s: &str| Bytes::from(s.to_string());
    vec![
        ("lww".into(), lww(5, "v")),
        (
            "set".into(),
            LatticeValue::Set(SetLattice::from_iter([b("a"), b("b")])),
        ),
        (
            "oset".into(),
            LatticeValue::OrderedSet(OrderedSetLattice::from_iter([b("z"), b("y")])),
        ),
        ("max".into(), LatticeValue::Max(Max(7))),
        ("min".into(), LatticeValue::Min(Min(-7))),
        ("bool".into(), LatticeValue::Bool(BoolLattice(true))),
        ("counter".into(), LatticeValue::Counter(Counter::of(3, 11))),
        (
            "prio".into(),
            LatticeValue::Priority(Priority::new(0.5.into(), b("fast"))),
        ),
        (
            "map".into(),
            LatticeValue::Map(MapLattice::from_iter([(b("f"), LatticeValue::Max(Max(1)))])),
        ),
        (
            "causal".into(),
            LatticeValue::SingleCausal(SingleKeyCausal::with_version(
                VectorClock::from_iter([(1, 1)]),
                (),
                b("c"),
            )),
        ),
    ]
}

#[test]
fn every_lattice_type_round_trips_and_merges() {
    let node = Node::start(config(2, None)).expect("start");
    let mut client = client(&node);
    let entries = one_of_each_type();
    let results = client.put_many(entries.clone()).expect("put");
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let keys: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    let values = client.get_many(&keys).expect("get");
    for ((key, written), read) in entries.iter().zip(values) {
        assert_eq!(read.as_ref(), Some(written), "{key}");
    }

    // Writes merge: an older LWW write loses, a set grows, a counter adds.
    client.put("lww", lww(1, "older")).expect("put");
    assert_eq!(client.get("lww").expect("get"), Some(lww(5, "v")));
    client
        .put(
            "set",
            LatticeValue::Set(SetLattice::from_iter([Bytes::from_static(b"c")])),
        )
        .expect("put");
    match client.get("set").expect("get") {
        Some(LatticeValue::Set(set)) => assert_eq!(set.0.len(), 3),
        other => panic!("{other:?}"),
    }
    client.increment("counter", 4).expect("increment");
    client.increment("counter", -1).expect("increment");
    match client.get("counter").expect("get") {
        Some(LatticeValue::Counter(counter)) => assert_eq!(counter.value(), 14),
        other => panic!("{other:?}"),
    }
    assert_eq!(client.get("never-written").expect("get"), None);
}

#[test]
fn a_put_of_another_type_is_refused_and_changes_nothing() {
    let node = Node::start(config(2, None)).expect("start");
    let mut client = client(&node);
    client.put("k", LatticeValue::Max(Max(3))).expect("put");
    match client.put("k", lww(9, "x")) {
        Err(Error::Key {
            key,
            error: KeyError::TypeMismatch(mismatch),
        }) => {
            assert_eq!(key, "k");
            assert_eq!(mismatch.stored, LatticeType::Max);
            assert_eq!(mismatch.written, LatticeType::Lww);
        }
        other => panic!("expected a type mismatch, got {other:?}"),
    }
    assert_eq!(
        client.get("k").expect("get"),
        Some(LatticeValue::Max(Max(3)))
    );
    // The other keys of a batch are unaffected by one bad entry.
    let results = client
        .put_many(vec![
            ("k".into(), lww(1, "x")),
            ("other".into(), lww(1, "y")),
        ])
        .expect("put");
    assert!(results[0].is_err());
    assert!(results[1].is_ok());
    assert_eq!(client.get("other").expect("get"), Some(lww(1, "y")));
}

#[test]
fn a_key_sent_to_the_wrong_shard_is_refused() {
    let node = Node::start(config(2, None)).expect("start");
    let topology = node.topology().clone();
    let ring = squall_kvs::ring::Ring::new(2, topology.virtual_nodes);
    let key = (0..)
        .map(|i| format!("key{i}"))
        .find(|k| ring.owner(k) == 1)
        .expect("some key lands on shard 1");
    let socket = zmq::Context::new().socket(zmq::DEALER).expect("socket");
    socket.connect(&topology.shards[0]).expect("connect");
    let frame = encode_request(
        9,
        &Request::Put {
            entries: vec![(key, lww(1, "x"))],
        },
    )
    .expect("encode");
    socket.send(frame, 0).expect("send");
    assert_eq!(socket.poll(zmq::POLLIN, 5_000).expect("poll"), 1);
    let (id, response) = decode_response(&socket.recv_bytes(0).expect("recv")).expect("decode");
    assert_eq!(id, 9);
    assert_eq!(
        response,
        Response::Put(vec![Err(KeyError::WrongShard { owner: 1 })])
    );
}

#[test]
fn concurrent_counter_increments_all_count() {
    let node = Node::start(config(2, None)).expect("start");
    let address = node.address().to_string();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let address = address.clone();
            std::thread::spawn(move || {
                let mut client =
                    Client::connect(&address, ClientConfig::default()).expect("connect");
                for _ in 0..200 {
                    client.increment("hits", 1).expect("increment");
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer thread");
    }
    match client(&node).get("hits").expect("get") {
        Some(LatticeValue::Counter(counter)) => assert_eq!(counter.value(), 1600),
        other => panic!("{other:?}"),
    }
}

fn write_keys(client: &mut Client, count: usize) -> BTreeMap<String, LatticeValue> {
    let mut expected = BTreeMap::new();
    for chunk in (0..count).collect::<Vec<_>>().chunks(100) {
        let entries: Vec<(String, LatticeValue)> = chunk
            .iter()
            .map(|i| {
                (
                    format!("key-{i}"),
                    lww(*i as u64 + 1, &format!("value-{i}")),
                )
            })
            .collect();
        for result in client.put_many(entries.clone()).expect("put") {
            result.expect("key written");
        }
        expected.extend(entries);
    }
    expected
}

fn read_all(client: &mut Client, expected: &BTreeMap<String, LatticeValue>) {
    let keys: Vec<String> = expected.keys().cloned().collect();
    let values = client.get_many(&keys).expect("get");
    for (key, value) in keys.iter().zip(values) {
        assert_eq!(value.as_ref(), Some(&expected[key]), "{key}");
    }
}

#[test]
fn data_survives_a_restart_with_compaction_and_a_new_shard_count() {
    let dir = tempfile::tempdir().expect("tempdir");
    let small_log = |shards| Config {
        compact_after_bytes: 4 << 10,
        fsync: FsyncPolicy::Never,
        ..config(shards, Some(dir.path()))
    };
    let expected = {
        let node = Node::start(small_log(2)).expect("start");
        let mut client = client(&node);
        let expected = write_keys(&mut client, 2_000);
        read_all(&mut client, &expected);
        expected
    };
    let snapshots = |dir: &Path| {
        walk(dir)
            .into_iter()
            .filter(|p| p.ends_with(".snap"))
            .count()
    };
    assert!(
        snapshots(dir.path()) > 0,
        "the small log threshold should have produced snapshots"
    );

    for shards in [2, 3, 1] {
        let node = Node::start(small_log(shards)).expect("restart");
        assert_eq!(
            node.recovered_keys(),
            expected.len(),
            "with {shards} shards"
        );
        read_all(&mut client(&node), &expected);
    }
    let dirs: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dirs,
        vec!["shard-0".to_string()],
        "stale shard directories are removed"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path.to_string_lossy().into_owned());
        }
    }
    files
}

#[test]
fn a_client_gives_up_after_its_deadline_when_the_node_is_gone() {
    let node = Node::start(config(1, None)).expect("start");
    let mut client = Client::connect(
        node.address(),
        ClientConfig {
            timeout: Duration::from_millis(100),
            attempts: 2,
            ..ClientConfig::default()
        },
    )
    .expect("connect");
    node.shutdown();
    match client.get("k") {
        Err(Error::Timeout { attempts, .. }) => assert_eq!(attempts, 2),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

#[test]
fn a_crash_in_the_middle_of_a_relayout_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expected = {
        let node = Node::start(config(2, Some(dir.path()))).expect("start");
        write_keys(&mut client(&node), 500)
    };
    // Re-lay out to three shards by hand and "crash" after shard 0's new snapshot, before the
    // other shards write theirs and before any old file is deleted: shard 0's directory then
    // holds a snapshot without the keys that move away, next to the old segments that have them.
    let shard0 = dir.path().join("shard-0");
    let recovered = squall_kvs::log::recover(&shard0).expect("recover");
    let ring = squall_kvs::ring::Ring::new(3, Config::default().virtual_nodes);
    let kept: squall_kvs::log::Store = recovered
        .entries
        .iter()
        .filter(|(key, _)| ring.owner(key) == 0)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert!(
        kept.len() < recovered.entries.len(),
        "some keys must move away from shard 0"
    );
    let mut log =
        squall_kvs::log::ShardLog::open(&shard0, &recovered, FsyncPolicy::Always, 1 << 30)
            .expect("open");
    log.snapshot(&kept).expect("snapshot");
    drop(log);

    let node = Node::start(config(3, Some(dir.path()))).expect("restart");
    assert_eq!(node.recovered_keys(), expected.len());
    read_all(&mut client(&node), &expected);
    drop(node);
    let node = Node::start(config(3, Some(dir.path()))).expect("restart again");
    read_all(&mut client(&node), &expected);
}

#[test]
fn a_write_that_would_exceed_the_sibling_limit_is_refused_and_the_value_survives() {
    use squall_lattices::causal::MAX_VERSIONS;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = Node::start(config(1, Some(dir.path()))).expect("start");
    let mut client = client(&node);
    // Each writer's version is concurrent with every other: siblings accumulate.
    let version = |writer: u64| {
        LatticeValue::SingleCausal(SingleKeyCausal::with_version(
            VectorClock::from_iter([(writer, 1)]),
            (),
            Bytes::from(format!("from {writer}")),
        ))
    };
    for writer in 0..MAX_VERSIONS as u64 {
        client
            .put("doc", version(writer))
            .expect("within the limit");
    }
    match client.put("doc", version(MAX_VERSIONS as u64)) {
        Err(Error::Key {
            error: KeyError::LimitExceeded(_),
            ..
        }) => {}
        other => panic!("expected the sibling limit, got {other:?}"),
    }
    let siblings = |value: Option<LatticeValue>| match value {
        Some(LatticeValue::SingleCausal(v)) => v.versions().len(),
        other => panic!("{other:?}"),
    };
    assert_eq!(siblings(client.get("doc").expect("get")), MAX_VERSIONS);
    drop(client);
    drop(node);
    let node = Node::start(config(1, Some(dir.path()))).expect("restart");
    assert_eq!(
        siblings(self::client(&node).get("doc").expect("get")),
        MAX_VERSIONS
    );
}

#[test]
fn subscribers_get_pushes_of_watched_keys_only() {
    let node = Node::start(config(2, None)).expect("start");
    let context = zmq::Context::new();
    let pull = context.socket(zmq::PULL).expect("socket");
    pull.bind("tcp://127.0.0.1:*").expect("bind");
    pull.set_rcvtimeo(5_000).expect("timeout");
    let endpoint = pull.get_last_endpoint().expect("endpoint").expect("utf-8");
    let mut client = client(&node);
    client.put("watched", lww(1, "a")).expect("put");
    let subscription = client
        .subscribe(&endpoint, &["watched".to_string(), "absent".to_string()])
        .expect("subscribe");
    assert_eq!(
        subscription.values,
        vec![Some(squall_lattices::Entry::of(lww(1, "a"))), None]
    );
    assert!(!subscription.sessions.is_empty());
    // A write to an unwatched key is not pushed; writes to watched ones are, merged.
    client.put("other", lww(1, "x")).expect("put");
    client.put("watched", lww(2, "b")).expect("put");
    client.put("absent", lww(3, "c")).expect("put");
    let mut seen = std::collections::BTreeMap::new();
    while seen.len() < 2 {
        let frame = pull.recv_bytes(0).expect("a push within 5 s");
        match squall_proto::decode_response(&frame).expect("decode") {
            (0, squall_proto::Response::Notify { updates, session }) => {
                assert!(subscription.sessions.iter().any(|s| s.session == session));
                for (key, value) in updates {
                    seen.insert(key, value);
                }
            }
            other => panic!("unexpected message {other:?}"),
        }
    }
    assert_eq!(seen["watched"].value, Some(lww(2, "b")));
    assert_eq!(seen["absent"].value, Some(lww(3, "c")));
    assert!(!seen.contains_key("other"));
    // Renewal keeps the sessions; unsubscribing stops the pushes.
    let renewed = client.renew(&endpoint).expect("renew");
    for s in &subscription.sessions {
        assert!(renewed.contains(s), "{s:?} not in {renewed:?}");
    }
    client
        .unsubscribe(&endpoint, &["watched".to_string(), "absent".to_string()])
        .expect("unsubscribe");
    client.put("watched", lww(4, "d")).expect("put");
    pull.set_rcvtimeo(300).expect("timeout");
    assert!(pull.recv_bytes(0).is_err(), "pushed after unsubscribing");
    // A subscriber endpoint that is not an address is refused, and the node keeps serving.
    assert!(client
        .subscribe("not an endpoint", &["k".to_string()])
        .is_err());
    assert_eq!(client.get("watched").expect("get"), Some(lww(4, "d")));
}
