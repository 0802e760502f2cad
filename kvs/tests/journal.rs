//! Waiting for a shard's next change, over real loopback sockets: a held request is
//! answered with the change's sequence number once the write is journaled, one with nothing
//! new is answered when its wait ends, and waiting forgets nothing.

use std::time::Duration;

use squall_kvs::{Client, ClientConfig, Config, Node};

fn node() -> Node {
    Node::start(Config {
        shards: 1,
        ..Config::default()
    })
    .expect("a node")
}

fn client(node: &Node) -> Client {
    Client::connect(node.address(), ClientConfig::default()).expect("connect")
}

fn write(client: &mut Client, key: &str) {
    client.put_lww(key, "v").expect("a write");
}

#[test]
fn a_waiting_consumer_learns_of_each_journaled_change_and_waiting_forgets_none() {
    let node = node();
    let mut writer = client(&node);
    writer.journal(true).expect("journals on");
    let endpoint = writer.shard_endpoints().expect("the shards").remove(0);

    // Nothing journaled yet: the wait ends with nothing newer.
    let (newest, on) = writer
        .await_change(&endpoint, 0, Duration::from_millis(50))
        .expect("an answer");
    assert_eq!((newest, on), (0, true));

    // A consumer waits on another thread while a write is made; its answer names the
    // write's change, whether the write woke it or came before it asked.
    let mut waiter = client(&node);
    let waiting_on = endpoint.clone();
    let waited = std::thread::spawn(move || {
        let mut after = 0;
        // Waits again until it hears of a change (a wait may end with nothing newer).
        while after == 0 {
            after = waiter
                .await_change(&waiting_on, after, Duration::from_secs(1))
                .expect("an answer")
                .0;
        }
        after
    });
    write(&mut writer, "watched/a");
    let heard = waited.join().expect("the waiter");
    let (changes, lost, _) = writer.changes(&endpoint, 0, 10).expect("the changes");
    assert_eq!(lost, 0);
    assert_eq!(
        changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![heard],
        "the waiter heard of the one change, which is still there to take"
    );

    // Waiting past the newest answers at the end of its wait with the same newest; asking
    // below it answers at once.
    let (again, _) = writer
        .await_change(&endpoint, heard, Duration::from_millis(50))
        .expect("an answer");
    assert_eq!(again, heard);
    write(&mut writer, "watched/b");
    let (newer, _) = writer
        .await_change(&endpoint, heard, Duration::from_secs(1))
        .expect("an answer");
    assert!(newer > heard, "{newer} after {heard}");
    let (changes, _, _) = writer.changes(&endpoint, heard, 10).expect("the changes");
    assert_eq!(
        changes.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![newer]
    );
}
