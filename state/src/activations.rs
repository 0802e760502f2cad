//! Activation records: what each call did, kept in the store for a while.
//!
//! Every invocation gets an id and a record ([`Activation`]) under
//! [`squall_proto::keys::activation`]: the function or DAG, how it was called, where its
//! steps ran, when it started and ended, its status and typed error, and the sizes of its
//! input and output. Records expire after the retention the gateway is given (24 h by
//! default, [`DEFAULT_RETENTION`]); the store reaps them and reclaims their space.
//!
//! # The byte cap
//! Records are also bounded by bytes ([`DEFAULT_RETENTION_BYTES`]). The record writer counts
//! the bytes it writes per ten seconds of the records' start times, in a counter per span
//! ([`keys::activation_bytes`], one more write per batch); [`Activations::trim`] adds the
//! spans up from the newest and deletes the records older than the span where the sum passes
//! the cap, and in that span its oldest records, as many as its share past the cap (as if
//! its records were alike in size), taking their bytes off the counters. It reads the
//! counters and lists only that span's records and those it deletes, so it costs little
//! while under the cap. One gateway trims at a time (a lease, [`crate::lease`]); it writes
//! the counters before it deletes, so a failure midway leaves records uncounted (kept until
//! their retention), never deleted beyond the cap. What the cap counts: each finished record
//! once, as the writer wrote it (a running record, written again later, is not counted);
//! each gateway's record writer keeps its own entries of the counters.
//!
//! Ids sort newest first ([`ActivationId`]): the hex of the start time counted down from
//! the end of time, then random bits. The store lists keys in order, so a listing of the
//! records' prefix is newest first, and a page resumes after the last id seen, as OpenWhisk's
//! `wsk activation list` pages do.
//!
//! A record is a last-writer-wins register stamped with its stage (started, then finished),
//! so an asynchronous call's record written at acceptance never overwrites its outcome.
//! Synchronous calls' records are written in batches by a background task ([`Recorder`]):
//! a channel send per call, one store round trip per batch. Reading a page costs one listing
//! and one batched read.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use squall_lattices::{Counter, LatticeValue, Lww, Timestamp, Write};
use squall_proto::call::Failure;
use squall_proto::report::StepReport;
use squall_proto::{keys, Key};

use crate::pool::ClientPool;
use crate::{Error, Result};

/// How long records are kept unless configured otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How many bytes of records are kept unless configured otherwise.
pub const DEFAULT_RETENTION_BYTES: u64 = 1 << 30;

/// Seconds of start times whose records' bytes are counted together for the byte cap.
const SPAN_SECONDS: u64 = 10;

/// The span (its first second) of a record that started at `start_ms`.
fn span_of(start_ms: u64) -> u64 {
    start_ms / 1000 / SPAN_SECONDS * SPAN_SECONDS
}

/// The start and end (ms since the Unix epoch) of the span starting at second `span`.
fn span_ms(span: u64) -> (u64, u64) {
    let start = span.saturating_mul(1000);
    (start, start.saturating_add(SPAN_SECONDS * 1000))
}

/// How long one gateway holds the lease on trimming records (renewed every trim).
const TRIM_LEASE_MS: u64 = 30_000;

/// What one [`Activations::trim`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Bytes of records counted before it.
    pub counted_bytes: u64,
    /// Records it deleted.
    pub records: u64,
    /// Bytes it took off the counters.
    pub bytes: u64,
}

/// The most records one listing answers.
pub const MAX_PAGE: u32 = 200;

/// An activation id: 16 hex digits of `u64::MAX - start µs`, then 16 random hex digits (an
/// asynchronous call's id also names its result, so it must not be guessable).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ActivationId(String);

impl ActivationId {
    /// A new id for a call that starts at `start_us` (µs since the Unix epoch).
    pub fn new(start_us: u64) -> Self {
        Self(format!(
            "{:016x}{:016x}",
            u64::MAX - start_us,
            rand::random::<u64>()
        ))
    }

    /// The id for a call that starts at `start_us`, with its last 16 digits given rather than
    /// random (an id every gateway computes alike, as a trigger's tick's).
    pub fn with_suffix(start_us: u64, suffix: u64) -> Self {
        Self(format!("{:016x}{suffix:016x}", u64::MAX - start_us))
    }

    /// Checks an id from a request: 32 lowercase hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        (text.len() == 32
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Self(text.to_string()))
    }

    /// The start time the id was made for (µs since the Unix epoch).
    pub fn start_us(&self) -> Option<u64> {
        let countdown = u64::from_str_radix(self.0.get(..16)?, 16).ok()?;
        Some(u64::MAX - countdown)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ActivationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a call is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Accepted and not finished (asynchronous calls).
    Running,
    /// Finished with an output.
    Succeeded,
    /// Finished with an error.
    Failed,
}

