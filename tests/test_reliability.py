"""Failures that stop a run early and say why: every request failed, a judge that cannot work,
options out of bounds; checked before (or instead of) generating, with nothing written lost."""

from __future__ import annotations

import pytest
from conftest import read_jsonl

from evalkit.config import EngineConfig
from evalkit.engine import Engine, Result, RetryableFailure


def test_a_run_whose_requests_all_failed_is_a_failure_with_its_cause(mock_server, data_root, tmp_path, capsys):
    from evalkit.cli import main

    def gen(srv, out):
        return main(["run", "--subtasks", "advbench", "--limit", "12", "--endpoint", srv.url, "--data-path", str(data_root),
                     "--output", str(out), "--no-progress", "--max-attempts", "1"])

    srv = mock_server("--fault-rate", "1", "--faults", "500")
    assert gen(srv, tmp_path / "runs") == 1
    err = capsys.readouterr().err
    assert "all 12 generation requests failed: transient 500: HTTP 500: The server had an error." in err
    assert "Traceback" not in err
    assert len(read_jsonl(tmp_path / "runs" / "mock-model" / "responses" / "advbench.jsonl")) == 12  # the error records stay
    # a partial failure runs to the end and says how many failed and why
    flaky = mock_server("--fault-rate", "0.5", "--faults", "500", "--seed", "3")
    assert gen(flaky, tmp_path / "partial") == 0
    assert "of 12 generation requests failed; commonest cause: transient 500" in capsys.readouterr().err


def test_an_html_answer_is_named():
    eng = Engine(EngineConfig(progress=False), ["http://127.0.0.1:9/v1"])
    with pytest.raises(RetryableFailure, match="answered HTML, not JSON"):
        eng._read_body(b"<!doctype html><html><body>Welcome</body></html>", Result())


