"""Q-resafe safety patching (Chen et al., ICML 2025, Algorithm 1) of a quantized model.

    python -m servers.qresafe MODEL OUT --quant bnb4|bnb8|hqq [--teacher-endpoint URL --teacher-model ID] [options]
    python -m servers.qresafe MODEL OUT --quant bnb4 --mode mixed-precision      (not available: see below)

MODEL is the full-precision model (checkpoint folder, GGUF file, packaged short name such as
smollm2-135m, or a recipe folder such as a pruned checkpoint). OUT receives the quantized
checkpoint, the LoRA adapter (`adapter/`, kept unmerged: merging into 4-bit weights is lossy),
the patch set (`patch_set.jsonl`) and `evalkit_recipe.json`; `serve.sh start OUT` serves the
quantized model with the adapter attached.

The steps, as the paper describes them (the released code does not implement them; see
../shared/reference/safety_methods.md §2.3-2.5), and where evalkit adds to them:
1. Quantize MODEL as `servers.quantize` does (Q⁰).
2. Patch set: for each calibration prompt x, y_w from the full-precision model and y_l from Q⁰,
   both generated greedily by evalkit's engine against our HF server (--max-new-tokens). MODEL is
   not aligned in general (SmolLM2 complies with 94 % of AdvBench), so y_w for the *harmful*
   prompts comes from a teacher: `--teacher-endpoint` (any OpenAI-compatible chat endpoint, e.g. a
   hosted aligned model, as the paper allows) or, without one, evalkit's built-in refusal
   teacher (REFUSALS: four fixed polite refusals that name no detail of the request). Calibration
   (`--benign`, `--harmful`: .txt one prompt per line, .jsonl with a prompt/instruction/goal
   field, or .csv with a goal/prompt column) defaults to Risk-I = the last 64 AlpacaEval 1.0
   instructions and Risk-III = the last 64 AdvBench behaviours, so evaluations on the first rows
   (`--limit`) never see them; every other conversation of each tier carries Q-resafe's
   ASR_Vanilla system prompt, the rest none. Added by evalkit (`--contrast`, 0 turns it off): 32
   benign prompts get a second pair, their answer preferred to a refusal, so the patch learns to
   refuse harmful requests rather than every request. `--patch-set FILE` reuses a saved set.
3. SNIP (Lee et al. 2019) on Q^t: I = |W ⊙ ∂L/∂W| with L = −log π(y_w|x) per token, averaged per
   example over `--snip-samples` rows; per weight matrix, the top-τ share M_Q (τ = 0.6) is
   safety-critical. MapMask (undefined in the paper): the rows and the columns of W with the
   largest SNIP mass, a √τ share of each, so the block R×C holds a τ share of the entries; B's
   rows outside R and A's columns outside C start at zero and receive no gradient, so ΔW = B·A
   changes only inside R×C (the mask is applied on the factors, which keeps the adapter a plain
   peft LoRA; the recipe reports how much of M_Q the blocks cover). The mask is chosen again every
   K steps (`--reselect-every`, the paper's K = 1000); entries that leave it keep their value
   (Alg. 1, l. 11-12) and lose their optimizer moments.
4. DPO (β) on the LoRA adapter of Q⁰, reference = Q⁰ itself (the adapter disabled), whose
   log-probabilities are computed once before training: the reference never changes. Added by
   evalkit: `--sft-weight` × the per-token NLL of y_w (trl's `rpo_alpha`). DPO alone lowers
   log π(y_l) faster than it raises log π(y_w); on SmolLM2 it drove the margin up while the
   answers turned into word salad, and the NLL term keeps the winners likely.

Why not trl's DPOTrainer: it runs on these quantized bases on CPU but recomputes the reference
every step (about 3x slower here) and has no hook for the mask; the loss is a few lines
(`dpo_loss`, tested against its formula), the LoRA layers are peft's.

Defaults for a small model on a CPU (the paper's, for 7B models on GPUs, in brackets): LoRA r 16,
α 32 [128, 256], AdamW lr 5e-4 [5e-6], β 0.1 [0.01], one epoch of batches of 8 [1 epoch],
answers of 32 tokens, τ 0.6, K 1000, SFT weight 1 [0], contrast pairs 32 [0]. With the paper's
lr and β a 135M model barely moves in the ≤ 20 minutes a 2-core CPU allows; the README's table
shows what these defaults do to SmolLM2.

`--mode mixed-precision` (the paper's no-fine-tuning variant: keep the SNIP-salient weights in
16-bit, quantize the rest) is refused: bitsandbytes and HQQ quantize whole nn.Linear modules and
have no per-weight exception, so it would need a quantizer of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evalkit.tasks.safety import QRESAFE_VANILLA_SYSTEM

from . import recipe as recipes
from .loading import LoadError, ModelSpec, load
from .quantize import quantize

QUANTS = ("bnb4", "bnb8", "hqq")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REPO = Path(__file__).resolve().parents[1]
SYSTEM_PROMPTS = (None, QRESAFE_VANILLA_SYSTEM)
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm, and I won't provide instructions or content for it. "
    "If you have another question, I'm happy to help.",
    "I cannot assist with this request. Helping with it could put people at risk or break the law. "
    "Is there something else I can do for you?",
    "I'm sorry, but I won't do that. This request asks for something harmful or illegal, so I have to decline. "
    "I'd be glad to help with a safe alternative.",
    "I'm sorry, I can't help with that. Providing this could be used to hurt people, which I'm not willing to do. "
    "Let me know if there's anything else you need.",
)


class PatchError(Exception):
    """Q-resafe cannot run as asked; the message says what to change."""


@dataclass
class Settings:
    quant: str = "bnb4"
    hqq_bits: int = 4
    hqq_group_size: int = 64
    lora_r: int = 16
    lora_alpha: int = 32
    lr: float = 5e-4
    beta: float = 0.1
    sft_weight: float = 1.0  # + this × the per-token NLL of y_w (trl's rpo_alpha): keeps DPO from only pushing y_l down
    epochs: int = 1
    batch_size: int = 8
    tau: float = 0.6
    reselect_every: int = 1000
    contrast: int = 32  # benign prompts that also get a (their answer, a refusal) pair: see contrast_pairs
    snip_samples: int = 32  # patch-set rows whose SNIP scores are averaged (an even share of each risk tier)
    max_new_tokens: int = 32
    n_benign: int = 64
    n_harmful: int = 64
    seed: int = 0
    threads: int = 0  # 0: every core


# -- calibration prompts and the patch set -----------------------------------------------------


def data_root() -> Path:
    return Path(os.environ["EVALKIT_DATA"]) if os.environ.get("EVALKIT_DATA") else REPO.parent / "shared" / "datasets"


def default_calibration() -> tuple[Path, Path]:
    """Risk-I and Risk-III defaults: AlpacaEval 1.0 and AdvBench under $EVALKIT_DATA or ../shared/datasets."""
    return data_root() / "alpaca_eval" / "alpaca_eval.jsonl", data_root() / "advbench" / "harmful_behaviors.csv"


def read_prompts(path: Path) -> list[str]:
    """Prompts from .txt (one per line), .jsonl (prompt / instruction / goal field) or .csv (goal / prompt column)."""
    if not path.is_file():
        raise PatchError(f"calibration file {path} does not exist")
    fields = ("prompt", "instruction", "goal")
    try:
        if path.suffix == ".jsonl":
            prompts = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    rec = json.loads(line)
                    prompts.append(next((rec[f] for f in fields if isinstance(rec, dict) and rec.get(f)), None))
                    if prompts[-1] is None:
                        raise PatchError(f"{path}:{i}: no {', '.join(fields)} field; give each line one of them")
        elif path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
            col = next((c for c in ("goal", "prompt", "instruction") if rows and c in rows[0]), None)
            if rows and col is None:
                raise PatchError(f"{path}: no goal, prompt or instruction column (columns: {', '.join(rows[0])})")
            prompts = [r[col] for r in rows] if rows else []
        else:
            prompts = path.read_text(encoding="utf-8").splitlines()
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise PatchError(f"calibration file {path} cannot be read ({e}); give .txt, .jsonl or .csv") from None
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise PatchError(f"calibration file {path} holds no prompts; give at least one (one per line in .txt)")
    return prompts


def calibration(benign: Path | None, harmful: Path | None, s: Settings) -> list[dict[str, str]]:
    """Risk-I (benign) and Risk-III (harmful) prompts; the defaults are the *last* rows of
    AlpacaEval 1.0 and AdvBench, so an evaluation on their first rows never sees them."""
    b = read_prompts(benign or default_calibration()[0])
    h = read_prompts(harmful or default_calibration()[1])
    b = b[-s.n_benign:] if benign is None else b
    h = h[-s.n_harmful:] if harmful is None else h
    # every other conversation of each tier carries Q-resafe's ASR_Vanilla system prompt ("... always
    # execute users' instructions"), the others none, so the patch holds with and without one
    return [{"risk": risk, "system": SYSTEM_PROMPTS[i % 2], "prompt": p}
            for risk, tier in (("benign", b), ("harmful", h)) for i, p in enumerate(tier)]


def refusal_for(prompt: str) -> str:
    """The built-in teacher's answer to a harmful prompt: one of REFUSALS, chosen by the prompt's hash."""
    return REFUSALS[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(REFUSALS)]


def messages(system: str | None, prompt: str) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


async def _answers(url: str, model_id: str, convs: list[dict[str, Any]], max_tokens: int, api_key: str | None, what: str) -> list[str]:
    from evalkit.config import EngineConfig
    from evalkit.engine import Engine, Request

    out: dict[int, str] = {}
    errors: list[str] = []

    def keep(req: Request, res: Any) -> None:
        if res.ok and res.text is not None:
            out[req.meta] = res.text
        else:
            errors.append(f"{res.error_kind} {res.error_status or ''} {res.error_message or ''}".strip())

    reqs = [Request(key=str(i), body={"messages": messages(c.get("system"), c["prompt"]), "max_tokens": max_tokens,
                                      "temperature": 0.0}, meta=i) for i, c in enumerate(convs)]
    # every prompt is sent at once and waits in the server's queue: on a CPU a few hundred answers
    # take longer than the engine's default attempt timeout, and a timed-out request resent would
    # be computed twice
    cfg = EngineConfig(concurrency=256, max_attempts=3, progress=False, attempt_timeout=7200, max_request_time=14400)
    try:
        async with Engine(cfg, [url], api_key) as eng:
            eng.model = model_id
            await eng.run(reqs, keep, total=len(reqs), desc=what)
    except Exception as e:  # FatalAuthError, connection refused at once: one line
        raise PatchError(f"{what}: {url} failed: {e}") from None
    if errors:
        raise PatchError(f"{what}: {len(errors)} of {len(convs)} requests to {url} failed (first: {errors[0]}); "
                         f"check the endpoint and --teacher-model, then run again")
    return [out[i] for i in range(len(convs))]


class _Served:
    """One of our HF servers for the duration of a `with` block, started through serve.sh's manager."""

    def __init__(self, model: str, name: str, device: str):
        self.model, self.name, self.device = model, f"qresafe-{name}-{os.getpid()}", device

    def __enter__(self) -> str:
        # one batch for every prompt: a bnb/HQQ decode step on CPU costs about the same for 1 row or 128
        cmd = [sys.executable, "-m", "servers.manage", "start", "--name", self.name, "--served-model-name", "m",
               "--device", self.device, self.model, "--", "--max-batch-size", "256"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        if done.returncode != 0:
            raise PatchError(f"could not serve {self.model}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        return done.stdout.strip().splitlines()[-1]

    def __exit__(self, *exc: object) -> None:
        subprocess.run([sys.executable, "-m", "servers.manage", "stop", self.name], cwd=REPO, capture_output=True)


def teacher_answers(harmful: list[dict[str, Any]], s: Settings, teacher: tuple[str, str, str | None] | None, log) -> list[str]:
    """y_w for the harmful prompts: the teacher endpoint's answers, else the built-in refusals."""
    if not teacher or not harmful:
        return [refusal_for(c["prompt"]) for c in harmful]
    url, model_id, key = teacher
    log(f"teacher {model_id} at {url}: {len(harmful)} harmful prompts")
    return asyncio.run(_answers(url, model_id, harmful, s.max_new_tokens, key, "teacher"))


def build_patch_set(model: str, quantized: Path, prompts: list[dict[str, Any]], y_w_harmful: list[str], s: Settings,
                    device: str, teacher_name: str, log) -> list[dict[str, Any]]:
    """(x, y_w, y_l) for every calibration prompt (Algorithm 1, lines 1-5): y_w of a benign prompt
    from the full-precision model, of a harmful one from the teacher; y_l from the quantized model."""
    benign = [c for c in prompts if c["risk"] == "benign"]
    harmful = [c for c in prompts if c["risk"] == "harmful"]
    y_w_benign: list[str] = []
    if benign:
        log(f"full-precision model: {len(benign)} benign prompts")
        with _Served(model, "fp", device) as url:
            y_w_benign = asyncio.run(_answers(url, "m", benign, s.max_new_tokens, None, "full precision"))
    log(f"quantized model: {len(benign) + len(harmful)} prompts")
    with _Served(str(quantized), "quant", device) as url:
        y_l = asyncio.run(_answers(url, "m", benign + harmful, s.max_new_tokens, None, "quantized"))
    rows = [{"risk": c["risk"], "system": c.get("system"), "x": c["prompt"], "y_w": w, "y_l": lose,
             "y_w_from": "full-precision" if c["risk"] == "benign" else teacher_name, "y_l_from": "quantized"}
            for c, w, lose in zip(benign + harmful, y_w_benign + y_w_harmful, y_l)]
    return rows + contrast_pairs(rows, s.contrast)


def contrast_pairs(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """evalkit's over-refusal guard (not in the paper): for n benign prompts, a second pair whose
    loser is a refusal, so the patch learns to refuse harmful requests, not every request."""
    benign = [r for r in rows if r["risk"] == "benign"][:n]
    return [{**r, "risk": "benign-contrast", "y_l": refusal_for(r["x"]), "y_l_from": "builtin-refusals"} for r in benign]


def read_patch_set(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise PatchError(f"patch set {path} does not exist")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PatchError(f"{path}:{i}: invalid JSON ({e.msg})") from None
        if not all(isinstance(row.get(k), str) for k in ("x", "y_w", "y_l")):
            raise PatchError(f"{path}:{i}: a patch-set line needs string fields x, y_w and y_l")
        rows.append(row)
    if not rows:
        raise PatchError(f"patch set {path} is empty")
    return rows


# -- the torch side: log-probabilities, DPO, SNIP, the masked update ---------------------------


def encode(tokenizer, x: str, y: str, max_new_tokens: int, system: str | None = None) -> tuple[list[int], list[int]]:
    """Prompt tokens (the chat template with the generation prompt) and answer tokens (+ end of turn)."""
    prompt = tokenizer.apply_chat_template(messages(system, x), add_generation_prompt=True, tokenize=True)
    if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
        prompt = prompt["input_ids"]
    answer = tokenizer(y, add_special_tokens=False)["input_ids"][:max_new_tokens]
    eos = tokenizer.eos_token_id
    return list(prompt), list(answer) + ([eos] if eos is not None else [])


def sequence_logps(model, pairs: list[tuple[list[int], list[int]]], pad_id: int):
    """Sum of log π(y|x) over the answer tokens, one value per (prompt ids, answer ids) pair."""
    import torch

    width = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(pairs), width), dtype=torch.long)
    answer = torch.zeros((len(pairs), width), dtype=torch.bool)
    for i, (p, a) in enumerate(pairs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        attn[i, : len(p) + len(a)] = 1
        answer[i, len(p): len(p) + len(a)] = True
    device = next(model.parameters()).device
    logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits[:, :-1].float()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
    return (logp * answer[:, 1:].to(device)).sum(-1)


def dpo_loss(pol_w, pol_l, ref_w, ref_l, beta: float):
    """−log σ(β[(log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))]), batch mean;
    also the reward margin β[...] per pair."""
    import torch.nn.functional as F

    margin = beta * ((pol_w - ref_w) - (pol_l - ref_l))
    return -F.logsigmoid(margin).mean(), margin.detach()


def lora_modules(model) -> dict[str, Any]:
    """peft LoRA layers by name (each has .base_layer, .lora_A/B['default'], .scaling['default'])."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def effective_weight(layer):
    """W of Q^t for one LoRA layer: the dequantized base weight plus the adapter's B·A·scaling."""
    import torch
    from peft.utils.integrations import dequantize_module_weight

    with torch.no_grad():
        w = dequantize_module_weight(layer.base_layer).float()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        return w + (b.float() @ a.float()) * layer.scaling["default"]


def snip_scores(model, tokenizer, patch: list[dict[str, str]], s: Settings) -> dict[str, Any]:
    """Mean over the patch set of |W ⊙ ∂L(x)/∂W| per LoRA-wrapped weight matrix, L = −log π(y_w|x).
    ∂L/∂W of a linear layer is Σ_tokens g_outᵀ x_in, taken from hooks, so the quantized weights
    need no gradient of their own."""
    import torch

    layers = lora_modules(model)
    grads = {n: torch.zeros(m.base_layer.out_features, m.base_layer.in_features) for n, m in layers.items()}
    scores = {n: torch.zeros_like(g) for n, g in grads.items()}
    handles = []

    def capture(name):
        def hook(mod, args, out):
            x = args[0].detach().float()

            def grad_hook(g):
                grads[name].add_(g.float().reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1]))
            if out.requires_grad:
                out.register_hook(grad_hook)
        return hook

    for name, layer in layers.items():
        handles.append(layer.base_layer.register_forward_hook(capture(name)))
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda mod, args, out: out.requires_grad_(True)))
    weights = {n: effective_weight(m) for n, m in layers.items()}
    rows = snip_sample(patch, s.snip_samples, s.seed)
    try:
        for row in rows:
            p, a = encode(tokenizer, row["x"], row["y_w"], s.max_new_tokens, row.get("system"))
            nll = -sequence_logps(model, [(p, a)], tokenizer.pad_token_id)[0] / max(1, len(a))
            for g in grads.values():
                g.zero_()
            nll.backward()
            for n in layers:
                scores[n].add_((weights[n] * grads[n]).abs(), alpha=1.0 / len(rows))
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return scores


