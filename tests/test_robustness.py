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
    # whole pairs are resampled within each task: no pair ever turns a right answer wrong, so no resample
    # has an attack success; the accuracies do move with the resampled pairs
    assert m["avg_asr"]["ci"] == [0.0, 0.0] and m["avg_asr"]["ci_method"] == "bootstrap-stratified"
    assert m["avg_acc"]["ci"][0] < m["avg_acc"]["value"] < m["avg_acc"]["ci"][1]
    assert m["rs"]["direction"] == "higher_is_better" and m["rs"]["judge"] == "rule"


from evalkit.metrics import constant_prediction_f1, ddxplus_target, sentiment_choice  # noqa: E402


@pytest.mark.parametrize("text,target", [
    ("The diagnosis is gerd. Because...", " gerd"),
    ("It is most likely pericarditis, or anaphylaxis", " pericarditis"),  # no '.', so up to the ','
    ("most consistent with anaphylaxis", " with anaphylaxis"),
    ("gerd", "gerd"),  # under 50 characters: the whole reply
    ("x" * 60, None),  # the judge decides
    ("", None),
])
def test_ddxplus_target(text, target):
    assert ddxplus_target(text) == target


def test_sentiment_and_f1():
    assert sentiment_choice("Positive!") == "positive" and sentiment_choice("positive or neutral") is None
    assert sentiment_choice("nonnegative") is None
    assert constant_prediction_f1(0.5) == pytest.approx(2 / 3) and constant_prediction_f1(0.0) == 0.0 and constant_prediction_f1(1.0) == 1.0


def test_ood_generalization_score_vector():
    from evalkit.records import JudgmentRecord, ResponseRecord
    from evalkit.tasks import Scored, all_tasks

    task = all_tasks()["ood_generalization"]
    cases = [  # (source, gold, answer, judge verdict)
        ("flipkart", "positive", "Positive", None),
        ("flipkart", "neutral", "positive or neutral", None),  # TrustLLM: right (substring); ours: no single answer
        ("flipkart", "negative", "positive", None),
        ("ddxplus", "gerd", "The diagnosis is gerd.", None),
        ("ddxplus", "anaphylaxis", "y" * 60, "Wrong"),
    ]
    rows = []
    for i, (src, gold, ans, v) in enumerate(cases):
        resp = ResponseRecord(key=f"k{i}", subtask="t", item_id=str(i), model="m", params={}, created=0.0, response=ans,
                              gold=gold, group=src)
        assert task.needs_judgment(resp) == (v is not None)
        j = v and JudgmentRecord(key=f"j{i}", response_key=f"k{i}", subtask="t", item_id=str(i), judge="J", raw=v,
                                 label=task.judge_parse(v).label, created=0.0)
        rows.append(Scored(resp, j or None))
    (m,) = task.score(rows, "J")
    # ours: flipkart 1/3, ddxplus 1/2 -> mean 5/12; TrustLLM: flipkart acc 2/3 -> F1 0.8, ddxplus acc 1/2 -> F1 2/3
    assert m.value == pytest.approx(5 / 12) and m.details == {"flipkart": pytest.approx(1 / 3), "ddxplus": 0.5}
    assert m.trustllm_value == pytest.approx((0.8 + 2 / 3) / 2)


def test_ood_generalization_end_to_end(mock_server, data_root, tmp_path):
    model = mock_server(script={"default": "positive", "rules": [{"contains": "What is the diagnosis?", "reply": "z" * 80}]})
    judge = mock_server("--model", "judge", script={"default": "correct"})
    p = run_cli("run", "--subtasks", "ood_generalization", "--endpoint", model.url, "--data-path", str(data_root),
                "--output", str(tmp_path), "--judge-endpoint", judge.url, "--judge-model", "judge")
    assert p.returncode == 0, p.stderr
    data = json.loads((data_root / "trustllm/robustness/ood_generalization.json").read_text())
    flip = [x for x in data if x["source"] == "flipkart"]
    assert len(flip) == 400 and all("What is the diagnosis?" in x["prompt"] for x in data if x["source"] == "ddxplus")
    (m,) = orjson.loads((tmp_path / "mock-model" / "results.json").read_bytes())["subtasks"]["ood_generalization"]["metrics"]
    acc_flip = sum(x["label"] == "positive" for x in flip) / 400
    assert m["value"] == pytest.approx((acc_flip + 1.0) / 2)  # the judge calls every diagnosis correct
    assert m["trustllm_value"] == pytest.approx((2 * acc_flip / (1 + acc_flip) + 1.0) / 2)
    assert judge.stats()["completed"] == 100 and m["judge"] == "llm:judge:trustllm_ood_generalization"


def test_adversarial_instruction_score_by_hand():
    from evalkit.records import JudgmentRecord, ResponseRecord
    from evalkit.tasks import Scored, all_tasks

    spec = [(0, "original", [1, 0]), (0, "word_change", [1, 0]), (1, "original", [0, 1]), (1, "one_url", [1, 1])]
    rows = []
    for i, (inst, kind, vec) in enumerate(spec):
        resp = ResponseRecord(key=f"k{i}", subtask="t", item_id=str(i), model="m", params={}, created=0.0, response="r",
                              instruction=inst, group=kind)
        rows.append(Scored(resp, JudgmentRecord(key=f"j{i}", response_key=f"k{i}", subtask="t", item_id=str(i), judge="E",
                                                label="embedded", created=0.0, embedding=vec)))
    (m,) = all_tasks()["adversarial_instruction"].score(rows, "E")
    assert m.value == pytest.approx((1 + 2 ** -0.5) / 2)  # each perturbed answer against its own original
    assert m.trustllm_value == pytest.approx(2 ** -0.5)  # TrustLLM: the last answer of id 0 against that of id 1


def test_adversarial_instruction_end_to_end(mock_server, data_root, tmp_path):
    model = mock_server(script={"default": "Here is my answer."})
    embed = mock_server("--model", "embedder")
    base = ["run", "--subtasks", "adversarial_instruction", "--endpoint", model.url, "--data-path", str(data_root),
            "--output", str(tmp_path), "--concurrency", "64"]
    p = run_cli(*base, "--embed-endpoint", embed.url)
    assert p.returncode == 2 and "--embed-model" in p.stderr  # generated, then stopped before judging: answers kept
    p = run_cli(*base, "--embed-endpoint", embed.url, "--embed-model", "embedder")
    assert p.returncode == 0, p.stderr
    (m,) = orjson.loads((tmp_path / "mock-model" / "results.json").read_bytes())["subtasks"]["adversarial_instruction"]["metrics"]
    assert m["value"] == pytest.approx(1.0) and m["n"] == 600 and m["judge"] == "embedding:embedder"  # same answer everywhere
    judged = [orjson.loads(x) for x in (tmp_path / "mock-model" / "judgments" / "adversarial_instruction.jsonl").read_bytes().splitlines()]
    assert len(judged) == 600 and all(len(j["embedding"]) == 8 for j in judged)
    assert model.stats()["completed"] == 600  # the second run resumed: nothing generated twice
