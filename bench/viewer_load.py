"""How fast `evalkit view` opens and filters a large run, in headless Chromium.

    .venv/bin/python bench/viewer_load.py [--records 30000] [--runs 2] [--chromium /usr/bin/chromium]

Writes --runs synthetic run folders of --records answers each (12 subtasks, categories, two
judges per answer, answers of a few hundred characters), builds the page with `evalkit view`, and
measures in the browser (performance.now(), navigation start = 0):
  - list ready: the index (prompts, categories, verdicts) read and parsed, the first page of rows
    drawn and every filter usable; the browser is still reading the answers after it;
  - answers ready: the details (answers, judge outputs) read and inflated;
  - each filter: the handler's own time (filter + redraw) for a subtask, a verdict, a text search
    over prompts and answers, and "runs disagree".
Baseline, measured in the same run: the same data inlined as one plain JSON script and only
parsed (no viewer), the simplest way to build such a page. The ratio says what the viewer adds; the target is "well under 2 s" for ready.
"""

from __future__ import annotations

import argparse
import itertools
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from evalkit.records import JsonlWriter
from evalkit.viewer import collect, write_view

# a Zipf-distributed vocabulary of 20,000 made-up words: about as compressible as English answers
_rng = random.Random(1)
WORDS = ["".join(_rng.choices("etaoinshrdlcumwfgypbvkjxqz", k=_rng.randint(2, 9))) for _ in range(20000)]
CUM_WEIGHTS = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(WORDS))))


def text(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choices(WORDS, cum_weights=CUM_WEIGHTS, k=rng.randint(lo, hi)))


def synth_run(folder: Path, records: int, seed: int) -> None:
    rng = random.Random(seed)
    subtasks = [f"subtask_{i:02d}" for i in range(12)]
    with JsonlWriter(folder / "responses" / "all.jsonl") as rw, JsonlWriter(folder / "judgments" / "all.jsonl") as jw:
        for n in range(records):
            sub = subtasks[n % len(subtasks)]
            prompt = text(rng, 10, 60)
            answer = text(rng, 20, 120)
            key = f"{seed}-{n}"
            rw.write({"key": key, "subtask": sub, "item_id": str(n), "model": folder.name, "params": {"max_tokens": 256},
                      "messages": [{"role": "user", "content": prompt}], "response": answer, "finish_reason": "stop",
                      "usage": {"prompt_tokens": 40, "completion_tokens": 90}, "latency_s": 0.5, "created": 0.0,
                      "group": f"category_{n % 7}"})
            for judge in ("keyword:gcg29", "llm:judge"):
                jw.write({"key": f"{key}-{judge}", "response_key": key, "subtask": sub, "item_id": str(n), "judge": judge,
                          "label": rng.choice(("refusal", "compliance")), "raw": text(rng, 5, 20), "created": 0.0})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=30000)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs = [root / f"run{i}" for i in range(args.runs)]
        for i, d in enumerate(dirs):
            synth_run(d, args.records, i)
        t = time.perf_counter()
        page_path = write_view(dirs, root / "view.html")
        build_s = time.perf_counter() - t
        data = orjson.dumps(collect(dirs)).replace(b"<", b"\\u003c").decode()
        base = root / "baseline.html"
        base.write_text('<!doctype html><html><body><script id="d" type="application/json">' + data + "</script><script>"
                        "JSON.parse(document.getElementById('d').textContent);"
                        "window.ready_ms=performance.now();document.body.dataset.ready='1'</script></body></html>")
        size_mb = page_path.stat().st_size / 1e6
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"])
            ready, answers, base_ready, filters = [], [], [], {}
            for _ in range(3):
                pg = browser.new_page()
                pg.goto(base.as_uri())
                pg.wait_for_selector("body[data-ready='1']", state="attached", timeout=60000)
                base_ready.append(pg.evaluate("window.ready_ms"))
                pg.close()
                pg = browser.new_page()
                pg.goto(page_path.as_uri())
                pg.wait_for_selector("body[data-ready='1']", state="attached", timeout=60000)
                ready.append(pg.evaluate("window.evalkitTimings.ready_ms"))
                pg.wait_for_selector("body[data-details='1']", state="attached", timeout=60000)
                answers.append(pg.evaluate("window.evalkitTimings.details_ms"))
                for name, js in (
                    ("subtask", "const e=document.getElementById('f-subtask'); e.value='subtask_03'; e.onchange();"),
                    ("verdict", "const e=document.getElementById('f-verdict'); e.selectedIndex=1; e.onchange();"),
                    ("search prompts+answers", "document.getElementById('f-q').value='bomb sorry';"
                                               "const e=document.getElementById('f-qa'); e.checked=true; e.onchange();"),
                    ("runs disagree", "const e=document.getElementById('f-disagree'); e.checked=true; e.onchange();"),
                    ("clear all", "location.hash=''; dispatchEvent(new HashChangeEvent('hashchange'));"),
                ):
                    ms = pg.evaluate(f"() => {{ const t = performance.now(); {js} return performance.now() - t; }}")
                    filters.setdefault(name, []).append(ms)
                pg.close()
            browser.close()
    med = lambda xs: sorted(xs)[len(xs) // 2]
    print(f"{args.runs} runs x {args.records} answers: page {size_mb:.1f} MB, built in {build_s:.1f} s")
    print(f"list ready (index read + parsed, first page drawn), median of 3: {med(ready):.0f} ms "
          f"= {med(ready) / 2000:.2f} of the 2 s target; answers ready (details inflated) {med(answers):.0f} ms")
    print(f"baseline (the same data as one plain JSON page, parsed only) {med(base_ready):.0f} ms; "
          f"list ready / baseline {med(ready) / med(base_ready):.2f}x, answers ready / baseline {med(answers) / med(base_ready):.2f}x")
    for name, xs in filters.items():
        print(f"  filter {name:24} {med(xs):7.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