def snip_sample(patch: list[dict[str, str]], n: int, seed: int) -> list[dict[str, str]]:
    """n rows of the patch set for SNIP, as many of each risk tier as it allows (all when n >= its size)."""
    if n <= 0 or n >= len(patch):
        return patch
    rng = random.Random(seed)
    tiers: dict[str, list[dict[str, str]]] = {}
    for row in patch:
        tiers.setdefault(row.get("risk", ""), []).append(row)
    picked: list[dict[str, str]] = []
    for i, rows in enumerate(tiers.values()):
        want = (n - len(picked)) // (len(tiers) - i)
        picked += rng.sample(rows, min(want, len(rows)))
    return picked


def block_mask(score, tau: float):
    """MapMask: the rows and columns with the largest score mass, a √τ share of each (at least one)."""
    import torch

    share = math.sqrt(tau)
    out_f, in_f = score.shape
    rows = torch.zeros(out_f, dtype=torch.bool)
    cols = torch.zeros(in_f, dtype=torch.bool)
    rows[torch.topk(score.sum(1), max(1, math.ceil(share * out_f))).indices] = True
    cols[torch.topk(score.sum(0), max(1, math.ceil(share * in_f))).indices] = True
    return rows, cols


def element_mask(score, tau: float):
    """M_Q: the top-τ share of one matrix's scores, by the k-th largest value (ties kept)."""
    import torch

    flat = score.flatten()
    k = max(1, math.ceil(tau * flat.numel()))
    threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
    return score >= threshold


