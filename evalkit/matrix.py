"""The model matrix: evaluate a dense model and its compressed variants (or hosted endpoints) with
one command, then compare them.

    evalkit matrix examples/cpu_matrix.toml [--only dense,bnb4] [--dry-run]

For each variant, in file order (up to `parallel` at once): prepare it if needed (its `steps`, each an offline intervention
`python -m servers.<run> INPUT OUT [options]`, or `servers.safety_arithmetic <run>` for hdr, icv
and finetune, written once under `models_dir` and reused by every
variant that shares the same chain up to it), start its server through serve.sh's manager (HF or
vLLM backend, any --quant), run generate -> judge -> score into `<output>/<variant name>/`, stop
the server, and go on. A `[judge]` server is started once and stays up across variants (all
parallel variants share it). At the end `evalkit compare` writes `<output>/report/` (Markdown,
HTML, PNG per dimension) and `evalkit view` its `view.html`. On a cluster, one variant per job: `--only NAME --no-report` in each
(`--list` prints the names), then `evalkit compare <output>/*/ --output <output>/report` (README).

File layout (TOML):

    output = "runs/matrix"          # run folders and the report
    models_dir = "models/matrix"    # where prepared variants are written
    parallel = 1                    # variants run at once, each on its own GPUs (or share of CPU cores)
    baseline = "dense"              # the report's paired comparisons are against it [the first variant]
    [run]                           # any `evalkit run` option (config-file names)
    subtasks = ["advbench", "xstest"]
    limit = 50
    [judge]                         # optional: a judge server kept up across variants
    model = "models/judge"          # (or endpoint = "https://api.openai.com/v1", model_id = "gpt-4-0613",
                                    #  api_key_env = "OPENAI_API_KEY": a running judge, nothing started)
    [[variant]]
    name = "dense"
    model = "models/tiny-llama"     # checkpoint folder, hub id, GGUF file or smollm2-135m, served by serve.sh
    [[variant]]
    name = "bnb4"
    model = "models/tiny-llama"
    quant = "bnb4"
    [[variant]]
    name = "hqq4-saved"
    model = "models/tiny-llama"
    quant = "hqq"
    save_quantized = true           # quantized once into models_dir, then served from there
    [[variant]]
    name = "wanda-2of4"
    prune = { base = "models/tiny-llama", method = "wanda", sparsity = "2:4" }   # = model + one compress step
    [[variant]]
    name = "wanda-bnb4-qresafe"                 # steps compose: prune, then quantize and patch
    model = "models/tiny-llama"
    steps = [{ run = "compress", method = "wanda", sparsity = "2:4" }, { run = "qresafe", quant = "bnb4" }]
    [[variant]]
    name = "hdr-icv"                            # Safety Arithmetic: HDR, then a safety vector on top
    model = "models/sft"
    steps = [{ run = "hdr", harm_model = "models/harm", base = "models/aligned", lam = 3 },
             { run = "icv", pairs = "data/icv_pairs.jsonl", alpha = 0.12 }]
    [[variant]]
    name = "hosted"
    endpoint = "https://api.example.com/v1"   # nothing is started
    model_id = "their-model"
    api_key_env = "EXAMPLE_API_KEY"
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from servers.spec import ServeSpec, argv

from .config import ConfigError, load_config, nest_options, read_toml

REPO = Path(__file__).resolve().parents[1]


class Prune(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base: str
    method: Literal["magnitude", "wanda", "sparsegpt"]
    sparsity: str
    calibration: Path | None = None
    nsamples: int = 128
    seqlen: int = 2048


class Server(ServeSpec):
    """What serve.sh starts: servers/spec.py's options (model, backend, quant, device, gpus, ...),
    plus flags handed to `serve.sh start` unchanged."""

    serve_args: list[str] = Field(default_factory=list, description="more `serve.sh start` options (before the model)")
    backend_args: list[str] = Field(default_factory=list, description="flags for the backend itself (after `--`), "
                                                                       "e.g. [\"--max-batch-size\", \"128\"]")


PATH_OPTIONS = ("calibration", "benign", "harmful", "patch_set", "harm_model", "harm_data", "base", "pairs", "data")
# offline interventions: `python -m <module> [command] INPUT OUT [options]`
INTERVENTIONS = {"compress": ["servers.compress"], "quantize": ["servers.quantize"], "qresafe": ["servers.qresafe"],
                 "hdr": ["servers.safety_arithmetic", "hdr"], "icv": ["servers.safety_arithmetic", "icv"],
                 "finetune": ["servers.safety_arithmetic", "finetune"]}


class Step(BaseModel):
    """One offline intervention; every other key is one of its options (`sparsity = "2:4"` ->
    `--sparsity 2:4`, `x = true` -> `--x`)."""

    model_config = ConfigDict(extra="allow")

    run: Literal["compress", "quantize", "qresafe", "hdr", "icv", "finetune"]

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def argv(self) -> list[str]:
        out: list[str] = []
        for key, value in self.options().items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                out.append(flag)
            elif value not in (False, None):
                out += [flag, str(value)]
        return out

    @property
    def quantizes(self) -> bool:
        return self.run in ("quantize", "qresafe")


class Variant(Server):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    steps: list[Step] = Field(default_factory=list, description="offline interventions applied to model in order")
    prune: Prune | None = Field(None, description="shorthand: model = base, steps = [compress]")
    save_quantized: bool = Field(False, description="shorthand: steps = [quantize with this quant], served with quant none")
    endpoint: list[str] = Field(default_factory=list)
    model_id: str | None = None
    api_key_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Variant:
        sources = [bool(self.model), self.prune is not None, bool(self.endpoint)]
        if sum(sources) != 1:
            raise ValueError(f"variant {self.name!r}: give exactly one of model (a checkpoint to serve), prune (a recipe) "
                             "or endpoint (a running server)")
        if self.endpoint and not self.model_id:
            raise ValueError(f"variant {self.name!r}: an endpoint variant needs model_id (the id that endpoint serves)")
        if self.save_quantized and (self.quant == "none" or not self.model):
            raise ValueError(f"variant {self.name!r}: save_quantized needs model and a quant (bnb4, bnb4-fp4, bnb8, hqq)")
        if self.prune is not None:  # the shorthands become steps: one mechanism from here on
            p = self.prune
            self.model, self.prune = p.base, None
            self.steps = [Step(run="compress", method=p.method, sparsity=p.sparsity, nsamples=p.nsamples, seqlen=p.seqlen,
                               **({"calibration": str(p.calibration)} if p.calibration is not None else {})), *self.steps]
        if self.save_quantized:
            step = {"quant": self.quant, **({"hqq_bits": self.hqq_bits, "hqq_group_size": self.hqq_group_size} if self.quant == "hqq" else {})}
            self.steps, self.save_quantized, self.quant = [*self.steps, Step(run="quantize", **step)], False, "none"
        if any(st.quantizes for st in self.steps) and self.quant != "none":
            raise ValueError(f"variant {self.name!r}: its steps quantize the model already; serve it with quant = \"none\"")
        return self


class Judge(Server):
    """The judge for every variant: a checkpoint served once for the whole matrix, or a running
    endpoint (a hosted API such as GPT-4 for the published numbers; nothing is started)."""

    endpoint: list[str] = Field(default_factory=list)
    model_id: str | None = None
    api_key_env: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Judge:
        if bool(self.model) == bool(self.endpoint):
            raise ValueError("[judge]: give exactly one of model (a checkpoint to serve) or endpoint (a running server)")
        if self.endpoint and not self.model_id:
            raise ValueError("[judge]: an endpoint judge needs model_id (the id that endpoint serves)")
        return self


class Matrix(BaseModel):
    model_config = ConfigDict(extra="forbid")

    output: Path = Path("runs/matrix")
    models_dir: Path = Path("models/matrix")
    parallel: int = Field(1, ge=1, description="variants evaluated at once")
    baseline: str | None = Field(None, description="the variant the report's paired comparisons are against [the first]")
    run: dict[str, Any] = Field(default_factory=dict)
    judge: Judge | None = None
    variant: list[Variant]

    @model_validator(mode="after")
    def _unique(self) -> Matrix:
        names = [v.name for v in self.variant]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(sorted(dup))}")
        if self.baseline is not None and self.baseline not in names:
            raise ValueError(f"baseline = {self.baseline!r} names no variant (variants: {', '.join(names)})")
        return self


def load_matrix(path: Path) -> Matrix:
    data = read_toml(path, "matrix file", "matrix FILE")
    try:
        m = Matrix.model_validate(data)
    except ValidationError as e:
        lines = [f"invalid matrix file {path}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    for key in ("endpoint", "model", "output"):
        if key in m.run:
            raise ConfigError(f"matrix file {path}: [run] must not set {key!r}; each variant sets its own")
    # paths in the file are relative to the file
    base = path.resolve().parent
    m.output = (base / m.output).resolve()
    m.models_dir = (base / m.models_dir).resolve()
    for v in m.variant:
        if v.model and (base / v.model).exists():  # else a hub id
            v.model = str((base / v.model).resolve())
        for st in v.steps:  # file options (calibration, benign, harmful, patch_set) are relative to the file too
            for key, value in st.options().items():
                if isinstance(value, str) and key in PATH_OPTIONS and (base / value).exists():
                    setattr(st, key, str((base / value).resolve()))
    if m.judge and m.judge.model and (base / m.judge.model).exists():
        m.judge.model = str((base / m.judge.model).resolve())
    return m


def _log(msg: str) -> None:
    print(f"evalkit matrix: {msg}", file=sys.stderr, flush=True)


def step_folder(models_dir: Path, source: str, step: Step, device: str) -> Path:
    """Where a step's result lives: named by the step and a digest of its input and options, so
    variants that share a chain up to a step share its folder."""
    key = json.dumps({"input": source, "run": step.run, "options": step.options(), "device": device}, sort_keys=True)
    return models_dir / f"{step.run}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


_step_locks: dict[Path, threading.Lock] = {}
_step_locks_guard = threading.Lock()


def _step_lock(folder: Path) -> threading.Lock:
    """One lock per step folder: parallel variants that share a step wait for one to write it."""
    with _step_locks_guard:
        return _step_locks.setdefault(folder, threading.Lock())


def prepare(v: Variant, models_dir: Path, env: dict[str, str] | None = None) -> str:
    """The folder to serve: v.model with v.steps applied, each step written once under models_dir
    (finished when its recipe file is there) and reused after; `env` places the work (its GPUs or
    CPU threads)."""
    current = v.model or ""
    for st in v.steps:
        out = step_folder(models_dir, current, st, v.device)
        with _step_lock(out):
            current = _prepare_step(v, st, current, out, env)
    return current


def _prepare_step(v: Variant, st: Step, current: str, out: Path, env: dict[str, str] | None) -> str:
    from servers.recipe import RECIPE_FILE

    if (out / RECIPE_FILE).is_file():
        _log(f"{v.name}: {st.run} step {out} exists; reusing it")
        return str(out)
    if out.exists():  # an unfinished step (interrupted, or failed): start it again
        import shutil

        _log(f"{v.name}: {out} was not finished; preparing it again")
        shutil.rmtree(out)
    module, *command = INTERVENTIONS[st.run]
    cmd = [sys.executable, "-m", module, *command, current, str(out), *st.argv()]
    if v.device != "auto" and "device" not in st.options():
        cmd += ["--device", v.device]
    _log(f"{v.name}: {st.run} {' '.join(st.argv())} on {current} into {out}")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit status {done.returncode}"
        raise ConfigError(f"preparing {v.name} failed at its {st.run} step: {last}")
    return str(out)


def start_server(name: str, model: str, s: Server, served_name: str, env: dict[str, str] | None = None) -> str:
    # the options first: everything after the model is handed to the backend unchanged
    cmd = [sys.executable, "-m", "servers.manage", "start", "--name", name, "--served-model-name", served_name,
           *argv(s), *s.serve_args, model, *(["--", *s.backend_args] if s.backend_args else [])]
    where = f" on {', '.join(f'{k}={v}' for k, v in env.items())}" if env else ""
    _log(f"starting {name}: {model} ({s.backend}, quant {s.quant}){where}")
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise ConfigError(f"server {name} did not start: {done.stderr.strip()[-1500:]}")
    return done.stdout.strip().splitlines()[-1]


def stop_server(name: str) -> None:
    subprocess.run([sys.executable, "-m", "servers.manage", "stop", name], cwd=REPO, capture_output=True, text=True)


def slots(m: Matrix, variants: list[Variant]) -> list[dict[str, str]]:
    """Where each of the `parallel` variants at a time runs: its own GPUs (as many as the
    variants ask for with `gpus`) on a GPU machine, else its share of the CPU cores."""
    from servers.manage import placements, visible_gpus

    n = min(m.parallel, len(variants))
    if n == 1:
        return [{}]
    served = [v for v in variants if not v.endpoint]
    on_gpu = any(v.backend == "vllm" or v.device == "cuda" for v in served) or (
        bool(served) and all(v.device != "cpu" for v in served) and bool(visible_gpus()))
    return placements(n, max((v.gpus for v in served), default=1), on_gpu)


def run_matrix(path: Path, only: list[str] | None = None, dry_run: bool = False, report: bool = True,
               list_only: bool = False) -> int:
    from .report import compare
    from .viewer import write_view

    m = load_matrix(path)
    if list_only:
        for v in m.variant:
            print(v.name)
        return 0
    variants = [v for v in m.variant if not only or v.name in only]
    if only and len(variants) != len(only):
        known = ", ".join(v.name for v in m.variant)
        raise ConfigError(f"--only names a variant the file does not have (variants: {known})")
    try:
        places = slots(m, variants)
    except ValueError as e:
        raise ConfigError(f"matrix file {path}: parallel = {m.parallel}: {e}") from None
    if dry_run:
        for v in variants:
            chain = "".join(f" -> {st.run} {' '.join(st.argv())}" for st in v.steps)
            what = f"endpoint {v.endpoint[0]} ({v.model_id})" if v.endpoint else f"serve {v.model}{chain}"
            print(f"{v.name}: {what}; backend {v.backend}, quant {v.quant} -> {m.output / v.name}")
        if len(places) > 1:
            print(f"{len(places)} variants at a time, on: " + "; ".join(", ".join(f"{k}={v}" for k, v in p.items()) or "the whole machine"
                                                                         for p in places))
        return 0
    run_opts = nest_options(m.run)
    llm_judge = run_opts["judge"].setdefault("llm", {})  # [judge.llm]: the matrix's judge unless [run] names one
    if len(places) > 1:
        run_opts["progress"] = False  # several progress bars on one terminal would garble each other
    judge_name = None
    failed: dict[str, str] = {}  # variant -> why
    try:
        if m.judge is not None and m.judge.endpoint:
            llm_judge.setdefault("endpoint", m.judge.endpoint)
            llm_judge.setdefault("model", m.judge.model_id)
            if m.judge.api_key_env:
                llm_judge.setdefault("api_key_env", m.judge.api_key_env)
        elif m.judge is not None:
            judge_name = "matrix-judge"
            stop_server(judge_name)  # a judge left over from an interrupted matrix run
            url = start_server(judge_name, m.judge.model or "", m.judge, "judge")
            llm_judge.setdefault("endpoint", [url])
            llm_judge.setdefault("model", "judge")
        free: queue.Queue[dict[str, str]] = queue.Queue()
        for place in places:
            free.put(place)

        def run_one(v: Variant) -> None:
            place = free.get()
            try:
                if (why := _run_variant(m, v, run_opts, place)) is not None:
                    failed[v.name] = why
            finally:
                free.put(place)

        with ThreadPoolExecutor(max_workers=len(places), thread_name_prefix="variant") as pool:
            list(pool.map(run_one, variants))
    finally:
        if judge_name:
            stop_server(judge_name)
    runs = [m.output / v.name for v in variants if v.name not in failed and (m.output / v.name / "results.json").is_file()]
    if m.baseline is not None:  # the paired comparisons are against it: it goes first
        runs.sort(key=lambda d: d.name != m.baseline)
    if runs and report:
        for f in [*compare(runs, m.output / "report", failed), write_view(runs, m.output / "report" / "view.html")]:
            print(f)
    if failed:
        _log(f"{len(failed)} variant(s) failed: {', '.join(failed)} (the others are in the report); rerun to resume them")
        return 1
    return 0


def _run_variant(m: Matrix, v: Variant, run_opts: dict[str, Any], place: dict[str, str]) -> str | None:
    """Prepare, serve, evaluate and stop one variant (on `place`); why it failed, or None."""
    from .stages import run_stages

    server = None
    try:
        if v.endpoint:
            endpoint, model_id = v.endpoint, v.model_id
        else:
            checkpoint = prepare(v, m.models_dir, place)
            server = f"matrix-{v.name}"
            stop_server(server)
            endpoint, model_id = [start_server(server, checkpoint, v, v.name, place)], v.name
        overrides = {**run_opts, "endpoint": endpoint, "model": model_id, "output": m.output, "run_name": v.name}
        if v.api_key_env:
            overrides["api_key_env"] = v.api_key_env
        cfg = load_config(None, overrides)
        _log(f"{v.name}: evaluating {', '.join(cfg.subtasks or cfg.dimensions)}")
        if asyncio.run(run_stages(cfg, ("generate", "judge"))) != 0:
            return "a --fail-if gate failed"
        return None
    except Exception as e:
        why = str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"
        _log(f"{v.name}: failed: {why}")
        return why.splitlines()[0]
    finally:
        if server:
            stop_server(server)
