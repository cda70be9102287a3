"""Our HF-transformers server with tiny random models, driven by the official openai SDK."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO, free_port, read_jsonl, run_cli, wait_http

torch = pytest.importorskip("torch")
openai = pytest.importorskip("openai")

from servers.tiny import CHAT_TEMPLATE, tiny_encoder, tiny_llama  # noqa: E402


class HFServer:
    def __init__(self, model: Path, *args: str, env: dict | None = None):
        self.port = free_port()
        self.name = str(model)
        cmd = [sys.executable, "-m", "servers.hf_server", str(model), "--port", str(self.port), "--device", "cpu", *args]
        import os

        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})
        self.url = f"http://127.0.0.1:{self.port}/v1"
        wait_http(f"http://127.0.0.1:{self.port}/health", timeout=180, proc=self.proc)

    def health(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": tiny_llama(root / "llama", max_positions=512), "plain": tiny_llama(root / "plain", chat_template=False),
            "encoder": tiny_encoder(root / "enc")}


@pytest.fixture(scope="module")
def server(models):
    s = HFServer(models["llama"], "--served-model-name", "tiny-llama", "--max-batch-size", "64")
    yield s
    s.stop()


def client(server: HFServer, key: str = "unused"):
    return openai.OpenAI(base_url=server.url, api_key=key, max_retries=0, timeout=120)


def test_sdk_models_chat_stream_completions_logprobs(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["tiny-llama"]
    msgs = [{"role": "user", "content": "hello world"}]
    a = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0)
    b = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0)
    text = a.choices[0].message.content
    assert isinstance(text, str) and text == b.choices[0].message.content  # greedy is deterministic
    assert a.choices[0].finish_reason in ("stop", "length") and a.object == "chat.completion"
    assert 0 < a.usage.completion_tokens <= 12 and a.usage.prompt_tokens > 0
    assert a.usage.total_tokens == a.usage.prompt_tokens + a.usage.completion_tokens

    chunks = list(c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == a.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens

    if len(text) > 4:  # a stop string cuts the answer where it first occurs
        stop = text[2:4]
        s = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=0, stop=[stop])
        assert s.choices[0].message.content == text[: text.find(stop)] and s.choices[0].finish_reason == "stop"

    lp = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = lp.choices[0].logprobs.content
    assert len(content) == lp.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob <= 0 and t.logprob >= t.top_logprobs[-1].logprob - 1e-5 for t in content)

    comp = c.completions.create(model="tiny-llama", prompt="the quick brown fox", max_tokens=6, temperature=0, logprobs=1)
    assert comp.object == "text_completion" and isinstance(comp.choices[0].text, str)
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens

    s1 = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=1.0, seed=7)
    s2 = c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=12, temperature=1.0, seed=7)
    assert s1.choices[0].message.content == s2.choices[0].message.content


def _direct_logprobs(model_dir: Path, prompt: str):
    """Each prompt token's logprob from a forward pass of the same weights, outside the server."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return ids, [None] + [float(logp[i - 1, ids[i]]) for i in range(1, len(ids))]


