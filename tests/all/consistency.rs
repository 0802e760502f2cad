//! The anomaly checker: concurrent clients run a three-step DAG of `observe` probes across two
//! executor processes (steps 1 and 3 on one, step 2 on the other, each with its own cache)
//! while a writer keeps changing the keys they read. Every run reports every read; the
//! checker counts runs that read a key in two versions. Repeatable read must show none over
//! thousands of runs, also when the middle step writes a key that the first step read and the
//! last step reads back (on the first step's executor, which must take the write's version).
//! `lww`, which promises nothing across reads, is run first: it must show anomalies, which
//! shows the checker can see them (the consistency benchmark reports the count).
//!
//! Then causal: a writer runs the same DAG in causal mode, each step writing one key after
//! the previous step's (so `causal/c` depends on `causal/b`, which depends on `causal/a`), while
//! clients read the three keys at every step. The checker also counts reads outside a causal
//! cut and, per client session, reads older than what the session's earlier runs saw. `lww`
//! readers show such anomalies; causal readers (each client a session, the keys declared,
//! and a key of their own written in step 2 and read back by the next run) must show none.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use squall_executor::testing::{
    causal_cut_violations, guest, observations, repeatable_read_violations, Observation,
    SessionHistory,
};

use crate::support::{http, roles};

const KEYS: [&str; 3] = ["acct/a", "acct/b", "acct/c"];
/// The key each run writes in its second step, in the runs with writes.
const OWN: &str = "acct/own";
const CLIENTS: usize = 4;

/// The body of the 400 that `request` gets.
fn refused(request: ureq::Request) -> String {
    match request.send_bytes(b"acct/a\n") {
        Err(ureq::Error::Status(400, response)) => response.into_string().expect("body"),
        other => panic!("expected 400, got {other:?}"),
    }
}

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

/// The keys the causal writer writes (each after the previous one, in the same run).
const CAUSAL: [&str; 3] = ["causal/a", "causal/b", "causal/c"];

/// What [`check_causal`] counted.
#[derive(Debug, Default)]
struct Tally {
    /// Runs that read a key in two versions.
    repeatable: usize,
    /// Runs that read outside a causal cut.
    cut: usize,
    /// Runs that read older versions than their session had seen.
    session: usize,
    /// Runs that failed.
    failed: usize,
    /// The first anomaly seen, for the report.
    example: Option<String>,
}

impl Tally {
    /// Counts the anomalies of one run; with `history`, also against its session's past.
    fn check(&mut self, reads: &[Observation], history: Option<&mut SessionHistory>) {
        let repeatable = repeatable_read_violations(reads);
        let cut = causal_cut_violations(reads);
        let session = history.map(|h| h.run(reads)).unwrap_or_default();
        self.repeatable += usize::from(!repeatable.is_empty());
        self.cut += usize::from(!cut.is_empty());
        self.session += usize::from(!session.is_empty());
        if let Some(first) = cut.first().or(session.first()) {
            self.example.get_or_insert(first.clone());
        }
    }

    /// The sum of the clients' tallies.
    fn total(clients: Vec<std::thread::JoinHandle<Tally>>) -> Tally {
        let mut total = Tally::default();
        for client in clients {
            let tally = client.join().expect("a client");
            total.repeatable += tally.repeatable;
            total.cut += tally.cut;
            total.session += tally.session;
            total.failed += tally.failed;
            total.example = total.example.or(tally.example);
        }
        total
    }
}

