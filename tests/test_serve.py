"""serve.sh (start / status / stop) with the HF backend and a stand-in `vllm` executable."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import REPO, free_port, run_cli

pytest.importorskip("torch")
from servers import process
from servers.tiny import tiny_llama
from servers.vllm import VLLMSpec, build_command


def serve(*args: str, env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(REPO / "serve.sh"), *args], capture_output=True, text=True, env={**os.environ, **env},
                          timeout=timeout, cwd=REPO)


@pytest.fixture
def state(tmp_path):
    env = {"EVALKIT_SERVE_DIR": str(tmp_path / "state")}
    yield env
    serve("stop", "all", env=env)


def test_serve_sh_hf_start_status_evaluate_stop(state, tmp_path, data_root):
    model = tiny_llama(tmp_path / "tiny")
    p = serve("start", "--device", "cpu", "--served-model-name", "tiny", str(model), env=state)
    assert p.returncode == 0, p.stderr
    url = p.stdout.strip()
    assert url.startswith("http://127.0.0.1:") and url.endswith("/v1") and "ready" in p.stderr
    st = serve("status", env=state)
    assert "model" in st.stdout and "ready" in st.stdout and url in st.stdout

    again = serve("start", "--device", "cpu", str(model), env=state)
    assert again.returncode == 2 and "already running" in again.stderr and "serve.sh stop model" in again.stderr
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    busy = serve("start", "--name", "other", "--port", str(port), str(model), env=state)
    assert busy.returncode == 2 and f"port {port}" in busy.stderr and "evalkit server 'model'" in busy.stderr

    r = run_cli("run", "--subtasks", "advbench", "--limit", "4", "--endpoint", url, "--data-path", str(data_root),
                "--output", str(tmp_path / "runs"), "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs" / "tiny" / "results.json").exists()

    pid = json.loads((tmp_path / "state" / "model.json").read_text())["pid"]
    s = serve("stop", "model", env=state)
    assert s.returncode == 0 and "stopped model" in s.stdout
    assert not process.is_alive(pid)
    assert "no servers" in serve("status", env=state).stdout
    assert serve("stop", "model", env=state).returncode == 2


def test_serve_sh_reports_a_failed_start(state, tmp_path):
    p = serve("start", "--device", "cpu", "--timeout", "120", str(tmp_path / "missing-model"), env=state)
    assert p.returncode == 1 and "exited before it was ready" in p.stderr and "cannot" in p.stderr
    assert "no servers" in serve("status", env=state).stdout


def test_vllm_command_building():
    cmd = build_command(VLLMSpec(model="meta-llama/Llama-3.1-70B-Instruct-AWQ", port=8001, quant="awq", num_gpus=2,
                                 max_model_len=8192, gpu_memory_utilization=0.9, extra=["--enforce-eager"]))
    assert cmd == ["vllm", "serve", "meta-llama/Llama-3.1-70B-Instruct-AWQ", "--host", "127.0.0.1", "--port", "8001",
                   "--served-model-name", "meta-llama/Llama-3.1-70B-Instruct-AWQ", "--tensor-parallel-size", "2",
                   "--quantization", "awq", "--max-model-len", "8192", "--gpu-memory-utilization", "0.9", "--enforce-eager"]
    assert build_command(VLLMSpec(model="m", port=1, quant="bnb4"))[-2:] == ["--quantization", "bitsandbytes"]
    assert build_command(VLLMSpec(model="m", port=1, embed=True))[-2:] == ["--runner", "pooling"]
    with pytest.raises(ValueError, match="hqq"):
        build_command(VLLMSpec(model="m", port=1, quant="hqq"))


STAND_IN = """#!/usr/bin/env bash
# a stand-in for `vllm serve`: records its arguments and environment, then runs the mock server
# as a child process (like vLLM's workers), so stopping must take the whole process group
echo "$@" > "$VLLM_ARGS_FILE"
echo "${VLLM_API_KEY:-}" > "$VLLM_ARGS_FILE.key"
port=""; name=""
while [ $# -gt 0 ]; do case "$1" in --port) port=$2; shift;; --served-model-name) name=$2; shift;; esac; shift; done
"%s" -m evalkit.mock_server --port "$port" --model "$name" --api-key "${VLLM_API_KEY}" &
echo $! > "$VLLM_ARGS_FILE.child"
bash -c 'trap "sleep 1; exit 0" TERM; while true; do sleep 0.1; done' &  # a worker slow to shut down
echo $! > "$VLLM_ARGS_FILE.slow"
wait
"""


def test_serve_sh_vllm_backend_with_a_stand_in(state, tmp_path):
    exe = tmp_path / "vllm"
    exe.write_text(STAND_IN % sys.executable)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    args_file = tmp_path / "args"
    env = {**state, "VLLM_ARGS_FILE": str(args_file), "JUDGE_KEY": "jk-1", "EVALKIT_API_KEY": "jk-1"}
    port = free_port()
    p = serve("start", "--role", "judge", "--backend", "vllm", "--quant", "awq", "--gpus", "2", "--port", str(port),
              "--vllm-executable", str(exe), "--api-key-env", "JUDGE_KEY", "--served-model-name", "judge",
              "some/Judge-AWQ", "--", "--enforce-eager", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == f"http://127.0.0.1:{port}/v1"
    argv = args_file.read_text().split()
    assert argv[:2] == ["serve", "some/Judge-AWQ"] and "--enforce-eager" in argv
    assert argv[argv.index("--quantization") + 1] == "awq" and argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert (tmp_path / "args.key").read_text().strip() == "jk-1" and "jk-1" not in " ".join(argv)
    assert "judge" in serve("status", env=env).stdout
    child, slow = (int((tmp_path / f"args.{n}").read_text()) for n in ("child", "slow"))
    assert serve("stop", "judge", env=env).returncode == 0
    # the backend's own children went down with it: stop returns only once the whole group is gone
    assert not process.is_alive(child) and not process.is_alive(slow)
    bad = serve("start", "--backend", "vllm", "--quant", "hqq", "m", env=env)
    assert bad.returncode == 2 and "--backend hf" in bad.stderr


def _router_installed(name: str) -> bool:
    """In this environment's bin folder (where serve.sh looks first) or on PATH."""
    import shutil

    return bool(shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")))


def test_serve_sh_replicas_behind_a_router_answer_through_one_url(state, tmp_path, data_root):
    if not _router_installed("vllm-router"):
        pytest.skip("the vllm-router wheel is not installed (pip install 'evalkit[router]')")
    model = tiny_llama(tmp_path / "tiny")
    p = serve("start", "--device", "cpu", "--served-model-name", "tiny", "--replicas", "2", "--router", "vllm-router",
              str(model), env=state)
    assert p.returncode == 0, p.stderr
    url = p.stdout.strip()
    assert url.startswith("http://127.0.0.1:") and "," not in url and "2 replicas behind vllm-router" in p.stderr
    replicas = [json.loads((tmp_path / "state" / f"model-{i}.json").read_text()) for i in (1, 2)]
    threads = str(max(1, (os.cpu_count() or 1) // 2))
    assert [r["placement"]["OMP_NUM_THREADS"] for r in replicas] == [threads, threads]  # the cores split between them
    assert (tmp_path / "state" / "model.endpoints").read_text().split() == [r["url"] for r in replicas]
    st = serve("status", env=state).stdout
    assert "deployment model: router " + url in st and "model-router" in st

    r = run_cli("run", "--subtasks", "advbench", "--limit", "6", "--endpoint", url, "--model", "tiny", "--data-path",
                str(data_root), "--output", str(tmp_path / "runs"), "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in (tmp_path / "runs" / "tiny" / "responses" / "advbench.jsonl").read_text().splitlines()]
    assert len(recs) == 6 and all(x.get("response") is not None for x in recs)
    # the replicas themselves, as an endpoints file: the same deployment, so nothing is asked again
    r = run_cli("run", "--subtasks", "advbench", "--limit", "6", "--endpoints-file", str(tmp_path / "state" / "model.endpoints"),
                "--model", "tiny", "--data-path", str(data_root), "--output", str(tmp_path / "runs"), "--max-tokens", "3")
    assert r.returncode == 0 and "stale" not in r.stderr and "generated" not in r.stderr, r.stderr

    pids = [x["pid"] for x in replicas] + [json.loads((tmp_path / "state" / "model-router.json").read_text())["pid"]]
    s = serve("stop", "model", env=state)
    assert s.returncode == 0 and s.stdout.count("stopped") == 3
    assert not any(process.is_alive(pid) for pid in pids)  # a zombie awaiting its reaper counts as gone
    assert not (tmp_path / "state" / "model.endpoints").exists()


REPLICA_STAND_IN = """#!/usr/bin/env bash
# a stand-in for `vllm serve` that appends its GPUs and arguments, then runs the mock server
echo "$CUDA_VISIBLE_DEVICES|$@" >> "$VLLM_ARGS_FILE"
port=""; name=""
while [ $# -gt 0 ]; do case "$1" in --port) port=$2; shift;; --served-model-name) name=$2; shift;; esac; shift; done
exec "%s" -m evalkit.mock_server --port "$port" --model "$name"
"""


def test_serve_sh_vllm_replicas_are_pinned_to_their_own_gpus(state, tmp_path):
    exe = tmp_path / "vllm"
    exe.write_text(REPLICA_STAND_IN % sys.executable)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    args_file = tmp_path / "args"
    env = {**state, "VLLM_ARGS_FILE": str(args_file), "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    too_many = serve("start", "--backend", "vllm", "--gpus", "2", "--replicas", "3", "--vllm-executable", str(exe), "m", env=env)
    assert too_many.returncode == 2 and "need 6 GPUs" in too_many.stderr and "shows 4" in too_many.stderr
    hf_only = serve("start", "--pipeline-parallel-size", "2", "m", env=env)
    assert hf_only.returncode == 2 and "--backend vllm" in hf_only.stderr
    p = serve("start", "--backend", "vllm", "--gpus", "2", "--replicas", "2", "--vllm-executable", str(exe),
              "--served-model-name", "m", "some/Model", env=env)
    assert p.returncode == 0, p.stderr
    urls = p.stdout.strip().split(",")
    assert len(urls) == 2 and "--endpoints-file" in p.stderr
    lines = sorted(args_file.read_text().splitlines())
    assert [line.split("|")[0] for line in lines] == ["0,1", "2,3"]
    assert all("--tensor-parallel-size 2" in line for line in lines)
    assert serve("stop", "model", env=env).stdout.count("stopped") == 2
    # multi-node: Ray places the workers, so nothing is pinned; the flags reach vLLM
    args_file.unlink()
    p = serve("start", "--backend", "vllm", "--gpus", "8", "--pipeline-parallel-size", "2", "--ray-address", "10.0.0.1:6379",
              "--vllm-executable", str(exe), "--served-model-name", "m", "some/Model", env=env)
    assert p.returncode == 0, p.stderr
    (line,) = args_file.read_text().splitlines()
    assert "--pipeline-parallel-size 2" in line and "--distributed-executor-backend ray" in line
    assert serve("stop", "model", env=env).returncode == 0
