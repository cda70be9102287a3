"""Record files (torn lines, resume, corruption) and `evalkit datasets fetch` against a loopback mirror."""

from __future__ import annotations

import asyncio
import io
import shutil
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import orjson
import pytest
from conftest import run_cli

from evalkit import datasets
from evalkit.records import JsonlWriter, RecordFileError, ResponseRecord, load_for_resume, read_records, record_key


def _rec(i: int, error: bool = False) -> dict:
    d = {"key": f"k{i}", "subtask": "t", "item_id": str(i), "model": "m", "params": {}, "created": 1.0, "response": f"r{i}"}
    if error:
        d["error"] = {"kind": "transient", "message": "boom"}
        d.pop("response")
    return d


def test_record_key_is_stable_and_order_insensitive_for_dicts():
    a = record_key("generate", ["u"], "m", {"temperature": 1.0, "max_tokens": 5}, None, "t", "1")
    b = record_key("generate", ["u"], "m", {"max_tokens": 5, "temperature": 1.0}, None, "t", "1")
    assert a == b and len(a) == 32
    assert a != record_key("generate", ["u"], "m", {"max_tokens": 6, "temperature": 1.0}, None, "t", "1")


def test_writer_flushes_by_count_and_on_close(tmp_path):
    path = tmp_path / "r.jsonl"
    w = JsonlWriter(path, flush_every=3)
    for i in range(4):
        w.write(_rec(i))
    assert path.read_bytes().count(b"\n") == 3  # one batch of 3 written, 1 buffered
    w.close()
    assert [r.item_id for r in read_records(path, ResponseRecord)] == ["0", "1", "2", "3"]


def test_writer_flushes_by_time(tmp_path):
    path = tmp_path / "r.jsonl"

    async def go():
        w = JsonlWriter(path, flush_every=100, flush_interval=0.05)
        w.write(_rec(0))
        await asyncio.sleep(0.3)
        n = path.read_bytes().count(b"\n")
        w.close()
        return n

    assert asyncio.run(go()) == 1


def test_resume_drops_torn_line_and_errors_and_rewrites(tmp_path):
    path = tmp_path / "r.jsonl"
    lines = [orjson.dumps(_rec(0)), orjson.dumps(_rec(1, error=True)), orjson.dumps(_rec(2)), orjson.dumps(_rec(0))]
    path.write_bytes(b"\n".join(lines) + b"\n" + orjson.dumps(_rec(3))[:20])  # killed mid-write
    done, stale = load_for_resume(path, ResponseRecord, restart=False)
    assert sorted(done) == ["k0", "k2"] and stale == 0
    assert [r.key for r in read_records(path, ResponseRecord)] == ["k0", "k2"]  # no duplicate, no error, no torn line
    done, stale = load_for_resume(path, ResponseRecord, restart=False, keep={"k2"})
    assert list(done) == ["k2"] and stale == 1
    assert [r.key for r in read_records(path.with_suffix(".stale.jsonl"), ResponseRecord)] == ["k0"]
    assert load_for_resume(path, ResponseRecord, restart=True) == ({}, 0) and not path.exists()


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(orjson.dumps(_rec(0)) + b"\n{not json\n" + orjson.dumps(_rec(2)) + b"\n")
    with pytest.raises(RecordFileError, match=r"r\.jsonl:2: .*--restart"):
        read_records(path, ResponseRecord)


# -- datasets ---------------------------------------------------------------------------------


