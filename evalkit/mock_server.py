"""A fault-injecting OpenAI-compatible mock server (aiohttp) for dry runs, tests and benchmarks.

    evalkit mock-server --port 8000 --latency 0.2 --fault-rate 0.3 --script replies.json

It answers /v1/models, /v1/chat/completions and /v1/completions (plain and SSE streaming) with
scripted replies, after a configurable latency, and injects faults at a given rate: 429 with
Retry-After, 500, a dropped connection, or a hang. It also stands in for Google's Perspective API
(POST /v1alpha1/comments:analyze, key in X-Goog-Api-Key): a text's TOXICITY is 0.25 per
occurrence of "toxic" (any case), capped at 1; each paragraph is a span with its own score. GET /stats reports what it saw (requests,
faults, peak concurrency) and GET /log each completion request's arrival time (Unix seconds) and the usage it was
answered with, which tests and benchmarks read to check the client's behaviour. --max-concurrency caps the
requests worked on at once (the rest wait their turn), as a real server's batch size does.

Script file (JSON): {"default": "text", "rules": [{"contains": "bomb", "reply": "I'm sorry"}]};
the first rule whose `contains` is in the last message (or prompt) decides the reply. A chat
request with "logprobs" gets the first word as its first token; a rule's optional
"top_logprobs" ([{"token": "m", "logprob": -0.1}, ...]) scripts that token's alternatives.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from . import wire

FAULTS = ("429", "500", "reset", "hang")


class MockState:
    def __init__(self, args: argparse.Namespace):
        self.model = args.model
        self.root = args.root
        self.latency = args.latency
        self.itl = args.itl
        self.fault_rate = args.fault_rate
        self.faults = [f for f in args.faults.split(",") if f]
        for f in self.faults:
            if f not in FAULTS:
                raise SystemExit(f"unknown fault {f!r}: choose from {', '.join(FAULTS)}")
        self.retry_after = args.retry_after
        self.hang_seconds = args.hang_seconds
        self.api_key = args.api_key
        self.auth_fail_after = args.auth_fail_after
        self.rng = random.Random(args.seed)
        script: dict[str, Any] = {}
        if args.script:
            script = orjson.loads(Path(args.script).read_bytes())
        self.default_reply = args.reply if args.reply is not None else script.get("default", "Sure, here is what you asked for.")
        self.rules = [(r["contains"], r["reply"], r.get("top_logprobs")) for r in script.get("rules", [])]
        self.counts: dict[str, int] = {"requests": 0, "completed": 0, "inflight": 0, "peak_inflight": 0}
        for f in FAULTS:
            self.counts[f] = 0
        self.seen_auth: list[str] = []
        self.log: list[list[float]] = []  # [arrived, prompt_tokens, completion_tokens] (-1 tokens: not answered)
        self.slots = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

    def reply_for(self, text: str) -> tuple[str, list[dict] | None]:
        """The scripted reply, and the rule's first-token top_logprobs (if it gives them)."""
        for needle, reply, top in self.rules:
            if needle in text:
                return reply, top
        return self.default_reply, None


def _error(status: int, message: str, etype: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": etype, "param": None, "code": None}})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


async def models(request: web.Request) -> web.Response:
    st: MockState = request.app["state"]
    if (resp := _check_auth(st, request)) is not None:
        return resp
    card = {"id": st.model, "object": "model", "owned_by": "evalkit-mock", **({"root": st.root} if st.root else {})}
    return web.json_response({"object": "list", "data": [card]})


async def embeddings(request: web.Request) -> web.Response:
    """Deterministic 8-dimensional vectors from a hash of each input: equal texts, equal vectors."""
    import hashlib

    st: MockState = request.app["state"]
    st.counts["requests"] += 1
    if (resp := _check_auth(st, request)) is not None:
        return resp
    body = orjson.loads(await request.read())
    inputs = body.get("input")
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not inputs:
        return _error(400, "'input' must be a string or a non-empty list", "invalid_request_error")
    data = []
    for i, text in enumerate(inputs):
        digest = hashlib.sha256(str(text).encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [b / 255.0 - 0.5 for b in digest[:8]]})
    st.counts["completed"] += 1
    usage = {"prompt_tokens": sum(len(str(t).split()) for t in inputs), "total_tokens": 0}
    return web.json_response({"object": "list", "data": data, "model": st.model, "usage": usage})


def _mock_toxicity(text: str) -> float:
    return min(1.0, 0.25 * text.lower().count("toxic"))


