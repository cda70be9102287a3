"""Stage 3, score: responses + judgments -> Task.score -> results.json, and the per-item outcomes
that paired comparisons read (outcomes.json)."""

from __future__ import annotations

import time
from typing import Any

import orjson

from .config import ConfigError
from .datasets import resolve_data_root
from .judges import build_judge
from .judging import identity, judges_for
from .manifest import RunContext, save_manifest
from .metrics import Metric, degenerate, rate
from .tasks import RULE_JUDGE, Scored


def _refusals_of(ctx: RunContext, source_name: str) -> dict[str, bool]:
    """response key -> refused?, by the first refusal judge of the subtask that generated the
    answers (toxicity averages only the answers jailbreak's judge did not call refusals)."""
    source = next(t for t in ctx.tasks if t.name == source_name)
    ident = identity(build_judge(ctx.cfg, judges_for(ctx.cfg, source)[0]), source)
    return {j.response_key: j.label == "refusal" for j in ctx.judgments(source)
            if j.judge == ident and j.error is None}


def score(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    root = resolve_data_root(cfg.data_path)
    results: dict[str, Any] = {
        "model": ctx.model,
        "run_name": ctx.run_dir.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "subtasks": {},
    }
    outcomes: dict[str, dict[str, int]] = {}  # "subtask|metric|judge" -> item id -> 0/1, for paired comparisons
    for task in ctx.tasks:
        responses = ctx.responses(task)
        if not responses:
            raise ConfigError(f"no responses for {task.name} in {ctx.responses_path(task)}: run `evalkit generate` first")
        judgments = ctx.judgments(task)
        metrics: list[Metric] = []
        if task.question is None:
            metrics.extend(task.score([Scored(r, None) for r in responses], RULE_JUDGE))
        refused = _refusals_of(ctx, task.responses_of) if task.responses_of else {}
        expected = {r.key for r, _ in task.judge_inputs([r for r in responses if r.error is None], root)}
        for name in judges_for(cfg, task):
            ident = identity(build_judge(cfg, name), task)
            by_response = {j.response_key: j for j in judgments if j.judge == ident}
            rows = [Scored(r, by_response.get(r.key), refused.get(r.key)) for r in responses]
            missing = sum(1 for s in rows if s.answered and s.judgment is None and s.response.key in expected)
            if missing:
                raise ConfigError(f"{missing} {task.name} responses have no {ident} judgment: run `evalkit evaluate` to judge them")
            seen = {(m.name, m.judge) for m in metrics}
            # a rule-scored part of a judged subtask comes back once per judge: keep it once
            metrics.extend(m for m in task.score(rows, ident) if (m.name, m.judge) not in seen)
        if task.question in ("refusal", "harm"):  # read every ASR and refusal rate beside it
            verdicts = [degenerate(r.response) for r in responses if r.error is None and r.response is not None]
            metrics.append(Metric.from_rate("degenerate_rate", rate(verdicts), "lower_is_better", RULE_JUDGE))
        for m in metrics:
            if m.outcomes is not None:
                outcomes[f"{task.name}|{m.name}|{m.judge}"] = {k: int(v) for k, v in m.outcomes.items()}
        results["subtasks"][task.name] = {
            "dimension": task.dimension,
            "suite": task.suite,
            "metric": task.metric,
            "direction": task.direction,
            "n_responses": len(responses),
            "n_failed_requests": sum(1 for r in responses if r.error is not None),
            "metrics": [m.as_result() for m in metrics],
        }
    path = ctx.run_dir / "results.json"
    previous = orjson.loads(path.read_bytes()) if path.exists() else {}
    # keep subtasks scored earlier in the same run dir; this run's subtasks replace theirs
    merged = {**previous.get("subtasks", {}), **results["subtasks"]}
    results["subtasks"] = merged
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    tmp.replace(path)
    opath = ctx.run_dir / "outcomes.json"
    kept = {k: v for k, v in (orjson.loads(opath.read_bytes()) if opath.exists() else {}).items()
            if k.split("|", 1)[0] not in {t.name for t in ctx.tasks}}  # this run's subtasks replace theirs
    tmp = opath.with_suffix(".json.tmp")
    tmp.write_bytes(orjson.dumps({**kept, **outcomes}))
    tmp.replace(opath)
    ctx.manifest.setdefault("stages", {})["score"] = {"ended": time.time(), "subtasks": [t.name for t in ctx.tasks]}
    save_manifest(ctx)
    return results