def test_bad_inputs_get_one_clear_line_and_lose_nothing(mock_server, data_root, tmp_path, capsys, monkeypatch):
    """More than 40 bad inputs through the real CLI entry point: each exits 2 with an `evalkit:
    error:` (or `stopped:`) line that names the problem, never a traceback, and the records of an
    earlier run in the same --output stay byte for byte."""
    from evalkit.cli import main

    srv = mock_server()
    out = tmp_path / "runs"
    base = ["run", "--subtasks", "advbench", "--limit", "3", "--endpoint", srv.url, "--data-path", str(data_root),
            "--output", str(out), "--no-progress"]
    assert main(base) == 0
    records = out / "mock-model" / "responses" / "advbench.jsonl"
    kept = records.read_bytes()

    f = tmp_path / "files"
    f.mkdir()
    (f / "dir.toml").mkdir()
    (f / "binary.toml").write_bytes(b"\xff\xfe\x00\x01")
    (f / "broken.toml").write_text("subtasks = [\n")
    (f / "unknown.toml").write_text("no_such_option = 1\n")
    (f / "bad-engine.toml").write_text("[engine]\nconcurrency = -1\n")
    (f / "afile").write_text("x")
    (f / "empty.txt").write_text("# nothing\n")
    (f / "badline.txt").write_text(f"{srv.url}\nlocalhost:8000\n")
    (f / "matrix-bad.toml").write_text('[[variant]]\nname = "x"\n')
    (f / "matrix-run.toml").write_text('[run]\nendpoint = ["http://h/v1"]\n[[variant]]\nname = "x"\nmodel = "m"\n')
    changed = f / "changed" / "advbench"
    changed.mkdir(parents=True)
    (changed / "harmful_behaviors.csv").write_text((data_root / "advbench" / "harmful_behaviors.csv").read_text()[:2000])
    monkeypatch.setenv("EMPTY_KEY", "")
    dead = "http://127.0.0.1:9/v1"
    judge = ["--judges", "llm", "--judge-endpoint", srv.url]

    def run_with(*extra):  # --endpoint repeats mean replicas: a case that gives its own replaces the good one
        own = "--endpoint" in extra or "--endpoints-file" in extra
        return [*(a for a in base if not own or a not in ("--endpoint", srv.url)), *extra]

    cases = [
        (run_with("--endpoint", "127.0.0.1:8000/v1"), "not an http(s) base URL"),
        (run_with("--endpoint", "http://[::1"), "not a valid URL"),
        (run_with("--endpoint", "http://me:secret@127.0.0.1:8000/v1"), "credentials"),
        (run_with("--endpoint", "http://127.0.0.1:99999/v1"), "not a valid URL"),
        (run_with("--endpoint", srv.url.removesuffix("/v1")), "/v1 missing"),
        (run_with("--endpoint", dead), "cannot reach"),
        (run_with("--model", "no-such-model"), "does not serve model 'no-such-model'"),
        (run_with("--judge-endpoint", "ftp://judge", "--judges", "llm", "--judge-model", "j"), "--judge-endpoint"),
        (run_with("--embed-endpoint", "embedder:9000"), "--embed-endpoint"),
        (run_with("--perspective-endpoint", "commentanalyzer"), "--perspective-endpoint"),
        (run_with("--concurrency", "0"), "concurrency"),
        (run_with("--concurrency", "100000000"), "concurrency"),
        (run_with("--limit", "0"), "limit"),
        (run_with("--limit", "-3"), "limit"),
        (run_with("--max-tokens", "0"), "max-tokens"),
        (run_with("--temperature", "-1"), "temperature"),
        (run_with("--top-p", "2"), "top-p"),
        (run_with("--rps", "0"), "rps"),
        (run_with("--tpm", "-5"), "tpm"),
        (run_with("--max-attempts", "0"), "max-attempts"),
        (run_with("--attempt-timeout", "0"), "attempt-timeout"),
        (run_with("--max-request-time", "-1"), "max-request-time"),
        (run_with("--wait", "-1"), "wait"),
        (run_with("--subtasks", "nosuch"), "nosuch"),
        (run_with("--dimensions", "nosuch"), "nosuch"),
        (run_with("--judges", "nosuch"), "nosuch"),
        (run_with("--judges", "llm"), "--judge-endpoint"),
        (run_with(*judge), "--judge-model"),
        (run_with(*judge, "--judge-model", "gpt-4"), "does not serve 'gpt-4'"),
        (run_with("--judges", "llm", "--judge-endpoint", dead, "--judge-model", "j"), "cannot be reached"),
        (run_with("--config", str(f / "missing.toml")), "does not exist"),
        (run_with("--config", str(f / "dir.toml")), "is a folder"),
        (run_with("--config", str(f / "binary.toml")), "not UTF-8"),
        (run_with("--config", str(f / "broken.toml")), "not valid TOML"),
        (run_with("--config", str(f / "unknown.toml")), "no-such-option"),
        (run_with("--config", str(f / "bad-engine.toml")), "concurrency"),
        (run_with("--data-path", str(f / "nowhere")), "does not exist"),
        (run_with("--data-path", str(f / "changed")), "differs from the registry"),
        (run_with("--output", str(f / "afile")), "cannot write the run folder"),
        (run_with("--run-name", "../escape"), "run-name"),
        (run_with("--api-key-env", "EMPTY_KEY"), "EMPTY_KEY"),
        (run_with("--endpoints-file", str(f / "missing.txt")), "does not exist"),
        (run_with("--endpoints-file", str(f / "dir.toml")), "cannot read the endpoints file"),
        (run_with("--endpoints-file", str(f / "empty.txt")), "lists no endpoint"),
        (run_with("--endpoints-file", str(f / "badline.txt")), "localhost:8000"),
        (["evaluate", "--subtasks", "advbench", "--output", str(tmp_path / "none"), "--model", "m"], "no run folder"),
        (["compare", str(f / "afile")], "not valid JSON"),
        (["compare", str(f / "missing")], "does not exist"),
        (["matrix", str(f / "missing.toml")], "does not exist"),
        (["matrix", str(f / "dir.toml")], "is a folder"),
        (["matrix", str(f / "matrix-bad.toml")], "exactly one of model"),
        (["matrix", str(f / "matrix-run.toml")], "must not set 'endpoint'"),
    ]
    assert len(cases) >= 40
    asks = {"does not serve model 'no-such-model'", "/v1 missing"}  # the cases that must talk to the server to know
    for args, needle in cases:
        capsys.readouterr()
        before = srv.stats()["requests"]
        code = main(args)
        err = capsys.readouterr().err
        label = " ".join(args)
        assert code == 2, (label, code, err)
        assert "Traceback" not in err and ("evalkit: error:" in err or "evalkit: stopped:" in err) and needle in err, (label, err)
        assert records.read_bytes() == kept, label
        if needle not in asks:  # refused before the first request
            assert srv.stats()["requests"] == before, label
