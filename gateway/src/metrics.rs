//! The gateway's Prometheus metrics: calls, errors and latency per function and DAG, and each
//! executor's cache hits and misses, load and steps (from the scheduler's view of it).

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use squall_proto::call::{ExecutorStatus, FailureCode};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    kind: String,
    name: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    kind: String,
    name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecutorLabels {
    executor: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// The gateway's metrics.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<TargetLabels, Histogram, fn() -> Histogram>,
    cache_hits: Family<ExecutorLabels, Gauge>,
    cache_misses: Family<ExecutorLabels, Gauge>,
    running: Family<ExecutorLabels, Gauge>,
    steps: Family<ExecutorLabels, Gauge>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("squall");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "calls",
            "Invocations by kind (function or dag), name and outcome (ok, accepted, or an error code)",
            calls.clone(),
        );
        let latency = Family::<TargetLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "call_duration_seconds",
            "Latency of synchronous invocations as the gateway sees them",
            latency.clone(),
        );
        let cache_hits = Family::<ExecutorLabels, Gauge>::default();
        registry.register(
            "executor_cache_hits",
            "Reads served by an executor's cache since it started",
            cache_hits.clone(),
        );
        let cache_misses = Family::<ExecutorLabels, Gauge>::default();
        registry.register(
            "executor_cache_misses",
            "Reads an executor's cache sent to the store since it started",
            cache_misses.clone(),
        );
        let running = Family::<ExecutorLabels, Gauge>::default();
        registry.register(
            "executor_running",
            "Steps running on an executor",
            running.clone(),
        );
        let steps = Family::<ExecutorLabels, Gauge>::default();
        registry.register(
            "executor_steps",
            "Steps an executor has run since it started",
            steps.clone(),
        );
        Self {
            registry,
            calls,
            latency,
            cache_hits,
            cache_misses,
            running,
            steps,
        }
    }

    /// Counts a finished synchronous call. Calls refused before they reached a function
    /// (unknown names, bad requests) are counted under an empty name, so that arbitrary
    /// names cannot grow the label set.
    pub fn observe(&self, kind: &str, name: &str, took: Duration, failure: Option<FailureCode>) {
        let known = !matches!(
            failure,
            Some(FailureCode::NotFound) | Some(FailureCode::BadRequest)
        );
        let name = if known { name } else { "" };
        let outcome = failure.map_or("ok", FailureCode::as_str);
        self.calls
            .get_or_create(&CallLabels {
                kind: kind.into(),
                name: name.into(),
                outcome: outcome.into(),
            })
            .inc();
        if known {
            self.latency
                .get_or_create(&TargetLabels {
                    kind: kind.into(),
                    name: name.into(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Counts an accepted asynchronous call.
    pub fn accepted(&self, kind: &str, name: &str) {
        self.calls
            .get_or_create(&CallLabels {
                kind: kind.into(),
                name: name.into(),
                outcome: "accepted".into(),
            })
            .inc();
    }

    /// The metrics in the OpenMetrics text format, with the executors' figures as of now.
    pub fn render(&self, executors: &[ExecutorStatus]) -> String {
        for family in [
            &self.cache_hits,
            &self.cache_misses,
            &self.running,
            &self.steps,
        ] {
            family.clear();
        }
        for status in executors {
            let labels = ExecutorLabels {
                executor: status.id.clone(),
            };
            let set = |family: &Family<ExecutorLabels, Gauge>, value: u64| {
                family
                    .get_or_create(&labels)
                    .set(i64::try_from(value).unwrap_or(i64::MAX));
            };
            set(&self.cache_hits, status.cache_hits);
            set(&self.cache_misses, status.cache_misses);
            set(&self.running, u64::from(status.running));
            set(&self.steps, status.steps);
        }
        let mut text = String::new();
        if let Err(e) = encode(&mut text, &self.registry) {
            tracing::warn!(cause = %e, "encoding metrics");
        }
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_and_executors_are_rendered() {
        let metrics = Metrics::new();
        metrics.observe("dag", "sq_incr", Duration::from_micros(300), None);
        metrics.observe(
            "function",
            "nope",
            Duration::from_micros(30),
            Some(FailureCode::NotFound),
        );
        metrics.observe(
            "function",
            "f",
            Duration::from_millis(3),
            Some(FailureCode::Trap),
        );
        let text = metrics.render(&[ExecutorStatus {
            id: "e1".into(),
            cache_hits: 7,
            ..ExecutorStatus::default()
        }]);
        assert!(
            text.contains(r#"squall_calls_total{kind="dag",name="sq_incr",outcome="ok"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"squall_calls_total{kind="function",name="",outcome="not_found"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"outcome="trap""#), "{text}");
        assert!(
            text.contains(r#"squall_call_duration_seconds_count{kind="dag",name="sq_incr"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"squall_executor_cache_hits{executor="e1"} 7"#),
            "{text}"
        );
        assert!(!text.contains(r#"name="nope""#), "{text}");
    }
}