/// Runs `runs` calls of the DAG in `mode` from [`CLIENTS`] clients, each a session of its
/// own. Step N reads the Nth of the [`CAUSAL`] keys (so a later step reads a version that
/// depends on versions of the keys earlier steps read). Each run's second step also writes
/// the client's own key, which every step reads (in causal mode, a causal key, which the
/// session's next run must see; in lww mode an lww key). With `declare` the calls declare
/// their keys.
fn check_causal(base: &str, mode: &str, runs: usize, declare: bool) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let causal = mode == "causal";
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (base, mode, next) = (base.to_string(), mode.to_string(), next.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let url = format!("{base}/v1/dags/audit/invoke");
                let mine = if causal {
                    format!("causal/mine/{client}")
                } else {
                    format!("lww/mine/{client}")
                };
                let mut keys: Vec<String> = CAUSAL.iter().map(|k| k.to_string()).collect();
                let mut names: Vec<String> = CAUSAL
                    .iter()
                    .enumerate()
                    .map(|(step, key)| format!("{key}~{step}"))
                    .collect();
                keys.push(mine.clone());
                names.push(mine.clone());
                let mut history = SessionHistory::default();
                let mut tally = Tally::default();
                loop {
                    let run = next.fetch_add(1, Ordering::Relaxed);
                    if run >= runs {
                        break;
                    }
                    let names = format!("{} {mine}@1=r{run}", names.join(" "));
                    let mut request = agent.post(&url).set("squall-consistency", &mode);
                    if declare {
                        request = request.set("squall-keys", &keys.join(","));
                    }
                    if causal {
                        request = request.set("squall-session", &format!("client-{client}"));
                    }
                    let output = match request.send_bytes(format!("{names}\n").as_bytes()) {
                        Ok(response) => {
                            let mut output = Vec::new();
                            std::io::Read::read_to_end(&mut response.into_reader(), &mut output)
                                .expect("read the output");
                            output
                        }
                        Err(ureq::Error::Status(_, response)) => {
                            let body = response.into_string().unwrap_or_default();
                            // Without declared keys, a causal run may find no version of a
                            // key that fits its cut: it fails, and reads nothing outside it.
                            assert!(
                                causal && !declare && body.contains("fits this run's causal cut"),
                                "a {mode} run failed: {body}"
                            );
                            tally.failed += 1;
                            tally.example.get_or_insert(body);
                            continue;
                        }
                        Err(e) => panic!("a {mode} run failed: {e}"),
                    };
                    let reads = observations(&output);
                    let expected = 3 + 3 + 1;
                    assert_eq!(
                        reads.len(),
                        expected,
                        "{}",
                        String::from_utf8_lossy(&output)
                    );
                    tally.check(&reads, Some(&mut history));
                }
                tally
            })
        })
        .collect();
    Tally::total(clients)
}

/// Sessions across executors: each of [`CLIENTS`] clients, a causal session, writes its key
/// through `observe-2` (on e2) and reads it back at once through `observe` (on e1, whose
/// cache learns of the write by the store's push, which may not have arrived). Returns the
/// reads older than what the session had seen.
fn check_sessions(base: &str, rounds: usize) -> usize {
    let clients: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let base = base.to_string();
            std::thread::spawn(move || {
                let agent = agent();
                let key = format!("causal/session/{client}");
                let mut history = SessionHistory::default();
                let mut violations = 0;
                for round in 0..rounds {
                    for (function, input) in [
                        ("observe-2", format!("{key}@0=r{round}\n")),
                        ("observe", format!("{key}\n")),
                    ] {
                        let response = agent
                            .post(&format!("{base}/v1/functions/{function}/invoke"))
                            .set("squall-consistency", "causal")
                            .set("squall-session", &format!("s-{client}"))
                            .send_bytes(input.as_bytes())
                            .unwrap_or_else(|e| panic!("a session call failed: {e}"));
                        let mut output = Vec::new();
                        std::io::Read::read_to_end(&mut response.into_reader(), &mut output)
                            .expect("read the output");
                        violations += usize::from(!history.run(&observations(&output)).is_empty());
                    }
                }
                violations
            })
        })
        .collect();
    clients
        .into_iter()
        .map(|c| c.join().expect("a client"))
        .sum()
}

/// Runs `runs` calls of the fan-in DAG `fan` in causal mode from [`CLIENTS`] clients, each
/// step reading the [`CAUSAL`] keys, which the calls declare; returns what the checker
/// counted (the branches and the fan-in step must all read one cut).
fn check_fan(base: &str, runs: usize) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (base, next) = (base.to_string(), next.clone());
            std::thread::spawn(move || {
                let agent = agent();
                let mut tally = Tally::default();
                while next.fetch_add(1, Ordering::Relaxed) < runs {
                    let answer = agent
                        .post(&format!("{base}/v1/dags/fan/invoke"))
                        .set("squall-consistency", "causal")
                        .set("squall-keys", &CAUSAL.join(","))
                        .send_bytes(format!("{}\n", CAUSAL.join(" ")).as_bytes());
                    let output = match answer {
                        Ok(response) => {
                            let mut output = Vec::new();
                            std::io::Read::read_to_end(&mut response.into_reader(), &mut output)
                                .expect("read the output");
                            output
                        }
                        Err(e) => {
                            tally.failed += 1;
                            tally.example.get_or_insert(e.to_string());
                            continue;
                        }
                    };
                    let reads = observations(&output);
                    // The source, each branch and the fan-in step read the three keys (the
                    // second branch's text repeats the source's reads).
                    assert_eq!(reads.len(), 15, "{}", String::from_utf8_lossy(&output));
                    tally.check(&reads, None);
                }
                tally
            })
        })
        .collect();
    Tally::total(clients)
}

