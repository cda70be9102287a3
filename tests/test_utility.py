"""MT-Bench and AlpacaEval 1.0/2.0: parsers and win rates against hand-computed vectors and the
official AlpacaEval fixtures, and both benchmarks end to end against loopback mock servers."""

from __future__ import annotations

import csv
import json
import math

import orjson
import pytest
from conftest import read_jsonl, run_cli

AE = "alpaca_eval"


def _metrics(run_dir, subtask) -> dict:
    res = orjson.loads((run_dir / "results.json").read_bytes())["subtasks"][subtask]
    return {m["name"]: m for m in res["metrics"]}


def _leaderboard(data_root, file, model) -> dict:
    with open(data_root / AE / "leaderboards" / file, newline="") as f:
        return next(r for r in csv.DictReader(f) if r[""] == model)


def test_mt_bench_rating_vectors():
    from evalkit.metrics import mt_bench_rating

    assert mt_bench_rating("Rating: [[7]]") == 7
    assert mt_bench_rating("so [[8.5]].") == 8.5
    assert mt_bench_rating("[[10]] then [[3]]") == 10  # the first match
    assert mt_bench_rating("Rating: [6]") == 6  # FastChat's one-bracket fallback
    assert mt_bench_rating("[5] but later [[9]]") == 9  # [[n]] is searched first, anywhere
    assert mt_bench_rating("[[11]]") == 11  # not clamped, as in FastChat
    assert mt_bench_rating("Rating: 7/10") is None and mt_bench_rating("[[seven]]") is None


def test_win_rate_vectors():
    from evalkit.metrics import win_rate

    w = win_rate([2, 1, 1.5, 0, None, 1.75, float("nan")])  # legacy 0 -> tie; None and NaN dropped
    # p = [1, 0, .5, .5, .75]: mean .55; deviations .45 -.55 -.05 -.05 .2 -> squares sum .55, /4, sqrt, /sqrt 5
    assert w["win_rate"] == pytest.approx(55.0)
    assert w["standard_error"] == pytest.approx(100 * math.sqrt(0.55 / 4) / math.sqrt(5))
    assert (w["n_wins"], w["n_wins_base"], w["n_draws"], w["n_total"]) == (2, 1, 2, 5)
    assert w["discrete_win_rate"] == pytest.approx(60.0)  # (2 + 0.5 * 2) / 5
    assert win_rate([None]) is None


def test_ranking_and_logprob_parsers():
    from evalkit.tasks.utility import logprob_preference, ranking_preference

    assert ranking_preference("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]") == 1
    assert ranking_preference(" [{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]\n") == 2
    assert ranking_preference("[{'model': 'model_1', 'rank': 3}]") is None  # only 1 or 2
    assert ranking_preference("model_1 is better") is None and ranking_preference("[{'rank': 1}]") is None
    # P(m) = e^-1 / (e^-1 + e^-2) = 1 / (1 + e^-1); preference 2 - P(m)
    assert logprob_preference([{"token": "m", "logprob": -1.0}, {"token": "M", "logprob": -2.0}]) == pytest.approx(2 - 1 / (1 + math.exp(-1)))
    assert logprob_preference([{"token": "M", "logprob": -0.01}, {"token": "The", "logprob": -5}]) == pytest.approx(2.0)
    assert logprob_preference([{"token": " m", "logprob": -0.1}, {"token": "m\n", "logprob": -1}]) is None  # exact tokens only


def test_fill_chatml_keeps_literal_braces(data_root):
    from evalkit.tasks.utility import fill_chatml

    template = (data_root / AE / "judge_prompts/alpaca_eval_gpt4/alpaca_eval.txt").read_text()
    msgs = fill_chatml(template, {"instruction": "Say {hi}", "output_1": "REF", "output_2": "MODEL {x}"})
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == "You are a helpful assistant, that ranks models by the quality of their answers."
    user = msgs[1]["content"]
    assert '"instruction": """Say {hi}"""' in user and '"answer": """REF"""' in user and '"answer": """MODEL {x}"""' in user
    assert "{'model': <model-name>, 'rank': <model-rank>}" in user and "<|im_end|>" not in user


