//! A namespace's stored bytes, measured over a real storage node, and the guard that refuses
//! its writes once a measurement reaches its `max_stored_bytes` quota.

use std::time::Duration;

use squall_kvs::{Config, Node};
use squall_proto::keys;
use squall_proto::poll::Poll;
use squall_state::namespaces::{Namespaces, Quotas};
use squall_state::stored_bytes::{self, StoredBytesGuard};
use squall_state::ClientPool;

#[test]
fn a_namespace_is_refused_writes_once_measured_at_its_quota_and_not_before_or_after() {
    let node = Node::start(Config {
        port: 0,
        shards: 2,
        ..Config::default()
    })
    .expect("storage node");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let pool = ClientPool::connect(node.address(), Duration::from_secs(2)).expect("pool");
        let namespaces = Namespaces::new(pool.clone());
        namespaces.create("small").await.expect("create");
        namespaces.create("other").await.expect("create");
        let quotas = Quotas {
            max_stored_bytes: Some(10_000),
            ..Quotas::default()
        };
        namespaces
            .set_quotas("small", &quotas)
            .await
            .expect("quotas");
        let guard = StoredBytesGuard::new(pool.clone());
        assert_eq!(guard.check("small").await, Ok(()), "never measured");
        // 8 keys of 1 000 bytes: under the quota.
        let write = |namespace: &'static str, i: u32| {
            let key = keys::user(namespace, &format!("blob/{i}"));
            pool.with(move |c| c.put_lww(&key, vec![b'x'; 1000]))
        };
        for i in 0..8 {
            write("small", i).await.expect("put");
            write("other", i).await.expect("put");
        }
        let usage = stored_bytes::measure(&pool, "small")
            .await
            .expect("measure");
        assert_eq!(usage.keys, 8);
        assert!((8_000..9_000).contains(&usage.bytes), "{usage:?}");
        // A guard reading it now (the first one's copy is still fresh) lets it write.
        let reading_now = StoredBytesGuard::new(pool.clone());
        assert_eq!(reading_now.check("small").await, Ok(()));
        // Four more: the next measurement is over, and the guard refuses within its freshness.
        for i in 8..12 {
            write("small", i).await.expect("put");
        }
        let passes = stored_bytes::measure_quota_holders(&pool, &namespaces, "gateway-1")
            .await
            .expect("upkeep");
        assert_eq!(
            passes,
            Some(1),
            "only the namespace with the quota is measured"
        );
        assert_eq!(
            stored_bytes::measure_quota_holders(&pool, &namespaces, "gateway-2")
                .await
                .expect("upkeep"),
            None,
            "another gateway holds the lease"
        );
        let refused = Poll::within(Duration::from_secs(5))
            .every(Duration::from_millis(50))
            .until_async(|| async { guard.check("small").await.err() })
            .await
            .expect("refused once measured over");
        assert_eq!(refused.limit, 10_000);
        assert!(refused.stored >= 12_000, "{refused:?}");
        // Another namespace, without the quota, writes on.
        assert_eq!(guard.check("other").await, Ok(()));
        assert!(stored_bytes::last(&pool, "other")
            .await
            .expect("read")
            .is_none());
        // Deletes bring it under; the next measurement lets it write again.
        for i in 0..6 {
            let key = keys::user("small", &format!("blob/{i}"));
            pool.with(move |c| c.delete(&key)).await.expect("delete");
        }
        let usage = stored_bytes::measure(&pool, "small")
            .await
            .expect("measure");
        assert_eq!(usage.keys, 6);
        Poll::within(Duration::from_secs(5))
            .every(Duration::from_millis(50))
            .until_async(|| async { guard.check("small").await.is_ok().then_some(()) })
            .await
            .expect("writes again once measured under");
        assert_eq!(
            stored_bytes::recent(&pool, "small").await.expect("recent"),
            usage,
            "a measurement this recent is used as it is"
        );
    });
}
