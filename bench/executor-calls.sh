#!/usr/bin/env bash
# Per-call cost of Squall's executor against bare wasmtime (same component, same engine, same
# run), and the colocated cache's hit and miss latency against a plain KVS GET. Builds the
# release harness and the example guests, then prints a Markdown table. Extra arguments go to
# the harness (see `--help`), e.g. `bench/executor-calls.sh --rounds 5 --calls 5000`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p squall-bench --bin executor-calls
exec target/release/executor-calls "$@"
