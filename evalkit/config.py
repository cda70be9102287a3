"""Run configuration: pydantic models and TOML loading.

A config file holds the same names as the command-line options (with underscores), e.g.

    endpoint = ["http://127.0.0.1:8000/v1"]
    subtasks = ["advbench", "jailbreak"]
    concurrency = 128              # or in an [engine] table

    [judge.llm]                    # a judge's options: its own table (or judge_endpoint = ... flat)
    endpoint = ["http://127.0.0.1:8001/v1"]
    model = "judge"

Command-line values override the file. The judge tables come from the judge registry
(judges/base.py JudgeOptions). API keys are never part of the config: the config names the
environment variable that holds the key (endpoints.py).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .cost import Price
from .endpoints import check_url, read_endpoints_file, redact_url, split_list
from .errors import ConfigError
from .judges import FLAT_OPTIONS, OPTIONS, JudgeOptions, JudgeSections

DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"
Options = TypeVar("Options", bound=JudgeOptions)
class EngineConfig(BaseModel):
    """Everything about how requests are sent: one place for concurrency and retries."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(64, ge=1, le=65536, description="requests in flight at once")
    rps: float | None = Field(None, gt=0, description="max requests started per second (smooth)")
    tpm: float | None = Field(None, gt=0, description="max tokens per minute, prompt and answer (smooth)")
    max_attempts: int = Field(6, ge=1, description="attempts per request, first one included")
    max_request_time: float = Field(900.0, gt=0, description="cap on one request's total time with retries (s)")
    attempt_timeout: float = Field(300.0, gt=0, description="cap on one attempt (s)")
    connect_timeout: float = Field(30.0, gt=0, description="cap on opening a connection (s)")
    backoff_base: float = Field(1.0, gt=0, description="first backoff ceiling (s), doubled each retry")
    backoff_max: float = Field(60.0, gt=0, description="largest backoff or Retry-After honoured (s)")
    stream: bool = Field(False, description="stream responses (SSE) to measure time to first token")
    flush_every: int = Field(256, ge=1, description="records buffered before a write")
    flush_interval: float = Field(1.0, gt=0, description="seconds between writes of a partial buffer")
    progress: bool = True


class RunConfig(BaseModel):
    """All options of `evalkit run` / `generate` / `evaluate`."""

    model_config = ConfigDict(extra="forbid")

    # what to evaluate
    endpoint: list[str] = Field(default_factory=lambda: [DEFAULT_ENDPOINT])
    endpoints_file: Path | None = Field(None, description="file of replica base URLs, re-read during the run (replaces endpoint)")
    deployment: str | None = Field(None, description="name of the deployment the endpoints serve: answers are keyed on it, not on the URLs")
    model: str | None = None
    api_key_env: str | None = None
    api: Literal["chat", "completions"] = "chat"
    wait: float = Field(0.0, ge=0, description="seconds to wait for the endpoint to come up")
    # which subtasks
    dimensions: list[str] = Field(default_factory=list)
    subtasks: list[str] = Field(default_factory=list)
    data_path: Path | None = None
    accept_modified_data: bool = Field(False, description="evaluate dataset files whose sha256 differs from the registry")
    limit: int | None = Field(None, ge=1)
    # generation overrides (None: the subtask's default)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    system_prompt: str | None = None
    # judging
    judges: list[str] = Field(default_factory=list)
    toxicity_judges: list[str] = Field(default_factory=list)
    judge: JudgeSections = Field(default_factory=JudgeSections)  # [judge.<section>]: one table per judge options class
    # output
    output: Path = Path("runs")
    run_name: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]+$", description="run folder name under output [the model id]")
    restart: bool = False
    fail_if: list[str] = Field(default_factory=list, description="gates: exit 4 when a result meets one (evalkit/gates.py)")
    baseline: Path | None = Field(None, description="run folder the regression gates compare this run with")
    # cost (evalkit/cost.py)
    prices: dict[str, Price] = Field(default_factory=dict, description='USD per million tokens by model id: '
                                     '[prices."gpt-4o-mini"] input = 0.15, output = 0.6')
    max_cost: float | None = Field(None, gt=0, description="USD this invocation may spend, generation and judging together")
    engine: EngineConfig = Field(default_factory=EngineConfig)

    @model_validator(mode="after")
    def _endpoints_from_file(self) -> RunConfig:
        if self.endpoints_file is not None:
            urls = read_endpoints_file(self.endpoints_file)
            if not urls:
                raise ConfigError(f"endpoints file {self.endpoints_file} lists no endpoint: write one base URL per line")
            self.endpoint = urls
        return self

    @field_validator("endpoint", "dimensions", "subtasks", "judges", "toxicity_judges", mode="before")
    @classmethod
    def _comma_lists(cls, value: Any) -> Any:
        return split_list(value)

    @field_validator("endpoint")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        return [check_url(u, "--endpoint") for u in value]

    def options(self, section: type[Options]) -> Options:
        """A judge module's typed options section."""
        return getattr(self.judge, section.section)

    def public_dump(self) -> dict[str, Any]:
        """The config as stored in manifests: URLs redacted, no secrets (keys are never held)."""
        data = self.model_dump(mode="json")
        for d in (data, *data["judge"].values()):
            if "endpoint" in d:
                d["endpoint"] = [redact_url(u) for u in d["endpoint"]]
        return data


