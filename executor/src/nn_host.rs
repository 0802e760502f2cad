//! The `wasi:nn` imports, on the store's host state ([`CallState`]): graphs loaded inline or by
//! registered name, execution contexts, tensors in and out. Inference runs on tokio's blocking
//! pool within the call's deadline; tensors the guest holds on the host count against its
//! memory limit.

use wasmtime::component::Resource;
use wasmtime::Result as WasmResult;

use crate::bindings::wasi::nn::{errors, graph, inference, tensor};
use crate::host::CallState;
use crate::nn::{ElementType, ErrorCode, ExecutionContext, Graph, Model, NnError, Tensor};
use crate::report::thread_cpu_time;

type Answer<T> = WasmResult<Result<T, Resource<NnError>>>;

impl CallState {
    fn nn_fail<T>(&mut self, error: NnError) -> Answer<T> {
        tracing::debug!(function = %self.call.function, %error, "wasi:nn call failed");
        Ok(Err(self.table.push(error)?))
    }

    /// Waits for `work` on the blocking pool, within the call's deadline.
    async fn nn_blocking<T: Send + 'static>(
        &mut self,
        what: &str,
        work: impl FnOnce() -> Result<T, NnError> + Send + 'static,
    ) -> Result<T, NnError> {
        let remaining = self.remaining();
        // The blocking thread's CPU time counts for the step's record.
        let trace = self.call.trace.clone();
        let measured = move || {
            let before = trace.as_ref().map(|_| thread_cpu_time());
            let result = work();
            if let (Some(trace), Some(before)) = (&trace, before) {
                trace.add_cpu(thread_cpu_time().saturating_sub(before));
            }
            result
        };
        match tokio::time::timeout(remaining, tokio::task::spawn_blocking(measured)).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(NnError::new(
                ErrorCode::RuntimeError,
                format!("{what} failed: {e}"),
            )),
            Err(_) => Err(NnError::new(
                ErrorCode::Timeout,
                format!("the call's deadline passed during {what}"),
            )),
        }
    }

    fn release_tensor(&mut self, tensor: &Tensor) {
        self.tensor_bytes = self.tensor_bytes.saturating_sub(tensor.data.len());
    }
}

impl graph::Host for CallState {
    async fn load(
        &mut self,
        mut builders: Vec<Vec<u8>>,
        encoding: graph::GraphEncoding,
        target: graph::ExecutionTarget,
    ) -> Answer<Resource<Graph>> {
        use graph::{ExecutionTarget, GraphEncoding};
        if !matches!(encoding, GraphEncoding::Onnx | GraphEncoding::Autodetect) {
            let message = format!("{encoding:?} models are not supported; use ONNX");
            return self.nn_fail(NnError::new(ErrorCode::InvalidEncoding, message));
        }
        if target != ExecutionTarget::Cpu {
            let message = format!("only the CPU runs models here, not the {target:?}");
            return self.nn_fail(NnError::new(ErrorCode::UnsupportedOperation, message));
        }
        let (Some(onnx), true) = (builders.pop(), builders.is_empty()) else {
            let message = "an ONNX model is one builder (the file's bytes)";
            return self.nn_fail(NnError::new(ErrorCode::InvalidArgument, message));
        };
        let name = format!("{}:inline", self.call.function);
        let loaded = self
            .nn_blocking("loading the model", move || {
                let sha256 = squall_state::registry::sha256_hex(&onnx);
                Model::load(&name, &sha256, &onnx).map_err(NnError::from)
            })
            .await;
        match loaded {
            Ok(model) => Ok(Ok(self.table.push(Graph {
                model: std::sync::Arc::new(model),
            })?)),
            Err(e) => self.nn_fail(e),
        }
    }

    async fn load_by_name(&mut self, name: String) -> Answer<Resource<Graph>> {
        // Models of the function's own namespace only: a plain name, qualified by the host.
        if let Err(e) = squall_proto::keys::validate_name(&name) {
            return self.nn_fail(NnError::new(ErrorCode::NotFound, e.to_string()));
        }
        let (namespace, _) = squall_proto::keys::split(&self.call.function);
        let qualified = squall_proto::keys::qualify(namespace, &name);
        let models = self.executor()?.models().clone();
        let remaining = self.remaining();
        let loaded = match tokio::time::timeout(remaining, models.get(&qualified)).await {
            Ok(Ok(model)) => Ok(model),
            Ok(Err(e)) => Err(NnError::from(e)),
            Err(_) => Err(NnError::new(
                ErrorCode::Timeout,
                format!("the call's deadline passed while loading model {name:?}"),
            )),
        };
        match loaded {
            Ok(model) => Ok(Ok(self.table.push(Graph { model })?)),
            Err(e) => self.nn_fail(e),
        }
    }
}

impl graph::HostGraph for CallState {
    async fn init_execution_context(
        &mut self,
        graph: Resource<Graph>,
    ) -> Answer<Resource<ExecutionContext>> {
        let model = self.table.get(&graph)?.model.clone();
        Ok(Ok(self.table.push(ExecutionContext { model })?))
    }

    async fn drop(&mut self, graph: Resource<Graph>) -> WasmResult<()> {
        self.table.delete(graph)?;
        Ok(())
    }
}

impl inference::Host for CallState {}

