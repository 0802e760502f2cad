//! The namespace this process's commands address (`--ns`, `SQUALL_NS`): set once at start,
//! read by the gateway client (`/v1/ns/{ns}/...`) and by `squall kv` (the keys it maps).

use std::sync::OnceLock;

/// The namespace `--ns` names, once set.
static NAMESPACE: OnceLock<String> = OnceLock::new();

/// Makes this process's commands address `namespace`.
pub fn address(namespace: &str) {
    let _ = NAMESPACE.set(namespace.to_string());
}

/// The namespace this process's commands address.
pub fn addressed() -> &'static str {
    NAMESPACE
        .get()
        .map_or(squall_proto::keys::DEFAULT_NAMESPACE, String::as_str)
}
