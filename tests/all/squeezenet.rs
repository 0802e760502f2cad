//! The SqueezeNet showcase end to end, as the README runs it: `squall up`, the model and the
//! pipeline's functions registered over HTTP, and the two sample photos classified by the
//! `classify` DAG (preprocess -> squeezenet -> top5) and by the ensemble DAG (three replicas
//! averaged). The top-1 class must be onnxruntime's and the top-5 set the reference's.

use std::collections::BTreeSet;

use serde_json::Value;
use squall_executor::testing::{guest, squeezenet_dir};

use crate::support::{http, up};

/// The reference top 5 (class indices, most probable first) of a sample photo.
fn reference_top5(sample: &str) -> Vec<u64> {
    let path = squeezenet_dir().join("reference_outputs.json");
    let text = std::fs::read_to_string(&path).expect("read reference_outputs.json");
    let reference: Value = serde_json::from_str(&text).expect("reference JSON");
    reference["results"][sample]["top5"]
        .as_array()
        .expect("a top5 list")
        .iter()
        .map(|entry| entry["index"].as_u64().expect("an index"))
        .collect()
}

fn put(base: &str, path: &str, body: &[u8]) {
    let answer = http("PUT", &format!("{base}{path}"), None, body);
    assert!(
        answer.status == 201,
        "PUT {path}: {} {}",
        answer.status,
        answer.text()
    );
}

#[test]
fn photos_are_classified_as_onnxruntime_classifies_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = up(dir.path(), &[]);
    let base = up.field("http");
    let model = std::fs::read(squeezenet_dir().join("squeezenet1.1-fp32.onnx")).expect("model");
    put(&base, "/v1/models/squeezenet", &model);
    let listed = http("GET", &format!("{base}/v1/models"), None, b"").json();
    assert_eq!(listed[0]["name"], "squeezenet", "{listed}");
    // A file that is not a model is refused at registration.
    let junk = http("PUT", &format!("{base}/v1/models/junk"), None, b"not onnx");
    assert_eq!(
        (junk.status, junk.error_code().as_str()),
        (400, "bad_request"),
        "{}",
        junk.text()
    );

    for name in ["preprocess", "squeezenet", "top5", "average"] {
        put(&base, &format!("/v1/functions/{name}"), &guest(name));
    }
    // Three replicas of the model function for the ensemble: one component, three names.
    for replica in ["squeezenet-2", "squeezenet-3"] {
        put(
            &base,
            &format!("/v1/functions/{replica}"),
            &guest("squeezenet"),
        );
    }
    put(
        &base,
        "/v1/dags/classify",
        br#"{"functions":["preprocess","squeezenet","top5"],
             "edges":[["preprocess","squeezenet"],["squeezenet","top5"]]}"#,
    );
    put(
        &base,
        "/v1/dags/classify-ensemble",
        br#"{"functions":["preprocess","squeezenet","squeezenet-2","squeezenet-3","average","top5"],
             "edges":[["preprocess","squeezenet"],["preprocess","squeezenet-2"],
                      ["preprocess","squeezenet-3"],["squeezenet","average"],
                      ["squeezenet-2","average"],["squeezenet-3","average"],["average","top5"]]}"#,
    );

    for sample in ["chelsea", "coffee"] {
        let photo = std::fs::read(squeezenet_dir().join(format!("{sample}.png"))).expect("photo");
        let expected = reference_top5(sample);
        for dag in ["classify", "classify-ensemble"] {
            let answer = http(
                "POST",
                &format!("{base}/v1/dags/{dag}/invoke"),
                None,
                &photo,
            );
            assert_eq!(answer.status, 200, "{dag} {sample}: {}", answer.text());
            let top5: Vec<u64> = answer.json()["top5"]
                .as_array()
                .expect("a top5 list")
                .iter()
                .map(|entry| entry["index"].as_u64().expect("an index"))
                .collect();
            assert_eq!(top5[0], expected[0], "{dag} {sample}: {}", answer.text());
            assert_eq!(
                top5.iter().collect::<BTreeSet<_>>(),
                expected.iter().collect::<BTreeSet<_>>(),
                "{dag} {sample}: {}",
                answer.text()
            );
        }
    }

    // Not a photo: the preprocess step fails the call, named.
    let garbage = http(
        "POST",
        &format!("{base}/v1/dags/classify/invoke"),
        None,
        b"not an image",
    );
    assert_eq!(garbage.status, 500, "{}", garbage.text());
    assert_eq!(garbage.json()["error"]["step"], "preprocess");
}
