"""Prices, tokens and cost per stage, and --max-cost (evalkit/cost.py, the engine's holds)."""

from __future__ import annotations

import csv

import orjson
import pytest
from conftest import read_jsonl

from evalkit.cli import main
from evalkit.cost import Price, Spending
from evalkit.engine import estimate_tokens

# USD per million tokens, large so that a few hundred mock tokens cost cents
PRICES = """
[prices."mock-model"]
input = 100.0
output = 400.0

[prices."judge-model"]
input = 10.0
output = 20.0
"""


def test_price_and_spending_by_hand():
    p = Price(input=0.15, output=0.60)
    assert p.cost(1000, 500) == pytest.approx(1000 * 0.15e-6 + 500 * 0.60e-6)  # 0.00015 + 0.0003
    assert Price(input=2.0).cost(10, 10) == pytest.approx(2e-5)  # embeddings: input only
    s = Spending(1.0)
    assert s.hold(0.6) and not s.hold(0.5) and s.held == pytest.approx(0.6)  # 0.6 + 0.5 would pass 1.0
    s.settle(0.6, 0.2)  # the answer cost less than its worst case: the difference is free again
    assert s.spent == pytest.approx(0.2) and s.held == 0 and s.hold(0.8) and not s.hold(0.01)
    assert Spending(None).hold(1e9)  # no limit: only counted


def _cost(records, price: Price) -> float:
    return sum(price.cost(r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"]) for r in records)


def test_tokens_and_cost_per_stage_in_manifest_and_console(mock_server, data_root, tmp_path, capsys):
    srv, judge = mock_server(), mock_server("--model", "judge-model", "--reply", "[[A]]")
    cfg = tmp_path / "evalkit.toml"
    cfg.write_text(PRICES)
    assert main(["run", "--config", str(cfg), "--subtasks", "advbench", "--limit", "12", "--endpoint", srv.url,
                 "--judges", "keyword,llm", "--judge-endpoint", judge.url, "--judge-model", "judge-model",
                 "--data-path", str(data_root), "--output", str(tmp_path / "runs"), "--no-progress"]) == 0
    run = tmp_path / "runs" / "mock-model"
    answers = read_jsonl(run / "responses" / "advbench.jsonl")
    manifest = orjson.loads((run / "manifest.json").read_bytes())
    cost = manifest["cost"]
    # directly computed from the records' usage and the prices
    gen = _cost(answers, Price(input=100, output=400))
    assert cost["generation"]["usd"] == pytest.approx(gen, abs=1e-6)
    assert cost["generation"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in answers)
    judge_log = judge.log()  # [arrived, prompt_tokens, completion_tokens] per judge request
    assert len(judge_log) == 12
    judging = sum(Price(input=10, output=20).cost(int(p), int(c)) for _, p, c in judge_log)
    assert cost["judging"]["usd"] == pytest.approx(judging, abs=1e-6)
    assert cost["total_usd"] == pytest.approx(gen + judging, abs=1e-6)
    err = capsys.readouterr().err
    assert f"generation {cost['generation']['prompt_tokens']:,} in / {cost['generation']['completion_tokens']:,} out tokens " \
           f"(${gen:.4f}); judging" in err and f"total ${gen + judging:.4f}" in err


def test_max_cost_stops_cleanly_and_a_rerun_resumes(mock_server, data_root, tmp_path, capsys):
    srv = mock_server()
    cfg = tmp_path / "evalkit.toml"
    cfg.write_text(PRICES)
    base = ["run", "--config", str(cfg), "--subtasks", "advbench", "--limit", "40", "--endpoint", srv.url,
            "--max-tokens", "32", "--concurrency", "1", "--data-path", str(data_root), "--output", str(tmp_path / "runs"),
            "--no-progress"]
    assert main([*base, "--max-cost", "0.05"]) == 5
    err = capsys.readouterr().err
    assert "stopped: the next request would pass --max-cost $0.05" in err and "rerun with a larger --max-cost" in err
    path = tmp_path / "runs" / "mock-model" / "responses" / "advbench.jsonl"
    answers = read_jsonl(path)
    price = Price(input=100, output=400)
    assert 0 < len(answers) < 40 and all(r.get("error") is None for r in answers)
    assert _cost(answers, price) <= 0.05
    # the same decisions computed directly: one request at a time, sent while the limit holds its
    # worst case (prompt at 3 characters a token, 32 answer tokens), then charged its usage
    spent, sent = 0.0, 0
    for r in answers:
        hold = price.cost(*estimate_tokens({"messages": r["messages"], "max_tokens": 32}))
        assert spent + hold <= 0.05
        spent += price.cost(r["usage"]["prompt_tokens"], r["usage"]["completion_tokens"])
        sent += 1
    with open(data_root / "advbench" / "harmful_behaviors.csv", newline="") as f:
        goal = list(csv.DictReader(f))[sent]["goal"]  # the request it did not send: the next item
    nxt = [*answers[0]["messages"][:-1], {"role": "user", "content": goal}]
    assert spent + price.cost(*estimate_tokens({"messages": nxt, "max_tokens": 32})) > 0.05
    assert srv.stats()["requests"] == len(answers)  # nothing was sent that is not kept
    manifest = orjson.loads(path.parent.parent.joinpath("manifest.json").read_bytes())
    assert manifest["cost"]["generation"]["usd"] == pytest.approx(spent, abs=1e-6) and manifest["cost"]["max_cost"] == 0.05
    assert main([*base, "--max-cost", "10"]) == 0  # resumes: only the rest is asked for
    assert len(read_jsonl(path)) == 40 and srv.stats()["requests"] == 40


def test_max_cost_needs_prices_before_any_request(mock_server, data_root, tmp_path, capsys):
    srv = mock_server()
    assert main(["run", "--subtasks", "advbench", "--limit", "5", "--endpoint", srv.url, "--max-cost", "1",
                 "--data-path", str(data_root), "--output", str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("evalkit: error: --max-cost needs the price of 'mock-model': add [prices.\"mock-model\"] with input = "
                       "and output = (USD per million tokens; 0 for a local model) to the --config file")
    assert srv.stats()["requests"] == 0
