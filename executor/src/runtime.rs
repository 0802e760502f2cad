//! The narrow handle through which a guest's imports reach the executor running it.
//!
//! The imports (`host`, `nn_host`) need five things of the executor: a timestamp for a write,
//! its share of a counter, whether the namespace may store more, the models loaded for
//! `wasi:nn`, and a way to run a nested call.
//! They get exactly that, as a [`Runtime`], rather than the executor's whole state: what a
//! guest can reach is what this trait says, and the executor's internals can change without
//! touching the imports. A store holds it weakly, so a warm instance never keeps its executor
//! alive.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use squall_lattices::{Counter, Timestamp};
use squall_state::session::Session;
use squall_state::stored_bytes::StoredBytesGuard;

use crate::children::Spawner;
use crate::nn::Models;
use crate::report::StepTrace;
use crate::Result;

/// A nested call under way.
pub(crate) type NestedCall = Pin<Box<dyn Future<Output = Result<Vec<u8>>> + Send>>;

/// What a call hands on to its nested calls besides its session: its step's trace (when the
/// record asks for a report), its attempt, and where its children run.
#[derive(Debug, Clone, Default)]
pub struct CallScope {
    /// The step's trace, shared by its nested calls.
    pub trace: Option<StepTrace>,
    /// The attempt of the call (1: the first).
    pub attempt: u32,
    /// Where children started by the call (and its nested calls) run; `None`: here.
    pub spawner: Option<Arc<dyn Spawner>>,
    /// Whether this is the step's own call (from [`crate::Executor::call`]), not one it
    /// nested: it times the step's CPU, reports its memory and logs its failure. A child's
    /// steps start deeper than 0, so depth alone cannot tell.
    pub outermost: bool,
}

/// What the imports may ask of the executor.
pub(crate) trait Runtime: Send + Sync {
    /// A timestamp for a last-writer-wins write, later than every earlier one of this executor.
    fn timestamp(&self) -> Timestamp;

    /// This executor's contribution to counter `key` after adding `delta` (a PN-counter entry
    /// of its own, so concurrent executors never overwrite each other).
    fn contribute(&self, key: &str, delta: i64) -> Counter;

    /// The models loaded for `wasi:nn`.
    fn models(&self) -> &Models;

    /// What says whether a namespace may store more (its `max_stored_bytes` quota).
    fn stored_bytes(&self) -> &StoredBytesGuard;

    /// Runs `name` as a call nested `depth` deep, within `deadline`, in the caller's `session`,
    /// logging into the caller's step `trace` if it has one.
    fn call(
        self: Arc<Self>,
        name: String,
        input: Vec<u8>,
        depth: u32,
        deadline: Instant,
        session: Session,
        scope: CallScope,
    ) -> NestedCall;
}
