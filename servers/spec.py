"""What a model server is asked to serve: one torch-free description shared by serve.sh's manager
(servers/manage.py), the HF server (servers/hf_server.py) and the matrix (evalkit/matrix.py).

Each option is declared once, here. `add_arguments` turns the fields into command-line flags and
`argv` turns a spec back into them, so a layer that hands a spec to the next (matrix -> manager ->
HF server) never spells an option out again; the HF server turns it into the loader's ModelSpec.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

QUANTS = ("none", "bnb4", "bnb4-fp4", "bnb8", "hqq")  # the HF backend's; vLLM's are in servers/vllm.py


class ServeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="hub id, checkpoint or recipe folder, GGUF file, or packaged short name (smollm2-135m)")
    gguf_file: str | None = Field(None, description="a GGUF file inside the MODEL folder")
    backend: Literal["hf", "vllm"] = Field("hf", description="our HF-transformers server or vLLM")
    quant: str = Field("none", description=f"quantize at load time: hf {', '.join(QUANTS)}; vllm: see servers/vllm.py")
    hqq_bits: int = Field(4, description="HQQ bits (1, 2, 3, 4, 8)")
    hqq_group_size: int = Field(64, description="HQQ group size")
    device: Literal["cpu", "cuda", "auto"] = Field("auto", description="where the HF backend puts the model")
    dtype: str = Field("auto", description="auto, float32, float16, bfloat16")
    gpus: int = Field(1, ge=1, description="GPUs (vllm: tensor parallel size; hf: device_map over them)")
    max_model_len: int | None = Field(None, description="context length [the model config's]")
    chat_template: str | None = Field(None, description="Jinja chat template file, for models that ship none")
    trust_remote_code: bool = Field(False, description="run code shipped with the checkpoint")


HF_FIELDS = tuple(f for f in ServeSpec.model_fields if f not in ("model", "backend"))  # what the HF server takes
ALL_FIELDS = tuple(f for f in ServeSpec.model_fields if f != "model")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def add_arguments(parser: argparse.ArgumentParser, fields: tuple[str, ...] = ALL_FIELDS) -> None:
    """One flag per field (model is the caller's positional argument)."""
    for name in fields:
        info = ServeSpec.model_fields[name]
        kind = _base_type(info.annotation)
        help_text = f"{info.description} [{info.default}]" if info.default not in (None, False) else info.description
        if kind is bool:
            parser.add_argument(_flag(name), action="store_true", help=info.description)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(_flag(name), choices=typing.get_args(kind), default=info.default, help=help_text)
        else:
            parser.add_argument(_flag(name), type=kind, default=info.default, help=help_text)


def from_namespace(ns: argparse.Namespace) -> ServeSpec:
    return ServeSpec(**{k: getattr(ns, k) for k in ServeSpec.model_fields if hasattr(ns, k)})


def argv(spec: ServeSpec, fields: tuple[str, ...] = ALL_FIELDS) -> list[str]:
    """The flags that give `spec` to a command built with add_arguments(fields); defaults left out."""
    out: list[str] = []
    for name in fields:
        value, default = getattr(spec, name), ServeSpec.model_fields[name].default
        if value == default or value is None:
            continue
        out += [_flag(name)] if value is True else [_flag(name), str(value)]
    return out
