"""Starting, watching and stopping a model server process (any backend).

Each server runs in its own process group (start_new_session), so stopping it stops every
process it spawned (vLLM starts workers); its output goes to a log file; it is ready when
GET <base>/models answers 200.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path


class ServerStartError(Exception):
    pass


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env={**os.environ, **(env or {})}, cwd=cwd)
    except FileNotFoundError:
        raise ServerStartError(f"cannot run {cmd[0]!r}: not found on PATH (is its package installed?)") from None
    finally:
        log.close()


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state, ppid, pgrp, ...); None when the
    process is gone. Raises OSError where there is no procfs."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def _running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie waiting for its parent (no /proc: exists at all)."""
    try:
        fields = _stat(pid)
    except OSError:  # no procfs (macOS): fall back to signal 0, which also counts zombies
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return fields is not None and fields[0] != "Z"


def is_alive(pid: int) -> bool:
    if not _running(pid):
        return False
    try:  # a zombie child of ours counts as dead
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def group_members(pgid: int) -> list[int]:
    """The running (not zombie) processes of process group `pgid`; on a system without /proc, its leader if it runs."""
    proc = Path("/proc")
    if not proc.is_dir():
        return [pgid] if _running(pgid) else []
    members = []
    for d in proc.iterdir():
        try:
            fields = _stat(int(d.name)) if d.name.isdigit() else None
        except OSError:  # it exited while we looked
            continue
        if fields is not None and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(d.name))
    return members


def ready(base_url: str, api_key: str | None = None, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(base_url.rstrip("/") + "/models")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status == 200
    except urllib.error.HTTPError as e:  # a server that asks for a key it was not given is up all the same
        return e.code in (401, 403)
    except (urllib.error.URLError, OSError):
        return False


def log_tail(log_path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_ready(proc_pid: int, base_url: str, log_path: Path, timeout: float, api_key: str | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready(base_url, api_key):
            return
        if not is_alive(proc_pid):
            raise ServerStartError(f"the server exited before it was ready; last lines of {log_path}:\n{log_tail(log_path)}")
        time.sleep(0.25)
    stop(proc_pid)
    raise ServerStartError(f"the server was not ready after {timeout:.0f} s (stopped it); last lines of {log_path}:\n{log_tail(log_path)}")


def stop(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the whole process group, then SIGKILL what is left after `grace` seconds.

    Returns once no process of the group runs, not only its leader: a backend's workers (vLLM's,
    or anything the leader spawned) may take longer to exit than the leader itself.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not is_alive(pid) and not group_members(pgid):
                return
            time.sleep(0.1)
