#!/usr/bin/env bash
# From an acknowledged write to its kv-change trigger's function starting, against Redis keyspace
# notifications (both syncing every write before acknowledging it), and sustained trigger
# throughput with every write delivered. Installs Redis from Debian if it is missing, builds
# release binaries once. Extra arguments go to the harness (see `--help`), e.g.
# `bench/trigger-latency.sh --rounds 5 --writes 200`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/install-redis.sh
cargo build --release --locked -p squall -p squall-bench --bin squall --bin trigger-latency
exec target/release/trigger-latency --squall target/release/squall "$@"
