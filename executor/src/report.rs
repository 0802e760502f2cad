//! What one step tells its call's activation record: the log lines its guest (and the guest's
//! nested calls) logged or printed, the CPU time spent for it, the version that ran and its
//! linear memory ([`StepTrace`], turned into a [`StepReport`] when the step ends).
//!
//! A trace exists only for calls whose plan asks for reports; other calls log to the node's
//! log as before and pay nothing here. A trace is an `Arc` shared by the step's call and its
//! nested calls, each of whose host states holds it for the call's duration: a mutex taken
//! per log line and per CPU measurement, never across an await.
//!
//! CPU time is the time the guest's future spends being polled ([`CpuTimed`]): a guest and
//! the host functions it calls run inside those polls, on whichever worker thread polls them,
//! and the nested calls it awaits are polled within them too; between polls (waiting for the
//! store, a timer, the blocking pool) it uses no CPU. The time within a poll is read from the
//! monotonic clock (a vDSO read, some 25 ns), not from the thread's CPU clock, which costs a
//! system call (about 300 ns measured here, twice per poll, some 5% of a warm f(g(x))); the
//! difference is time the operating system took the thread away in the middle of a poll,
//! which this counts as the call's. Inference runs on tokio's blocking pool, so `wasi:nn`
//! reads that thread's CPU clock around its work (once per inference) and adds it
//! ([`StepTrace::add_cpu`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use squall_proto::report::{
    truncate_line, LogLine, NestedCall, StepReport, MAX_LINE_BYTES, MAX_LOG_BYTES, MAX_LOG_LINES,
    MAX_NESTED_CALLS,
};

/// Collects one step's log lines (bounded by [`MAX_LOG_BYTES`] and [`MAX_LOG_LINES`]), CPU
/// time, version and memory while it runs. Cheap to clone (an `Arc`).
#[derive(Debug, Clone, Default)]
pub struct StepTrace {
    inner: Arc<Mutex<Collected>>,
}

#[derive(Debug, Default)]
struct Collected {
    logs: Vec<LogLine>,
    bytes: usize,
    dropped: u32,
    cpu: Duration,
    version: u64,
    memory_bytes: u64,
    memory_growth_bytes: u64,
    calls: Vec<NestedCall>,
    calls_dropped: u32,
}

impl StepTrace {
    /// An empty trace.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Collected> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps one line `function` logged on `stream`, if the step's bounds allow; a line
    /// beyond [`MAX_LINE_BYTES`] is cut (and counted as dropped).
    pub fn log(&self, stream: &str, function: &str, mut text: String) {
        let cut = truncate_line(&mut text, MAX_LINE_BYTES);
        let mut collected = self.lock();
        if collected.logs.len() >= MAX_LOG_LINES || collected.bytes + text.len() > MAX_LOG_BYTES {
            collected.dropped = collected.dropped.saturating_add(1);
            return;
        }
        if cut {
            collected.dropped = collected.dropped.saturating_add(1);
        }
        collected.bytes += text.len();
        collected.logs.push(LogLine {
            ms: squall_lattices::entry::now_ms(),
            stream: stream.to_string(),
            function: function.to_string(),
            text,
        });
    }

    /// Keeps what a guest printed on `stream` (`stdout` or `stderr`), line by line;
    /// `dropped_bytes` (output beyond the guest's buffer) counts as one dropped line.
    pub fn output(&self, stream: &str, function: &str, bytes: &[u8], dropped_bytes: usize) {
        for line in String::from_utf8_lossy(bytes).lines() {
            self.log(stream, function, line.to_string());
        }
        if dropped_bytes > 0 {
            let mut collected = self.lock();
            collected.dropped = collected.dropped.saturating_add(1);
        }
    }

    /// Keeps a nested call that ended, if the step's bound allows (else counts it).
    pub fn nested(&self, call: NestedCall) {
        let mut collected = self.lock();
        if collected.calls.len() >= MAX_NESTED_CALLS {
            collected.calls_dropped = collected.calls_dropped.saturating_add(1);
        } else {
            collected.calls.push(call);
        }
    }

    /// Adds CPU time spent for the step.
    pub fn add_cpu(&self, spent: Duration) {
        self.lock().cpu += spent;
    }

