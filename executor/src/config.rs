//! The executor's settings and the per-function limits.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one call of a function may use. Every field has a safe default; a function may ask
/// for other values when it is registered, up to the node's [`Config::max_limits`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock deadline of one call in milliseconds, nested calls included (default
    /// 10 000). Enforced by epoch interruption, so a guest spinning in a loop is stopped too.
    pub timeout_ms: u64,
    /// Largest size of each linear memory in bytes (default 64 MiB). A guest that asks for
    /// more sees its allocation fail; if that ends the call, the caller gets `OutOfMemory`.
    pub memory_bytes: u64,
    /// Largest table, in elements (default 20 000).
    pub table_elements: u32,
    /// Largest input accepted, in bytes (default 4 MiB).
    pub max_input_bytes: u64,
    /// Largest output returned, in bytes (default 4 MiB).
    pub max_output_bytes: u64,
    /// Whether an instance may serve more than one call (default true). A reused instance
    /// keeps its globals and heap between calls, as a warm Lambda container does, and skips
    /// instantiation; a function that must start clean every time sets this to false. An
    /// instance that trapped or timed out is never reused.
    pub reuse_instances: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout_ms: 10_000,
            memory_bytes: 64 << 20,
            table_elements: 20_000,
            max_input_bytes: 4 << 20,
            max_output_bytes: 4 << 20,
            reuse_instances: true,
        }
    }
}

impl Limits {
    /// The call deadline as a duration.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// These limits, each cut to at most `max`'s.
    pub fn capped(&self, max: &Limits) -> Limits {
        Limits {
            timeout_ms: self.timeout_ms.min(max.timeout_ms),
            memory_bytes: self.memory_bytes.min(max.memory_bytes),
            table_elements: self.table_elements.min(max.table_elements),
            max_input_bytes: self.max_input_bytes.min(max.max_input_bytes),
            max_output_bytes: self.max_output_bytes.min(max.max_output_bytes),
            reuse_instances: self.reuse_instances && max.reuse_instances,
        }
    }
}

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

/// Settings of the colocated cache.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of values held (default 64 MiB); the least recently used go first.
    pub capacity_bytes: usize,
    /// Host the cache binds its update socket on, which storage nodes connect to (default
    /// `127.0.0.1`; use an address the storage nodes can reach).
    pub bind_host: String,
    /// How often the cache renews its subscriptions (default 5 s; storage nodes forget a
    /// subscriber after 30 s of silence).
    pub renew_interval: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 64 << 20,
            bind_host: "127.0.0.1".into(),
            renew_interval: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_capped_field_by_field() {
        let asked = Limits {
            timeout_ms: 1_000_000,
            memory_bytes: 1,
            reuse_instances: true,
            ..Limits::default()
        };
        let max = Limits {
            timeout_ms: 5,
            reuse_instances: false,
            ..Limits::default()
        };
        let capped = asked.capped(&max);
        assert_eq!(capped.timeout_ms, 5);
        assert_eq!(capped.memory_bytes, 1);
        assert!(!capped.reuse_instances);
    }
}
