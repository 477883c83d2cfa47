"""logprobs, n > 1 and batched completion prompts through real processes (etcd, NATS,
a frontend, mock workers), and their migration: a worker SIGKILLed mid-stream under a
request with n=2 and logprobs still gives every choice in full, equal to the
uninterrupted run, with one logprob entry per token.

The reference is the mock engine run in this process (its tokens and logprobs are a pure
function of the token ids so far and the seed), rendered with the frontend's logprob
renderer, whose rules are checked against vLLM's in tests/unit/test_logprobs.py.
"""

from __future__ import annotations

import asyncio
import signal
from collections import defaultdict
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from dynrt.frontend.logprobs import LogprobRenderer, merge_completion
from dynrt.frontend.tokenizer import load_tokenizer
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.protocol import GenerateRequest, SamplingParams, TokenizerSpec, TokenLogprobs
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig
from harness.frontend import FrontendProcess
from harness.metrics import parse_metrics
from harness.sse import SseStream
from harness.worker import WorkerProcess

MODEL = "mock-model"
MESSAGES = [{"role": "user", "content": "tell me a long story about the river and the city"}]
SEED = 7
TOKENIZER = load_tokenizer(TokenizerSpec(kind="mock"))


async def reference(prompt_ids: list[int], max_tokens: int, seed: int, k: int | None
                    ) -> tuple[list[int], list[TokenLogprobs]]:
    """Tokens and logprobs of an uninterrupted run (the engine, in process, no sleeping)."""
    engine = MockEngine(MockEngineConfig(speedup=float("inf")))
    await engine.start()
    ids: list[int] = []
    logprobs: list[TokenLogprobs] = []
    request = GenerateRequest(request_id="ref", model=MODEL, token_ids=prompt_ids,
                              sampling=SamplingParams(max_tokens=max_tokens, seed=seed, ignore_eos=True, logprobs=k))
    async for batch in engine.generate(request):
        ids.extend(batch.token_ids)
        logprobs.extend(batch.logprobs or [])
    await engine.shutdown()
    return ids, logprobs


async def chat_reference(max_tokens: int, seed: int, top: int) -> tuple[str, list[Any]]:
    ids, logprobs = await reference(TOKENIZER.apply_chat_template(MESSAGES), max_tokens, seed, top)
    rendered = LogprobRenderer(TOKENIZER).chat(ids, logprobs, top)
    return TOKENIZER.decode(ids), msgspec.to_builtins(rendered)


async def completion_reference(prompt: str, max_tokens: int, seed: int, k: int) -> tuple[str, Any]:
    ids, logprobs = await reference(TOKENIZER.encode(prompt), max_tokens, seed, k)
    rendered = merge_completion([LogprobRenderer(TOKENIZER).completion(ids, logprobs, k)])
    return TOKENIZER.decode(ids), msgspec.to_builtins(rendered)


@dataclass
class Choices:
    """A streamed response, gathered per choice index."""

    text: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    logprobs: dict[int, list[Any]] = field(default_factory=lambda: defaultdict(list))
    roles: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    finish: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    content_chunks: int = 0


async def stream(url: str, path: str, body: dict[str, Any], started: asyncio.Event | None = None) -> Choices:
    out = Choices()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}{path}", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as response:
            assert response.status == 200, await response.text()
            events = SseStream(response)
            async for chunk in events:
                if "error" in chunk:
                    out.error = chunk["error"]
                    continue
                if chunk.get("usage"):
                    out.usage = chunk["usage"]
                for choice in chunk["choices"]:
                    i = choice["index"]
                    if "delta" in choice:
                        out.roles[i] += choice["delta"].get("role") == "assistant"
                        out.text[i] += choice["delta"].get("content") or ""
                        if choice["logprobs"] is not None:
                            out.logprobs[i] += choice["logprobs"]["content"]
                    else:
                        out.text[i] += choice["text"]
                        if choice["logprobs"] is not None:
                            out.logprobs[i].append(choice["logprobs"])
                    if choice["finish_reason"]:
                        out.finish[i].append(choice["finish_reason"])
                    out.content_chunks += 1
                    if started is not None and out.content_chunks >= 60:
                        started.set()
            out.done = events.done
    return out


