//! Inference for functions: the host side of `wasi:nn` (`sdk/wit/deps/wasi-nn`), run natively
//! by tract.
//!
//! A guest loads a model registered with Squall by name (`graph.load-by-name`), opens an
//! execution context, and computes on tensors. The model is fetched from the store on its
//! first use on this executor, optimized once, and then shared by every call and every
//! instance here ([`Models`]): a call never reloads a resident model. When a new version is
//! registered (or the model is deleted), the store pushes the change to the executor's cache
//! and the next load picks it up.
//!
//! Inference runs on tokio's blocking pool, not on the async workers: a 16 ms SqueezeNet run
//! does not stall the other calls, the HTTP gateway or the fabric sharing those workers, and
//! two calls infer in parallel on two cores. The wait is bounded by the call's deadline.
//!
//! # Why not `wasmtime-wasi-nn`
//! Its backends can be plugged in (its `BackendInner` trait is public), but its host functions
//! are synchronous: `load-by-name` can only return a graph that is already in memory, so a model
//! registered in the store could not be fetched on its first use, and `compute` would run the
//! whole inference on the async worker thread that runs the guest. Its built-in backends also
//! need native libraries (OpenVINO, onnxruntime, libtorch) that no package registry provides.
//! So Squall implements the same WIT (vendored unchanged from wasmtime 48, so guests written
//! against `wasi:nn` run here as they are) with async host functions.
//!
//! # Why tract
//! `tract-onnx` is pure Rust (no native library to install), runs SqueezeNet in about 16 ms on
//! one core here, and matches onnxruntime to 3e-6.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hashbrown::HashMap;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceModelExt, IntoRunnable, TValue, Tensor as TractTensor,
    TypedRunnableModel,
};

use crate::{Error, Result};
use squall_state::registry::{record_key, FunctionRecord, Registry};
use squall_state::Cache;

/// The largest tensor a guest may hand the host or get back (bytes).
pub const MAX_TENSOR_BYTES: usize = 256 << 20;

/// An optimized model, ready to run.
pub struct Model {
    /// The name it was registered under.
    pub name: String,
    /// SHA-256 of the ONNX file it was loaded from.
    pub sha256: String,
    plan: Arc<TypedRunnableModel>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Parses and optimizes an ONNX model. CPU-bound (SqueezeNet: a few hundred ms): call it
    /// off the async workers.
    pub fn load(name: &str, sha256: &str, onnx: &[u8]) -> Result<Self> {
        let invalid = |e: tract_onnx::prelude::TractError| Error::InvalidModel {
            name: name.to_string(),
            reason: format!("{e:#}"),
        };
        let model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .map_err(invalid)?;
        let optimized = model.into_optimized().map_err(invalid)?;
        let inputs = optimized
            .input_outlets()
            .map_err(invalid)?
            .iter()
            .map(|o| optimized.node(o.node).name.clone())
            .collect();
        let outputs = optimized
            .output_outlets()
            .map_err(invalid)?
            .iter()
            .map(|o| {
                optimized
                    .outlet_label(*o)
                    .map_or_else(|| optimized.node(o.node).name.clone(), str::to_string)
            })
            .collect();
        let plan = optimized.into_runnable().map_err(invalid)?;
        Ok(Self {
            name: name.to_string(),
            sha256: sha256.to_string(),
            plan,
            inputs,
            outputs,
        })
    }

    /// The names of its inputs, in order.
    pub fn inputs(&self) -> &[String] {
        &self.inputs
    }

