//! Deletes, expiry and prefix listing on a node, over real loopback sockets: what reads see,
//! what a restart replays, and that expired keys and tombstones leave the store.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use squall_kvs::{Client, ClientConfig, Config, Node};
use squall_lattices::{Counter, LatticeValue};
use squall_proto::poll::Poll;

fn config(data_dir: Option<&Path>, tombstone_grace_ms: u64) -> Config {
    Config {
        shards: 2,
        data_dir: data_dir.map(Path::to_path_buf),
        tombstone_grace_ms,
        ..Config::default()
    }
}

fn client(node: &Node) -> Client {
    Client::connect(node.address(), ClientConfig::default()).expect("connect")
}

fn text(value: Option<LatticeValue>) -> Option<Bytes> {
    match value {
        Some(LatticeValue::Lww(register)) => Some(register.value),
        None => None,
        other => panic!("not a register: {other:?}"),
    }
}

/// Keys held by the node's shards, tombstones included (their load reports).
fn keys_held(node: &Node) -> u64 {
    let reports = client(node).stats().expect("the shards' reports");
    assert_eq!(reports.len(), node.topology().shards.len());
    reports.iter().map(|report| report.keys).sum()
}

#[test]
fn a_delete_hides_the_value_and_later_writes_start_again() {
    let node = Node::start(config(None, 3_600_000)).expect("start");
    let mut client = client(&node);
    client.put_lww("name", "before").expect("put");
    client.delete("name").expect("delete");
    assert_eq!(client.get("name").expect("get"), None);
    client.put_lww("name", "after").expect("put");
    assert_eq!(text(client.get("name").expect("get")), Some("after".into()));

    // A counter counts again from nothing after a delete, from the deleting client too.
    client.increment("visits", 5).expect("increment");
    client.delete("visits").expect("delete");
    client.increment("visits", 2).expect("increment");
    match client.get("visits").expect("get") {
        Some(LatticeValue::Counter(counter)) => assert_eq!(counter.value(), 2),
        other => panic!("{other:?}"),
    }
    // And after an expiry: a write to an expired key starts the next epoch.
    let mut counter = Counter::new();
    counter.add(9, 7);
    client
        .put_expiring(
            "window",
            LatticeValue::Counter(counter),
            Some(Duration::from_millis(50)),
        )
        .expect("put");
    std::thread::sleep(Duration::from_millis(100));
    client
        .put("window", LatticeValue::Counter(Counter::of(9, 1)))
        .expect("put");
    match client.get("window").expect("get") {
        Some(LatticeValue::Counter(counter)) => assert_eq!(counter.value(), 1),
        other => panic!("{other:?}"),
    }
    // Deleting lets the key take another type.
    client.delete("name").expect("delete");
    client
        .put("name", LatticeValue::Counter(Counter::of(1, 1)))
        .expect("another type after a delete");
}

#[test]
fn expired_values_read_as_absent_and_an_expiry_can_be_changed_or_cleared() {
    let node = Node::start(config(None, 3_600_000)).expect("start");
    let mut client = client(&node);
    client
        .put_lww_expiring("short", "soon gone", Some(Duration::from_millis(300)))
        .expect("put");
    client
        .put_lww_expiring("kept", "stays", Some(Duration::from_millis(300)))
        .expect("put");
    client.expire("kept", None).expect("persist");
    client
        .expire("absent", Some(Duration::from_secs(1)))
        .expect("an expiry for an absent key changes nothing");
    assert_eq!(
        text(client.get("short").expect("get")),
        Some("soon gone".into())
    );
    Poll::within(Duration::from_secs(10))
        .until(|| client.get("short").expect("get").is_none().then_some(()))
        .expect("the value expired");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(text(client.get("kept").expect("get")), Some("stays".into()));
    assert_eq!(client.get("absent").expect("get"), None);
    // A new value without an expiry clears it, as Redis's SET does.
    client
        .put_lww_expiring("reset", "a", Some(Duration::from_millis(200)))
        .expect("put");
    client.put_lww("reset", "b").expect("put");
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(text(client.get("reset").expect("get")), Some("b".into()));
}

#[test]
fn deletes_and_expiries_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let node = Node::start(config(Some(dir.path()), 3_600_000)).expect("start");
        let mut client = client(&node);
        client.put_lww("deleted", "x").expect("put");
        client.delete("deleted").expect("delete");
        client
            .put_lww_expiring("expiring", "y", Some(Duration::from_millis(200)))
            .expect("put");
        client.put_lww("kept", "z").expect("put");
        node.shutdown();
    }
    std::thread::sleep(Duration::from_millis(300));
    let node = Node::start(config(Some(dir.path()), 3_600_000)).expect("restart");
    let mut client = client(&node);
    assert_eq!(client.get("deleted").expect("get"), None);
    assert_eq!(client.get("expiring").expect("get"), None);
    assert_eq!(text(client.get("kept").expect("get")), Some("z".into()));
    assert_eq!(client.list("", None, 10).expect("list").0, vec!["kept"]);
}

