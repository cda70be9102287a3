"""Command-line interface: argument parsing, and the one place errors become exit codes (errors.py);
the work is in stages (run / generate / evaluate), report, viewer, matrix, datasets, mock_server."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic.fields import FieldInfo

from .config import EngineConfig, RunConfig, load_config
from .errors import EXIT_AUTH, EXIT_COST, EXIT_FAILED, EXIT_GATE, EXIT_USAGE  # noqa: F401 - the codes, with the tree
from .judges import FLAT_OPTIONS, JUDGES, OPTIONS, TOXICITY_JUDGES


def _run_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model under test")
    g.add_argument("--config", type=Path, help="TOML file holding any of these options (underscored names)")
    g.add_argument("--endpoint", action="append", help="OpenAI-compatible base URL; repeat (or comma-separate) for replicas [http://127.0.0.1:8000/v1]")
    g.add_argument("--endpoints-file", type=Path, help="file of replica base URLs (one per line), re-read during the run so "
                   "replicas can join and leave; replaces --endpoint")
    g.add_argument("--deployment", help="name for what the endpoints serve; answers are keyed on it instead of the checkpoint "
                   "the servers report (or their host names) [see README: deployment identity]")
    g.add_argument("--model", help="model id to request [first id from GET /v1/models]")
    g.add_argument("--api-key-env", help="environment variable holding the API key [EVALKIT_API_KEY, else OPENAI_API_KEY]")
    g.add_argument("--api", choices=["chat", "completions"], help="endpoint kind [chat]")
    g.add_argument("--wait", type=float, help="seconds to wait for the endpoint to come up [0]")
    g = p.add_argument_group("what to evaluate")
    g.add_argument("--dimensions", help="comma list of TrustLLM dimensions (see `evalkit list`)")
    g.add_argument("--subtasks", help="comma list of subtasks (see `evalkit list`)")
    g.add_argument("--data-path", type=Path, help="datasets folder (<dataset>/<file>) [$EVALKIT_DATA, else the datasets cache]")
    g.add_argument("--limit", type=int, help="only the first N items of each subtask")
    g.add_argument("--accept-modified-data", action="store_true", default=None,
                   help="evaluate dataset files whose sha256 differs from the registry (recorded in the manifest) [refuse]")
    g = p.add_argument_group("generation (override the per-subtask defaults)")
    g.add_argument("--max-tokens", type=int, help="max new tokens [per subtask: 512]")
    g.add_argument("--temperature", type=float, help="sampling temperature [per subtask: TrustLLM's table]")
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--system-prompt", help="system prompt for every subtask ('' for none) [per subtask]")
    g = p.add_argument_group("judges")
    g.add_argument("--judges", help=f"comma list of {', '.join(JUDGES)} [per subtask default]")
    g.add_argument("--toxicity-judges", help=f"comma list of {', '.join(TOXICITY_JUDGES)} [toxicity_classifier]")
    for cls in OPTIONS.values():  # each judge module's own options (judges/base.py JudgeOptions)
        for field, info in cls.model_fields.items():
            _option(g, cls.flag(field), info)
    g = p.add_argument_group("engine")
    g.add_argument("--concurrency", type=int, help="requests in flight [64]")
    g.add_argument("--rps", type=float, help="max requests started per second, paced smoothly [unlimited]")
    g.add_argument("--tpm", type=float, help="max tokens per minute (prompt + answer, estimated, corrected by usage) [unlimited]")
    g.add_argument("--max-attempts", type=int, help="attempts per request [6]")
    g.add_argument("--attempt-timeout", type=float, help="seconds per attempt [300]")
    g.add_argument("--max-request-time", type=float, help="seconds per request, retries included [900]")
    g.add_argument("--stream", action="store_true", default=None, help="stream answers (measures time to first token)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    g = p.add_argument_group("output")
    g.add_argument("--output", type=Path, help="runs folder; each model gets <output>/<model-slug>/ [runs]")
    g.add_argument("--run-name", help="run folder name under --output instead of the model id (e.g. dense, bnb4)")
    g.add_argument("--restart", action="store_true", default=None, help="discard earlier records instead of resuming")
    g = p.add_argument_group("cost (prices per model: a [prices.\"MODEL\"] table in the --config file)")
    g.add_argument("--max-cost", type=float, metavar="USD", help="stop cleanly before this invocation would spend more, "
                   "generation and judging together (exit 5; rerun to resume) [no limit]")
    _gate_option(p)
    p.add_argument("--baseline", type=Path, metavar="RUN", help="run folder the regression gates (\"... increases "
                   "significantly\") compare this run with, item by item")


def _gate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fail-if", action="append", metavar="GATE",
                   help='exit 4 when a result meets this condition, e.g. "advbench.asr > 0.10", or changes against the '
                        'baseline, e.g. "advbench.asr increases significantly" (repeat for more; SUBTASK.METRIC@JUDGE '
                        "picks one judge); checked before any request is sent")


def _option(g: argparse._ArgumentGroup, flag: str, info: FieldInfo) -> None:
    """A command-line option from a pydantic field: its type, its description as help, its default in brackets."""
    default = info.get_default(call_default_factory=True)
    shown = ",".join(default) if isinstance(default, list) else default
    help_ = (info.description or "") + (" (repeat, or comma-separate)" if isinstance(default, list) else "")
    help_ += f" [{shown}]" if shown not in (None, "") else ""
    kind = next((t for t in (get_origin(info.annotation), *get_args(info.annotation), info.annotation) if t in (list, int, float, str)), None)
    if kind is None:
        raise TypeError(f"{flag}: options of type {info.annotation} have no command-line form: use str, int, float or list[str]")
    if kind is list:
        g.add_argument(flag, action="append", help=help_)
    else:
        g.add_argument(flag, type=kind, help=help_)


# every RunConfig name the command line may set (argparse dest = the underscored name; a name with
# no option, such as backoff_base, is simply never given); `prices` lives only in config files
CONFIG_FIELDS = (
    [f for f in RunConfig.model_fields if f not in ("engine", "judge", "prices")] + list(EngineConfig.model_fields) + list(FLAT_OPTIONS)
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evalkit", description="Evaluate how trustworthy a model behind an OpenAI-compatible endpoint is.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (
        ("run", "generate, judge and score"),
        ("generate", "send the prompts and store the answers (stage 1)"),
        ("evaluate", "judge and score stored answers (stages 2-3)"),
    ):
        _run_options(sub.add_parser(name, help=help_, description=help_))
    lp = sub.add_parser("list", help="dimensions, subtasks, judges and datasets")
    lp.add_argument("--data-path", type=Path)
    dp = sub.add_parser("datasets", help="fetch or list datasets")
    dsub = dp.add_subparsers(dest="datasets_command", required=True)
    fp = dsub.add_parser("fetch", help="download and verify datasets into the cache")
    fp.add_argument("names", nargs="*", help="datasets to fetch [all]")
    fp.add_argument("--dest", type=Path, help="folder to fill [the datasets cache]")
    fp.add_argument("--mirror", help="base URL laid out as <mirror>/<dataset>/<path> instead of upstream")
    fp.add_argument("--force", action="store_true", help="download even files already verified")
    dl = dsub.add_parser("list", help="show which datasets are present and verified")
    dl.add_argument("--data-path", type=Path)
    cp = sub.add_parser("compare", help="compare runs: Markdown table, HTML report, PNG charts per dimension")
    cp.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<model>) or results.json files")
    cp.add_argument("--output", type=Path, default=Path("reports"), help="folder for the report [reports]")
    cp.add_argument("--baseline", type=Path, metavar="RUN", help="the run the paired comparisons (and regression gates) "
                    "test the others against; added if not among RUNS [the first run]")
    _gate_option(cp)
    vp = sub.add_parser("view", help="one self-contained HTML page to read runs answer by answer, side by side")
    vp.add_argument("runs", nargs="+", type=Path, help="run folders (runs/<model>)")
    vp.add_argument("--output", type=Path, default=Path("reports/view.html"), help="HTML file to write [reports/view.html]")
    xp = sub.add_parser("matrix", help="evaluate model variants (dense, quantized, pruned, hosted) one after another, then compare")
    xp.add_argument("file", type=Path, help="matrix TOML file (see examples/cpu_matrix.toml)")
    xp.add_argument("--only", help="comma list of variant names to run [all]")
    xp.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    xp.add_argument("--list", action="store_true", help="print the variant names, one per line (for job arrays)")
    xp.add_argument("--no-report", dest="report", action="store_false",
                    help="leave the comparison report out (one variant per cluster job; `evalkit compare` merges them)")
    # listed here; main() hands its arguments to mock_server.main, so other commands never import aiohttp.web
    sub.add_parser("mock-server", help="a fault-injecting mock OpenAI server for dry runs and tests (--help: its options)")
    return p


def _config_from(args: argparse.Namespace) -> RunConfig:
    overrides: dict[str, Any] = {f: getattr(args, f, None) for f in CONFIG_FIELDS}
    if args.system_prompt is not None:
        overrides["system_prompt"] = args.system_prompt
    return load_config(args.config, overrides)


async def _evaluate(args: argparse.Namespace, stages: tuple[str, ...]) -> int:
    from .stages import run_stages

    return await run_stages(_config_from(args), stages)


def _list(args: argparse.Namespace) -> int:
    from . import datasets
    from .judges import REGISTRY
    from .tasks import DIMENSIONS, Task, all_tasks

    print("dimensions (--dimensions selects their TrustLLM subtasks): " + ", ".join(DIMENSIONS))
    print("\nsubtasks (--subtasks):")
    rows = [("name", "dimension", "suite", "metric", "default judge", "T", "data")]
    for t in all_tasks().values():
        arrow = "↑" if t.direction == "higher_is_better" else "↓"
        temp = "item" if type(t).item_params is not Task.item_params else "server" if t.temperature is None else f"{t.temperature:g}"
        rows.append((t.name, t.dimension, t.suite, f"{t.metric} {arrow}", ",".join(t.default_judges) or "rule", temp,
                     ", ".join(f"{t.dataset}/{f}" for f in t.data_files())))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print("\njudges (--judges; those answering toxicity: --toxicity-judges):")
    width = max(map(len, REGISTRY))
    for spec in REGISTRY.values():
        print(f"  {spec.name:{width}}  {'/'.join(spec.questions):22}  {spec.summary}")
        for cls in spec.options:
            print(f"  {'':{width}}  {'':22}  [judge.{cls.section}]: {' '.join(map(cls.flag, cls.model_fields))}")
    print("\ndatasets (`evalkit datasets list` checks them):")
    for ds in datasets.registry().values():
        print(f"  {ds.name:12} {len(ds.files):3} files  {ds.license}")
    return 0


def _datasets(args: argparse.Namespace) -> int:
    from . import datasets

    if args.datasets_command == "fetch":
        for line in asyncio.run(datasets.fetch(args.names, args.dest, args.mirror, args.force)):
            print(line)
        return 0
    from .datasets import resolve_data_root

    root = resolve_data_root(args.data_path) if (args.data_path or _env_data()) else datasets.cache_dir()
    print(f"datasets under {root}:")
    for r in datasets.listing(root):
        state = "verified" if r["verified"] == r["files"] else f"{r['present']}/{r['files']} present, {r['verified']} verified"
        print(f"  {r['name']:12} {state:32} {r['records']:6} records  {r['license']}")
    return 0


def _env_data() -> bool:
    import os

    return bool(os.environ.get("EVALKIT_DATA"))


def main(argv: list[str] | None = None) -> int:
    # A run holds hundreds of thousands of long-lived objects (records, items); at the default
    # thresholds (700, 10, 10) the cycle collector rescans them again and again: judging and scoring
    # 20,000 answers took 1.35x as long (bench/client_throughput.py --parts overhead)
    gc.set_threshold(20_000, 50, 100)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mock-server"]:
        from . import mock_server

        mock_server.main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="evalkit: %(message)s", stream=sys.stderr)
    from .errors import EvalkitError, ReportError

    try:
        if args.command == "list":
            return _list(args)
        if args.command == "datasets":
            return _datasets(args)
        if args.command == "compare":
            from . import gates
            from .report import comparison, write_report

            checks = [gates.parse_gate(g) for g in args.fail_if or []]
            if args.baseline is not None:  # the baseline goes first
                args.runs = [args.baseline, *(r for r in args.runs if r.resolve() != args.baseline.resolve())]
            if any(g.paired for g in checks) and len(args.runs) < 2:
                raise ReportError("a regression gate compares runs with the first one (the baseline): give two or more runs")
            c = comparison(args.runs)  # read once: the report and the gates
            files = write_report(c, args.output)
            for f in files:
                print(f)
            if not any(f.suffix == ".png" for f in files):
                print("evalkit: no charts: pip install matplotlib (or 'evalkit[report]')", file=sys.stderr)
            failed = [line for name, results in c.runs for line in gates.check(checks, results, name)]
            failed += [line for name, _ in c.runs[1:] for line in gates.check_paired(checks, [x for x in c.pairs if x.run == name], name)]
            for line in failed:
                print(f"evalkit: {line}", file=sys.stderr)
            return EXIT_GATE if failed else 0
        if args.command == "view":
            from .viewer import write_view

            print(write_view(args.runs, args.output))
            return 0
        if args.command == "matrix":
            from .matrix import run_matrix

            return run_matrix(args.file, args.only.split(",") if args.only else None, args.dry_run, args.report, args.list)
        stages = {"run": ("generate", "judge"), "generate": ("generate",), "evaluate": ("judge",)}[args.command]
        return asyncio.run(_evaluate(args, stages))
    except EvalkitError as e:  # the whole tree (errors.py): one line, its exit code
        print(f"evalkit: {e.verb}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("evalkit: interrupted; records written so far are kept, rerun to resume", file=sys.stderr)
        return 130
    except OSError as e:  # a disk that fills up or a file that can't be written mid-run: name it
        where = f" {e.filename}" if e.filename else ""
        print(f"evalkit: error: cannot write or read{where}: {e.strerror or e}; records written so far are kept, "
              f"fix it and rerun to resume", file=sys.stderr)
        return EXIT_USAGE


def entry() -> None:
    """`evalkit` and `python -m evalkit`: main, then exit without the cycle collector scanning
    what is left at shutdown (0.06 s after a 20,000-answer run, bench/client_throughput.py)."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
