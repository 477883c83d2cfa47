"""One request's output as text: the one loop both response paths read.

:class:`TextStream` turns a generation's token deltas into text deltas — detokenized
incrementally, cut at the first stop string (nothing past it is ever emitted), the last
one marked with the finish reason — and gives the request's usage. The non-streaming
response joins the deltas; the streaming one sends each as an SSE chunk.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from dynrt.frontend.detokenizer import IncrementalDetokenizer, StopStringMatcher
from dynrt.frontend.migration import TokenDelta
from dynrt.frontend.openai_protocol import FinishReason, UsageInfo


class TokenSource(Protocol):
    """What a text stream reads (a :class:`~dynrt.frontend.migration.Generation`)."""

    prompt_ids: list[int]
    generated: list[int]
    cached_tokens: int

    def tokens(self) -> AsyncIterator[TokenDelta]: ...


@dataclass(slots=True)
class TextDelta:
    """New text and how many token ids it came from; ``finish_reason`` is set on the
    last one only."""

    text: str
    token_count: int
    finish_reason: FinishReason | None = None


class TextStream:
    """Iterate for the text; then ``finish_reason`` and ``usage()`` describe the end.

    The finish reason is ``stop`` when a stop string ended the text (the generation is
    left there: the caller closes it), else the generation's own (``stop`` or
    ``length``); ``length`` if the tokens end without one.
    """

    def __init__(self, source: TokenSource, detokenizer: IncrementalDetokenizer, stop_strings: Sequence[str]) -> None:
        self._source = source
        self._detokenizer = detokenizer
        self._stopper = StopStringMatcher(stop_strings)
        self.finish_reason: FinishReason = "length"

    async def __aiter__(self) -> AsyncIterator[TextDelta]:
        detokenizer, stopper = self._detokenizer, self._stopper
        async for delta in self._source.tokens():
            text, matched = stopper.feed(detokenizer.add(delta.token_ids))
            if matched:
                self.finish_reason = "stop"
                yield TextDelta(text, len(delta.token_ids), "stop")
                return
            if delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason  # type: ignore[assignment]  # cancelled/abort never get here
                text += stopper.feed(detokenizer.flush())[0] + stopper.flush()
                yield TextDelta(text, len(delta.token_ids), self.finish_reason)
            else:
                yield TextDelta(text, len(delta.token_ids))

    def usage(self) -> UsageInfo:
        source = self._source
        return UsageInfo.of(len(source.prompt_ids), len(source.generated), source.cached_tokens)
