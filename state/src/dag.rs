//! DAGs of functions: their definition, the checks made when one is registered, and their
//! registry in the store (so any scheduler can run any DAG).
//!
//! A DAG names its functions (each once) and its edges. It is accepted only if every function
//! is registered, every edge joins two of its functions, there is no cycle, and exactly one
//! function has no successor (the sink, whose output is the call's). Functions without a
//! predecessor are sources: each takes the call's input. A function with several predecessors
//! takes their outputs as one list, in the order its edges are listed.
//!
//! Keys ([`squall_proto::keys`]): [`names_key`] (the set of names ever registered) and
//! [`dag_key`] (an LWW register holding the newest [`DagRecord`]; deleting writes a tombstone
//! record, which a later registration supersedes).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use squall_lattices::{LatticeValue, Lww, SetLattice, Timestamp};
use squall_proto::call::{PlanStep, StepIndex, MAX_STEPS};
use squall_proto::keys;

use crate::cache::Cache;
use crate::pool::ClientPool;
use crate::registry::{validate_name, Registry};
use crate::{Error, Result};

/// The key of the set of DAG names of `namespace`.
pub fn names_key(namespace: &str) -> String {
    keys::names(namespace, keys::Kind::Dag)
}

/// The key of a DAG's record; `name` is qualified ([`keys::qualify`]).
pub fn dag_key(name: &str) -> String {
    let (namespace, name) = keys::split(name);
    keys::record(namespace, keys::Kind::Dag, name)
}

/// A DAG as its author writes it: `{"functions":["g","f"],"edges":[["g","f"]]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DagSpec {
    /// Its functions, each once.
    pub functions: Vec<String>,
    /// Its edges, `[from, to]`; the order of the edges into a function is the order of its
    /// inputs.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Vec<String>>))]
    pub edges: Vec<(String, String)>,
}

/// A registered DAG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DagRecord {
    /// Its name.
    pub name: String,
    /// 1 for the first registration under this name, then one more each time.
    pub version: u64,
    /// Its definition.
    pub spec: DagSpec,
    /// When it was registered (milliseconds since the Unix epoch).
    pub registered_ms: u64,
    /// A tombstone: the DAG was deleted.
    pub deleted: bool,
}

/// A checked DAG, laid out as plan steps in topological order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// The steps, sources first, the sink last (executors are filled in by placement).
    pub steps: Vec<PlanStep>,
}

impl Shape {
    /// Checks `spec`'s structure (not whether its functions exist) and lays it out.
    pub fn of(spec: &DagSpec) -> Result<Self> {
        let invalid = |reason: String| Err(Error::InvalidDag(reason));
        if spec.functions.is_empty() {
            return invalid("a DAG needs at least one function".into());
        }
        if spec.functions.len() > MAX_STEPS {
            return invalid(format!("a DAG has at most {MAX_STEPS} functions"));
        }
        // Plain names: a DAG names functions of its own namespace only.
        for name in &spec.functions {
            keys::validate_name(name).map_err(|e| Error::InvalidDag(e.to_string()))?;
        }
        let index_of = |name: &str| spec.functions.iter().position(|f| f == name);
        for (i, name) in spec.functions.iter().enumerate() {
            if index_of(name) != Some(i) {
                return invalid(format!("function {name:?} is listed twice"));
            }
        }
        let n = spec.functions.len();
        let mut inputs: Vec<Vec<usize>> = vec![Vec::new(); n];
        let mut outputs: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (from, to) in &spec.edges {
            let (Some(a), Some(b)) = (index_of(from), index_of(to)) else {
                return invalid(format!(
                    "edge [{from:?}, {to:?}] names a function not in the DAG's list"
                ));
            };
            if a == b {
                return invalid(format!("edge [{from:?}, {to:?}] is a cycle"));
            }
            if outputs[a].contains(&b) {
                return invalid(format!("edge [{from:?}, {to:?}] is listed twice"));
            }
            outputs[a].push(b);
            inputs[b].push(a);
        }
        // Kahn's algorithm: a topological order, or the proof of a cycle.
        let mut remaining: Vec<usize> = inputs.iter().map(Vec::len).collect();
        let mut order: Vec<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
        let mut next = 0;
        while next < order.len() {
            let at = order[next];
            next += 1;
            for &b in &outputs[at] {
                remaining[b] -= 1;
                if remaining[b] == 0 {
                    order.push(b);
                }
            }
        }
        if order.len() < n {
            let stuck: Vec<&str> = (0..n)
                .filter(|&i| remaining[i] > 0)
                .map(|i| spec.functions[i].as_str())
                .collect();
            return invalid(format!("the edges form a cycle through {stuck:?}"));
        }
        let sinks: Vec<&str> = (0..n)
            .filter(|&i| outputs[i].is_empty())
            .map(|i| spec.functions[i].as_str())
            .collect();
        if sinks.len() != 1 {
            return invalid(format!(
                "a DAG needs exactly one function without successors (its output); found {sinks:?}"
            ));
        }
        // Renumber by topological position: the sink (the only node without outputs, so the
        // last one Kahn's algorithm can emit) ends up last.
        let mut position = vec![0usize; n];
        for (p, &i) in order.iter().enumerate() {
            position[i] = p;
        }
        let steps = order
            .iter()
            .map(|&i| PlanStep {
                function: spec.functions[i].clone(),
                executor: String::new(),
                inputs: inputs[i]
                    .iter()
                    .map(|&a| position[a] as StepIndex)
                    .collect(),
                outputs: outputs[i]
                    .iter()
                    .map(|&b| position[b] as StepIndex)
                    .collect(),
            })
            .collect();
        Ok(Self { steps })
    }