    /// The names of its outputs, in order.
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// Runs the model on `inputs` given by name (a model of one input also takes one tensor
    /// of any name) and returns every output by name. CPU-bound: call it off the async
    /// workers.
    pub fn run(
        &self,
        inputs: Vec<(String, Tensor)>,
    ) -> std::result::Result<Vec<(String, Tensor)>, NnError> {
        let mut ordered: Vec<Option<TValue>> = vec![None; self.inputs.len()];
        let single = self.inputs.len() == 1 && inputs.len() == 1;
        for (name, tensor) in inputs {
            let index = match self.inputs.iter().position(|i| *i == name) {
                Some(index) => index,
                None if single => 0,
                None => {
                    return Err(NnError::new(
                        ErrorCode::InvalidArgument,
                        format!(
                            "model {} has no input {name:?} (its inputs: {:?})",
                            self.name, self.inputs
                        ),
                    ))
                }
            };
            ordered[index] = Some(tensor.to_tract()?.into());
        }
        let mut values = Vec::with_capacity(ordered.len());
        for (value, name) in ordered.into_iter().zip(&self.inputs) {
            values.push(value.ok_or_else(|| {
                NnError::new(
                    ErrorCode::InvalidArgument,
                    format!("input {name:?} of model {} is missing", self.name),
                )
            })?);
        }
        let outputs = self.plan.run(values.into()).map_err(|e| {
            NnError::new(
                ErrorCode::RuntimeError,
                format!("running model {}: {e:#}", self.name),
            )
        })?;
        outputs
            .into_iter()
            .zip(&self.outputs)
            .map(|(value, name)| Ok((name.clone(), Tensor::from_tract(&value)?)))
            .collect()
    }
}

/// The element types of `wasi:nn` tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementType {
    /// 16-bit float.
    Fp16,
    /// 32-bit float.
    Fp32,
    /// 64-bit float.
    Fp64,
    /// bfloat16.
    Bf16,
    /// Unsigned byte.
    U8,
    /// 32-bit integer.
    I32,
    /// 64-bit integer.
    I64,
}

impl ElementType {
    fn width(self) -> usize {
        match self {
            ElementType::U8 => 1,
            ElementType::Fp16 | ElementType::Bf16 => 2,
            ElementType::Fp32 | ElementType::I32 => 4,
            ElementType::Fp64 | ElementType::I64 => 8,
        }
    }
}

/// A tensor as a guest sees it: dimensions, element type and little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Its dimensions.
    pub dimensions: Vec<u32>,
    /// Its element type.
    pub ty: ElementType,
    /// Its elements, little-endian, row-major.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor, checked: the data holds exactly the elements the dimensions say.
    pub fn new(
        dimensions: Vec<u32>,
        ty: ElementType,
        data: Vec<u8>,
    ) -> std::result::Result<Self, NnError> {
        let elements = dimensions
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d as usize));
        let expected = elements.and_then(|n| n.checked_mul(ty.width()));
        if expected != Some(data.len()) {
            return Err(NnError::new(
                ErrorCode::InvalidArgument,
                format!(
                    "a {ty:?} tensor of dimensions {dimensions:?} has {} bytes, not {}",
                    expected.map_or("too many".to_string(), |e| e.to_string()),
                    data.len()
                ),
            ));
        }
        if data.len() > MAX_TENSOR_BYTES {
            return Err(NnError::new(
                ErrorCode::TooLarge,
                format!("tensors are at most {MAX_TENSOR_BYTES} bytes"),
            ));
        }
        Ok(Self {
            dimensions,
            ty,
            data,
        })
    }

    fn to_tract(&self) -> std::result::Result<TractTensor, NnError> {
        let shape: Vec<usize> = self.dimensions.iter().map(|d| *d as usize).collect();
        let fail = |e: tract_onnx::prelude::TractError| {
            NnError::new(ErrorCode::InvalidArgument, format!("{e:#}"))
        };
        macro_rules! decode {
            ($t:ty, $n:literal) => {{
                let values: Vec<$t> = self
                    .data
                    .chunks_exact($n)
                    .map(|c| {
                        let mut b = [0u8; $n];
                        b.copy_from_slice(c);
                        <$t>::from_le_bytes(b)
                    })
                    .collect();
                TractTensor::from_shape(&shape, &values).map_err(fail)
            }};
        }
        match self.ty {
            ElementType::Fp32 => decode!(f32, 4),
            ElementType::Fp64 => decode!(f64, 8),
            ElementType::I32 => decode!(i32, 4),
            ElementType::I64 => decode!(i64, 8),
            ElementType::U8 => TractTensor::from_shape(&shape, &self.data).map_err(fail),
            other => Err(NnError::new(
                ErrorCode::UnsupportedOperation,
                format!("{other:?} tensors are not supported; use FP32"),
            )),
        }
    }

    fn from_tract(value: &TractTensor) -> std::result::Result<Self, NnError> {
        let ty = match value.datum_type() {
            DatumType::F32 => ElementType::Fp32,
            DatumType::F64 => ElementType::Fp64,
            DatumType::I32 => ElementType::I32,
            DatumType::I64 => ElementType::I64,
            DatumType::U8 => ElementType::U8,
            other => {
                return Err(NnError::new(
                    ErrorCode::UnsupportedOperation,
                    format!("the model produced a {other:?} tensor, which wasi:nn cannot carry"),
                ))
            }
        };
        let dimensions = value
            .shape()
            .iter()
            .map(|d| u32::try_from(*d))
            .collect::<std::result::Result<Vec<u32>, _>>()
            .map_err(|_| NnError::new(ErrorCode::TooLarge, "a dimension exceeds u32"))?;
        // tract keeps elements in native order; Squall's hosts are little-endian (x86-64,
        // aarch64), which `wasi:nn` tensors are too.
        Tensor::new(dimensions, ty, value.as_bytes().to_vec())
    }
}

