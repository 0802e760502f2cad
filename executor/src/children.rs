//! Children: the calls a running call starts through `squall:compose/futures` and awaits
//! later (Cloudburst's futures).
//!
//! A child runs wherever a [`Spawner`] puts it. On a node of the call fabric that is a
//! scheduler, which places it by the usual rules (locality, warmth, load), so children of
//! one call spread over executor processes; an executor without a fabric (embedded, tests)
//! runs them itself, as nested calls that share the parent's session. Each child runs in a
//! task of its own from the moment it starts, so it makes progress while its parent computes.
//!
//! A call's [`Children`] live in its host state and end with it: dropping them aborts every
//! child still running, and aborting a child drops its future, which is how the spawner
//! learns that nobody waits any more (the fabric's spawner then tells the scheduler, which
//! cancels the call on its executors). A parent that fails, traps or runs out of time thus
//! leaves no child behind, and neither does one that returns without awaiting them.
//!
//! # Cost
//! Starting a child costs one task and, on the fabric, one message to a scheduler and one
//! back; a call's table holds one entry per child it started (a few words each), until the
//! call ends.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use squall_proto::call::{Consistency, Failure, FailureCode, Target};
use tokio::task::JoinHandle;

/// Children a call may hold at once, running or finished but not yet awaited: well under an
/// executor's instance pool (256 by default), so one call's fan-out cannot take every
/// instance of the executors it lands on, and the outputs it holds stay bounded (this many
/// times a function's largest output).
pub const MAX_RUNNING_CHILDREN: usize = 64;

/// Children a call may start in all.
pub const MAX_CHILDREN: u32 = 10_000;

/// A child's answer: its output, or why there is none.
pub type ChildOutcome = Result<Bytes, Failure>;

/// A child under way. Dropping it before it answers abandons the child: its spawner has it
/// cancelled wherever it runs.
pub type ChildFuture = Pin<Box<dyn Future<Output = ChildOutcome> + Send>>;

/// What a child inherits from its parent.
#[derive(Debug, Clone, Copy)]
pub struct Inherited {
    /// The parent's deadline.
    pub deadline: Instant,
    /// The parent's consistency mode.
    pub consistency: Consistency,
    /// How deep the child is in its chain of calls: its parent's depth and one.
    pub depth: u32,
    /// How many `kv-change` deliveries led to the parent (its writes carry it on).
    pub chain: u32,
}

/// Where a call's children run.
pub trait Spawner: Send + Sync + std::fmt::Debug {
    /// Starts `target` on `input` with what it inherits from its parent; its answer.
    fn spawn(&self, target: Target, input: Bytes, inherited: Inherited) -> ChildFuture;
}

/// Why a child could not be started or awaited (besides its own failure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildError {
    /// Past a limit on the call's children.
    Limit(String),
    /// A handle the call did not start, or one awaited already; an empty list.
    Invalid(String),
    /// The child failed, or was cancelled.
    Failed(Failure),
    /// The parent's deadline passed while it waited.
    Timeout,
}

enum Child {
    Running(JoinHandle<ChildOutcome>),
    Finished(ChildOutcome),
    /// Cancelled before it was awaited; its output (if any) dropped.
    Cancelled,
    Taken,
}

/// The children of one call: started, finished, awaited. Dropping it aborts those still
/// running.
#[derive(Default)]
pub struct Children {
    next: u64,
    started: u32,
    /// Children running or finished and not yet awaited.
    held: usize,
    table: HashMap<u64, Child>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children")
            .field("started", &self.started)
            .field("held", &self.held)
            .finish()
    }
}

impl Drop for Children {
    fn drop(&mut self) {
        for child in self.table.values() {
            if let Child::Running(task) = child {
                task.abort();
            }
        }
    }
}

impl Children {
    /// Starts the child `spawn` makes, in a task of its own, if the call may have another;
    /// its handle. `spawn` is not called past a limit.
    pub fn start(&mut self, spawn: impl FnOnce() -> ChildFuture) -> Result<u64, ChildError> {
        if self.started >= MAX_CHILDREN {
            return Err(ChildError::Limit(format!(
                "a call starts at most {MAX_CHILDREN} children"
            )));
        }
        if self.held >= MAX_RUNNING_CHILDREN {
            return Err(ChildError::Limit(format!(
                "a call holds at most {MAX_RUNNING_CHILDREN} children not yet awaited; wait for (or cancel) some first"
            )));
        }
        self.started += 1;
        self.held += 1;
        self.next += 1;
        let handle = self.next;
        self.table
            .insert(handle, Child::Running(tokio::spawn(spawn())));
        Ok(handle)
    }

