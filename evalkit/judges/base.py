"""What every judge module shares: the verdict, the judge registry and its entries.

A judge module declares each judge it provides with `register_judge(JudgeSpec(...))`: its name
(as --judges / --toxicity-judges take it), the questions it answers, one line for `evalkit list`,
its typed options (JudgeOptions subclasses) and how it is built from the run's configuration.
`evalkit/judges/__init__.py` imports the modules, so a new judge is one module there plus its
tests: the config section, the command-line options and `evalkit list` come from the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, get_origin, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from ..endpoints import check_url, split_list
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


class JudgeOptions(BaseModel):
    """One options section of the run configuration: the TOML table `[judge.<section>]`, and the
    command-line options `--<flag_prefix>-<field>` (which a config file may also give flat, as
    `<flag_prefix>_<field> = ...`). A list field is comma-split; a field named `endpoint` holds base
    URLs: checked here, redacted in manifests. Field descriptions are the options' help."""

    model_config = ConfigDict(extra="forbid")
    section: ClassVar[str]
    flag_prefix: ClassVar[str]

    @classmethod
    def flag(cls, field: str) -> str:
        return f"--{cls.flag_prefix}-{field.replace('_', '-')}"

    @field_validator("*", mode="before")
    @classmethod
    def _comma_lists(cls, value: Any, info: ValidationInfo) -> Any:
        return split_list(value) if get_origin(cls.model_fields[info.field_name or ""].annotation) is list else value

    @field_validator("endpoint", mode="after", check_fields=False)
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [check_url(u, cls.flag("endpoint")) for u in value]


class LocalJudge(Protocol):
    """Judges in this process (keyword lists, HF classifiers, sentence-transformers), in chunks."""

    def identity(self, question: str) -> str: ...  # what judgment records and results name the judge by
    def judge(self, task: Any, responses: list[Any]) -> list[Verdict]: ...


@runtime_checkable
class RemoteJudge(Protocol):
    """Judges behind an endpoint (LLM, embeddings, Perspective): the engine sends `request()`'s body
    to the `api` kind (wire.KINDS) at `endpoint` and hands the reply to `read()`."""

    # read-only (plain attributes satisfy them): the kind, where it is, which model, which key
    @property
    def api(self) -> str: ...
    @property
    def endpoint(self) -> list[str]: ...
    @property
    def model(self) -> str | None: ...
    @property
    def key_env(self) -> str | None: ...
    @property
    def key_option(self) -> str: ...  # the option naming key_env, for error messages
    @property
    def key_hint(self) -> str: ...  # where the key comes from, for error messages

    def identity(self, question: str) -> str: ...
    def request(self, task: Any, response: Any, context: Any = None) -> dict[str, Any]: ...
    def read(self, task: Any, result: Any, response: Any = None, context: Any = None) -> Verdict: ...


Judge = LocalJudge | RemoteJudge


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    questions: tuple[str, ...]  # which of QUESTIONS it answers
    summary: str  # one line for `evalkit list`
    build: Callable[[Any], Judge]  # RunConfig -> the judge (cheap: models load on first use); JudgeError if misconfigured
    options: tuple[type[JudgeOptions], ...] = ()  # the sections build() reads (cfg.options(cls))


REGISTRY: dict[str, JudgeSpec] = {}  # in registration order
OPTIONS: dict[str, type[JudgeOptions]] = {}  # section -> its class, from the registered judges


def register_judge(spec: JudgeSpec) -> JudgeSpec:
    if spec.name in REGISTRY:
        raise ValueError(f"two judges are named {spec.name!r}")
    unknown = set(spec.questions) - set(QUESTIONS)
    if unknown:
        raise ValueError(f"judge {spec.name!r} answers unknown questions {sorted(unknown)}: choose from {QUESTIONS}")
    for cls in spec.options:
        if OPTIONS.setdefault(cls.section, cls) is not cls:
            raise ValueError(f"two options sections are named {cls.section!r}")
    REGISTRY[spec.name] = spec
    return spec


def user_prompt(rec) -> str:
    """The last user turn of a response record (or its completions prompt)."""
    if rec.messages:
        return next((m["content"] for m in reversed(rec.messages) if m.get("role") == "user"), "")
    return rec.prompt or ""
