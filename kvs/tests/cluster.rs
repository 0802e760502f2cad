//! A cluster in one process: a router and storage nodes on loopback, replication 2.
//! (`tests/all/cluster.rs` runs the same roles as separate processes and SIGKILLs them.)

use std::time::Duration;

use bytes::Bytes;
use squall_kvs::{Client, ClientConfig, ClusterConfig, Config, Node, Router, RouterConfig};
use squall_lattices::LatticeValue;
use squall_proto::poll::Poll;

fn router() -> Router {
    Router::start(RouterConfig {
        dead_after_ms: 600,
        ..RouterConfig::default()
    })
    .expect("router")
}

fn node(router: &Router) -> Node {
    Node::start(Config {
        shards: 2,
        cluster: Some(ClusterConfig {
            router: router.address().to_string(),
            heartbeat_ms: 100,
            gossip_ms: 200,
            // No load reports during these tests: they are keys of the store's own, and the
            // tests count keys.
            stats_ms: 600_000,
        }),
        ..Config::default()
    })
    .expect("node")
}

fn client(router: &Router) -> Client {
    let mut last = None;
    Poll::within(Duration::from_secs(10))
        .every(Duration::from_millis(50))
        .until(
            || match Client::connect(router.address(), ClientConfig::default()) {
                Ok(client) => Some(client),
                Err(e) => {
                    last = Some(e);
                    None
                }
            },
        )
        .unwrap_or_else(|_| panic!("no cluster: {last:?}"))
}

/// Waits (at most 20 s) until the router's status passes `done`; else fails, saying `what`
/// and the last status.
fn status_until(router: &Router, what: &str, done: impl Fn(&squall_proto::ClusterStatus) -> bool) {
    let mut last = None;
    Poll::within(Duration::from_secs(20))
        .every(Duration::from_millis(50))
        .until(|| {
            let status = squall_kvs::router::status(router.address()).ok()?;
            let passed = done(&status);
            last = Some(status);
            passed.then_some(())
        })
        .unwrap_or_else(|_| panic!("{what} never came: {last:?}"));
}

/// Waits until the router's view has `members` members that all finished their hand-off.
fn settle(router: &Router, members: usize) {
    status_until(
        router,
        &format!("a cluster settled with {members} members"),
        |s| s.settled_with(members),
    );
}

/// Waits until the members hold `expected` entries in all, as their stats report them (sent
/// every few hundred milliseconds, so a settled view's last hand-off may not be counted yet).
fn held_becomes(router: &Router, expected: u64) {
    status_until(router, &format!("{expected} entries held"), |s| {
        s.members.iter().map(|m| m.stats.keys).sum::<u64>() == expected
    });
}

fn text(value: Option<LatticeValue>) -> Option<Bytes> {
    match value {
        Some(LatticeValue::Lww(lww)) => Some(lww.value.clone()),
        other => panic!("not an lww value: {other:?}"),
    }
}

#[test]
fn keys_live_on_two_replicas_and_survive_a_node_stopping() {
    let router = router();
    let nodes: Vec<Node> = (0..3).map(|_| node(&router)).collect();
    settle(&router, 3);
    let mut client = client(&router);
    assert_eq!(client.view().expect("a cluster").members.len(), 3);
    for i in 0..300 {
        client
            .put_lww(&format!("k{i}"), format!("v{i}"))
            .expect("put");
    }
    for i in 0..300 {
        let replicas = client.get_replicas(&format!("k{i}")).expect("replicas");
        assert_eq!(replicas.len(), 2);
        for (member, value) in replicas {
            let value = value.unwrap_or_else(|e| panic!("{member}: {e}"));
            assert_eq!(text(value), Some(Bytes::from(format!("v{i}"))), "{member}");
        }
    }
    let [a, b, c]: [Node; 3] = nodes.try_into().expect("three");
    let gone = c.address().to_string();
    c.shutdown();
    // Reads keep working while the router has not noticed yet, and after.
    for i in 0..300 {
        let value = client.get(&format!("k{i}")).expect("get");
        assert_eq!(text(value), Some(Bytes::from(format!("v{i}"))));
    }
    settle(&router, 2);
    client.refresh().expect("refresh");
    assert!(client
        .view()
        .expect("view")
        .members
        .iter()
        .all(|m| m.id != gone));
    for i in 0..300 {
        let replicas = client.get_replicas(&format!("k{i}")).expect("replicas");
        assert_eq!(replicas.len(), 2, "re-replicated on both survivors");
        for (member, value) in replicas {
            assert_eq!(
                text(value.expect("answer")),
                Some(Bytes::from(format!("v{i}"))),
                "{member} holds k{i}"
            );
        }
    }
    drop((a, b));
}