@pytest.fixture
def mirror(tmp_path, data_root):
    """A loopback HTTP mirror laid out as <dataset>/<file>, built from ../shared/datasets."""
    root = tmp_path / "mirror"
    shutil.copytree(data_root / "advbench", root / "advbench")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:  # upstream's layout: dataset/<dimension>/<file>
        for p in sorted((data_root / "trustllm").rglob("*.json")):
            zf.write(p, "dataset/" + p.relative_to(data_root / "trustllm").as_posix())
    (root / "trustllm").mkdir()
    (root / "trustllm" / "dataset.zip").write_bytes(buf.getvalue())
    handler = partial(SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_registry_matches_the_shared_datasets(data_root):
    for ds in datasets.registry().values():
        present, ok = datasets.file_status(data_root, ds)
        assert present == ok == len(ds.files), ds.name
        assert ds.license and ds.source.startswith("https://")
        assert ds.archive is not None or all(f.url and f.url.startswith("https://") for f in ds.files)
    adv = datasets.get("advbench").files[0]
    assert (adv.path, adv.records) == ("harmful_behaviors.csv", 520)
    assert sum(f.records for f in datasets.get("trustllm").files) == 16441


def test_fetch_from_mirror_verifies_and_lists(mirror, tmp_path, data_root):
    root, url = mirror
    cache = tmp_path / "cache"
    p = run_cli("datasets", "fetch", "advbench", "trustllm", "--mirror", url, "--dest", str(cache))
    assert p.returncode == 0, p.stderr
    assert "trustllm/safety/jailbreak.json: verified (1400 records)" in p.stdout
    for rel in ("advbench/harmful_behaviors.csv", "trustllm/safety/jailbreak.json", "trustllm/truthfulness/internal.json"):
        assert (cache / rel).read_bytes() == (data_root / rel).read_bytes()
    p = run_cli("datasets", "fetch", "advbench", "--mirror", url, "--dest", str(cache))
    assert "already present and verified" in p.stdout
    p = run_cli("datasets", "list", env={"EVALKIT_CACHE": str(tmp_path)})
    assert p.returncode == 0
    line = {ln.split()[0]: ln for ln in p.stdout.splitlines()[1:]}
    assert "verified" in line["advbench"] and "0/1 present" in line["xstest"]


def test_fetch_rejects_a_changed_file_and_writes_nothing(mirror, tmp_path):
    root, url = mirror
    target = root / "advbench" / "harmful_behaviors.csv"
    target.write_bytes(target.read_bytes().replace(b"bomb", b"cake"))
    cache = tmp_path / "cache"
    p = run_cli("datasets", "fetch", "advbench", "--mirror", url, "--dest", str(cache))
    assert p.returncode == 2 and "sha256" in p.stderr and "does not match" in p.stderr
    assert not (cache / "advbench" / "harmful_behaviors.csv").exists()
    p = run_cli("datasets", "fetch", "nosuch", "--mirror", url, "--dest", str(cache))
    assert p.returncode == 2 and "unknown dataset 'nosuch'" in p.stderr


def test_cache_is_the_default_data_path(mirror, tmp_path, mock_server):
    root, url = mirror
    env = {"EVALKIT_CACHE": str(tmp_path / "c")}
    assert run_cli("datasets", "fetch", "advbench", "--mirror", url, env=env).returncode == 0
    srv = mock_server()
    p = run_cli("run", "--subtasks", "advbench", "--limit", "3", "--endpoint", srv.url, "--output", str(tmp_path / "runs"), env=env)
    assert p.returncode == 0, p.stderr
    assert Path(tmp_path / "runs" / "mock-model" / "results.json").exists()


def test_record_builders_keep_the_records_own_fields():
    from evalkit.records import JudgmentRecord, ResponseRecord, judgment_dict, response_dict

    common = dict(finish_reason="stop", usage=(3, 2), error=None, latency_s=0.1234567, ttft_s=None, attempts=1, endpoint="http://h/v1")
    rec = response_dict("k", "t", "0", "m", None, [{"role": "user", "content": "q"}], {"max_tokens": 8}, text="a",
                        answer_fields={"response": "kept instead", "nll": 1.5}, item_data={"group": "g"}, **common)
    parsed = ResponseRecord.model_validate(rec)
    assert parsed.response == "kept instead" and parsed.item == {"nll": 1.5, "group": "g"} and parsed.latency_s == 0.123457
    assert list(rec)[:6] == ["key", "subtask", "item_id", "model", "messages", "params"]
    # an item's data or a subtask's answer fields may not overwrite the record's own fields
    with pytest.raises(ValueError, match="subtask t's item data sets model"):
        response_dict("k", "t", "0", "m", None, [], {}, text="a", answer_fields={}, item_data={"model": "x"}, **common)
    with pytest.raises(ValueError, match="subtask t's answer sets usage"):
        response_dict("k", "t", "0", "m", None, [], {}, text="a", answer_fields={"usage": 1}, item_data={}, **common)
    failed = response_dict("k", "t", "0", "m", "prompt", None, {}, text=None, answer_fields={"usage": 1}, item_data={},
                           **{**common, "error": {"kind": "transient", "status": 503, "message": "down"}})
    assert "response" not in failed and "usage" not in failed and failed["prompt"] == "prompt"  # a failure keeps no answer
    r = ResponseRecord.model_validate(rec)
    j = judgment_dict("jk", r, "keyword:gcg29", None, None, None, None, 1, None)
    assert JudgmentRecord.model_validate(j).error.kind == "judge_unparseable"  # no label: always an error
    with pytest.raises(ValueError, match="judge llm sets judge"):
        judgment_dict("jk", r, "llm", "yes", None, None, {"judge": "other"}, 1, None)


def test_a_line_with_two_records_is_named_not_read(tmp_path):
    from evalkit.records import RecordFileError, ResponseRecord, read_records

    one = '{"key": "a", "subtask": "t", "item_id": "0", "model": "m", "params": {}, "created": 0}'
    path = tmp_path / "r.jsonl"
    path.write_text(one + "\n" + one.replace('"a"', '"b"') + ", " + one.replace('"a"', '"c"') + "\n" + one.replace('"a"', '"d"') + "\n")
    with pytest.raises(RecordFileError, match="r.jsonl:2: not a valid ResponseRecord"):
        read_records(path, ResponseRecord)
    path.write_text(one + "\n" + one.replace('"a"', '"b"') + "\n" + '{"key": "c", "subt')  # torn last line: dropped
    assert [r.key for r in read_records(path, ResponseRecord)] == ["a", "b"]
