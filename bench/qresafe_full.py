"""Q-resafe's protocol and the utility benchmarks on the full data files, end to end, with wall times.

    python bench/qresafe_full.py                    # loopback mocks for the model and the judge
    python bench/qresafe_full.py --latency 0.05     # mocks that answer after 50 ms
    python bench/qresafe_full.py --endpoint URL --judge-endpoint URL --judge-model ID   # real servers

Runs `evalkit generate` then `evalkit evaluate` on AdvBench (vanilla, AOA, the 49-configuration
decoding sweep: 25,480 requests), HarmBench, HarmfulQA, CatQA, DangerousQA, XSTest, MT-Bench and
AlpacaEval 1.0/2.0, with the three harm judges side by side, and prints the request counts, the
wall time of each stage, and per subtask n / n_invalid and the first metric of each judge. The
mock judge answers each prompt in its expected format (a fixed verdict), so every parser is
exercised. Prints numbers, never asserts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from client_throughput import REPO, start_mock
from trustllm_full import generate_then_evaluate

SUBTASKS = "advbench,advbench_aoa,advbench_decoding,harmbench,harmfulqa,catqa,dangerousqa,xstest,mt_bench,alpaca_eval,alpaca_eval2"
JUDGE_SCRIPT = {"default": "No", "rules": [
    {"contains": "#thescore", "reply": "#thereason: declined.\n#thescore: 1"},
    {"contains": "[[rating]]", "reply": "Rating: [[7]]"},  # MT-Bench turn 1 (instructions in the user turn)
    {"contains": "<|The Start of Assistant A's Conversation with User|>", "reply": "Rating: [[6]]"},  # turn 2
    {"contains": "CLASS:", "reply": "1_full_compliance"},  # XSTest's classifier prompt
    {"contains": "'rank': <model-rank>", "reply": "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"},
    {"contains": "## Best Model Identifier", "reply": "m", "top_logprobs": [{"token": "m", "logprob": -0.1}, {"token": "M", "logprob": -2.4}]},
]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--endpoint")
    ap.add_argument("--judge-endpoint")
    ap.add_argument("--judge-model", default="judge")
    ap.add_argument("--subtasks", default=SUBTASKS)
    ap.add_argument("--latency", type=float, default=0.0, help="mock latency per request (s)")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--data-path", type=Path, default=REPO.parent / "shared" / "datasets")
    args = ap.parse_args()

    procs = []
    lat = ["--latency", str(args.latency)]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            if not args.endpoint:
                p, args.endpoint, _ = start_mock(*lat, "--reply", "Sure, here is what you asked for.")
                procs.append(p)
            if not args.judge_endpoint:
                script = Path(tmp) / "judge.json"
                script.write_bytes(orjson.dumps(JUDGE_SCRIPT))
                p, args.judge_endpoint, _ = start_mock(*lat, "--model", "judge", "--script", str(script))
                procs.append(p)
            out = Path(tmp) / "runs"
            out.mkdir()
            common = ["--subtasks", args.subtasks, "--endpoint", args.endpoint, "--data-path", str(args.data_path),
                      "--concurrency", str(args.concurrency), "--no-progress"]
            judging = ["--judges", "keyword,llm,harmfulness", "--judge-endpoint", args.judge_endpoint, "--judge-model", args.judge_model]
            res = generate_then_evaluate(common, judging, out, {})
            print(f"{'subtask':20} {'metric':18} {'n':>6} {'invalid':>8}  value  judge")
            for name, entry in res.items():
                seen = set()
                for m in entry["metrics"]:
                    if m["judge"] in seen or "/" in m["name"]:
                        continue
                    seen.add(m["judge"])
                    value = "None" if m["value"] is None else f"{m['value']:.4f}"
                    print(f"{name:20} {m['name']:18} {m['n']:>6} {m['n_invalid']:>8}  {value}  {m['judge']}")
        finally:
            for p in procs:
                p.terminate()


if __name__ == "__main__":
    main()
