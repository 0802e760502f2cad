//! Durable asynchronous calls: accepted calls kept in the store until they finish, retried
//! by policy, and dead letters for those that fail every attempt.
//!
//! A 202 answers an asynchronous call only once the call is in the store
//! ([`squall_proto::keys::call`]): its target, input and options, the attempt to run next,
//! when it may run ([`PendingCall::not_before_ms`]) and who holds it ([`Lease`]). Whoever
//! runs calls (the gateway's runner) takes a call by writing its lease, runs one attempt,
//! and then either finishes it (the result written, the call deleted), schedules the next
//! attempt in the call itself ([`after_failure`]), or moves it to the target's dead letters.
//! A runner that dies leaves its calls leased; another takes them once the lease has run
//! out, and the same runner restarted takes its own at once ([`claimable`]).
//!
//! # What can happen twice
//! The store is coordination-free, so taking a call is a last-writer-wins write, not a lock.
//! An attempt runs twice when (a) its runner dies after the function ran and before the
//! outcome was written, or (b) two runners take the same expired lease within one store
//! round trip of each other. Both show in the record (an attempt number that repeats, or an
//! attempt list longer than the attempts numbered), and both are why functions under
//! retry must be idempotent: a retry runs the whole function again, its counter `add`s and
//! writes included.
//!
//! # Cost and lifetime
//! A pending call is one register holding its input; it lives until its call finishes or is
//! cancelled, with no expiry (a call is never dropped silently; [`RetryPolicy::max_age_s`]
//! bounds how long it is retried). Dead letters expire after [`DEAD_LETTER_RETENTION`], at
//! most [`MAX_DEAD_LETTERS`] per function or DAG (the oldest go first). [`Calls`] is a
//! cheap clone over the store pool.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use squall_lattices::{Entry, LatticeValue, Lww, Timestamp, Write};
use squall_proto::call::{CallResult, FailureCode, InvokeOptions, Target};
use squall_proto::{keys, Key};

use crate::activations::{Attempt, RecordedError};
use crate::pool::ClientPool;
use crate::results::result_write;
use crate::{Error, Result};

/// How long past its deadline a call's lease holds: a runner that has not written the
/// outcome by then is taken to be gone.
pub const LEASE_MARGIN: Duration = Duration::from_secs(10);

/// How long dead letters are kept.
pub const DEAD_LETTER_RETENTION: Duration = Duration::from_secs(14 * 24 * 3600);

/// The most dead letters kept per function or DAG.
pub const MAX_DEAD_LETTERS: usize = 1000;

/// The longest `Idempotency-Key` accepted.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// How a function's or DAG's asynchronous calls are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts after the first (0 to 100; default 0: a retry runs the function again, so
    /// it is turned on per function once the function is idempotent).
    pub max_retries: u32,
    /// The wait before the first retry, in milliseconds; it doubles with each retry.
    pub backoff_ms: u64,
    /// The longest wait between attempts, in milliseconds.
    pub max_backoff_ms: u64,
    /// Seconds after acceptance (or redrive) past which a call is not attempted again: it
    /// goes to the dead letters.
    pub max_age_s: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 0,
            backoff_ms: 1000,
            max_backoff_ms: 60_000,
            max_age_s: 6 * 3600,
        }
    }
}

impl RetryPolicy {
    /// Checks the policy's bounds.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.max_retries > 100 {
            return Err("max_retries is at most 100".into());
        }
        if !(1..=3_600_000).contains(&self.backoff_ms) {
            return Err("backoff_ms is between 1 and 3600000".into());
        }
        if self.max_backoff_ms < self.backoff_ms || self.max_backoff_ms > 86_400_000 {
            return Err("max_backoff_ms is between backoff_ms and 86400000".into());
        }
        if !(1..=7 * 24 * 3600).contains(&self.max_age_s) {
            return Err("max_age_s is between 1 and 604800 (a week)".into());
        }
        Ok(())
    }

    /// The wait after failed attempt `attempt` (1: the first): `backoff_ms`, doubled for
    /// each attempt after the first, at most `max_backoff_ms`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(40);
        let ms = self
            .backoff_ms
            .saturating_mul(1u64 << doublings)
            .min(self.max_backoff_ms);
        Duration::from_millis(ms)
    }
}

/// How many calls of one function or DAG run at once, at most, through one gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ConcurrencyLimit {
    /// 1 to 100 000.
    pub max_concurrency: u32,
}

impl ConcurrencyLimit {
    /// Checks the limit's bounds.
    pub fn check(&self) -> std::result::Result<(), String> {
        if (1..=100_000).contains(&self.max_concurrency) {
            Ok(())
        } else {
            Err("max_concurrency is between 1 and 100000 (delete the limit to lift it)".into())
        }
    }
}

