//! Spawning `squall` processes for tests: OS-assigned ports, a temporary directory each,
//! `READY addr=...` awaited with a deadline, logs kept in a file and shown on failure, and the
//! process stopped on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use squall_proto::poll::Poll;

/// How long a node may take to print READY (recovery of a large log included).
const READY_DEADLINE: Duration = Duration::from_secs(30);

/// `squall up` on OS-assigned ports, in memory.
pub const UP: [&str; 8] = [
    "up",
    "--in-memory",
    "--http-port",
    "0",
    "--kvs-port",
    "0",
    "--scheduler-port",
    "0",
];

/// [`UP`], with `extra` arguments after.
pub fn up(log_dir: &Path, extra: &[&str]) -> NodeProcess {
    let mut args = UP.to_vec();
    args.extend_from_slice(extra);
    NodeProcess::spawn(log_dir, &args)
}

/// A second gateway, in a process of its own, in front of `up`'s store and scheduler, with
/// bearer token `token`.
pub fn second_gateway(log_dir: &Path, up: &NodeProcess, token: &str) -> NodeProcess {
    NodeProcess::spawn(
        log_dir,
        &[
            "gateway",
            "--http-port",
            "0",
            "--kvs",
            &up.field("kvs"),
            "--scheduler",
            &up.field("scheduler"),
            "--token",
            token,
        ],
    )
}

/// The roles as separate processes: a store, a scheduler, a gateway, and executors.
pub struct Roles {
    /// The gateway's base URL.
    pub base: String,
    /// The executors, in the order asked.
    pub executors: Vec<NodeProcess>,
    // Dropped last: the executors and gateway need them until they stop.
    _gateway: NodeProcess,
    _scheduler: NodeProcess,
    _kvs: NodeProcess,
}

/// Starts a store, a scheduler, a gateway (with `gateway_args`) and one executor per
/// `(id, serves)`, each a process of its own on OS-assigned ports, and waits until the
/// executors have joined.
pub fn roles(log_dir: &Path, gateway_args: &[&str], executors: &[(&str, &str)]) -> Roles {
    let kvs = NodeProcess::start(log_dir, &[]);
    let scheduler = NodeProcess::spawn(log_dir, &["scheduler", "--port", "0", "--kvs", &kvs.addr]);
    let sched = scheduler.field("addr");
    let mut args = vec![
        "gateway",
        "--http-port",
        "0",
        "--kvs",
        &kvs.addr,
        "--scheduler",
        &sched,
    ];
    args.extend_from_slice(gateway_args);
    let gateway = NodeProcess::spawn(log_dir, &args);
    let base = gateway.field("http");
    let executors: Vec<NodeProcess> = executors
        .iter()
        .map(|(id, serves)| {
            NodeProcess::spawn(
                log_dir,
                &[
                    "executor",
                    "--kvs",
                    &kvs.addr,
                    "--scheduler",
                    &sched,
                    "--id",
                    id,
                    "--serves",
                    serves,
                ],
            )
        })
        .collect();
    let token = gateway_args
        .windows(2)
        .find(|pair| pair[0] == "--token")
        .map(|pair| pair[1]);
    Poll::within(READY_DEADLINE)
        .until(|| {
            let listed = http("GET", &format!("{base}/v1/executors"), token, b"").json();
            (listed.as_array().map(Vec::len) == Some(executors.len())).then_some(())
        })
        .expect("executors did not join");
    Roles {
        base,
        executors,
        _gateway: gateway,
        _scheduler: scheduler,
        _kvs: kvs,
    }
}

/// The `squall` binary built for these tests.
pub fn squall() -> Command {
    Command::new(env!("CARGO_BIN_EXE_squall"))
}

/// A running `squall kvs` process.
pub struct NodeProcess {
    child: Option<Child>,
    /// The address clients connect to (storage nodes).
    pub addr: String,
    fields: HashMap<String, String>,
    log: PathBuf,
}

impl NodeProcess {
    /// Starts `squall kvs` on port 0 with `args`, logging to `log_dir`, and waits for READY.
    pub fn start(log_dir: &Path, args: &[&str]) -> NodeProcess {
        let mut full = vec!["kvs", "--host", "127.0.0.1", "--port", "0"];
        full.extend_from_slice(args);
        let mut node = NodeProcess::spawn(log_dir, &full);
        node.addr = node.field("addr");
        node
    }

