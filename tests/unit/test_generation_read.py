"""How a generation turns the frames already received into token deltas: coalesced by
default (fewer, larger SSE chunks), one token per delta with the benchmark setting
``DYNRT_FRONTEND_ONE_TOKEN_PER_CHUNK`` (frames not coalesced, multi-token frames split)."""

from __future__ import annotations

import pytest

from dynrt.frontend import attempt_reader
from dynrt.frontend.errors import InvalidRequest
from dynrt.frontend.attempt_reader import TokenDelta
from dynrt.frontend.migration import Generation
from dynrt.runtime.config import MigrationConfig
from dynrt.runtime.protocol import ErrorFrame, SamplingParams, TokenFrame, TokenLogprobs, encode
from dynrt.runtime.transport import ResponseStream


class _Transport:
    _streams: dict[bytes, ResponseStream] = {}


class _Routing:
    def complete(self, instance_id: str, request_id: str) -> None:
        pass


def _logprob(token_id: int) -> TokenLogprobs:
    return TokenLogprobs(logprob=-float(token_id))


def _generation(frames: list[TokenFrame], logprobs: bool = False) -> Generation:
    stream = ResponseStream(_Transport(), "instance", "req", b"token", stall_timeout=2.0)  # type: ignore[arg-type]
    for frame in frames:
        stream._deliver(encode(frame))
    generation = Generation(request_id="req", model="m", prompt_ids=[1, 2, 3],
                            sampling=SamplingParams(max_tokens=8, logprobs=0 if logprobs else None), frontend_id="f",
                            config=MigrationConfig(), transport=None, routing=_Routing())  # type: ignore[arg-type]
    generation._stream = stream
    return generation


def _frames(logprobs: bool = False) -> list[TokenFrame]:
    def frame(ids: list[int], finish: str | None = None) -> TokenFrame:
        return TokenFrame(token_ids=ids, finish_reason=finish,  # type: ignore[arg-type]
                          logprobs=[_logprob(t) for t in ids] if logprobs else None)
    return [frame([10, 11, 12]), frame([13]), frame([14, 15], "length")]


async def _deltas(generation: Generation) -> list[TokenDelta]:
    return [delta async for delta in generation.tokens()]


async def test_frames_already_received_are_coalesced() -> None:
    generation = _generation(_frames())
    deltas = await _deltas(generation)
    assert [(d.token_ids, d.finish_reason) for d in deltas] == [([10, 11, 12, 13, 14, 15], "length")]
    assert generation.generated == [10, 11, 12, 13, 14, 15]


@pytest.mark.parametrize("logprobs", [False, True])
async def test_one_token_per_chunk_splits_and_does_not_coalesce(monkeypatch: pytest.MonkeyPatch,
                                                                logprobs: bool) -> None:
    monkeypatch.setattr(attempt_reader, "_ONE_TOKEN_PER_CHUNK", True)
    generation = _generation(_frames(logprobs), logprobs)
    deltas = await _deltas(generation)
    assert [(d.token_ids, d.finish_reason) for d in deltas] == [
        ([10], None), ([11], None), ([12], None), ([13], None), ([14], None), ([15], "length")]
    if logprobs:
        assert [[lp.logprob for lp in d.logprobs or []] for d in deltas] == [[-10.0], [-11.0], [-12.0], [-13.0],
                                                                          [-14.0], [-15.0]]
    else:
        assert all(d.logprobs is None for d in deltas)
    assert generation.generated == [10, 11, 12, 13, 14, 15]


async def _batches(generation: Generation) -> list[list[TokenDelta]]:
    return [batch async for batch in generation.token_batches()]


async def test_frames_already_received_form_one_batch() -> None:
    batches = await _batches(_generation(_frames()))
    assert [[(d.token_ids, d.finish_reason) for d in b] for b in batches] == [[([10, 11, 12, 13, 14, 15], "length")]]


async def test_one_token_per_chunk_batches_the_frames_already_received(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every token is its own delta (its own SSE event), and the deltas of the frames
    # already received form one batch: one write instead of six.
    monkeypatch.setattr(attempt_reader, "_ONE_TOKEN_PER_CHUNK", True)
    batches = await _batches(_generation(_frames()))
    assert [[(d.token_ids, d.finish_reason) for d in b] for b in batches] == [
        [([10], None), ([11], None), ([12], None), ([13], None), ([14], None), ([15], "length")]]


@pytest.mark.parametrize("one_token", [False, True])
async def test_an_error_frame_waits_until_the_tokens_before_it_are_out(monkeypatch: pytest.MonkeyPatch,
                                                                      one_token: bool) -> None:
    monkeypatch.setattr(attempt_reader, "_ONE_TOKEN_PER_CHUNK", one_token)
    generation = _generation([TokenFrame(token_ids=[10, 11]), TokenFrame(token_ids=[12])])
    assert generation._stream is not None
    generation._stream._deliver(encode(ErrorFrame(code="bad_request", message="no")))
    seen: list[int] = []
    with pytest.raises(InvalidRequest):
        async for batch in generation._reader(generation._stream).batches():
            seen += [t for d in batch for t in d.token_ids]
    assert seen == [10, 11, 12]