#[test]
fn a_joining_node_receives_its_keys_and_a_leaving_one_hands_them_off() {
    let router = router();
    let a = node(&router);
    let b = node(&router);
    settle(&router, 2);
    let mut client = client(&router);
    for i in 0..400 {
        client
            .put_lww(&format!("k{i}"), format!("v{i}"))
            .expect("put");
    }
    let c = node(&router);
    settle(&router, 3);
    client.refresh().expect("refresh");
    let c_id = c.address().to_string();
    let mut on_c = 0;
    for i in 0..400 {
        let replicas = client.get_replicas(&format!("k{i}")).expect("replicas");
        for (member, value) in replicas {
            assert_eq!(
                text(value.expect("answer")),
                Some(Bytes::from(format!("v{i}")))
            );
            on_c += usize::from(member == c_id);
        }
    }
    assert!(on_c > 100, "the new node holds {on_c} keys");
    // Every node holds exactly its keys: the old owners dropped what moved.
    held_becomes(&router, 2 * 400);

    assert!(b.leave(Duration::from_secs(10)), "hand-off finished");
    settle(&router, 2);
    client.refresh().expect("refresh");
    for i in 0..400 {
        for (member, value) in client.get_replicas(&format!("k{i}")).expect("replicas") {
            assert_eq!(
                text(value.expect("answer")),
                Some(Bytes::from(format!("v{i}"))),
                "{member} k{i}"
            );
        }
    }
    drop((a, c));
}

#[test]
fn a_key_given_more_replicas_gets_them_and_gives_them_back() {
    let router = router();
    let nodes: Vec<Node> = (0..3).map(|_| node(&router)).collect();
    settle(&router, 3);
    let mut client = client(&router);
    for i in 0..100 {
        client
            .put_lww(&format!("k{i}"), format!("v{i}"))
            .expect("put");
    }
    client.put_lww("hot", "fire").expect("put");
    let view = squall_kvs::router::replicate(router.address(), "hot", Some(3)).expect("replicate");
    assert_eq!(view.overrides, [("hot".to_string(), 3)]);
    settle(&router, 3);
    let holders = |client: &mut Client| {
        client
            .get_replicas("hot")
            .expect("replicas")
            .into_iter()
            .filter(|(_, v)| matches!(v, Ok(Some(_))))
            .count()
    };
    client.refresh().expect("refresh");
    assert_eq!(holders(&mut client), 3);
    // Writes to the hot key reach every replica; any one of them answers a read.
    client.put_lww("hot", "ice").expect("put");
    for _ in 0..6 {
        assert_eq!(
            text(client.get("hot").expect("get")),
            Some(Bytes::from("ice"))
        );
    }
    squall_kvs::router::replicate(router.address(), "hot", None).expect("replicate");
    settle(&router, 3);
    client.refresh().expect("refresh");
    assert_eq!(holders(&mut client), 2);
    held_becomes(&router, 2 * 101);
    assert_eq!(
        text(client.get("hot").expect("get")),
        Some(Bytes::from("ice"))
    );
    drop(nodes);
}

#[test]
fn deletes_move_with_their_keys_and_a_late_old_copy_cannot_undo_them() {
    let router = router();
    let a = node(&router);
    let b = node(&router);
    settle(&router, 2);
    let mut client = client(&router);
    let mut old = Vec::new();
    for i in 0..400 {
        let key = format!("k{i}");
        client.put_lww(&key, format!("v{i}")).expect("put");
        if i % 4 == 0 {
            let Some(value) = client.get(&key).expect("get") else {
                panic!("{key} was just written");
            };
            old.push((key.clone(), squall_lattices::Entry::of(value)));
            client.delete(&key).expect("delete");
        }
    }
    let c = node(&router);
    settle(&router, 3);
    client.refresh().expect("refresh");
    // Tombstones are entries like any other: every key, deleted or not, has two replicas.
    held_becomes(&router, 2 * 400);
    // A copy from before the delete, arriving late (as from a node back from a partition),
    // merges under the tombstone.
    for result in client.merge_many(old).expect("merge") {
        result.expect("merged");
    }
    for i in 0..400 {
        let expected = (i % 4 != 0).then(|| Bytes::from(format!("v{i}")));
        for (member, value) in client.get_replicas(&format!("k{i}")).expect("replicas") {
            let value = value.expect("answer");
            assert_eq!(value.is_some(), expected.is_some(), "{member} k{i}");
            assert_eq!(value.and_then(|v| text(Some(v))), expected, "{member} k{i}");
        }
    }
    assert_eq!(client.list("k", None, 1000).expect("list").0.len(), 300);
    // Sizes count each live key once, whatever its number of replicas.
    let (keys, bytes) = client.stored_bytes("k").expect("sizes");
    assert_eq!(keys, 300);
    let (sized, next) = client.sizes("k", None, 1000).expect("sizes");
    assert_eq!((sized.len(), next), (300, None));
    assert_eq!(bytes, sized.iter().map(|(_, size)| size).sum::<u64>());
    let smallest = sized.iter().map(|(_, size)| *size).min().unwrap_or(0);
    let largest = sized.iter().map(|(_, size)| *size).max().unwrap_or(0);
    // Keys and values of 1 to 3 digits: sizes differ by at most 4 bytes, never twice over.
    assert!(smallest > 0 && largest <= smallest + 4, "{sized:?}");
    drop((a, b, c));
}
