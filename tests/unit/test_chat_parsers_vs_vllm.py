"""dynrt's tool-call and reasoning parsers and tool-call structural tags against vLLM
0.32's own, on the same texts, streamed and not. Skipped where vLLM is not installed.

Streaming is compared on what a client assembles from the deltas (reasoning, content,
each call's name and concatenated arguments), not on chunk boundaries: dynrt's parsers
diff whole-text scans, so their deltas do not depend on how the text was cut; vLLM's
depend on its token boundaries. The texts are cut into "tokens" several ways (and the
think/tool tags kept whole, as a tokenizer with those special tokens would).
"""

from __future__ import annotations

import json
import re
from typing import Any

import msgspec
import pytest

from dynrt.frontend.chat_output import ChatDeltaAssembler, ChatOutputRules, parse_message
from dynrt.frontend.reasoning import make_reasoning_parser
from dynrt.frontend.tool_grammar import mistral_tool_schema, tool_call_structural_tag
from dynrt.frontend.tool_parsers import make_tool_call_parser
from dynrt.frontend.tools import ChatTool, NamedToolChoice, ToolChoice

pytest.importorskip("vllm")

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.parser.parser_manager import ParserManager  # noqa: E402

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOLS = [WEATHER, TIME]


class StubTokenizer:
    """What vLLM's parsers read from a tokenizer: the vocabulary of their tags."""

    vocab = {"<think>": 1001, "</think>": 1002, "<|python_tag|>": 1003, "<tool_call>": 1004, "</tool_call>": 1005,
             "[TOOL_CALLS]": 1006}

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __len__(self) -> int:
        return 2000


_TAGS = re.compile(r"(<think>|</think>|<tool_call>|</tool_call>|<\|python_tag\|>|\[TOOL_CALLS\])")


def tokens(text: str, size: int) -> list[tuple[str, int]]:
    """``text`` cut into pieces of ``size`` characters, tags whole (with their ids)."""
    out: list[tuple[str, int]] = []
    for piece in _TAGS.split(text):
        if not piece:
            continue
        if piece in StubTokenizer.vocab:
            out.append((piece, StubTokenizer.vocab[piece]))
        else:
            out.extend((piece[i:i + size], 7) for i in range(0, len(piece), size))
    return out


def vllm_request(tool_choice: Any = "auto", tools: list[dict[str, Any]] | None = None) -> ChatCompletionRequest:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if tools is not False:
        body["tools"] = TOOLS if tools is None else tools
        body["tool_choice"] = tool_choice
    return ChatCompletionRequest.model_validate(body)


def vllm_parser(tool_parser: str | None, reasoning_parser: str | None, request: ChatCompletionRequest) -> Any:
    cls = ParserManager.get_parser(tool_parser_name=tool_parser, reasoning_parser_name=reasoning_parser,
                                   enable_auto_tools=True)
    return cls(StubTokenizer(), request.tools, chat_template_kwargs={}, model_config=None)


def dynrt_rules(tool_parser: str | None, reasoning_parser: str | None, mode: str = "auto") -> ChatOutputRules:
    forced = mode in ("required", "named")
    return ChatOutputRules(tool_mode=mode if tool_parser else "none",  # type: ignore[arg-type]
                           tool_parser=make_tool_call_parser(tool_parser, forced=forced) if tool_parser else None,
                           reasoning_parser=make_reasoning_parser(reasoning_parser) if reasoning_parser else None)


def assemble(deltas: list[dict[str, Any]]) -> dict[str, Any]:
    """What a client makes of a stream's deltas."""
    out: dict[str, Any] = {"reasoning": "", "content": "", "calls": {}}
    for delta in deltas:
        out["reasoning"] += delta.get("reasoning") or ""
        out["content"] += delta.get("content") or ""
        for call in delta.get("tool_calls") or []:
            entry = out["calls"].setdefault(call["index"], {"name": None, "arguments": "", "ids": 0})
            function = call.get("function") or {}
            if call.get("id"):
                entry["ids"] += 1
                entry["name"] = function.get("name")
            entry["arguments"] += function.get("arguments") or ""
    return out


def vllm_stream(text: str, size: int, tool_parser: str | None, reasoning_parser: str | None,
                request: ChatCompletionRequest) -> dict[str, Any]:
    parser = vllm_parser(tool_parser, reasoning_parser, request)
    pieces = tokens(text, size)
    deltas = []
    for i, (piece, token_id) in enumerate(pieces):
        delta = parser.parse_delta(piece, [token_id], request, prompt_token_ids=[1, 2],
                                   finished=i == len(pieces) - 1)
        if delta is not None:
            deltas.append(delta.model_dump(exclude_none=True))
    return assemble(deltas)