/// The error codes of `wasi:nn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The guest passed an invalid argument.
    InvalidArgument,
    /// The model's encoding is not supported.
    InvalidEncoding,
    /// The call's deadline passed.
    Timeout,
    /// The model failed to run.
    RuntimeError,
    /// Not supported here.
    UnsupportedOperation,
    /// Too large.
    TooLarge,
    /// No model of that name.
    NotFound,
    /// Something else.
    Unknown,
}

/// A `wasi:nn` error: a code and a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct NnError {
    /// The code.
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
}

impl NnError {
    /// An error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for NnError {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::State(
                squall_state::Error::ModelNotFound { .. } | squall_state::Error::InvalidName { .. },
            ) => ErrorCode::NotFound,
            Error::InvalidModel { .. } => ErrorCode::InvalidEncoding,
            Error::Timeout { .. } => ErrorCode::Timeout,
            _ => ErrorCode::RuntimeError,
        };
        NnError::new(code, e.to_string())
    }
}

/// The models resident on one executor.
struct Resident {
    /// The cache generation of the model's registry key when it was loaded.
    generation: u64,
    model: Arc<Model>,
}

/// An executor's models: loaded from the store on first use, optimized once, shared by every
/// call. Cheap to clone.
#[derive(Clone)]
pub struct Models {
    registry: Registry,
    cache: Cache,
    resident: Arc<Mutex<HashMap<String, Resident>>>,
    /// One load at a time: two calls wanting a model that is not resident wait for one load.
    loading: Arc<tokio::sync::Mutex<()>>,
    /// Models parsed and optimized since the executor started.
    loads: Arc<AtomicU64>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("resident", &self.resident_names())
            .finish_non_exhaustive()
    }
}

impl Models {
    /// Models of the registry `registry` (of kind model), read through `cache`.
    pub fn new(registry: Registry, cache: Cache) -> Self {
        Self {
            registry,
            cache,
            resident: Arc::default(),
            loading: Arc::default(),
            loads: Arc::default(),
        }
    }

    /// The registry of models.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// How many times a model was parsed and optimized (at registration or on first use):
    /// once per model and version, whatever the number of calls.
    pub fn loads(&self) -> u64 {
        self.loads.load(Ordering::Relaxed)
    }

    /// The names of the models in memory.
    pub fn resident_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().keys().cloned().collect();
        names.sort();
        names
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Resident>> {
        self.resident.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The resident model `name` if it is still the newest version.
    fn current(&self, name: &str) -> Option<Arc<Model>> {
        let generation = self
            .cache
            .generation(&record_key(self.registry.kind(), name))?;
        self.lock()
            .get(name)
            .filter(|r| r.generation == generation)
            .map(|r| r.model.clone())
    }

    /// The newest version of model `name`, loading it if it is not resident (or changed).
    pub async fn get(&self, name: &str) -> Result<Arc<Model>> {
        if let Some(model) = self.current(name) {
            return Ok(model);
        }
        let _one_load = self.loading.lock().await;
        if let Some(model) = self.current(name) {
            return Ok(model);
        }
        let (record, generation) = self.registry.newest_versioned(name).await?;
        let Some(record) = record else {
            self.lock().remove(name);
            return Err(squall_state::Error::ModelNotFound {
                name: name.to_string(),
            }
            .into());
        };
        let same = self
            .lock()
            .get(name)
            .filter(|r| r.model.sha256 == record.sha256)
            .map(|r| r.model.clone());
        let model = match same {
            Some(model) => model,
            None => {
                let started = Instant::now();
                let onnx = self.registry.code(&record).await?;
                let model = load_blocking(&record, onnx).await?;
                self.loads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    model = name,
                    version = record.version,
                    inputs = ?model.inputs,
                    outputs = ?model.outputs,
                    ms = started.elapsed().as_millis() as u64,
                    "model loaded"
                );
                model
            }
        };
        self.lock().insert(
            name.to_string(),
            Resident {
                generation,
                model: model.clone(),
            },
        );
        Ok(model)
    }

