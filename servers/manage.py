"""serve.sh: start, list and stop local OpenAI-compatible servers (model under test, judge, embedder).

    ./serve.sh start [--role model|judge|embed] [--backend hf|vllm] [--quant Q] [--port N]
                     [--replicas N [--router vllm-router|sglang-router]] MODEL [-- BACKEND FLAGS]
    ./serve.sh status
    ./serve.sh stop NAME|all

One state folder ($EVALKIT_SERVE_DIR, else ~/.cache/evalkit/serve) holds <name>.json (pid, port,
URL, command) and <name>.log for each server. A server's name is --name, else its role.

--replicas N starts N servers of one model, named <name>-1..N, as one deployment: each on its own
GPUs (CUDA_VISIBLE_DEVICES, --gpus each) on a GPU machine, else on its share of the CPU cores;
<name>.endpoints lists their URLs for `evalkit --endpoints-file`, and `stop <name>` stops them
all. --router puts a router wheel (the `router` extra) in front of them and prints its one URL.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from . import process
from . import recipe as recipes
from .model_source import SourceError, locate, tokenizer_folder
from .spec import HF_FIELDS, QUANTS, add_arguments, argv, from_namespace
from .vllm import VLLM_QUANTS, VLLMSpec, build_command, gpus_per_server


def state_dir() -> Path:
    d = Path(os.environ.get("EVALKIT_SERVE_DIR") or Path.home() / ".cache" / "evalkit" / "serve")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _states() -> list[dict]:
    out = []
    for p in sorted(state_dir().glob("*.json")):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _fail(msg: str, code: int = 2) -> int:
    print(f"serve.sh: {msg}", file=sys.stderr)
    return code


ROUTERS = {  # the router wheels (the `router` extra): the command that puts one in front of the replicas
    "vllm-router": lambda port, host, workers, metrics: ["vllm-router", "--host", host, "--port", str(port), "--worker-urls", *workers,
                                                         "--policy", "round_robin", "--prometheus-port", str(metrics)],
    "sglang-router": lambda port, host, workers, metrics: ["sglang-router", "launch", "--host", host, "--port", str(port), "--worker-urls",
                                                           *workers, "--policy", "round_robin", "--prometheus-port", str(metrics)],
}


def visible_gpus() -> list[str]:
    """The GPUs this machine lets servers use: $CUDA_VISIBLE_DEVICES, else what nvidia-smi lists."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def placements(n: int, gpus_each: int, on_gpu: bool) -> list[dict[str, str]]:
    """Each replica's environment: its own GPUs (CUDA_VISIBLE_DEVICES) on a GPU machine, else its
    share of the CPU cores (OMP_NUM_THREADS). A single server sees the whole machine, as before.
    Raises ValueError when the GPUs are too few."""
    if n == 1:
        return [{}]
    if on_gpu and gpus_each:
        gpus = visible_gpus()
        if n * gpus_each > len(gpus):
            raise ValueError(f"{n} replicas x {gpus_each} GPUs need {n * gpus_each} GPUs; this machine shows {len(gpus)} "
                             f"({', '.join(gpus) or 'none'}): lower --replicas or --gpus")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(gpus[i * gpus_each:(i + 1) * gpus_each])} for i in range(n)]
    threads = str(max(1, (os.cpu_count() or 1) // n))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(n)]


def _taken(name: str) -> str | None:
    """Why `name` can't be started: a live server of that name."""
    path = state_dir() / f"{name}.json"
    if not path.exists():
        return None
    st = json.loads(path.read_text())
    if process.is_alive(st["pid"]):
        return (f"a server named {name!r} is already running at {st['url']} (pid {st['pid']}): "
                f"stop it first (./serve.sh stop {st.get('deployment', name)}) or give another --name")
    path.unlink()
    return None


def _port(a: argparse.Namespace, wanted: int | None) -> int | str:
    """`wanted` if it is free (else why not), or a free port."""
    if wanted is None:
        return _free_port(a.host)
    if not _port_free(a.host, wanted):
        owner = next((s["name"] for s in _states() if s["port"] == wanted and process.is_alive(s["pid"])), None)
        by = f"evalkit server {owner!r}" if owner else "another program"
        return f"port {wanted} on {a.host} is already in use by {by}: choose another --port, or omit it to get a free one"
    return wanted


def _url(a: argparse.Namespace, port: int) -> str:
    return f"http://{'127.0.0.1' if a.host in ('0.0.0.0', '') else a.host}:{port}/v1"


def _command(a: argparse.Namespace, port: int, served: str, gguf, recipe) -> tuple[list[str], dict[str, str], int, bool]:
    """(command, environment, GPUs one server uses, whether it runs on GPUs) for one server;
    ValueError with the message when the options don't fit together."""
    env: dict[str, str] = {}
    if a.backend == "vllm":
        if a.quant not in VLLM_QUANTS:
            raise ValueError(f"--backend vllm takes --quant {', '.join(VLLM_QUANTS)}; {a.quant} needs --backend hf")
        if gguf and a.quant != "none":
            raise ValueError(f"{gguf.path.name} is a GGUF file, already quantized: vLLM serves it with --quant none")
        if recipe and (recipe.get("runtime") or recipe.get("format") == "hqq"):
            kinds = " and ".join(sorted({rt.get("kind", "?") for rt in recipe.get("runtime", [])}))
            what = "an HQQ checkpoint" if recipe.get("format") == "hqq" else f"a runtime intervention ({kinds}: an unmerged adapter or a safety vector)"
            raise ValueError(f"{a.model} holds {what}, which vLLM does not serve: use --backend hf")
        try:
            tokenizer = str(tokenizer_folder(gguf)) if gguf else None
        except SourceError as e:
            raise ValueError(str(e)) from None
        spec = VLLMSpec(model=str(gguf.path) if gguf else a.model, tokenizer=tokenizer, port=port, host=a.host, served_model_name=served,
                        quant=a.quant, num_gpus=a.gpus, max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
                        embed=a.role == "embed", executable=a.vllm_executable, extra=a.extra,
                        pipeline_parallel_size=a.pipeline_parallel_size, data_parallel_size=a.data_parallel_size, ray_address=a.ray_address)
        if a.ray_address:
            env["RAY_ADDRESS"] = a.ray_address
        return build_command(spec), env, gpus_per_server(spec), True
    if a.quant not in QUANTS:
        raise ValueError(f"--backend hf takes --quant {', '.join(QUANTS)}; {a.quant} (pre-quantized checkpoints) loads "
                         f"as it is with --quant none on a GPU, or use --backend vllm")
    if a.pipeline_parallel_size > 1 or a.data_parallel_size > 1 or a.ray_address:
        raise ValueError("--pipeline-parallel-size, --data-parallel-size and --ray-address are vLLM's: add --backend vllm "
                         "(for more HF servers, use --replicas)")
    spec = from_namespace(a)
    if spec.chat_template:
        spec.chat_template = str(Path(spec.chat_template).resolve())
    cmd = [sys.executable, "-m", "servers.hf_server", a.model, "--host", a.host, "--port", str(port),
           "--served-model-name", served, *argv(spec, HF_FIELDS)]
    if a.role == "embed":
        cmd += ["--task", "embed"]
    if a.api_key_env:
        cmd += ["--api-key-env", a.api_key_env]
    return cmd + a.extra, env, a.gpus, a.device != "cpu" and bool(visible_gpus())


def endpoints_file(name: str) -> Path:
    return state_dir() / f"{name}.endpoints"


def start(a: argparse.Namespace) -> int:
    name = a.name or a.role
    n = a.replicas
    if n < 1:
        return _fail("--replicas must be 1 or more")
    names = [name] if n == 1 else [f"{name}-{i}" for i in range(1, n + 1)]
    router_name = f"{name}-router" if a.router else None
    for why in (_taken(x) for x in [*names, *([router_name] if router_name else [])]):
        if why:
            return _fail(why)
    # --port: the one server's, the router's when there is one, else the first replica's (the rest follow it)
    wanted = [a.port] if n == 1 else [None] * n if a.router or a.port is None else [a.port + i for i in range(n)]
    ports = [_port(a, w) for w in wanted]
    if a.router:
        ports.append(_port(a, a.port))
    if bad := next((p for p in ports if isinstance(p, str)), None):
        return _fail(bad)
    try:
        gguf = locate(a.model, a.gguf_file)
    except SourceError as e:
        return _fail(str(e))
    try:
        recipe = recipes.read(a.model)
    except recipes.RecipeError as e:
        return _fail(str(e))
    served = a.served_model_name or recipes.served_id(a.model, gguf.model_id if gguf else None)
    key = None
    if a.api_key_env:
        key = os.environ.get(a.api_key_env)
        if not key:
            return _fail(f"--api-key-env {a.api_key_env}: that variable is empty; export it first")
    try:
        commands = [_command(a, port, served, gguf, recipe) for port in ports[:n]]
        envs = placements(n, commands[0][2], commands[0][3])
    except ValueError as e:
        return _fail(str(e))
    started: list[dict] = []
    for i, (server, port, (cmd, env, _, _), place) in enumerate(zip(names, ports, commands, envs)):
        env = {**env, **place, **({"VLLM_API_KEY": key} if key and a.backend == "vllm" else {})}
        log = state_dir() / f"{server}.log"
        proc = process.start(cmd, log, env)
        st = {"name": server, "role": a.role, "backend": a.backend, "model": a.model, "served_model_name": served, "host": a.host,
              "port": port, "url": _url(a, port), "pid": proc.pid, "log": str(log), "started": time.time(), "command": cmd,
              **({"deployment": name, "replica": i + 1, "placement": place} if n > 1 or a.router else {}),
              **(gguf.describe() if gguf else {}), **({"recipe": recipes.chain_name(recipe)} if recipe else {})}
        (state_dir() / f"{server}.json").write_text(json.dumps(st, indent=2))
        started.append(st)
        print(f"serve.sh: starting {server} ({a.backend}, {a.quant}) for {a.model}"
              + (f" on {', '.join(f'{k}={v}' for k, v in place.items())}" if place else "") + f"; log {log}", file=sys.stderr)
    try:
        for st in started:
            process.wait_ready(st["pid"], st["url"], Path(st["log"]), a.timeout, key)
        if a.router:
            started.append(_start_router(a, router_name, name, ports[-1], [st["url"] for st in started], key))
    except process.ServerStartError as e:
        for st in started:
            process.stop(st["pid"])
            (state_dir() / f"{st['name']}.json").unlink(missing_ok=True)
        return _fail(str(e), 1)
    urls = [st["url"] for st in started if st["role"] != "router"]
    if n > 1:
        endpoints_file(name).write_text("".join(u + "\n" for u in urls))
    url = started[-1]["url"] if a.router else ",".join(urls)
    print(url)
    hint = (f"--endpoint {url}" if n == 1 or a.router else f"--endpoints-file {endpoints_file(name)} (or --endpoint {url})")
    print(f"serve.sh: {name} ready" + (f" ({n} replicas{' behind ' + a.router if a.router else ''})" if n > 1 or a.router else "")
          + f"; evaluate it with: evalkit run {hint} --model {served} ...", file=sys.stderr)
    return 0


def _start_router(a: argparse.Namespace, router_name: str, deployment: str, port: int, urls: list[str], key: str | None) -> dict:
    """Start the router in front of the replicas (their URLs without /v1) and wait until it answers."""
    workers = [u.removesuffix("/v1") for u in urls]
    cmd = ROUTERS[a.router](port, a.host, workers, _free_port(a.host))
    exe = Path(sys.executable).parent / cmd[0]  # the router wheel's script in this environment, else on PATH
    if exe.exists():
        cmd[0] = str(exe)
    log = state_dir() / f"{router_name}.log"
    proc = process.start(cmd, log)
    st = {"name": router_name, "role": "router", "backend": a.router, "model": a.model, "served_model_name": a.served_model_name or "",
          "host": a.host, "port": port, "url": _url(a, port), "pid": proc.pid, "log": str(log), "started": time.time(),
          "command": cmd, "deployment": deployment, "workers": urls}
    (state_dir() / f"{router_name}.json").write_text(json.dumps(st, indent=2))
    print(f"serve.sh: starting {router_name} ({a.router}) in front of {len(urls)} replicas; log {log}", file=sys.stderr)
    process.wait_ready(proc.pid, st["url"], log, a.timeout, key)
    return st


def status(a: argparse.Namespace) -> int:
    rows = [("name", "role", "backend", "state", "url", "pid", "model", "deployment")]
    for st in _states():
        alive = process.is_alive(st["pid"])
        state = "dead" if not alive else "ready" if process.ready(st["url"], os.environ.get("EVALKIT_API_KEY")) else "starting"
        rows.append((st["name"], st["role"], st["backend"], state, st["url"], str(st["pid"]), st["served_model_name"],
                     st.get("deployment", "")))
    if len(rows) == 1:
        print("no servers (start one with ./serve.sh start MODEL)")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for dep in sorted({st["deployment"] for st in _states() if st.get("deployment")}):
        members = [st for st in _states() if st.get("deployment") == dep]
        router = next((st["url"] for st in members if st["role"] == "router"), None)
        urls = ",".join(st["url"] for st in members if st["role"] != "router")
        print(f"deployment {dep}: " + (f"router {router}; " if router else "") + f"replicas {urls}"
              + (f"; endpoints file {endpoints_file(dep)}" if endpoints_file(dep).exists() else ""))
    return 0


def stop(a: argparse.Namespace) -> int:
    """Stop a server, or every server of a deployment (its router first), or all."""
    states = _states()
    chosen = states if a.name == "all" else [s for s in states if a.name in (s["name"], s.get("deployment"))]
    if not chosen:
        if a.name == "all":
            print("no servers to stop")
            return 0
        return _fail(f"no server named {a.name!r}; running: {', '.join(s['name'] for s in states) or 'none'}")
    for st in sorted(chosen, key=lambda s: s["role"] != "router"):
        process.stop(st["pid"])
        (state_dir() / f"{st['name']}.json").unlink(missing_ok=True)
        print(f"stopped {st['name']} ({st['url']})")
    for dep in {st.get("deployment") for st in chosen} - {None}:
        if not any(s.get("deployment") == dep for s in _states()):
            endpoints_file(dep).unlink(missing_ok=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.sh", description="local OpenAI-compatible model servers")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a server and wait until it answers")
    s.add_argument("model", help="hub id, checkpoint folder, GGUF file, or a packaged model's short name (smollm2-135m)")
    s.add_argument("--role", choices=["model", "judge", "embed"], default="model")
    add_arguments(s)  # the model options, declared once in servers/spec.py
    s.add_argument("--port", type=int, help="port to bind [a free one]; with --replicas: the router's, else the first replica's")
    s.add_argument("--replicas", type=int, default=1, help="servers of this model, one deployment [1]")
    s.add_argument("--router", choices=sorted(ROUTERS), help="start this router in front of the replicas; print its one URL")
    s.add_argument("--pipeline-parallel-size", type=int, default=1, help="vllm: pipeline stages (nodes, with --ray-address) [1]")
    s.add_argument("--data-parallel-size", type=int, default=1, help="vllm: data-parallel engines inside one server [1]")
    s.add_argument("--ray-address", help="vllm: a running Ray cluster's head (HOST:PORT) for multi-node serving")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--name", help="name for status/stop [the role]")
    s.add_argument("--served-model-name", help="model id clients send [MODEL; a GGUF: <file stem>-<sha256 prefix>; "
                                                 "a recipe folder: <base id>+<its interventions>]")
    s.add_argument("--gpu-memory-utilization", type=float, help="vllm: share of GPU memory to use")
    s.add_argument("--api-key-env", help="require the key in this variable from clients")
    s.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the server to be ready")
    s.add_argument("--vllm-executable", default="vllm")
    s.add_argument("extra", nargs=argparse.REMAINDER, help="after --: flags passed to the backend unchanged")
    sub.add_parser("status", help="list servers and whether they answer")
    t = sub.add_parser("stop", help="stop a server (or all)")
    t.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.cmd == "start":
        a.extra = [x for x in a.extra if x != "--"]
        return start(a)
    return status(a) if a.cmd == "status" else stop(a)


if __name__ == "__main__":
    sys.exit(main())
