#!/usr/bin/env bash
# Fresh-machine setup: a virtual environment in .venv with the CPU torch wheel first (so pip
# never pulls a CUDA build), then evalkit with its local-judge (serve) and test (dev) extras.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
quiet() { grep -v "is neither a file nor a directory" || true; }
.venv/bin/pip install -q torch==2.13.0 2>&1 | quiet
.venv/bin/pip install -q -e '.[serve,quant,report,embed,dev]' 2>&1 | quiet
.venv/bin/python -c "import evalkit, torch; print('evalkit', evalkit.__version__, 'with torch', torch.__version__)"
