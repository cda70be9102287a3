"""The async fan-out: the one place for HTTP, concurrency, rate limits, retries and progress.

- One aiohttp ClientSession; its connector allows at least `concurrency` connections, so a
  request never waits for a connection slot and the per-attempt timeout measures only the
  attempt itself.
- A fixed pool of `concurrency` workers pulls from a bounded queue fed lazily from the
  request iterator: memory does not grow with the number of prompts.
- Every failure is classified (rate_limit, transient, bad_request, auth). rate_limit and
  transient are retried by tenacity with full-jitter exponential backoff that honours
  Retry-After / retry-after-ms, capped in attempts and total time; bad_request becomes an error
  record at once; auth stops the whole run (FatalAuthError) after the records already
  received are written.
- Several base URLs for one model are replicas of one deployment: each attempt goes to the
  least-loaded replica in rotation. A replica that refuses connections, or fails
  BREAKER_FAILURES attempts in a row, is taken out (circuit breaker) and probed again by one
  request after a cooldown that doubles each time the probe fails; the attempt that hit it goes
  at once to another replica. An endpoints file is re-read during the run, so replicas can join
  and leave. Every change is logged and kept in the stats (`replica_events`).
- --rps and --tpm are budgets (class Budget): smooth, in arrival order, and the time spent waiting
  for them is not counted as latency.
- With a price, every answer is costed from its usage; with --max-cost, a request is sent only
  when the run's limit still holds its worst case (evalkit/cost.py), and the run stops cleanly.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import math
import random
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, stop_before_delay

from . import wire
from .config import EngineConfig
from .cost import CostLimitReached, Price, Spending
from .endpoints import key_source, read_endpoints_file, redact_url
from .errors import ConfigError, FatalAuthError, FatalEndpointError, FatalRunError, RequestFailure, RetryableFailure  # noqa: F401 - re-exported: the tree is drawn in errors.py

log = logging.getLogger("evalkit")
BREAKER_FAILURES = 3  # failed attempts in a row that take a replica out of rotation
BREAKER_COOLDOWN = (1.0, 30.0)  # first and longest wait before a replica out of rotation is probed
ENDPOINTS_FILE_POLL = 0.5  # seconds between looks at the endpoints file


def _v1_hint(base: str) -> str:
    """' try <base>/v1' for a base URL without the /v1 OpenAI-compatible servers answer under, else ''."""
    base = redact_url(base).rstrip("/")
    return "" if base.endswith("/v1") else f" try {base}/v1"


def classify_status(status: int) -> str:
    if status == 429:
        return "rate_limit"
    if status in (408, 409) or status >= 500:
        return "transient"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    return "bad_request"


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from retry-after-ms, Retry-After (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(slots=True)
class Request:
    key: str
    body: dict[str, Any]  # the OpenAI request body without "model"
    meta: Any = None  # handed back untouched with the result


@dataclass(slots=True)
class Result:
    text: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float | None = None
    ttft_s: float | None = None
    attempts: int = 0
    waited_s: float = 0.0  # time spent waiting for the --rps/--tpm budgets, not part of latency_s
    endpoint: str | None = None  # the replica that answered, redacted
    error_kind: str | None = None
    error_status: int | None = None
    error_message: str | None = None
    raw: dict[str, Any] | None = None  # the full JSON body (non-streaming), e.g. for logprobs

    @property
    def ok(self) -> bool:
        return self.error_kind is None


@dataclass
class Replica:
    base_url: str
    url: str
    public: str  # base_url as it may be written to records (credentials dropped)
    inflight: int = 0
    answered: int = 0
    failed: int = 0  # failed attempts
    streak: int = 0  # failed attempts in a row
    down_until: float | None = None  # out of rotation until then (monotonic); None: in rotation
    cooldown: float = 0.0
    probing: bool = False  # one request is trying it after its cooldown
    retired: bool = False  # it left the endpoints file
    vetting: bool = False  # it joined; its checkpoint is being compared with the run's
    refused: bool = False  # it serves another checkpoint: out while the endpoints file lists it

    def available(self, now: float) -> bool:
        return not self.retired and not self.probing and not self.vetting and (self.down_until is None or now >= self.down_until)

    def report(self) -> dict[str, Any]:
        state = "left" if self.retired else "in rotation" if self.down_until is None else "out of rotation"
        return {"endpoint": self.public, "state": state, "answered": self.answered, "failed_attempts": self.failed}


class Budget:
    """At most `rate` units per second (requests for --rps, tokens for --tpm), paced smoothly.

    A token bucket holding at most `burst` units (or one request's cost, if larger), refilled
    continuously; callers wait in arrival order (asyncio.Lock is fair). In any window of W
    seconds at most rate*W plus one request's cost goes out, with no rush at second boundaries
    as a fixed-window counter (asyncio-throttle's) gives. Units given back (a token estimate that
    was too high, a request that was refused) return to the bucket."""

    def __init__(self, rate: float, burst: float):
        self.rate = rate
        self.burst = burst
        self.level = burst
        self.cap = burst  # the bucket's size: the burst, or the largest single cost seen
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()
        self._returned = asyncio.Event()  # units came back: the waiting caller may go sooner

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(max(self.cap, self.level), self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    async def take(self, cost: float) -> float:
        """Wait until `cost` units may go, take them; the seconds waited."""
        t0 = time.monotonic()
        async with self._lock:
            self.cap = max(self.cap, cost)
            self._refill()
            while self.level < cost:
                self._returned.clear()
                try:
                    await asyncio.wait_for(self._returned.wait(), (cost - self.level) / self.rate)
                except TimeoutError:
                    pass
                self._refill()
            self.level -= cost
        return time.monotonic() - t0

    def give_back(self, units: float) -> None:
        """Return units taken but not spent (negative: spent more than taken)."""
        self._refill()
        self.level = min(max(self.cap, self.level), self.level + units)
        if units > 0:
            self._returned.set()


def estimate_tokens(body: dict[str, Any]) -> tuple[int, int]:
    """Upper estimates of a request's prompt and completion tokens, before its `usage` is known:
    the prompt at 3 characters a token (fewer than most tokenizers' 4), and max_tokens."""
    if "messages" in body:
        chars = sum(len(m.get("content") or "") if isinstance(m.get("content"), str) else len(orjson.dumps(m.get("content")))
                    for m in body["messages"])
    else:
        prompt = body.get("prompt") or body.get("input") or ""
        chars = len(prompt) if isinstance(prompt, str) else len(orjson.dumps(prompt))
    return math.ceil(chars / 3), int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)


@dataclass
class Stats:
    done: int = 0
    errors: int = 0
    retries: int = 0
    rate_limited: int = 0
    inflight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latencies: array = field(default_factory=lambda: array("d"))
    ttfts: array = field(default_factory=lambda: array("d"))
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    replicas: list[Replica] = field(default_factory=list)
    replica_events: list[dict[str, Any]] = field(default_factory=list)
    causes: Counter = field(default_factory=Counter)  # why requests failed: "kind status: message" -> count
    cost: float | None = None  # USD, when the model has a price

    def summary(self) -> dict[str, Any]:
        wall = (self.ended or time.monotonic()) - self.started
        out: dict[str, Any] = {
            "requests": self.done,
            "errors": self.errors,
            "retries": self.retries,
            "rate_limited": self.rate_limited,
            "wall_s": round(wall, 3),
            "requests_per_s": round(self.done / wall, 3) if wall > 0 else None,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "output_tokens_per_s": round(self.completion_tokens / wall, 3) if wall > 0 else None,
            "e2e_latency_s": percentiles(self.latencies),
        }
        if self.cost is not None:
            out["cost_usd"] = round(self.cost, 6)
        if self.ttfts:
            out["ttft_s"] = percentiles(self.ttfts)
        if self.causes:
            out["error_causes"] = [[cause, n] for cause, n in self.causes.most_common(3)]
        if len(self.replicas) > 1 or self.replica_events:
            out["replicas"] = [r.report() for r in self.replicas]
            out["replica_events"] = list(self.replica_events)
        return out


def percentiles(values: array | list[float]) -> dict[str, float] | None:
    if not values:
        return None
    s = sorted(values)

    def pick(q: float) -> float:
        # nearest-rank percentile
        idx = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
        return round(s[idx], 6)

    return {"mean": round(sum(s) / len(s), 6), "p50": pick(50), "p90": pick(90), "p99": pick(99), "max": round(s[-1], 6)}




class Engine:
    """Send many requests to one model (one or several replica URLs) and hand back results."""

    def __init__(
        self,
        cfg: EngineConfig,
        base_urls: list[str],
        api_key: str | None = None,
        api: str = "chat",
        key_hint: str | None = None,
        endpoints_file: Path | None = None,
    ):
        if endpoints_file is not None:
            base_urls = read_endpoints_file(endpoints_file)
        if not base_urls:
            raise ValueError("at least one endpoint URL is needed")
        self.cfg = cfg
        if api not in wire.KINDS:
            raise ValueError(f"unknown API kind {api!r}: choose from {', '.join(wire.KINDS)}")
        self.api = api
        self.kind = wire.KINDS[api]
        self.replicas: list[Replica] = []
        self.stats = Stats()
        self._sync_replicas(base_urls, log_changes=False)
        self._endpoints_file = endpoints_file
        self._endpoints_seen: tuple[float, int] | None = None
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers.update(self.kind.auth_headers(api_key))
        self._key_hint = key_hint or key_source(None)
        self._rps = Budget(cfg.rps, 1.0) if cfg.rps else None
        self._tpm = Budget(cfg.tpm / 60.0, cfg.tpm / 600.0) if cfg.tpm else None  # at most 0.1 s worth at once
        # total covers one attempt only: the connector has a slot for every worker, so no time
        # spent queueing for a connection can count against it
        self._attempt_timeout = aiohttp.ClientTimeout(total=cfg.attempt_timeout, sock_connect=cfg.connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._rr = 0
        self.model: str | None = None
        # a replica joining mid-run is asked GET /models; this says why its card is refused (None: admitted)
        self.vet_card: Callable[[dict[str, Any] | None], str | None] | None = None
        self.price: Price | None = None  # the model's, when known: requests are costed
        self.spending: Spending | None = None  # the run's, shared with its other engines (--max-cost)
        self._vetting: set[asyncio.Future] = set()

    async def __aenter__(self) -> Engine:
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency + 8, limit_per_host=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._vetting):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- replicas ----------------------------------------------------------------------------

    def _event(self, replica: Replica, event: str, reason: str = "") -> None:
        self.stats.replica_events.append({"endpoint": replica.public, "event": event, "at": round(time.time(), 3),
                                          **({"reason": reason} if reason else {})})
        log.warning("replica %s %s%s", replica.public, event, f": {reason}" if reason else "")

    def _sync_replicas(self, urls: list[str], log_changes: bool = True) -> None:
        """Make the replicas in rotation exactly `urls` (a URL that leaves finishes what it has in flight)."""
        wanted = {u.rstrip("/"): None for u in urls}
        by_url = {r.base_url: r for r in self.replicas}
        for base in wanted:
            r = by_url.get(base)
            if r is None:
                r = Replica(base, base + self.kind.path, redact_url(base))
                self.replicas.append(r)
            elif not r.retired or r.refused:
                continue
            r.retired, r.down_until, r.streak = False, None, 0
            if log_changes:
                self._event(r, "joined")
                if self.vet_card is not None:
                    r.vetting = True
                    task = asyncio.ensure_future(self._vet(r))
                    self._vetting.add(task)
                    task.add_done_callback(self._vetting.discard)
        for r in self.replicas:
            if r.base_url not in wanted:
                r.refused = False  # listed again later: vetted again
                if not r.retired:
                    r.retired = True
                    if log_changes:
                        self._event(r, "left")
        self.stats.replicas = self.replicas

    async def _vet(self, replica: Replica) -> None:
        """A replica that joined mid-run must serve what the run's answers are keyed on, or it is
        turned away (see deployment.vetter)."""
        try:
            cards = await self.model_cards(timeout=5.0, base=replica.base_url)
            card = next((c for c in cards if c.get("id") == self.model), None)
        except (RequestFailure, FatalAuthError, ValueError):
            card = None
        replica.vetting = False
        assert self.vet_card is not None
        if (why := self.vet_card(card)) is not None:
            replica.retired = replica.refused = True
            self._event(replica, "refused", why)

    def _reread_endpoints(self) -> None:
        path = self._endpoints_file
        if path is None:
            return
        try:
            st = path.stat()
            seen = (st.st_mtime, st.st_size)
            if seen == self._endpoints_seen:
                return
            self._endpoints_seen = seen
            urls = read_endpoints_file(path)
        except (OSError, ConfigError) as e:
            log.warning("cannot read the endpoints file %s (%s); keeping the current replicas", path, e)
            return
        if not urls:
            log.warning("the endpoints file %s lists no endpoint; keeping the current replicas", path)
            return
        self._sync_replicas(urls)

    async def _watch_endpoints(self) -> None:
        while True:
            self._reread_endpoints()
            await asyncio.sleep(ENDPOINTS_FILE_POLL)

    def _in_rotation(self) -> int:
        return sum(1 for r in self.replicas if not r.retired)

    def _failed_on(self, replica: Replica, failure: RequestFailure, refused: bool) -> None:
        """Count a failed attempt against its replica; trip the breaker when it keeps failing
        (a lone replica stays: there is nowhere else to send the work)."""
        replica.failed += 1
        replica.streak += 1
        was_probe = replica.probing
        if replica.retired or self._in_rotation() < 2:
            return
        if replica.down_until is not None and not was_probe:  # sent before it was taken out
            failure.failover = True
            return
        if refused or was_probe or replica.streak >= BREAKER_FAILURES:
            first, longest = BREAKER_COOLDOWN
            replica.cooldown = min(longest, replica.cooldown * 2) if replica.cooldown else first
            what = "probe failed" if was_probe else "taken out of rotation"
            self._event(replica, "down", f"{what} ({failure.message}); next probe in {replica.cooldown:.0f} s")
            replica.down_until = time.monotonic() + replica.cooldown
            failure.failover = True

    def _alive(self, replica: Replica) -> None:
        """The replica answered (a 4xx or a 429 included): back in rotation if it was out."""
        replica.streak = 0
        if replica.down_until is not None:
            replica.down_until, replica.cooldown = None, 0.0
            self._event(replica, "up", "probe answered; back in rotation")

    async def _pick_replica(self) -> Replica:
        """The least-loaded replica in rotation (ties in turn); when none is, wait for the first
        cooldown to end and let one request probe that replica."""
        while True:
            now = time.monotonic()
            live = [r for r in self.replicas if r.available(now)]
            if live:
                self._rr = (self._rr + 1) % len(live)
                best = min(range(len(live)), key=lambda i: (live[(self._rr + i) % len(live)].inflight, i))
                replica = live[(self._rr + best) % len(live)]
                if replica.down_until is not None:
                    replica.probing = True
                return replica
            waits = [r.down_until - now for r in self.replicas if not r.retired and not r.probing and r.down_until is not None]
            await asyncio.sleep(min(max(0.01, min(waits)), 0.5) if waits else 0.05)

    # -- discovery ---------------------------------------------------------------------------

    async def list_models(self, wait: float = 0.0) -> list[str]:
        """The model ids of GET /models on the first replica (see model_cards)."""
        return [m["id"] for m in await self.model_cards(wait)]

    async def model_cards(self, wait: float = 0.0, timeout: float | None = None, base: str | None = None) -> list[dict[str, Any]]:
        """GET /models on `base` [the first replica]: each served model's card (id, and what the server
        says of it: vLLM's `root`, our HF server's GGUF `source`); connection errors are retried
        for `wait` seconds; one attempt lasts at most `timeout` seconds [connect timeout + 30]."""
        assert self._session is not None
        base = base or self.replicas[0].base_url
        deadline = time.monotonic() + wait
        while True:
            try:
                async with self._session.get(
                    base + "/models", timeout=aiohttp.ClientTimeout(total=timeout or self.cfg.connect_timeout + 30)
                ) as resp:
                    if resp.status in (401, 403):
                        raise FatalAuthError(self._auth_message(base, resp.status))
                    if resp.status != 200:
                        hint = f" (is /v1 missing?{_v1_hint(base)})" if resp.status == 404 and _v1_hint(base) else ""
                        raise RequestFailure("bad_request", f"GET {redact_url(base)}/models answered {resp.status}{hint}", resp.status)
                    data = orjson.loads(await resp.read())
                    return [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
            except (TimeoutError, aiohttp.ClientConnectionError) as e:
                if time.monotonic() >= deadline:
                    raise RequestFailure(
                        "transient",
                        f"cannot reach {redact_url(base)} ({type(e).__name__}: {e}); is the server running? "
                        f"(start one with ./serve.sh, or pass --wait SECONDS to wait for it)",
                    ) from None
                await asyncio.sleep(0.5)

    async def _not_found_message(self, where: str, e: RequestFailure) -> str:
        """Why a 404 will repeat: the model is not served (name the ones that are), or the URL is
        not an API base (GET /models is missing too: usually a missing /v1)."""
        head = f"{where} answered 404 ({e.message.removeprefix('HTTP 404: ')[:200]})"
        if not self.kind.openai:
            return f"{head}: check the endpoint URL"
        try:
            ids = [c["id"] for c in await self.model_cards(timeout=5.0)]
        except RequestFailure as listing:
            if listing.status == 404:
                base = self.replicas[0].public
                hint = f" ({_v1_hint(base).strip()})" if _v1_hint(base) else ""
                return f"{head}, and GET {base}/models is missing too: the URL is not an OpenAI API base{hint}"
            return f"{head}: check --model and the endpoint URL"
        except (FatalAuthError, ValueError):
            return f"{head}: check --model and the endpoint URL"
        if self.model not in ids:
            return (f"{head}: it does not serve model {self.model!r}; it serves {', '.join(map(repr, ids)) or 'no model'}. "
                    f"Pass the served id as the model option")
        return f"{head}: check the endpoint URL"

    def _auth_message(self, base: str, status: int) -> str:
        return (
            f"{redact_url(base)} answered {status} {'Unauthorized' if status == 401 else 'Forbidden'}: "
            f"the API key is missing or wrong. Set it in {self._key_hint}. "
            f"Records already written are kept; rerun the same command to resume."
        )

    # -- fan-out -----------------------------------------------------------------------------

    async def run(
        self,
        requests: Iterable[Request],
        on_result: Callable[[Request, Result], None],
        total: int | None = None,
        desc: str = "generate",
        fresh_stats: bool = True,
    ) -> Stats:
        """Send every request; call on_result(request, result) once per request, in completion order.
        fresh_stats=False adds to the previous run's stats (a multi-turn subtask's later turns).

        Raises FatalAuthError after in-flight work is cancelled; everything on_result received
        before that is the caller's to keep (it is already written).
        """
        assert self._session is not None and (self.model or not self.kind.openai), "use `async with Engine(...)` and set .model"
        if fresh_stats:
            self.stats = Stats(replicas=self.replicas, cost=None if self.price is None else 0.0)
        stats = self.stats
        n_workers = min(self.cfg.concurrency, total) if total else self.cfg.concurrency  # no idle workers for small runs
        queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=2 * n_workers)
        fatal: list[BaseException] = []
        stopped: list[Request] = []

        async def produce() -> None:
            for req in requests:
                await queue.put(req)
            for _ in range(n_workers):
                await queue.put(None)

        async def work() -> None:
            while True:
                req = await queue.get()
                if req is None:
                    return
                if stopped:  # --max-cost reached: the rest is not sent (no record: a rerun resumes it)
                    self.spending.not_sent += 1  # type: ignore[union-attr]
                    continue
                try:
                    result = await self._complete(req)
                except CostLimitReached:
                    stopped.append(req)
                    self.spending.not_sent += 1  # type: ignore[union-attr]
                    continue
                stats.done += 1
                if not result.ok:
                    stats.errors += 1
                if bar is not None:
                    bar.update(1)
                on_result(req, result)

        bar = self._progress(total, desc)
        tasks = [asyncio.create_task(produce())] + [asyncio.create_task(work()) for _ in range(n_workers)]
        ticker = asyncio.create_task(self._tick(bar)) if bar is not None else None
        watcher = asyncio.create_task(self._watch_endpoints()) if self._endpoints_file is not None else None
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if (exc := t.exception()) is not None:
                    fatal.append(exc)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for extra in (ticker, watcher):
                if extra is not None:
                    extra.cancel()
            stats.ended = time.monotonic()
            if bar is not None:
                self._postfix(bar)
                bar.close()
        if fatal:
            raise fatal[0]
        if stopped:
            raise CostLimitReached(self.spending.stop_message())  # type: ignore[union-attr]
        return stats

    async def _complete(self, req: Request) -> Result:
        result = Result()
        stats = self.stats
        t0 = time.monotonic()
        try:
            try:
                # The first attempt runs outside tenacity: building and iterating AsyncRetrying costs
                # more than the request itself on a fast local server, and most requests succeed at once.
                result.attempts = 1
                await self._attempt(req, result)
            except RetryableFailure as first:
                await self._retry(req, result, first, t0)
        except RequestFailure as e:
            if e.kind == "auth":
                raise FatalAuthError(self._auth_message(result.endpoint or self.replicas[0].base_url, e.status or 401)) from None
            if e.kind == "not_found":
                raise FatalEndpointError(await self._not_found_message(result.endpoint or self.replicas[0].public, e)) from None
            self.stats.causes[f"{e.kind}{f' {e.status}' if e.status else ''}: {e.message[:160]}"] += 1
            result.error_kind, result.error_status, result.error_message = e.kind, e.status, e.message
            result.text = None
        result.latency_s = time.monotonic() - t0 - result.waited_s
        if result.ok:
            stats.latencies.append(result.latency_s)
            if result.ttft_s is not None:
                stats.ttfts.append(result.ttft_s)
            stats.prompt_tokens += result.prompt_tokens
            stats.completion_tokens += result.completion_tokens
        return result

    async def _retry(self, req: Request, result: Result, first: RetryableFailure, t0: float) -> None:
        """Attempts 2..max_attempts through tenacity, after the backoff the first failure asks for."""
        cfg = self.cfg
        if cfg.max_attempts <= 1:
            raise first
        stats = self.stats
        delay = self._backoff(first, 1)
        if time.monotonic() - t0 + delay >= cfg.max_request_time:
            raise first
        stats.retries += 1
        await asyncio.sleep(delay)

        def before_sleep(state: RetryCallState) -> None:
            stats.retries += 1

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(RetryableFailure),
            stop=stop_after_attempt(cfg.max_attempts - 1) | stop_before_delay(max(0.0, cfg.max_request_time - (time.monotonic() - t0))),
            wait=lambda state: self._backoff(state.outcome.exception() if state.outcome else None, state.attempt_number + 1),
            before_sleep=before_sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                result.attempts += 1
                await self._attempt(req, result)

    def _backoff(self, exc: BaseException | None, attempt_number: int) -> float:
        """Retry-After when the server sent one (capped), else full-jitter exponential backoff."""
        if isinstance(exc, RequestFailure) and exc.failover and any(r.available(time.monotonic()) for r in self.replicas):
            return 0.0
        if isinstance(exc, RequestFailure) and exc.retry_after is not None:
            return min(exc.retry_after, self.cfg.backoff_max)
        ceiling = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (attempt_number - 1))
        return random.uniform(0, ceiling)

    async def _attempt(self, req: Request, result: Result) -> None:
        body = dict(req.body)
        if self.kind.openai:
            body["model"] = self.model
        # a request may opt out of streaming (a judge that reads logprobs from the whole body)
        stream = self.cfg.stream and self.kind.streams and body.get("stream") is not False
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self._rps is not None:
            result.waited_s += await self._rps.take(1.0)
        # the estimate only where a budget or a price needs it: it walks the whole prompt
        prompt_estimate, completion_estimate = estimate_tokens(body) if self._tpm is not None or self.price is not None else (0, 0)
        estimate = prompt_estimate + completion_estimate
        held = 0.0  # this attempt's worst-case cost, reserved from the run's --max-cost
        if self.price is not None:
            held = self.price.cost(prompt_estimate, completion_estimate)
            if self.spending is not None and not self.spending.hold(held):
                raise CostLimitReached(self.spending.stop_message())
        if self._tpm is not None:
            result.waited_s += await self._tpm.take(estimate)
        replica = await self._pick_replica()
        result.endpoint = replica.public
        replica.inflight += 1
        self.stats.inflight += 1
        spent = 0  # tokens the endpoint reports for this attempt (none for a refused one)
        try:
            t0 = time.monotonic()
            async with self._session.post(replica.url, json=body, timeout=self._attempt_timeout) as resp:  # type: ignore[union-attr]
                if resp.status != 200:
                    await self._raise_for(resp)
                if stream:
                    await self._read_stream(resp, result, t0)
                else:
                    self._read_body(await resp.read(), result)
            spent = (result.prompt_tokens + result.completion_tokens) or estimate
            replica.answered += 1
            self._alive(replica)
        except RequestFailure as e:
            if e.kind == "transient":  # 5xx, malformed bodies: the replica's fault; 429 and 4xx are not
                self._failed_on(replica, e, refused=False)
            else:
                self._alive(replica)
            raise
        except (TimeoutError, aiohttp.ClientError, ConnectionError) as e:
            failure = RetryableFailure("transient", f"{type(e).__name__}: {e}".rstrip(": "))
            self._failed_on(replica, failure, refused=isinstance(e, aiohttp.ClientConnectorError))
            raise failure from None
        finally:
            replica.probing = False
            replica.inflight -= 1
            self.stats.inflight -= 1
            if self._tpm is not None and spent != estimate:
                self._tpm.give_back(estimate - spent)
            if self.price is not None:  # an answer costs what its usage says (its hold, without usage); a failure nothing
                answered = result.prompt_tokens + result.completion_tokens
                cost = 0.0 if not spent else self.price.cost(result.prompt_tokens, result.completion_tokens) if answered else held
                self.stats.cost = (self.stats.cost or 0.0) + cost
                if self.spending is not None:
                    self.spending.settle(held, cost)

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        kind = classify_status(resp.status)
        try:
            text = (await resp.text())[:500]
        except Exception:
            text = ""
        try:
            message = orjson.loads(text)["error"]["message"]
        except Exception:
            message = text or resp.reason or ""
        msg = f"HTTP {resp.status}: {message}"
        if kind == "rate_limit":
            self.stats.rate_limited += 1
        retry_after = parse_retry_after(resp.headers)
        cls = RetryableFailure if kind in ("rate_limit", "transient") else RequestFailure
        raise cls(kind, msg, resp.status, retry_after)

    def _read_body(self, raw: bytes, result: Result) -> None:
        reply = self.kind.parse(raw)
        result.text, result.finish_reason, result.raw = reply.text, reply.finish_reason, reply.raw
        result.prompt_tokens, result.completion_tokens = reply.prompt_tokens, reply.completion_tokens

    async def _read_stream(self, resp: aiohttp.ClientResponse, result: Result, t0: float) -> None:
        parts: list[str] = []
        ttft = None
        saw_done = False
        async for line in resp.content:
            payload = wire.sse_data(line)
            if payload is None:
                continue
            if payload == b"[DONE]":
                saw_done = True
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise RetryableFailure("transient", f"malformed stream chunk: {payload[:200]!r}") from None
            pieces, finish, counts = self.kind.read_chunk(chunk)
            if counts is not None:
                result.prompt_tokens, result.completion_tokens = counts
            if pieces and ttft is None:
                ttft = time.monotonic() - t0
            parts += pieces
            if finish is not None:
                result.finish_reason = finish
        if not saw_done:
            raise RetryableFailure("transient", "stream ended before [DONE]")
        result.text = "".join(parts)
        result.ttft_s = ttft

    # -- progress ----------------------------------------------------------------------------

    def _progress(self, total: int | None, desc: str):
        if not self.cfg.progress:
            return None
        from tqdm import tqdm

        # disable=None: no bar when stderr is not a terminal (CI logs); the summary line still prints
        return tqdm(total=total, desc=desc, unit="req", dynamic_ncols=True, mininterval=0.5, smoothing=0.1, disable=None)

    def _postfix(self, bar: Any) -> None:
        s = self.stats
        wall = max(1e-9, time.monotonic() - s.started)
        bar.set_postfix_str(
            f"req/s={s.done / wall:.1f} tok/s={s.completion_tokens / wall:.0f} inflight={s.inflight} "
            f"retries={s.retries} 429s={s.rate_limited} errors={s.errors}",
            refresh=False,
        )

    async def _tick(self, bar: Any) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._postfix(bar)
            bar.refresh()