impl Status {
    /// The status's name, as in the JSON and the `status=` filter.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
        }
    }
}

impl std::str::FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "running" => Ok(Status::Running),
            "succeeded" => Ok(Status::Succeeded),
            "failed" => Ok(Status::Failed),
            other => Err(format!(
                "unknown status {other:?} (running, succeeded or failed)"
            )),
        }
    }
}

/// What the gateway knows of one call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activation {
    /// The activation's id.
    pub id: String,
    /// `function` or `dag`.
    pub kind: String,
    /// The function's or DAG's name.
    pub name: String,
    /// How it was called: `http` or `http-async`.
    pub cause: String,
    /// Where it is in its life.
    pub status: Status,
    /// When it started (ms since the Unix epoch).
    pub start_ms: u64,
    /// When it ended (ms since the Unix epoch), once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<u64>,
    /// How long it took, in microseconds, once it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// Each step's function and the executor it ran on.
    #[serde(default)]
    pub placement: Vec<(String, String)>,
    /// The input's size in bytes.
    pub input_bytes: u64,
    /// The output's size in bytes, if it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RecordedError>,
    /// The attempt this record is of (1: the first).
    pub attempt: u32,
    /// An asynchronous call's attempts that ended, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<Attempt>,
    /// The `Idempotency-Key` the call was made with, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// What each step reported of its run (the latest attempt's): version, executor, start,
    /// duration, CPU time, memory, and its log lines (bounded; `logs_dropped` counts what was
    /// left out). Steps that never ran (the call failed before them) are missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepReport>,
    /// How many `kv-change` trigger calls led to this one (0, left out: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chain: u32,
}

impl Activation {
    /// The namespace of the function or DAG it records (its name is qualified,
    /// [`keys::qualify`]).
    pub fn namespace(&self) -> &str {
        keys::split(&self.name).0
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One attempt of an asynchronous call, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Its number (1: the first).
    pub attempt: u32,
    /// When it started (ms since the Unix epoch).
    pub start_ms: u64,
    /// How long it took, in microseconds.
    pub duration_us: u64,
    /// Where its steps ran.
    #[serde(default)]
    pub placement: Vec<(String, String)>,
    /// Why it failed, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RecordedError>,
}

impl Activation {
    /// Whether the record passes a listing's filters.
    pub fn matches(&self, filter: &Filter) -> bool {
        filter
            .function
            .as_ref()
            .is_none_or(|f| self.kind == "function" && &self.name == f)
            && filter
                .dag
                .as_ref()
                .is_none_or(|d| self.kind == "dag" && &self.name == d)
            && filter.status.is_none_or(|s| self.status == s)
            && filter.since_ms.is_none_or(|since| self.start_ms >= since)
    }

    /// Cuts the steps' log lines to `max_bytes` of text in all, each step keeping up to an
    /// equal share; what is cut is counted in the step's `logs_dropped`.
    pub fn bound_logs(&mut self, max_bytes: usize) {
        let steps = self.steps.len().max(1);
        let share = max_bytes / steps;
        for step in &mut self.steps {
            let mut kept = 0usize;
            let before = step.logs.len();
            step.logs.retain(|line| {
                kept += line.text.len();
                kept <= share
            });
            let cut = (before - step.logs.len()) as u32;
            step.logs_dropped = step.logs_dropped.saturating_add(cut);
        }
    }

    /// About how many bytes the record takes stored (its log text and a margin for the rest).
    fn estimated_bytes(&self) -> usize {
        let lines: usize = self
            .steps
            .iter()
            .flat_map(|s| s.logs.iter())
            .map(|l| l.text.len() + l.function.len() + 32)
            .sum();
        let calls: usize = self
            .steps
            .iter()
            .flat_map(|s| s.calls.iter())
            .map(|c| {
                96 + c.function.len() + c.caller.len() + c.error.as_ref().map_or(0, String::len)
            })
            .sum();
        lines + calls + 512 + 256 * self.steps.len() + 128 * self.attempts.len()
    }

    /// The record's rank as a last-writer-wins register: a later attempt beats an earlier
    /// one, and within an attempt finished beats running.
    fn rank(&self) -> u64 {
        let stage = match self.status {
            Status::Running => 1,
            Status::Succeeded | Status::Failed => 2,
        };
        u64::from(self.attempt) * 2 + stage
    }
}

/// A failure as a record keeps it: the wire code (`trap`, `timeout`, ...), as in the HTTP
/// API's errors.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedError {
    /// The failure's code.
    pub code: String,
    /// What happened.
    pub message: String,
    /// The step (function) that failed, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
}

