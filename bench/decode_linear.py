"""Decode-loop speed with weight-first linears (servers.batching.weight_first_linears) against
plain nn.Linear, in one process, alternating, on the same rows. Prints tokens/s, the ratio and
whether greedy tokens are identical; never asserts.

    python bench/decode_linear.py [--model DIR] [--rows 8,32,64] [--tokens 64] [--rounds 2]

The model is the packaged SmolLM2-135M-Instruct when it is installed (else a tiny random Llama),
on CPU in fp32, as the HF server runs it there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from bench.server_throughput import default_model  # noqa: E402
from servers.batching import DecodeLoop, Limits, Row, Sampling, weight_first_linears  # noqa: E402


def decode(model, tok, prompts: list[list[int]], tokens: int) -> tuple[float, list[list[int]]]:
    """Tokens/s of one decode loop over all prompts (admitted together), and each row's tokens."""
    loop = DecodeLoop(model, tok, Limits(max_rows=len(prompts)))
    rows = [Row(prompt_ids=p, max_new_tokens=tokens, sampling=Sampling(temperature=0.0), ignore_eos=True) for p in prompts]
    loop.waiting.extend(rows)
    t0 = time.perf_counter()
    while loop.waiting or loop.running:  # the loop's own turns, on this thread
        loop._turn(loop._admit())
    took = time.perf_counter() - t0
    return sum(len(r.tokens) for r in rows) / took, [r.tokens for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--rows", default="8,32,64")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = a.model or default_model(Path(tmp))
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    chats = [[{"role": "user", "content": f"Write a short story, number {i}, about a cat."}] for i in range(max(map(int, a.rows.split(","))))]
    if tok.chat_template:
        prompts = [list(tok.apply_chat_template(c, add_generation_prompt=True, return_dict=True)["input_ids"]) for c in chats]
    else:
        prompts = [tok(c[0]["content"])["input_ids"] for c in chats]
    print(f"model {path.name}: {len(linears)} nn.Linear layers, {torch.get_num_threads()} threads")
    decode(model, tok, prompts[:2], 4)  # warm-up
    for n in map(int, a.rows.split(",")):
        speed: dict[str, list[float]] = {"plain": [], "weight-first": []}
        same = True
        for _ in range(a.rounds):
            for name in speed:
                for m in linears:
                    m.__dict__.pop("forward", None)
                if name == "weight-first":
                    weight_first_linears(model)
                tps, toks = decode(model, tok, prompts[:n], a.tokens)
                speed[name].append(tps)
                if name == "plain":
                    reference = toks
                else:
                    same &= toks == reference
        plain, first = (sum(v) / len(v) for v in speed.values())
        print(f"{n:3d} rows: plain {plain:6.1f} tok/s, weight-first {first:6.1f} tok/s, ratio {first / plain:.2f}x "
              f"(rounds: {', '.join(f'{x:.1f}' for x in speed['weight-first'])} vs {', '.join(f'{x:.1f}' for x in speed['plain'])}); "
              f"greedy tokens identical: {same}")


if __name__ == "__main__":
    main()