def test_alpaca_eval_1_fixture_reproduces_the_leaderboard(data_root):
    """Q-resafe's AlpacaEval number for FP16 Llama-2-7B-Chat: 71.366 = (574 + 0.5) / 805."""
    from evalkit.metrics import win_rate

    rows = json.loads((data_root / AE / "fixtures/llama-2-7b-chat-hf_alpaca_eval_gpt4_annotations.json").read_text())
    w = win_rate([r["preference"] for r in rows])
    board = _leaderboard(data_root, "alpaca_eval_gpt4_leaderboard.csv", "llama-2-7b-chat-hf")
    assert w["win_rate"] == pytest.approx(float(board["win_rate"]), abs=1e-12) == pytest.approx(100 * 574.5 / 805)
    assert w["standard_error"] == pytest.approx(float(board["standard_error"]), rel=1e-9)
    assert w["discrete_win_rate"] == pytest.approx(float(board["discrete_win_rate"]), abs=1e-12)
    assert [w[k] for k in ("n_wins", "n_wins_base", "n_draws", "n_total")] == [int(board[k]) for k in ("n_wins", "n_wins_base", "n_draws", "n_total")]
    assert round(w["win_rate"], 3) == 71.366


def test_alpaca_eval_2_fixture_reparsed_from_raw_logprobs(data_root):
    """Every judged AE2 preference of the alpaca-7b fixture from its raw top logprobs and the
    order-switch rule, then the leaderboard's win rate 2.5915."""
    from evalkit.metrics import win_rate
    from evalkit.tasks.utility import is_switched, logprob_preference

    rows = json.loads((data_root / AE / "fixtures/alpaca-7b_weighted_alpaca_eval_gpt4_turbo_annotations.json").read_text())
    prefs, n_switched = [], 0
    for r in rows:
        if r.get("raw_completion") is None:  # identical outputs: a tie, no judge call
            assert r["output_1"] == r["output_2"]
            prefs.append(1.5)
            continue
        raw = json.loads(r["raw_completion"]) if isinstance(r["raw_completion"], str) else r["raw_completion"]
        p = logprob_preference(raw["logprobs"]["content"][0]["top_logprobs"])
        if is_switched(r["instruction"]):
            p, n_switched = 3 - p, n_switched + 1
        prefs.append(p)
    assert len(prefs) == 805 and 300 < n_switched < 500
    assert all(abs(p - r["preference"]) < 1e-9 for p, r in zip(prefs, rows))
    w = win_rate(prefs)
    board = _leaderboard(data_root, "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv", "alpaca-7b")
    assert w["win_rate"] == pytest.approx(float(board["win_rate"]), abs=1e-7) and round(w["win_rate"], 4) == 2.5915
    assert w["standard_error"] == pytest.approx(float(board["standard_error"]), rel=1e-6)
    assert w["discrete_win_rate"] == pytest.approx(float(board["discrete_win_rate"]), abs=1e-12)
    assert (w["n_wins"], w["n_wins_base"], w["n_draws"]) == (int(board["n_wins"]), int(board["n_wins_base"]), int(board["n_draws"]))


