"""Robustness: TrustLLM's ood_detection and adversarial_glue (adversarial_instruction and
ood_generalization are not implemented yet)."""

from __future__ import annotations

from typing import Any

from ..data import DataError, Item
from ..metrics import GLUE_GOLD, GLUE_TASKS, Metric, advglue_answer, advglue_scores
from . import Scored, Task, register
from .safety import RefusalTask


@register
class OODDetection(RefusalTask):
    name = "ood_detection"
    dimension = "robustness"
    dataset = "trustllm"
    file = "robustness/ood_detection.json"
    summary = "TrustLLM OOD detection: RtA on 241 ToolE requests the model cannot carry out"


@register
class AdversarialGLUE(Task):
    name = "adversarial_glue"
    dimension = "robustness"
    dataset = "trustllm"
    file = "robustness/AdvGLUE.json"
    temperature = 0.0
    question = None
    default_judges = ()
    metric = "rs"
    direction = "higher_is_better"
    summary = "TrustLLM AdvGLUE: robustness score RS = adversarial accuracy - attack success rate over 456 pairs"

    def required_fields(self) -> tuple[str, ...]:
        return ("prompt", "task", "index", "type")

    def item(self, index: int, row: dict[str, Any]) -> Item:
        if row["task"] not in GLUE_TASKS or row["type"] not in ("original", "modified"):
            raise DataError(f"{self.file} record {index}: unknown task {row['task']!r} or type {row['type']!r}")
        data = {"glue_task": row["task"], "pair": row["index"], "variant": row["type"], "label": row["label"]}
        return Item(str(index), row["prompt"], data)

    def score(self, rows: list[Scored], judge: str) -> list[Metric]:
        items = []
        n_invalid = 0
        for r in rows:
            x = r.response.model_extra or {}
            answer = advglue_answer(r.response.response, x["glue_task"]) if r.answered else "Unknown"
            correct = None if answer == "Unknown" else answer == GLUE_GOLD[x["glue_task"]].get(x["label"])
            n_invalid += correct is None
            items.append((x["glue_task"], x["pair"], x["variant"], correct))
        ours, theirs = advglue_scores(items, drop_unknown=False), advglue_scores(items, drop_unknown=True)
        metrics = []
        for name, direction in (("rs", "higher_is_better"), ("avg_acc", "higher_is_better"),
                                ("avg_adv_acc", "higher_is_better"), ("avg_asr", "lower_is_better")):
            m = Metric(name=name, value=ours[name], direction=direction, judge=judge, n=len(rows), n_invalid=n_invalid)
            if abs(theirs[name] - ours[name]) > 1e-12:
                m.trustllm_value = theirs[name]
            metrics.append(m)
        metrics[0].details = {k: v for k, v in ours.items() if not k.startswith("avg_") and k != "rs"}
        return metrics
