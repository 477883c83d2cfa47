"""Tools, structured output and chat-template fields on the request side (validation and
mapping, vLLM's 400s), the chat template inputs, and the output assembly's independence
from how the text was split (what makes a migrated stream parse as an uninterrupted one)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dynrt.frontend.chat_output import ChatDeltaAssembler, ChatOutputRules, finish_reason_of, parse_message
from dynrt.frontend.chat_request import ChatSettings, plan_chat
from dynrt.frontend.chat_template import load_chat_template, template_message
from dynrt.frontend.errors import OpenAIError
from dynrt.frontend.openai_protocol import decode_chat_request, decode_completion_request
from dynrt.frontend.reasoning import ThinkParser
from dynrt.frontend.structured_output import ResponseFormat, StructuredOutputsParams, structured_output
from dynrt.frontend.tool_parsers import HermesParser, Llama3JsonParser, MistralParser
from dynrt.frontend.tools import FunctionCall, MessageToolCall
from dynrt.runtime.protocol import StructuredOutput

TEMPLATE = Path(__file__).parents[2] / "frontend" / "chat_templates" / "hermes_tools.jinja"
WEATHER = {"type": "function", "function": {"name": "get_weather",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
TOOLS_ON = ChatSettings.of(chat_template="", enable_auto_tool_choice=True, tool_call_parser="hermes",
                           reasoning_parser="")
TOOLS_OFF = ChatSettings()


def chat(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


def plan(settings: ChatSettings = TOOLS_ON, **fields: Any) -> Any:
    return plan_chat(decode_chat_request(chat(**fields)), settings)


def error_of(fn: Any, *args: Any, **kw: Any) -> OpenAIError:
    with pytest.raises(OpenAIError) as info:
        fn(*args, **kw)
    assert info.value.status == 400
    return info.value


# -- validation: vLLM's 400s --------------------------------------------------------------

@pytest.mark.parametrize(("settings", "fields", "param", "message"), [
    (TOOLS_OFF, {"tools": [WEATHER]}, "tool_choice",
     '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'),
    (TOOLS_OFF, {"tools": [WEATHER], "tool_choice": "required"}, "tool_choice",
     'tool_choice="required" requires --tool-call-parser to be set'),
    (TOOLS_OFF, {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
     "tool_choice", 'tool_choice=function "get_weather" requires --tool-call-parser to be set'),
    (TOOLS_ON, {"tools": []}, "tools", "`tools` must not be an empty array"),
    (TOOLS_ON, {"tool_choice": "required"}, "tool_choice", "When using `tool_choice`, `tools` must be set."),
    (TOOLS_ON, {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "does not match any of the specified `tools`"),
    (TOOLS_ON, {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "forced or strict tool call"),
    (TOOLS_ON, {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                "structured_outputs": {"regex": "a+"}}, "structured_outputs", "either use constraints"),
    (TOOLS_ON, {"chat_template": "{{ messages }}"}, "chat_template", "--trust-request-chat-template"),
    (TOOLS_ON, {"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "unexpected chat template"),
    (TOOLS_ON, {"continue_final_message": True}, "continue_final_message", "Cannot set both"),
    (TOOLS_ON, {"response_format": {"type": "json_schema"}}, "response_format", "'json_schema' field must be"),
    (TOOLS_ON, {"structured_outputs": {}}, "structured_outputs", "none are specified"),
    (TOOLS_ON, {"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "multiple"),
    (TOOLS_ON, {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
     "response_format", "multiple"),
    (TOOLS_ON, {"response_format": {"type": "structural_tag"}}, "response_format", "structural_tag"),
])
def test_vllm_400s(settings: ChatSettings, fields: dict[str, Any], param: str, message: str) -> None:
    error = error_of(plan, settings, **fields)
    assert (error.param, message in error.message) == (param, True), error.message


@pytest.mark.parametrize("field", ["guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                   "guided_whitespace_pattern", "guided_decoding_backend"])
def test_removed_guided_fields_are_refused_naming_the_replacement(field: str) -> None:
    for decode, body in ((decode_chat_request, chat(**{field: "x"})),
                         (decode_completion_request, json.dumps({"model": "m", "prompt": "p", field: "x"}).encode())):
        error = error_of(decode, body)
        assert error.param == field and "structured_outputs" in error.message or "backend" in error.message


def test_unknown_structured_outputs_key_is_a_400() -> None:
    error = error_of(decode_chat_request, chat(structured_outputs={"jsonn": {}}))
    assert error.param == "structured_outputs.jsonn" and "jsonn" in error.message


def test_settings_need_a_parser_for_auto_tool_choice() -> None:
    with pytest.raises(ValueError, match="requires --tool-call-parser"):
        ChatSettings.of(chat_template="", enable_auto_tool_choice=True, tool_call_parser="", reasoning_parser="")


# -- mapping --------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, None),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutput(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredOutput(json=json.dumps(SCHEMA, separators=(",", ":")))),
    ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutput(regex="[0-9]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutput(choice=["yes", "no"])),
    ({"structured_outputs": {"grammar": "root ::= \"a\""}}, StructuredOutput(grammar="root ::= \"a\"")),
    ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
     StructuredOutput(json=json.dumps(SCHEMA, separators=(",", ":")), disable_any_whitespace=True)),
    ({"structured_outputs": {"json": '{"type": "object"}'}}, StructuredOutput(json='{"type": "object"}')),
    ({"structured_outputs": {"json_object": True, "whitespace_pattern": " ?"}},
     StructuredOutput(json_object=True, whitespace_pattern=" ?")),
    # response_format overrides the same-named constraint of structured_outputs
    ({"structured_outputs": {"json": {"type": "string"}}, "response_format": {"type": "json_schema",
                                                                              "json_schema": {"name": "x",
                                                                                              "schema": SCHEMA}}},
     StructuredOutput(json=json.dumps(SCHEMA, separators=(",", ":")))),
])
def test_structured_output_mapping(fields: dict[str, Any], expected: StructuredOutput | None) -> None:
    assert plan(TOOLS_OFF, **fields).structured == expected
    completion = decode_completion_request(json.dumps({"model": "m", "prompt": "p", **fields}).encode())
    assert structured_output(completion.response_format, completion.structured_outputs) == expected


def test_structured_output_mapping_matches_vllm() -> None:
    """The constraint vLLM's request would carry, field by field."""
    pytest.importorskip("vllm")
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    cases = [{"response_format": {"type": "json_object"}},
             {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
             {"structured_outputs": {"regex": "[0-9]+", "disable_any_whitespace": True}},
             {"structured_outputs": {"choice": ["a", "b"]}},
             {"structured_outputs": {"json": SCHEMA}, "response_format": {"type": "text"}}]
    for fields in cases:
        theirs = ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}).extract_structured_outputs()
        ours = plan(TOOLS_OFF, **fields).structured
        assert theirs is not None and ours is not None
        assert (json.loads(ours.json) if ours.json else None) == theirs.json
        assert (ours.regex, ours.choice, ours.grammar, ours.json_object or None, ours.disable_any_whitespace) == (
            theirs.regex, theirs.choice, theirs.grammar, theirs.json_object, theirs.disable_any_whitespace)


