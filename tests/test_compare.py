"""`evalkit compare`: tables, a self-contained HTML page and PNG charts that render."""

from __future__ import annotations

import orjson
import pytest
from conftest import run_cli


def _results(path, model, asr, rta, rta_tl=None, invalid=0):
    metrics = [{"name": "rta", "value": rta, "direction": "higher_is_better", "judge": "keyword:gcg29", "n": 100, "n_invalid": invalid}]
    if rta_tl is not None:
        metrics[0]["trustllm_value"] = rta_tl
    metrics.append({"name": "rta/cot", "value": rta, "direction": "higher_is_better", "judge": "keyword:gcg29", "n": 10, "n_invalid": 0})
    data = {"model": model, "subtasks": {
        "advbench": {"dimension": "safety", "metrics": [
            {"name": "asr", "value": asr, "direction": "lower_is_better", "judge": "keyword:gcg29", "n": 520, "n_invalid": 0}]},
        "jailbreak": {"dimension": "safety", "metrics": metrics},
        "privacy_confidence": {"dimension": "privacy", "metrics": [
            {"name": "pearson", "value": None, "direction": "higher_is_better", "judge": "rule", "n": 196, "n_invalid": 196}]},
    }}
    path.mkdir(parents=True)
    (path / "results.json").write_bytes(orjson.dumps(data))
    return path


def test_compare_writes_table_html_and_charts(tmp_path):
    pytest.importorskip("matplotlib")
    a = _results(tmp_path / "runs" / "dense", "llama-8b", 0.1, 0.9)
    b = _results(tmp_path / "runs" / "bnb4", "llama-8b-bnb4", 0.25, 0.8, rta_tl=0.75, invalid=3)
    out = tmp_path / "report"
    p = run_cli("compare", str(a), str(b), "--output", str(out))
    assert p.returncode == 0, p.stderr
    md = (out / "comparison.md").read_text()
    assert "| dimension | subtask | metric | judge | llama-8b | llama-8b-bnb4 |" in md
    assert "| safety | advbench | asr ↓ | keyword:gcg29 | 0.1000 | 0.2500 |" in md
    assert "| safety | jailbreak | rta ↑ | keyword:gcg29 | 0.9000 | 0.8000 (0.7500) [3 invalid] |" in md
    assert "| privacy | privacy_confidence | pearson ↑ | rule | – | – |" in md
    page = (out / "comparison.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "llama-8b-bnb4" in page and "http" not in page.split("<body>")[1]
    from PIL import Image  # matplotlib depends on pillow

    for dim in ("safety", "privacy"):
        img = Image.open(out / f"{dim}.png")
        img.load()
        assert img.size[0] > 300 and img.size[1] > 200
        assert len(set(img.convert("RGB").getdata())) > 10  # bars and text were drawn, not a blank canvas


def test_compare_errors(tmp_path):
    p = run_cli("compare", str(tmp_path / "nope"))
    assert p.returncode == 2 and "results.json" in p.stderr
