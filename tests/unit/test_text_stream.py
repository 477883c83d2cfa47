"""TextStream follows vLLM's output processing: which text, which tokens (and logprobs)
a stop string, the engine's stop token, min_tokens and include_stop_str_in_output leave."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from dynrt.frontend.detokenizer import ByteDetokenizer
from dynrt.frontend.attempt_reader import TokenDelta
from dynrt.frontend.text_stream import TextDelta, TextStream
from dynrt.runtime.mock_tokenizer import BYTE_BASE, EOS_ID, mock_tokenizer
from dynrt.runtime.protocol import TokenLogprobs


class Source:
    def __init__(self, deltas: list[TokenDelta]) -> None:
        self.deltas = deltas
        self.prompt_ids = [1]
        self.cached_tokens = 0
        self.read = 0

    async def token_batches(self) -> AsyncIterator[list[TokenDelta]]:
        for delta in self.deltas:
            self.read += 1
            yield [delta]


def chars(text: str) -> list[int]:
    """One token per character (the mock model's byte tokens; ASCII only)."""
    return [BYTE_BASE + b for b in text.encode()]


def with_logprobs(ids: list[int], start: int = 0) -> TokenDelta:
    return TokenDelta(ids, logprobs=[TokenLogprobs(logprob=-float(start + i)) for i in range(len(ids))])


async def run(deltas: list[TokenDelta], stops: Sequence[str] = (), **options: object
              ) -> tuple[TextStream, list[TextDelta], Source]:
    source = Source(deltas)
    stream = TextStream(source, ByteDetokenizer(mock_tokenizer().token_bytes), stops, **options)  # type: ignore[arg-type]
    return stream, [d async for d in stream], source


def text(deltas: list[TextDelta]) -> str:
    return "".join(d.text for d in deltas)


async def test_tokens_past_the_stop_string_are_dropped_with_their_logprobs() -> None:
    # one delta carries "ab", the stop "XY" and two more tokens: the two are not output
    stream, deltas, _ = await run([with_logprobs(chars("abXYcd"))], stops=["XY"])
    assert text(deltas) == "ab"
    assert deltas[-1].token_ids == chars("abXY")  # the token completing the stop string is the last
    assert [lp.logprob for lp in deltas[-1].logprobs or []] == [0.0, -1.0, -2.0, -3.0]
    assert (stream.finish_reason, stream.completion_tokens) == ("stop", 4)


async def test_include_stop_str_in_output() -> None:
    stream, deltas, _ = await run([TokenDelta(chars("abXYcd"))], stops=["XY"], include_stop_str_in_output=True)
    assert text(deltas) == "abXY" and stream.completion_tokens == 4


async def test_stop_string_across_deltas_and_the_hold_back() -> None:
    stream, deltas, source = await run(
        [with_logprobs(chars("abcX")), with_logprobs(chars("Yzz"), 4), TokenDelta([5], "length")], stops=["XY"])
    assert [d.text for d in deltas] == ["abc", ""]  # "X" held back (len("XY") - 1 characters)
    assert [len(d.logprobs or []) for d in deltas] == [4, 1]  # one logprob per token kept
    assert (stream.finish_reason, stream.completion_tokens, source.read) == ("stop", 5, 2)


async def test_min_tokens_shields_early_stop_strings() -> None:
    # vLLM looks for stop strings only in the text of tokens past min_tokens
    stream, deltas, _ = await run([TokenDelta(chars("XYabXY")), TokenDelta([], "length")], stops=["XY"],
                                  min_tokens=2)
    assert text(deltas) == "XYab" and stream.completion_tokens == 6
    stream, deltas, _ = await run([TokenDelta(chars("XYabXY"))], stops=["XY"], min_tokens=1)
    assert text(deltas) == ""  # "XY" ends with token 2, past min_tokens=1: it counts
    stream, deltas, _ = await run([TokenDelta(chars("aXY"))], stops=["XY"], min_tokens=1)
    assert text(deltas) == "a"  # a stop string may begin inside min_tokens and end after it


@pytest.mark.parametrize("include", [False, True])
async def test_the_engines_stop_token_counts_but_its_text_is_left_out(include: bool) -> None:
    the = mock_tokenizer().encode(" the")
    # a stop_token_ids entry that is an ordinary word: vLLM leaves its text out
    stream, deltas, _ = await run([TokenDelta(chars("ab") + the, "stop")], include_stop_str_in_output=include)
    assert text(deltas) == ("ab the" if include else "ab")
    assert stream.completion_tokens == 3
    stream, deltas, _ = await run([TokenDelta(chars("ab") + [EOS_ID], "stop")])
    assert text(deltas) == "ab" and stream.completion_tokens == 3


async def test_skip_special_tokens_false_shows_them() -> None:
    from dynrt.frontend.tokenizer import load_tokenizer
    from dynrt.runtime.mock_tokenizer import END_OF_TURN_ID
    from dynrt.runtime.protocol import TokenizerSpec

    tok = load_tokenizer(TokenizerSpec(kind="mock"))
    ids = chars("ab") + [END_OF_TURN_ID] + chars("c")
    for skip, expected in [(True, "abc"), (False, "ab<|end|>c")]:
        detokenizer = tok.new_detokenizer([], skip_special_tokens=skip)
        stream = TextStream(Source([TokenDelta(ids, "length")]), detokenizer, [])
        assert text([d async for d in stream]) == expected
