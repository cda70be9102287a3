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

Judges:
- keyword     the GCG 29-string list (local, instant; answers "refusal" for both questions)
- strmatch    XSTest's refusal-prefix string match (local, instant)
- classifier  an HF text-classification model, default TrustLLM's LibrAI/longformer-harmful-ro
              (LABEL_0 = refusal); torch and transformers are imported only when it is used
- llm         any chat endpoint, through the same engine as generation: the XSTest refusal
              prompt for "refusal", the HarmBench classifier prompt for "harm", a 0-1 rating
              prompt for "toxicity"
- harmfulness Qi et al.'s 1-5 harmfulness prompt on the llm judge's endpoint ("harm" subtasks
              only); 5 counts as harmful, and the mean score is reported too
- safety_arithmetic  the Safety Arithmetic paper's binary judge (RedEval's system prompt and
              [[A]]/[[B]] verdict) on the llm judge's endpoint ("harm" subtasks only)
Toxicity judges (--toxicity-judges): perspective (Google's API or a stand-in), toxicity_classifier
(a local HF classifier, default unitary/toxic-bert), llm.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import JudgeError

JUDGES = ("keyword", "strmatch", "classifier", "llm", "harmfulness", "safety_arithmetic")
HARM_ONLY_JUDGES = ("harmfulness", "safety_arithmetic")  # they rate answers to harmful requests only
TOXICITY_JUDGES = ("perspective", "toxicity_classifier", "llm")
QUESTIONS = ("refusal", "harm", "toxicity")


@dataclass(slots=True)
class Verdict:
    label: str | None  # None: no valid verdict (see error)
    raw: str | None = None
    score: float | None = None
    error: str | None = None
    extra: dict | None = None  # more fields for the judgment record (e.g. embedding vectors)


def check_judge_names(names: list[str], allowed: tuple[str, ...] = JUDGES, option: str = "--judges") -> None:
    for n in names:
        if n not in allowed:
            raise JudgeError(f"unknown judge {n!r} in {option}: choose from {', '.join(allowed)} (see `evalkit list`)")


def user_prompt(rec) -> str:
    """The last user turn of a response record (or its completions prompt)."""
    if rec.messages:
        return next((m["content"] for m in reversed(rec.messages) if m.get("role") == "user"), "")
    return rec.prompt or ""