/// Who holds a call, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The runner's id.
    pub owner: String,
    /// When the lease runs out (ms since the Unix epoch).
    pub until_ms: u64,
}

/// An accepted asynchronous call, as the store keeps it until it finishes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingCall {
    /// Its id: its activation record's and its result's.
    pub id: String,
    /// What it runs.
    pub target: Target,
    /// Its input.
    pub input: Bytes,
    /// How it runs (no result key: the runner writes the result).
    pub options: InvokeOptions,
    /// How it was made: `http-async`, `redrive`.
    pub cause: String,
    /// When it was accepted or last redriven (ms since the Unix epoch): its age counts from
    /// here.
    pub accepted_ms: u64,
    /// The attempt that runs next (1: the first).
    pub attempt: u32,
    /// It runs no earlier than this (ms since the Unix epoch).
    pub not_before_ms: u64,
    /// Who holds it, if anyone.
    pub lease: Option<Lease>,
    /// The attempts that ended, oldest first.
    pub attempts: Vec<Attempt>,
    /// The `Idempotency-Key` it was made with.
    pub idempotency_key: Option<String>,
    /// Its place among calls that run one after another (a `kv-change` trigger's
    /// deliveries of one key), if it has one.
    #[serde(default)]
    pub order: Option<CallOrder>,
}

/// A call's place among calls that run one after another: a runner starts a call of a
/// group only once it holds no call of that group with a lower `seq` (see the gateway's
/// runner for what that promises).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CallOrder {
    /// The group (for a `kv-change` trigger: the trigger and the key).
    pub group: String,
    /// Its place in the group: lower runs first.
    pub seq: u64,
}

impl PendingCall {
    /// A call accepted at `now_ms`, its first attempt due at once, held by nobody yet.
    pub fn new(
        id: String,
        target: Target,
        input: Bytes,
        options: InvokeOptions,
        cause: &str,
        now_ms: u64,
    ) -> Self {
        Self {
            id,
            target,
            input,
            options,
            cause: cause.to_string(),
            accepted_ms: now_ms,
            attempt: 1,
            not_before_ms: now_ms,
            lease: None,
            attempts: Vec::new(),
            idempotency_key: None,
            order: None,
        }
    }

    /// The call's deadline per attempt.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.options.timeout_ms.unwrap_or(30_000))
    }

    /// A lease for `owner` covering the next attempt, from `now_ms`.
    pub fn lease_for(&self, owner: &str, now_ms: u64) -> Lease {
        let runs_at = now_ms.max(self.not_before_ms);
        let span = self.timeout() + LEASE_MARGIN;
        Lease {
            owner: owner.to_string(),
            until_ms: runs_at.saturating_add(span.as_millis().try_into().unwrap_or(u64::MAX)),
        }
    }
}

/// A call that failed every attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The call, with its attempts.
    pub call: PendingCall,
    /// Why its last attempt failed.
    pub error: RecordedError,
    /// When it was given up (ms since the Unix epoch).
    pub failed_ms: u64,
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Run attempt `attempt` at `at_ms`.
    Retry {
        /// The attempt's number.
        attempt: u32,
        /// When (ms since the Unix epoch).
        at_ms: u64,
    },
    /// The attempt did not start (no executor had room): run the same attempt again at
    /// `at_ms`.
    Requeue {
        /// When (ms since the Unix epoch).
        at_ms: u64,
    },
    /// Give up: to the dead letters.
    DeadLetter,
}

/// How long a running result is kept at least: longer than any call stays pending
/// (`max_age_s` is at most a week), so a pending call's result never expires under it.
pub const PENDING_RESULT_RETENTION: Duration = Duration::from_secs(8 * 24 * 3600);

/// How long a call that found no executor with room waits before trying again.
pub const REQUEUE_DELAY: Duration = Duration::from_millis(100);

/// Whether a failure of this kind is worth another attempt: `None` if the attempt never
/// started (it does not count).
pub fn retryable(code: FailureCode) -> Option<bool> {
    match code {
        FailureCode::NoCapacity => None,
        FailureCode::NotFound
        | FailureCode::BadRequest
        | FailureCode::InvalidComponent
        | FailureCode::TooLarge
        | FailureCode::Cancelled
        | FailureCode::ChainTooDeep => Some(false),
        FailureCode::FunctionFailed
        | FailureCode::Trap
        | FailureCode::Timeout
        | FailureCode::OutOfMemory
        | FailureCode::ExecutorLost
        | FailureCode::Unavailable
        | FailureCode::Internal => Some(true),
    }
}

