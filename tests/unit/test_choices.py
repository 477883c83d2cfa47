"""Several choices of one request: child seeds as vLLM derives them; merged streams that
end together when one fails or the reader leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import pytest

from dynrt.frontend.choices import choice_sampling, merged
from dynrt.frontend.text_stream import TextDelta
from dynrt.runtime.protocol import SamplingParams


def test_child_seeds_are_seed_plus_index() -> None:
    seeded = SamplingParams(seed=41)
    assert [choice_sampling(seeded, i).seed for i in range(3)] == [41, 42, 43]
    unseeded = SamplingParams()
    assert choice_sampling(unseeded, 2) is unseeded


class FakeStream:
    def __init__(self, texts: list[str], fail: bool = False, endless: bool = False) -> None:
        self.texts, self.fail, self.endless = texts, fail, endless
        self.cancelled = False

    async def __aiter__(self) -> AsyncIterator[TextDelta]:
        try:
            for text in self.texts:
                await asyncio.sleep(0)
                yield TextDelta(text, [1])
            if self.fail:
                raise RuntimeError("worker gone")
            while self.endless:
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def collect(streams: list[Any]) -> list[tuple[int, str]]:
    return [(k, d.text) async for k, d in merged(streams)]


async def test_merged_tags_every_delta_with_its_choice() -> None:
    got = await collect([FakeStream(["a", "b"]), FakeStream(["x"])])
    assert sorted(got) == [(0, "a"), (0, "b"), (1, "x")]
    assert [t for k, t in got if k == 0] == ["a", "b"]  # in order within a choice


async def test_one_failure_ends_all() -> None:
    endless = FakeStream(["a"], endless=True)
    with pytest.raises(RuntimeError, match="worker gone"):
        await collect([endless, FakeStream(["x"], fail=True)])
    assert endless.cancelled


async def test_leaving_early_cancels_the_readers() -> None:
    streams = [FakeStream(["a"], endless=True), FakeStream(["b"], endless=True)]
    async with aclosing(merged(streams)) as events:  # type: ignore[arg-type]
        async for _ in events:
            break
    assert all(s.cancelled for s in streams)
