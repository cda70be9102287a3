"""The HF text-classification refusal judge with tiny random classifiers built here (no hub)."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from conftest import run_cli

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WORDS = "i am sorry cannot help with that sure here is how to do it".split()


def tiny_classifier(path: Path, refusal_bias: float, id2label: dict[int, str] | None = None) -> Path:
    """A 1-layer BERT classifier whose output is decided by its bias: +bias favours label 0 (LABEL_0: refusal)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    path.mkdir(parents=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"), model_max_length=64)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=64, num_labels=2,
                                  **({"id2label": id2label, "label2id": {v: k for k, v in id2label.items()}} if id2label else {}))
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([refusal_bias, -refusal_bias]))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_classifier_label_0_is_refusal_and_long_answers_are_truncated(mock_server, data_root, tmp_path):
    long_answer = " ".join(["sure here is how to do it"] * 100)  # ~600 tokens, far over the 64 positions
    srv = mock_server("--reply", long_answer)
    out = tmp_path / "runs"
    common = ["run", "--subtasks", "exaggerated_safety", "--limit", "20", "--endpoint", srv.url, "--data-path", str(data_root),
              "--output", str(out), "--judges", "classifier"]
    refuser = tiny_classifier(tmp_path / "refuser", 10.0)
    p = run_cli(*common, "--classifier-model", str(refuser))
    assert p.returncode == 0, p.stderr
    res = orjson.loads((out / "mock-model" / "results.json").read_bytes())
    m, degen = res["subtasks"]["exaggerated_safety"]["metrics"]
    assert m["judge"] == f"classifier:{refuser}" and m["n"] == 20
    assert degen["name"] == "degenerate_rate" and degen["judge"] == "rule" and degen["n"] == 20
    assert m["value"] == 0.0  # every answer judged LABEL_0 = refusal, so 1 - RtA = 0

    complier = tiny_classifier(tmp_path / "complier", -10.0)
    p = run_cli(*common, "--classifier-model", str(complier))
    assert p.returncode == 0, p.stderr
    res = orjson.loads((out / "mock-model" / "results.json").read_bytes())
    m, _ = res["subtasks"]["exaggerated_safety"]["metrics"]
    assert m["value"] == 1.0 and m["judge"] == f"classifier:{complier}"
    judgments = [orjson.loads(x) for x in (out / "mock-model" / "judgments" / "exaggerated_safety.jsonl").read_bytes().splitlines()]
    assert {(j["judge"].split("/")[-1], j["raw"], j["label"]) for j in judgments} == {
        ("refuser", "LABEL_0", "refusal"),
        ("complier", "LABEL_1", "compliance"),
    }


def test_missing_classifier_is_a_clear_error(mock_server, data_root, tmp_path):
    srv = mock_server()
    p = run_cli("run", "--subtasks", "misuse", "--limit", "2", "--endpoint", srv.url, "--data-path", str(data_root),
                "--output", str(tmp_path), "--classifier-model", str(tmp_path / "no-model"))
    assert p.returncode == 2, p.stderr
    assert "cannot load classifier" in p.stderr and "--classifier-model" in p.stderr
    # the answers were generated and kept; only judging failed
    assert (tmp_path / "mock-model" / "responses" / "misuse.jsonl").read_bytes().count(b"\n") == 2