def test_echo_logprobs_equal_a_direct_forward_pass(server, models):
    c = client(server)
    prompt = "the quick brown fox jumps over the lazy dog"
    ids, direct = _direct_logprobs(models["llama"], prompt)
    r = c.completions.create(model="tiny-llama", prompt=prompt, echo=True, logprobs=2, max_tokens=0)
    ch = r.choices[0]
    assert ch.text == prompt and r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(direct[1:], abs=1e-4)
    assert all(max(top.values()) >= chosen - 1e-5 and len(top) == 2 for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    # text_offset: where each token starts in the echoed text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] < len(prompt)
    # with generation after the echo, the prompt part is unchanged and the new tokens follow it
    g = c.completions.create(model="tiny-llama", prompt=prompt, echo=True, logprobs=1, max_tokens=3, temperature=0)
    glp = g.choices[0].logprobs
    assert g.choices[0].text.startswith(prompt)
    assert len(glp.tokens) == len(ids) + g.usage.completion_tokens
    assert glp.token_logprobs[: len(ids)] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert all(o >= len(prompt) for o in glp.text_offset[len(ids):])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # 0 tokens only with echo
        c.completions.create(model="tiny-llama", prompt=prompt, max_tokens=0)
    with pytest.raises(openai.BadRequestError, match="echo is not supported with stream"):
        c.completions.create(model="tiny-llama", prompt=prompt, echo=True, stream=True, max_tokens=2)


def test_reference_nll_subtask_equals_a_direct_computation(server, models, tmp_path):
    """The judge-free utility subtask end to end (CLI -> engine -> /v1/completions with echo ->
    score) against the NLL of the reference answers computed here from the same weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evalkit.tasks.utility import ALPACA_PROMPT

    rows = [{"instruction": "say hello", "output": "hello world", "generator": "x", "dataset": "t"},
            {"instruction": "name a fox", "output": "the quick brown fox", "generator": "x", "dataset": "t"},
            {"instruction": "and a dog?", "output": "the lazy dog, sorry", "generator": "x", "dataset": "t"}]
    (tmp_path / "data" / "alpaca_eval").mkdir(parents=True)
    (tmp_path / "data" / "alpaca_eval" / "alpaca_eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    # --max-tokens and --temperature of the run do not change the measurement
    p = run_cli("run", "--subtasks", "reference_nll", "--endpoint", server.url, "--model", "tiny-llama", "--data-path",
                str(tmp_path / "data"), "--output", str(tmp_path / "runs"), "--run-name", "nll", "--max-tokens", "50", "--temperature", "1",
                "--accept-modified-data")  # three rows of our own in alpaca_eval's place
    assert p.returncode == 0, p.stderr

    tok = AutoTokenizer.from_pretrained(models["llama"])
    model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32).eval()
    total, count = 0.0, 0
    for r in rows:
        context = ALPACA_PROMPT.format(instruction=r["instruction"])
        enc = tok(context + r["output"], return_offsets_mapping=True)
        ids = enc["input_ids"]
        with torch.no_grad():
            logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        # every token holding a character of the answer
        scored = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > len(context)]
        total -= sum(float(logp[i - 1, ids[i]]) for i in scored)
        count += len(scored)
    recs = read_jsonl(tmp_path / "runs" / "nll" / "responses" / "reference_nll.jsonl")
    assert [r["response"] for r in recs] == [r["output"] for r in rows] and all(r["params"]["max_tokens"] == 1 for r in recs)
    assert sum(r["n_tokens"] for r in recs) == count
    results = json.loads((tmp_path / "runs" / "nll" / "results.json").read_text())
    metric = next(m for m in results["subtasks"]["reference_nll"]["metrics"] if m["name"] == "nll")
    assert metric["value"] == pytest.approx(total / count, rel=1e-5) and metric["direction"] == "lower_is_better"
    assert metric["details"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert metric["ci_method"] == "bootstrap" and metric["ci"][0] <= metric["value"] <= metric["ci"][1]


def test_bad_request_matrix_and_the_server_survives(server):
    c = client(server)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(model="nope", messages=msgs), openai.NotFoundError, "does not exist"),
        (dict(model="tiny-llama", messages=[]), openai.BadRequestError, "messages"),
        (dict(model="tiny-llama", messages=msgs, n=2), openai.BadRequestError, "n=1"),
        (dict(model="tiny-llama", messages=msgs, temperature=-1), openai.BadRequestError, "temperature"),
        (dict(model="tiny-llama", messages=msgs, max_tokens=0), openai.BadRequestError, "max_tokens"),
        (dict(model="tiny-llama", messages=msgs, top_p=2), openai.BadRequestError, "top_p"),
        (dict(model="tiny-llama", messages=msgs, stop=["a", "b", "c", "d", "e"]), openai.BadRequestError, "stop"),
        (dict(model="tiny-llama", messages=[{"role": "user", "content": "hello " * 600}]), openai.BadRequestError, "maximum context length"),
        (dict(model="tiny-llama", messages=[{"role": "wizard", "content": "x"}]), openai.BadRequestError, "role"),
        # wrong types are refused before anything starts (a stream would otherwise hang or stream anyway)
        (dict(model="tiny-llama", messages=msgs, stream=True, stream_options="yes"), openai.BadRequestError, "stream_options"),
        (dict(model="tiny-llama", messages=msgs, extra_body={"stream": "false"}), openai.BadRequestError, "'stream' must be true or false"),
        (dict(model="tiny-llama", messages=msgs, extra_body={"logprobs": -1}), openai.BadRequestError, "'logprobs' must be true or false"),
        (dict(model="tiny-llama", messages=msgs, extra_body={"stop": {}}), openai.BadRequestError, "stop"),
        (dict(model="tiny-llama", messages=msgs, extra_body={"n": True}), openai.BadRequestError, "n=1"),
        (dict(model="tiny-llama", messages=msgs, top_logprobs=2, logprobs=True, extra_body={"top_logprobs": "2"}),
         openai.BadRequestError, "top_logprobs"),
    ]
    for kwargs, exc, words in cases:
        with pytest.raises(exc) as e:
            c.chat.completions.create(**kwargs)
        assert words in str(e.value), (kwargs, str(e.value))
    with pytest.raises(openai.BadRequestError, match="embedding"):
        c.embeddings.create(model="tiny-llama", input="x")
    for raw in (b"{not json", b"[1, 2]", b'{"messages": []}'):
        req = urllib.request.Request(server.url + "/chat/completions", data=raw, headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=10)
        assert e.value.code == 400 and "error" in json.loads(e.value.read())
    big = urllib.request.Request(server.url + "/chat/completions", data=b" " * (33 * 1024 * 1024), headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:  # over the 32 MiB body limit
        urllib.request.urlopen(big, timeout=30)
    assert e.value.code == 413 and "error" in json.loads(e.value.read())
    assert server.health()["status"] == "ok"
    assert c.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=3).choices[0].message.content is not None


def test_64_concurrent_requests_are_generated_together(server):
    before = server.health()

    async def go():
        ac = openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=300)
        outs = await asyncio.gather(*(
            ac.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": f"question {i}"}],
                                       max_tokens=8, temperature=0)
            for i in range(64)
        ))
        await ac.close()
        return outs

    outs = asyncio.run(go())
    assert len(outs) == 64 and all(o.choices[0].message.content is not None for o in outs)
    after = server.health()
    admitted, steps = after["admitted"] - before["admitted"], after["steps"] - before["steps"]
    tokens = sum(o.usage.completion_tokens for o in outs)
    assert admitted == 64 and after["tokens"] - before["tokens"] == tokens
    # one at a time, every token after a request's first would take a decode step of its own
    assert steps < (tokens - 64) / 4, f"{tokens} tokens for 64 requests took {steps} decode steps: not batched"
    assert after["running"] == 0 and after["waiting"] == 0


def test_streaming_and_plain_requests_share_a_batch(server):
    async def go():
        ac = openai.AsyncOpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=300)
        msgs = [{"role": "user", "content": "hello world"}]

        async def streamed():
            chunks = await ac.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=10, temperature=0, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])

        async def plain():
            r = await ac.chat.completions.create(model="tiny-llama", messages=msgs, max_tokens=10, temperature=0)
            return r.choices[0].message.content

        outs = await asyncio.gather(*[streamed() if i % 2 else plain() for i in range(16)])
        await ac.close()
        return outs

    outs = asyncio.run(go())
    assert len(set(outs)) == 1  # same greedy answer whether streamed or not, in one mixed batch


def test_abandoned_streams_stop_generating_and_a_new_request_is_answered(models, tmp_path):
    """40 clients open 1500-token streams, read the first piece and hang up, 5 more give up on a
    plain request: the server stops their rows (its stats count them cancelled, far short of 1500
    tokens each) and answers a 4-token request meanwhile."""
    import time

    import aiohttp

    s = HFServer(tiny_llama(tmp_path / "long"), "--served-model-name", "long", "--max-batch-size", "64")
    try:
        before = s.health()

        async def go():
            body = {"model": "long", "messages": [{"role": "user", "content": "tell me a long story"}], "max_tokens": 1500,
                    "stream": True, "ignore_eos": True}

            async def abandon():
                session = aiohttp.ClientSession()
                resp = await session.post(s.url + "/chat/completions", json=body)
                assert resp.status == 200
                await resp.content.readline()  # the first event arrived: the row runs
                resp.close()  # hang up mid-stream
                await session.close()

            async def give_up():  # a plain (not streamed) request whose client times out and closes
                async with aiohttp.ClientSession() as session:
                    with pytest.raises(TimeoutError):
                        await session.post(s.url + "/chat/completions", json={**body, "stream": False},
                                           timeout=aiohttp.ClientTimeout(total=1.0))

            await asyncio.gather(*(abandon() for _ in range(40)), *(give_up() for _ in range(5)))
            ac = openai.AsyncOpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=60)
            r = await ac.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                                 temperature=0, extra_body={"ignore_eos": True})
            await ac.close()
            return r

        r = asyncio.run(go())
        assert r.usage.completion_tokens == 4
        deadline = time.monotonic() + 60
        while (h := s.health())["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert h["running"] == 0 and h["waiting"] == 0
        assert h["cancelled"] - before["cancelled"] == 45
        assert h["tokens"] - before["tokens"] < 45 * 1500 // 4  # they stopped long before their 1500 tokens
    finally:
        s.stop()


def test_a_full_server_answers_503_with_retry_after(models):

    s = HFServer(models["llama"], "--served-model-name", "tiny", "--max-batch-size", "1", "--max-waiting", "1", "--max-kv-tokens", "600")
    try:
        async def go():
            ac = openai.AsyncOpenAI(base_url=s.url, api_key="x", max_retries=0, timeout=120)
            long = dict(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=400, temperature=0,
                        extra_body={"ignore_eos": True})
            running = asyncio.ensure_future(ac.chat.completions.create(**long))
            while s.health()["running"] < 1:
                await asyncio.sleep(0.02)
            waiting = asyncio.ensure_future(ac.chat.completions.create(**long))
            while s.health()["waiting"] < 1:
                await asyncio.sleep(0.02)
            with pytest.raises(openai.APIStatusError) as e:  # one running, one waiting: no room for a third
                await ac.chat.completions.create(**long)
            assert e.value.status_code == 503 and e.value.response.headers["Retry-After"] == "1"
            assert "full" in str(e.value)
            outs = await asyncio.gather(running, waiting)  # the admitted ones are unaffected
            await ac.close()
            return outs

        outs = asyncio.run(go())
        assert [o.usage.completion_tokens for o in outs] == [400, 400]
        with pytest.raises(openai.BadRequestError, match="--max-kv-tokens"):  # within the context, beyond the KV bound
            client(s).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=470)
    finally:
        s.stop()


def test_evalkit_runs_an_advbench_slice_against_the_server(server, data_root, tmp_path):
    p = run_cli("run", "--subtasks", "advbench", "--limit", "12", "--endpoint", server.url, "--data-path", str(data_root),
                "--output", str(tmp_path), "--max-tokens", "8", "--concurrency", "12")
    assert p.returncode == 0, p.stderr
    recs = read_jsonl(tmp_path / "tiny-llama" / "responses" / "advbench.jsonl")
    assert len(recs) == 12 and all(r.get("error") is None and r["usage"]["completion_tokens"] <= 8 for r in recs)
    res = json.loads((tmp_path / "tiny-llama" / "results.json").read_text())
    assert res["subtasks"]["advbench"]["metrics"][0]["n"] == 12


def test_chat_template_file_and_api_key(models, tmp_path):
    bare = HFServer(models["plain"], "--served-model-name", "plain")
    try:
        with pytest.raises(openai.BadRequestError, match="--chat-template"):
            client(bare).chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert client(bare).completions.create(model="plain", prompt="hello", max_tokens=2).choices[0].text is not None
    finally:
        bare.stop()
    tpl = tmp_path / "chat.jinja"
    tpl.write_text(CHAT_TEMPLATE)
    s = HFServer(models["plain"], "--served-model-name", "plain", "--chat-template", str(tpl), "--api-key-env", "TINY_KEY",
                 "--read-timeout", "1.5", env={"TINY_KEY": "k-123"})
    try:
        with pytest.raises(openai.AuthenticationError):
            client(s, "wrong").chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        r = client(s, "k-123").chat.completions.create(model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.choices[0].message.content is not None
        for header, code in (("bearer k-123", 200), ("BEARER  k-123", 200), ("Basic k-123", 401), ("Bearer k-12", 401)):
            req = urllib.request.Request(s.url + "/models", headers={"Authorization": header})
            try:
                with urllib.request.urlopen(req, timeout=10) as resp:
                    got = resp.status
            except urllib.error.HTTPError as e:
                got = e.code
            assert got == code, header  # the scheme in any case, the key exactly
        from servers.process import ready

        assert ready(s.url) and ready(s.url, "k-123")  # up, whether or not the checker knows the key
        # slow clients (slowloris) are cut off after --read-timeout: half a header, then a short body
        import socket

        port = int(s.url.split(":")[2].split("/")[0])
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            assert sock.recv(1024) == b""  # closed by the server, no request ever completed
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k-123\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\"")
            assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        assert client(s, "k-123").models.list().data[0].id == "plain"  # and it keeps serving
    finally:
        s.stop()


def test_embeddings_server(models):
    s = HFServer(models["encoder"], "--task", "embed", "--served-model-name", "tiny-embed")
    try:
        c = client(s)
        r = c.embeddings.create(model="tiny-embed", input=["hello world", "the quick brown fox", "hello world"])
        vecs = [d.embedding for d in r.data]
        assert len(vecs) == 3 and len(vecs[0]) == 32
        assert all(abs(sum(x * x for x in v) - 1.0) < 1e-4 for v in vecs)  # normalised
        assert vecs[0] == pytest.approx(vecs[2], abs=1e-5) and vecs[0] != pytest.approx(vecs[1], abs=1e-3)
        assert r.usage.prompt_tokens > 0
        raw = c.embeddings.create(model="tiny-embed", input="hello world", encoding_format="float")
        assert raw.data[0].embedding == pytest.approx(vecs[0], abs=1e-6)  # base64 (the SDK's default) and float agree
        with pytest.raises(openai.BadRequestError, match="embeddings only"):
            c.chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "x"}])
    finally:
        s.stop()


@pytest.mark.parametrize("quant,layer", [("bnb4", "Linear4bit"), ("bnb8", "Linear8bitLt"), ("hqq", "HQQLinear")])
def test_quantized_loading_answers_on_cpu(models, quant, layer):
    pytest.importorskip("bitsandbytes" if quant.startswith("bnb") else "hqq")
    from servers.loading import ModelSpec, load

    seen = []
    loaded = load(ModelSpec(str(models["llama"]), device="cpu", quant=quant, hooks=[lambda m, t: seen.append(type(m).__name__)]))
    assert type(loaded.model.model.layers[0].mlp.up_proj).__name__ == layer
    assert seen == ["LlamaForCausalLM"]  # the intervention hook point ran on the loaded model
    ids = loaded.tokenizer("hello world", return_tensors="pt")
    out = loaded.model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]


def test_hqq_through_the_server(models):
    pytest.importorskip("hqq")
    s = HFServer(models["llama"], "--quant", "hqq", "--hqq-bits", "4", "--hqq-group-size", "32", "--served-model-name", "tiny-hqq")
    try:
        r = client(s).chat.completions.create(model="tiny-hqq", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert r.usage.completion_tokens >= 1
    finally:
        s.stop()


def test_gptq_checkpoint_on_cpu_is_a_clear_error(models, tmp_path):
    from servers.loading import LoadError, ModelSpec, load

    ck = tmp_path / "gptq"
    shutil.copytree(models["llama"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="GPTQ.*CUDA GPU"):
        load(ModelSpec(str(ck), device="cpu"))
    with pytest.raises(LoadError, match="--device cpu"):
        if not torch.cuda.is_available():
            load(ModelSpec(str(models["llama"]), device="cuda"))
        else:
            raise LoadError("--device cpu (skipped: a GPU is present)")


def test_evalkit_against_transformers_serve_as_a_peer(models, data_root, tmp_path):
    """The engine talks to another OpenAI-compatible server unchanged: `transformers serve`."""
    cli = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    if not Path(cli).exists():
        pytest.skip("transformers CLI not installed")
    pytest.importorskip("fastapi")
    port = free_port()
    proc = subprocess.Popen([cli, "serve", str(models["llama"]), "--port", str(port), "--host", "127.0.0.1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=180, proc=proc)
        p = run_cli("generate", "--subtasks", "advbench", "--limit", "6", "--endpoint", f"http://127.0.0.1:{port}/v1",
                    "--model", str(models["llama"]), "--data-path", str(data_root), "--output", str(tmp_path), "--max-tokens", "4")
        assert p.returncode == 0, p.stderr
        recs = read_jsonl(next(tmp_path.glob("*/responses/advbench.jsonl")))
        assert len(recs) == 6 and all(r.get("error") is None and r["usage"]["completion_tokens"] <= 4 for r in recs)
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
