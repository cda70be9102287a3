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
import time
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
RESPONSE_FIELDS = frozenset(ResponseRecord.model_fields)
JUDGMENT_FIELDS = frozenset(JudgmentRecord.model_fields)


def _add_fields(rec: dict[str, Any], fields: dict[str, Any], schema_fields: frozenset[str], whose: str,
                may_set: frozenset[str] = frozenset()) -> None:
    """A subtask's or judge's own fields, which must never overwrite the record's own (but those in `may_set`)."""
    clash = schema_fields.intersection(fields) - may_set
    if clash:
        raise ValueError(f"{whose} sets {', '.join(sorted(clash))}, which the record itself holds: rename the field")
    rec.update(fields)


def response_dict(key: str, subtask: str, item_id: str, model: str, prompt: str | None, messages: list[dict] | None,
                  params: dict[str, Any], *, text: str | None, finish_reason: str | None, usage: tuple[int, int] | None,
                  answer_fields: dict[str, Any], error: dict[str, Any] | None, latency_s: float | None, ttft_s: float | None,
                  attempts: int, endpoint: str | None, item_data: dict[str, Any]) -> dict[str, Any]:
    """A response record as a plain dict in ResponseRecord's shape (every reader validates it with
    that schema): building a pydantic object per answer would cost more than the request on a fast
    server. `error` None means answered: text, finish reason, usage and the subtask's answer fields go in."""
    rec: dict[str, Any] = {"key": key, "subtask": subtask, "item_id": item_id, "model": model}
    if prompt is not None:
        rec["prompt"] = prompt
    else:
        rec["messages"] = messages
    rec["params"] = params
    if error is None:
        rec["response"] = text
        if finish_reason is not None:
            rec["finish_reason"] = finish_reason
        if usage is not None:
            rec["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1]}
        # a subtask may keep another text than the reply as the answer (reference_nll: the scored reference)
        _add_fields(rec, answer_fields, RESPONSE_FIELDS, f"subtask {subtask}'s answer", frozenset({"response"}))
    else:
        rec["error"] = error
    rec["latency_s"] = round(latency_s or 0.0, 6)
    if ttft_s is not None:
        rec["ttft_s"] = round(ttft_s, 6)
    rec["attempts"] = attempts
    if endpoint:
        rec["endpoint"] = endpoint
    rec["created"] = time.time()
    _add_fields(rec, item_data, RESPONSE_FIELDS, f"subtask {subtask}'s item data")
    return rec


def judgment_dict(key: str, response: ResponseRecord, judge: str, label: str | None, raw: str | None, score: float | None,
                  judge_fields: dict[str, Any] | None, attempts: int, error: dict[str, Any] | None) -> dict[str, Any]:
    """A judgment record as a plain dict in JudgmentRecord's shape; a missing label always carries an error."""
    if error is None and label is None:
        error = {"kind": "judge_unparseable", "message": "no verdict"}
    rec: dict[str, Any] = {"key": key, "response_key": response.key, "subtask": response.subtask, "item_id": response.item_id,
                           "judge": judge}
    for name, value in (("label", label), ("raw", raw), ("score", score), ("error", error)):
        if value is not None:
            rec[name] = value
    if judge_fields:
        _add_fields(rec, judge_fields, JUDGMENT_FIELDS, f"judge {judge}")
    rec["attempts"] = attempts
    rec["created"] = time.time()
    return rec


def record_key(*parts: Any) -> str:
    """Stable hash of the identity of a request (endpoint, model, params, subtask, item)."""
    blob = orjson.dumps(parts, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(blob).hexdigest()[:32]


def iter_records(path: Path, schema: type[R]) -> Iterator[tuple[int, R | None]]:
    """Yield (line number, record) for each line; a torn last line (crash mid-write) yields None.

    The lines are validated as one JSON array first (one call into pydantic's core instead of one
    per line: 2-3x faster on a large run); a file with a bad or torn line is read line by line,
    which drops a torn last line and names a bad one."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    try:
        records = _list_adapter(schema).validate_json(b"[" + b",".join(line for _, line in numbered) + b"]")
    except ValidationError:
        pass
    else:
        if len(records) == len(numbered):  # else a line held more than one value: the line-by-line path names it
            yield from zip((n for n, _ in numbered), records)
            return
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


@functools.cache
def _list_adapter(schema: type[R]) -> TypeAdapter[list[R]]:
    return TypeAdapter(list[schema])  # type: ignore[valid-type]


def read_records(path: Path, schema: type[R]) -> list[R]:
    if not path.exists():
        return []
    return [r for _, r in iter_records(path, schema) if r is not None]


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
