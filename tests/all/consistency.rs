//! The anomaly checker: concurrent clients run a three-step DAG of `observe` probes across two
//! executor processes (steps 1 and 3 on one, step 2 on the other, each with its own cache)
//! while a writer keeps changing the keys they read. Every run reports every read; the
//! checker counts runs that read a key in two versions. Repeatable read must show none over
//! thousands of runs, also when the middle step writes a key that the first step read and the
//! last step reads back (on the first step's executor, which must take the write's version).
//! `lww`, which promises nothing across reads, is run first: it must show anomalies, which
//! shows the checker can see them (the consistency benchmark reports the count).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use squall_executor::testing::{guest, observations, repeatable_read_violations};

use crate::support::{http, roles};

const KEYS: [&str; 3] = ["acct/a", "acct/b", "acct/c"];
/// The key each run writes in its second step, in the runs with writes.
const OWN: &str = "acct/own";
const CLIENTS: usize = 4;

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build()
}

/// Runs `runs` calls of the DAG in `mode` from [`CLIENTS`] clients; returns the number of
/// runs that read some key in another version than they should, and the distinct values read
/// (to show the keys did change during the runs). With `write`, every run also reads the key
/// [`OWN`], which its second step (on the other executor) overwrites with a value of its own:
/// the third step must read that value.
fn check(base: &str, mode: &str, runs: usize, write: bool) -> (usize, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (base, mode, next) = (base.to_string(), mode.to_string(), next.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let url = format!("{base}/v1/dags/audit/invoke");
                let mut violations = 0;
                let mut values = std::collections::HashSet::new();
                loop {
                    let run = next.fetch_add(1, Ordering::Relaxed);
                    if run >= runs {
                        break;
                    }
                    let mut names = KEYS.join(" ");
                    if write {
                        names.push_str(&format!(" {OWN} {OWN}@1=c{client}r{run}"));
                    }
                    let input = format!("{names}\n");
                    let response = agent
                        .post(&url)
                        .set("squall-consistency", &mode)
                        .send_bytes(input.as_bytes())
                        .unwrap_or_else(|e| panic!("{mode} run failed: {e}"));
                    let mut output = Vec::new();
                    std::io::Read::read_to_end(&mut response.into_reader(), &mut output)
                        .expect("read the output");
                    let reads = observations(&output);
                    let expected = if write {
                        3 * (KEYS.len() + 1) + 1
                    } else {
                        3 * KEYS.len()
                    };
                    assert_eq!(
                        reads.len(),
                        expected,
                        "{}",
                        String::from_utf8_lossy(&output)
                    );
                    if !repeatable_read_violations(&reads).is_empty() {
                        violations += 1;
                    }
                    values.extend(reads.into_iter().map(|o| o.value));
                }
                (violations, values)
            })
        })
        .collect();
    let mut violations = 0;
    let mut values = std::collections::HashSet::new();
    for client in clients {
        let (v, seen) = client.join().expect("a client");
        violations += v;
        values.extend(seen);
    }
    (violations, values.len())
}

#[test]
fn repeatable_read_runs_never_see_two_versions_of_a_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = roles(
        dir.path(),
        &[],
        &[("e1", "observe,observe-3"), ("e2", "observe-2")],
    );
    let base = roles.base.clone();
    let code = guest("observe");
    for name in ["observe", "observe-2", "observe-3"] {
        let answer = http("PUT", &format!("{base}/v1/functions/{name}"), None, &code);
        assert_eq!(answer.status, 201, "register {name}: {}", answer.text());
    }
    let dag = http(
        "PUT",
        &format!("{base}/v1/dags/audit"),
        None,
        br#"{"functions":["observe","observe-2","observe-3"],
             "edges":[["observe","observe-2"],["observe-2","observe-3"]]}"#,
    );
    assert_eq!(dag.status, 201, "{}", dag.text());
    // The chain crosses executors: e1, e2, e1.
    let first = http(
        "POST",
        &format!("{base}/v1/dags/audit/invoke"),
        None,
        b"acct/a\n",
    );
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.placement, "observe@e1,observe-2@e2,observe-3@e1");

    // The writer: every key, over and over, a new value each time.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base, stop) = (base.clone(), stop.clone());
        std::thread::spawn(move || {
            let agent = agent();
            let mut written = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = KEYS[(written % 3) as usize];
                agent
                    .put(&format!("{base}/v1/kv/{key}"))
                    .send_bytes(format!("v{written}").as_bytes())
                    .expect("a write");
                written += 1;
            }
            written
        })
    };
    let (lww, _) = check(&base, "lww", 500, false);
    let (repeatable, versions) = check(&base, "repeatable-read", 2000, false);
    let (writing, _) = check(&base, "repeatable-read", 1000, true);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("the writer");
    eprintln!(
        "anomalies: lww {lww} of 500 runs, repeatable-read {repeatable} of 2000 runs, \
         repeatable-read with a write in step 2 {writing} of 1000 runs \
         ({written} writes, {versions} versions read)"
    );
    assert!(
        versions > 10,
        "the keys hardly changed ({versions} versions read)"
    );
    // The writer rewrites the keys thousands of times a second while the steps read them on
    // two caches: without repeatable read, runs do see two versions (and the checker sees it).
    assert!(
        lww > 0,
        "no lww run saw two versions: the checker saw nothing"
    );
    assert_eq!(
        repeatable, 0,
        "repeatable-read runs read a key in two versions"
    );
    assert_eq!(
        writing, 0,
        "repeatable-read runs read a key in another version than their own write"
    );

    // An unknown mode is refused, naming the modes there are.
    let unknown = ureq::post(&format!("{base}/v1/dags/audit/invoke"))
        .set("squall-consistency", "serializable")
        .send_bytes(b"acct/a\n");
    match unknown {
        Err(ureq::Error::Status(400, response)) => {
            let body = response.into_string().expect("body");
            assert!(body.contains("repeatable-read"), "{body}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
}
