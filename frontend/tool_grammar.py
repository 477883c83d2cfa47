"""The output constraint that makes a model call a tool: an xgrammar structural tag.

vLLM 0.32 (its default ``VLLM_ENFORCE_STRICT_TOOL_CALLING=1``) forces ``tool_choice``
``required`` / a named tool for the ``hermes`` and ``llama3_json`` parsers not with a
JSON schema but with a structural tag in the parser's own format (``<tool_call>{"name":
..., "arguments": ...}</tool_call>``; ``{"name": ..., "parameters": ...}``), and parses
the output with the same parser as ``auto``. ``auto`` is constrained too when a tool is
``strict`` or ``parallel_tool_calls`` is false. A tool's arguments follow its
``parameters`` schema only when the tool is ``strict``; otherwise any JSON.

vLLM builds the tag with xgrammar's Python models
(``vllm/tool_parsers/structural_tag_registry.py``); the frontend does not carry
xgrammar, so the same JSON is written here by hand, and a test compares it with vLLM's
for each case.

``mistral`` (vLLM's pre-v11 / Hugging Face tokenizer path, ``vllm/parser/mistral.py``)
forces ``required`` / named with a JSON schema for the bare call array instead
(:func:`mistral_tool_schema`), and leaves ``auto`` unconstrained.
"""

from __future__ import annotations

import json
from typing import Any

from dynrt.frontend.tools import ChatTool, NamedToolChoice, ToolChoice

_THINK_TAGS = ["<think>", "</think>"]


def tool_call_structural_tag(parser: str, tools: list[ChatTool], tool_choice: ToolChoice | None,
                             parallel_tool_calls: bool | None) -> str | None:
    """The structural tag (JSON text) for ``tools`` under ``tool_choice``, or ``None``
    when vLLM leaves the output unconstrained (``none``; ``auto`` with no strict tool
    and parallel calls allowed)."""
    choice = "auto" if tool_choice is None else tool_choice
    single = parallel_tool_calls is False
    if choice == "none":
        return None
    if choice == "auto" and not single and not any(tool.function.strict is True for tool in tools):
        return None
    if isinstance(choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == choice.function.name]
    if parser == "hermes":
        fmt = _hermes(tools, choice, single)
    elif parser == "llama3_json":
        fmt = _llama(tools, choice, single)
    else:
        return None
    return json.dumps({"type": "structural_tag", "format": fmt})


def _arguments(tool: ChatTool) -> dict[str, Any]:
    params = tool.function.parameters
    schema: Any = params if tool.function.strict is True and params is not None else True
    return {"type": "json_schema", "json_schema": schema, "style": "json", "any_order": False,
            "max_whitespace_cnt": None, "excludes": []}


def _tag(begin: str, tool: ChatTool, end: str) -> dict[str, Any]:
    return {"type": "tag", "begin": begin, "content": _arguments(tool), "end": end}


def _hermes(tools: list[ChatTool], choice: ToolChoice, single: bool) -> dict[str, Any]:
    tags = []
    for tool in tools:
        head = '{"name": ' + json.dumps(tool.function.name) + ', "arguments": '
        tags.append(_tag("<tool_call>\n" + head, tool, "}\n</tool_call>"))
        tags.append(_tag("<tool_call>" + head, tool, "}</tool_call>"))
    if choice == "auto":
        return {"type": "triggered_tags", "triggers": ["<tool_call>"], "tags": tags, "at_least_one": False,
                "stop_after_first": single, "excludes": []}
    return {"type": "tags_with_separator", "tags": tags, "separator": "", "at_least_one": True,
            "stop_after_first": single or isinstance(choice, NamedToolChoice)}


def _llama(tools: list[ChatTool], choice: ToolChoice, single: bool) -> dict[str, Any]:
    tags = [_tag('{"name": ' + json.dumps(tool.function.name) + ', "parameters": ', tool, "}") for tool in tools]
    if isinstance(choice, NamedToolChoice):
        return tags[0]
    return {"type": "triggered_tags", "triggers": ['{"name": '], "tags": tags, "at_least_one": choice == "required",
            "stop_after_first": single, "excludes": list(_THINK_TAGS)}


def mistral_tool_schema(tools: list[ChatTool], tool_choice: ToolChoice | None) -> dict[str, Any] | None:
    """vLLM's ``_build_guided_schema_pre_v11``: ``[{"name", "arguments"}, ...]`` for
    ``required`` (any tool) or a named tool (that tool, at most one call); else ``None``."""
    extra: dict[str, Any] = {}
    if isinstance(tool_choice, NamedToolChoice):
        tools = [tool for tool in tools if tool.function.name == tool_choice.function.name]
        extra["maxItems"] = 1
    elif tool_choice != "required":
        return None
    any_of = [{"type": "object",
               "properties": {"name": {"type": "string", "enum": [tool.function.name]},
                              "arguments": tool.function.parameters or {"type": "object"}},
               "required": ["name", "arguments"]} for tool in tools]
    return {"type": "array", "minItems": 1, **extra, "items": {"type": "object", "anyOf": any_of}}
