//! `squall kv get|put` against a real node.

use std::process::Output;

use crate::support::{squall, NodeProcess};

fn kv(addr: &str, args: &[&str]) -> Output {
    squall()
        .args(["kv", "--addr", addr])
        .args(args)
        .output()
        .expect("run squall kv")
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "squall kv failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn put_and_get_every_cli_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--shards", "2"]);
    let a = node.addr.as_str();
    stdout(&kv(a, &["put", "greeting", "hello world"]));
    assert_eq!(stdout(&kv(a, &["get", "greeting"])), "hello world");

    for delta in ["5", "-2", "10"] {
        stdout(&kv(a, &["put", "visits", delta, "--type", "counter"]));
    }
    stdout(&kv(a, &["put", "visits", "--type", "counter"]));
    assert_eq!(stdout(&kv(a, &["get", "visits"])), "14\n");

    stdout(&kv(a, &["put", "tags", "b", "--type", "set"]));
    stdout(&kv(a, &["put", "tags", "a", "--type", "set"]));
    assert_eq!(stdout(&kv(a, &["get", "tags"])), "a\nb\n");

    stdout(&kv(a, &["put", "high", "3", "--type", "max"]));
    stdout(&kv(a, &["put", "high", "2", "--type", "max"]));
    assert_eq!(stdout(&kv(a, &["get", "high"])), "3\n");

    stdout(&kv(
        a,
        &[
            "put",
            "best",
            "slow",
            "--type",
            "priority",
            "--priority",
            "9",
        ],
    ));
    stdout(&kv(
        a,
        &[
            "put",
            "best",
            "fast",
            "--type",
            "priority",
            "--priority",
            "1.5",
        ],
    ));
    assert_eq!(stdout(&kv(a, &["get", "best"])), "1.5 fast\n");

    stdout(&kv(a, &["put", "user", "name=ada", "--type", "map"]));
    stdout(&kv(a, &["put", "user", "lang=en", "--type", "map"]));
    assert_eq!(stdout(&kv(a, &["get", "user"])), "lang=en\nname=ada\n");

    stdout(&kv(a, &["put", "low", "3", "--type", "min"]));
    stdout(&kv(a, &["put", "low", "-4", "--type", "min"]));
    assert_eq!(stdout(&kv(a, &["get", "low"])), "-4\n");

    stdout(&kv(a, &["put", "seen", "false", "--type", "bool"]));
    assert_eq!(stdout(&kv(a, &["get", "seen"])), "false\n");
    stdout(&kv(a, &["put", "seen", "true", "--type", "bool"]));
    stdout(&kv(a, &["put", "seen", "false", "--type", "bool"]));
    assert_eq!(stdout(&kv(a, &["get", "seen"])), "true\n");

    for element in ["pear", "apple", "fig"] {
        stdout(&kv(a, &["put", "fruit", element, "--type", "ordered-set"]));
    }
    assert_eq!(stdout(&kv(a, &["get", "fruit"])), "apple\nfig\npear\n");

    // `-` reads the value from standard input, bytes as they are.
    let mut put = squall()
        .args(["kv", "--addr", a, "put", "blob", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let blob: Vec<u8> = (0..=255u8).collect();
    std::io::Write::write_all(&mut put.stdin.take().expect("stdin"), &blob).expect("write stdin");
    assert!(put.wait().expect("wait").success());
    let got = kv(a, &["get", "blob"]);
    assert!(got.status.success());
    assert_eq!(got.stdout, blob);

    stdout(&kv(a, &["put", "doc", "v1", "--type", "single-causal"]));
    stdout(&kv(a, &["put", "doc", "v2", "--type", "single-causal"]));
    assert_eq!(stdout(&kv(a, &["get", "doc"])), "v2\n");
    stdout(&kv(
        a,
        &[
            "put",
            "reply",
            "r1",
            "--type",
            "multi-causal",
            "--dep",
            "doc",
        ],
    ));
    assert_eq!(stdout(&kv(a, &["get", "reply"])), "r1\n");
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(dir.path(), &["--shards", "1"]);
    let a = node.addr.as_str();

    let missing = kv(a, &["get", "nope"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));

    stdout(&kv(a, &["put", "n", "1", "--type", "max"]));
    let mismatch = kv(a, &["put", "n", "text"]);
    assert!(!mismatch.status.success());
    let message = String::from_utf8_lossy(&mismatch.stderr);
    assert!(message.contains("stored max, written lww"), "{message}");
    assert_eq!(stdout(&kv(a, &["get", "n"])), "1\n");

    let not_a_number = kv(a, &["put", "n", "many", "--type", "max"]);
    assert!(!not_a_number.status.success());
    assert!(String::from_utf8_lossy(&not_a_number.stderr).contains("not an integer"));

    let unknown_type = kv(a, &["put", "n", "1", "--type", "tensor"]);
    assert!(!unknown_type.status.success());
    assert!(String::from_utf8_lossy(&unknown_type.stderr).contains("unknown lattice type"));
}

#[test]
fn a_client_of_a_dead_address_fails_within_its_deadline() {
    let started = std::time::Instant::now();
    let output = kv("tcp://127.0.0.1:9", &["--timeout", "0.2", "get", "k"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("no answer"));
    // Three attempts of 0.2 s: the bound is generous, the point is that it returns at all.
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
}

#[test]
fn a_node_on_a_taken_port_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port().to_string();
    let output = squall()
        .args(["kvs", "--port", &port, "--shards", "1"])
        .output()
        .expect("run squall kvs");
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&format!("cannot listen on tcp://127.0.0.1:{port}")),
        "{message}"
    );
}
