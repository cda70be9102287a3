"""Reading dataset files into items, with errors that name the file and line to fix."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .datasets import cache_dir
from .errors import DataError


@dataclass(slots=True)
class Item:
    id: str
    prompt: str
    data: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, str]] = field(default_factory=list)  # earlier turns (a multi-turn subtask's later turns)


def resolve_data_root(option: Path | None) -> Path:
    """--data-path, else $EVALKIT_DATA, else the datasets cache (`evalkit datasets fetch`)."""
    if option is not None:
        root, origin = Path(option), "--data-path"
    elif os.environ.get("EVALKIT_DATA"):
        root, origin = Path(os.environ["EVALKIT_DATA"]), "$EVALKIT_DATA"
    else:
        root, origin = cache_dir(), "the datasets cache"
    if not root.is_dir():
        raise DataError(
            f"data folder {root} (from {origin}) does not exist: pass --data-path to a folder laid out as "
            f"<dataset>/<file> (e.g. ../shared/datasets), or run `evalkit datasets fetch` to fill the cache"
        )
    return root.resolve()


def dataset_file(root: Path, dataset: str, rel: str) -> Path:
    path = root / dataset / rel
    if not path.is_file():
        raise DataError(
            f"dataset file {path} is missing: run `evalkit datasets fetch {dataset}`, or point --data-path "
            f"at a folder that holds {dataset}/{rel}"
        )
    return path


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _json_element_offsets(text: str) -> list[int]:
    """Character offsets at which each element of a top-level JSON array starts (for error lines)."""
    dec = json.JSONDecoder()
    offsets: list[int] = []
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        offsets.append(i)
        _, i = dec.raw_decode(text, i)
    return offsets


def _jsonl_lines(text: str) -> list[int]:
    """1-based numbers of the non-blank lines of a JSONL text (one record each)."""
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.strip()]


def load_json_list(path: Path) -> tuple[list[Any], str]:
    """The records of a JSON array file, or of a JSONL file (one object per line)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        lines = text.splitlines()
        rows = []
        for n in _jsonl_lines(text):
            try:
                rows.append(orjson.loads(lines[n - 1]))
            except orjson.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e}); fix that line or fetch the dataset again") from None
        return rows, text
    data = _parse_json(path, text)
    if not isinstance(data, list):
        raise DataError(f"{path}:1: expected a JSON list of records, found {type(data).__name__}")
    return data, text


def _parse_json(path: Path, text: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        try:  # the standard library also takes NaN, which some TrustLLM files hold (as TrustLLM's own loader does)
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); fix the file or fetch it again") from None


def load_question_file(path: Path) -> list[tuple[str, str | None, str | None]]:
    """Questions from a JSON list of strings, or from declare-lab's nested
    {category: {subcategory: [questions]}} object, as (question, category, subcategory)."""
    data = _parse_json(path, path.read_text(encoding="utf-8"))
    fix = "fix the file or fetch the dataset again"
    if isinstance(data, list):
        out: list[tuple[str, str | None, str | None]] = [(q, None, None) for q in data]
    elif isinstance(data, dict) and all(isinstance(v, dict) for v in data.values()):
        out = []
        for category, subs in data.items():
            for sub, questions in subs.items():
                if not isinstance(questions, list):
                    raise DataError(f"{path}: {category!r} / {sub!r} is a {type(questions).__name__}, not a list of questions; {fix}")
                out += [(q, category, sub) for q in questions]
    else:
        raise DataError(f"{path}:1: expected a list of questions or {{category: {{subcategory: [questions]}}}}; {fix}")
    for i, (q, _, _) in enumerate(out):
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{path}: question {i} is {q!r}, not a non-empty string; {fix}")
    return out


def check_json_records(path: Path, rows: list[Any], text: str, required: Iterable[str]) -> None:
    required = tuple(required)
    for i, row in enumerate(rows):
        problem = None
        if not isinstance(row, dict):
            problem = f"record {i} is a {type(row).__name__}, not an object"
        else:
            for name in required:
                value = row.get(name)
                if value in (None, "", []) or (isinstance(value, str) and not value.strip()):
                    problem = f"record {i} has no {name!r}"
                    break
                if name == "prompt" and not isinstance(value, str):
                    problem = f"record {i} has a {type(value).__name__} 'prompt', not a string"
                    break
        if problem:
            line = _jsonl_lines(text)[i] if path.suffix == ".jsonl" else _line_of(text, _json_element_offsets(text)[i])
            raise DataError(f"{path}:{line}: {problem}; fix that record or fetch the dataset again")


def load_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    required = tuple(required)
    rows: list[dict[str, str]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{path}:1: header lacks column(s) {', '.join(missing)} (has {reader.fieldnames})")
        start = reader.line_num + 1
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path}:{start}: row has {len(row) - (None in row)} fields where the header has {len(reader.fieldnames or [])}")
            for c in required:
                if not row[c].strip():
                    raise DataError(f"{path}:{start}: empty {c!r}; fix that row or fetch the dataset again")
            rows.append(row)
            start = reader.line_num + 1
    return rows


