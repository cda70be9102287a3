#!/usr/bin/env bash
# Q-resafe end to end on CPU with a real model (no GPU, hub or network): SmolLM2-135M-Instruct
# dense, bnb4 (NF4) and bnb4 patched with `python -m servers.qresafe` (its defaults), each served
# in turn and evaluated on AdvBench ASR, XSTest over-refusal and reference_nll (see
# examples/qresafe_cpu.toml); then runs/qresafe-cpu/report/comparison.html compares them.
# Run scripts/setup.sh first. Extra arguments go to `evalkit matrix` (e.g. --only bnb4-qresafe).
set -euo pipefail
cd "$(dirname "$0")/.."
export EVALKIT_DATA=${EVALKIT_DATA:-$(cd .. && pwd)/shared/datasets}
export EVALKIT_SERVE_DIR=${EVALKIT_SERVE_DIR:-runs/serve}
export OMP_WAIT_POLICY=PASSIVE  # the patch's generation servers share the cores with it
.venv/bin/evalkit matrix examples/qresafe_cpu.toml "$@"
echo "report: runs/qresafe-cpu/report/comparison.html"
