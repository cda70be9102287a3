"""Scale-out: deployment identity in record keys, replica health, the endpoints file, the --rps and
--tpm budgets, checked against real loopback servers and their own request logs."""

from __future__ import annotations

import asyncio
import statistics

import pytest
from conftest import read_jsonl, run_cli

from evalkit.config import ConfigError, EngineConfig
from evalkit.deployment import checkpoint, hosts, identity, vetter
from evalkit.engine import Engine, Request, estimate_tokens


def _cfg(**kw) -> EngineConfig:
    base = {"concurrency": 16, "max_attempts": 6, "backoff_base": 0.05, "backoff_max": 0.5, "progress": False}
    return EngineConfig(**{**base, **kw})


def _requests(n: int, max_tokens: int = 16):
    return [Request(f"k{i}", {"messages": [{"role": "user", "content": f"prompt number {i}"}], "max_tokens": max_tokens})
            for i in range(n)]


async def _run(eng: Engine, n: int, on_each=None, max_tokens: int = 16):
    results = {}

    def on_result(req, res):
        results[req.key] = res
        if on_each is not None:
            on_each(len(results))

    async with eng:
        eng.model = "mock-model"
        await eng.run(_requests(n, max_tokens), on_result)
    return results


# -- deployment identity -----------------------------------------------------------------------


def test_identity_is_the_checkpoint_or_the_hosts_never_the_ports():
    a, b, c = "http://127.0.0.1:8000/v1", "http://127.0.0.1:8001/v1", "http://10.0.0.7:8000/v1"
    card = {"id": "m", "root": "models/x", "created": 1, "source": {"sha256": "ab"}}
    # the checkpoint fields only: `created` changes with every start
    assert checkpoint(card) == {"root": "models/x", "source": {"sha256": "ab"}}
    one = identity("m", {a: card})
    assert one == {"model": "m", "checkpoint": {"root": "models/x", "source": {"sha256": "ab"}}}
    assert identity("m", {a: card, b: {**card, "created": 2}, c: None}) == one  # a replica more, one not answering
    with pytest.raises(ConfigError, match="different checkpoints"):
        identity("m", {a: card, b: {**card, "root": "models/y"}})
    # no checkpoint reported: the hosts, ports left out
    assert identity("m", {a: None, b: None}) == identity("m", {a: None}) == {"model": "m", "hosts": ["http://127.0.0.1"]}
    assert identity("m", {c: None}) != identity("m", {a: None})
    assert hosts([a, c, "https://api.example.com/v1"]) == ["http://10.0.0.7", "http://127.0.0.1", "https://api.example.com"]
    assert identity("m", {a: card}, "prod-llama") == identity("m", {c: None}, "prod-llama") == {"model": "m", "deployment": "prod-llama"}


def test_replicas_join_and_leave_without_stale_answers(mock_server, data_root, tmp_path):
    a, b = mock_server(), mock_server()
    out = tmp_path / "runs"
    args = ["generate", "--subtasks", "advbench", "--limit", "30", "--data-path", str(data_root), "--output", str(out), "--no-progress"]
    path = out / "mock-model" / "responses" / "advbench.jsonl"
    p = run_cli(*args, "--endpoint", a.url)
    assert p.returncode == 0, p.stderr
    for endpoints in ([a.url, b.url], [b.url]):  # a replica added, then the first one removed: all 30 resume
        p = run_cli(*args, "--endpoint", ",".join(endpoints), "--limit", "40")
        assert p.returncode == 0, p.stderr
        assert "stale" not in p.stderr
    assert a.stats()["completed"] + b.stats()["completed"] == 40
    recs = read_jsonl(path)
    assert len(recs) == 40 and not path.with_suffix(".stale.jsonl").exists()
    # another model on the same host is another deployment: the old answers are set aside
    other = mock_server("--model", "other-model")
    p = run_cli(*args, "--endpoint", other.url, "--model", "mock-model", "--run-name", "mock-model", "--limit", "5",
                "--deployment", "after-finetune")
    assert p.returncode != 0 or "stale" in p.stderr  # other-model does not serve mock-model: 404 errors, but no mixing
    assert len(read_jsonl(path.with_suffix(".stale.jsonl"))) == 40
    import orjson

    manifest = orjson.loads((out / "mock-model" / "manifest.json").read_bytes())
    assert manifest["deployment"] == {"model": "mock-model", "deployment": "after-finetune"}


# -- replica health ----------------------------------------------------------------------------


def test_a_killed_replica_is_dropped_and_nothing_is_lost(mock_server):
    a, b = mock_server("--latency", "0.01"), mock_server("--latency", "0.01")
    eng = Engine(_cfg(concurrency=32), [a.url, b.url])

    def kill_b(done: int) -> None:
        if done == 100:
            b.kill()

    results = asyncio.run(_run(eng, 600, kill_b))
    assert len(results) == 600 and all(r.ok for r in results.values())
    s = eng.stats.summary()
    # only the attempts in flight on b when it died, and one probe per cooldown, were retried
    assert s["retries"] <= 32 + 10, s["retries"]
    down = [e for e in s["replica_events"] if e["event"] == "down"]
    assert down and {e["endpoint"] for e in down} == {b.url}
    assert {r["endpoint"]: r["state"] for r in s["replicas"]} == {a.url: "in rotation", b.url: "out of rotation"}
    assert sum(r.endpoint == a.url for r in results.values()) >= 450


