"""Reference runs: the answer an uninterrupted deployment gives each request of a
``Load`` (the mock engine in this process), and the check of what clients saw against it.

    report = await check(streams)       # references computed here
    report.assert_perfect()
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from dynrt.frontend.tokenizer import MockModelTokenizer
from dynrt.runtime.mock_tokenizer import mock_tokenizer
from dynrt.runtime.protocol import GenerateRequest, SamplingParams
from dynrt.worker.mock_engine import MockEngine, MockEngineConfig
from harness.load import MODEL, Stream, messages


@dataclass(frozen=True)
class Reference:
    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int


async def references(streams: Iterable[Stream]) -> dict[int, Reference]:
    """The answer an uninterrupted run gives each stream (by index), from the mock
    engine in process (no sleeping), with the frontend's chat template and stop ids."""
    tokenizer = MockModelTokenizer(mock_tokenizer())
    engine = MockEngine(MockEngineConfig(speedup=float("inf")))
    await engine.start()

    async def one(stream: Stream) -> tuple[int, Reference]:
        prompt = tokenizer.apply_chat_template(messages(stream.tag, stream.index, stream.prompt_words))
        request = GenerateRequest(request_id=f"ref-{stream.tag}-{stream.index}", model=MODEL, token_ids=prompt,
                                  sampling=SamplingParams(max_tokens=stream.max_tokens, seed=stream.seed,
                                                          ignore_eos=True,
                                                          stop_token_ids=list(tokenizer.stop_token_ids)))
        ids: list[int] = []
        finish = ""
        async for batch in engine.generate(request):
            ids.extend(batch.token_ids)
            finish = batch.finish_reason or finish
        return stream.index, Reference(tokenizer.decode(ids), finish, len(ids), len(prompt))

    try:
        return dict(await asyncio.gather(*(one(s) for s in streams)))
    finally:
        await engine.shutdown()


@dataclass
class Report:
    """What happened to a set of streams, against their references."""

    sent: int
    ok: int
    failed: int
    cancelled: int
    identical: int
    wrong: list[int]  # completed but different from the reference (indices)
    errors: dict[int, str]  # failed streams: index -> error
    tokens_lost: int  # reference tokens missing from completed streams
    max_gap: float

    def assert_perfect(self, expected: int | None = None) -> None:
        """Every request sent (``expected`` of them, if given) completed, identical to
        its reference."""
        if expected is not None:
            assert self.sent == expected, f"{self.sent} requests sent, expected {expected}"
        assert self.failed == 0, f"{self.failed} of {self.sent} requests failed: {dict(list(self.errors.items())[:5])}"
        assert self.wrong == [], f"{len(self.wrong)} answers differ from the reference: {self.wrong[:10]}"
        assert self.identical == self.sent - self.cancelled
        assert self.tokens_lost == 0


async def check(streams: Sequence[Stream], refs: dict[int, Reference] | None = None) -> Report:
    refs = refs if refs is not None else await references(streams)
    sent = [s for s in streams if s.sent]
    ok = [s for s in sent if s.ok]
    wrong = [s.index for s in ok if not matches(s, refs[s.index])]
    return Report(sent=len(sent), ok=len(ok), failed=sum(1 for s in sent if s.failed),
                  cancelled=sum(1 for s in sent if s.cancelled), identical=len(ok) - len(wrong), wrong=wrong,
                  errors={s.index: s.error or "incomplete" for s in sent if s.failed},
                  tokens_lost=tokens_lost(ok, refs), max_gap=max((s.max_gap for s in ok), default=0.0))


def matches(stream: Stream, ref: Reference) -> bool:
    usage = stream.usage or {}
    return (stream.text == ref.text and stream.finish_reason == ref.finish_reason
            and usage.get("completion_tokens") == ref.completion_tokens
            and usage.get("prompt_tokens") == ref.prompt_tokens)


def tokens_lost(streams: Iterable[Stream], refs: dict[int, Reference]) -> int:
    """Reference tokens missing from the usage of ``streams`` (the completed ones)."""
    return sum(max(0, refs[s.index].completion_tokens - (s.usage or {}).get("completion_tokens", 0))
               for s in streams)
