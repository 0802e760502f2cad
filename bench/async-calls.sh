#!/usr/bin/env bash
# Asynchronous calls through `squall up`: 202 latency, accepted and completed calls per second,
# against synchronous calls of the same function in the same run (bench/src/bin/async_calls.rs).
# With REV, that revision's `squall` (built as bench/compare.sh builds it, under
# target/compare/REV) is measured too, alternating round by round.
#
#   bench/async-calls.sh [ROUNDS] [REV]      e.g. bench/async-calls.sh 5 25aa774
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
rev=${2:-}
baseline=()
if [ -n "$rev" ]; then
  commit=$(git rev-parse --verify "$rev^{commit}")
  base=target/compare/$commit
  if [ ! -d "$base/tree" ]; then
    mkdir -p "$base"
    git worktree add --detach "$base/tree" "$commit" >/dev/null
  fi
  # Build the other revision, then this one; never both at once.
  (cd "$base/tree" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release --locked -p squall --bin squall)
  baseline=(--baseline "$base/target/release/squall")
fi
cargo build --release --locked -p squall -p squall-bench --bin squall --bin async-calls
target/release/async-calls --squall target/release/squall --rounds "$rounds" "${baseline[@]}"
