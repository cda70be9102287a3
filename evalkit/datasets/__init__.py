"""Datasets: the registry (registry.toml beside this file), the download cache, and reading dataset
files into items with errors that name the file and line to fix. One module for dataset access.

No third-party data lives in this repository. `evalkit datasets fetch [NAME...]` downloads each
file from its public URL (or from a mirror laid out as <mirror>/<dataset>/<path>), checks its
sha256 against the registry, and only then moves it into the cache, so a cache file is always
a verified one. The cache is $EVALKIT_CACHE/datasets, else ~/.cache/evalkit/datasets, and is
laid out as <dataset>/<path>: the same layout `--data-path` expects. A run reads --data-path,
else $EVALKIT_DATA, else the cache (resolve_data_root).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
import tomllib
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from ..errors import DataError, FetchError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DatasetFile(BaseModel):
    path: str
    sha256: str
    url: str | None = None
    records: int | None = None


class Archive(BaseModel):
    url: str
    strip: str = ""


class Dataset(BaseModel):
    name: str
    license: str
    source: str
    files: list[DatasetFile]
    archive: Archive | None = None


@lru_cache(maxsize=1)
def registry() -> dict[str, Dataset]:
    raw = tomllib.loads((Path(__file__).with_name("registry.toml")).read_text())
    return {name: Dataset(name=name, **entry) for name, entry in raw.items()}


def cache_dir() -> Path:
    base = os.environ.get("EVALKIT_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "evalkit"
    return root / "datasets"


def get(name: str) -> Dataset:
    reg = registry()
    if name not in reg:
        raise FetchError(f"unknown dataset {name!r}; known: {', '.join(sorted(reg))}")
    return reg[name]


def expected_sha256(dataset: str, rel: str) -> str | None:
    ds = registry().get(dataset)
    if ds is None:
        return None
    for f in ds.files:
        if f.path == rel:
            return f.sha256
    return None


def file_status(root: Path, ds: Dataset) -> tuple[int, int]:
    """(files present, files whose sha256 matches) under root/<dataset>."""

    present = ok = 0
    for f in ds.files:
        p = root / ds.name / f.path
        if p.is_file():
            present += 1
            ok += sha256_file(p) == f.sha256
    return present, ok


def _url_for(ds: Dataset, f: DatasetFile | None, mirror: str | None) -> str:
    if f is None:  # the archive
        assert ds.archive is not None
        return f"{mirror.rstrip('/')}/{ds.name}/{ds.archive.url.rsplit('/', 1)[-1]}" if mirror else ds.archive.url
    assert f.url is not None
    return f"{mirror.rstrip('/')}/{ds.name}/{f.path}" if mirror else f.url


def _install(data: bytes, f: DatasetFile, dest_root: Path, ds: Dataset, origin: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != f.sha256:
        raise FetchError(
            f"{ds.name}/{f.path} from {origin}: sha256 {digest[:16]}... does not match the registry's "
            f"{f.sha256[:16]}...; the upstream file changed or the download is corrupt. Nothing was written for it."
        )
    dest = dest_root / ds.name / f.path
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, dest)


async def _download(session: Any, url: str) -> bytes:
    import aiohttp

    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=600, sock_connect=30)) as resp:
            if resp.status != 200:
                raise FetchError(f"GET {url} answered HTTP {resp.status}")
            return await resp.read()
    except (TimeoutError, aiohttp.ClientError) as e:
        raise FetchError(f"GET {url} failed: {type(e).__name__}: {e}") from None


async def fetch(names: list[str], dest_root: Path | None = None, mirror: str | None = None, force: bool = False) -> list[str]:
    """Download and verify datasets; returns one line per file. Already-verified files are kept."""
    import aiohttp


    dest_root = dest_root or cache_dir()
    datasets = [get(n) for n in (names or sorted(registry()))]
    lines: list[str] = []
    async with aiohttp.ClientSession() as session:
        for ds in datasets:
            todo = [
                f for f in ds.files
                if force or not (dest_root / ds.name / f.path).is_file() or sha256_file(dest_root / ds.name / f.path) != f.sha256
            ]
            if not todo:
                lines.append(f"{ds.name}: {len(ds.files)} files already present and verified")
                continue
            if ds.archive is not None:
                url = _url_for(ds, None, mirror)
                blob = await _download(session, url)
                try:
                    zf = zipfile.ZipFile(io.BytesIO(blob))
                except zipfile.BadZipFile:
                    raise FetchError(f"{url} is not a zip archive") from None
                members = {n[len(ds.archive.strip):] if n.startswith(ds.archive.strip) else n: n for n in zf.namelist()}
                for f in todo:
                    if f.path not in members:
                        raise FetchError(f"{url} lacks {ds.archive.strip}{f.path}; the archive layout changed")
                    _install(zf.read(members[f.path]), f, dest_root, ds, url)
                    lines.append(f"{ds.name}/{f.path}: verified ({f.records} records)")
            else:
                for f in todo:
                    url = _url_for(ds, f, mirror)
                    _install(await _download(session, url), f, dest_root, ds, url)
                    lines.append(f"{ds.name}/{f.path}: verified ({f.records} records)")
    return lines


def listing(root: Path) -> list[dict[str, Any]]:
    rows = []
    for ds in registry().values():
        present, ok = file_status(root, ds)
        rows.append(
            {
                "name": ds.name,
                "files": len(ds.files),
                "present": present,
                "verified": ok,
                "records": sum(f.records or 0 for f in ds.files),
                "license": ds.license,
            }
        )
    return rows


# reading dataset files


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


