"""GGUF loading: the first load (dequantize with transformers and write the safetensors cache)
against a cached load of the same file, in one run. Prints seconds and the ratio; never asserts.

    python bench/gguf_load.py [MODEL]        # a GGUF file or packaged short name [smollm2-135m]

Each load runs in a fresh process (as a server start does), with an empty temporary
$EVALKIT_CACHE for the first, the same cache for the second.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOAD = "from servers.loading import ModelSpec, load; load(ModelSpec({model!r}, device='cpu'))"


def timed_load(model: str, cache: str) -> float:
    env = {**os.environ, "EVALKIT_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", LOAD.format(model=model)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    model = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
    with tempfile.TemporaryDirectory() as cache:
        first = timed_load(model, cache)
        cached = min(timed_load(model, cache) for _ in range(2))
    print(f"{model}: first load (convert + cache) {first:.1f} s, cached load {cached:.1f} s, "
          f"ratio {first / cached:.1f}x")


if __name__ == "__main__":
    main()
