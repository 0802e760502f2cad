//! The executor against a real storage node (in this process, on loopback) and real guest
//! components built from `examples/functions`.

use std::time::{Duration, Instant};

use squall_executor::testing::guest;
use squall_executor::{CallOptions, Config, Error, Executor};
use squall_kvs::{Client, ClientConfig, Node};
use squall_proto::poll::Poll;
use squall_state::Limits;

fn node() -> Node {
    Node::start(squall_kvs::Config {
        shards: 2,
        ..squall_kvs::Config::default()
    })
    .expect("start a storage node")
}

fn executor(node: &Node) -> Executor {
    executor_with(node, Config::default())
}

fn executor_with(node: &Node, config: Config) -> Executor {
    Executor::start(config, node.address()).expect("start an executor")
}

/// Registers the test guest `misbehave` under `limits`, and `incr` with the defaults.
async fn register_misbehave_and_incr(executor: &Executor, limits: Limits) {
    executor
        .register("misbehave", guest("misbehave"), Some(limits))
        .await
        .expect("register misbehave");
    executor
        .register("incr", guest("incr"), None)
        .await
        .expect("register incr");
}

async fn call(executor: &Executor, name: &str, input: &str) -> Result<String, Error> {
    executor
        .call(name, input.as_bytes(), CallOptions::default())
        .await
        .map(|out| String::from_utf8(out).expect("utf-8 output"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_run_compose_and_keep_state() {
    let node = node();
    let executor = executor(&node);
    for name in ["incr", "square", "counter", "compose"] {
        let record = executor
            .register(name, guest(name), None)
            .await
            .expect("register");
        assert_eq!(record.version, 1);
        assert_eq!(record.name, name);
    }
    assert_eq!(call(&executor, "incr", "3").await.expect("incr"), "4");
    assert_eq!(call(&executor, "square", "4").await.expect("square"), "16");
    assert_eq!(
        call(&executor, "compose", "3").await.expect("compose"),
        "16"
    );
    // A guest's own error is the caller's `Failed`, and the instance keeps serving.
    match call(&executor, "incr", "three").await {
        Err(Error::Failed { function, message }) => {
            assert_eq!(function, "incr");
            assert!(message.contains("three"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    assert_eq!(
        call(&executor, "counter", "visits").await.expect("count"),
        "1"
    );
    assert_eq!(
        call(&executor, "counter", "visits 5").await.expect("count"),
        "6"
    );
    // The counter is in the store, not just in the cache.
    let mut client = Client::connect(node.address(), ClientConfig::default()).expect("client");
    match client
        .get(&squall_proto::keys::user(
            squall_proto::keys::DEFAULT_NAMESPACE,
            "visits",
        ))
        .expect("get")
    {
        Some(squall_lattices::LatticeValue::Counter(c)) => assert_eq!(c.value(), 6),
        other => panic!("expected a counter, got {other:?}"),
    }
    let names = executor
        .registry()
        .names(squall_proto::keys::DEFAULT_NAMESPACE)
        .await
        .expect("names");
    assert_eq!(names, ["compose", "counter", "incr", "square"]);
    let stats = executor.stats();
    assert!(stats.warm_starts > 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registering_again_makes_a_new_version_that_calls_use() {
    let node = node();
    let executor = executor(&node);
    executor
        .register("f", guest("incr"), None)
        .await
        .expect("register");
    assert_eq!(call(&executor, "f", "1").await.expect("call"), "2");
    let second = executor
        .register("f", guest("square"), None)
        .await
        .expect("register again");
    assert_eq!(second.version, 2);
    // The new version reaches the cache by push; wait for it, within a deadline.
    Poll::within(Duration::from_secs(10))
        .until_async(|| async {
            let out = call(&executor, "f", "5").await.expect("call");
            assert!(out == "6" || out == "25", "{out}");
            (out == "25").then_some(())
        })
        .await
        .expect("the new version never took over");
    let versions = executor.registry().versions("f").await.expect("versions");
    assert_eq!(
        versions.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_executor_sees_functions_and_restarts_load_compiled_code() {
    let node = node();
    let code_cache = tempfile::tempdir().expect("tempdir");
    let config = Config {
        code_cache_dir: Some(code_cache.path().to_path_buf()),
        ..Config::default()
    };
    let first = executor_with(&node, config.clone());
    first
        .register("incr", guest("incr"), None)
        .await
        .expect("register");
    assert_eq!(first.stats().code_cache_misses, 1);
    drop(first);
    // A new executor (as after a restart) finds the function in the store and its machine
    // code in the code cache: nothing is compiled again.
    let second = executor_with(&node, config);
    assert_eq!(call(&second, "incr", "41").await.expect("call"), "42");
    let stats = second.stats();
    assert_eq!(stats.code_cache_hits, 1, "{stats:?}");
    assert_eq!(stats.code_cache_misses, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_components_are_refused_with_typed_errors() {
    let node = node();
    let executor = executor(&node);
    match executor
        .register("junk", b"not wasm at all".to_vec(), None)
        .await
    {
        Err(Error::InvalidComponent { .. }) => {}
        other => panic!("expected InvalidComponent, got {other:?}"),
    }
    // A core module (the magic number, version 1) is not a component.
    match executor
        .register("core", b"\0asm\x01\0\0\0".to_vec(), None)
        .await
    {
        Err(Error::InvalidComponent { .. }) => {}
        other => panic!("expected InvalidComponent, got {other:?}"),
    }
    match executor.register("other", guest("wrong-world"), None).await {
        Err(Error::WrongWorld { reason }) => assert!(reason.contains("handle"), "{reason}"),
        other => panic!("expected WrongWorld, got {other:?}"),
    }
    match executor.register("bad name", guest("incr"), None).await {
        Err(Error::State(squall_state::Error::InvalidName { .. })) => {}
        other => panic!("expected InvalidName, got {other:?}"),
    }
    match call(&executor, "missing", "1").await {
        Err(Error::State(squall_state::Error::NotFound { name })) => assert_eq!(name, "missing"),
        other => panic!("expected NotFound, got {other:?}"),
    }
    // Nothing was stored for the refused ones.
    assert!(executor
        .registry()
        .names(squall_proto::keys::DEFAULT_NAMESPACE)
        .await
        .expect("names")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_guests_get_typed_errors_within_the_deadline() {
    let node = node();
    let executor = executor(&node);
    let limits = Limits {
        timeout_ms: 1_000,
        memory_bytes: 32 << 20,
        max_input_bytes: 64 << 10,
        max_output_bytes: 1 << 20,
        ..Limits::default()
    };
    register_misbehave_and_incr(&executor, limits).await;
    let deadline = Duration::from_millis(limits.timeout_ms) + Duration::from_secs(2);
    type Expected = fn(&Error) -> bool;
    let cases: Vec<(String, Expected)> = vec![
        ("trap".into(), |e| matches!(e, Error::Trap { .. })),
        // Rust's stack lives in linear memory: overflowing it is an out-of-bounds access.
        (
            "stack".into(),
            |e| matches!(e, Error::Trap { trap, .. } if trap.len() < 200),
        ),
        ("loop".into(), |e| matches!(e, Error::Timeout { .. })),
        (
            "oom".into(),
            |e| matches!(e, Error::OutOfMemory { limit, .. } if *limit == 32 << 20),
        ),
        (
            "huge:2000000".into(),
            |e| matches!(e, Error::OutputTooLarge { size: 2_000_000, limit, .. } if *limit == 1 << 20),
        ),
        ("recurse:misbehave".into(), |e| {
            matches!(e, Error::CallDepthExceeded { limit: 8, .. })
        }),
        ("x".repeat(100 << 10), |e| {
            matches!(e, Error::InputTooLarge { .. })
        }),
        ("fail".into(), |e| matches!(e, Error::Failed { .. })),
    ];
    for (input, expected) in cases {
        let started = Instant::now();
        let outcome = call(&executor, "misbehave", &input).await;
        let took = started.elapsed();
        let label: String = input.chars().take(20).collect();
        match outcome {
            Err(e) => assert!(expected(&e), "{label}: unexpected error {e:?}"),
            Ok(out) => panic!("{label}: expected an error, got {out:?}"),
        }
        assert!(took < deadline, "{label}: took {took:?}");
        // The executor keeps serving, the misbehaving function included.
        assert_eq!(call(&executor, "incr", "1").await.expect("incr after"), "2");
        assert_eq!(
            call(&executor, "misbehave", "ok").await.expect("ok after"),
            "ok"
        );
    }
    // Output to stdout and stderr is captured, not an error.
    assert_eq!(
        call(&executor, "misbehave", "print").await.expect("print"),
        "printed"
    );
    // State through the cache, written through to the store.
    assert_eq!(
        call(&executor, "misbehave", "state:color=blue")
            .await
            .expect("state"),
        "blue"
    );
    let mut client = Client::connect(node.address(), ClientConfig::default()).expect("client");
    match client
        .get(&squall_proto::keys::user(
            squall_proto::keys::DEFAULT_NAMESPACE,
            "color",
        ))
        .expect("get")
    {
        Some(squall_lattices::LatticeValue::Lww(v)) => assert_eq!(&v.value[..], b"blue"),
        other => panic!("expected an LWW value, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_the_executor() {
    let node = node();
    let executor = executor(&node);
    executor
        .register("square", guest("square"), None)
        .await
        .expect("register");
    let mut tasks = Vec::new();
    for i in 0..32i64 {
        let executor = executor.clone();
        tasks.push(tokio::spawn(async move {
            let out = executor
                .call("square", i.to_string().as_bytes(), CallOptions::default())
                .await
                .expect("call");
            assert_eq!(out, (i * i).to_string().into_bytes());
        }));
    }
    for task in tasks {
        task.await.expect("task");
    }
}

/// A writer for the log subscriber that keeps everything in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A single-threaded runtime, so the thread-local log subscriber sees the call's events.
#[tokio::test(flavor = "current_thread")]
async fn guest_stdout_stderr_and_failures_go_to_the_log_once() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let node = node();
    let executor = executor(&node);
    executor
        .register("misbehave", guest("misbehave"), None)
        .await
        .expect("register");
    assert_eq!(
        call(&executor, "misbehave", "print").await.expect("print"),
        "printed"
    );
    assert!(call(&executor, "misbehave", "recurse:misbehave")
        .await
        .is_err());
    let log = String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8");
    for expected in [
        "hello from stdout",
        "hello from stderr",
        "stream=\"stdout\"",
        "function=\"misbehave\"",
    ] {
        assert!(
            log.contains(expected),
            "{expected:?} not in the log:\n{log}"
        );
    }
    // Nine nested calls failed, but the failure is logged once, where the caller gets it.
    assert_eq!(log.matches("call failed").count(), 1, "{log}");
}

/// One runtime thread: a guest spinning in a loop must still let other calls run on it.
#[tokio::test(flavor = "current_thread")]
async fn a_spinning_guest_does_not_hold_the_runtime() {
    let node = node();
    let executor = executor(&node);
    let limits = Limits {
        timeout_ms: 3_000,
        ..Limits::default()
    };
    register_misbehave_and_incr(&executor, limits).await;
    let spinning = {
        let executor = executor.clone();
        tokio::spawn(async move { call(&executor, "misbehave", "loop").await })
    };
    // Let the spinning call start, then call another function on the same thread.
    tokio::task::yield_now().await;
    assert_eq!(call(&executor, "incr", "1").await.expect("incr"), "2");
    assert!(
        !spinning.is_finished(),
        "the loop ended before its deadline"
    );
    match spinning.await.expect("task") {
        Err(Error::Timeout { function, .. }) => assert_eq!(function, "misbehave"),
        other => panic!("expected Timeout, got {other:?}"),
    }
    // Keys are bounded: a guest cannot make caches and shards hold huge keys.
    let long_key = format!("state:{}=v", "k".repeat(2000));
    match call(&executor, "misbehave", &long_key).await {
        Err(Error::Failed { message, .. }) => {
            assert!(message.contains("keys must be"), "{message}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
    // Squall's own keys (the registry, the code) are out of a function's reach.
    match call(&executor, "misbehave", "state:squall/fn/incr=x").await {
        Err(Error::Failed { message, .. }) => assert!(message.contains("reserved"), "{message}"),
        other => panic!("expected Failed, got {other:?}"),
    }
}

/// Without a fabric, an executor runs a call's children itself: fan-out, a race whose loser
/// is cancelled, children cancelled with their parent, typed errors. (With a fabric, a
/// scheduler places them: `tests/all/futures.rs`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_executor_alone_runs_a_calls_children_itself() {
    let node = node();
    let executor = executor(&node);
    register_misbehave_and_incr(&executor, Limits::default()).await;
    let expected: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(
        call(&executor, "misbehave", "fanout:100")
            .await
            .expect("fanout"),
        expected.join(",")
    );
    assert_eq!(
        call(&executor, "misbehave", "race").await.expect("race"),
        "fast"
    );
    // A parent that fails with a child running: the child never writes its key.
    let failed = call(&executor, "misbehave", "orphan:orphan-here").await;
    assert!(matches!(failed, Err(Error::Failed { .. })), "{failed:?}");
    let mut store = Client::connect(node.address(), ClientConfig::default()).expect("client");
    let started_key = squall_proto::keys::user("default", "started/orphan-here");
    assert!(
        store.get(&started_key).expect("get").is_some(),
        "the child had started"
    );
    let key = squall_proto::keys::user("default", "orphan-here");
    // An absence: the child would have written 3 s after it started, so look after that.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert!(
        store.get(&key).expect("get").is_none(),
        "a child outlived its parent"
    );
    let unknown = call(&executor, "misbehave", "child-of:nobody")
        .await
        .expect("answered");
    assert!(unknown.contains("not found"), "{unknown}");
    let twice = call(&executor, "misbehave", "twice")
        .await
        .expect("answered");
    assert!(twice.contains("awaited already"), "{twice}");
}
