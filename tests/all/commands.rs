//! The user's commands end to end: `squall up` configured by a `squall.toml`, then
//! `squall fn`, `squall dag` and `squall call` against it, as the README's demo runs them.

use std::io::Write;
use std::path::Path;
use std::process::{Output, Stdio};

use squall_executor::testing::guests;

use crate::support::{squall, NodeProcess};

const TOKEN: &str = "from-the-config-file";

/// Runs `squall ARGS` in `dir` (so `dir/squall.toml` applies), with `stdin` as input.
fn run(dir: &Path, args: &[&str], stdin: &[u8]) -> Output {
    let mut child = squall()
        .args(args)
        .current_dir(dir)
        .env_remove("SQUALL_TOKEN")
        .env_remove("SQUALL_GATEWAY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn squall");
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).expect("write stdin");
    }
    child.wait_with_output().expect("squall runs")
}

/// Standard output of a command that must succeed.
fn ok(output: Output) -> String {
    assert!(
        output.status.success(),
        "squall failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Standard error of a command that must fail.
fn refused(output: Output) -> String {
    assert!(
        !output.status.success(),
        "squall should have failed; it printed {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn squall_toml_configures_up_and_the_commands_drive_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every port from the file (0: the OS picks), a data directory relative to where `up`
    // runs, and the token both sides read.
    std::fs::write(
        dir.path().join("squall.toml"),
        format!(
            "data-dir = \"data\"\nhttp-port = 0\nkvs-port = 0\nscheduler-port = 0\ntoken = \"{TOKEN}\"\n"
        ),
    )
    .expect("write squall.toml");
    let up = NodeProcess::spawn(dir.path(), &["up"]);
    for under in ["data/kvs", "data/code-cache"] {
        assert!(dir.path().join(under).is_dir(), "{under} was not made");
    }
    let gateway = up.field("http");
    let g = ["--gateway", gateway.as_str()];
    let wasm = |name: &str| guests().join(format!("{name}.wasm")).display().to_string();

    for name in ["incr", "square"] {
        let file = wasm(name);
        let printed = ok(run(
            dir.path(),
            &[&["fn", "register", name, &file][..], &g].concat(),
            b"",
        ));
        assert!(
            printed.starts_with(&format!("registered {name} version 1")),
            "{printed}"
        );
    }
    let created = ok(run(
        dir.path(),
        &[
            &["dag", "create", "sq_incr", "--edge", "incr:square"][..],
            &g,
        ]
        .concat(),
        b"",
    ));
    assert!(created.starts_with("created DAG sq_incr"), "{created}");
    let dag_call = |input: &str, stdin: &[u8]| {
        ok(run(
            dir.path(),
            &[&["dag", "call", "sq_incr", input][..], &g].concat(),
            stdin,
        ))
    };
    assert_eq!(dag_call("3", b""), "16\n");
    assert_eq!(dag_call("-", b"4"), "25\n");
    assert_eq!(
        ok(run(
            dir.path(),
            &[&["call", "incr", "41"][..], &g].concat(),
            b""
        )),
        "42\n"
    );

    let functions = ok(run(dir.path(), &[&["fn", "ls"][..], &g].concat(), b""));
    let names: Vec<&str> = functions
        .lines()
        .filter_map(|l| l.split('\t').next())
        .collect();
    assert_eq!(names, ["incr", "square"], "{functions}");
    let dags = ok(run(dir.path(), &[&["dag", "ls"][..], &g].concat(), b""));
    assert!(dags.contains("\"sq_incr\""), "{dags}");

    // A flag outranks the file: the wrong token is refused, with the gateway's own words.
    let wrong = refused(run(
        dir.path(),
        &[&["fn", "rm", "incr", "--token", "wrong"][..], &g].concat(),
        b"",
    ));
    assert!(wrong.contains("unauthorized"), "{wrong}");
    // Errors name the cause and exit non-zero.
    let missing = refused(run(
        dir.path(),
        &[&["call", "nope", "1"][..], &g].concat(),
        b"",
    ));
    assert!(missing.contains("not_found"), "{missing}");
    let bad_edge = refused(run(
        dir.path(),
        &[&["dag", "create", "x", "--edge", "incr"][..], &g].concat(),
        b"",
    ));
    assert!(bad_edge.contains("FROM:TO"), "{bad_edge}");

    assert_eq!(
        ok(run(
            dir.path(),
            &[&["dag", "rm", "sq_incr"][..], &g].concat(),
            b""
        )),
        "deleted DAG sq_incr\n"
    );
    assert_eq!(
        ok(run(
            dir.path(),
            &[&["fn", "rm", "incr"][..], &g].concat(),
            b""
        )),
        "deleted incr\n"
    );
    let gone = refused(run(
        dir.path(),
        &[&["dag", "call", "sq_incr", "3"][..], &g].concat(),
        b"",
    ));
    assert!(gone.contains("not_found"), "{gone}");
    let functions = ok(run(dir.path(), &[&["fn", "ls"][..], &g].concat(), b""));
    assert!(!functions.contains("incr\t"), "{functions}");
}

#[test]
fn a_setting_no_flag_has_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("squall.toml"), "http-prot = 9090\n").expect("write");
    let error = refused(run(dir.path(), &["fn", "ls"], b""));
    assert!(error.contains("unknown setting \"http-prot\""), "{error}");
    std::fs::write(dir.path().join("squall.toml"), "http-port = [\n").expect("write");
    let error = refused(run(dir.path(), &["fn", "ls"], b""));
    assert!(error.contains("not valid TOML"), "{error}");
}
