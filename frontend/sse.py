"""Server-sent events for streamed completions, built for per-token speed.

A content chunk differs from the previous one only in its text, so each encoder (one
per choice: ``index``) encodes a template chunk once per request, cuts it where the text
goes, and per token splices ``prefix + json(text) + suffix``: one msgspec string encode
and one join. The shapes are the Structs in :mod:`dynrt.frontend.openai_protocol`; the
rare chunks (role, finish, usage) and chunks with logprobs are encoded from them directly.

Each event is ``data: <json>\\n\\n``; the stream ends with :data:`DONE`. An error after
the stream has begun is :func:`error_event` (an ``{"error": ...}`` event, then ``DONE``).
"""

from __future__ import annotations

import msgspec

from dynrt.frontend.errors import OpenAIError
from dynrt.frontend.logprobs import ChatLogprobs, CompletionLogprobs
from dynrt.frontend.openai_protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChunk,
    CompletionChunkChoice,
    FinishReason,
    UsageInfo,
)

DONE = b"data: [DONE]\n\n"

_encode = msgspec.json.Encoder().encode

# Placed where the text goes when encoding a template; JSON-encodes to itself.
_SLOT = "@@dynrt-text@@"
_SLOT_JSON = _encode(_SLOT)


def _event(chunk: msgspec.Struct) -> bytes:
    return b"data: " + _encode(chunk) + b"\n\n"


def _split(template: msgspec.Struct) -> tuple[bytes, bytes]:
    """``(b"data: " + json-before-text, json-after-text + b"\\n\\n")`` of ``template``."""
    # The text is the last string in a chunk, after id and model: cut at the last slot.
    before, _, after = _encode(template).rpartition(_SLOT_JSON)
    return b"data: " + before, after + b"\n\n"


def error_event(error: OpenAIError) -> bytes:
    """An error after streaming began: the error object as an event, then ``[DONE]``."""
    return b"data: " + error.to_body() + b"\n\n" + DONE


class ChatChunkEncoder:
    """``chat.completion.chunk`` events for one choice (``index``) of a request."""

    __slots__ = ("_id", "_created", "_model", "_index", "_prefix", "_suffix")

    def __init__(self, request_id: str, model: str, created: int, index: int = 0) -> None:
        self._id = request_id
        self._created = created
        self._model = model
        self._index = index
        self._prefix, self._suffix = _split(self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=_SLOT))]))

    def _chunk(
        self, choices: list[ChatChunkChoice], usage: UsageInfo | msgspec.UnsetType = msgspec.UNSET
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self._id, created=self._created, model=self._model, choices=choices, usage=usage)

    def role(self) -> bytes:
        """The first event: the assistant role with empty content."""
        return _event(self._chunk([ChatChunkChoice(index=self._index, delta=ChatDelta(role="assistant", content=""))]))

    def content(self, text: str) -> bytes:
        """A content delta (the hot path)."""
        return self._prefix + _encode(text) + self._suffix

    def contents(self, texts: list[str]) -> bytes:
        """One content delta per text, as one byte string (the events of one write)."""
        return self._prefix + (self._suffix + self._prefix).join([_encode(t) for t in texts]) + self._suffix

    def content_with_logprobs(self, text: str, logprobs: ChatLogprobs) -> bytes:
        """A content delta and the logprobs of the tokens it came from."""
        return _event(self._chunk([ChatChunkChoice(index=self._index, delta=ChatDelta(content=text),
                                                   logprobs=logprobs)]))

    def finish(self, finish_reason: FinishReason) -> bytes:
        """The last choice event: empty delta and the finish reason."""
        return _event(self._chunk([ChatChunkChoice(index=self._index, delta=ChatDelta(),
                                                   finish_reason=finish_reason)]))

    def usage(self, usage: UsageInfo) -> bytes:
        """``stream_options.include_usage``: no choices, the request's usage."""
        return _event(self._chunk([], usage))


class CompletionChunkEncoder:
    """``text_completion`` events for one choice (``index``) of a request."""

    __slots__ = ("_id", "_created", "_model", "_index", "_prefix", "_suffix")

    def __init__(self, request_id: str, model: str, created: int, index: int = 0) -> None:
        self._id = request_id
        self._created = created
        self._model = model
        self._index = index
        self._prefix, self._suffix = _split(self._chunk([CompletionChunkChoice(index=index, text=_SLOT)]))

    def _chunk(
        self, choices: list[CompletionChunkChoice], usage: UsageInfo | msgspec.UnsetType = msgspec.UNSET
    ) -> CompletionChunk:
        return CompletionChunk(id=self._id, created=self._created, model=self._model, choices=choices, usage=usage)

    def content(self, text: str) -> bytes:
        """A text delta (the hot path)."""
        return self._prefix + _encode(text) + self._suffix

    def contents(self, texts: list[str]) -> bytes:
        """One text delta per text, as one byte string (the events of one write)."""
        return self._prefix + (self._suffix + self._prefix).join([_encode(t) for t in texts]) + self._suffix

    def content_with_logprobs(self, text: str, logprobs: CompletionLogprobs) -> bytes:
        """A text delta and the logprobs of the tokens it came from."""
        return _event(self._chunk([CompletionChunkChoice(index=self._index, text=text, logprobs=logprobs)]))

    def finish(self, finish_reason: FinishReason) -> bytes:
        """The last choice event: empty text and the finish reason."""
        return _event(self._chunk([CompletionChunkChoice(index=self._index, text="", finish_reason=finish_reason)]))

    def usage(self, usage: UsageInfo) -> bytes:
        """``stream_options.include_usage``: no choices, the request's usage."""
        return _event(self._chunk([], usage))