impl inference::HostGraphExecutionContext for CallState {
    async fn compute(
        &mut self,
        context: Resource<ExecutionContext>,
        inputs: Vec<(String, Resource<Tensor>)>,
    ) -> Answer<Vec<(String, Resource<Tensor>)>> {
        let model = self.table.get(&context)?.model.clone();
        let mut tensors = Vec::with_capacity(inputs.len());
        for (name, handle) in inputs {
            // The guest handed the tensor over: it is the host's now.
            let tensor = self.table.delete(handle)?;
            self.release_tensor(&tensor);
            tensors.push((name, tensor));
        }
        let checked: Result<Vec<(String, Tensor)>, NnError> = tensors
            .into_iter()
            .map(|(name, t)| Ok((name, Tensor::new(t.dimensions, t.ty, t.data)?)))
            .collect();
        let inputs = match checked {
            Ok(inputs) => inputs,
            Err(e) => return self.nn_fail(e),
        };
        let started = std::time::Instant::now();
        let outputs = self
            .nn_blocking("inference", move || {
                let ran = std::time::Instant::now();
                let outputs = model.run(inputs);
                tracing::debug!(
                    model = %model.name,
                    us = ran.elapsed().as_micros() as u64,
                    "inference"
                );
                outputs
            })
            .await;
        tracing::debug!(
            function = %self.call.function,
            us = started.elapsed().as_micros() as u64,
            "compute"
        );
        match outputs {
            Ok(outputs) => {
                let mut handles = Vec::with_capacity(outputs.len());
                for (name, tensor) in outputs {
                    self.tensor_bytes += tensor.data.len();
                    handles.push((name, self.table.push(tensor)?));
                }
                Ok(Ok(handles))
            }
            Err(e) => self.nn_fail(e),
        }
    }

    async fn drop(&mut self, context: Resource<ExecutionContext>) -> WasmResult<()> {
        self.table.delete(context)?;
        Ok(())
    }
}

impl tensor::Host for CallState {}

impl tensor::HostTensor for CallState {
    async fn new(
        &mut self,
        dimensions: Vec<u32>,
        ty: tensor::TensorType,
        data: Vec<u8>,
    ) -> WasmResult<Resource<Tensor>> {
        let held = self.tensor_bytes.saturating_add(data.len());
        if held > self.limiter.memory_bytes {
            // Tensors live in host memory: they count against the guest's memory limit.
            return Err(wasmtime::Error::msg(format!(
                "wasi:nn tensors would hold {held} bytes, over the function's memory limit of {}",
                self.limiter.memory_bytes
            )));
        }
        self.tensor_bytes = held;
        // Checked against its dimensions when computed on (a constructor cannot fail).
        let tensor = Tensor {
            dimensions,
            ty: from_wit(ty),
            data,
        };
        Ok(self.table.push(tensor)?)
    }

    async fn dimensions(&mut self, tensor: Resource<Tensor>) -> WasmResult<Vec<u32>> {
        Ok(self.table.get(&tensor)?.dimensions.clone())
    }

    async fn ty(&mut self, tensor: Resource<Tensor>) -> WasmResult<tensor::TensorType> {
        Ok(to_wit(self.table.get(&tensor)?.ty))
    }

    async fn data(&mut self, tensor: Resource<Tensor>) -> WasmResult<Vec<u8>> {
        Ok(self.table.get(&tensor)?.data.clone())
    }

    async fn drop(&mut self, tensor: Resource<Tensor>) -> WasmResult<()> {
        let tensor = self.table.delete(tensor)?;
        self.release_tensor(&tensor);
        Ok(())
    }
}

impl errors::Host for CallState {}

impl errors::HostError for CallState {
    async fn code(&mut self, error: Resource<NnError>) -> WasmResult<errors::ErrorCode> {
        use errors::ErrorCode as W;
        Ok(match self.table.get(&error)?.code {
            ErrorCode::InvalidArgument => W::InvalidArgument,
            ErrorCode::InvalidEncoding => W::InvalidEncoding,
            ErrorCode::Timeout => W::Timeout,
            ErrorCode::RuntimeError => W::RuntimeError,
            ErrorCode::UnsupportedOperation => W::UnsupportedOperation,
            ErrorCode::TooLarge => W::TooLarge,
            ErrorCode::NotFound => W::NotFound,
            ErrorCode::Unknown => W::Unknown,
        })
    }

    async fn data(&mut self, error: Resource<NnError>) -> WasmResult<String> {
        Ok(self.table.get(&error)?.message.clone())
    }

    async fn drop(&mut self, error: Resource<NnError>) -> WasmResult<()> {
        self.table.delete(error)?;
        Ok(())
    }
}

fn from_wit(ty: tensor::TensorType) -> ElementType {
    use tensor::TensorType as W;
    match ty {
        W::Fp16 => ElementType::Fp16,
        W::Fp32 => ElementType::Fp32,
        W::Fp64 => ElementType::Fp64,
        W::Bf16 => ElementType::Bf16,
        W::U8 => ElementType::U8,
        W::I32 => ElementType::I32,
        W::I64 => ElementType::I64,
    }
}

fn to_wit(ty: ElementType) -> tensor::TensorType {
    use tensor::TensorType as W;
    match ty {
        ElementType::Fp16 => W::Fp16,
        ElementType::Fp32 => W::Fp32,
        ElementType::Fp64 => W::Fp64,
        ElementType::Bf16 => W::Bf16,
        ElementType::U8 => W::U8,
        ElementType::I32 => W::I32,
        ElementType::I64 => W::I64,
    }
}
