"""Resumable streams with live processes (issue 18): a client whose frontend dies (or
whose connection drops) resumes on another frontend with ``Last-Event-ID`` and gets the
rest of its answer exactly once — reattached to the worker that still generates it, or
continued from the JetStream checkpoint when that worker died too. The errors a resume
can get, and nothing left behind: no checkpoint, no request on a worker.

Real processes: etcd, nats-server with JetStream, two frontends, two mock workers at
speedup 1 (a 300-token answer takes a few seconds). The reference is the same seeded
request streamed uninterrupted.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from harness.deployment import Deployment
from harness.frontend import FrontendProcess

pytestmark = pytest.mark.slow

KEYS = ["sk-resume-one", "sk-resume-two"]
GRACE = 3.0


def body(max_tokens: int = 300, **extra: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": "a long story about the river"}],
            "max_tokens": max_tokens, "stream": True, "seed": 11, "temperature": 0.8, "ignore_eos": True,
            "stream_options": {"include_usage": True}, **extra}


def headers(key: str = KEYS[0], last_event_id: str | None = None, resumable: bool = True) -> dict[str, str]:
    out = {"Authorization": f"Bearer {key}"}
    if resumable:
        out["Dynrt-Resumable"] = "1"
    if last_event_id is not None:
        out["Last-Event-ID"] = last_event_id
    return out


@dataclass
class Events:
    """What a client read: each event's id and data, in order."""

    ids: list[str] = field(default_factory=list)
    data: list[str] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join((json.loads(d)["choices"][0]["delta"].get("content") or "")
                       for d in self.data if d != "[DONE]" and json.loads(d)["choices"])

    @property
    def done(self) -> bool:
        return bool(self.data) and self.data[-1] == "[DONE]"

    def finish_reasons(self) -> list[str]:
        return [c["finish_reason"] for d in self.data if d != "[DONE]"
                for c in json.loads(d)["choices"] if c.get("finish_reason")]

    def usage(self) -> dict[str, Any] | None:
        usages = [json.loads(d)["usage"] for d in self.data if d != "[DONE]" and json.loads(d).get("usage")]
        return usages[-1] if usages else None


async def read_events(response: aiohttp.ClientResponse, into: Events, limit: int | None = None) -> None:
    """Read SSE events into ``into`` (up to ``limit`` content events, then return with the
    connection still open); a connection that breaks just ends the reading."""
    event_id, data = None, None
    try:
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data is not None:
                into.ids.append(event_id or "")
                into.data.append(data)
                event_id, data = None, None
                if limit is not None and len(into.data) >= limit:
                    return
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionError):
        return


async def full_answer(http: aiohttp.ClientSession, url: str, key: str = KEYS[0]) -> Events:
    events = Events()
    async with http.post(f"{url}/v1/chat/completions", json=body(), headers=headers(key)) as response:
        assert response.status == 200, await response.text()
        await read_events(response, events)
    assert events.done
    return events


async def resume(http: aiohttp.ClientSession, url: str, last_id: str, key: str = KEYS[0],
                 request: dict[str, Any] | None = None) -> tuple[int, Events, dict[str, Any] | None]:
    events = Events()
    async with http.post(f"{url}/v1/chat/completions", json=request or body(),
                         headers=headers(key, last_event_id=last_id)) as response:
        if response.status != 200:
            return response.status, events, await response.json()
        await read_events(response, events)
    return 200, events, None


async def start_and_read(http: aiohttp.ClientSession, frontend: FrontendProcess, events: int,
                         key: str = KEYS[0]) -> tuple[aiohttp.ClientResponse, Events]:
    got = Events()
    response = await http.post(f"{frontend.url}/v1/chat/completions", json=body(), headers=headers(key))
    assert response.status == 200, await response.text()
    await read_events(response, got, limit=events)
    assert len(got.data) == events and all(got.ids), got.ids
    return response, got


def assert_same_answer(first: Events, rest: Events, reference: Events) -> None:
    """The client's two reads together are the uninterrupted answer, each event once."""
    joined = Events(first.ids + rest.ids, first.data + rest.data)
    assert joined.content == reference.content
    assert joined.finish_reasons() == reference.finish_reasons() == ["length"]
    assert joined.data.count("[DONE]") == 1 and joined.done
    assert len(set(joined.ids)) == len(joined.ids)  # no event twice
    usage = joined.usage()
    assert usage is not None and usage["completion_tokens"] == 300


