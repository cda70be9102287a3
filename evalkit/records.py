"""JSONL record schemas, record keys, the append-only writer and the resume reader.

One record per request (garak's one-record-per-attempt idea, at request granularity): a
response record per prompt sent to the model under test, a judgment record per response
judged. A failed request is a record with `error` set and no answer text, so it can never
be scored as if the model had said something.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .errors import RecordFileError


class ErrorInfo(BaseModel):
    kind: str  # rate_limit | transient | bad_request | auth | judge_unparseable | no_response
    status: int | None = None
    message: str


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class ResponseRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    key: str
    subtask: str
    item_id: str
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None  # completions API
    params: dict[str, Any]
    response: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    attempts: int = 1
    endpoint: str | None = None
    error: ErrorInfo | None = None
    created: float

    @property
    def item(self) -> dict[str, Any]:
        """The dataset fields a subtask copied into the record (gold label, group, ...)."""
        return self.model_extra or {}


class JudgmentRecord(BaseModel):
    model_config = ConfigDict(extra="allow")

    key: str
    response_key: str
    subtask: str
    item_id: str
    judge: str
    label: str | None = None  # normalised verdict, e.g. "refusal" / "compliance" / "harmful"
    raw: str | None = None  # the judge's own output (LLM text, classifier label)
    score: float | None = None
    attempts: int = 1
    error: ErrorInfo | None = None
    created: float


R = TypeVar("R", ResponseRecord, JudgmentRecord)


def record_key(*parts: Any) -> str:
    """Stable hash of the identity of a request (endpoint, model, params, subtask, item)."""
    blob = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:32]


def iter_records(path: Path, schema: type[R]) -> Iterator[tuple[int, R | None]]:
    """Yield (line number, record) for each line; a torn last line (crash mid-write) yields None."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield i + 1, schema.model_validate_json(line)
        except ValidationError as e:
            if i == last:  # no newline after it: the writer was killed mid-line
                yield i + 1, None
                continue
            raise RecordFileError(
                f"{path}:{i + 1}: not a valid {schema.__name__} ({str(e).splitlines()[0]}); "
                f"fix or delete that line, or rerun with --restart to start this file over"
            ) from None


def read_records(path: Path, schema: type[R]) -> list[R]:
    """Every record of the file. The lines are validated as one JSON array first (one call into
    pydantic's core instead of one per line: 2-3x faster on a large run); a file with a bad or
    torn line takes the line-by-line path, which drops a torn last line and names a bad one."""
    if not path.exists():
        return []
    lines = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    try:
        return _list_adapter(schema).validate_json(b"[" + b",".join(lines) + b"]")
    except ValidationError:
        return [r for _, r in iter_records(path, schema) if r is not None]


@functools.cache
def _list_adapter(schema: type[R]) -> TypeAdapter[list[R]]:
    return TypeAdapter(list[schema])  # type: ignore[valid-type]


def load_for_resume(path: Path, schema: type[R], restart: bool, keep: set[str] | None = None) -> tuple[dict[str, R], int]:
    """Finished records by key, and how many were set aside as stale.

    Error records and a torn last line are dropped from the file, so their requests are sent
    again without leaving duplicates. Records whose key is not in `keep` (made with another
    endpoint, model or generation parameters) are moved to <name>.stale.jsonl, not deleted, so
    the file only ever holds one configuration's answers. The file is rewritten atomically.
    """
    if restart and path.exists():
        path.unlink()
    if not path.exists():
        return {}, 0
    done: dict[str, R] = {}
    stale: list[R] = []
    dirty = False
    for _, rec in iter_records(path, schema):
        if rec is None or getattr(rec, "error", None) is not None:
            dirty = True
            continue
        if keep is not None and rec.key not in keep:
            stale.append(rec)
            continue
        if rec.key in done:
            dirty = True
        done[rec.key] = rec
    if stale:
        with open(path.with_suffix(".stale.jsonl"), "ab") as f:
            f.write(b"".join(orjson.dumps(r.model_dump(mode="json", exclude_none=True)) + b"\n" for r in stale))
    if dirty or stale:
        tmp = path.with_suffix(path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            for rec in done.values():
                f.write(orjson.dumps(rec.model_dump(mode="json", exclude_none=True)) + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return done, len(stale)


class JsonlWriter:
    """The one writer of a JSONL file: appends orjson lines, flushes by count or time, fsyncs
    on close. Safe to call from many coroutines (they all run on one event loop)."""

    def __init__(self, path: Path, flush_every: int = 256, flush_interval: float = 1.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "ab")
        self._buf: list[bytes] = []
        self._flush_every = flush_every
        self._flush_interval = flush_interval
        self._timer: asyncio.Task | None = None
        self.count = 0

    def write(self, record: BaseModel | dict) -> None:
        if isinstance(record, BaseModel):
            record = record.model_dump(mode="json", exclude_none=True)
        self._buf.append(orjson.dumps(record))
        self.count += 1
        if len(self._buf) >= self._flush_every:
            self.flush()
        elif self._timer is None:
            try:
                self._timer = asyncio.get_running_loop().create_task(self._flush_later())
            except RuntimeError:  # no loop: synchronous use
                pass

    async def _flush_later(self) -> None:
        await asyncio.sleep(self._flush_interval)
        self._timer = None
        self.flush()

    def flush(self) -> None:
        if self._buf:
            self._buf.append(b"")
            self._f.write(b"\n".join(self._buf))
            self._buf.clear()
            self._f.flush()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
