#!/usr/bin/env bash
# Start / list / stop local OpenAI-compatible model servers; see `./serve.sh --help`.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py="$here/.venv/bin/python"
[ -x "$py" ] || py=python3
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" exec "$py" -m servers.manage "$@"
