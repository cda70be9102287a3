"""The OpenAI wire format in one torch-free place: the bodies and server-sent-event chunks of
/v1/chat/completions, /v1/completions and /v1/embeddings. evalkit's engine reads them; our HF
server and the mock server build them. Keys keep OpenAI's order, so bodies are byte-stable.

The API kinds the engine sends to (chat, completions, embeddings, and JSON APIs such as
Perspective) are small classes at the end: a path under the base URL, how the key is sent, and
how a reply is read. A new endpoint kind is one more class in KINDS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from .errors import RequestFailure, RetryableFailure

DONE = b"data: [DONE]\n\n"  # the last event of every stream


class WireError(ValueError):
    """A body or chunk that is not what the API promises (the engine retries such replies)."""


# -- building (servers) ----------------------------------------------------------------------


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def choice(chat: bool, text: str, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
    """The one choice of a non-streamed reply; `logprobs` as the API kind shapes it (chat: its
    `content` list, completions: the legacy columns), or None."""
    if chat:
        out: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        if logprobs is not None:
            out["logprobs"] = logprobs
        return out
    return {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def completion(chat: bool, cid: str, created: int, model: str, the_choice: dict[str, Any], the_usage: dict[str, int]) -> bytes:
    """A whole non-streamed reply."""
    obj = "chat.completion" if chat else "text_completion"
    return orjson.dumps({"id": cid, "object": obj, "created": created, "model": model, "choices": [the_choice], "usage": the_usage})


class Stream:
    """The chunks of one streamed reply, each a complete `data: ...` event."""

    def __init__(self, chat: bool, cid: str, created: int, model: str):
        self.chat, self.cid, self.created, self.model = chat, cid, created, model
        self.obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = {"id": self.cid, "object": self.obj, "created": self.created, "model": self.model, "choices": choices, **extra}
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def piece(self, text: str, first: bool = False) -> bytes:
        """A piece of the answer; a chat stream's first piece also names the role."""
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            return self.chunk([{"index": 0, "delta": delta, "finish_reason": None}])
        return self.chunk([{"index": 0, "text": text, "finish_reason": None}])

    def finish(self, finish_reason: str | None) -> bytes:
        last = {"index": 0, "delta": {}, "finish_reason": finish_reason} if self.chat else {"index": 0, "text": "", "finish_reason": finish_reason}
        return self.chunk([last])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The usage event of `stream_options.include_usage`: no choices."""
        return self.chunk([], usage=usage(prompt_tokens, completion_tokens))


def stream_error(message: str, kind: str = "server_error") -> bytes:
    """An error in the middle of a stream (the status line has gone out already)."""
    return b"data: " + orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": None}}) + b"\n\n"


# -- reading (the engine) --------------------------------------------------------------------


def read_completion(api: str, data: Any) -> tuple[str, str | None, int, int]:
    """(text, finish reason, prompt tokens, completion tokens) of a chat or completions body;
    WireError when it holds no first choice with text."""
    try:
        first = data["choices"][0]
        text = first["message"]["content"] if api == "chat" else first["text"]
    except (KeyError, IndexError, TypeError) as e:
        raise WireError(type(e).__name__) from None
    prompt_tokens, completion_tokens = _usage(data)
    return (text if text is not None else ""), first.get("finish_reason"), prompt_tokens, completion_tokens


def read_embeddings(data: Any) -> tuple[list[Any], int]:
    """(the vectors in input order, prompt tokens) of an embeddings body; WireError when malformed."""
    try:
        vectors = [d["embedding"] for d in sorted(data["data"], key=lambda d: d["index"])]
    except (KeyError, TypeError) as e:
        raise WireError(type(e).__name__) from None
    return vectors, _usage(data)[0]


def sse_data(line: bytes) -> bytes | None:
    """The payload of one `data:` line of a stream, None for any other line."""
    line = line.strip()
    return line[5:].strip() if line.startswith(b"data:") else None


def read_chunk(api: str, chunk: dict[str, Any]) -> tuple[list[str], str | None, tuple[int, int] | None]:
    """(the text pieces, the finish reason if one came, the usage if it came) of one stream chunk."""
    pieces, finish = [], None
    for c in chunk.get("choices") or []:
        piece = (c.get("delta") or {}).get("content") if api == "chat" else c.get("text")
        if piece:
            pieces.append(piece)
        if c.get("finish_reason"):
            finish = c["finish_reason"]
    return pieces, finish, (_usage(chunk) if chunk.get("usage") else None)


def _usage(data: dict[str, Any]) -> tuple[int, int]:
    u = data.get("usage") or {}
    return int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0)


# -- API kinds (the engine's view of each endpoint kind) -------------------------------------


@dataclass
class Reply:
    """What the engine keeps of one whole reply."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    raw: Any = None  # the parsed body, for callers that read more than the text