/// What follows when `call`'s current attempt failed with `code` at `now_ms`, under
/// `policy`.
pub fn after_failure(
    policy: &RetryPolicy,
    call: &PendingCall,
    code: FailureCode,
    now_ms: u64,
) -> AfterFailure {
    let max_age_ms = policy.max_age_s.saturating_mul(1000);
    let too_old = |at_ms: u64| at_ms.saturating_sub(call.accepted_ms) > max_age_ms;
    match retryable(code) {
        None => {
            let at_ms = now_ms + REQUEUE_DELAY.as_millis() as u64;
            if too_old(at_ms) {
                AfterFailure::DeadLetter
            } else {
                AfterFailure::Requeue { at_ms }
            }
        }
        Some(false) => AfterFailure::DeadLetter,
        Some(true) => {
            // Attempts since the last redrive: a redriven call gets its retries again.
            let since_redrive = call.attempt.saturating_sub(first_attempt(call)) + 1;
            if since_redrive > policy.max_retries {
                return AfterFailure::DeadLetter;
            }
            let wait = policy.backoff(since_redrive);
            let at_ms = now_ms.saturating_add(wait.as_millis().try_into().unwrap_or(u64::MAX));
            if too_old(at_ms) {
                AfterFailure::DeadLetter
            } else {
                AfterFailure::Retry {
                    attempt: call.attempt + 1,
                    at_ms,
                }
            }
        }
    }
}

/// The number of the first attempt since the call was accepted or redriven: attempts before
/// it belong to an earlier life in the dead letters.
fn first_attempt(call: &PendingCall) -> u32 {
    call.attempts
        .iter()
        .rev()
        .take_while(|a| a.start_ms >= call.accepted_ms)
        .map(|a| a.attempt)
        .min()
        .unwrap_or(call.attempt)
}

/// Whether runner `me` may take `call` at `now_ms`; `running_here` says whether `me` is
/// already running it. A runner takes calls nobody holds, calls whose lease ran out, and
/// calls leased to its own id that it is not running (its id's previous process died).
pub fn claimable(call: &PendingCall, me: &str, running_here: bool, now_ms: u64) -> bool {
    if running_here {
        return false;
    }
    match &call.lease {
        None => true,
        Some(lease) if lease.owner == me => true,
        Some(lease) => lease.until_ms <= now_ms,
    }
}

/// Durable calls, retry policies, dead letters and idempotency keys of one namespace.
#[derive(Clone)]
pub struct Calls {
    kvs: ClientPool,
    namespace: String,
    writer: u64,
    /// How long results are kept after their last write.
    result_retention: Duration,
}

impl std::fmt::Debug for Calls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Calls")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// The first refusal among a batch's results, as an error.
fn all_written(
    keys: Vec<Key>,
    results: Vec<std::result::Result<(), squall_kvs::KeyError>>,
) -> Result<()> {
    for (key, result) in keys.into_iter().zip(results) {
        if let Err(e) = result {
            return Err(Error::BadValue {
                key,
                reason: e.to_string(),
            });
        }
    }
    Ok(())
}

use crate::register::decode;

/// The namespace of `target` (its name is qualified, [`keys::qualify`]).
fn namespace_of(target: &Target) -> &str {
    keys::split(target.name()).0
}

/// `target`'s name in its namespace.
fn name_of(target: &Target) -> &str {
    keys::split(target.name()).1
}

impl Calls {
    /// Calls of the default namespace.
    pub fn new(kvs: ClientPool) -> Self {
        Self {
            kvs,
            namespace: keys::DEFAULT_NAMESPACE.to_string(),
            writer: rand::random(),
            result_retention: crate::results::RESULT_RETENTION,
        }
    }

