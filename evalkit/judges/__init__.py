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
through the engine (the protocols LocalJudge and RemoteJudge in base.py).

Every module of this package is imported, and each judge module registers its judges
(judges/base.py: name, questions answered, one line for `evalkit list`, its typed options, how
it is built from the run's configuration), so a new judge is one module here plus its tests.
From the registry come the names --judges and --toxicity-judges accept, the run configuration's
`[judge.<section>]` tables (JudgeSections) and the flat option names (--classifier-model on the
command line, classifier_model = ... in a config file). `evalkit list` shows them.
"""

from __future__ import annotations

import importlib
import pkgutil

from pydantic import ConfigDict, Field, create_model

from .base import (
    OPTIONS,
    QUESTIONS,
    REGISTRY,
    Judge,
    JudgeError,
    JudgeOptions,
    JudgeSpec,
    LocalJudge,
    RemoteJudge,
    Verdict,
    register_judge,
    user_prompt,
)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):  # each judge module registers its judges
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["QUESTIONS", "REGISTRY", "OPTIONS", "Judge", "LocalJudge", "RemoteJudge", "JudgeError", "JudgeOptions", "JudgeSpec",
           "Verdict", "register_judge",
           "user_prompt", "JUDGES", "HARM_ONLY_JUDGES", "TOXICITY_JUDGES", "JudgeSections", "FLAT_OPTIONS",
           "check_judge_names", "build_judge"]

# RunConfig.judge: one typed field per options section, each defaulting to its class's defaults
JudgeSections = create_model("JudgeSections", __config__=ConfigDict(extra="forbid"),
                             **{name: (cls, Field(default_factory=cls)) for name, cls in OPTIONS.items()})  # type: ignore[call-overload]
# the flat names (command line, and allowed in config files): "classifier_model" -> ("classifier", "model")
FLAT_OPTIONS = {f"{cls.flag_prefix}_{field}": (name, field) for name, cls in OPTIONS.items() for field in cls.model_fields}
if len(FLAT_OPTIONS) != sum(len(cls.model_fields) for cls in OPTIONS.values()):
    raise ValueError("two judge options share a flat name (flag_prefix + field): rename one")


def _answering(*questions: str) -> tuple[str, ...]:
    return tuple(name for name, spec in REGISTRY.items() if set(spec.questions) & set(questions))


JUDGES = _answering("refusal", "harm")  # --judges
HARM_ONLY_JUDGES = tuple(name for name, spec in REGISTRY.items() if spec.questions == ("harm",))  # rate harmful requests only
TOXICITY_JUDGES = _answering("toxicity")  # --toxicity-judges


def check_judge_names(names: list[str], allowed: tuple[str, ...] = JUDGES, option: str = "--judges") -> None:
    for n in names:
        if n not in allowed:
            raise JudgeError(f"unknown judge {n!r} in {option}: choose from {', '.join(allowed)} (see `evalkit list`)")


def build_judge(cfg, name: str) -> Judge:
    """A judge object by name from the run's options; construction is cheap (models load on first use)."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise JudgeError(f"unknown judge {name!r}: choose from {', '.join(dict.fromkeys(JUDGES + TOXICITY_JUDGES))}")
    return spec.build(cfg)