impl From<&Failure> for RecordedError {
    fn from(failure: &Failure) -> Self {
        Self {
            code: failure.code.as_str().to_string(),
            message: failure.message.clone(),
            step: failure.step.clone(),
        }
    }
}

/// Which records a listing answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only calls of this function.
    pub function: Option<String>,
    /// Only runs of this DAG.
    pub dag: Option<String>,
    /// Only calls in this status.
    pub status: Option<Status>,
    /// Only calls started at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
}

/// Store listings one [`Activations::list`] makes at most.
const MAX_ROUNDS: u32 = 20;

/// Records queued for the background writer before new ones are dropped.
pub const QUEUED_RECORDS: usize = 65_536;

/// Records written per round trip by the background writer.
const RECORDS_PER_BATCH: usize = 512;

/// The most bytes of log text one record keeps, over all its steps: each step keeps up to an
/// equal share, so the failing last step of a long DAG keeps its lines too.
pub const MAX_RECORD_LOG_BYTES: usize = 64 << 10;

/// About the most bytes of records one write of the background writer carries (well under
/// the store's request limit).
const BATCH_BYTES: usize = 4 << 20;

/// How long the background writer lets a batch gather after its first record: records reach
/// the store at most this much later than their calls end.
const BATCH_LINGER: Duration = Duration::from_millis(5);

/// Queues records for [`Activations::recorder`]'s background writer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Recorder {
    sender: tokio::sync::mpsc::Sender<Activation>,
    dropped: Arc<AtomicU64>,
    /// Records queued so far.
    queued: Arc<AtomicU64>,
    /// Records the writer has written (or given up on) so far, in the order queued.
    done: Arc<AtomicU64>,
}

