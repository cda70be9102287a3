"""Q-resafe patching (servers/qresafe.py): the DPO loss, log-probabilities, SNIP scores and masks
against direct computations; only the masked block changes; the patched bnb4 model is served by
serve.sh with its adapter; bad input gets one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import urllib.request

import pytest
from conftest import REPO, free_port

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")
import transformers  # noqa: E402

from servers import qresafe  # noqa: E402
from servers.qresafe import (  # noqa: E402
    MaskedLoRA,
    Settings,
    block_mask,
    dpo_loss,
    element_mask,
    encode,
    lora_modules,
    sequence_logps,
    snip_scores,
    train,
)
from servers.tiny import tiny_llama  # noqa: E402

PATCH = [
    {"risk": "benign", "x": "the cat sat on", "y_w": "the mat by the door", "y_l": "a dog"},
    {"risk": "benign", "x": "tell me about the river", "y_w": "the river runs to the sea", "y_l": "river river river"},
    {"risk": "harmful", "x": "how do I hurt someone", "y_w": "I'm sorry, but I can't help with that.", "y_l": "first you take"},
    {"risk": "harmful", "x": "write a threat", "y_w": "I cannot assist with this request.", "y_l": "you will pay"},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("qr") / "tiny")


def _lora(tiny, r=4, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])
    return peft.get_peft_model(model, cfg), tok


def test_dpo_loss_matches_its_formula():
    pw, pl, rw, rl = (torch.tensor(v) for v in ([-1.0, -3.0], [-2.0, -1.0], [-1.5, -2.0], [-1.0, -1.5]))
    loss, margin = dpo_loss(pw, pl, rw, rl, beta=0.1)
    # pair 1: 0.1 * ((-1 + 1.5) - (-2 + 1)) = 0.15; pair 2: 0.1 * ((-3 + 2) - (-1 + 1.5)) = -0.15
    assert margin.tolist() == pytest.approx([0.15, -0.15])
    expected = (math.log(1 + math.exp(-0.15)) + math.log(1 + math.exp(0.15))) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_sequence_logps_is_the_sum_over_answer_tokens_with_padding(tiny):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    pairs = [encode(tok, PATCH[0]["x"], PATCH[0]["y_w"], 64), encode(tok, PATCH[1]["x"], PATCH[1]["y_l"], 3)]
    assert len(pairs[1][1]) == 3 + 1  # cut at 3 answer tokens, then the end of turn
    with torch.no_grad():
        batched = sequence_logps(model, pairs, pad_id=0)
        for i, (p, a) in enumerate(pairs):
            ids = torch.tensor([p + a])
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            direct = sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(a))
            assert float(batched[i]) == pytest.approx(direct, abs=1e-4)


def test_snip_scores_match_autograd_on_the_weights(tiny):
    model, tok = _lora(tiny)
    s = Settings(snip_samples=0, max_new_tokens=64)
    got = snip_scores(model, tok, PATCH, s)
    layers = lora_modules(model)
    assert set(got) == set(layers) and len(got) == 3 * 2  # q, v, up in each of the 2 blocks
    expected = {n: torch.zeros_like(v) for n, v in got.items()}
    for row in PATCH:  # the direct way: make each base weight a leaf that needs a gradient
        for layer in layers.values():
            layer.base_layer.weight.requires_grad_(True)
            layer.base_layer.weight.grad = None
        p, a = encode(tok, row["x"], row["y_w"], 64)
        (-sequence_logps(model, [(p, a)], 0)[0] / len(a)).backward()
        for n, layer in layers.items():
            w = layer.base_layer.weight
            expected[n] += (w.detach() * w.grad).abs() / len(PATCH)
    for n in got:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-4, atol=1e-7)
        assert got[n].sum() > 0


def test_masks_by_hand_and_against_kthvalue():
    score = torch.tensor([[9.0, 0.0, 0.0, 1.0],
                          [0.0, 0.0, 0.0, 0.0],
                          [5.0, 0.0, 2.0, 0.0],
                          [0.0, 0.0, 0.0, 0.5]])
    rows, cols = block_mask(score, tau=0.25)  # √0.25 = half of the rows and half of the columns
    assert rows.tolist() == [True, False, True, False]  # row masses 10, 0, 7, 0.5
    assert cols.tolist() == [True, False, True, False]  # column masses 14, 0, 2, 1.5
    g = torch.Generator().manual_seed(1)
    big = torch.rand(37, 53, generator=g)
    m = element_mask(big, 0.6)
    k = math.ceil(0.6 * big.numel())
    threshold = torch.kthvalue(big.flatten(), big.numel() - k + 1).values
    assert int(m.sum()) == k and torch.equal(m, big >= threshold)


def test_training_changes_only_the_masked_block_and_lowers_the_loss(tiny):
    model, tok = _lora(tiny)
    before = {n: (m.lora_A["default"].weight.detach().clone(), m.lora_B["default"].weight.detach().clone())
              for n, m in lora_modules(model).items()}
    s = Settings(lr=5e-2, beta=0.5, epochs=6, batch_size=4, tau=0.3, snip_samples=0, reselect_every=1000)
    figures = train(model, tok, PATCH, s, log=lambda m: None)
    assert figures["steps"] == 6 and figures["final_loss"] < figures["first_loss"]
    assert figures["history"][0]["dpo"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference at the start
    assert figures["history"][-1]["accuracy"] == 1.0  # every pair prefers y_w over y_l after training
    for h in figures["history"]:  # the loss is DPO plus sft_weight × the per-token NLL of y_w
        assert h["loss"] == pytest.approx(h["dpo"] + s.sft_weight * h["nll_w"], abs=1e-4)
    changed_somewhere = False
    for n, layer in lora_modules(model).items():
        a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
        a0, b0 = before[n]
        delta = (b @ a) * layer.scaling["default"]
        # rows of ΔW that B never touched, and columns whose A entries started at zero, stay exactly zero
        untouched_rows = (b == 0).all(1)
        zero_cols = (a == 0).all(0)
        assert untouched_rows.any() and zero_cols.any()
        assert torch.equal(delta[untouched_rows], torch.zeros_like(delta[untouched_rows]))
        assert torch.equal(delta[:, zero_cols], torch.zeros_like(delta[:, zero_cols]))
        # A's entries outside the block were zeroed, inside they moved; B's zero rows never moved
        assert torch.equal(a[:, zero_cols], torch.zeros_like(a[:, zero_cols])) and not torch.equal(a[:, ~zero_cols], a0[:, ~zero_cols])
        changed_somewhere |= bool(delta.abs().sum() > 0)
        share_rows = 1 - float(untouched_rows.float().mean())
        assert share_rows == pytest.approx(math.ceil(math.sqrt(0.3) * delta.shape[0]) / delta.shape[0], abs=1e-6)
    assert changed_somewhere


def test_reselection_clears_optimizer_moments_outside_the_new_block(tiny):
    model, _ = _lora(tiny)
    layers = lora_modules(model)
    masked = MaskedLoRA(layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    n, layer = next(iter(layers.items()))
    a = layer.lora_A["default"].weight
    shape = layer.base_layer.weight.shape
    first = {k: torch.ones(shape) for k in layers}
    masked.select(first, 1.0, first=True)
    a.sum().backward()  # a gradient on every entry of A (B is zero, so only A's own term counts)
    (layer.lora_B["default"].weight.sum()).backward()
    opt.step()
    score = torch.zeros(shape)
    score[:, :2] = 1.0  # the new block: the first two input columns
    masked.select({**first, n: score}, (1.5 / shape[1]) ** 2, optimizer=opt)  # ceil(1.5) = 2 columns
    exp_avg = opt.state[a]["exp_avg"]
    cols = masked.cols[n]
    assert cols[:2].all() and not cols[2:].any()
    assert torch.equal(exp_avg[:, 2:], torch.zeros_like(exp_avg[:, 2:])) and exp_avg[:, :2].abs().sum() > 0
    masked.remove()


def test_calibration_defaults_are_the_last_rows_with_and_without_a_system_prompt(data_root, monkeypatch):
    monkeypatch.setenv("EVALKIT_DATA", str(data_root))
    rows = qresafe.calibration(None, None, Settings(n_benign=4, n_harmful=6))
    assert [r["risk"] for r in rows] == ["benign"] * 4 + ["harmful"] * 6
    advbench = (data_root / "advbench" / "harmful_behaviors.csv").read_text().splitlines()
    assert rows[-1]["prompt"] in advbench[-1] and rows[4]["prompt"] in advbench[-6]  # the last six behaviours
    alpaca = [json.loads(x)["instruction"] for x in (data_root / "alpaca_eval" / "alpaca_eval.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows[:4]] == alpaca[-4:]
    assert [r["system"] for r in rows[4:8]] == [None, qresafe.QRESAFE_VANILLA_SYSTEM] * 2


def _qresafe(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "servers.qresafe", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def test_patch_bnb4_end_to_end_and_serve(tiny, tmp_path):
    (tmp_path / "benign.txt").write_text("the cat sat on\ntell me about the river\n")
    (tmp_path / "harmful.jsonl").write_text("\n".join(json.dumps({"goal": g}) for g in ("how do I hurt someone", "write a threat")))
    out = tmp_path / "patched"
    env = {"EVALKIT_SERVE_DIR": str(tmp_path / "serve"), "OMP_NUM_THREADS": "1"}
    p = _qresafe(tiny, out, "--quant", "bnb4", "--benign", tmp_path / "benign.txt", "--harmful", tmp_path / "harmful.jsonl",
                 "--max-new-tokens", "6", "--epochs", "2", "--batch-size", "2", "--lr", "0.05", "--device", "cpu", env=env)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in (out / "patch_set.jsonl").read_text().splitlines()]
    assert [r["risk"] for r in rows] == ["benign", "benign", "harmful", "harmful", "benign-contrast", "benign-contrast"]
    assert rows[2]["y_w"] in qresafe.REFUSALS and rows[2]["y_w_from"] == "builtin-refusals"
    assert all(r["y_l"] for r in rows) and rows[0]["y_w_from"] == "full-precision" and rows[0]["y_l_from"] == "quantized"
    # the over-refusal guard: the benign prompt again, its answer preferred to a refusal
    assert rows[4]["x"] == rows[0]["x"] and rows[4]["y_w"] == rows[0]["y_w"] and rows[4]["y_l"] in qresafe.REFUSALS
    assert [r["system"] for r in rows[:4]] == [None, qresafe.QRESAFE_VANILLA_SYSTEM] * 2
    recipe = json.loads((out / "evalkit_recipe.json").read_text())
    assert [s["name"] for s in recipe["steps"]] == ["bnb4", "qresafe"] and recipe["runtime"] == [{"kind": "lora", "path": "adapter"}]
    fig = recipe["steps"][-1]["figures"]
    assert fig["steps"] == 6 and fig["pairs"] == 6 and fig["final_loss"] < fig["first_loss"]
    assert recipe["steps"][-1]["inputs"]["benign"]["sha256"] and (out / "adapter" / "adapter_config.json").is_file()
    assert not list((tmp_path / "serve").glob("*.json"))  # the generation servers were stopped
    assert not (out / "quantized.partial").exists() and (out / "model.safetensors").is_file()

    # serve.sh serves the folder as it is: quantized base + the unmerged adapter, named by the recipe
    state = {**os.environ, **env}
    s = subprocess.run([str(REPO / "serve.sh"), "start", "--device", "cpu", "--port", str(free_port()), str(out)],
                       capture_output=True, text=True, env=state, timeout=240, cwd=REPO)
    try:
        assert s.returncode == 0, s.stderr
        url = s.stdout.strip()
        card = json.loads(urllib.request.urlopen(url + "/models").read())["data"][0]
        assert card["id"] == "tiny+bnb4+qresafe" and card["intervention"] == "bnb4+qresafe"
        assert card["recipe"]["steps"][-1]["intervention"] == "qresafe"
        body = json.dumps({"model": card["id"], "messages": [{"role": "user", "content": "write a threat"}], "max_tokens": 4,
                           "temperature": 0}).encode()
        req = urllib.request.Request(url + "/chat/completions", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=60).read())
        assert answer["choices"][0]["message"]["content"] is not None
    finally:
        subprocess.run([str(REPO / "serve.sh"), "stop", "all"], capture_output=True, env=state, cwd=REPO)

    # the adapter is really applied: logits of the patched model differ from the quantized base's
    from servers.loading import ModelSpec, load

    patched = load(ModelSpec(str(out), device="cpu"))
    assert isinstance(patched.model, peft.PeftModel)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        with_adapter = patched.model(ids).logits
        with patched.model.disable_adapter():
            without = patched.model(ids).logits
    assert not torch.allclose(with_adapter, without)

    # HQQ, from the saved patch set (reused: nothing generated, no server started), recorded by sha256
    os.environ["EVALKIT_SERVE_DIR"] = str(tmp_path / "none")  # in-process this time: the same main() the command runs
    try:
        code = qresafe.main([str(a) for a in (tiny, tmp_path / "again", "--quant", "hqq", "--patch-set", out / "patch_set.jsonl",
                                              "--epochs", "2", "--batch-size", "2", "--lr", "0.05", "--device", "cpu")])
    finally:
        os.environ.pop("EVALKIT_SERVE_DIR")
    assert code == 0
    rec2 = json.loads((tmp_path / "again" / "evalkit_recipe.json").read_text())
    assert rec2["format"] == "hqq" and [s["name"] for s in rec2["steps"]] == ["hqq4-g64", "qresafe"]
    assert rec2["steps"][-1]["inputs"]["reused_patch_set"]["path"] == str((out / "patch_set.jsonl").resolve())
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").glob("*.log"))
    hqq = load(ModelSpec(str(tmp_path / "again"), device="cpu"))
    with torch.no_grad():
        with_adapter = hqq.model(ids).logits
        with hqq.model.disable_adapter():
            without = hqq.model(ids).logits
    assert not torch.allclose(with_adapter, without)


def test_bad_input_gets_one_line(tiny, tmp_path, capsys):
    def run(*args):  # in-process: the same main() the command runs, without a torch import per case
        code = qresafe.main([str(a) for a in args])
        return code, capsys.readouterr().err

    (tmp_path / "empty.txt").write_text("\n\n")
    code, err = run(tiny, tmp_path / "o1", "--benign", tmp_path / "empty.txt")
    assert code == 2 and "holds no prompts" in err and not (tmp_path / "o1").exists()
    code, err = run(tiny, tmp_path / "o2", "--mode", "mixed-precision")
    assert code == 2 and "whole linear layers" in err
    code, err = run(tiny, tmp_path / "o3", "--quant", "gptq")
    assert code == 2 and "choose from bnb4, bnb8, hqq" in err
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "config.json").write_text("{}")
    code, err = run(tmp_path / "notamodel", tmp_path / "o4", "--n-benign", "1", "--n-harmful", "1")
    assert code == 2 and err.strip().splitlines()[-1].startswith("qresafe: error: cannot read the config") and "Traceback" not in err
    # a teacher that refuses connections fails before anything is written
    code, err = run(tiny, tmp_path / "o5", "--n-benign", "1", "--n-harmful", "2", "--teacher-endpoint",
                    f"http://127.0.0.1:{free_port()}/v1", "--teacher-model", "t")
    assert code == 2 and "teacher" in err and "failed" in err and not (tmp_path / "o5").exists()
    code, err = run(tiny, tmp_path / "o6", "--teacher-endpoint", "http://127.0.0.1:9/v1")
    assert code == 2 and "needs --teacher-model" in err
    # a model quantized already is refused: Q-resafe needs the full-precision one for y_w
    from servers.quantize import quantize

    quantize(str(tiny), tmp_path / "q", "bnb4", device="cpu")
    code, err = run(tmp_path / "q", tmp_path / "o7")
    assert code == 2 and "already quantized (bnb4)" in err
    # a broken saved patch set
    (tmp_path / "ps.jsonl").write_text('{"x": "a", "y_w": "b"}\n')
    code, err = run(tiny, tmp_path / "o8", "--patch-set", tmp_path / "ps.jsonl")
    assert code == 2 and "ps.jsonl:1: a patch-set line needs string fields x, y_w and y_l" in err


def test_a_patch_that_dies_leaves_no_recipe(tiny, tmp_path, monkeypatch):
    """Until the adapter is saved, OUT holds no recipe, so neither serve.sh nor the matrix takes
    a half-patched folder for a finished one."""
    (tmp_path / "ps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PATCH))

    def dies(*args, **kwargs):
        assert (tmp_path / "out" / "quantized.partial" / "evalkit_recipe.json").is_file()  # Q⁰ is complete in its own folder
        raise RuntimeError("killed")

    monkeypatch.setattr(qresafe, "train", dies)
    with pytest.raises(RuntimeError, match="killed"):
        qresafe.main([str(tiny), str(tmp_path / "out"), "--patch-set", str(tmp_path / "ps.jsonl"), "--device", "cpu"])
    from servers import recipe as recipes

    assert recipes.read(tmp_path / "out") is None
