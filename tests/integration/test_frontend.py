"""``dynrt frontend`` as a real process, driven by the official ``openai`` client and by
raw HTTP, against real mock workers, etcd and NATS.

The module shares one deployment (``cluster``): two workers with ``--context-length
256`` and a frontend without auth (``fe``), plus a second frontend with ``--api-key``
and a small ``--max-body-bytes`` (``fe_auth``). Tests that stop or kill a process start
their own.

Timing: the workers run the mock engine at ``--speedup 0.5``: a decode step takes
>= 11.5 ms, so 200 tokens take >= 2.3 s ("long": always cancelled or awaited, never
raced against), while the 8-40-token requests of the functional tests take well under
a second even on a busy 2-core machine. The mock engine is deterministic: the same
prompt and seed give the same tokens on any worker.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from harness.frontend import FrontendProcess
from harness.metrics import metric, parse_metrics
from harness.worker import WorkerProcess

pytestmark = pytest.mark.timeout(60)

MODEL = "mock-model"
CONTEXT_LENGTH = 256
SPEEDUP = 0.5
API_KEY = "sk-test-" + uuid.uuid4().hex[:8]
MAX_BODY = 2048
ERROR_KEYS = {"message", "type", "param", "code"}
TOK = mock_tokenizer()
MESSAGES = [{"role": "system", "content": "You are a quiet worker."},
            {"role": "user", "content": "Tell me a story about the river and the old house."}]
PROMPT = "Once upon a time the river ran through the old town"
LONG_TOKENS = 200  # >= 2.3 s at SPEEDUP


def chat_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return len(TOK.apply_chat_template(messages))


def chat_body(max_tokens: int = 16, *, stream: bool = False, seed: int = 1, content: str = "hello there",
              **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "seed": seed, "ignore_eos": True, "stream": stream, **extra}


# ---------------------------------------------------------------------------
# deployment
# ---------------------------------------------------------------------------


@dataclass
class Cluster:
    tmp: Path
    namespace: str
    etcd: EtcdServer
    nats: NatsServer
    workers: list[WorkerProcess]
    fe: FrontendProcess
    fe_auth: FrontendProcess

    def worker(self, **kw: Any) -> WorkerProcess:
        args = ["--context-length", str(CONTEXT_LENGTH), *kw.pop("args", [])]
        return WorkerProcess(self.tmp, namespace=self.namespace, etcd_endpoints=self.etcd.endpoint,
                             nats_url=self.nats.url, speedup=kw.pop("speedup", SPEEDUP), args=args, **kw)

    def frontend(self, **kw: Any) -> FrontendProcess:
        return FrontendProcess(self.tmp, namespace=self.namespace, etcd_endpoints=self.etcd.endpoint,
                               nats_url=self.nats.url, **kw)

    def client(self, fe: FrontendProcess | None = None, **kw: Any) -> openai.AsyncOpenAI:
        fe = fe or self.fe
        return openai.AsyncOpenAI(base_url=fe.openai_url, api_key=kw.pop("api_key", fe.api_key or "unused"),
                                  max_retries=0, timeout=30, **kw)


@pytest.fixture(scope="module")
async def cluster(etcd_server: EtcdServer, nats_server: NatsServer,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Cluster]:
    tmp = tmp_path_factory.mktemp("frontend")
    namespace = "t" + uuid.uuid4().hex[:10]
    started: list[WorkerProcess | FrontendProcess] = []
    c = Cluster(tmp, namespace, etcd_server, nats_server, [], None, None)  # type: ignore[arg-type]
    try:
        c.workers = [c.worker(name=f"worker{i}") for i in range(2)]
        started += c.workers
        await asyncio.gather(*(w.start() for w in c.workers))
        c.fe = c.frontend(expect_instances=2, name="fe")
        c.fe_auth = c.frontend(expect_instances=2, name="fe_auth", api_key=API_KEY,
                               args=["--max-body-bytes", str(MAX_BODY)])
        started += [c.fe, c.fe_auth]
        await asyncio.gather(c.fe.start(), c.fe_auth.start())
        yield c
    finally:
        await asyncio.gather(*(p.stop() for p in started))


async def kv_used(workers: list[WorkerProcess], session: aiohttp.ClientSession) -> list[int]:
    async def one(w: WorkerProcess) -> int:
        async with session.get(w.health_url) as response:
            return int((await response.json())["kv_blocks_used"])

    return list(await asyncio.gather(*(one(w) for w in workers)))


async def wait_kv(workers: list[WorkerProcess], session: aiohttp.ClientSession, predicate: Any,
                  timeout: float, what: str) -> tuple[float, list[int]]:
    start = time.monotonic()
    while True:
        used = await kv_used(workers, session)
        if predicate(used):
            return time.monotonic() - start, used
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; kv_blocks_used {used}")
        await asyncio.sleep(0.002)


async def wait_idle(c: Cluster) -> None:
    """No request left on any worker or frontend (earlier tests' cancellations done)."""
    async with aiohttp.ClientSession() as session:
        await wait_kv(c.workers, session, lambda used: sum(used) == 0, 10, "idle workers")
    for fe in (c.fe, c.fe_auth):
        deadline = time.monotonic() + 10
        while (await fe.health())[1]["in_flight"]:
            assert time.monotonic() < deadline, f"{fe.name} still has requests in flight"
            await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------
# raw HTTP
# ---------------------------------------------------------------------------


async def post(url: str, body: Any, headers: dict[str, str] | None = None,
               method: str = "POST") -> tuple[int, dict[str, str], Any]:
    """(status, headers, parsed JSON body); ``body`` bytes are sent as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.request(method, url, data=data,
                                   headers={"Content-Type": "application/json", **(headers or {})}) as response:
            assert response.content_type == "application/json", (response.status, await response.text())
            return response.status, dict(response.headers), json.loads(await response.read())


def assert_error(status: int, body: Any, expected_status: int, *, param: str | None, code: str | None = None,
                 type: str = "invalid_request_error", message_has: str = "") -> dict[str, Any]:
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert "Traceback" not in error["message"]
    assert error["type"] == type, error
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    assert message_has in error["message"], error
    return error


def sse_events(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an SSE body; every event must be one ``data:`` line."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(block[len("data: "):])
    return events


class RawStream:
    """A request over a plain socket, so a test can hang up whenever it wants."""

    def __init__(self, port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.port = port
        self.path = path
        self.body = json.dumps(body).encode()
        self.headers = headers or {}
        self.received = b""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> "RawStream":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(self.body)}\r\n")
        head += "".join(f"{k}: {v}\r\n" for k, v in self.headers.items())
        self.writer.write(head.encode() + b"\r\n" + self.body)
        await self.writer.drain()
        return self

    async def read_until(self, predicate: Any, timeout: float = 10.0) -> bytes:
        assert self.reader is not None
        deadline = time.monotonic() + timeout
        while not predicate(self.received):
            chunk = await asyncio.wait_for(self.reader.read(65536), max(0.01, deadline - time.monotonic()))
            assert chunk, f"connection closed early; got {self.received[-500:]!r}"
            self.received += chunk
        return self.received

    def hang_up(self) -> None:
        assert self.writer is not None
        self.writer.close()


# ---------------------------------------------------------------------------
# models, chat, completions
# ---------------------------------------------------------------------------


async def test_models_lists_exactly_the_live_model(cluster: Cluster) -> None:
    models = await cluster.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    status, _, body = await post(f"{cluster.fe.url}/v1/models", None, method="GET")
    assert status == 200 and body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]


async def test_chat_non_streamed_and_streamed_agree(cluster: Cluster) -> None:
    client = cluster.client()
    prompt_tokens = chat_prompt_tokens(MESSAGES)
    full = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, seed=11,  # type: ignore[arg-type]
                                                extra_body={"ignore_eos": True})
    assert full.object == "chat.completion" and full.model == MODEL and full.id.startswith("chatcmpl-")
    assert len(full.choices) == 1
    choice = full.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    text = choice.message.content
    assert text and text.strip()
    assert full.usage is not None
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == \
        (prompt_tokens, 24, prompt_tokens + 24)
    # The mock engine samples whole words: the text re-encodes to exactly 24 tokens.
    assert len(TOK.encode(text)) == 24

    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24, seed=11,  # type: ignore[arg-type]
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens, usage_chunk.usage.total_tokens) \
        == (prompt_tokens, 24, prompt_tokens + 24)
    assert all(c.usage is None for c in chunks[:-1])
    finishes = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert streamed == text
    assert sum(1 for c in chunks[:-1] if c.choices[0].delta.content) >= 2  # really streamed

    # max_completion_tokens wins over max_tokens; without include_usage there is no usage chunk.
    short = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=24,  # type: ignore[arg-type]
                                                 max_completion_tokens=7, seed=11, extra_body={"ignore_eos": True})
    assert short.usage is not None and short.usage.completion_tokens == 7
    assert short.choices[0].finish_reason == "length"
    assert text.startswith(short.choices[0].message.content or "<empty>")
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, seed=11,  # type: ignore[arg-type]
                                                  stream=True, extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert all(c.usage is None and len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_completions_non_streamed_and_streamed_agree(cluster: Cluster) -> None:
    client = cluster.client()
    prompt_tokens = len(TOK.encode(PROMPT))
    full = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, seed=5,
                                           extra_body={"ignore_eos": True})
    assert full.object == "text_completion" and full.model == MODEL and full.id.startswith("cmpl-")
    assert len(full.choices) == 1 and full.choices[0].finish_reason == "length"
    text = full.choices[0].text
    assert text.strip() and len(TOK.encode(text)) == 20
    assert full.usage is not None
    assert (full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens) == \
        (prompt_tokens, 20, prompt_tokens + 20)

    stream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, seed=5, stream=True,
                                             stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (prompt_tokens, 20)
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert "".join(c.choices[0].text for c in chunks[:-1]) == text

    # Token-id prompts are the same prompt.
    by_ids = await client.completions.create(model=MODEL, prompt=TOK.encode(PROMPT), max_tokens=20, seed=5,
                                             extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == text and by_ids.usage is not None and by_ids.usage.prompt_tokens == prompt_tokens
    # A different seed gives a different answer (the seed reaches the engine).
    other = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, seed=6,
                                            extra_body={"ignore_eos": True})
    assert other.choices[0].text != text


def _stop_case(text: str) -> tuple[str, str, int]:
    """A two-word stop string from the middle of ``text``: (stop, expected text, tokens
    generated up to and including the one that completes the stop string)."""
    ids = TOK.encode(text)
    stop = TOK.decode(ids[10:12])
    expected = text[: text.index(stop)]
    needed = next(k for k in range(1, len(ids) + 1) if stop in TOK.decode(ids[:k]))
    return stop, expected, needed


async def test_stop_strings(cluster: Cluster) -> None:
    client = cluster.client()
    prompt_tokens = chat_prompt_tokens(MESSAGES)
    full = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=3,  # type: ignore[arg-type]
                                                extra_body={"ignore_eos": True})
    text = full.choices[0].message.content or ""
    stop, expected, needed = _stop_case(text)
    assert expected.strip()

    stopped = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=3,  # type: ignore[arg-type]
                                                   stop=[stop, "never-in-output-@@"], extra_body={"ignore_eos": True})
    assert stopped.choices[0].message.content == expected
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.prompt_tokens == prompt_tokens
    assert stopped.usage.completion_tokens == needed

    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=40, seed=3, stop=stop,  # type: ignore[arg-type]
                                                  stream=True, stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == expected
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == needed

    # completions: same rule.
    ctext = (await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, seed=3,
                                             extra_body={"ignore_eos": True})).choices[0].text
    cstop, cexpected, _ = _stop_case(ctext)
    cstream = await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, seed=3, stop=cstop,
                                              stream=True, extra_body={"ignore_eos": True})
    cchunks = [chunk async for chunk in cstream]
    assert "".join(c.choices[0].text for c in cchunks) == cexpected
    assert cchunks[-1].choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


async def test_request_errors_are_openai_shaped(cluster: Cluster) -> None:
    chat = f"{cluster.fe.url}/v1/chat/completions"
    comp = f"{cluster.fe.url}/v1/completions"

    status, _, body = await post(chat, b'{"model": "mock-model", "messages": [')
    assert_error(status, body, 400, param=None, message_has="not valid JSON")
    status, _, body = await post(chat, b"")
    assert_error(status, body, 400, param=None)

    # wrong types / values name the parameter
    for field, value in [("max_tokens", "ten"), ("messages", "hi"), ("stream", "yes"), ("temperature", 5),
                         ("seed", 1.5), ("max_tokens", 0)]:
        status, _, body = await post(chat, {**chat_body(), field: value})
        assert_error(status, body, 400, param=field)
    status, _, body = await post(chat, {**chat_body(), "messages": [{"role": "wizard", "content": "x"}]})
    assert_error(status, body, 400, param="messages[0].role")
    status, _, body = await post(comp, {"model": MODEL, "prompt": {"text": "x"}})
    assert_error(status, body, 400, param="prompt")

    # missing fields
    status, _, body = await post(chat, {"model": MODEL})
    assert_error(status, body, 400, param="messages", message_has="messages")
    status, _, body = await post(chat, {"messages": [{"role": "user", "content": "x"}]})
    assert_error(status, body, 400, param="model", message_has="model")
    status, _, body = await post(chat, {"model": MODEL, "messages": [{"content": "x"}]})
    assert_error(status, body, 400, param="messages[0].role", message_has="role")
    status, _, body = await post(comp, {"model": MODEL})
    assert_error(status, body, 400, param="prompt", message_has="prompt")

    # semantic fields this server cannot honour are refused, never ignored (tools and
    # response_format: tests/integration/test_chat_tools.py; logprobs, n:
    # tests/integration/test_openai_choices.py)
    for fields, param in [({"best_of": 2}, "best_of"), ({"suffix": "x"}, "suffix"),
                          ({"echo": True, "logprobs": 1}, "echo")]:
        status, _, body = await post(comp, {"model": MODEL, "prompt": PROMPT, **fields})
        assert_error(status, body, 400, param=param, code="unsupported_parameter", message_has=param)
    # unknown fields are named, at any depth; never silently dropped
    for body_, param in [({**chat_body(), "repetition_penalti": 1.1}, "repetition_penalti"),
                         ({**chat_body(), "stream": True, "stream_options": {"include_usage": True, "x": 1}},
                          "stream_options.x"),
                         ({**chat_body(), "messages": [{"role": "user", "content": "hi", "nam": "a"}]},
                          "messages[0].nam")]:
        status, _, body = await post(chat, body_)
        assert_error(status, body, 400, param=param, code="unknown_parameter", message_has=param)
    # ... and the openai client sees them as BadRequestError with the same body
    with pytest.raises(openai.BadRequestError) as info:
        await cluster.client().chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore[arg-type]
                                                       extra_body={"guided_jsn": {}})
    assert info.value.status_code == 400 and info.value.param == "guided_jsn" and info.value.code == "unknown_parameter"

    # prompt + max_tokens over the context length (256)
    prompt_tokens = chat_prompt_tokens(chat_body()["messages"])
    status, _, body = await post(chat, chat_body(max_tokens=CONTEXT_LENGTH - prompt_tokens + 1))
    assert_error(status, body, 400, param="max_tokens", code="context_length_exceeded", message_has=str(CONTEXT_LENGTH))
    status, _, body = await post(chat, chat_body(max_completion_tokens=CONTEXT_LENGTH))
    assert_error(status, body, 400, param="max_completion_tokens", code="context_length_exceeded")
    status, _, body = await post(comp, {"model": MODEL, "prompt": " river" * 250, "max_tokens": 7})
    assert_error(status, body, 400, param="max_tokens", code="context_length_exceeded", message_has="257")
    # a prompt that alone fills the context: the prompt is what is too long
    status, _, body = await post(comp, {"model": MODEL, "prompt": " river" * CONTEXT_LENGTH, "max_tokens": 1})
    assert_error(status, body, 400, param="prompt", code="context_length_exceeded")
    status, _, body = await post(chat, {"model": MODEL, "messages": [{"role": "user", "content": " river" * 300}]})
    assert_error(status, body, 400, param="messages", code="context_length_exceeded")
    # exactly at the limit is fine
    ok = await cluster.client().chat.completions.create(
        model=MODEL, messages=chat_body()["messages"], max_tokens=CONTEXT_LENGTH - prompt_tokens,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = [c async for c in ok]
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == CONTEXT_LENGTH

    # unknown model
    status, _, body = await post(chat, {**chat_body(), "model": "no-such-model"})
    assert_error(status, body, 404, param="model", code="model_not_found", message_has="no-such-model")
    with pytest.raises(openai.NotFoundError):
        await cluster.client().completions.create(model="no-such-model", prompt="x")

    # unknown path / method: JSON, never HTML
    for method, path in [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/chat/completions/x")]:
        status, _, body = await post(f"{cluster.fe.url}{path}", b"{}", method=method)
        assert_error(status, body, 404, param=None)
    status, _, body = await post(chat, None, method="GET")
    assert_error(status, body, 405, param=None)


async def test_api_key_and_body_limit(cluster: Cluster) -> None:
    fe = cluster.fe_auth
    chat = f"{fe.url}/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        status, response_headers, body = await post(chat, chat_body(), headers)
        assert_error(status, body, 401, param=None, code="invalid_api_key")
        assert response_headers.get("WWW-Authenticate") == "Bearer"
    status, _, body = await post(f"{fe.url}/v1/models", None, method="GET")
    assert_error(status, body, 401, param=None, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        await cluster.client(fe, api_key="wrong").models.list()
    # health stays open to probes
    assert (await fe.health())[0] == 200

    # the right key works, through the openai client
    client = cluster.client(fe)
    assert [m.id for m in (await client.models.list()).data] == [MODEL]
    answer = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    assert answer.usage is not None and answer.usage.completion_tokens <= 4 and answer.choices[0].finish_reason

    # 413 past --max-body-bytes (checked after auth: the key is right)
    big = chat_body(content="river " * (MAX_BODY // 6 + 10))
    assert len(json.dumps(big)) > MAX_BODY
    status, _, body = await post(chat, big, fe.headers())
    assert_error(status, body, 413, param=None, code="request_too_large", message_has=str(MAX_BODY))
    fits = chat_body(max_tokens=2, content="river " * 100)
    assert len(json.dumps(fits)) < MAX_BODY
    status, _, body = await post(chat, fits, fe.headers())
    assert status == 200 and body["usage"]["completion_tokens"] == 2


async def test_busy_instances_give_503_with_retry_after(cluster: Cluster) -> None:
    fe = cluster.fe
    await wait_idle(cluster)
    status, _, original = await post(f"{fe.url}/busy_threshold", None, method="GET")
    assert status == 200 and original == {"kv_usage": 0.95, "queue_depth": None, "prefill_tokens": None,
                                         "ttft_slo": None}
    streams: list[RawStream] = []
    try:
        status, _, now = await post(f"{fe.url}/busy_threshold", {"kv_usage": 0.0})
        assert status == 200 and now == {"kv_usage": 0.0, "queue_depth": None, "prefill_tokens": None,
                                        "ttft_slo": None}
        status, _, body = await post(f"{fe.url}/busy_threshold", {"kv_usage": 2})
        assert_error(status, body, 400, param=None)
        # One long request per worker: each then holds KV blocks, so both are busy. (A
        # 503 here is an earlier test's load report not yet superseded in the frontend's
        # view -- workers report every 0.1 s -- so retry briefly.)
        for i in range(2):
            deadline = time.monotonic() + 5
            while True:
                s = await RawStream(fe.port, "/v1/chat/completions",
                                    chat_body(LONG_TOKENS, stream=True, content=f"busy number {i} " * 4)).open()
                streams.append(s)
                head = await s.read_until(lambda raw: b"\r\n\r\n" in raw)
                if head.startswith(b"HTTP/1.1 200") or time.monotonic() > deadline:
                    break
                s.hang_up()
                await asyncio.sleep(0.05)
            await s.read_until(lambda raw: raw.count(b"data: ") >= 3)
        async with aiohttp.ClientSession() as session:
            await wait_kv(cluster.workers, session, lambda used: all(used), 5, "both workers loaded")
        status, headers, body = await post(f"{fe.url}/v1/chat/completions", chat_body())
        assert_error(status, body, 503, param=None, code="overloaded", type="server_error")
        assert re.fullmatch(r"[1-9][0-9]*", headers.get("Retry-After", "")), headers
        with pytest.raises(openai.APIStatusError) as info:
            await cluster.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"].isdigit()
    finally:
        for s in streams:
            s.hang_up()
        status, _, restored = await post(f"{fe.url}/busy_threshold", {"kv_usage": 0.95})
        assert status == 200 and restored == original
    answer = await cluster.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,  # type: ignore[arg-type]
                                                            extra_body={"ignore_eos": True})
    assert answer.usage is not None and answer.usage.completion_tokens == 3


async def test_model_without_live_instance_gives_503_then_leaves_models(cluster: Cluster) -> None:
    fe = cluster.fe
    async with cluster.worker(args=["--model", "gone-model"], name="gone") as gone:
        await fe.wait_instances(3)
        models = await cluster.client().models.list()
        assert sorted(m.id for m in models.data) == ["gone-model", MODEL]
        answer = await cluster.client().completions.create(model="gone-model", prompt=PROMPT, max_tokens=3,
                                                            extra_body={"ignore_eos": True})
        assert answer.model == "gone-model" and answer.usage is not None and answer.usage.completion_tokens == 3
        gone.terminate()
        assert await gone.wait(15) == 0
        await fe.wait_instances(0, model="gone-model", timeout=5)
    for path, body in [("/v1/chat/completions", {**chat_body(), "model": "gone-model"}),
                       ("/v1/completions", {"model": "gone-model", "prompt": PROMPT})]:
        status, headers, error = await post(f"{fe.url}{path}", body)
        assert_error(status, error, 503, param=None, code="no_instances", type="server_error",
                     message_has="gone-model")
        assert re.fullmatch(r"[1-9][0-9]*", headers.get("Retry-After", "")), headers
    assert [m.id for m in (await cluster.client().models.list()).data] == [MODEL]
    assert (await fe.health())[0] == 200  # the other model still serves


async def test_out_of_range_seed_is_a_400_and_harms_no_other_request(cluster: Cluster) -> None:
    """``seed`` is an int64 in the OpenAI API. One request with a seed outside it must be
    that request's 400, not an engine error that takes the instance out of routing."""
    fe = cluster.fe
    # A worker of its own model, so whatever this request does stays away from the others.
    async with cluster.worker(args=["--model", "seed-model"], name="seed") as worker:
        await fe.wait_instances(1, model="seed-model")
        try:
            body = {"model": "seed-model", "prompt": PROMPT, "max_tokens": 3, "ignore_eos": True}
            for seed in (2**63, 2**64, -(2**63) - 1):
                status, _, error = await post(f"{fe.url}/v1/completions", {**body, "seed": seed})
                assert_error(status, error, 400, param="seed")
            status, _, answer = await post(f"{fe.url}/v1/completions", {**body, "seed": 2**63 - 1})
            assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
            status, _, answer = await post(f"{fe.url}/v1/completions", body)
            assert status == 200 and answer["usage"]["completion_tokens"] == 3, answer
        finally:
            worker.terminate()
            await worker.wait(15)
            await fe.wait_instances(0, model="seed-model", timeout=5)


async def test_error_after_streaming_began_is_an_sse_event(cluster: Cluster, tmp_path: Path) -> None:
    """The only worker dies mid-stream and migration is off: the client gets an error
    event and ``[DONE]``, not a cut connection or a fake finish."""
    namespace = "t" + uuid.uuid4().hex[:10]
    kw = dict(namespace=namespace, etcd_endpoints=cluster.etcd.endpoint, nats_url=cluster.nats.url)
    async with WorkerProcess(tmp_path, speedup=SPEEDUP, args=["--context-length", str(CONTEXT_LENGTH)],
                             **kw) as worker:  # type: ignore[arg-type]
        async with FrontendProcess(tmp_path, expect_instances=1, args=["--migration-limit", "0"],
                                   **kw) as fe:  # type: ignore[arg-type]
            s = await RawStream(fe.port, "/v1/chat/completions", chat_body(LONG_TOKENS, stream=True)).open()
            await s.read_until(lambda raw: raw.count(b"data: ") >= 4)
            worker.kill()
            raw = await s.read_until(lambda raw: raw.endswith(b"0\r\n\r\n"), timeout=10)
            head, _, chunked = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and b"text/event-stream" in head
            events = sse_events(_dechunk(chunked))
            assert events[-1] == "[DONE]"
            error = json.loads(events[-2])
            assert_error(503, error, 503, param=None, code="worker_failed", type="service_unavailable")
            chunks = [json.loads(e) for e in events[:-2]]
            assert len(chunks) >= 4
            assert all(c["object"] == "chat.completion.chunk" and c["choices"][0]["finish_reason"] is None
                       for c in chunks)
            generated = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
            assert 0 < len(TOK.encode(generated)) < LONG_TOKENS
            assert "Traceback" not in fe.log_text()


def _dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        data = rest[size + 2:]


# ---------------------------------------------------------------------------
# cancellation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non_streaming"])
async def test_client_disconnect_frees_kv_within_100ms(cluster: Cluster, stream: bool) -> None:
    await wait_idle(cluster)
    before = parse_metrics(await cluster.fe.metrics_text())
    async with aiohttp.ClientSession() as session:
        s = await RawStream(cluster.fe.port, "/v1/chat/completions",
                            chat_body(LONG_TOKENS, stream=stream, content=f"hang up {stream}")).open()
        if stream:
            await s.read_until(lambda raw: raw.count(b"data: ") >= 4)
        # the request holds KV on exactly one worker, and is not about to end (>= 2 s left)
        _, used = await wait_kv(cluster.workers, session, lambda used: sum(1 for u in used if u) == 1, 5,
                                "the request on one worker")
        await asyncio.sleep(0.2)
        s.hang_up()
        freed_after, _ = await wait_kv(cluster.workers, session, lambda used: sum(used) == 0, 5, "KV freed")
    assert freed_after <= 0.1, f"KV freed {freed_after * 1000:.0f} ms after the client hung up"
    assert s.received.count(b"data: ") < LONG_TOKENS // 2 if stream else s.received == b""
    worker = next(w for w, u in zip(cluster.workers, used) if u)
    assert "event=request_cancelled" in worker.log_text() and "mode=kill" in worker.log_text()
    deadline = time.monotonic() + 5
    while (await cluster.fe.health())[1]["in_flight"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    after = parse_metrics(await cluster.fe.metrics_text())
    assert metric(after, "dynrt_frontend_cancellations_total", model=MODEL) - \
        metric(before, "dynrt_frontend_cancellations_total", model=MODEL) == 1
    assert metric(after, "dynrt_frontend_requests_total", model=MODEL, endpoint="chat", status="499") - \
        metric(before, "dynrt_frontend_requests_total", model=MODEL, endpoint="chat", status="499") == 1


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------


async def test_metrics_count_requests_and_tokens(cluster: Cluster) -> None:
    fe = cluster.fe
    await wait_idle(cluster)
    before = parse_metrics(await fe.metrics_text())
    client = cluster.client()
    prompt_tokens = chat_prompt_tokens(MESSAGES)
    await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,  # type: ignore[arg-type]
                                         extra_body={"ignore_eos": True})
    stream = await client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, stream=True,  # type: ignore[arg-type]
                                                  extra_body={"ignore_eos": True})
    assert len([c async for c in stream]) >= 2
    await client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7, extra_body={"ignore_eos": True})
    after = parse_metrics(await fe.metrics_text())

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("dynrt_frontend_requests_total", model=MODEL, endpoint="chat", status="200") == 2
    assert delta("dynrt_frontend_requests_total", model=MODEL, endpoint="completions", status="200") == 1
    assert delta("dynrt_frontend_input_tokens_total", model=MODEL) == 2 * prompt_tokens + len(TOK.encode(PROMPT))
    assert delta("dynrt_frontend_output_tokens_total", model=MODEL) == 5 + 6 + 7
    assert delta("dynrt_frontend_time_to_first_token_seconds_count", model=MODEL) == 3
    assert delta("dynrt_frontend_inter_token_latency_seconds_count", model=MODEL) >= 1
    assert delta("dynrt_frontend_cancellations_total", model=MODEL) == 0
    assert metric(after, "dynrt_frontend_in_flight_requests") == 0


