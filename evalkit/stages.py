"""The stages of one evaluation (generate -> judge -> score) for a configuration, with their console
lines: what `evalkit run / generate / evaluate` and `evalkit matrix` call."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from .errors import EXIT_GATE, ConfigError, RunFailed


def failure_line(summary: dict[str, Any], what: str) -> str | None:
    """'all N requests failed: cause' or 'K of N requests failed; commonest: cause (n)', or None."""
    n, errors = summary.get("requests", 0), summary.get("errors", 0)
    if not errors:
        return None
    causes = summary.get("error_causes") or [
        c for part in summary.get("by_api", {}).values() for c in part.get("error_causes", [])]
    cause = causes[0][0] if causes else "see the error records"
    if errors == n:
        return f"all {n} {what} requests failed: {cause}"
    return f"{errors} of {n} {what} requests failed; commonest cause: {cause} ({causes[0][1] if causes else '?'}x)"


async def run_stages(cfg, stages: tuple[str, ...]) -> int:
    """The stages of `run` / `generate` / `evaluate` for one configuration (also used by `matrix`)."""
    from . import gates
    from .generate import discover_model
    from .judging import check_judges
    from .manifest import RunContext, check_prices, load_manifest, model_slug
    from .tasks import select

    tasks = select(cfg.dimensions, cfg.subtasks)
    checks = [gates.parse_gate(g, [t.name for t in tasks]) for g in cfg.fail_if]
    if checks and "judge" not in stages:
        raise ConfigError("--fail-if checks scores: use it with `evalkit run` or `evaluate`, not `generate`")
    if any(g.paired for g in checks):
        _check_baseline(cfg.baseline)
    if "judge" in stages:  # every judge option is checked before the first answer is asked for
        await check_judges(cfg, tasks)
    if "generate" in stages:
        model = await discover_model(cfg)
        check_prices(cfg, [model])
        run_dir = cfg.output / (cfg.run_name or model_slug(model))
    else:
        run_dir, model = _existing_run(cfg)
    _check_writable(run_dir)
    ctx = RunContext(cfg, tasks, model, run_dir, load_manifest(run_dir))
    print(f"evalkit: model {model}, run folder {run_dir}, subtasks {', '.join(t.name for t in tasks)}", file=sys.stderr)
    try:
        return await _stages(ctx, stages, checks)
    finally:  # also when the run stops at --max-cost
        _print_cost(ctx.manifest.get("cost", {}), ("generation",) * ("generate" in stages) + ("judging",) * ("judge" in stages))


async def _stages(ctx, stages: tuple[str, ...], checks: list) -> int:
    from . import gates
    from .generate import generate
    from .judging import judge
    from .scoring import score

    run_dir, tasks = ctx.run_dir, ctx.tasks
    if "generate" in stages:
        g = await generate(ctx)
        if g.get("requests"):
            lat = g.get("e2e_latency_s")  # none when several APIs were used (see by_api in the manifest)
            print(
                f"evalkit: generated {g['requests']} answers in {g['wall_s']:.1f} s ({g['requests_per_s']:.0f} req/s), "
                f"{g['errors']} errors, {g['retries']} retries ({g['rate_limited']} rate-limited), "
                f"{g['usage']['completion_tokens']} output tokens"
                + (f", latency p50 {lat['p50']:.3f} s p99 {lat['p99']:.3f} s" if lat else ""),
                file=sys.stderr,
            )
        _print_replicas(g)
        line = failure_line(g, "generation")
        if line and g["errors"] == g["requests"]:
            raise RunFailed(f"{line}. The error records are in {run_dir / 'responses'}; fix the cause and rerun to resume")
        if line:
            print(f"evalkit: {line}", file=sys.stderr)
    if "judge" in stages:
        await judge(ctx)
        results = score(ctx)
        _print_results(results, [t.name for t in tasks])
        print(f"evalkit: results in {run_dir / 'results.json'}", file=sys.stderr)
        failed = gates.check(checks, results)
        if any(g.paired for g in checks):
            from .report import comparison

            failed += gates.check_paired(checks, comparison([ctx.cfg.baseline, run_dir]).pairs)
        for line in failed:
            print(f"evalkit: {line}", file=sys.stderr)
        if failed:
            return EXIT_GATE
    else:
        print(f"evalkit: responses in {run_dir / 'responses'}; judge and score them with `evalkit evaluate`", file=sys.stderr)
    return 0


def _print_cost(cost: dict[str, Any], parts: tuple[str, ...]) -> None:
    """One line: tokens (and USD, where priced) of this invocation's generation and judging."""
    shown = [(p, cost[p]) for p in parts if p in cost and (cost[p]["prompt_tokens"] or cost[p]["completion_tokens"])]
    if not shown:
        return
    line = "; ".join(f"{p} {c['prompt_tokens']:,} in / {c['completion_tokens']:,} out tokens"
                     + (f" (${c['usd']:.4f})" if "usd" in c else "") for p, c in shown)
    if any("usd" in c for _, c in shown):
        line += f"; total ${sum(c.get('usd', 0.0) for _, c in shown):.4f}"
        if cost.get("max_cost") is not None:
            line += f" of --max-cost ${cost['max_cost']:g}"
    print(f"evalkit: {line}", file=sys.stderr)


