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

/// Children a call may have running at once: well under an executor's instance pool (256
/// by default), so one call's fan-out cannot take every instance of the executors it lands on.
pub const MAX_RUNNING_CHILDREN: usize = 64;

/// Children a call may start in all.
pub const MAX_CHILDREN: u32 = 10_000;

/// A child's answer: its output, or why there is none.
pub type ChildOutcome = Result<Bytes, Failure>;

/// A child under way. Dropping it before it answers abandons the child: its spawner has it
/// cancelled wherever it runs.
pub type ChildFuture = Pin<Box<dyn Future<Output = ChildOutcome> + Send>>;

/// Where a call's children run.
pub trait Spawner: Send + Sync + std::fmt::Debug {
    /// Starts `target` on `input`, to be over by `deadline`, in `consistency`; its answer.
    fn spawn(
        &self,
        target: Target,
        input: Bytes,
        deadline: Instant,
        consistency: Consistency,
    ) -> ChildFuture;
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
    Taken,
}

/// The children of one call: started, finished, awaited. Dropping it aborts those still
/// running.
#[derive(Default)]
pub struct Children {
    next: u64,
    started: u32,
    table: HashMap<u64, Child>,
}

impl std::fmt::Debug for Children {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Children")
            .field("started", &self.started)
            .field("held", &self.table.len())
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
    /// Children still running.
    fn running(&self) -> usize {
        self.table
            .values()
            .filter(|c| matches!(c, Child::Running(task) if !task.is_finished()))
            .count()
    }

    /// Starts the child `spawn` makes, in a task of its own, if the call may have another;
    /// its handle. `spawn` is not called past a limit.
    pub fn start(&mut self, spawn: impl FnOnce() -> ChildFuture) -> Result<u64, ChildError> {
        if self.started >= MAX_CHILDREN {
            return Err(ChildError::Limit(format!(
                "a call starts at most {MAX_CHILDREN} children"
            )));
        }
        if self.running() >= MAX_RUNNING_CHILDREN {
            return Err(ChildError::Limit(format!(
                "a call has at most {MAX_RUNNING_CHILDREN} children running at once; wait for some first"
            )));
        }
        self.started += 1;
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
            Child::Finished(_) => match std::mem::replace(child, Child::Taken) {
                Child::Finished(outcome) => outcome,
                _ => return Err(awaited(handle)),
            },
            Child::Running(task) => match tokio::time::timeout(remaining, task).await {
                Err(_) => return Err(ChildError::Timeout),
                Ok(joined) => {
                    *child = Child::Taken;
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
                    Child::Finished(_) => return Poll::Ready(index),
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

    /// Cancels child `handle` if it runs: it stops wherever it runs, and its `wait` answers
    /// cancelled. Does nothing to a child finished, awaited or unknown.
    pub fn cancel(&mut self, handle: u64) {
        let Some(child) = self.table.get_mut(&handle) else {
            return;
        };
        let running = match child {
            Child::Running(task) if !task.is_finished() => {
                task.abort();
                true
            }
            _ => false,
        };
        if running {
            *child = Child::Finished(Err(Failure::new(
                FailureCode::Cancelled,
                format!("child {handle} was cancelled by its parent"),
            )));
        }
    }
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