async def post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}{path}", json=body) as response:
            assert response.status == 200, await response.text()
            return await response.json()


def merged(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Completion logprobs of one streamed choice, concatenated."""
    return {key: sum((p[key] for p in parts), []) for key in ("text_offset", "token_logprobs", "tokens",
                                                               "top_logprobs")}


async def test_logprobs_n_and_batched_prompts(tmp_path: Path, namespace: str, etcd_server: EtcdServer,
                                             nats_server: NatsServer) -> None:
    async with AsyncExitStack() as stack:
        for _ in range(2):
            await stack.enter_async_context(WorkerProcess(tmp_path, namespace=namespace, speedup=20,
                                                          etcd_endpoints=etcd_server.endpoint, nats_url=nats_server.url))
        fe = await stack.enter_async_context(FrontendProcess(tmp_path, namespace=namespace, expect_instances=2,
                                                             etcd_endpoints=etcd_server.endpoint,
                                                             nats_url=nats_server.url))
        prompt_tokens = len(TOKENIZER.apply_chat_template(MESSAGES))
        chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 30, "seed": SEED, "ignore_eos": True,
                "logprobs": True, "top_logprobs": 3, "n": 2}
        expected = [await chat_reference(30, SEED + i, 3) for i in range(2)]  # vLLM: child i has seed + i

        body = await post(fe.url, "/v1/chat/completions", chat)
        assert [c["index"] for c in body["choices"]] == [0, 1]
        for choice, (text, logprobs) in zip(body["choices"], expected):
            assert choice["message"]["content"] == text
            assert choice["logprobs"]["content"] == logprobs
            assert len(logprobs) == 30 and len(logprobs[0]["top_logprobs"]) == 3
            assert choice["finish_reason"] == "length"
        assert expected[0][0] != expected[1][0]
        usage = body["usage"]  # the prompt counted once, the choices' tokens summed
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == \
            (prompt_tokens, 60, prompt_tokens + 60)

        streamed = await stream(fe.url, "/v1/chat/completions", chat)
        assert streamed.error is None and streamed.done
        assert dict(streamed.roles) == {0: 1, 1: 1}  # one role chunk per choice
        assert dict(streamed.finish) == {0: ["length"], 1: ["length"]}  # one finish per choice
        for i, (text, logprobs) in enumerate(expected):
            assert streamed.text[i] == text and streamed.logprobs[i] == logprobs
        assert streamed.usage is not None and streamed.usage["completion_tokens"] == 60
        assert streamed.usage["prompt_tokens"] == prompt_tokens

        # completions: batched prompts x n, indexed prompt * n + i; logprobs with text offsets
        prompts = ["the river", "a city of bright water"]
        comp = {"model": MODEL, "prompt": prompts, "max_tokens": 12, "seed": SEED, "ignore_eos": True,
                "logprobs": 2, "n": 2}
        want = [await completion_reference(p, 12, SEED + i, 2) for p in prompts for i in range(2)]
        body = await post(fe.url, "/v1/completions", comp)
        assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
        for choice, (text, logprobs) in zip(body["choices"], want):
            assert (choice["text"], choice["logprobs"]) == (text, logprobs)
        assert body["usage"]["prompt_tokens"] == sum(len(TOKENIZER.encode(p)) for p in prompts)
        assert body["usage"]["completion_tokens"] == 48
        streamed = await stream(fe.url, "/v1/completions", comp)
        assert streamed.error is None and streamed.done
        for i, (text, logprobs) in enumerate(want):
            assert streamed.text[i] == text
            assert merged(streamed.logprobs[i]) == logprobs

        # echo: the prompt text before the output; token-id prompts are decoded
        ids = TOKENIZER.encode("the river")
        body = await post(fe.url, "/v1/completions", {"model": MODEL, "prompt": [ids], "max_tokens": 5,
                                                      "seed": SEED, "ignore_eos": True, "echo": True})
        text, _ = await completion_reference("the river", 5, SEED, 0)
        assert body["choices"][0]["text"] == "the river" + text


async def test_sigkill_mid_stream_with_logprobs_and_n2(tmp_path: Path, namespace: str, etcd_server: EtcdServer,
                                                       nats_server: NatsServer) -> None:
    max_tokens = 300
    async with AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(WorkerProcess(tmp_path, namespace=namespace, speedup=1,
                                                                 etcd_endpoints=etcd_server.endpoint,
                                                                 nats_url=nats_server.url))
                   for _ in range(3)]
        fe = await stack.enter_async_context(FrontendProcess(tmp_path, namespace=namespace, expect_instances=3,
                                                             etcd_endpoints=etcd_server.endpoint,
                                                             nats_url=nats_server.url))
        expected = [await chat_reference(max_tokens, SEED + i, 2) for i in range(2)]
        chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "seed": SEED, "ignore_eos": True,
                "logprobs": True, "top_logprobs": 2, "n": 2}
        started = asyncio.Event()
        request = asyncio.create_task(stream(fe.url, "/v1/chat/completions", chat, started))
        await asyncio.wait_for(started.wait(), 30)
        async with aiohttp.ClientSession() as session:
            serving = []
            for worker in workers:
                async with session.get(worker.health_url) as response:
                    if (await response.json())["in_flight"] > 0:
                        serving.append(worker)
        assert serving
        for worker in serving:  # every worker serving a choice dies
            worker.send_signal(signal.SIGKILL)
        result = await asyncio.wait_for(request, 90)
        assert result.error is None and result.done
        assert dict(result.finish) == {0: ["length"], 1: ["length"]}
        for i, (text, logprobs) in enumerate(expected):
            assert result.text[i] == text
            assert len(result.logprobs[i]) == max_tokens  # one entry per token, across the migration
            assert result.logprobs[i] == logprobs
        assert result.usage is not None and result.usage["completion_tokens"] == 2 * max_tokens
        samples = parse_metrics(await fe.metrics_text())
        migrated = sum(v for (name, _), v in samples.items() if name == "dynrt_frontend_migrations_total")
        assert migrated >= len(serving)


async def test_client_disconnect_cancels_every_choice(tmp_path: Path, namespace: str, etcd_server: EtcdServer,
                                                      nats_server: NatsServer) -> None:
    async with AsyncExitStack() as stack:
        workers = [await stack.enter_async_context(WorkerProcess(tmp_path, namespace=namespace, speedup=1,
                                                                 etcd_endpoints=etcd_server.endpoint,
                                                                 nats_url=nats_server.url))
                   for _ in range(2)]
        fe = await stack.enter_async_context(FrontendProcess(tmp_path, namespace=namespace, expect_instances=2,
                                                             etcd_endpoints=etcd_server.endpoint,
                                                             nats_url=nats_server.url))
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 400, "ignore_eos": True, "n": 3,
                "stream": True}
        async with aiohttp.ClientSession() as session:
            async def in_flight() -> int:
                total = 0
                for worker in workers:
                    async with session.get(worker.health_url) as health:
                        total += (await health.json())["in_flight"]
                return total

            async with session.post(f"{fe.url}/v1/chat/completions", json=body) as response:
                seen = 0
                async for _ in response.content:
                    seen += 1
                    if seen > 40:
                        break
                assert await in_flight() == 3  # the three choices are generating

            for _ in range(100):  # every choice's request aborted, its KV freed
                if await in_flight() == 0:
                    break
                await asyncio.sleep(0.05)
            assert await in_flight() == 0
