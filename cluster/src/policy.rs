//! The policy engine's decisions: pure functions of what the monitor observed, so every rule
//! is unit-tested without a cluster.
//!
//! Each period, [`Policy::decide`] takes the nodes' load reports, the executors' status and
//! the current view, and returns [`Action`]s:
//! - **Hot keys** (Anna's selective replication): a key accessed more than `hot_sigma`
//!   standard deviations above the mean per-key count on some node (and at least
//!   `hot_min_accesses` times in the window) gets one more replica per period, up to
//!   `max_key_replication` or the node count. A key with extra replicas that is accessed no
//!   more than the mean for `cool_periods` periods in a row goes back to the default.
//! - **Storage nodes** (Anna's elasticity): if the bytes held exceed `storage_fill` of the
//!   nodes' capacity, as many nodes are added as it takes; if the busiest node's occupancy
//!   exceeds `node_occupancy_high`, one is added. If every node stays under
//!   `node_occupancy_low` for `low_periods` periods and the data fits on one node fewer, the
//!   least occupied node is removed. No change for `node_grace` after a change (Anna: 120 s).
//! - **Executors** (Cloudburst's): if the pool's utilization (steps running or waiting over
//!   capacity) exceeds `executor_utilization_high`, `executor_step` executors are added; if
//!   it stays under `executor_utilization_low` for `low_periods` periods, the least loaded
//!   one is removed. No change for `executor_grace` after a change.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Deserialize;
use squall_proto::{ClusterView, Key, LoadReport};

/// Every threshold and period of the policy engine. Defaults follow Anna and Cloudburst where
/// they have one.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// How often the monitor applies the policies, in milliseconds (Anna's monitor: 30 s).
    pub period_ms: u64,
    /// A key is hot above the mean per-key access count plus this many standard deviations
    /// (Anna: 1).
    pub hot_sigma: f64,
    /// ... and with at least this many accesses in a report window.
    pub hot_min_accesses: u64,
    /// The most replicas a hot key gets (0: as many as there are nodes).
    pub max_key_replication: u32,
    /// Periods in a row a key with extra replicas must be at or below the mean before it goes
    /// back to the default replication.
    pub cool_periods: u32,
    /// Add a storage node when the busiest node is busier than this (0 to 1).
    pub node_occupancy_high: f64,
    /// Remove one when every node stays below this (Anna: 0.05).
    pub node_occupancy_low: f64,
    /// Bytes a storage node may hold.
    pub node_capacity_bytes: u64,
    /// Add nodes when the data exceeds this share of the nodes' capacity (Anna: 0.6).
    pub storage_fill: f64,
    /// Storage nodes never go below this.
    pub min_nodes: u32,
    /// ... nor above this.
    pub max_nodes: u32,
    /// No storage node change this long after the last one, in milliseconds (Anna: 120 s).
    pub node_grace_ms: u64,
    /// Add executors when the pool's utilization exceeds this (Cloudburst: 0.7 for a
    /// function's replicas).
    pub executor_utilization_high: f64,
    /// Remove one when it stays below this (Cloudburst: 0.1).
    pub executor_utilization_low: f64,
    /// Executors added at a time (Cloudburst adds 4 VMs).
    pub executor_step: u32,
    /// Executors never go below this.
    pub min_executors: u32,
    /// ... nor above this.
    pub max_executors: u32,
    /// No executor change this long after the last one, in milliseconds.
    pub executor_grace_ms: u64,
    /// Periods in a row a pool must be under its low mark before one member is removed.
    pub low_periods: u32,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            period_ms: 30_000,
            hot_sigma: 1.0,
            hot_min_accesses: 100,
            max_key_replication: 0,
            cool_periods: 2,
            node_occupancy_high: 0.7,
            node_occupancy_low: 0.05,
            node_capacity_bytes: 8 << 30,
            storage_fill: 0.6,
            min_nodes: 1,
            max_nodes: 32,
            node_grace_ms: 120_000,
            executor_utilization_high: 0.7,
            executor_utilization_low: 0.1,
            executor_step: 2,
            min_executors: 1,
            max_executors: 32,
            executor_grace_ms: 30_000,
            low_periods: 3,
        }
    }
}

impl PolicyConfig {
    /// The period as a duration.
    pub fn period(&self) -> Duration {
        Duration::from_millis(self.period_ms.max(10))
    }
}