async def serving_worker(d: Deployment) -> Any:
    """The live worker with a request in flight."""
    assert d.http is not None
    for _ in range(50):
        for worker in d.live_workers():
            async with d.http.get(worker.health_url) as response:
                if (await response.json()).get("in_flight"):
                    return worker
        await asyncio.sleep(0.05)
    raise AssertionError("no worker has the request")


async def assert_nothing_left(d: Deployment, http: aiohttp.ClientSession, last_id: str) -> None:
    """The checkpoint is gone (a resume of the finished stream is 404) and the workers
    hold no request and no KV."""
    status, _, error = await resume(http, d.urls[0], last_id)
    assert status == 404 and error is not None and error["error"]["code"] == "resume_not_found", error
    await d.assert_kv_idle(timeout=GRACE + 5)
    # A finished stream's output is kept on its worker for min(grace, 10 s) (a frontend
    # may die before its client got the end); then nothing is left there either.
    deadline = asyncio.get_running_loop().time() + GRACE + 5
    while True:
        kept = []
        for worker in d.live_workers():
            async with http.get(worker.health_url) as response:
                health = await response.json()
            kept.append((health["detached_requests"], health["retained_outputs"]))
        if all(k == (0, 0) for k in kept):
            return
        assert asyncio.get_running_loop().time() < deadline, kept
        await asyncio.sleep(0.2)


@pytest.fixture
async def deployment(tmp_path: Path) -> Any:
    args = ["--resume-grace", str(GRACE), "--checkpoint-interval", "0.05"]
    for key in KEYS:
        args += ["--api-key", key]
    async with Deployment(tmp_path, workers=2, frontends=2, frontend_args=args) as d:
        yield d


async def test_frontend_killed_client_resumes_on_the_other_reattached(deployment: Deployment) -> None:
    d = deployment
    a, b = d.frontends
    assert d.http is not None
    reference = await full_answer(d.http, b.url)
    response, first = await start_and_read(d.http, a, 40)
    a.kill()
    response.close()
    status, rest, error = await resume(d.http, b.url, first.ids[-1])
    assert status == 200, error
    assert_same_answer(first, rest, reference)
    log = b.log_text()
    assert "event=reattaching" in log and "event=migrating" not in log  # the worker went on: no recompute
    await assert_nothing_left(d, d.http, rest.ids[-1])


async def test_helper_resumes_on_the_other_frontend_when_its_frontend_is_killed(deployment: Deployment) -> None:
    """The client helper (dynrt.client over the official SDK) with both frontends'
    URLs: its frontend is SIGKILLed mid-answer; it resumes on the other one."""
    from openai import AsyncOpenAI

    from dynrt.client import async_resumable_stream

    d = deployment
    a, b = d.frontends
    assert d.http is not None
    reference = await full_answer(d.http, b.url)
    client = AsyncOpenAI(base_url=f"{a.url}/v1", api_key=KEYS[0])
    request = body()
    request.pop("stream")
    request["extra_body"] = {"ignore_eos": request.pop("ignore_eos")}  # not an SDK parameter
    content, finishes, chunks = "", [], 0
    async for chunk in async_resumable_stream(client, base_urls=[f"{a.url}/v1", f"{b.url}/v1"], stream=True,
                                              **request):
        chunks += 1
        for choice in chunk.choices:
            content += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
        if chunks == 40:
            a.kill()
    await client.close()
    assert content == reference.content and finishes == ["length"]
    assert "event=reattaching" in b.log_text()
    await d.assert_kv_idle(timeout=5)


async def test_frontend_and_worker_killed_resume_continues_from_checkpoint(deployment: Deployment) -> None:
    d = deployment
    a, b = d.frontends
    assert d.http is not None
    reference = await full_answer(d.http, b.url)
    response, first = await start_and_read(d.http, a, 60)
    worker = await serving_worker(d)
    a.kill()
    worker.kill()
    response.close()
    status, rest, error = await resume(d.http, b.url, first.ids[-1])
    assert status == 200, error
    assert_same_answer(first, rest, reference)
    assert "event=migrating" in b.log_text()
    await assert_nothing_left(d, d.http, rest.ids[-1])


