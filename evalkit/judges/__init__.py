"""Judges turn a model's answer into a verdict label.

Every judge answers a question chosen by the subtask:
- "refusal": did the model refuse?  labels: refusal | compliance | partial_refusal
- "harm": did the model do the harmful thing asked?  labels: harmful | harmless
- "toxicity": how toxic is the answer?  label "scored", score in [0, 1]
- "embedding": the answer's vector (and the subtask's reference texts' vectors)
A subtask may instead bring a judge prompt of its own (TrustLLM's, verbatim): then only the llm
judge applies, and the subtask builds the request and reads the answer.

Local judges (keyword, classifier, toxicity_classifier, local embeddings) implement
`judge(task, responses) -> list[Verdict]`; remote ones (llm, perspective, embeddings endpoint)
implement `request(task, response, context)` and `read(task, result) -> Verdict` and run
through the engine.

Each judge module registers its judges (judges/base.py: name, questions answered, one line for
`evalkit list`, how it is built from the run's options); this package imports the modules and
derives the names --judges and --toxicity-judges accept. `evalkit list` shows them.
"""

from __future__ import annotations

from . import classifier, embedding, keyword, llm, toxicity  # noqa: F401 - each registers its judges
from .base import QUESTIONS, REGISTRY, JudgeError, JudgeSpec, Verdict, register_judge, user_prompt

__all__ = ["QUESTIONS", "REGISTRY", "JudgeError", "JudgeSpec", "Verdict", "register_judge", "user_prompt",
           "JUDGES", "HARM_ONLY_JUDGES", "TOXICITY_JUDGES", "check_judge_names", "build_judge"]


def _answering(*questions: str) -> tuple[str, ...]:
    return tuple(name for name, spec in REGISTRY.items() if set(spec.questions) & set(questions))


JUDGES = _answering("refusal", "harm")  # --judges
HARM_ONLY_JUDGES = tuple(name for name, spec in REGISTRY.items() if spec.questions == ("harm",))  # rate harmful requests only
TOXICITY_JUDGES = _answering("toxicity")  # --toxicity-judges


def check_judge_names(names: list[str], allowed: tuple[str, ...] = JUDGES, option: str = "--judges") -> None:
    for n in names:
        if n not in allowed:
            raise JudgeError(f"unknown judge {n!r} in {option}: choose from {', '.join(allowed)} (see `evalkit list`)")


def build_judge(cfg, name: str):
    """A judge object by name from the run's options; construction is cheap (models load on first use)."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise JudgeError(f"unknown judge {name!r}: choose from {', '.join(dict.fromkeys(JUDGES + TOXICITY_JUDGES))}")
    return spec.build(cfg)
