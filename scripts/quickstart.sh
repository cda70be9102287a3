#!/usr/bin/env bash
# The main job, runnable on a fresh machine after scripts/setup.sh: serve a model locally with
# serve.sh, evaluate it on AdvBench (Q-resafe ASR) and TrustLLM's jailbreak subtask, stop it.
#
# With no ENDPOINT given, the model is a tiny random Llama built on the spot (servers/tiny.py),
# served on the CPU by our HF server: the whole stack runs without a GPU, a hub or a network
# (its answers are noise, so its numbers mean nothing). For real numbers, serve a real model
# (./serve.sh start MODEL) or use any endpoint: ENDPOINT=http://host:port/v1 [MODEL=id] bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EVALKIT_DATA:-../shared/datasets}
EXTRA=()
if [ -z "${ENDPOINT:-}" ]; then
  TINY=runs/tiny-llama-model
  [ -d "$TINY" ] || .venv/bin/python -m servers.tiny llama "$TINY" >/dev/null 2>&1
  export EVALKIT_SERVE_DIR=${EVALKIT_SERVE_DIR:-runs/serve}
  ENDPOINT=$(./serve.sh start --name quickstart --device cpu --served-model-name tiny-llama "$TINY")
  trap './serve.sh stop quickstart >/dev/null' EXIT
  EXTRA=(--max-tokens 32)
fi
.venv/bin/evalkit run --subtasks advbench,jailbreak --judges keyword --endpoint "$ENDPOINT" ${MODEL:+--model "$MODEL"} \
  --data-path "$DATA" --output runs --wait 30 "${EXTRA[@]}"