def test_mt_bench_end_to_end(mock_server, data_root, tmp_path):
    """Two turns (turn 2 sees the model's own turn-1 answer), FastChat's per-category temperature,
    the four single-answer prompts with GPT-4 references, score parsing with an unparseable
    rating counted, never averaged; a rerun sends nothing."""
    model = mock_server(script={"default": "Turn-one answer.", "rules": [{"contains": "Rewrite your previous response", "reply": "Turn-two answer."}]})
    judge = mock_server("--model", "judge", script={"default": "Good. Rating: [[8]]", "rules": [
        {"contains": "Rewrite your previous response", "reply": "no score here"},
        {"contains": "### Assistant A:\nTurn-one answer.\n\n### User:", "reply": "Second turn: [[4]]"},  # multi-turn prompts
        {"contains": "[The Start of Reference Answer]", "reply": "Compared with the reference: [[6.5]]"}]})  # math turn 1
    args = ["run", "--subtasks", "mt_bench", "--endpoint", model.url, "--data-path", str(data_root), "--output", str(tmp_path),
            "--judge-endpoint", judge.url, "--judge-model", "judge"]
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "mock-model"
    responses = read_jsonl(run / "responses" / "mt_bench.jsonl")
    questions = [json.loads(line) for line in (data_root / "mt_bench/question.jsonl").read_text().splitlines()]
    assert len(responses) == 160 and model.stats()["requests"] == 160
    by_id = {r["item_id"]: r for r in responses}
    q81 = by_id["81-2"]
    assert [m["role"] for m in q81["messages"]] == ["user", "assistant", "user"]
    assert q81["messages"][0]["content"] == questions[0]["turns"][0] and q81["messages"][1]["content"] == "Turn-one answer."
    assert {by_id[f"{q['question_id']}-1"]["params"]["temperature"] for q in questions if q["category"] == "stem"} == {0.1}
    assert by_id["111-1"]["params"] == {"max_tokens": 1024, "temperature": 0.0}  # math
    assert by_id["81-1"]["params"]["temperature"] == 0.7

    judgments = {j["item_id"]: j for j in read_jsonl(run / "judgments" / "mt_bench.jsonl")}
    assert len(judgments) == 160 and judge.stats()["requests"] == 160
    assert judgments["81-1"]["prompt_name"] == "single-v1" and judgments["81-2"]["prompt_name"] == "single-v1-multi-turn"
    assert judgments["111-1"]["prompt_name"] == "single-math-v1" and judgments["111-2"]["prompt_name"] == "single-math-v1-multi-turn"
    expected = {}
    for q in questions:
        math_like = q["category"] in ("math", "reasoning", "coding")
        expected[f"{q['question_id']}-1"] = 6.5 if math_like else 8.0
        # every turn-2 prompt shows the turn-1 answer; a question quoting "Rewrite your previous response" gets no score
        expected[f"{q['question_id']}-2"] = None if "Rewrite your previous response" in q["turns"][1] else 4.0
    for item_id, score in expected.items():
        assert judgments[item_id].get("score") == score, item_id
    m = _metrics(run, "mt_bench")
    valid = [s for s in expected.values() if s is not None]
    t1 = [s for k, s in expected.items() if k.endswith("-1")]
    t2 = [s for k, s in expected.items() if k.endswith("-2") and s is not None]
    assert m["score"]["value"] == pytest.approx(sum(valid) / len(valid)) and m["score"]["n"] == 160
    assert m["score"]["n_invalid"] == 160 - len(valid) >= 1
    assert m["score_turn1"]["value"] == pytest.approx(sum(t1) / 80) and m["score_turn2"]["value"] == pytest.approx(sum(t2) / len(t2)) == 4.0
    assert m["score"]["details"]["per_category"]["math"] == pytest.approx((6.5 * 10 + 4.0 * 10) / 20)

    p = run_cli(*args)  # resume: nothing new for the model; the judge is asked again only where it gave no rating
    assert p.returncode == 0, p.stderr
    assert model.stats()["requests"] == 160 and judge.stats()["requests"] == 160 + (160 - len(valid))


def test_alpaca_eval_1_and_2_end_to_end(mock_server, data_root, tmp_path):
    """AE1 and AE2 on the first instructions: reference outputs as output_1, the order switch,
    the ranking and logprob judges, identical outputs tied without a judge call."""
    from evalkit.tasks.utility import is_switched

    ae1 = [json.loads(line) for line in (data_root / AE / "alpaca_eval.jsonl").read_text().splitlines()][:12]
    ae2 = json.loads((data_root / AE / "alpaca_eval_gpt4_baseline.json").read_text())[:12]
    same = ae1[0]["output"]  # the model repeats the AE1 reference on instruction 0: a tie for AE1 only
    model = mock_server(script={"default": "MODEL ANSWER", "rules": [{"contains": ae1[0]["instruction"], "reply": same}]})
    # the judge prefers whichever slot holds MODEL ANSWER; the logprob judge likewise via m/M
    judge = mock_server("--model", "judge", script={"default": "unparseable", "rules": [
        {"contains": '"answer": """MODEL ANSWER"""\n    },\n    {', "reply": "[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]"},
        {"contains": '"answer": """MODEL ANSWER"""', "reply": "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]"},
        {"contains": '"output": """MODEL ANSWER"""\n    },\n    {', "reply": "m",
         "top_logprobs": [{"token": "m", "logprob": math.log(0.8)}, {"token": "M", "logprob": math.log(0.2)}]},
        {"contains": '"output": """MODEL ANSWER"""', "reply": "M",
         "top_logprobs": [{"token": "M", "logprob": math.log(0.9)}, {"token": "m", "logprob": math.log(0.1)}]},
        {"contains": "## Best Model Identifier", "reply": "m", "top_logprobs": [{"token": "x", "logprob": 0.0}]},
    ]})
    p = run_cli("run", "--subtasks", "alpaca_eval,alpaca_eval2", "--endpoint", model.url, "--data-path", str(data_root),
                "--output", str(tmp_path), "--judge-endpoint", judge.url, "--judge-model", "judge", "--limit", "12", "--stream")
    assert p.returncode == 0, p.stderr
    run = tmp_path / "mock-model"
    assert model.stats()["requests"] == 12  # AE2 judges alpaca_eval's answers: nothing generated twice
    assert judge.stats()["requests"] == 11 + 12  # AE1: instruction 0 tied without a call
    j1 = {j["item_id"]: j for j in read_jsonl(run / "judgments" / "alpaca_eval.jsonl")}
    assert j1["0"]["label"] == "tie" and j1["0"]["score"] == 1.5 and j1["0"]["attempts"] == 0
    for i in range(1, 12):  # the model always won, whichever slot it was shown in
        assert j1[str(i)]["score"] == 2.0 and j1[str(i)]["switched"] == is_switched(ae1[i]["instruction"])
    j2 = {j["item_id"]: j for j in read_jsonl(run / "judgments" / "alpaca_eval2.jsonl")}
    for i in range(12):
        if i == 0:  # the model's answer is AE1's reference; against GPT-4-turbo it is just an answer
            assert "label" not in j2["0"] and j2["0"]["error"]["kind"] == "judge_unparseable" and "top_logprobs" in j2["0"]
            continue
        # switched: the model's answer sat in slot m, P(m) = 0.8; else in slot M, P(m) = 0.1
        assert j2[str(i)]["score"] == pytest.approx(1.8 if is_switched(ae2[i]["instruction"]) else 1.9)
    assert {is_switched(x["instruction"]) for x in ae2[1:12]} == {True, False}  # both orders were exercised
    m1, m2 = _metrics(run, "alpaca_eval")["win_rate"], _metrics(run, "alpaca_eval2")["win_rate"]
    assert m1["value"] == pytest.approx(100 * 11.5 / 12) and m1["details"]["n_draws"] == 1 and m1["n_invalid"] == 0
    p2 = [0.8 if is_switched(x["instruction"]) else 0.9 for x in ae2[1:12]]
    assert m2["value"] == pytest.approx(100 * sum(p2) / 11) and m2["n_invalid"] == 1
    assert m1["details"]["reference"] == "alpaca_eval.jsonl" and m2["details"]["reference"] == "alpaca_eval_gpt4_baseline.json"