    /// The same store's calls in `namespace`: where calls by id (pending calls, results) are
    /// read and written. What belongs to a target (its policy, limit, dead letters,
    /// idempotency keys) is always in the target's own namespace, whichever handle is used.
    pub fn in_namespace(&self, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            ..self.clone()
        }
    }

    /// The same store's calls in `target`'s namespace (its name is qualified,
    /// [`keys::qualify`]).
    pub fn of(&self, target: &Target) -> Self {
        self.in_namespace(namespace_of(target))
    }

    /// The store it keeps calls in.
    pub fn store(&self) -> &ClientPool {
        &self.kvs
    }

    /// The same calls, their results kept for `retention` after their last write.
    pub fn with_result_retention(mut self, retention: Duration) -> Self {
        self.result_retention = retention;
        self
    }

    fn register(&self, key: &str, value: &impl Serialize) -> Result<LatticeValue> {
        crate::register::encode(key, value, Timestamp::now(self.writer))
    }

    /// The store write of `call` (no expiry), in its target's namespace.
    pub fn call_write(&self, call: &PendingCall) -> Result<(Key, Write)> {
        // In the namespace of its target, whichever handle writes it.
        let key = keys::call(namespace_of(&call.target), &call.id);
        let value = self.register(&key, call)?;
        Ok((
            key,
            Write {
                value: Some(value),
                expiry: None,
            },
        ))
    }

    /// Writes `writes` in one round trip per shard; every one must be taken.
    pub async fn write_all(&self, writes: Vec<(Key, Write)>) -> Result<()> {
        let keys: Vec<Key> = writes.iter().map(|(k, _)| k.clone()).collect();
        let results = self
            .kvs
            .with(move |client| client.write_many(writes))
            .await?;
        all_written(keys, results)
    }

    /// Writes `call` as it now is.
    pub async fn put(&self, call: &PendingCall) -> Result<()> {
        self.write_all(vec![self.call_write(call)?]).await
    }

    /// The pending call `id`, if it has not finished.
    pub async fn get(&self, id: &str) -> Result<Option<PendingCall>> {
        let key = keys::call(&self.namespace, id);
        let read = key.clone();
        let value = self.kvs.with(move |client| client.get(&read)).await?;
        Ok(value.and_then(|v| decode(&key, v)))
    }

    /// Deletes `keys` (tombstones stamped now).
    async fn delete_keys(&self, keys: Vec<Key>) -> Result<()> {
        let at = Timestamp::now(self.writer);
        let deletes: Vec<(Key, Entry)> = keys
            .iter()
            .map(|k| (k.clone(), Entry::tombstone(at)))
            .collect();
        let results = self
            .kvs
            .with(move |client| client.merge_many(deletes))
            .await?;
        all_written(keys, results)
    }

    /// Whether call `id` was accepted and still stands: its result is finished, or it is
    /// pending. A running result with no pending call is what an acceptance that failed
    /// midway leaves: the call is not taken.
    pub async fn taken(&self, id: &str) -> Result<bool> {
        let key = keys::result(&self.namespace, id);
        match self.kvs.with(move |client| client.get(&key)).await? {
            None => Ok(false),
            Some(LatticeValue::Lww(register))
                if matches!(CallResult::decode(&register.value), Ok(CallResult::Running)) =>
            {
                Ok(self.get(id).await?.is_some())
            }
            Some(_) => Ok(true),
        }
    }

    /// Whether call `id` has a result (running or finished).
    pub async fn result_exists(&self, id: &str) -> Result<bool> {
        let key = keys::result(&self.namespace, id);
        Ok(self
            .kvs
            .with(move |client| client.get(&key))
            .await?
            .is_some())
    }

    /// Ends call `id` with attempt `attempt`'s `result`: the result written, then the call
    /// deleted.
    pub async fn finish(&self, id: &str, result: &CallResult, attempt: u32) -> Result<()> {
        let result_key = keys::result(&self.namespace, id);
        let write = self.result_of(&result_key, result, attempt)?;
        self.write_all(vec![(result_key, write)]).await?;
        self.delete_keys(vec![keys::call(&self.namespace, id)])
            .await
    }

    fn result_of(&self, key: &str, result: &CallResult, attempt: u32) -> Result<Write> {
        // A running result stands while its call is pending, which may be longer than the
        // retention (its outcome's write then sets the retention).
        let retention = match result {
            CallResult::Running => self.result_retention.max(PENDING_RESULT_RETENTION),
            _ => self.result_retention,
        };
        result_write(key, result, attempt, retention).map_err(|reason| Error::BadValue {
            key: key.to_string(),
            reason,
        })
    }

    /// The write of call `id`'s result: `result`, as of attempt `attempt`.
    pub fn result_write(
        &self,
        id: &str,
        result: &CallResult,
        attempt: u32,
    ) -> Result<(Key, Write)> {
        let key = keys::result(&self.namespace, id);
        let write = self.result_of(&key, result, attempt)?;
        Ok((key, write))
    }

    /// Gives `call` up: a dead letter and a failed result written, then the call deleted,
    /// then the target's oldest dead letters past [`MAX_DEAD_LETTERS`] deleted.
    pub async fn dead_letter(&self, call: PendingCall, error: RecordedError) -> Result<()> {
        let this = self.of(&call.target);
        let kind = keys::Kind::from(&call.target);
        let target = call.target.clone();
        let name = name_of(&target).to_string();
        let id = call.id.clone();
        let failure = squall_proto::call::Failure {
            code: FailureCode::from_wire(&error.code).unwrap_or(FailureCode::Internal),
            message: error.message.clone(),
            step: error.step.clone(),
        };
        let letter = DeadLetter {
            call,
            error,
            failed_ms: squall_lattices::entry::now_ms(),
        };
        let letter_key = keys::dead_letter(namespace_of(&target), kind, &name, &id);
        let at = Timestamp::now(self.writer);
        let letter_write = Write::expiring(
            crate::register::encode(&letter_key, &letter, at)?,
            at,
            Some(DEAD_LETTER_RETENTION),
        );
        let failed = this.result_write(&id, &CallResult::Failed(failure), letter.call.attempt)?;
        this.write_all(vec![(letter_key, letter_write), failed])
            .await?;
        this.delete_keys(vec![keys::call(&this.namespace, &id)])
            .await?;
        this.trim_dead_letters(kind, &name).await
    }

    /// Deletes the oldest dead letters of a target past [`MAX_DEAD_LETTERS`] (ids sort newest
    /// first).
    async fn trim_dead_letters(&self, kind: keys::Kind, name: &str) -> Result<()> {
        let prefix = keys::dead_letter(&self.namespace, kind, name, "");
        let excess: Vec<Key> = self
            .kvs
            .keys_with_prefix(&prefix)
            .await?
            .into_iter()
            .skip(MAX_DEAD_LETTERS)
            .collect();
        if excess.is_empty() {
            return Ok(());
        }
        self.delete_keys(excess).await
    }

    /// Up to `limit` pending calls after the key `after`, leaving out (unread) those whose id
    /// `skip` names; and the key to resume after.
    pub async fn pending(
        &self,
        after: Option<Key>,
        limit: u32,
        skip: impl Fn(&str) -> bool,
    ) -> Result<(Vec<PendingCall>, Option<Key>)> {
        let prefix = keys::call(&self.namespace, "");
        let list_prefix = prefix.clone();
        let (page, next) = self
            .kvs
            .with(move |client| client.list(&list_prefix, after.as_deref(), limit))
            .await?;
        let reads: Vec<Key> = page
            .into_iter()
            .filter(|key| !skip(key.strip_prefix(&prefix).unwrap_or(key)))
            .collect();
        if reads.is_empty() {
            return Ok((Vec::new(), next));
        }
        let keys = reads.clone();
        let values = self.kvs.with(move |client| client.get_many(&reads)).await?;
        let calls = keys
            .iter()
            .zip(values)
            .filter_map(|(key, value)| value.and_then(|v| decode(key, v)))
            .collect();
        Ok((calls, next))
    }

    /// The ids of every dead letter of `target` (keys only: no input is read).
    pub async fn dead_letter_ids(&self, target: &Target) -> Result<Vec<String>> {
        let prefix = keys::dead_letter(namespace_of(target), target.into(), name_of(target), "");
        Ok(self
            .kvs
            .keys_with_prefix(&prefix)
            .await?
            .iter()
            .map(|key| key.strip_prefix(&prefix).unwrap_or(key).to_string())
            .collect())
    }

    /// Up to `limit` dead letters of `target`, newest first, after id `after`; and the id to
    /// resume after.
    pub async fn dead_letters(
        &self,
        target: &Target,
        after: Option<&str>,
        limit: u32,
    ) -> Result<(Vec<DeadLetter>, Option<String>)> {
        let prefix = keys::dead_letter(namespace_of(target), target.into(), name_of(target), "");
        let after_key = after.map(|id| format!("{prefix}{id}"));
        let list_prefix = prefix.clone();
        let (page, next) = self
            .kvs
            .with(move |client| client.list(&list_prefix, after_key.as_deref(), limit))
            .await?;
        let reads = page.clone();
        let values = self.kvs.with(move |client| client.get_many(&reads)).await?;
        let letters = page
            .iter()
            .zip(values)
            .filter_map(|(key, value)| value.and_then(|v| decode(key, v)))
            .collect();
        let next = next.map(|k| k.strip_prefix(&prefix).unwrap_or(&k).to_string());
        Ok((letters, next))
    }

    /// Dead letter `id` of `target`.
    pub async fn dead_letter_of(&self, target: &Target, id: &str) -> Result<Option<DeadLetter>> {
        let key = keys::dead_letter(namespace_of(target), target.into(), name_of(target), id);
        let read = key.clone();
        let value = self.kvs.with(move |client| client.get(&read)).await?;
        Ok(value.and_then(|v| decode(&key, v)))
    }

    /// Deletes dead letters of `target` by id.
    pub async fn delete_dead_letters(&self, target: &Target, ids: &[String]) -> Result<()> {
        let keys = ids
            .iter()
            .map(|id| keys::dead_letter(namespace_of(target), target.into(), name_of(target), id))
            .collect();
        self.delete_keys(keys).await
    }

    /// Puts dead letter `id` of `target` back as a pending call, due now and held by nobody
    /// (its age counted from now, its result back to running), then deletes the dead letter
    /// once the call reads back. The call keeps its id and its attempts; the next attempt
    /// is numbered after them. `None` if there is no such dead letter.
    pub async fn redrive(&self, target: &Target, id: &str) -> Result<Option<PendingCall>> {
        let Some(letter) = self.dead_letter_of(target, id).await? else {
            return Ok(None);
        };
        let now = squall_lattices::entry::now_ms();
        let mut call = letter.call;
        call.attempt = call.attempts.iter().map(|a| a.attempt).max().unwrap_or(0) + 1;
        call.accepted_ms = now;
        call.not_before_ms = now;
        call.lease = None;
        call.cause = "redrive".into();
        let this = self.of(target);
        let running = this.result_write(&call.id, &CallResult::Running, call.attempt)?;
        this.write_all(vec![this.call_write(&call)?, running])
            .await?;
        if this.get(&call.id).await?.is_none() {
            return Err(Error::Internal(format!(
                "redriven call {} did not read back; its dead letter is kept",
                call.id
            )));
        }
        self.delete_dead_letters(target, std::slice::from_ref(&call.id))
            .await?;
        Ok(Some(call))
    }

    /// Cancels pending call `id`: deleted, its result failed as cancelled. The call as it
    /// was, or `None` if it was not pending. An attempt already running finishes, and its
    /// result stands if it succeeds; no attempt follows it.
    pub async fn cancel(&self, id: &str) -> Result<Option<PendingCall>> {
        let Some(call) = self.get(id).await? else {
            return Ok(None);
        };
        let cancelled = CallResult::Failed(squall_proto::call::Failure::new(
            FailureCode::Cancelled,
            "cancelled",
        ));
        self.finish(id, &cancelled, call.attempt).await?;
        Ok(Some(call))
    }

    /// The retry policy of `target` (the default if none was set).
    pub async fn policy(&self, target: &Target) -> Result<RetryPolicy> {
        let key = keys::retry_policy(namespace_of(target), target.into(), name_of(target));
        let read = key.clone();
        let value = self.kvs.with(move |client| client.get(&read)).await?;
        Ok(value.and_then(|v| decode(&key, v)).unwrap_or_default())
    }

    /// Deletes what was set for `target`: its retry policy and its concurrency limit (a
    /// deleted function's settings do not pass to the next one registered under its name).
    pub async fn forget(&self, target: &Target) -> Result<()> {
        self.delete_keys(vec![
            keys::retry_policy(namespace_of(target), target.into(), name_of(target)),
            keys::concurrency_limit(namespace_of(target), Some((target.into(), name_of(target)))),
        ])
        .await
    }

    /// Deletes keys (best effort, for cleaning up after a failed write).
    pub async fn delete(&self, keys: Vec<Key>) -> Result<()> {
        self.delete_keys(keys).await
    }

    /// Sets the retry policy of `target`.
    pub async fn set_policy(&self, target: &Target, policy: &RetryPolicy) -> Result<()> {
        let key = keys::retry_policy(namespace_of(target), target.into(), name_of(target));
        let value = self.register(&key, policy)?;
        self.write_all(vec![(
            key,
            Write {
                value: Some(value),
                expiry: None,
            },
        )])
        .await
    }

    /// Sets (or, with `None`, lifts) the concurrency limit of `target`.
    pub async fn set_concurrency(
        &self,
        target: &Target,
        limit: Option<ConcurrencyLimit>,
    ) -> Result<()> {
        let key =
            keys::concurrency_limit(namespace_of(target), Some((target.into(), name_of(target))));
        match limit {
            Some(limit) => {
                let value = self.register(&key, &limit)?;
                self.write_all(vec![(
                    key,
                    Write {
                        value: Some(value),
                        expiry: None,
                    },
                )])
                .await
            }
            None => self.delete_keys(vec![key]).await,
        }
    }

    /// Every concurrency limit set in the namespace, its targets qualified.
    pub async fn concurrency_limits(&self) -> Result<Vec<(Target, ConcurrencyLimit)>> {
        let prefix = keys::concurrency_limit(&self.namespace, None);
        let mut limits = Vec::new();
        for (key, value) in self.kvs.entries_with_prefix(&prefix).await? {
            let target = match key.strip_prefix(&prefix).and_then(|k| k.split_once('/')) {
                Some(("fn", name)) => Target::Function(keys::qualify(&self.namespace, name)),
                Some(("dag", name)) => Target::Dag(keys::qualify(&self.namespace, name)),
                _ => continue,
            };
            if let Some(limit) = decode::<ConcurrencyLimit>(&key, value) {
                limits.push((target, limit));
            }
        }
        Ok(limits)
    }

    fn idempotency_key(&self, target: &Target, idempotency_key: &str) -> Key {
        let hash = Sha256::digest(idempotency_key.as_bytes());
        let hex: String = hash.iter().take(16).map(|b| format!("{b:02x}")).collect();
        keys::idempotency(namespace_of(target), target.into(), name_of(target), &hex)
    }

    /// The id of the call `idempotency_key` started on `target`, while its record is kept.
    pub async fn idempotent(
        &self,
        target: &Target,
        idempotency_key: &str,
    ) -> Result<Option<String>> {
        let key = self.idempotency_key(target, idempotency_key);
        let value = self.kvs.with(move |client| client.get(&key)).await?;
        Ok(match value {
            Some(LatticeValue::Lww(register)) => String::from_utf8(register.value.to_vec()).ok(),
            _ => None,
        })
    }

    /// The write recording that `idempotency_key` started call `id` on `target`, kept for
    /// `retention`.
    pub fn idempotency_write(
        &self,
        target: &Target,
        idempotency_key: &str,
        id: &str,
        retention: Duration,
    ) -> (Key, Write) {
        let at = Timestamp::now(self.writer);
        (
            self.idempotency_key(target, idempotency_key),
            Write::expiring(
                LatticeValue::Lww(Lww::new(at, Bytes::copy_from_slice(id.as_bytes()))),
                at,
                Some(retention),
            ),
        )
    }
}

