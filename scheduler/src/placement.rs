//! Placement: which executor runs a step.
//!
//! Among the executors that serve the function, in order of importance:
//! 1. one that is not busy: its load (the larger of the steps it last reported running and
//!    the steps this scheduler has placed on it and not seen finish) is below its capacity.
//!    If all are busy, the least loaded of them, whatever else holds (the call is not
//!    refused: executors queue);
//! 2. the most of the call's keys in its cache (data locality: the reads are local);
//! 3. the most predecessors of the step placed on it (outputs stay in one process);
//! 4. the function warm there (no instantiation);
//! 5. the least loaded.

use hashbrown::HashSet;
use squall_proto::call::ExecutorStatus;

/// An executor as placement sees it.
#[derive(Debug)]
pub struct Candidate<'a> {
    /// Its last report.
    pub status: &'a ExecutorStatus,
    /// The keys its cache holds (from the report, as a set).
    pub keys: &'a HashSet<String>,
    /// Steps this scheduler has dispatched to it and not seen finish.
    pub dispatched: u32,
}

impl Candidate<'_> {
    /// Steps it is running or about to run.
    pub fn load(&self) -> u32 {
        self.status.running.max(self.dispatched)
    }

    /// Whether it has no room for another step.
    pub fn busy(&self) -> bool {
        self.load() >= self.status.capacity.max(1)
    }

    /// Whether it runs `function`.
    pub fn serves(&self, function: &str) -> bool {
        self.status.serves.is_empty() || self.status.serves.iter().any(|f| f == function)
    }
}

/// The index of the candidate that should run `function`, or `None` if none serves it.
/// `near` are the executors (addresses) of the step's predecessors.
pub fn choose(
    candidates: &[Candidate<'_>],
    function: &str,
    keys: &[String],
    near: &[&str],
) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| c.serves(function))
        .max_by_key(|(_, c)| {
            let local = keys.iter().filter(|k| c.keys.contains(*k)).count();
            let colocated = near.iter().filter(|a| **a == c.status.addr).count();
            let warm = c.status.warm.iter().any(|f| f == function);
            let load_permille = u64::from(c.load()) * 1000 / u64::from(c.status.capacity.max(1));
            // Among busy executors, load decides first; among free ones, it decides last.
            let busy_load = if c.busy() { load_permille } else { 0 };
            (
                !c.busy(),
                std::cmp::Reverse(busy_load),
                local,
                colocated,
                warm,
                std::cmp::Reverse(load_permille),
            )
        })
        .map(|(i, _)| i)
}

/// The index of the least loaded candidate, for work any executor can do.
pub fn least_loaded(candidates: &[Candidate<'_>]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .min_by_key(|(_, c)| u64::from(c.load()) * 1000 / u64::from(c.status.capacity.max(1)))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(addr: &str, running: u32, warm: &[&str], serves: &[&str]) -> ExecutorStatus {
        ExecutorStatus {
            id: addr.into(),
            addr: addr.into(),
            capacity: 4,
            running,
            serves: serves.iter().map(|s| s.to_string()).collect(),
            warm: warm.iter().map(|s| s.to_string()).collect(),
            ..ExecutorStatus::default()
        }
    }

    #[test]
    fn locality_then_colocation_then_warmth_then_load() {
        let a = status("a", 1, &[], &[]);
        let b = status("b", 0, &["f"], &[]);
        let holds_k: HashSet<String> = ["k".to_string()].into_iter().collect();
        let none = HashSet::new();
        let candidates = [
            Candidate {
                status: &a,
                keys: &holds_k,
                dispatched: 0,
            },
            Candidate {
                status: &b,
                keys: &none,
                dispatched: 0,
            },
        ];
        // Without keys, the warm one wins; with a key held by `a`, `a` wins.
        assert_eq!(choose(&candidates, "f", &[], &[]), Some(1));
        assert_eq!(choose(&candidates, "f", &["k".into()], &[]), Some(0));
        // A predecessor on `a` outweighs warmth on `b`.
        assert_eq!(choose(&candidates, "f", &[], &["a"]), Some(0));
        // Neither warm: the less loaded.
        assert_eq!(choose(&candidates, "g", &[], &[]), Some(1));
    }

    #[test]
    fn busy_executors_are_avoided_and_serving_sets_respected() {
        let a = status("a", 4, &["f"], &[]);
        let b = status("b", 3, &[], &[]);
        let c = status("c", 0, &[], &["other"]);
        let none = HashSet::new();
        let candidates = [
            Candidate {
                status: &a,
                keys: &none,
                dispatched: 0,
            },
            Candidate {
                status: &b,
                keys: &none,
                dispatched: 0,
            },
            Candidate {
                status: &c,
                keys: &none,
                dispatched: 0,
            },
        ];
        assert_eq!(choose(&candidates, "f", &[], &["a"]), Some(1));
        assert_eq!(choose(&candidates, "other", &[], &[]), Some(2));
        assert_eq!(choose(&candidates[2..], "f", &[], &[]), None);
        // All busy: the least loaded takes it, even though the other is warm and holds its
        // predecessor.
        let cold = status("cold", 4, &[], &[]);
        let all_busy = [
            Candidate {
                status: &a,
                keys: &none,
                dispatched: 9,
            },
            Candidate {
                status: &cold,
                keys: &none,
                dispatched: 0,
            },
        ];
        assert_eq!(choose(&all_busy, "f", &[], &["a"]), Some(1));
    }
}
