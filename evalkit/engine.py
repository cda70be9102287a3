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
- Several base URLs for one model are replicas: each attempt goes to the least-loaded one.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import aiohttp
import orjson
from asyncio_throttle import Throttler
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, stop_before_delay

from .config import EngineConfig, key_source, redact_url


class RequestFailure(Exception):
    """One failed attempt, classified."""

    def __init__(self, kind: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.kind in ("rate_limit", "transient")


class RetryableFailure(RequestFailure):
    pass


class FatalAuthError(Exception):
    """401/403: no later request can succeed; the run stops."""


def classify_status(status: int) -> str:
    if status == 429:
        return "rate_limit"
    if status in (408, 409) or status >= 500:
        return "transient"
    if status in (401, 403):
        return "auth"
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
        if self.ttfts:
            out["ttft_s"] = percentiles(self.ttfts)
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


# request path under each base URL; "perspective" is Google's comments:analyze (toxicity judge)
API_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings",
             "perspective": "/comments:analyze"}
OPENAI_APIS = ("chat", "completions", "embeddings")


class Engine:
    """Send many requests to one model (one or several replica URLs) and hand back results."""

    def __init__(
        self,
        cfg: EngineConfig,
        base_urls: list[str],
        api_key: str | None = None,
        api: str = "chat",
        key_hint: str | None = None,
    ):
        if not base_urls:
            raise ValueError("at least one endpoint URL is needed")
        self.cfg = cfg
        self.api = api
        path = API_PATHS[api]
        self.replicas = [Replica(u.rstrip("/"), u.rstrip("/") + path, redact_url(u.rstrip("/"))) for u in base_urls]
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            # Google APIs take the key in a header of their own (never in the URL, where logs would keep it)
            if api == "perspective":
                self._headers["X-Goog-Api-Key"] = api_key
            else:
                self._headers["Authorization"] = f"Bearer {api_key}"
        self._key_hint = key_hint or key_source(None)
        self._throttler = Throttler(rate_limit=cfg.rps, period=1.0) if cfg.rps else None
        # total covers one attempt only: the connector has a slot for every worker, so no time
        # spent queueing for a connection can count against it
        self._attempt_timeout = aiohttp.ClientTimeout(total=cfg.attempt_timeout, sock_connect=cfg.connect_timeout)
        self._session: aiohttp.ClientSession | None = None
        self._rr = 0
        self.model: str | None = None
        self.stats = Stats()

    async def __aenter__(self) -> "Engine":
        connector = aiohttp.TCPConnector(limit=self.cfg.concurrency + 8, limit_per_host=0, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            json_serialize=lambda o: orjson.dumps(o).decode(),
            timeout=aiohttp.ClientTimeout(total=None),
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- discovery ---------------------------------------------------------------------------

    async def list_models(self, wait: float = 0.0) -> list[str]:
        """The model ids of GET /models on the first replica (see model_cards)."""
        return [m["id"] for m in await self.model_cards(wait)]

    async def model_cards(self, wait: float = 0.0, timeout: float | None = None) -> list[dict[str, Any]]:
        """GET /models on the first replica: each served model's card (id, and what the server
        says of it: vLLM's `root`, our HF server's GGUF `source`); connection errors are retried
        for `wait` seconds; one attempt lasts at most `timeout` seconds [connect timeout + 30]."""
        assert self._session is not None
        base = self.replicas[0].base_url
        deadline = time.monotonic() + wait
        while True:
            try:
                async with self._session.get(
                    base + "/models", timeout=aiohttp.ClientTimeout(total=timeout or self.cfg.connect_timeout + 30)
                ) as resp:
                    if resp.status in (401, 403):
                        raise FatalAuthError(self._auth_message(base, resp.status))
                    if resp.status != 200:
                        raise RequestFailure("bad_request", f"GET {redact_url(base)}/models answered {resp.status}", resp.status)
                    data = orjson.loads(await resp.read())
                    return [m for m in data.get("data", []) if isinstance(m, dict) and "id" in m]
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                if time.monotonic() >= deadline:
                    raise RequestFailure(
                        "transient",
                        f"cannot reach {redact_url(base)} ({type(e).__name__}: {e}); is the server running? "
                        f"(start one with ./serve.sh, or pass --wait SECONDS to wait for it)",
                    ) from None
                await asyncio.sleep(0.5)

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
        assert self._session is not None and (self.model or self.api not in OPENAI_APIS), "use `async with Engine(...)` and set .model"
        if fresh_stats:
            self.stats = Stats()
        stats = self.stats
        queue: asyncio.Queue[Request | None] = asyncio.Queue(maxsize=2 * self.cfg.concurrency)
        fatal: list[BaseException] = []
        n_workers = self.cfg.concurrency

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
                result = await self._complete(req)
                stats.done += 1
                if not result.ok:
                    stats.errors += 1
                if bar is not None:
                    bar.update(1)
                on_result(req, result)

        bar = self._progress(total, desc)
        tasks = [asyncio.create_task(produce())] + [asyncio.create_task(work()) for _ in range(n_workers)]
        ticker = asyncio.create_task(self._tick(bar)) if bar is not None else None
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                if t.exception() is not None:
                    fatal.append(t.exception())
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if ticker is not None:
                ticker.cancel()
            stats.ended = time.monotonic()
            if bar is not None:
                self._postfix(bar)
                bar.close()
        if fatal:
            raise fatal[0]
        return stats

    def _pick_replica(self) -> Replica:
        if len(self.replicas) == 1:
            return self.replicas[0]
        n = len(self.replicas)
        self._rr = (self._rr + 1) % n
        best = min(range(n), key=lambda i: (self.replicas[(self._rr + i) % n].inflight, i))
        return self.replicas[(self._rr + best) % n]

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
            result.error_kind, result.error_status, result.error_message = e.kind, e.status, e.message
            result.text = None
        result.latency_s = time.monotonic() - t0
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
        if isinstance(exc, RequestFailure) and exc.retry_after is not None:
            return min(exc.retry_after, self.cfg.backoff_max)
        ceiling = min(self.cfg.backoff_max, self.cfg.backoff_base * 2 ** (attempt_number - 1))
        return random.uniform(0, ceiling)

    async def _attempt(self, req: Request, result: Result) -> None:
        replica = self._pick_replica()
        result.endpoint = replica.public
        body = dict(req.body)
        if self.api in OPENAI_APIS:
            body["model"] = self.model
        # a request may opt out of streaming (a judge that reads logprobs from the whole body)
        stream = self.cfg.stream and self.api in ("chat", "completions") and body.get("stream") is not False
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if self._throttler is not None:
            async with self._throttler:
                pass
        replica.inflight += 1
        self.stats.inflight += 1
        try:
            t0 = time.monotonic()
            async with self._session.post(replica.url, json=body, timeout=self._attempt_timeout) as resp:  # type: ignore[union-attr]
                if resp.status != 200:
                    await self._raise_for(resp)
                if stream:
                    await self._read_stream(resp, result, t0)
                else:
                    self._read_body(await resp.read(), result)
        except RequestFailure:
            raise
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise RetryableFailure("transient", f"{type(e).__name__}: {e}".rstrip(": ")) from None
        finally:
            replica.inflight -= 1
            self.stats.inflight -= 1

    async def _raise_for(self, resp: aiohttp.ClientResponse) -> None:
        kind = classify_status(resp.status)
        try:
            text = (await resp.text())[:500]
        except Exception:  # noqa: BLE001 - the status is what matters
            text = ""
        try:
            message = orjson.loads(text)["error"]["message"]
        except Exception:  # noqa: BLE001
            message = text or resp.reason or ""
        msg = f"HTTP {resp.status}: {message}"
        if kind == "rate_limit":
            self.stats.rate_limited += 1
        retry_after = parse_retry_after(resp.headers)
        cls = RetryableFailure if kind in ("rate_limit", "transient") else RequestFailure
        raise cls(kind, msg, resp.status, retry_after)

    def _read_body(self, raw: bytes, result: Result) -> None:
        if self.api not in OPENAI_APIS:  # another JSON API: the caller reads result.raw
            try:
                result.text, result.raw = "", orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise RetryableFailure("transient", f"malformed JSON body: {raw[:200]!r}") from None
            return
        if self.api == "embeddings":
            try:
                data = orjson.loads(raw)
                vectors = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
            except (orjson.JSONDecodeError, KeyError, TypeError) as e:
                raise RetryableFailure("transient", f"malformed embeddings body ({type(e).__name__}): {raw[:200]!r}") from None
            if any(not isinstance(v, list) for v in vectors):
                raise RequestFailure("bad_request", "embeddings came back base64-encoded; ask for encoding_format float")
            result.text, result.raw = "", {"embeddings": vectors}
            result.prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
            return
        try:
            data = orjson.loads(raw)
            choice = data["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError) as e:
            raise RetryableFailure("transient", f"malformed response body ({type(e).__name__}): {raw[:200]!r}") from None
        result.text = text if text is not None else ""
        result.finish_reason = choice.get("finish_reason")
        usage = data.get("usage") or {}
        result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        result.completion_tokens = int(usage.get("completion_tokens") or 0)
        result.raw = data

    async def _read_stream(self, resp: aiohttp.ClientResponse, result: Result, t0: float) -> None:
        parts: list[str] = []
        ttft = None
        saw_done = False
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                saw_done = True
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                raise RetryableFailure("transient", f"malformed stream chunk: {payload[:200]!r}") from None
            if chunk.get("usage"):
                result.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)
                result.completion_tokens = int(chunk["usage"].get("completion_tokens") or 0)
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content") if self.api == "chat" else choice.get("text")
                if piece:
                    if ttft is None:
                        ttft = time.monotonic() - t0
                    parts.append(piece)
                if choice.get("finish_reason"):
                    result.finish_reason = choice["finish_reason"]
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