ENGINE_FIELDS = set(EngineConfig.model_fields)
if clash := set(FLAT_OPTIONS) & (ENGINE_FIELDS | set(RunConfig.model_fields)):
    raise ValueError(f"judge options {sorted(clash)} have the flat name of a run option: change their flag_prefix")


def read_toml(path: Path, what: str, option: str) -> dict[str, Any]:
    """A TOML file's table, or ConfigError naming the file and what is wrong with it."""
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist: check the {option} path") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder: give the TOML file inside it") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not UTF-8 text: give a TOML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path} ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{what} {path} is not valid TOML: {e}") from None


def _table(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"config: {name} must be a table ([{name}] with name = value lines), not {value!r}")
    return dict(value)


def nest_options(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """`data` (a config file's table) with `overrides` (command-line values; None: not given) on
    top, as new dicts with the flat names moved into their tables: engine fields into `engine`,
    judge options (classifier_model) into `judge.<section>`."""
    out: dict[str, Any] = {"engine": {}, "judge": {}}
    for source in (data, overrides or {}):
        for name, value in source.items():
            if value is None:
                continue
            if name == "engine":
                out["engine"].update(_table(value, "engine"))
            elif name == "judge":
                for section, table in _table(value, "judge").items():
                    out["judge"].setdefault(section, {}).update(_table(table, f"judge.{section}"))
            elif name in ENGINE_FIELDS:
                out["engine"][name] = value
            elif name in FLAT_OPTIONS:
                section, field = FLAT_OPTIONS[name]
                out["judge"].setdefault(section, {})[field] = value
            else:
                out[name] = value
    return out


def _where(loc: tuple[int | str, ...]) -> str:
    """A validation error's location as the option it came from: classifier-batch-size, concurrency."""
    if loc[:1] == ("judge",) and len(loc) > 2 and loc[1] in OPTIONS and loc[2] in OPTIONS[str(loc[1])].model_fields:
        return OPTIONS[str(loc[1])].flag(str(loc[2]))[2:] + "".join(f".{p}" for p in loc[3:])
    return ".".join(str(p) for p in loc if p != "engine").replace("_", "-")


def load_config(config_file: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Merge a TOML file (optional) with command-line overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data = read_toml(Path(config_file), "config file", "--config")
    try:
        return RunConfig.model_validate(nest_options(data, overrides))
    except ValidationError as e:
        where = f" (from {config_file} and the command line)" if config_file else ""
        lines = [f"invalid configuration{where}:"]
        lines += [f"  {_where(err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("\n".join(lines)) from None
