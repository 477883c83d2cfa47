"""Incremental detokenization (no broken UTF-8), stop-string matching, and the text stream
that puts them together for both response paths."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from dynrt.frontend.detokenizer import ByteDetokenizer, StopStringMatcher, WindowDetokenizer
from dynrt.frontend.migration import TokenDelta
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


# --- stop strings ---------------------------------------------------------------------


def run(matcher: StopStringMatcher, deltas: Sequence[str]) -> tuple[str, bool]:
    out: list[str] = []
    for delta in deltas:
        text, matched = matcher.feed(delta)
        out.append(text)
        if matched:
            return "".join(out), True
    out.append(matcher.flush())
    return "".join(out), False


def test_no_stop_strings_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == ("abc", False)
    assert matcher.flush() == ""


def test_stop_within_one_delta() -> None:
    assert run(StopStringMatcher(["STOP"]), ["hello STOP world"]) == ("hello ", True)


def test_stop_split_across_deltas() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("hello S") == ("hello ", False)
    assert matcher.feed("T") == ("", False)
    assert matcher.feed("OP and more") == ("", True)
    assert matcher.matched
    assert matcher.feed("later") == ("", True)
    assert matcher.flush() == ""


def test_stop_split_one_char_per_delta() -> None:
    text = "abc<|end|>def"
    assert run(StopStringMatcher(["<|end|>"]), list(text)) == ("abc", True)


def test_stop_at_very_start() -> None:
    assert run(StopStringMatcher(["Hi"]), ["Hi there"]) == ("", True)
    assert run(StopStringMatcher(["Hi"]), ["H", "i there"]) == ("", True)


def test_false_start_is_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("ST") == ("", False)
    assert matcher.feed("ART") == ("START", False)
    assert matcher.feed(" ST") == (" ", False)
    assert matcher.flush() == "ST"


def test_overlapping_prefixes() -> None:
    # "aab": after "aa" a failed match must still find the stop one character later.
    assert run(StopStringMatcher(["aab"]), ["a", "a", "a", "b", "x"]) == ("a", True)
    assert run(StopStringMatcher(["abab"]), ["ab", "ab", "ab"]) == ("", True)
    assert run(StopStringMatcher(["abab"]), ["xaba", "bab"]) == ("x", True)


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [
        (["world", "lo"], "hello world", "hel"),
        (["abc", "b"], "abc", "a"),  # "b" is complete one character before "abc"
        (["ab", "abcd"], "xabcd", "x"),  # one stop a prefix of another: the shorter ends first
        (["bc", "abc"], "xabc", "x"),  # both complete on "c": the longer one is cut
        (["cd", "bcde"], "abcdef", "ab"),
    ],
)
def test_multiple_stop_strings_first_completed_wins(stops: list[str], text: str, expected: str) -> None:
    """Same answer whether the text arrives whole, char by char, or in pairs."""
    for step in (len(text), 1, 2):
        deltas = [text[i : i + step] for i in range(0, len(text), step)]
        assert run(StopStringMatcher(stops), deltas) == (expected, True), step


def test_multiple_stop_strings_hold_longest_possible_prefix() -> None:
    matcher = StopStringMatcher(["xyz", "yq"])
    assert matcher.feed("axy") == ("a", False)  # "xy" could start "xyz"
    assert matcher.feed("q") == ("x", True)  # ... but "yq" completed


def test_no_match_returns_everything() -> None:
    text = "a stream that never stops, with S and ST and STO in it"
    assert run(StopStringMatcher(["STOP"]), [text[i : i + 3] for i in range(0, len(text), 3)]) == (text, False)


def test_stop_with_non_ascii() -> None:
    assert run(StopStringMatcher(["日本"]), ["héllo 日", "本 🙂"]) == ("héllo ", True)


# --- text stream: the one loop both response paths read -----------------------------


class FakeGeneration:
    """Token deltas as a generation yields them; counts how far they were read."""

    def __init__(self, deltas: list[TokenDelta], prompt_ids: Sequence[int] = (1, 2, 3)) -> None:
        self.deltas = deltas
        self.prompt_ids = list(prompt_ids)
        self.generated: list[int] = []
        self.cached_tokens = 0
        self.read = 0

    async def tokens(self) -> AsyncIterator[TokenDelta]:
        for delta in self.deltas:
            self.read += 1
            self.generated.extend(delta.token_ids)
            yield delta


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
    assert deltas[0].text == "ends with "  # the mock model's last two ids are "E", "N"
    assert "".join(d.text for d in deltas) == "ends with EN"
    assert (deltas[-1].finish_reason, stream.finish_reason) == ("length", "length")
    assert [d.token_count for d in deltas] == [len(ids) - 1, 1]
    assert stream.usage().completion_tokens == len(ids) == len(source.generated)
    assert stream.usage().prompt_tokens == 3


async def test_text_stream_never_splits_a_character() -> None:
    ids = ids_of(MULTIBYTE)
    stream, _ = text_stream([TokenDelta([i]) for i in ids[:-1]] + [TokenDelta(ids[-1:], "stop")])
    deltas = await read_all(stream)
    assert "".join(d.text for d in deltas) == MULTIBYTE
    assert not any("\ufffd" in d.text for d in deltas)
    assert stream.finish_reason == "stop"


async def test_text_stream_without_a_finish_reason_ends_as_length() -> None:
    stream, _ = text_stream([TokenDelta(ids_of("abc"))])
    assert [d.finish_reason for d in await read_all(stream)] == [None]
    assert stream.finish_reason == "length"
