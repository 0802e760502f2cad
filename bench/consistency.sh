#!/usr/bin/env bash
# Consistency modes end to end: a 3-step DAG over shared keys across two executor processes,
# in each mode, while a writer changes the keys: latency per mode and the runs the anomaly
# checker flags. Builds the release `squall` binary and the harness (one build), then prints a
# Markdown table. Extra arguments go to the harness (see `--help`), e.g.
# `bench/consistency.sh --rounds 5 --seconds 3 --writes-per-second 500`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p squall -p squall-bench --bin squall --bin consistency
exec target/release/consistency --squall target/release/squall "$@"
