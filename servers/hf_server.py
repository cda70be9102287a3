"""An OpenAI-compatible server over a transformers model (aiohttp), with dynamic batching.

    python -m servers.hf_server MODEL [--port 8000] [--quant bnb4|bnb8|hqq] [--device cpu|cuda|auto]

MODEL is a checkpoint folder, a hub id, a GGUF file (or a folder with --gguf-file) or a packaged
model's short name such as smollm2-135m (servers/model_source.py).

Endpoints: GET /v1/models, GET /health, POST /v1/chat/completions (SSE streaming or not),
POST /v1/completions, POST /v1/embeddings (with --task embed).

Requests that arrive together are generated together: a batcher takes every waiting request
(up to --max-batch-size), groups those with the same sampling settings, left-pads them and runs
one `generate` call per group in a worker thread, so the event loop keeps accepting requests.
Per-request max_tokens and stop strings are applied to each row; streaming is per row too
(a streamer hands each new token of every row to its own SSE response).

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from evalkit import wire

from . import recipe as recipes
from .loading import QUANTS, Loaded, LoadError, load, model_spec
from .spec import HF_FIELDS, add_arguments, from_namespace


class APIError(Exception):
    def __init__(self, status: int, message: str, etype: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.etype, self.param = status, message, etype, param

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.etype, "param": self.param, "code": None}}
        return web.Response(status=self.status, body=orjson.dumps(body), content_type="application/json")


@dataclass
class Job:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: tuple  # (do_sample, temperature, top_p, top_k, seed): rows batch together only if equal
    stop: list[str]
    logprobs: int | None  # None: none; k >= 0: chosen token's logprob plus k alternatives
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    stream: asyncio.Queue | None = None
    # filled by the generator
    text: str = ""
    finish_reason: str = "length"
    completion_tokens: int = 0
    token_logprobs: list[dict] = field(default_factory=list)


class RowStreamer:
    """transformers streamer for a whole batch: each row's new text goes to that row's queue."""

    def __init__(self, server: Generator, jobs: list[Job]):
        self.server, self.jobs = server, jobs
        self.tokens: list[list[int]] = [[] for _ in jobs]
        self.sent = [0] * len(jobs)
        self.done = [False] * len(jobs)
        self.first = True

    def put(self, value) -> None:
        if self.first:  # the prompt ids come first
            self.first = False
            return
        ids = value.reshape(-1).tolist()
        for i, (job, tok) in enumerate(zip(self.jobs, ids)):
            if self.done[i] or job.stream is None:  # a batch may mix streaming and plain requests
                continue
            if tok in self.server.eos_ids or len(self.tokens[i]) >= job.max_new_tokens:
                self.done[i] = True
                continue
            self.tokens[i].append(tok)
            text, stopped = self.server.cut_at_stop(self.server.decode(self.tokens[i]), job.stop)
            if stopped:
                self.done[i] = True
            # hold back what could be the start of a stop string or an unfinished character
            hold = 0 if stopped else max((len(s) - 1 for s in job.stop), default=0)
            safe = len(text) - hold
            if text.endswith("\ufffd") and not stopped:
                safe = min(safe, len(text) - 1)
            if safe > self.sent[i]:
                job.loop.call_soon_threadsafe(job.stream.put_nowait, text[self.sent[i] : safe])
                self.sent[i] = safe

    def end(self) -> None:
        pass


class Generator:
    """Owns the model: the batch queue, the batcher task and the generation thread."""

    def __init__(self, loaded: Loaded, max_batch_size: int, batch_wait: float):
        self.loaded = loaded
        self.tok = loaded.tokenizer
        self.model = loaded.model
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        eos = getattr(self.model.generation_config, "eos_token_id", None) or self.tok.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else next(iter(self.eos_ids))
        self.batches = 0
        self.rows = 0

    def prompt_logprobs(self, ids: list[int], k: int) -> list[dict]:
        """Each prompt token's logprob given the tokens before it (one forward pass), with the k
        likeliest alternatives; the first token has none. Runs in the generation thread."""
        import torch

        with torch.inference_mode():
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

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @staticmethod
    def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.batch_wait
            while len(batch) < self.max_batch_size:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            groups: dict[tuple, list[Job]] = {}
            for job in batch:
                groups.setdefault(job.sampling, []).append(job)
            for jobs in groups.values():
                jobs = [j for j in jobs if not j.future.cancelled()]
                if jobs:
                    await loop.run_in_executor(self.executor, self._generate, jobs)

    def _generate(self, jobs: list[Job]) -> None:
        import torch

        try:
            do_sample, temperature, top_p, top_k, seed = jobs[0].sampling
            width = max(len(j.prompt_ids) for j in jobs)
            ids = torch.full((len(jobs), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(jobs), width), dtype=torch.long)
            for i, j in enumerate(jobs):  # left padding: every row ends where generation starts
                ids[i, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
                mask[i, width - len(j.prompt_ids) :] = 1
            want_logprobs = any(j.logprobs is not None for j in jobs)
            kwargs: dict[str, Any] = {
                "max_new_tokens": max(j.max_new_tokens for j in jobs),
                "do_sample": do_sample,
                "pad_token_id": self.pad_id,
                "eos_token_id": sorted(self.eos_ids),
                "return_dict_in_generate": True,
                "output_logits": want_logprobs,
            }
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            if any(j.stream is not None for j in jobs):
                kwargs["streamer"] = RowStreamer(self, jobs)
            if seed is not None:
                torch.manual_seed(seed)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids.to(self.loaded.device), attention_mask=mask.to(self.loaded.device), **kwargs
                )
            new = out.sequences[:, width:].tolist()
            logp = torch.stack(out.logits, dim=1).float().log_softmax(-1) if want_logprobs else None
            for i, j in enumerate(jobs):
                self._finish_row(j, new[i], logp[i] if logp is not None else None)
            self.batches += 1
            self.rows += len(jobs)
        except Exception as e:
            for j in jobs:
                if not j.future.done():
                    j.loop.call_soon_threadsafe(_set_exception, j.future, e)

    def _finish_row(self, job: Job, row: list[int], logp) -> None:
        toks: list[int] = []
        finish = "length"
        for t in row[: job.max_new_tokens]:
            if t in self.eos_ids:
                finish = "stop"
                break
            toks.append(t)
        text, stopped = self.cut_at_stop(self.decode(toks), job.stop)
        if stopped:
            finish = "stop"
        job.text, job.finish_reason, job.completion_tokens = text, finish, len(toks)
        if logp is not None and job.logprobs is not None:
            for pos, t in enumerate(toks):
                entry = {"token": self.tok.decode([t]), "logprob": float(logp[pos, t]), "top_logprobs": []}
                if job.logprobs:
                    vals, idx = logp[pos].topk(job.logprobs)
                    entry["top_logprobs"] = [
                        {"token": self.tok.decode([k]), "logprob": float(v)} for v, k in zip(vals.tolist(), idx.tolist())
                    ]
                job.token_logprobs.append(entry)
        job.loop.call_soon_threadsafe(_set_result, job.future, job)


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


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)


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
        self.generator = Generator(loaded, args.max_batch_size, args.batch_wait_ms / 1000.0) if args.task == "generate" else None
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
            app["batcher"] = asyncio.create_task(self.generator.run())

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
            stats.update(batches=self.generator.batches, rows=self.generator.rows, queued=self.generator.queue.qsize())
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
        do_sample = temperature > 1e-5
        sampling = (do_sample, temperature, top_p, top_k if top_k > 0 else None, seed) if do_sample else (False, None, None, None, seed)
        loop = asyncio.get_running_loop()
        if echo is not None and logprobs is not None:  # scored once the request is known to be valid
            echo.logprobs = await loop.run_in_executor(gen.executor, gen.prompt_logprobs, ids, logprobs)
        job = Job(ids, max_tokens, sampling, stop, logprobs, loop, loop.create_future(), asyncio.Queue() if stream else None)
        if max_tokens == 0:
            job.finish_reason = "length"
            job.future.set_result(job)
        else:
            await gen.queue.put(job)
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if stream:
            return await self._stream(request, body, job, cid, created, chat, len(ids))
        try:
            await job.future
        except asyncio.CancelledError:
            job.future.cancel()
            raise
        except Exception as e:
            raise APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error") from None
        if chat:
            choice = wire.choice(True, job.text, job.finish_reason, None if logprobs is None else {"content": job.token_logprobs})
        else:
            legacy = None
            if logprobs is not None:
                legacy = _legacy_logprobs(job.token_logprobs, len(echo.prompt) if echo else 0)
                if echo is not None:  # the prompt comes first, in the logprobs as in the text
                    prompt_part = _legacy_logprobs(echo.logprobs, 0, echo.offsets)
                    legacy = {k: prompt_part[k] + v for k, v in legacy.items()}
            choice = wire.choice(False, (echo.prompt if echo is not None else "") + job.text, job.finish_reason, legacy)
        body_bytes = wire.completion(chat, cid, created, self.name, choice, wire.usage(len(ids), job.completion_tokens))
        return web.Response(body=body_bytes, content_type="application/json")

    async def _stream(self, request, body, job: Job, cid, created, chat: bool, n_prompt: int) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        stream = wire.Stream(chat, cid, created, self.name)
        sent = ""
        if chat:
            await resp.write(stream.piece("", first=True))
        queue = job.stream
        assert queue is not None
        waiter = asyncio.ensure_future(job.future)
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    text = getter.result()
                    sent += text
                    await resp.write(stream.piece(text))
                    continue
                getter.cancel()
                break
            while not queue.empty():
                text = queue.get_nowait()
                sent += text
                await resp.write(stream.piece(text))
            try:
                waiter.result()
            except Exception as e:
                await resp.write(wire.stream_error(f"generation failed: {e}"))
                return resp
            if job.text.startswith(sent) and len(job.text) > len(sent):  # held-back tail
                await resp.write(stream.piece(job.text[len(sent):]))
            await resp.write(stream.finish(job.finish_reason))
            if (body.get("stream_options") or {}).get("include_usage"):
                await resp.write(stream.usage(n_prompt, job.completion_tokens))
            await resp.write(wire.DONE)
        except (ConnectionResetError, asyncio.CancelledError):
            job.future.cancel()
            raise
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
    p.add_argument("--max-batch-size", type=int, default=32)
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
    print(f"hf_server: serving {server.name} ({args.quant}, {loaded.device}) on http://{args.host}:{args.port}/v1", flush=True)
    # keepalive_timeout: aiohttp closes a connection that has not sent a whole request by then,
    # which is the header timeout against slowloris (the body one is in Server._body)
    web.run_app(server.app(), host=args.host, port=args.port, print=None, access_log=None, keepalive_timeout=args.read_timeout)


if __name__ == "__main__":
    main()
