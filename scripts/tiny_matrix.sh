#!/usr/bin/env bash
# The compressed-model study end to end on CPU with a tiny random Llama (no GPU, hub or network):
# dense, bnb4, bnb8, hqq4 and six pruned variants (magnitude / Wanda / SparseGPT at 2:4 and 4:8),
# each served in turn and evaluated on AdvBench ASR, XSTest and a truthfulness subtask; then
# runs/tiny-matrix/report/comparison.html compares them. Run scripts/setup.sh first.
set -euo pipefail
cd "$(dirname "$0")/.."
export EVALKIT_DATA=${EVALKIT_DATA:-$(cd .. && pwd)/shared/datasets}
export EVALKIT_SERVE_DIR=${EVALKIT_SERVE_DIR:-runs/serve}
[ -d models/tiny-llama ] || .venv/bin/python -m servers.tiny llama models/tiny-llama >/dev/null 2>&1
.venv/bin/evalkit matrix examples/tiny_matrix.toml "$@"
echo "report: runs/tiny-matrix/report/comparison.html"
