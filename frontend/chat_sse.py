"""SSE chunks for the chat deltas that are not plain content: ``delta.reasoning`` and
``delta.tool_calls`` (vLLM's field names). They are rare next to content tokens, so
they are encoded from Structs directly; plain content keeps ``sse.ChatChunkEncoder``'s
spliced fast path."""

from __future__ import annotations

from typing import Literal

import msgspec

from dynrt.frontend.chat_output import MessageDelta, ParsedMessage

_encode = msgspec.json.Encoder().encode


class DeltaFunction(msgspec.Struct, kw_only=True, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(msgspec.Struct, kw_only=True, omit_defaults=True):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class ExtrasDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[DeltaToolCall] = []


class ExtrasChoice(msgspec.Struct, kw_only=True):
    index: int = 0
    delta: ExtrasDelta
    logprobs: None = None
    finish_reason: None = None


class ExtrasChunk(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ExtrasChoice]


def delta_event(request_id: str, model: str, created: int, delta: MessageDelta, index: int = 0) -> bytes:
    """One ``data:`` event carrying ``delta`` (reasoning, content and/or tool calls)."""
    calls = [DeltaToolCall(index=c.index, id=c.id, type="function" if c.id is not None else None,
                           function=DeltaFunction(name=c.name, arguments=c.arguments))
             for c in delta.tool_calls]
    chunk = ExtrasChunk(id=request_id, created=created, model=model, choices=[
        ExtrasChoice(index=index, delta=ExtrasDelta(content=delta.content, reasoning=delta.reasoning,
                                                    tool_calls=calls))])
    return b"data: " + _encode(chunk) + b"\n\n"


def message_fields(parsed: ParsedMessage) -> dict[str, object]:
    """``AssistantMessage`` keyword arguments for a parsed message (unset fields omitted)."""
    fields: dict[str, object] = {"content": parsed.content}
    if parsed.reasoning is not None:
        fields["reasoning"] = parsed.reasoning
    if parsed.tool_calls:
        fields["tool_calls"] = parsed.tool_calls
    return fields