impl Recorder {
    /// Queues `record` (its log lines cut to [`MAX_RECORD_LOG_BYTES`]); drops it (counted)
    /// if the writer is that far behind.
    pub fn record(&self, mut record: Activation) {
        record.bound_logs(MAX_RECORD_LOG_BYTES);
        // Counted before it is sent, so the writer never counts it done first; taken back if
        // the queue is full.
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.sender.try_send(record).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every record queued before this call is written (or given up on), at
    /// most `within`; whether they all were. Records queued meanwhile (asynchronous calls
    /// still finishing) are not waited for. A stopping gateway calls it once its requests are
    /// answered, so the records of its last calls are not lost with the process.
    pub async fn flush(&self, within: Duration) -> bool {
        let target = self.queued.load(Ordering::Acquire);
        let started = std::time::Instant::now();
        while self.done.load(Ordering::Acquire) < target {
            if started.elapsed() >= within {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Records dropped or not written since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Reads and writes activation records in one namespace.
#[derive(Clone)]
pub struct Activations {
    kvs: ClientPool,
    namespace: String,
    retention: Duration,
    /// This handle's contributions to the spans' byte counters (a counter entry of its own
    /// writer, as executors keep theirs), the spans past the retention forgotten.
    /// By namespace and span: records are counted in the namespace of what they record.
    spans: Arc<std::sync::Mutex<std::collections::BTreeMap<(String, u64), Counter>>>,
    writer: u64,
}

impl std::fmt::Debug for Activations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Activations")
            .field("namespace", &self.namespace)
            .field("retention", &self.retention)
            .finish_non_exhaustive()
    }
}

impl Activations {
    /// Records in the default namespace, kept for `retention`.
    pub fn new(kvs: ClientPool, retention: Duration) -> Self {
        Self {
            kvs,
            namespace: keys::DEFAULT_NAMESPACE.to_string(),
            retention,
            spans: Arc::default(),
            writer: rand::random(),
        }
    }

    /// Adds `deltas` (namespace, span, bytes) to this handle's contributions to the spans'
    /// counters; the counters' writes. Forgets the spans past the retention.
    fn count(
        &self,
        deltas: impl IntoIterator<Item = ((String, u64), i64)>,
    ) -> Vec<(Key, LatticeValue)> {
        let mut spans = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        let mut writes = Vec::new();
        for ((namespace, span), delta) in deltas {
            let key = keys::activation_bytes(&namespace, &format!("{span:012}"));
            let counter = spans.entry((namespace, span)).or_default();
            counter.add(self.writer, delta);
            writes.push((key, LatticeValue::Counter(counter.clone())));
        }
        let oldest = span_of(squall_lattices::entry::now_ms().saturating_sub(
            (self.retention.as_millis() as u64).saturating_add(SPAN_SECONDS * 1000),
        ));
        spans.retain(|(_, span), _| *span >= oldest);
        writes
    }

    /// The same records' reader and writer in `namespace`: where records are read, listed
    /// and trimmed (a record is always written in the namespace of what it records).
    pub fn in_namespace(&self, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            ..self.clone()
        }
    }

    /// The store write of `record`, expiring after the retention, in the namespace of the
    /// function or DAG it records.
    pub fn write_of(&self, record: &Activation) -> Result<(Key, Write)> {
        record_write(record.namespace(), self.retention, record)
    }

    /// Writes `records` in one round trip per shard, then adds the bytes of the finished
    /// ones written to their spans' counters (see the module docs); the ids of those not
    /// written.
    async fn put_many(&self, records: &[Activation]) -> Result<Vec<String>> {
        let mut writes = Vec::with_capacity(records.len());
        let mut ids = Vec::with_capacity(records.len());
        let mut sizes = Vec::with_capacity(records.len());
        for record in records {
            let write = self.write_of(record)?;
            // A record is counted once, finished: a running one is written again.
            let counted = record.status != Status::Running;
            sizes.push(counted.then(|| {
                (
                    (record.namespace().to_string(), span_of(record.start_ms)),
                    stored_bytes(&write),
                )
            }));
            writes.push(write);
            ids.push(record.id.clone());
        }
        // The records and then their counters, on one blocking thread.
        let counting = self.clone();
        let results = self
            .kvs
            .with(move |client| {
                let results = client.write_many(writes)?;
                let mut spans: std::collections::BTreeMap<(String, u64), i64> = Default::default();
                for (size, result) in sizes.into_iter().zip(&results) {
                    if let (Some((span, bytes)), Ok(())) = (size, result) {
                        *spans.entry(span).or_default() += bytes;
                    }
                }
                if !spans.is_empty() {
                    // If this fails, the bytes go with this writer's next write of the span
                    // (its totals are kept), or are never counted.
                    if let Err(e) = client.put_many(counting.count(spans)) {
                        tracing::debug!(cause = %e, "counting activation record bytes");
                    }
                }
                Ok(results)
            })
            .await?;
        Ok(ids
            .into_iter()
            .zip(results)
            .filter(|(_, r)| r.is_err())
            .map(|(id, _)| id)
            .collect())
    }

    /// Deletes the oldest records past `cap_bytes` (see the module docs), and the counters
    /// of spans past the retention. Trims only while `owner` holds the trimming lease (one
    /// gateway at a time); `None` when another holds it.
    pub async fn trim(&self, cap_bytes: u64, owner: &str) -> Result<Option<Trimmed>> {
        let lease = keys::lease(&self.namespace, "activation-trim");
        if !crate::lease::take(&self.kvs, &lease, owner, TRIM_LEASE_MS).await? {
            return Ok(None);
        }
        let prefix = keys::activation_bytes(&self.namespace, "");
        let counted = self.kvs.entries_with_prefix(&prefix).await?;
        let mut spans: Vec<(Key, u64, u64)> = counted
            .into_iter()
            .filter_map(|(key, value)| {
                let span = key.strip_prefix(&prefix)?.parse::<u64>().ok()?;
                let bytes = match value {
                    LatticeValue::Counter(counter) => u64::try_from(counter.value()).unwrap_or(0),
                    _ => 0,
                };
                Some((key, span, bytes))
            })
            .collect();
        spans.sort_by_key(|(_, span, _)| std::cmp::Reverse(*span));
        let expired_before = span_of(squall_lattices::entry::now_ms().saturating_sub(
            (self.retention.as_millis() as u64).saturating_add(SPAN_SECONDS * 1000),
        ));
        let sizes: Vec<(u64, u64)> = spans.iter().map(|(_, span, b)| (*span, *b)).collect();
        let plan = trim_plan(&sizes, cap_bytes, expired_before);
        let mut trimmed = Trimmed {
            counted_bytes: sizes.iter().map(|(_, b)| b).sum(),
            ..Trimmed::default()
        };
        // The counters first: a failure midway then leaves records uncounted (kept until
        // their retention), never counted twice and deleted beyond the cap.
        let dropped: Vec<(Key, u64, u64)> = spans
            .into_iter()
            .filter(|(_, span, _)| plan.drop_spans_before.is_some_and(|before| *span < before))
            .collect();
        let oldest_dropped = dropped.iter().map(|(_, span, _)| *span).min();
        if let Some((span, room, bytes)) = plan.crossing.filter(|(_, room, bytes)| room < bytes) {
            let delta = -i64::try_from(bytes - room).unwrap_or(i64::MAX);
            let counters = self.count([((self.namespace.clone(), span), delta)]);
            self.kvs
                .with(move |client| client.put_many(counters))
                .await?;
            trimmed.bytes += bytes - room;
        }
        if !dropped.is_empty() {
            trimmed.bytes += dropped.iter().map(|(_, _, b)| b).sum::<u64>();
            let keys: Vec<Key> = dropped.into_iter().map(|(key, _, _)| key).collect();
            self.delete_keys(keys).await?;
        }
        if let Some((span, room, bytes)) = plan.crossing {
            // The span's records, newest first: its oldest share past the cap goes.
            let (from, to) = span_ms(span);
            // As many as the share past the cap of the records counted: records that ended
            // since the counters were read are among the newest, and stay.
            let mut in_span = self.ids_started_between(from, to).await?;
            let doom = (in_span.len() as u128 * u128::from(bytes - room) / u128::from(bytes.max(1)))
                as usize;
            let doomed = in_span.split_off(in_span.len() - doom.min(in_span.len()));
            trimmed.records += doomed.len() as u64;
            for page in doomed.chunks(1000) {
                self.delete_keys(page.to_vec()).await?;
            }
            // And every record of the spans before it that were counted.
            if let Some(oldest) = oldest_dropped {
                let (from, _) = span_ms(oldest);
                let (to, _) = span_ms(span);
                trimmed.records += self.delete_started_between(from, to).await?;
            }
        }
        Ok(Some(trimmed))
    }

    /// The keys of the records that started at or after `from_ms` and before `to_ms`,
    /// newest first.
    async fn ids_started_between(&self, from_ms: u64, to_ms: u64) -> Result<Vec<Key>> {
        let mut found = Vec::new();
        let mut after = Some(self.before_key(to_ms));
        while let Some(from) = after.take() {
            let (page, next, done) = self.records_after(from, from_ms).await?;
            found.extend(page);
            after = next.filter(|_| !done);
        }
        Ok(found)
    }

    /// Deletes the records that started at or after `from_ms` and before `to_ms`, a page at
    /// a time; how many.
    async fn delete_started_between(&self, from_ms: u64, to_ms: u64) -> Result<u64> {
        let mut deleted = 0u64;
        let mut after = Some(self.before_key(to_ms));
        while let Some(from) = after.take() {
            let (page, next, done) = self.records_after(from, from_ms).await?;
            deleted += page.len() as u64;
            self.delete_keys(page).await?;
            after = next.filter(|_| !done);
        }
        Ok(deleted)
    }

    /// A page of record keys after `after` (older records) that started at or after
    /// `from_ms`; where the next page starts; whether an older record ended the listing.
    async fn records_after(
        &self,
        after: Key,
        from_ms: u64,
    ) -> Result<(Vec<Key>, Option<Key>, bool)> {
        let prefix = keys::activation(&self.namespace, "");
        let list_prefix = prefix.clone();
        let (mut page, next) = self
            .kvs
            .with(move |client| client.list(&list_prefix, Some(&after), 1000))
            .await?;
        let started = |key: &Key| {
            key.strip_prefix(&prefix)
                .and_then(ActivationId::parse)
                .and_then(|id| id.start_us())
                .map_or(0, |us| us / 1000)
        };
        let keep = page
            .iter()
            .take_while(|key| started(key) >= from_ms)
            .count();
        let done = keep < page.len();
        page.truncate(keep);
        Ok((page, next, done))
    }

    /// The key the records that started before `ms` are listed after (ids sort newest
    /// first).
    fn before_key(&self, ms: u64) -> Key {
        let id = ActivationId::with_suffix(ms.saturating_mul(1000), u64::MAX);
        keys::activation(&self.namespace, id.as_str())
    }

    /// Deletes `keys` (records, counters).
    async fn delete_keys(&self, keys: Vec<Key>) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let at = Timestamp::now(self.writer);
        let tombstones: Vec<(Key, squall_lattices::Entry)> = keys
            .into_iter()
            .map(|key| (key, squall_lattices::Entry::tombstone(at)))
            .collect();
        self.kvs
            .with(move |client| client.merge_many(tombstones))
            .await?;
        Ok(())
    }

    /// Writes `record` now, expiring after the retention.
    pub async fn put(&self, record: &Activation) -> Result<()> {
        match self.put_many(std::slice::from_ref(record)).await?.pop() {
            None => Ok(()),
            Some(id) => Err(Error::BadValue {
                key: id,
                reason: "the store refused the record".into(),
            }),
        }
    }

    /// A handle that writes records in the background, batched: a task takes every record
    /// queued while the previous batch was written and writes them in one round trip per
    /// shard, so that records cost a call a channel send, and the store one group commit per
    /// batch instead of one per call. At most [`QUEUED_RECORDS`] wait; beyond that, records
    /// are dropped and counted ([`Recorder::dropped`]). Must be made inside a tokio runtime.
    pub fn recorder(&self) -> Recorder {
        let (sender, mut receiver) = tokio::sync::mpsc::channel::<Activation>(QUEUED_RECORDS);
        let dropped = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicU64::new(0));
        let done = Arc::new(AtomicU64::new(0));
        let activations = self.clone();
        let lost = dropped.clone();
        let written = done.clone();
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(RECORDS_PER_BATCH);
            while receiver.recv_many(&mut batch, RECORDS_PER_BATCH).await > 0 {
                // Let a batch gather: at low load a call finishes well within the linger, so
                // one round trip carries many records instead of one each.
                if batch.len() < RECORDS_PER_BATCH {
                    tokio::time::sleep(BATCH_LINGER).await;
                }
                while batch.len() < RECORDS_PER_BATCH {
                    match receiver.try_recv() {
                        Ok(record) => batch.push(record),
                        Err(_) => break,
                    }
                }
                for chunk in by_bytes(&batch, BATCH_BYTES) {
                    match activations.put_many(chunk).await {
                        Ok(refused) if refused.is_empty() => {}
                        Ok(refused) => {
                            lost.fetch_add(refused.len() as u64, Ordering::Relaxed);
                            tracing::warn!(
                                count = refused.len(),
                                "the store refused activation records"
                            );
                        }
                        Err(e) => {
                            lost.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                            tracing::warn!(count = chunk.len(), cause = %e, "activation records were not written");
                        }
                    }
                    written.fetch_add(chunk.len() as u64, Ordering::AcqRel);
                }
                batch.clear();
            }
        });
        Recorder {
            sender,
            dropped,
            queued,
            done,
        }
    }

    /// The record `id`, if it is kept.
    pub async fn get(&self, id: &ActivationId) -> Result<Option<Activation>> {
        let key = keys::activation(&self.namespace, id.as_str());
        let value = self.kvs.with(move |client| client.get(&key)).await?;
        Ok(value.and_then(|value| decode(id.as_str(), value)))
    }

    /// Up to `limit` records passing `filter`, newest first, after the id `after`; and the
    /// id to resume after if the listing stopped before the end. Looks at no more than
    /// `scan` records, so a filter that matches little answers a short page with a resume
    /// id rather than reading every record.
    pub async fn list(
        &self,
        filter: &Filter,
        after: Option<&ActivationId>,
        limit: u32,
        scan: u32,
    ) -> Result<(Vec<Activation>, Option<String>)> {
        let prefix = keys::activation(&self.namespace, "");
        let mut after_key = after.map(|id| keys::activation(&self.namespace, id.as_str()));
        let mut found = Vec::new();
        let mut scanned = 0u32;
        let mut rounds = 0u32;
        let limit = limit.clamp(1, MAX_PAGE);
        loop {
            let page_prefix = prefix.clone();
            let page_after = after_key.clone();
            let want = MAX_PAGE.min(scan.saturating_sub(scanned)).max(1);
            let (page, next) = self
                .kvs
                .with(move |client| client.list(&page_prefix, page_after.as_deref(), want))
                .await?;
            let reads = page.clone();
            let values = self.kvs.with(move |client| client.get_many(&reads)).await?;
            let last = page.len().saturating_sub(1);
            for (i, (key, value)) in page.iter().zip(values).enumerate() {
                scanned += 1;
                let id = key.strip_prefix(&prefix).unwrap_or(key);
                // Where a listing stopping here resumes: nowhere if this was the last key.
                let resume = || (i < last || next.is_some()).then(|| id.to_string());
                if let Some(record) = value.and_then(|v| decode(id, v)) {
                    // Ids sort by start time, newest first: past `since`, nothing more matches.
                    if filter.since_ms.is_some_and(|since| record.start_ms < since) {
                        return Ok((found, None));
                    }
                    if record.matches(filter) {
                        found.push(record);
                        if found.len() >= limit as usize {
                            return Ok((found, resume()));
                        }
                    }
                }
                if scanned >= scan {
                    return Ok((found, resume()));
                }
            }
            match next {
                // The store's cursor moves even past keys it left out, so this ends.
                Some(next) => after_key = Some(next),
                None => return Ok((found, None)),
            }
            rounds += 1;
            if rounds >= MAX_ROUNDS {
                // Pages the store emptied (keys dead by the time they were read back) count
                // too: the listing answers what it has, with where to resume.
                let resume = after_key
                    .as_deref()
                    .and_then(|k| k.strip_prefix(&prefix))
                    .map(str::to_string);
                return Ok((found, resume));
            }
        }
    }
}

