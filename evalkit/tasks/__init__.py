"""Subtask registry: name -> Task. One module per dimension registers its tasks on import."""

from __future__ import annotations

import importlib

from ..errors import DataError, TaskSelectionError
from .base import DIMENSIONS, RULE_JUDGE, TASKS, RefusalTask, Scored, Task, judge_body, register

# Importing a module registers its subtasks; this order is the order `--dimensions` runs them in
# and results.json lists them (kept as it was, so results stay byte-identical across versions).
for _module in ("ethics", "safety", "fairness", "privacy", "robustness", "truthfulness", "utility"):
    importlib.import_module(f"{__name__}.{_module}")


def select(dimensions: list[str], subtasks: list[str]) -> list[Task]:
    for d in dimensions:
        if d not in DIMENSIONS:
            raise TaskSelectionError(f"unknown dimension {d!r}: choose from {', '.join(DIMENSIONS)}")
    for s in subtasks:
        if s not in TASKS:
            raise TaskSelectionError(f"unknown subtask {s!r}: choose from {', '.join(sorted(TASKS))} (see `evalkit list`)")
    if not dimensions and not subtasks:
        raise TaskSelectionError("nothing to run: give --subtasks (e.g. advbench) and/or --dimensions (e.g. safety)")
    chosen = [t for t in TASKS.values() if t.suite == "trustllm" and t.dimension in dimensions]
    chosen += [TASKS[s] for s in subtasks if TASKS[s] not in chosen]
    for t in list(chosen):  # a subtask that judges another's answers brings that one along, first
        if t.responses_of and TASKS[t.responses_of] not in chosen:
            chosen.insert(chosen.index(t), TASKS[t.responses_of])
    if not chosen:
        raise TaskSelectionError(
            f"no subtask implemented yet in dimension(s) {', '.join(dimensions)}; implemented: {', '.join(sorted(TASKS))}"
        )
    return chosen


def all_tasks() -> dict[str, Task]:
    return TASKS


__all__ = ["judge_body", "RULE_JUDGE", "RefusalTask", "Task", "Scored", "register", "select", "all_tasks", "DIMENSIONS", "DataError",
           "TaskSelectionError"]
