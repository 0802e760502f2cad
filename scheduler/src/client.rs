//! The gateway's side of the fabric: sends invocations, registrations and status queries to
//! schedulers and waits (with a deadline) for their answers on its own mailbox.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use hashbrown::HashMap;
use squall_proto::call::{
    Artifact, ExecutorStatus, Failure, FailureCode, FunctionVersion, Invocation, InvokeOptions,
    LimitsRequest, Message, Target,
};
use squall_proto::fabric::{Fabric, Mailbox};
use squall_proto::report::StepReport;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type Waiting = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// Talks to schedulers. Cheap to share; thread-safe. Dropping it closes its mailbox.
#[derive(Debug)]
pub struct SchedulerClient {
    fabric: Arc<Fabric>,
    addr: String,
    schedulers: Vec<String>,
    next_scheduler: AtomicUsize,
    next_request: AtomicU64,
    waiting: Waiting,
    task: JoinHandle<()>,
}

impl SchedulerClient {
    /// A client answering on `mailbox`, sending to `schedulers` in turn. Must be called
    /// inside a tokio runtime.
    pub fn start(mut mailbox: Mailbox, schedulers: Vec<String>) -> Self {
        let waiting: Waiting = Arc::default();
        let fabric = mailbox.fabric().clone();
        let addr = mailbox.addr().to_string();
        let task = {
            let waiting = waiting.clone();
            tokio::spawn(async move {
                while let Some(message) = mailbox.recv().await {
                    let request = match &message {
                        Message::Invoked { request, .. }
                        | Message::Registered { request, .. }
                        | Message::StatusReport { request, .. } => *request,
                        other => {
                            tracing::warn!(
                                message = other.kind(),
                                "message not meant for a gateway dropped"
                            );
                            continue;
                        }
                    };
                    let waiter = waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&request);
                    if let Some(waiter) = waiter {
                        let _ = waiter.send(message);
                    }
                }
            })
        };
        Self {
            fabric,
            addr,
            schedulers,
            next_scheduler: AtomicUsize::new(0),
            next_request: AtomicU64::new(rand::random::<u32>() as u64),
            waiting,
            task,
        }
    }

    /// The schedulers it sends to.
    pub fn schedulers(&self) -> &[String] {
        &self.schedulers
    }

    /// The scheduler for the next request: the calls of a causal session always go to the
    /// same one (it keeps the session's cut), chosen by rendezvous hashing of the session id
    /// with each scheduler's address (xxh3, stable across processes and releases, and
    /// independent of the order schedulers are configured in); anything else goes
    /// round-robin.
    fn scheduler(&self, session: Option<&str>) -> Result<&str, Failure> {
        if self.schedulers.is_empty() {
            return Err(Failure::new(
                FailureCode::Unavailable,
                "no scheduler configured",
            ));
        }
        let i = match session {
            Some(session) => {
                use std::hash::{BuildHasher, BuildHasherDefault};
                // A fixed hasher, so every gateway sends a session to the same scheduler.
                let hash =
                    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
                        .hash_one(session);
                (hash % self.schedulers.len() as u64) as usize
            }
            None => self.next_scheduler.fetch_add(1, Ordering::Relaxed) % self.schedulers.len(),
        };
        Ok(&self.schedulers[i])
    }
}

/// The scheduler of `schedulers` that keeps `session`: the one whose address hashes highest
/// with the session id (rendezvous hashing). `None` without schedulers.
pub fn session_scheduler<'a>(schedulers: &'a [String], session: &str) -> Option<&'a str> {
    schedulers
        .iter()
        .max_by_key(|addr| {
            let mut label = Vec::with_capacity(session.len() + addr.len() + 1);
            label.extend_from_slice(session.as_bytes());
            label.push(0);
            label.extend_from_slice(addr.as_bytes());
            xxhash_rust::xxh3::xxh3_64(&label)
        })
        .map(String::as_str)
}

impl SchedulerClient {
    /// Sends what `build` makes (given the request id and the reply address) and waits up to
    /// `wait` for the answer.
    async fn request(
        &self,
        wait: Duration,
        session: Option<&str>,
        build: impl FnOnce(u64, String) -> Message,
    ) -> Result<Message, Failure> {
        let to = self.scheduler(session)?.to_string();
        let request = self.next_request.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(request, sender);
        // Forgets the request however this ends, the caller giving up (dropping this future,
        // as an HTTP client hanging up does) included.
        let _forget = Forget {
            waiting: &self.waiting,
            request,
        };
        if let Err(e) = self.fabric.send(&to, build(request, self.addr.clone())) {
            return Err(Failure::new(FailureCode::Unavailable, e.to_string()));
        }
        match tokio::time::timeout(wait, receiver).await {
            Ok(Ok(message)) => Ok(message),
            Ok(Err(_)) => Err(Failure::new(
                FailureCode::Internal,
                "the gateway's mailbox closed",
            )),
            Err(_) => Err(Failure::new(
                FailureCode::Unavailable,
                format!("scheduler {to} did not answer within {wait:?}"),
            )),
        }
    }

