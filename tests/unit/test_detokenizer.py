"""Incremental detokenization (no broken UTF-8), stop-string matching, and the text stream
that puts them together for both response paths."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from dynrt.frontend.detokenizer import ByteDetokenizer, WindowDetokenizer, find_stop
from dynrt.frontend.attempt_reader import TokenDelta
from dynrt.frontend.text_stream import TextDelta, TextStream
from dynrt.frontend.tokenizer import load_tokenizer
from dynrt.runtime.mock_tokenizer import BYTE_BASE, mock_tokenizer
from dynrt.runtime.protocol import TokenizerSpec

MULTIBYTE = "héllo 日本 🙂"


def stream(detok: ByteDetokenizer | WindowDetokenizer, ids: Sequence[int], step: int = 1) -> list[str]:
    chunks = [detok.add(ids[i : i + step]) for i in range(0, len(ids), step)]
    chunks.append(detok.flush())
    return chunks


# --- byte detokenizer (mock model) ----------------------------------------------------


@pytest.mark.parametrize("step", [1, 2, 3, 100])
def test_mock_multibyte_split_across_tokens(step: int) -> None:
    tok = mock_tokenizer()
    ids = tok.encode(MULTIBYTE)
    assert sum(BYTE_BASE <= t < BYTE_BASE + 256 for t in ids) >= 10  # really byte-fallback tokens
    chunks = stream(ByteDetokenizer(tok.token_bytes), ids, step)
    assert "".join(chunks) == MULTIBYTE
    assert not any("\ufffd" in c for c in chunks)


def test_mock_through_frontend_tokenizer() -> None:
    tok = load_tokenizer(TokenizerSpec(kind="mock"))
    text = "The quick answer, 日本語 and emoji 🙂👍🏽 done."
    chunks = stream(tok.new_detokenizer(), tok.encode(text))
    assert "".join(chunks) == text
    assert not any("\ufffd" in c for c in chunks)


def test_byte_detokenizer_invalid_bytes_end_in_replacement() -> None:
    tok = mock_tokenizer()
    detok = ByteDetokenizer(tok.token_bytes)
    assert detok.add([BYTE_BASE + 0xE6, BYTE_BASE + 0x97]) == ""  # first 2 of 3 bytes: held
    assert detok.flush() == "\ufffd"  # stream ended mid-character


# --- window detokenizer ---------------------------------------------------------------


def _byte_level_decode(ids: list[int]) -> str:
    """A context-free stand-in for an HF decode: one byte per id, broken tails → U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("step", [1, 2, 5])
def test_window_detokenizer_holds_incomplete_characters(step: int) -> None:
    ids = list(MULTIBYTE.encode())
    chunks = stream(WindowDetokenizer(_byte_level_decode), ids, step)
    assert "".join(chunks) == MULTIBYTE
    assert not any("\ufffd" in c for c in chunks)


def test_window_detokenizer_context_not_emitted() -> None:
    detok = WindowDetokenizer(_byte_level_decode, context=list(b"prompt "))
    assert detok.add(list(b"ok")) == "ok"
    assert detok.flush() == ""


def test_window_detokenizer_flushes_broken_tail() -> None:
    detok = WindowDetokenizer(_byte_level_decode)
    assert detok.add([0xE6]) == ""
    assert detok.flush() == "\ufffd"


# --- stop strings (vLLM's rules: tests/unit/test_text_stream.py runs them in a stream) --


def test_find_stop_earliest_end_then_list_order() -> None:
    assert find_stop("hello world", 11, ["world", "lo"], False) == (3, 5)
    assert find_stop("xabc", 4, ["bc", "abc"], False) == (2, 4)  # tie on "c": the first listed
    assert find_stop("xabc", 4, ["abc", "bc"], False) == (1, 4)
    assert find_stop("xabc", 4, ["abc"], True) == (4, 4)  # included: cut after it


def test_find_stop_looks_only_at_new_text() -> None:
    assert find_stop("STOP and more", 4, ["STOP"], False) is None  # it ended before the new text
    assert find_stop("xxSTOP", 1, ["STOP"], False) == (2, 6)  # ... but may begin before it
    assert find_stop("STOP", 0, ["STOP"], False) is None


# --- text stream: the one loop both response paths read -----------------------------


class FakeGeneration:
    """Token deltas as a generation yields them; counts how far they were read."""

    def __init__(self, deltas: list[TokenDelta], prompt_ids: Sequence[int] = (1, 2, 3)) -> None:
        self.deltas = deltas
        self.prompt_ids = list(prompt_ids)
        self.generated: list[int] = []
        self.cached_tokens = 0
        self.read = 0

    async def token_batches(self) -> AsyncIterator[list[TokenDelta]]:
        for delta in self.deltas:
            self.read += 1
            self.generated.extend(delta.token_ids)
            yield [delta]


def ids_of(text: str) -> list[int]:
    return mock_tokenizer().encode(text)


def text_stream(deltas: list[TokenDelta], stops: Sequence[str] = ()) -> tuple[TextStream, FakeGeneration]:
    source = FakeGeneration(deltas)
    return TextStream(source, ByteDetokenizer(mock_tokenizer().token_bytes), stops), source


async def read_all(stream: TextStream) -> list[TextDelta]:
    return [delta async for delta in stream]


async def test_text_stream_cuts_at_a_stop_string_split_across_deltas() -> None:
    ids = ids_of("one two END three")
    half = len(ids_of("one two E"))
    stream, source = text_stream([TokenDelta(ids[:half]), TokenDelta(ids[half:]), TokenDelta([5], "length")],
                                 stops=["END"])
    deltas = await read_all(stream)
    assert "".join(d.text for d in deltas) == "one two "
    assert [d.finish_reason for d in deltas] == [None, "stop"]
    assert stream.finish_reason == "stop"
    assert source.read == 2  # nothing read past the stop string


async def test_text_stream_flushes_held_text_at_the_finish() -> None:
    ids = ids_of("ends with EN")  # "EN" might have begun "END": held back until the end
    stream, source = text_stream([TokenDelta(ids[:-1]), TokenDelta(ids[-1:], "length")], stops=["END"])
    deltas = await read_all(stream)
    assert deltas[0].text == "ends with"  # len("END") - 1 characters held back, as vLLM does
    assert "".join(d.text for d in deltas) == "ends with EN"
    assert (deltas[-1].finish_reason, stream.finish_reason) == ("length", "length")
    assert [d.token_count for d in deltas] == [len(ids) - 1, 1]
    assert stream.completion_tokens == len(ids) == len(source.generated)


async def test_text_stream_never_splits_a_character() -> None:
    ids = ids_of(MULTIBYTE)
    # The engine's stop token (EOS, id 2) ends the last delta: counted, no text.
    stream, _ = text_stream([TokenDelta([i]) for i in ids[:-1]] + [TokenDelta([ids[-1], 2], "stop")])
    deltas = await read_all(stream)
    assert "".join(d.text for d in deltas) == MULTIBYTE
    assert not any("\ufffd" in d.text for d in deltas)
    assert stream.finish_reason == "stop"
    assert stream.completion_tokens == len(ids) + 1


async def test_text_stream_without_a_finish_reason_ends_as_length() -> None:
    stream, _ = text_stream([TokenDelta(ids_of("abc"))])
    assert [d.finish_reason for d in await read_all(stream)] == [None]
    assert stream.finish_reason == "length"
