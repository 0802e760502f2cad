//! Registries written under the key layout before namespaces are found after `legacy::migrate`,
//! which can run any number of times.

use std::time::Duration;

use bytes::Bytes;
use squall_kvs::{Config, Node};
use squall_lattices::{LatticeValue, Lww, MapLattice, SetLattice, Timestamp};
use squall_state::{legacy, ClientPool, DagRegistry, FunctionRecord, Limits, Registry};

fn record(name: &str) -> FunctionRecord {
    FunctionRecord {
        name: name.into(),
        version: 1,
        sha256: "ab".repeat(32),
        size: 3,
        limits: Limits::default(),
        registered_ms: 1,
        deleted: false,
    }
}

#[test]
fn registries_of_the_old_layout_are_found_after_migrating() {
    let node = Node::start(Config {
        port: 0,
        shards: 1,
        ..Config::default()
    })
    .expect("storage node");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let pool = ClientPool::connect(node.address(), Duration::from_secs(2)).expect("pool");
        // What an older Squall wrote: a function's versions (a map from the zero-padded
        // version to its record), the set of names, and a DAG's record.
        let encoded = rmp_serde::to_vec(&record("incr")).expect("encode");
        let versions = MapLattice::from_iter([(
            Bytes::from(format!("{:020}", 1)),
            LatticeValue::Lww(Lww::new(Timestamp::new(1, 1), encoded.into())),
        )]);
        let dag = serde_json::json!({
            "name": "d", "version": 1, "registered_ms": 1, "deleted": false,
            "spec": {"functions": ["incr"], "edges": []}
        });
        let dag: squall_state::DagRecord = serde_json::from_value(dag).expect("a DAG record");
        let dag = rmp_serde::to_vec(&dag).expect("encode");
        pool.with(move |c| {
            c.put("squall/fn/incr", LatticeValue::Map(versions))?;
            c.put(
                "squall/functions",
                LatticeValue::Set(SetLattice::from_iter([Bytes::from("incr")])),
            )?;
            c.put(
                "squall/dag/d",
                LatticeValue::Lww(Lww::new(Timestamp::new(1, 1), dag.into())),
            )?;
            c.put(
                "squall/dags",
                LatticeValue::Set(SetLattice::from_iter([Bytes::from("d")])),
            )
        })
        .await
        .expect("old layout written");

        let functions = Registry::direct(pool.clone());
        assert!(functions.newest("incr").await.expect("read").is_none());
        assert_eq!(legacy::migrate(&pool).await.expect("migrated"), 2);
        let found = functions.newest("incr").await.expect("read");
        assert_eq!(found, Some(record("incr")));
        assert_eq!(functions.names().await.expect("names"), ["incr"]);
        let dags = DagRegistry::new(pool.clone(), None);
        assert_eq!(dags.list().await.expect("dags").len(), 1);
        // Again: nothing changes, nothing is lost.
        assert_eq!(legacy::migrate(&pool).await.expect("migrated"), 2);
        assert_eq!(
            functions.newest("incr").await.expect("read"),
            Some(record("incr"))
        );
    });
}
