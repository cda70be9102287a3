"""Continuous batching for a transformers causal LM: rows join and leave between decode steps.

    loop = DecodeLoop(model, tokenizer, limits)   # then loop.start()
    loop.submit(Row(prompt_ids, max_new_tokens, Sampling(temperature=0.7, seed=1), ...))

One thread owns the model. Each turn it (1) admits waiting rows while the row and KV bounds
allow, prefilling them together (left-padded, one forward pass) and sampling their first token,
(2) merges them into the running batch and (3) runs one decode step for every running row.
A row leaves as soon as it ends (end of sequence, its own max_new_tokens, one of its stop
strings) or is cancelled, and its part of the KV cache is dropped at once; columns that no
remaining row uses are trimmed off the left.

The KV cache (`Slots`) holds one slot per running row in preallocated buffers, every row aligned
on the right: row i's tokens fill the last `len_i` columns of the live window and a 2-D attention
mask hides the rest, as `generate` does with left padding; positions are counted per row. A step
writes its new column in place (transformers' DynamicCache concatenates the whole cache at every
step, which was 40% of a step's time on CPU); a row that leaves hands its slot to the last row;
columns no row uses are dropped from the window's left. Each row samples with its own
temperature, top-k, top-p and, when it has a seed, its own torch.Generator, so a seeded row draws
the same numbers whatever else runs beside it.

Why our own loop rather than transformers' continuous-batching manager (`generate_batch`,
`init_continuous_batching`): on this project's CPU machines the manager's paged cache ran at
about 0.6x a plain static `generate` batch on SmolLM2-135M (59-70 vs 112 tok/s, 32 chats of 64
tokens), while this loop keeps the plain batched forward pass; `bench/server_throughput.py`
measures both behind their servers.

Shared prompt starts: rows whose prompts begin with the same tokens (a chat template's system
prompt) have those computed once, in a pass of their own, and the loop keeps the latest such
prefix (up to KEPT_PREFIX_MAX tokens, one row of keys and values) for rows that arrive later; a
row's tail then attends to the prefix's cached columns and right_aligned puts the prefix next to
each tail. A causal model's keys and values for a prefix do not depend on what follows it, and
the loader attaches activation hooks once, before the loop starts, so a kept prefix stays valid.

Bounds: at most `max_rows` rows run together and their KV reservation (rows x (the longest
prompt + max_new_tokens among them + 2 x SLACK spare columns), the shape the right-aligned cache
can grow to) stays within `max_kv_tokens`; up to `max_waiting` more wait, and `submit` refuses beyond that (the server
answers 503 with Retry-After). The buffers shrink once the remaining rows use a quarter of them
or less, and are dropped when the last row leaves; freed memory goes back to the OS (glibc's
malloc_trim), so a burst does not leave the process at its peak size. Streamed and stop-string
rows are detokenised a few tokens a step (incremental_text).
"""

from __future__ import annotations

import collections
import ctypes
import inspect
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache

GREEDY_BELOW = 1e-5  # a temperature this low means greedy decoding, as in the OpenAI API


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # < GREEDY_BELOW: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Limits:
    max_rows: int = 64
    max_kv_tokens: int = 65536
    max_waiting: int = 1024
    batch_wait: float = 0.005  # seconds an idle loop waits for more requests before its first step


@dataclass(eq=False)
class Row:
    """One request. The callbacks run on the decode thread: keep them short (hand over to a loop)."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus k alternatives
    ignore_eos: bool = False  # run to max_new_tokens (vLLM's ignore_eos: load tests, fixed-length benchmarks)
    on_text: Callable[[str], None] | None = None  # streaming: each new piece of text
    on_done: Callable[[Row], None] | None = None  # once: finished, cancelled or failed (error set)
    # filled in by the loop
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str = "length"
    error: BaseException | None = None
    cancelled: bool = False
    done: bool = False
    token_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    rng: Any = None
    decoded: str = ""  # the text of tokens[:read_offset], grown a step at a time (incremental_text)
    prefix_offset: int = 0
    read_offset: int = 0

    @property
    def reserved(self) -> int:
        return len(self.prompt_ids) + self.max_new_tokens


def kv_bytes_per_token(model) -> int:
    """Bytes one token takes in the KV cache: layers x (keys + values) x kv heads x head dim x the
    compute dtype's size (a quantized model computes, and caches, in its compute dtype)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers * 2 * kv_heads * head_dim * torch.empty((), dtype=model.dtype).element_size()


