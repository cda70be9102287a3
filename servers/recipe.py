"""The recipe file: the one contract every model intervention writes and the loader reads.

An *offline* intervention is a command `python -m servers.<name> MODEL OUT [options]` (compress,
quantize, qresafe, safety_arithmetic hdr|icv|finetune) that writes a servable folder OUT and `OUT/evalkit_recipe.json`:

    {"evalkit_recipe": 1,
     "base": {"model": "smollm2-135m", "source": {...GGUF file and sha256...}},   # where the chain began
     "format": "transformers" | "hqq",          # how the loader reads OUT's weights
     "runtime": [{"kind": "lora", "path": "adapter"},    # attached at load time (servers/loading.py)
                 {"kind": "icv", "path": "icv.safetensors", "alpha": 0.12, ...}],
     "steps": [{"intervention": "compress", "name": "wanda-2:4", "options": {...},
                "inputs": {"calibration": {"path": ..., "sha256": ...}}, "versions": {...},
                "figures": {"measured_sparsity": 0.5, ...}, "seconds": 12.3, "finished": "..."}, ...]}

When MODEL is itself a recipe folder, OUT's recipe repeats MODEL's steps and adds its own, so a
chain (prune -> quantize -> patch) is described in full by its last folder. The served model id
names the chain (`<base id>+wanda-2:4+bnb4+qresafe`), and /v1/models shows the recipe.

Torch-free: serve.sh's manager and the matrix read recipes without loading a model.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

from evalkit.datasets import sha256_file

RECIPE_FILE = "evalkit_recipe.json"
# the marker files written before the recipe contract; read as one-step recipes
LEGACY_FILES = {"evalkit_compress.json": "compress", "evalkit_quantize.json": "quantize"}
RUNTIME_KINDS = ("lora", "icv")


class RecipeError(Exception):
    """A recipe folder is unreadable or inconsistent; the message says what to do."""


def input_file(path: Path) -> dict[str, Any]:
    """An input of a step, as the recipe lists it: where it was and what it held."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", *packages):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def read(folder: str | Path) -> dict[str, Any] | None:
    """The recipe of a folder (a legacy marker file becomes a one-step recipe); None for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    path = folder / RECIPE_FILE
    if path.is_file():
        try:
            recipe = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RecipeError(f"{path} is not readable JSON ({e}): the folder was not finished; prepare it again") from None
        for rt in recipe.get("runtime", []):
            if rt.get("kind") not in RUNTIME_KINDS:
                raise RecipeError(f"{path}: runtime intervention {rt.get('kind')!r} is not known to this evalkit "
                                  f"(known: {', '.join(RUNTIME_KINDS)}); upgrade evalkit or prepare the folder again")
        return recipe
    for legacy, intervention in LEGACY_FILES.items():
        if (folder / legacy).is_file():
            old = json.loads((folder / legacy).read_text())
            name = old.get("quant") or f"{old.get('method')}-{old.get('sparsity')}"
            base = {"model": old.get("source") or old.get("base_model"), **({"source": old["base_source"]} if old.get("base_source") else {})}
            return {"evalkit_recipe": 1, "base": base, "format": "hqq" if old.get("format") == "hqq" else "transformers",
                    "runtime": [], "steps": [{"intervention": intervention, "name": name, "options": old}]}
    return None


def describe_base(model: str, source: dict[str, Any] | None) -> dict[str, Any]:
    """The `base` of a new chain: the model argument and, for a GGUF, its file and sha256."""
    return {"model": model, **({"source": source} if source else {})}


def write(out: Path, model: str, source: dict[str, Any] | None, step: dict[str, Any], fmt: str = "transformers",
          runtime: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write OUT's recipe: MODEL's own steps when it is a recipe folder, then `step`."""
    prior = read(model)
    step = {**step, "input": str(Path(model).resolve()) if Path(model).exists() else model}
    recipe = {"evalkit_recipe": 1, "base": prior["base"] if prior else describe_base(model, source), "format": fmt,
              "runtime": [], "steps": prior["steps"] if prior else []}
    return _save(out, recipe, step, runtime)


def append(out: Path, step: dict[str, Any], runtime: list[dict[str, Any]] | None = None,
           onto: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add a step done in place on OUT (e.g. an adapter trained on the checkpoint now there), to OUT's
    recipe or to `onto`, the recipe of the checkpoint OUT took its weights from."""
    recipe = onto or read(out)
    if recipe is None:
        raise RecipeError(f"{out} has no {RECIPE_FILE} to add a step to")
    return _save(out, recipe, {**step, "input": str(out.resolve())}, runtime)


def _save(out: Path, recipe: dict[str, Any], step: dict[str, Any], runtime: list[dict[str, Any]] | None) -> dict[str, Any]:
    # written last and atomically, so a folder with a recipe is a finished one
    step["finished"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    recipe = {**recipe, "runtime": [*recipe.get("runtime", []), *(runtime or [])], "steps": [*recipe["steps"], step]}
    tmp = out / (RECIPE_FILE + ".tmp")
    tmp.write_text(json.dumps(recipe, indent=2) + "\n")
    os.replace(tmp, out / RECIPE_FILE)
    return recipe


def chain_name(recipe: dict[str, Any]) -> str:
    """The interventions of a recipe, in order: "wanda-2:4+bnb4+qresafe"."""
    return "+".join(str(s.get("name") or s.get("intervention")) for s in recipe.get("steps", []))


def served_id(model: str, gguf_model_id: str | None = None) -> str:
    """The default model id a server announces: a GGUF's `<stem>-<sha12>`; a recipe folder's base id
    plus its chain of interventions; else the model argument itself."""
    if gguf_model_id:
        return gguf_model_id
    recipe = read(model)
    if recipe is None:
        return model
    base = recipe.get("base", {})
    root = (base.get("source") or {}).get("model_id") or Path(str(base.get("model") or model)).name
    return f"{root}+{chain_name(recipe)}"
