#!/usr/bin/env bash
# Fan-out cost: one call that starts and awaits N trivial children (`misbehave fanout:N`:
# each child is placed by the scheduler on either of two executors, in one process) against one
# call that makes the same N calls one after another (`misbehave sequential:N`: nested
# synchronous calls on its own executor), both through `squall up --executors 2`,
# interleaved round by round. Prints each round, then the medians and their ratio.
#
#   bench/fanout.sh [ROUNDS] [N]      (default 7 rounds, N = 1000)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-7}
n=${2:-1000}
cargo build --release --locked -p squall --bin squall
(cd examples/functions && cargo build --release --locked --target wasm32-wasip2 -p misbehave)
dir=$(mktemp -d)
target/release/squall up --in-memory --executors 2 --http-port 0 --kvs-port 0 \
  --scheduler-port 0 --data-dir "$dir/data" > "$dir/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 1 600); do
  grep -q '^READY ' "$dir/up.log" && break
  sleep 0.1
done
base=$(grep '^READY ' "$dir/up.log" | tr ' ' '\n' | sed -n 's/^http=//p')
[ -n "$base" ] || { cat "$dir/up.log"; exit 1; }
curl -sf -X PUT --data-binary @examples/functions/target/wasm32-wasip2/release/misbehave.wasm \
  "$base/v1/functions/misbehave?timeout_ms=60000" > /dev/null
call() {
  curl -s -o "$dir/out" -w '%{http_code} %{time_total}\n' -X POST \
    "$base/v1/functions/misbehave/invoke?timeout_ms=60000" -d "$1"
}
# Warm both executors and check both answers once.
for input in "fanout:$n" "sequential:$n"; do
  read -r status _ < <(call "$input")
  [ "$status" = 200 ] || { echo "$input answered $status: $(cat "$dir/out")"; exit 1; }
  [ "$(awk -F, '{ print NF }' "$dir/out")" = "$n" ] || { echo "$input: wrong output"; exit 1; }
done
: > "$dir/times"
for round in $(seq 1 "$rounds"); do
  for input in "fanout:$n" "sequential:$n"; do
    read -r status seconds < <(call "$input")
    [ "$status" = 200 ] || { echo "$input answered $status: $(cat "$dir/out")"; exit 1; }
    echo "${input%%:*} $seconds" | tee -a "$dir/times"
  done
done
python3 - "$dir/times" "$n" <<'PY'
import statistics, sys
times = {}
for line in open(sys.argv[1]):
    kind, seconds = line.split()
    times.setdefault(kind, []).append(float(seconds) * 1000)
n = sys.argv[2]
print(f"\n| {n} calls | median ms (min-max) | per call µs |\n|---|---|---|")
for kind in ("fanout", "sequential"):
    t = times[kind]
    m = statistics.median(t)
    print(f"| {kind} | {m:.1f} ({min(t):.1f}-{max(t):.1f}) | {m * 1000 / int(n):.0f} |")
ratio = statistics.median(times["fanout"]) / statistics.median(times["sequential"])
print(f"\nfanout / sequential: {ratio:.2f}x")
PY
