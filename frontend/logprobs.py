"""Logprobs as the OpenAI API renders them, computed the way vLLM's server does.

Workers send, per generated token, a :class:`~dynrt.runtime.protocol.TokenLogprobs`:
the sampled token's logprob and the ``k`` most likely ids with theirs. vLLM keeps the
same data as an ordered ``{token_id: logprob}`` — the sampled token first, then the top
``k`` (a token already present keeps its place) — and renders it:

* chat: ``logprobs.content[]`` = ``{token, logprob, bytes, top_logprobs[]}``, where
  ``top_logprobs`` is the first ``top_logprobs`` entries of that ordered map (so a
  sampled token outside the top ``k`` comes first);
* completions: ``{tokens, token_logprobs, top_logprobs[{token: logprob}], text_offset}``,
  where each ``top_logprobs`` map is the first ``logprobs + 1`` entries, keyed by token
  text, and ``text_offset`` advances by the length of each token's text.

Logprobs are clamped at -9999.0 (``-inf`` is not JSON). A token's text is its own
decode, with special tokens, and with the leading space a SentencePiece decode drops put
back; a text ending in U+FFFD (a byte-fallback piece of a multi-byte character) is
re-decoded after up to four preceding sampled tokens and given the characters they
complete (vLLM's ``LogprobsProcessor._correct_decoded_token``). These rules are written
here rather than imported because the frontend does not depend on vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from dynrt.runtime.protocol import TokenLogprobs

LOGPROB_FLOOR = -9999.0
_CONTEXT = 4  # preceding sampled tokens a U+FFFD token text is corrected with


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class TokenTexts(Protocol):
    """What logprob rendering needs from a tokenizer."""

    def token_text(self, token_id: int) -> str:
        """One token's text alone, special tokens included."""
        ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def _clamp(logprob: float) -> float:
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR  # also -inf


def _utf8(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))


def ranked(token_id: int, entry: TokenLogprobs) -> dict[int, float]:
    """vLLM's per-position map: the sampled token, then the top ones, first place kept."""
    ranked_ = {token_id: entry.logprob}
    for top_id, logprob in zip(entry.top_ids, entry.top_logprobs):
        ranked_.setdefault(top_id, logprob)
    return ranked_


class LogprobRenderer:
    """Renders one choice's logprobs, delta by delta (it remembers the sampled tokens
    that correct a U+FFFD text, and the completions text offset)."""

    __slots__ = ("_tok", "_context", "_text_offset")

    def __init__(self, tokenizer: TokenTexts) -> None:
        self._tok = tokenizer
        self._context: list[int] = []
        self._text_offset = 0

    def _texts(self, token_ids: list[int]) -> list[str]:
        """The texts of alternatives at one position, corrected as vLLM corrects them."""
        texts = [self._tok.token_text(t) for t in token_ids]
        for i, text in enumerate(texts):
            if text.endswith("\ufffd"):
                texts[i] = self._corrected(token_ids[i])
        return texts

    def _corrected(self, token_id: int) -> str:
        tok = self._tok

        def decode(ids: list[int]) -> str:
            return tok.decode(ids, skip_special_tokens=False)  # as vLLM's tokenizer.decode

        context = self._context
        for size in range(1, min(len(context), _CONTEXT) + 1):
            window = context[-size:]
            full = decode([*window, token_id])
            if full.endswith("\ufffd"):
                continue
            # Context tokens that were themselves partial characters give their text
            # to this token: only the clean prefix before them is subtracted.
            clean_end = len(window)
            for j in range(len(window) - 1, -1, -1):
                if not decode([window[j]]).endswith("\ufffd"):
                    break
                clean_end = j
            prefix = decode(window[:clean_end]) if clean_end > 0 else ""
            if full.startswith(prefix):
                return full[len(prefix):]
            common = 0
            for a, b in zip(prefix, full):
                if a != b:
                    break
                common += 1
            return full[common:]
        return ""

    def _positions(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs]
                   ) -> list[tuple[list[str], list[float]]]:
        """Per token: the texts and clamped logprobs of its ranked map (sampled first)."""
        out = []
        for token_id, entry in zip(token_ids, logprobs):
            ranks = ranked(token_id, entry)
            out.append((self._texts(list(ranks)), [_clamp(v) for v in ranks.values()]))
            self._context.append(token_id)
            del self._context[:-_CONTEXT]
        return out

    def chat(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], top_logprobs: int
             ) -> list[ChatTokenLogprob]:
        entries = []
        for texts, values in self._positions(token_ids, logprobs):
            top = [TopLogprob(token=t, logprob=v, bytes=_utf8(t))
                   for t, v in zip(texts[:top_logprobs], values[:top_logprobs])]
            entries.append(ChatTokenLogprob(token=texts[0], logprob=values[0], bytes=_utf8(texts[0]),
                                            top_logprobs=top))
        return entries

    def completion(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs], top_logprobs: int
                   ) -> CompletionLogprobs:
        result = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
        for texts, values in self._positions(token_ids, logprobs):
            result.tokens.append(texts[0])
            result.token_logprobs.append(values[0])
            result.top_logprobs.append(dict(zip(texts[: top_logprobs + 1], values[: top_logprobs + 1])))
            result.text_offset.append(self._text_offset)
            self._text_offset += len(texts[0])
        return result


def merge_completion(parts: Sequence[CompletionLogprobs]) -> CompletionLogprobs:
    """One choice's logprobs from its deltas' (non-streaming responses)."""
    merged = CompletionLogprobs(text_offset=[], token_logprobs=[], tokens=[], top_logprobs=[])
    for part in parts:
        merged.text_offset += part.text_offset
        merged.token_logprobs += part.token_logprobs
        merged.tokens += part.tokens
        merged.top_logprobs += part.top_logprobs
    return merged
