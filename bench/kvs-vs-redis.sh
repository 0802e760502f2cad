#!/usr/bin/env bash
# Squall's KVS against Redis, same load generator, same run. Installs Redis from Debian if it is
# missing, builds release binaries once, and prints a Markdown table. Extra arguments go to the
# harness (see `--help`), e.g. `bench/kvs-vs-redis.sh --rounds 5 --duration 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/install-redis.sh
cargo build --release --locked -p squall -p squall-bench --bins
exec target/release/kvs-vs-redis --squall target/release/squall "$@"
