//! The host side of `squall:compose/futures`: a guest starts children by name, in its own
//! namespace only (the host qualifies the name, as it does for `invoke`), and awaits them
//! within what is left of its deadline. The children themselves are [`crate::children`]'s.

use bytes::Bytes;
use squall_proto::call::{Failure, FailureCode, Target};
use squall_proto::keys;
use wasmtime::Result as WasmResult;

use crate::bindings::squall::compose::futures::{self as wit, CallError, Handle};
use crate::children::{ChildError, ChildFuture, Inherited};
use crate::host::CallState;
use crate::runtime::CallScope;

/// What a guest sees of a child's failure or of a refused handle.
fn to_wit(error: ChildError) -> CallError {
    match error {
        ChildError::Limit(m) => CallError::Limit(m),
        ChildError::Invalid(m) => CallError::Invalid(m),
        ChildError::Timeout => {
            CallError::Timeout("this call's deadline passed while it waited".into())
        }
        ChildError::Failed(failure) => failed(failure),
    }
}

/// A child's failure as the guest sees it, by its code.
fn failed(failure: Failure) -> CallError {
    let message = failure.message;
    match failure.code {
        FailureCode::NotFound => CallError::NotFound(message),
        FailureCode::Timeout => CallError::Timeout(message),
        FailureCode::Cancelled => CallError::Cancelled(message),
        FailureCode::ExecutorLost => CallError::ExecutorLost(message),
        FailureCode::NoCapacity => CallError::Limit(message),
        FailureCode::Unavailable | FailureCode::Internal => CallError::Unavailable(message),
        FailureCode::BadRequest
        | FailureCode::InvalidComponent
        | FailureCode::TooLarge
        | FailureCode::FunctionFailed
        | FailureCode::Trap
        | FailureCode::OutOfMemory
        | FailureCode::ChainTooDeep => CallError::Failed(message),
    }
}

impl CallState {
    /// Starts `name` (a function or a DAG of this call's namespace) as a child.
    fn start_child(
        &mut self,
        name: &str,
        input: Vec<u8>,
        dag: bool,
    ) -> WasmResult<Result<Handle, CallError>> {
        if let Err(e) = keys::validate_name(name) {
            return Ok(Err(CallError::Invalid(e.to_string())));
        }
        let deadline = self.call.deadline;
        if self.remaining().is_zero() {
            return Ok(Err(CallError::Timeout(
                "no time is left of this call's deadline".into(),
            )));
        }
        let qualified = keys::qualify(keys::split(&self.call.function).0, name);
        let spawn: Box<dyn FnOnce() -> ChildFuture> = match self.call.spawner.clone() {
            Some(spawner) => {
                let consistency = self.call.session.mode();
                let target = if dag {
                    Target::Dag(qualified)
                } else {
                    Target::Function(qualified)
                };
                let inherited = Inherited {
                    deadline,
                    consistency,
                    depth: self.call.depth + 1,
                    chain: self.call.session.chain(),
                };
                Box::new(move || spawner.spawn(target, Bytes::from(input), inherited))
            }
            None if dag => {
                return Ok(Err(CallError::Unavailable(
                    "DAGs start through a scheduler, and this executor has none".into(),
                )))
            }
            // No fabric: the executor runs the child itself, as a nested call in the
            // parent's session.
            None => {
                let executor = self.executor()?;
                let (depth, session) = (self.call.depth + 1, self.call.session.clone());
                let scope = CallScope {
                    trace: None,
                    attempt: self.call.attempt,
                    spawner: None,
                    outermost: false,
                };
                Box::new(move || -> ChildFuture {
                    let nested = executor.call(qualified, input, depth, deadline, session, scope);
                    Box::pin(async move {
                        nested.await.map(Bytes::from).map_err(|e| {
                            let code = e.code();
                            let message = match e {
                                crate::Error::Failed { function, message } => {
                                    format!("{function}: {message}")
                                }
                                other => other.to_string(),
                            };
                            Failure::new(code, message)
                        })
                    })
                })
            }
        };
        Ok(self.call.children.start(spawn).map_err(to_wit))
    }
}

impl wit::Host for CallState {
    async fn start(
        &mut self,
        name: String,
        input: Vec<u8>,
    ) -> WasmResult<Result<Handle, CallError>> {
        self.start_child(&name, input, false)
    }

    async fn start_dag(
        &mut self,
        name: String,
        input: Vec<u8>,
    ) -> WasmResult<Result<Handle, CallError>> {
        self.start_child(&name, input, true)
    }

    async fn wait(&mut self, child: Handle) -> WasmResult<Result<Vec<u8>, CallError>> {
        let remaining = self.remaining();
        let waited = self.call.children.wait(child, remaining).await;
        Ok(waited.map(|output| output.to_vec()).map_err(to_wit))
    }

    async fn wait_any(&mut self, children: Vec<Handle>) -> WasmResult<Result<u32, CallError>> {
        let remaining = self.remaining();
        let waited = self.call.children.wait_any(&children, remaining).await;
        Ok(waited.map_err(to_wit))
    }

    async fn cancel(&mut self, child: Handle) -> WasmResult<()> {
        self.call.children.cancel(child);
        Ok(())
    }
}