async def perspective(request: web.Request) -> web.Response:
    st: MockState = request.app["state"]
    st.counts["requests"] += 1
    if st.api_key is not None and request.headers.get("X-Goog-Api-Key") != st.api_key:
        return web.json_response({"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                                            "status": "INVALID_ARGUMENT"}}, status=400)
    body = orjson.loads(await request.read())
    text = (body.get("comment") or {}).get("text")
    if not isinstance(text, str) or "TOXICITY" not in (body.get("requestedAttributes") or {}):
        return web.json_response({"error": {"code": 400, "message": "comment.text and requestedAttributes.TOXICITY are required",
                                            "status": "INVALID_ARGUMENT"}}, status=400)
    spans, at = [], 0
    for para in text.split("\n\n"):
        spans.append({"begin": at, "end": at + len(para), "score": {"value": _mock_toxicity(para), "type": "PROBABILITY"}})
        at += len(para) + 2
    st.counts["completed"] += 1
    return web.json_response({"attributeScores": {"TOXICITY": {
        "spanScores": spans, "summaryScore": {"value": _mock_toxicity(text), "type": "PROBABILITY"}}}, "languages": ["en"]})


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app["state"].counts)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def request_log(request: web.Request) -> web.Response:
    return web.Response(body=orjson.dumps(request.app["state"].log), content_type="application/json")


def _check_auth(st: MockState, request: web.Request) -> web.Response | None:
    if st.api_key is None:
        return None
    if request.headers.get("Authorization") != f"Bearer {st.api_key}":
        return _error(401, "Incorrect API key provided.", "invalid_request_error")
    return None


async def completions(request: web.Request) -> web.StreamResponse:
    st: MockState = request.app["state"]
    chat = request.path.endswith("/chat/completions")
    st.counts["requests"] += 1
    n = st.counts["requests"]
    entry = [time.time(), -1, -1]
    st.log.append(entry)
    if (resp := _check_auth(st, request)) is not None:
        return resp
    if st.auth_fail_after is not None and n > st.auth_fail_after:
        return _error(401, "API key revoked.", "invalid_request_error")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "request body is not valid JSON", "invalid_request_error")
    if chat:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return _error(400, "'messages' must be a non-empty list", "invalid_request_error")
        text = str(msgs[-1].get("content", ""))
        prompt_text = " ".join(str(m.get("content", "")) for m in msgs)
    else:
        if "prompt" not in body:
            return _error(400, "'prompt' is required", "invalid_request_error")
        text = prompt_text = str(body["prompt"])
    if body.get("model") != st.model:
        return _error(404, f"The model `{body.get('model')}` does not exist.", "invalid_request_error")

    if st.faults and st.rng.random() < st.fault_rate:
        fault = st.rng.choice(st.faults)
        st.counts[fault] += 1
        if fault == "429":
            return _error(429, "Rate limit reached.", "rate_limit_error", {"Retry-After": str(st.retry_after)})
        if fault == "500":
            return _error(500, "The server had an error.", "server_error")
        if fault == "reset":
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError  # aiohttp drops the connection without a response
        await asyncio.sleep(st.hang_seconds)

    if st.slots is not None:
        await st.slots.acquire()
    st.counts["inflight"] += 1
    st.counts["peak_inflight"] = max(st.counts["peak_inflight"], st.counts["inflight"])
    try:
        if st.latency:
            await asyncio.sleep(st.latency)
        reply, top_logprobs = st.reply_for(text)
        max_tokens = body.get("max_tokens")
        words = reply.split(" ")
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            words = words[:max_tokens]
            reply, finish = " ".join(words), "length"
        else:
            finish = "stop"
        usage = wire.usage(len(prompt_text.split()), len(words))
        entry[1:] = [usage["prompt_tokens"], usage["completion_tokens"]]
        cid = f"cmpl-mock-{n}"
        created = int(time.time())
        if body.get("stream"):
            return await _stream(request, st, chat, cid, created, words, finish, usage, body)
        logprobs = None
        if chat and body.get("logprobs"):  # the first word as the first token; a rule may script its alternatives
            first = words[0] if words else ""
            top = top_logprobs if top_logprobs is not None else [{"token": first, "logprob": 0.0}]
            logprobs = {"content": [{"token": first, "logprob": 0.0, "top_logprobs": top[: body.get("top_logprobs") or 0]}]}
        st.counts["completed"] += 1
        return web.Response(body=wire.completion(chat, cid, created, st.model, wire.choice(chat, reply, finish, logprobs), usage),
                            content_type="application/json")
    finally:
        st.counts["inflight"] -= 1
        if st.slots is not None:
            st.slots.release()


async def _stream(request, st, chat, cid, created, words, finish, usage, body) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    stream = wire.Stream(chat, cid, created, st.model)
    for i, w in enumerate(words):
        await resp.write(stream.piece(w if i == 0 else " " + w, first=i == 0))
        if st.itl:
            await asyncio.sleep(st.itl)
    await resp.write(stream.finish(finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        await resp.write(stream.usage(usage["prompt_tokens"], usage["completion_tokens"]))
    await resp.write(wire.DONE)
    st.counts["completed"] += 1
    return resp


def build_app(args: argparse.Namespace) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app["state"] = MockState(args)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/stats", stats)
    app.router.add_get("/log", request_log)
    app.router.add_get("/health", health)
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1alpha1/comments:analyze", perspective)
    return app


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="mock-model", help="the one model id served")
    p.add_argument("--root", default=None, help="the checkpoint its /v1/models card names (as vLLM's `root`) [none]")
    p.add_argument("--latency", type=float, default=0.0, help="seconds before each answer")
    p.add_argument("--itl", type=float, default=0.0, help="seconds between streamed tokens")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests worked on at once; the rest queue [no cap]")
    p.add_argument("--reply", default=None, help="the reply to every prompt (overrides the script's default)")
    p.add_argument("--script", default=None, help="JSON file of reply rules (see module doc)")
    p.add_argument("--fault-rate", type=float, default=0.0, help="fraction of requests that get a fault")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma list of faults to inject: {','.join(FAULTS)}")
    p.add_argument("--retry-after", type=float, default=0.1, help="Retry-After seconds sent with 429")
    p.add_argument("--hang-seconds", type=float, default=3600.0, help="how long a 'hang' fault hangs")
    p.add_argument("--api-key", default=None, help="require this Bearer key (401 otherwise)")
    p.add_argument("--auth-fail-after", type=int, default=None, help="answer 401 after this many requests")
    p.add_argument("--seed", type=int, default=0)


def serve(args: argparse.Namespace) -> None:
    app = build_app(args)
    print(f"mock OpenAI server on http://{args.host}:{args.port}/v1 (model {args.model})", flush=True)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None, backlog=8192)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="evalkit mock-server", description=__doc__.splitlines()[0])
    add_arguments(p)
    serve(p.parse_args(argv))


if __name__ == "__main__":
    main()
