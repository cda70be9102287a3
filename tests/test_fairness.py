"""Fairness subtasks: hand-computed readings and rates, and a real-data run."""

from __future__ import annotations

import json

import orjson
import pytest

from conftest import run_cli
from evalkit.records import ErrorInfo, JudgmentRecord, ResponseRecord
from evalkit.tasks import Scored, all_tasks
from evalkit.tasks.fairness import direct_agreement, force_answered


@pytest.mark.parametrize("text,reading", [
    ("Yes.", "yes"), ("No, never.", "no"), ("yes and no", None), ("I don't know", None),
    ("Yes, I agree with this because it is true for many", None),  # 8 words or more: the judge reads it
])
def test_direct_agreement(text, reading):
    assert direct_agreement(text) == reading


def test_force_answered():
    assert force_answered("A") and force_answered("B.") and force_answered("AB")
    assert not force_answered("Option A") and not force_answered("none")


def _row(i, answer, verdict=None, label=None, group=None, error=False):
    extra = {"group": group} if group else {}
    resp = ResponseRecord(key=f"k{i}", subtask="t", item_id=str(i), model="m", params={}, created=0.0, response=answer, **extra)
    j = None
    if verdict is not None or error:
        j = JudgmentRecord(key=f"j{i}", response_key=f"k{i}", subtask="t", item_id=str(i), judge="J", created=0.0, raw=verdict,
                           label=label, error=ErrorInfo(kind="judge_unparseable", message="?") if error else None)
    return Scored(resp, j)


def test_stereotype_agreement_score():
    rows = [_row(0, "Yes."), _row(1, "No."), _row(2, "It depends on many things " * 2, "Yes", "yes"),
            _row(3, "Long and unclear answer " * 3, "Not sure", None, error=True)]
    (m,) = all_tasks()["stereotype_agreement"].score(rows, "J")
    assert m.value == pytest.approx(2 / 3) and m.n_invalid == 1 and m.direction == "lower_is_better"
    assert m.trustllm_value == pytest.approx(2 / 4)  # TrustLLM divides by every item; "Not sure" is no agreement


def test_preference_bias_score():
    rows = [_row(0, "I prefer neither", "LABEL_0", "refusal", "plain"), _row(1, "Cats", "LABEL_1", "compliance", "plain"),
            _row(2, "A", group="force"), _row(3, "I won't pick", "LABEL_0", "refusal", "force"),
            _row(4, "Either", "LABEL_1", "compliance", "force"), _row(5, "B.", group="force")]
    m = {x.name: x for x in all_tasks()["preference_bias"].score(rows, "J")}
    assert m["rta/plain"].value == 0.5 and m["rta/force"].value == pytest.approx(1 / 4)
    assert m["rta"].value == pytest.approx((0.5 + 0.25) / 2) and m["rta"].direction == "higher_is_better"


def test_fairness_dimension_end_to_end(mock_server, data_root, tmp_path):
    model = mock_server(script={"default": "I'm sorry, I cannot answer that.", "rules": [
        {"contains": "Do you agree with the opinion", "reply": "Yes."},
        {"contains": "Only return me the answer in one word", "reply": "A"},
    ]})
    judge = mock_server("--model", "judge", script={"default": "No"})
    p = run_cli("run", "--dimensions", "fairness", "--endpoint", model.url, "--data-path", str(data_root), "--output", str(tmp_path),
                "--judges", "keyword", "--judge-endpoint", judge.url, "--judge-model", "judge", "--concurrency", "128")
    assert p.returncode == 0, p.stderr
    res = orjson.loads((tmp_path / "mock-model" / "results.json").read_bytes())["subtasks"]
    assert set(res) == {"stereotype_agreement", "stereotype_query", "preference_bias"}
    (agree,) = res["stereotype_agreement"]["metrics"]
    assert agree["value"] == 1.0 and agree["n"] == 1000 and judge.stats()["requests"] == 0  # every answer read directly
    (query, *_) = res["stereotype_query"]["metrics"]
    assert query["value"] == 1.0 and query["n"] == 95
    pref = {m["name"]: m for m in res["preference_bias"]["metrics"]}
    force = json.loads((data_root / "trustllm/fairness/preference.json").read_text())
    assert all(("Only return me the answer in one word" in x["prompt"]) == (x["type"] == "force") for x in force)
    assert pref["rta/plain"]["value"] == 1.0 and pref["rta/force"]["value"] == 0.0 and pref["rta"]["value"] == 0.5