    /// The same shape with its functions named as the fabric knows those of `namespace`
    /// ([`keys::qualify`]).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        for step in &mut self.steps {
            step.function = keys::qualify(namespace, &step.function);
        }
        self
    }

    /// A single function as a one-step shape.
    pub fn single(function: &str) -> Self {
        Self {
            steps: vec![PlanStep {
                function: function.to_string(),
                executor: String::new(),
                inputs: Vec::new(),
                outputs: Vec::new(),
            }],
        }
    }
}

fn namespace_of(name: &str) -> &str {
    keys::split(name).0
}

/// Reads and writes DAGs. Cheap to clone; thread-safe.
#[derive(Debug, Clone)]
pub struct DagRegistry {
    kvs: ClientPool,
    cache: Option<Cache>,
    functions: Registry,
}

impl DagRegistry {
    /// A registry over the store behind `kvs`. With a `cache`, reads are served by it (kept
    /// fresh by the store's pushes): the scheduler's way, one read per call.
    pub fn new(kvs: ClientPool, cache: Option<Cache>) -> Self {
        Self {
            functions: Registry::direct(kvs.clone()),
            kvs,
            cache,
        }
    }

    /// Checks `spec` (its shape, and that every function is registered in the DAG's
    /// namespace) and stores it as the newest version of `name` (qualified).
    pub async fn store(&self, name: &str, spec: DagSpec) -> Result<DagRecord> {
        validate_name(name).map_err(|e| Error::InvalidDag(e.to_string()))?;
        Shape::of(&spec)?;
        let namespace = keys::split(name).0;
        let mut missing = Vec::new();
        for function in &spec.functions {
            let qualified = keys::qualify(namespace, function);
            if self.functions.newest(&qualified).await?.is_none() {
                missing.push(function.clone());
            }
        }
        if !missing.is_empty() {
            return Err(Error::InvalidDag(format!(
                "functions not registered: {missing:?}"
            )));
        }
        let previous = self.read(name, false).await?;
        let record = DagRecord {
            name: keys::split(name).1.to_string(),
            version: previous.map_or(1, |r| r.version + 1),
            spec,
            registered_ms: Timestamp::now(0).time / 1000,
            deleted: false,
        };
        self.write(namespace, &record).await?;
        tracing::info!(dag = name, version = record.version, "DAG registered");
        Ok(record)
    }