async def test_metrics_count_rejected_requests(cluster: Cluster) -> None:
    """Requests refused before generation (400, 404, 503 no instance) are requests too:
    an error-rate alert on ``dynrt_frontend_requests_total`` must see them."""
    fe = cluster.fe
    before = parse_metrics(await fe.metrics_text())
    status, _, _ = await post(f"{fe.url}/v1/chat/completions", chat_body(max_tokens=CONTEXT_LENGTH))
    assert status == 400
    status, _, _ = await post(f"{fe.url}/v1/completions", {"model": MODEL, "prompt": PROMPT, "best_of": 2})
    assert status == 400
    after = parse_metrics(await fe.metrics_text())
    counted = {endpoint: metric(after, "dynrt_frontend_requests_total", model=MODEL, endpoint=endpoint, status="400")
               - metric(before, "dynrt_frontend_requests_total", model=MODEL, endpoint=endpoint, status="400")
               for endpoint in ("chat", "completions")}
    assert counted == {"chat": 1, "completions": 1}


# ---------------------------------------------------------------------------
# graceful shutdown
# ---------------------------------------------------------------------------


async def _http_get_on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> tuple[int, Any]:
    """One keep-alive ``GET`` on an open connection: (status, JSON body)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    return status, json.loads(await reader.readexactly(length))


async def test_sigterm_drains_in_flight_stream_and_exits_0(cluster: Cluster) -> None:
    fe = await cluster.frontend(expect_instances=2, name="fe_drain", args=["--drain-timeout", "20"]).start()
    try:
        body = chat_body(LONG_TOKENS, stream=True, seed=9, content="drain me", stream_options={"include_usage": True})
        reference = asyncio.create_task(cluster.client().chat.completions.create(
            model=MODEL, messages=body["messages"], max_tokens=LONG_TOKENS, seed=9, extra_body={"ignore_eos": True}))
        reader, writer = await asyncio.open_connection("127.0.0.1", fe.port)  # opened before SIGTERM
        assert (await _http_get_on(reader, writer, "/health"))[0] == 200

        events: list[tuple[float, bytes]] = []

        async def read_stream() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                async with session.post(f"{fe.url}/v1/chat/completions", json=body) as response:
                    assert response.status == 200
                    async for line in response.content:
                        if line.strip():
                            events.append((time.monotonic(), line.strip()))

        streaming = asyncio.create_task(read_stream())
        while len(events) < 4:
            assert not streaming.done(), streaming
            await asyncio.sleep(0.01)
        fe.terminate()
        signalled = time.monotonic()

        # /health turns 503 (asked on the connection opened before the signal) ...
        while True:
            status, health = await _http_get_on(reader, writer, "/health")
            if status == 503:
                break
            assert time.monotonic() - signalled < 1.0, "health still 200 a second after SIGTERM"
            await asyncio.sleep(0.01)
        assert health["status"] == "draining" and health["in_flight"] == 1
        # ... and new connections are refused.
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", fe.port)
                w.close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() - signalled < 1.0, "new connections still accepted a second after SIGTERM"
            await asyncio.sleep(0.01)
        refused_at = time.monotonic()
        writer.close()

        await asyncio.wait_for(streaming, 20)
        assert events[-1][1] == b"data: [DONE]"
        chunks = [json.loads(line[len(b"data: "):]) for _, line in events[:-1]]
        late = "".join(c["choices"][0]["delta"].get("content") or ""
                       for (t, _), c in zip(events, chunks) if t > refused_at and c["choices"])
        assert len(TOK.encode(late)) >= LONG_TOKENS // 4, "most of the stream came after the listener closed"
        assert chunks[-1]["usage"]["completion_tokens"] == LONG_TOKENS
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
        assert text == (await reference).choices[0].message.content
        assert await fe.wait(10) == 0
        assert "event=frontend_stopped" in fe.log_text()
    finally:
        await fe.stop()
