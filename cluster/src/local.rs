//! The local provisioner: cluster roles as child processes of one supervisor on one machine.
//!
//! `squall cluster up` uses it: it starts a router, a scheduler and a gateway once, and
//! storage nodes and executors as the policy engine asks. Every child is a `squall` process of
//! the same binary, printing its `READY key=value ...` line when it serves; its standard error
//! goes to a log file per process. A child that exits unasked is started again. Removing one
//! sends it SIGTERM: a storage node then hands its keys off, an executor drains, and only
//! then do they exit (after a deadline, SIGKILL).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use squall_proto::poll::Poll;

use crate::{Error, Provisioner, Role};

/// How long a child may take to print READY.
const READY_DEADLINE: Duration = Duration::from_secs(60);

/// How long a removed child may take to hand off or drain before it is killed.
const STOP_DEADLINE: Duration = Duration::from_secs(90);

/// What the local provisioner starts its children with.
#[derive(Clone)]
pub struct LocalConfig {
    /// The `squall` binary.
    pub binary: PathBuf,
    /// Where the children's logs go.
    pub log_dir: PathBuf,
    /// Host every child binds.
    pub host: String,
    /// Extra arguments per role (after the role's own).
    pub extra: HashMap<Role, Vec<String>>,
    /// Where storage nodes keep their logs: `kvs-N` for the N-th slot (the lowest free one
    /// when a node starts, so a restarted cluster finds its data). `None`: memory only.
    pub data_dir: Option<PathBuf>,
    /// Environment variables per role: secrets go here rather than on command lines, which
    /// other users of the machine can read. Never printed (`Debug` shows only their names).
    pub env: HashMap<Role, Vec<(String, String)>>,
}

impl std::fmt::Debug for LocalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: HashMap<&Role, Vec<&str>> = self
            .env
            .iter()
            .map(|(role, vars)| (role, vars.iter().map(|(name, _)| name.as_str()).collect()))
            .collect();
        f.debug_struct("LocalConfig")
            .field("binary", &self.binary)
            .field("log_dir", &self.log_dir)
            .field("host", &self.host)
            .field("extra", &self.extra)
            .field("data_dir", &self.data_dir)
            .field("env", &env)
            .finish()
    }
}

/// A running child.
#[derive(Debug)]
pub struct Process {
    /// Its role.
    pub role: Role,
    /// Its id: a storage node's address, an executor's id, another role's address.
    pub id: String,
    /// Its log file.
    pub log: PathBuf,
    /// A storage node's data slot.
    slot: Option<usize>,
    child: Child,
}

/// Children that run, and those asked to stop.
#[derive(Debug)]
pub struct LocalProvisioner {
    config: LocalConfig,
    /// The router's and the schedulers' addresses, once started: storage nodes join the one,
    /// executors the others.
    router: Option<String>,
    schedulers: Vec<String>,
    running: Vec<Process>,
    stopping: Vec<(Process, Instant)>,
    started: u64,
}

impl LocalProvisioner {
    /// A provisioner with no children yet.
    pub fn new(config: LocalConfig) -> Self {
        Self {
            config,
            router: None,
            schedulers: Vec::new(),
            running: Vec::new(),
            stopping: Vec::new(),
            started: 0,
        }
    }