/// One executor's load, as its scheduler reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecutorLoad {
    /// Its id.
    pub id: String,
    /// Steps running.
    pub running: u32,
    /// Steps waiting for their plan or inputs.
    pub waiting: u32,
    /// Steps it runs at once.
    pub capacity: u32,
    /// Whether it is stopping (not counted in the pool).
    pub draining: bool,
}

/// What the monitor saw in one period.
#[derive(Debug, Clone)]
pub struct Observation {
    /// When.
    pub at: Instant,
    /// The cluster's view.
    pub view: ClusterView,
    /// The nodes' latest load reports (stale ones left out).
    pub loads: Vec<LoadReport>,
    /// The executors, if a scheduler answered.
    pub executors: Option<Vec<ExecutorLoad>>,
}

/// What the policy engine asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Give `key` this many replicas (`None`: back to the default).
    Replicate {
        /// The key.
        key: Key,
        /// Its replicas.
        replicas: Option<u32>,
        /// Why, for the log.
        why: String,
    },
    /// Start this many storage nodes.
    AddNodes {
        /// How many.
        count: u32,
        /// Why.
        why: String,
    },
    /// Stop this storage node (it hands its keys off first).
    RemoveNode {
        /// Its id.
        id: String,
        /// Why.
        why: String,
    },
    /// Start this many executors.
    AddExecutors {
        /// How many.
        count: u32,
        /// Why.
        why: String,
    },
    /// Stop this executor (it drains first).
    RemoveExecutor {
        /// Its id.
        id: String,
        /// Why.
        why: String,
    },
}

/// The policy engine's memory between periods.
#[derive(Debug, Default)]
pub struct Policy {
    config: PolicyConfig,
    /// Keys with extra replicas, and how many periods in a row each has been cool.
    cooling: BTreeMap<Key, u32>,
    last_node_change: Option<Instant>,
    last_executor_change: Option<Instant>,
    quiet_node_periods: u32,
    quiet_executor_periods: u32,
}

