"""Scale-out benchmark: evalkit's throughput against 1, 2 and 4 replicas of a latency-bound mock
server (a fixed latency per request and a cap on the requests each replica works on at once, as
a real server's batch size), directly (evalkit balances the replicas) and through a router wheel
(vllm-router, round robin) in front of them; then a replica killed mid-run. All in one run, ratios
only, never asserts.

    python bench/replica_scaling.py            # about 1 minute
    python bench/replica_scaling.py --quick

Target: throughput with N replicas >= 0.9 x N times the throughput with one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evalkit.config import EngineConfig  # noqa: E402
from evalkit.engine import Engine, Request  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not come up")


def start_mock(latency: float, cap: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "evalkit.mock_server", "--port", str(port), "--latency", str(latency),
                             "--max-concurrency", str(cap)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    wait_http(f"http://127.0.0.1:{port}/health", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def start_router(workers: list[str]) -> tuple[subprocess.Popen, str] | None:
    exe = shutil.which("vllm-router", path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--worker-urls", *[w.removesuffix("/v1") for w in workers],
                             "--policy", "round_robin", "--prometheus-port", str(free_port())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/v1/models", proc)
    return proc, f"http://127.0.0.1:{port}/v1"


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


async def measure(urls: list[str], n: int, concurrency: int, kill: tuple[float, subprocess.Popen] | None = None) -> dict:
    cfg = EngineConfig(concurrency=concurrency, progress=False, backoff_base=0.2, backoff_max=2.0)
    reqs = [Request(f"k{i}", {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 8}) for i in range(n)]
    ok = 0

    def on_result(req, res):
        nonlocal ok
        ok += res.ok

    async with Engine(cfg, urls) as eng:
        eng.model = "mock-model"
        killer = None
        if kill is not None:
            async def later():
                await asyncio.sleep(kill[0])
                kill[1].kill()
            killer = asyncio.create_task(later())
        t0 = time.monotonic()
        stats = await eng.run(reqs, on_result)
        wall = time.monotonic() - t0
        if killer is not None:
            killer.cancel()
    return {"wall": wall, "rps": n / wall, "ok": ok, "retries": stats.retries, "errors": stats.errors}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--latency", type=float, default=0.2, help="seconds per request at each replica")
    p.add_argument("--cap", type=int, default=4, help="requests each replica works on at once")
    a = p.parse_args()
    seconds = 2.5 if a.quick else 5.0
    per_replica = a.cap / a.latency  # requests per second one replica can answer
    print(f"mock replicas: {a.latency} s per request, {a.cap} at once -> at most {per_replica:.0f} req/s each")
    print(f"{'replicas':>8}  {'path':>7}  {'requests':>8}  {'req/s':>7}  {'x one':>6}  {'/ N':>5}")
    base: dict[str, float] = {}
    for n_rep in (1, 2, 4):
        servers = [start_mock(a.latency, a.cap) for _ in range(n_rep)]
        urls = [u for _, u in servers]
        n = int(per_replica * n_rep * seconds)
        paths = [("direct", urls)]
        router = start_router(urls)
        if router is not None:
            paths.append(("router", [router[1]]))
        for path, targets in paths:
            r = asyncio.run(measure(targets, n, concurrency=64))
            base.setdefault(path, r["rps"])
            ratio = r["rps"] / base[path]
            print(f"{n_rep:>8}  {path:>7}  {n:>8}  {r['rps']:>7.1f}  {ratio:>6.2f}  {ratio / n_rep:>5.2f}"
                  + ("" if r["ok"] == n else f"  ({n - r['ok']} failed)"))
        if router is not None:
            stop(router[0])
        for proc, _ in servers:
            stop(proc)
    if router is None:
        print("(no router rows: pip install 'evalkit[router]' for vllm-router)")

    # a replica killed mid-run: the run goes on with the other, losing nothing
    n = int(2 * per_replica * seconds)
    print(f"\n{n} requests on 2 replicas, one killed {seconds / 3:.1f} s in:")
    for label, kill in (("none killed", False), ("one killed", True)):
        servers = [start_mock(a.latency, a.cap) for _ in range(2)]
        r = asyncio.run(measure([u for _, u in servers], n, 64, (seconds / 3, servers[1][0]) if kill else None))
        print(f"  {label:>11}: {r['wall']:.2f} s, {r['ok']}/{n} answered, {r['retries']} retries, {r['errors']} errors")
        for proc, _ in servers:
            stop(proc)


if __name__ == "__main__":
    main()
