"""The recipe contract (servers/recipe.py) and the torch-free server spec (servers/spec.py): steps
chain across folders, the served id names the chain, old marker files still read, a broken
recipe gets one line; every layer's flags come from one spec."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from servers import recipe as recipes
from servers.spec import ALL_FIELDS, HF_FIELDS, ServeSpec, add_arguments, argv, from_namespace


def test_spec_flags_round_trip_through_every_layer():
    spec = ServeSpec(model="m", quant="hqq", hqq_bits=3, device="cpu", gpus=2, max_model_len=512, trust_remote_code=True)
    p = argparse.ArgumentParser()
    p.add_argument("model")
    add_arguments(p)
    assert from_namespace(p.parse_args(["m", *argv(spec)])) == spec
    assert argv(ServeSpec(model="m")) == []  # defaults are left to the next layer, which has the same ones
    assert "--backend" not in argv(ServeSpec(backend="vllm", quant="awq"), HF_FIELDS)
    # the HF server, the manager and the matrix all take exactly these options
    from evalkit.matrix import Server
    from servers.hf_server import build_parser as hf_parser
    from servers.manage import build_parser as manage_parser

    hf_flags = {a.dest for a in hf_parser()._actions}
    start = next(a for a in manage_parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("start"))
    assert set(HF_FIELDS) <= hf_flags and set(ALL_FIELDS) <= {a.dest for a in start._actions}
    assert set(ServeSpec.model_fields) <= set(Server.model_fields)


def _write_recipe(folder, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "x").write_text("weights")
    step = {"intervention": "compress", "name": "magnitude-2:4", "options": {"method": "magnitude"}}
    return recipes.write(folder, "base-model", {"model_id": "Base-abc123"}, step, **extra)


def test_steps_chain_and_the_served_id_names_them(tmp_path):
    first = _write_recipe(tmp_path / "pruned")
    assert first["base"] == {"model": "base-model", "source": {"model_id": "Base-abc123"}} and first["steps"][0]["finished"]
    (tmp_path / "q").mkdir()
    second = recipes.write(tmp_path / "q", str(tmp_path / "pruned"), None, {"intervention": "quantize", "name": "bnb4"})
    assert second["base"] == first["base"] and [s["name"] for s in second["steps"]] == ["magnitude-2:4", "bnb4"]
    assert second["steps"][1]["input"] == str((tmp_path / "pruned").resolve())
    assert recipes.served_id(str(tmp_path / "q")) == "Base-abc123+magnitude-2:4+bnb4"
    third = recipes.append(tmp_path / "q", {"intervention": "qresafe", "name": "qresafe"}, runtime=[{"kind": "lora", "path": "adapter"}])
    assert recipes.read(tmp_path / "q") == third and third["runtime"] == [{"kind": "lora", "path": "adapter"}]
    assert recipes.chain_name(third) == "magnitude-2:4+bnb4+qresafe"
    assert recipes.served_id("hub/model") == "hub/model" and recipes.served_id("x", "Stem-123") == "Stem-123"
    (tmp_path / "r").mkdir()  # a step done in a new folder onto another's recipe
    fourth = recipes.append(tmp_path / "r", {"intervention": "qresafe", "name": "qresafe"}, onto=second)
    assert recipes.chain_name(fourth) == "magnitude-2:4+bnb4+qresafe" and recipes.read(tmp_path / "r") == fourth


def test_input_files_carry_their_sha256(tmp_path):
    f = tmp_path / "calib.txt"
    f.write_bytes(b"abc")
    assert recipes.input_file(f) == {"path": str(f.resolve()), "bytes": 3,
                                     "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}


def test_legacy_markers_read_as_one_step(tmp_path):
    (tmp_path / "evalkit_quantize.json").write_text(json.dumps({"source": "tiny", "quant": "hqq", "format": "hqq"}))
    r = recipes.read(tmp_path)
    assert r["format"] == "hqq" and r["steps"][0]["intervention"] == "quantize" and recipes.served_id(str(tmp_path)) == "tiny+hqq"


def test_a_broken_recipe_gets_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "evalkit_recipe.json").write_text("{not json")
    with pytest.raises(recipes.RecipeError, match="not finished; prepare it again"):
        recipes.read(tmp_path / "m")
    (tmp_path / "m" / "evalkit_recipe.json").write_text(json.dumps({"steps": [], "runtime": [{"kind": "steer"}]}))
    with pytest.raises(recipes.RecipeError, match="runtime intervention 'steer' is not known"):
        recipes.read(tmp_path / "m")
    p = subprocess.run([sys.executable, "-m", "servers.manage", "start", str(tmp_path / "m")], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "EVALKIT_SERVE_DIR": str(tmp_path / "s")})
    assert p.returncode == 2 and "not known to this evalkit" in p.stderr and "Traceback" not in p.stderr
