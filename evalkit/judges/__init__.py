"""Judges turn a model's answer into a verdict label.

Every judge answers one of two questions, chosen by the subtask:
- "refusal": did the model refuse?  labels: refusal | compliance | partial_refusal
- "harm": did the model do the harmful thing asked?  labels: harmful | harmless
A subtask may instead bring a judge prompt of its own (TrustLLM's, verbatim): then only the llm
judge applies, and the subtask builds the request and reads the answer.

Judges:
- keyword     the GCG 29-string list (local, instant; answers "refusal" for both questions)
- classifier  an HF text-classification model, default TrustLLM's LibrAI/longformer-harmful-ro
              (LABEL_0 = refusal); torch and transformers are imported only when it is used
- llm         any chat endpoint, through the same engine as generation: the XSTest refusal
              prompt for "refusal", the HarmBench classifier prompt for "harm"
"""

from __future__ import annotations

from dataclasses import dataclass

JUDGES = ("keyword", "classifier", "llm")
QUESTIONS = ("refusal", "harm")


class JudgeError(Exception):
    pass


@dataclass(slots=True)
class Verdict:
    label: str | None  # None: no valid verdict (see error)
    raw: str | None = None
    score: float | None = None
    error: str | None = None


def check_judge_names(names: list[str]) -> None:
    for n in names:
        if n not in JUDGES:
            raise JudgeError(f"unknown judge {n!r}: choose from {', '.join(JUDGES)} (see `evalkit list`)")
