"""One choice's output as text: the one loop both response paths read.

:class:`TextStream` turns a generation's token deltas into text deltas — detokenized
incrementally, cut at the first stop string, the last one marked with the finish
reason — and counts the completion's tokens. It follows vLLM's output processing, so the
text, the tokens counted and the logprobs returned are the ones vLLM's server gives:

* the token that ended generation on the engine (EOS, a stop token id) counts and keeps
  its logprob, but its text is left out unless ``include_stop_str_in_output``;
* a stop string is looked for only in text past the first ``min_tokens`` tokens; when
  one is found the text is cut before it (after it with ``include_stop_str_in_output``),
  the token that completed it is the last one counted (with its logprob), and tokens the
  worker produced past it are dropped;
* while streaming, the last ``len(longest stop string) - 1`` characters are held back
  (they may begin a stop string) until more text or the end shows they do not.

Without stop strings the ids are detokenized a delta at a time (the hot path); with
them, a token at a time, to know which token completed a stop string.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Protocol

from dynrt.frontend.detokenizer import IncrementalDetokenizer, find_stop
from dynrt.frontend.attempt_reader import TokenDelta
from dynrt.frontend.openai_protocol import FinishReason
from dynrt.runtime.protocol import TokenLogprobs


class TokenSource(Protocol):
    """What a text stream reads (a :class:`~dynrt.frontend.migration.Generation`)."""

    prompt_ids: list[int]
    cached_tokens: int

    def token_batches(self) -> AsyncIterator[list[TokenDelta]]: ...


@dataclass(slots=True)
class TextDelta:
    """New text, the token ids it came from (with their logprobs, if requested);
    ``finish_reason`` is set on the last one only."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None

    @property
    def token_count(self) -> int:
        return len(self.token_ids)


class TextStream:
    """Iterate for the text; then ``finish_reason`` and ``completion_tokens`` describe
    the end. The finish reason is ``stop`` when a stop string ended the text (the
    generation is left there: the caller closes it), else the generation's own."""

    def __init__(self, source: TokenSource, detokenizer: IncrementalDetokenizer, stop_strings: Sequence[str], *,
                 include_stop_str_in_output: bool = False, min_tokens: int = 0) -> None:
        self.source = source
        self._detokenizer = detokenizer
        self._stops = tuple(stop_strings)
        self._include_stop = include_stop_str_in_output
        self._min_tokens = min_tokens
        self._hold = max(len(s) for s in self._stops) - 1 if self._stops and not include_stop_str_in_output else 0
        self._text = ""  # the output so far (kept only with stop strings)
        self._emitted = 0  # how much of it has been returned
        self.finish_reason: FinishReason = "length"
        self.completion_tokens = 0

    async def __aiter__(self) -> AsyncIterator[TextDelta]:
        async with aclosing(self.batches()) as batches:
            async for batch in batches:
                for delta in batch:
                    yield delta

    async def batches(self) -> AsyncIterator[list[TextDelta]]:
        """The text deltas of each batch of token deltas the source has ready at once
        (the streaming path writes a batch at once); never an empty batch."""
        detokenizer = self._detokenizer
        stops, include_stop = self._stops, self._include_stop
        async for batch in self.source.token_batches():
            out: list[TextDelta] = []
            for delta in batch:
                ids, finish = delta.token_ids, delta.finish_reason
                # The engine's stop token counts, but its text is not output.
                text_ids = ids[:-1] if finish == "stop" and ids and not include_stop else ids
                if stops:
                    text_delta = self._stop_checked(ids, text_ids, delta.logprobs, finish)  # type: ignore[arg-type]
                else:
                    text = detokenizer.add(text_ids)
                    if finish is not None:
                        text += detokenizer.flush()
                    text_delta = TextDelta(text, ids, delta.logprobs, finish)  # type: ignore[arg-type]
                self.completion_tokens += len(text_delta.token_ids)
                out.append(text_delta)
                if text_delta.finish_reason is not None:
                    self.finish_reason = text_delta.finish_reason
                    yield out
                    return
            yield out

    def _stop_checked(self, ids: list[int], text_ids: list[int], logprobs: list[TokenLogprobs] | None,
                      finish: FinishReason | None) -> TextDelta:
        detokenizer = self._detokenizer
        offsets = [len(self._text)]  # the text's length after each token
        for token_id in text_ids:
            self._text += detokenizer.add((token_id,))
            offsets.append(len(self._text))
        if len(text_ids) < len(ids):
            offsets.append(len(self._text))
        if finish is not None:
            self._text += detokenizer.flush()
            offsets[-1] = len(self._text)
        prior = self.completion_tokens
        if prior + len(ids) > self._min_tokens:
            check_from = offsets[max(self._min_tokens - prior, 0)]
            found = find_stop(self._text, len(self._text) - check_from, self._stops, self._include_stop)
            if found is not None:
                cut, end = found
                kept = bisect_left(offsets, end, lo=1)
                ids = ids[:kept]
                logprobs = None if logprobs is None else logprobs[:kept]
                self._text = self._text[:cut]
                finish = "stop"
        end_of_text = len(self._text) if finish is not None else max(self._emitted, len(self._text) - self._hold)
        text = self._text[self._emitted : end_of_text]
        self._emitted = end_of_text
        return TextDelta(text, ids, logprobs, finish)