    /// Checks that `onnx` is a model this executor can run (by loading it), stores it as the
    /// next version of `name`, and keeps it resident.
    pub async fn register(&self, name: &str, onnx: Vec<u8>) -> Result<FunctionRecord> {
        squall_state::registry::validate_name(name)?;
        let sha256 = squall_state::registry::sha256_hex(&onnx);
        let probe = FunctionRecord {
            name: name.to_string(),
            version: 0,
            sha256,
            size: onnx.len() as u64,
            limits: Default::default(),
            registered_ms: 0,
            deleted: false,
        };
        let model = load_blocking(&probe, onnx.clone()).await?;
        self.loads.fetch_add(1, Ordering::Relaxed);
        let record = self.registry.store(name, onnx, Default::default()).await?;
        // Resident under the generation the cache will have once the write's push lands: the
        // next `get` compares, finds it stale, re-reads the record, and keeps this model (same
        // hash) without loading it again.
        self.lock().insert(
            name.to_string(),
            Resident {
                generation: u64::MAX,
                model,
            },
        );
        Ok(record)
    }
}

/// Loads a model on the blocking pool.
async fn load_blocking(record: &FunctionRecord, onnx: Vec<u8>) -> Result<Arc<Model>> {
    let name = record.name.clone();
    let sha256 = record.sha256.clone();
    tokio::task::spawn_blocking(move || Model::load(&name, &sha256, &onnx).map(Arc::new))
        .await
        .map_err(|e| Error::Internal(format!("model loading panicked: {e}")))?
}

/// A loaded model, as a guest holds it (`wasi:nn/graph.graph`).
pub struct Graph {
    pub(crate) model: Arc<Model>,
}

/// A model ready to compute (`wasi:nn/inference.graph-execution-context`).
pub struct ExecutionContext {
    pub(crate) model: Arc<Model>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_checked_against_their_dimensions() {
        assert!(Tensor::new(vec![2, 2], ElementType::Fp32, vec![0; 16]).is_ok());
        let short = Tensor::new(vec![2, 2], ElementType::Fp32, vec![0; 15]).expect_err("short");
        assert_eq!(short.code, ErrorCode::InvalidArgument);
        let overflow = Tensor::new(vec![u32::MAX; 4], ElementType::Fp64, vec![]).expect_err("big");
        assert_eq!(overflow.code, ErrorCode::InvalidArgument);
        let half = Tensor::new(vec![1], ElementType::Fp16, vec![0; 2]).expect("well formed");
        assert_eq!(
            half.to_tract().expect_err("unsupported").code,
            ErrorCode::UnsupportedOperation
        );
    }

    #[test]
    fn tensors_round_trip_through_tract() {
        let values = [1.5f32, -2.0, 3.25, 0.0, 7.0, 8.5];
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = Tensor::new(vec![2, 3], ElementType::Fp32, data).expect("valid");
        let native = tensor.to_tract().expect("converts");
        assert_eq!(native.shape(), &[2, 3]);
        assert_eq!(native.as_bytes(), &tensor.data[..]);
        assert_eq!(Tensor::from_tract(&native).expect("back"), tensor);
    }

    #[test]
    fn garbage_is_not_a_model() {
        let error = Model::load("junk", "0", b"not an onnx file").expect_err("refused");
        assert!(matches!(error, Error::InvalidModel { .. }), "{error}");
    }
}
