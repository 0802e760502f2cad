//! Inference with models registered in Squall, through the standard `wasi:nn` interface.
//!
//! The host runs the model natively (it is loaded once per executor and shared by every
//! call), so a function pays native speed for the heavy part:
//!
//! ```ignore
//! let model = squall_sdk::nn::Model::load("squeezenet")?;
//! let probabilities = model.infer_f32(&[1, 3, 224, 224], &pixels)?;
//! ```
//!
//! The raw interface is in [`crate::bindings::wasi::nn`] for what these helpers do not cover
//! (several inputs or outputs, other element types).

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};

pub use tensor::{Tensor, TensorType};

/// A model registered with Squall, loaded by the host.
pub struct Model {
    name: String,
    context: inference::GraphExecutionContext,
    // Kept alive while the context is in use.
    _graph: graph::Graph,
}

impl Model {
    /// Loads the newest version of the model registered as `name`.
    pub fn load(name: &str) -> Result<Model, String> {
        let graph = graph::load_by_name(name).map_err(|e| describe(&e, name))?;
        let context = graph
            .init_execution_context()
            .map_err(|e| describe(&e, name))?;
        Ok(Model {
            name: name.to_string(),
            context,
            _graph: graph,
        })
    }

    /// Runs the model on named input tensors and returns its named outputs.
    pub fn infer(&self, inputs: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>, String> {
        self.context
            .compute(inputs)
            .map_err(|e| describe(&e, &self.name))
    }

    /// Runs a model of one `f32` input on `data` (of the dimensions `dimensions`, row-major)
    /// and returns its first output's values.
    pub fn infer_f32(&self, dimensions: &[u32], data: &[f32]) -> Result<Vec<f32>, String> {
        let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        let input = Tensor::new(dimensions, TensorType::Fp32, &bytes);
        let outputs = self.infer(vec![(String::new(), input)])?;
        let (_, output) = outputs
            .into_iter()
            .next()
            .ok_or_else(|| format!("model {} produced no output", self.name))?;
        f32s(&output)
    }
}

/// The values of an `f32` tensor.
pub fn f32s(tensor: &Tensor) -> Result<Vec<f32>, String> {
    if tensor.ty() != TensorType::Fp32 {
        return Err(format!("expected an FP32 tensor, got {:?}", tensor.ty()));
    }
    Ok(floats(&tensor.data()))
}

/// Little-endian `f32`s from bytes (trailing bytes that make no whole value are ignored).
pub fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Little-endian bytes of `f32`s.
pub fn bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn describe(error: &errors::Error, model: &str) -> String {
    format!("model {model}: {:?}: {}", error.code(), error.data())
}
