"""Tools, chat templates and the reasoning parser through real dynrt processes with mock
workers (etcd, NATS, frontends, workers as processes).

The mock engine writes pseudo-random text, never a tool call or valid JSON, so this
module checks what the mock can show: tools and history reach the prompt the worker
gets (through ``--chat-template``; usage counts the rendered prompt), the 400s for
tool choices the frontend is not configured for, and that a parsed stream — here the
reasoning parser, which makes every token go through the output assembler — survives a
worker SIGKILLed mid-stream with exactly the uninterrupted text. Parsing real tool-call
text is tests/unit/test_chat_parsers_vs_vllm.py; the openai client's helpers on
dynrt's responses, tests/unit/test_chat_openai_client.py.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from dynrt.frontend.chat_template import template_message
from dynrt.runtime.embedded import EtcdServer, NatsServer
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from harness.frontend import FrontendProcess
from harness.sse import SseStream
from harness.worker import WorkerProcess
from tests.integration.test_migration import MAX_TOKENS, MESSAGES, SEED, cluster, reference_text

pytestmark = pytest.mark.timeout(90)

TEMPLATE = Path(__file__).parents[2] / "frontend" / "chat_templates" / "hermes_tools.jinja"
TOK = mock_tokenizer()
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
HISTORY = [{"role": "user", "content": "Weather in Oslo?"},
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
           {"role": "tool", "tool_call_id": "c1", "content": "-3C"}]


def rendered_prompt_tokens(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> int:
    """The prompt length the frontend must send: the template rendered as Transformers
    (and vLLM) render it, in mock tokens."""
    template_messages = [template_message(m["role"], m["content"] or "", tool_calls=None, tool_call_id=m.get(
        "tool_call_id")) for m in messages]
    for source, message in zip(messages, template_messages):
        if source.get("tool_calls"):
            message["tool_calls"] = [{"id": c["id"], "type": "function",
                                      "function": {"name": c["function"]["name"], "arguments": {"city": "Oslo"}}}
                                     for c in source["tool_calls"]]
    tool_dicts = None if tools is None else [
        {"type": "function", "function": {**t["function"]}} for t in tools]
    text, _ = render_jinja_template([template_messages], tools=tool_dicts, chat_template=TEMPLATE.read_text(),
                                    add_generation_prompt=True)
    return len(TOK.encode(text[0]))


async def post(url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            return response.status, await response.json()


def body(**fields: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": HISTORY, "max_tokens": 8, "seed": 1, "ignore_eos": True, **fields}


@pytest.fixture(scope="module")
async def frontends(etcd_server: EtcdServer, nats_server: NatsServer,
                    tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[dict[str, FrontendProcess]]:
    tmp = tmp_path_factory.mktemp("chat_tools")
    ns = "t" + uuid.uuid4().hex[:10]
    common = {"namespace": ns, "etcd_endpoints": etcd_server.endpoint, "nats_url": nats_server.url}
    worker = WorkerProcess(tmp, speedup=10, args=["--context-length", "4096"], **common)
    fes = {
        "tools": FrontendProcess(tmp, expect_instances=1, name="fe_tools", **common,
                                 args=["--chat-template", str(TEMPLATE), "--enable-auto-tool-choice",
                                       "--tool-call-parser", "hermes"]),
        "template": FrontendProcess(tmp, expect_instances=1, name="fe_template", **common,
                                    args=["--chat-template", str(TEMPLATE)]),
        "plain": FrontendProcess(tmp, expect_instances=1, name="fe_plain", **common),
    }
    try:
        await worker.start()
        await asyncio.gather(*(fe.start() for fe in fes.values()))
        yield {name: fe for name, fe in fes.items()}
    finally:
        await asyncio.gather(*(fe.stop() for fe in fes.values()), worker.stop())


async def test_tools_and_history_reach_the_prompt(frontends: dict[str, FrontendProcess]) -> None:
    status, with_tools = await post(frontends["tools"].url, body(tools=[WEATHER]))
    assert status == 200, with_tools
    assert with_tools["usage"]["prompt_tokens"] == rendered_prompt_tokens(HISTORY, [WEATHER])
    message = with_tools["choices"][0]["message"]
    # the mock writes no tool call: auto leaves the text as content, finish as the engine's
    assert "tool_calls" not in message and message["content"]
    assert with_tools["choices"][0]["finish_reason"] == "length"
    # the same conversation without tools renders without the tool block
    status, without = await post(frontends["tools"].url, body())
    assert status == 200 and without["usage"]["prompt_tokens"] == rendered_prompt_tokens(HISTORY, None)
    assert without["usage"]["prompt_tokens"] < with_tools["usage"]["prompt_tokens"]
    # tool_choice none on a frontend without parser flags: rendered, not parsed, same prompt
    status, none = await post(frontends["template"].url, body(tools=[WEATHER], tool_choice="none"))
    assert status == 200 and none["usage"]["prompt_tokens"] == with_tools["usage"]["prompt_tokens"]
    assert none["choices"][0]["message"]["content"] == message["content"]


async def test_streamed_tool_auto_equals_non_streamed(frontends: dict[str, FrontendProcess]) -> None:
    url = frontends["tools"].url
    status, whole = await post(url, body(tools=[WEATHER], max_tokens=24))
    assert status == 200
    content, finish = "", None
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{url}/v1/chat/completions",
                                json=body(tools=[WEATHER], max_tokens=24, stream=True)) as response:
            assert response.status == 200
            events = SseStream(response)
            async for chunk in events:
                for choice in chunk["choices"]:
                    assert "tool_calls" not in choice["delta"]
                    content += choice["delta"].get("content") or ""
                    finish = choice.get("finish_reason") or finish
            assert events.done
    assert content == whole["choices"][0]["message"]["content"] and finish == "length"


async def test_tool_choice_needs_the_parser_flags(frontends: dict[str, FrontendProcess]) -> None:
    status, error = await post(frontends["template"].url, body(tools=[WEATHER]))
    assert status == 400 and error["error"]["param"] == "tool_choice"
    assert error["error"]["message"] == ('"auto" tool choice requires --enable-auto-tool-choice and '
                                         "--tool-call-parser to be set")
    status, error = await post(frontends["plain"].url, body(tools=[WEATHER], tool_choice="required"))
    assert status == 400 and "requires --tool-call-parser" in error["error"]["message"]
    status, error = await post(frontends["tools"].url, body(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_time"}}))
    assert status == 400 and "does not match any" in error["error"]["message"]


async def test_parsed_stream_survives_sigkill_with_the_uninterrupted_text(
        tmp_path: Path, namespace: str, etcd_server: EtcdServer, nats_server: NatsServer) -> None:
    """With a reasoning parser every token goes through the output assembler; the mock's
    text never closes a <think>, so all of it is reasoning. A worker SIGKILLed mid-stream:
    the migrated stream's reasoning is exactly the uninterrupted text."""
    reference = await reference_text()
    async with cluster(tmp_path, namespace, etcd_server.endpoint, nats_server.url, workers=2,
                       frontend_args=["--reasoning-parser", "deepseek_r1"]) as c:
        reasoning, content, finish, done = "", "", None, False
        started = asyncio.Event()

        async def read() -> None:
            nonlocal reasoning, content, finish, done
            request = {"model": "mock-model", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "seed": SEED,
                       "ignore_eos": True, "stream": True}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{c.frontend.url}/v1/chat/completions", json=request) as response:
                    assert response.status == 200
                    events = SseStream(response)
                    count = 0
                    async for chunk in events:
                        assert "error" not in chunk, chunk
                        for choice in chunk["choices"]:
                            reasoning += choice["delta"].get("reasoning") or ""
                            content += choice["delta"].get("content") or ""
                            finish = choice.get("finish_reason") or finish
                            count += 1
                            if count >= 40:
                                started.set()
                    done = events.done

        task = asyncio.create_task(read())
        await asyncio.wait_for(started.wait(), 20)
        victim = await c.serving_worker()
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        await asyncio.wait_for(task, 60)
        assert time.monotonic() - killed_at < 60
        assert await c.migrations() == {"killed": 1}
        assert done and finish == "length"
        assert reasoning == reference and content == ""