def _check_baseline(baseline: Path | None) -> None:
    """A regression gate's baseline run is named and scored, before any request is sent."""
    if baseline is None:
        raise ConfigError("a regression gate (\"... increases significantly\") compares with a baseline run: "
                          "pass --baseline RUN (a run folder with results.json), or gate with `evalkit compare BASELINE RUN`")
    if not (baseline / "results.json").is_file() or not (baseline / "outcomes.json").is_file():
        raise ConfigError(f"--baseline {baseline} holds no scored run (results.json and outcomes.json): "
                          f"run `evalkit evaluate` on it first, or fix the path")


def _check_writable(run_dir: Path) -> None:
    """The run folder can be made and written, before any request is sent."""
    probe = run_dir / ".evalkit-write-check"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the run folder {run_dir} ({e.strerror or e}): choose another --output "
                          f"(or --run-name), or free the space") from None


def _print_replicas(summary: dict[str, Any]) -> None:
    """Which replica answered how much, and when one left the rotation (or the endpoints file)."""
    import time

    for part in [summary, *summary.get("by_api", {}).values()]:
        for r in part.get("replicas", []):
            print(f"evalkit: replica {r['endpoint']}: {r['answered']} answered, {r['failed_attempts']} failed attempts, "
                  f"now {r['state']}", file=sys.stderr)
        for e in part.get("replica_events", []):
            when = time.strftime("%H:%M:%S", time.localtime(e["at"]))
            print(f"evalkit: {when} replica {e['endpoint']} {e['event']}" + (f": {e['reason']}" if e.get("reason") else ""),
                  file=sys.stderr)


def _existing_run(cfg) -> tuple[Path, str]:
    from .manifest import load_manifest, model_slug

    if cfg.run_name:
        run_dir = cfg.output / cfg.run_name
        if not run_dir.is_dir():
            raise ConfigError(f"no run folder {run_dir}: run `evalkit generate --run-name {cfg.run_name}` first, or check --output")
        return run_dir, cfg.model or load_manifest(run_dir).get("model", cfg.run_name)
    if cfg.model:
        run_dir = cfg.output / model_slug(cfg.model)
        if not run_dir.is_dir():
            raise ConfigError(f"no run folder {run_dir} for model {cfg.model}: run `evalkit generate` first, or check --output")
        return run_dir, cfg.model
    runs = sorted(p for p in cfg.output.glob("*") if (p / "responses").is_dir()) if cfg.output.is_dir() else []
    if len(runs) != 1:
        found = ", ".join(p.name for p in runs) or "none"
        raise ConfigError(f"pass --model to choose the run to evaluate under {cfg.output} (found: {found})")
    return runs[0], load_manifest(runs[0]).get("model", runs[0].name)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_results(results: dict[str, Any], names: list[str]) -> None:
    rows = [("subtask", "metric", "value", "trustllm", "n", "invalid", "judge")]
    for name in names:
        for m in results["subtasks"][name]["metrics"]:
            arrow = "↑" if m["direction"] == "higher_is_better" else "↓"
            rows.append((name, f"{m['name']} {arrow}", _fmt(m["value"]), _fmt(m.get("trustllm_value")), str(m["n"]), str(m["n_invalid"]), m["judge"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
