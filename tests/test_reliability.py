"""Failures that stop a run early and say why: every request failed, a judge that cannot work,
options out of bounds; checked before (or instead of) generating, with nothing written lost."""

from __future__ import annotations

import pytest

from conftest import read_jsonl, run_cli
from evalkit.config import EngineConfig
from evalkit.engine import Engine, RetryableFailure, Result


def _gen(srv, data_root, tmp_path, *extra: str):
    return run_cli("run", "--subtasks", "advbench", "--limit", "12", "--endpoint", srv.url, "--data-path", str(data_root),
                   "--output", str(tmp_path / "runs"), "--no-progress", *extra)


def test_a_run_whose_requests_all_failed_is_a_failure_with_its_cause(mock_server, data_root, tmp_path):
    srv = mock_server("--fault-rate", "1", "--faults", "500")
    p = _gen(srv, data_root, tmp_path, "--max-attempts", "1")
    assert p.returncode == 1, p.stderr
    assert "all 12 generation requests failed: transient 500: HTTP 500: The server had an error." in p.stderr
    assert "Traceback" not in p.stderr
    assert len(read_jsonl(tmp_path / "runs" / "mock-model" / "responses" / "advbench.jsonl")) == 12  # the error records stay
    # a partial failure runs to the end and says how many failed and why
    flaky = mock_server("--fault-rate", "0.5", "--faults", "500", "--seed", "3")
    p = _gen(flaky, data_root, tmp_path / "partial", "--max-attempts", "1")
    assert p.returncode == 0, p.stderr
    assert "of 12 generation requests failed; commonest cause: transient 500" in p.stderr


@pytest.mark.parametrize("extra, message", [
    (["--judges", "nosuch"], "nosuch"),
    (["--judges", "llm"], "--judge-endpoint"),
    (["--judges", "llm", "--judge-endpoint", "http://127.0.0.1:9/v1", "--judge-model", "j"], "cannot be reached"),
    (["--concurrency", "100000000"], "concurrency"),
])
def test_judges_and_options_are_checked_before_the_first_request(mock_server, data_root, tmp_path, extra, message):
    srv = mock_server()
    p = _gen(srv, data_root, tmp_path, *extra)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert srv.stats()["requests"] == 0


def test_a_judge_model_the_judge_endpoint_does_not_serve(mock_server, data_root, tmp_path):
    srv, judge = mock_server(), mock_server("--model", "judge-model")
    p = _gen(srv, data_root, tmp_path, "--judges", "llm", "--judge-endpoint", judge.url, "--judge-model", "gpt-4")
    assert p.returncode == 2 and "does not serve 'gpt-4'; it serves 'judge-model'" in p.stderr
    assert srv.stats()["requests"] == 0 and judge.stats()["requests"] == 0


def test_an_html_answer_is_named():
    eng = Engine(EngineConfig(progress=False), ["http://127.0.0.1:9/v1"])
    with pytest.raises(RetryableFailure, match="answered HTML, not JSON"):
        eng._read_body(b"<!doctype html><html><body>Welcome</body></html>", Result())
