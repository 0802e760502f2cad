//! Builds the example guests (`examples/functions`) for tests and benchmarks.
//!
//! They are built from source with the same toolchain, for `wasm32-wasip2`, once per process,
//! into `target/guests` (a target directory of their own, so this never waits on the lock of
//! the build that is running the tests).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The directory of the example functions' workspace.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("examples")
        .join("functions")
}

fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("guests")
}

/// Builds the example guests (once per process) and returns the directory holding
/// `incr.wasm`, `square.wasm`, and the others.
///
/// # Panics
/// If the build fails: tests cannot run without their guests.
pub fn guests() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let manifest = examples_dir().join("Cargo.toml");
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "--locked",
                "--target",
                "wasm32-wasip2",
            ])
            .arg("--manifest-path")
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target_dir())
            // Flags meant for the host build (coverage, sanitizers) do not apply to guests.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("building the example guests failed ({s}); see the output above"),
            Err(e) => panic!("cannot run cargo to build the example guests: {e}"),
        }
        target_dir().join("wasm32-wasip2").join("release")
    })
}

/// The bytes of the example guest `name` (a crate of `examples/functions`).
///
/// # Panics
/// If the guest cannot be built or read.
pub fn guest(name: &str) -> Vec<u8> {
    let path = guests().join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}