    /// Waits (at most `remaining`) for child `handle` and takes its answer.
    pub async fn wait(&mut self, handle: u64, remaining: Duration) -> Result<Bytes, ChildError> {
        let child = self.table.get_mut(&handle).ok_or_else(|| unknown(handle))?;
        let outcome = match child {
            Child::Taken => return Err(awaited(handle)),
            Child::Cancelled => {
                *child = Child::Taken;
                return Err(cancelled(handle));
            }
            Child::Finished(_) => match std::mem::replace(child, Child::Taken) {
                Child::Finished(outcome) => {
                    self.held -= 1;
                    outcome
                }
                _ => return Err(awaited(handle)),
            },
            Child::Running(task) => match tokio::time::timeout(remaining, task).await {
                Err(_) => return Err(ChildError::Timeout),
                Ok(joined) => {
                    *child = Child::Taken;
                    self.held -= 1;
                    joined.unwrap_or_else(|e| Err(ended(e)))
                }
            },
        };
        outcome.map_err(ChildError::Failed)
    }

    /// Waits (at most `remaining`) until one of `handles` has finished; its index in the list.
    /// Takes nothing: [`Self::wait`] on it answers at once.
    pub async fn wait_any(
        &mut self,
        handles: &[u64],
        remaining: Duration,
    ) -> Result<u32, ChildError> {
        if handles.is_empty() {
            return Err(ChildError::Invalid(
                "wait-any needs at least one child".into(),
            ));
        }
        for &handle in handles {
            match self.table.get(&handle) {
                None => return Err(unknown(handle)),
                Some(Child::Taken) => return Err(awaited(handle)),
                Some(_) => {}
            }
        }
        let table = &mut self.table;
        let ready = std::future::poll_fn(|cx| {
            for (index, handle) in handles.iter().enumerate() {
                let Some(child) = table.get_mut(handle) else {
                    continue;
                };
                match child {
                    Child::Finished(_) | Child::Cancelled => return Poll::Ready(index),
                    Child::Running(task) => {
                        if let Poll::Ready(joined) = Pin::new(task).poll(cx) {
                            *child = Child::Finished(joined.unwrap_or_else(|e| Err(ended(e))));
                            return Poll::Ready(index);
                        }
                    }
                    Child::Taken => {}
                }
            }
            Poll::Pending
        });
        match tokio::time::timeout(remaining, ready).await {
            Ok(index) => Ok(u32::try_from(index).unwrap_or(u32::MAX)),
            Err(_) => Err(ChildError::Timeout),
        }
    }

    /// Cancels child `handle` not yet awaited: it stops wherever it runs, its output (if it
    /// had finished) is dropped, and its `wait` answers cancelled. Does nothing to a child
    /// awaited, cancelled or unknown.
    pub fn cancel(&mut self, handle: u64) {
        let Some(child) = self.table.get_mut(&handle) else {
            return;
        };
        match child {
            Child::Running(task) => task.abort(),
            Child::Finished(_) => {}
            Child::Cancelled | Child::Taken => return,
        }
        *child = Child::Cancelled;
        self.held -= 1;
    }
}

fn cancelled(handle: u64) -> ChildError {
    ChildError::Failed(Failure::new(
        FailureCode::Cancelled,
        format!("child {handle} was cancelled by its parent"),
    ))
}

fn unknown(handle: u64) -> ChildError {
    ChildError::Invalid(format!("this call started no child {handle}"))
}

fn awaited(handle: u64) -> ChildError {
    ChildError::Invalid(format!("child {handle} was awaited already"))
}

