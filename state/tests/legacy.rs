//! Registries written under the key layout before namespaces are found after `legacy::migrate`,
//! which can run any number of times; keys of that time are moved into the default namespace
//! by `legacy::move_tenant_keys`, once.

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
        assert_eq!(
            functions
                .names(squall_proto::keys::DEFAULT_NAMESPACE)
                .await
                .expect("names"),
            ["incr"]
        );
        let dags = DagRegistry::new(pool.clone(), None);
        assert_eq!(
            dags.list(squall_proto::keys::DEFAULT_NAMESPACE)
                .await
                .expect("dags")
                .len(),
            1
        );
        // Again: nothing changes, nothing is lost.
        assert_eq!(legacy::migrate(&pool).await.expect("migrated"), 2);
        assert_eq!(
            functions.newest("incr").await.expect("read"),
            Some(record("incr"))
        );
    });
}

#[test]
fn keys_from_before_namespaces_move_into_the_default_namespace_once_with_their_expiry() {
    use squall_proto::keys;
    let node = Node::start(Config {
        port: 0,
        shards: 2,
        ..Config::default()
    })
    .expect("storage node");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let pool = ClientPool::connect(node.address(), Duration::from_secs(2)).expect("pool");
        // What an older Squall held: users' keys as they were named (one expiring, some
        // sorting after Squall's own), and a record of Squall's own.
        pool.with(|c| {
            for i in 0..1200 {
                c.put_lww(&format!("k/{i:04}"), format!("v{i}"))?;
            }
            c.put_lww("zzz", "last")?;
            c.put_lww_expiring("session", "s", Some(Duration::from_secs(600)))?;
            c.put_lww("squall/load/x", "own")
        })
        .await
        .expect("old layout written");

        assert_eq!(legacy::move_tenant_keys(&pool).await.expect("moved"), 1202);
        let (old, new, expiry, own) = pool
            .with(|c| {
                let old = c.get_many(&["k/0000".into(), "zzz".into(), "session".into()])?;
                let new = c.get_many(&[
                    keys::user(keys::DEFAULT_NAMESPACE, "k/0000"),
                    keys::user(keys::DEFAULT_NAMESPACE, "k/1199"),
                    keys::user(keys::DEFAULT_NAMESPACE, "zzz"),
                ])?;
                let expiry = c.get_entries(&[keys::user(keys::DEFAULT_NAMESPACE, "session")])?;
                let own = c.get("squall/load/x")?;
                Ok((old, new, expiry, own))
            })
            .await
            .expect("read");
        assert!(old.iter().all(Option::is_none), "old keys deleted");
        let text = |v: &Option<LatticeValue>| match v {
            Some(LatticeValue::Lww(r)) => String::from_utf8_lossy(&r.value).into_owned(),
            other => format!("{other:?}"),
        };
        assert_eq!(
            new.iter().map(text).collect::<Vec<_>>(),
            ["v0", "v1199", "last"]
        );
        let expires = expiry[0]
            .as_ref()
            .and_then(|e| e.expires_at_ms())
            .expect("the moved key keeps its expiry");
        assert!(expires > squall_lattices::entry::now_ms());
        assert!(own.is_some(), "Squall's own keys stay");
        // Once per store: a key written the old way afterwards stays where it is.
        pool.with(|c| c.put_lww("late", "x")).await.expect("write");
        assert_eq!(legacy::move_tenant_keys(&pool).await.expect("moved"), 0);
    });
}
