"""Release gates: `--fail-if "advbench.asr > 0.10"` turns a result into an exit status.

A gate is `SUBTASK.METRIC[@JUDGE] OP NUMBER` with OP one of > >= < <= == !=; it states when
the run fails. JUDGE, when given, is a prefix of the metric's judge (`advbench.asr@llm > 0.2`);
without it every judge's value of that metric is checked. A metric the results lack, or one
without a valid value, fails its gate too: a gate never passes for want of a number.

The regression form `SUBTASK.METRIC[@JUDGE] increases|decreases|changes significantly` fails
when the paired comparison with a baseline run (report.paired: exact McNemar over the items
both runs answered, Holm-adjusted across the run's paired metrics, as the report's marker)
finds a significant change that way. It needs the metric's per-item outcomes in both runs.
Gates are parsed (and their subtasks checked) before any request is sent.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    from .report import Paired

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}
TRENDS = ("increases", "decreases", "changes")
_TARGET = r"^\s*(?P<subtask>[A-Za-z0-9_]+)\.(?P<metric>[A-Za-z0-9_/.\-]+?)(?:@(?P<judge>[^\s<>=!]+))?"
_GATE = re.compile(_TARGET + r"\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
_TREND = re.compile(_TARGET + r"\s+(?P<op>" + "|".join(TRENDS) + r")\s+significantly\s*$")


@dataclass(frozen=True)
class Gate:
    text: str
    subtask: str
    metric: str
    judge: str | None
    op: str  # a comparison, or a trend (regression form)
    threshold: float | None

    @property
    def paired(self) -> bool:
        """A regression gate: checked against a baseline run, not a threshold."""
        return self.op in TRENDS

    def _judged(self, judge: str) -> bool:
        return self.judge is None or judge.startswith(self.judge)

    def paired_failures(self, pairs: list[Paired], who: str = "") -> list[str]:
        """One line per judge's significant change the gate names; none when it passes."""
        where = f"{who}: " if who else ""
        found = [x for x in pairs if x.row.subtask == self.subtask and x.row.metric == self.metric and self._judged(x.row.judge)]
        if not found:
            return [f"{where}gate {self.text!r}: no paired outcomes of {self.subtask}.{self.metric} against the baseline to test "
                    f"(both runs need it in their outcomes.json, over shared items)"]
        out = []
        for x in found:
            way = "increases" if x.diff > 0 else "decreases"
            if x.significant and self.op in (way, "changes"):
                ci = f", 95% CI {x.ci[0]:+.4f} to {x.ci[1]:+.4f}" if x.ci else ""
                out.append(f"{where}gate {self.text!r} failed: {self.subtask}.{self.metric} ({x.row.judge}) {way} by "
                           f"{x.diff:+.4f} over {x.n} paired items{ci}, McNemar p = {x.p:.3g} (Holm {x.p_holm:.3g})")
        return out

    def failures(self, results: dict[str, Any], who: str = "") -> list[str]:
        """One line per way this gate fails on `results` (a results.json); none when it passes.
        A regression gate is checked by paired_failures."""
        if self.paired:
            return []
        where = f"{who}: " if who else ""
        entry = results.get("subtasks", {}).get(self.subtask)
        found = [m for m in (entry or {}).get("metrics", []) if m["name"] == self.metric and self._judged(m["judge"])]
        if not found:
            return [f"{where}gate {self.text!r}: the results have no {self.subtask}.{self.metric}"
                    + (f" judged by {self.judge}*" if self.judge else "") + " to check"]
        out = []
        for m in found:
            if m.get("value") is None:
                out.append(f"{where}gate {self.text!r}: {self.subtask}.{self.metric} ({m['judge']}) has no valid value")
            elif OPS[self.op](m["value"], self.threshold):  # type: ignore[arg-type]
                out.append(f"{where}gate {self.text!r} failed: {self.subtask}.{self.metric} ({m['judge']}) = {m['value']:.4f}")
        return out


def parse_gate(text: str, subtasks: list[str] | None = None) -> Gate:
    """A gate from its text; ConfigError naming the problem (and, given the run's subtasks, a
    subtask the run does not evaluate)."""
    m = _GATE.match(text) or _TREND.match(text)
    if m is None:
        raise ConfigError(f"--fail-if {text!r} is not a gate: write SUBTASK.METRIC OP NUMBER, e.g. \"advbench.asr > 0.10\" "
                          f"(OP: {' '.join(OPS)}; SUBTASK.METRIC@JUDGE picks one judge's value), or SUBTASK.METRIC "
                          f"{'|'.join(TRENDS)} significantly (against a baseline run)")
    value = m.groupdict().get("value")
    gate = Gate(text, m["subtask"], m["metric"], m["judge"], m["op"], None if value is None else float(value))
    if subtasks is not None and gate.subtask not in subtasks:
        raise ConfigError(f"--fail-if {text!r}: this run does not evaluate {gate.subtask} (it evaluates "
                          f"{', '.join(subtasks)}): add it to --subtasks or fix the gate")
    return gate


def check(gates: list[Gate], results: dict[str, Any], who: str = "") -> list[str]:
    return [line for g in gates for line in g.failures(results, who)]


def check_paired(gates: list[Gate], pairs: list[Paired], who: str = "") -> list[str]:
    """The regression gates against one run's paired comparison with the baseline."""
    return [line for g in gates if g.paired for line in g.paired_failures(pairs, who)]
