//! Functions and DAGs run through a scheduler and executor nodes over the call fabric, against
//! a real storage node on loopback and real guests built from `examples/functions`.
//!
//! Executors on a fabric of their own talk to the scheduler over TCP exactly as executors in
//! other processes do; executors sharing the scheduler's fabric use its in-process path.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use squall_executor::testing::guest;
use squall_executor::{Config, Executor, ExecutorNode, NodeConfig};
use squall_kvs::Node;
use squall_proto::call::{Artifact, CallResult, FailureCode, InvokeOptions, LimitsRequest, Target};
use squall_proto::fabric::Fabric;
use squall_proto::poll::Poll;
use squall_scheduler::{Scheduler, SchedulerClient, SchedulerConfig};
use squall_state::{Cache, CacheConfig, ClientPool, DagRegistry, DagSpec};

const WAIT: Duration = Duration::from_secs(30);

struct Cluster {
    node: Node,
    kvs: ClientPool,
    dags: DagRegistry,
    scheduler: Scheduler,
    client: SchedulerClient,
    executors: Vec<ExecutorNode>,
}

impl Cluster {
    fn start() -> Self {
        let node = Node::start(squall_kvs::Config {
            shards: 2,
            ..squall_kvs::Config::default()
        })
        .expect("start a storage node");
        let kvs = ClientPool::connect(node.address(), Duration::from_secs(2)).expect("connect");
        let fabric = Fabric::new();
        let cache = Cache::start(kvs.clone(), CacheConfig::default()).expect("cache");
        let dags = DagRegistry::new(kvs.clone(), Some(cache));
        let config = SchedulerConfig {
            heartbeat_timeout: Duration::from_secs(2),
            ..SchedulerConfig::default()
        };
        let mailbox = fabric.bind("127.0.0.1", 0).expect("scheduler mailbox");
        let scheduler = Scheduler::start(mailbox, kvs.clone(), dags.clone(), config);
        let client = SchedulerClient::start(
            fabric.bind("127.0.0.1", 0).expect("gateway mailbox"),
            vec![scheduler.addr().to_string()],
        );
        Cluster {
            node,
            kvs,
            dags,
            scheduler,
            client,
            executors: Vec::new(),
        }
    }

    /// Starts an executor node on a fabric of its own (as another process would have).
    fn add_executor(&mut self, id: &str, serves: &[&str]) {
        let fabric = Fabric::new();
        let executor = Executor::start(Config::default(), self.node.address()).expect("executor");
        let node = ExecutorNode::start(
            executor,
            fabric.bind("127.0.0.1", 0).expect("executor mailbox"),
            self.kvs.clone(),
            NodeConfig {
                id: id.into(),
                schedulers: vec![self.scheduler.addr().to_string()],
                serves: serves.iter().map(|s| s.to_string()).collect(),
                ..NodeConfig::default()
            },
        );
        self.executors.push(node);
    }

    async fn wait_for_executors(&self, n: usize) {
        let client = &self.client;
        Poll::within(WAIT)
            .until_async(|| async move {
                let known = client.status(WAIT).await.expect("status");
                (known.len() >= n).then_some(())
            })
            .await
            .expect("executors did not join");
    }

    async fn register(&self, name: &str) {
        let version = self
            .client
            .register(
                Artifact::Function,
                name,
                guest(name).into(),
                LimitsRequest::default(),
                WAIT,
            )
            .await
            .unwrap_or_else(|e| panic!("register {name}: {e}"));
        assert_eq!(version.name, name);
    }

    async fn dag(&self, name: &str, functions: &[&str], edges: &[(&str, &str)]) {
        let spec = DagSpec {
            functions: functions.iter().map(|f| f.to_string()).collect(),
            edges: edges
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        };
        self.dags.store(name, spec).await.expect("store the DAG");
    }

    async fn call(
        &self,
        target: Target,
        input: &str,
    ) -> Result<(String, Vec<String>), squall_proto::call::Failure> {
        let invocation = self
            .client
            .invoke(
                target,
                Bytes::from(input.to_string()),
                InvokeOptions::default(),
                WAIT,
            )
            .await?;
        let output = invocation.output.expect("a synchronous call has an output");
        let placed = invocation.placement.into_iter().map(|(_, e)| e).collect();
        Ok((String::from_utf8(output.to_vec()).expect("utf-8"), placed))
    }
}