    /// Starts `squall` with `args` (a subcommand and its flags), logging to `log_dir`, and
    /// waits for its `READY key=value ...` line.
    pub fn spawn(log_dir: &Path, args: &[&str]) -> NodeProcess {
        let log = log_dir.join(format!("{}-{}.log", args[0], rand::random::<u32>()));
        let log_file = std::fs::File::create(&log).expect("create node log");
        let mut child = squall()
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("SQUALL_TOKEN")
            .current_dir(log_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn squall");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(fields) = squall_proto::ready::parse(&line) {
                    let _ = tx.send(fields.into_iter().collect::<HashMap<_, _>>());
                }
            }
        });
        let mut node = NodeProcess {
            child: Some(child),
            addr: String::new(),
            fields: HashMap::new(),
            log,
        };
        match rx.recv_timeout(READY_DEADLINE) {
            Ok(fields) => node.fields = fields,
            Err(_) => panic!(
                "squall {} did not print READY in time; its log:\n{}",
                args[0],
                node.log_text()
            ),
        }
        node
    }

    /// A field of the READY line.
    pub fn field(&self, key: &str) -> String {
        self.fields
            .get(key)
            .unwrap_or_else(|| panic!("READY line has no {key}: {:?}", self.fields))
            .clone()
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().expect("node is running").id() as i32)
    }

    /// SIGKILL: the process gets no chance to flush or clean up.
    pub fn kill_hard(&mut self) {
        kill(self.pid(), Signal::SIGKILL).expect("SIGKILL");
        if let Some(mut child) = self.child.take() {
            child.wait().expect("reap killed node");
        }
    }

    /// SIGTERM, then SIGKILL if the node has not exited within the deadline. Returns whether it
    /// exited cleanly by itself.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let exited = Poll::within(Duration::from_secs(5))
            .every(Duration::from_millis(50))
            .until(|| child.try_wait().ok().flatten());
        match exited {
            Ok(status) => status.success(),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                false
            }
        }
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal the node");
    }

    /// Waits up to `within` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let status = Poll::within(within)
            .until(|| self.child.as_mut()?.try_wait().ok().flatten())
            .ok()?;
        self.child = None;
        Some(status)
    }

    /// Whether the process is still alive.
    pub fn is_alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.stop();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- node log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
            // A cluster's roles log beside it, under logs/: their warnings and errors.
            let roles = self.log.parent().map(|dir| dir.join("logs"));
            let mut files: Vec<_> = roles
                .and_then(|dir| std::fs::read_dir(dir).ok())
                .into_iter()
                .flatten()
                .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                .collect();
            files.sort();
            for file in files {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let lines: Vec<_> = text
                    .lines()
                    .filter(|line| line.contains("WARN") || line.contains("ERROR"))
                    .take(60)
                    .collect();
                if !lines.is_empty() {
                    eprintln!(
                        "--- warnings ({}) ---\n{}",
                        file.display(),
                        lines.join("\n")
                    );
                }
            }
        }
    }
}

/// An HTTP answer: status, the placement, activation and replay headers, body.
pub struct Answer {
    pub status: u16,
    pub placement: String,
    pub activation: String,
    /// Whether `squall-idempotent-replay: true` came back.
    pub replay: bool,
    /// The `Retry-After` header, if any.
    pub retry_after: Option<String>,
    pub body: Vec<u8>,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn error_code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("no error code in {}", self.text()))
            .to_string()
    }
}

/// The array `field` of the JSON answer to `GET {base}{path}` (which must answer 200).
pub fn listed(base: &str, path: &str, field: &str, token: &str) -> Vec<Value> {
    let page = http("GET", &format!("{base}{path}"), Some(token), b"");
    assert_eq!(page.status, 200, "{}", page.text());
    page.json()[field]
        .as_array()
        .unwrap_or_else(|| panic!("no {field} in {}", page.text()))
        .clone()
}

/// Sends an HTTP request (with a bearer token if given) and returns the answer, whatever its
/// status.
pub fn http(method: &str, url: &str, token: Option<&str>, body: &[u8]) -> Answer {
    http_with(method, url, token, &[], body)
}

/// [`http`] with more headers.
pub fn http_with(
    method: &str,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Answer {
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(120))
        .build();
    let mut request = agent.request(method, url);
    if let Some(token) = token {
        request = request.set("Authorization", &format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let response = match request.send_bytes(body) {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = response.status();
    let placement = response
        .header("squall-placement")
        .unwrap_or_default()
        .to_string();
    let activation = response
        .header("squall-activation")
        .unwrap_or_default()
        .to_string();
    let replay = response.header("squall-idempotent-replay") == Some("true");
    let retry_after = response.header("retry-after").map(str::to_string);
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut response.into_reader(), &mut body).expect("read body");
    Answer {
        status,
        placement,
        activation,
        replay,
        retry_after,
        body,
    }
}