    /// Notes the version that ran and its instance's memory (the step's own call, not its
    /// nested ones).
    pub fn ran(&self, version: u64, memory_bytes: u64, memory_growth_bytes: u64) {
        let mut collected = self.lock();
        collected.version = version;
        collected.memory_bytes = memory_bytes;
        collected.memory_growth_bytes = memory_growth_bytes;
    }

    /// The step's report: what was collected, and what the caller knows (the step's index,
    /// function, executor, start and duration).
    pub fn report(
        &self,
        step: u16,
        function: &str,
        executor: &str,
        start_us: u64,
        duration: Duration,
    ) -> StepReport {
        let mut collected = self.lock();
        StepReport {
            step,
            function: function.to_string(),
            version: collected.version,
            executor: executor.to_string(),
            start_us,
            duration_us: duration.as_micros().try_into().unwrap_or(u64::MAX),
            cpu_us: collected.cpu.as_micros().try_into().unwrap_or(u64::MAX),
            memory_bytes: collected.memory_bytes,
            memory_growth_bytes: collected.memory_growth_bytes,
            logs: std::mem::take(&mut collected.logs),
            logs_dropped: collected.dropped,
            calls: std::mem::take(&mut collected.calls),
            calls_dropped: collected.calls_dropped,
        }
    }
}

/// The CPU time the calling thread has used (zero where the clock cannot be read).
pub fn thread_cpu_time() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(spec) => Duration::new(
            u64::try_from(spec.tv_sec()).unwrap_or(0),
            u32::try_from(spec.tv_nsec()).unwrap_or(0),
        ),
        Err(_) => Duration::ZERO,
    }
}

/// A future whose polls' time (its CPU time, see the module docs) is added to a
/// [`StepTrace`].
pub struct CpuTimed<F> {
    future: Pin<Box<F>>,
    trace: StepTrace,
}

impl<F: Future> CpuTimed<F> {
    /// Measures `future`'s polls into `trace`.
    pub fn new(future: F, trace: StepTrace) -> Self {
        Self {
            future: Box::pin(future),
            trace,
        }
    }
}

impl<F: Future> Future for CpuTimed<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let before = std::time::Instant::now();
        let polled = self.future.as_mut().poll(cx);
        self.trace.add_cpu(before.elapsed());
        polled
    }
}

/// Now, in microseconds since the Unix epoch.
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_and_what_is_left_out_is_counted() {
        let trace = StepTrace::new();
        for i in 0..(MAX_LOG_LINES + 10) {
            trace.log("info", "f", format!("line {i}"));
        }
        trace.log("info", "f", "x".repeat(MAX_LINE_BYTES * 2));
        let report = trace.report(0, "f", "e1", 0, Duration::from_micros(5));
        assert_eq!(report.logs.len(), MAX_LOG_LINES);
        assert_eq!(report.logs[0].text, "line 0");
        assert_eq!(report.logs_dropped, 11);
        assert_eq!(report.duration_us, 5);
    }

    #[test]
    fn output_is_split_into_lines_and_bytes_are_bounded() {
        let trace = StepTrace::new();
        trace.output("stdout", "f", b"one\ntwo\n", 3);
        let long = "y".repeat(MAX_LINE_BYTES - 10);
        for _ in 0..(MAX_LOG_BYTES / long.len() + 2) {
            trace.log("warn", "g", long.clone());
        }
        let report = trace.report(1, "f", "e1", 0, Duration::ZERO);
        assert_eq!(report.logs[0].text, "one");
        assert_eq!(report.logs[1].stream, "stdout");
        assert!(report.logs.iter().map(|l| l.text.len()).sum::<usize>() <= MAX_LOG_BYTES);
        // The dropped output, and the long lines past the byte bound.
        assert!(report.logs_dropped >= 2, "{}", report.logs_dropped);
    }

    #[test]
    fn cpu_time_of_polls_is_added() {
        let trace = StepTrace::new();
        let spin = CpuTimed::new(
            async {
                let mut x = 0u64;
                for i in 0..2_000_000u64 {
                    x = std::hint::black_box(x.wrapping_add(i));
                }
                x
            },
            trace.clone(),
        );
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(spin);
        let report = trace.report(0, "f", "e", 0, Duration::ZERO);
        assert!(report.cpu_us > 0, "{report:?}");
    }
}
