"""`evalkit matrix`: a dense tiny Llama, a pruned variant prepared on the spot and a hosted
(mock) endpoint, each evaluated in turn, then one comparison report."""

from __future__ import annotations

import os

import orjson
import pytest
from conftest import run_cli

pytest.importorskip("torch")

from servers.tiny import CORPUS, tiny_llama


def test_matrix_prepares_serves_evaluates_and_compares(mock_server, data_root, tmp_path):
    tiny_llama(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(" ".join(CORPUS * 20))
    hosted = mock_server(script={"default": "I'm sorry, I cannot help with that."})
    judge = mock_server("--model", "judge-model", script={"default": "Rating: [[6]]"})
    (tmp_path / "m.toml").write_text(f'''
output = "out"
models_dir = "models"
parallel = 2
[judge]
endpoint = ["{judge.url}"]
model_id = "judge-model"
[run]
subtasks = ["advbench", "xstest", "mt_bench"]
limit = 4
max_tokens = 8
data_path = "{data_root}"
progress = false
[[variant]]
name = "dense"
model = "tiny"
device = "cpu"
[[variant]]
name = "wanda-2of4"
prune = {{ base = "tiny", method = "wanda", sparsity = "2:4", calibration = "calib.txt", nsamples = 4, seqlen = 32 }}
device = "cpu"
[[variant]]
name = "hqq-saved"
model = "tiny"
quant = "hqq"
save_quantized = true
device = "cpu"
[[variant]]
name = "hosted"
endpoint = ["{hosted.url}"]
model_id = "mock-model"
''')
    env = {"EVALKIT_SERVE_DIR": str(tmp_path / "serve")}
    p = run_cli("matrix", str(tmp_path / "m.toml"), "--dry-run", env=env)
    assert p.returncode == 0 and "hosted: endpoint" in p.stdout
    assert "wanda-2of4: serve" in p.stdout and "-> compress --method wanda --sparsity 2:4" in p.stdout
    threads = max(1, (os.cpu_count() or 1) // 2)  # two variants at once, each on half the cores
    assert f"2 variants at a time, on: OMP_NUM_THREADS={threads}, MKL_NUM_THREADS={threads}; " in p.stdout
    p = run_cli("matrix", str(tmp_path / "m.toml"), env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    out = tmp_path / "out"
    for name in ("dense", "wanda-2of4", "hqq-saved", "hosted"):
        res = orjson.loads((out / name / "results.json").read_bytes())
        assert res["run_name"] == name and set(res["subtasks"]) == {"advbench", "xstest", "mt_bench"}
        mt = next(m for m in res["subtasks"]["mt_bench"]["metrics"] if m["name"] == "score")
        assert mt["value"] == 6.0 and mt["n"] == 8 and mt["judge"] == "llm:judge-model:mt_bench_single"  # 4 questions x 2 turns
    hosted_res = orjson.loads((out / "hosted" / "results.json").read_bytes())
    asr = next(m for m in hosted_res["subtasks"]["advbench"]["metrics"] if m["name"] == "asr")
    assert asr["value"] == 0.0 and hosted_res["model"] == "mock-model"  # every hosted answer is a refusal
    (pruned,) = (tmp_path / "models").glob("compress-*/evalkit_recipe.json")
    assert orjson.loads(pruned.read_bytes())["steps"][0]["name"] == "wanda-2:4"
    md = (out / "report" / "comparison.md").read_text()
    assert "dense" in md and "wanda-2of4" in md and "hosted" in md and (out / "report" / "safety.png").is_file()
    assert "| utility | mt_bench | score" in md and (out / "report" / "utility.png").is_file()
    assert judge.stats()["requests"] == 4 * 8
    (saved,) = (tmp_path / "models").glob("quantize-*/evalkit_recipe.json")
    saved = orjson.loads(saved.read_bytes())
    assert saved["steps"][0]["options"]["quant"] == "hqq" and saved["format"] == "hqq"
    assert not list((tmp_path / "serve").glob("*.json"))  # every server was stopped
    # a second run reuses the pruned checkpoint and resumes: the hosted endpoint sees no new request
    before = hosted.stats()["requests"]
    p = run_cli("matrix", str(tmp_path / "m.toml"), "--only", "wanda-2of4,hqq-saved,hosted", env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count("exists; reusing it") == 2 and hosted.stats()["requests"] == before


def test_parallel_variants_share_the_judge_and_one_failure_stops_only_itself(mock_server, data_root, tmp_path):
    a = mock_server("--latency", "0.05", script={"default": "Sure, here is how."})
    b = mock_server("--latency", "0.05", script={"default": "I'm sorry, I cannot help with that."})
    judge = mock_server("--model", "judge-model", script={"default": "no"})
    (tmp_path / "m.toml").write_text(f'''
output = "out"
parallel = 2
baseline = "b"
[judge]
endpoint = ["{judge.url}"]
model_id = "judge-model"
[run]
subtasks = ["advbench"]
judges = ["keyword", "llm"]
limit = 30
concurrency = 2
data_path = "{data_root}"
[[variant]]
name = "a"
endpoint = ["{a.url}"]
model_id = "mock-model"
[[variant]]
name = "dead"
endpoint = ["http://127.0.0.1:9/v1"]
model_id = "mock-model"
[[variant]]
name = "b"
endpoint = ["{b.url}"]
model_id = "mock-model"
''')
    p = run_cli("matrix", str(tmp_path / "m.toml"), "--list")
    assert p.returncode == 0 and p.stdout.split() == ["a", "dead", "b"]
    p = run_cli("matrix", str(tmp_path / "m.toml"), timeout=300)
    assert p.returncode == 1 and "dead: failed" in p.stderr and "1 variant(s) failed: dead" in p.stderr
    # a and b ran at the same time: each server's requests began before the other's ended
    la, lb = [t for t, *_ in a.log()], [t for t, *_ in b.log()]
    assert len(la) == len(lb) == 30 and max(min(la), min(lb)) < min(max(la), max(lb))
    assert judge.stats()["requests"] == 60  # one judge for both
    md = (tmp_path / "out" / "report" / "comparison.md").read_text()
    assert md.splitlines()[0].endswith("| b | a |")  # the baseline first; the failed variant is no column of empty numbers
    # paired against the baseline b (refuses everything): a's ASR is 1.0 higher on the 30 shared items
    assert "Paired comparison with b" in md and "| advbench | asr | keyword:gcg29 | a | 30 | +1.0000 |" in md
    assert "a | 30 |" in md and "view.html" in p.stdout and (tmp_path / "out" / "report" / "view.html").stat().st_size > 0
    assert "- dead: FAILED (" in md and "127.0.0.1:9" in md
    assert not (tmp_path / "out" / "dead" / "results.json").exists()
    # one variant per cluster job, no report each; `evalkit compare` merges them
    p = run_cli("matrix", str(tmp_path / "m.toml"), "--only", "b", "--no-report")
    assert p.returncode == 0 and "comparison.md" not in p.stdout, p.stderr


def test_steps_chain_and_each_is_prepared_once(tmp_path, capsys):
    """prune -> quantize as a list of steps; a second variant sharing the prune step reuses its folder,
    and an interrupted step (a folder without a recipe) is prepared again."""
    from evalkit.matrix import load_matrix, prepare, step_folder

    tiny_llama(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text(" ".join(CORPUS * 20))
    (tmp_path / "m.toml").write_text('''
models_dir = "models"
[[variant]]
name = "wanda"
prune = { base = "tiny", method = "wanda", sparsity = "2:4", calibration = "calib.txt", nsamples = 4, seqlen = 32 }
device = "cpu"
[[variant]]
name = "wanda-bnb8"
model = "tiny"
steps = [{ run = "compress", method = "wanda", sparsity = "2:4", calibration = "calib.txt", nsamples = 4, seqlen = 32 },
         { run = "quantize", quant = "bnb8" }]
device = "cpu"
''')
    m = load_matrix(tmp_path / "m.toml")
    pruned = prepare(m.variant[0], m.models_dir)
    interrupted = step_folder(m.models_dir, pruned, m.variant[1].steps[1], "cpu")
    interrupted.mkdir()
    (interrupted / "config.json").write_text("{half")
    chained = prepare(m.variant[1], m.models_dir)
    err = capsys.readouterr().err
    assert "wanda-bnb8: compress step" in err and "exists; reusing it" in err and "was not finished" in err
    assert chained == str(interrupted)
    assert len(list((tmp_path / "models").glob("compress-*"))) == 1
    recipe = orjson.loads((tmp_path / chained / "evalkit_recipe.json").read_bytes())
    assert [st["name"] for st in recipe["steps"]] == ["wanda-2:4", "bnb8"] and recipe["steps"][1]["input"] == pruned
    assert recipe["base"]["model"] == str(tmp_path / "tiny")
    assert prepare(m.variant[1], m.models_dir) == chained  # nothing prepared again


@pytest.mark.parametrize("body,msg", [
    ('[[variant]]\nname = "a"\nmodel = "x"\nendpoint = ["http://h/v1"]\nmodel_id = "m"\n', "exactly one of model"),
    ('[[variant]]\nname = "a"\nendpoint = ["http://h/v1"]\n', "needs model_id"),
    ('[[variant]]\nname = "a"\nmodel = "x"\nquantize = "bnb4"\n', "variant.0.quantize"),
    ('[run]\nmodel = "x"\n[[variant]]\nname = "a"\nmodel = "x"\n', "[run] must not set 'model'"),
    ('[[variant]]\nname = "a"\nmodel = "x"\n[[variant]]\nname = "a"\nmodel = "y"\n', "repeated: a"),
    ('[[variant]]\nname = "a"\nmodel = "x"\nsave_quantized = true\n', "save_quantized needs model and a quant"),
    ('[judge]\nendpoint = ["http://h/v1"]\n[[variant]]\nname = "a"\nmodel = "x"\n', "an endpoint judge needs model_id"),
    ('baseline = "b"\n[[variant]]\nname = "a"\nmodel = "x"\n', "baseline = 'b' names no variant (variants: a)"),
])
def test_matrix_file_errors_name_the_problem(tmp_path, body, msg):
    (tmp_path / "m.toml").write_text(body)
    p = run_cli("matrix", str(tmp_path / "m.toml"))
    assert p.returncode == 2 and msg in p.stderr, p.stderr
