"""Server benchmark: our HF server vs. `transformers serve` on the same tiny model, the same 32
concurrent chat requests, in one run. Prints output tokens/s and the ratio; never asserts.

    python bench/server_throughput.py [--model DIR] [--device cpu|cuda] [--concurrency 32] [--max-tokens 64]

Without --model a tiny random Llama is built first (servers/tiny.py). Each server is measured
alone (the other one stopped), over alternating rounds; the best round of each is compared.
`transformers serve` runs in its default mode and, with --peer-cb, with --continuous-batching.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{cmd[0]} exited:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)  # the peer's /v1/models needs a hub cache
            return proc
        except Exception:
            time.sleep(0.5)
    raise SystemExit(f"{cmd} not ready in 300 s")


def stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, 15)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)


async def load(url: str, model: str, n: int, max_tokens: int) -> tuple[float, int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=n)) as s:

        async def one(i: int) -> int:
            body = {"model": model, "messages": [{"role": "user", "content": f"Tell me about request number {i}."}],
                    "max_tokens": max_tokens, "temperature": 0}
            async with s.post(url + "/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=900)) as r:
                data = await r.json()
                if r.status != 200:
                    raise SystemExit(f"{url}: HTTP {r.status}: {data}")
                return int(data["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(n)))
        return time.perf_counter() - t0, sum(tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--quant", default="none", help="our server's --quant (bnb4, hqq, ...); the peer gets bnb-4bit for bnb4")
    ap.add_argument("--peer-cb", action="store_true", help="also measure transformers serve --continuous-batching")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="evalkit-serve-bench-"))
    try:
        model = a.model
        if model is None:
            from servers.tiny import tiny_llama

            model = tiny_llama(tmp / "tiny-llama")
        transformers_cli = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        contenders = {
            "evalkit hf_server": lambda port: [sys.executable, "-m", "servers.hf_server", str(model), "--port", str(port),
                                               "--device", a.device, "--quant", a.quant, "--max-batch-size", str(a.concurrency)],
            "transformers serve": lambda port: [transformers_cli, "serve", str(model), "--port", str(port), "--host", "127.0.0.1",
                                                "--device", a.device]
            + (["--quantization", "bnb-4bit"] if a.quant == "bnb4" else []),
        }
        if a.peer_cb:
            contenders["transformers serve --continuous-batching"] = lambda port: contenders["transformers serve"](port) + ["--continuous-batching"]
        best: dict[str, float] = {}
        for rnd in range(a.rounds):
            for name, make in contenders.items():
                port = free_port()
                proc = start(make(port), port, tmp / f"{name.split()[0]}-{rnd}.log")
                try:
                    url = f"http://127.0.0.1:{port}/v1"
                    served = str(model)
                    asyncio.run(load(url, served, 2, 4))  # warm-up
                    wall, tokens = asyncio.run(load(url, served, a.concurrency, a.max_tokens))
                finally:
                    stop(proc)
                rate = tokens / wall
                best[name] = max(best.get(name, 0.0), rate)
                print(f"round {rnd + 1} {name:42} {tokens:6d} tokens in {wall:6.2f} s = {rate:8.1f} tok/s")
        ours = best["evalkit hf_server"]
        print(f"\n{a.concurrency} concurrent chat requests, max_tokens {a.max_tokens}, device {a.device}, quant {a.quant}")
        for name, rate in best.items():
            print(f"  {name:42} {rate:8.1f} tok/s   evalkit / this = {ours / rate:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
