//! What each step of a call reports about its run, for the call's activation record: which
//! version ran where, how long it took, the CPU time it spent, its linear memory, and what it
//! logged.
//!
//! A step's report is made by the executor that ran it, only for calls that ask for one (the
//! gateway asks when it keeps activation records). Reports travel with the call's data: each
//! step hands its own and its predecessors' reports on with its output, and the sink (or a
//! failing step) sends all of them to the scheduler with its outcome, which passes them to the
//! caller. No extra message is sent per step, and the reports of a failed call reach the
//! caller with its failure, so the failing step's log lines are in its record.
//!
//! Log lines are bounded per step ([`MAX_LOG_BYTES`], [`MAX_LOG_LINES`], [`MAX_LINE_BYTES`]);
//! what is left out is counted in [`StepReport::logs_dropped`], so a record says when its
//! logs are incomplete.

use serde::{Deserialize, Serialize};

/// The most bytes of log text one step keeps (the guest's `log` calls, stdout and stderr,
/// and its nested calls' lines).
pub const MAX_LOG_BYTES: usize = 16 << 10;
/// The most log lines one step keeps.
pub const MAX_LOG_LINES: usize = 256;
/// A longer line is cut to this many bytes (and ends with `…`).
pub const MAX_LINE_BYTES: usize = 2 << 10;

/// One line a function logged or printed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the executor took it (ms since the Unix epoch). Lines printed to stdout and
    /// stderr are taken when the call ends, so they carry its end time.
    pub ms: u64,
    /// Where it came from: `stdout`, `stderr`, or the level of a `log` call (`trace`,
    /// `debug`, `info`, `warn`, `error`).
    pub stream: String,
    /// The function that logged it (a step's nested calls log under their own names).
    pub function: String,
    /// The line, without its end-of-line.
    pub text: String,
}

/// What one step reports about its run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReport {
    /// The step's index in its plan.
    pub step: u16,
    /// The function it ran.
    pub function: String,
    /// The version of the function that ran (0 if it never started: not found).
    pub version: u64,
    /// The executor it ran on (its id).
    pub executor: String,
    /// When it started (µs since the Unix epoch).
    pub start_us: u64,
    /// How long it ran, in microseconds, from taking its input to its outcome.
    pub duration_us: u64,
    /// CPU time spent for it, in microseconds: the guest's code, the host functions it
    /// called, its nested calls, and `wasi:nn` inference on the executor's blocking threads.
    pub cpu_us: u64,
    /// The instance's linear memory when the step ended, in bytes.
    pub memory_bytes: u64,
    /// How much that memory grew during the step, in bytes.
    pub memory_growth_bytes: u64,
    /// What it logged, oldest first.
    #[serde(default)]
    pub logs: Vec<LogLine>,
    /// Lines (or parts of lines) left out because the step's bounds were reached.
    #[serde(default)]
    pub logs_dropped: u32,
    /// The calls its guest made to other functions (and theirs, deeper), in the order they
    /// ended, at most [`MAX_NESTED_CALLS`].
    #[serde(default)]
    pub calls: Vec<NestedCall>,
    /// Nested calls left out past [`MAX_NESTED_CALLS`].
    #[serde(default)]
    pub calls_dropped: u32,
}

/// The most nested calls one step's report keeps.
pub const MAX_NESTED_CALLS: usize = 256;

/// A call a step's guest made to another function (through `squall:function/invoke`), as
/// the step's report keeps it: the nested call's own record within its caller's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NestedCall {
    /// The function called.
    pub function: String,
    /// The function that called it.
    pub caller: String,
    /// How deep it ran (1: called by the step's own function).
    pub depth: u32,
    /// When it started (µs since the Unix epoch).
    pub start_us: u64,
    /// How long it took, in microseconds.
    pub duration_us: u64,
    /// Its input's size in bytes.
    pub input_bytes: u64,
    /// Its output's size in bytes, if it succeeded.
    #[serde(default)]
    pub output_bytes: Option<u64>,
    /// Why it failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
}

/// Merges `more` into `reports`, keeping one report per step (outputs of one step reach a
/// fan-in step along several paths, each carrying it): what the sink reports is every step
/// that led to it.
pub fn merge_reports(reports: &mut Vec<StepReport>, more: &[StepReport]) {
    for report in more {
        if !reports.iter().any(|r| r.step == report.step) {
            reports.push(report.clone());
        }
    }
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with `…`;
/// answers whether it cut.
pub fn truncate_line(text: &mut String, max: usize) -> bool {
    if text.len() <= max {
        return false;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text.push('…');
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_keeps_one_report_per_step() {
        let report = |step| StepReport {
            step,
            ..StepReport::default()
        };
        let mut reports = vec![report(0), report(1)];
        merge_reports(&mut reports, &[report(0), report(2), report(2)]);
        let steps: Vec<u16> = reports.iter().map(|r| r.step).collect();
        assert_eq!(steps, [0, 1, 2]);
    }

    #[test]
    fn long_lines_are_cut_on_a_character_boundary() {
        let mut short = "fine".to_string();
        assert!(!truncate_line(&mut short, 10));
        assert_eq!(short, "fine");
        let mut long = "ééééé".to_string(); // 10 bytes
        assert!(truncate_line(&mut long, 6));
        assert!(long.len() <= 6, "{long:?}");
        assert_eq!(long, "é…");
    }
}