def test_forced_tool_call_is_a_structural_tag_and_auto_is_free() -> None:
    required = plan(tools=[WEATHER], tool_choice="required")
    assert required.structured is not None and required.structured.structural_tag is not None
    assert json.loads(required.structured.structural_tag)["format"]["at_least_one"] is True
    assert required.output.tool_mode == "required" and isinstance(required.output.tool_parser, HermesParser)
    auto = plan(tools=[WEATHER])
    assert auto.structured is None and auto.output.tool_mode == "auto"
    # tool_choice none: the tools still reach the template, the output is not parsed
    none = plan(tools=[WEATHER], tool_choice="none")
    assert none.output.tool_parser is None and none.template.tools is not None and not none.output.needed
    # auto with a response format: the format constrains, the parser parses (as vLLM)
    fmt = plan(tools=[WEATHER], response_format={"type": "json_object"})
    assert fmt.structured == StructuredOutput(json_object=True) and fmt.output.tool_mode == "auto"


def test_mistral_forces_calls_with_a_json_schema() -> None:
    settings = ChatSettings.of(chat_template="", enable_auto_tool_choice=True, tool_call_parser="mistral",
                               reasoning_parser="")
    forced = plan(settings, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert forced.structured is not None and forced.structured.json is not None
    schema = json.loads(forced.structured.json)
    assert (schema["type"], schema["maxItems"]) == ("array", 1)
    parser = forced.output.tool_parser
    assert isinstance(parser, MistralParser) and parser.forced
    assert plan(settings, tools=[WEATHER]).structured is None


# -- template inputs -------------------------------------------------------------------------

def test_chat_template_setting_is_a_file_or_the_template(tmp_path: Path) -> None:
    assert load_chat_template("") is None
    assert load_chat_template(str(TEMPLATE)) == TEMPLATE.read_text()
    assert load_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="does not exist"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_history_tool_calls_reach_the_template_with_object_arguments() -> None:
    call = MessageToolCall(id="c1", function=FunctionCall(name="f", arguments='{"x": 1}'))
    bad = MessageToolCall(id="c2", function=FunctionCall(name="f", arguments="not json"))
    assert template_message("assistant", "", tool_calls=[call, bad]) == {
        "role": "assistant", "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"x": 1}}},
                       {"id": "c2", "type": "function", "function": {"name": "f", "arguments": {}}}]}
    assert template_message("tool", "22C", tool_call_id="c1") == {"role": "tool", "content": "22C",
                                                                  "tool_call_id": "c1"}