    /// The DAG `name`, unless it was never registered or is deleted.
    pub async fn get(&self, name: &str) -> Result<Option<DagRecord>> {
        validate_name(name).map_err(|e| Error::InvalidDag(e.to_string()))?;
        Ok(self.read(name, true).await?.filter(|r| !r.deleted))
    }

    /// Every DAG of `namespace` that is not deleted, by name.
    pub async fn list(&self, namespace: &str) -> Result<Vec<DagRecord>> {
        let names_key = names_key(namespace);
        let names = self.kvs.with(move |c| c.get(&names_key)).await?;
        let mut names: Vec<String> = match names {
            Some(LatticeValue::Set(set)) => set
                .0
                .iter()
                .filter_map(|n| std::str::from_utf8(n).ok().map(str::to_string))
                .collect(),
            _ => Vec::new(),
        };
        names.sort();
        let keys: Vec<String> = names
            .iter()
            .map(|n| keys::record(namespace, keys::Kind::Dag, n))
            .collect();
        let values = self.kvs.with(move |c| c.get_many(&keys)).await?;
        let mut records = Vec::new();
        for (name, value) in names.iter().zip(values) {
            if let Some(record) = decode(name, value)? {
                if !record.deleted {
                    records.push(record);
                }
            }
        }
        Ok(records)
    }

    /// Deletes `name`; `false` if it was not registered (or already deleted).
    pub async fn delete(&self, name: &str) -> Result<bool> {
        validate_name(name).map_err(|e| Error::InvalidDag(e.to_string()))?;
        let Some(mut record) = self.read(name, false).await?.filter(|r| !r.deleted) else {
            return Ok(false);
        };
        record.version += 1;
        record.deleted = true;
        record.registered_ms = Timestamp::now(0).time / 1000;
        self.write(namespace_of(name), &record).await?;
        tracing::info!(dag = name, "DAG deleted");
        Ok(true)
    }

    /// Makes the next cached read of `key` go to the store (see [`Cache::refresh`]).
    pub fn refresh(&self, key: &str) {
        if let Some(cache) = &self.cache {
            cache.refresh(key);
        }
    }

    async fn read(&self, name: &str, cached: bool) -> Result<Option<DagRecord>> {
        let key = dag_key(name);
        let value = match (&self.cache, cached) {
            (Some(cache), true) => cache.get(&key).await?,
            _ => self.kvs.with(move |c| c.get(&key)).await?,
        };
        decode(name, value)
    }

    async fn write(&self, namespace: &str, record: &DagRecord) -> Result<()> {
        let encoded = rmp_serde::to_vec(record).map_err(|e| Error::Internal(e.to_string()))?;
        let key = keys::record(namespace, keys::Kind::Dag, &record.name);
        let name = Bytes::from(record.name.clone());
        let names_key = names_key(namespace);
        self.kvs
            .with(move |client| {
                let value =
                    LatticeValue::Lww(Lww::new(Timestamp::now(client.writer()), encoded.into()));
                client.put(&key, value)?;
                client.put(&names_key, LatticeValue::Set(SetLattice::from_iter([name])))
            })
            .await?;
        Ok(())
    }
}

