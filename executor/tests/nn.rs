//! Inference through `wasi:nn` against the reference: the `squeezenet` guest runs the real
//! SqueezeNet 1.1 (`testing::squeezenet_dir`) on the two sample tensors, and its output must match
//! onnxruntime's to 1e-4 per class. Also: the model is loaded once per executor, and a missing
//! or malformed model is a clear error. The `preprocess` guest turns each sample photo into
//! (nearly) the reference tensor.

use squall_executor::testing::{f32s, guest, npy_f32, squeezenet_dir};
use squall_executor::{CallOptions, Config, Error, Executor};
use squall_kvs::Node;

const SAMPLES: [&str; 2] = ["chelsea", "coffee"];

fn start() -> (Node, Executor) {
    let node = Node::start(squall_kvs::Config {
        shards: 2,
        ..squall_kvs::Config::default()
    })
    .expect("node");
    let executor = Executor::start(Config::default(), node.address()).expect("executor");
    (node, executor)
}

fn model_file() -> Vec<u8> {
    let path = squeezenet_dir().join("squeezenet1.1-fp32.onnx");
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squeezenet_matches_onnxruntime_and_loads_once() {
    let (_node, executor) = start();
    executor
        .register("squeezenet", guest("squeezenet"), None)
        .await
        .expect("register the function");

    // Before the model is registered, the guest's load-by-name fails, and says why.
    let input = npy_f32(&squeezenet_dir().join("chelsea_input_1x3x224x224_f32.npy"));
    let missing = executor
        .call("squeezenet", &input, CallOptions::default())
        .await
        .expect_err("no model yet");
    assert!(
        missing.to_string().contains("NotFound"),
        "unexpected error: {missing}"
    );

    let record = executor
        .register_model("squeezenet", model_file())
        .await
        .expect("register the model");
    assert_eq!(record.version, 1);
    assert_eq!(executor.models().loads(), 1);

    for sample in SAMPLES {
        let dir = squeezenet_dir();
        let input = npy_f32(&dir.join(format!("{sample}_input_1x3x224x224_f32.npy")));
        let reference = f32s(&npy_f32(&dir.join(format!("{sample}_output_ort_f32.npy"))));
        assert_eq!(reference.len(), 1000);
        for _ in 0..3 {
            let output = executor
                .call("squeezenet", &input, CallOptions::default())
                .await
                .unwrap_or_else(|e| panic!("{sample}: {e}"));
            let output = f32s(&output);
            assert_eq!(output.len(), 1000, "{sample}");
            let worst = output
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4,
                "{sample}: differs from onnxruntime by {worst}"
            );
        }
    }
    // Six calls, one load: the model stayed resident, and the function's component was
    // compiled once.
    assert_eq!(executor.models().loads(), 1);
    assert_eq!(executor.models().resident_names(), ["squeezenet"]);
    assert_eq!(executor.stats().compilations, 1);

    // A wrong-sized input is the function's error, not a trap.
    let short = executor
        .call("squeezenet", &input[..100], CallOptions::default())
        .await
        .expect_err("too short");
    assert!(matches!(short, Error::Failed { .. }), "{short}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_is_not_a_model_is_refused() {
    let (_node, executor) = start();
    let refused = executor
        .register_model("junk", b"this is not ONNX".to_vec())
        .await
        .expect_err("refused");
    assert!(matches!(refused, Error::InvalidModel { .. }), "{refused}");
    assert!(executor
        .models()
        .registry()
        .list(squall_proto::keys::DEFAULT_NAMESPACE)
        .await
        .expect("list")
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preprocess_reproduces_the_reference_tensors() {
    let (_node, executor) = start();
    executor
        .register("preprocess", guest("preprocess"), None)
        .await
        .expect("register the function");
    for sample in SAMPLES {
        let dir = squeezenet_dir();
        let photo = std::fs::read(dir.join(format!("{sample}.png"))).expect("the photo");
        let reference = f32s(&npy_f32(
            &dir.join(format!("{sample}_input_1x3x224x224_f32.npy")),
        ));
        let output = executor
            .call("preprocess", &photo, CallOptions::default())
            .await
            .expect("preprocess");
        let tensor = f32s(&output);
        assert_eq!(tensor.len(), 3 * 224 * 224, "{sample}: NCHW 1x3x224x224");
        // PIL's resize is not reproduced bit for bit: pixels may differ by one level, and
        // rarely more; a shifted crop or swapped channels would differ by tens.
        let differences: Vec<f32> = tensor
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .collect();
        let mean = differences.iter().sum::<f32>() / differences.len() as f32;
        let max = differences.iter().copied().fold(0.0, f32::max);
        assert!(
            mean < 0.5 && max <= 2.0,
            "{sample}: mean difference {mean}, largest {max}"
        );
    }
}