impl Policy {
    /// A policy engine with `config`.
    pub fn new(config: PolicyConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// The configuration.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// This period's actions.
    pub fn decide(&mut self, seen: &Observation) -> Vec<Action> {
        let mut actions = self.hot_keys(seen);
        actions.extend(self.storage_nodes(seen));
        actions.extend(self.executors(seen));
        actions
    }

    fn hot_keys(&mut self, seen: &Observation) -> Vec<Action> {
        let view = &seen.view;
        let nodes = view.members.len() as u32;
        let ceiling = match self.config.max_key_replication {
            0 => nodes,
            n => n.min(nodes),
        };
        // Per node: the mean and spread of per-key counts; a key's count is its largest on
        // any node (every replica of a key counts the accesses it served).
        let mut hot: BTreeMap<Key, (u64, f64)> = BTreeMap::new();
        let mut warm: BTreeMap<Key, ()> = BTreeMap::new();
        for load in &seen.loads {
            if load.distinct == 0 {
                continue;
            }
            let n = load.distinct as f64;
            let mean = load.accesses as f64 / n;
            let sigma = (load.sum_squares / n - mean * mean).max(0.0).sqrt();
            let threshold = mean + self.config.hot_sigma * sigma;
            for (key, count) in &load.top {
                let count_f = *count as f64;
                if count_f > threshold && *count >= self.config.hot_min_accesses {
                    let entry = hot.entry(key.clone()).or_insert((0, threshold));
                    entry.0 = entry.0.max(*count);
                }
                if count_f > mean {
                    warm.insert(key.clone(), ());
                }
            }
        }
        let current: BTreeMap<&Key, u32> = view.overrides.iter().map(|(k, r)| (k, *r)).collect();
        let mut actions = Vec::new();
        for (key, (count, threshold)) in &hot {
            let replicas = current.get(key).copied().unwrap_or(view.replication);
            self.cooling.insert(key.clone(), 0);
            if replicas < ceiling {
                actions.push(Action::Replicate {
                    key: key.clone(),
                    replicas: Some(replicas + 1),
                    why: format!(
                        "{count} accesses in a window, above the hot mark of {threshold:.0}"
                    ),
                });
            }
        }
        for (key, _) in view.overrides.iter() {
            if hot.contains_key(key) {
                continue;
            }
            let cool = self.cooling.entry(key.clone()).or_insert(0);
            if warm.contains_key(key) {
                *cool = 0;
                continue;
            }
            *cool += 1;
            if *cool >= self.config.cool_periods.max(1) {
                self.cooling.remove(key);
                actions.push(Action::Replicate {
                    key: key.clone(),
                    replicas: None,
                    why: format!(
                        "no more than the mean access count for {} periods",
                        self.config.cool_periods.max(1)
                    ),
                });
            }
        }
        self.cooling
            .retain(|k, _| view.overrides.iter().any(|(o, _)| o == k) || hot.contains_key(k));
        actions
    }

    fn in_grace(last: Option<Instant>, grace_ms: u64, at: Instant) -> bool {
        last.is_some_and(|t| at.saturating_duration_since(t) < Duration::from_millis(grace_ms))
    }

    fn storage_nodes(&mut self, seen: &Observation) -> Vec<Action> {
        let nodes = seen.view.members.len() as u32;
        if nodes == 0
            || seen.loads.is_empty()
            || Self::in_grace(self.last_node_change, self.config.node_grace_ms, seen.at)
        {
            return Vec::new();
        }
        let bytes: u64 = seen.loads.iter().map(|l| l.bytes).sum();
        let usable = self.config.node_capacity_bytes as f64 * self.config.storage_fill;
        let needed = if usable > 0.0 {
            (bytes as f64 / usable).ceil() as u32
        } else {
            0
        };
        let busiest = seen.loads.iter().map(|l| l.occupancy).fold(0.0, f64::max);
        let room = self.config.max_nodes.saturating_sub(nodes);
        if needed > nodes && room > 0 {
            self.quiet_node_periods = 0;
            self.last_node_change = Some(seen.at);
            return vec![Action::AddNodes {
                count: (needed - nodes).min(room),
                why: format!(
                    "{bytes} bytes exceed {:.0}% of {nodes} nodes' capacity",
                    self.config.storage_fill * 100.0
                ),
            }];
        }
        if busiest > self.config.node_occupancy_high && room > 0 {
            self.quiet_node_periods = 0;
            self.last_node_change = Some(seen.at);
            return vec![Action::AddNodes {
                count: 1,
                why: format!(
                    "the busiest node's occupancy is {busiest:.2}, above {}",
                    self.config.node_occupancy_high
                ),
            }];
        }
        let quiet = busiest < self.config.node_occupancy_low
            && nodes > self.config.min_nodes.max(1)
            && (needed < nodes || bytes == 0);
        if !quiet {
            self.quiet_node_periods = 0;
            return Vec::new();
        }
        self.quiet_node_periods += 1;
        if self.quiet_node_periods < self.config.low_periods.max(1) {
            return Vec::new();
        }
        let Some(idlest) = seen
            .loads
            .iter()
            .filter(|l| seen.view.members.iter().any(|m| m.id == l.id))
            .min_by(|a, b| a.occupancy.total_cmp(&b.occupancy).then(a.id.cmp(&b.id)))
        else {
            return Vec::new();
        };
        self.quiet_node_periods = 0;
        self.last_node_change = Some(seen.at);
        vec![Action::RemoveNode {
            id: idlest.id.clone(),
            why: format!(
                "every node under {} occupancy for {} periods",
                self.config.node_occupancy_low, self.config.low_periods
            ),
        }]
    }

    fn executors(&mut self, seen: &Observation) -> Vec<Action> {
        let Some(executors) = &seen.executors else {
            return Vec::new();
        };
        if Self::in_grace(
            self.last_executor_change,
            self.config.executor_grace_ms,
            seen.at,
        ) {
            return Vec::new();
        }
        let pool: Vec<&ExecutorLoad> = executors.iter().filter(|e| !e.draining).collect();
        let count = pool.len() as u32;
        let capacity: u64 = pool.iter().map(|e| u64::from(e.capacity.max(1))).sum();
        let load: u64 = pool
            .iter()
            .map(|e| u64::from(e.running) + u64::from(e.waiting))
            .sum();
        let utilization = if capacity == 0 {
            0.0
        } else {
            load as f64 / capacity as f64
        };
        let room = self.config.max_executors.saturating_sub(count);
        if count < self.config.min_executors {
            self.last_executor_change = Some(seen.at);
            return vec![Action::AddExecutors {
                count: self.config.min_executors - count,
                why: format!("{count} executors, fewer than the minimum"),
            }];
        }
        if utilization > self.config.executor_utilization_high && room > 0 {
            self.quiet_executor_periods = 0;
            self.last_executor_change = Some(seen.at);
            return vec![Action::AddExecutors {
                count: self.config.executor_step.max(1).min(room),
                why: format!(
                    "utilization {utilization:.2} ({load} steps for {capacity} slots) above {}",
                    self.config.executor_utilization_high
                ),
            }];
        }
        if utilization >= self.config.executor_utilization_low
            || count <= self.config.min_executors.max(1)
        {
            self.quiet_executor_periods = 0;
            return Vec::new();
        }
        self.quiet_executor_periods += 1;
        if self.quiet_executor_periods < self.config.low_periods.max(1) {
            return Vec::new();
        }
        let Some(idlest) = pool.iter().min_by(|a, b| {
            (a.running + a.waiting)
                .cmp(&(b.running + b.waiting))
                .then(a.id.cmp(&b.id))
        }) else {
            return Vec::new();
        };
        self.quiet_executor_periods = 0;
        self.last_executor_change = Some(seen.at);
        vec![Action::RemoveExecutor {
            id: idlest.id.clone(),
            why: format!(
                "utilization {utilization:.2} under {} for {} periods",
                self.config.executor_utilization_low, self.config.low_periods
            ),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use squall_proto::Member;

    fn view(nodes: usize, overrides: &[(&str, u32)]) -> ClusterView {
        ClusterView {
            generation: 1,
            previous: 0,
            members: (0..nodes)
                .map(|i| Member {
                    id: format!("n{i}"),
                    incarnation: 1,
                    shards: vec![format!("n{i}/0")],
                    virtual_nodes: 8,
                })
                .collect(),
            replication: 2,
            overrides: overrides.iter().map(|(k, r)| (k.to_string(), *r)).collect(),
            settled: true,
        }
    }

    /// A node that served 100 keys 10 times each, plus `extra` accesses of `key`.
    fn load(id: &str, key: &str, extra: u64, occupancy: f64) -> LoadReport {
        let mut top = vec![(key.to_string(), 10 + extra)];
        top.extend((1..10).map(|i| (format!("k{i}"), 10)));
        LoadReport {
            id: id.into(),
            window_ms: 1000,
            occupancy,
            keys: 100,
            bytes: 10_000,
            accesses: 1000 + extra,
            distinct: 100,
            sum_squares: 99.0 * 100.0 + ((10 + extra) as f64).powi(2),
            top,
            ..LoadReport::default()
        }
    }

    fn seen(view: ClusterView, loads: Vec<LoadReport>, at: Instant) -> Observation {
        Observation {
            at,
            view,
            loads,
            executors: None,
        }
    }

    fn quiet() -> PolicyConfig {
        PolicyConfig {
            node_occupancy_low: 0.0,
            ..PolicyConfig::default()
        }
    }

    #[test]
    fn a_hot_key_gains_a_replica_per_period_up_to_the_node_count() {
        let mut policy = Policy::new(quiet());
        let now = Instant::now();
        let actions = policy.decide(&seen(view(3, &[]), vec![load("n0", "hot", 5000, 0.3)], now));
        assert!(
            matches!(&actions[..], [Action::Replicate { key, replicas: Some(3), .. }] if key == "hot"),
            "{actions:?}"
        );
        // At the node count already: nothing more.
        let actions = policy.decide(&seen(
            view(3, &[("hot", 3)]),
            vec![load("n0", "hot", 5000, 0.3)],
            now,
        ));
        assert!(
            !actions
                .iter()
                .any(|a| matches!(a, Action::Replicate { .. })),
            "{actions:?}"
        );
    }

    #[test]
    fn an_evenly_used_key_is_not_hot() {
        let mut policy = Policy::new(quiet());
        let actions = policy.decide(&seen(
            view(3, &[]),
            vec![load("n0", "k0", 0, 0.3)],
            Instant::now(),
        ));
        assert!(actions.is_empty(), "{actions:?}");
    }

    #[test]
    fn a_cooled_key_goes_back_after_the_cool_periods() {
        let mut policy = Policy::new(quiet());
        let now = Instant::now();
        let cold = || seen(view(3, &[("hot", 3)]), vec![load("n0", "k0", 0, 0.3)], now);
        assert!(
            policy.decide(&cold()).is_empty(),
            "one cool period is not enough"
        );
        let actions = policy.decide(&cold());
        assert!(
            matches!(&actions[..], [Action::Replicate { key, replicas: None, .. }] if key == "hot"),
            "{actions:?}"
        );
    }

    #[test]
    fn storage_nodes_follow_bytes_and_occupancy_with_a_grace_period() {
        let mut policy = Policy::new(PolicyConfig {
            node_capacity_bytes: 10_000,
            ..PolicyConfig::default()
        });
        let now = Instant::now();
        // 3 × 10 kB on 3 nodes of 10 kB at a 60% fill: 5 nodes needed.
        let loads = (0..3)
            .map(|i| load(&format!("n{i}"), "k0", 0, 0.3))
            .collect();
        let actions = policy.decide(&seen(view(3, &[]), loads, now));
        assert!(
            matches!(&actions[..], [Action::AddNodes { count: 2, .. }]),
            "{actions:?}"
        );
        // The data fits now; the busiest node is busy.
        let loads: Vec<LoadReport> = (0..5)
            .map(|i| LoadReport {
                bytes: 1_000,
                ..load(&format!("n{i}"), "k0", 0, 0.9)
            })
            .collect();
        assert!(
            policy
                .decide(&seen(
                    view(5, &[]),
                    loads.clone(),
                    now + Duration::from_secs(10)
                ))
                .is_empty(),
            "within the grace period"
        );
        let actions = policy.decide(&seen(view(5, &[]), loads, now + Duration::from_secs(200)));
        assert!(
            matches!(&actions[..], [Action::AddNodes { count: 1, .. }]),
            "{actions:?}"
        );
    }

    #[test]
    fn an_idle_node_is_removed_after_the_low_periods() {
        let mut policy = Policy::new(PolicyConfig {
            low_periods: 2,
            ..PolicyConfig::default()
        });
        let start = Instant::now();
        let idle = |at| {
            seen(
                view(3, &[]),
                vec![
                    load("n0", "k0", 0, 0.01),
                    load("n1", "k0", 0, 0.0),
                    load("n2", "k0", 0, 0.02),
                ],
                at,
            )
        };
        assert!(policy.decide(&idle(start)).is_empty());
        let actions = policy.decide(&idle(start + Duration::from_secs(30)));
        assert!(
            matches!(&actions[..], [Action::RemoveNode { id, .. }] if id == "n1"),
            "{actions:?}"
        );
    }

    fn executors(loads: &[(u32, u32)]) -> Option<Vec<ExecutorLoad>> {
        Some(
            loads
                .iter()
                .enumerate()
                .map(|(i, (running, capacity))| ExecutorLoad {
                    id: format!("e{i}"),
                    running: *running,
                    waiting: 0,
                    capacity: *capacity,
                    draining: false,
                })
                .collect(),
        )
    }

    #[test]
    fn executors_grow_under_load_and_shrink_when_idle() {
        let mut policy = Policy::new(PolicyConfig {
            executor_grace_ms: 0,
            low_periods: 2,
            ..quiet()
        });
        let now = Instant::now();
        let mut observe = |loads: &[(u32, u32)]| {
            let mut seen = seen(view(1, &[]), Vec::new(), now);
            seen.executors = executors(loads);
            policy.decide(&seen)
        };
        let actions = observe(&[(4, 4), (3, 4)]);
        assert!(
            matches!(&actions[..], [Action::AddExecutors { count: 2, .. }]),
            "{actions:?}"
        );
        assert!(
            observe(&[(0, 4), (1, 4), (0, 4), (0, 4)]).is_empty(),
            "first quiet period"
        );
        let actions = observe(&[(0, 4), (1, 4), (0, 4), (0, 4)]);
        assert!(
            matches!(&actions[..], [Action::RemoveExecutor { id, .. }] if id == "e0"),
            "{actions:?}"
        );
        assert!(observe(&[(0, 4)]).is_empty(), "never below the minimum");
        let actions = observe(&[]);
        assert!(
            matches!(&actions[..], [Action::AddExecutors { count: 1, .. }]),
            "{actions:?}"
        );
    }
}
