"""What every judge module shares: the verdict, the judge registry and its entries.

A judge module declares each judge it provides with `register_judge(JudgeSpec(...))`: its name
(as --judges / --toxicity-judges take it), the questions it answers, one line for `evalkit list`,
and how it is built from the run's options. `evalkit/judges/__init__.py` imports the modules, so
a new judge is one module there plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import JudgeError  # noqa: F401 - re-exported to the judge modules

# "refusal": did the model refuse?  "harm": did it do the harmful thing asked?  "toxicity": how
# toxic is the answer (a score)?  "embedding": the answer's vector, for subtasks that compare them
QUESTIONS = ("refusal", "harm", "toxicity", "embedding")


@dataclass(slots=True)
class Verdict:
    label: str | None  # None: no valid verdict (see error)
    raw: str | None = None
    score: float | None = None
    error: str | None = None
    extra: dict | None = None  # more fields for the judgment record (e.g. embedding vectors)


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    questions: tuple[str, ...]  # which of QUESTIONS it answers
    summary: str  # one line for `evalkit list`
    build: Callable[[Any], Any]  # RunConfig -> the judge (cheap: models load on first use); JudgeError if misconfigured


REGISTRY: dict[str, JudgeSpec] = {}  # in registration order


def register_judge(spec: JudgeSpec) -> JudgeSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"two judges are named {spec.name!r}")
    unknown = set(spec.questions) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"judge {spec.name!r} answers unknown questions {sorted(unknown)}: choose from {QUESTIONS}")
    REGISTRY[spec.name] = spec
    return spec


def user_prompt(rec) -> str:
    """The last user turn of a response record (or its completions prompt)."""
    if rec.messages:
        return next((m["content"] for m in reversed(rec.messages) if m.get("role") == "user"), "")
    return rec.prompt or ""
