"""The engine against the fault-injecting mock server on loopback."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from evalkit.config import EngineConfig
from evalkit.engine import Engine, FatalAuthError, FatalEndpointError, Request, classify_status, parse_retry_after


def _cfg(**kw) -> EngineConfig:
    base = dict(concurrency=16, progress=False, backoff_base=0.05, backoff_max=0.5, attempt_timeout=2.0)
    base.update(kw)
    return EngineConfig(**base)


def _requests(n: int, prefix: str = "prompt"):
    for i in range(n):
        yield Request(f"k{i}", {"messages": [{"role": "user", "content": f"{prefix} {i}"}], "max_tokens": 16}, i)


async def _run(cfg: EngineConfig, urls: list[str], n: int, model: str = "mock-model", api_key: str | None = None, **kw):
    results = {}

    def on_result(req, res):
        assert req.meta not in results, "a request produced two results"
        results[req.meta] = res

    async with Engine(cfg, urls, api_key=api_key, **kw) as eng:
        eng.model = model
        stats = await eng.run(_requests(n), on_result, total=n)
    return results, stats


def test_classification_table():
    assert classify_status(429) == "rate_limit"
    assert [classify_status(s) for s in (408, 409, 500, 502, 503)] == ["transient"] * 5
    assert [classify_status(s) for s in (401, 403)] == ["auth", "auth"]
    assert [classify_status(s) for s in (400, 413, 422)] == ["bad_request"] * 3
    assert classify_status(404) == "not_found"  # the model or the path: every later request repeats it


def test_retry_after_parsing():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25  # ms wins
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < parse_retry_after({"retry-after": future}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_every_request_one_result_under_30pct_faults(mock_server):
    srv = mock_server("--fault-rate", "0.3", "--retry-after", "0.01", "--hang-seconds", "30", "--seed", "7")
    cfg = _cfg(concurrency=32, attempt_timeout=0.5, max_attempts=30)
    results, stats = asyncio.run(_run(cfg, [srv.url], 300))
    assert sorted(results) == list(range(300))
    assert all(r.ok and r.text == "Sure, here is what you asked for." for r in results.values())
    seen = srv.stats()
    assert seen["completed"] == 300
    for fault in ("429", "500", "reset", "hang"):
        assert seen[fault] > 5, f"the mock injected too few {fault} faults to test anything: {seen}"
    assert stats.retries == seen["requests"] - 300 > 0
    assert stats.rate_limited == seen["429"]
    assert sum(r.attempts for r in results.values()) == seen["requests"]


def test_backoff_follows_retry_after_else_full_jitter():
    from evalkit.engine import RetryableFailure

    eng = Engine(_cfg(backoff_base=1.0, backoff_max=5.0), ["http://127.0.0.1:9/v1"])
    assert eng._backoff(RetryableFailure("rate_limit", "x", 429, retry_after=0.4), 1) == 0.4  # the server's word
    assert eng._backoff(RetryableFailure("rate_limit", "x", 429, retry_after=999), 1) == 5.0  # capped
    for attempt, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 5.0)):
        waits = [eng._backoff(RetryableFailure("transient", "x", 500), attempt) for _ in range(200)]
        assert all(0 <= w <= ceiling for w in waits) and max(waits) > ceiling / 2  # full jitter over [0, ceiling]


def test_rate_limited_requests_are_retried_until_answered(mock_server):
    srv = mock_server("--fault-rate", "0.5", "--faults", "429", "--retry-after", "0.01", "--seed", "3")
    results, stats = asyncio.run(_run(_cfg(concurrency=1, max_attempts=20), [srv.url], 6))
    assert all(r.ok for r in results.values())
    assert stats.rate_limited == srv.stats()["429"] > 0 and stats.retries == stats.rate_limited


def test_attempt_and_time_caps_end_in_error_record(mock_server):
    srv = mock_server("--fault-rate", "1.0", "--faults", "500")
    results, stats = asyncio.run(_run(_cfg(max_attempts=3), [srv.url], 4))
    for r in results.values():
        assert not r.ok and r.text is None and r.attempts == 3
        assert r.error_kind == "transient" and r.error_status == 500
    assert stats.errors == 4 and srv.stats()["requests"] == 12
    # total-time cap: hangs of 30 s with 0.3 s attempts and 1 s per request
    srv2 = mock_server("--fault-rate", "1.0", "--faults", "hang", "--hang-seconds", "30")
    results, _ = asyncio.run(_run(_cfg(max_attempts=100, attempt_timeout=0.3, max_request_time=1.0), [srv2.url], 2))
    assert all(not r.ok and r.error_kind == "transient" and 2 <= r.attempts <= 5 for r in results.values())


def test_bad_request_is_not_retried(mock_server):
    srv = mock_server()

    async def go():
        out = []
        async with Engine(_cfg(), [srv.url]) as eng:
            eng.model = "mock-model"
            await eng.run([Request(f"k{i}", {"max_tokens": 4}) for i in range(3)], lambda q, r: out.append(r))  # no messages
        return out

    for r in asyncio.run(go()):
        assert r.error_kind == "bad_request" and r.error_status == 400 and r.attempts == 1
        assert "'messages' must be a non-empty list" in r.error_message
    assert srv.stats()["requests"] == 3


def test_an_unknown_model_stops_the_run_naming_the_served_ones(mock_server):
    srv = mock_server()
    with pytest.raises(FatalEndpointError) as e:
        asyncio.run(_run(_cfg(), [srv.url], 50, model="mock"))
    msg = str(e.value)
    assert "404" in msg and "does not serve model 'mock'" in msg and "'mock-model'" in msg
    assert srv.stats()["requests"] < 50  # stopped at once, as a 401 does
    # a URL that is no API base (its /models is missing too): the missing /v1 is named
    with pytest.raises(FatalEndpointError, match=r"not an OpenAI API base \(try http://127.0.0.1:\d+/v1\)"):
        asyncio.run(_run(_cfg(), [srv.url.removesuffix("/v1")], 5))


def test_401_stops_the_run_with_the_key_variable_named(mock_server):
    srv = mock_server(api_key="right-key")
    with pytest.raises(FatalAuthError) as e:
        asyncio.run(_run(_cfg(), [srv.url], 50, api_key="sk-wrong-secret", key_hint="$MY_KEY"))
    msg = str(e.value)
    assert "401" in msg and "$MY_KEY" in msg and "sk-wrong-secret" not in msg
    assert srv.stats()["requests"] < 50  # stopped early
    # the right key works
    results, _ = asyncio.run(_run(_cfg(), [srv.url], 5, api_key="right-key"))
    assert all(r.ok for r in results.values())


def test_replicas_share_the_load(mock_server):
    a = mock_server("--latency", "0.02")
    b = mock_server("--latency", "0.02")
    results, _ = asyncio.run(_run(_cfg(concurrency=8), [a.url, b.url], 200))
    assert all(r.ok for r in results.values())
    na, nb = a.stats()["completed"], b.stats()["completed"]
    assert na + nb == 200 and min(na, nb) >= 60, (na, nb)
    assert {r.endpoint for r in results.values()} == {a.url, b.url}


def test_least_loaded_replica_avoids_the_slow_one(mock_server):
    fast = mock_server("--latency", "0.005")
    slow = mock_server("--latency", "0.5")
    results, _ = asyncio.run(_run(_cfg(concurrency=4), [fast.url, slow.url], 120))
    assert fast.stats()["completed"] > 4 * slow.stats()["completed"]


def test_streaming_measures_ttft(mock_server):
    srv = mock_server("--latency", "0.05", "--itl", "0.01", "--reply", "one two three four")
    results, stats = asyncio.run(_run(_cfg(stream=True), [srv.url], 5))
    for r in results.values():
        assert r.ok and r.text == "one two three four" and r.finish_reason == "stop"
        assert r.completion_tokens == 4 and r.prompt_tokens == 2
        assert r.ttft_s is not None and r.ttft_s <= r.latency_s  # the first token comes before the end
    assert set(stats.summary()["ttft_s"]) >= {"p50", "p90", "p99"}


def test_completions_api(mock_server):
    srv = mock_server("--reply", "done")

    async def go():
        out = []
        async with Engine(_cfg(), [srv.url], api="completions") as eng:
            eng.model = "mock-model"
            await eng.run([Request("k", {"prompt": "hello", "max_tokens": 4})], lambda q, r: out.append(r))
        return out

    (r,) = asyncio.run(go())
    assert r.ok and r.text == "done"


def test_queue_is_bounded_so_memory_does_not_grow_with_prompts(mock_server):
    srv = mock_server("--latency", "0.2")
    pulled = []

    def lazy():
        for i in range(10_000):
            pulled.append(i)
            yield Request(f"k{i}", {"messages": [{"role": "user", "content": "x"}]}, i)

    async def go():
        first_pulls = []

        def on_result(req, res):
            if not first_pulls:
                first_pulls.append(len(pulled))

        async with Engine(_cfg(concurrency=8), [srv.url]) as eng:
            eng.model = "mock-model"
            task = asyncio.create_task(eng.run(lazy(), on_result))
            while not first_pulls:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return first_pulls[0]

    pulled_at_first_result = asyncio.run(go())
    # workers (8) + queue (2 x 8) + one the producer is blocked on: never the 10,000
    assert pulled_at_first_result <= 8 + 16 + 1


def test_list_models_and_wait(mock_server):
    srv = mock_server("--model", "tiny-llama")

    async def go(url, wait):
        async with Engine(_cfg(), [url]) as eng:
            return await eng.list_models(wait)

    assert asyncio.run(go(srv.url, 0)) == ["tiny-llama"]
    from evalkit.engine import RequestFailure

    with pytest.raises(RequestFailure, match="is the server running"):
        asyncio.run(go("http://127.0.0.1:9/v1", 0.3))
