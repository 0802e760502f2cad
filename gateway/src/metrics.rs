//! The gateway's Prometheus metrics: calls, errors and latency per function and DAG, and each
//! executor's cache hits and misses, load and steps (from the scheduler's view of it).
//!
//! The gateway's own figures live in a registry for its lifetime. The executors' figures are
//! read at scrape time: each scrape encodes them from the statuses it was given, through a
//! collector of its own, so concurrent scrapes never see each other's half-written state, and
//! an executor that left disappears from the next scrape. Figures that only grow (cache hits
//! and misses, steps run) are counters; steps running now is a gauge.

use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use squall_proto::call::{ExecutorStatus, FailureCode};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    kind: String,
    namespace: String,
    name: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TargetLabels {
    kind: String,
    namespace: String,
    name: String,
}

/// The namespace of a qualified name (`squall_proto::keys::qualify`): a label of its own, so
/// that a namespace's series can be selected (and a reader of one namespace shown only
/// its own: [`only_namespace`]).
fn namespace_of(name: &str) -> &str {
    squall_proto::keys::split(name).0
}

/// The name within its namespace.
fn plain(name: &str) -> &str {
    squall_proto::keys::split(name).1
}

/// The exposition `text` without the series of functions and DAGs of namespaces other than
/// `namespace` (the executors' series, which name no function, stay).
pub fn only_namespace(text: &str, namespace: &str) -> String {
    let own = format!("namespace=\"{namespace}\"");
    text.lines()
        .filter(|line| {
            line.starts_with('#') || !line.contains("namespace=\"") || line.contains(&own)
        })
        .flat_map(|line| [line, "\n"])
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExecutorLabels {
    executor: String,
}

fn latency_histogram() -> Histogram {
    // 50 µs to about 26 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// The gateway's metrics. Lives as long as the gateway; `render` may run concurrently.
pub struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    latency: Family<TargetLabels, Histogram, fn() -> Histogram>,
    attempts: Family<CallLabels, Counter>,
    retries: Family<TargetLabels, Counter>,
    dead_letters: Family<TargetLabels, Counter>,
}

/// The executors' figures as one scrape saw them.
#[derive(Debug)]
struct ExecutorFigures(Vec<ExecutorStatus>);

impl ExecutorFigures {
    fn encode_one(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        metric_type: MetricType,
        value: impl Fn(&ExecutorStatus) -> u64,
    ) -> Result<(), std::fmt::Error> {
        let mut metric = encoder.encode_descriptor(name, help, None, metric_type)?;
        for status in &self.0 {
            let labels = ExecutorLabels {
                executor: status.id.clone(),
            };
            let family = metric.encode_family(&labels)?;
            match metric_type {
                MetricType::Counter => ConstCounter::new(value(status)).encode(family)?,
                _ => ConstGauge::new(i64::try_from(value(status)).unwrap_or(i64::MAX))
                    .encode(family)?,
            }
        }
        Ok(())
    }
}

impl Collector for ExecutorFigures {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.encode_one(
            &mut encoder,
            "executor_cache_hits",
            "Reads served by an executor's cache since it started",
            MetricType::Counter,
            |s| s.cache_hits,
        )?;
        self.encode_one(
            &mut encoder,
            "executor_cache_misses",
            "Reads an executor's cache sent to the store since it started",
            MetricType::Counter,
            |s| s.cache_misses,
        )?;
        self.encode_one(
            &mut encoder,
            "executor_running",
            "Steps running on an executor",
            MetricType::Gauge,
            |s| u64::from(s.running),
        )?;
        self.encode_one(
            &mut encoder,
            "executor_steps",
            "Steps an executor has run since it started",
            MetricType::Counter,
            |s| s.steps,
        )
    }
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
        let attempts = Family::<CallLabels, Counter>::default();
        registry.register(
            "async_attempts",
            "Attempts of asynchronous calls by kind, name and outcome (ok or an error code)",
            attempts.clone(),
        );
        let retries = Family::<TargetLabels, Counter>::default();
        registry.register(
            "async_retries",
            "Asynchronous calls' attempts scheduled again after a failure",
            retries.clone(),
        );
        let dead_letters = Family::<TargetLabels, Counter>::default();
        registry.register(
            "async_dead_letters",
            "Asynchronous calls given up after their last attempt",
            dead_letters.clone(),
        );
        Self {
            registry,
            calls,
            latency,
            attempts,
            retries,
            dead_letters,
        }
    }

    /// Counts an attempt of an asynchronous call.
    pub fn attempt(&self, kind: &str, name: &str, failure: Option<FailureCode>) {
        self.attempts
            .get_or_create(&CallLabels {
                kind: kind.into(),
                namespace: namespace_of(name).into(),
                name: plain(name).into(),
                outcome: failure.map_or("ok", FailureCode::as_str).into(),
            })
            .inc();
    }

    /// Counts a retry scheduled.
    pub fn retry(&self, kind: &str, name: &str) {
        self.retries
            .get_or_create(&TargetLabels {
                kind: kind.into(),
                namespace: namespace_of(name).into(),
                name: plain(name).into(),
            })
            .inc();
    }

    /// Counts a call moved to the dead letters.
    pub fn dead_letter(&self, kind: &str, name: &str) {
        self.dead_letters
            .get_or_create(&TargetLabels {
                kind: kind.into(),
                namespace: namespace_of(name).into(),
                name: plain(name).into(),
            })
            .inc();
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
                namespace: namespace_of(name).into(),
                name: plain(name).into(),
                outcome: outcome.into(),
            })
            .inc();
        if known {
            self.latency
                .get_or_create(&TargetLabels {
                    kind: kind.into(),
                    namespace: namespace_of(name).into(),
                    name: plain(name).into(),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// Counts a synchronous call refused over its concurrency limit.
    pub fn throttled(&self, kind: &str, name: &str) {
        self.calls
            .get_or_create(&CallLabels {
                kind: kind.into(),
                namespace: namespace_of(name).into(),
                name: plain(name).into(),
                outcome: "throttled".into(),
            })
            .inc();
    }

    /// Counts an accepted asynchronous call.
    pub fn accepted(&self, kind: &str, name: &str) {
        self.calls
            .get_or_create(&CallLabels {
                kind: kind.into(),
                namespace: namespace_of(name).into(),
                name: plain(name).into(),
                outcome: "accepted".into(),
            })
            .inc();
    }

    /// The metrics in the OpenMetrics text format, with the executors' figures as of now and
    /// the activation records this gateway dropped so far (its writer was that far behind,
    /// or the store refused them).
    pub fn render(&self, executors: &[ExecutorStatus], records_dropped: u64) -> String {
        let mut scrape = Registry::with_prefix("squall");
        scrape.register_collector(Box::new(ExecutorFigures(executors.to_vec())));
        scrape.register(
            "activation_records_dropped",
            "Activation records not written: queued past the writer's bound, or refused by the store",
            ConstCounter::new(records_dropped),
        );
        let mut text = String::new();
        let encoded = encode_registry(&mut text, &self.registry)
            .and_then(|()| encode_registry(&mut text, &scrape))
            .and_then(|()| encode_eof(&mut text));
        if let Err(e) = encoded {
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
        let text = metrics.render(
            &[ExecutorStatus {
                id: "e1".into(),
                cache_hits: 7,
                ..ExecutorStatus::default()
            }],
            3,
        );
        assert!(
            text.contains("squall_activation_records_dropped_total 3"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"squall_calls_total{kind="dag",namespace="default",name="sq_incr",outcome="ok"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"squall_calls_total{kind="function",namespace="default",name="",outcome="not_found"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"outcome="trap""#), "{text}");
        assert!(
            text.contains(
                r#"squall_call_duration_seconds_count{kind="dag",namespace="default",name="sq_incr"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"squall_executor_cache_hits_total{executor="e1"} 7"#),
            "{text}"
        );
        assert!(
            text.contains("# TYPE squall_executor_cache_hits counter"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE squall_executor_running gauge"),
            "{text}"
        );
        assert!(!text.contains(r#"name="nope""#), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn a_reader_of_one_namespace_sees_its_series_and_the_executors_only() {
        let metrics = Metrics::new();
        metrics.observe("function", "incr", Duration::from_micros(300), None);
        metrics.observe(
            "function",
            "team-b/secret",
            Duration::from_micros(300),
            None,
        );
        let text = metrics.render(
            &[ExecutorStatus {
                id: "e1".into(),
                ..ExecutorStatus::default()
            }],
            0,
        );
        assert!(
            text.contains(r#"namespace="team-b",name="secret""#),
            "{text}"
        );
        let seen = only_namespace(&text, "default");
        assert!(
            seen.contains(r#"namespace="default",name="incr""#),
            "{seen}"
        );
        assert!(
            !seen.contains("team-b") && !seen.contains("secret"),
            "{seen}"
        );
        assert!(
            seen.contains(r#"squall_executor_steps_total{executor="e1"}"#),
            "{seen}"
        );
        assert!(seen.ends_with("# EOF\n"), "{seen}");
    }

    #[test]
    fn concurrent_scrapes_each_see_every_executor() {
        let metrics = std::sync::Arc::new(Metrics::new());
        let scrapers: Vec<_> = (0..4)
            .map(|scraper| {
                let metrics = metrics.clone();
                std::thread::spawn(move || {
                    for round in 0..300u64 {
                        let executors: Vec<ExecutorStatus> = (0..3)
                            .map(|i| ExecutorStatus {
                                id: format!("e{i}"),
                                steps: round,
                                cache_hits: scraper,
                                ..ExecutorStatus::default()
                            })
                            .collect();
                        let text = metrics.render(&executors, 0);
                        for i in 0..3 {
                            let line =
                                format!("squall_executor_steps_total{{executor=\"e{i}\"}} {round}");
                            assert!(text.contains(&line), "missing {line} in\n{text}");
                        }
                    }
                })
            })
            .collect();
        for scraper in scrapers {
            scraper.join().expect("a scrape saw incomplete output");
        }
    }

    #[test]
    fn executors_that_left_are_not_reported() {
        let metrics = Metrics::new();
        let one = ExecutorStatus {
            id: "gone".into(),
            ..ExecutorStatus::default()
        };
        assert!(metrics.render(&[one], 0).contains(r#"executor="gone""#));
        assert!(!metrics.render(&[], 0).contains(r#"executor="gone""#));
    }
}
