"""Continuous batching (servers/batching.py) in process, on a tiny random Llama: every row of a
batch gets what it would get alone (greedy: what `generate` gives; seeded sampling: the same draw),
rows join and leave between steps, bounds hold, cancelled rows stop, hooks apply to every row."""

from __future__ import annotations

import contextlib
import math
import threading

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from servers.batching import (  # noqa: E402
    SMALL_MATMUL_TOKENS,
    DecodeLoop,
    Limits,
    Row,
    Sampling,
    filtered_draw,
    incremental_text,
    right_aligned,
    sample_rows,
    weight_first_linears,
)
from servers.tiny import tiny_llama  # noqa: E402

PROMPTS = ["hello world", "the quick brown fox", "I'm sorry, I cannot", "Sure, here is how to do it step by step",
           "write a script", "how are you today", "exploit vulnerabilities", "the lazy dog"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    path = tiny_llama(tmp_path_factory.mktemp("m") / "llama", max_positions=1024)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tok


def ids(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def run(loop: DecodeLoop, rows: list[Row], timeout: float = 120) -> list[Row]:
    """Submit the rows together and wait until each is done."""
    done = threading.Semaphore(0)
    for r in rows:
        r.on_done = lambda _: done.release()
        assert loop.submit(r)
    for _ in rows:
        assert done.acquire(timeout=timeout)
    return rows


@contextlib.contextmanager
def started(lp: DecodeLoop):
    lp.start()
    try:
        yield lp
    finally:
        lp.stop()


@pytest.fixture()
def loop(tiny):
    model, tok = tiny
    with started(DecodeLoop(model, tok, Limits(max_rows=16, max_kv_tokens=1 << 16))) as lp:
        yield lp


def greedy_in_a_batch(model, tok, n: int) -> list[list[int]]:
    """Greedy tokens of every prompt, served together by a fresh decode loop on `model`."""
    with started(DecodeLoop(model, tok)) as lp:
        return [r.tokens for r in run(lp, [Row(ids(tok, p), n, Sampling(0.0)) for p in PROMPTS])]


def greedy_alone(model, tok, prompt: str, n: int) -> list[int]:
    """Greedy tokens from transformers' own generate, one prompt at a time, cut at the first EOS."""
    x = torch.tensor([ids(tok, prompt)])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id)[0, x.shape[1]:].tolist()
    return out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out


def test_greedy_rows_in_a_batch_equal_generate_alone(tiny, loop):
    model, tok = tiny
    want = [greedy_alone(model, tok, p, 24) for p in PROMPTS]
    rows = run(loop, [Row(ids(tok, p), 24, Sampling(0.0)) for p in PROMPTS])
    assert [r.tokens for r in rows] == want
    assert all(r.finish_reason == ("length" if len(r.tokens) == 24 else "stop") for r in rows)
    assert loop.snapshot()["peak_rows"] == len(PROMPTS)  # they ran together


def test_rows_joining_and_leaving_mid_batch_keep_their_answers(tiny, loop):
    """Rows of different lengths join while others run and leave at their own max_tokens: each
    slot move and window trim must leave every row's cache intact."""
    model, tok = tiny
    plan = [(p, 4 + 7 * (i % 4)) for i, p in enumerate(PROMPTS * 2)]
    want = [greedy_alone(model, tok, p, n) for p, n in plan]
    done = threading.Semaphore(0)
    rows = []
    for i, (p, n) in enumerate(plan):
        r = Row(ids(tok, p), n, Sampling(0.0), on_done=lambda _: done.release())
        rows.append(r)
        loop.submit(r)
        if i % 3 == 2:  # let a few steps run before the next ones arrive
            target = loop.stats["steps"] + 2
            while loop.stats["steps"] < target and loop.stats["finished"] < len(rows):
                threading.Event().wait(0.002)
    for _ in rows:
        assert done.acquire(timeout=120)
    assert [r.tokens for r in rows] == want
    assert loop.stats["prefills"] > 1 and loop.snapshot()["running"] == 0


SYSTEM = "You are a careful assistant. Answer briefly and truthfully, and refuse anything harmful. The user says: "


def test_rows_sharing_a_system_prompt_compute_it_once_and_answer_as_alone(tiny, loop):
    """Rows that start with the same tokens (a chat template's system prompt) prefill them in one
    pass; a later row starting with them reuses the kept keys and values. Every row still gets
    generate's greedy answer, and the first token's 20 likeliest logprobs of a direct forward pass
    (these differ by up to 3e-3 when the tail's positions are off by the prefix length)."""
    model, tok = tiny
    shared = len(ids(tok, SYSTEM)) - 1  # the text's last token may merge with the next word
    assert shared >= 16
    prompts = [SYSTEM + p for p in PROMPTS]
    want = [greedy_alone(model, tok, p, 16) for p in prompts]
    rows = run(loop, [Row(ids(tok, p), 16, Sampling(0.0), logprobs=20) for p in prompts])
    assert [r.tokens for r in rows] == want
    assert loop.stats["shared_prompt_tokens"] >= shared * len(prompts) and loop.stats["prefills"] == 1
    first = loop.stats["shared_prompt_tokens"]
    later = run(loop, [Row(ids(tok, prompts[2]), 16, Sampling(0.0), logprobs=20)])[0]  # alone, from the kept prefix
    assert later.tokens == want[2] and loop.stats["shared_prompt_tokens"] - first >= shared
    for i, r in [(i, rows[i]) for i in range(len(prompts))] + [(2, later)]:
        with torch.no_grad():
            direct = model(torch.tensor([ids(tok, prompts[i])])).logits[0, -1].log_softmax(-1).topk(20)
        alts = r.token_logprobs[0][2]
        assert [t for t, _ in alts] == direct.indices.tolist()
        assert [lp for _, lp in alts] == pytest.approx(direct.values.tolist(), abs=1e-4)


def test_right_aligned_moves_the_shared_prefix_next_to_each_tail():
    """[prefix | padding | tail] becomes [copies | prefix | tail]: row i's tokens end its row."""
    shared, tails = 2, [1, 3, 2]
    width = shared + max(tails)
    cols = torch.arange(width).float()
    k = cols.repeat(len(tails), 2, 1).unsqueeze(-1).repeat(1, 1, 1, 4)  # rows x heads x columns x dim: the column number
    (moved, _), = right_aligned([(k, -k)], shared, tails)
    # row 0 (tail 1): columns 0..3 -> prefix 0,1 then its tail at column 4; the two before hold copies of column 0
    assert moved[0, 0, :, 0].tolist() == [0, 0, 0, 1, 4]
    assert moved[1, 0, :, 0].tolist() == [0, 1, 2, 3, 4]
    assert moved[2, 0, :, 0].tolist() == [0, 0, 1, 3, 4]
    assert torch.equal(moved[:, 1], moved[:, 0]) and torch.equal(moved[..., 3], moved[..., 0])


def test_seeded_sampling_is_the_same_alone_and_beside_other_rows(tiny, loop):
    _, tok = tiny
    mine = Sampling(temperature=0.8, top_p=0.9, top_k=50, seed=1234)
    alone = run(loop, [Row(ids(tok, PROMPTS[3]), 20, mine, logprobs=0)])[0]
    others = [Row(ids(tok, p), 5 + 3 * i, Sampling(temperature=0.3 + 0.2 * i, top_p=0.5 + 0.05 * i, top_k=i * 7, seed=i))
              for i, p in enumerate(PROMPTS)]
    together = run(loop, others[:3] + [Row(ids(tok, PROMPTS[3]), 20, mine, logprobs=0)] + others[3:])[3]
    assert together.tokens == alone.tokens and len(alone.tokens) > 0
    assert [lp for _, lp, _ in together.token_logprobs] == pytest.approx([lp for _, lp, _ in alone.token_logprobs], abs=1e-4)
    other_seed = run(loop, [Row(ids(tok, PROMPTS[3]), 20, Sampling(temperature=2.0, seed=99))])[0]
    hot = run(loop, [Row(ids(tok, PROMPTS[3]), 20, Sampling(temperature=2.0, seed=98))])[0]
    assert other_seed.tokens != hot.tokens  # the seed matters (a flat distribution at temperature 2)


def test_sampling_filters_against_hand_computed_values():
    """logits [2, 1, 0.5, 0, -1]: softmax .5630 .2071 .1256 .0762 .0280. top_p 0.7 keeps the
    tokens whose preceding mass is at most 0.7: {0, 1}, renormalised to .7311 / .2689."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    p0 = math.exp(2) / (math.exp(2) + math.exp(1))
    for sampling in (Sampling(1.0, top_p=0.7), Sampling(1.0, top_k=2), Sampling(1.0, top_p=0.7, top_k=3)):
        rows = [Row([1], 1, Sampling(sampling.temperature, sampling.top_p, sampling.top_k, seed=s)) for s in range(3000)]
        for r in rows:
            r.rng = torch.Generator().manual_seed(r.sampling.seed)
        u = [float(torch.rand((), generator=torch.Generator().manual_seed(s))) for s in range(3000)]
        got = sample_rows(logits.repeat(3000, 1), rows, torch.Generator()).tolist()
        assert got == [0 if x < p0 else 1 for x in u]  # inverse CDF with each row's own first uniform
        share = got.count(0) / len(got)
        assert abs(share - p0) < 4 * math.sqrt(p0 * (1 - p0) / len(got))
        # the kept tokens are ranked likeliest first, wherever they sit in the vocabulary
        perm = torch.tensor([3, 0, 4, 1, 2])  # shuffled[j] = logits[perm[j]]: token 0 is now 1, token 1 is now 3
        for r in rows:
            r.rng = torch.Generator().manual_seed(r.sampling.seed)
        assert sample_rows(logits[perm].repeat(3000, 1), rows, torch.Generator()).tolist() == [1 if x < p0 else 3 for x in u]
    # temperature 0.5 doubles the logits: softmax of [4, 2, 1, 0, -2]; a greedy row beside it takes the argmax
    probs = torch.tensor([4.0, 2.0, 1.0, 0.0, -2.0]).softmax(0).cumsum(0)
    row = Row([1], 1, Sampling(0.5, seed=7))
    row.rng = torch.Generator().manual_seed(7)
    u7 = float(torch.rand((), generator=torch.Generator().manual_seed(7)))
    out = sample_rows(torch.stack([logits, logits.flip(0)]), [row, Row([1], 1, Sampling(0.0))], torch.Generator()).tolist()
    assert out == [int((probs < u7 * probs[-1]).sum()), 4]


def test_filtered_draw_over_candidates_equals_a_direct_full_sort():
    """Rows resolved from the 4 or the 32 likeliest tokens or from a full sort draw the token a
    direct float64 computation gives: temperature, top-k (the k likeliest), top-p (a token kept while
    the mass before it is at most top_p), then the inverse CDF of the kept tokens, likeliest first."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(40, 500) * 4, torch.randn(40, 500) * 0.1])  # peaked rows, then nearly flat ones
    n = len(x)
    t = torch.tensor([0.5, 1.0, 1.5, 1.0] * (n // 4))
    k = torch.tensor([0, 0, 3, 20, 0, 100, 0, 0] * (n // 8))
    p = torch.tensor([0.05, 0.5, 0.9, 0.99, 1.0] * (n // 5))
    u = torch.rand(n)

    def direct(i: int) -> tuple[int, int]:
        """The token, and how many tokens the row keeps."""
        probs, order = (x[i].double() / float(t[i])).softmax(0).sort(descending=True)
        if k[i] > 0:
            probs = probs[: int(k[i])] / probs[: int(k[i])].sum()
        keep = int(((probs.cumsum(0) - probs) <= float(p[i])).sum()) if p[i] < 1 else len(probs)
        cdf = probs[:keep].cumsum(0)
        return int(order[int((cdf < float(u[i]) * cdf[-1]).sum())]), keep

    want = [direct(i) for i in range(n)]
    sizes = [kept for _, kept in want]
    assert min(sizes) <= 4 and any(4 < s <= 32 for s in sizes) and max(sizes) > 32  # every stage is needed
    for stages in ((4, 32), (64, 1024)):
        assert filtered_draw(x, t, k, p, u, stages).tolist() == [tok for tok, _ in want]


def test_mixed_max_tokens_and_stop_strings_end_each_row(tiny, loop):
    _, tok = tiny
    free = run(loop, [Row(ids(tok, p), 30, Sampling(0.0)) for p in PROMPTS])
    long_texts = [(p, r.text) for p, r in zip(PROMPTS, free) if len(r.text) > 6]
    assert long_texts, "the tiny model should say something longer than 6 characters"
    prompt, text = long_texts[0]
    stop = text[3:6]
    rows = run(loop, [Row(ids(tok, prompt), 30, Sampling(0.0), stop=[stop, "never-there"])]
               + [Row(ids(tok, p), n, Sampling(0.0)) for p, n in zip(PROMPTS, (1, 2, 3, 5, 8, 13, 21, 30))])
    assert rows[0].text == text[: text.find(stop)] and rows[0].finish_reason == "stop"
    for r, f, n in zip(rows[1:], free, (1, 2, 3, 5, 8, 13, 21, 30)):
        assert r.tokens == f.tokens[:n]
        assert r.finish_reason == ("length" if len(r.tokens) == n else "stop")


def test_streamed_pieces_add_up_to_the_text(tiny, loop):
    _, tok = tiny
    pieces: list[str] = []
    r = run(loop, [Row(ids(tok, PROMPTS[1]), 20, Sampling(0.0), on_text=pieces.append)])[0]
    assert "".join(pieces) == r.text


def byte_level_tokenizer():
    """A byte-level BPE (GPT-2 / SmolLM2 style): a character outside its merges is several byte tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["</s>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="</s>")


@pytest.mark.parametrize("kind", ["metaspace", "byte-level"])
def test_incremental_text_equals_decoding_the_whole_answer(tiny, kind):
    """Token by token, row.decoded is what decoding every token so far gives (less an unfinished
    character at the end), while each step decodes only a few tokens."""
    tok = tiny[1] if kind == "metaspace" else byte_level_tokenizer()
    text = "hello world, the quick brown fox jumps over the lazy dog 😀 é 日本語 hello  world"
    token_ids = ids(tok, text) + [tok.eos_token_id] + ids(tok, " and the dog")
    row = Row([], len(token_ids))
    widest = 0
    for t in token_ids:
        row.tokens.append(t)
        incremental_text(tok, row)
        whole = tok.decode(row.tokens, skip_special_tokens=True)
        if whole.endswith("\ufffd"):  # a character short of its last byte: it waits
            assert whole.startswith(row.decoded)
        else:
            assert row.decoded == whole
        widest = max(widest, len(row.tokens) - row.prefix_offset)
    assert row.decoded == tok.decode(token_ids, skip_special_tokens=True)
    if kind == "byte-level":
        assert len(ids(tok, "😀")) == 4  # the case it is for: a character split over byte tokens
    assert widest <= 8  # a short window, not the whole answer


def test_a_stop_string_across_tokens_cuts_the_streamed_text(tiny, loop):
    """A stop string that spans several tokens: nothing of it is streamed, and the text ends before it."""
    _, tok = tiny
    free = run(loop, [Row(ids(tok, p), 40, Sampling(0.0)) for p in PROMPTS])
    prompt, text = next((p, r.text) for p, r in zip(PROMPTS, free) if len(r.text) > 12)
    stop = text[5:12]  # seven characters: more than one token of the tiny BPE
    pieces: list[str] = []
    r = run(loop, [Row(ids(tok, prompt), 40, Sampling(0.0), stop=[stop], on_text=pieces.append)])[0]
    assert r.text == text[: text.find(stop)] and r.finish_reason == "stop"
    assert "".join(pieces) == r.text


def test_buffers_shrink_when_the_batch_thins_out(tiny):
    """40 rows start together; 39 leave after two tokens. The last one's buffers shrink from 40
    slots to 8 (a quarter or less in use) while it runs on, and its tokens stay what they are alone."""
    model, tok = tiny
    with started(DecodeLoop(model, tok, Limits(max_rows=64, max_kv_tokens=1 << 16))) as lp:
        alone = run(lp, [Row(ids(tok, PROMPTS[0]), 30, Sampling(0.0), ignore_eos=True)])[0].tokens
        shapes: list[tuple[int, int]] = []
        last = Row(ids(tok, PROMPTS[0]), 30, Sampling(0.0), ignore_eos=True, on_text=lambda _: shapes.append(lp.slots.shape))
        run(lp, [last] + [Row(ids(tok, p), 2, Sampling(0.0), ignore_eos=True) for p in PROMPTS * 5][:39])
    assert last.tokens == alone
    assert max(rows for rows, _ in shapes) == 40 and shapes[-1][0] == 8 and lp.stats["shrinks"] >= 1


def test_a_cancelled_row_stops_and_frees_its_slot(tiny, loop):
    _, tok = tiny
    seen = []
    long = Row(ids(tok, PROMPTS[0]), 900, Sampling(0.0), ignore_eos=True)  # it would run its whole 900 tokens
    long.on_text = lambda piece: (seen.append(piece), loop.cancel(long) if len(seen) == 3 else None)
    short = Row(ids(tok, PROMPTS[1]), 5, Sampling(0.0))
    run(loop, [long, short])
    assert long.cancelled and len(long.tokens) < 10 and len(short.tokens) == 5
    snap = loop.snapshot()
    assert snap["cancelled"] == 1 and snap["running"] == 0 and loop.slots.cache is None  # buffers dropped when idle
    waiting = Row(ids(tok, PROMPTS[2]), 5, Sampling(0.0), cancelled=True)  # cancelled before it ever ran
    run(loop, [waiting])
    assert waiting.tokens == [] and loop.snapshot()["cancelled"] == 2


def test_row_kv_and_queue_bounds(tiny):
    model, tok = tiny
    prompt = ids(tok, PROMPTS[0])
    limits = Limits(max_rows=3, max_kv_tokens=3 * (len(prompt) + 10 + 128), max_waiting=4)
    lp = DecodeLoop(model, tok, limits)
    rows = [Row(prompt, 10, Sampling(0.0)) for _ in range(7)]
    assert all(lp.submit(r) for r in rows[:4]) and not lp.submit(rows[4])  # four wait, the fifth is refused
    lp.start()
    try:
        run(lp, rows[4:])
        assert all(len(r.tokens) == len(rows[0].tokens) for r in rows)
        assert lp.snapshot()["peak_rows"] == 3
        assert lp.fits(Row(prompt, 10)) and not lp.fits(Row(prompt, limits.max_kv_tokens))
        # twice the reservation the bound was sized for: it runs alone, the two after it wait until it is done
        big = Row(prompt, 2 * (len(prompt) + 10 + 128), Sampling(0.0), ignore_eos=True)
        admitted_when_big_ended = []
        small = [Row(prompt, 10, Sampling(0.0)) for _ in range(2)]
        done = threading.Semaphore(0)
        big.on_done = lambda _: (admitted_when_big_ended.append(lp.stats["admitted"]), done.release())
        for r in [big, *small]:
            if r is not big:
                r.on_done = lambda _: done.release()
            assert lp.submit(r)
        for _ in range(3):
            assert done.acquire(timeout=120)
        assert admitted_when_big_ended == [8] and lp.stats["admitted"] == 10 and len(big.tokens) == big.max_new_tokens
        assert lp.slots.shape == (0, 0)
    finally:
        lp.stop()


def test_activation_hooks_apply_to_every_row(tiny, tmp_path):
    """A forward hook on a decoder block (how the loader attaches a Safety Arithmetic ICV) changes
    every row's answer exactly as it changes a single unbatched generate."""
    model, tok = tiny
    import copy

    steered = copy.deepcopy(model)
    v = torch.randn(model.config.hidden_size)
    from servers import steering

    steered.model.layers[0].mlp.register_forward_hook(lambda mod, a, out: steering.steer(out, v, 2.0, "paper"))
    want = [greedy_alone(steered, tok, p, 12) for p in PROMPTS]
    assert want != [greedy_alone(model, tok, p, 12) for p in PROMPTS]
    assert greedy_in_a_batch(steered, tok, 12) == want


def test_weight_first_linears_compute_w_x_t_on_small_inputs_only():
    """Few tokens: exactly (W·Xᵀ)ᵀ + b, and equal to F.linear within float rounding; prefill-sized
    inputs: exactly F.linear. Only plain nn.Linear modules change, and their hooks still run."""
    torch.manual_seed(0)

    class Other(torch.nn.Linear):  # a subclass (bitsandbytes, HQQ, LoRA layers) keeps its own forward
        pass

    net = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.Linear(24, 8, bias=False), Other(8, 8))
    assert weight_first_linears(net) == 2 and "forward" not in vars(net[2])
    lin = net[0]
    small = torch.randn(3, 5, 16)
    got = lin(small)
    assert got.shape == (3, 5, 24) and got.is_contiguous()
    assert torch.equal(got, ((lin.weight @ small.reshape(15, 16).t()).t() + lin.bias).reshape(3, 5, 24))
    torch.testing.assert_close(got, torch.nn.functional.linear(small, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    large = torch.randn(SMALL_MATMUL_TOKENS + 1, 16)
    assert torch.equal(lin(large), torch.nn.functional.linear(large, lin.weight, lin.bias))
    seen = []
    net[1].register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    net(small)
    assert seen == [(3, 5, 8)]


def test_greedy_rows_with_weight_first_linears_equal_generate_alone(tiny):
    """The CPU server's decode path (weight-first linears) answers what plain generate does."""
    import copy

    model, tok = tiny
    fast = copy.deepcopy(model)
    assert weight_first_linears(fast) == sum(type(m) is torch.nn.Linear for m in model.modules()) > 0
    want = [greedy_alone(model, tok, p, 24) for p in PROMPTS]
    assert greedy_in_a_batch(fast, tok, 24) == want


def test_kv_bytes_per_token_for_smollm2_shapes():
    """SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads of 64 dims: 30 x 2 x 3 x 64 = 11,520
    values a token, 46,080 bytes in fp32 and 23,040 in bf16."""
    from servers.batching import kv_bytes_per_token

    cfg = transformers.LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30,
                                   intermediate_size=1536, vocab_size=49152)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    assert kv_bytes_per_token(model) == 46_080
    assert kv_bytes_per_token(model.to(torch.bfloat16)) == 23_040


def test_a_failed_forward_pass_fails_its_rows_and_the_loop_goes_on(tiny, loop):
    model, tok = tiny

    def boom(*args):
        raise RuntimeError("out of memory, say")

    hook = model.model.layers[0].register_forward_hook(boom)
    try:
        failed = run(loop, [Row(ids(tok, p), 8, Sampling(0.0)) for p in PROMPTS[:3]])
    finally:
        hook.remove()
    assert all(isinstance(r.error, RuntimeError) and r.done for r in failed) and loop.snapshot()["failed"] == 3
    ok = run(loop, [Row(ids(tok, PROMPTS[0]), 8, Sampling(0.0))])[0]
    assert ok.error is None and ok.tokens == greedy_alone(model, tok, PROMPTS[0], 8)