def test_decoded_history_with_tool_calls_and_tool_results() -> None:
    req = decode_chat_request(chat(messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3C"}]))
    messages = req.template_messages()
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert messages[2] == {"role": "tool", "content": "-3C", "tool_call_id": "c1"}
    error = error_of(decode_chat_request, chat(messages=[{"role": "user"}]))
    assert error.param == "messages[0].content"


def test_hf_tokenizer_renders_tools_and_kwargs_into_the_prompt() -> None:
    model = Path.home() / ".cache" / "dynrt" / "smollm2-135m-instruct"
    if not model.exists():
        pytest.skip("the SmolLM2 test model is not downloaded")
    from dynrt.frontend.tokenizer import HFTokenizer
    from transformers import AutoTokenizer

    tok = HFTokenizer(AutoTokenizer.from_pretrained(str(model)))
    p = plan_chat(decode_chat_request(chat(tools=[WEATHER], messages=[
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "-3C"}])),
        ChatSettings.of(chat_template=str(TEMPLATE), enable_auto_tool_choice=True, tool_call_parser="hermes",
                        reasoning_parser=""))
    messages = decode_chat_request(chat(messages=[{"role": "user", "content": "weather?"}])).template_messages()
    text = tok.decode(tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
         {"role": "tool", "content": "-3C", "tool_call_id": "c1"}], p.template))
    assert '"name": "get_weather"' in text and "<tools>" in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in text
    assert "<tool_response>\n-3C\n</tool_response>" in text
    # without --chat-template the model's own template (no tools in SmolLM2's) is used
    plain = plan_chat(decode_chat_request(chat()), TOOLS_OFF)
    assert "<tools>" not in tok.decode(tok.apply_chat_template(messages, plain.template))


# -- output ---------------------------------------------------------------------------------

HERMES = ChatOutputRules(tool_mode="auto", tool_parser=HermesParser(), reasoning_parser=ThinkParser())
TEXTS = [
    ('<think>Need weather for two cities.</think>On it. <tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "Oslo"}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n'
     "</tool_call>", HERMES),
    ('{"name": "get_weather", "parameters": {"city": "Zürich"}}; {"name": "get_time", "parameters": {}}',
     ChatOutputRules(tool_mode="auto", tool_parser=Llama3JsonParser())),
    ("<think>plain</think>just text with a < sign and <tool but no call", HERMES),
    ('Sure.[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", '
     '"arguments": {}}]', ChatOutputRules(tool_mode="auto", tool_parser=MistralParser())),
    ('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]',
     ChatOutputRules(tool_mode="required", tool_parser=MistralParser(forced=True))),
]


def stream(text: str, cuts: list[int], rules: ChatOutputRules) -> dict[str, Any]:
    assembler = ChatDeltaAssembler(rules)
    out: dict[str, Any] = {"reasoning": "", "content": "", "calls": []}
    bounds = [0, *sorted(cuts), len(text)]
    deltas = [assembler.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [assembler.finish()]
    for d in deltas:
        out["reasoning"] += d.reasoning or ""
        out["content"] += d.content or ""
        for c in d.tool_calls:
            if c.id is not None:
                out["calls"].append([c.name, ""])
            out["calls"][c.index][1] += c.arguments or ""
    return out


@pytest.mark.parametrize(("text", "rules"), TEXTS)
def test_any_split_of_the_text_streams_the_same_message(text: str, rules: ChatOutputRules) -> None:
    """A migration resumes the text at an arbitrary point: the message must not change."""
    rng = random.Random(7)
    whole = stream(text, [], rules)
    for _ in range(50):
        cuts = rng.sample(range(1, len(text)), rng.randint(1, min(20, len(text) - 1)))
        assert stream(text, cuts, rules) == whole
    assert stream(text, list(range(1, len(text))), rules) == whole  # one character at a time
    parsed = parse_message(text, rules)
    assert [[c.function.name, json.loads(c.function.arguments)] for c in parsed.tool_calls] == [
        [name, json.loads(args)] for name, args in whole["calls"]]
    assert (parsed.reasoning or "") == whole["reasoning"]


def test_finish_reasons_follow_vllm() -> None:
    auto = ChatOutputRules(tool_mode="auto", tool_parser=HermesParser())
    required = ChatOutputRules(tool_mode="required", tool_parser=HermesParser())
    named = ChatOutputRules(tool_mode="named", tool_parser=HermesParser())
    assert finish_reason_of(auto, True, "length", streamed=False) == "tool_calls"
    assert finish_reason_of(auto, True, "length", streamed=True) == "length"
    assert finish_reason_of(auto, False, "stop", streamed=False) == "stop"
    assert finish_reason_of(required, False, "stop", streamed=False) == "tool_calls"
    assert finish_reason_of(required, True, "stop", streamed=True) == "tool_calls"
    assert finish_reason_of(named, True, "stop", streamed=True) == "stop"
    assert finish_reason_of(named, True, "stop", streamed=False) == "stop"


def test_forced_call_message_content_is_empty_string() -> None:
    rules = ChatOutputRules(tool_mode="required", tool_parser=HermesParser())
    message = parse_message('<tool_call>{"name": "f", "arguments": {}}</tool_call>', rules)
    assert message.content == "" and message.tool_calls[0].function.name == "f"
    assert msgspec.json.decode(msgspec.json.encode(message.tool_calls[0]))["id"].startswith("chatcmpl-tool-")


def test_structured_outputs_params_struct_names() -> None:
    assert msgspec.convert({"type": "json_object"}, ResponseFormat).type == "json_object"
    assert msgspec.convert({"choice": ["a"]}, StructuredOutputsParams).choice == ["a"]