#[test]
fn expired_keys_and_old_tombstones_leave_the_store() {
    let node = Node::start(config(None, 0)).expect("start");
    let mut client = client(&node);
    for i in 0..500 {
        client
            .put_lww_expiring(
                &format!("session/{i:03}"),
                "token",
                Some(Duration::from_millis(200)),
            )
            .expect("put");
    }
    for i in 0..100 {
        client.put_lww(&format!("gone/{i:03}"), "x").expect("put");
        client.delete(&format!("gone/{i:03}")).expect("delete");
    }
    client.put_lww("kept", "z").expect("put");
    let held =
        Poll::within(Duration::from_secs(10)).until(|| (keys_held(&node) == 1).then_some(()));
    assert!(held.is_ok(), "still {} keys held", keys_held(&node));
    assert_eq!(client.list("", None, 1000).expect("list").0, vec!["kept"]);
}

#[test]
fn a_prefix_lists_in_order_over_every_shard_in_pages() {
    let node = Node::start(config(None, 3_600_000)).expect("start");
    let mut client = client(&node);
    for i in 0..50 {
        client.put_lww(&format!("user/{i:02}"), "u").expect("put");
        client.put_lww(&format!("order/{i:02}"), "o").expect("put");
    }
    client.delete("user/07").expect("delete");
    client
        .put_lww_expiring("user/08", "u", Some(Duration::from_millis(1)))
        .expect("put");
    std::thread::sleep(Duration::from_millis(20));
    let mut listed = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = client.list("user/", after.as_deref(), 16).expect("list");
        assert!(page.len() <= 16);
        listed.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let expected: Vec<String> = (0..50)
        .filter(|i| *i != 7 && *i != 8)
        .map(|i| format!("user/{i:02}"))
        .collect();
    assert_eq!(listed, expected);
    assert!(client.list("nobody/", None, 10).expect("list").0.is_empty());
}

#[test]
fn sizes_of_a_prefix_count_live_keys_over_every_shard_in_pages() {
    let node = Node::start(config(None, 3_600_000)).expect("start");
    let mut client = client(&node);
    for i in 0..40 {
        let value = if i % 2 == 0 {
            "s".repeat(100)
        } else {
            "b".repeat(1100)
        };
        client
            .put_lww(&format!("tenant/{i:02}"), value)
            .expect("put");
    }
    client.put_lww("tenantless", "x".repeat(5000)).expect("put");
    client.delete("tenant/03").expect("delete");
    client
        .put_lww_expiring("tenant/05", "u", Some(Duration::from_millis(1)))
        .expect("put");
    std::thread::sleep(Duration::from_millis(20));
    let mut sized = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let (page, next) = client.sizes("tenant/", after.as_deref(), 7).expect("sizes");
        assert!(page.len() <= 7);
        sized.extend(page);
        match next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let keys: Vec<&str> = sized.iter().map(|(key, _)| key.as_str()).collect();
    let expected: Vec<String> = (0..40)
        .filter(|i| *i != 3 && *i != 5)
        .map(|i| format!("tenant/{i:02}"))
        .collect();
    assert_eq!(keys, expected);
    // A size is the key, the value and the entry's own few bytes (stamp, expiry).
    let small = sized[0].1;
    assert!(small > 100 + 9 && small < 100 + 9 + 64, "{small}");
    // 1000 bytes more value, and a length prefix that may be a byte longer.
    let big = sized[1].1;
    assert!(
        (small + 1000..=small + 1002).contains(&big),
        "{small} {big}"
    );
    assert!(sized.iter().all(|(_, size)| *size == small || *size == big));
    let total: u64 = sized.iter().map(|(_, size)| size).sum();
    assert_eq!(client.stored_bytes("tenant/").expect("bytes"), (38, total));
    assert_eq!(client.stored_bytes("nobody/").expect("bytes"), (0, 0));
}

#[test]
fn sizes_count_every_key_when_a_shard_stops_its_page_at_its_byte_cap() {
    let node = Node::start(config(None, 3_600_000)).expect("start");
    let mut client = client(&node);
    // Ten values of 1 MiB sort first: a shard holding five or more stops its page at its
    // 4 MiB cap, short of the page's key limit, while the other answers many small keys.
    for i in 0..10 {
        client
            .put_lww(&format!("p/big{i}"), vec![b'x'; 1 << 20])
            .expect("put");
    }
    for i in 0..4000 {
        client.put_lww(&format!("p/small{i:04}"), "s").expect("put");
    }
    let (keys, bytes) = client.stored_bytes("p/").expect("sizes");
    assert_eq!(keys, 4010);
    assert!(bytes > 10 << 20, "{bytes}");
}
