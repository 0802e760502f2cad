#!/usr/bin/env bash
# This tree against another revision, in one run: f(g(x)) over HTTP (the http-fgx harness of
# this tree drives each revision's `squall` binary) and executor calls (each revision's own
# executor-calls harness), alternating revisions round by round so that both see the same
# machine. Prints each round's tables; take medians over rounds.
#
#   bench/compare.sh REV [ROUNDS]      e.g. bench/compare.sh HEAD~1 5
#
# REV is built in a worktree under target/compare/REV with a target directory of its own
# (a full release build the first time). Revisions before the zmq 0.10 switch link the
# system libzmq: `apt-get install libzmq3-dev pkg-config` first.
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/compare.sh REV [ROUNDS]}
rounds=${2:-5}
commit=$(git rev-parse --verify "$rev^{commit}")
base=target/compare/$commit
if [ ! -d "$base/tree" ]; then
  mkdir -p "$base"
  git worktree add --detach "$base/tree" "$commit" >/dev/null
fi
# Build the other revision, then this one; never both at once.
(cd "$base/tree" && CARGO_TARGET_DIR="$PWD/../target" \
  cargo build --release --locked -p squall -p squall-bench --bin squall --bin executor-calls)
cargo build --release --locked -p squall -p squall-bench --bin squall --bin http-fgx --bin executor-calls
for round in $(seq 1 "$rounds"); do
  for which in other this; do
    if [ "$which" = other ]; then
      squall=$base/target/release/squall calls=$base/target/release/executor-calls
      label="$rev ($commit)"
    else
      squall=target/release/squall calls=target/release/executor-calls
      label="this tree"
    fi
    echo "=== round $round: $label"
    target/release/http-fgx --squall "$squall" --rounds 1 --seconds 3 | grep '^|'
    "$calls" --rounds 1 | grep '^|'
  done
done
