"""Loading a model for serving: dense, bitsandbytes, HQQ, pre-quantized GPTQ/AWQ, local paths.

The Oak Ridge loading options map to ModelSpec fields:
    --load_bnb_model      quant="bnb4" | "bnb4-fp4" | "bnb8"
    --load_hqq_model      quant="hqq", hqq_bits, hqq_group_size (through the `hqq` library:
                          transformers 5 no longer wraps HQQ)
    --load_custom_model   model=<local checkpoint path> (pruned or patched checkpoints)
    --num_gpus            num_gpus (device_map="auto" over that many GPUs)
GPTQ/AWQ checkpoints carry their quantization_config and load as they are, on a GPU only.
Checkpoints saved by servers/quantize.py load quantized with quant="none": bitsandbytes ones
through their quantization_config, HQQ ones (recipe format "hqq", servers/recipe.py) through hqq.
A GGUF file (model="x.gguf", or a folder plus gguf_file) or a packaged model's short name
("smollm2-135m") loads through the safetensors checkpoint converted from it once
(servers/model_source.py); `Loaded.source` names the file and its sha256.

`load()` ends by calling every hook in `hooks(model, tokenizer)`: the one place where later
interventions (weight edits, activation hooks, LoRA adapters) attach to a loaded model. A hook
changes the model in place or returns the model that replaces it (peft wraps the model). The
runtime interventions a recipe folder names (`runtime` in evalkit_recipe.json: an unmerged
LoRA adapter, a Safety Arithmetic safety vector) are attached this way, first, before the caller's own hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from . import recipe as recipes
from .model_source import SourceError, checkpoint_for
from .spec import QUANTS, ServeSpec

Hook = Callable[[Any, Any], Any]  # (model, tokenizer) -> None (changed in place) or the replacement model


class LoadError(Exception):
    """A model cannot be loaded as asked; the message says what to change."""


@dataclass
class ModelSpec:
    model: str  # hub id, local checkpoint path, GGUF file or packaged short name (servers/model_source.py)
    gguf_file: str | None = None  # a GGUF file inside the `model` folder
    device: Literal["cpu", "cuda", "auto"] = "auto"
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16
    quant: str = "none"
    hqq_bits: int = 4
    hqq_group_size: int = 64
    num_gpus: int = 1
    task: Literal["generate", "embed"] = "generate"
    trust_remote_code: bool = False
    hooks: list[Hook] = field(default_factory=list)


def model_spec(spec: ServeSpec, task: Literal["generate", "embed"] = "generate") -> ModelSpec:
    """The loader's view of a served model (the options that only a server cares about dropped)."""
    return ModelSpec(model=spec.model or "", gguf_file=spec.gguf_file, device=spec.device, dtype=spec.dtype, quant=spec.quant,
                     hqq_bits=spec.hqq_bits, hqq_group_size=spec.hqq_group_size, num_gpus=spec.gpus, task=task,
                     trust_remote_code=spec.trust_remote_code)


@dataclass
class Loaded:
    model: Any
    tokenizer: Any
    device: Any  # torch.device of the inputs
    spec: ModelSpec
    source: dict[str, Any] = field(default_factory=dict)  # where the weights came from (GGUF file, sha256)


def resolve_device(spec: ModelSpec):
    import torch

    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.device == "cuda" and not torch.cuda.is_available():
        raise LoadError("--device cuda was asked for, but torch sees no CUDA GPU here: use --device cpu (or auto)")
    return torch.device(spec.device)


def resolve_dtype(spec: ModelSpec, device):
    import torch

    if spec.dtype == "auto":
        # bf16 where the GPU has it, fp32 on CPU (fp16 matmuls are slow or missing there)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return getattr(torch, spec.dtype)
    except AttributeError:
        raise LoadError(f"unknown dtype {spec.dtype!r}: use auto, float32, float16 or bfloat16") from None


def _checkpoint_quant_method(model: str, trust_remote_code: bool) -> str | None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    qc = getattr(cfg, "quantization_config", None)
    if qc is None:
        return None
    return (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) or "unknown"


def load(spec: ModelSpec) -> Loaded:
    if spec.quant not in QUANTS:
        raise LoadError(f"unknown quantization {spec.quant!r}: choose from {', '.join(QUANTS)}")
    try:
        import torch  # noqa: F401 - both are needed from here on: say so before anything loads
        import transformers  # noqa: F401
    except ImportError:
        raise LoadError("serving needs torch and transformers: pip install torch==2.13.0 then pip install 'evalkit[serve]'") from None

    device = resolve_device(spec)
    dtype = resolve_dtype(spec, device)
    try:
        checkpoint, source = checkpoint_for(spec.model, spec.gguf_file)
    except SourceError as e:
        raise LoadError(str(e)) from None
    if source:
        spec = replace(spec, model=checkpoint, gguf_file=None)
    loaded = _load_checkpoint(spec, device, dtype)
    loaded.source = source
    return loaded


