//! What one call of a function may use: stored with every function version, so every executor
//! applies the same limits to it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one call of a function may use. Every field has a safe default; a function may ask
/// for other values when it is registered, up to the executor's maximum.
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
