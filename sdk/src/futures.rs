//! Children: calls started now and awaited later (`squall:compose/futures`).
//!
//! ```ignore
//! // Fan out: one child per chunk, placed by the scheduler, then every output in order.
//! let children = chunks
//!     .iter()
//!     .map(|chunk| squall_sdk::futures::start("count-words", chunk))
//!     .collect::<Result<Vec<_>, _>>()
//!     .map_err(|e| e.to_string())?;
//! let counts = squall_sdk::futures::wait_all(children).map_err(|e| e.to_string())?;
//! ```
//!
//! A [`Child`] runs while its parent goes on, wherever the scheduler places it, with what is
//! left of the parent's deadline. Dropping a `Child` that was not awaited cancels it, and so
//! does the parent's end: no child outlives the call that started it. A call holds at most 64
//! children not yet awaited and starts 10 000 in all ([`ChildError::Limit`] past either).

use crate::bindings::squall::compose::futures as raw;

/// Why a child could not start or did not answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildError {
    /// No function (or DAG) of that name is registered in this namespace.
    NotFound(String),
    /// It returned an error, or trapped.
    Failed(String),
    /// It did not finish within what was left of the parent's deadline.
    Timeout(String),
    /// It was cancelled.
    Cancelled(String),
    /// The executor running it was lost.
    ExecutorLost(String),
    /// Past a limit on this call's children, or no executor could take it.
    Limit(String),
    /// A bad name, an empty list to wait on.
    Invalid(String),
    /// The schedulers or the store could not be reached.
    Unavailable(String),
}

impl From<raw::CallError> for ChildError {
    fn from(error: raw::CallError) -> Self {
        match error {
            raw::CallError::NotFound(m) => ChildError::NotFound(m),
            raw::CallError::Failed(m) => ChildError::Failed(m),
            raw::CallError::Timeout(m) => ChildError::Timeout(m),
            raw::CallError::Cancelled(m) => ChildError::Cancelled(m),
            raw::CallError::ExecutorLost(m) => ChildError::ExecutorLost(m),
            raw::CallError::Limit(m) => ChildError::Limit(m),
            raw::CallError::Invalid(m) => ChildError::Invalid(m),
            raw::CallError::Unavailable(m) => ChildError::Unavailable(m),
        }
    }
}

impl std::fmt::Display for ChildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (what, message) = match self {
            ChildError::NotFound(m) => ("not found", m),
            ChildError::Failed(m) => ("failed", m),
            ChildError::Timeout(m) => ("timed out", m),
            ChildError::Cancelled(m) => ("cancelled", m),
            ChildError::ExecutorLost(m) => ("executor lost", m),
            ChildError::Limit(m) => ("over a limit", m),
            ChildError::Invalid(m) => ("invalid", m),
            ChildError::Unavailable(m) => ("unavailable", m),
        };
        write!(f, "child {what}: {message}")
    }
}

impl std::error::Error for ChildError {}

/// A started child. Awaited once ([`Child::wait`]); dropped unawaited, it is cancelled.
#[derive(Debug)]
pub struct Child {
    handle: raw::Handle,
    awaited: bool,
}

impl Child {
    /// Waits for the child's output.
    pub fn wait(mut self) -> Result<Vec<u8>, ChildError> {
        self.awaited = true;
        raw::wait(self.handle).map_err(ChildError::from)
    }

    /// Cancels the child (as dropping it does).
    pub fn cancel(self) {}
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.awaited {
            raw::cancel(self.handle);
        }
    }
}

/// Starts function `name` of this namespace on `input`; returns at once.
pub fn start(name: &str, input: &[u8]) -> Result<Child, ChildError> {
    let handle = raw::start(name, input)?;
    Ok(Child {
        handle,
        awaited: false,
    })
}

/// Starts DAG `name` of this namespace on `input`; returns at once.
pub fn start_dag(name: &str, input: &[u8]) -> Result<Child, ChildError> {
    let handle = raw::start_dag(name, input)?;
    Ok(Child {
        handle,
        awaited: false,
    })
}

/// Waits until one of `children` has finished, takes it out of the list and returns it
/// with its output (competitive execution: [`drop`] the rest to cancel them). An empty list
/// is [`ChildError::Invalid`].
pub fn wait_any(children: &mut Vec<Child>) -> Result<Vec<u8>, ChildError> {
    let handles: Vec<raw::Handle> = children.iter().map(|c| c.handle).collect();
    let index = raw::wait_any(&handles)? as usize;
    if index >= children.len() {
        return Err(ChildError::Invalid(format!(
            "the host answered index {index}"
        )));
    }
    children.remove(index).wait()
}

/// Waits for every child, in order; the first failure is returned (the children not yet
/// awaited are then cancelled).
pub fn wait_all(children: Vec<Child>) -> Result<Vec<Vec<u8>>, ChildError> {
    children.into_iter().map(Child::wait).collect()
}
