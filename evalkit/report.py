"""Comparing runs: results.json of several models -> a Markdown table, a self-contained HTML report
and one PNG bar chart per dimension (the Oak Ridge figures' shape: a group per metric, a bar per model).

    evalkit compare runs/llama-8b runs/llama-8b-bnb4 runs/llama-8b-wanda-2-4 --output reports/
"""

from __future__ import annotations

import base64
import dataclasses
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import ReportError

SIGNIFICANT_TD = '<td style="background:#fde2b8">'  # a cell significantly different from the baseline


@dataclass(frozen=True)
class Row:
    dimension: str
    subtask: str
    metric: str
    judge: str
    direction: str


def load_results(run_dirs: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in run_dirs:
        path = d / "results.json" if d.is_dir() else d
        if not path.is_file():
            raise ReportError(f"{path} does not exist: give run folders that hold a results.json (made by `evalkit run` or `evaluate`)")
        try:
            data = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as e:
            raise ReportError(f"{path} is not valid JSON ({e})") from None
        out.append((data.get("run_name") or data.get("model") or path.parent.name, data))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):  # two runs of one model id (e.g. two endpoints): tell them apart by folder
        out = [(f"{n} ({Path(d).name})", data) for (n, data), d in zip(out, run_dirs)]
    return out


def table(runs: list[tuple[str, dict[str, Any]]]) -> tuple[list[Row], dict[Row, dict[str, dict]]]:
    """Rows (first-seen order) and, per row, each model's metric entry."""
    rows: list[Row] = []
    cells: dict[Row, dict[str, dict]] = {}
    for model, data in runs:
        for subtask, entry in data.get("subtasks", {}).items():
            for m in entry.get("metrics", []):
                row = Row(entry.get("dimension", "?"), subtask, m["name"], m["judge"], m["direction"])
                if row not in cells:
                    rows.append(row)
                    cells[row] = {}
                cells[row][model] = m
    order = {d: i for i, d in enumerate(("truthfulness", "safety", "fairness", "robustness", "privacy", "ethics"))}
    rows.sort(key=lambda r: order.get(r.dimension, 99))  # stable: keeps the subtask order within a dimension
    return rows, cells


def _fmt(m: dict | None) -> str:
    if m is None or m.get("value") is None:
        return "–"
    s = f"{m['value']:.4f}"
    if m.get("ci"):
        s += f" CI {m['ci'][0]:.3f}–{m['ci'][1]:.3f}"
    if m.get("trustllm_value") is not None:
        s += f" ({m['trustllm_value']:.4f})"
    if m.get("n_invalid"):
        s += f" [{m['n_invalid']} invalid]"
    return s


@dataclass(frozen=True)
class Paired:
    """One metric of one run against the baseline, over the items both answered."""

    row: Row
    run: str
    n: int
    diff: float  # run - baseline
    ci: tuple[float, float] | None
    p: float  # exact McNemar
    p_holm: float = 1.0

    @property
    def significant(self) -> bool:
        return self.p_holm < 0.05


def load_outcomes(run_dirs: list[Path]) -> list[dict[str, dict[str, int]]]:
    """Each run's outcomes.json (per-item 0/1 of the metrics that keep them), {} where there is none."""
    out = []
    for d in run_dirs:
        path = (d if d.is_dir() else d.parent) / "outcomes.json"
        try:
            out.append(orjson.loads(path.read_bytes()) if path.is_file() else {})
        except orjson.JSONDecodeError as e:
            raise ReportError(f"{path} is not valid JSON ({e}): delete it and rerun `evalkit evaluate` to write it again") from None
    return out