/// Starts the causal writer: runs of the DAG in causal mode (one session), whose steps write
/// [`CAUSAL`] in order, each version depending on the one before. Returns the writer and
/// its stop flag; joining it gives the runs made and the runs that failed.
fn causal_writer(base: &str) -> (std::thread::JoinHandle<(u64, u64)>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base, stop) = (base.to_string(), stop.clone());
        std::thread::spawn(move || {
            let agent = agent();
            let (mut runs, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                let writes: Vec<String> = CAUSAL
                    .iter()
                    .enumerate()
                    .map(|(step, key)| format!("{key}@{step}=w{runs}"))
                    .collect();
                let input = format!("{} {}\n", CAUSAL.join(" "), writes.join(" "));
                let answer = agent
                    .post(&format!("{base}/v1/dags/audit/invoke"))
                    .set("squall-consistency", "causal")
                    .set("squall-keys", &CAUSAL.join(","))
                    .set("squall-session", "writer")
                    .send_bytes(input.as_bytes());
                if let Err(e) = answer {
                    eprintln!("a causal write failed: {e}");
                    failed += 1;
                }
                runs += 1;
            }
            (runs, failed)
        })
    };
    (writer, stop)
}

/// The writer of the checked keys: every key, over and over, a new value each time, until
/// the flag is set; the thread returns how many writes it made.
fn key_writer(base: &str) -> (std::thread::JoinHandle<u64>, Arc<AtomicBool>) {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (base, stop) = (base.to_string(), stop.clone());
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
    (writer, stop)
}

/// Two executor processes with the `observe` probes, the three-step `audit` chain across them
/// (e1, e2, e1) and the `fan` DAG; the gateway's base URL. `dir` holds the processes' logs.
fn audit(dir: &std::path::Path) -> crate::support::Roles {
    let roles = roles(
        dir,
        &[],
        &[("e1", "observe,observe-3"), ("e2", "observe-2,observe-4")],
    );
    let base = roles.base.clone();
    let code = guest("observe");
    for name in ["observe", "observe-2", "observe-3", "observe-4"] {
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
    // A fan-out and fan-in: observe (e1) to observe-2 (e2) and observe-3 (e1), both to
    // observe-4 (e2).
    let fan = http(
        "PUT",
        &format!("{base}/v1/dags/fan"),
        None,
        br#"{"functions":["observe","observe-2","observe-3","observe-4"],
             "edges":[["observe","observe-2"],["observe","observe-3"],
                      ["observe-2","observe-4"],["observe-3","observe-4"]]}"#,
    );
    assert_eq!(fan.status, 201, "{}", fan.text());
    // The chain crosses executors: e1, e2, e1.
    let first = http(
        "POST",
        &format!("{base}/v1/dags/audit/invoke"),
        None,
        b"acct/a\n",
    );
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.placement, "observe@e1,observe-2@e2,observe-3@e1");

    roles
}

/// `lww` promises nothing across reads: the checker must see runs that read a key in two versions, which shows it can see them.
#[test]
fn lww_runs_read_keys_in_two_versions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = audit(dir.path());
    let base = roles.base.clone();
    let (writer, stop) = key_writer(&base);
    let (lww, versions) = check(&base, "lww", 500, false);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("the writer");
    eprintln!("lww anomalies: {lww} of 500 runs ({written} writes, {versions} versions read)");
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
}

/// Repeatable read: no run reads a key in two versions, also when its middle step writes a key the last step reads back.
#[test]
fn repeatable_read_runs_read_one_version_of_each_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = audit(dir.path());
    let base = roles.base.clone();
    let (writer, stop) = key_writer(&base);
    let (repeatable, versions) = check(&base, "repeatable-read", 2000, false);
    let (writing, _) = check(&base, "repeatable-read", 1000, true);
    stop.store(true, Ordering::Relaxed);
    let written = writer.join().expect("the writer");
    eprintln!(
        "repeatable-read anomalies: {repeatable} of 2000 runs, with a write in step 2 \
         {writing} of 1000 runs ({written} writes, {versions} versions read)"
    );
    assert!(
        versions > 10,
        "the keys hardly changed ({versions} versions read)"
    );
    assert_eq!(
        repeatable, 0,
        "repeatable-read runs read a key in two versions"
    );
    assert_eq!(
        writing, 0,
        "repeatable-read runs read a key in another version than their own write"
    );
}

