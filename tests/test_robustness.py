"""Robustness subtasks: AdvGLUE extraction and scores by hand, and a real-data run."""

from __future__ import annotations

import json

import orjson
import pytest

from conftest import run_cli
from evalkit.metrics import advglue_answer, advglue_scores


@pytest.mark.parametrize(
    "text,task,answer",
    [
        ("Yes.", "qqp", "Positive"),
        ("No, they differ.", "qqp", "Negative"),
        ("yes and no", "qqp", "Unknown"),
        ("I do not know", "qqp", "Unknown"),  # "not" is no "no": whole words only
        ("The premise entails the hypothesis.", "qnli", "Positive"),
        ("the premise does not entail the hypothesis", "qnli", "Negative"),
        ("POSITIVE", "sst2", "Positive"),
        ("Maybe.", "mnli", "Maybe"),
        ("maybe yes", "mnli", "Unknown"),
        ("是", "qqp", "Positive"),
    ],
)
def test_advglue_answer(text, task, answer):
    assert advglue_answer(text, task) == answer


def test_advglue_scores_by_hand():
    items = [
        ("qqp", 1, "original", True), ("qqp", 1, "modified", False),
        ("qqp", 2, "original", True), ("qqp", 2, "modified", True),
        ("qqp", 3, "original", None), ("qqp", 3, "modified", True),
        ("sst2", 1, "original", False), ("sst2", 1, "modified", True),
    ]
    t = advglue_scores(items, drop_unknown=True)  # TrustLLM: pair 3 dropped
    assert (t["acc_qqp"], t["adv_acc_qqp"], t["asr_qqp"]) == (1.0, 0.5, 0.5)
    assert (t["avg_acc"], t["avg_adv_acc"], t["avg_asr"]) == (0.25, 0.375, 0.125)
    assert t["rs"] == pytest.approx(0.25) and t["acc_mnli"] == 0.0
    o = advglue_scores(items, drop_unknown=False)  # corrected: the unparseable answer is wrong
    assert o["acc_qqp"] == pytest.approx(2 / 3) and o["adv_acc_qqp"] == pytest.approx(2 / 3) and o["asr_qqp"] == 0.5
    assert o["rs"] == pytest.approx(7 / 24)


def test_adversarial_glue_end_to_end(mock_server, data_root, tmp_path):
    # "yes" to every qqp/qnli/mnli prompt, nothing parseable for sst2
    srv = mock_server(script={"default": "Yes.", "rules": [{"contains": "label the sentiment", "reply": "I cannot tell."}]})
    p = run_cli("run", "--subtasks", "adversarial_glue", "--endpoint", srv.url, "--data-path", str(data_root),
                "--output", str(tmp_path), "--concurrency", "128")
    assert p.returncode == 0, p.stderr
    res = orjson.loads((tmp_path / "mock-model" / "results.json").read_bytes())["subtasks"]["adversarial_glue"]
    m = {x["name"]: x for x in res["metrics"]}
    data = json.loads((data_root / "trustllm/robustness/AdvGLUE.json").read_text())
    sst2 = [x for x in data if x["task"] == "sst2"]
    assert all(("label the sentiment" in x["prompt"]) == (x["task"] == "sst2") for x in data)
    gold_yes = {"qqp": 1, "qnli": 0, "mnli": 0}  # labels that mean "yes"
    acc = {}
    for t, yes in gold_yes.items():
        orig = [x for x in data if x["task"] == t and x["type"] == "original"]
        acc[t] = sum(x["label"] == yes for x in orig) / len(orig)
    # the answer never changes, so adv_acc equals acc on modified items and no attack "succeeds" from a right answer
    assert m["avg_acc"]["value"] == pytest.approx(sum(acc.values()) / 4)  # sst2: every answer wrong (unparseable) -> 0
    assert m["avg_acc"]["n_invalid"] == len(sst2) == 262
    assert "trustllm_value" not in m["avg_acc"]  # TrustLLM drops the sst2 pairs; a task without pairs counts 0 too
    assert m["avg_asr"]["value"] == 0.0 and m["rs"]["value"] == pytest.approx(m["avg_adv_acc"]["value"])
    assert m["rs"]["direction"] == "higher_is_better" and m["rs"]["judge"] == "rule"