    /// Starts one child of `role` and waits for its READY line.
    pub fn start(&mut self, role: Role) -> Result<&Process, Error> {
        let mut args: Vec<String> = match role {
            Role::Router => vec!["router".into(), "--port".into(), "0".into()],
            Role::Storage => {
                let router = self.router.clone().ok_or_else(|| {
                    Error::Provision("start the router before storage nodes".into())
                })?;
                vec![
                    "kvs".into(),
                    "--port".into(),
                    "0".into(),
                    "--join".into(),
                    router,
                ]
            }
            Role::Scheduler => vec![
                "scheduler".into(),
                "--port".into(),
                "0".into(),
                "--kvs".into(),
                self.router_or_err()?,
            ],
            Role::Executor | Role::Gateway => {
                if self.schedulers.is_empty() {
                    return Err(Error::Provision(
                        "start a scheduler before executors and gateways".into(),
                    ));
                }
                let mut args = vec![
                    if role == Role::Executor {
                        "executor".into()
                    } else {
                        "gateway".into()
                    },
                    "--kvs".into(),
                    self.router_or_err()?,
                    "--scheduler".into(),
                    self.schedulers.join(","),
                ];
                if role == Role::Executor {
                    args.extend(["--port".into(), "0".into()]);
                }
                args
            }
        };
        args.extend(["--host".into(), self.config.host.clone()]);
        let slot = match (&self.config.data_dir, role) {
            (Some(dir), Role::Storage) => {
                // A node still handing off holds its slot until it has exited.
                let taken = |s: usize| {
                    self.running.iter().any(|p| p.slot == Some(s))
                        || self.stopping.iter().any(|(p, _)| p.slot == Some(s))
                };
                let slot = (0..).find(|s| !taken(*s)).unwrap_or(0);
                args.extend([
                    "--data-dir".into(),
                    dir.join(format!("kvs-{slot}")).display().to_string(),
                ]);
                Some(slot)
            }
            _ => None,
        };
        args.extend(self.config.extra.get(&role).cloned().unwrap_or_default());
        self.started += 1;
        let log = self
            .config
            .log_dir
            .join(format!("{}-{}.log", role.as_str(), self.started));
        let log_file = std::fs::File::create(&log)
            .map_err(|e| Error::Provision(format!("creating {}: {e}", log.display())))?;
        let mut command = Command::new(&self.config.binary);
        // A child gets the secrets its role needs, never one inherited from this process.
        for name in ["SQUALL_TOKEN", "SQUALL_CLUSTER_SECRET"] {
            command.env_remove(name);
        }
        command
            .args(&args)
            .envs(
                self.config
                    .env
                    .get(&role)
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k, v)),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        exit_with_parent(&mut command);
        let mut child = command.spawn().map_err(|e| {
            Error::Provision(format!("starting {}: {e}", self.config.binary.display()))
        })?;
        let fields = match wait_ready(&mut child) {
            Ok(fields) => fields,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::Provision(format!(
                    "{} did not start ({e}); see {}",
                    role.as_str(),
                    log.display()
                )));
            }
        };
        let id = match role {
            Role::Executor => fields.get("id"),
            Role::Gateway => fields.get("http"),
            _ => fields.get("addr"),
        }
        .cloned()
        .unwrap_or_default();
        match role {
            Role::Router => self.router = Some(id.clone()),
            Role::Scheduler => self.schedulers.push(id.clone()),
            _ => {}
        }
        tracing::info!(role = role.as_str(), %id, log = %log.display(), "started");
        self.running.push(Process {
            role,
            id,
            log,
            slot,
            child,
        });
        self.running
            .last()
            .ok_or_else(|| Error::Provision("no process".into()))
    }

    fn router_or_err(&self) -> Result<String, Error> {
        self.router
            .clone()
            .ok_or_else(|| Error::Provision("start the router first".into()))
    }

    /// Stops everything: storage nodes and executors first (they hand off and drain), then
    /// the rest; waits up to `timeout` in all, then kills what is left.
    pub fn shutdown(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for wave in [
            &[Role::Gateway, Role::Executor][..],
            &[Role::Storage],
            &[Role::Scheduler, Role::Router],
        ] {
            let (stop, keep): (Vec<Process>, Vec<Process>) = std::mem::take(&mut self.running)
                .into_iter()
                .partition(|p| wave.contains(&p.role));
            self.running = keep;
            let mut stop: Vec<Process> = stop.into_iter().chain(self.take_stopping()).collect();
            for process in &stop {
                terminate(process);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            // What is still running after the wait is killed below.
            let _ = Poll::within(left)
                .every(Duration::from_millis(50))
                .until(|| {
                    stop.retain_mut(|p| !matches!(p.child.try_wait(), Ok(Some(_))));
                    stop.is_empty().then_some(())
                });
            for mut process in stop {
                tracing::warn!(role = process.role.as_str(), id = %process.id, "did not stop in time; killing it");
                let _ = process.child.kill();
                let _ = process.child.wait();
            }
        }
    }

    fn take_stopping(&mut self) -> Vec<Process> {
        std::mem::take(&mut self.stopping)
            .into_iter()
            .map(|(p, _)| p)
            .collect()
    }
}

