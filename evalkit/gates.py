"""Release gates: `--fail-if "advbench.asr > 0.10"` turns a result into an exit status.

A gate is `SUBTASK.METRIC[@JUDGE] OP NUMBER` with OP one of > >= < <= == !=; it states when
the run fails. JUDGE, when given, is a prefix of the metric's judge (`advbench.asr@llm > 0.2`);
without it every judge's value of that metric is checked. A metric the results lack, or one
without a valid value, fails its gate too: a gate never passes for want of a number.
Gates are parsed (and their subtasks checked) before any request is sent.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

from .config import ConfigError

OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne}
_GATE = re.compile(r"^\s*(?P<subtask>[A-Za-z0-9_]+)\.(?P<metric>[A-Za-z0-9_/.\-]+?)(?:@(?P<judge>[^\s<>=!]+))?"
                   r"\s*(?P<op>>=|<=|==|!=|>|<)\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Gate:
    text: str
    subtask: str
    metric: str
    judge: str | None
    op: str
    threshold: float

    def failures(self, results: dict[str, Any], who: str = "") -> list[str]:
        """One line per way this gate fails on `results` (a results.json); none when it passes."""
        where = f"{who}: " if who else ""
        entry = results.get("subtasks", {}).get(self.subtask)
        found = [m for m in (entry or {}).get("metrics", [])
                 if m["name"] == self.metric and (self.judge is None or m["judge"].startswith(self.judge))]
        if not found:
            return [f"{where}gate {self.text!r}: the results have no {self.subtask}.{self.metric}"
                    + (f" judged by {self.judge}*" if self.judge else "") + " to check"]
        out = []
        for m in found:
            if m.get("value") is None:
                out.append(f"{where}gate {self.text!r}: {self.subtask}.{self.metric} ({m['judge']}) has no valid value")
            elif OPS[self.op](m["value"], self.threshold):
                out.append(f"{where}gate {self.text!r} failed: {self.subtask}.{self.metric} ({m['judge']}) = {m['value']:.4f}")
        return out


def parse_gate(text: str, subtasks: list[str] | None = None) -> Gate:
    """A gate from its text; ConfigError naming the problem (and, given the run's subtasks, a
    subtask the run does not evaluate)."""
    m = _GATE.match(text)
    if m is None:
        raise ConfigError(f"--fail-if {text!r} is not a gate: write SUBTASK.METRIC OP NUMBER, e.g. \"advbench.asr > 0.10\" "
                          f"(OP: {' '.join(OPS)}; SUBTASK.METRIC@JUDGE picks one judge's value)")
    gate = Gate(text, m["subtask"], m["metric"], m["judge"], m["op"], float(m["value"]))
    if subtasks is not None and gate.subtask not in subtasks:
        raise ConfigError(f"--fail-if {text!r}: this run does not evaluate {gate.subtask} (it evaluates "
                          f"{', '.join(subtasks)}): add it to --subtasks or fix the gate")
    return gate


def check(gates: list[Gate], results: dict[str, Any], who: str = "") -> list[str]:
    return [line for g in gates for line in g.failures(results, who)]
