"""Client benchmark: evalkit vs. a bare aiohttp loop (and lm-eval / Inspect when installed), on one
loopback mock server started here, in one run. Prints ratios, never asserts.

    python bench/client_throughput.py            # all three parts (about 3 minutes)
    python bench/client_throughput.py --quick    # smaller sizes
    python bench/client_throughput.py --parts overhead --before /tmp/wt_old   # before/after in one run

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
import statistics
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
        except Exception:
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
            "--max-tokens", "16", "--accept-modified-data", *extra]  # the synthetic file is no registry copy


def run_timed(cmd: list[str], checkout: Path = REPO) -> tuple[float, int]:
    """Wall seconds and peak RSS (kB) of one child process (evalkit from `checkout`)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=checkout,
                            env={**os.environ, "PYTHONPATH": str(checkout)})
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


LM_EVAL_TASK = """task: evalkit_bench
dataset_path: json
dataset_kwargs:
  data_files:
    test: {prompts}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 16
  do_sample: false
metric_list:
  - metric: exact_match
"""

INSPECT_TASK = """from inspect_ai import Task, task
from inspect_ai.dataset import FieldSpec, json_dataset
from inspect_ai.scorer import match
from inspect_ai.solver import generate


@task
def evalkit_bench():
    return Task(dataset=json_dataset({prompts!r}, FieldSpec(input="prompt", target="target", id="id")),
                solver=generate(), scorer=match())
"""


def _peer_exe(name: str, peer_bin: Path | None) -> str | None:
    if peer_bin is not None and (peer_bin / name).exists():
        return str(peer_bin / name)
    return shutil.which(name)


