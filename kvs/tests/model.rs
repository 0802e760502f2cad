//! Model test: random sequences of reads, writes and restarts against a real node (over
//! loopback, with a data directory) and against a reference map that merges with the lattice
//! library directly. Every read must match the model, every type mismatch must be reported
//! exactly where the model has one, and a restart (with the shard count changing) must bring
//! back exactly the model's state.

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use squall_kvs::{Client, ClientConfig, Config, Error, FsyncPolicy, KeyError, Node};
use squall_lattices::testing::lattice_value;
use squall_lattices::LatticeValue;

#[derive(Debug, Clone)]
enum Op {
    Put(usize, LatticeValue),
    PutMany(Vec<(usize, LatticeValue)>),
    Get(usize),
    GetAll,
    Restart { shards: usize },
}

const KEYS: usize = 6;

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..KEYS, lattice_value()).prop_map(|(k, v)| Op::Put(k, v)),
        2 => proptest::collection::vec((0..KEYS, lattice_value()), 1..4).prop_map(Op::PutMany),
        3 => (0..KEYS).prop_map(Op::Get),
        1 => Just(Op::GetAll),
        1 => (1usize..4).prop_map(|shards| Op::Restart { shards }),
    ]
}

fn key(k: usize) -> String {
    format!("key-{k}")
}

struct Harness {
    dir: tempfile::TempDir,
    node: Option<Node>,
    client: Option<Client>,
}

impl Harness {
    fn start(&mut self, shards: usize) {
        self.client = None;
        self.node = None;
        let node = Node::start(Config {
            shards,
            data_dir: Some(self.dir.path().to_path_buf()),
            fsync: FsyncPolicy::Never,
            // Tiny, so snapshots and log rotation happen all the time.
            compact_after_bytes: 512,
            ..Config::default()
        })
        .expect("start node");
        let client = Client::connect(
            node.address(),
            ClientConfig {
                timeout: Duration::from_secs(10),
                ..ClientConfig::default()
            },
        )
        .expect("connect");
        self.node = Some(node);
        self.client = Some(client);
    }

    fn client(&mut self) -> &mut Client {
        self.client.as_mut().expect("running")
    }
}

/// Applies one write to the model; returns whether the node must accept it.
fn model_put(model: &mut HashMap<usize, LatticeValue>, k: usize, value: LatticeValue) -> bool {
    match model.get_mut(&k) {
        Some(stored) => stored.try_merge(value).is_ok(),
        None => {
            model.insert(k, value);
            true
        }
    }
}

fn check_all(
    harness: &mut Harness,
    model: &HashMap<usize, LatticeValue>,
) -> Result<(), TestCaseError> {
    let keys: Vec<String> = (0..KEYS).map(key).collect();
    let values = harness.client().get_many(&keys).expect("get all");
    for (k, value) in values.into_iter().enumerate() {
        prop_assert_eq!(value.as_ref(), model.get(&k), "key {}", k);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn node_matches_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut harness = Harness { dir: tempfile::tempdir().expect("tempdir"), node: None, client: None };
        harness.start(2);
        let mut model: HashMap<usize, LatticeValue> = HashMap::new();
        for op in ops {
            match op {
                Op::Put(k, value) => {
                    let accepted = model_put(&mut model, k, value.clone());
                    match harness.client().put(&key(k), value) {
                        Ok(()) => prop_assert!(accepted, "node accepted a mismatched write"),
                        Err(Error::Key { error: KeyError::TypeMismatch(_), .. }) => {
                            prop_assert!(!accepted, "node refused a valid write")
                        }
                        Err(e) => return Err(TestCaseError::fail(format!("put failed: {e}"))),
                    }
                }
                Op::PutMany(entries) => {
                    // The node applies a batch in order, per shard; keys are independent, so
                    // the model applies it in order too.
                    let expected: Vec<bool> = entries
                        .iter()
                        .map(|(k, v)| model_put(&mut model, *k, v.clone()))
                        .collect();
                    let results = harness
                        .client()
                        .put_many(entries.into_iter().map(|(k, v)| (key(k), v)).collect())
                        .expect("put many");
                    let accepted: Vec<bool> = results.iter().map(Result::is_ok).collect();
                    prop_assert_eq!(accepted, expected);
                }
                Op::Get(k) => {
                    let value = harness.client().get(&key(k)).expect("get");
                    prop_assert_eq!(value.as_ref(), model.get(&k));
                }
                Op::GetAll => check_all(&mut harness, &model)?,
                Op::Restart { shards } => {
                    harness.start(shards);
                    check_all(&mut harness, &model)?;
                }
            }
        }
        check_all(&mut harness, &model)?;
    }
}
