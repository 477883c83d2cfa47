"""Turning streamed token ids into text, and cutting the text at stop strings.

* :class:`ByteDetokenizer` for tokenizers that map each id to bytes (the mock model):
  an incremental UTF-8 decoder holds back an incomplete multi-byte sequence until its
  last byte arrives.
* :class:`WindowDetokenizer` for Hugging Face tokenizers, whose ids decode only in
  context: vLLM's prefix/read-offset technique. Decode a short window ending at the new
  ids, subtract the decode of the window's already-emitted part, and emit the rest
  unless it ends in U+FFFD (an incomplete character: wait for more ids).
* :class:`StopStringMatcher` holds back any tail of the text that could begin a stop
  string, so a stop string split across deltas is still caught and nothing past it is
  ever emitted. Where stop strings overlap, the result does not depend on how the text
  was split into deltas.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Protocol


class IncrementalDetokenizer(Protocol):
    def add(self, token_ids: Sequence[int]) -> str:
        """Text that the new ids complete (possibly empty)."""
        ...

    def flush(self) -> str:
        """Text still held back at the end of the stream."""
        ...


class ByteDetokenizer:
    """Ids → bytes (``token_bytes``) → text, never splitting a UTF-8 sequence."""

    __slots__ = ("_token_bytes", "_decoder")

    def __init__(self, token_bytes: Callable[[int], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: Sequence[int]) -> str:
        token_bytes = self._token_bytes
        return self._decoder.decode(b"".join([token_bytes(t) for t in token_ids]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class WindowDetokenizer:
    """Incremental decoding through a ``decode(ids) -> str`` that needs context.

    ``context`` (e.g. the prompt's last few ids) primes the window so the first output
    token decodes as it would mid-text (sentencepiece drops a leading space otherwise);
    it is never emitted.
    """

    __slots__ = ("_decode", "_ids", "_prefix_offset", "_read_offset")

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids: list[int] = list(context)
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - 5)

    def add(self, token_ids: Sequence[int]) -> str:
        self._ids.extend(token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read_offset == len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix_text) or (text.endswith("\ufffd") and not final):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return text[len(prefix_text) :]


class StopStringMatcher:
    """Cuts streamed text at the first occurrence of any stop string.

    ``feed(delta)`` returns ``(text safe to emit now, matched)``. Once matched, the
    text before the stop string has been returned, the stop string itself is not, and
    every later call returns ``("", True)``. ``flush()`` returns what was held back as
    a possible start of a stop string when the stream ends without one.
    """

    __slots__ = ("_stops", "_prefixes", "_max_hold", "_held", "_matched")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        # Every proper prefix of a stop string: a tail of the text equal to one of these
        # might still become a stop string.
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._held = ""
        self._matched = False

    @property
    def matched(self) -> bool:
        return self._matched

    def feed(self, delta: str) -> tuple[str, bool]:
        if self._matched:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        # The stop string that completes first as the text grows wins (the longest, if
        # several complete at the same character): generation would have ended there.
        found = [(i + len(s), i) for s in self._stops if (i := text.find(s)) >= 0]
        if found:
            _, cut = min(found)
            self._held = ""
            self._matched = True
            return text[:cut], True
        hold = next(
            (n for n in range(min(self._max_hold, len(text)), 0, -1) if text[-n:] in self._prefixes),
            0,
        )
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held
