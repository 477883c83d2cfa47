"""Chat templating inputs: the ``--chat-template`` override, and a request's messages,
tools and template options as the template sees them.

As vLLM (``vllm/renderers/chat_utils.py``): ``--chat-template`` is a file path, or the
template itself when it contains a character no path would (``{``, ``}``, newline);
assistant ``tool_calls`` reach the template with their ``arguments`` parsed to an
object (the Transformers convention tool templates rely on); ``chat_template_kwargs``
are extra template variables, except ``chat_template`` and ``tokenize``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynrt.frontend import errors
from dynrt.frontend.tools import ChatTool, MessageToolCall, template_tools

_FORBIDDEN_KWARGS = frozenset({"chat_template", "tokenize"})


def load_chat_template(value: str) -> str | None:
    """The ``--chat-template`` setting's template text (``""``: none); raises
    ``ValueError`` for a path that does not exist."""
    if not value:
        return None
    path = Path(value)
    try:
        if path.is_file():
            return path.read_text()
    except OSError as e:
        raise ValueError(f"--chat-template {value!r} could not be read: {e}") from None
    if any(c in value for c in "{}\n"):
        return value  # the template itself
    raise ValueError(f"--chat-template {value!r} looks like a file path, but the file does not exist")


@dataclass(frozen=True, slots=True)
class TemplateOptions:
    """Everything besides the messages that goes into rendering a chat prompt."""

    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    chat_template: str | None = None  # the server's --chat-template; None: the model's


def template_options(*, tools: list[ChatTool] | None, add_generation_prompt: bool, continue_final_message: bool,
                     chat_template_kwargs: dict[str, Any] | None, chat_template: str | None) -> TemplateOptions:
    """Validated options (vLLM's 400s for the same mistakes)."""
    if continue_final_message and add_generation_prompt:
        raise errors.bad_request("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                                 "continue_final_message")
    kwargs = dict(chat_template_kwargs or {})
    forbidden = _FORBIDDEN_KWARGS & kwargs.keys()
    if forbidden:
        raise errors.bad_request(f"Found unexpected chat template kwargs from request: {sorted(forbidden)}",
                                 "chat_template_kwargs")
    return TemplateOptions(tools=template_tools(tools) if tools else None, add_generation_prompt=add_generation_prompt,
                           continue_final_message=continue_final_message, template_kwargs=kwargs,
                           chat_template=chat_template)


def template_message(role: str, content: str | None, *, name: str | None = None,
                     tool_calls: list[MessageToolCall] | None = None,
                     tool_call_id: str | None = None) -> dict[str, Any]:
    """One message as the template sees it."""
    message: dict[str, Any] = {"role": role, "content": content}
    if name is not None:
        message["name"] = name
    if tool_call_id is not None:
        message["tool_call_id"] = tool_call_id
    if tool_calls:
        message["tool_calls"] = [
            {"id": call.id, "type": call.type,
             "function": {"name": call.function.name, "arguments": _arguments_object(call.function.arguments)}}
            for call in tool_calls
        ]
    return message


def _arguments_object(arguments: str) -> dict[str, Any]:
    """vLLM: a history tool call's arguments as an object; malformed JSON (it would fail
    every later turn of the conversation) or a non-object becomes ``{}``."""
    if not arguments:
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}
