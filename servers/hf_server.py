"""An OpenAI-compatible server over a transformers model (aiohttp), with continuous batching.

    python -m servers.hf_server MODEL [--port 8000] [--quant bnb4|bnb8|hqq] [--device cpu|cuda|auto]

MODEL is a checkpoint folder, a hub id, a GGUF file (or a folder with --gguf-file) or a packaged
model's short name such as smollm2-135m (servers/model_source.py).

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (SSE streaming or not),
POST /v1/completions, POST /v1/embeddings (with --task embed).

Generation runs in servers/batching.py's decode loop, on its own thread: requests join the running
batch between decode steps and leave it when they end, each with its own sampling settings, seed,
max_tokens, stop strings, logprobs and stream. A client that disconnects cancels its row
(aiohttp's handler cancellation). Bounds: --max-batch-size rows, --kv-cache-gb of KV cache (or
--max-kv-tokens), --max-waiting queued requests; past those a request gets 503 with Retry-After.
On CPU the model's plain linear layers multiply weight-first on small inputs (batching.weight_first_linears:
faster decode steps, the same answers).

Bad input gets an OpenAI error object with a 4xx status; a request never kills the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from evalkit import wire

from . import recipe as recipes
from .batching import DecodeLoop, Limits, Row, Sampling, kv_bytes_per_token, weight_first_linears
from .loading import QUANTS, Loaded, LoadError, load, model_spec
from .spec import HF_FIELDS, add_arguments, from_namespace


class APIError(Exception):
    def __init__(self, status: int, message: str, etype: str = "invalid_request_error", param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.etype, self.param, self.headers = status, message, etype, param, headers

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.etype, "param": self.param, "code": None}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json", headers=self.headers)


class Generator:
    """The model's side of the server: the continuous-batching decode loop (servers/batching.py)
    and prompt scoring, which share the model under one lock."""

    def __init__(self, loaded: Loaded, limits: Limits):
        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.model = loaded.model
        self.lock = threading.Lock()
        if str(loaded.device).startswith("cpu"):
            weight_first_linears(self.model)
        self.loop = DecodeLoop(loaded.model, loaded.tokenizer, limits, device=loaded.device, model_lock=self.lock)

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict]:
        """Each prompt token's logprob given the tokens before it (one forward pass), with the k
        likeliest alternatives; the first token has none. Runs in a worker thread."""
        import torch

        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], device=self.loaded.device)).logits[0, :-1]
            logp = logits.float().log_softmax(-1)
            chosen = logp.gather(1, torch.tensor(ids[1:], device=logp.device).unsqueeze(1)).squeeze(1).tolist()
            top = logp.topk(k) if k else None
        out = [{"token": self.tok.decode([ids[0]]), "logprob": None, "top_logprobs": None}]
        for pos, (t, lp) in enumerate(zip(ids[1:], chosen)):
            alts = [] if top is None else [{"token": self.tok.decode([a]), "logprob": float(v)}
                                           for v, a in zip(top.values[pos].tolist(), top.indices[pos].tolist())]
            out.append({"token": self.tok.decode([t]), "logprob": lp, "top_logprobs": alts})
        return out

    def token_logprobs(self, row: Row) -> list[dict]:
        """A finished row's logprobs in the chat API's shape."""
        return [{"token": self.tok.decode([t]), "logprob": lp,
                 "top_logprobs": [{"token": self.tok.decode([a]), "logprob": v} for a, v in alts]}
                for t, lp, alts in row.token_logprobs]


@dataclass
class Echo:
    """A completions request with echo: the prompt, where its tokens start, their logprobs."""

    prompt: str
    offsets: list[int]
    logprobs: list[dict] = field(default_factory=list)


def _legacy_logprobs(entries: list[dict], start: int, offsets: list[int] | None = None) -> dict[str, list]:
    """The legacy completions logprobs object (the first prompt token has logprob None). Without
    offsets, the tokens follow each other in the text from `start`."""
    if offsets is None:
        offsets, pos = [], start
        for e in entries:
            offsets.append(pos)
            pos += len(e["token"])
    return {
        "tokens": [e["token"] for e in entries],
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [None if e["top_logprobs"] is None else {a["token"]: a["logprob"] for a in e["top_logprobs"]}
                         for e in entries],
        "text_offset": offsets,
    }


# -- request parsing ---------------------------------------------------------------------------


def _flag(body: dict, name: str) -> bool:
    """A boolean field: true, false or absent (a string "false" is not false)."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {value!r}", param=name)
    return value


def _number(body: dict, name: str, default: Any, lo: float, hi: float, kind: type = float) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise APIError(400, f"'{name}' must be a {'integer' if kind is int else 'number'}, got {value!r}", param=name)
    if not lo <= value <= hi:
        raise APIError(400, f"'{name}' must be between {lo} and {hi}, got {value}", param=name)
    return kind(value)


