"""A response stream's silence deadline: each wait is silent after exactly its own
timeout, although one timer serves many waits (moved when it fires early, replaced
when a wait needs it sooner)."""

from __future__ import annotations

import asyncio
import time

import pytest

from dynrt.runtime.protocol import EndFrame, HeartbeatFrame, TokenFrame, encode
from dynrt.runtime.transport import ResponseStream, StreamSilent


class _Transport:
    _streams: dict[bytes, ResponseStream] = {}


def _stream() -> ResponseStream:
    return ResponseStream(_Transport(), "instance", "req", b"token", stall_timeout=2.0)  # type: ignore[arg-type]


def _frame(token_id: int) -> bytes:
    return encode(TokenFrame(token_ids=[token_id]))


async def _silent_after(stream: ResponseStream, timeout: float) -> float:
    started = time.monotonic()
    with pytest.raises(StreamSilent):
        await stream.next(timeout)
    return time.monotonic() - started


async def test_a_wait_is_silent_after_its_timeout_not_an_earlier_waits() -> None:
    stream = _stream()
    loop = asyncio.get_running_loop()
    loop.call_later(0.06, stream._deliver, _frame(1))
    assert (await stream.next(0.1)).token_ids == [1]  # type: ignore[union-attr]
    # The timer set for the first wait (due at 0.1 s) must not end this one at 0.04 s.
    waited = await _silent_after(stream, 0.1)
    assert 0.095 <= waited < 1.0


async def test_a_shorter_wait_after_a_longer_one_is_not_kept_waiting() -> None:
    stream = _stream()
    stream._deliver(_frame(1))
    assert (await stream.next(5.0)).token_ids == [1]  # type: ignore[union-attr]
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, stream._deliver, _frame(2))
    assert (await stream.next(5.0)).token_ids == [2]  # type: ignore[union-attr]  # timer due in ~5 s
    waited = await _silent_after(stream, 0.05)
    assert 0.045 <= waited < 2.0


async def test_frames_keep_a_stream_alive_and_its_end_cancels_the_timer() -> None:
    stream = _stream()
    loop = asyncio.get_running_loop()
    for i in range(5):
        loop.call_later(0.02 * (i + 1), stream._deliver, _frame(i))
    got = [(await stream.next(0.05)).token_ids[0] for _ in range(5)]  # type: ignore[union-attr]
    assert got == [0, 1, 2, 3, 4]
    assert stream._timer is not None
    stream.release()
    assert stream._timer is None


def test_ready_takes_only_what_has_been_received() -> None:
    stream = _stream()
    assert stream.ready() is None
    stream._deliver(encode(HeartbeatFrame()))
    assert stream.ready() is None and stream.pending() == 0  # heartbeats are consumed
    stream._deliver(_frame(1))
    stream._deliver(encode(HeartbeatFrame()))
    stream._deliver(_frame(2))
    stream._deliver(encode(EndFrame()))
    assert [stream.ready().token_ids, stream.ready().token_ids] == [[1], [2]]  # type: ignore[union-attr]
    with pytest.raises(EOFError):
        stream.ready()
    assert stream.done
