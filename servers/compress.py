"""Post-training pruning: magnitude, Wanda and SparseGPT, N:M or unstructured, layer by layer.

    python -m servers.compress MODEL OUT --method wanda --sparsity 2:4
    python -m servers.compress MODEL OUT --method sparsegpt --sparsity 0.5 --calibration my.txt

The result is a normal HF checkpoint (dense tensors with zeros), which our HF server and vLLM serve
as they would the original, plus `evalkit_recipe.json` recording the recipe (servers/recipe.py).

Methods (Sun et al. 2023, "Wanda"; Frantar & Alistarh 2023, "SparseGPT"), applied to every linear
layer inside the decoder blocks (embeddings and the LM head stay dense, as in both papers):
- magnitude: score |W|; unstructured sparsity is one threshold per weight matrix.
- wanda: score |W_ij| * ||X_j||_2 over the calibration tokens; unstructured sparsity is
  chosen per output row.
- sparsegpt: the OBS update with H = 2 X X^T / n (1 % damping): per 128-column block the mask
  takes the smallest w^2 / [H^-1]_jj^2 and the error of each removed weight is spread over the
  columns not yet processed.
N:M ("2:4", "4:8"): in every group of M consecutive input columns of a row, the N lowest-scoring
weights are zeroed (50 % sparsity for both).

Calibration: --calibration FILE (plain text, or JSONL whose records hold "text", "instruction" or
"output" fields); the default is the AlpacaEval 1.0 instructions with their reference outputs
from the shared datasets, cut into --nsamples windows of --seqlen tokens. Memory: only one
decoder block's calibration activations are held at a time (its inputs and outputs); each block
is pruned, then run again to produce the next block's inputs, as the reference code does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import recipe as recipes
from .model_source import SourceError, checkpoint_for

METHODS = ("magnitude", "wanda", "sparsegpt")


class CompressError(Exception):
    pass


@dataclass(frozen=True)
class Sparsity:
    ratio: float  # share of zeros
    n: int = 0  # N:M (n zeros in every m); 0 = unstructured
    m: int = 0

    @classmethod
    def parse(cls, text: str) -> Sparsity:
        text = str(text).strip()
        if ":" in text:
            try:
                n, m = (int(x) for x in text.split(":"))
            except ValueError:
                raise CompressError(f"sparsity {text!r}: write N:M with integers, e.g. 2:4 or 4:8") from None
            if not 0 < n < m:
                raise CompressError(f"sparsity {text!r}: N:M needs 0 < N < M (N zeros in every M weights)")
            return cls(n / m, n, m)
        try:
            ratio = float(text)
        except ValueError:
            raise CompressError(f"sparsity {text!r}: give a share of zeros (0.5) or N:M (2:4)") from None
        if not 0 < ratio < 1:
            raise CompressError(f"sparsity {text!r}: the share of zeros must be between 0 and 1")
        return cls(ratio)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.n else f"{self.ratio:g}"


# -- masks from scores (shared by magnitude and wanda) -----------------------------------------


def nm_mask(score, n: int, m: int):
    """True where a weight is pruned: the n lowest scores in each group of m consecutive columns."""
    import torch

    rows, cols = score.shape
    if cols % m:
        raise CompressError(f"N:M sparsity needs the input width ({cols}) to be a multiple of M ({m})")
    groups = score.reshape(rows, cols // m, m)
    idx = torch.topk(groups, n, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return mask.reshape(rows, cols)


def magnitude_mask(weight, sp: Sparsity):
    import torch

    score = weight.abs().float()
    if sp.n:
        return nm_mask(score, sp.n, sp.m)
    mask = torch.zeros_like(score, dtype=torch.bool)
    k = int(score.numel() * sp.ratio)  # one threshold for the whole matrix
    if k:
        mask.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
    return mask


def wanda_mask(weight, sq_norm, sp: Sparsity):
    """sq_norm[j] = mean over calibration tokens of x_j^2 (Wanda's scaler_row)."""
    import torch

    score = weight.abs().float() * torch.sqrt(sq_norm.float()).reshape(1, -1)
    if sp.n:
        return nm_mask(score, sp.n, sp.m)
    k = int(score.shape[1] * sp.ratio)  # per output row
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def sparsegpt_prune(weight, hessian, sp: Sparsity, blocksize: int = 128, percdamp: float = 0.01):
    """SparseGPT on one weight matrix (out, in) with H = 2 X X^T / n (in, in); returns the pruned
    weight (same dtype) and the mask. Follows Algorithm 1 of the paper and its reference code."""
    import torch

    W = weight.detach().clone().float()
    H = hessian.detach().clone().float()
    cols = W.shape[1]
    dead = torch.diag(H) == 0  # inputs never active: the weight cannot matter
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    H += torch.eye(cols, dtype=H.dtype, device=H.device) * damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    mask = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if not sp.n:
            score = W1**2 / (torch.diag(Hinv1).reshape(1, -1) ** 2)
            k = int(score.numel() * sp.ratio)
            if k:
                mask1.view(-1)[torch.topk(score.reshape(-1), k, largest=False).indices] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if sp.n and i % sp.m == 0:
                score = W1[:, i : i + sp.m] ** 2 / (torch.diag(Hinv1)[i : i + sp.m].reshape(1, -1) ** 2)
                mask1.scatter_(1, i + torch.topk(score, sp.n, dim=1, largest=False).indices, True)
            q = w.clone()
            q[mask1[:, i]] = 0
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    W[mask] = 0  # exact zeros (the update above only ever writes q, but keep the invariant explicit)
    return W.to(weight.dtype), mask


# -- calibration ---------------------------------------------------------------------------------


def default_calibration_file() -> Path:
    """alpaca_eval/alpaca_eval.jsonl under $EVALKIT_DATA, else under ../shared/datasets beside the repo."""
    import os

    root = Path(os.environ["EVALKIT_DATA"]) if os.environ.get("EVALKIT_DATA") else Path(__file__).resolve().parents[2] / "shared" / "datasets"
    return root / "alpaca_eval" / "alpaca_eval.jsonl"


def calibration_text(path: Path | None) -> tuple[str, str]:
    """(text, description). JSONL records contribute their text-like fields; anything else is text."""
    path = path or default_calibration_file()
    if not path.is_file():
        raise CompressError(f"calibration file {path} not found: pass --calibration FILE (plain text or JSONL)")
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix in (".jsonl", ".json"):
        parts = []
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CompressError(f"{path} line {n}: not JSON ({e.msg}); give plain text with a .txt name instead") from None
            parts.extend(str(rec[k]) for k in ("text", "instruction", "output") if isinstance(rec, dict) and rec.get(k))
        raw = "\n\n".join(parts)
    if not raw.strip():
        raise CompressError(f"calibration file {path} holds no text")
    return raw, str(path)


def calibration_batches(tokenizer, text: str, nsamples: int, seqlen: int, seed: int = 0):
    """nsamples windows of seqlen tokens drawn from the tokenized text (Wanda/SparseGPT's recipe
    for C4), as a (nsamples, seqlen) LongTensor."""
    import torch

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() <= seqlen:
        raise CompressError(f"the calibration text has {ids.numel()} tokens, fewer than --seqlen {seqlen}: give more text or a smaller --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


# -- the layer-by-layer driver ----------------------------------------------------------------


def decoder_layers(model):
    """The list of decoder blocks of a causal LM (Llama/Mistral/Qwen/Gemma: model.model.layers;
    GPT-2 style: transformer.h; OPT: model.decoder.layers)."""
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return obj
    raise CompressError(f"cannot find the decoder layers of {type(model).__name__}: supported are Llama-like, GPT-2, OPT and NeoX models")


def linear_layers(block) -> dict[str, Any]:
    import torch

    return {name: mod for name, mod in block.named_modules() if isinstance(mod, torch.nn.Linear)}


class _StopForward(Exception):
    pass


def _block_inputs(model, layers, batches, device):
    """Run the embeddings once and catch what the first block receives (hidden states + kwargs)."""
    import torch

    inputs: list = []
    kwargs_box: dict = {}

    def catch(module, args, kwargs):
        inputs.append(args[0] if args else kwargs["hidden_states"])
        kwargs_box.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for row in batches:
            try:
                with torch.no_grad():
                    model(row.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    kwargs_box.pop("past_key_value", None)
    kwargs_box.pop("past_key_values", None)
    kwargs_box["use_cache"] = False
    return inputs, kwargs_box


def _run_block(block, inputs, kwargs):
    import torch

    outs = []
    with torch.no_grad():
        for x in inputs:
            y = block(x, **kwargs)
            outs.append(y[0] if isinstance(y, (tuple, list)) else y)
    return outs


def prune_model(model, batches, method: str, sp: Sparsity, device: str = "cpu", log=print) -> dict[str, Any]:
    """Prune `model` in place, block by block. batches: (nsamples, seqlen) token ids (unused by magnitude)."""
    import torch

    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    layers = decoder_layers(model)
    inputs, kwargs = ([], {}) if method == "magnitude" else _block_inputs(model, layers, batches, device)
    zeros = total = 0
    for li, block in enumerate(layers):
        linears = linear_layers(block)
        stats: dict[str, dict] = {}
        handles = []
        if method != "magnitude":
            for name, lin in linears.items():
                cols = lin.in_features
                stats[name] = {"n": 0, "acc": torch.zeros(cols, device=lin.weight.device) if method == "wanda"
                               else torch.zeros(cols, cols, device=lin.weight.device)}

                def hook(mod, args, out, name=name, stats=stats):
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    st = stats[name]
                    n_new = x.shape[0]
                    # running means over tokens (both reference implementations scale this way)
                    st["acc"] *= st["n"] / (st["n"] + n_new)
                    st["n"] += n_new
                    if method == "wanda":
                        st["acc"] += (x**2).sum(0) / st["n"]
                    else:
                        x = math.sqrt(2 / st["n"]) * x
                        st["acc"] += x.t() @ x

                handles.append(lin.register_forward_hook(hook))
            try:
                _run_block(block, inputs, kwargs)
            finally:
                for h in handles:
                    h.remove()
        for name, lin in linears.items():
            W = lin.weight.data
            if method == "magnitude":
                mask = magnitude_mask(W, sp)
                W[mask] = 0
            elif method == "wanda":
                mask = wanda_mask(W, stats[name]["acc"], sp)
                W[mask] = 0
            else:
                new, mask = sparsegpt_prune(W, stats[name]["acc"], sp)
                W.copy_(new)
            zeros += int((W == 0).sum())
            total += W.numel()
        stats.clear()
        if method != "magnitude":
            inputs = _run_block(block, inputs, kwargs)  # the pruned block's outputs feed the next block
        log(f"pruned block {li + 1}/{len(layers)}")
    return {"zeros": zeros, "weights": total, "measured_sparsity": zeros / total if total else 0.0}


def compress(model_path: str, out: Path, method: str, sparsity: str, calibration: Path | None = None, nsamples: int = 128,
             seqlen: int = 2048, device: str = "cpu", dtype: str = "auto", seed: int = 0, log=print) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sp = Sparsity.parse(sparsity)
    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}: choose from {', '.join(METHODS)}")
    if out.exists() and any(out.iterdir()):
        raise CompressError(f"{out} exists and is not empty: choose a new folder (nothing is overwritten)")
    t0 = time.time()
    try:  # a GGUF file or a packaged model's short name: its converted checkpoint
        checkpoint, source = checkpoint_for(model_path)
    except SourceError as e:
        raise CompressError(str(e)) from None
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype).to(device).eval()
    tok = AutoTokenizer.from_pretrained(checkpoint)
    batches, calib_desc = None, None
    if method != "magnitude":
        text, calib_desc = calibration_text(calibration)
        seqlen = min(seqlen, int(getattr(model.config, "max_position_embeddings", seqlen) or seqlen))
        batches = calibration_batches(tok, text, nsamples, seqlen, seed)
    summary = prune_model(model, batches, method, sp, device, log)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    options = {"method": method, "sparsity": str(sp), "nsamples": nsamples if batches is not None else 0,
               "seqlen": seqlen if batches is not None else 0, "seed": seed, "dtype": dtype}
    calib_file = calibration or (default_calibration_file() if batches is not None else None)
    step = {"intervention": "compress", "name": f"{method}-{sp}", "options": options, "calibration": calib_desc,
            "inputs": {"calibration": recipes.input_file(calib_file)} if calib_file else {},
            "versions": recipes.versions(), "figures": summary, "seconds": round(time.time() - t0, 2)}
    return recipes.write(out, model_path, source, step)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m servers.compress", description=__doc__.splitlines()[0])
    ap.add_argument("model", help="HF checkpoint folder, GGUF file, packaged short name (smollm2-135m), or hub id")
    ap.add_argument("out", type=Path, help="new folder for the pruned checkpoint")
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--sparsity", required=True, help="N:M (2:4, 4:8) or a share of zeros (0.5)")
    ap.add_argument("--calibration", type=Path, help="calibration text (.txt) or JSONL [AlpacaEval 1.0 instructions + outputs]")
    ap.add_argument("--nsamples", type=int, default=128, help="calibration windows [128]")
    ap.add_argument("--seqlen", type=int, default=2048, help="tokens per window, capped at the model's length [2048]")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N [cpu]")
    ap.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16 [auto]")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    try:
        recipe = compress(a.model, a.out, a.method, a.sparsity, a.calibration, a.nsamples, a.seqlen, a.device, a.dtype, a.seed,
                          log=lambda m: print(m, file=sys.stderr))
    except CompressError as e:
        print(f"compress: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(recipe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
