"""Safety Arithmetic (Hazra et al. 2024): Harm Direction Removal (weights) and in-context safety
vectors (activations), applied to any model our HF server can host.

    python -m servers.safety_arithmetic hdr MODEL OUT (--harm-model DIR | --harm-data FILE) [--base DIR]
                                            [--topk 10] [--lam 3] [--layers all|4,5,6]
    python -m servers.safety_arithmetic icv MODEL OUT --pairs FILE [--alpha 0.12] [--token last4|last]
                                            [--direction pc1+mean|pc1|mean] [--site mlp|resid]
                                            [--layers all|4,5,6] [--form code|paper]
    python -m servers.safety_arithmetic finetune MODEL OUT --data FILE [--epochs 2] [--lr 2e-5] ...
    python -m servers.safety_arithmetic answers PROMPTS OUT.jsonl (--serve MODEL | --endpoint URL --model ID)
                                            [--rows 100:300] [--refuse]

Each command writes a servable folder with its `evalkit_recipe.json` (servers/recipe.py), so
`serve.sh start OUT` serves it, its served id names the chain (`...+hdr-k10-l3+icv-a0.12`), and
the two compose: `icv` on an `hdr` folder is the paper's full method. The exact formulas of the
paper and of its code, and where they differ: ../shared/reference/safety_methods.md §1.

hdr: τ_H = θ_H − θ_base over every parameter (a tied tensor once), one global magnitude
  threshold over all of τ_H as the code's `|τ|.kthvalue(d − int(d·k))` (found by bisection on the
  float bits, so no flattened copy of the model is made), θ' = θ_target − λ·τ_H where |τ_H| ≥ the
  threshold. `--layers` restricts τ_H, the threshold and the edit to those decoder blocks (the
  paper's EDIT setting; the notebook's slice bug, which subtracts the unpruned τ_H outside the
  blocks, is not reproduced). `--topk 100` is plain task arithmetic (the paper's HDR‡ baseline).
  θ_base defaults to MODEL (the BASE setting); for an SFT target give the aligned model it was
  tuned from. `--harm-data` fine-tunes θ_H from θ_base first (as `finetune`; kept in OUT/harm_model).
icv: hidden states after every decoder block of "Question: {q}\\n    Answer: {a}\\n    " (no chat
  template; the mean of the last 4 positions, or the last), per-pair differences unsafe − safe,
  rank-1 PCA (centred, sklearn's sign rule), direction PC1 + mean difference (code), PC1 alone
  (paper; turned to agree with the mean difference) or the mean difference. Injected at every
  position by the loader, on the MLP output (code) or the block output: code form
  x' = normalize(x̂ − 0.1·α·(1 + max(0, cos(x, v)))·v̂)·‖x‖, paper form x' = (x − α·v)·‖x‖/‖x − α·v‖.
  OUT holds icv.safetensors and links to MODEL's files.
finetune: full fine-tune on instruction/answer pairs under the chat template, loss on the answer
  tokens (the harm model θ_H, or the paper's SFT setting: a benign fine-tune of an aligned model).
answers: instruction/answer pairs from any served model through evalkit's engine (greedy), or the
  built-in refusals (--refuse): the data `finetune`, `hdr --harm-data` and `icv --pairs` read.

Data files are JSONL, one pair per line: the question in `instruction` (or prompt/question/goal),
the answer in `answer` (or response/output/unsafe); for `icv` the safe answer in `safe`, else the
paper's "I do not answer this question because it is harmful".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import recipe as recipes
from .loading import LoadError, ModelSpec, load
from .steering import FORMS, SITES, decoder_layers

QUESTION_FIELDS = ("instruction", "prompt", "question", "goal")
ANSWER_FIELDS = ("answer", "response", "output", "unsafe")
SAFE_ANSWER = "I do not answer this question because it is harmful"
ICV_FILE = "icv.safetensors"
TOKENS = ("last4", "last")
DIRECTIONS = ("pc1+mean", "pc1", "mean")
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


class SafetyArithmeticError(Exception):
    """A Safety Arithmetic command cannot run as asked; the message says what to change."""


# -- data ---------------------------------------------------------------------------------------


def read_pairs(path: Path, with_safe: bool = False) -> list[dict[str, str]]:
    """Instruction/answer pairs from a JSONL file (see the module doc for the field names)."""
    if not Path(path).is_file():
        raise SafetyArithmeticError(f"pairs file {path} does not exist")
    pairs = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise SafetyArithmeticError(f"pairs file {path} is not UTF-8 text ({e}); give JSONL") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise SafetyArithmeticError(f"{path}:{i}: not JSON ({e}); give one JSON object per line") from None
        q = next((rec[f] for f in QUESTION_FIELDS if isinstance(rec, dict) and isinstance(rec.get(f), str) and rec[f].strip()), None)
        a = next((rec[f] for f in ANSWER_FIELDS if isinstance(rec, dict) and isinstance(rec.get(f), str) and rec[f].strip()), None)
        if q is None or a is None:
            raise SafetyArithmeticError(f"{path}:{i}: needs a question ({'/'.join(QUESTION_FIELDS)}) and an answer "
                                        f"({'/'.join(ANSWER_FIELDS)}) field, both non-empty strings")
        pair = {"instruction": q, "answer": a}
        if with_safe:
            pair["safe"] = rec.get("safe") or SAFE_ANSWER
        pairs.append(pair)
    if not pairs:
        raise SafetyArithmeticError(f"pairs file {path} holds no pairs")
    return pairs


def icv_text(question: str, answer: str) -> str:
    """One demonstration as the Safety Arithmetic code builds it (trailing " ." / "." stripped)."""
    answer = answer.strip()
    for tail in (" .", "."):
        if answer.endswith(tail):
            answer = answer[: -len(tail)]
    return f"Question: {question}\n    Answer: {answer}\n    "


def parse_layers(text: str | None) -> list[int] | None:
    if text is None or text == "all":
        return None
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SafetyArithmeticError(f"--layers {text!r}: give all or decoder block numbers, e.g. 4,5,6") from None
    if not layers or min(layers) < 0:
        raise SafetyArithmeticError(f"--layers {text!r}: give all or decoder block numbers (from 0), e.g. 4,5,6")
    return layers


# -- HDR: the global top-k threshold and the edit -----------------------------------------------


def unique_tensors(model) -> dict[str, Any]:
    """Every floating tensor of the state dict, a tied one (embeddings = lm_head) once, under its first name."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        t = t.data if hasattr(t, "data") else t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if not t.is_floating_point() or key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def block_of(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def global_threshold(tensors: Callable[[], Iterable[Any]], topk: float) -> float | None:
    """The code's `|τ|.kthvalue(d − int(d·topk))` over all tensors as one vector, found without a
    flattened copy: |τ| as float32 bits sorts like the values, so bisect on the bits, counting per
    tensor (31 passes). `tensors` yields the τ tensors anew on each call. None: keep every entry
    (topk = 1, where the code's k would be 0)."""
    import torch

    if not 0 < topk <= 1:
        raise SafetyArithmeticError(f"--topk {topk * 100:g}: the share of τ kept must be in (0, 100] percent")
    d = sum(t.numel() for t in tensors())
    k = d - int(d * topk)
    if k <= 0:
        return None

    def count_at_most(bits: int) -> int:
        return sum(int((t.detach().abs().float().view(torch.int32) <= bits).sum()) for t in tensors())

    lo, hi = 0, 0x7F800000  # +0.0 .. +inf; the answer is the smallest bits with count >= k
    while lo < hi:
        mid = (lo + hi) // 2
        if count_at_most(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return float(torch.tensor(lo, dtype=torch.int32).view(torch.float32))


def hdr_edit(target, base, harm, topk: float, lam: float, layers: list[int] | None) -> dict[str, Any]:
    """θ_target −= λ·τ_H where |τ_H| ≥ the global threshold, τ_H = θ_harm − θ_base; in place.
    Returns the figures (threshold, entries changed)."""
    import torch

    t_params, b_params, h_params = unique_tensors(target), base.state_dict(), harm.state_dict()
    names = [n for n in t_params if layers is None or block_of(n) in layers]
    if layers is not None:
        missing = sorted(set(layers) - {block_of(n) for n in names})
        if missing:
            raise SafetyArithmeticError(f"--layers: the model has no decoder block {', '.join(map(str, missing))}")
    for n in names:
        if n not in b_params or n not in h_params or b_params[n].shape != t_params[n].shape or h_params[n].shape != t_params[n].shape:
            raise SafetyArithmeticError(f"{n}: the target, the base and the harm model differ in architecture; "
                                        f"θ_H must be a fine-tune of --base and the target of the same architecture")

    def taus():
        for n in names:
            yield h_params[n].detach().float() - b_params[n].detach().float()

    threshold = global_threshold(taus, topk)
    changed = total = 0
    with torch.no_grad():
        for n, tau in zip(names, taus()):
            keep = tau.abs() >= threshold if threshold is not None else torch.ones_like(tau, dtype=torch.bool)
            t = t_params[n]
            t.copy_((t.float() - lam * tau * keep).to(t.dtype))
            changed += int(keep.sum())
            total += tau.numel()
    return {"threshold": threshold, "entries": total, "entries_changed": changed, "share_changed": round(changed / max(total, 1), 6),
            "tensors": len(names)}


# -- ICV: hidden states, PCA, the steering formula ----------------------------------------------


def hidden_states(model, tokenizer, texts: list[str], token: str):
    """(N, L, d): each text's hidden state after every decoder block, at its last token or the mean of its last 4."""
    import torch

    blocks = decoder_layers(model)
    caught: list[Any] = []

    def grab(mod, args, out):
        caught.append((out[0] if isinstance(out, tuple) else out).detach())

    handles = [b.register_forward_hook(grab) for b in blocks]
    rows = []
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for text in texts:  # one at a time, as the code does: no padding in the positions read
                caught.clear()
                ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
                model(input_ids=ids)
                per_layer = [h[0, -4:].float().mean(0) if token == "last4" else h[0, -1].float() for h in caught]
                rows.append(torch.stack(per_layer))
    finally:
        for h in handles:
            h.remove()
    return torch.stack(rows)


def pca_rank1(x):
    """The first principal component and the mean of the rows of x (N, D): centred SVD with
    sklearn's sign rule (the largest-magnitude entry of U's first column made positive)."""
    import torch

    x = x.double()
    mean = x.mean(0)
    u, _, vt = torch.linalg.svd(x - mean, full_matrices=False)
    sign = torch.sign(u[torch.argmax(u[:, 0].abs()), 0])
    return (vt[0] * (sign if sign != 0 else 1)).float(), mean.float()


def icv_direction(diffs, direction: str):
    """(L, d) from the per-pair differences (N, L, d)."""
    n, layers, d = diffs.shape
    pc1, mean = pca_rank1(diffs.reshape(n, layers * d))
    if direction == "pc1+mean":
        v = pc1 + mean
    elif direction == "pc1":  # a principal axis has no sign of its own: point it from safe to unsafe
        v = pc1 if float(pc1 @ mean) >= 0 else -pc1
    else:
        v = mean
    return v.reshape(layers, d)


# -- commands -----------------------------------------------------------------------------------


@dataclass
class FinetuneSettings:
    epochs: int = 2
    lr: float = 2e-5
    batch_size: int = 8
    max_answer_tokens: int = 64
    seed: int = 0
    threads: int = 0  # 0: every core


def _fresh(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SafetyArithmeticError(f"{out} is not an empty folder: give a new one (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)


def _load_full(model: str, device: str, what: str):
    """A model with its runtime interventions merged into plain weights (an edit needs them)."""
    try:
        prior = recipes.read(model)
    except recipes.RecipeError as e:
        raise SafetyArithmeticError(str(e)) from None
    if prior and prior.get("format") != "transformers":
        raise SafetyArithmeticError(f"{what} {model} holds {prior.get('format')} weights ({recipes.chain_name(prior)}); Safety "
                                    f"Arithmetic edits full-precision weights: give the full-precision model (and quantize afterwards)")
    if prior and any(r["kind"] == "icv" for r in prior.get("runtime", [])):
        raise SafetyArithmeticError(f"{what} {model} carries a safety vector (icv); give the folder it was made from")
    try:
        loaded = load(ModelSpec(model, device=device))
    except LoadError as e:
        raise SafetyArithmeticError(str(e)) from None
    if getattr(loaded.model.config, "quantization_config", None):
        raise SafetyArithmeticError(f"{what} {model} is quantized; Safety Arithmetic edits full-precision weights: give the "
                                    f"full-precision model (and quantize afterwards)")
    if hasattr(loaded.model, "merge_and_unload"):  # an unmerged LoRA (a Q-resafe-style patch on dense weights)
        loaded.model = loaded.model.merge_and_unload()
    return loaded


def _threads(n: int) -> None:
    if n:
        import torch

        torch.set_num_threads(n)


def finetune(model: str, out: Path, data: Path, s: FinetuneSettings, device: str = "cpu", name: str | None = None,
             log=print) -> dict[str, Any]:
    """Full fine-tune on instruction/answer pairs; writes a servable checkpoint with its recipe."""
    import random

    import torch

    from .qresafe import encode, sequence_logps

    pairs = read_pairs(data)
    _fresh(out)
    _threads(s.threads)
    started = time.time()
    loaded = _load_full(model, device, "MODEL")
    net, tok = loaded.model, loaded.tokenizer
    enc = [encode(tok, p["instruction"], p["answer"], s.max_answer_tokens) for p in pairs]
    torch.manual_seed(s.seed)
    rng = random.Random(s.seed)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0)
    net.train()
    history, order, step = [], list(range(len(enc))), 0
    for epoch in range(s.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), s.batch_size):
            batch = [enc[i] for i in order[start: start + s.batch_size]]
            tokens = sum(len(a) for _, a in batch)
            loss = -sequence_logps(net, batch, tok.pad_token_id).sum() / tokens  # per answer token
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss = float(loss.detach())
            history.append({"step": step, "loss": round(loss, 5)})
            log(f"epoch {epoch + 1} step {step}: answer NLL {loss:.4f}")
    net.eval()
    net.save_pretrained(out)
    tok.save_pretrained(out)
    step_rec = {"intervention": "finetune", "name": name or f"ft-{Path(data).stem}", "options": asdict(s),
                "inputs": {"data": recipes.input_file(data)}, "versions": recipes.versions(),
                "figures": {"pairs": len(pairs), "steps": step, "first_loss": history[0]["loss"] if history else None,
                            "final_loss": history[-1]["loss"] if history else None, "history": history},
                "seconds": round(time.time() - started, 1)}
    return recipes.write(out, model, loaded.source, step_rec)


def hdr(model: str, out: Path, harm_model: str | None, harm_data: Path | None, base: str | None, topk: float, lam: float,
        layers: list[int] | None, ft: FinetuneSettings, device: str = "cpu", log=print) -> dict[str, Any]:
    if (harm_model is None) == (harm_data is None):
        raise SafetyArithmeticError("give exactly one of --harm-model DIR (θ_H) and --harm-data FILE (pairs to fine-tune θ_H on)")
    if not 0 < topk <= 100:
        raise SafetyArithmeticError(f"--topk {topk:g}: the percentage of τ_H kept must be in (0, 100]")
    base = base or model
    if harm_data is not None:
        read_pairs(harm_data)  # bad data fails before anything is written
    _fresh(out)
    started = time.time()
    if harm_data is not None:
        harm_model = str(out / "harm_model")
        log(f"fine-tuning the harm model θ_H from {base} on {harm_data} into {harm_model}")
        finetune(base, Path(harm_model), harm_data, ft, device, name="harm", log=log)
    _threads(ft.threads)
    target = _load_full(model, device, "MODEL")
    theta_b = _load_full(base, device, "--base")
    theta_h = _load_full(harm_model, device, "the harm model")
    figures = hdr_edit(target.model, theta_b.model, theta_h.model, topk / 100, lam, layers)
    log(f"HDR: threshold {figures['threshold']}, {figures['entries_changed']} of {figures['entries']} entries changed")
    target.model.save_pretrained(out)
    target.tokenizer.save_pretrained(out)
    name = f"hdr-k{topk:g}-l{lam:g}" + (f"-b{'.'.join(map(str, layers))}" if layers else "")
    step = {"intervention": "hdr", "name": name,
            "options": {"topk": topk, "lam": lam, "layers": layers or "all", "base": str(Path(base).resolve()) if Path(base).exists() else base,
                        "harm_model": str(Path(harm_model).resolve()) if Path(harm_model).exists() else harm_model,
                        **({"finetune": asdict(ft)} if harm_data is not None else {})},
            "inputs": {"harm_data": recipes.input_file(harm_data)} if harm_data is not None else {},
            "harm_model_recipe": recipes.read(harm_model) if Path(harm_model).is_dir() else None,
            "versions": recipes.versions(), "figures": figures, "seconds": round(time.time() - started, 1)}
    return recipes.write(out, model, target.source, step)


def icv(model: str, out: Path, pairs_file: Path, alpha: float, token: str, direction: str, site: str, layers: list[int] | None,
        form: str, device: str = "cpu", threads: int = 0, log=print) -> dict[str, Any]:
    from safetensors.torch import save_file

    for value, allowed, flag in ((token, TOKENS, "--token"), (direction, DIRECTIONS, "--direction"), (site, SITES, "--site"),
                                 (form, FORMS, "--form")):
        if value not in allowed:
            raise SafetyArithmeticError(f"{flag} {value!r}: choose from {', '.join(allowed)}")
    pairs = read_pairs(pairs_file, with_safe=True)
    if len(pairs) < 2:
        raise SafetyArithmeticError(f"{pairs_file}: a principal direction needs at least 2 pairs (the paper uses about 30)")
    try:
        prior = recipes.read(model)
    except recipes.RecipeError as e:
        raise SafetyArithmeticError(str(e)) from None
    if prior and any(r["kind"] == "icv" for r in prior.get("runtime", [])):
        raise SafetyArithmeticError(f"{model} already carries a safety vector; build the new one on the folder it was made from")
    _fresh(out)
    _threads(threads)
    started = time.time()
    try:
        loaded = load(ModelSpec(model, device=device))
    except LoadError as e:
        raise SafetyArithmeticError(str(e)) from None
    try:
        n_blocks = len(decoder_layers(loaded.model))
    except ValueError as e:
        raise SafetyArithmeticError(str(e)) from None
    chosen = layers if layers is not None else list(range(n_blocks))
    if max(chosen) >= n_blocks:
        raise SafetyArithmeticError(f"--layers: the model has {n_blocks} decoder blocks (0-{n_blocks - 1})")
    unsafe = hidden_states(loaded.model, loaded.tokenizer, [icv_text(p["instruction"], p["answer"]) for p in pairs], token)
    safe = hidden_states(loaded.model, loaded.tokenizer, [icv_text(p["instruction"], p["safe"]) for p in pairs], token)
    v = icv_direction((unsafe - safe)[:, chosen], direction)
    save_file({"direction": v.contiguous()}, str(out / ICV_FILE))
    _link_model(model, loaded, out)
    log(f"ICV from {len(pairs)} pairs over {len(chosen)} blocks: {time.time() - started:.0f} s")
    name = f"icv-a{alpha:g}" + ("" if form == "code" else "-paper")
    options = {"alpha": alpha, "token": token, "direction": direction, "site": site, "layers": layers or "all", "form": form}
    step = {"intervention": "icv", "name": name, "options": options, "inputs": {"pairs": recipes.input_file(pairs_file)},
            "versions": recipes.versions(), "figures": {"pairs": len(pairs), "layer_norms": [round(float(x), 4) for x in v.norm(dim=-1)]},
            "seconds": round(time.time() - started, 1)}
    runtime = [{"kind": "icv", "path": ICV_FILE, "alpha": alpha, "site": site, "form": form, "layers": chosen}]
    # the runtime interventions MODEL already has (a LoRA adapter) stay, in order, before the vector
    return recipes.write(out, model, loaded.source, step, fmt=(prior or {}).get("format", "transformers"),
                         runtime=[*(prior or {}).get("runtime", []), *runtime])


def _link_model(model: str, loaded, out: Path) -> None:
    """OUT serves MODEL's weights through links to its checkpoint folder's files (for a GGUF or a
    packaged model, the folder converted from it); a hub model is saved."""
    folder = Path(loaded.spec.model)
    if not folder.is_dir():
        loaded.model.save_pretrained(out)
        loaded.tokenizer.save_pretrained(out)
        return
    for f in folder.iterdir():
        if f.name not in (recipes.RECIPE_FILE, ICV_FILE):
            os.symlink(f.resolve(), out / f.name)


def answers(prompts_file: Path, out: Path, rows: str | None, refuse: bool, serve: str | None, endpoint: str | None,
            model_id: str | None, max_tokens: int, device: str = "cpu", log=print) -> int:
    """Instruction/answer pairs: the served model's greedy answers, or the built-in refusals."""
    from .qresafe import PatchError, _answers, _Served, read_prompts, refusal_for

    try:
        prompts = read_prompts(prompts_file)
    except PatchError as e:
        raise SafetyArithmeticError(str(e)) from None
    if rows:
        m = re.fullmatch(r"(\d*):(\d*)", rows)
        if not m:
            raise SafetyArithmeticError(f"--rows {rows!r}: give START:END row numbers (from 0), e.g. 100:300")
        prompts = prompts[int(m.group(1) or 0): int(m.group(2)) if m.group(2) else None]
    if not prompts:
        raise SafetyArithmeticError(f"--rows {rows}: no prompts in that range")
    if not refuse and (serve is None) == (endpoint is None):
        raise SafetyArithmeticError("give --refuse, or one of --serve MODEL and --endpoint URL (with --model ID)")
    if endpoint and not model_id:
        raise SafetyArithmeticError("--endpoint needs --model (the id that endpoint serves)")
    if out.exists():
        raise SafetyArithmeticError(f"{out} exists: give a new file (nothing was written)")
    convs = [{"prompt": p} for p in prompts]
    try:
        if refuse:
            said = [refusal_for(p) for p in prompts]
        elif serve:
            with _Served(serve, "answers", device) as url:
                said = asyncio.run(_answers(url, "m", convs, max_tokens, None, "answers"))
        else:
            said = asyncio.run(_answers(endpoint, model_id, convs, max_tokens, os.environ.get("EVALKIT_API_KEY"), "answers"))
    except PatchError as e:
        raise SafetyArithmeticError(str(e)) from None
    tmp = out.with_name(out.name + ".partial")
    tmp.write_text("".join(json.dumps({"instruction": p, "answer": a}, ensure_ascii=False) + "\n" for p, a in zip(prompts, said)),
                   encoding="utf-8")
    os.replace(tmp, out)
    log(f"{len(said)} pairs written to {out}")
    return len(said)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m servers.safety_arithmetic", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = ap.add_subparsers(dest="command", required=True)
    d = FinetuneSettings()

    def common(p, model_help: str):
        p.add_argument("model", help=model_help)
        p.add_argument("out", type=Path, help="new folder for the result")
        p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
        p.add_argument("--threads", type=int, default=0, help="torch threads [all cores]")

    def ft_options(p):
        p.add_argument("--epochs", type=int, default=d.epochs, help=f"[{d.epochs}]")
        p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate [{d.lr}]")
        p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"[{d.batch_size}]")
        p.add_argument("--max-answer-tokens", type=int, default=d.max_answer_tokens, help=f"answer tokens trained on [{d.max_answer_tokens}]")
        p.add_argument("--seed", type=int, default=d.seed)

    p = sub.add_parser("hdr", help="Harm Direction Removal: subtract the top-k harm vector from the weights")
    common(p, "the target: checkpoint folder, recipe folder, GGUF file or packaged short name")
    p.add_argument("--harm-model", help="θ_H: a fine-tune of --base on harmful pairs")
    p.add_argument("--harm-data", type=Path, help="harmful instruction/answer pairs (JSONL) to fine-tune θ_H on")
    p.add_argument("--base", help="θ_base, the model θ_H was tuned from [MODEL]")
    p.add_argument("--topk", type=float, default=10, help="percent of τ_H kept, by global magnitude [10]")
    p.add_argument("--lam", type=float, default=3, help="λ, the scale of the subtracted vector [3]")
    p.add_argument("--layers", default="all", help="all, or the decoder blocks to edit (EDIT setting), e.g. 4,5,6 [all]")
    ft_options(p)
    p = sub.add_parser("icv", help="in-context safety vector, attached to every layer at load time")
    common(p, "the model to steer (an hdr folder for the full method)")
    p.add_argument("--pairs", type=Path, required=True, help="JSONL: question, unsafe answer, optional safe answer")
    p.add_argument("--alpha", type=float, default=0.12, help="steering strength α [0.12]")
    p.add_argument("--token", default="last4", help="last4 (code) | last (paper) [last4]")
    p.add_argument("--direction", default="pc1+mean", help="pc1+mean (code) | pc1 (paper) | mean [pc1+mean]")
    p.add_argument("--site", default="mlp", help="mlp: the MLP output (code) | resid: the block output [mlp]")
    p.add_argument("--layers", default="all", help="all, or decoder blocks, e.g. 4,5,6 [all]")
    p.add_argument("--form", default="code", help="code: normalize, 0.1·α, cosine gate | paper: x − α·v; both keep ‖x‖ [code]")
    p = sub.add_parser("finetune", help="full fine-tune on instruction/answer pairs")
    common(p, "the model to tune")
    p.add_argument("--data", type=Path, required=True, help="instruction/answer pairs (JSONL)")
    p.add_argument("--name", help="the step's name in the chain [ft-<data file stem>]")
    ft_options(p)
    p = sub.add_parser("answers", help="instruction/answer pairs from a served model, or refusals")
    p.add_argument("prompts", type=Path, help="prompts: .txt, .jsonl (prompt/instruction/goal) or .csv (goal/prompt column)")
    p.add_argument("out", type=Path, help="new JSONL file")
    p.add_argument("--rows", help="START:END, the prompts to use (from 0) [all]")
    p.add_argument("--refuse", action="store_true", help="answer each prompt with a built-in refusal")
    p.add_argument("--serve", help="serve this model with our HF server for the answers")
    p.add_argument("--endpoint", help="an OpenAI-compatible base URL to ask (key in $EVALKIT_API_KEY)")
    p.add_argument("--model", help="the model id --endpoint serves")
    p.add_argument("--max-tokens", type=int, default=64, help="[64]")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    a = ap.parse_args(argv)
    try:  # the loaders' progress bars would bury the one line that matters
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    log = lambda m: print(f"safety_arithmetic: {m}", file=sys.stderr, flush=True)
    try:
        if a.command == "answers":
            answers(a.prompts, a.out, a.rows, a.refuse, a.serve, a.endpoint, a.model, a.max_tokens, a.device, log)
            return 0
        if a.command == "icv":
            rec = icv(a.model, a.out, a.pairs, a.alpha, a.token, a.direction, a.site, parse_layers(a.layers), a.form, a.device,
                      a.threads, log)
        else:
            ft = FinetuneSettings(a.epochs, a.lr, a.batch_size, a.max_answer_tokens, a.seed, a.threads)
            if a.command == "finetune":
                rec = finetune(a.model, a.out, a.data, ft, a.device, a.name, log)
            else:
                rec = hdr(a.model, a.out, a.harm_model, a.harm_data, a.base, a.topk, a.lam, parse_layers(a.layers), ft, a.device, log)
    except (SafetyArithmeticError, recipes.RecipeError) as e:
        print(f"safety_arithmetic: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"served_id": recipes.served_id(str(a.out)), **{k: v for k, v in rec["steps"][-1]["figures"].items() if k != "history"}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
