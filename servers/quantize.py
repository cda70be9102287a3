"""Quantize a checkpoint once and save it, so every later server start loads the quantized
weights instead of quantizing again.

    python -m servers.quantize MODEL OUT --quant bnb4|bnb4-fp4|bnb8|hqq [--hqq-bits 4] [--hqq-group-size 64] [--device cpu]

The model is quantized exactly as `serve.sh --quant ...` does at load time (servers/loading.py),
then written to OUT:
- bitsandbytes: a normal HF checkpoint whose config.json carries the quantization_config, so
  transformers (our HF server) loads it quantized with no --quant flag;
- HQQ: the hqq library's own format (qmodel.pt + config.json), loaded back by our HF server
  through hqq (vLLM does not read it).
OUT also gets the tokenizer and `evalkit_recipe.json` (servers/recipe.py: the chain of steps with
this one last: options, source, sizes, library versions).

GPTQ and AWQ need calibration passes with CUDA kernels: produce those checkpoints with a
GPTQ/AWQ library on a GPU (e.g. llm-compressor or AutoAWQ) and serve them as they are
(`serve.sh --backend vllm` or the HF backend on a GPU); this script says so instead of trying.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from . import recipe as recipes
from .loading import QUANTS, LoadError, ModelSpec, load

GPU_LIBRARY_QUANTS = ("gptq", "awq")


def quantize(model: str, out: Path, quant: str, hqq_bits: int = 4, hqq_group_size: int = 64, device: str = "auto") -> dict[str, Any]:
    if quant in GPU_LIBRARY_QUANTS:
        raise LoadError(f"{quant.upper()} quantization runs calibration with CUDA kernels: make the checkpoint on a GPU "
                        f"with a {quant.upper()} library (llm-compressor, AutoAWQ) and serve it as it is "
                        f"(serve.sh --backend vllm, or --backend hf on a GPU); here use --quant bnb4, bnb8 or hqq")
    if quant == "none" or quant not in QUANTS:
        raise LoadError(f"--quant {quant!r}: choose from {', '.join(q for q in QUANTS if q != 'none')} "
                        f"({', '.join(GPU_LIBRARY_QUANTS)}: see --help)")
    if (recipes.read(model) or {}).get("runtime"):
        raise LoadError(f"{model} carries a runtime intervention (an unmerged adapter or activation hook): quantize its base "
                        f"model and apply the intervention after")
    if out.exists() and any(out.iterdir()):
        raise LoadError(f"{out} is not empty: give a new folder (nothing was written)")
    started = time.time()
    loaded = load(ModelSpec(model, device=device, quant=quant, hqq_bits=hqq_bits, hqq_group_size=hqq_group_size))
    out.mkdir(parents=True, exist_ok=True)
    if quant == "hqq":
        from hqq.models.hf.base import AutoHQQHFModel

        AutoHQQHFModel.save_quantized(loaded.model, str(out))
    else:
        loaded.model.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    options = {"quant": quant, **({"hqq_bits": hqq_bits, "hqq_group_size": hqq_group_size} if quant == "hqq" else {})}
    step = {"intervention": "quantize", "name": quant if quant != "hqq" else f"hqq{hqq_bits}-g{hqq_group_size}", "options": options,
            "versions": recipes.versions("bitsandbytes" if quant.startswith("bnb") else "hqq"), "device": str(loaded.device),
            "figures": {"bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())},
            "seconds": round(time.time() - started, 3)}
    return recipes.write(out, model, loaded.source, step, fmt="hqq" if quant == "hqq" else "transformers")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m servers.quantize", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("model", help="dense checkpoint folder, GGUF file, packaged short name (smollm2-135m), or hub id")
    ap.add_argument("out", type=Path, help="new folder for the quantized checkpoint")
    ap.add_argument("--quant", required=True, help=f"{', '.join(q for q in QUANTS if q != 'none')} ({', '.join(GPU_LIBRARY_QUANTS)}: GPU libraries)")
    ap.add_argument("--hqq-bits", type=int, default=4)
    ap.add_argument("--hqq-group-size", type=int, default=64)
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    a = ap.parse_args(argv)
    try:
        recipe = quantize(a.model, a.out, a.quant, a.hqq_bits, a.hqq_group_size, a.device)
    except LoadError as e:
        print(f"quantize: {e}", file=sys.stderr)
        return 2
    print(orjson.dumps(recipe).decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
