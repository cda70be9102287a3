"""One run folder's context and its manifest.json: the model, the configuration, versions,
dataset hashes, each stage's summary, and tokens and cost (DESIGN.md "Data flow"):

    generate.py  dataset items -> Engine -> responses/<subtask>.jsonl
    judging.py   responses -> judges (keyword | classifier | llm through the Engine) -> judgments/<subtask>.jsonl
    scoring.py   responses + judgments -> Task.score -> results.json (+ outcomes.json)

Each stage reads only the previous stage's files, resumes by record key, and records what it
did here; stages.py runs them for `evalkit run / generate / evaluate` and the matrix.
"""

from __future__ import annotations

import functools
import logging
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .config import RunConfig
from .cost import Spending
from .datasets import dataset_file, expected_sha256, sha256_file
from .endpoints import redact_url
from .errors import ConfigError, DataError
from .records import JudgmentRecord, R, ResponseRecord, read_records
from .tasks import Task

log = logging.getLogger("evalkit")


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "__", model).strip("_") or "model"


@dataclass
class RunContext:
    cfg: RunConfig
    tasks: list[Task]
    model: str
    run_dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    spending: Spending | None = None  # this invocation's, across stages (--max-cost)
    _read: dict[Path, tuple[tuple[int, int], list[Any]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.spending is None:
            self.spending = Spending(self.cfg.max_cost)

    def responses_path(self, task: Task) -> Path:
        return self.run_dir / "responses" / f"{task.responses_of or task.name}.jsonl"

    def judgments_path(self, task: Task) -> Path:
        return self.run_dir / "judgments" / f"{task.name}.jsonl"

    def responses(self, task: Task) -> list[ResponseRecord]:
        return self._records(self.responses_path(task), ResponseRecord)

    def judgments(self, task: Task) -> list[JudgmentRecord]:
        return self._records(self.judgments_path(task), JudgmentRecord)

    def _records(self, path: Path, schema: type[R]) -> list[R]:
        """A record file's records, read once while it is unchanged: the judge and score stages (and
        a subtask judging another's answers) share the read, which is most of their time on a large run."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return []
        stamp = (st.st_mtime_ns, st.st_size)
        if (hit := self._read.get(path)) is None or hit[0] != stamp:
            hit = self._read[path] = (stamp, read_records(path, schema))
        return hit[1]


# -- manifest --------------------------------------------------------------------------------


@functools.cache  # reading package metadata takes tens of ms, and the manifest is saved after every stage
def _versions() -> dict[str, str]:
    from importlib import metadata  # not at import time: it slows the start of every command

    out = {"python": platform.python_version()}
    for pkg in ("evalkit", "aiohttp", "tenacity", "pydantic", "orjson", "torch", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def load_manifest(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "manifest.json"
    if path.exists():
        return orjson.loads(path.read_bytes())
    return {}


def save_manifest(ctx: RunContext) -> None:
    m = ctx.manifest
    m.update(
        {
            "model": ctx.model,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": ctx.cfg.public_dump(),
            "versions": dict(_versions()),
            "platform": platform.platform(),
            "argv": [redact_url(a) if "://" in a else a for a in sys.argv[1:]],
        }
    )
    m.setdefault("created", m["updated"])
    m["cost"] = spend_summary(m, ctx.cfg.max_cost)
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = ctx.run_dir / "manifest.json.tmp"
    tmp.write_bytes(orjson.dumps(m, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    tmp.replace(ctx.run_dir / "manifest.json")


def spend_summary(manifest: dict[str, Any], max_cost: float | None = None) -> dict[str, Any]:
    """Tokens and cost of the latest generation and judging (USD where the models have prices)."""
    stages = manifest.get("stages", {})
    judging = list((stages.get("judge") or {}).get("requests", {}).values())
    out: dict[str, Any] = {}
    for name, parts in (("generation", [stages["generate"]] if "generate" in stages else []), ("judging", judging)):
        if not parts:
            continue
        costs = [p["cost_usd"] for p in parts if "cost_usd" in p]
        out[name] = {k: sum(p.get("usage", {}).get(k, 0) for p in parts) for k in ("prompt_tokens", "completion_tokens")}
        if costs:
            out[name]["usd"] = round(sum(costs), 6)
    if any("usd" in v for v in out.values()):
        out["total_usd"] = round(sum(v.get("usd", 0.0) for v in out.values()), 6)
    if max_cost is not None:
        out["max_cost"] = max_cost
    return out


def check_prices(cfg: RunConfig, models: list[str | None]) -> None:
    """With --max-cost, every model the run will pay for has a price: checked before any request."""
    if cfg.max_cost is None:
        return
    for m in models:
        if m is not None and m not in cfg.prices:
            raise ConfigError(f"--max-cost needs the price of {m!r}: add [prices.\"{m}\"] with input = and output = "
                              f"(USD per million tokens; 0 for a local model) to the --config file")


def record_datasets(ctx: RunContext, root: Path) -> None:
    entries = ctx.manifest.setdefault("datasets", {})
    for t in ctx.tasks:
        for rel in t.data_files():
            path = dataset_file(root, t.dataset, rel)
            digest = sha256_file(path)
            expected = expected_sha256(t.dataset, rel)
            entries[f"{t.dataset}/{rel}"] = {
                "path": str(path),
                "sha256": digest,
                "matches_registry": None if expected is None else digest == expected,
            }
            if expected is not None and digest != expected and not ctx.cfg.accept_modified_data:
                raise DataError(
                    f"{path}: its sha256 ({digest[:12]}...) differs from the registry's ({expected[:12]}...): the file was "
                    f"changed or truncated. Fetch it again (`evalkit datasets fetch {t.dataset} --force`), or pass "
                    f"--accept-modified-data to evaluate it as it is (the manifest records that choice)")
