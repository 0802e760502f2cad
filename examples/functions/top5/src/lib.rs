//! The five most probable classes of a probability vector over the 1000 ImageNet classes
//! (little-endian `f32`, `squeezenet`'s output), with their labels, as JSON:
//! `{"top5":[{"index":285,"label":"Egyptian cat","probability":0.397},...]}`.

use squall_sdk::nn::floats;

/// One label per line, line N for class N (`examples/squeezenet/imagenet_labels.txt`).
const LABELS: &str = include_str!("../../../squeezenet/imagenet_labels.txt");

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let labels: Vec<&str> = LABELS.lines().collect();
    let probabilities = floats(input);
    if probabilities.len() != labels.len() || !input.len().is_multiple_of(4) {
        return Err(format!(
            "the input must be {} little-endian f32 probabilities, not {} bytes",
            labels.len(),
            input.len()
        ));
    }
    let mut ranked: Vec<(usize, f32)> = probabilities.into_iter().enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let top5: Vec<serde_json::Value> = ranked
        .iter()
        .take(5)
        .map(|&(index, probability)| {
            serde_json::json!({
                "index": index,
                "label": labels[index],
                "probability": probability,
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({ "top5": top5 })).map_err(|e| e.to_string())
}

squall_sdk::handler!(handle);
