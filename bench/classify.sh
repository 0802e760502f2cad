#!/usr/bin/env bash
# The SqueezeNet `classify` pipeline over HTTP against native tract inference (and onnxruntime
# from PyPI when it can be installed), measured in the same run. Builds the release `squall`
# binary and the harness (one build), then prints Markdown tables. Extra arguments go to the
# harness (see `--help`), e.g. `bench/classify.sh --rounds 5 --seconds 4`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked -p squall -p squall-bench --bin squall --bin classify
# onnxruntime and numpy in a virtual environment of their own (skipped if PyPI is out of reach).
venv=target/ort-venv
python=()
if [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" >/dev/null 2>&1 &&
    "$venv/bin/pip" install --quiet --disable-pip-version-check onnxruntime numpy; }; then
  if "$venv/bin/python" -c "import onnxruntime, numpy" 2>/dev/null; then
    python=(--python "$venv/bin/python")
  fi
fi
[ ${#python[@]} -gt 0 ] || echo "onnxruntime not available: measuring without the second anchor" >&2
exec target/release/classify --squall target/release/squall "${python[@]}" "$@"
