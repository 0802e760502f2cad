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
        Ok(floats(&self.infer_f32_bytes(dimensions, &bytes_of(data))?))
    }

    /// [`Model::infer_f32`] on the tensor's little-endian bytes as they are (a step's input,
    /// say), returning the first output's bytes: no conversion on either side.
    pub fn infer_f32_bytes(&self, dimensions: &[u32], data: &[u8]) -> Result<Vec<u8>, String> {
        let input = Tensor::new(dimensions, TensorType::Fp32, data);
        let outputs = self.infer(vec![(String::new(), input)])?;
        let (_, output) = outputs
            .into_iter()
            .next()
            .ok_or_else(|| format!("model {} produced no output", self.name))?;
        if output.ty() != TensorType::Fp32 {
            return Err(format!("expected an FP32 tensor, got {:?}", output.ty()));
        }
        Ok(output.data())
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
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for value in values {
        bytes.extend_from_slice(&value.to_le_bytes());
    }
    bytes
}

fn describe(error: &errors::Error, model: &str) -> String {
    format!("model {model}: {:?}: {}", error.code(), error.data())
}
