#!/usr/bin/env bash
# The compressed-model study end to end on CPU with a real model (no GPU, hub or network):
# SmolLM2-135M-Instruct dense, bnb4, bnb8, hqq4 and six pruned variants (magnitude / Wanda /
# SparseGPT at 2:4 and 4:8), each served in turn and evaluated on AdvBench ASR, XSTest
# over-refusal, use_external_knowledge and reference_nll (see examples/cpu_matrix.toml); then
# runs/cpu-matrix/report/comparison.html compares them. Run scripts/setup.sh first.
# Extra arguments go to `evalkit matrix` (e.g. --only dense,bnb4).
set -euo pipefail
cd "$(dirname "$0")/.."
export EVALKIT_DATA=${EVALKIT_DATA:-$(cd .. && pwd)/shared/datasets}
export EVALKIT_SERVE_DIR=${EVALKIT_SERVE_DIR:-runs/serve}
.venv/bin/evalkit matrix examples/cpu_matrix.toml "$@"
echo "report: runs/cpu-matrix/report/comparison.html"
