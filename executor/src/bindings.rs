//! The host bindings of the handler world, generated from `sdk/wit/world.wit`: the
//! `squall:function` imports and export, and `wasi:nn` with its resources backed by [`crate::nn`]'s
//! types. A module of its own so that the imports' implementations (`host`, `nn_host`) and the
//! executor that instantiates the world all depend on it, and it on nothing of theirs.

#![allow(missing_docs)]

wasmtime::component::bindgen!({
    path: "../sdk/wit",
    world: "handler",
    imports: { default: async | trappable },
    exports: { default: async },
    with: {
        "wasi:nn/graph.graph": crate::nn::Graph,
        "wasi:nn/tensor.tensor": crate::nn::Tensor,
        "wasi:nn/inference.graph-execution-context": crate::nn::ExecutionContext,
        "wasi:nn/errors.error": crate::nn::NnError,
    },
});
