"""servers/quantize.py: bitsandbytes 4/8-bit and HQQ checkpoints quantized once, saved, and loaded
back (as our HF server loads them) to the very logits of quantizing at load time."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytest.importorskip("hqq")

from servers.loading import LoadError, ModelSpec, load  # noqa: E402
from servers.quantize import quantize  # noqa: E402
from servers.tiny import tiny_llama  # noqa: E402

IDS = [[1, 5, 9, 13, 20, 7, 3]]


def _logits(loaded):
    with torch.no_grad():
        return loaded.model(torch.tensor(IDS, device=loaded.device)).logits.float().cpu()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("q") / "tiny")


@pytest.mark.parametrize("quant", ["bnb4", "bnb8", "hqq"])
def test_saved_quantized_checkpoint_reloads_identically(tiny, tmp_path, quant):
    on_the_fly = _logits(load(ModelSpec(str(tiny), device="cpu", quant=quant)))
    recipe = quantize(str(tiny), tmp_path / quant, quant, device="cpu")
    assert orjson.loads((tmp_path / quant / "evalkit_recipe.json").read_bytes()) == recipe
    (step,) = recipe["steps"]
    assert recipe["base"] == {"model": str(tiny)} and step["options"]["quant"] == quant and step["figures"]["bytes"] > 0
    assert recipe["format"] == ("hqq" if quant == "hqq" else "transformers")
    reloaded = load(ModelSpec(str(tmp_path / quant), device="cpu"))  # no --quant: the checkpoint says it
    assert torch.equal(_logits(reloaded), on_the_fly)
    dense = _logits(load(ModelSpec(str(tiny), device="cpu")))
    assert not torch.equal(dense, on_the_fly)  # it really is quantized
    with pytest.raises(LoadError, match="already quantized"):
        load(ModelSpec(str(tmp_path / quant), device="cpu", quant="bnb4"))


def test_quantize_errors_name_the_fix(tiny, tmp_path):
    p = subprocess.run([sys.executable, "-m", "servers.quantize", str(tiny), str(tmp_path / "g"), "--quant", "gptq"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "on a GPU" in p.stderr and "serve it as it is" in p.stderr and not (tmp_path / "g").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(LoadError, match="not empty"):
        quantize(str(tiny), tmp_path / "full", "bnb4", device="cpu")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(LoadError, match="choose from"):
        quantize(str(tiny), tmp_path / "n", "int3", device="cpu")