def peers(url: str, n: int, concurrency: int, work: Path, peer_bin: Path | None) -> dict[str, float]:
    """lm-eval local-chat-completions and Inspect openai-api on the same mock, when installed
    (reference/eval_frameworks.md §6). Returns requests/s per peer, end to end like evalkit's."""
    work.mkdir(parents=True, exist_ok=True)
    prompts = work / "prompts.jsonl"
    prompts.write_bytes(b"".join(orjson.dumps({"id": str(i), "prompt": f"prompt {i}", "target": "x"}) + b"\n" for i in range(n)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OPENAI_API_KEY": "dummy", "MOCK_API_KEY": "dummy"}
    rates: dict[str, float] = {}
    lm_eval = _peer_exe("lm_eval", peer_bin)
    if lm_eval:
        (work / "tasks").mkdir(exist_ok=True)
        (work / "tasks" / "evalkit_bench.yaml").write_text(LM_EVAL_TASK.format(prompts=prompts))
        cmd = [lm_eval, "--model", "local-chat-completions", "--model_args",
               f"model=mock-model,base_url={url}/chat/completions,num_concurrent={concurrency},max_retries=3,timeout=120,tokenizer_backend=none",
               "--include_path", str(work / "tasks"), "--tasks", "evalkit_bench", "--apply_chat_template",
               "--output_path", str(work / "lm_eval_out"), "--log_samples"]
        rates["lm-eval local-chat-completions"] = _timed_peer(cmd, env, n)
    else:
        print("  lm-eval: not installed, skipped (pip install 'lm_eval[api]'; --peer-bin DIR if it lives in another venv)")
    inspect = _peer_exe("inspect", peer_bin)
    if inspect:
        # Inspect globs the task file and data paths: give them relative to its working folder
        (work / "inspect_task.py").write_text(INSPECT_TASK.format(prompts=prompts.name))
        cmd = [inspect, "eval", "inspect_task.py", "--model", "openai-api/mock/mock-model", "--model-base-url", url,
               "--max-connections", str(concurrency), "--max-retries", "3", "--timeout", "120", "--max-tokens", "16",
               "--temperature", "0", "--display", "plain", "--no-log-realtime", "--log-dir", str(work / "inspect_out")]
        rates["Inspect openai-api"] = _timed_peer(cmd, env, n, cwd=work)
    else:
        print("  Inspect: not installed, skipped (pip install inspect-ai openai; --peer-bin DIR if it lives in another venv)")
    return rates


def _timed_peer(cmd: list[str], env: dict, n: int, cwd: Path = REPO) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=cwd)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        print(f"  {Path(cmd[0]).name} failed ({p.returncode}): {(p.stderr or p.stdout)[-600:]}")
        return float("nan")
    return n / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--overhead-n", type=int, default=20_000)
    ap.add_argument("--fanout-n", type=int, default=20_000)
    ap.add_argument("--memory-n", type=int, default=200_000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--parts", default="overhead,fanout,memory")
    ap.add_argument("--repeat", type=int, default=3, help="evalkit runs in the overhead part, alternating with bare loops [3]")
    ap.add_argument("--before", type=Path, help="another checkout (a git worktree of an earlier commit) whose `evalkit run` "
                    "takes turns with this one's in the overhead part")
    ap.add_argument("--peer-bin", type=Path, help="folder holding lm_eval / inspect executables (e.g. another venv's bin)")
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
            # evalkit runs alternate with bare loops; each run is compared with the mean of the bare
            # loops either side of it, and the median ratio is reported (this machine is noisy)
            bares = [asyncio.run(bare_loop(url, a.overhead_n, a.concurrency))]
            checkouts = {"evalkit": REPO, **({"before": a.before.resolve()} if a.before else {})}
            ratios: dict[str, list[float]] = {name: [] for name in checkouts}
            stage_ratios: list[float] = []
            for i in range(a.repeat):
                for name, checkout in checkouts.items():  # with --before: the two checkouts take turns
                    out = tmp / f"o1-{name}-{i}"
                    wall, _ = run_timed(evalkit_cmd("run", url, data, out, a.concurrency, "--judges", "keyword"), checkout)
                    bares.append(asyncio.run(bare_loop(url, a.overhead_n, a.concurrency)))
                    bare_rate = a.overhead_n / ((bares[-2] + bares[-1]) / 2)
                    ratios[name].append(a.overhead_n / wall / bare_rate)
                    line = f"  run {i + 1}, {name}: {a.overhead_n / wall:.0f} req/s, bare {bare_rate:.0f} req/s: {ratios[name][-1]:.2f}x"
                    if name == "evalkit":
                        manifest = orjson.loads((out / "mock-model" / "manifest.json").read_bytes())
                        stage_ratios.append(manifest["stages"]["generate"]["requests_per_s"] / bare_rate)
                        line += f" (generate stage {stage_ratios[-1]:.2f}x)"
                    print(line)
            bare_rate = a.overhead_n / statistics.median(bares)
            ek_rate = bare_rate * statistics.median(ratios["evalkit"])
            # the fixed costs alone: `evalkit evaluate` (process start, judge, score) on the stored answers
            fixed: dict[str, list[float]] = {name: [] for name in checkouts}
            for _ in range(a.repeat):
                for name, checkout in checkouts.items():
                    shutil.rmtree(tmp / f"o1-{name}-0" / "mock-model" / "judgments")
                    cmd = evalkit_cmd("evaluate", url, data, tmp / f"o1-{name}-0", a.concurrency, "--judges", "keyword")
                    fixed[name].append(run_timed(cmd, checkout)[0])
            ttfr = time_to_first_request(url, port, data, tmp / "o2")
            peer_rates = peers(url, a.overhead_n, a.concurrency, tmp / "peers", a.peer_bin)
            proc.terminate()
            print(f"  bare aiohttp loop: {bare_rate:8.0f} req/s (median of {len(bares)} runs)")
            for name, rs in ratios.items():
                print(f"  {name} run (end to end, process start included) / bare: median {statistics.median(rs):.2f}x "
                      f"of {a.repeat} ({', '.join(f'{r:.2f}' for r in rs)})  (target >= 0.90x)")
                print(f"  {name} evaluate (process start, judge and score {a.overhead_n} answers): median "
                      f"{statistics.median(fixed[name]):.2f} s of {a.repeat}")
            print(f"  evalkit generate stage alone (engine + JSONL writer) / bare: median {statistics.median(stage_ratios):.2f}x")
            print(f"  process start to first request: {ttfr:.2f} s  (target well under 1 s)")
            for name, rate in peer_rates.items():
                print(f"  {name} (end to end, process start included): {rate:8.0f} req/s; evalkit / it = {ek_rate / rate:.2f}x")
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
