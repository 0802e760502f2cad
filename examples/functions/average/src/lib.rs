//! Averages the outputs of its predecessors in a DAG, element by element: each is a vector of
//! little-endian `f32` of the same length (the class probabilities of model replicas).

use squall_sdk::nn::{bytes_of, floats};

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let parts = squall_sdk::inputs(input)?;
    let Some(first) = parts.first() else {
        return Err("nothing to average".into());
    };
    let mut sum = vec![0f64; first.len() / 4];
    for part in &parts {
        if part.len() != first.len() || !part.len().is_multiple_of(4) {
            return Err(format!(
                "the inputs must be f32 vectors of one length; got {} and {} bytes",
                first.len(),
                part.len()
            ));
        }
        for (total, value) in sum.iter_mut().zip(floats(part)) {
            *total += f64::from(value);
        }
    }
    let n = parts.len() as f64;
    let mean: Vec<f32> = sum.iter().map(|total| (total / n) as f32).collect();
    Ok(bytes_of(&mean))
}

squall_sdk::handler!(handle);
