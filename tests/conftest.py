"""Shared fixtures: real loopback servers started as subprocesses, the shared datasets folder.

Nothing here reaches anything but 127.0.0.1; hub access is switched off for the whole session.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.pop("EVALKIT_API_KEY", None)
os.environ.pop("OPENAI_API_KEY", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "datasets"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read() if proc.stdout else ''}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


class MockServer:
    def __init__(self, proc: subprocess.Popen, port: int):
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}/v1"

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/stats", timeout=5) as r:
            return orjson.loads(r.read())

    def log(self) -> list[list[float]]:
        """[arrived (Unix s), prompt_tokens, completion_tokens] per completion request, as the server saw it."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/log", timeout=5) as r:
            return orjson.loads(r.read())

    def kill(self) -> None:
        """SIGKILL: connections drop mid-answer and the port refuses new ones."""
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def mock_server(tmp_path):
    """Factory: mock_server(--latency 0.1, script={...}, ...) -> a running MockServer."""
    servers: list[MockServer] = []

    def start(*args: str, script: dict | None = None, api_key: str | None = None, port: int | None = None) -> MockServer:
        port = port or free_port()
        cmd = [sys.executable, "-m", "evalkit.mock_server", "--port", str(port), *args]
        if script is not None:
            path = tmp_path / f"script-{port}.json"
            path.write_bytes(orjson.dumps(script))
            cmd += ["--script", str(path)]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        server = MockServer(proc, port)
        servers.append(server)
        wait_http(f"http://127.0.0.1:{port}/stats", proc=proc)
        return server

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (SHARED_DATA / "advbench" / "harmful_behaviors.csv").is_file():
        pytest.fail(f"the shared datasets are expected at {SHARED_DATA} (../shared/datasets beside the repo)")
    return SHARED_DATA


def run_cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m evalkit ...` the way a user runs the console script."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "evalkit", *args], capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO
    )


def read_jsonl(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]