/// A child's task that ended without an answer (aborted, or it panicked).
fn ended(error: tokio::task::JoinError) -> Failure {
    if error.is_cancelled() {
        Failure::new(FailureCode::Cancelled, "the child was cancelled")
    } else {
        Failure::new(
            FailureCode::Internal,
            format!("the child's task failed: {error}"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(after: Duration, outcome: ChildOutcome) -> ChildFuture {
        Box::pin(async move {
            tokio::time::sleep(after).await;
            outcome
        })
    }

    fn ok(text: &'static str) -> ChildOutcome {
        Ok(Bytes::from_static(text.as_bytes()))
    }

    #[tokio::test]
    async fn children_are_awaited_once_each_and_any_finished_one_is_found() {
        let mut children = Children::default();
        let slow = children
            .start(|| answer(Duration::from_secs(30), ok("slow")))
            .expect("start");
        let fast = children
            .start(|| answer(Duration::from_millis(5), ok("fast")))
            .expect("start");
        let second = Duration::from_secs(10);
        assert_eq!(children.wait_any(&[slow, fast], second).await, Ok(1));
        assert_eq!(children.wait(fast, second).await, Ok(Bytes::from("fast")));
        assert!(matches!(
            children.wait(fast, second).await,
            Err(ChildError::Invalid(m)) if m.contains("awaited already")
        ));
        assert!(matches!(
            children.wait(99, second).await,
            Err(ChildError::Invalid(m)) if m.contains("no child 99")
        ));
        assert!(matches!(
            children.wait_any(&[], second).await,
            Err(ChildError::Invalid(_))
        ));
        assert_eq!(
            children.wait(slow, Duration::from_millis(10)).await,
            Err(ChildError::Timeout)
        );
        children.cancel(slow);
        assert!(matches!(
            children.wait(slow, second).await,
            Err(ChildError::Failed(f)) if f.code == FailureCode::Cancelled
        ));
    }

    #[tokio::test]
    async fn a_childs_failure_reaches_its_parent() {
        let mut children = Children::default();
        let failing = children
            .start(|| {
                answer(
                    Duration::ZERO,
                    Err(Failure::new(FailureCode::NotFound, "no such function")),
                )
            })
            .expect("start");
        assert!(matches!(
            children.wait(failing, Duration::from_secs(10)).await,
            Err(ChildError::Failed(f)) if f.code == FailureCode::NotFound
        ));
    }

    #[tokio::test]
    async fn children_past_the_limit_are_refused_before_they_start() {
        let mut children = Children::default();
        for _ in 0..MAX_RUNNING_CHILDREN {
            children
                .start(|| answer(Duration::from_secs(30), ok("x")))
                .expect("start");
        }
        let mut spawned = false;
        let refused = children.start(|| {
            spawned = true;
            answer(Duration::ZERO, ok("x"))
        });
        assert!(matches!(refused, Err(ChildError::Limit(_))), "{refused:?}");
        assert!(!spawned, "a refused child must not be sent anywhere");
        // Finished but not awaited still holds its place (and its output); cancelling it
        // (as dropping an SDK child does) frees the place.
        let mut held = Children::default();
        let handles: Vec<u64> = (0..MAX_RUNNING_CHILDREN)
            .map(|_| {
                held.start(|| answer(Duration::ZERO, ok("x")))
                    .expect("start")
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(matches!(
            held.start(|| answer(Duration::ZERO, ok("x"))),
            Err(ChildError::Limit(_))
        ));
        held.cancel(handles[0]);
        assert!(held.start(|| answer(Duration::ZERO, ok("x"))).is_ok());
        assert!(matches!(
            held.wait(handles[0], Duration::from_secs(1)).await,
            Err(ChildError::Failed(f)) if f.code == FailureCode::Cancelled
        ));
    }

    #[tokio::test]
    async fn dropping_a_calls_children_cancels_those_still_running() {
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut children = Children::default();
        let flag = Flag(dropped.clone());
        children
            .start(move || {
                Box::pin(async move {
                    let _flag = flag;
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    ok("never")
                })
            })
            .expect("start");
        tokio::task::yield_now().await;
        drop(children);
        squall_proto::poll::Poll::within(Duration::from_secs(5))
            .until_async(|| {
                let dropped = dropped.clone();
                async move {
                    tokio::task::yield_now().await;
                    dropped
                        .load(std::sync::atomic::Ordering::SeqCst)
                        .then_some(())
                }
            })
            .await
            .expect("the child's future was dropped");
    }
}