/// Checks an `Idempotency-Key`: 1 to [`MAX_IDEMPOTENCY_KEY`] bytes of printable ASCII.
pub fn check_idempotency_key(key: &str) -> std::result::Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(format!(
            "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} bytes"
        ));
    }
    if !key.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("an idempotency key is printable ASCII without spaces".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(attempt: u32, accepted_ms: u64) -> PendingCall {
        let mut call = PendingCall::new(
            "id".into(),
            Target::Function("f".into()),
            Bytes::new(),
            InvokeOptions::default(),
            "http-async",
            accepted_ms,
        );
        call.attempt = attempt;
        call
    }

    fn attempt(n: u32, start_ms: u64) -> Attempt {
        Attempt {
            attempt: n,
            start_ms,
            duration_us: 1,
            placement: Vec::new(),
            error: None,
        }
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let policy = RetryPolicy {
            backoff_ms: 100,
            max_backoff_ms: 350,
            ..RetryPolicy::default()
        };
        let waits: Vec<u128> = (1..=4).map(|n| policy.backoff(n).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 350, 350]);
        assert_eq!(policy.backoff(u32::MAX).as_millis(), 350);
    }

    #[test]
    fn failures_retry_until_the_policy_runs_out() {
        let policy = RetryPolicy {
            max_retries: 2,
            backoff_ms: 100,
            ..RetryPolicy::default()
        };
        let mut pending = call(1, 1000);
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::FunctionFailed, 2000),
            AfterFailure::Retry {
                attempt: 2,
                at_ms: 2100
            }
        );
        pending.attempts.push(attempt(1, 1000));
        pending.attempt = 2;
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::Trap, 3000),
            AfterFailure::Retry {
                attempt: 3,
                at_ms: 3200
            }
        );
        pending.attempts.push(attempt(2, 2100));
        pending.attempt = 3;
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::Timeout, 4000),
            AfterFailure::DeadLetter
        );
    }

    #[test]
    fn no_retries_by_default_and_none_for_permanent_failures() {
        let pending = call(1, 0);
        assert_eq!(
            after_failure(&RetryPolicy::default(), &pending, FailureCode::Trap, 1),
            AfterFailure::DeadLetter
        );
        let generous = RetryPolicy {
            max_retries: 5,
            ..RetryPolicy::default()
        };
        for code in [
            FailureCode::NotFound,
            FailureCode::TooLarge,
            FailureCode::Cancelled,
        ] {
            assert_eq!(
                after_failure(&generous, &pending, code, 1),
                AfterFailure::DeadLetter
            );
        }
    }

    #[test]
    fn no_capacity_requeues_without_counting_until_the_call_is_too_old() {
        let policy = RetryPolicy {
            max_age_s: 10,
            ..RetryPolicy::default()
        };
        let pending = call(1, 0);
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::NoCapacity, 5000),
            AfterFailure::Requeue { at_ms: 5100 }
        );
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::NoCapacity, 9950),
            AfterFailure::DeadLetter
        );
    }

    #[test]
    fn a_retry_past_the_maximum_age_goes_to_the_dead_letters() {
        let policy = RetryPolicy {
            max_retries: 10,
            backoff_ms: 5000,
            max_backoff_ms: 5000,
            max_age_s: 8,
        };
        let pending = call(1, 0);
        assert!(matches!(
            after_failure(&policy, &pending, FailureCode::Trap, 2000),
            AfterFailure::Retry { .. }
        ));
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::Trap, 4000),
            AfterFailure::DeadLetter
        );
    }

    #[test]
    fn a_redriven_call_gets_its_retries_again() {
        let policy = RetryPolicy {
            max_retries: 1,
            backoff_ms: 10,
            ..RetryPolicy::default()
        };
        // Two attempts failed in its first life; redriven at 5000 as attempt 3.
        let mut pending = call(3, 5000);
        pending.attempts = vec![attempt(1, 100), attempt(2, 200)];
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::Trap, 6000),
            AfterFailure::Retry {
                attempt: 4,
                at_ms: 6010
            }
        );
        pending.attempts.push(attempt(3, 5000));
        pending.attempt = 4;
        assert_eq!(
            after_failure(&policy, &pending, FailureCode::Trap, 7000),
            AfterFailure::DeadLetter
        );
    }

    #[test]
    fn runners_take_free_expired_and_their_own_orphaned_calls() {
        let mut pending = call(1, 0);
        assert!(claimable(&pending, "a", false, 10));
        assert!(!claimable(&pending, "a", true, 10));
        pending.lease = Some(Lease {
            owner: "b".into(),
            until_ms: 100,
        });
        assert!(!claimable(&pending, "a", false, 99));
        assert!(claimable(&pending, "a", false, 100));
        // Its own id, not running here: the process that held it died.
        assert!(claimable(&pending, "b", false, 50));
        assert!(!claimable(&pending, "b", true, 50));
    }

    #[test]
    fn a_lease_covers_the_wait_and_the_deadline() {
        let mut pending = call(1, 0);
        pending.options.timeout_ms = Some(2000);
        pending.not_before_ms = 5000;
        let lease = pending.lease_for("me", 1000);
        assert_eq!(
            lease.until_ms,
            5000 + 2000 + LEASE_MARGIN.as_millis() as u64
        );
        assert_eq!(pending.lease_for("me", 9000).until_ms, 9000 + 12_000);
    }

    #[test]
    fn policies_and_idempotency_keys_are_checked() {
        assert!(RetryPolicy::default().check().is_ok());
        let bad = [
            RetryPolicy {
                max_retries: 101,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                backoff_ms: 0,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                max_backoff_ms: 1,
                ..RetryPolicy::default()
            },
            RetryPolicy {
                max_age_s: 0,
                ..RetryPolicy::default()
            },
        ];
        for policy in bad {
            assert!(policy.check().is_err(), "{policy:?}");
        }
        assert!(check_idempotency_key("order-42").is_ok());
        assert!(check_idempotency_key("").is_err());
        assert!(check_idempotency_key("has space").is_err());
        assert!(check_idempotency_key(&"k".repeat(MAX_IDEMPOTENCY_KEY + 1)).is_err());
    }

    #[test]
    fn pending_calls_keep_their_encoding() {
        let mut pending = call(2, 7);
        pending.lease = Some(Lease {
            owner: "gw".into(),
            until_ms: 9,
        });
        pending.attempts.push(attempt(1, 7));
        pending.idempotency_key = Some("k".into());
        let bytes = rmp_serde::to_vec_named(&pending).expect("encodes");
        let back: PendingCall = rmp_serde::from_slice(&bytes).expect("decodes");
        assert_eq!(back, pending);
    }

    /// Bodies a client may send as a retry policy or a concurrency limit: structured ones
    /// with numbers of any size (some negative, some fractional), valid JSON with a few bytes
    /// changed, and arbitrary bytes.
    fn policy_body() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::collection::vec;
        use proptest::prelude::*;
        let number = prop_oneof![
            any::<u64>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (0u64..200).prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
        ];
        let field = prop_oneof![
            Just("max_retries"),
            Just("backoff_ms"),
            Just("max_backoff_ms"),
            Just("max_age_s"),
            Just("max_concurrency"),
            Just("other"),
        ];
        let structured = vec((field, number), 0..5).prop_map(|fields| {
            let object: serde_json::Map<String, serde_json::Value> = fields
                .into_iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect();
            serde_json::to_vec(&object).expect("JSON")
        });
        prop_oneof![
            3 => structured.clone(),
            2 => (structured, squall_lattices::testing::edits(3))
                .prop_map(|(body, edits)| squall_lattices::testing::mutated(&body, &edits)),
            1 => vec(any::<u8>(), 0..96),
        ]
    }

    proptest::proptest! {
        /// Whatever a client sends, decoding and checking answer a policy within its bounds
        /// or an error; an accepted policy's waits grow from backoff_ms to max_backoff_ms and
        /// never past it, however many attempts.
        #[test]
        fn policy_bodies_decode_to_checked_policies_or_errors(body in policy_body()) {
            if let Ok(policy) = serde_json::from_slice::<RetryPolicy>(&body) {
                if policy.check().is_ok() {
                    proptest::prop_assert!(policy.max_retries <= 100);
                    let mut last = Duration::ZERO;
                    for attempt in [1, 2, 3, 40, 41, u32::MAX] {
                        let wait = policy.backoff(attempt);
                        proptest::prop_assert!(wait >= last);
                        proptest::prop_assert!(wait >= Duration::from_millis(policy.backoff_ms));
                        proptest::prop_assert!(wait <= Duration::from_millis(policy.max_backoff_ms));
                        last = wait;
                    }
                }
            }
            if let Ok(limit) = serde_json::from_slice::<ConcurrencyLimit>(&body) {
                if limit.check().is_ok() {
                    proptest::prop_assert!((1..=100_000).contains(&limit.max_concurrency));
                }
            }
        }
    }
}
