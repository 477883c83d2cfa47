"""Function tools in the chat API: the request's ``tools`` / ``tool_choice``, the
assistant's ``tool_calls``, and their validation (vLLM 0.32's
``ChatCompletionRequest.check_tool_usage``, same messages). The constraint that forces
a call is :mod:`dynrt.frontend.tool_grammar`; reading calls back out of the output is
:mod:`dynrt.frontend.chat_output`.
"""

from __future__ import annotations

import secrets
from typing import Any, Literal

import msgspec

from dynrt.frontend import errors


class FunctionDefinition(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(msgspec.Struct, kw_only=True):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class MessageToolCall(msgspec.Struct, kw_only=True):
    """A tool call in an assistant message of the history (``id`` optional, as vLLM)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


ToolMode = Literal["none", "auto", "required", "named"]


def new_tool_call_id() -> str:
    """vLLM's format (``chatcmpl-tool-`` + 16 hex digits)."""
    return "chatcmpl-tool-" + secrets.token_hex(8)


def tool_mode(tools: list[ChatTool] | None, tool_choice: ToolChoice | None) -> ToolMode:
    """What the request asks of tools. Without ``tool_choice``, tools mean ``auto`` (as
    OpenAI and vLLM)."""
    if not tools:
        return "none"
    if tool_choice is None:
        return "auto"
    if isinstance(tool_choice, NamedToolChoice):
        return "named"
    return tool_choice


def validate_tools(tools: list[ChatTool] | None, tool_choice: ToolChoice | None) -> None:
    """vLLM's ``check_tool_usage``: a non-empty ``tools``; a ``tool_choice`` other than
    ``none`` needs ``tools``; a named choice must name one of them."""
    if tools is not None and not tools:
        raise errors.bad_request(
            "`tools` must not be an empty array. Either provide at least one tool or omit the field entirely.",
            "tools")
    if tool_choice is None or tool_choice == "none":
        return
    if tools is None:
        raise errors.bad_request("When using `tool_choice`, `tools` must be set.", "tool_choice")
    if isinstance(tool_choice, NamedToolChoice):
        name = tool_choice.function.name
        if not name:
            raise errors.bad_request(
                f"Invalid `name` in `function`: `{name}` in `tool_choice`! Correct usage: "
                '`{"type": "function", "function": {"name": "my_function"}}`', "tool_choice.function.name")
        if all(tool.function.name != name for tool in tools):
            raise errors.bad_request("The tool specified in `tool_choice` does not match any of the specified `tools`",
                                     "tool_choice")


def template_tools(tools: list[ChatTool]) -> list[dict[str, Any]]:
    """The tools as the chat template gets them (vLLM: ``tool.model_dump()``)."""
    return [{"type": tool.type, "function": {"name": tool.function.name,
                                             "description": tool.function.description,
                                             "parameters": tool.function.parameters,
                                             **({} if tool.function.strict is None
                                                else {"strict": tool.function.strict})}}
            for tool in tools]