impl Provisioner for LocalProvisioner {
    fn add(&mut self, role: Role, count: u32) -> Result<(), Error> {
        for _ in 0..count {
            self.start(role)?;
        }
        Ok(())
    }

    fn remove(&mut self, role: Role, id: &str) -> Result<(), Error> {
        let Some(index) = self
            .running
            .iter()
            .position(|p| p.role == role && p.id == id)
        else {
            return Err(Error::Provision(format!(
                "no {} {id:?} runs here",
                role.as_str()
            )));
        };
        let process = self.running.remove(index);
        tracing::info!(role = role.as_str(), %id, "stopping (hand-off or drain first)");
        terminate(&process);
        self.stopping.push((process, Instant::now()));
        Ok(())
    }

    fn supervise(&mut self) {
        self.stopping.retain_mut(|(process, since)| {
            match process.child.try_wait() {
                Ok(Some(status)) => {
                    tracing::info!(role = process.role.as_str(), id = %process.id, %status, "stopped");
                    // A node that left cleanly handed its keys off: its log is stale, and the
                    // next node in its slot should not start from it.
                    if let (true, Some(dir), Some(slot)) =
                        (status.success(), &self.config.data_dir, process.slot)
                    {
                        let dir = dir.join(format!("kvs-{slot}"));
                        if let Err(e) = std::fs::remove_dir_all(&dir) {
                            tracing::warn!(dir = %dir.display(), cause = %e, "could not remove a departed node's data");
                        }
                    }
                    false
                }
                _ if since.elapsed() > STOP_DEADLINE => {
                    tracing::warn!(role = process.role.as_str(), id = %process.id, "did not stop in time; killing it");
                    let _ = process.child.kill();
                    let _ = process.child.wait();
                    false
                }
                _ => true,
            }
        });
        let mut died = Vec::new();
        self.running.retain_mut(|process| match process.child.try_wait() {
            Ok(Some(status)) => {
                tracing::warn!(role = process.role.as_str(), id = %process.id, %status, log = %process.log.display(), "exited unasked; starting another");
                died.push(process.role);
                false
            }
            _ => true,
        });
        for role in died {
            if let Err(e) = self.start(role) {
                tracing::error!(role = role.as_str(), cause = %e, "could not start a replacement");
            }
        }
    }
}

impl Drop for LocalProvisioner {
    fn drop(&mut self) {
        if !self.running.is_empty() || !self.stopping.is_empty() {
            self.shutdown(Duration::from_secs(30));
        }
    }
}

/// Makes the child receive SIGTERM when the supervisor dies, however it dies (even by
/// SIGKILL): it then leaves or drains as if it were removed, instead of running on unwatched.
#[allow(unsafe_code)]
fn exit_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl(2), which
    // is async-signal-safe; it touches no memory of the parent's threads.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
}

fn terminate(process: &Process) {
    let pid = Pid::from_raw(process.child.id() as i32);
    if let Err(e) = kill(pid, Signal::SIGTERM) {
        tracing::debug!(id = %process.id, cause = %e, "SIGTERM not delivered (already gone?)");
    }
}

/// Reads the child's standard output until its READY line (then keeps draining it).
fn wait_ready(child: &mut Child) -> Result<HashMap<String, String>, String> {
    let stdout = child.stdout.take().ok_or("no standard output")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(fields) = squall_proto::ready::parse(&line).filter(|_| !sent) {
                sent = tx.send(fields.into_iter().collect()).is_ok();
            }
        }
    });
    Poll::within(READY_DEADLINE)
        .until(|| match rx.try_recv() {
            Ok(fields) => Some(Ok(fields)),
            Err(mpsc::TryRecvError::Disconnected) => {
                Some(Err("it exited before it was ready".to_string()))
            }
            Err(mpsc::TryRecvError::Empty) => match child.try_wait() {
                Ok(Some(status)) => Some(Err(format!("it exited ({status})"))),
                _ => None,
            },
        })
        .unwrap_or_else(|_| Err(format!("no READY line within {READY_DEADLINE:?}")))
}