class Server:
    def __init__(self, loaded: Loaded, args: argparse.Namespace):
        self.loaded = loaded
        self.name = args.served_model_name or recipes.served_id(args.model, loaded.source.get("model_id"))
        recipe = recipes.read(args.model)
        self.card = {"root": args.model, **({"source": loaded.source} if loaded.source else {}),
                     **({"intervention": recipes.chain_name(recipe), "recipe": recipe} if recipe else {})}
        self.api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
        if args.api_key_env and not self.api_key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: that variable is empty; export it or drop the option")
        self.default_max_tokens = args.default_max_tokens
        self.read_timeout = args.read_timeout
        cfg = loaded.model.config
        self.max_model_len = args.max_model_len or getattr(cfg, "max_position_embeddings", None) or 2048
        tok = loaded.tokenizer
        if args.chat_template:
            tok.chat_template = Path(args.chat_template).read_text()
        self.has_chat_template = bool(getattr(tok, "chat_template", None))
        self.kv_token_bytes = kv_bytes_per_token(loaded.model) if args.task == "generate" else 0
        max_kv = args.max_kv_tokens or int(args.kv_cache_gb * 2**30) // max(1, self.kv_token_bytes)
        limits = Limits(max_rows=args.max_batch_size, max_kv_tokens=max_kv, max_waiting=args.max_waiting,
                        batch_wait=args.batch_wait_ms / 1000.0)
        self.generator = Generator(loaded, limits) if args.task == "generate" else None
        self.embed_lock = threading.Lock()
        self.started = time.time()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024, middlewares=[self._errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.on_startup.append(self._start)
        return app

    async def _start(self, app: web.Application) -> None:
        if self.generator is not None:
            self.generator.loop.start()

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            if request.path.startswith("/v1/") and self.api_key is not None:
                scheme, _, token = request.headers.get("Authorization", "").strip().partition(" ")
                # compare_digest: the time taken does not tell how much of a guessed key was right
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    raise APIError(401, "invalid or missing API key (send it as 'Authorization: Bearer <key>')", "authentication_error")
            return await handler(request)
        except APIError as e:
            return e.response()
        except web.HTTPException as e:
            return APIError(e.status, e.reason or "error", "invalid_request_error").response()
        except Exception as e:
            return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").response()

    async def health(self, request: web.Request) -> web.Response:
        stats = {"status": "ok", "model": self.name, "uptime_s": round(time.time() - self.started, 1)}
        if self.generator is not None:
            stats.update(self.generator.loop.snapshot())
        return web.json_response(stats)

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.name, "object": "model", "created": int(self.started), "owned_by": "evalkit", "max_model_len": self.max_model_len,
                **self.card}
        return web.json_response({"object": "list", "data": [card]})

    async def _body(self, request: web.Request) -> dict:
        try:  # a client that sends its body slowly (slowloris) is cut off instead of holding a slot
            raw = await asyncio.wait_for(request.read(), self.read_timeout)
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.read_timeout:g} s") from None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise APIError(400, f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise APIError(400, "request body must be a JSON object")
        model = body.get("model")
        if model is None:
            raise APIError(400, "'model' is required", param="model")
        if model != self.name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.name}`", param="model")
        return body

    def _need_generator(self) -> Generator:
        if self.generator is None:
            raise APIError(400, f"{self.name} is served for embeddings only (--task embed)")
        return self.generator

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        gen = self._need_generator()
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty list", param="messages")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "developer"):
                raise APIError(400, "each message needs a 'role' of system, user, assistant or tool", param="messages")
            if not isinstance(m.get("content"), str):
                raise APIError(400, "only string message 'content' is supported", param="messages")
        if not self.has_chat_template:
            raise APIError(400, f"{self.name} has no chat template: restart the server with --chat-template FILE, or use /v1/completions")
        prompt = self.loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        logprobs = None
        if _flag(body, "logprobs"):
            logprobs = _number(body, "top_logprobs", 0, 0, 20, int)
        return await self._serve(request, body, ids, gen, chat=True, logprobs=logprobs)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        gen = self._need_generator()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise APIError(400, "'prompt' must be a non-empty string (one prompt per request)", param="prompt")
        echo = _flag(body, "echo")
        if echo and _flag(body, "stream"):
            raise APIError(400, "echo is not supported with stream: send stream false", param="echo")
        enc = self.loaded.tokenizer(prompt, return_offsets_mapping=echo and self.loaded.tokenizer.is_fast)
        ids = enc["input_ids"]
        lp = body.get("logprobs")
        logprobs = None if lp is None else _number(body, "logprobs", 0, 0, 20, int)
        echoed = None
        if echo:
            echoed = Echo(prompt, self._text_offsets(prompt, ids, enc.get("offset_mapping")))
        return await self._serve(request, body, ids, gen, chat=False, logprobs=logprobs, echo=echoed)

    def _text_offsets(self, prompt: str, ids: list[int], offsets) -> list[int]:
        """Where each prompt token starts in the prompt text (the legacy API's text_offset)."""
        if offsets is not None:
            return [start for start, _ in offsets]
        tok = self.loaded.tokenizer  # a slow tokenizer: the length of the text decoded so far
        return [len(tok.decode(ids[:i], skip_special_tokens=True)) for i in range(len(ids))]

    async def _serve(self, request, body, ids, gen, chat: bool, logprobs: int | None, echo: Echo | None = None) -> web.StreamResponse:
        n = body.get("n")
        if n is not None and (isinstance(n, bool) or n != 1):
            raise APIError(400, f"only n=1 is supported (got n={n!r}); send n requests instead", param="n")
        stream = _flag(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
            raise APIError(400, "'stream_options' must be an object such as {\"include_usage\": true}", param="stream_options")
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 1e-9, 1.0)
        top_k = _number(body, "top_k", 0, -1, 1_000_000, int)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise APIError(400, "'seed' must be an integer", param="seed")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = max(1, min(self.default_max_tokens, self.max_model_len - len(ids)))
        # max_tokens 0 only with echo: score the prompt, generate nothing (the legacy OpenAI API's way)
        max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", 1, 0 if echo else 1, 10**9, int)
        if len(ids) + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the completion). "
                f"Shorten the prompt or lower max_tokens.",
                param="max_tokens",
            )
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise APIError(400, "'stop' must be a string or a list of up to 4 non-empty strings", param="stop")
        row = Row(ids, max_tokens, Sampling(temperature, top_p, max(top_k, 0), seed), stop, logprobs, ignore_eos=_flag(body, "ignore_eos"))
        if not gen.loop.fits(row):
            raise APIError(400, f"this request needs {row.reserved} KV-cache tokens ({len(ids)} in the prompt, {max_tokens} "
                                f"in the completion) and the server holds at most {gen.loop.limits.max_kv_tokens} "
                                f"(--max-kv-tokens): lower max_tokens or restart the server with a larger bound", param="max_tokens")
        loop = asyncio.get_running_loop()
        if echo is not None and logprobs is not None:  # scored once the request is known to be valid
            echo.logprobs = await loop.run_in_executor(None, gen.prompt_logprobs, ids, logprobs)
        # the decode thread reports through the event loop: streamed text, then None once the row is done
        events: asyncio.Queue[str | None] = asyncio.Queue()
        if stream:
            row.on_text = lambda text: loop.call_soon_threadsafe(events.put_nowait, text)
        row.on_done = lambda _: loop.call_soon_threadsafe(events.put_nowait, None)
        if max_tokens == 0:
            events.put_nowait(None)
        elif not gen.loop.submit(row):
            waiting = gen.loop.limits.max_waiting
            raise APIError(503, f"the server is full ({waiting} requests waiting besides the running ones): retry later",
                           "server_error", headers={"Retry-After": "1"})
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        try:
            if stream:
                return await self._stream(request, body, row, events, cid, created, chat, len(ids))
            while await events.get() is not None:
                pass
        except (ConnectionResetError, asyncio.CancelledError):  # the client went away: stop generating for it
            gen.loop.cancel(row)
            raise
        if row.error is not None:
            raise APIError(500, f"generation failed: {type(row.error).__name__}: {row.error}", "server_error")
        token_logprobs = gen.token_logprobs(row)
        if chat:
            choice = wire.choice(True, row.text, row.finish_reason, None if logprobs is None else {"content": token_logprobs})
        else:
            legacy = None
            if logprobs is not None:
                legacy = _legacy_logprobs(token_logprobs, len(echo.prompt) if echo else 0)
                if echo is not None:  # the prompt comes first, in the logprobs as in the text
                    prompt_part = _legacy_logprobs(echo.logprobs, 0, echo.offsets)
                    legacy = {k: prompt_part[k] + v for k, v in legacy.items()}
            choice = wire.choice(False, (echo.prompt if echo is not None else "") + row.text, row.finish_reason, legacy)
        body_bytes = wire.completion(chat, cid, created, self.name, choice, wire.usage(len(ids), len(row.tokens)))
        return web.Response(body=body_bytes, content_type="application/json")

    async def _stream(self, request, body, row: Row, events: asyncio.Queue, cid, created, chat: bool, n_prompt: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stream = wire.Stream(chat, cid, created, self.name)
        sent = ""
        if chat:
            await resp.write(stream.piece("", first=True))
        while (text := await events.get()) is not None:
            sent += text
            await resp.write(stream.piece(text))
        if row.error is not None:
            await resp.write(wire.stream_error(f"generation failed: {row.error}"))
            return resp
        if row.text.startswith(sent) and len(row.text) > len(sent):  # held-back tail
            await resp.write(stream.piece(row.text[len(sent):]))
        await resp.write(stream.finish(row.finish_reason))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(stream.usage(n_prompt, len(row.tokens)))
        await resp.write(wire.DONE)
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if self.loaded.spec.task != "embed":
            raise APIError(400, f"{self.name} is a generation model; start an embedding model with --task embed")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) and x for x in inputs):
            raise APIError(400, "'input' must be a non-empty string or a list of non-empty strings", param="input")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise APIError(400, "encoding_format must be 'float' or 'base64'", param="encoding_format")
        vectors, n_tokens = await asyncio.get_running_loop().run_in_executor(None, self._embed, inputs)
        if fmt == "base64":  # little-endian float32, as the OpenAI API (and its SDK's default) uses
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
        else:
            encoded = [v.tolist() for v in vectors]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(encoded)]
        usage = {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        return web.Response(body=orjson.dumps({"object": "list", "data": data, "model": self.name, "usage": usage}), content_type="application/json")

    def _embed(self, inputs: list[str]) -> tuple[Any, int]:
        import torch

        tok = self.loaded.tokenizer
        with self.embed_lock, torch.inference_mode():
            enc = tok(inputs, padding=True, truncation=True, max_length=self.max_model_len, return_tensors="pt").to(self.loaded.device)
            hidden = self.loaded.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)  # mean pooling (sentence-transformers' default)
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.cpu().numpy(), int(enc["attention_mask"].sum())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m servers.hf_server", description="OpenAI-compatible server over a transformers model")
    p.add_argument("model", help="hub id, checkpoint folder, GGUF file or packaged short name (smollm2-135m)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind [127.0.0.1: this machine only]")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="model id clients send [the model argument; a GGUF: <file stem>-<sha256 prefix>; "
                                                "a recipe folder: <base id>+<its interventions>]")
    p.add_argument("--task", choices=["generate", "embed"], default="generate")
    add_arguments(p, HF_FIELDS)  # the model options, declared once in servers/spec.py
    p.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client may take to send a request's headers or body, or stay idle, before it is cut off [30]")
    p.add_argument("--max-batch-size", type=int, default=64, help="most requests generated together (rows in the running batch) [64]")
    p.add_argument("--kv-cache-gb", type=float, default=4.0,
                   help="memory for the running batch's KV cache, in GiB; sets --max-kv-tokens from the model's size of a token [4]")
    p.add_argument("--max-kv-tokens", type=int,
                   help="bound on the running batch's KV cache in tokens, counted as rows x (their longest prompt + max_tokens "
                        "+ 128); requests wait beyond it [from --kv-cache-gb]")
    p.add_argument("--max-waiting", type=int, default=1024,
                   help="requests that may wait for a place in the batch; more get 503 with Retry-After [1024]")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long an idle server waits for more requests to batch")
    p.add_argument("--api-key-env", help="require the key held in this environment variable (Bearer)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.quant not in QUANTS:
        print(f"hf_server: error: --quant {args.quant!r}: choose from {', '.join(QUANTS)}", file=sys.stderr)
        sys.exit(2)
    try:
        loaded = load(model_spec(from_namespace(args), args.task))
    except LoadError as e:
        print(f"hf_server: error: {e}", file=sys.stderr)
        sys.exit(2)
    server = Server(loaded, args)
    if args.task == "generate" and not server.has_chat_template:
        print(f"hf_server: warning: {args.model} has no chat template; /v1/chat/completions will answer 400 "
              f"until the server is started with --chat-template FILE", file=sys.stderr)
    if server.generator is not None:
        kv = server.generator.loop.limits.max_kv_tokens
        print(f"hf_server: KV cache bound {kv:,} tokens ({kv * server.kv_token_bytes / 2**30:.2f} GiB at "
              f"{server.kv_token_bytes / 1024:.0f} KiB a token), up to {args.max_batch_size} rows", flush=True)
    print(f"hf_server: serving {server.name} ({args.quant}, {loaded.device}) on http://{args.host}:{args.port}/v1", flush=True)
    # keepalive_timeout: aiohttp closes a connection that has not sent a whole request by then,
    # which is the header timeout against slowloris (the body one is in Server._body)
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its row
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None, keepalive_timeout=args.read_timeout,
                handler_cancellation=True)


if __name__ == "__main__":
    main()