fn dag(name: &str) -> Target {
    Target::Dag(name.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dags_compose_fan_in_and_report_failures() {
    let mut cluster = Cluster::start();
    cluster.add_executor("solo", &[]);
    cluster.wait_for_executors(1).await;
    for name in ["incr", "square", "join", "misbehave"] {
        cluster.register(name).await;
    }
    cluster
        .dag("sq_incr", &["incr", "square"], &[("incr", "square")])
        .await;
    let (out, placed) = cluster.call(dag("sq_incr"), "3").await.expect("f(g(x))");
    assert_eq!(out, "16");
    assert_eq!(placed, ["solo", "solo"]);
    assert_eq!(
        cluster
            .call(Target::Function("incr".into()), "41")
            .await
            .expect("a function")
            .0,
        "42"
    );
    // Fan-out from one source and fan-in in edge order: 3 -> (incr 4, square 9) -> "9,4".
    cluster
        .dag(
            "fan",
            &["join", "incr", "square", "misbehave"],
            &[
                ("misbehave", "incr"),
                ("misbehave", "square"),
                ("square", "join"),
                ("incr", "join"),
            ],
        )
        .await;
    assert_eq!(
        cluster.call(dag("fan"), "echo:3").await.expect("fan-in").0,
        "9,4"
    );
    // A failing step fails the call, named.
    let failure = cluster.call(dag("fan"), "trap").await.expect_err("trap");
    assert_eq!(failure.code, FailureCode::Trap);
    assert_eq!(failure.step.as_deref(), Some("misbehave"));
    // A failing branch cancels the rest of the call: the fan-in step that waits for the failed
    // branch's output is dropped at once, not at the call's 30 s deadline.
    cluster
        .dag(
            "half",
            &["misbehave", "incr", "join"],
            &[
                ("misbehave", "incr"),
                ("incr", "join"),
                ("misbehave", "join"),
            ],
        )
        .await;
    let failure = cluster
        .call(dag("half"), "echo:x")
        .await
        .expect_err("incr fails on x");
    assert_eq!(failure.step.as_deref(), Some("incr"));
    // Heartbeats from before the call say nothing: wait for some sent after it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = &cluster.client;
    let idle = Poll::within(Duration::from_secs(5))
        .until_async(|| async move {
            let known = client.status(WAIT).await.expect("status");
            known.iter().all(|s| s.waiting == 0).then_some(())
        })
        .await;
    if idle.is_err() {
        let known = client.status(WAIT).await.expect("status");
        panic!("the fan-in step still waits: {known:?}");
    }
    let failure = cluster
        .call(dag("sq_incr"), "x")
        .await
        .expect_err("bad input");
    assert_eq!(failure.code, FailureCode::FunctionFailed);
    assert_eq!(failure.step.as_deref(), Some("incr"));
    // Unknown DAGs and functions.
    let failure = cluster
        .call(dag("nope"), "1")
        .await
        .expect_err("unknown DAG");
    assert_eq!(failure.code, FailureCode::NotFound);
    let failure = cluster
        .call(Target::Function("nope".into()), "1")
        .await
        .expect_err("unknown function");
    assert_eq!(failure.code, FailureCode::NotFound);
    // Malformed DAGs, and DAGs of unregistered functions, are refused at registration.
    let refused = cluster
        .dags
        .store(
            "bad",
            DagSpec {
                functions: vec!["incr".into(), "nope".into()],
                edges: vec![("incr".into(), "nope".into())],
            },
        )
        .await
        .expect_err("unregistered function");
    assert!(refused.to_string().contains("nope"), "{refused}");
    // An asynchronous call's output lands in its result key.
    let key = squall_proto::keys::result(squall_proto::keys::DEFAULT_NAMESPACE, "t1");
    cluster
        .client
        .invoke_detached(
            dag("sq_incr"),
            Bytes::from_static(b"4"),
            InvokeOptions {
                result_key: Some(key.clone()),
                ..InvokeOptions::default()
            },
        )
        .expect("started");
    let kvs = &cluster.kvs;
    let register = Poll::within(WAIT)
        .until_async(|| {
            let key = key.clone();
            async move {
                match kvs
                    .with(move |c| c.get(&key))
                    .await
                    .expect("read the result")
                {
                    Some(squall_lattices::LatticeValue::Lww(register)) => Some(register),
                    _ => None,
                }
            }
        })
        .await
        .expect("no result stored");
    let result = CallResult::decode(&register.value).expect("a result record");
    assert_eq!(result, CallResult::Succeeded(Bytes::from_static(b"25")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_cross_executors_and_a_lost_executor_fails_its_calls_early() {
    let mut cluster = Cluster::start();
    cluster.add_executor("a", &["incr", "misbehave"]);
    cluster.add_executor("b", &["square", "misbehave"]);
    cluster.wait_for_executors(2).await;
    for name in ["incr", "square"] {
        cluster.register(name).await;
    }
    // A long deadline, so that only the executor's loss can end the looping call early.
    let version = cluster
        .client
        .register(
            Artifact::Function,
            "misbehave",
            guest("misbehave").into(),
            LimitsRequest {
                timeout_ms: Some(60_000),
                ..LimitsRequest::default()
            },
            WAIT,
        )
        .await
        .expect("register misbehave");
    assert_eq!(version.version, 1);
    cluster
        .dag("sq_incr", &["incr", "square"], &[("incr", "square")])
        .await;
    let (out, placed) = cluster
        .call(dag("sq_incr"), "3")
        .await
        .expect("across executors");
    assert_eq!(out, "16");
    assert_eq!(placed, ["a", "b"]);

    let client = Arc::new(cluster.client);
    let looping = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = client
                .invoke(
                    Target::Function("misbehave".into()),
                    Bytes::from_static(b"loop"),
                    InvokeOptions {
                        timeout_ms: Some(60_000),
                        ..InvokeOptions::default()
                    },
                    Duration::from_secs(90),
                )
                .await;
            (result, started.elapsed())
        })
    };
    // Find the executor running it, and stop it (its heartbeats stop).
    let busy = Poll::within(WAIT)
        .until_async(|| {
            let client = client.clone();
            async move {
                let status = client.status(WAIT).await.expect("status");
                status.iter().find(|s| s.running > 0).map(|s| s.id.clone())
            }
        })
        .await
        .expect("the looping call never started");
    let mut executors = std::mem::take(&mut cluster.executors);
    executors.retain(|e| e.id() != busy);
    let (result, took) = looping.await.expect("the caller");
    let failure = result.expect_err("the executor was lost");
    assert_eq!(failure.code, FailureCode::ExecutorLost, "{failure}");
    assert!(took < Duration::from_secs(30), "failed only after {took:?}");
    // The next call goes to the executor that is left.
    let invocation = client
        .invoke(
            Target::Function("misbehave".into()),
            Bytes::from_static(b"ok"),
            InvokeOptions::default(),
            WAIT,
        )
        .await
        .expect("placed on the survivor");
    assert_eq!(invocation.placement[0].1, executors[0].id());
}
