#!/usr/bin/env bash
# f(g(x)) over HTTP through `squall up` with activation records on against off
# (SQUALL_NO_ACTIVATION_RECORDS), alternating round by round in one run so that both see the
# same machine. Prints each round's (a) row: p50 and p99 in µs, then req/s with 8 clients.
#
#   bench/activation-records.sh [ROUNDS]      (default 5)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
cargo build --release --locked -p squall -p squall-bench --bin squall --bin http-fgx
for round in $(seq 1 "$rounds"); do
  for records in on off; do
    echo "=== round $round: records $records"
    if [ "$records" = off ]; then export SQUALL_NO_ACTIVATION_RECORDS=true; else unset SQUALL_NO_ACTIVATION_RECORDS; fi
    target/release/http-fgx --squall target/release/squall --rounds 1 --seconds 3 | grep '^| (a)'
  done
done