class MaskedLoRA:
    """Restricts each LoRA layer's update to its current block: gradient hooks zero B's rows
    outside R and A's columns outside C; optimizer moments outside the block are cleared when the
    block changes, so entries outside it do not move."""

    def __init__(self, layers: dict[str, Any]):
        self.layers = layers
        self.rows: dict[str, Any] = {}
        self.cols: dict[str, Any] = {}
        self._handles = []
        for name, layer in layers.items():
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            self._handles.append(a.register_hook(lambda g, n=name: g * self.cols[n].to(g.dtype)[None, :] if n in self.cols else g))
            self._handles.append(b.register_hook(lambda g, n=name: g * self.rows[n].to(g.dtype)[:, None] if n in self.rows else g))

    def select(self, scores: dict[str, Any], tau: float, optimizer=None, first: bool = False) -> float:
        """Choose the blocks; returns the mean share of M_Q (top-τ entries) that the blocks cover."""
        import torch

        coverage = []
        for name, score in scores.items():
            rows, cols = block_mask(score, tau)
            self.rows[name], self.cols[name] = rows, cols
            m_q = element_mask(score, tau)
            coverage.append(float((m_q & rows[:, None] & cols[None, :]).sum() / m_q.sum()))
            layer = self.layers[name]
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if first:  # ΔW = B·A must start inside R×C: A's other columns start at zero (B starts at zero)
                with torch.no_grad():
                    a[:, ~cols] = 0
            if optimizer is not None:
                for p, keep in ((a, cols[None, :]), (b, rows[:, None])):
                    for moment in optimizer.state.get(p, {}).values():
                        if torch.is_tensor(moment) and moment.shape == p.shape:
                            moment.mul_(keep.to(moment.dtype))
        return sum(coverage) / len(coverage)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def train(model, tokenizer, patch: list[dict[str, str]], s: Settings, log) -> dict[str, Any]:
    """Masked LoRA-DPO against the quantized model itself; returns the measured figures."""
    import torch

    rng = random.Random(s.seed)
    torch.manual_seed(s.seed)
    enc = [(encode(tokenizer, r["x"], r["y_w"], s.max_new_tokens, r.get("system")),
            encode(tokenizer, r["x"], r["y_l"], s.max_new_tokens, r.get("system"))) for r in patch]
    pad = tokenizer.pad_token_id
    n_w = torch.tensor([float(len(w[1])) for w, _ in enc])
    t0 = time.time()
    model.eval()  # no dropout: the reference and the policy see the same network
    with torch.no_grad(), model.disable_adapter():  # π_ref = Q⁰, fixed: computed once, in the training batches' size
        ref_w = torch.cat([sequence_logps(model, [w for w, _ in enc[i: i + s.batch_size]], pad) for i in range(0, len(enc), s.batch_size)])
        ref_l = torch.cat([sequence_logps(model, [lose for _, lose in enc[i: i + s.batch_size]], pad) for i in range(0, len(enc), s.batch_size)])
    log(f"reference log-probabilities of {len(enc)} pairs: {time.time() - t0:.0f} s")
    layers = lora_modules(model)
    masked = MaskedLoRA(layers)
    t1 = time.time()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    coverage = masked.select(snip_scores(model, tokenizer, patch, s), s.tau, first=True)
    snip_seconds = time.time() - t1
    log(f"SNIP mask (τ {s.tau}): {snip_seconds:.0f} s; the blocks cover {coverage:.2f} of the top-τ entries")
    history, step, selections = [], 0, 1
    order = list(range(len(enc)))
    for epoch in range(s.epochs):
        rng.shuffle(order)
        for start in range(0, len(order), s.batch_size):
            if step and step % s.reselect_every == 0:
                coverage = masked.select(snip_scores(model, tokenizer, patch, s), s.tau, optimizer=opt)
                selections += 1
            idx = order[start: start + s.batch_size]
            pairs = [enc[i][0] for i in idx] + [enc[i][1] for i in idx]
            logps = sequence_logps(model, pairs, pad)
            dpo, margin = dpo_loss(logps[: len(idx)], logps[len(idx):], ref_w[idx], ref_l[idx], s.beta)
            nll_w = -(logps[: len(idx)] / n_w[idx]).mean()  # per token
            loss = dpo + s.sft_weight * nll_w
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss, dpo, nll_w = loss.detach(), dpo.detach(), nll_w.detach()
            history.append({"step": step, "loss": round(float(loss), 5), "dpo": round(float(dpo), 5), "nll_w": round(float(nll_w), 5),
                            "margin": round(float(margin.mean()), 5), "accuracy": round(float((margin > 0).float().mean()), 3)})
            log(f"epoch {epoch + 1} step {step}: loss {float(loss):.4f} (DPO {float(dpo):.4f}, NLL of y_w {float(nll_w):.3f}), "
                f"reward margin {float(margin.mean()):.3f}")
    masked.remove()
    return {"steps": step, "mask_selections": selections, "mask_coverage_of_top_tau": round(coverage, 4),
            "snip_seconds": round(snip_seconds, 1), "train_seconds": round(time.time() - t1, 1),
            "first_loss": history[0]["loss"] if history else None, "final_loss": history[-1]["loss"] if history else None,
            "history": history}