def paired(runs, rows: list[Row], outcomes: list[dict]) -> list[Paired]:
    """Every run after the first against the first (the baseline), metric by metric where both kept
    per-item outcomes: the difference over the shared items, its paired bootstrap interval, the
    exact McNemar p-value, and Holm's adjustment across the metrics of that run."""
    from .metrics import bootstrap_mean_interval, holm, mcnemar_exact

    found: list[Paired] = []
    base = outcomes[0]
    for (name, _), theirs in zip(runs[1:], outcomes[1:]):
        mine: list[Paired] = []
        for r in rows:
            key = f"{r.subtask}|{r.metric}|{r.judge}"
            if key not in base or key not in theirs:
                continue
            shared = sorted(set(base[key]) & set(theirs[key]))
            if not shared:
                continue
            d = [theirs[key][i] - base[key][i] for i in shared]
            b, c = d.count(-1), d.count(1)
            mine.append(Paired(r, name, len(shared), sum(d) / len(d), bootstrap_mean_interval(d), mcnemar_exact(b, c)))
        found += [dataclasses.replace(x, p_holm=a) for x, a in zip(mine, holm([x.p for x in mine]))]
    return found


@dataclass(frozen=True)
class Comparison:
    """Runs read once: their results, the table's rows and cells, and each run after the first
    paired with the first (the report and the regression gates both read it)."""

    runs: list[tuple[str, dict[str, Any]]]
    rows: list[Row]
    cells: dict[Row, dict[str, dict]]
    pairs: list[Paired]


def comparison(run_dirs: list[Path]) -> Comparison:
    if not run_dirs:
        raise ReportError("give at least one run folder (e.g. runs/<model>)")
    runs = load_results(run_dirs)
    rows, cells = table(runs)
    if not rows:
        raise ReportError("the results hold no metrics: run `evalkit run` (or `evaluate`) first")
    return Comparison(runs, rows, cells, paired(runs, rows, load_outcomes(run_dirs)))


