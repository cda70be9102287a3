"""serve.sh: start, list and stop local OpenAI-compatible servers (model under test, judge, embedder).

    ./serve.sh start [--role model|judge|embed] [--backend hf|vllm] [--quant Q] [--port N] MODEL [-- BACKEND FLAGS]
    ./serve.sh status
    ./serve.sh stop NAME|all

One state folder ($EVALKIT_SERVE_DIR, else ~/.cache/evalkit/serve) holds <name>.json (pid, port,
URL, command) and <name>.log for each server. A server's name is --name, else its role.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

from . import process
from .spec import HF_FIELDS, QUANTS, add_arguments, argv, from_namespace
from . import recipe as recipes
from .model_source import SourceError, locate, tokenizer_folder
from .vllm import VLLM_QUANTS, VLLMSpec, build_command


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


def start(a: argparse.Namespace) -> int:
    name = a.name or a.role
    existing = state_dir() / f"{name}.json"
    if existing.exists():
        st = json.loads(existing.read_text())
        if process.is_alive(st["pid"]):
            return _fail(f"a server named {name!r} is already running at {st['url']} (pid {st['pid']}): "
                         f"stop it first (./serve.sh stop {name}) or give another --name")
        existing.unlink()
    if a.port is not None:
        if not _port_free(a.host, a.port):
            owner = next((s["name"] for s in _states() if s["port"] == a.port and process.is_alive(s["pid"])), None)
            by = f"evalkit server {owner!r}" if owner else "another program"
            return _fail(f"port {a.port} on {a.host} is already in use by {by}: choose another --port, or omit it to get a free one")
        port = a.port
    else:
        port = _free_port(a.host)
    try:
        gguf = locate(a.model, a.gguf_file)
    except SourceError as e:
        return _fail(str(e))
    try:
        recipe = recipes.read(a.model)
    except recipes.RecipeError as e:
        return _fail(str(e))
    served = a.served_model_name or recipes.served_id(a.model, gguf.model_id if gguf else None)
    url = f"http://{'127.0.0.1' if a.host in ('0.0.0.0', '') else a.host}:{port}/v1"
    env: dict[str, str] = {}
    key = None
    if a.api_key_env:
        key = os.environ.get(a.api_key_env)
        if not key:
            return _fail(f"--api-key-env {a.api_key_env}: that variable is empty; export it first")
    if a.backend == "vllm":
        if a.quant not in VLLM_QUANTS:
            return _fail(f"--backend vllm takes --quant {', '.join(VLLM_QUANTS)}; {a.quant} needs --backend hf")
        if gguf and a.quant != "none":
            return _fail(f"{gguf.path.name} is a GGUF file, already quantized: vLLM serves it with --quant none")
        if recipe and (recipe.get("runtime") or recipe.get("format") == "hqq"):
            kinds = " and ".join(sorted({rt.get("kind", "?") for rt in recipe.get("runtime", [])}))
            what = "an HQQ checkpoint" if recipe.get("format") == "hqq" else f"a runtime intervention ({kinds}: an unmerged adapter or a safety vector)"
            return _fail(f"{a.model} holds {what}, which vLLM does not serve: use --backend hf")
        try:
            tokenizer = str(tokenizer_folder(gguf)) if gguf else None
        except SourceError as e:
            return _fail(str(e))
        cmd = build_command(VLLMSpec(model=str(gguf.path) if gguf else a.model, tokenizer=tokenizer, port=port, host=a.host, served_model_name=served, quant=a.quant,
                                     num_gpus=a.gpus, max_model_len=a.max_model_len, gpu_memory_utilization=a.gpu_memory_utilization,
                                     embed=a.role == "embed", executable=a.vllm_executable, extra=a.extra))
        if key:
            env["VLLM_API_KEY"] = key
    else:
        if a.quant not in QUANTS:
            return _fail(f"--backend hf takes --quant {', '.join(QUANTS)}; {a.quant} (pre-quantized checkpoints) loads "
                         f"as it is with --quant none on a GPU, or use --backend vllm")
        spec = from_namespace(a)
        if spec.chat_template:
            spec.chat_template = str(Path(spec.chat_template).resolve())
        cmd = [sys.executable, "-m", "servers.hf_server", a.model, "--host", a.host, "--port", str(port),
               "--served-model-name", served, *argv(spec, HF_FIELDS)]
        if a.role == "embed":
            cmd += ["--task", "embed"]
        if a.api_key_env:
            cmd += ["--api-key-env", a.api_key_env]
        cmd += a.extra
    log = state_dir() / f"{name}.log"
    proc = process.start(cmd, log, env)
    st = {"name": name, "role": a.role, "backend": a.backend, "model": a.model, "served_model_name": served, "host": a.host,
          "port": port, "url": url, "pid": proc.pid, "log": str(log), "started": time.time(), "command": cmd,
          **(gguf.describe() if gguf else {}), **({"recipe": recipes.chain_name(recipe)} if recipe else {})}
    existing.write_text(json.dumps(st, indent=2))
    print(f"serve.sh: starting {name} ({a.backend}, {a.quant}) for {a.model}; log {log}", file=sys.stderr)
    try:
        process.wait_ready(proc.pid, url, log, a.timeout, key)
    except process.ServerStartError as e:
        existing.unlink(missing_ok=True)
        return _fail(str(e), 1)
    print(url)
    print(f"serve.sh: {name} ready; evaluate it with: evalkit run --endpoint {url} --model {served} ...", file=sys.stderr)
    return 0


def status(a: argparse.Namespace) -> int:
    rows = [("name", "role", "backend", "state", "url", "pid", "model")]
    for st in _states():
        alive = process.is_alive(st["pid"])
        state = "dead" if not alive else "ready" if process.ready(st["url"], os.environ.get("EVALKIT_API_KEY")) else "starting"
        rows.append((st["name"], st["role"], st["backend"], state, st["url"], str(st["pid"]), st["served_model_name"]))
    if len(rows) == 1:
        print("no servers (start one with ./serve.sh start MODEL)")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def stop(a: argparse.Namespace) -> int:
    states = _states()
    chosen = states if a.name == "all" else [s for s in states if s["name"] == a.name]
    if not chosen:
        if a.name == "all":
            print("no servers to stop")
            return 0
        return _fail(f"no server named {a.name!r}; running: {', '.join(s['name'] for s in states) or 'none'}")
    for st in chosen:
        process.stop(st["pid"])
        (state_dir() / f"{st['name']}.json").unlink(missing_ok=True)
        print(f"stopped {st['name']} ({st['url']})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve.sh", description="local OpenAI-compatible model servers")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a server and wait until it answers")
    s.add_argument("model", help="hub id, checkpoint folder, GGUF file, or a packaged model's short name (smollm2-135m)")
    s.add_argument("--role", choices=["model", "judge", "embed"], default="model")
    add_arguments(s)  # the model options, declared once in servers/spec.py
    s.add_argument("--port", type=int, help="port to bind [a free one]")
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