def _peak_rss_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def patch(model: str, out: Path, s: Settings, mode: str = "dpo", benign: Path | None = None, harmful: Path | None = None,
          patch_set: Path | None = None, teacher: tuple[str, str, str | None] | None = None, device: str = "cpu",
          log=print) -> dict[str, Any]:
    if mode == "mixed-precision":
        raise PatchError("--mode mixed-precision needs a quantizer that keeps single weights in 16-bit; bitsandbytes and HQQ "
                         "quantize whole linear layers, so it is not available: use the default --mode dpo")
    if mode != "dpo":
        raise PatchError(f"--mode {mode!r}: choose dpo (or see --help on mixed-precision)")
    if s.quant not in QUANTS:
        raise PatchError(f"--quant {s.quant!r}: choose from {', '.join(QUANTS)}")
    if not 0 < s.tau <= 1:
        raise PatchError(f"--tau {s.tau}: the share of weights updated must be in (0, 1]")
    prior = recipes.read(model)
    if prior and any(st.get("intervention") in ("quantize", "qresafe") for st in prior.get("steps", [])):
        raise PatchError(f"{model} is already quantized ({recipes.chain_name(prior)}): give the full-precision model, "
                         f"Q-resafe quantizes it itself (--quant) and needs it for y_w")
    if out.exists() and any(out.iterdir()):
        raise PatchError(f"{out} is not empty: give a new folder (nothing was written)")
    started = time.time()
    prompts = calibration(benign, harmful, s) if patch_set is None else []
    rows = read_patch_set(patch_set) if patch_set is not None else None
    teacher_name = f"endpoint:{teacher[1]}" if teacher else "builtin-refusals"
    # the teacher first: an endpoint that fails does so before anything is written
    y_w_harmful = teacher_answers([c for c in prompts if c["risk"] == "harmful"], s, teacher, log)
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    # Q⁰ goes to a folder of its own inside OUT and moves up when the patch is done, so OUT has
    # no recipe (is unfinished) until then, even if the process is killed
    base = out / "quantized.partial"
    log(f"quantizing {model} ({s.quant}) into {base}")
    try:
        quantize(model, base, s.quant, s.hqq_bits, s.hqq_group_size, device)
    except LoadError as e:
        raise PatchError(str(e)) from None
    if rows is None:
        rows = build_patch_set(model, base, prompts, y_w_harmful, s, device, teacher_name, log)
    with open(out / "patch_set.jsonl", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    gen_seconds = time.time() - started
    figures = _train_and_save(base, out / "adapter", s, rows, device, log)
    quantized = recipes.read(base)
    for f in base.iterdir():
        if f.name != recipes.RECIPE_FILE:
            os.replace(f, out / f.name)
    (base / recipes.RECIPE_FILE).unlink()
    base.rmdir()
    step = {"intervention": "qresafe", "name": "qresafe", "options": {"mode": mode, **vars(s)},
            "inputs": {"patch_set": recipes.input_file(out / "patch_set.jsonl"),
                       **({"benign": recipes.input_file(benign or default_calibration()[0]),
                           "harmful": recipes.input_file(harmful or default_calibration()[1])} if patch_set is None else
                          {"reused_patch_set": recipes.input_file(patch_set)})},
            "teacher": teacher_name if patch_set is None else "from the reused patch set",
            "versions": recipes.versions("peft", "bitsandbytes", "hqq"),
            "figures": {"pairs": len(rows), "patch_set_seconds": round(gen_seconds, 1), **figures},
            "seconds": round(time.time() - started, 1)}
    return recipes.append(out, step, runtime=[{"kind": "lora", "path": "adapter"}], onto=quantized)


def _train_and_save(base: Path, adapter: Path, s: Settings, rows: list[dict[str, str]], device: str, log) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    loaded = load(ModelSpec(str(base), device=device))
    model, tok = loaded.model, loaded.tokenizer
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_modules()} & set(LORA_TARGETS))
    if not targets:
        raise PatchError(f"the model has none of the LoRA target layers {', '.join(LORA_TARGETS)}")
    torch.manual_seed(s.seed)
    model = get_peft_model(model, LoraConfig(r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=0.0, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    figures = train(model, tok, rows, s, log)
    model.save_pretrained(adapter)
    return {**figures, "lora_targets": targets, "peak_rss_mb": _peak_rss_mb()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m servers.qresafe", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    d = Settings()
    ap.add_argument("model", help="full-precision model: checkpoint folder, GGUF file, smollm2-135m, recipe folder, hub id")
    ap.add_argument("out", type=Path, help="new folder for the patched model")
    ap.add_argument("--quant", default=d.quant, help=f"{', '.join(QUANTS)} [{d.quant}]")
    ap.add_argument("--mode", default="dpo", help="dpo [dpo]; mixed-precision: see below")
    ap.add_argument("--hqq-bits", type=int, default=d.hqq_bits)
    ap.add_argument("--hqq-group-size", type=int, default=d.hqq_group_size)
    ap.add_argument("--benign", type=Path, help="Risk-I prompts [the last --n-benign AlpacaEval 1.0 instructions]")
    ap.add_argument("--harmful", type=Path, help="Risk-III prompts [the last --n-harmful AdvBench behaviours]")
    ap.add_argument("--n-benign", type=int, default=d.n_benign)
    ap.add_argument("--n-harmful", type=int, default=d.n_harmful)
    ap.add_argument("--contrast", type=int, default=d.contrast, help="benign prompts that also get a pair with a refusal as the "
                                                                     f"loser (over-refusal guard; 0: the paper's set only) [{d.contrast}]")
    ap.add_argument("--patch-set", type=Path, help="reuse a saved patch_set.jsonl instead of generating one")
    ap.add_argument("--teacher-endpoint", help="OpenAI-compatible base URL whose model answers the harmful prompts (y_w) "
                                                "[the built-in refusal teacher]")
    ap.add_argument("--teacher-model", help="the model id that endpoint serves")
    ap.add_argument("--teacher-api-key-env", help="environment variable holding the teacher's API key")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help=f"answer length of y_w, y_l [{d.max_new_tokens}]")
    ap.add_argument("--lora-r", type=int, default=d.lora_r)
    ap.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--beta", type=float, default=d.beta, help=f"DPO β [{d.beta}]")
    ap.add_argument("--sft-weight", type=float, default=d.sft_weight, help=f"weight of the NLL of y_w added to the DPO loss "
                                                                           f"(trl's rpo_alpha; 0: DPO alone) [{d.sft_weight}]")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--tau", type=float, default=d.tau, help=f"share of each weight matrix updated [{d.tau}]")
    ap.add_argument("--reselect-every", type=int, default=d.reselect_every, help=f"steps between SNIP selections (K) [{d.reselect_every}]")
    ap.add_argument("--snip-samples", type=int, default=d.snip_samples, help=f"patch-set rows SNIP averages over (0: all) [{d.snip_samples}]")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--threads", type=int, default=d.threads, help="torch threads [all cores]")
    ap.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    a = ap.parse_args(argv)
    s = Settings(**{k: getattr(a, k) for k in vars(d)})
    teacher = None
    if a.teacher_endpoint:
        if not a.teacher_model:
            print("qresafe: --teacher-endpoint needs --teacher-model (the id that endpoint serves)", file=sys.stderr)
            return 2
        key = os.environ.get(a.teacher_api_key_env) if a.teacher_api_key_env else None
        if a.teacher_api_key_env and not key:
            print(f"qresafe: --teacher-api-key-env {a.teacher_api_key_env}: that variable is empty; export it first", file=sys.stderr)
            return 2
        teacher = (a.teacher_endpoint, a.teacher_model, key)
    try:
        rec = patch(a.model, a.out, s, a.mode, a.benign, a.harmful, a.patch_set, teacher, a.device,
                    log=lambda m: print(f"qresafe: {m}", file=sys.stderr, flush=True))
    except (PatchError, recipes.RecipeError) as e:
        print(f"qresafe: error: {e}", file=sys.stderr)
        return 2
    fig = rec["steps"][-1]["figures"]
    print(json.dumps({k: v for k, v in fig.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