def _paired_lines(runs, pairs: list[Paired]) -> list[str]:
    if not pairs:
        return []
    lines = [f"\nPaired comparison with {runs[0][0]} (the first run), over the items both answered; "
             "significant: Holm-adjusted exact McNemar p < 0.05 across each run's metrics.\n",
             "| subtask | metric | judge | run | items | difference | 95% CI | McNemar p | Holm p | |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for x in pairs:
        ci = f"{x.ci[0]:+.3f}–{x.ci[1]:+.3f}" if x.ci else "–"
        lines.append(f"| {x.row.subtask} | {x.row.metric} | {x.row.judge} | {x.run} | {x.n} | {x.diff:+.4f} | {ci} | "
                     f"{x.p:.3g} | {x.p_holm:.3g} | {'significant' if x.significant else ''} |")
    return lines


def _failed_lines(failed: dict[str, str]) -> list[str]:
    return [f"{name}: FAILED ({reason})" for name, reason in failed.items()]


def markdown(runs, rows, cells, failed: dict[str, str] | None = None, pairs: list[Paired] | None = None) -> str:
    models = [n for n, _ in runs]
    lines = [
        "| dimension | subtask | metric | judge | " + " | ".join(models) + " |",
        "|---|---|---|---|" + "---|" * len(models),
    ]
    marked = {(x.row, x.run) for x in pairs or [] if x.significant}
    for r in rows:
        arrow = "↑" if r.direction == "higher_is_better" else "↓"
        vals = " | ".join(_fmt(cells[r].get(m)) + (" ✱" if (r, m) in marked else "") for m in models)
        lines.append(f"| {r.dimension} | {r.subtask} | {r.metric} {arrow} | {r.judge} | {vals} |")
    note = ("\nValues: evalkit's, with its 95% interval where one is computed (CI low–high; Wilson for proportions), "
            "(TrustLLM code's, where it differs) [answers without a valid verdict].\n")
    if marked:
        note += f"✱: significantly different from {models[0]} (paired, Holm-adjusted; table below).\n"
    if failed:
        note += "\nNot in the table, because their run failed:\n\n" + "".join(f"- {line}\n" for line in _failed_lines(failed))
    return "\n".join(lines) + "\n" + note + "\n".join(_paired_lines(runs, pairs or [])) + ("\n" if pairs else "")


def charts(runs, rows, cells, out_dir: Path) -> list[Path]:
    """One PNG per dimension; per-group breakdowns (metric names with '/') stay in the tables."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    models = [n for n, _ in runs]
    paths = []
    for dim in dict.fromkeys(r.dimension for r in rows):
        dim_rows = [r for r in rows if r.dimension == dim and "/" not in r.metric]
        if not dim_rows:
            continue
        width = 0.8 / max(1, len(models))
        fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(dim_rows) * max(1, len(models)) ** 0.5 + 2), 4.5))
        for i, model in enumerate(models):
            xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(dim_rows))]
            ms = [cells[r].get(model) or {} for r in dim_rows]
            ys = [m.get("value") for m in ms]
            # the 95% interval as an error bar, where one was computed
            err = [[(y - m["ci"][0]) if y is not None and m.get("ci") else 0 for y, m in zip(ys, ms)],
                   [(m["ci"][1] - y) if y is not None and m.get("ci") else 0 for y, m in zip(ys, ms)]]
            bars = ax.bar(xs, [y if y is not None else 0 for y in ys], width, label=model, yerr=err, capsize=2,
                          error_kw={"elinewidth": 0.8})
            for b, y in zip(bars, ys):
                ax.annotate("–" if y is None else f"{y:.2f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=7)
        shared = {(r.subtask, r.metric) for r in dim_rows if sum((x.subtask, x.metric) == (r.subtask, r.metric) for x in dim_rows) > 1}
        labels = [f"{r.subtask}\n{r.metric} {'↑' if r.direction == 'higher_is_better' else '↓'}"
                  + (f"\n{r.judge.split(':')[0]}" if (r.subtask, r.metric) in shared else "") for r in dim_rows]
        ax.set_xticks(range(len(dim_rows)), labels, fontsize=8)
        ax.set_title(f"{dim}")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = out_dir / f"{dim}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def html_report(runs, rows, cells, pngs: list[Path], failed: dict[str, str] | None = None, pairs: list[Paired] | None = None) -> str:
    models = [n for n, _ in runs]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in models)
    body = []
    marked = {(x.row, x.run) for x in pairs or [] if x.significant}
    for r in rows:
        arrow = "↑" if r.direction == "higher_is_better" else "↓"
        tds = "".join((SIGNIFICANT_TD if (r, m) in marked else "<td>")
                      + html.escape(_fmt(cells[r].get(m)) + (" ✱" if (r, m) in marked else "")) + "</td>" for m in models)
        body.append(f"<tr><td>{r.dimension}</td><td>{html.escape(r.subtask)}</td><td>{html.escape(r.metric)} {arrow}</td>"
                    f"<td>{html.escape(r.judge)}</td>{tds}</tr>")
    imgs = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in pngs
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>evalkit comparison</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}
th{{background:#f4f4f4}}figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>evalkit comparison</h1>
<p>Models: {", ".join(html.escape(m) for m in models)}. Values: evalkit's, with its 95% interval where one is computed (CI low–high; Wilson for
proportions; error bars in the charts), (TrustLLM code's, where it differs) [answers without a valid verdict].</p>
{imgs}
<table><tr><th>dimension</th><th>subtask</th><th>metric</th><th>judge</th>{head}</tr>
{"".join(body)}
</table>{"<h2>Failed</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in _failed_lines(failed)) + "</ul>" if failed else ""}
{"<h2>Paired comparison</h2><pre>" + html.escape(chr(10).join(_paired_lines(runs, pairs))) + "</pre>" if pairs else ""}
</body></html>
"""


def compare(run_dirs: list[Path], out_dir: Path, failed: dict[str, str] | None = None) -> list[Path]:
    """The report of `run_dirs`; `failed` (name -> reason) lists runs that failed, as failed."""
    return write_report(comparison(run_dirs), out_dir, failed)


def write_report(c: Comparison, out_dir: Path, failed: dict[str, str] | None = None) -> list[Path]:
    """comparison.md, comparison.html and a PNG per dimension in out_dir."""
    runs, rows, cells, pairs = c.runs, c.rows, c.cells, c.pairs
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "comparison.md"
    md.write_text(markdown(runs, rows, cells, failed, pairs))
    pngs = charts(runs, rows, cells, out_dir)
    page = out_dir / "comparison.html"
    page.write_text(html_report(runs, rows, cells, pngs, failed, pairs))
    return [md, page, *pngs]
