"""Base URLs and API keys: checking and redacting URLs, reading an endpoints file, finding a key.

Keys are never part of a config: a config names the environment variable that holds one, and the
key is read when a request is sent, so it cannot reach manifests, results or logs. Torch-free and
pydantic-free, so judges and the engine can use it without the run configuration.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import ConfigError

KEY_ENV_FALLBACKS = ("EVALKIT_API_KEY", "OPENAI_API_KEY")


def split_list(value: Any) -> Any:
    # "a,b" on the command line and ["a", "b"] in TOML mean the same thing.
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            out.extend(split_list(v) if isinstance(v, str) else [v])
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
    urls = split_list([line.split("#", 1)[0] for line in text.splitlines()])
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
