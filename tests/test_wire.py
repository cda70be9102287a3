"""The OpenAI wire format (evalkit/wire.py): what the servers build, byte for byte, and what the
engine reads back."""

from __future__ import annotations

import orjson
import pytest

from evalkit import wire


def test_bodies_are_built_in_openais_shape_byte_for_byte():
    chat = wire.completion(True, "c1", 7, "m", wire.choice(True, "hi", "stop"), wire.usage(3, 1))
    assert chat == (b'{"id":"c1","object":"chat.completion","created":7,"model":"m","choices":[{"index":0,"message":'
                    b'{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,'
                    b'"completion_tokens":1,"total_tokens":4}}')
    text = orjson.loads(wire.completion(False, "c2", 7, "m", wire.choice(False, "hi", "length"), wire.usage(2, 5)))
    assert text["object"] == "text_completion" and text["choices"] == [{"index": 0, "text": "hi", "finish_reason": "length", "logprobs": None}]
    s = wire.Stream(True, "c3", 7, "m")
    assert s.piece("a", first=True) == (b'data: {"id":"c3","object":"chat.completion.chunk","created":7,"model":"m","choices":'
                                        b'[{"index":0,"delta":{"role":"assistant","content":"a"},"finish_reason":null}]}\n\n')
    assert orjson.loads(s.finish("stop")[6:])["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert orjson.loads(s.usage(3, 2)[6:])["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert wire.DONE == b"data: [DONE]\n\n" and wire.stream_error("x").startswith(b'data: {"error":{"message":"x"')


def test_what_the_engine_reads():
    body = orjson.loads(wire.completion(True, "c", 1, "m", wire.choice(True, "hi", "stop"), wire.usage(3, 1)))
    assert wire.read_completion("chat", body) == ("hi", "stop", 3, 1)
    assert wire.read_completion("completions", {"choices": [{"text": None}]}) == ("", None, 0, 0)
    with pytest.raises(wire.WireError):
        wire.read_completion("chat", {"choices": []})
    assert wire.read_embeddings({"data": [{"index": 1, "embedding": [2]}, {"index": 0, "embedding": [1]}], "usage": {"prompt_tokens": 4}}) \
        == ([[1], [2]], 4)
    with pytest.raises(wire.WireError):
        wire.read_embeddings({"data": [{"embedding": [1]}]})
    # a stream read back, chunk by chunk, as the engine does
    s = wire.Stream(False, "c", 1, "m")
    events = [s.piece("Hel"), s.piece("lo"), s.finish("stop"), s.usage(2, 2), wire.DONE]
    pieces, finish, counts = [], None, None
    for event in events:
        payload = wire.sse_data(event)
        if payload == b"[DONE]":
            break
        p, f, c = wire.read_chunk("completions", orjson.loads(payload))
        pieces += p
        finish, counts = f or finish, c or counts
    assert ("".join(pieces), finish, counts) == ("Hello", "stop", (2, 2))
    assert wire.sse_data(b": keep-alive\n") is None and wire.sse_data(b"data:  {}\n") == b"{}"


def test_api_kinds_path_key_and_parse():
    from evalkit.errors import RequestFailure, RetryableFailure

    chat, emb, persp = wire.KINDS["chat"], wire.KINDS["embeddings"], wire.KINDS["perspective"]
    assert (chat.path, chat.openai, chat.streams) == ("/chat/completions", True, True)
    assert chat.auth_headers("k") == {"Authorization": "Bearer k"}
    assert persp.auth_headers("k") == {"X-Goog-Api-Key": "k"} and not persp.openai and not persp.streams
    reply = chat.parse(wire.completion(True, "c", 1, "m", wire.choice(True, "hi", "stop"), wire.usage(3, 1)))
    assert (reply.text, reply.finish_reason, reply.prompt_tokens, reply.completion_tokens) == ("hi", "stop", 3, 1)
    with pytest.raises(RetryableFailure, match="answered HTML"):
        chat.parse(b"<html>404</html>")
    with pytest.raises(RequestFailure, match="base64"):
        emb.parse(b'{"data": [{"index": 0, "embedding": "AAAA"}]}')
    assert emb.parse(b'{"data": [{"index": 0, "embedding": [0.5]}], "usage": {"prompt_tokens": 2}}').raw == {"embeddings": [[0.5]]}
    assert persp.parse(b'{"attributeScores": {}}').raw == {"attributeScores": {}}
    with pytest.raises(NotImplementedError):
        emb.read_chunk({})
