"""The official ``openai`` client's helpers parse dynrt's chat responses: structured
outputs (``client.chat.completions.parse`` and ``client.beta.chat.completions.parse``)
and tool calls, non-streamed and streamed (``client.chat.completions.stream``).

The bodies are made by dynrt's own code (``parse_message`` → ``ChatCompletionResponse``;
``ChatDeltaAssembler`` → ``sse.ChatChunkEncoder`` / ``chat_sse.delta_event``) from a
model output text, and served to the client through an in-process HTTP transport: the
mock engine cannot write valid JSON, and these checks are about the response shape.
The same checks against real model output belong in the vLLM parity tests."""

from __future__ import annotations

import json
from typing import Any

try:
    import httpx2
except ImportError:  # openai < 3 uses httpx
    import httpx as httpx2  # type: ignore[no-redef]
import msgspec
import openai
import pydantic
import pytest

from dynrt.frontend.chat_output import ChatDeltaAssembler, ChatOutputRules, finish_reason_of, parse_message
from dynrt.frontend.chat_sse import delta_event, message_fields
from dynrt.frontend.openai_protocol import AssistantMessage, ChatChoice, ChatCompletionResponse, UsageInfo
from dynrt.frontend.sse import DONE, ChatChunkEncoder
from dynrt.frontend.tool_parsers import HermesParser


class Weather(pydantic.BaseModel):
    city: str
    celsius: int


class GetWeather(pydantic.BaseModel):
    city: str


RULES = ChatOutputRules(tool_mode="auto", tool_parser=HermesParser())
PLAIN = ChatOutputRules()
TOOL_TEXT = ('<tool_call>\n{"name": "GetWeather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "GetWeather", "arguments": {"city": "Bergen"}}\n</tool_call>')
JSON_TEXT = '{"city": "Oslo", "celsius": -3}'


def response_body(text: str, rules: ChatOutputRules) -> bytes:
    parsed = parse_message(text, rules)
    finish = finish_reason_of(rules, bool(parsed.tool_calls), "stop", streamed=False)
    return msgspec.json.encode(ChatCompletionResponse(
        id="chatcmpl-1", created=1, model="m", usage=UsageInfo.of(5, 7),
        choices=[ChatChoice(message=AssistantMessage(**message_fields(parsed)),  # type: ignore[arg-type]
                            finish_reason=finish)]))  # type: ignore[arg-type]


def stream_body(text: str, rules: ChatOutputRules, size: int = 4) -> bytes:
    """As serving.py streams: the role chunk, then plain content through the spliced
    encoder or parsed deltas through ``delta_event``, the finish chunk, [DONE]."""
    encoder = ChatChunkEncoder("chatcmpl-1", "m", 1)
    events = [encoder.role()]
    if rules.needed:
        assembler = ChatDeltaAssembler(rules)
        for i in range(0, len(text), size):
            delta = assembler.feed(text[i:i + size])
            if delta:
                events.append(delta_event("chatcmpl-1", "m", 1, delta))
        delta = assembler.finish()
        if delta:
            events.append(delta_event("chatcmpl-1", "m", 1, delta))
        finish = finish_reason_of(rules, assembler.tools_called, "stop", streamed=True)
    else:
        events += [encoder.content(text[i:i + size]) for i in range(0, len(text), size)]
        finish = "stop"
    return b"".join([*events, encoder.finish(finish), DONE])  # type: ignore[arg-type]


def client_for(body: bytes, *, stream: bool) -> tuple[openai.OpenAI, list[dict[str, Any]]]:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        content_type = "text/event-stream" if stream else "application/json"
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    return openai.OpenAI(api_key="x", base_url="http://dynrt.test/v1", http_client=http, max_retries=0), sent


MESSAGES: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]


@pytest.mark.parametrize("beta", [False, True])
def test_parse_structured_output(beta: bool) -> None:
    client, sent = client_for(response_body(JSON_TEXT, PLAIN), stream=False)
    completions = client.beta.chat.completions if beta else client.chat.completions
    completion = completions.parse(model="m", messages=MESSAGES, response_format=Weather)
    assert completion.choices[0].message.parsed == Weather(city="Oslo", celsius=-3)
    # the request dynrt gets: a json_schema response_format, strict, with the model's schema
    fmt = sent[0]["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"]["required"] == ["city", "celsius"]


def test_parse_tool_calls() -> None:
    client, sent = client_for(response_body(TOOL_TEXT, RULES), stream=False)
    completion = client.chat.completions.parse(model="m", messages=MESSAGES,
                                               tools=[openai.pydantic_function_tool(GetWeather)])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [c.function.parsed_arguments for c in calls] == [GetWeather(city="Oslo"),  # type: ignore[union-attr]
                                                            GetWeather(city="Bergen")]
    assert all(c.id.startswith("chatcmpl-tool-") for c in calls) and len({c.id for c in calls}) == 2
    assert sent[0]["tools"][0]["function"]["strict"] is True


def test_stream_structured_output() -> None:
    client, _ = client_for(stream_body(JSON_TEXT, PLAIN), stream=True)
    with client.chat.completions.stream(model="m", messages=MESSAGES, response_format=Weather) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert final.choices[0].message.parsed == Weather(city="Oslo", celsius=-3)


@pytest.mark.parametrize("size", [1, 4, 1000])
def test_stream_tool_calls(size: int) -> None:
    client, _ = client_for(stream_body("Checking. " + TOOL_TEXT, RULES, size), stream=True)
    done: list[Any] = []
    with client.chat.completions.stream(model="m", messages=MESSAGES,
                                        tools=[openai.pydantic_function_tool(GetWeather)]) as stream:
        for event in stream:
            if event.type == "tool_calls.function.arguments.done":
                done.append(event.parsed_arguments)
        final = stream.get_final_completion()
    assert done == [GetWeather(city="Oslo"), GetWeather(city="Bergen")]
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking. "
    assert [c.function.parsed_arguments for c in choice.message.tool_calls or []] == done  # type: ignore[union-attr]


def test_plain_stream_create_with_tool_call_chunks() -> None:
    """``create(stream=True)``: the raw chunk objects carry index, id, type, name, arguments."""
    client, _ = client_for(stream_body(TOOL_TEXT, RULES, 3), stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                if call.id:
                    assert call.type == "function" and call.function and call.function.name
                    entry["id"], entry["name"] = call.id, call.function.name
                entry["arguments"] += (call.function.arguments if call.function else None) or ""
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("GetWeather", {"city": "Oslo"}), ("GetWeather", {"city": "Bergen"})]
