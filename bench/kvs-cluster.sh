#!/usr/bin/env bash
# The KVS on 1, 2 and 3 nodes (replication 2) against a lone node in the same run, and the
# policy engine's reaction to a hot key and to a burst of calls. Builds the release binaries
# once; extra arguments go to the harness (see `--help`), e.g. `--rounds 5 --seconds 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p squall -p squall-bench --bins
exec target/release/kvs-cluster --squall target/release/squall "$@"