def cut_at_stop(text: str, stops: list[str], start: int = 0) -> tuple[str, bool]:
    """The text up to the first stop string found from `start` on, and whether one occurred."""
    cut = min((i for i in (text.find(s, start) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def incremental_text(tok, row: Row) -> None:
    """Extend row.decoded by the text of the row's new tokens, decoding only a short window: the
    tokens since the last extension plus the ones before it, for context (a merged space, a
    character split over several byte tokens). Decoding the whole answer at every step would cost
    O(length) a step. A window whose text ends in an unfinished character waits for the next token.
    This is the offset scheme of vLLM's detokenize_incrementally."""
    prefix = tok.decode(row.tokens[row.prefix_offset:row.read_offset], skip_special_tokens=True)
    full = tok.decode(row.tokens[row.prefix_offset:], skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        row.decoded += full[len(prefix):]
        row.prefix_offset, row.read_offset = row.read_offset, len(row.tokens)


# exp's vectorised kernel takes a slow path below about -87 (12-20 ms instead of 1-2 ms for 36
# SmolLM2 rows at a low temperature); e**EXP_FLOOR is 1.6e-38, and raising smaller weights to it
# changes no draw: beside the likeliest token's weight of 1 they vanish in float32 sums
EXP_FLOOR = -87.0
CANDIDATE_STAGES = (64, 1024)  # how many likeliest tokens filtered_draw ranks before it sorts a row in full


def filtered_draw(x, t, k, p, u, stages: tuple[int, ...] = CANDIDATE_STAGES):
    """One token for each row of logits x (n, V) under temperature t, top-k k (0: off) and top-p p,
    applied in that order (as transformers does), drawn by the inverse CDF of the kept tokens
    ranked likeliest first at the row's uniform u (all four are (n,) tensors).

    Only the likeliest tokens are ranked: `stages[0]` of them, then `stages[1]` for the rows whose
    answer may lie further, then the whole vocabulary. A row's answer lies within its K candidates
    when its top-k is at most K or, without top-k, when the candidates hold more than its top_p of
    the probability: every later token is dropped. Sorting all 49,152 tokens of SmolLM2 takes
    2.3 ms a row, the 64 likeliest 0.07 ms, and a nucleus is mostly a few dozen tokens."""
    n, vocab = x.shape
    out = torch.empty(n, dtype=torch.long, device=x.device)
    p = torch.where(p >= 1, float("inf"), p)  # no nucleus: rounding must not drop a tail token
    logz = torch.zeros(n, device=x.device)  # without top-k, the nucleus is measured against the whole vocabulary
    whole = (k == 0).nonzero().squeeze(1)
    if len(whole):
        logz[whole] = (x.index_select(0, whole) / t[whole].unsqueeze(1)).logsumexp(1)
    left = torch.arange(n, device=x.device)
    for size in (*(s for s in stages if s < vocab), vocab):
        rows = x if len(left) == n else x.index_select(0, left)
        tl, kl, pl = t[left].unsqueeze(1), k[left].unsqueeze(1), p[left].unsqueeze(1)
        top, order = rows.sort(dim=1, descending=True) if size == vocab else rows.topk(size, dim=1)
        scaled = top / tl
        rank = torch.arange(size, device=x.device)
        scaled = scaled.masked_fill((kl > 0) & (rank >= kl), float("-inf"))
        z = torch.where(kl > 0, scaled.logsumexp(1, keepdim=True), logz[left].unsqueeze(1))
        probs = (scaled - z).exp()
        kept = probs.masked_fill(probs.cumsum(1) - probs > pl, 0.0)  # the likeliest token always stays
        cdf = kept.cumsum(1)
        pick = torch.searchsorted(cdf, u[left].unsqueeze(1) * cdf[:, -1:]).clamp(max=size - 1)
        done = ((kl > 0) & (kl <= size)) | ((kl == 0) & (probs.sum(1, keepdim=True) > pl)) | (size == vocab)
        done = done.squeeze(1)
        out[left[done]] = order.gather(1, pick).squeeze(1)[done]
        left = left[~done]
        if not len(left):
            break
    return out


def sample_rows(logits, rows: list[Row], fallback):
    """Next token of each row from its logits (n, V): argmax for greedy rows; for the others one
    uniform from the row's own generator (or `fallback` for unseeded rows), then for rows with
    top-k or top-p filtered_draw, and for the rest the inverse CDF over the vocabulary of the
    softmax at the row's temperature."""
    out = torch.empty(len(rows), dtype=torch.long, device=logits.device)

    def pick(ids: list[int]):  # index_select: 3x faster than logits[ids] on CPU
        return logits.index_select(0, torch.tensor(ids, device=logits.device)).float()

    greedy = [i for i, r in enumerate(rows) if r.sampling.greedy]
    if greedy:
        out[greedy] = pick(greedy).argmax(-1)
    drawn = [i for i, r in enumerate(rows) if not r.sampling.greedy]
    if not drawn:
        return out
    u = {i: float(torch.rand((), generator=rows[i].rng or fallback)) for i in drawn}

    def column(ids: list[int], value) -> torch.Tensor:
        return torch.tensor([value(rows[i].sampling) for i in ids], device=logits.device)

    filtered = [i for i in drawn if rows[i].sampling.top_k > 0 or rows[i].sampling.top_p < 1.0]
    if filtered:
        out[filtered] = filtered_draw(pick(filtered), column(filtered, lambda s: s.temperature),
                                      column(filtered, lambda s: s.top_k), column(filtered, lambda s: s.top_p),
                                      torch.tensor([u[i] for i in filtered], device=logits.device))
    plain = sorted(set(drawn) - set(filtered))
    if plain:
        x = pick(plain)  # a copy: the logits serve the logprobs after this
        x.sub_(x.amax(1, keepdim=True)).div_(column(plain, lambda s: s.temperature).unsqueeze(1))
        cdf = x.clamp_(min=EXP_FLOOR).exp_().cumsum(1)
        uniforms = torch.tensor([u[i] for i in plain], device=logits.device).unsqueeze(1)
        out[plain] = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).squeeze(1).clamp(max=x.shape[1] - 1)
    return out


SHARED_PREFIX_MIN = 16  # tokens: a shorter shared start is not worth a pass of its own
KEPT_PREFIX_MAX = 512  # tokens: a longer shared start is used for its batch but not kept


def shared_length(a: list[int], b: list[int], limit: int) -> int:
    """How many leading tokens a and b share, at most `limit`."""
    n = min(len(a), len(b), limit)
    return next((i for i in range(n) if a[i] != b[i]), n)


def cache_holding(kv: list[tuple[Any, Any]], rows: int) -> DynamicCache:
    """A cache of full layers (a sliding-window layer would keep less than the slots need) holding
    one row's keys and values per layer (none: empty), repeated for `rows` rows."""
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1), i)
    return cache


def right_aligned(kv: list[tuple[Any, Any]], shared: int, tails: list[int]) -> list[tuple[Any, Any]]:
    """A prefix-shared prefill leaves row i's columns as [shared prefix | padding | its tail of
    tails[i] tokens]; move the prefix next to the tail, so each row's tokens are the last columns
    of its row, as the slots keep them (the columns left of them hold copies, hidden by the mask)."""
    width = kv[0][0].shape[2]
    column = torch.arange(width, device=kv[0][0].device)
    start = width - shared - torch.tensor(tails, device=column.device).unsqueeze(1)  # where row i's prefix moves to
    source = torch.where(column < start + shared, (column - start).clamp(min=0), column)
    index = source[:, None, :, None]
    return [(k.gather(2, index.expand_as(k)), v.gather(2, index.expand_as(v))) for k, v in kv]


SMALL_MATMUL_TOKENS = 128  # at 256 tokens the two orientations ran equally fast


def _weight_first_linear(self, x):
    """nn.Linear.forward computed as (W·Xᵀ)ᵀ when X holds few tokens (see weight_first_linears)."""
    if x.dim() < 2 or x.numel() > SMALL_MATMUL_TOKENS * x.shape[-1]:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    y = (self.weight @ x.reshape(-1, x.shape[-1]).t()).t().contiguous()
    if self.bias is not None:
        y += self.bias
    return y.view(*x.shape[:-1], y.shape[-1])


def weight_first_linears(model) -> int:
    """Make the model's plain nn.Linear layers multiply weight-first on small inputs; the count.

    For CPU decoding: MKL's sgemm computes X·Wᵀ for a few token rows more slowly than W·Xᵀ when
    the weight is not in cache, which is the case for every weight in a decode step. On
    SmolLM2-135M on 2 CPU cores a decode loop of 8 / 32 / 64 rows ran 1.43 / 1.24 / 1.09x faster
    with the same greedy tokens (bench/decode_linear.py). Prefill-sized inputs keep F.linear, and
    subclasses (bitsandbytes, HQQ, LoRA wrappers) keep their own forward; hooks still run, as
    the module itself is unchanged.
    """
    n = 0
    for m in model.modules():
        if type(m) is torch.nn.Linear:
            m.forward = _weight_first_linear.__get__(m)
            n += 1
    return n


class DecodeLoop:
    def __init__(self, model, tokenizer, limits: Limits = Limits(), device=None, model_lock: threading.Lock | None = None):
        self.model, self.tok, self.limits = model, tokenizer, limits
        self.device = device if device is not None else next(model.parameters()).device
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids), 0)
        params = inspect.signature(model.forward).parameters
        self.keep_last = "logits_to_keep" in params
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers 5.x renamed it
        self.model_lock = model_lock or threading.Lock()  # also taken by other users of the model (prompt scoring)
        self.fallback = torch.Generator(device=self.device)
        self.fallback.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        self.cond = threading.Condition()
        self.waiting: collections.deque[Row] = collections.deque()
        # the running rows, slot by slot: the row, how many of its tokens are cached, its last token (not yet cached)
        self.running: list[Row] = []
        self.lengths: list[int] = []
        self.pending: list[int] = []
        self.slots = Slots(limits.max_kv_tokens, limits.max_rows)
        self.reserved_len = 0  # longest prompt + max_new_tokens among the running rows
        # the shared start of recent prompts (a chat template's system prompt): its tokens and its
        # keys and values per layer, one row (see _shared_prefix)
        self.kept_prefix: tuple[list[int], list[tuple[Any, Any]]] = ([], [])
        self.stats = collections.Counter(prefills=0, steps=0, admitted=0, finished=0, cancelled=0, failed=0, tokens=0, peak_rows=0,
                                         shrinks=0, shared_prompt_tokens=0)
        self.thread: threading.Thread | None = None
        self.stopping = False

    # -- called from other threads ---------------------------------------------------------------

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def fits(self, row: Row) -> bool:
        """Whether the row could ever run (its own reservation within the KV bound)."""
        return row.reserved + 2 * SLACK <= self.limits.max_kv_tokens

    def submit(self, row: Row) -> bool:
        """Queue a row; False when the waiting queue is full (the caller answers 503)."""
        with self.cond:
            if len(self.waiting) >= self.limits.max_waiting:
                return False
            self.waiting.append(row)
            self.cond.notify()
        return True

    def cancel(self, row: Row) -> None:
        """Stop a row at the next step (its client went away); it frees its cache then."""
        row.cancelled = True
        with self.cond:
            self.cond.notify()

    def snapshot(self) -> dict[str, int]:
        return {**self.stats, "running": len(self.running), "waiting": len(self.waiting)}

    # -- the decode thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.waiting and not self.running and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    return
                if not self.running and self.limits.batch_wait > 0:  # an idle loop gathers the burst that woke it
                    deadline = time.monotonic() + self.limits.batch_wait
                    while len(self.waiting) < self.limits.max_rows and (left := deadline - time.monotonic()) > 0:
                        self.cond.wait(left)
                joiners = self._admit()
            try:
                with self.model_lock:
                    self._turn(joiners)
            except Exception as e:  # a failed forward pass fails the rows in it, never the loop
                for row in {id(r): r for r in joiners + self.running}.values():
                    if not row.done:
                        row.error = e
                        self.stats["failed"] += 1
                        self._done(row)
                self.running, self.lengths, self.pending = [], [], []
                self.slots.clear()
                self.reserved_len = 0
            if not self.running:
                self._release_memory()

    def _admit(self) -> list[Row]:
        """Waiting rows that fit beside the running ones, in arrival order (called holding cond)."""
        joiners: list[Row] = []
        n, longest = len(self.running), self.reserved_len
        while self.waiting and n < self.limits.max_rows:
            row = self.waiting[0]
            if row.cancelled:
                self.waiting.popleft()
                self.stats["cancelled"] += 1
                self._done(row)
                continue
            grown = max(longest, row.reserved)
            if (n + 1) * (grown + 2 * SLACK) > self.limits.max_kv_tokens and n > 0:
                break  # waits for running rows to leave
            self.waiting.popleft()
            joiners.append(row)
            n, longest = n + 1, grown
        return joiners

    def _turn(self, joiners: list[Row]) -> None:
        with torch.inference_mode():
            if joiners:
                self._prefill(joiners)
            if self.running:
                self._step()

    def _forward(self, ids, mask, positions, cache):
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self.keep_last else {}
        kwargs[self.cache_arg] = cache
        return self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs).logits[:, -1].float()

    def _prefill(self, rows: list[Row]) -> None:
        for r in rows:
            if r.sampling.seed is not None:
                r.rng = torch.Generator(device=self.device)
                r.rng.manual_seed(r.sampling.seed)
        shared, prefix = self._shared_prefix(rows)
        cache = cache_holding(prefix, len(rows))
        tails = [r.prompt_ids[shared:] for r in rows]
        width = max(len(t) for t in tails)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, t in enumerate(tails):  # left-padded: every row's last token in the last column
            ids[i, width - len(t):] = torch.tensor(t)
            mask[i, width - len(t):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = shared + (mask.cumsum(1) - 1).clamp(min=0)
        mask = torch.cat([mask.new_ones((len(rows), shared)), mask], 1)
        logits = self._forward(ids, mask, positions, cache)
        self.stats["prefills"] += 1
        self.stats["admitted"] += len(rows)
        self.stats["shared_prompt_tokens"] += shared * len(rows)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if shared:
            kv = right_aligned(kv, shared, [len(t) for t in tails])
        tokens = sample_rows(logits, rows, self.fallback).tolist()
        keep = self._record(rows, logits, tokens)
        if keep:
            self.slots.join([(k[keep], v[keep]) for k, v in kv])
            self.running += [rows[i] for i in keep]
            self.lengths += [len(rows[i].prompt_ids) for i in keep]
            self.pending += [tokens[i] for i in keep]
            self.reserved_len = max(r.reserved for r in self.running)
            self.stats["peak_rows"] = max(self.stats["peak_rows"], len(self.running))

    def _shared_prefix(self, rows: list[Row]) -> tuple[int, list[tuple[Any, Any]]]:
        """How many leading prompt tokens all the rows share whose keys and values are at hand, and
        those (per layer, one row). The kept prefix serves when the rows start with it; when two or
        more rows share SHARED_PREFIX_MIN tokens beyond it, their shared part is computed here in
        one pass (extending what the kept prefix covers) and kept in its place. (0, []): prefill
        the rows whole. Every row keeps at least its last prompt token to feed."""
        first = rows[0].prompt_ids
        common = min(len(r.prompt_ids) for r in rows) - 1
        for r in rows[1:]:
            common = shared_length(first, r.prompt_ids, common)
        kept_tokens, kept = self.kept_prefix
        reuse = shared_length(kept_tokens, first, common)
        if len(rows) > 1 and common - reuse >= SHARED_PREFIX_MIN:
            cache = cache_holding([(k[:, :, :reuse], v[:, :, :reuse]) for k, v in kept] if reuse else [], 1)
            ids = torch.tensor([first[reuse:common]], device=self.device)
            positions = torch.arange(reuse, common, device=self.device).unsqueeze(0)
            self._forward(ids, torch.ones((1, common), dtype=torch.long, device=self.device), positions, cache)
            prefix = [(layer.keys, layer.values) for layer in cache.layers]
            if common <= KEPT_PREFIX_MAX:
                self.kept_prefix = (first[:common], prefix)
            return common, prefix
        if reuse >= SHARED_PREFIX_MIN:
            return reuse, [(k[:, :, :reuse], v[:, :, :reuse]) for k, v in kept]
        return 0, []

    def _step(self) -> None:
        self.slots.make_room()
        live = self.slots.window.length
        lengths = torch.tensor(self.lengths, device=self.device)
        # row b's tokens are the last lengths[b] cached columns, then the one it feeds now
        mask = (torch.arange(live + 1, device=self.device) >= (live - lengths).unsqueeze(1)).long()
        ids = torch.tensor(self.pending, device=self.device).unsqueeze(1)
        logits = self._forward(ids, mask, lengths.unsqueeze(1), self.slots.cache)
        self.slots.window.end += 1
        self.lengths = [n + 1 for n in self.lengths]
        self.stats["steps"] += 1
        tokens = sample_rows(logits, self.running, self.fallback).tolist()
        keep = set(self._record(self.running, logits, tokens))
        self.pending = tokens
        for i in reversed(range(len(self.running))):  # the last row moves into each freed slot
            if i not in keep:
                last = len(self.running) - 1
                self.slots.move(last, i)
                for column in (self.running, self.lengths, self.pending):
                    column[i] = column[last]
                    column.pop()
        if self.running:
            self.slots.trim(max(self.lengths))
            self.reserved_len = max(r.reserved for r in self.running)
            if not self.waiting and self.slots.shrink():  # no joiner coming that would grow them again at once
                self.stats["shrinks"] += 1
                self._release_memory()
        else:
            self.slots.clear()
            self.reserved_len = 0

    def _record(self, rows: list[Row], logits, tokens: list[int]) -> list[int]:
        """Give each row its new token; finish the rows that end here. The indices of the rest."""
        logp = None
        if any(r.logprobs is not None for r in rows):
            logp = logits.log_softmax(-1)
        keep = []
        for i, (row, t) in enumerate(zip(rows, tokens)):
            if row.cancelled:
                self.stats["cancelled"] += 1
                self._done(row)
                continue
            if t in self.eos_ids and not row.ignore_eos:
                row.finish_reason = "stop"
                self._finish(row)
                continue
            row.tokens.append(t)
            self.stats["tokens"] += 1
            if row.logprobs is not None and logp is not None:
                alts: list[tuple[int, float]] = []
                if row.logprobs:
                    vals, ids = logp[i].topk(row.logprobs)
                    alts = list(zip(ids.tolist(), vals.tolist()))
                row.token_logprobs.append((t, float(logp[i, t]), alts))
            if (row.stop or row.on_text is not None) and self._emit(row):
                row.finish_reason = "stop"
                self._finish(row, row.text)  # cut at the stop string
                continue
            if len(row.tokens) >= row.max_new_tokens:
                row.finish_reason = "length"
                self._finish(row)
                continue
            keep.append(i)
        return keep

    def _emit(self, row: Row) -> bool:
        """Stream the row's new text, holding back what could start a stop string (an unfinished
        character is held back by incremental_text); True when a stop string has occurred."""
        before = len(row.decoded)
        incremental_text(self.tok, row)
        longest = max((len(s) for s in row.stop), default=1)
        text, stopped = cut_at_stop(row.decoded, row.stop, max(0, before - longest + 1))  # only the new text can hold a new stop
        row.text = text
        if row.on_text is not None:
            safe = len(text) - (0 if stopped else longest - 1)
            if safe > row.sent:
                row.on_text(text[row.sent:safe])
                row.sent = safe
        return stopped

    def _finish(self, row: Row, text: str | None = None) -> None:
        """Done: its text is `text`, else the whole answer decoded once."""
        row.text = self.tok.decode(row.tokens, skip_special_tokens=True) if text is None else text
        self.stats["finished"] += 1
        self._done(row)

    @staticmethod
    def _done(row: Row) -> None:
        row.done = True
        if row.on_done is not None:
            row.on_done(row)

    @staticmethod
    def _release_memory() -> None:
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to ask
            pass


SLACK = 64  # spare cache columns on the right: the live window moves back left once per SLACK steps at most


@dataclass
class Window:
    """The cache columns in use, shared by every layer: [start, end); a step writes column end."""

    rows: int = 0
    start: int = 0
    end: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start


class SlotLayer(CacheLayerMixin):
    """One decoder layer's keys and values in preallocated buffers (slots x heads x columns x dim):
    a step writes its new column in place, where DynamicCache would copy the whole cache."""

    is_sliding = False

    def __init__(self, window: Window, keys, values):
        super().__init__()
        self.window, self.keys, self.values = window, keys, values
        self.device, self.is_initialized = keys.device, True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        w, q = self.window, key_states.shape[2]
        self.keys[: w.rows, :, w.end : w.end + q] = key_states
        self.values[: w.rows, :, w.end : w.end + q] = value_states
        return self.keys[: w.rows, :, w.start : w.end + q], self.values[: w.rows, :, w.start : w.end + q]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.window.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.window.length

    def get_max_length(self) -> int:
        return -1


class Slots:
    """The running rows' KV cache: one slot per row, rows aligned on the right (a row's cached tokens
    are the last `length` columns of the window). Buffers grow when rows join, move their window
    back left when a step reaches the right edge, and are dropped when the last row leaves."""

    def __init__(self, max_kv_tokens: int, max_rows: int):
        self.max_kv_tokens, self.max_rows = max_kv_tokens, max_rows
        self.window = Window()
        self.cache: Cache | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(slots, columns) allocated."""
        if self.cache is None:
            return 0, 0
        keys = self.cache.layers[0].keys
        return keys.shape[0], keys.shape[2]

    def clear(self) -> None:
        self.cache, self.window = None, Window()

    def join(self, prefilled: list[tuple[Any, Any]]) -> None:
        """Put prefilled rows (per layer: keys and values, rows x heads x width x dim) in the next slots."""
        n, width = prefilled[0][0].shape[0], prefilled[0][0].shape[2]
        self._place(self.window.rows + n, left=width, right=1, template=prefilled)
        w = self.window
        for layer, (k, v) in zip(self.layers, prefilled):
            layer.keys[w.rows : w.rows + n, :, w.end - width : w.end] = k
            layer.values[w.rows : w.rows + n, :, w.end - width : w.end] = v
        w.rows += n
        w.start = min(w.start, w.end - width)

    def make_room(self) -> None:
        """A free column at the right edge for the next step."""
        if self.window.end >= self.shape[1]:
            self._place(self.window.rows, left=self.window.length, right=SLACK)

    def move(self, src: int, dst: int) -> None:
        """Slot src's cache into slot dst (dst's row left); the last slot is then free."""
        w = self.window
        if src != dst:
            for layer in self.layers:
                layer.keys[dst, :, w.start : w.end] = layer.keys[src, :, w.start : w.end]
                layer.values[dst, :, w.start : w.end] = layer.values[src, :, w.start : w.end]
        w.rows -= 1

    def trim(self, longest: int) -> None:
        """Drop the columns on the left that no remaining row uses."""
        self.window.start = self.window.end - longest

    def shrink(self) -> bool:
        """Smaller buffers once the remaining rows use under a quarter of them (a batch that thins out
        without emptying would otherwise hold its peak memory); True when it reallocated."""
        w = self.window
        slots, columns = self.shape
        rows, width = -(-w.rows // 8) * 8, min(columns, w.length + 2 * SLACK)
        if slots * columns <= 4 * rows * width:
            return False
        self._reallocate(rows, width, end=w.length)
        return True

    @property
    def layers(self) -> list[SlotLayer]:
        assert self.cache is not None
        return self.cache.layers  # type: ignore[return-value]

    def _place(self, rows: int, left: int, right: int, template=None) -> None:
        """Make slots for `rows` rows and a window with `left` columns before its end and `right`
        after it, moving the live columns (a new buffer only when the old one is too small)."""
        w = self.window
        slots, columns = self.shape
        if rows <= slots and w.end >= left and w.end + right <= columns:
            return
        end = max(left, w.length)
        need_cols = end + right
        if rows <= slots and need_cols <= columns:  # room enough: move the window within the buffers
            for layer in self.layers:
                for buf in (layer.keys, layer.values):
                    buf[: w.rows, :, end - w.length : end] = buf[: w.rows, :, w.start : w.end].clone()
        else:
            columns = max(columns, need_cols + SLACK)
            slots = max(slots, min(self.max_rows, -(-rows // 8) * 8, max(rows, self.max_kv_tokens // columns)))
            self._reallocate(slots, columns, end, template)
            return
        w.start, w.end = end - w.length, end

    def _reallocate(self, slots: int, columns: int, end: int, template=None) -> None:
        """New buffers of slots x columns, the live window copied in to end at column `end`."""
        w = self.window
        like = [(layer.keys, layer.values) for layer in self.layers] if self.cache is not None else template
        assert like is not None
        fresh = []
        for k, v in like:
            nk = k.new_zeros((slots, k.shape[1], columns, k.shape[3]))
            nv = v.new_zeros((slots, v.shape[1], columns, v.shape[3]))
            if self.cache is not None:
                nk[: w.rows, :, end - w.length : end] = k[: w.rows, :, w.start : w.end]
                nv[: w.rows, :, end - w.length : end] = v[: w.rows, :, w.start : w.end]
            fresh.append(SlotLayer(w, nk, nv))
        self.cache = Cache(layers=fresh)
        w.start, w.end = end - w.length, end
