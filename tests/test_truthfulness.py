"""Truthfulness subtasks: hand-computed extraction, macro F1 and accuracies, and a real-data run."""

from __future__ import annotations

import json

import orjson
import pytest

from conftest import run_cli
from evalkit.metrics import claim_verdict, macro_f1, mc_letter, yes_no_answer


def test_macro_f1_vectors():
    # REFUTE: tp 1, fp 0, fn 1 -> P 1, R 1/2, F1 2/3; SUPPORT: tp 1, fp 1, fn 0 -> P 1/2, R 1, F1 2/3
    gold = ["REFUTE", "REFUTE", "SUPPORT"]
    assert macro_f1(gold, ["REFUTE", "SUPPORT", "SUPPORT"]) == pytest.approx(2 / 3)
    # a None prediction is a miss: REFUTE tp 1 fn 1 fp 0 -> F1 2/3; SUPPORT tp 1 -> 1
    assert macro_f1(gold, ["REFUTE", None, "SUPPORT"], labels=["REFUTE", "SUPPORT"]) == pytest.approx((2 / 3 + 1) / 2)
    assert macro_f1(["SUPPORT"], ["SUPPORT"]) == 1.0  # only the labels seen, as scikit-learn
    assert macro_f1([], []) is None


@pytest.mark.parametrize("text,ours,theirs", [
    ("Answer: Supports. The paragraph says...", "SUPPORT", "SUPPORT"),
    ("Answer: Refutes", "REFUTE", "REFUTE"),
    ("It does not support the claim", "REFUTE", "SUPPORT"),  # TrustLLM's substring rule
    ("supports and refutes", None, None),
    ("I cannot tell", None, None),
])
def test_claim_verdict(text, ours, theirs):
    assert claim_verdict(text) == ours and claim_verdict(text, trustllm=True) == theirs


@pytest.mark.parametrize("text,ours,theirs", [
    ("Yes", "Yes", "Yes"), ("#Your Judgement#: No", "No", "No"),
    ("I do not know", None, "No"),  # "no" inside "not"/"know"
    ("yes and no", None, "Yes"),
])
def test_yes_no(text, ours, theirs):
    assert yes_no_answer(text) == ours and yes_no_answer(text, trustllm=True) == theirs


@pytest.mark.parametrize("text,ours,theirs", [("A", "A", "A"), ("B.", "B", "B"), ("Answer: A", "A", None), ("C) maybe", "C", "C"), ("none", None, None)])
def test_mc_letter(text, ours, theirs):
    assert mc_letter(text) == ours and mc_letter(text, trustllm=True) == theirs


def test_truthfulness_end_to_end(mock_server, data_root, tmp_path):
    srv = mock_server(script={"default": "I do not know", "rules": [
        {"contains": "Here is the claim", "reply": "Answer: Supports."},
        {"contains": "Only return me the option letter", "reply": "Answer: A"},
    ]})
    p = run_cli("run", "--dimensions", "truthfulness", "--endpoint", srv.url, "--data-path", str(data_root), "--output", str(tmp_path),
                "--concurrency", "128")
    assert p.returncode == 0, p.stderr
    res = orjson.loads((tmp_path / "mock-model" / "results.json").read_bytes())["subtasks"]
    assert set(res) == {"use_external_knowledge", "hallucination"}
    ext = json.loads((data_root / "trustllm/truthfulness/external.json").read_text())
    assert all("Here is the claim" in x["prompt"] for x in ext)
    (m,) = res["use_external_knowledge"]["metrics"]
    # always SUPPORT: per source, SUPPORT F1 = 2s/(s+1) with s the share of SUPPORT gold, REFUTE F1 = 0
    expect = []
    for src in ("scifact", "covid", "healthver", "climate"):
        share = sum(x["answer"] == "SUPPORT" for x in ext if x["source"] == src) / 100
        expect.append((2 * share / (share + 1)) / 2)
    assert m["value"] == pytest.approx(sum(expect) / 4) and "trustllm_value" not in m
    (h,) = res["hallucination"]["metrics"]
    # "I do not know" is no answer for HaluEval; "Answer: A" is right for MC (gold is always A)
    assert h["details"]["mc"] == 1.0 and h["details"]["halu_qa"] == 0.0 and h["details"]["mc_gold_is_A"] is True
    assert h["value"] == pytest.approx(0.25)
    # TrustLLM: "I do not know" reads as "No" (right on the half with gold No); "Answer: A" is no MC answer
    assert h["trustllm_value"] == pytest.approx((0.5 + 0.5 + 0.5 + 0.0) / 4)
    assert h["n_invalid"] == 300
