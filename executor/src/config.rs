//! The executor's settings.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use squall_state::{CacheConfig, Limits};

/// An executor's settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Limits of functions that ask for none (see [`Limits`] for the defaults).
    pub default_limits: Limits,
    /// The most any function may ask for (default: 5 minutes, 1 GiB of memory, 64 MiB of
    /// input and output). Also sizes the pooling allocator's memory slots.
    pub max_limits: Limits,
    /// Instances alive at once, warm ones included (default 256): the pooling allocator
    /// reserves address space for this many up front. Calls beyond it fail with
    /// `NoCapacity` rather than queue.
    pub max_instances: u32,
    /// Warm instances kept per function (default 4).
    pub warm_per_function: usize,
    /// Most calls one instance serves before it is replaced (default 10 000), so a slow leak
    /// in a guest cannot grow forever.
    pub max_reuses: u64,
    /// How deeply functions may call functions (default 8).
    pub max_call_depth: u32,
    /// Where compiled components are cached, keyed by content hash, compiler settings and
    /// wasmtime version (default: none, compile in memory). With it, a restarted executor
    /// loads machine code instead of compiling again.
    pub code_cache_dir: Option<PathBuf>,
    /// The colocated cache.
    pub cache: CacheConfig,
    /// Timeout of one KVS round trip (default 2 s; calls also stop at their own deadline).
    pub kvs_timeout: Duration,
    /// Interval of the epoch ticker, the granularity of call deadlines (default 5 ms).
    pub epoch_tick: Duration,
    /// Bytes of a guest's stdout and stderr kept per call for the log (default 64 KiB);
    /// the rest is dropped and counted.
    pub max_guest_output_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            default_limits: Limits::default(),
            max_limits: Limits {
                timeout_ms: 300_000,
                memory_bytes: 1 << 30,
                table_elements: 1_000_000,
                max_input_bytes: 64 << 20,
                max_output_bytes: 64 << 20,
                reuse_instances: true,
            },
            max_instances: 256,
            warm_per_function: 4,
            max_reuses: 10_000,
            max_call_depth: 8,
            code_cache_dir: None,
            cache: CacheConfig::default(),
            kvs_timeout: Duration::from_secs(2),
            epoch_tick: Duration::from_millis(5),
            max_guest_output_bytes: 64 << 10,
        }
    }
}