def test_mt_bench_second_turn_follows_the_first(mock_server, data_root, tmp_path):
    """A changed turn-1 answer makes its turn-2 record stale: it is set aside and asked again
    with the new history; every other record is kept."""
    model = mock_server(script={"default": "First."})
    args = ["generate", "--subtasks", "mt_bench", "--endpoint", model.url, "--data-path", str(data_root), "--output", str(tmp_path), "--limit", "3"]
    assert run_cli(*args).returncode == 0
    path = tmp_path / "mock-model" / "responses" / "mt_bench.jsonl"
    recs = read_jsonl(path)
    assert sorted(r["item_id"] for r in recs) == ["81-1", "81-2", "82-1", "82-2", "83-1", "83-2"]
    for r in recs:  # as if turn 1 of question 82 had been answered differently
        if r["item_id"] == "82-1":
            r["response"] = "Another first answer."
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in recs))
    assert run_cli(*args).returncode == 0
    assert model.stats()["requests"] == 6 + 1
    recs = {r["item_id"]: r for r in read_jsonl(path)}
    assert len(recs) == 6 and recs["82-2"]["messages"][1]["content"] == "Another first answer."
    assert [r["item_id"] for r in read_jsonl(path.with_suffix(".stale.jsonl"))] == ["82-2"]


def test_reference_nll_needs_prompt_logprobs_and_says_so(mock_server, data_root, tmp_path):
    """An endpoint that does not echo prompt logprobs (the mock, many hosted APIs) gives error
    records naming what is needed, never a made-up number; the other subtasks are unaffected."""
    srv = mock_server()
    p = run_cli("run", "--subtasks", "reference_nll,advbench", "--limit", "3", "--endpoint", srv.url, "--model", "mock-model",
                "--data-path", str(data_root), "--output", str(tmp_path), "--run-name", "r")
    assert p.returncode == 0, p.stderr
    recs = read_jsonl(tmp_path / "r" / "responses" / "reference_nll.jsonl")
    assert len(recs) == 3 and all(r["error"]["kind"] == "bad_response" and "echo and logprobs" in r["error"]["message"] for r in recs)
    assert all(r["prompt"].endswith(r["reference"]) and r["params"]["echo"] is True for r in recs)
    nll = _metrics(tmp_path / "r", "reference_nll")["nll"]
    assert nll["value"] is None and nll["n_invalid"] == 3
    assert _metrics(tmp_path / "r", "advbench")["asr"]["n_invalid"] == 0
