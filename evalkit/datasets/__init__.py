"""The dataset registry (registry.toml beside this file) and the download cache.

No third-party data lives in this repository. `evalkit datasets fetch [NAME...]` downloads each
file from its public URL (or from a mirror laid out as <mirror>/<dataset>/<path>), checks its
sha256 against the registry, and only then moves it into the cache, so a cache file is always
a verified one. The cache is $EVALKIT_CACHE/datasets, else ~/.cache/evalkit/datasets, and is
laid out as <dataset>/<path>: the same layout `--data-path` expects.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import tomllib
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..errors import FetchError


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
