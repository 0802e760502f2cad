//! SqueezeNet inference: the input is the preprocessed image (`preprocess`'s output: 1x3x224x224
//! little-endian `f32`, NCHW), the output the 1000 class probabilities (little-endian `f32`).
//!
//! The model is the one registered as `squeezenet` (`squall model register squeezenet
//! squeezenet1.1-fp32.onnx`); the host runs it natively through `wasi:nn`.

use squall_sdk::nn::Model;

/// The registered model this function runs.
const MODEL: &str = "squeezenet";
/// The model's input: one RGB image of 224x224, channels first.
const DIMENSIONS: [u32; 4] = [1, 3, 224, 224];

fn handle(input: &[u8]) -> Result<Vec<u8>, String> {
    let expected = DIMENSIONS.iter().product::<u32>() as usize * 4;
    if input.len() != expected {
        return Err(format!(
            "the input must be a 1x3x224x224 f32 tensor ({expected} bytes), not {} bytes",
            input.len()
        ));
    }
    // The step's input is already the tensor's bytes, and the output the probabilities'.
    Model::load(MODEL)?.infer_f32_bytes(&DIMENSIONS, input)
}

squall_sdk::handler!(handle);
