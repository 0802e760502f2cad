#!/usr/bin/env bash
# f(g(x)) = square(incr(x)) over HTTP with keep-alive: `squall up`, and `squall up` with two
# executor processes, against an axum echo server measured in the same run. Builds the release
# `squall` binary and the harness (one build), then prints a Markdown table. Extra arguments go
# to the harness (see `--help`), e.g. `bench/http-fgx.sh --rounds 5 --seconds 3`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p squall -p squall-bench --bin squall --bin http-fgx
exec target/release/http-fgx --squall target/release/squall "$@"
