"""Run configuration: pydantic models, TOML loading, API-key resolution.

A config file holds the same names as the command-line options (with underscores), e.g.

    endpoint = ["http://127.0.0.1:8000/v1"]
    subtasks = ["advbench", "jailbreak"]
    concurrency = 128

Command-line values override the file. API keys are never part of the config: the config
names the environment variable that holds the key, and the key is read when a request is
sent, so it cannot leak into manifests, results or logs.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .cost import Price
from .errors import ConfigError

DEFAULT_ENDPOINT = "http://127.0.0.1:8000/v1"
KEY_ENV_FALLBACKS = ("EVALKIT_API_KEY", "OPENAI_API_KEY")


def _split_list(value: Any) -> Any:
    # "a,b" on the command line and ["a", "b"] in TOML mean the same thing.
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            out.extend(_split_list(v) if isinstance(v, str) else [v])
        return out
    return value


def redact_url(url: str) -> str:
    """Drop user:password@ and query strings (where keys sometimes hide) from a URL."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_url(url: str, option: str) -> str:
    """`url` if it is an http(s) base URL; else ConfigError naming the option and the fix.
    Credentials inside a URL are refused: they would reach logs and shell history."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ConfigError(f"{option} {url!r} is not a valid URL ({e}): give a base URL such as http://127.0.0.1:8000/v1") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{option} {redact_url(url) if parts.hostname else url!r} is not an http(s) base URL: write it with "
                          f"its scheme, such as http://127.0.0.1:8000/v1")
    if parts.username or parts.password:
        raise ConfigError(f"{option} {redact_url(url)} carries credentials in the URL: drop them and put the key in an "
                          f"environment variable named with the matching --...-api-key-env option")
    return url


def read_endpoints_file(path: Path) -> list[str]:
    """Base URLs, one per line or comma-separated; blank lines and # comments are skipped."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"endpoints file {path} does not exist: check the --endpoints-file path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read the endpoints file {path} ({e}): it must be a text file of base URLs") from None
    urls = _split_list([line.split("#", 1)[0] for line in text.splitlines()])
    return [check_url(u, f"endpoints file {path}:") for u in urls]


def resolve_api_key(env_name: str | None, option: str = "--api-key-env", fallback: bool = True) -> str | None:
    """The key from the named variable, else (fallback) EVALKIT_API_KEY, else OPENAI_API_KEY."""
    if env_name:
        key = os.environ.get(env_name)
        if not key:
            raise ConfigError(
                f"{option} names ${env_name}, but that variable is empty or unset: "
                f"export {env_name}=<your key>, or name another variable with {option}"
            )
        return key
    if not fallback:
        return None
    for name in KEY_ENV_FALLBACKS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def key_source(env_name: str | None) -> str:
    """Human-readable name of where the key comes from (for error messages only)."""
    if env_name:
        return f"${env_name}"
    return " or ".join(f"${n}" for n in KEY_ENV_FALLBACKS) + " (or name another with --api-key-env)"


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
    judge_endpoint: list[str] = Field(default_factory=list)
    judge_model: str | None = None
    judge_api_key_env: str | None = None
    embed_endpoint: list[str] = Field(default_factory=list)
    embed_model: str | None = None
    embed_api_key_env: str | None = None
    classifier_model: str = "LibrAI/longformer-harmful-ro"
    classifier_device: str = "cpu"
    classifier_batch_size: int = Field(32, ge=1)
    toxicity_judges: list[str] = Field(default_factory=list)
    toxicity_model: str = "unitary/toxic-bert"
    toxicity_label: str = "toxic"
    perspective_endpoint: list[str] = Field(default_factory=lambda: ["https://commentanalyzer.googleapis.com/v1alpha1"])
    perspective_api_key_env: str = "PERSPECTIVE_API_KEY"
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

    @field_validator("endpoint", "dimensions", "subtasks", "judges", "judge_endpoint", "embed_endpoint", "toxicity_judges",
                     "perspective_endpoint", mode="before")
    @classmethod
    def _comma_lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("endpoint", "judge_endpoint", "embed_endpoint", "perspective_endpoint")
    @classmethod
    def _urls(cls, value: list[str], info: Any) -> list[str]:
        return [check_url(u, "--" + info.field_name.replace("_", "-")) for u in value]

    def public_dump(self) -> dict[str, Any]:
        """The config as stored in manifests: URLs redacted, no secrets (keys are never held)."""
        data = self.model_dump(mode="json")
        data["endpoint"] = [redact_url(u) for u in self.endpoint]
        data["judge_endpoint"] = [redact_url(u) for u in self.judge_endpoint]
        data["embed_endpoint"] = [redact_url(u) for u in self.embed_endpoint]
        data["perspective_endpoint"] = [redact_url(u) for u in self.perspective_endpoint]
        return data


ENGINE_FIELDS = set(EngineConfig.model_fields)


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


def load_config(config_file: Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Merge a TOML file (optional) with command-line overrides (None values are ignored)."""
    data: dict[str, Any] = {}
    if config_file is not None:
        data = read_toml(Path(config_file), "config file", "--config")
    engine = dict(data.pop("engine", {}) or {})
    for name in list(data):
        if name in ENGINE_FIELDS:
            engine[name] = data.pop(name)
    for name, value in overrides.items():
        if value is None:
            continue
        if name in ENGINE_FIELDS:
            engine[name] = value
        else:
            data[name] = value
    data["engine"] = engine
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        where = f" (from {config_file} and the command line)" if config_file else ""
        lines = [f"invalid configuration{where}:"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"] if p != "engine")
            lines.append(f"  {loc.replace('_', '-')}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