class ApiKind:
    """One endpoint kind: where its requests go under a base URL, how the key is sent, and how a
    reply is read. `openai`: the body names the model, and /models lists what is served."""

    name: str
    path: str
    openai = True
    streams = False  # answers server-sent events when asked to

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def parse(self, raw: bytes) -> Reply:
        raise NotImplementedError

    def read_chunk(self, chunk: dict[str, Any]) -> tuple[list[str], str | None, tuple[int, int] | None]:
        raise NotImplementedError(f"{self.name} does not stream")


class _Generation(ApiKind):
    streams = True

    def parse(self, raw: bytes) -> Reply:
        try:
            data = orjson.loads(raw)
            text, finish, prompt_tokens, completion_tokens = read_completion(self.name, data)
        except (orjson.JSONDecodeError, WireError) as e:
            if raw.lstrip()[:1] == b"<":
                raise RetryableFailure("transient", "the endpoint answered HTML, not JSON: is the URL an OpenAI API base "
                                                    "(usually ending in /v1)?") from None
            kind = type(e).__name__ if isinstance(e, orjson.JSONDecodeError) else str(e)
            raise RetryableFailure("transient", f"malformed response body ({kind}): {raw[:200]!r}") from None
        return Reply(text, finish, prompt_tokens, completion_tokens, data)

    def read_chunk(self, chunk: dict[str, Any]) -> tuple[list[str], str | None, tuple[int, int] | None]:
        return read_chunk(self.name, chunk)


class Chat(_Generation):
    name, path = "chat", "/chat/completions"


class Completions(_Generation):
    name, path = "completions", "/completions"


class Embeddings(ApiKind):
    name, path = "embeddings", "/embeddings"

    def parse(self, raw: bytes) -> Reply:
        try:
            vectors, prompt_tokens = read_embeddings(orjson.loads(raw))
        except orjson.JSONDecodeError:
            raise RetryableFailure("transient", f"malformed embeddings body (JSONDecodeError): {raw[:200]!r}") from None
        except WireError as e:
            raise RetryableFailure("transient", f"malformed embeddings body ({e}): {raw[:200]!r}") from None
        if any(not isinstance(v, list) for v in vectors):
            raise RequestFailure("bad_request", "embeddings came back base64-encoded; ask for encoding_format float")
        return Reply("", None, prompt_tokens, 0, {"embeddings": vectors})


class Perspective(ApiKind):
    """Google's Perspective API (comments:analyze), the toxicity judge's; the caller reads `raw`."""

    name, path = "perspective", "/comments:analyze"
    openai = False

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"X-Goog-Api-Key": key}  # Google's own header: a key in the URL would end up in logs

    def parse(self, raw: bytes) -> Reply:
        try:
            return Reply("", raw=orjson.loads(raw))
        except orjson.JSONDecodeError:
            raise RetryableFailure("transient", f"malformed JSON body: {raw[:200]!r}") from None


KINDS: dict[str, ApiKind] = {k.name: k for k in (Chat(), Completions(), Embeddings(), Perspective())}
