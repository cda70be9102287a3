"""Activation steering at load time: the runtime intervention {"kind": "icv"} of a recipe folder
(servers/safety_arithmetic.py makes the vector; servers/loading.py attaches it). Imports nothing
of evalkit's, so the loader and the commands that use the loader both depend on it, not on each other."""

from __future__ import annotations

from pathlib import Path
from typing import Any

SITES = ("mlp", "resid")
FORMS = ("code", "paper")
CODE_SCALE = 0.1  # the constant the Safety Arithmetic code multiplies α by


def decoder_layers(model) -> list[Any]:
    """The decoder blocks of a causal LM (the longest ModuleList named layers / h / blocks)."""
    import torch

    best: list[Any] = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks") and len(mod) > len(best):
            best = list(mod)
    if not best:
        raise ValueError("the model has no decoder blocks named layers, h or blocks: a safety vector cannot find where to steer")
    return best


def steer(x, v, alpha: float, form: str):
    """x (..., d) moved away from v (d), the unsafe − safe direction, with its norm kept."""
    import torch.nn.functional as F

    xf = x.float()
    norm = xf.norm(dim=-1, keepdim=True)
    v = v.to(xf.device, xf.dtype)
    if form == "code":
        gate = 1 + F.cosine_similarity(xf, v.expand_as(xf), dim=-1).clamp(min=0).unsqueeze(-1)
        y = F.normalize(F.normalize(xf, dim=-1) - CODE_SCALE * alpha * gate * F.normalize(v, dim=0), dim=-1) * norm
    else:
        y = xf - alpha * v
        y = y * norm / y.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return y.to(x.dtype)


def attach_icv(model, folder: Path, rt: dict[str, Any]) -> None:
    """The loader's runtime hook for {"kind": "icv"}: steer every position at the chosen layers."""
    from safetensors.torch import load_file

    path = folder / rt["path"]
    if not path.is_file():
        raise ValueError(f"{folder}: the recipe names the safety vector {path}, which is missing; prepare the folder again")
    direction = load_file(str(path))["direction"]
    blocks = decoder_layers(model)
    if len(rt["layers"]) != direction.shape[0] or max(rt["layers"]) >= len(blocks):
        raise ValueError(f"{path} does not fit this model ({len(blocks)} decoder blocks); prepare the folder again")
    alpha, form = float(rt["alpha"]), rt["form"]
    for row, i in zip(direction, rt["layers"]):
        site = blocks[i].mlp if rt["site"] == "mlp" else blocks[i]

        def hook(mod, args, out, v=row):
            if isinstance(out, tuple):
                return (steer(out[0], v, alpha, form), *out[1:])
            return steer(out, v, alpha, form)

        site.register_forward_hook(hook)
