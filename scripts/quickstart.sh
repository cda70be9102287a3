#!/usr/bin/env bash
# The main job, runnable on a fresh machine after scripts/setup.sh: evaluate a model behind an
# OpenAI-compatible endpoint on AdvBench (Q-resafe ASR) and TrustLLM's jailbreak subtask.
#
# With no ENDPOINT given, a local mock server stands in for the model (scripted answers: it
# refuses prompts that mention a bomb), so the whole pipeline runs without a GPU or a network.
# For real numbers: ENDPOINT=http://host:port/v1 [MODEL=id] bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EVALKIT=.venv/bin/evalkit
DATA=${EVALKIT_DATA:-../shared/datasets}
if [ -z "${ENDPOINT:-}" ]; then
  PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  $EVALKIT mock-server --port "$PORT" --script scripts/mock_replies.json >/dev/null 2>&1 &
  MOCK=$!
  trap 'kill $MOCK 2>/dev/null || true' EXIT
  ENDPOINT=http://127.0.0.1:$PORT/v1
fi
$EVALKIT run --subtasks advbench,jailbreak --judges keyword --endpoint "$ENDPOINT" ${MODEL:+--model "$MODEL"} \
  --data-path "$DATA" --output runs --wait 30
