"""``dynrt.client`` against a real local HTTP server that serves resumable SSE streams.

The server (aiohttp, in its own thread and event loop so the blocking ``OpenAI`` client
can talk to it) follows the resume protocol of docs/resumable-streams.md: with
``Dynrt-Resumable: 1`` every event carries ``id: <request>.<seq>``; ``Last-Event-ID``
resumes after that event (the body must equal the original's). Each request follows
the next step of a script: drop the connection after n events, end the body cleanly
without ``[DONE]``, answer a status, or send an error event. The client is the real
``openai`` SDK; nothing of it is mocked."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

try:
    import httpx2
except ImportError:  # openai < 3 uses httpx
    import httpx as httpx2  # type: ignore[no-redef]
import openai
import pytest
from aiohttp import web
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from dynrt.client import (
    ResumeError,
    ResumeState,
    RetryPolicy,
    async_resumable_completion_stream,
    async_resumable_stream,
    resumable_completion_stream,
    resumable_stream,
    retry_after_seconds,
)

ANSWER = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", "."]
MESSAGES = [{"role": "user", "content": "Say the sentence."}]
FAST = RetryPolicy(max_retries=4, max_wait=5.0, initial_backoff=0.01, max_backoff=0.05)


@dataclass
class Step:
    """What the server does with one request."""

    kind: str = "full"  # full | drop | end (clean end, no [DONE]) | status | error_event
    after: int = 0  # events sent before drop / end / error_event
    status: int = 503
    code: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    ids: bool = True  # False: a server that does not support resuming


@dataclass
class Seen:
    port: int
    path: str
    last_event_id: str | None
    resumable: str | None
    authorization: str | None
    body: dict[str, Any]


class ScriptedServer:
    """Serves chat and legacy completions as SSE, following ``script`` request by request."""

    REQUEST_ID = "req7f3a"

    def __init__(self) -> None:
        self.script: list[Step] = []
        self.seen: list[Seen] = []
        self.urls: list[str] = []

    def reset(self, *steps: Step) -> None:
        self.script = list(steps)
        self.seen = []

    def events(self, path: str) -> list[dict[str, Any]]:
        if path.endswith("/chat/completions"):
            def chat(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
                return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return ([chat({"role": "assistant", "content": ""})] + [chat({"content": p}) for p in ANSWER]
                    + [chat({}, "stop")])

        def completion(text: str, finish: str | None = None) -> dict[str, Any]:
            return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
                    "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}]}
        return [completion(p) for p in ANSWER] + [completion("", "stop")]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        last_event_id = request.headers.get("Last-Event-ID")
        self.seen.append(Seen(request.transport.get_extra_info("sockname")[1], request.path, last_event_id,
                              request.headers.get("Dynrt-Resumable"), request.headers.get("Authorization"), body))
        step = self.script.pop(0) if self.script else Step()
        if step.kind == "status":
            error = {"message": f"scripted {step.status}", "type": "error", "param": None, "code": step.code}
            return web.json_response({"error": error}, status=step.status, headers=step.headers)
        start = 0
        if last_event_id is not None:
            first = next(s for s in self.seen if s.last_event_id is None)
            if body != first.body:
                return web.json_response({"error": {"message": "body differs", "code": "resume_mismatch"}},
                                         status=400)
            start = int(last_event_id.rpartition(".")[2]) + 1
        with_ids = step.ids and request.headers.get("Dynrt-Resumable") == "1"
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = self.events(request.path)
        for sent, seq in enumerate(range(start, len(events))):
            if step.kind in ("drop", "end", "error_event") and sent == step.after:
                break
            event_id = f"id: {self.REQUEST_ID}.{seq}\n" if with_ids else ""
            await response.write(f"{event_id}data: {json.dumps(events[seq])}\n\n".encode())
        else:
            done_id = f"id: {self.REQUEST_ID}.{len(events)}\n" if with_ids else ""
            await response.write(f"{done_id}data: [DONE]\n\n".encode())
            await response.write_eof()
            return response
        if step.kind == "drop":  # a frontend SIGKILLed: the chunked body never ends
            assert request.transport is not None
            request.transport.close()
            raise asyncio.CancelledError
        if step.kind == "error_event":
            error = {"error": {"message": "engine failed", "type": "internal_error", "code": "boom"}}
            await response.write(f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode())
        await response.write_eof()
        return response


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def running_server() -> Iterator[ScriptedServer]:
    """One app on two ports (two "frontends" sharing the stream state), in a thread."""
    server = ScriptedServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.handle)
    app.router.add_post("/v1/completions", server.handle)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app)

    async def start() -> None:
        await runner.setup()
        for _ in range(2):
            await web.TCPSite(runner, "127.0.0.1", 0).start()

    asyncio.run_coroutine_threadsafe(start(), loop).result(5)
    server.urls = [f"http://127.0.0.1:{port}/v1" for _host, port in runner.addresses]
    yield server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def server(running_server: ScriptedServer) -> ScriptedServer:
    running_server.reset()
    return running_server


def _client(url: str) -> openai.OpenAI:
    """Use as ``with _client(url) as client``: closes its pooled connections."""
    return openai.OpenAI(base_url=url, api_key="key-a", max_retries=3)


def _text(chunks: list[Any]) -> str:
    if chunks and isinstance(chunks[0], Completion):
        return "".join(c.choices[0].text for c in chunks)
    return "".join(c.choices[0].delta.content or "" for c in chunks)


def _chat(server: ScriptedServer, **kwargs: Any) -> list[ChatCompletionChunk]:
    with _client(server.urls[0]) as client:
        return list(resumable_stream(client, model="m", messages=MESSAGES, retry=kwargs.pop("retry", FAST),
                                     **kwargs))


def test_uninterrupted_stream_is_one_request_with_ids_opted_in(server: ScriptedServer) -> None:
    chunks = _chat(server)
    assert _text(chunks) == "".join(ANSWER)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert [(s.resumable, s.last_event_id) for s in server.seen] == [("1", None)]


def test_drop_mid_stream_resumes_after_the_last_event_exactly_once(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=4))
    chunks = _chat(server)
    assert _text(chunks) == "".join(ANSWER)
    assert len(chunks) == len(ANSWER) + 2  # role, content..., finish: none twice, none lost
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert [s.last_event_id for s in server.seen] == [None, "req7f3a.3"]
    assert all(s.resumable == "1" and s.authorization == "Bearer key-a" for s in server.seen)
    assert server.seen[1].body == server.seen[0].body  # the same request, not a new one


def test_repeated_losses_and_a_body_ended_without_done_all_resume(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=2), Step("end", after=3), Step("drop", after=1), Step("drop", after=0))
    chunks = _chat(server)
    assert _text(chunks) == "".join(ANSWER)
    assert len(chunks) == len(ANSWER) + 2
    assert [s.last_event_id for s in server.seen] == [None, "req7f3a.1", "req7f3a.4", "req7f3a.5", "req7f3a.5"]


def test_failure_before_any_event_resends_the_request_fresh(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=0), Step("status", status=503), Step("end", after=0))
    chunks = _chat(server)
    assert _text(chunks) == "".join(ANSWER)
    assert [s.last_event_id for s in server.seen] == [None, None, None, None]


@pytest.mark.parametrize(("status", "code"), [(404, "resume_not_found"), (410, "resume_expired"),
                                              (403, "resume_forbidden"), (400, "resume_unsupported")])
def test_refused_resume_raises_and_never_starts_a_fresh_generation(
        server: ScriptedServer, status: int, code: str) -> None:
    server.reset(Step("drop", after=3), Step("status", status=status, code=code))
    received: list[ChatCompletionChunk] = []
    with _client(server.urls[0]) as client, pytest.raises(ResumeError) as refused:
        for chunk in resumable_stream(client, model="m", messages=MESSAGES, retry=FAST):
            received.append(chunk)
    assert (refused.value.status_code, refused.value.code, refused.value.last_event_id) == (status, code, "req7f3a.2")
    assert isinstance(refused.value, openai.APIStatusError)
    assert len(received) == 3
    assert [s.last_event_id for s in server.seen] == [None, "req7f3a.2"]


def test_a_fresh_request_refused_is_the_sdk_error_unchanged(server: ScriptedServer) -> None:
    server.reset(Step("status", status=404, code="model_not_found"))
    with pytest.raises(openai.NotFoundError) as refused:
        _chat(server)
    assert not isinstance(refused.value, ResumeError)
    assert len(server.seen) == 1


def test_resume_waits_the_retry_after_of_a_503(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=2), Step("status", status=503, headers={"Retry-After": "0.4"}))
    started = time.monotonic()
    chunks = _chat(server)
    assert time.monotonic() - started >= 0.4
    assert _text(chunks) == "".join(ANSWER)
    assert [s.last_event_id for s in server.seen] == [None, "req7f3a.1", "req7f3a.1"]


def test_retries_are_bounded_by_count(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=2), *[Step("status", status=503) for _ in range(10)])
    with pytest.raises(openai.InternalServerError):
        _chat(server, retry=RetryPolicy(max_retries=3, initial_backoff=0.01, max_backoff=0.02))
    # The drop is the outage's first failure; 3 retries (all 503), then the error.
    assert [s.last_event_id for s in server.seen] == [None] + ["req7f3a.1"] * 3


def test_retries_are_bounded_by_time(server: ScriptedServer) -> None:
    server.reset(*[Step("status", status=503, headers={"Retry-After": "0.3"}) for _ in range(10)])
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError):
        _chat(server, retry=RetryPolicy(max_retries=100, max_wait=1.0))
    assert time.monotonic() - started < 1.5  # no retry starts once the next would end past max_wait
    assert len(server.seen) in (3, 4)  # tries at 0, 0.3, 0.6 (+ overheads), 0.9 if it fits


def test_rotates_through_base_urls_skipping_a_dead_frontend(server: ScriptedServer) -> None:
    dead = f"http://127.0.0.1:{_free_port()}/v1"
    server.reset(Step("drop", after=5))
    with _client(dead) as client:
        chunks = list(resumable_stream(client, base_urls=[server.urls[0], dead, server.urls[1]],
                                       model="m", messages=MESSAGES, retry=FAST))
    assert _text(chunks) == "".join(ANSWER)
    ports = [int(url.split(":")[2].split("/")[0]) for url in server.urls]
    assert [(s.port, s.last_event_id) for s in server.seen] == [(ports[0], None), (ports[1], "req7f3a.4")]


def test_a_server_without_ids_still_streams_when_nothing_fails(server: ScriptedServer) -> None:
    server.reset(Step(ids=False))
    assert _text(_chat(server)) == "".join(ANSWER)


def test_a_stream_without_ids_is_not_resumed(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=3, ids=False))
    with pytest.raises(openai.APIConnectionError):
        _chat(server)
    assert len(server.seen) == 1  # a fresh resend would repeat the text already yielded


def test_an_error_event_is_the_servers_answer_not_retried(server: ScriptedServer) -> None:
    server.reset(Step("error_event", after=3))
    with pytest.raises(openai.APIError) as failed:
        _chat(server)
    assert not isinstance(failed.value, (openai.APIStatusError, openai.APIConnectionError))
    assert len(server.seen) == 1


def test_legacy_completions_resume(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=6))
    with _client(server.urls[0]) as client:
        chunks = list(resumable_completion_stream(client, model="m", prompt="Say it.", max_tokens=20,
                                                  retry=FAST))
    assert all(isinstance(c, Completion) for c in chunks)
    assert _text(chunks) == "".join(ANSWER)
    assert [(s.path, s.last_event_id) for s in server.seen] == [("/v1/completions", None),
                                                                 ("/v1/completions", "req7f3a.5")]


def test_stream_false_is_refused() -> None:
    with pytest.raises(ValueError):
        with _client("http://127.0.0.1:1/v1") as client:
            next(resumable_stream(client, model="m", messages=MESSAGES, stream=False))


async def test_async_chat_resumes(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=4), Step("status", status=503), Step("end", after=2))
    async with openai.AsyncOpenAI(base_url=server.urls[1], api_key="key-a") as client:
        chunks = [c async for c in async_resumable_stream(client, model="m", messages=MESSAGES, retry=FAST)]
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert _text(chunks) == "".join(ANSWER)
    assert [s.last_event_id for s in server.seen] == [None, "req7f3a.3", "req7f3a.3", "req7f3a.5"]


async def test_async_refused_resume_raises(server: ScriptedServer) -> None:
    server.reset(Step("drop", after=2), Step("status", status=410, code="resume_expired"))
    async with openai.AsyncOpenAI(base_url=server.urls[0], api_key="key-a") as client:
        with pytest.raises(ResumeError) as refused:
            async for _ in async_resumable_completion_stream(client, model="m", prompt="Say it.", retry=FAST):
                pass
    assert (refused.value.status_code, refused.value.last_event_id) == (410, "req7f3a.1")


def test_retry_after_forms() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "0.25"}) == 0.25
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # in the past
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


def test_backoff_grows_within_its_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0)
    assert policy.backoff(1) == 0.0  # the first retry at once
    for failures, ceiling in [(2, 0.1), (3, 0.2), (4, 0.4), (5, 0.8), (6, 1.0), (10, 1.0)]:
        waits = [policy.backoff(failures) for _ in range(50)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)


def test_an_event_starts_a_new_retry_budget() -> None:
    state = ResumeState(RetryPolicy(max_retries=1, initial_backoff=0.0))
    error = openai.APIConnectionError(request=httpx2.Request("POST", "http://frontend/v1/chat/completions"))
    state.saw_event("r.0", "{}")
    assert state.after_failure(error, now=0.0) == 0.0
    with pytest.raises(openai.APIConnectionError):
        state.after_failure(error, now=0.1)
    state.saw_event("r.1", "{}")
    assert state.after_failure(error, now=0.2) == 0.0
    assert state.headers() == {"Dynrt-Resumable": "1", "Last-Event-ID": "r.1"}