def assert_same_stream(ours: dict[str, Any], text: str, size: int, tool_parser: str | None,
                       reasoning_parser: str | None, request: ChatCompletionRequest) -> None:
    theirs = vllm_stream(text, size, tool_parser, reasoning_parser, request)
    if tool_parser == "mistral" and not all(_is_json(c["arguments"]) for c in theirs["calls"].values()):
        # vLLM's pre-v11 mistral streaming puts the ': ' before an arguments object into
        # the arguments when a delta ends between them (invalid JSON for the client);
        # dynrt streams the object: compare with vLLM's non-streamed calls instead.
        _, _, calls = nonstream_vllm(text, tool_parser, reasoning_parser, request)
        assert [(c["name"], json.loads(c["arguments"])) for c in ours["calls"].values()] == calls
        theirs["calls"] = ours["calls"]
    assert ours == theirs


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def dynrt_stream(text: str, size: int, rules: ChatOutputRules) -> dict[str, Any]:
    assembler = ChatDeltaAssembler(rules)
    deltas = []
    for piece, _ in tokens(text, size):
        deltas.append(assembler.feed(piece))
    deltas.append(assembler.finish())
    as_dicts = [{"reasoning": d.reasoning, "content": d.content,
                 "tool_calls": [{"index": c.index, "id": c.id,
                                 "function": {"name": c.name, "arguments": c.arguments}} for c in d.tool_calls]}
                for d in deltas]
    return assemble(as_dicts)


HERMES_TEXTS = [
    "Just an answer, no tools.",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call>'
    '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut off (length)
    "<tool_call>\nnot json\n</tool_call>",
    "a < b but <tool_ is not a tag",
]

LLAMA_TEXTS = [
    "Just an answer.",
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
    '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
]

MISTRAL_TEXTS = [
    "Just an answer.",
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]',
    '[TOOL_CALLS] {"name": "get_weather", "arguments": {"city":  "Lyon"}}',
    '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}] and then some text',
    "[TOOL_CALLS] not json",
]
MISTRAL_FORCED = [
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}}]',
]

REASONING_TEXTS = [
    "<think>Let me think.</think>The answer is 4.",
    "I think without an opening tag</think>Answer.",
    "<think>still thinking when cut off",
    "<think>done</think>",
    "No reasoning tags at all",
]


def nonstream_vllm(text: str, tool_parser: str | None, reasoning_parser: str | None,
                   request: ChatCompletionRequest) -> tuple[Any, Any, list[tuple[str, Any]]]:
    parser = vllm_parser(tool_parser, reasoning_parser, request)
    reasoning, content, calls = parser.parse(text, request, enable_auto_tools=True)
    return reasoning, content, [(c.name, json.loads(c.arguments)) for c in calls or []]


def nonstream_dynrt(text: str, rules: ChatOutputRules) -> tuple[Any, Any, list[tuple[str, Any]]]:
    message = parse_message(text, rules)
    return message.reasoning, message.content, [(c.function.name, json.loads(c.function.arguments))
                                                for c in message.tool_calls]


@pytest.mark.parametrize("text", HERMES_TEXTS)
def test_hermes_extract_matches_vllm(text: str) -> None:
    assert nonstream_dynrt(text, dynrt_rules("hermes", None)) == nonstream_vllm(text, "hermes", None,
                                                                                  vllm_request())


@pytest.mark.parametrize("text", LLAMA_TEXTS)
def test_llama3_json_extract_matches_vllm(text: str) -> None:
    assert nonstream_dynrt(text, dynrt_rules("llama3_json", None)) == nonstream_vllm(text, "llama3_json", None,
                                                                                       vllm_request())


@pytest.mark.parametrize("text", MISTRAL_TEXTS)
def test_mistral_extract_matches_vllm(text: str) -> None:
    assert nonstream_dynrt(text, dynrt_rules("mistral", None)) == nonstream_vllm(text, "mistral", None,
                                                                                   vllm_request())


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("text", MISTRAL_FORCED)
@pytest.mark.parametrize("tool_choice", ["required", NAMED])
def test_mistral_forced_matches_vllm(text: str, tool_choice: Any) -> None:
    mode = "required" if tool_choice == "required" else "named"
    request = vllm_request(tool_choice)
    reasoning, content, calls = nonstream_dynrt(text, dynrt_rules("mistral", None, mode))
    # vLLM's serving turns the parser's None into "" for a forced call's message (so does dynrt)
    assert content == ""
    assert (reasoning, None, calls) == nonstream_vllm(text, "mistral", None, request)
    for size in (1, 3, 5, 1000):
        ours = dynrt_stream(text, size, dynrt_rules("mistral", None, mode))
        assert_same_stream(ours, text, size, "mistral", None, request)