def _load_checkpoint(spec: ModelSpec, device: Any, dtype: Any) -> Loaded:
    import torch
    import transformers

    try:
        saved = recipes.read(spec.model) or {}
    except recipes.RecipeError as e:
        raise LoadError(str(e)) from None
    if saved.get("runtime"):
        spec = replace(spec, hooks=[*(runtime_hook(Path(spec.model), rt) for rt in saved["runtime"]), *spec.hooks])
    try:
        pre_quant = "hqq" if saved.get("format") == "hqq" else _checkpoint_quant_method(spec.model, spec.trust_remote_code)
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot read the config of {spec.model!r}: {str(e).splitlines()[0]}") from None
    if pre_quant is not None and spec.quant != "none":
        raise LoadError(f"{spec.model} is already quantized ({pre_quant}); serve it with --quant none")
    if pre_quant == "hqq":
        return _load_saved_hqq(spec, device, dtype)
    if pre_quant in ("gptq", "awq") and device.type != "cuda":
        raise LoadError(
            f"{spec.model} is a pre-quantized {pre_quant.upper()} checkpoint; its kernels need a CUDA GPU. "
            f"Serve it on a GPU machine (this backend or --backend vllm), or use a dense checkpoint with --quant bnb4/hqq on CPU"
        )
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": spec.trust_remote_code}
    if device.type == "cuda" and spec.num_gpus > 1:
        n = torch.cuda.device_count()
        if n < spec.num_gpus:
            raise LoadError(f"--num-gpus {spec.num_gpus} was asked for, but only {n} GPU(s) are visible")
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {i: torch.cuda.get_device_properties(i).total_memory for i in range(spec.num_gpus)}
    else:
        kwargs["device_map"] = {"": device}
    if spec.quant.startswith("bnb"):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise LoadError("--quant bnb* needs bitsandbytes: pip install 'evalkit[quant]'") from None
        if spec.quant == "bnb8":
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="fp4" if spec.quant == "bnb4-fp4" else "nf4",
                bnb_4bit_compute_dtype=dtype,
            )

    auto = transformers.AutoModel if spec.task == "embed" else transformers.AutoModelForCausalLM
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code)
        model = auto.from_pretrained(spec.model, **kwargs)
    except (OSError, ValueError) as e:
        raise LoadError(f"cannot load {spec.model!r}: {str(e).splitlines()[0]}") from None

    if spec.quant == "hqq":
        _quantize_hqq(model, spec, dtype, device)
    return _finish(model, tokenizer, device, spec)


def _load_saved_hqq(spec: ModelSpec, device: Any, dtype: Any) -> Loaded:
    try:
        import transformers
        from hqq.models.hf.base import AutoHQQHFModel
    except ImportError:
        raise LoadError(f"{spec.model} is an HQQ checkpoint: it needs the hqq library (pip install 'evalkit[quant]')") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.model, trust_remote_code=spec.trust_remote_code)
    model = AutoHQQHFModel.from_quantized(spec.model, device=str(device), compute_dtype=dtype)
    return _finish(model, tokenizer, device, spec)


def _finish(model: Any, tokenizer: Any, device: Any, spec: ModelSpec) -> Loaded:
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    for hook in spec.hooks:
        model = hook(model, tokenizer) or model
    return Loaded(model, tokenizer, device, spec)


def runtime_hook(folder: Path, rt: dict[str, Any]) -> Hook:
    """The hook that attaches one runtime intervention of a recipe folder."""
    if rt["kind"] == "lora":
        path = folder / rt["path"]

        def attach_lora(model: Any, tokenizer: Any) -> Any:
            try:
                from peft import PeftModel
            except ImportError:
                raise LoadError(f"{folder} carries a LoRA adapter: serving it needs peft (pip install 'evalkit[quant]')") from None
            if not (path / "adapter_config.json").is_file():
                raise LoadError(f"{folder}: the recipe names the adapter {path}, which is missing; prepare the folder again")
            return PeftModel.from_pretrained(model, str(path)).eval()

        return attach_lora
    if rt["kind"] == "icv":
        def attach_icv(model: Any, tokenizer: Any) -> None:
            from .steering import attach_icv as attach

            try:
                attach(model, folder, rt)
            except ValueError as e:
                raise LoadError(str(e)) from None
        return attach_icv
    raise LoadError(f"{folder}: unknown runtime intervention {rt['kind']!r}")


def _quantize_hqq(model: Any, spec: ModelSpec, dtype: Any, device: Any) -> None:
    try:
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel
    except ImportError:
        raise LoadError("--quant hqq needs the hqq library: pip install 'evalkit[quant]'") from None
    if spec.hqq_bits not in (1, 2, 3, 4, 8):
        raise LoadError(f"--hqq-bits {spec.hqq_bits} is not supported by HQQ: use 1, 2, 3, 4 or 8")
    cfg = BaseQuantizeConfig(nbits=spec.hqq_bits, group_size=spec.hqq_group_size)
    AutoHQQHFModel.quantize_model(model, quant_config=cfg, compute_dtype=dtype, device=str(device))