def test_a_replica_back_from_the_dead_is_probed_into_rotation(mock_server):
    from conftest import free_port

    a = mock_server("--latency", "0.005")
    port = free_port()
    dead_url = f"http://127.0.0.1:{port}/v1"
    eng = Engine(_cfg(concurrency=4), [a.url, dead_url])
    revived: list = []

    def revive(done: int) -> None:
        if done == 50:
            revived.append(mock_server("--latency", "0.005", port=port))

    results = asyncio.run(_run(eng, 2500, revive))
    assert all(r.ok for r in results.values())
    events = [(e["endpoint"], e["event"]) for e in eng.stats.replica_events]
    assert events[0] == (dead_url, "down") and (dead_url, "up") in events
    assert revived[0].stats()["completed"] > 0


def test_the_endpoints_file_is_reread_during_the_run(mock_server, tmp_path):
    a, b = mock_server("--latency", "0.01", "--root", "ckpt-1"), mock_server("--latency", "0.01", "--root", "ckpt-1")
    other = mock_server("--latency", "0.01", "--root", "ckpt-2")
    f = tmp_path / "endpoints.txt"
    f.write_text(f"# replicas\n{a.url}\n")
    eng = Engine(_cfg(concurrency=4), [], endpoints_file=f)
    # the run's deployment (pipeline.generate finds it from every replica's card)
    eng.vet_card = vetter({"model": "mock-model", "checkpoint": {"root": "ckpt-1"}})

    def change(done: int) -> None:
        if done == 100:
            f.write_text(f"{a.url}\n{b.url}  # joined\n{other.url}\n")
        if done == 400:
            f.write_text(f"{b.url}\n{other.url}\n")

    results = asyncio.run(_run(eng, 800, change))
    assert all(r.ok for r in results.values())
    events = [(e["endpoint"], e["event"]) for e in eng.stats.replica_events]
    assert sorted(events[:3]) == sorted([(b.url, "joined"), (other.url, "joined"), (other.url, "refused")])
    assert events[3:] == [(a.url, "left")]
    assert "ckpt-2" in eng.stats.replica_events[2]["reason"] and other.stats()["requests"] == 0  # another checkpoint: never asked
    # once the file is read again (every 0.5 s) a gets nothing new: at most a request already on its way
    left_at = eng.stats.replica_events[3]["at"]
    assert sum(t > left_at + 0.01 for t, _, _ in a.log()) <= 4
    assert 0 < sum(t > eng.stats.replica_events[0]["at"] for t, _, _ in a.log())
    assert b.stats()["completed"] >= 400


def test_an_endpoints_file_with_a_bad_line_is_one_clear_error(tmp_path):
    from evalkit.endpoints import read_endpoints_file

    f = tmp_path / "e.txt"
    f.write_text("http://127.0.0.1:8000/v1\n127.0.0.1:8001\n")
    with pytest.raises(ConfigError, match="127.0.0.1:8001.*not an http"):
        read_endpoints_file(f)
    with pytest.raises(ConfigError, match="does not exist"):
        read_endpoints_file(tmp_path / "none.txt")


# -- budgets -----------------------------------------------------------------------------------


def _most_in_any_window(times: list[float], weights: list[float], window: float) -> float:
    times, weights = zip(*sorted(zip(times, weights)))
    best, lo, acc = 0.0, 0, 0.0
    for hi in range(len(times)):
        acc += weights[hi]
        while times[hi] - times[lo] > window:
            acc -= weights[lo]
            lo += 1
        best = max(best, acc)
    return best


def test_rps_is_smooth_and_waiting_is_not_latency(mock_server):
    srv = mock_server()
    eng = Engine(_cfg(concurrency=16, rps=60), [srv.url])
    results = asyncio.run(_run(eng, 120))
    arrivals = [row[0] for row in srv.log()]
    assert len(arrivals) == 120
    for window in (0.5, 1.0):  # no rush at second boundaries: at most rate x window (+ 1) in any window
        assert _most_in_any_window(arrivals, [1.0] * 120, window) <= 60 * window + 1
    waited = statistics.median(r.waited_s for r in results.values())
    latency = statistics.median(r.latency_s for r in results.values())
    assert latency < waited / 2, (latency, waited)  # 16 workers queue for the budget; the server answers at once


def test_tpm_holds_its_budget_by_the_servers_own_count(mock_server):
    srv = mock_server("--reply", " ".join(["word"] * 12))
    tpm = 12000.0  # 200 tokens a second
    eng = Engine(_cfg(concurrency=16, tpm=tpm), [srv.url])
    results = asyncio.run(_run(eng, 24, max_tokens=64))
    assert all(r.ok for r in results.values())
    log = srv.log()
    tokens = [p + c for _, p, c in log]
    biggest = max(tokens)
    for window in (0.5, 1.0):
        assert _most_in_any_window([t for t, _, _ in log], tokens, window) <= tpm / 60 * window + biggest
    assert len(log) == 24 and biggest == 15  # 3 prompt words + 12 answer words, as the server counts them


def test_token_estimate_by_hand():
    assert estimate_tokens({"messages": [{"role": "user", "content": "x" * 10}], "max_tokens": 5}) == (4, 5)
    assert estimate_tokens({"prompt": "abcdef", "max_tokens": 1}) == (2, 1)
    assert estimate_tokens({"messages": [{"role": "system", "content": "ab"}, {"role": "user", "content": "c"}]}) == (1, 0)
