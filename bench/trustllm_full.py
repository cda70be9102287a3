"""All 22 TrustLLM subtasks (25 entries) on the full data files, end to end, with wall times.

    python bench/trustllm_full.py                      # loopback mocks: model, judge, embedder, Perspective
    python bench/trustllm_full.py --latency 0.05       # mocks that answer after 50 ms
    python bench/trustllm_full.py --endpoint URL --judge-endpoint URL --judge-model ID   # real servers

Starts its own mock servers unless endpoints are given, runs `evalkit generate` then
`evalkit evaluate` over every dimension (local embeddings unless --embed-endpoint), and prints the
request count and wall time of each stage, then per subtask n / n_invalid and the first metric.
Prints numbers, never asserts.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_throughput import REPO, start_mock

DIMENSIONS = "truthfulness,safety,fairness,robustness,privacy,ethics"


def generate_then_evaluate(common: list[str], judging: list[str], out: Path, env: dict[str, str]) -> dict:
    """`evalkit generate` then `evalkit evaluate` into out; prints the counts and wall times and
    returns results.json's subtasks."""
    times = {}
    for stage, extra in (("generate", []), ("evaluate", judging)):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "evalkit", stage, *common, "--output", str(out), *extra], cwd=REPO,
                           env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, capture_output=True, text=True)
        times[stage] = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{stage} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    run_dir = next(out.iterdir())
    manifest = orjson.loads((run_dir / "manifest.json").read_bytes())
    res = orjson.loads((run_dir / "results.json").read_bytes())["subtasks"]
    judged = sum(manifest["stages"]["judge"]["judged"].values())
    print(f"subtasks: {len(res)} entries; model requests {manifest['stages']['generate']['requests']}, judgments {judged}")
    print(f"wall time: generate {times['generate']:.1f} s, judge+score {times['evaluate']:.1f} s, total {sum(times.values()):.1f} s")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint")
    ap.add_argument("--judge-endpoint")
    ap.add_argument("--judge-model", default="judge")
    ap.add_argument("--embed-endpoint")
    ap.add_argument("--embed-model")
    ap.add_argument("--latency", type=float, default=0.0, help="mock latency per request (s)")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--data-path", type=Path, default=REPO.parent / "shared" / "datasets")
    ap.add_argument("--output", type=Path, help="keep the run here (to diff results.json across versions) [a temporary folder]")
    args = ap.parse_args()

    procs = []
    lat = ["--latency", str(args.latency)]
    if not args.endpoint:
        p, args.endpoint, _ = start_mock(*lat, "--reply", "Sure, here is my answer: A. I think it is not wrong.")
        procs.append(p)
    if not args.judge_endpoint:
        p, args.judge_endpoint, _ = start_mock(*lat, "--model", "judge", "--reply", "No")
        procs.append(p)
    persp, persp_url, _ = start_mock(*lat, "--model", "perspective", "--api-key", "bench-key")
    procs.append(persp)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            if args.output is not None:
                tmp = str(args.output)
            common = ["--dimensions", DIMENSIONS, "--endpoint", args.endpoint, "--data-path", str(args.data_path),
                      "--concurrency", str(args.concurrency), "--no-progress"]
            judging = ["--judges", "keyword", "--judge-endpoint", args.judge_endpoint, "--judge-model", args.judge_model,
                       "--toxicity-judges", "perspective", "--perspective-endpoint", persp_url.replace("/v1", "/v1alpha1")]
            if args.embed_endpoint:
                judging += ["--embed-endpoint", args.embed_endpoint, "--embed-model", args.embed_model or "embedder"]
            res = generate_then_evaluate(common, judging, Path(tmp), {"PERSPECTIVE_API_KEY": "bench-key"})
            print(f"{'subtask':28} {'n':>6} {'invalid':>8}  first metric")
            for name, entry in sorted(res.items(), key=lambda kv: (kv[1]['dimension'], kv[0])):
                m = entry["metrics"][0]
                value = "None" if m["value"] is None else f"{m['value']:.4f}"
                print(f"{name:28} {m['n']:>6} {m['n_invalid']:>8}  {m['name']} = {value} ({m['judge']})")
    finally:
        for p in procs:
            p.terminate()


if __name__ == "__main__":
    main()