@pytest.mark.parametrize("tool_choice", ["required", NAMED, "auto"])
def test_mistral_forced_schema_matches_vllm(tool_choice: Any) -> None:
    request = vllm_request(tool_choice)
    vllm_parser("mistral", None, request).adjust_request(request)
    so = request.structured_outputs
    theirs = None if so is None else so.json
    choice: Any = tool_choice if isinstance(tool_choice, str) else msgspec.convert(tool_choice, NamedToolChoice)
    assert mistral_tool_schema(msgspec.convert(TOOLS, list[ChatTool]), choice) == theirs


def test_mistral_call_ids_are_mistral_ids() -> None:
    message = parse_message('[TOOL_CALLS] [{"name": "f", "arguments": {}}]', dynrt_rules("mistral", None))
    assert re.fullmatch(r"[A-Za-z0-9]{9}", message.tool_calls[0].id)


@pytest.mark.parametrize("text", REASONING_TEXTS)
def test_deepseek_r1_extract_matches_vllm(text: str) -> None:
    request = vllm_request(tools=False)
    assert nonstream_dynrt(text, dynrt_rules(None, "deepseek_r1")) == nonstream_vllm(text, None, "deepseek_r1",
                                                                                       request)


def test_reasoning_then_hermes_call_matches_vllm() -> None:
    text = ('<think>The user wants weather.</think><tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Rome"}}\n</tool_call>')
    assert nonstream_dynrt(text, dynrt_rules("hermes", "deepseek_r1")) == nonstream_vllm(
        text, "hermes", "deepseek_r1", vllm_request())


STREAM_CASES = [
    *[("hermes", None, t) for t in HERMES_TEXTS if "not json" not in t],
    *[("llama3_json", None, t) for t in LLAMA_TEXTS[1:3]],
    *[("mistral", None, t) for t in MISTRAL_TEXTS if "not json" not in t],
    *[(None, "deepseek_r1", t) for t in REASONING_TEXTS[:4]],
    ("hermes", "deepseek_r1", '<think>hmm</think>Sure. <tool_call>\n{"name": "get_weather", "arguments": '
                              '{"city": "Paris"}}\n</tool_call>'),
]


@pytest.mark.parametrize(("tool_parser", "reasoning_parser", "text"), STREAM_CASES)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_stream_matches_vllm(tool_parser: str | None, reasoning_parser: str | None, text: str, size: int) -> None:
    request = vllm_request(tools=None if tool_parser else False)
    ours = dynrt_stream(text, size, dynrt_rules(tool_parser, reasoning_parser))
    if tool_parser == "llama3_json" and sum(token_id == 7 for _, token_id in tokens(text, size)) == 1:
        # vLLM's llama3_json streaming sends nothing for a call that arrives in one
        # delta (its first sight of a call only moves its cursor); dynrt sends the call,
        # as vLLM's non-streaming parse has it.
        reasoning, content, calls = nonstream_vllm(text, tool_parser, reasoning_parser, request)
        assert [(c["name"], json.loads(c["arguments"])) for c in ours["calls"].values()] == calls
        return
    assert_same_stream(ours, text, size, tool_parser, reasoning_parser, request)
    for call in ours["calls"].values():
        assert call["ids"] == 1  # one id and name per call, then argument fragments


# -- structural tags ------------------------------------------------------------------

STRICT_WEATHER = {"type": "function", "function": {**WEATHER["function"], "strict": True}}
STRICT_NOARGS = {"type": "function", "function": {"name": "ping", "strict": True}}


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
@pytest.mark.parametrize("tools", [TOOLS, [STRICT_WEATHER, TIME], [STRICT_WEATHER, STRICT_NOARGS]])
@pytest.mark.parametrize("tool_choice", ["auto", "required", NAMED, "none"])
@pytest.mark.parametrize("parallel_tool_calls", [None, True, False])
def test_structural_tag_matches_vllm(parser: str, tools: list[dict[str, Any]], tool_choice: Any,
                                     parallel_tool_calls: bool | None) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": tools,
                            "tool_choice": tool_choice}
    if parallel_tool_calls is not None:
        body["parallel_tool_calls"] = parallel_tool_calls
    request = ChatCompletionRequest.model_validate(body)
    vllm_parser(parser, None, request).adjust_request(request)
    so = request.structured_outputs
    theirs = json.loads(so.structural_tag) if so is not None and so.structural_tag else None

    choice: Any = tool_choice if isinstance(tool_choice, str) else msgspec.convert(tool_choice, NamedToolChoice)
    ours_text = tool_call_structural_tag(parser, msgspec.convert(tools, list[ChatTool]), choice, parallel_tool_calls)
    assert (json.loads(ours_text) if ours_text else None) == theirs
    if theirs is not None:
        assert request.response_format is None


def test_named_choice_type() -> None:
    assert isinstance(msgspec.convert(NAMED, ToolChoice), NamedToolChoice)  # type: ignore[arg-type]
