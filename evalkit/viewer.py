"""`evalkit view`: one self-contained HTML file to read runs answer by answer.

    evalkit view runs/dense runs/bnb4 --output reports/view.html

The page (viewer.html, no server, no network) lists every item of every subtask; it filters by
subtask, category, judge verdict (in any run or one), items where the runs' verdicts disagree,
and a text search, and shows for one item the conversation, each run's answer side by side,
every judge's verdict with its raw output, latency and tokens. The filter state lives in the URL
fragment, so a link to a filtered list or to one item can be shared with the file.

Rows line up across runs by (subtask, item id): a decoding sweep's configurations and a
multi-turn item's turns have item ids of their own.
"""

from __future__ import annotations

import base64
import gzip
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from .errors import ViewError
from .judges.base import user_prompt
from .records import JudgmentRecord, ResponseRecord, read_records

CATEGORY_FIELDS = ("group", "category", "type")  # the first an item has is its category in the viewer


def _run_names(run_dirs: list[Path]) -> list[str]:
    names = [d.name for d in run_dirs]
    if len(set(names)) != len(names):  # runs/a/dense and runs/b/dense: tell them apart by their parents
        names = [f"{d.parent.name}/{d.name}" for d in run_dirs]
    return names


def _records(folder: Path, schema):
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if not path.name.endswith(".stale.jsonl"):  # answers of another configuration, set aside
            yield from read_records(path, schema)


def _prompt_of(r: ResponseRecord) -> str:
    text = user_prompt(r)  # a multimodal turn is a list of parts: shown as its JSON
    return text if isinstance(text, str) else orjson.dumps(text).decode()


def collect(run_dirs: list[Path]) -> dict[str, Any]:
    """The page's data, in two parts. The index, which the list and its filters need: run names,
    subtasks, the verdict keys (judge and label joined by "\\x01") and one row per (subtask, item id) with its prompt,
    category and, per run, None (no answer), 0 (the request failed) or its verdict keys' indices.
    The details, row by row, which one item's view needs: the conversation when it has more than
    the prompt, and per run the answer [text, error, finish reason, latency, prompt tokens,
    completion tokens, [[judge, label, score, raw output], ...]] or None."""
    if not run_dirs:
        raise ViewError("give at least one run folder (e.g. runs/<model>)")
    for d in run_dirs:
        if not (d / "responses").is_dir():
            raise ViewError(f"{d} holds no responses/ folder: give run folders made by `evalkit run` or `generate`")
    n = len(run_dirs)
    rows: dict[tuple[str, str], tuple[dict[str, Any], list[Any]]] = {}
    subtasks: dict[str, int] = {}
    keys: dict[str, int] = {}
    for i, d in enumerate(run_dirs):
        verdicts: dict[str, list[list[Any]]] = {}
        for j in _records(d / "judgments", JudgmentRecord):
            label = j.label if j.error is None else f"error: {j.error.kind}"
            raw = j.raw if j.error is None else j.error.message
            verdicts.setdefault(j.response_key, []).append([j.judge, j.subtask, label, j.score, raw])
        for r in _records(d / "responses", ResponseRecord):
            found = rows.get((r.subtask, r.item_id))
            if found is None:
                item = r.item
                category = next((str(item[f]) for f in CATEGORY_FIELDS if item.get(f) not in (None, "")), "")
                s = subtasks.setdefault(r.subtask, len(subtasks))
                found = rows[(r.subtask, r.item_id)] = (
                    {"s": s, "id": r.item_id, "c": category, "p": _prompt_of(r), "v": [None] * n},
                    [r.messages if r.messages and len(r.messages) > 1 else None, [None] * n])
            row, detail = found
            # a subtask that judges another's answers (toxicity of jailbreak's) is named beside its judge
            mine = [[jd if sub == r.subtask else f"{jd} ({sub})", lab, sc, raw] for jd, sub, lab, sc, raw in verdicts.get(r.key, [])]
            row["v"][i] = 0 if r.error is not None else [
                keys.setdefault(f"{jd}\x01{'no label' if lab is None else lab}", len(keys)) for jd, lab, _, _ in mine]
            error = None if r.error is None else (
                f"{r.error.kind}" + (f" {r.error.status}" if r.error.status else "") + f": {r.error.message}")
            usage = r.usage
            detail[1][i] = [r.response, error, r.finish_reason, r.latency_s, usage.prompt_tokens if usage else None,
                            usage.completion_tokens if usage else None, mine]
    if not rows:
        raise ViewError("the runs hold no responses: run `evalkit run` (or `generate`) first")
    return {"index": {"runs": _run_names(run_dirs), "subtasks": list(subtasks), "verdicts": list(keys),
                      "rows": [row for row, _ in rows.values()]},
            "details": [detail for _, detail in rows.values()]}


def page(data: dict[str, Any]) -> str:
    """viewer.html with the data inlined. The index comes first, as JSON (with '<' escaped, so no text
    can close its script element), and the page is drawn from it while the browser still reads the
    details after it: gzip in base64 (a third of the bytes for a large run; the browser inflates it
    natively)."""
    index = orjson.dumps(data["index"]).replace(b"<", b"\\u003c").decode()
    details = base64.b64encode(gzip.compress(orjson.dumps(data["details"]), compresslevel=6, mtime=0)).decode()
    template = resources.files("evalkit").joinpath("viewer.html").read_text(encoding="utf-8")
    return template.replace("__EVALKIT_INDEX__", index, 1).replace("__EVALKIT_DETAILS__", details, 1)


def write_view(run_dirs: list[Path], output: Path) -> Path:
    text = page(collect(run_dirs))
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(output)
    return output
