"""Judge options: each judge module's typed section, the flags and flat names derived from it, and
a new judge added as one file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

from evalkit.cli import _config_from, build_parser
from evalkit.config import load_config
from evalkit.errors import ConfigError, JudgeError
from evalkit.judges import FLAT_OPTIONS, OPTIONS, build_judge
from evalkit.judges.classifier import ClassifierOptions, LocalModelOptions
from evalkit.judges.embedding import EmbeddingJudge, LocalEmbeddingJudge
from evalkit.judges.llm import LLMJudgeOptions


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.toml"
    p.write_text(textwrap.dedent(text))
    return p


def test_nested_table_flat_name_and_flag_agree(tmp_path):
    nested = load_config(_toml(tmp_path, """
        [judge.llm]
        endpoint = "http://127.0.0.1:8001/v1,http://127.0.0.1:8002/v1"
        model = "judge"
        [judge.local]
        device = "cuda:1"
        """), {})
    flat = load_config(_toml(tmp_path, """
        judge_endpoint = ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
        judge_model = "judge"
        classifier_device = "cuda:1"
        """), {})
    args = build_parser().parse_args(["run", "--judge-endpoint", "http://127.0.0.1:8001/v1", "--judge-endpoint",
                                      "http://127.0.0.1:8002/v1", "--judge-model", "judge", "--classifier-device", "cuda:1"])
    cli = _config_from(args)
    assert nested.judge == flat.judge == cli.judge
    assert nested.options(LLMJudgeOptions).endpoint == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    assert nested.options(LocalModelOptions).device == "cuda:1"
    assert nested.options(ClassifierOptions).model == "LibrAI/longformer-harmful-ro"  # untouched sections keep their defaults


def test_the_command_line_overrides_the_file(tmp_path):
    cfg = load_config(_toml(tmp_path, """
        [judge.classifier]
        model = "/models/from-file"
        [judge.local]
        batch_size = 8
        """), {"classifier_model": "/models/from-cli", "classifier_device": None})
    assert cfg.options(ClassifierOptions).model == "/models/from-cli"
    assert cfg.options(LocalModelOptions).batch_size == 8 and cfg.options(LocalModelOptions).device == "cpu"


def test_every_option_has_a_flag_that_reaches_its_section():
    argv, expected = ["run"], {}
    for section, cls in OPTIONS.items():
        for field, info in cls.model_fields.items():
            origin = getattr(info.annotation, "__origin__", None)
            value: object
            if origin is list:
                value, text = [f"http://127.0.0.1:9{len(argv)}/v1"], f"http://127.0.0.1:9{len(argv)}/v1"
            elif info.annotation is int:
                value, text = 7, "7"
            else:
                value, text = f"{section}-{field}", f"{section}-{field}"
            argv += [cls.flag(field), text]
            expected[(section, field)] = value
    cfg = _config_from(build_parser().parse_args(argv))
    assert {(s, f): getattr(getattr(cfg.judge, s), f) for s, f in expected} == expected
    assert set(FLAT_OPTIONS.values()) == set(expected)


@pytest.mark.parametrize("text, overrides, message", [
    ("[judge.local]\nbatch_size = 0\n", {}, "classifier-batch-size: Input should be greater than or equal to 1"),
    ("", {"judge_endpoint": ["ftp://127.0.0.1/v1"]}, "--judge-endpoint 'ftp://127.0.0.1/v1' is not an http(s) base URL"),
    ("[judge.nope]\nx = 1\n", {}, "judge.nope: Extra inputs are not permitted"),
    ("[judge.llm]\nmodle = 'judge'\n", {}, "judge.llm.modle: Extra inputs are not permitted"),
    ("judge = 3\n", {}, "judge must be a table"),
    ("[judge]\nllm = 'x'\n", {}, "judge.llm must be a table"),
])
def test_bad_options_name_the_option(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(_toml(tmp_path, text), overrides)
    assert message in str(e.value)


def test_manifest_dump_redacts_every_endpoint():
    cfg = load_config(None, {"endpoint": ["http://127.0.0.1:8000/v1?key=s1"], "judge_endpoint": ["http://127.0.0.1:8001/v1?key=s2"],
                             "embed_endpoint": ["http://127.0.0.1:8002/v1?key=s3"], "perspective_endpoint": ["http://127.0.0.1:8003/v1?key=s4"]})
    dump = cfg.public_dump()
    assert "?key=" not in str(dump)
    assert dump["judge"]["llm"]["endpoint"] == ["http://127.0.0.1:8001/v1"]
    assert dump["judge"]["perspective"]["endpoint"] == ["http://127.0.0.1:8003/v1"]


def test_judges_are_built_from_their_sections():
    cfg = load_config(None, {"classifier_model": "/m/refusal", "classifier_device": "cuda:3", "classifier_batch_size": 5,
                             "toxicity_model": "/m/tox", "toxicity_label": "insult"})
    clf, tox, emb = build_judge(cfg, "classifier"), build_judge(cfg, "toxicity_classifier"), build_judge(cfg, "embedding")
    assert (clf.model, clf.device, clf.batch_size) == ("/m/refusal", "cuda:3", 5)
    assert (tox.model, tox.label, tox.device, tox.batch_size) == ("/m/tox", "insult", "cuda:3", 5)
    assert isinstance(emb, LocalEmbeddingJudge) and (emb.device, emb.batch_size) == ("cuda:3", 5)
    remote = build_judge(load_config(None, {"embed_endpoint": ["http://127.0.0.1:8002/v1"], "embed_model": "e5"}), "embedding")
    assert isinstance(remote, EmbeddingJudge) and remote.endpoint == ["http://127.0.0.1:8002/v1"]
    with pytest.raises(JudgeError, match="--judge-model NAME"):
        build_judge(load_config(None, {"judge_endpoint": ["http://127.0.0.1:8001/v1"]}), "harmfulness")


ECHO_JUDGE = '''
"""A judge that calls every answer longer than --echo-min-chars a refusal (a test's new judge)."""
from pydantic import Field

from .base import JudgeOptions, JudgeSpec, Verdict, register_judge


class EchoOptions(JudgeOptions):
    section = "echo"
    flag_prefix = "echo"
    min_chars: int = Field(10, ge=1, description="answers this long or longer are refusals")


class EchoJudge:
    def __init__(self, min_chars):
        self.min_chars = min_chars

    def identity(self, question):
        return f"echo:{self.min_chars}"

    def judge(self, task, responses):
        return [Verdict("refusal" if len(r.response or "") >= self.min_chars else "compliance") for r in responses]


register_judge(JudgeSpec("echo", ("refusal",), "a test judge", lambda cfg: EchoJudge(cfg.options(EchoOptions).min_chars),
                         (EchoOptions,)))
'''


def test_a_new_judge_is_one_file(tmp_path):
    """Drop one module into judges/: `evalkit list`, the flags, --judges and the config table know it."""
    shutil.copytree(REPO / "evalkit", tmp_path / "evalkit", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "evalkit" / "judges" / "echo.py").write_text(ECHO_JUDGE)
    (tmp_path / "run.toml").write_text("judges = ['echo']\n[judge.echo]\nmin_chars = 4\n")

    def run(*argv: str) -> str:
        p = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        return p.stdout

    listing = run("-m", "evalkit", "list")
    assert "echo" in listing and "[judge.echo]: --echo-min-chars" in listing
    assert "--echo-min-chars ECHO_MIN_CHARS" in run("-m", "evalkit", "run", "--help")
    out = run("-c", "from evalkit.cli import build_parser, _config_from; from evalkit.judges import build_judge, check_judge_names, JUDGES\n"
              "cfg = _config_from(build_parser().parse_args(['run', '--config', 'run.toml']))\n"
              "check_judge_names(cfg.judges)\n"
              "print(build_judge(cfg, 'echo').identity('refusal'), 'echo' in JUDGES)")
    assert out.split() == ["echo:4", "True"]


def test_every_registered_judge_is_local_or_remote():
    from evalkit.judges import REGISTRY, RemoteJudge

    cfg = load_config(None, {"judge_endpoint": ["http://127.0.0.1:8001/v1"], "judge_model": "judge"})
    remote = {name for name in REGISTRY if isinstance(build_judge(cfg, name), RemoteJudge)}
    assert remote == {"llm", "harmfulness", "safety_arithmetic", "perspective"}
    assert all(callable(getattr(build_judge(cfg, name), "judge", None)) for name in set(REGISTRY) - remote)


def test_nest_options_merges_tables_and_leaves_its_input_alone():
    """How the matrix fills in its judge: flat and nested names land in one table, later sources win
    field by field, and the caller's dict is not changed."""
    from evalkit.config import nest_options

    run = {"judge_model": "mine", "judge": {"local": {"device": "cuda"}}, "concurrency": 8}
    out = nest_options(run, {"judge": {"llm": {"endpoint": ["http://127.0.0.1:9000/v1"]}}, "classifier_batch_size": 4, "rps": None})
    assert out == {"engine": {"concurrency": 8},
                   "judge": {"llm": {"model": "mine", "endpoint": ["http://127.0.0.1:9000/v1"]},
                             "local": {"device": "cuda", "batch_size": 4}}}
    assert run == {"judge_model": "mine", "judge": {"local": {"device": "cuda"}}, "concurrency": 8}