/// The store write of `record` in `namespace`, expiring after `retention`.
/// `records` in runs of about `max_bytes` at most (a larger record alone).
fn by_bytes(records: &[Activation], max_bytes: usize) -> Vec<&[Activation]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, record) in records.iter().enumerate() {
        let size = record.estimated_bytes();
        if i > start && bytes + size > max_bytes {
            chunks.push(&records[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += size;
    }
    if start < records.len() {
        chunks.push(&records[start..]);
    }
    chunks
}

/// What [`Activations::trim`] does, decided from the spans' counters alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TrimPlan {
    /// The span where the sum passes the cap, the bytes of it that fit, and its bytes: the
    /// records before it go, and its oldest share past the cap.
    crossing: Option<(u64, u64, u64)>,
    /// Delete the counters of spans before this one (their records are deleted or expired).
    drop_spans_before: Option<u64>,
}

/// The plan for spans `(first second, bytes)` newest first, under `cap_bytes`, the spans
/// before `expired_before` being past the retention.
fn trim_plan(spans: &[(u64, u64)], cap_bytes: u64, expired_before: u64) -> TrimPlan {
    let mut kept = 0u64;
    for &(span, bytes) in spans {
        if span < expired_before {
            // This one and the older ones are past the retention: their records expire, and
            // their bytes count no more.
            break;
        }
        if kept.saturating_add(bytes) <= cap_bytes {
            kept += bytes;
            continue;
        }
        return TrimPlan {
            crossing: Some((span, cap_bytes - kept, bytes)),
            drop_spans_before: Some(span),
        };
    }
    TrimPlan {
        crossing: None,
        drop_spans_before: spans
            .iter()
            .any(|&(span, _)| span < expired_before)
            .then_some(expired_before),
    }
}

/// The bytes a record's write takes in the store, about (its key and value).
fn stored_bytes((key, write): &(Key, Write)) -> i64 {
    let value = match &write.value {
        Some(LatticeValue::Lww(register)) => register.value.len(),
        _ => 0,
    };
    (key.len() + value) as i64
}

fn record_write(namespace: &str, retention: Duration, record: &Activation) -> Result<(Key, Write)> {
    let encoded = rmp_serde::to_vec_named(record).map_err(|e| Error::BadValue {
        key: record.id.clone(),
        reason: e.to_string(),
    })?;
    let at = Timestamp::new(record.rank(), rand::random());
    let write = Write::expiring(
        LatticeValue::Lww(Lww::new(at, encoded.into())),
        at,
        Some(retention),
    );
    Ok((keys::activation(namespace, &record.id), write))
}

/// A stored record, or `None` (with a warning) if it does not decode.
fn decode(id: &str, value: LatticeValue) -> Option<Activation> {
    crate::register::decode(id, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_calls_get_smaller_ids_so_listings_are_newest_first() {
        let older = ActivationId::new(1_000);
        let newer = ActivationId::new(2_000);
        assert!(newer < older);
        assert_eq!(ActivationId::parse(newer.as_str()), Some(newer));
        assert_eq!(ActivationId::new(123_456).start_us(), Some(123_456));
        assert_eq!(ActivationId::parse("not an id"), None);
        assert_eq!(ActivationId::parse(&"G".repeat(32)), None);
    }

    #[test]
    fn records_round_trip_through_their_stored_encoding() {
        let record = Activation {
            id: ActivationId::new(5).to_string(),
            kind: "dag".into(),
            name: "sq_incr".into(),
            cause: "http-async".into(),
            status: Status::Running,
            start_ms: 100,
            end_ms: None,
            duration_us: None,
            placement: Vec::new(),
            input_bytes: 1,
            output_bytes: None,
            error: None,
            attempt: 2,
            attempts: vec![Attempt {
                attempt: 1,
                start_ms: 100,
                duration_us: 7,
                placement: vec![("f".into(), "e1".into())],
                error: Some(RecordedError {
                    code: "trap".into(),
                    message: "boom".into(),
                    step: None,
                }),
            }],
            idempotency_key: Some("order-1".into()),
            steps: vec![StepReport {
                step: 0,
                function: "f".into(),
                cpu_us: 3,
                logs_dropped: 1,
                ..StepReport::default()
            }],
            chain: 4,
        };
        let (key, write) =
            record_write(keys::DEFAULT_NAMESPACE, DEFAULT_RETENTION, &record).expect("encoded");
        assert!(key.ends_with(&record.id));
        let value = write.value.expect("a value");
        assert_eq!(decode(&record.id, value), Some(record));
    }

    #[test]
    fn the_byte_cap_cuts_where_the_newest_spans_pass_it() {
        // Spans of 10 s, newest first: 100 + 100 bytes fit a cap of 250; the third span
        // (seconds 80..90) keeps 50 of its 200 bytes (its newest quarter of records).
        let spans = [(100, 100), (90, 100), (80, 200), (70, 500)];
        let plan = trim_plan(&spans, 250, 0);
        assert_eq!(
            plan,
            TrimPlan {
                crossing: Some((80, 50, 200)),
                drop_spans_before: Some(80),
            }
        );
        // Exactly at the cap: nothing to cut.
        assert_eq!(trim_plan(&spans, 900, 0), TrimPlan::default());
        // A cap of nothing deletes every record, newest span included.
        assert_eq!(trim_plan(&spans, 0, 0).crossing, Some((100, 0, 100)));
        // Under the cap, counters of spans past the retention go.
        let expired = trim_plan(&spans, 10_000, 85);
        assert_eq!(
            expired,
            TrimPlan {
                crossing: None,
                drop_spans_before: Some(85),
            }
        );
        assert_eq!(trim_plan(&spans, 10_000, 70), TrimPlan::default());
        // Spans past the retention count no more towards the cap.
        assert_eq!(
            trim_plan(&spans, 250, 85),
            TrimPlan {
                crossing: None,
                drop_spans_before: Some(85),
            }
        );
        assert_eq!(span_of(87_999), 80);
    }

    #[test]
    fn logs_are_bounded_per_record_with_a_share_per_step() {
        let line = |text: &str| squall_proto::report::LogLine {
            ms: 0,
            stream: "info".into(),
            function: "f".into(),
            text: text.into(),
        };
        let step = |n: usize| StepReport {
            logs: (0..n).map(|_| line(&"x".repeat(100))).collect(),
            ..StepReport::default()
        };
        let mut record = sample(1);
        record.steps = vec![step(100), step(3)];
        record.bound_logs(1000);
        assert_eq!(record.steps[0].logs.len(), 5);
        assert_eq!(record.steps[0].logs_dropped, 95);
        assert_eq!(record.steps[1].logs.len(), 3);
        assert_eq!(record.steps[1].logs_dropped, 0);
    }

    #[test]
    fn batches_are_cut_by_bytes() {
        let big = |i| {
            let mut record = sample(i);
            record.steps = vec![StepReport {
                logs: vec![squall_proto::report::LogLine {
                    ms: 0,
                    stream: "info".into(),
                    function: "f".into(),
                    text: "y".repeat(3000),
                }],
                ..StepReport::default()
            }];
            record
        };
        let records: Vec<Activation> = (0..10).map(big).collect();
        let chunks = by_bytes(&records, 10_000);
        assert!(chunks.len() >= 4, "{}", chunks.len());
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 10);
        assert!(chunks.iter().all(|c| !c.is_empty()));
        assert_eq!(by_bytes(&records[..1], 10).len(), 1);
        assert!(by_bytes(&[], 10).is_empty());
    }

    fn sample(start_us: u64) -> Activation {
        Activation {
            id: ActivationId::new(start_us).to_string(),
            kind: "function".into(),
            name: "f".into(),
            cause: "http".into(),
            status: Status::Succeeded,
            start_ms: start_us / 1000,
            end_ms: None,
            duration_us: None,
            placement: Vec::new(),
            input_bytes: 0,
            output_bytes: None,
            error: None,
            attempt: 1,
            attempts: Vec::new(),
            idempotency_key: None,
            steps: Vec::new(),
            chain: 0,
        }
    }

    #[test]
    fn filters_select_by_target_status_and_time() {
        let record = Activation {
            id: ActivationId::new(5).to_string(),
            kind: "function".into(),
            name: "incr".into(),
            cause: "http".into(),
            status: Status::Succeeded,
            start_ms: 100,
            end_ms: Some(101),
            duration_us: Some(900),
            placement: vec![("incr".into(), "e1".into())],
            input_bytes: 2,
            output_bytes: Some(2),
            error: None,
            attempt: 1,
            attempts: Vec::new(),
            idempotency_key: None,
            steps: Vec::new(),
            chain: 0,
        };
        assert!(record.matches(&Filter::default()));
        let by = |function: Option<&str>, dag: Option<&str>, status, since_ms| Filter {
            function: function.map(str::to_string),
            dag: dag.map(str::to_string),
            status,
            since_ms,
        };
        assert!(record.matches(&by(Some("incr"), None, Some(Status::Succeeded), Some(100))));
        assert!(!record.matches(&by(Some("square"), None, None, None)));
        assert!(!record.matches(&by(None, Some("incr"), None, None)));
        assert!(!record.matches(&by(None, None, Some(Status::Failed), None)));
        assert!(!record.matches(&by(None, None, None, Some(101))));
        assert!("nope".parse::<Status>().is_err());
        assert_eq!("failed".parse::<Status>(), Ok(Status::Failed));
    }
}
