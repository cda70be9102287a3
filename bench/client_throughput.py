"""Client benchmark: evalkit vs. a bare aiohttp loop (and lm-eval / Inspect when installed), on one
loopback mock server started here, in one run. Prints ratios, never asserts.

    python bench/client_throughput.py            # all three parts (about 3 minutes)
    python bench/client_throughput.py --quick    # smaller sizes

1. overhead: zero-latency mock; end-to-end `evalkit run` (load data, send, write JSONL, judge,
   score) vs. a bare aiohttp worker loop sending the same requests. Target: >= 0.90x.
   Also: process start to first request (target: well under 1 s).
2. fan-out: 1 s-latency mock, concurrency 4096, 20,000 prompts. Target: <= 1.15x the ideal 5 s.
3. memory: 200,000 prompts through `evalkit generate` on a zero-latency mock. Target: peak RSS < 300 MB.
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
import time
import urllib.request
from pathlib import Path

import aiohttp
import orjson

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "datasets" / "advbench" / "harmful_behaviors.csv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mock(*args: str) -> tuple[subprocess.Popen, str, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evalkit.mock_server", "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(400):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1)
            break
        except Exception:  # noqa: BLE001
            time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port}/v1", port


def mock_stats(port: int) -> dict:
    return orjson.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5).read())


def synthetic_data(root: Path, n: int) -> Path:
    """An advbench-shaped folder with n prompts (the real 520 goals, repeated with a counter)."""
    with open(SHARED, newline="") as f:
        goals = [r["goal"] for r in csv.DictReader(f)]
    (root / "advbench").mkdir(parents=True, exist_ok=True)
    with open(root / "advbench" / "harmful_behaviors.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["goal", "target"])
        for i in range(n):
            w.writerow([f"{goals[i % len(goals)]} ({i})", "Sure"])
    return root


def evalkit_cmd(command: str, url: str, data: Path, out: Path, concurrency: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evalkit", command, "--subtasks", "advbench", "--endpoint", url, "--model", "mock-model",
            "--data-path", str(data), "--output", str(out), "--concurrency", str(concurrency), "--no-progress",
            "--max-tokens", "16", *extra]


def run_timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (kB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read().decode() if proc.stderr else ''}")
    return wall, usage.ru_maxrss


async def bare_loop(url: str, n: int, concurrency: int) -> float:
    """The floor: a fixed pool of aiohttp workers posting chat requests and parsing the JSON."""
    prompts = [f"prompt {i}" for i in range(n)]
    queue: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    out = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:

        async def worker():
            while not queue.empty():
                p = queue.get_nowait()
                body = {"model": "mock-model", "messages": [{"role": "user", "content": p}], "max_tokens": 16}
                async with s.post(url + "/chat/completions", json=body) as r:
                    out.append(orjson.loads(await r.read())["choices"][0]["message"]["content"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - t0


def time_to_first_request(url: str, port: int, data: Path, out: Path) -> float:
    before = mock_stats(port)["requests"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(evalkit_cmd("generate", url, data, out, 4, "--limit", "1", "--restart"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while mock_stats(port)["requests"] == before:
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    proc.wait()
    return elapsed


def peers(url: str, n: int) -> None:
    for exe, name in (("lm_eval", "lm-eval local-chat-completions"), ("inspect", "Inspect openai-api")):
        if shutil.which(exe) is None:
            print(f"  {name}: not installed, skipped (pip install it to compare; see reference/eval_frameworks.md §6)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--overhead-n", type=int, default=20_000)
    ap.add_argument("--fanout-n", type=int, default=20_000)
    ap.add_argument("--memory-n", type=int, default=200_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--parts", default="overhead,fanout,memory")
    a = ap.parse_args()
    if a.quick:
        a.overhead_n, a.fanout_n, a.memory_n = 5_000, 8_192, 20_000
    parts = a.parts.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="evalkit-bench-"))
    try:
        if "overhead" in parts:
            print(f"[overhead] zero-latency mock, {a.overhead_n} prompts, concurrency {a.concurrency}")
            proc, url, port = start_mock()
            data = synthetic_data(tmp / "d1", a.overhead_n)
            asyncio.run(bare_loop(url, 500, a.concurrency))  # warm-up
            bare = asyncio.run(bare_loop(url, a.overhead_n, a.concurrency))
            wall, _ = run_timed(evalkit_cmd("run", url, data, tmp / "o1", a.concurrency, "--judges", "keyword"))
            bare2 = asyncio.run(bare_loop(url, a.overhead_n, a.concurrency))
            bare_rate = a.overhead_n / ((bare + bare2) / 2)
            ek_rate = a.overhead_n / wall
            manifest = orjson.loads((tmp / "o1" / "mock-model" / "manifest.json").read_bytes())
            stage_rate = manifest["stages"]["generate"]["requests_per_s"]
            ttfr = time_to_first_request(url, port, data, tmp / "o2")
            peers(url, a.overhead_n)
            proc.terminate()
            print(f"  bare aiohttp loop: {bare_rate:8.0f} req/s (mean of a run before and after)")
            print(f"  evalkit run (end to end, process start included): {ek_rate:8.0f} req/s")
            print(f"  ratio evalkit / bare: {ek_rate / bare_rate:.2f}x  (target >= 0.90x)")
            print(f"  evalkit generate stage alone (engine + JSONL writer): {stage_rate:8.0f} req/s = {stage_rate / bare_rate:.2f}x")
            print(f"  process start to first request: {ttfr:.2f} s  (target well under 1 s)")
        if "fanout" in parts:
            print(f"[fan-out] 1 s latency, concurrency 4096, {a.fanout_n} prompts")
            proc, url, port = start_mock("--latency", "1.0")
            data = synthetic_data(tmp / "d2", a.fanout_n)
            wall, _ = run_timed(evalkit_cmd("generate", url, data, tmp / "o3", 4096))
            ideal = -(-a.fanout_n // 4096) * 1.0
            peak = mock_stats(port)["peak_inflight"]
            bare = asyncio.run(bare_loop(url, a.fanout_n, 4096))
            proc.terminate()
            print(f"  evalkit generate: {wall:.2f} s vs ideal {ideal:.0f} s: {wall / ideal:.2f}x  (target <= 1.15x); server saw {peak} in flight at peak")
            print(f"  bare aiohttp loop, same mock: {bare:.2f} s = {bare / ideal:.2f}x ideal; evalkit / bare = {wall / bare:.2f}x time")
        if "memory" in parts:
            print(f"[memory] {a.memory_n} prompts, zero-latency mock, evalkit generate")
            proc, url, port = start_mock()
            data = synthetic_data(tmp / "d3", a.memory_n)
            wall, rss_kb = run_timed(evalkit_cmd("generate", url, data, tmp / "o4", a.concurrency))
            proc.terminate()
            print(f"  peak RSS {rss_kb / 1024:.0f} MB (target < 300 MB); {a.memory_n / wall:.0f} req/s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