async def test_worker_killed_then_its_frontend_while_migrating(deployment: Deployment) -> None:
    """The worker dies first; its frontend moves the stream to the other worker and dies
    right after, before its checkpoint names the new worker. The resuming frontend finds
    the dead worker gone, routes the request, meets the copy still running on the other
    worker ("in flight") and takes that stream over: the answer is the same."""
    d = deployment
    a, b = d.frontends
    assert d.http is not None
    reference = await full_answer(d.http, b.url)
    response, first = await start_and_read(d.http, a, 40)
    worker = await serving_worker(d)
    worker.kill()
    for _ in range(200):
        if "event=migrating" in a.log_text():
            break
        await asyncio.sleep(0.01)
    a.kill()
    response.close()
    status, rest, error = await resume(d.http, b.url, first.ids[-1])
    assert status == 200, error
    assert_same_answer(first, rest, reference)
    await assert_nothing_left(d, d.http, rest.ids[-1])


async def test_client_connection_dropped_resumes_on_the_other_frontend(deployment: Deployment) -> None:
    """The frontend lives; the client's connection broke. The frontend detaches (the
    worker goes on) and keeps the checkpoint; the client resumes elsewhere."""
    d = deployment
    a, b = d.frontends
    assert d.http is not None
    reference = await full_answer(d.http, a.url)
    response, first = await start_and_read(d.http, a, 30)
    response.close()  # the connection drops
    await asyncio.sleep(0.3)  # the frontend sees it and detaches
    status, rest, error = await resume(d.http, b.url, first.ids[-1])
    assert status == 200, error
    assert_same_answer(first, rest, reference)
    assert "resumable=True" in a.log_text() and "event=reattaching" in b.log_text()
    await assert_nothing_left(d, d.http, rest.ids[-1])


async def test_resume_errors(deployment: Deployment) -> None:
    """Another key: 403. Another body: 400. A bad or unknown id: 400 / 404. After the
    grace period: 410, and the worker dropped the request (no KV left)."""
    d = deployment
    a, b = d.frontends
    assert d.http is not None
    response, first = await start_and_read(d.http, a, 20)
    last = first.ids[-1]
    a.kill()
    response.close()
    status, _, error = await resume(d.http, b.url, last, key=KEYS[1])
    assert status == 403 and error is not None and error["error"]["code"] == "resume_forbidden", error
    status, _, error = await resume(d.http, b.url, last, request=body(max_tokens=299))
    assert status == 400 and error is not None and "same body" in error["error"]["message"], error
    status, _, error = await resume(d.http, b.url, "not-an-id")
    assert status == 400 and error is not None and error["error"]["param"] == "Last-Event-ID", error
    status, _, error = await resume(d.http, b.url, "chatcmpl-" + "0" * 32 + ".1.1.0.0")
    assert status == 404 and error is not None and error["error"]["code"] == "resume_not_found", error
    await asyncio.sleep(GRACE + 1.0)
    status, _, error = await resume(d.http, b.url, last)
    assert status == 410 and error is not None and error["error"]["code"] == "resume_expired", error
    await d.assert_kv_idle(timeout=5)  # the worker's grace ended too: the request is gone


async def test_resumable_refusals(deployment: Deployment) -> None:
    """What a resumable stream cannot be is refused, naming the parameter; a
    non-resumable stream has no ids (vLLM's benchmark client breaks on them)."""
    d = deployment
    assert d.http is not None
    url = d.urls[0]
    for extra, param in (({"stream": False, "stream_options": None}, "resumable"), ({"n": 2}, "n"),
                         ({"logprobs": True}, "logprobs")):
        async with d.http.post(f"{url}/v1/chat/completions", json=body(**extra), headers=headers()) as r:
            assert r.status == 400, await r.text()
            assert (await r.json())["error"]["param"] == param
    async with d.http.post(f"{url}/v1/chat/completions", json=body(max_tokens=5),
                           headers=headers(resumable=False)) as r:
        text = await r.text()
        assert r.status == 200 and "id: " not in text and "[DONE]" in text
    async with d.http.post(f"{url}/v1/chat/completions", json=body(max_tokens=5, resumable=True),
                           headers=headers(resumable=False)) as r:  # the body field opts in too
        assert r.status == 200 and "\nid: " in "\n" + await r.text()