    /// Runs `target` and waits for its output. `wait` bounds the wait (the call's deadline
    /// plus a margin for the scheduler's own report).
    pub async fn invoke(
        &self,
        target: Target,
        input: Bytes,
        options: InvokeOptions,
        wait: Duration,
    ) -> Result<Invocation, Failure> {
        self.invoke_reported(target, input, options, wait).await.0
    }

    /// Runs `target` like [`SchedulerClient::invoke`], and also answers its steps' reports
    /// (empty unless `options.report` is set; for a failed call, those that reached the
    /// scheduler with its failure).
    pub async fn invoke_reported(
        &self,
        target: Target,
        input: Bytes,
        options: InvokeOptions,
        wait: Duration,
    ) -> (Result<Invocation, Failure>, Vec<StepReport>) {
        let session = options.session.clone();
        let answer = self
            .request(wait, session.as_deref(), |request, reply_to| {
                Message::Invoke {
                    request,
                    reply_to: Some(reply_to),
                    target,
                    input,
                    options,
                }
            })
            .await;
        match answer {
            Ok(Message::Invoked {
                result, reports, ..
            }) => (result, reports),
            Ok(other) => (Err(unexpected(&other)), Vec::new()),
            Err(failure) => (Err(failure), Vec::new()),
        }
    }

    /// Starts `target` without waiting; its outcome goes to `options.result_key`.
    pub fn invoke_detached(
        &self,
        target: Target,
        input: Bytes,
        options: InvokeOptions,
    ) -> Result<(), Failure> {
        let to = self.scheduler(options.session.as_deref())?;
        let message = Message::Invoke {
            request: self.next_request.fetch_add(1, Ordering::Relaxed),
            reply_to: None,
            target,
            input,
            options,
        };
        self.fabric
            .send(to, message)
            .map_err(|e| Failure::new(FailureCode::Unavailable, e.to_string()))
    }

    /// Tells every scheduler (and through them their executors) that these registry keys
    /// were just written ([`Message::Refresh`]). Call after the write, before answering the
    /// user. A scheduler that cannot be reached is logged and skipped: its cache still learns
    /// of the write by the store's push, a moment later.
    pub fn refresh(&self, keys: Vec<String>) {
        for scheduler in &self.schedulers {
            let message = Message::Refresh { keys: keys.clone() };
            if let Err(e) = self.fabric.send(scheduler, message) {
                tracing::warn!(scheduler = %scheduler, cause = %e, "refresh not sent");
            }
        }
    }

    /// Registers a function (or a model) through an executor, which checks it by compiling
    /// (or loading) it.
    pub async fn register(
        &self,
        kind: Artifact,
        name: &str,
        code: Bytes,
        limits: LimitsRequest,
        wait: Duration,
    ) -> Result<FunctionVersion, Failure> {
        let answer = self
            .request(wait, None, |request, reply_to| Message::Register {
                request,
                reply_to,
                kind,
                name: name.to_string(),
                code,
                limits,
            })
            .await?;
        match answer {
            Message::Registered { result, .. } => result,
            other => Err(unexpected(&other)),
        }
    }

    /// The executors a scheduler knows.
    pub async fn status(&self, wait: Duration) -> Result<Vec<ExecutorStatus>, Failure> {
        let answer = self
            .request(wait, None, |request, reply_to| Message::Status {
                request,
                reply_to,
            })
            .await?;
        match answer {
            Message::StatusReport { executors, .. } => Ok(executors),
            other => Err(unexpected(&other)),
        }
    }
}

/// Removes a request's waiter when dropped.
struct Forget<'a> {
    waiting: &'a Waiting,
    request: u64,
}

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.request);
    }
}

fn unexpected(message: &Message) -> Failure {
    Failure::new(
        FailureCode::Internal,
        format!("unexpected answer: {}", message.kind()),
    )
}

impl Drop for SchedulerClient {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::session_scheduler;

    #[test]
    fn a_session_goes_to_one_scheduler_whatever_their_order() {
        let schedulers: Vec<String> = (1..=5).map(|i| format!("tcp://127.0.0.1:{i}")).collect();
        let mut reversed = schedulers.clone();
        reversed.reverse();
        let mut used = std::collections::HashSet::new();
        for i in 0..100 {
            let session = format!("session-{i}");
            let chosen = session_scheduler(&schedulers, &session);
            assert_eq!(chosen, session_scheduler(&reversed, &session));
            used.insert(chosen.map(str::to_string));
        }
        // Sessions spread over the schedulers.
        assert_eq!(used.len(), 5);
        assert_eq!(session_scheduler(&[], "s"), None);
    }
}
