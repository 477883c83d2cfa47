"""Turning streamed token ids into text, and cutting the text at stop strings.

* :class:`ByteDetokenizer` for tokenizers that map each id to bytes (the mock model):
  an incremental UTF-8 decoder holds back an incomplete multi-byte sequence until its
  last byte arrives.
* :class:`WindowDetokenizer` for Hugging Face tokenizers, whose ids decode only in
  context: vLLM's prefix/read-offset technique. Decode a short window ending at the new
  ids, subtract the decode of the window's already-emitted part, and emit the rest
  unless it ends in U+FFFD (an incomplete character: wait for more ids).
* :class:`DecodeStreamDetokenizer`: the same technique run by the ``tokenizers``
  library itself (``DecodeStream``, in Rust), for tokenizers whose decode is their
  ``tokenizers`` backend's: the same text, without two Python decodes per step.
* :func:`find_stop` finds where stop strings end the text, as vLLM decides it.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from tokenizers import Tokenizer as BackendTokenizer

_REPLACEMENT = "\ufffd"


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
        data = token_bytes(token_ids[0]) if len(token_ids) == 1 else b"".join([token_bytes(t) for t in token_ids])
        decoder = self._decoder
        if data.isascii() and not decoder.buffer:  # the common case: nothing held, nothing to hold
            return data.decode("ascii")
        return decoder.decode(data)

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


class DecodeStreamDetokenizer:
    """:class:`WindowDetokenizer`'s algorithm and text, run by ``tokenizers.decoders.DecodeStream``.

    ``DecodeStream`` keeps the same window (the ids of the text last emitted, then the
    ids since) and applies the same rule — emit what the window's decode adds to the
    decode of its emitted part, unless that ends in U+FFFD — in Rust, with the emitted
    part's text cached: one backend decode per step instead of two through
    ``transformers``. Only for a tokenizer whose ``decode`` is its backend's decode
    (no clean-up step), and a context that does not itself end mid-character (there
    ``DecodeStream`` would start from an empty prefix): :meth:`for_backend` decides.

    The window's ids are tracked here too, for the two steps ``DecodeStream`` does not
    take as ``WindowDetokenizer`` does: ``flush`` (which emits a tail ending in U+FFFD)
    and a window whose text does not start with its emitted part's text (the library
    refuses it; the window technique cuts by length). From then on the Python decodes
    of ``WindowDetokenizer`` are used.
    """

    __slots__ = ("_backend", "_stream", "_decode", "_emitted_ids", "_pending")

    def __init__(self, backend: BackendTokenizer, decode: Callable[[list[int]], str], context: Sequence[int],
                 skip_special_tokens: bool) -> None:
        from tokenizers.decoders import DecodeStream

        self._backend = backend
        self._decode = decode
        self._emitted_ids: list[int] = list(context)  # the window's part already emitted (first: the context)
        self._pending: list[int] = []  # the window's ids since
        self._stream: DecodeStream | None = DecodeStream(ids=list(context), skip_special_tokens=skip_special_tokens)

    @classmethod
    def for_backend(cls, backend: BackendTokenizer, decode: Callable[[list[int]], str], context: Sequence[int],
                    skip_special_tokens: bool) -> DecodeStreamDetokenizer | WindowDetokenizer:
        """This detokenizer, or a :class:`WindowDetokenizer` if the context's text ends mid-character."""
        if context and backend.decode(list(context), skip_special_tokens=skip_special_tokens).endswith(_REPLACEMENT):
            return WindowDetokenizer(decode, context)
        return cls(backend, decode, context, skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> str:
        if not token_ids:
            return ""
        self._pending.extend(token_ids)
        stream = self._stream
        if stream is None:
            return self._window_step(final=False)
        try:
            text = stream.step(self._backend, token_ids[0] if len(token_ids) == 1 else list(token_ids))
        except Exception:  # the library's InvalidPrefix (its only error here); the window technique decides
            self._stream = None
            return self._window_step(final=False)
        if text is None:
            return ""
        self._emitted_ids, self._pending = self._pending, []
        return text

    def flush(self) -> str:
        self._stream = None
        return self._window_step(final=True)

    def _window_step(self, final: bool) -> str:
        """``WindowDetokenizer._emit`` on the tracked window."""
        if not self._pending:
            return ""
        prefix_text = self._decode(self._emitted_ids)
        text = self._decode(self._emitted_ids + self._pending)
        if len(text) <= len(prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""
        self._emitted_ids, self._pending = self._pending, []
        return text[len(prefix_text):]


def find_stop(text: str, new_chars: int, stops: Sequence[str], include_in_output: bool) -> tuple[int, int] | None:
    """The first stop string that ends in the last ``new_chars`` characters of ``text``:
    ``(where the text is cut, where the stop string ends)``, or None.

    vLLM's ``check_stop_strings``: the stop string that completes earliest wins (ties:
    the first in ``stops``); the text is cut before it, or after it with
    ``include_in_output``.
    """
    if new_chars <= 0:
        return None
    best: tuple[int, int] | None = None  # (end, start)
    for stop in stops:
        start = text.find(stop, max(0, len(text) + 1 - new_chars - len(stop)))
        if start != -1 and (best is None or start + len(stop) < best[0]):
            best = (start + len(stop), start)
    if best is None:
        return None
    end, start = best
    return (end if include_in_output else start), end