fn decode(name: &str, value: Option<LatticeValue>) -> Result<Option<DagRecord>> {
    match value {
        None => Ok(None),
        Some(LatticeValue::Lww(register)) => rmp_serde::from_slice(&register.value)
            .map(Some)
            .map_err(|e| Error::Internal(format!("undecodable record of DAG {name:?}: {e}"))),
        Some(other) => Err(Error::Internal(format!(
            "record of DAG {name:?} is a {} value",
            other.lattice_type().name()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(functions: &[&str], edges: &[(&str, &str)]) -> DagSpec {
        DagSpec {
            functions: functions.iter().map(|f| f.to_string()).collect(),
            edges: edges
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        }
    }

    fn error(spec: &DagSpec) -> String {
        match Shape::of(spec) {
            Err(Error::InvalidDag(reason)) => reason,
            other => panic!("expected an invalid DAG, got {other:?}"),
        }
    }

    #[test]
    fn a_chain_is_laid_out_in_order() {
        let shape = Shape::of(&spec(&["square", "incr"], &[("incr", "square")])).expect("valid");
        let names: Vec<&str> = shape.steps.iter().map(|s| s.function.as_str()).collect();
        assert_eq!(names, ["incr", "square"]);
        assert_eq!(shape.steps[0].outputs, [1]);
        assert_eq!(shape.steps[1].inputs, [0]);
        assert!(shape.steps[1].outputs.is_empty());
    }

    #[test]
    fn fan_in_keeps_the_edge_order() {
        let shape = Shape::of(&spec(
            &["sum", "a", "b", "src"],
            &[("src", "b"), ("src", "a"), ("b", "sum"), ("a", "sum")],
        ))
        .expect("valid");
        let index = |name: &str| {
            shape
                .steps
                .iter()
                .position(|s| s.function == name)
                .expect("present") as StepIndex
        };
        let sum = &shape.steps[index("sum") as usize];
        assert_eq!(sum.inputs, [index("b"), index("a")]);
        assert_eq!(index("sum") as usize, shape.steps.len() - 1);
        assert_eq!(index("src"), 0);
    }

    #[test]
    fn malformed_dags_are_refused_with_reasons() {
        assert!(error(&spec(&[], &[])).contains("at least one"));
        assert!(error(&spec(&["a", "a"], &[])).contains("twice"));
        assert!(error(&spec(&["a", "b"], &[("a", "c")])).contains("not in the DAG"));
        assert!(error(&spec(&["a"], &[("a", "a")])).contains("cycle"));
        assert!(error(&spec(
            &["a", "b", "c"],
            &[("a", "b"), ("b", "a"), ("b", "c")]
        ))
        .contains("cycle"));
        assert!(error(&spec(&["a", "b", "c"], &[("a", "b"), ("a", "c")])).contains("exactly one"));
        assert!(error(&spec(&["a", "b"], &[("a", "b"), ("a", "b")])).contains("twice"));
        assert!(error(&spec(&["bad name"], &[])).contains("invalid name"));
    }

    /// Names that are valid, invalid, repeated or hostile.
    fn name() -> impl proptest::strategy::Strategy<Value = String> + Clone {
        use proptest::prelude::*;
        prop_oneof![
            4 => "[abcd]",
            1 => Just(String::new()),
            1 => Just("../x".to_string()),
            1 => Just("squall/fn".to_string()),
            1 => "\\PC{0,12}",
            1 => Just("n".repeat(300)),
        ]
    }

    /// Bodies a client may send as a DAG: structured ones, valid JSON with a few bytes
    /// changed, and arbitrary bytes.
    fn dag_body() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
        use proptest::collection::vec;
        use proptest::prelude::*;
        let structured =
            (vec(name(), 0..6), vec((name(), name()), 0..8)).prop_map(|(functions, edges)| {
                serde_json::to_vec(&serde_json::json!({"functions": functions, "edges": edges}))
                    .expect("JSON")
            });
        prop_oneof![
            3 => structured.clone(),
            2 => (structured, squall_lattices::testing::edits(3))
                .prop_map(|(body, edits)| squall_lattices::testing::mutated(&body, &edits)),
            1 => vec(any::<u8>(), 0..128),
        ]
    }

    proptest::proptest! {
        /// Whatever the body, an error or a shape, never a panic; a shape runs each function
        /// once, every step after the steps it takes from, and ends in one sink.
        #[test]
        fn any_dag_body_is_an_error_or_a_sound_shape(body in dag_body()) {
            let Ok(spec) = serde_json::from_slice::<DagSpec>(&body) else {
                return Ok(());
            };
            if let Ok(shape) = Shape::of(&spec) {
                proptest::prop_assert_eq!(shape.steps.len(), spec.functions.len());
                for (i, step) in shape.steps.iter().enumerate() {
                    proptest::prop_assert!(step.inputs.iter().all(|&from| usize::from(from) < i));
                }
                let sinks = shape.steps.iter().filter(|s| s.outputs.is_empty()).count();
                proptest::prop_assert_eq!(sinks, 1);
            }
        }
    }
}