/// Causal: runs read within one causal cut, per session never older than before; `lww` readers of the same keys do not, and runs without declared keys are refused rather than read outside the cut.
#[test]
fn causal_runs_read_within_one_causal_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = audit(dir.path());
    let base = roles.base.clone();
    // Causal: reads of the causal writer's keys.
    let (writer, stop) = causal_writer(&base);
    let lww = check_causal(&base, "lww", 2000, false);
    let causal = check_causal(&base, "causal", 2000, true);
    let undeclared = check_causal(&base, "causal", 1000, false);
    let fanned = check_fan(&base, 500);
    stop.store(true, Ordering::Relaxed);
    let (written, failed_writes) = writer.join().expect("the causal writer");
    eprintln!(
        "causal anomalies: lww readers {lww:?} of 2000 runs; causal readers {causal:?} of 2000 \
         runs; causal readers without declared keys {undeclared:?} of 1000 runs; causal \
         fan-in runs {fanned:?} of 500 ({written} writer runs, {failed_writes} failed)"
    );
    assert_eq!(
        (fanned.repeatable, fanned.cut, fanned.failed),
        (0, 0, 0),
        "causal fan-in runs: {:?}",
        fanned.example
    );
    assert_eq!(
        (undeclared.repeatable, undeclared.cut, undeclared.session),
        (0, 0, 0),
        "causal runs without declared keys broke causality: {:?}",
        undeclared.example
    );
    assert!(
        lww.cut > 0,
        "no lww run read outside a causal cut: the checker saw nothing"
    );
    // Without declared keys some runs find no version that fits their cut, and are refused.
    assert!(undeclared.failed > 0, "no run was refused: {undeclared:?}");
    assert_eq!(
        (causal.repeatable, causal.cut, causal.session),
        (0, 0, 0),
        "causal runs broke causality: {:?}",
        causal.example
    );
    assert_eq!(causal.failed, 0, "causal runs failed: {:?}", causal.example);
    assert_eq!(failed_writes, 0, "causal writer runs failed");
}

/// Causal sessions: a write on one executor is read back at once on the other.
#[test]
fn causal_sessions_read_their_own_writes_across_executors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = audit(dir.path());
    let base = roles.base.clone();
    let sessions = check_sessions(&base, 500);
    eprintln!("read-your-writes across executors: {sessions} of 2000 reads went back");
    assert_eq!(sessions, 0, "a session read older than its own write");
}

/// Mismatched modes on a key, sessions outside causal mode, too many declared keys and unknown modes are clear errors.
#[test]
fn mismatched_modes_and_bad_consistency_headers_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = audit(dir.path());
    let base = roles.base.clone();
    // Keys of both kinds: an lww value of OWN, and causal versions of the causal keys.
    let put = http("PUT", &format!("{base}/v1/kv/{OWN}"), None, b"x");
    assert_eq!(put.status, 204, "{}", put.text());
    let writes: Vec<String> = CAUSAL
        .iter()
        .enumerate()
        .map(|(step, key)| format!("{key}@{step}=w0"))
        .collect();
    agent()
        .post(&format!("{base}/v1/dags/audit/invoke"))
        .set("squall-consistency", "causal")
        .set("squall-keys", &CAUSAL.join(","))
        .send_bytes(format!("{} {}\n", CAUSAL.join(" "), writes.join(" ")).as_bytes())
        .expect("a causal write");
    // A mismatched mode on a key is a clear error: a causal write of an lww key, and an
    // lww write of a causal key.
    let mismatch =
        |mode: &str, input: &str| match ureq::post(&format!("{base}/v1/dags/audit/invoke"))
            .set("squall-consistency", mode)
            .send_bytes(input.as_bytes())
        {
            Err(ureq::Error::Status(_, response)) => response.into_string().expect("body"),
            other => panic!("expected the {mode} write to fail, got {other:?}"),
        };
    let body = mismatch("causal", &format!("{OWN} {OWN}@0=x\n"));
    assert!(body.contains("holds lww values"), "{body}");
    let body = mismatch("lww", "causal/a causal/a@0=x\n");
    assert!(body.contains("multi-causal"), "{body}");
    // Sessions are causal.
    let session = ureq::post(&format!("{base}/v1/dags/audit/invoke"))
        .set("squall-session", "s")
        .send_bytes(b"acct/a\n");
    assert!(
        matches!(session, Err(ureq::Error::Status(400, _))),
        "{session:?}"
    );
    // A call declares at most 1024 keys.
    let many: Vec<String> = (0..=1024).map(|i| format!("k{i}")).collect();
    let body = refused(
        ureq::post(&format!("{base}/v1/dags/audit/invoke"))
            .set("squall-consistency", "causal")
            .set("squall-keys", &many.join(",")),
    );
    assert!(body.contains("at most 1024"), "{body}");
    // An unknown mode is refused, naming the modes there are.
    let body = refused(
        ureq::post(&format!("{base}/v1/dags/audit/invoke"))
            .set("squall-consistency", "serializable"),
    );
    assert!(body.contains("repeatable-read"), "{body}");
}
